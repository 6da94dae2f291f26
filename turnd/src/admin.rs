//! The admin HTTP listener: metrics, health probes and the operations API.
//!
//! One listener per process (not per worker), plain HTTP/1.1 served by hyper on its own thread
//! with a current-thread tokio runtime ([`spawn`]), or as a task on the caller's runtime
//! ([`serve`]). What it can do to the server goes through the [`Control`] trait, which the IO
//! layer implements; the listener itself holds no server state.
//!
//! | route | auth | answer |
//! |---|---|---|
//! | `GET /metrics` | open | Prometheus text exposition ([`Metrics::render`]) |
//! | `GET /live` | open | 200 `ok`, or 503 when [`Control::live`] is false |
//! | `GET /ready` | open | 200 `ready`, or 503 with the reason from [`Control::ready`] |
//! | `GET /sessions?user=U&limit=N&offset=M` | token | `{"sessions":[…],"total":T,"offset":M,"limit":N}` |
//! | `DELETE /sessions?user=U` | token | `{"ended":n}` (`user` is required) |
//! | `DELETE /sessions/{id}` | token | `{"ended":n}`, 404 when nothing ended |
//! | `POST /reload` | token | 200 with a [`ReloadReport`], 422 with the error |
//! | `POST /drain` | token | 202 with a [`DrainReport`] |
//!
//! Token-protected routes want `Authorization: Bearer <token>`, compared in constant time
//! (for a given length). A missing or wrong token gets 401 with `WWW-Authenticate: Bearer`.
//! With **no token configured** they answer **403** `admin API disabled: no token configured`:
//! the route exists but is switched off, which a 404 would hide from an operator chasing a
//! typo. Every error is a JSON object `{"error": "…"}` saying what was wrong; an unknown path
//! is 404, a known path with the wrong method 405 with `Allow`.
//!
//! A slow or malformed client cannot hang the listener: headers must arrive within
//! [`Limits::header_read_timeout`] (an idle keep-alive connection is closed after it too), a
//! connection lives at most [`Limits::connection_timeout`], request bodies are read up to
//! [`Limits::body_cap`] bytes and never used, at most [`Limits::max_connections`] connections
//! are served at once (further ones wait in the kernel's accept queue), and each [`Control`]
//! call runs on the blocking pool with [`Limits::control_timeout`].

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes};
use hyper::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};

use crate::metrics::Metrics;

/// What the admin API asks of the running server. Implemented by the IO layer.
///
/// Every method may block (take locks, ask the workers and wait for their answer); the listener
/// calls them on tokio's blocking pool, bounded by [`Limits::control_timeout`].
pub trait Control: Send + Sync + 'static {
    /// Whether the process loop is turning (`GET /live`).
    fn live(&self) -> bool;
    /// Whether the server takes new allocations: listeners bound, certificate loaded when TLS
    /// is configured, not draining (`GET /ready`). `Err` says why not.
    fn ready(&self) -> Result<(), String>;
    /// The allocations held now, all or one user's.
    fn sessions(&self, user: Option<&str>) -> Vec<Session>;
    /// Ends allocations now; returns how many ended.
    fn end_sessions(&self, which: EndSelector) -> usize;
    /// Reloads the configuration file; `Err` says why the new file was refused (the old
    /// settings stay).
    fn reload(&self) -> Result<ReloadReport, String>;
    /// Starts draining (idempotent) and says where it stands.
    fn drain(&self) -> DrainReport;
}

/// Which allocations [`Control::end_sessions`] ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndSelector {
    /// Every allocation of this username.
    User(String),
    /// The allocation with this id ([`Session::id`]).
    Id(String),
}

