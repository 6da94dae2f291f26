//! Phase `turnd` (gather → plan → apply) against the FAKE Kubernetes API server of
//! `tests/common/fake_api.rs` (no real API server can run here: no kube-apiserver, etcd or kind
//! is installable on these machines). The fake stores what a server-side apply stores and
//! answers dry runs without storing, so the phase's plan is the server's own diff: an empty
//! cluster plans one apply of every object, applying it stores them with our field manager,
//! and the second plan is empty; a changed inventory plans an update of exactly what changed;
//! an absent server plans offline and applying then fails naming the action. The auth secret
//! comes from the settings (the secrets), never the inventory, and never reaches a plan's text.
//!
//! Certificates in the bootstrap: while the TLS Secret is missing, the phase plans an ACME
//! DNS-01 order from a REAL pebble (the DNS-01 records go through the fake Cloudflare —
//! Cloudflare cannot be reached from here — which publishes them in pebble-challtestsrv) and
//! deploys the certificate with the objects; planning orders nothing; a stored certificate
//! that is still good is reused instead of ordering another.

mod common;
#[path = "fixtures/acme_support/fake_cloudflare.rs"]
mod fake_cloudflare;
#[path = "fixtures/acme_support/pebble.rs"]
mod pebble;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::fake_api::{fake_api_server, take, Shared};
use fake_cloudflare::FakeCloudflare;
use pebble::Pebble;
use provisioner::acme::{AcmeSettings, CertStore, Directory, Propagation};
use provisioner::exec::{Output, RecordingTransport, Transport};
use provisioner::inventory::{Cluster, Inventory};
use provisioner::k8s::{Inputs, Manifests, Sensitive, FIELD_MANAGER};
use provisioner::phases::turnd::{self, KubeApi};
use provisioner::phases::{self, Context, PhaseError, Settings};
use provisioner::plan::{
    apply, ActionKind, ApplyError, Journal, PhaseId, Plan, Target, Transports,
};
use serde_json::json;

const SECRET: &str = "s3cret-from-the-environment";

fn example() -> Cluster {
    Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid")
}

/// The fake API server on its own runtime: the phase is synchronous and runs its own.
struct Api {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    state: Shared,
}

fn api() -> Api {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (addr, state) = rt.block_on(fake_api_server());
    Api { rt, addr, state }
}

fn settings(api: KubeApi) -> Settings {
    Settings {
        kube_api: Some(api),
        auth_secret: Some(Sensitive::new(SECRET)),
        ..Settings::default()
    }
}

fn transports() -> Transports {
    Transports {
        host: Box::new(RecordingTransport::new("host")),
        vms: BTreeMap::new(),
    }
}

fn plan(c: &Cluster, s: &Settings) -> Result<Plan, PhaseError> {
    let t = transports();
    let ctx = Context {
        cluster: c,
        transports: &t,
        settings: s,
    };
    phases::plan(PhaseId::Turnd, &ctx)
}

#[test]
fn empty_cluster_plans_one_apply_which_stores_every_object_and_the_second_plan_is_empty() {
    let api = api();
    let c = example();
    let s = settings(KubeApi::Url(format!("http://{}", api.addr)));
    let p = plan(&c, &s).expect("plans");
    insta::assert_snapshot!(
        "turnd-plan",
        p.render(true).replace(&api.addr.to_string(), "FAKE")
    );
    assert!(!format!("{p:?}{}", p.render(true)).contains(SECRET));
    let seen = take(&api.state);
    assert!(
        seen.iter()
            .all(|r| r.method == "GET" || r.query.get("dryRun").map(String::as_str) == Some("All")),
        "planning stores nothing: {seen:#?}"
    );
    assert!(api.state.lock().expect("lock").stored.is_empty());

    apply(&p, &transports(), &mut Journal::in_memory()).expect("applies");
    let seen = take(&api.state);
    let want = Manifests::build(&c, &Inputs::for_apply(Sensitive::new(SECRET))).expect("builds");
    assert_eq!(seen.len(), want.objects().len(), "one PATCH per object");
    for r in &seen {
        assert_eq!(r.method, "PATCH");
        assert_eq!(
            r.query.get("fieldManager").map(String::as_str),
            Some(FIELD_MANAGER)
        );
        assert_eq!(r.query.get("force").map(String::as_str), Some("true"));
        assert!(!r.query.contains_key("dryRun"), "a real apply");
    }
    // The auth secret is the one from the settings; the TLS Secret is left to `cert deploy`.
    let stored = api.state.lock().expect("lock").stored.clone();
    assert_eq!(
        stored["/api/v1/namespaces/turnd/secrets/turnd-auth"],
        json!(want.auth_secret)
    );
    assert!(!stored.contains_key("/api/v1/namespaces/turnd/secrets/turnd-tls"));
    assert_eq!(stored.len(), 6, "{:?}", stored.keys());

    let again = plan(&c, &s).expect("plans");
    assert!(again.is_empty(), "{}", again.render(true));
}

