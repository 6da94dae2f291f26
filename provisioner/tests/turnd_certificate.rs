//! Certificates in the bootstrap: while turnd's TLS Secret is missing, the `turnd` phase plans
//! an ACME DNS-01 order (from a REAL pebble; the DNS-01 records go through the fake Cloudflare
//! — Cloudflare cannot be reached from here — which publishes them in pebble-challtestsrv)
//! and deploys the certificate with the objects to the FAKE Kubernetes API server of
//! `tests/common/fake_api.rs` (no kube-apiserver can run here). Planning orders nothing; the
//! second plan is empty; a stored certificate that is still valid is reused instead of
//! ordering another; without a DNS API the plan says why the pods cannot start.

mod common;
#[path = "fixtures/acme_support/fake_cloudflare.rs"]
mod fake_cloudflare;
#[path = "fixtures/acme_support/pebble.rs"]
mod pebble;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::fake_api::fake_api_server;
use fake_cloudflare::FakeCloudflare;
use pebble::Pebble;
use provisioner::acme::{AcmeSettings, CertStore, Directory, Propagation};
use provisioner::exec::RecordingTransport;
use provisioner::inventory::{Cluster, Inventory};
use provisioner::k8s::Sensitive;
use provisioner::phases::turnd::KubeApi;
use provisioner::phases::{self, Context, Settings};
use provisioner::plan::{apply, ActionKind, Journal, PhaseId, Plan, Target, Transports};

const SECRET_PATH: &str = "/api/v1/namespaces/turnd/secrets/turnd-tls";

fn example() -> Cluster {
    Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid")
}

fn transports() -> Transports {
    Transports {
        host: Box::new(RecordingTransport::new("host")),
        vms: BTreeMap::new(),
    }
}

fn plan(c: &Cluster, s: &Settings) -> Plan {
    let t = transports();
    let ctx = Context {
        cluster: c,
        transports: &t,
        settings: s,
    };
    phases::plan(PhaseId::Turnd, &ctx).expect("plans")
}

fn acme_settings(p: &Pebble, c: &Cluster, store: &Path) -> AcmeSettings {
    let mut s = AcmeSettings::new(Directory::Url(p.directory.clone()), &c.domain.zone, store);
    s.acme_root = Some(p.https_root.clone());
    s.propagation = Propagation::Servers(vec![p.dns]);
    s.propagation_timeout = Duration::from_secs(10);
    s.order_timeout = Duration::from_secs(30);
    s.attempts = 1;
    s
}

#[test]
fn a_missing_tls_secret_is_issued_by_acme_and_deployed_in_the_same_run_or_reused() {
    if !pebble::available() {
        eprintln!("SKIPPED: pebble not installed");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (addr, state) = rt.block_on(fake_api_server());
    let p = Pebble::start(&[]);
    let cf = rt.block_on(FakeCloudflare::start(Some(p.chall_management.clone())));
    let c = example();
    let store = p.dir.path().join("certs");
    let s = Settings {
        kube_api: Some(KubeApi::Url(format!("http://{addr}"))),
        auth_secret: Some(Sensitive::new("bootstrap-secret")),
        // The fake API server runs no controllers: nothing would ever roll out.
        rollout_timeout: None,
        acme: Some(acme_settings(&p, &c, &store)),
        acme_dns: Some(cf.client()),
        ..Settings::default()
    };

    // 1. The plan: order, then apply the objects and deploy the Secret. Planning orders nothing.
    let first = plan(&c, &s);
    let text = first.render(true);
    assert_eq!(first.actions.len(), 2, "{text}");
    assert_eq!(first.actions[0].target, Target::Local);
    assert_eq!(
        first.actions[0].summary,
        format!(
            "issue certificate for example.net, *.example.net via ACME DNS-01 ({})",
            p.directory
        )
    );
    assert!(matches!(first.actions[0].kind, ActionKind::IssueCert(_)));
    assert!(
        first.actions[1]
            .summary
            .ends_with(", deploy TLS Secret turnd/turnd-tls (the certificate issued above)"),
        "{text}"
    );
    assert!(p.counts().is_empty(), "planning ordered: {:?}", p.counts());
    assert!(cf.records().is_empty(), "planning wrote DNS records");

    // 2. Applying orders from pebble and deploys what it issued.
    apply(&first, &transports(), &mut Journal::in_memory())
        .unwrap_or_else(|e| panic!("{e}\n{}", p.logs()));
    assert!(
        p.counts().iter().any(|l| l.contains("accounts in memory")),
        "{:?}",
        p.counts()
    );
    let issued = CertStore::new(&store)
        .load()
        .expect("readable")
        .expect("stored");
    assert_eq!(issued.names.len(), 2, "{:?}", issued.names);
    let chain = std::fs::read(CertStore::new(&store).cert_path()).expect("chain");
    let secret = state.lock().expect("lock").stored[SECRET_PATH].clone();
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(
        secret["data"]["tls.crt"],
        serde_json::to_value(k8s_openapi::ByteString(chain)).expect("base64")
    );

    // 3. The Secret exists: nothing more to do.
    let again = plan(&c, &s);
    assert!(again.is_empty(), "{}", again.render(true));

    // 4. The Secret lost (a rebuilt cluster): the stored certificate is reused, nothing ordered.
    let accounts = p.counts().len();
    state.lock().expect("lock").stored.remove(SECRET_PATH);
    let reuse = plan(&c, &s);
    assert_eq!(reuse.actions.len(), 1, "{}", reuse.render(true));
    assert_eq!(
        reuse.actions[0].summary,
        format!(
            "server-side apply every object (unchanged), deploy TLS Secret turnd/turnd-tls (reuse certificate for {}, expires {})",
            issued.names.join(", "),
            issued.not_after_text
        )
    );
    apply(&reuse, &transports(), &mut Journal::in_memory()).expect("applies");
    assert!(state.lock().expect("lock").stored.contains_key(SECRET_PATH));
    assert_eq!(p.counts().len(), accounts, "no new account or order");

    // 5. Nothing stored and no DNS API: no order, a note says why the pods cannot start.
    state.lock().expect("lock").stored.remove(SECRET_PATH);
    let empty = tempfile::tempdir().expect("tempdir");
    let none = Settings {
        acme: Some(acme_settings(&p, &c, empty.path())),
        acme_dns: None,
        ..s.clone()
    };
    let missing = plan(&c, &none);
    let text = missing.render(false);
    assert!(
        missing
            .actions
            .iter()
            .all(|a| !matches!(a.kind, ActionKind::IssueCert(_))),
        "{text}"
    );
    assert!(
        text.contains("no DNS API (CF_Token, CF_Zone_ID) to issue one"),
        "{text}"
    );
}
