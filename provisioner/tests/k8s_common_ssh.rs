//! `k8s-common`'s gathering over a real SSH connection: this machine (a Debian system) plays
//! the VM through an sshd on loopback. The real `dpkg-query`, `sha256sum`, `apt-mark`,
//! `swapon` answer, and the plan built from them asks for what is really missing. Nothing is
//! applied. (The full slow tier — a booted guest — is not part of this test.)

mod common;

use std::path::Path;

use common::sshd::Sshd;
use provisioner::exec::{Cmd, SshTransport, Transport};
use provisioner::inventory::Inventory;
use provisioner::phases::k8s::{gather_common_vm, plan_common_vm};
use provisioner::plan::{PhaseId, Plan};

#[test]
fn k8s_common_checks_run_over_ssh_against_a_real_system() {
    let Some(sshd) = Sshd::start() else { return };
    if !common::have_tool("dpkg-query", "dpkg") {
        return;
    }
    let c = Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid");
    let t = SshTransport::new("k8s-master", sshd.options()).expect("transport");
    let facts = gather_common_vm(&t).expect("gathers over ssh");

    // Compare with what this machine really has, asked locally.
    let local = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}", "ca-certificates"])
        .output()
        .expect("dpkg-query");
    let has_ca = String::from_utf8_lossy(&local.stdout).trim() == "ii";
    assert_eq!(
        facts.packages.contains_key("ca-certificates"),
        has_ca,
        "{facts:?}"
    );
    let has_kubeadm = t
        .run(&Cmd::new("sh").args(["-c", "dpkg-query -W kubeadm >/dev/null 2>&1"]))
        .expect("runs")
        .success();
    assert_eq!(facts.packages.contains_key("kubeadm"), has_kubeadm);
    let modules_present = Path::new("/etc/modules-load.d/k8s.conf").exists();
    assert_eq!(
        facts.files.contains_key("/etc/modules-load.d/k8s.conf"),
        modules_present
    );

    let mut plan = Plan::new(PhaseId::K8sCommon);
    plan_common_vm(&c, c.master(), &facts, &mut plan);
    let summaries: Vec<&str> = plan.actions.iter().map(|a| a.summary.as_str()).collect();
    if !has_kubeadm {
        assert!(
            summaries.contains(&"install kubelet=1.29.6-1.1 kubeadm=1.29.6-1.1 kubectl=1.29.6-1.1"),
            "{summaries:?}"
        );
    }
    if !modules_present {
        assert!(
            summaries
                .contains(&"write /etc/modules-load.d/k8s.conf (missing) and load the modules"),
            "{summaries:?}"
        );
    }
    assert!(
        !Path::new("/etc/modules-load.d/k8s.conf").exists() || modules_present,
        "gathering wrote nothing"
    );
}
