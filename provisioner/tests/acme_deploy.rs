//! `cert deploy`: the certificate goes into the Kubernetes TLS Secret by server-side apply, and
//! `cert status` reads it back.
//!
//! The API server is a small loopback fake (no kube-apiserver can be installed here): it records
//! each request and stores what an apply sends, like the real server's apply of a whole object.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use provisioner::acme::{self, AcmeError, CertStore};
use serde_json::{json, Value};

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Option<Value>,
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    stored: BTreeMap<String, Value>,
}

type Shared = Arc<Mutex<State>>;

fn json_response(code: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = code;
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    r
}

async fn handle(req: Request<Incoming>, st: Shared) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    let body: Option<Value> =
        (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).expect("JSON"));
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let mut s = st.lock().expect("lock");
    s.seen.push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        body: body.clone(),
    });
    let rsp = match parts.method.as_str() {
        "GET" => match s.stored.get(&path) {
            Some(v) => json_response(StatusCode::OK, v),
            None => json_response(
                StatusCode::NOT_FOUND,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": "not found"}),
            ),
        },
        "PATCH" => {
            let mut obj = body.expect("apply body");
            obj["metadata"]["resourceVersion"] = json!("42");
            if !query.contains("dryRun=All") {
                s.stored.insert(path, obj.clone());
            }
            json_response(StatusCode::OK, &obj)
        }
        _ => json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({})),
    };
    Ok(rsp)
}

async fn fake_api() -> (String, Shared, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    let st: Shared = Arc::default();
    let s2 = st.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let s3 = s2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| handle(r, s3.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (url, st, task)
}

fn store_cert(store: &CertStore, serial: u8) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p =
        rcgen::CertificateParams::new(vec!["example.com".to_owned(), "*.example.com".to_owned()])
            .expect("params");
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&[serial]));
    let pem = p.self_signed(&key).expect("cert").pem();
    std::fs::write(store.cert_path(), &pem).expect("write");
    std::fs::write(store.key_path(), key.serialize_pem()).expect("write");
    pem
}

#[tokio::test]
async fn deploy_applies_the_tls_secret_server_side_and_status_reads_it_back() {
    let (url, st, task) = fake_api().await;
    let client = provisioner::k8s::client_for_url(&url).expect("client");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CertStore::new(dir.path());

    // Nothing stored yet: says so and sends nothing.
    let err = acme::deploy(&client, &store, false)
        .await
        .expect_err("empty store");
    assert!(matches!(err, AcmeError::NothingToDeploy(_)), "{err}");
    assert!(st.lock().expect("lock").seen.is_empty());

    let pem = store_cert(&store, 7);
    // Dry run first: the server is asked, nothing is stored.
    let d = acme::deploy(&client, &store, true).await.expect("dry run");
    assert!(d.dry_run);
    assert!(st.lock().expect("lock").stored.is_empty());

    let d = acme::deploy(&client, &store, false).await.expect("deploy");
    assert_eq!(d.secret, "turnd/turnd-tls");
    assert_eq!(d.resource_version.as_deref(), Some("42"));
    assert!(
        d.to_string().starts_with("applied Secret turnd/turnd-tls"),
        "{d}"
    );
    let seen = st.lock().expect("lock").seen.clone();
    let apply = seen.last().expect("a request");
    assert_eq!(apply.method, "PATCH");
    assert_eq!(apply.path, "/api/v1/namespaces/turnd/secrets/turnd-tls");
    assert!(
        apply.query.contains("fieldManager=turnd-provisioner"),
        "{}",
        apply.query
    );
    assert!(apply.query.contains("force=true"), "{}", apply.query);
    assert_eq!(apply.content_type, "application/apply-patch+yaml");
    let body = apply.body.as_ref().expect("body");
    assert_eq!(body["type"], "kubernetes.io/tls");
    assert_eq!(body["kind"], "Secret");
    let crt: k8s_openapi::ByteString =
        serde_json::from_value(body["data"]["tls.crt"].clone()).expect("base64 tls.crt");
    assert_eq!(crt.0, pem.as_bytes());
    assert!(body["data"]["tls.key"].is_string());

    // status: the Secret holds the stored certificate.
    let mut r = acme::status(&store, "turn.example.com", &[], Duration::from_secs(2))
        .await
        .expect("status");
    r.secret = Some(acme::secret_cert(&client).await.map_err(|e| e.to_string()));
    assert!(!r.secret_differs(), "{}", r.render());
    assert!(
        r.render().contains("secret turnd/turnd-tls: not after"),
        "{}",
        r.render()
    );

    // A newer stored certificate not yet deployed: the Secret differs.
    store_cert(&store, 8);
    let mut r = acme::status(&store, "turn.example.com", &[], Duration::from_secs(2))
        .await
        .expect("status");
    r.secret = Some(acme::secret_cert(&client).await.map_err(|e| e.to_string()));
    assert!(r.secret_differs());
    assert!(r.render().contains("DIFFERS from stored"), "{}", r.render());
    task.abort();
}

