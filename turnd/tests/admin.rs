//! The admin HTTP listener over loopback, spoken to with raw HTTP/1.1 over a `TcpStream`.
//!
//! The server side is a *fake* [`Control`]: a list of sessions and canned answers. The real
//! one is the running server's worker loops (allocations, drain, reload); the end-to-end
//! tests drive it through a TURN client. Here the subject is the HTTP layer alone: routing,
//! the token, query parsing, pagination, status codes, error bodies, and robustness against
//! slow or oversized requests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use turnd::admin::{
    spawn, spawn_with_limits, AdminHandle, Control, DrainReport, EndSelector, Limits, ReloadReport,
    Session,
};
use turnd::metrics::{Metrics, WorkerStats};
use turnd_test_support::http::{self, Reply};
use turnd_test_support::prometheus::Prometheus;

const TOKEN: &str = "test-token-0123456789";

/// A stand-in for the server: sessions in a list, readiness and reload answers set by the test.
struct FakeControl {
    sessions: Mutex<Vec<Session>>,
    ready: Mutex<Result<(), String>>,
    reload: Mutex<Result<ReloadReport, String>>,
    drains: Mutex<usize>,
}

impl FakeControl {
    fn with_sessions(n: usize) -> Arc<Self> {
        let sessions = (0..n)
            .map(|i| Session {
                id: format!("{i:016x}"),
                user: if i % 2 == 0 {
                    "alice"
                } else {
                    "1700000000:bob"
                }
                .to_owned(),
                transport: "udp".into(),
                client: format!("127.0.0.1:{}", 40000 + i),
                server: "127.0.0.1:3478".into(),
                relayed: vec![format!("127.0.0.1:{}", 50000 + i)],
                created: 1_700_000_000 + i as u64,
                lifetime_left_s: 600,
                bytes_to_peer: 100 * i as u64,
                bytes_from_peer: 0,
                packets_to_peer: i as u64,
                packets_from_peer: 0,
                permissions: 1,
                channels: 0,
            })
            .collect();
        Arc::new(Self {
            sessions: Mutex::new(sessions),
            ready: Mutex::new(Ok(())),
            reload: Mutex::new(Ok(ReloadReport {
                applied: vec!["auth.secret".into()],
                needs_restart: vec!["server.workers".into()],
            })),
            drains: Mutex::new(0),
        })
    }
}

impl Control for FakeControl {
    fn live(&self) -> bool {
        true
    }

    fn ready(&self) -> Result<(), String> {
        self.ready.lock().expect("lock").clone()
    }

    fn sessions(&self, user: Option<&str>) -> Vec<Session> {
        let all = self.sessions.lock().expect("lock");
        // Deliberately not in creation order: the listener must sort before paginating.
        all.iter()
            .rev()
            .filter(|s| user.is_none_or(|u| s.user == u))
            .cloned()
            .collect()
    }

    fn end_sessions(&self, which: EndSelector) -> usize {
        let mut all = self.sessions.lock().expect("lock");
        let before = all.len();
        all.retain(|s| match &which {
            EndSelector::User(u) => s.user != *u,
            EndSelector::Id(id) => s.id != *id,
        });
        before - all.len()
    }

    fn reload(&self) -> Result<ReloadReport, String> {
        self.reload.lock().expect("lock").clone()
    }

    fn drain(&self) -> DrainReport {
        *self.drains.lock().expect("lock") += 1;
        DrainReport {
            draining: true,
            allocations: self.sessions.lock().expect("lock").len(),
            deadline_unix: 1_700_000_120,
        }
    }
}

fn start(control: Arc<FakeControl>, token: Option<&str>) -> (AdminHandle, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(2, "0.1.0-test", "epoll"));
    let admin = spawn(
        "127.0.0.1:0".parse().expect("address"),
        token.map(str::to_owned),
        control,
        Arc::clone(&metrics),
    )
    .expect("admin listener starts");
    (admin, metrics)
}

/// One request (`Connection: close`) and its whole answer.
fn request(addr: SocketAddr, method: &str, target: &str, token: Option<&str>) -> Reply {
    http::request(addr, method, target, token).expect("an HTTP answer")
}

/// The answer to the raw bytes `raw`.
fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
    http::exchange(addr, raw).expect("an HTTP answer")
}

