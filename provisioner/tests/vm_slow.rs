//! Slow tier (`#[ignore]`; run with `provisioner/tests/slow/run.sh`): inside a network
//! namespace (and a private mount namespace for its state), a real `libvirtd` with QEMU in
//! software emulation boots a Debian guest built with debootstrap, using *our* network XML,
//! domain XML and cloud-init seed as phases `host` and `vms` apply them; `vms` waits for the
//! guest as on a real host (SSH, then `cloud-init status --wait`, which must end `done`). The
//! provisioner then reaches the guest over SSH (through the namespace) and runs `k8s-common`'s
//! checks.
//! Every address used lives inside the namespace this test creates; nothing touches the root
//! namespace's network.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use provisioner::exec::{
    Cmd, ExecError, LocalTransport, Output, SshOptions, SshTransport, Sudo, Transport,
};
use provisioner::inventory::{Inventory, Role};
use provisioner::phases::k8s::{gather_common_vm, plan_common_vm};
use provisioner::phases::{self, Context, Settings};
use provisioner::plan::{apply, Journal, PhaseId, Plan, Transports};
use provisioner::render::libvirt::{DirectKernel, VirtType};

/// Runs commands inside libvirtd's network and mount namespaces.
struct Nsenter {
    pid: u32,
    local: LocalTransport,
}

impl Transport for Nsenter {
    fn target(&self) -> &str {
        "host"
    }

    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        let mut wrapped = Cmd::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "-n", "--", &cmd.program])
            .args(cmd.args.iter().cloned());
        wrapped.stdin.clone_from(&cmd.stdin);
        self.local.run(&wrapped)
    }

    fn upload(&self, data: &[u8], path: &str, mode: u32) -> Result<(), ExecError> {
        // The test's temporary directory is the same in both mount namespaces.
        self.local.upload(data, path, mode)
    }
}

/// A network namespace with libvirtd in it; everything is removed on drop.
struct Lab {
    ns: String,
    libvirtd: Child,
    dir: tempfile::TempDir,
}

