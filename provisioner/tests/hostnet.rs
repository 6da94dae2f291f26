//! Host networking (`provisioner::hostnet`) for the example inventory: golden copies of the
//! iptables-restore files, the jump script, the systemd unit and the sysctl file; the unit
//! passes `systemd-analyze verify` with nothing on stderr; the shell script parses.

use std::path::Path;
use std::process::Command;

use provisioner::hostnet::{HostNet, JumpDrift, JUMPS, UNIT_NAME};
use provisioner::inventory::{Cluster, Inventory};

fn example() -> Cluster {
    Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid")
}

/// Whether `tool` exists; fails under `TURND_REQUIRE_TOOLS=1`, else says why it skips.
fn have(tool: &str, package: &str) -> bool {
    let found = Path::new(tool).is_file();
    if !found {
        assert!(
            std::env::var("TURND_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "`{tool}` is required (TURND_REQUIRE_TOOLS=1): apt-get install {package}"
        );
        eprintln!("SKIPPED: `{tool}` not found; apt-get install {package}");
    }
    found
}

#[test]
fn every_hostnet_file_matches_its_golden_copy() {
    let files = HostNet::from_cluster(&example()).expect("renders").files();
    insta::assert_snapshot!("hostnet__rules.v4", files.rules);
    insta::assert_snapshot!("hostnet__teardown.v4", files.teardown);
    insta::assert_snapshot!("hostnet__jumps.sh", files.jumps);
    insta::assert_snapshot!("hostnet__turnd-hostnet.service", files.unit);
    insta::assert_snapshot!("hostnet__sysctl.conf", files.sysctl);
}

#[test]
fn each_public_ip_goes_to_its_own_worker() {
    let h = HostNet::from_cluster(&example()).expect("renders");
    let pairs: Vec<(String, String)> = h
        .forwards
        .iter()
        .map(|f| (f.public_ip.to_string(), f.worker_ip.to_string()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("94.130.141.98".to_owned(), "10.10.10.11".to_owned()),
            ("94.130.141.99".to_owned(), "10.10.10.12".to_owned())
        ]
    );
    // 5 DNAT + 1 SNAT + 7 FORWARD rules for the instance marked tcp_443; two fewer (no 443
    // DNAT, no 443 ACCEPT) for the one on the host's main IP.
    assert_eq!(h.rules().len(), 13 + 11);
    let on_443: Vec<String> = h
        .rules()
        .iter()
        .filter(|r| r.spec.contains("--dport 443 "))
        .map(|r| r.spec.clone())
        .collect();
    assert_eq!(
        on_443,
        [
            "-d 94.130.141.99/32 -p tcp -m tcp --dport 443 -j DNAT --to-destination 10.10.10.12",
            "-d 10.10.10.12/32 -p tcp -m tcp --dport 443 -j ACCEPT"
        ]
    );
    let restore = h.restore_file();
    // Only our chains are declared or flushed: never a built-in or foreign chain.
    for line in restore.lines() {
        if let Some(chain) = line
            .strip_prefix(':')
            .or_else(|| line.strip_prefix("-F "))
            .or_else(|| line.strip_prefix("-A "))
        {
            assert!(
                chain.starts_with("TURND-"),
                "touches a foreign chain: {line}"
            );
        }
        assert!(!line.starts_with("-I") && !line.starts_with("-D"), "{line}");
    }
}

#[test]
fn the_unit_passes_systemd_analyze_verify_with_empty_stderr() {
    if !have("/usr/bin/systemd-analyze", "systemd") {
        return;
    }
    let h = HostNet::from_cluster(&example()).expect("renders");
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join(UNIT_NAME);
    std::fs::write(&unit, h.systemd_unit()).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("runs systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify said:\n{stderr}"
    );
}

#[test]
fn the_jump_script_is_valid_posix_shell() {
    if !have("/bin/sh", "dash") {
        return;
    }
    let h = HostNet::from_cluster(&example()).expect("renders");
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("jumps.sh");
    std::fs::write(&script, h.jumps_script()).expect("write");
    let out = Command::new("/bin/sh")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("runs sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_fresh_host_reports_every_rule_and_jump_missing() {
    let h = HostNet::from_cluster(&example()).expect("renders");
    let drift = h.verify("*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n");
    assert!(!drift.is_clean());
    assert_eq!(drift.missing.len(), h.rules().len());
    assert_eq!(
        drift.jumps,
        JUMPS.map(JumpDrift::Missing).to_vec(),
        "{drift}"
    );
}

/// The check above is not vacuous: `systemd-analyze verify` exits 0 on errors, but it does
/// write them to stderr, which is what the test looks at.
#[test]
fn systemd_analyze_reports_a_broken_unit_on_stderr() {
    if !have("/usr/bin/systemd-analyze", "systemd") {
        return;
    }
    let h = HostNet::from_cluster(&example()).expect("renders");
    let broken = h
        .systemd_unit()
        .replace("RemainAfterExit=yes", "RemainAfterExit=maybe");
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join(UNIT_NAME);
    std::fs::write(&unit, broken).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("runs systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("RemainAfterExit") || stderr.contains("maybe"),
        "{stderr}"
    );
}