/// What the kubelet does with a Secret volume: `tls.crt -> ..data/tls.crt`, `..data ->
/// ..<version>`, and an update swaps `..data` atomically.
fn kubelet_write(dir: &Path, version: &str, secret: &Value) {
    let v = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&v).expect("mkdir");
    for f in ["tls.crt", "tls.key"] {
        let b: k8s_openapi::ByteString =
            serde_json::from_value(secret["data"][f].clone()).expect("base64");
        std::fs::write(v.join(f), b.0).expect("write");
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap");
    for f in ["tls.crt", "tls.key"] {
        if std::fs::symlink_metadata(dir.join(f)).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f)).expect("symlink");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_turnd_serves_the_deployed_certificate_without_restarting() {
    let (url, st, task) = fake_api().await;
    let client = provisioner::k8s::client_for_url(&url).expect("client");
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = CertStore::new(store_dir.path());
    let mounted = tempfile::tempdir().expect("tempdir");
    let secret_path = "/api/v1/namespaces/turnd/secrets/turnd-tls";

    // First certificate: deployed, mounted, turnd started on it.
    store_cert(&store, 1);
    acme::deploy(&client, &store, false)
        .await
        .expect("deploy 1");
    let secret = st.lock().expect("lock").stored[secret_path].clone();
    kubelet_write(mounted.path(), "v1", &secret);
    let text = format!(
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = [\"127.0.0.1:0\"]\ntls = [\"127.0.0.1:0\"]\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [auth]\nrealm = \"test\"\nsecrets = [\"s3cret\"]\n[server]\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        mounted.path().join("tls.crt").display(),
        mounted.path().join("tls.key").display()
    );
    let settings = turnd::config::Config::from_toml(&text)
        .expect("turnd config")
        .validate(&turnd::config::MapEnv(Default::default()))
        .expect("valid");
    let running = turnd::run::start(settings).expect("turnd starts");
    let endpoint = running.tls[0].to_string();
    let served = |store: &CertStore| {
        let store = store.clone();
        let endpoint = endpoint.clone();
        async move {
            acme::status(&store, "localhost", &[endpoint], Duration::from_secs(5))
                .await
                .expect("status")
        }
    };
    let r = served(&store).await;
    assert!(r.differing().is_empty(), "{}", r.render());

    // Renewal stored a new certificate: turnd still serves the old one until deploy.
    store_cert(&store, 2);
    let r = served(&store).await;
    assert_eq!(r.differing().len(), 1, "{}", r.render());

    // Deploy; the kubelet updates the mounted Secret; the same turnd serves the new one.
    acme::deploy(&client, &store, false)
        .await
        .expect("deploy 2");
    let secret = st.lock().expect("lock").stored[secret_path].clone();
    kubelet_write(mounted.path(), "v2", &secret);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = served(&store).await;
        if r.differing().is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "turnd never served the deployed certificate: {}",
            r.render()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        running.tls[0].to_string(),
        endpoint,
        "same listener, no restart"
    );
    running.shutdown();
    task.abort();
}