#[test]
fn a_changed_inventory_plans_an_update_of_what_changed() {
    let api = api();
    let c = example();
    let s = settings(KubeApi::Url(format!("http://{}", api.addr)));
    apply(
        &plan(&c, &s).expect("plans"),
        &transports(),
        &mut Journal::in_memory(),
    )
    .expect("applies");
    let mut inv = (*c).clone();
    inv.turnd[1].relay_port_min = 49200;
    let changed = inv.validate("").expect("valid");
    let p = plan(&changed, &s).expect("plans");
    let summaries: Vec<&str> = p.actions.iter().map(|a| a.summary.as_str()).collect();
    assert_eq!(
        summaries,
        ["server-side apply ConfigMap/turnd-config (update), Deployment/turnd-k8s-worker2 (update)"]
    );
    // A new auth secret is an update of the Secret alone.
    let rotated = Settings {
        auth_secret: Some(Sensitive::new("rotated")),
        ..s.clone()
    };
    let p = plan(&c, &rotated).expect("plans");
    let summaries: Vec<&str> = p.actions.iter().map(|a| a.summary.as_str()).collect();
    assert_eq!(summaries, ["server-side apply Secret/turnd-auth (update)"]);
}

const DEPLOYMENTS: [&str; 2] = [
    "/apis/apps/v1/namespaces/turnd/deployments/turnd-k8s-worker1",
    "/apis/apps/v1/namespaces/turnd/deployments/turnd-k8s-worker2",
];

/// Plays the Deployment controller and the kubelet: once both Deployments are stored, gives
/// them a finished rollout's status (after `delay`).
fn roll_out_after(state: Shared, delay: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            {
                let mut st = state.lock().expect("lock");
                if start.elapsed() >= delay
                    && DEPLOYMENTS.iter().all(|d| st.stored.contains_key(*d))
                {
                    for d in DEPLOYMENTS {
                        let obj = st.stored.get_mut(d).expect("stored");
                        obj["status"] = json!({
                            "observedGeneration": 1, "replicas": 1,
                            "updatedReplicas": 1, "availableReplicas": 1,
                        });
                    }
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

#[test]
fn with_the_tls_secret_present_apply_waits_for_both_rollouts() {
    let api = api();
    let c = example();
    api.state.lock().expect("lock").stored.insert(
        "/api/v1/namespaces/turnd/secrets/turnd-tls".into(),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "turnd-tls", "namespace": "turnd"},
               "type": "kubernetes.io/tls"}),
    );
    let s = settings(KubeApi::Url(format!("http://{}", api.addr)));
    let p = plan(&c, &s).expect("plans");
    assert!(p.notes.is_empty(), "{:?}", p.notes);
    assert!(
        p.actions[0]
            .summary
            .ends_with(", then wait up to 300s for the rollout"),
        "{}",
        p.actions[0].summary
    );
    let controller = roll_out_after(api.state.clone(), Duration::from_millis(1500));
    let start = std::time::Instant::now();
    apply(&p, &transports(), &mut Journal::in_memory()).expect("applies and rolls out");
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "returned before the rollout finished"
    );
    controller.join().expect("controller");
    let gets = take(&api.state)
        .iter()
        .filter(|r| r.method == "GET" && DEPLOYMENTS.contains(&r.path.as_str()))
        .count();
    assert!(gets >= 3, "polled the Deployments: {gets} GETs");
    assert!(plan(&c, &s).expect("plans").is_empty());

    // A rollout that never finishes fails the action after the timeout, naming the Deployment.
    let mut inv = (*c).clone();
    inv.turnd[0].relay_port_min = 49200;
    let changed = inv.validate("").expect("valid");
    let short = Settings {
        rollout_timeout: Some(Duration::from_secs(1)),
        ..s
    };
    let p = plan(&changed, &short).expect("plans");
    let err = apply(&p, &transports(), &mut Journal::in_memory()).expect_err("times out");
    let msg = err.to_string();
    assert!(
        msg.contains(
            "Deployment/turnd-k8s-worker1 did not finish its rollout within 1s: no status yet"
        ),
        "{msg}"
    );
}

