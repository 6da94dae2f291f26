//! The generated cloud-init seed against the real cloud-init: the schema validator accepts
//! the user-data, our unknown-key check (run against cloud-init's own JSON schema) finds
//! nothing, the network-config renders to networkd, and the seed ISO built by `cloud-localds`
//! reads back with `isoinfo`.

mod common;

use std::path::Path;
use std::process::Command;

use provisioner::inventory::{Cluster, Inventory};
use provisioner::render::cloudinit;

const SCHEMA: &str =
    "/usr/lib/python3/dist-packages/cloudinit/config/schemas/schema-cloud-config-v1.json";

fn example() -> Cluster {
    Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid")
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("tool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn user_data_passes_cloud_init_schema_and_has_no_unknown_keys() {
    if !common::have_tool("cloud-init", "cloud-init") {
        return;
    }
    let schema = std::fs::read_to_string(SCHEMA).expect("cloud-init ships its schema");
    let dir = tempfile::tempdir().expect("tempdir");
    let c = example();
    for vm in &c.vms {
        let seed = cloudinit::seed(&c, vm);
        let path = dir.path().join(format!("{}-user-data", vm.name));
        std::fs::write(&path, &seed.user_data).expect("write");
        let (ok, text) = run(Command::new("cloud-init")
            .arg("schema")
            .arg("--config-file")
            .arg(&path));
        assert!(
            ok && text.contains("Valid cloud-config"),
            "{}: {text}",
            vm.name
        );
        assert_eq!(
            cloudinit::unknown_keys(&seed.user_data, &schema).expect("checks"),
            Vec::<String>::new()
        );
    }
}

#[test]
fn a_typo_passes_cloud_init_schema_but_not_our_check() {
    if !common::have_tool("cloud-init", "cloud-init") {
        return;
    }
    let schema = std::fs::read_to_string(SCHEMA).expect("cloud-init ships its schema");
    let c = example();
    let seed = cloudinit::seed(&c, c.master());
    let typo = seed
        .user_data
        .replace("\npackages:", "\npackges:")
        .replace("\ntimezone:", "\ntimezon:");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("user-data");
    std::fs::write(&path, &typo).expect("write");
    let (ok, text) = run(Command::new("cloud-init")
        .arg("schema")
        .arg("--config-file")
        .arg(&path));
    assert!(ok, "the schema tool lets the typo pass: {text}");
    assert_eq!(
        cloudinit::unknown_keys(&typo, &schema).expect("checks"),
        vec!["timezon".to_owned(), "packges".to_owned()]
    );
    // Inside `users` the schema is strict already; our check agrees with it.
    let nested = seed.user_data.replace("  shell:", "  shel:");
    assert_eq!(
        cloudinit::unknown_keys(&nested, &schema).expect("checks"),
        vec!["users[0].shel".to_owned()]
    );
}

#[test]
fn network_config_renders_to_networkd_with_the_static_address() {
    if !common::have_tool("cloud-init", "cloud-init") {
        return;
    }
    let c = example();
    let vm = c.vm("k8s-worker2").expect("vm");
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("network-config");
    std::fs::write(&input, cloudinit::seed(&c, vm).network_config).expect("write");
    let out = dir.path().join("out");
    let (ok, text) = run(Command::new("cloud-init")
        .args([
            "devel",
            "net-convert",
            "-k",
            "yaml",
            "-D",
            "debian",
            "-O",
            "networkd",
            "-p",
        ])
        .arg(&input)
        .arg("-d")
        .arg(&out));
    assert!(ok, "{text}");
    let unit = std::fs::read_to_string(out.join("etc/systemd/network/10-cloud-init-eth0.network"))
        .expect("unit written");
    for line in [
        "Address=10.10.10.12/24",
        "MACAddress=52:54:00:0a:0a:0c",
        "Gateway=10.10.10.1",
        "DNS=1.1.1.1 8.8.8.8",
        "DHCP=no",
    ] {
        assert!(unit.contains(line), "{line} missing in:\n{unit}");
    }
}

#[test]
fn seed_iso_from_cloud_localds_reads_back_with_isoinfo() {
    if !common::have_tool("cloud-localds", "cloud-image-utils")
        || !common::have_tool("isoinfo", "genisoimage")
    {
        return;
    }
    let c = example();
    let vm = c.master();
    let seed = cloudinit::seed(&c, vm);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("user-data"), &seed.user_data).expect("write");
    std::fs::write(d.join("meta-data"), &seed.meta_data).expect("write");
    std::fs::write(d.join("network-config"), &seed.network_config).expect("write");
    let iso = d.join("seed.iso");
    let (ok, text) = run(Command::new("cloud-localds")
        .arg(format!(
            "--network-config={}",
            d.join("network-config").display()
        ))
        .arg(&iso)
        .arg(d.join("user-data"))
        .arg(d.join("meta-data")));
    assert!(ok, "{text}");
    let (ok, info) = run(Command::new("isoinfo").arg("-d").arg("-i").arg(&iso));
    assert!(ok && info.contains("Volume id: cidata"), "{info}");
    for (name, want) in [
        ("user-data", &seed.user_data),
        ("meta-data", &seed.meta_data),
        ("network-config", &seed.network_config),
    ] {
        let out = Command::new("isoinfo")
            .arg("-R")
            .arg("-i")
            .arg(&iso)
            .arg("-x")
            .arg(format!("/{name}"))
            .output()
            .expect("isoinfo");
        assert_eq!(&String::from_utf8_lossy(&out.stdout), want, "{name}");
    }
}
