//! The `provisioner` binary: argument errors exit 2 with a clear message, `render` writes
//! every generated file, `--dry-run` prints commands, and `plan host` gathers through a real
//! sshd on loopback (libvirt's test driver on the "host" side).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::sshd::Sshd;
use provisioner::inventory::Inventory;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/cluster.example.toml"
);

fn provisioner(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_lists_every_command() {
    let out = provisioner(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for cmd in [
        "preflight",
        "plan",
        "apply",
        "verify",
        "status",
        "teardown",
        "render",
        "ssh",
        "kubectl",
        "tunnel",
        "image",
        "--dry-run",
        "--verbose",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from:\n{help}");
    }
}

#[test]
fn bad_arguments_exit_2_with_the_reason() {
    let out = provisioner(&["-i", EXAMPLE, "plan", "sni-proxy"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unknown phase `sni-proxy`; phases are host, vms, k8s-common"),
        "{}",
        text(&out.stderr)
    );

    let out = provisioner(&["-i", EXAMPLE, "apply"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: name the phases to apply (e.g. `apply host vms`) or pass --all\n"
    );

    let out = provisioner(&["-i", EXAMPLE, "--dry-run", "ssh", "k8s-worker9"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!("error: no VM named `k8s-worker9` in {EXAMPLE}; VMs are k8s-master, k8s-worker1, k8s-worker2\n")
    );

    let out = provisioner(&["-i", EXAMPLE, "tunnel", "prometheus"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_bad_inventory_exits_2_naming_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.toml");
    let example = std::fs::read_to_string(EXAMPLE).expect("example");
    let bad = example.replacen("ip = \"10.10.10.12\"", "ip = \"10.10.10.10\"", 1);
    let worker2 = bad.find("name = \"k8s-worker2\"").expect("worker2");
    let line = bad[..worker2 + bad[worker2..].find("ip =").expect("ip")]
        .matches('\n')
        .count()
        + 1;
    std::fs::write(&path, bad).expect("write");
    let out = provisioner(&["-i", path.to_str().expect("utf8"), "render", "--out", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: {}:{line}: `vms[2].ip`: 10.10.10.10 is already used by vms[0]\n",
            path.display()
        )
    );
}

#[test]
fn render_writes_every_generated_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("out");
    let out = provisioner(&[
        "-i",
        EXAMPLE,
        "render",
        "--out",
        out_dir.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cluster = Inventory::load(Path::new(EXAMPLE)).expect("valid");
    let files = provisioner::render::all(&cluster);
    let k8s = provisioner::k8s::Manifests::build(&cluster, &provisioner::k8s::Inputs::for_review())
        .and_then(|m| m.rendered(&provisioner::k8s::Inputs::for_review()))
        .expect("k8s objects render");
    let host = provisioner::cli::host_files(&cluster).expect("host files");
    assert_eq!(
        text(&out.stdout).lines().count(),
        files.len() + host.len() + k8s.len()
    );
    // The host's files: iptables restore and teardown, jump script, units, sysctl.
    for name in [
        "host/etc/turnd-hostnet/rules.v4",
        "host/etc/turnd-hostnet/teardown.v4",
        "host/etc/turnd-hostnet/jumps.sh",
        "host/etc/systemd/system/turnd-hostnet.service",
        "host/etc/sysctl.d/90-turnd-hostnet.conf",
        "host/etc/systemd/system/turnd-cert-renew.service",
        "host/etc/systemd/system/turnd-cert-renew.timer",
    ] {
        assert!(out_dir.join(name).is_file(), "{name} not written");
    }
    for (path, contents) in host {
        assert_eq!(
            std::fs::read(out_dir.join(&path)).expect("written"),
            contents,
            "{path}"
        );
    }
    for f in k8s {
        assert_eq!(
            std::fs::read_to_string(out_dir.join("k8s").join(&f.path)).expect("written"),
            f.contents,
            "k8s/{}",
            f.path
        );
    }
    for f in files {
        assert_eq!(
            std::fs::read_to_string(out_dir.join(&f.path)).expect("written"),
            f.contents,
            "{}",
            f.path
        );
    }
}

#[test]
fn dry_run_prints_the_ssh_command_through_the_host() {
    let out = provisioner(&[
        "-i",
        EXAMPLE,
        "--dry-run",
        "ssh",
        "k8s-worker1",
        "--",
        "uname",
        "-a",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    assert!(
        line.starts_with("ssh -p 22 -o StrictHostKeyChecking=accept-new"),
        "{line}"
    );
    assert!(
        line.contains("ProxyCommand=ssh -p 22 -o BatchMode=yes"),
        "{line}"
    );
    assert!(line.contains("-W %h:%p root@94.130.141.98"), "{line}");
    assert!(
        line.trim_end()
            .ends_with("ubuntu@10.10.10.11 -- 'uname -a'"),
        "{line}"
    );

    let out = provisioner(&[
        "-i",
        EXAMPLE,
        "--dry-run",
        "kubectl",
        "--",
        "get",
        "nodes",
        "-o",
        "wide",
    ]);
    assert!(
        text(&out.stdout)
            .trim_end()
            .ends_with("root@94.130.141.98 -- 'kubectl get nodes -o wide'"),
        "{}",
        text(&out.stdout)
    );
}

fn loopback_inventory(sshd: &Sshd, dir: &Path) -> PathBuf {
    let example = std::fs::read_to_string(EXAMPLE).expect("example");
    let text = example
        .replace(
            "ssh_address = \"94.130.141.98\"",
            "ssh_address = \"127.0.0.1\"",
        )
        .replace(
            "host_user = \"root\"",
            &format!("host_user = \"{}\"", sshd.user),
        )
        .replace("host_port = 22", &format!("host_port = {}", sshd.port))
        .replace(
            "private_key = \"~/.ssh/id_ed25519\"",
            &format!(
                "private_key = \"{}\"\nknown_hosts = \"{}\"",
                sshd.client_key().display(),
                sshd.known_hosts().display()
            ),
        )
        .replace(
            "libvirt_uri = \"qemu:///system\"",
            "libvirt_uri = \"test:///default\"",
        )
        .replace(
            "image_dir = \"/var/lib/libvirt/images\"",
            &format!("image_dir = \"{}\"", dir.display()),
        );
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn plan_host_gathers_over_real_ssh() {
    let Some(sshd) = Sshd::start() else { return };
    if !common::have_tool("virsh", "libvirt-clients") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = loopback_inventory(&sshd, dir.path());
    let out = provisioner(&["-i", inv.to_str().expect("utf8"), "-v", "plan", "host"]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}\n{}", sshd.log());
    assert!(stdout.starts_with("phase 01-host: "), "{stdout}");
    assert!(
        stdout.contains(
            "[host] download cloud image ubuntu-22.04-server-cloudimg-amd64.img (missing)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("[host] define network k8s-net (new)"),
        "{stdout}"
    );
    // -v shows every command run on the host and its exit status.
    assert!(
        stderr.contains("[host] $ virsh -c test:///default net-list --all --name -> 0"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("provisioner").exists(),
        "plan changed nothing"
    );
}

#[test]
fn preflight_names_the_missing_secret_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env_file = dir.path().join(".env");
    std::fs::write(&env_file, "CF_Token=t\nCF_Zone_ID=z\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args([
            "-i",
            EXAMPLE,
            "--dry-run",
            "preflight",
            "--env-file",
            env_file.to_str().expect("utf8"),
        ])
        .env_remove("CF_Token")
        .env_remove("CF_Zone_ID")
        .env_remove("TURND_AUTH_SECRET")
        .env_remove("COTURN_AUTH_SECRET")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("ok    inventory: {EXAMPLE}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "FAIL  secrets: missing secret TURND_AUTH_SECRET: set it in the environment or in {} (the old name COTURN_AUTH_SECRET is accepted too)",
            env_file.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("skip  host checks (--dry-run)"), "{stdout}");
}

#[test]
fn apply_refuses_a_disruptive_plan_without_yes_and_status_exits_non_zero() {
    let Some(sshd) = Sshd::start() else { return };
    if !common::have_tool("virsh", "libvirt-clients") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = loopback_inventory(&sshd, dir.path());
    // libvirt's test driver has a running network `default` (virbr0, 192.168.122.1/24):
    // naming it in the inventory with our bridge and addresses is a definition change that
    // needs the network stopped.
    let edited = std::fs::read_to_string(&inv)
        .expect("inventory")
        .replace("name = \"k8s-net\"", "name = \"default\"");
    std::fs::write(&inv, edited).expect("write");
    let inv = inv.to_str().expect("utf8");

    let out = provisioner(&["-i", inv, "apply", "host"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("[host] stop network default to apply the new definition (DISRUPTIVE: every running VM loses its network until the network starts again)"),
        "{stdout}"
    );
    assert_eq!(
        stderr,
        "error: phase 01-host: not applied: 1 disruptive action(s) need --yes (or a confirmation on a terminal):\n  [host] stop network default to apply the new definition: every running VM loses its network until the network starts again\n"
    );
    assert!(
        !dir.path().join("provisioner").exists(),
        "no action of the phase ran"
    );
    assert!(
        !dir.path().join(".provisioner/lock").exists(),
        "the run lock is released"
    );

    // `status` with pending actions exits non-zero (for scripts and CI).
    let out = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(["-i", inv, "status"])
        .env_remove("TURND_AUTH_SECRET")
        .env_remove("COTURN_AUTH_SECRET")
        .env_remove("KUBECONFIG")
        .output()
        .expect("runs");
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("01-host: "), "{stdout}");
    assert!(stdout.contains(" action(s) pending"), "{stdout}");
}

#[test]
fn image_load_without_an_archive_and_image_build_without_podman_or_buildah_say_why() {
    let out = provisioner(&["-i", EXAMPLE, "image", "load"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("[container] archive is not set: nothing to load (run `provisioner image build` and pin what it prints)"),
        "{}",
        text(&out.stderr)
    );

    // A PATH with neither tool.
    let bin = tempfile::tempdir().expect("tempdir");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .env("PATH", bin.path())
        .args(["-i", EXAMPLE, "image", "build", "--archive"])
        .arg(dir.path().join("a.tar"))
        .output()
        .expect("binary runs");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(
            "on local: neither podman nor buildah is installed: install one (`apt-get install podman`)"
        ),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.path().join("a.tar").exists());
}