#[test]
fn the_kubeconfig_path_reaches_the_api_server() {
    let api = api();
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("config");
    std::fs::write(&kubeconfig, common::fake_api::kubeconfig(api.addr)).expect("write kubeconfig");
    let c = example();
    let s = settings(KubeApi::Kubeconfig(kubeconfig));
    let p = plan(&c, &s).expect("plans");
    assert_eq!(p.actions.len(), 1, "{}", p.render(true));
    assert!(
        p.notes.iter().all(|n| !n.contains("did not answer")),
        "the server answered: {:?}",
        p.notes
    );
    apply(&p, &transports(), &mut Journal::in_memory()).expect("applies");
    assert!(plan(&c, &s).expect("plans").is_empty());
}

#[test]
fn an_absent_server_plans_offline_and_applying_fails_naming_the_action() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let c = example();
    let s = settings(KubeApi::Url(format!("http://127.0.0.1:{port}")));
    let p = plan(&c, &s).expect("plans offline");
    assert_eq!(p.actions.len(), 1);
    assert!(
        p.actions[0]
            .summary
            .contains("Namespace/turnd (unverified)"),
        "{}",
        p.actions[0].summary
    );
    assert_eq!(p.notes.len(), 1);
    assert!(p.notes[0].contains("did not answer"), "{:?}", p.notes);
    let err = apply(&p, &transports(), &mut Journal::in_memory()).expect_err("no server");
    assert!(matches!(err, ApplyError::Kube { index: 1, .. }), "{err}");
    assert!(
        err.to_string().starts_with(
            "phase 06-turnd, action 1 `server-side apply Namespace/turnd (unverified)"
        ),
        "{err}"
    );
}

#[test]
fn the_api_and_the_secret_come_from_settings_or_the_environment_never_the_inventory() {
    let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let none = Settings::default();
    let err = turnd::inputs(&none, &env(&[("TURND_AUTH_SECRET", "x")])).expect_err("no api");
    assert_eq!(
        err.to_string(),
        "phase 06-turnd: no Kubernetes API: set KUBECONFIG to a kubeconfig of the cluster, or let the provisioner reach the master's API through the host (that needs the cluster to exist and the master's admin.conf readable over SSH)"
    );
    let err = turnd::inputs(&none, &env(&[("KUBECONFIG", "/k")])).expect_err("no secret");
    assert_eq!(
        err.to_string(),
        "phase 06-turnd: missing secret TURND_AUTH_SECRET (the old name COTURN_AUTH_SECRET is accepted too)"
    );
    let (api, secret) = turnd::inputs(
        &none,
        &env(&[("KUBECONFIG", "/k"), ("COTURN_AUTH_SECRET", "old")]),
    )
    .expect("from the environment");
    assert_eq!(api, KubeApi::Kubeconfig("/k".into()));
    assert_eq!(secret.expose(), "old");
    // Settings (filled by the command line from the secrets) win over the environment.
    let (api, secret) = turnd::inputs(
        &settings(KubeApi::Url("http://x".into())),
        &env(&[("KUBECONFIG", "/k"), ("TURND_AUTH_SECRET", "env")]),
    )
    .expect("from settings");
    assert_eq!(api, KubeApi::Url("http://x".into()));
    assert_eq!(secret.expose(), SECRET);
}

