//! `provisioner cert`: real ACME against Debian's pebble + pebble-challtestsrv on loopback.
//!
//! The DNS provider is the loopback fake of Cloudflare's v4 DNS endpoints
//! (tests/fixtures/acme_support/fake_cloudflare.rs) — the one mock in these tests, because
//! Cloudflare cannot be reached from here. It forwards `_acme-challenge` TXT records to
//! challtestsrv, whose DNS pebble queries to validate DNS-01, so everything else is real: the
//! ACME protocol, the CA's validation, the certificate chain.

#[path = "fixtures/acme_support/fake_cloudflare.rs"]
mod fake_cloudflare;
#[path = "fixtures/acme_support/pebble.rs"]
mod pebble;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fake_cloudflare::FakeCloudflare;
use pebble::Pebble;
use provisioner::acme::{self, AcmeError, AcmeSettings, Directory, Propagation, RenewOutcome};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

const ZONE: &str = "example.com";

fn settings(p: &Pebble, store: &Path) -> AcmeSettings {
    let mut s = AcmeSettings::new(Directory::Url(p.directory.clone()), ZONE, store);
    s.email = Some("hostmaster@example.com".into());
    s.acme_root = Some(p.https_root.clone());
    s.propagation = Propagation::Servers(vec![p.dns]);
    s.propagation_timeout = Duration::from_secs(10);
    s.order_timeout = Duration::from_secs(30);
    s.attempts = 1;
    s.backoff = Duration::from_millis(100);
    s
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// Verifies the stored chain against pebble's issuing root for `name`.
fn verify_chain(chain_pem: &[u8], root_pem: &str, name: &str) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .expect("chain PEM");
    assert!(certs.len() >= 2, "leaf and intermediate expected");
    let mut roots = rustls::RootCertStore::empty();
    for r in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(r.expect("root PEM")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
    use rustls::client::danger::ServerCertVerifier as _;
    verifier
        .verify_server_cert(
            &certs[0],
            &certs[1..],
            &ServerName::try_from(name.to_owned()).expect("name"),
            &[],
            UnixTime::now(),
        )
        .unwrap_or_else(|e| panic!("chain does not verify for {name}: {e}"));
}

/// A self-signed "old" certificate in the store, to show failures leave it in place.
fn store_old_cert(store: &Path, expired: bool) -> Vec<u8> {
    std::fs::create_dir_all(store).expect("mkdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec![ZONE.to_owned(), format!("*.{ZONE}")]).expect("params");
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 6, 1);
    } // else rcgen's default validity: far from due, so the tests force the renewal
    let cert = params.self_signed(&key).expect("cert");
    std::fs::write(store.join("tls.crt"), cert.pem()).expect("write");
    std::fs::write(store.join("tls.key"), key.serialize_pem()).expect("write");
    std::fs::read(store.join("tls.crt")).expect("read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_apex_and_wildcard_verifies_chain_skips_until_due_and_renews_when_forced() {
    let p = Pebble::start(&[]);
    let cf = FakeCloudflare::start(Some(p.chall_management.clone())).await;
    let dns = cf.client();
    let store = p.dir.path().join("store");
    let s = settings(&p, &store);

    let issued = match acme::issue(&s, &dns).await {
        Ok(i) => i,
        Err(e) => panic!("issue failed: {e}\n{}", p.logs()),
    };
    assert!(issued.account_created);
    assert_eq!(
        issued.challenge_records, 2,
        "apex and wildcard each have a TXT value"
    );
    assert_eq!(issued.cert.names.len(), 2);
    // Both values were published side by side on one name, then deleted by id.
    let txt_posts = cf
        .log()
        .iter()
        .filter(|l| l.starts_with("POST /client/v4/zones/zone123/dns_records"))
        .count();
    let deletes = cf.log().iter().filter(|l| l.starts_with("DELETE")).count();
    assert_eq!((txt_posts, deletes), (2, 2), "{:?}", cf.log());
    assert!(
        cf.records().is_empty(),
        "challenge records left: {:?}",
        cf.records()
    );

    let chain = std::fs::read(store.join("tls.crt")).expect("chain");
    let root = p.issuing_root().await;
    verify_chain(&chain, &root, ZONE);
    verify_chain(&chain, &root, &format!("turn.{ZONE}"));
    assert_eq!(mode(&store.join("tls.key")), 0o600);
    assert_eq!(mode(&store.join("account.json")), 0o600);
    let key = std::fs::read_to_string(store.join("tls.key")).expect("key");
    assert!(key.contains("BEGIN PRIVATE KEY"), "PKCS#8 ECDSA key");

    // Not due: pebble certificates last ~5 years, far outside the 30-day window.
    let out = acme::renew(&s, &dns, SystemTime::now(), false)
        .await
        .expect("renew");
    assert!(matches!(out, RenewOutcome::NotDue { .. }), "{out}");
    assert!(out.to_string().starts_with("not due"), "{out}");
    assert_eq!(std::fs::read(store.join("tls.crt")).expect("chain"), chain);

    // Due once the window is wider than the remaining validity.
    let mut wide = s.clone();
    wide.renew_before = Duration::from_secs(100 * 365 * 86_400);
    let out = acme::renew(&wide, &dns, SystemTime::now(), false)
        .await
        .unwrap_or_else(|e| panic!("renew: {e}\n{}", p.logs()));
    let RenewOutcome::Renewed { previous, issued } = &out else {
        panic!("expected a renewal: {out}");
    };
    assert!(!issued.account_created, "the stored account is reused");
    let first_serial = previous.as_ref().expect("previous").serial.clone();
    assert_ne!(issued.cert.serial, first_serial);

    // Forced.
    let out = acme::renew(&s, &dns, SystemTime::now(), true)
        .await
        .unwrap_or_else(|e| panic!("forced renew: {e}\n{}", p.logs()));
    assert!(matches!(out, RenewOutcome::Renewed { .. }), "{out}");
    assert!(
        out.to_string().starts_with("renewed: new certificate for"),
        "{out}"
    );
    let chain2 = std::fs::read(store.join("tls.crt")).expect("chain");
    assert_ne!(chain2, chain);
    verify_chain(&chain2, &root, ZONE);

    // An account stored for another directory (staging vs production) is not reused.
    let account_path = store.join("account.json");
    let mut stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&account_path).expect("account")).expect("json");
    assert_eq!(stored["directory"], p.directory.as_str());
    stored["directory"] = "https://acme-staging.invalid/directory".into();
    std::fs::write(&account_path, stored.to_string()).expect("write");
    let out = acme::renew(&s, &dns, SystemTime::now(), true)
        .await
        .unwrap_or_else(|e| panic!("renew with a new account: {e}\n{}", p.logs()));
    let RenewOutcome::Renewed { issued, .. } = &out else {
        panic!("expected a renewal: {out}");
    };
    assert!(issued.account_created, "a new account for this directory");
    assert_eq!(mode(&account_path), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_api_error_keeps_old_certificate_and_says_why() {
    let p = Pebble::start(&[]);
    let cf = FakeCloudflare::start(Some(p.chall_management.clone())).await;
    let store = p.dir.path().join("store");
    let old = store_old_cert(&store, false);
    let mut s = settings(&p, &store);
    s.attempts = 2;
    cf.fail_times(
        "POST /client/v4/zones/zone123/dns_records",
        2,
        403,
        10000,
        "Authentication error",
    );
    let dns = cf.client();
    let err = acme::renew(&s, &dns, SystemTime::now(), true)
        .await
        .expect_err("DNS refused");
    let text = err.to_string();
    assert!(matches!(err, AcmeError::GaveUp { .. }), "{text}");
    assert!(text.contains("failed after 2 attempt(s)"), "{text}");
    assert!(
        text.contains("attempt 1: DNS: Cloudflare API create record refused (HTTP 403): code 10000: Authentication error"),
        "{text}"
    );
    assert!(
        text.contains("attempt 2: DNS: Cloudflare API create record refused"),
        "{text}"
    );
    assert!(text.contains("left in place (valid until"), "{text}");
    assert_eq!(std::fs::read(store.join("tls.crt")).expect("kept"), old);
    // The account was created on the first attempt and reused on the second.
    assert_eq!(mode(&store.join("account.json")), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenge_invalid_keeps_old_certificate_and_says_why() {
    let p = Pebble::start(&[]);
    let cf = FakeCloudflare::start(Some(p.chall_management.clone())).await;
    cf.state.lock().expect("lock").drop_txt = true; // the provider loses the TXT records
    let dns = cf.client();
    let store = p.dir.path().join("store");
    let old = store_old_cert(&store, false);

    // With the propagation wait, we notice before asking the CA.
    let mut s = settings(&p, &store);
    s.propagation_timeout = Duration::from_secs(2);
    let err = acme::renew(&s, &dns, SystemTime::now(), true)
        .await
        .expect_err("not propagated");
    let text = err.to_string();
    assert!(
        text.contains("TXT _acme-challenge.example.com: not visible on 127.0.0.1:"),
        "{text}"
    );
    assert_eq!(std::fs::read(store.join("tls.crt")).expect("kept"), old);
    assert!(
        cf.records().is_empty(),
        "cleaned up by id: {:?}",
        cf.records()
    );

    // Without it, the CA looks, finds nothing, and says so.
    s.propagation = Propagation::Skip;
    let err = acme::renew(&s, &dns, SystemTime::now(), true)
        .await
        .expect_err("invalid");
    let text = err.to_string();
    assert!(
        text.contains("challenge invalid for"),
        "{text}\n{}",
        p.logs()
    );
    assert!(text.contains("left in place"), "{text}");
    assert_eq!(std::fs::read(store.join("tls.crt")).expect("kept"), old);
    assert!(cf.records().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_nonces_are_retried_then_reported() {
    let p = Pebble::start(&[("PEBBLE_WFE_NONCEREJECT", "100")]);
    let cf = FakeCloudflare::start(Some(p.chall_management.clone())).await;
    let dns = cf.client();
    let store = p.dir.path().join("store");
    let old = store_old_cert(&store, false);
    let mut s = settings(&p, &store);
    s.attempts = 2;
    let started = std::time::Instant::now();
    let err = acme::renew(&s, &dns, SystemTime::now(), true)
        .await
        .expect_err("every nonce rejected");
    let text = err.to_string();
    assert!(text.contains("failed after 2 attempt(s)"), "{text}");
    assert!(text.contains("badNonce"), "{text}");
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "backoff between attempts"
    );
    assert_eq!(std::fs::read(store.join("tls.crt")).expect("kept"), old);
    assert!(
        !store.join("account.json").exists(),
        "no account was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_stored_cert_is_reported_and_replaced() {
    let p = Pebble::start(&[]);
    let cf = FakeCloudflare::start(Some(p.chall_management.clone())).await;
    let dns = cf.client();
    let store = p.dir.path().join("store");
    let old = store_old_cert(&store, true);
    let s = settings(&p, &store);

    // A failure first: the expired certificate stays and the report says it has expired.
    cf.fail_next(
        "POST /client/v4/zones/zone123/dns_records",
        400,
        9005,
        "Content for record is invalid.",
    );
    let err = acme::renew(&s, &dns, SystemTime::now(), false)
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("left in place; it EXPIRED at"), "{text}");
    assert_eq!(std::fs::read(store.join("tls.crt")).expect("kept"), old);

    // Then a renewal replaces it, not forced: an expired certificate is always due.
    let out = acme::renew(&s, &dns, SystemTime::now(), false)
        .await
        .unwrap_or_else(|e| panic!("renew: {e}\n{}", p.logs()));
    assert!(
        out.to_string().contains("the previous one had EXPIRED at"),
        "{out}"
    );
    verify_chain(
        &std::fs::read(store.join("tls.crt")).expect("new"),
        &p.issuing_root().await,
        ZONE,
    );
}
