//! Phases `host` and `vms` against a real libvirt: the in-process `test:///default` driver
//! (held open in one `virsh` session), real `qemu-img` overlays and real `cloud-localds`
//! seeds in a temporary image directory. Covers: defined and started, untouched when equal
//! (second plan empty), redefined on drift, restarted when stopped, removed by teardown.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use provisioner::exec::{Cmd, Transport, VirshShellTransport};
use provisioner::inventory::{Cluster, Inventory};
use provisioner::phases::{self, Context, Settings};
use provisioner::plan::{apply, Journal, PhaseId, Plan, Transports};

const URI: &str = "test:///default";

struct World {
    dir: tempfile::TempDir,
    /// SHA-256 of the base image.
    sha: String,
    transports: Transports,
    settings: Settings,
}

fn tools_present() -> bool {
    common::have_tool("virsh", "libvirt-clients")
        && common::have_tool("qemu-img", "qemu-utils")
        && common::have_tool("cloud-localds", "cloud-image-utils")
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("64M")
            .status()
            .expect("qemu-img");
        assert!(st.success());
        // Images are kept by checksum: put the base where the host phase expects it.
        let sha = phases::facts::sha256(&std::fs::read(&base).expect("base"));
        let by_sum = dir.path().join(format!("sha256-{}", &sha[..16]));
        std::fs::create_dir(&by_sum).expect("mkdir");
        std::fs::rename(&base, by_sum.join("base.qcow2")).expect("move base");
        let host: Box<dyn Transport> =
            Box::new(VirshShellTransport::start(URI).expect("virsh session"));
        World {
            dir,
            sha,
            transports: Transports {
                host,
                vms: BTreeMap::new(),
            },
            // Packages this test machine has, so the host plan has nothing to install.
            settings: Settings {
                host_packages: vec!["libvirt-clients".into(), "cloud-image-utils".into()],
                // No systemd on this host: no certificate renewal timer.
                renew_timer: false,
                // This test waits for the guest itself (or has none).
                vm_ready_timeout: None,
                ..Settings::default()
            },
        }
    }

    fn image_dir(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// Where the base image is kept (by checksum).
    fn base(&self) -> String {
        format!("{}/sha256-{}/base.qcow2", self.image_dir(), &self.sha[..16])
    }

    /// The example inventory pointed at the test driver and the temporary image directory.
    fn cluster(&self, edit: impl Fn(String) -> String) -> Cluster {
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/cluster.example.toml"
        ))
        .expect("example");
        let sha = self.sha.clone();
        let text = example
            .replace(
                "libvirt_uri = \"qemu:///system\"",
                &format!("libvirt_uri = \"{URI}\""),
            )
            .replace(
                "image_dir = \"/var/lib/libvirt/images\"",
                &format!("image_dir = \"{}\"", self.image_dir()),
            )
            .replace(
                "0000000000000000000000000000000000000000000000000000000000000000",
                &sha,
            )
            .replace(
                "file = \"ubuntu-22.04-server-cloudimg-amd64.img\"",
                "file = \"base.qcow2\"",
            );
        let text = edit(text);
        Inventory::from_toml(&text)
            .and_then(|i| i.validate(&text))
            .expect("test inventory is valid")
    }

    fn plan(&self, c: &Cluster, phase: PhaseId) -> Plan {
        let ctx = Context {
            cluster: c,
            transports: &self.transports,
            settings: &self.settings,
        };
        phases::plan(phase, &ctx).expect("plans")
    }

    fn apply(&self, plan: &Plan) -> Journal {
        let mut journal = Journal::in_memory();
        apply(plan, &self.transports, &mut journal).expect("applies");
        journal
    }

    fn virsh(&self, args: &[&str]) -> String {
        self.transports
            .host
            .run_ok(
                &Cmd::new("virsh")
                    .args(["-c", URI])
                    .args(args.iter().copied()),
            )
            .expect("virsh")
            .stdout
    }
}

fn summaries(p: &Plan) -> Vec<String> {
    p.actions.iter().map(|a| a.summary.clone()).collect()
}