#[test]
fn a_stored_certificate_is_deployed_with_the_objects_so_the_pods_start_in_the_same_run() {
    let api = api();
    let c = example();
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = CertStore::new(store_dir.path());
    let key = rcgen::KeyPair::generate().expect("key");
    let cert =
        rcgen::CertificateParams::new(vec!["example.net".to_owned(), "*.example.net".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
    std::fs::write(store.cert_path(), cert.pem()).expect("write cert");
    std::fs::write(store.key_path(), key.serialize_pem()).expect("write key");
    let s = Settings {
        acme: Some(AcmeSettings::new(
            Directory::Staging,
            &c.domain.zone,
            store_dir.path(),
        )),
        // The fake API server runs no controllers: nothing would ever roll out.
        rollout_timeout: None,
        ..settings(KubeApi::Url(format!("http://{}", api.addr)))
    };
    let p = plan(&c, &s).expect("plans");
    assert_eq!(p.actions.len(), 1, "{}", p.render(true));
    assert!(
        p.actions[0]
            .summary
            .contains(", deploy TLS Secret turnd/turnd-tls (reuse certificate for example.net, *.example.net, expires "),
        "{}",
        p.actions[0].summary
    );
    apply(&p, &transports(), &mut Journal::in_memory()).expect("applies");
    let stored = api.state.lock().expect("lock").stored.clone();
    let tls = &stored["/api/v1/namespaces/turnd/secrets/turnd-tls"];
    assert_eq!(tls["type"], "kubernetes.io/tls");
    let again = plan(&c, &s).expect("plans");
    assert!(again.is_empty(), "{}", again.render(true));
}

// ---- A locally built image (`[container] archive`): imports planned before the objects. ----
// The workers' containerd is the recording transport here (the real import into a real
// containerd over SSH is tests/image_load.rs).

const DIGEST: &str = "sha256:8bfac28e86e8ba3076ecb4ae708510d144d79105914026c56ea0fe213cc7bbe0";

/// An OCI archive (made with the system `tar`) whose index names `localhost/turnd:0.1.0` with
/// `digest`.
fn archive(dir: &Path, digest: &str) -> std::path::PathBuf {
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":570,"annotations":{{"org.opencontainers.image.ref.name":"localhost/turnd:0.1.0"}}}}]}}"#
    );
    std::fs::write(dir.join("index.json"), index).expect("index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    let path = dir.join("turnd.oci.tar");
    let st = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&path)
        .arg("-C")
        .arg(dir)
        .args(["oci-layout", "index.json"])
        .status()
        .expect("tar runs");
    assert!(st.success());
    path
}

fn with_local_image(archive: &Path) -> Cluster {
    let text = format!(
        "{}\n[container]\nimage = \"localhost/turnd@{DIGEST}\"\narchive = \"{}\"\npull = \"never\"\n",
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/cluster.example.toml"
        ))
        .expect("example"),
        archive.display()
    );
    Inventory::from_toml(&text)
        .and_then(|i| i.validate(&text))
        .expect("valid")
}

const LS: &str = "ctr -n k8s.io images ls";
const IMPORT: &str = "ctr -n k8s.io images import";

fn listing(image: &str, digest: &str) -> Output {
    Output::ok(format!(
        "REF TYPE DIGEST SIZE PLATFORMS LABELS\n{image} application/vnd.oci.image.manifest.v1+json {digest} 1.3 KiB linux/amd64 io.cri-containerd.image=managed\n"
    ))
}

/// worker1's containerd lacks the image; worker2 has no `ctr` yet. Each lists the image once
/// an import has run.
fn workers() -> (Arc<RecordingTransport>, Arc<RecordingTransport>, Transports) {
    let image = format!("localhost/turnd@{DIGEST}");
    let w1 = Arc::new(RecordingTransport::new("k8s-worker1"));
    w1.respond(LS, Output::ok("REF TYPE DIGEST SIZE PLATFORMS LABELS\n"));
    w1.respond_after(IMPORT, LS, listing(&image, DIGEST));
    let w2 = Arc::new(RecordingTransport::new("k8s-worker2"));
    w2.respond(LS, Output::failed(127, "sudo: ctr: command not found"));
    w2.respond_after(IMPORT, LS, listing(&image, DIGEST));
    let mut vms: BTreeMap<String, Box<dyn Transport>> = BTreeMap::new();
    vms.insert("k8s-worker1".into(), Box::new(Arc::clone(&w1)));
    vms.insert("k8s-worker2".into(), Box::new(Arc::clone(&w2)));
    vms.insert(
        "k8s-master".into(),
        Box::new(RecordingTransport::new("k8s-master")),
    );
    let t = Transports {
        host: Box::new(RecordingTransport::new("host")),
        vms,
    };
    (w1, w2, t)
}

