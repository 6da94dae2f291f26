//! A fake Kubernetes API server on a loopback port (no real API server can run here): it
//! records every request, stores what a real server-side apply would store, answers a dry run
//! without storing, and answers GET from what it stored. Used by `k8s_apply.rs` and
//! `phase_turnd.rs`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// One request as the fake server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: Option<Value>,
}

#[derive(Default)]
pub struct State {
    pub seen: Vec<Seen>,
    /// Objects by URL path, as a real apply stored them.
    pub stored: BTreeMap<String, Value>,
    /// Paths whose PATCH is refused with 422 Invalid.
    pub refuse: Vec<String>,
}

pub type Shared = Arc<Mutex<State>>;

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = code;
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    r
}

fn ok_json(v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    r
}

async fn handle(
    req: Request<Incoming>,
    state: Shared,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.expect("request body").to_bytes();
    let query: BTreeMap<String, String> = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let path = parts.uri.path().to_owned();
    let body: Option<Value> = (!bytes.is_empty())
        .then(|| serde_json::from_slice(&bytes).expect("the body is JSON (valid apply YAML)"));
    let mut st = state.lock().expect("lock");
    st.seen.push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: parts
            .headers
            .get("content-type")
            .map(|v| v.to_str().expect("ascii").to_owned()),
        body: body.clone(),
    });
    let resp = match parts.method.as_str() {
        "GET" => match st.stored.get(&path) {
            Some(v) => ok_json(v),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{path} not found"),
            ),
        },
        "PATCH" if st.refuse.contains(&path) => status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "refused by the test",
        ),
        "PATCH" => {
            let obj = body.expect("an apply has a body");
            if query.get("dryRun").map(String::as_str) != Some("All") {
                st.stored.insert(path, obj.clone());
            }
            ok_json(&obj)
        }
        other => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("the fake serves no {other}"),
        ),
    };
    Ok(resp)
}

/// Starts the fake API server on a loopback port.
pub async fn fake_api_server() -> (SocketAddr, Shared) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = Shared::default();
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(req, st.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

/// Takes the requests seen so far.
pub fn take(state: &Shared) -> Vec<Seen> {
    std::mem::take(&mut state.lock().expect("lock").seen)
}

/// A kubeconfig whose current context is the fake API server at `addr` (plain HTTP, no
/// credentials).
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\ncurrent-context: fake\nusers:\n- name: nobody\n  user: {{}}\n"
    )
}
