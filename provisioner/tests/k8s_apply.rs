//! Server-side apply of turnd's objects, asserted request by request on a FAKE Kubernetes API
//! server. No real API server can run here (no kube-apiserver, etcd or kind is installable on
//! these machines), so the test starts a small loopback HTTP server that records every
//! request, stores what a real apply would store, answers a dry run without storing, and
//! answers GET from what it stored. A `kube::Client` is pointed at it over plain HTTP.
//!
//! What it proves: one PATCH per object to that object's URL, `Content-Type:
//! application/apply-patch+yaml`, `fieldManager=turnd-provisioner&force=true` (plus
//! `dryRun=All` for `plan`), the body is the object; applying twice sends identical requests;
//! `plan` reads and dry-runs, stores nothing, and reports create / update / unchanged.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::fake_api::{fake_api_server, take, Seen};
use provisioner::inventory::{Cluster, Inventory};
use provisioner::k8s::{
    self, ChangeKind, Inputs, K8sError, Manifests, Mode, Sensitive, TlsSource, FIELD_MANAGER,
};
use serde_json::{json, Value};

fn example() -> Cluster {
    Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid")
}

fn inputs() -> Inputs {
    Inputs {
        tls: TlsSource::Pem {
            cert: "CERT PEM".into(),
            key: Sensitive::new("KEY PEM"),
        },
        ..Inputs::for_apply(Sensitive::new("s3cret"))
    }
}

/// The URL path and the body every object must be applied with, in apply order.
fn expected(m: &Manifests) -> Vec<(String, Value)> {
    let ns = "/api/v1/namespaces/turnd";
    let mut out = vec![
        (ns.to_owned(), json!(m.namespace)),
        (format!("{ns}/configmaps/turnd-config"), json!(m.config)),
        (format!("{ns}/secrets/turnd-auth"), json!(m.auth_secret)),
    ];
    if let Some(tls) = &m.tls_secret {
        out.push((format!("{ns}/secrets/turnd-tls"), json!(tls)));
    }
    for d in &m.deployments {
        let name = d.metadata.name.as_deref().expect("name");
        out.push((
            format!("/apis/apps/v1/namespaces/turnd/deployments/{name}"),
            json!(d),
        ));
    }
    out.push((
        "/apis/policy/v1/namespaces/turnd/poddisruptionbudgets/turnd".to_owned(),
        json!(m.pdb),
    ));
    out
}

fn assert_applies(seen: &[Seen], want: &[(String, Value)], dry_run: bool) {
    let patches: Vec<&Seen> = seen.iter().filter(|s| s.method == "PATCH").collect();
    assert_eq!(patches.len(), want.len(), "one PATCH per object: {seen:#?}");
    for (s, (path, body)) in patches.iter().zip(want) {
        assert_eq!(&s.path, path);
        assert_eq!(
            s.content_type.as_deref(),
            Some("application/apply-patch+yaml"),
            "{path}"
        );
        let mut q = BTreeMap::from([
            ("fieldManager".to_owned(), FIELD_MANAGER.to_owned()),
            ("force".to_owned(), "true".to_owned()),
        ]);
        if dry_run {
            q.insert("dryRun".to_owned(), "All".to_owned());
        }
        assert_eq!(s.query, q, "{path}");
        assert_eq!(
            s.body.as_ref(),
            Some(body),
            "{path}: the body is the object"
        );
    }
}

#[tokio::test]
async fn apply_sends_one_server_side_apply_patch_per_object_and_reapplying_is_identical() {
    let (addr, state) = fake_api_server().await;
    let client = k8s::client_for_url(&format!("http://{addr}")).expect("client");
    let m = Manifests::build(&example(), &inputs()).expect("builds");
    let want = expected(&m);
    assert_eq!(
        want.len(),
        7,
        "namespace, configmap, 2 secrets, 2 deployments, pdb"
    );

    let answers = k8s::apply(&client, &m, Mode::Apply).await.expect("applies");
    assert_eq!(answers.len(), want.len());
    let first = take(&state);
    assert!(first.iter().all(|s| s.method == "PATCH"), "{first:#?}");
    assert_applies(&first, &want, false);
    let stored = state.lock().expect("lock").stored.clone();
    assert_eq!(stored.len(), want.len());

    // Idempotent: the same requests again, byte for byte the same bodies.
    k8s::apply(&client, &m, Mode::Apply)
        .await
        .expect("re-applies");
    let second = take(&state);
    assert_eq!(first, second);
    assert_eq!(state.lock().expect("lock").stored, stored);
}