#[test]
fn workers_lacking_a_local_image_import_it_before_the_objects_and_the_second_plan_is_empty() {
    let api = api();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = with_local_image(&archive(dir.path(), DIGEST));
    let s = settings(KubeApi::Url(format!("http://{}", api.addr)));
    let (w1, w2, t) = workers();
    let ctx = Context {
        cluster: &c,
        transports: &t,
        settings: &s,
    };
    let p = phases::plan(PhaseId::Turnd, &ctx).expect("plans");
    let image = format!("localhost/turnd@{DIGEST}");
    let archive = dir.path().join("turnd.oci.tar");
    let lines: Vec<String> = p
        .actions
        .iter()
        .map(|a| format!("[{}] {}", a.target, a.summary))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert_eq!(
        lines[0],
        format!(
            "[k8s-worker1] import image {image} from {} (missing)",
            archive.display()
        )
    );
    assert_eq!(
        lines[1],
        format!(
            "[k8s-worker2] import image {image} from {} (containerd not installed yet)",
            archive.display()
        )
    );
    assert!(
        lines[2].starts_with("[kubernetes-api] server-side apply"),
        "{lines:#?}"
    );
    // The Deployments refer to the image by digest and never pull it.
    let want = Manifests::build(&c, &Inputs::for_apply(Sensitive::new(SECRET))).expect("builds");
    let rendered: String = want
        .objects()
        .iter()
        .map(|o| o.to_yaml().expect("yaml"))
        .collect();
    assert!(rendered.contains(&format!("image: {image}")), "{rendered}");
    assert!(rendered.contains("imagePullPolicy: Never"), "{rendered}");
    assert!(!rendered.contains("IfNotPresent"), "{rendered}");
    // With -v, the plan shows the import streaming the archive and the check after it.
    let verbose = p.render(true);
    assert!(
        verbose.contains(&format!(
            "        $ ctr -n k8s.io images import --digests --base-name localhost/turnd - < {}\n        $ ctr -n k8s.io images ls (lists {image})\n",
            archive.display()
        )),
        "{verbose}"
    );
    // Gathering only listed images.
    assert_eq!(w1.commands(), vec![LS.to_owned()]);
    assert_eq!(w2.commands(), vec![LS.to_owned()]);

    apply(&p, &t, &mut Journal::in_memory()).expect("applies");
    let import = format!("{IMPORT} --digests --base-name localhost/turnd -");
    for w in [&w1, &w2] {
        assert_eq!(
            w.commands(),
            vec![LS.to_owned(), import.clone(), LS.to_owned()],
            "import, then check the listing"
        );
    }
    let second = phases::plan(PhaseId::Turnd, &ctx).expect("plans again");
    assert!(second.is_empty(), "{}", second.render(true));
}

#[test]
fn a_local_image_whose_archive_holds_another_digest_or_whose_containerd_fails_is_refused() {
    let api = api();
    let dir = tempfile::tempdir().expect("tempdir");
    let other = format!("sha256:{}", "c".repeat(64));
    let c = with_local_image(&archive(dir.path(), &other));
    let s = settings(KubeApi::Url(format!("http://{}", api.addr)));
    let (_w1, _w2, t) = workers();
    let ctx = Context {
        cluster: &c,
        transports: &t,
        settings: &s,
    };
    let e = phases::plan(PhaseId::Turnd, &ctx)
        .expect_err("mismatch")
        .to_string();
    assert_eq!(
        e,
        format!(
            "phase 06-turnd: image archive {} holds localhost/turnd@{other}, but container.image is localhost/turnd@{DIGEST}: run `provisioner image build` again, or set container.image to localhost/turnd@{other}",
            dir.path().join("turnd.oci.tar").display()
        )
    );

    // containerd installed but not answering: a gather error, not "missing".
    let c = with_local_image(&archive(dir.path(), DIGEST));
    let (w1, _w2, t) = workers();
    w1.respond(
        LS,
        Output::failed(1, "ctr: failed to dial \"/run/containerd/containerd.sock\""),
    );
    let ctx = Context {
        cluster: &c,
        transports: &t,
        settings: &s,
    };
    let e = phases::plan(PhaseId::Turnd, &ctx)
        .expect_err("ctr fails")
        .to_string();
    assert!(
        e.starts_with("phase 06-turnd: gathering facts: on k8s-worker1: `ctr -n k8s.io images ls` exited with status 1: ctr: failed to dial"),
        "{e}"
    );

    // An import that does not make the digest appear fails the action, naming it.
    let (w1, _w2, t) = workers();
    let tag_only = listing("localhost/turnd:0.1.0", DIGEST);
    w1.respond_after(IMPORT, LS, tag_only);
    let ctx = Context {
        cluster: &c,
        transports: &t,
        settings: &s,
    };
    let p = phases::plan(PhaseId::Turnd, &ctx).expect("plans");
    let e = apply(&p, &t, &mut Journal::in_memory())
        .expect_err("not listed")
        .to_string();
    assert!(
        e.contains(&format!(
            "action 1 `import image localhost/turnd@{DIGEST} from"
        )) && e.contains("does not list localhost/turnd@"),
        "{e}"
    );
}

