//! The shipped example inventory parses, and every kind of bad inventory gives one clear
//! error naming the line, the key and the reason.

use std::path::Path;

use provisioner::inventory::{Inventory, InventoryError, Role};

fn example_path() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    ))
}

fn example() -> String {
    std::fs::read_to_string(example_path()).expect("example inventory is readable")
}

/// Parses and validates `text`, returning the error message (panics if it is accepted).
fn error_of(text: &str) -> String {
    match Inventory::from_toml(text).and_then(|inv| inv.validate(text)) {
        Ok(_) => panic!("inventory was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// The 1-based line of the first occurrence of `needle` in `text`, after `after`.
fn line_of(text: &str, after: &str, needle: &str) -> usize {
    let start = text.find(after).expect("anchor present");
    let at = start + text[start..].find(needle).expect("needle present");
    text[..at].matches('\n').count() + 1
}

#[test]
fn example_inventory_parses_with_the_production_layout() {
    let cluster = Inventory::load(example_path()).expect("example is valid");
    assert_eq!(cluster.network.bridge, "virbr1");
    assert_eq!(cluster.network.cidr.to_string(), "10.10.10.0/24");
    let master = cluster.master();
    assert_eq!(
        (
            master.name.as_str(),
            master.ip.to_string(),
            master.vcpus,
            master.memory_gib,
            master.disk_gib
        ),
        ("k8s-master", "10.10.10.10".to_owned(), 2, 4, 40)
    );
    let workers: Vec<_> = cluster
        .workers()
        .map(|w| {
            (
                w.name.as_str(),
                w.ip.to_string(),
                w.vcpus,
                w.memory_gib,
                w.disk_gib,
            )
        })
        .collect();
    assert_eq!(
        workers,
        vec![
            ("k8s-worker1", "10.10.10.11".to_owned(), 4, 8, 60),
            ("k8s-worker2", "10.10.10.12".to_owned(), 4, 8, 60),
        ]
    );
    assert_eq!(cluster.versions.kubernetes.minor_series(), "1.29");
    assert_eq!(cluster.versions.cilium.minor_series(), "1.15");
    assert!(cluster.image.url.contains("22.04"));
    assert_eq!(cluster.turnd.len(), 2);
    for t in &cluster.turnd {
        assert_eq!((t.relay_port_min, t.relay_port_max), (49152, 50175));
        assert_eq!(
            cluster.vm(t.vm.as_str()).map(|v| v.role),
            Some(Role::Worker)
        );
    }
    assert!(cluster
        .host
        .public_ips
        .iter()
        .any(|ip| ip.to_string() == "94.130.141.98"));
}

#[test]
fn duplicate_ip_names_the_second_vm_and_its_line() {
    let text = example().replacen("ip = \"10.10.10.12\"", "ip = \"10.10.10.11\"", 1);
    let line = line_of(&text, "name = \"k8s-worker2\"", "ip =");
    assert_eq!(
        error_of(&text),
        format!("<inline>:{line}: `vms[2].ip`: 10.10.10.11 is already used by vms[1]")
    );
}

#[test]
fn ip_outside_the_network_is_refused() {
    let text = example().replacen("ip = \"10.10.10.11\"", "ip = \"10.10.20.11\"", 1);
    let line = line_of(&text, "name = \"k8s-worker1\"", "ip =");
    assert_eq!(
        error_of(&text),
        format!("<inline>:{line}: `vms[1].ip`: 10.10.20.11 is outside the network 10.10.10.0/24")
    );
}

#[test]
fn duplicate_mac_and_name_are_refused() {
    let text = example().replacen("52:54:00:0a:0a:0c", "52:54:00:0A:0A:0B", 1);
    assert!(error_of(&text).ends_with("`vms[2].mac`: 52:54:00:0a:0a:0b is already used by vms[1]"));
    let text = example().replacen("name = \"k8s-worker2\"", "name = \"k8s-worker1\"", 1);
    assert!(error_of(&text).ends_with("`vms[2].name`: `k8s-worker1` is already used by vms[1]"));
}

#[test]
fn unknown_key_is_refused_with_its_line() {
    let text = example().replacen("vcpus = 2\n", "vcpus = 2\nvcpu = 2\n", 1);
    let line = line_of(&text, "vcpus = 2", "vcpu = 2\n");
    let msg = error_of(&text);
    assert!(
        msg.starts_with(&format!("<inline>:{line}: unknown field `vcpu`")),
        "{msg}"
    );
}

#[test]
fn malformed_values_are_refused_where_they_are() {
    let text = example().replacen("52:54:00:0a:0a:0a", "52:54:00:0a:0a", 1);
    let msg = error_of(&text);
    let line = line_of(&text, "name = \"k8s-master\"", "mac =");
    assert!(msg.starts_with(&format!("<inline>:{line}: ")), "{msg}");
    assert!(msg.contains("not a MAC address"), "{msg}");

    let text = example().replacen("cidr = \"10.10.10.0/24\"", "cidr = \"10.10.10.1/24\"", 1);
    assert!(error_of(&text).contains("host bits set"));
}

#[test]
fn missing_section_is_named() {
    let start = example().find("[monitoring]").expect("section");
    let text = example()[..start].to_owned();
    assert!(error_of(&text).contains("missing field `monitoring`"));
}

#[test]
fn relay_ranges_must_fit() {
    let text = example().replacen("relay_port_max = 50175", "relay_port_max = 49000", 1);
    assert!(
        error_of(&text).ends_with("`turnd[0].relay_port_max`: 49000 is below relay_port_min 49152")
    );
    let text = example().replacen("relay_port_min = 49152", "relay_port_min = 30000", 1);
    assert!(error_of(&text).contains("overlaps the Kubernetes NodePort range 30000-32767"));
    let text = example().replacen("relay_port_min = 49152", "relay_port_min = 80", 1);
    assert!(error_of(&text).ends_with("`turnd[0].relay_port_min`: 80 is below 1024"));
    let text = example().replacen("vm = \"k8s-worker1\"", "vm = \"k8s-master\"", 1);
    assert!(error_of(&text).ends_with("`turnd[0].vm`: `k8s-master` is not a worker"));
    let text = example().replacen(
        "public_ip = \"94.130.141.99\"",
        "public_ip = \"94.130.141.100\"",
        1,
    );
    assert!(error_of(&text)
        .ends_with("`turnd[1].public_ip`: 94.130.141.100 is not one of host.public_ips"));
}

#[test]
fn tcp_443_on_the_host_s_main_ip_is_refused_with_line_and_key() {
    // The old cluster forwarded 443 on the main IP and the host's own HTTPS site hung.
    let text = example().replacen(
        "relay_port_max = 50175\n",
        "relay_port_max = 50175\ntcp_443 = true\n",
        1,
    );
    let line = line_of(&text, "vm = \"k8s-worker1\"", "tcp_443 = true");
    assert_eq!(
        error_of(&text),
        format!(
            "<inline>:{line}: `turnd[0].tcp_443`: 94.130.141.98 is the host's main IP (host.ssh_address): forwarding its tcp/443 to turnd takes HTTPS away from the host's own services; give this instance another of host.public_ips"
        )
    );
}

#[test]
fn static_users_need_exactly_one_of_key_and_password_env() {
    let with = |users: &str| format!("{}\n[auth]\nrealm = \"old.example\"\n{users}", example());
    let text = with("[[auth.users]]\nname = \"alice\"\nkey = \"0x1234\"\n");
    let line = line_of(&text, "name = \"alice\"", "key =");
    assert_eq!(
        error_of(&text),
        format!("<inline>:{line}: `auth.users[0].key`: must be `0x` and 32 hex digits, as `turnadmin -k` prints it")
    );
    let text = with("[[auth.users]]\nname = \"bob\"\n");
    assert!(
        error_of(&text).ends_with("`auth.users[0]`: give exactly one of `key` and `password_env`"),
        "{}",
        error_of(&text)
    );
    let ok = with("[[auth.users]]\nname = \"bob\"\npassword_env = \"TURN_PASSWORD_BOB\"\n");
    let c = Inventory::from_toml(&ok)
        .and_then(|i| i.validate(&ok))
        .expect("valid");
    assert_eq!(c.realm(), "old.example");
}

#[test]
fn a_registry_image_needs_a_digest_and_a_loaded_one_needs_pull_never() {
    let with = |c: &str| format!("{}\n[container]\n{c}", example());
    let text = with("image = \"ghcr.io/turnd/turnd:0.1.0\"\n");
    let line = line_of(&text, "\n[container]\n", "image =");
    assert_eq!(
        error_of(&text),
        format!("<inline>:{line}: `container.image`: `ghcr.io/turnd/turnd:0.1.0`: an image from a registry must name its digest (REPO@sha256:<64 hex digits>); an image loaded on the nodes needs pull = \"never\"")
    );
    for ok in [
        format!(
            "image = \"ghcr.io/turnd/turnd@sha256:{}\"\n",
            "a".repeat(64)
        ),
        "image = \"localhost/turnd:dev\"\npull = \"never\"\n".to_owned(),
    ] {
        let text = with(&ok);
        Inventory::from_toml(&text)
            .and_then(|i| i.validate(&text))
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn vms_must_fit_the_host() {
    let text = example().replacen("memory_gib = 48", "memory_gib = 16", 1);
    assert!(error_of(&text)
        .ends_with("`vms[2].memory_gib`: the VMs need 20 in total but host.memory_gib allows 16"));
    let text = example().replacen("cpus = 12", "cpus = 8", 1);
    assert!(error_of(&text)
        .ends_with("`vms[2].vcpus`: the VMs need 10 in total but host.cpus allows 8"));
}

#[test]
fn exactly_one_master() {
    let text = example().replacen("role = \"master\"", "role = \"worker\"", 1);
    assert!(error_of(&text).ends_with("`vms`: exactly one VM needs role = \"master\""));
    let text = example().replacen("role = \"worker\"", "role = \"master\"", 1);
    assert!(error_of(&text).ends_with("`vms[1].role`: only one master is supported"));
}

#[test]
fn load_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.toml");
    std::fs::write(
        &path,
        example().replacen("vcpus = 2\n", "vcpus = \"two\"\n", 1),
    )
    .expect("write");
    let err = Inventory::load(&path).expect_err("bad type");
    assert!(matches!(err, InventoryError::Parse { .. }));
    assert!(
        err.to_string().starts_with(&format!("{}:", path.display())),
        "{err}"
    );
    let err = Inventory::load(&dir.path().join("absent.toml")).expect_err("absent");
    assert!(err.to_string().contains("cannot read inventory"), "{err}");
}

#[test]
fn bad_label_names_the_vm_and_the_label() {
    let text = example().replacen(
        "\"turnd.io/relay\" = \"true\"",
        "\"turnd.io/relay\" = \"yes please\"",
        1,
    );
    assert!(error_of(&text)
        .ends_with("`vms[1].labels`: label `turnd.io/relay` has an invalid value `yes please`"));
}

#[test]
fn a_local_image_archive_needs_a_pinned_image_and_pull_never_and_lives_next_to_the_inventory() {
    let with = |c: &str| format!("{}\n[container]\n{c}", example());
    let pinned = format!("image = \"localhost/turnd@sha256:{}\"\n", "a".repeat(64));

    let text = with("image = \"localhost/turnd:0.1.0\"\narchive = \"img.tar\"\npull = \"never\"\n");
    let line = line_of(&text, "\n[container]\n", "image =");
    assert_eq!(
        error_of(&text),
        format!("<inline>:{line}: `container.image`: `localhost/turnd:0.1.0`: an image loaded from container.archive is referred to by its digest: set it to the REPO@sha256:<64 hex digits> that `provisioner image build` printed")
    );
    let text = with(&format!("{pinned}archive = \"img.tar\"\n"));
    // `pull` is absent: the error points at the section.
    let line = line_of(&text, "\n[container]\n", "[container]");
    assert_eq!(
        error_of(&text),
        format!("<inline>:{line}: `container.pull`: an image loaded from container.archive is never pulled: set pull = \"never\"")
    );
    let text = with(&format!("{pinned}archive = \"\"\npull = \"never\"\n"));
    let line = line_of(&text, "\n[container]\n", "archive =");
    assert_eq!(
        error_of(&text),
        format!("<inline>:{line}: `container.archive`: must not be empty")
    );
    let text = with(&format!("{pinned}archive = 7\n"));
    assert!(
        error_of(&text).contains("invalid type"),
        "{}",
        error_of(&text)
    );

    // A relative archive is resolved against the inventory's directory.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.toml");
    std::fs::write(
        &path,
        with(&format!(
            "{pinned}archive = \"img/turnd.oci.tar\"\npull = \"never\"\n"
        )),
    )
    .expect("write");
    let c = Inventory::load(&path).expect("valid");
    assert_eq!(
        c.container.as_ref().and_then(|c| c.archive.clone()),
        Some(dir.path().join("img/turnd.oci.tar"))
    );
}