/// One allocation, as `GET /sessions` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Its id, as `DELETE /sessions/{id}` takes it.
    pub id: String,
    /// The authenticated username.
    pub user: String,
    /// The client's transport: `udp`, `tcp` or `tls`.
    pub transport: String,
    /// The client's transport address.
    pub client: String,
    /// The server address the client reached.
    pub server: String,
    /// Relayed transport addresses (advertised).
    pub relayed: Vec<String>,
    /// When it was created, unix seconds.
    pub created: u64,
    /// Seconds until it expires unless refreshed.
    pub lifetime_left_s: u64,
    /// Payload bytes relayed client → peer.
    pub bytes_to_peer: u64,
    /// Payload bytes relayed peer → client.
    pub bytes_from_peer: u64,
    /// Datagrams relayed client → peer.
    pub packets_to_peer: u64,
    /// Datagrams relayed peer → client.
    pub packets_from_peer: u64,
    /// Permissions installed.
    pub permissions: usize,
    /// Channels bound.
    pub channels: usize,
}

/// What a reload changed (`POST /reload`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Settings applied now (names, never values: no secret leaves the process).
    pub applied: Vec<String>,
    /// Settings that changed in the file but take effect only after a restart.
    pub needs_restart: Vec<String>,
}

/// Where a drain stands (`POST /drain`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// Whether the server is draining.
    pub draining: bool,
    /// Allocations still open.
    pub allocations: usize,
    /// When the process exits at the latest, unix seconds.
    pub deadline_unix: u64,
}

/// Why the admin listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The listen address could not be bound (in use, not local, no permission).
    #[error("admin listener: cannot bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The listener's runtime or thread could not be started.
    #[error("admin listener: cannot start: {0}")]
    Start(#[source] io::Error),
}

/// Bounds that keep a slow, malformed or hostile client from hanging the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time to receive a request's headers, also the idle time of a kept-alive connection.
    pub header_read_timeout: Duration,
    /// Longest life of one connection, whatever it does.
    pub connection_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Longest wait for one [`Control`] call (then 503).
    pub control_timeout: Duration,
    /// Largest request body read (then 413); bodies are read only to be discarded.
    pub body_cap: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            connection_timeout: Duration::from_secs(60),
            max_connections: 64,
            control_timeout: Duration::from_secs(10),
            body_cap: 4096,
        }
    }
}

/// Default `limit` of `GET /sessions`.
pub const DEFAULT_SESSIONS_LIMIT: usize = 100;
/// Largest `limit` of `GET /sessions`.
pub const MAX_SESSIONS_LIMIT: usize = 1000;

/// The running admin listener. Dropping it stops the listener and joins its thread.
#[derive(Debug)]
pub struct AdminHandle {
    local_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl AdminHandle {
    /// The bound address (port 0 resolved).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the listener and waits for its thread (the same as dropping the handle).
    pub fn stop(self) {}
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the admin listener on `listen` on a thread of its own, with [`Limits::default`].
///
/// `token` protects the operations routes; surrounding whitespace is trimmed (a token file's
/// newline) and an empty token counts as none, which switches those routes off.
///
/// # Errors
/// [`AdminError::Bind`] when `listen` cannot be bound; [`AdminError::Start`] when the thread or
/// its runtime cannot be created.
pub fn spawn(
    listen: SocketAddr,
    token: Option<String>,
    control: Arc<dyn Control>,
    metrics: Arc<Metrics>,
) -> Result<AdminHandle, AdminError> {
    spawn_with_limits(listen, token, control, metrics, Limits::default())
}

/// [`spawn`] with explicit [`Limits`].
///
/// # Errors
/// As [`spawn`].
pub fn spawn_with_limits(
    listen: SocketAddr,
    token: Option<String>,
    control: Arc<dyn Control>,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> Result<AdminHandle, AdminError> {
    let bind_err = |source| AdminError::Bind {
        addr: listen,
        source,
    };
    let std_listener = std::net::TcpListener::bind(listen).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let local_addr = std_listener.local_addr().map_err(bind_err)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .thread_name("turnd-admin-ctl")
        .build()
        .map_err(AdminError::Start)?;
    let listener = {
        let _guard = runtime.enter();
        TcpListener::from_std(std_listener).map_err(AdminError::Start)?
    };
    let (tx, rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("turnd-admin".into())
        .spawn(move || {
            runtime.block_on(serve_with_limits(
                listener,
                token,
                control,
                metrics,
                limits,
                async {
                    let _ = rx.await;
                },
            ));
            // A Control call still running on the blocking pool is not waited for long.
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .map_err(AdminError::Start)?;
    Ok(AdminHandle {
        local_addr,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

/// Serves the admin API on an already bound listener until `shutdown` completes, on the
/// caller's runtime, with [`Limits::default`]. The token is handled as in [`spawn`].
pub async fn serve(
    listener: TcpListener,
    token: Option<String>,
    control: Arc<dyn Control>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with_limits(
        listener,
        token,
        control,
        metrics,
        Limits::default(),
        shutdown,
    )
    .await;
}

/// [`serve`] with explicit [`Limits`].
pub async fn serve_with_limits(
    listener: TcpListener,
    token: Option<String>,
    control: Arc<dyn Control>,
    metrics: Arc<Metrics>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let state = Arc::new(State {
        token: token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()),
        control,
        metrics,
        limits,
    });
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(state.limits.header_read_timeout)
                .max_buf_size(16 * 1024);
            let service = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(req, &state).await) }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            // Errors here are the client's (bad HTTP, reset, timeout): nothing to report.
            let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
        });
    }
}

struct State {
    token: Option<String>,
    control: Arc<dyn Control>,
    metrics: Arc<Metrics>,
    limits: Limits,
}

type Reply = Response<Full<Bytes>>;

/// A failed request: status and the reason sent as `{"error": reason}`.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    reason: String,
    allow: Option<&'static str>,
}

impl Failure {
    fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            allow: None,
        }
    }

    fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason)
    }

    fn into_reply(self) -> Reply {
        let mut reply = json(self.status, &serde_json::json!({ "error": self.reason }));
        if let Some(allow) = self.allow {
            reply
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            reply.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"turnd admin\""),
            );
        }
        reply
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Reply {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    reply(status, "application/json", body)
}

fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    reply(
        status,
        "text/plain; charset=utf-8",
        body.into().into_bytes(),
    )
}

fn reply(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The routes: which methods each path takes and whether it needs the token.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Live,
    Ready,
    Sessions,
    Session(String),
    Reload,
    Drain,
}

impl Route {
    fn find(path: &str) -> Result<Self, Failure> {
        Ok(match path {
            "/metrics" => Self::Metrics,
            "/live" => Self::Live,
            "/ready" => Self::Ready,
            "/sessions" | "/sessions/" => Self::Sessions,
            "/reload" => Self::Reload,
            "/drain" => Self::Drain,
            p => match p.strip_prefix("/sessions/") {
                Some(id) if !id.contains('/') => Self::Session(
                    percent_decode(id)
                        .map_err(|e| Failure::bad_request(format!("session id: {e}")))?,
                ),
                _ => {
                    return Err(Failure::new(
                        StatusCode::NOT_FOUND,
                        format!("no such path: {}", truncate(p, 200)),
                    ))
                }
            },
        })
    }

    fn allow(&self) -> &'static str {
        match self {
            Self::Metrics | Self::Live | Self::Ready => "GET",
            Self::Sessions => "GET, DELETE",
            Self::Session(_) => "DELETE",
            Self::Reload | Self::Drain => "POST",
        }
    }

    fn protected(&self) -> bool {
        !matches!(self, Self::Metrics | Self::Live | Self::Ready)
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

async fn handle<B>(req: Request<B>, state: &State) -> Reply
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match respond(req, state).await {
        Ok(reply) => reply,
        Err(failure) => failure.into_reply(),
    }
}