#[test]
fn a_worker_created_in_this_run_is_not_asked_and_gets_the_import() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = with_local_image(&archive(dir.path(), DIGEST));
    let (w1, w2, t) = workers();
    let mut s = Settings::default();
    s.ahead.vms.insert("k8s-worker2".into());
    let ctx = Context {
        cluster: &c,
        transports: &t,
        settings: &s,
    };
    let facts = turnd::gather_image(&ctx)
        .expect("gathers")
        .expect("local image");
    let mut p = Plan::new(PhaseId::Turnd);
    turnd::plan_image(&facts, &mut p);
    let targets: Vec<String> = p.actions.iter().map(|a| a.summary.clone()).collect();
    assert!(targets[1].ends_with("(new VM)"), "{targets:?}");
    assert_eq!(w1.commands().len(), 1);
    assert!(
        w2.commands().is_empty(),
        "a VM not created yet is not asked"
    );
}

const TLS_SECRET_PATH: &str = "/api/v1/namespaces/turnd/secrets/turnd-tls";

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
    let api = api();
    let state = api.state.clone();
    let p = Pebble::start(&[]);
    let cf = api
        .rt
        .block_on(FakeCloudflare::start(Some(p.chall_management.clone())));
    let c = example();
    let store = p.dir.path().join("certs");
    let s = Settings {
        // The fake API server runs no controllers: nothing would ever roll out.
        rollout_timeout: None,
        acme: Some(acme_settings(&p, &c, &store)),
        acme_dns: Some(cf.client()),
        ..settings(KubeApi::Url(format!("http://{}", api.addr)))
    };

    // 1. The plan: order, then apply the objects and deploy the Secret. Planning orders nothing.
    let first = plan(&c, &s).expect("plans");
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
    let secret = state.lock().expect("lock").stored[TLS_SECRET_PATH].clone();
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(
        secret["data"]["tls.crt"],
        serde_json::to_value(k8s_openapi::ByteString(chain)).expect("base64")
    );

    // 3. The Secret exists: nothing more to do.
    let again = plan(&c, &s).expect("plans");
    assert!(again.is_empty(), "{}", again.render(true));

    // 4. The Secret lost (a rebuilt cluster): the stored certificate is reused, nothing ordered.
    let accounts = p.counts().len();
    state.lock().expect("lock").stored.remove(TLS_SECRET_PATH);
    let reuse = plan(&c, &s).expect("plans");
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
    assert!(state
        .lock()
        .expect("lock")
        .stored
        .contains_key(TLS_SECRET_PATH));
    assert_eq!(p.counts().len(), accounts, "no new account or order");

    // 5. Nothing stored and no DNS API: no order, a note says why the pods cannot start.
    state.lock().expect("lock").stored.remove(TLS_SECRET_PATH);
    let empty = tempfile::tempdir().expect("tempdir");
    let none = Settings {
        acme: Some(acme_settings(&p, &c, empty.path())),
        acme_dns: None,
        ..s.clone()
    };
    let missing = plan(&c, &none).expect("plans");
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