#[test]
fn host_and_vms_converge_repair_drift_and_tear_down() {
    if !tools_present() {
        return;
    }
    let w = World::new();
    let c = w.cluster(|t| t);
    let dir = w.image_dir();

    // Phase host: the network is new; packages and the verified image are already there.
    let plan = w.plan(&c, PhaseId::Host);
    assert_eq!(
        summaries(&plan),
        [
            "define network k8s-net (new)",
            "start network k8s-net",
            "autostart network k8s-net"
        ]
    );
    let journal = w.apply(&plan);
    assert_eq!(journal.records.len(), 3);
    assert!(journal.records.iter().all(|r| r["status"] == "done"));
    assert!(
        w.plan(&c, PhaseId::Host).is_empty(),
        "second host plan is empty"
    );
    let info = w.virsh(&["net-info", "k8s-net"]);
    assert!(
        info.contains("Active:         yes") && info.contains("Autostart:      yes"),
        "{info}"
    );

    // Phase vms: overlay, seed, domain, start, autostart for each VM.
    let plan = w.plan(&c, PhaseId::Vms);
    assert_eq!(plan.actions.len(), 15, "{}", plan.render(false));
    assert_eq!(
        summaries(&plan)[..5],
        [
            format!("create overlay disk {dir}/k8s-master.qcow2 (40G on base.qcow2)"),
            format!("write cloud-init seed {dir}/k8s-master-seed.iso (missing)"),
            "define domain k8s-master (new)".to_owned(),
            "start domain k8s-master".to_owned(),
            "autostart domain k8s-master".to_owned(),
        ]
    );
    w.apply(&plan);
    let second = w.plan(&c, PhaseId::Vms);
    assert!(
        second.is_empty(),
        "second vms plan is empty:\n{}",
        second.render(true)
    );
    for vm in ["k8s-master", "k8s-worker1", "k8s-worker2"] {
        assert_eq!(w.virsh(&["domstate", vm]).trim(), "running");
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(format!("{dir}/{vm}.qcow2"))
            .output()
            .expect("qemu-img");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
        assert_eq!(info["backing-filename"], w.base());
        assert!(Path::new(&format!("{dir}/{vm}-seed.iso")).is_file());
    }

    // Drift in the inventory: worker1 gets less memory → redefined and restarted, nothing else.
    let smaller = w.cluster(|t| t.replacen("memory_gib = 8\n", "memory_gib = 6\n", 1));
    let plan = w.plan(&smaller, PhaseId::Vms);
    assert_eq!(
        summaries(&plan),
        [
            "redefine domain k8s-worker1 (definition differs)",
            "stop domain k8s-worker1 to apply the new definition",
            "start domain k8s-worker1"
        ]
    );
    w.apply(&plan);
    assert!(w.plan(&smaller, PhaseId::Vms).is_empty());
    assert!(w
        .virsh(&["dumpxml", "k8s-worker1"])
        .contains("<memory unit='KiB'>6291456</memory>"));

    // Drift outside the provisioner: a stopped domain, a tampered seed, a bridge renamed.
    w.virsh(&["destroy", "k8s-worker2"]);
    std::fs::write(
        format!("{dir}/provisioner/seed-k8s-master/seed.sha256"),
        "tampered\n",
    )
    .expect("write");
    let plan = w.plan(&c, PhaseId::Vms);
    assert_eq!(
        summaries(&plan),
        [
            format!("write cloud-init seed {dir}/k8s-master-seed.iso (contents differ)"),
            "redefine domain k8s-worker1 (definition differs)".to_owned(),
            "stop domain k8s-worker1 to apply the new definition".to_owned(),
            "start domain k8s-worker1".to_owned(),
            "start domain k8s-worker2".to_owned(),
        ]
    );
    w.apply(&plan);
    assert!(w.plan(&c, PhaseId::Vms).is_empty());

    let xml = w
        .virsh(&["net-dumpxml", "k8s-net"])
        .replace("virbr1", "virbr7");
    let path = format!("{dir}/tampered-net.xml");
    std::fs::write(&path, xml).expect("write");
    w.virsh(&["net-destroy", "k8s-net"]);
    w.virsh(&["net-define", &path]);
    w.virsh(&["net-start", "k8s-net"]);
    let plan = w.plan(&c, PhaseId::Host);
    assert_eq!(
        summaries(&plan),
        [
            "stop network k8s-net to apply the new definition",
            "redefine network k8s-net (definition differs)",
            "start network k8s-net"
        ]
    );
    w.apply(&plan);
    let again = w.plan(&c, PhaseId::Host);
    assert!(again.is_empty(), "{}", again.render(true));
    assert!(w.virsh(&["net-dumpxml", "k8s-net"]).contains("virbr1"));

    // Teardown removes domains, disks, seeds and the network; a second teardown has nothing to do.
    let ctx = Context {
        cluster: &c,
        transports: &w.transports,
        settings: &w.settings,
    };
    let plan = phases::plan_teardown(&ctx, false).expect("plans teardown");
    assert_eq!(plan.actions.len(), 3 * 3 + 2, "{}", plan.render(false));
    w.apply(&plan);
    let domains = w.virsh(&["list", "--all", "--name"]);
    assert!(!domains.contains("k8s-"), "{domains}");
    assert!(!w
        .virsh(&["net-list", "--all", "--name"])
        .contains("k8s-net"));
    for vm in ["k8s-master", "k8s-worker1", "k8s-worker2"] {
        assert!(!Path::new(&format!("{dir}/{vm}.qcow2")).exists());
        assert!(!Path::new(&format!("{dir}/{vm}-seed.iso")).exists());
    }
    assert!(Path::new(&w.base()).exists(), "the cloud image stays");
    assert!(phases::plan_teardown(&ctx, false)
        .expect("plans")
        .is_empty());
}

#[test]
fn a_failing_action_stops_with_phase_action_command_and_stderr() {
    if !tools_present() {
        return;
    }
    if !common::have_tool("curl", "curl") {
        return;
    }
    let w = World::new();
    // The image's checksum differs and its URL is a local file that does not exist: the
    // download action fails at curl (nothing leaves the machine).
    let c = w.cluster(|t| {
        t.replace("file = \"base.qcow2\"", "file = \"other.img\"")
            .replace("https://cloud-images.ubuntu.com/releases/22.04/release/ubuntu-22.04-server-cloudimg-amd64.img", "file:///nonexistent/ubuntu.img")
    });
    let plan = w.plan(&c, PhaseId::Host);
    assert_eq!(
        plan.actions[0].summary,
        "download cloud image other.img (missing)"
    );
    let mut journal = Journal::in_memory();
    let err = apply(&plan, &w.transports, &mut journal).expect_err("curl fails");
    let msg = err.to_string();
    let dir = w.image_dir();
    assert_eq!(
        msg,
        format!(
            "phase 01-host, action 1 `download cloud image other.img (missing)` on host: on local: \
             `curl -fsSL --retry 3 -o {dir}/sha256-{}/other.img.part file:///nonexistent/ubuntu.img` exited with status 37: \
             curl: (37) Couldn't open file /nonexistent/ubuntu.img",
            &w.sha[..16]
        )
    );
    assert_eq!(journal.records.len(), 1, "stopped at the first failure");
    assert_eq!(journal.records[0]["status"], "failed");
    // Nothing after the failure ran: the network was not defined.
    assert!(!w
        .virsh(&["net-list", "--all", "--name"])
        .contains("k8s-net"));
}