async fn respond<B>(req: Request<B>, state: &State) -> Result<Reply, Failure>
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (parts, body) = req.into_parts();
    // Read (and discard) the body first, so even an error answer does not leave unread bytes
    // behind, which would make the kernel reset the connection under the reply.
    read_capped(body, &parts.headers, state.limits).await?;

    let route = Route::find(parts.uri.path())?;
    let allowed = route.allow();
    if !allowed.split(", ").any(|m| m == parts.method.as_str()) {
        return Err(Failure {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: format!(
                "method {} not allowed on {}; allowed: {allowed}",
                truncate(parts.method.as_str(), 20),
                parts.uri.path()
            ),
            allow: Some(allowed),
        });
    }
    if route.protected() {
        authorize(state.token.as_deref(), parts.headers.get(AUTHORIZATION))?;
    }
    let query = parts.uri.query().unwrap_or("");
    let control = &state.control;
    match (route, parts.method) {
        (Route::Metrics, _) => {
            let metrics = Arc::clone(&state.metrics);
            let body = blocking(state, move || metrics.render()).await?;
            Ok(reply(
                StatusCode::OK,
                Metrics::content_type(),
                body.into_bytes(),
            ))
        }
        (Route::Live, _) => {
            let c = Arc::clone(control);
            Ok(if blocking(state, move || c.live()).await? {
                text(StatusCode::OK, "ok\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not live: the process loop is not turning\n",
                )
            })
        }
        (Route::Ready, _) => {
            let c = Arc::clone(control);
            Ok(match blocking(state, move || c.ready()).await? {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            })
        }
        (Route::Sessions, Method::GET) => {
            let q = SessionsQuery::parse(query)?;
            let c = Arc::clone(control);
            let user = q.user.clone();
            let mut sessions = blocking(state, move || c.sessions(user.as_deref())).await?;
            // A stable order, so pages do not overlap or skip while nothing changes.
            sessions.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
            let total = sessions.len();
            let page: Vec<Session> = sessions.into_iter().skip(q.offset).take(q.limit).collect();
            Ok(json(
                StatusCode::OK,
                &SessionsPage {
                    sessions: page,
                    total,
                    offset: q.offset,
                    limit: q.limit,
                },
            ))
        }
        (Route::Sessions, _) => {
            let user = parse_query(query, &["user"])?
                .into_iter()
                .find_map(|(k, v)| (k == "user").then_some(v))
                .ok_or_else(|| {
                    Failure::bad_request(
                        "query parameter 'user' is required (DELETE /sessions/{id} ends one session)",
                    )
                })?;
            let user = non_empty("user", user)?;
            tracing::info!(user = ?user, "admin: ending the user's sessions");
            let c = Arc::clone(control);
            let ended = blocking(state, move || c.end_sessions(EndSelector::User(user))).await?;
            Ok(json(StatusCode::OK, &Ended { ended }))
        }
        (Route::Session(id), _) => {
            no_query(query)?;
            let id = non_empty("session id", id)?;
            tracing::info!(id = ?id, "admin: ending a session");
            let c = Arc::clone(control);
            let wanted = id.clone();
            let ended = blocking(state, move || c.end_sessions(EndSelector::Id(wanted))).await?;
            if ended == 0 {
                return Err(Failure::new(
                    StatusCode::NOT_FOUND,
                    format!("no session with id {}", truncate(&id, 100)),
                ));
            }
            Ok(json(StatusCode::OK, &Ended { ended }))
        }
        (Route::Reload, _) => {
            no_query(query)?;
            let c = Arc::clone(control);
            match blocking(state, move || c.reload()).await? {
                Ok(report) => Ok(json(StatusCode::OK, &report)),
                Err(reason) => Err(Failure::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("reload refused, old settings kept: {reason}"),
                )),
            }
        }
        (Route::Drain, _) => {
            no_query(query)?;
            tracing::info!("admin: drain requested");
            let c = Arc::clone(control);
            let report = blocking(state, move || c.drain()).await?;
            Ok(json(StatusCode::ACCEPTED, &report))
        }
    }
}

#[derive(Serialize)]
struct SessionsPage {
    sessions: Vec<Session>,
    total: usize,
    offset: usize,
    limit: usize,
}

#[derive(Serialize)]
struct Ended {
    ended: usize,
}

/// Reads a request body up to the cap and within the header timeout, and throws it away.
async fn read_capped<B>(body: B, headers: &hyper::HeaderMap, limits: Limits) -> Result<(), Failure>
where
    B: Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let too_large = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body over {} bytes (the admin API reads none)",
                limits.body_cap
            ),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.body_cap as u64) {
        return Err(too_large());
    }
    if body.is_end_stream() {
        return Ok(());
    }
    let read = Limited::new(body, limits.body_cap).collect();
    match tokio::time::timeout(limits.header_read_timeout, read).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(Failure::bad_request(format!(
            "reading the request body: {e}"
        ))),
        Err(_) => Err(Failure::new(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        )),
    }
}