impl Lab {
    fn start(qemu_dir: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let ns = format!("prov-slow-{}", std::process::id());
        let ok = |c: &mut Command| assert!(c.status().expect("runs").success(), "{c:?}");
        ok(Command::new("ip").args(["netns", "add", &ns]));
        ok(Command::new("ip").args(["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]));
        // libvirtd's configuration, users and state live in this directory, bind-mounted in a
        // private mount namespace, so nothing is written to the real /etc or /var.
        std::fs::create_dir_all(d.join("etc")).expect("mkdir");
        for f in std::fs::read_dir("/etc/libvirt")
            .expect("/etc/libvirt")
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "conf") {
                std::fs::copy(f.path(), d.join("etc").join(f.file_name())).expect("copy");
            }
        }
        std::fs::write(
            d.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nsecurity_driver = \"none\"\nswtpm_user = \"root\"\nswtpm_group = \"root\"\nstdio_handler = \"file\"\n",
        )
        .expect("write");
        std::fs::write(
            d.join("etc/libvirtd.conf"),
            "unix_sock_group = \"root\"\nauth_unix_rw = \"none\"\n",
        )
        .expect("write");
        let mut passwd = std::fs::read_to_string("/etc/passwd").expect("passwd");
        let mut group = std::fs::read_to_string("/etc/group").expect("group");
        if !passwd.contains("\nlibvirt-qemu:") {
            passwd.push_str("libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n");
            group.push_str("libvirt-qemu:x:64055:\n");
        }
        if !group.contains("\nkvm:") {
            group.push_str("kvm:x:64056:\n");
        }
        std::fs::write(d.join("passwd"), passwd).expect("write");
        std::fs::write(d.join("group"), group).expect("write");
        let path = match qemu_dir {
            Some(q) => format!(
                "{}:{}",
                q.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
            None => std::env::var("PATH").unwrap_or_default(),
        };
        let script = format!(
            "set -e\nmount --bind {d}/etc /etc/libvirt\nmount --bind {d}/passwd /etc/passwd\nmount --bind {d}/group /etc/group\n\
             for m in /run /var/lib /var/cache /var/log; do mount -t tmpfs tmpfs $m; done\n\
             mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt\n\
             export PATH='{path}'\nexec libvirtd\n",
            d = d.display()
        );
        std::fs::write(d.join("start.sh"), script).expect("write");
        // ip netns exec, unshare and sh all exec: the child's pid is libvirtd's.
        let libvirtd = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
            ])
            .arg(d.join("start.sh"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("libvirtd.log")).expect("log"))
            .spawn()
            .expect("libvirtd starts");
        let lab = Lab { ns, libvirtd, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = lab
                .host()
                .run(&Cmd::new("virsh").args(["-c", "qemu:///system", "version"]))
                .is_ok_and(|o| o.success());
            if up {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd did not start: {}",
                lab.log("libvirtd.log")
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        lab
    }

    fn host(&self) -> Nsenter {
        Nsenter {
            pid: self.libvirtd.id(),
            local: LocalTransport::new(),
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let host = self.host();
        let virsh = |args: &[&str]| {
            let _ = host.run(
                &Cmd::new("virsh")
                    .args(["-c", "qemu:///system"])
                    .args(args.iter().copied()),
            );
        };
        virsh(&["destroy", "k8s-master"]);
        virsh(&["net-destroy", "k8s-net"]);
        let _ = self.libvirtd.kill();
        let _ = self.libvirtd.wait();
        // Whatever else still runs in the namespace (dnsmasq, qemu) was started by this test.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// What the guest says about its boot, for a failure message (empty when it does not answer).
fn guest_log(vm: &dyn Transport) -> String {
    let script = "cloud-init status --long; grep -n -i -E 'warn|error|fail|traceback' \
                  /var/log/cloud-init.log | tail -n 40; tail -n 40 /var/log/cloud-init-output.log";
    vm.run(&Cmd::new("sh").args(["-c", script]))
        .map(|o| format!("guest's cloud-init:\n{}{}", o.stdout, o.stderr))
        .unwrap_or_default()
}

fn guest_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(
        std::env::var("PROVISIONER_GUEST_DIR")
            .unwrap_or_else(|_| "/var/tmp/provisioner-guest".into()),
    );
    let ready = ["guest.qcow2", "vmlinuz", "initrd.img"]
        .iter()
        .all(|f| dir.join(f).is_file());
    if ready {
        Some(dir)
    } else {
        let msg = format!(
            "no test guest in {}: run provisioner/tests/slow/build-guest.sh",
            dir.display()
        );
        assert!(
            std::env::var("TURND_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{msg}"
        );
        eprintln!("SKIPPED: {msg}");
        None
    }
}

#[test]
#[ignore = "slow tier: boots a VM under software emulation (~5 min); run provisioner/tests/slow/run.sh"]
fn a_real_vm_boots_from_our_xml_and_seed_and_answers_k8s_common_checks() {
    // The provisioner's progress lines (the wait for the guest), as an operator sees them.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn,provisioner=info"))
        .with_test_writer()
        .try_init();
    let tools = [
        ("libvirtd", "libvirt-daemon-driver-qemu"),
        ("virsh", "libvirt-clients"),
        ("nsenter", "util-linux"),
        ("nc", "netcat-openbsd"),
        ("cloud-localds", "cloud-image-utils"),
        ("ssh", "openssh-client"),
    ];
    if !tools.iter().all(|(t, p)| common::have_tool(t, p)) {
        return;
    }
    let qemu_dir = std::env::var_os("PROVISIONER_QEMU_BIN_DIR").map(PathBuf::from);
    if qemu_dir.is_none() && !common::have_tool("qemu-system-x86_64", "qemu-system-x86") {
        return;
    }
    let Some(guest) = guest_dir() else { return };
    let lab = Lab::start(qemu_dir.as_deref());
    let d = lab.dir.path();

    // A one-VM inventory: the example, cut down for software emulation.
    let key = d.join("id_ed25519");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("keygen")
        .success());
    let images = d.join("images");
    let sha = Command::new("sha256sum")
        .arg(guest.join("guest.qcow2"))
        .output()
        .expect("sha256sum");
    let sha = String::from_utf8_lossy(&sha.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    // Images are kept by checksum (see `phases::host::image_path`).
    let by_sum = images.join(format!("sha256-{}", &sha[..16]));
    std::fs::create_dir_all(&by_sum).expect("mkdir");
    std::os::unix::fs::symlink(guest.join("guest.qcow2"), by_sum.join("guest.qcow2"))
        .expect("symlink");
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    ))
    .expect("example");
    let mut inv = Inventory::from_toml(&example).expect("parses");
    inv.host.libvirt_uri = "qemu:///system".into();
    inv.host.image_dir = images.display().to_string();
    inv.host.virt_type = VirtType::Qemu;
    inv.image.file = "guest.qcow2".into();
    inv.image.sha256 = sha;
    inv.ssh.authorized_keys = vec![std::fs::read_to_string(key.with_extension("pub"))
        .expect("pub")
        .trim()
        .to_owned()];
    inv.vms.retain(|v| v.role == Role::Master);
    inv.vms[0].vcpus = 1;
    inv.vms[0].memory_gib = 1;
    inv.vms[0].disk_gib = 10;
    inv.turnd.clear();
    let text = toml::to_string(&inv).expect("serialises");
    let cluster = Inventory::from_toml(&text)
        .and_then(|i| i.validate(&text))
        .expect("valid");

    // The guest as the provisioner reaches a VM: the cloud-init user with our key, as root
    // through sudo, here through the namespace instead of a jump over the host.
    let mut opts = SshOptions::new("ubuntu", "10.10.10.10", 22);
    opts.identity = Some(key.clone());
    opts.known_hosts = Some(d.join("known_hosts"));
    opts.proxy_command = Some(format!("ip netns exec {} nc %h %p", lab.ns));
    let root = Arc::new(Sudo::new(
        SshTransport::new("k8s-master", opts).expect("transport"),
    ));
    let transports = Transports {
        host: Box::new(lab.host()),
        vms: [(
            "k8s-master".to_owned(),
            Box::new(Arc::clone(&root)) as Box<dyn Transport>,
        )]
        .into(),
    };
    let settings = Settings {
        host_packages: Vec::new(),
        direct_kernel: Some(DirectKernel {
            kernel: guest.join("vmlinuz").display().to_string(),
            initrd: guest.join("initrd.img").display().to_string(),
            cmdline: "root=/dev/vda rw console=ttyS0".into(),
        }),
        // No systemd in the test namespace: no certificate renewal timer.
        renew_timer: false,
        // The provisioner's own wait (SSH, then `cloud-init status --wait`) on a real guest;
        // the guest answers SSH after about 3 minutes here.
        vm_ready_timeout: Some(Duration::from_secs(15 * 60)),
        ..Settings::default()
    };
    let ctx = Context {
        cluster: &cluster,
        transports: &transports,
        settings: &settings,
    };
    let run = |phase: PhaseId| -> Plan {
        let plan = phases::plan(phase, &ctx).expect("plans");
        apply(&plan, &transports, &mut Journal::in_memory())
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", guest_log(&*root), lab.log("libvirtd.log")));
        plan
    };
    let host_plan = run(PhaseId::Host);
    assert!(host_plan
        .actions
        .iter()
        .any(|a| a.summary == "define network k8s-net (new)"));
    let started = Instant::now();
    let vms_plan = run(PhaseId::Vms);
    // Overlay, seed, define, start, wait, autostart: the wait right after the start.
    assert_eq!(vms_plan.actions.len(), 6, "{}", vms_plan.render(false));
    let at = |summary: &str| vms_plan.actions.iter().position(|a| a.summary == summary);
    let start = at("start domain k8s-master").expect("starts the domain");
    assert_eq!(
        at("wait for SSH and cloud-init on k8s-master"),
        Some(start + 1),
        "{}",
        vms_plan.render(false)
    );
    eprintln!(
        "phase vms applied (the guest answered SSH and cloud-init finished) in {:?}",
        started.elapsed()
    );
    assert!(phases::plan(PhaseId::Host, &ctx).expect("plans").is_empty());
    let again = phases::plan(PhaseId::Vms, &ctx).expect("plans");
    assert!(
        again.is_empty(),
        "{}{}",
        again.render(true),
        lab.host()
            .run(&Cmd::new("virsh").args(["-c", "qemu:///system", "dumpxml", "k8s-master"]))
            .map(|o| o.stdout)
            .unwrap_or_default()
    );

    // `vms` waited for the guest: it answers at once, as the next phase needs.
    let hostname = root.run_ok(&Cmd::new("hostname")).expect("hostname").stdout;
    assert_eq!(hostname.trim(), "k8s-master", "our user-data's hostname");
    let addr = root
        .run_ok(&Cmd::new("ip").args(["-4", "-o", "addr", "show"]))
        .expect("ip")
        .stdout;
    assert!(
        addr.contains("10.10.10.10/24"),
        "our network-config's address: {addr}"
    );

    let facts = gather_common_vm(&*root).expect("k8s-common gathers over ssh");
    assert!(!facts.swap);
    assert!(!facts.packages.contains_key("kubeadm"));
    assert!(facts.helm.is_none());
    let mut plan = Plan::new(PhaseId::K8sCommon);
    plan_common_vm(&cluster, cluster.master(), &facts, &mut plan);
    let summaries: Vec<&str> = plan.actions.iter().map(|a| a.summary.as_str()).collect();
    assert!(
        summaries.contains(&"write /etc/modules-load.d/k8s.conf (missing) and load the modules"),
        "{summaries:?}"
    );
    assert!(
        summaries.contains(&"install kubelet=1.29.6-1.1 kubeadm=1.29.6-1.1 kubectl=1.29.6-1.1"),
        "{summaries:?}"
    );
    assert!(!summaries.iter().any(|s| s.starts_with("turn swap off")));
}