#[test]
fn protected_routes_refuse_a_missing_or_wrong_token_with_401() {
    let (admin, _) = start(FakeControl::with_sessions(1), Some(TOKEN));
    let addr = admin.local_addr();
    for (method, path) in [
        ("GET", "/sessions"),
        ("DELETE", "/sessions?user=alice"),
        ("DELETE", "/sessions/0000000000000000"),
        ("POST", "/reload"),
        ("POST", "/drain"),
    ] {
        for token in [None, Some("wrong-token"), Some("test-token-012345678")] {
            let r = request(addr, method, path, token);
            assert_eq!(r.status, 401, "{method} {path} with {token:?}");
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|v| v.starts_with("Bearer")),
                "{method} {path}: no WWW-Authenticate: Bearer"
            );
            assert!(!r.error().is_empty());
        }
    }
    // A header in another scheme is refused too.
    let raw = format!(
        "GET /sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(exchange(addr, raw.as_bytes()).status, 401);
    assert_eq!(request(addr, "GET", "/sessions", Some(TOKEN)).status, 200);
}

#[test]
fn without_a_configured_token_the_operations_api_is_off() {
    for token in [None, Some(""), Some("  \n")] {
        let (admin, _) = start(FakeControl::with_sessions(1), token);
        let r = request(admin.local_addr(), "GET", "/sessions", Some("anything"));
        assert_eq!(r.status, 403);
        assert_eq!(r.error(), "admin API disabled: no token configured");
        // The open routes still answer.
        assert_eq!(
            request(admin.local_addr(), "GET", "/live", None).status,
            200
        );
    }
}

#[test]
fn token_file_newline_is_trimmed() {
    let (admin, _) = start(
        FakeControl::with_sessions(1),
        Some("test-token-0123456789\n"),
    );
    assert_eq!(
        request(admin.local_addr(), "GET", "/sessions", Some(TOKEN)).status,
        200
    );
}

#[test]
fn sessions_filter_by_user_and_paginate_in_creation_order() {
    let (admin, _) = start(FakeControl::with_sessions(7), Some(TOKEN));
    let addr = admin.local_addr();

    let all = request(addr, "GET", "/sessions", Some(TOKEN)).json();
    assert_eq!(all["total"], 7);
    assert_eq!(all["limit"], 100);
    assert_eq!(all["offset"], 0);
    let ids: Vec<&str> = all["sessions"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["id"].as_str().expect("id"))
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "sorted by creation");
    let first = &all["sessions"][0];
    for field in [
        "id",
        "user",
        "transport",
        "client",
        "server",
        "relayed",
        "created",
        "lifetime_left_s",
        "bytes_to_peer",
        "bytes_from_peer",
        "packets_to_peer",
        "packets_from_peer",
        "permissions",
        "channels",
    ] {
        assert!(!first[field].is_null(), "session field {field}");
    }

    // A REST API username with ':' arrives percent-encoded.
    let bob = request(addr, "GET", "/sessions?user=1700000000%3Abob", Some(TOKEN)).json();
    assert_eq!(bob["total"], 3);
    assert!(bob["sessions"]
        .as_array()
        .expect("a list")
        .iter()
        .all(|s| s["user"] == "1700000000:bob"));

    let page = request(addr, "GET", "/sessions?limit=3&offset=3", Some(TOKEN)).json();
    assert_eq!(page["total"], 7);
    assert_eq!(
        (page["limit"].as_u64(), page["offset"].as_u64()),
        (Some(3), Some(3))
    );
    let page_ids: Vec<&str> = page["sessions"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["id"].as_str().expect("id"))
        .collect();
    assert_eq!(page_ids, &ids[3..6]);
    let past = request(addr, "GET", "/sessions?offset=50", Some(TOKEN)).json();
    assert_eq!(past["sessions"].as_array().map(Vec::len), Some(0));
    assert_eq!(past["total"], 7);
}

#[test]
fn bad_query_parameters_get_400_naming_the_parameter() {
    let (admin, _) = start(FakeControl::with_sessions(1), Some(TOKEN));
    let addr = admin.local_addr();
    for (target, name) in [
        ("/sessions?limit=abc", "limit"),
        ("/sessions?limit=1001", "limit"),
        ("/sessions?offset=-3", "offset"),
        ("/sessions?usr=alice", "usr"),
        ("/sessions?user=%G0", "user"),
    ] {
        let r = request(addr, "GET", target, Some(TOKEN));
        assert_eq!(r.status, 400, "{target}");
        assert!(r.error().contains(name), "{target}: {}", r.error());
    }
}