/// Checks `Authorization: Bearer <token>` against the configured token.
fn authorize(token: Option<&str>, header: Option<&HeaderValue>) -> Result<(), Failure> {
    let Some(token) = token else {
        return Err(Failure::new(
            StatusCode::FORBIDDEN,
            "admin API disabled: no token configured",
        ));
    };
    let unauthorized = |reason: &str| Failure::new(StatusCode::UNAUTHORIZED, reason);
    let header = header.ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?;
    let presented = header
        .to_str()
        .ok()
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or_else(|| unauthorized("the Authorization header is not 'Bearer <token>'"))?;
    if token_matches(token, presented) {
        Ok(())
    } else {
        Err(unauthorized("wrong token"))
    }
}

/// Compares in time that depends only on the lengths, never on where the bytes differ.
fn token_matches(expected: &str, presented: &str) -> bool {
    bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

/// Runs a [`Control`] call (or a scrape) on the blocking pool, bounded in time.
async fn blocking<T, F>(state: &State, f: F) -> Result<T, Failure>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match tokio::time::timeout(state.limits.control_timeout, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: the server's control call failed",
        )),
        Err(_) => Err(Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the server did not answer within {} s",
                state.limits.control_timeout.as_secs_f32()
            ),
        )),
    }
}

/// The query of `GET /sessions`.
#[derive(Debug, PartialEq, Eq)]
struct SessionsQuery {
    user: Option<String>,
    limit: usize,
    offset: usize,
}

impl SessionsQuery {
    fn parse(query: &str) -> Result<Self, Failure> {
        let mut q = Self {
            user: None,
            limit: DEFAULT_SESSIONS_LIMIT,
            offset: 0,
        };
        for (key, value) in parse_query(query, &["user", "limit", "offset"])? {
            match key.as_str() {
                "user" => q.user = Some(non_empty("user", value)?),
                "limit" => {
                    q.limit = number("limit", &value)?;
                    if q.limit > MAX_SESSIONS_LIMIT {
                        return Err(Failure::bad_request(format!(
                            "query parameter 'limit': at most {MAX_SESSIONS_LIMIT}, got {}",
                            q.limit
                        )));
                    }
                }
                _ => q.offset = number("offset", &value)?,
            }
        }
        Ok(q)
    }
}

fn number(name: &str, value: &str) -> Result<usize, Failure> {
    value.parse().map_err(|_| {
        Failure::bad_request(format!(
            "query parameter '{name}': not a non-negative integer: {:?}",
            truncate(value, 40)
        ))
    })
}

fn non_empty(name: &str, value: String) -> Result<String, Failure> {
    if value.is_empty() {
        Err(Failure::bad_request(format!("{name} is empty")))
    } else {
        Ok(value)
    }
}

fn no_query(query: &str) -> Result<(), Failure> {
    parse_query(query, &[]).map(drop)
}

/// Splits and decodes `a=1&b=2`, refusing parameters not in `known` and repeated ones.
fn parse_query(query: &str, known: &[&str]) -> Result<Vec<(String, String)>, Failure> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)
            .map_err(|e| Failure::bad_request(format!("query parameter name: {e}")))?;
        if !known.contains(&key.as_str()) {
            let expected = if known.is_empty() {
                "this route takes none".to_owned()
            } else {
                format!("expected {}", known.join(", "))
            };
            return Err(Failure::bad_request(format!(
                "unknown query parameter '{}' ({expected})",
                truncate(&key, 40)
            )));
        }
        if out.iter().any(|(k, _)| *k == key) {
            return Err(Failure::bad_request(format!(
                "query parameter '{key}' given twice"
            )));
        }
        let value = percent_decode(value)
            .map_err(|e| Failure::bad_request(format!("query parameter '{key}': {e}")))?;
        out.push((key, value));
    }
    Ok(out)
}

