//! The systemd timer and service that run `provisioner cert renew` daily (golden files), and
//! `cert status` against a loopback TLS server.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use provisioner::acme::{self, CertStore, RENEW_SERVICE, RENEW_TIMER};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/acme_units");

fn check_golden(name: &str, actual: &str) {
    let path = Path::new(GOLDEN).join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden");
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(actual, expected, "{name} differs from its golden file");
}

#[test]
fn renew_units_match_golden_files() {
    let u = acme::render_renew_units(
        Path::new("/usr/local/bin/provisioner"),
        Path::new("/etc/turnd-provisioner"),
        Path::new("/etc/turnd-provisioner/cluster.toml"),
    );
    check_golden(RENEW_SERVICE, &u.service);
    check_golden(RENEW_TIMER, &u.timer);
    assert!(u.timer.contains("OnCalendar=*-*-* 22:55:00"));
    assert!(u.service.contains("cert renew"));
}

#[test]
fn the_renewal_service_may_write_everything_its_commands_write_and_nothing_else() {
    let inventory = Path::new("/etc/turnd-provisioner/cluster.toml");
    let u = acme::render_renew_units(
        Path::new("/usr/local/bin/provisioner"),
        Path::new("/etc/turnd-provisioner"),
        inventory,
    );
    let values = |key: &str| -> Vec<String> {
        u.service
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    };
    // Everything is read-only (/etc included) except ReadWritePaths.
    assert_eq!(values("ProtectSystem"), ["strict"]);
    let writable = values("ReadWritePaths");
    // What `cert renew` and `cert deploy` write: the store (certificate, key, ACME account),
    // the run lock and the journal, all under the state directory.
    let store = acme::default_store_dir(inventory);
    let state = acme::renew_state_dir(inventory);
    for written in [
        store.join("tls.crt"),
        store.join("tls.key"),
        store.join("account.json"),
        state.join("lock"),
        state.join("journal.jsonl"),
    ] {
        assert!(
            writable.iter().any(|w| written.starts_with(w)),
            "{} is not under ReadWritePaths {writable:?}",
            written.display()
        );
    }
    assert!(
        !writable.iter().any(|w| Path::new(w) == Path::new("/etc")),
        "only the state directory: {writable:?}"
    );
}

#[test]
fn renew_units_pass_systemd_analyze_verify() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // A real executable for ExecStart (verify checks it exists).
    let exe = std::env::current_exe().expect("exe");
    let u = acme::render_renew_units(&exe, dir.path(), &dir.path().join("cluster.toml"));
    std::fs::write(dir.path().join(RENEW_SERVICE), &u.service).expect("write");
    std::fs::write(dir.path().join(RENEW_TIMER), &u.timer).expect("write");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join(RENEW_TIMER))
        .arg(dir.path().join(RENEW_SERVICE))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It exits 0 even on errors: require empty stderr.
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

fn self_signed(cn_serial: u8) -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(vec!["turn.example.com".to_owned()]).expect("p");
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&[cn_serial]));
    (p.self_signed(&key).expect("cert").pem(), key)
}

/// A loopback TLS server presenting `pem`; returns its address.
async fn tls_server(pem: &str, key: &rcgen::KeyPair) -> (String, tokio::task::JoinHandle<()>) {
    use rustls_pki_types::pem::PemObject as _;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("pem");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .expect("key");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let a = acceptor.clone();
            tokio::spawn(async move {
                let _ = a.accept(tcp).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn status_compares_stored_and_served_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CertStore::new(dir.path());
    let (pem_a, key_a) = self_signed(0x0a);
    let (pem_b, _) = self_signed(0x0b);
    std::fs::write(store.cert_path(), &pem_a).expect("write");
    let (addr, task) = tls_server(&pem_a, &key_a).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };

    let r = acme::status(
        &store,
        "turn.example.com",
        std::slice::from_ref(&addr),
        Duration::from_secs(5),
    )
    .await
    .expect("status");
    assert!(r.differing().is_empty(), "{}", r.render());
    assert!(
        r.render()
            .ends_with("all endpoints serve the stored certificate\n"),
        "{}",
        r.render()
    );

    std::fs::write(store.cert_path(), &pem_b).expect("write");
    let r = acme::status(
        &store,
        "turn.example.com",
        &[addr.clone(), closed],
        Duration::from_secs(5),
    )
    .await
    .expect("status");
    let text = r.render();
    assert_eq!(r.differing().len(), 2, "{text}");
    assert!(text.contains(&format!("{addr}: not after")), "{text}");
    assert!(text.contains("DIFFERS from stored"), "{text}");
    assert!(text.contains("handshake failed: connect:"), "{text}");
    assert!(text.contains("stored: not after"), "{text}");
    task.abort();
}