#[test]
fn delete_by_user_and_by_id() {
    let control = FakeControl::with_sessions(5);
    let (admin, _) = start(Arc::clone(&control), Some(TOKEN));
    let addr = admin.local_addr();

    let r = request(addr, "DELETE", "/sessions", Some(TOKEN));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("'user' is required"), "{}", r.error());

    let r = request(addr, "DELETE", "/sessions?user=alice", Some(TOKEN));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["ended"], 3);
    assert_eq!(control.sessions.lock().expect("lock").len(), 2);

    let r = request(addr, "DELETE", "/sessions/0000000000000001", Some(TOKEN));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["ended"], 1);

    let r = request(addr, "DELETE", "/sessions/0000000000000001", Some(TOKEN));
    assert_eq!(r.status, 404);
    assert!(r.error().contains("0000000000000001"));
    assert_eq!(control.sessions.lock().expect("lock").len(), 1);
}

#[test]
fn unknown_path_is_404_and_wrong_method_405_with_allow() {
    let (admin, _) = start(FakeControl::with_sessions(0), Some(TOKEN));
    let addr = admin.local_addr();
    let r = request(addr, "GET", "/nope", None);
    assert_eq!(r.status, 404);
    assert!(r.error().contains("/nope"));
    assert_eq!(
        request(addr, "GET", "/sessions/a/b", Some(TOKEN)).status,
        404
    );

    for (method, path, allow) in [
        ("POST", "/live", "GET"),
        ("DELETE", "/metrics", "GET"),
        ("PUT", "/sessions", "GET, DELETE"),
        ("GET", "/reload", "POST"),
        ("GET", "/drain", "POST"),
        ("GET", "/sessions/0000000000000000", "DELETE"),
    ] {
        let r = request(addr, method, path, Some(TOKEN));
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        assert!(r.error().contains(method));
    }
}

#[test]
fn live_and_ready_probes() {
    let control = FakeControl::with_sessions(0);
    let (admin, _) = start(Arc::clone(&control), None);
    let addr = admin.local_addr();
    let r = request(addr, "GET", "/live", None);
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    assert_eq!(request(addr, "GET", "/ready", None).status, 200);

    *control.ready.lock().expect("lock") = Err("draining".into());
    let r = request(addr, "GET", "/ready", None);
    assert_eq!(r.status, 503);
    assert!(r.body.contains("draining"), "{}", r.body);
}

#[test]
fn reload_answers_the_report_or_422_with_the_reason() {
    let control = FakeControl::with_sessions(0);
    let (admin, _) = start(Arc::clone(&control), Some(TOKEN));
    let addr = admin.local_addr();
    let r = request(addr, "POST", "/reload", Some(TOKEN));
    assert_eq!(r.status, 200);
    let report: ReloadReport = serde_json::from_str(&r.body).expect("a ReloadReport");
    assert_eq!(report.applied, ["auth.secret"]);
    assert_eq!(report.needs_restart, ["server.workers"]);

    *control.reload.lock().expect("lock") = Err("turnd.toml:3:1: auth.secret: empty".into());
    let r = request(addr, "POST", "/reload", Some(TOKEN));
    assert_eq!(r.status, 422);
    assert!(r.error().contains("turnd.toml:3:1: auth.secret: empty"));
}

#[test]
fn drain_answers_202_with_the_report() {
    let control = FakeControl::with_sessions(2);
    let (admin, _) = start(Arc::clone(&control), Some(TOKEN));
    let r = request(admin.local_addr(), "POST", "/drain", Some(TOKEN));
    assert_eq!(r.status, 202);
    let report: DrainReport = serde_json::from_str(&r.body).expect("a DrainReport");
    assert_eq!(
        report,
        DrainReport {
            draining: true,
            allocations: 2,
            deadline_unix: 1_700_000_120
        }
    );
    assert_eq!(*control.drains.lock().expect("lock"), 1);
}