#[tokio::test]
async fn plan_dry_runs_against_the_server_and_reports_create_update_unchanged() {
    let (addr, state) = fake_api_server().await;
    let client = k8s::client_for_url(&format!("http://{addr}")).expect("client");
    let c = example();
    let m = Manifests::build(&c, &inputs()).expect("builds");
    let want = expected(&m);

    // Empty cluster: the namespace is missing, so everything is created; only the namespace
    // can be dry-run (the server refuses requests into a missing namespace). Nothing stored.
    let plan = k8s::plan(&client, &m).await.expect("plans");
    assert!(
        plan.iter().all(|c| c.kind == ChangeKind::Create),
        "{plan:?}"
    );
    assert_eq!(plan.len(), want.len());
    let seen = take(&state);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/api/v1/namespaces/turnd");
    assert_applies(&seen, &want[..1], true);
    assert!(state.lock().expect("lock").stored.is_empty());

    // After an apply, a plan reads and dry-runs every object and finds nothing to do.
    k8s::apply(&client, &m, Mode::Apply).await.expect("applies");
    take(&state);
    let plan = k8s::plan(&client, &m).await.expect("plans");
    assert!(
        plan.iter().all(|c| c.kind == ChangeKind::Unchanged),
        "{plan:?}"
    );
    let seen = take(&state);
    assert_eq!(
        seen.iter().filter(|s| s.method == "GET").count(),
        want.len()
    );
    assert_applies(&seen, &want, true);

    // A changed relay range on worker2: its configuration and its Deployment change.
    let mut inv = (*c).clone();
    inv.turnd[1].relay_port_min = 49200;
    let changed = Manifests::build(&inv.validate("").expect("valid"), &inputs()).expect("builds");
    let plan = k8s::plan(&client, &changed).await.expect("plans");
    let updated: Vec<&str> = plan
        .iter()
        .filter(|c| c.kind == ChangeKind::Update)
        .map(|c| c.object.as_str())
        .collect();
    assert_eq!(
        updated,
        ["ConfigMap/turnd-config", "Deployment/turnd-k8s-worker2"]
    );
    // The dry runs stored nothing.
    let stored = state.lock().expect("lock").stored.clone();
    let cm = &stored["/api/v1/namespaces/turnd/configmaps/turnd-config"];
    assert_eq!(cm, &json!(m.config));
}

#[tokio::test]
async fn a_refusal_names_the_object_and_an_absent_server_is_unreachable() {
    let (addr, state) = fake_api_server().await;
    let client = k8s::client_for_url(&format!("http://{addr}")).expect("client");
    let m = Manifests::build(&example(), &inputs()).expect("builds");
    state
        .lock()
        .expect("lock")
        .refuse
        .push("/apis/apps/v1/namespaces/turnd/deployments/turnd-k8s-worker1".into());
    let err = k8s::apply(&client, &m, Mode::Apply)
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, K8sError::Refused { object, .. } if object == "Deployment/turnd-k8s-worker1"),
        "{err}"
    );

    // Nothing listens on a port we just released.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let absent = k8s::client_for_url(&format!("http://127.0.0.1:{port}")).expect("client");
    let err = k8s::plan(&absent, &m).await.expect_err("no server");
    assert!(matches!(err, K8sError::Unreachable { .. }), "{err}");
    // The phase's plan then falls back to the offline plan: every object, unverified.
    let (offline, asked) = k8s::plan_or_offline(&absent, &m)
        .await
        .expect("offline plan");
    assert!(!asked);
    assert_eq!(offline.len(), m.objects().len());
    assert!(offline.iter().all(|c| c.kind == ChangeKind::Unverified));
    // A server that answers is asked, and its refusal is not papered over.
    let err = k8s::plan_or_offline(&client, &m)
        .await
        .expect_err("refused in the dry run");
    assert!(
        matches!(&err, K8sError::Refused { verb: "dry-run apply", object, .. }
            if object == "Deployment/turnd-k8s-worker1"),
        "{err}"
    );
}
