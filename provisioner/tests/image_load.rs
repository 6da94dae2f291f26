//! The image without a registry, end to end with real tools: `provisioner image build` (the
//! real binary) builds the project's `Dockerfile` (stage `runtime-prebuilt` around a static
//! turnd) with podman inside a network namespace of this test and writes the OCI archive;
//! the digest it prints is pinned in the inventory as an operator would; then `image load`'s
//! gather → plan → apply ([`turnd::gather_image`], [`turnd::plan_image`], [`apply`]) streams
//! the archive over a real loopback sshd into two REAL containerds (Debian `containerd`, one
//! per worker, standalone with their own config, root, state and socket, inside the
//! namespace), and `ctr images ls` on each shows the image under the printed digest. A second
//! plan is empty.
//!
//! Each worker is an sshd on loopback whose sessions reach their containerd through
//! `CONTAINERD_ADDRESS` (sshd's `SetEnv`); the sessions log in as root (this test's user), so
//! the `sudo -n` the VMs' transports add is left out. The CLI's transports go to the VMs
//! through the libvirt host, which does not exist here, so `image load` is driven through the
//! same library calls the command makes.
//!
//! Ignored by default: building the static binary from nothing takes minutes here. CI runs it
//! with `cargo test -p provisioner --test image_load -- --ignored`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::image::{prebuilt_context, static_turnd, workspace, Containerd, Netns, Podman};
use common::run::{run, text};
use common::sshd::Sshd;
use provisioner::exec::{RecordingTransport, SshTransport, Transport};
use provisioner::inventory::Inventory;
use provisioner::phases::{turnd, Context, Settings};
use provisioner::plan::{apply, Journal, PhaseId, Plan, Transports};

/// podman's images go before the namespace does.
struct Cleanup<'a> {
    podman: Podman,
    ns: &'a Netns,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.podman.clean(self.ns);
    }
}

#[test]
#[ignore = "builds a static binary (minutes); CI runs it with --ignored"]
fn image_build_then_load_over_ssh_into_real_containerds_shows_the_printed_digest() {
    for (tool, package) in [
        ("podman", "podman"),
        ("runc", "runc"),
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
    ] {
        if !common::have_tool(tool, package) {
            return;
        }
    }
    let binary = static_turnd();
    let context = prebuilt_context(&binary);
    let ns = Netns::new("til");
    let cleanup = Cleanup {
        podman: Podman::new(),
        ns: &ns,
    };

    // An inventory without a [container] section yet: `image build` writes the archive next
    // to it and prints what to pin.
    let dir = tempfile::tempdir().expect("tempdir");
    let inventory = dir.path().join("cluster.toml");
    let example =
        std::fs::read_to_string(workspace().join("deploy/cluster.example.toml")).expect("example");
    std::fs::write(&inventory, &example).expect("write inventory");
    let mut build = ns.command(env!("CARGO_BIN_EXE_provisioner"));
    cleanup.podman.env(&mut build);
    build
        .arg("-i")
        .arg(&inventory)
        .args(["image", "build", "--dockerfile"])
        .arg(workspace().join("Dockerfile"))
        .arg("--context")
        .arg(context.path());
    let o = run(&mut build, Duration::from_secs(600));
    let out = text(&o);
    assert!(o.status.success(), "image build:\n{out}");
    let archive = dir.path().join(".provisioner/image/turnd.oci.tar");
    assert!(
        archive.is_file(),
        "no archive at {}:\n{out}",
        archive.display()
    );
    let pinned = out
        .lines()
        .find_map(|l| l.strip_prefix("image = \"")?.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no `image = \"…\"` line:\n{out}"))
        .to_owned();
    let (repo, digest) = pinned.split_once('@').expect("REPO@DIGEST");
    assert_eq!(repo, "localhost/turnd", "{out}");
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{out}");
    assert!(
        out.contains(&format!(
            "built localhost/turnd:{} ({digest})",
            env!("CARGO_PKG_VERSION")
        )),
        "{out}"
    );
    // The tool's own digest is that of its local manifest, not of the saved archive's: the
    // one printed must be the archive's (containerd keeps that manifest as it is).
    let tool_digest = cleanup.podman.podman_ok(
        &ns,
        &[
            "image",
            "inspect",
            "--format",
            "{{.Digest}}",
            &format!("localhost/turnd:{}", env!("CARGO_PKG_VERSION")),
        ],
        Duration::from_secs(30),
    );
    eprintln!(
        "podman's digest {}, the archive's {digest}",
        tool_digest.trim()
    );

    // Pin it, as printed.
    let stdout = String::from_utf8_lossy(&o.stdout);
    let section = &stdout[stdout.find("[container]").expect("section printed")..];
    std::fs::write(&inventory, format!("{example}\n{section}\n")).expect("pin");
    let c = Inventory::load(&inventory).expect("the printed section is valid");

    // Two workers, each a containerd in the namespace behind an sshd on loopback.
    let workers: Vec<String> = c.workers().map(|w| w.name.to_string()).collect();
    assert_eq!(workers.len(), 2);
    let containerds: Vec<Containerd> = workers.iter().map(|_| Containerd::start(&ns)).collect();
    let mut sshds = Vec::new();
    for cd in &containerds {
        let extra = format!("SetEnv CONTAINERD_ADDRESS={}\n", cd.socket().display());
        let Some(s) = Sshd::start_with(&extra) else {
            return;
        };
        sshds.push(s);
    }
    let mut vms: BTreeMap<String, Box<dyn Transport>> = BTreeMap::new();
    for (name, sshd) in workers.iter().zip(&sshds) {
        vms.insert(
            name.clone(),
            Box::new(SshTransport::new(name, sshd.options()).expect("transport")),
        );
    }
    let t = Transports {
        host: Box::new(RecordingTransport::new("host")),
        vms,
    };
    let settings = Settings::default();
    let ctx = Context {
        cluster: &c,
        transports: &t,
        settings: &settings,
    };

    let plan_load = || {
        let facts = turnd::gather_image(&ctx)
            .expect("gathers over ssh")
            .expect("a local image");
        let mut p = Plan::new(PhaseId::Turnd);
        turnd::plan_image(&facts, &mut p);
        p
    };
    let p = plan_load();
    let summaries: Vec<String> = p.actions.iter().map(|a| a.summary.clone()).collect();
    assert_eq!(
        summaries,
        vec![format!("import image {pinned} from {} (missing)", archive.display()); 2]
    );
    apply(&p, &t, &mut Journal::in_memory()).expect("imports");

    for (name, cd) in workers.iter().zip(&containerds) {
        let o = run(
            &mut cd.ctr(&["-n", "k8s.io", "images", "ls"]),
            Duration::from_secs(30),
        );
        let ls = text(&o);
        assert!(o.status.success(), "{ls}");
        let row = ls
            .lines()
            .find(|l| l.split_whitespace().next() == Some(pinned.as_str()))
            .unwrap_or_else(|| panic!("{name}: no {pinned} in:\n{ls}\n{}", cd.log()));
        assert_eq!(
            row.split_whitespace().nth(2),
            Some(digest),
            "{name}: the DIGEST column:\n{ls}"
        );
        assert!(
            ls.lines()
                .any(|l| l.starts_with(&format!("localhost/turnd:{} ", env!("CARGO_PKG_VERSION")))),
            "{name}: the tag too:\n{ls}"
        );
    }
    // Idempotent: nothing left to import.
    let again = plan_load();
    assert!(again.is_empty(), "{}", again.render(true));

    drop(t);
    drop(sshds);
    drop(containerds);
    drop(cleanup);
}