#[test]
fn metrics_is_open_prometheus_text_and_live() {
    let (admin, metrics) = start(FakeControl::with_sessions(0), Some(TOKEN));
    let addr = admin.local_addr();
    let scrape = |addr| {
        let r = request(addr, "GET", "/metrics", None);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
        r.body
    };
    let body = scrape(addr);
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().expect("a value");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("not a sample: {line:?}"));
        assert!(line.starts_with("turnd_"), "{line}");
    }
    assert!(body.contains("turnd_build_info{version=\"0.1.0-test\",io_backend=\"epoll\"} 1"));

    // A worker publishes; the next scrape shows it.
    let mut w = WorkerStats::default();
    w.core.bytes_to_peer[0] = 1234;
    metrics.publish(1, &w);
    assert!(scrape(addr).contains(
        "turnd_relayed_bytes_total{direction=\"client_to_peer\",transport=\"udp\"} 1234"
    ));
}

#[test]
fn a_body_over_the_cap_gets_413() {
    let (admin, _) = start(FakeControl::with_sessions(0), Some(TOKEN));
    let raw = format!(
        "POST /reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000000\r\nConnection: close\r\n\r\n"
    );
    let r = exchange(admin.local_addr(), raw.as_bytes());
    assert_eq!(r.status, 413);
    // A small body is read and ignored.
    let raw = format!(
        "POST /drain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    assert_eq!(exchange(admin.local_addr(), raw.as_bytes()).status, 202);
}

#[test]
fn malformed_http_is_answered_or_closed_without_hurting_the_listener() {
    let (admin, _) = start(FakeControl::with_sessions(0), None);
    let addr = admin.local_addr();
    for junk in [
        &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"[..],
        b"GET /live HTTP/9.9\r\n\r\n",
        b"GET\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(junk).expect("send");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 4"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    assert_eq!(request(addr, "GET", "/live", None).status, 200);
}

#[test]
fn slow_clients_are_cut_off_and_do_not_block_others() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        max_connections: 4,
        ..Limits::default()
    };
    let admin = spawn_with_limits(
        "127.0.0.1:0".parse().expect("address"),
        None,
        FakeControl::with_sessions(0),
        Arc::new(Metrics::new(1, "0.1.0-test", "epoll")),
        limits,
    )
    .expect("admin listener starts");
    let addr = admin.local_addr();

    // As many half-sent requests as the listener serves at once.
    let slow: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n")
                .expect("send");
            s
        })
        .collect();

    // A probe still gets through once the header timeout frees the slots (the client's own
    // IO timeout bounds the wait; no wall-clock assertion).
    assert_eq!(request(addr, "GET", "/live", None).status, 200);

    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut out = Vec::new();
        // The server closes the connection (possibly with a 408) instead of waiting forever.
        let _ = s.read_to_end(&mut out);
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
}

#[test]
fn a_port_in_use_is_a_bind_error_and_drop_stops_the_listener() {
    let (admin, _) = start(FakeControl::with_sessions(0), None);
    let addr = admin.local_addr();
    let err = spawn(
        addr,
        None,
        FakeControl::with_sessions(0),
        Arc::new(Metrics::new(1, "x", "epoll")),
    )
    .expect_err("the port is taken");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    drop(admin);
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "still accepting after drop"
    );
}

#[test]
fn a_real_prometheus_scrapes_the_listener_and_sees_counters_move() {
    // A real Prometheus server (Debian's `prometheus`) on loopback scrapes the listener.
    let Some(binary) = Prometheus::find() else {
        return;
    };
    let (admin, metrics) = start(FakeControl::with_sessions(0), None);

    // A worker relaying: one allocation, bytes rising every 100 ms like a live session.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (metrics, stop) = (Arc::clone(&metrics), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut w = WorkerStats::default();
            w.on_allocation_created(turn_proto::server::Transport::Udp, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                w.core.bytes_to_peer[0] += 1000;
                w.core.packets_to_peer[0] += 10;
                metrics.publish(0, &w);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let prometheus = Prometheus::start(&binary, admin.local_addr()).expect("prometheus starts");
    let minute = Duration::from_secs(60);
    assert_eq!(
        prometheus.wait_for("up{job=\"turnd\"}", minute, |v| v == 1.0),
        Some(1.0),
        "Prometheus never scraped the admin listener at {} (API {})",
        admin.local_addr(),
        prometheus.api
    );
    assert_eq!(
        prometheus.wait_for("sum(turnd_allocations_active)", minute, |v| v == 1.0),
        Some(1.0)
    );
    let bytes = "sum(turnd_relayed_bytes_total{direction=\"client_to_peer\"})";
    let (first, later) = prometheus.wait_rising(bytes, minute);
    assert!(later > first);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.join().expect("publisher");
}