/// Decodes `%XX` escapes and `+` (a space, as in forms) into UTF-8 text.
fn percent_decode(s: &str) -> Result<String, String> {
    let mut bytes = Vec::with_capacity(s.len());
    let mut input = s.bytes();
    while let Some(b) = input.next() {
        match b {
            b'%' => {
                let hex = [input.next(), input.next()];
                let digit = |c: Option<u8>| c.and_then(|c| char::from(c).to_digit(16));
                match (digit(hex[0]), digit(hex[1])) {
                    // Two hex digits make a byte.
                    #[allow(clippy::cast_possible_truncation)]
                    (Some(hi), Some(lo)) => bytes.push((hi * 16 + lo) as u8),
                    _ => return Err("a '%' not followed by two hex digits".into()),
                }
            }
            b'+' => bytes.push(b' '),
            b => bytes.push(b),
        }
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 once decoded".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(r: Result<impl std::fmt::Debug, Failure>) -> StatusCode {
        r.err().map_or(StatusCode::OK, |f| f.status)
    }

    #[test]
    fn sessions_query_defaults_and_bounds() {
        let q = SessionsQuery::parse("").expect("empty query");
        assert_eq!(
            (q.user, q.limit, q.offset),
            (None, DEFAULT_SESSIONS_LIMIT, 0)
        );
        let q = SessionsQuery::parse("user=1700000000%3Aalice&limit=5&offset=10").expect("ok");
        assert_eq!(q.user.as_deref(), Some("1700000000:alice"));
        assert_eq!((q.limit, q.offset), (5, 10));
        assert_eq!(status(SessionsQuery::parse("limit=1000")), StatusCode::OK);
    }

    #[test]
    fn sessions_query_errors_name_the_parameter() {
        for (query, names) in [
            ("limit=ten", "'limit'"),
            ("limit=-1", "'limit'"),
            ("limit=1001", "'limit'"),
            ("offset=1.5", "'offset'"),
            ("usr=alice", "'usr'"),
            ("user=a&user=b", "'user'"),
            ("user=%zz", "'user'"),
            ("user=%ff", "'user'"),
        ] {
            let f = SessionsQuery::parse(query).expect_err(query);
            assert_eq!(f.status, StatusCode::BAD_REQUEST, "{query}");
            assert!(f.reason.contains(names), "{query}: {}", f.reason);
        }
        let f = SessionsQuery::parse("user=").expect_err("empty user");
        assert!(f.reason.contains("user is empty"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c%2F").as_deref(), Ok("a b c/"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Ok("é"));
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%").is_err());
    }

    #[test]
    fn routes_and_their_methods() {
        assert_eq!(Route::find("/metrics").ok(), Some(Route::Metrics));
        assert_eq!(
            Route::find("/sessions/00ab%2Dcd").ok(),
            Some(Route::Session("00ab-cd".into()))
        );
        assert_eq!(status(Route::find("/sessions/a/b")), StatusCode::NOT_FOUND);
        assert_eq!(status(Route::find("/")), StatusCode::NOT_FOUND);
        assert_eq!(Route::Sessions.allow(), "GET, DELETE");
        assert!(Route::Reload.protected() && !Route::Ready.protected());
    }

    #[test]
    fn bearer_token_is_checked() {
        let ok = HeaderValue::from_static("Bearer s3cret");
        assert_eq!(status(authorize(Some("s3cret"), Some(&ok))), StatusCode::OK);
        let lower = HeaderValue::from_static("bearer s3cret");
        assert_eq!(
            status(authorize(Some("s3cret"), Some(&lower))),
            StatusCode::OK
        );
        for bad in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic czNjcmV0",
            "s3cret",
            "Bearer ",
        ] {
            let h = HeaderValue::from_static(bad);
            assert_eq!(
                status(authorize(Some("s3cret"), Some(&h))),
                StatusCode::UNAUTHORIZED,
                "{bad}"
            );
        }
        assert_eq!(
            status(authorize(Some("s3cret"), None)),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(status(authorize(None, Some(&ok))), StatusCode::FORBIDDEN);
    }
}
