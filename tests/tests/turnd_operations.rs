//! Issue 11 on the real server (in-process turnd, real clients and a real Prometheus):
//!
//! - Prometheus scrapes the admin listener's `/metrics` while the webrtc-rs client relays and
//!   sees one active allocation and relayed bytes rising during the session; `promtool check
//!   metrics` finds nothing wrong with a scrape;
//! - reload: a replaced secret file refuses the old secret's credentials (401) and accepts
//!   the new one's, while the allocation made before keeps relaying; a broken file is refused,
//!   counted, and the running settings stay;
//! - the admin API: 401 without or with a wrong token, `GET /sessions` lists the live
//!   allocation, `DELETE /sessions?user=` ends it and the client's next Refresh gets 437.
//!
//! The drain (SIGTERM) and other signal paths run the `turnd` binary: `turnd/tests/process.rs`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use turnd_tests::client::{rest_credential, Incoming, MiniClient};
use turnd_tests::http;
use turnd_tests::peer::EchoPeer;
use turnd_tests::prometheus::{promtool_check_metrics, Prometheus};
use turnd_tests::server::{turnd_toml, Auth, Options, TestServer, LOCALHOST};
use turnd_tests::IO_TIMEOUT;
use webrtc_util::Conn;

const TOKEN: &str = "operations-admin-token-0123456789";

/// A config with the admin listener on (port 0), its token in `dir`, and `auth` lines.
fn operations_toml(dir: &Path, ports: std::ops::RangeInclusive<u16>, auth: &str) -> String {
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let opts = Options {
        auth: Auth::secret(),
        relay_ports: ports,
    };
    let base = turnd_toml(&opts, "");
    // Replace the [auth] lines turnd_toml wrote with `auth`.
    let start = base.find("[auth]").unwrap();
    let end = start + base[start..].find("\n\n").unwrap();
    format!(
        "{}[auth]\nrealm = \"{}\"\n{auth}{}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        &base[..start],
        turnd_tests::server::REALM,
        &base[end..],
        token_file.display()
    )
}

/// Relays one datagram to `peer` and back through `c` (permission already installed).
async fn echo(c: &mut MiniClient, peer: SocketAddr, what: &str) {
    c.send_indication(peer, what.as_bytes()).await.unwrap();
    match c.recv_data(IO_TIMEOUT).await.unwrap() {
        Some(Incoming::DataIndication { data, .. }) => {
            assert_eq!(data, what.as_bytes(), "{what}: garbled");
        }
        other => panic!("{what}: no echo ({other:?})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_a_live_webrtc_rs_session_and_promtool_passes_the_scrape() {
    let Some(binary) = Prometheus::find() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let toml = operations_toml(
        dir.path(),
        22000..=22019,
        "secrets = [\"interop-shared-secret\"]\n",
    );
    let server = TestServer::turnd(&toml, Auth::secret()).unwrap();
    let admin = server.admin();
    let prometheus = Prometheus::start(&binary, admin).unwrap();
    let peer = EchoPeer::start(LOCALHOST).unwrap();

    let conn = Arc::new(UdpSocket::bind((LOCALHOST, 0)).await.unwrap());
    let client = server.webrtc_client("webrtc-rs", conn).await.unwrap();
    client.listen().await.unwrap();
    let relay = tokio::time::timeout(IO_TIMEOUT, client.allocate())
        .await
        .expect("allocate timed out")
        .expect("allocate failed");

    // The session: a datagram to the echo peer and back every 20 ms until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let session = {
        let (stop, echoed, to) = (stop.clone(), echoed.clone(), peer.addr);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            let payload = [0x5au8; 160];
            while !stop.load(Ordering::Relaxed) {
                relay.send_to(&payload, to).await.unwrap();
                if let Ok(Ok((n, _))) =
                    tokio::time::timeout(Duration::from_secs(1), relay.recv_from(&mut buf)).await
                {
                    assert_eq!(n, payload.len());
                    echoed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            relay.close().await.unwrap();
        })
    };

    let queries = tokio::task::spawn_blocking(move || {
        let minute = Duration::from_secs(60);
        let up = prometheus.wait_for("up{job=\"turnd\"}", minute, |v| v == 1.0);
        assert_eq!(
            up,
            Some(1.0),
            "Prometheus never scraped {admin}:\n{}",
            prometheus.log()
        );
        let active = prometheus.wait_for("sum(turnd_allocations_active)", minute, |v| v == 1.0);
        assert_eq!(active, Some(1.0), "one active allocation");
        let bytes = "sum(turnd_relayed_bytes_total{direction=\"client_to_peer\"})";
        let (first, later) = prometheus.wait_rising(bytes, minute);
        let back = "sum(turnd_relayed_bytes_total{direction=\"peer_to_client\"})";
        assert!(prometheus.wait_for(back, minute, |v| v > 0.0).is_some());
        (first, later)
    })
    .await
    .unwrap();
    // Both samples were taken while the session ran: it is still running now.
    assert!(!session.is_finished(), "the session ended early");
    let before = echoed.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        echoed.load(Ordering::Relaxed) > before,
        "the session is relaying"
    );
    assert!(queries.1 > queries.0);

    // promtool on a scrape taken while the session runs.
    let scrape = http::get(admin, "/metrics").unwrap();
    assert_eq!(scrape.status, 200);
    if let Some((ok, said)) = promtool_check_metrics(&scrape.body).unwrap() {
        assert!(ok && said.is_empty(), "promtool check metrics: {said}");
    }

    stop.store(true, Ordering::Relaxed);
    session.await.unwrap();
    client.close().await.unwrap();
    assert!(peer.received() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_secret_file_keeps_allocations_and_refuses_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("auth-secret");
    std::fs::write(&secret_file, "old-secret-before-rotation\n").unwrap();
    let config = dir.path().join("turnd.toml");
    let toml = operations_toml(
        dir.path(),
        22020..=22039,
        &format!("secret_files = [\"{}\"]\n", secret_file.display()),
    );
    std::fs::write(&config, &toml).unwrap();
    let server = TestServer::turnd_file(&config, Auth::secret()).unwrap();
    let admin = server.admin();
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let old = |user: &str| {
        rest_credential(
            "old-secret-before-rotation",
            user,
            Duration::from_secs(3600),
        )
    };
    let new =
        |user: &str| rest_credential("new-secret-after-rotation", user, Duration::from_secs(3600));

    // An allocation made with the old secret, relaying.
    let (u, p) = old("before");
    let mut before = MiniClient::new(server.addr, &u, &p).await.unwrap();
    before.allocate().await.unwrap().success().unwrap();
    before
        .create_permission(peer.addr)
        .await
        .unwrap()
        .success()
        .unwrap();
    echo(&mut before, peer.addr, "before the reload").await;

    // Rotate: replace the file (write a new one and rename it over, as a Secret update does).
    let tmp = dir.path().join("auth-secret.new");
    std::fs::write(&tmp, "new-secret-after-rotation\n").unwrap();
    std::fs::rename(&tmp, &secret_file).unwrap();
    let reload = http::request(admin, "POST", "/reload", Some(TOKEN)).unwrap();
    assert_eq!(reload.status, 200, "POST /reload: {}", reload.body);

    let (u, p) = old("after-old");
    let mut refused = MiniClient::new(server.addr, &u, &p).await.unwrap();
    let r = refused.allocate().await.unwrap();
    assert_eq!(r.error_code(), Some(401), "the old secret still works");
    let (u, p) = new("after-new");
    let mut accepted = MiniClient::new(server.addr, &u, &p).await.unwrap();
    accepted.allocate().await.unwrap().success().unwrap();
    for i in 0..5 {
        echo(&mut before, peer.addr, &format!("after the reload {i}")).await;
    }

    // A broken file is refused with the location, counted, and the settings stay.
    let failures = || -> f64 {
        let m = http::get(admin, "/metrics").unwrap().body;
        m.lines()
            .find(|l| l.starts_with("turnd_config_reloads_total{result=\"failure\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .expect("turnd_config_reloads_total{result=\"failure\"}")
    };
    let failed_before = failures();
    std::fs::write(
        &config,
        format!("{toml}\n[relay]\nmin_port = \"not a port\"\n"),
    )
    .unwrap();
    let broken = http::request(admin, "POST", "/reload", Some(TOKEN)).unwrap();
    assert_eq!(broken.status, 422, "a broken file: {}", broken.body);
    assert!(
        broken.body.contains("turnd.toml"),
        "the refusal names the file: {}",
        broken.body
    );
    assert_eq!(
        failures(),
        failed_before + 1.0,
        "the failed reload is counted"
    );
    let (u, p) = new("after-broken");
    let mut still = MiniClient::new(server.addr, &u, &p).await.unwrap();
    still.allocate().await.unwrap().success().unwrap();
    let (u, p) = old("after-broken-old");
    let mut still_refused = MiniClient::new(server.addr, &u, &p).await.unwrap();
    assert_eq!(
        still_refused.allocate().await.unwrap().error_code(),
        Some(401)
    );
    echo(&mut before, peer.addr, "after the broken reload").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_needs_the_token_lists_sessions_and_ends_a_users_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let toml = operations_toml(
        dir.path(),
        22040..=22059,
        "users = [{ name = \"alice\", password = \"wonderland\" }, { name = \"bob\", password = \"builder\" }]\n",
    );
    let server = TestServer::turnd(&toml, Auth::alice()).unwrap();
    let admin = server.admin();
    let peer = EchoPeer::start(LOCALHOST).unwrap();

    for token in [None, Some("not-the-admin-token-at-all")] {
        for (method, target) in [("GET", "/sessions"), ("DELETE", "/sessions?user=alice")] {
            let r = http::request(admin, method, target, token).unwrap();
            assert_eq!(
                r.status, 401,
                "{method} {target} with {token:?}: {}",
                r.body
            );
        }
    }

    let mut alice = MiniClient::new(server.addr, "alice", "wonderland")
        .await
        .unwrap();
    let relayed = alice.allocate_relayed().await.unwrap();
    alice
        .create_permission(peer.addr)
        .await
        .unwrap()
        .success()
        .unwrap();
    echo(&mut alice, peer.addr, "listed").await;
    let mut bob = MiniClient::new(server.addr, "bob", "builder")
        .await
        .unwrap();
    bob.allocate().await.unwrap().success().unwrap();

    let listed = http::request(admin, "GET", "/sessions?user=alice", Some(TOKEN)).unwrap();
    assert_eq!(listed.status, 200, "{}", listed.body);
    let v: serde_json::Value = serde_json::from_str(&listed.body).unwrap();
    let sessions = v["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{v}");
    let s = &sessions[0];
    assert_eq!(s["user"], "alice");
    assert_eq!(s["transport"], "udp");
    assert_eq!(s["client"], alice.local_addr().unwrap().to_string());
    assert_eq!(s["relayed"][0], relayed.to_string());
    assert_eq!(s["permissions"], 1);
    assert!(s["bytes_to_peer"].as_u64().unwrap() >= 6, "{s}");
    let all = http::request(admin, "GET", "/sessions", Some(TOKEN)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&all.body).unwrap();
    assert_eq!(v["total"], 2, "{v}");

    let ended = http::request(admin, "DELETE", "/sessions?user=alice", Some(TOKEN)).unwrap();
    assert_eq!(ended.status, 200, "{}", ended.body);
    let v: serde_json::Value = serde_json::from_str(&ended.body).unwrap();
    assert_eq!(v["ended"], 1, "{v}");
    let refresh = alice.refresh(600).await.unwrap();
    assert_eq!(refresh.error_code(), Some(437), "Refresh after DELETE");
    // Bob's allocation is untouched.
    bob.refresh(600).await.unwrap().success().unwrap();
    let left = http::request(admin, "GET", "/sessions", Some(TOKEN)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&left.body).unwrap();
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["sessions"][0]["user"], "bob", "{v}");

    // By id: Bob's allocation ends, and a second DELETE of it finds nothing.
    let id = v["sessions"][0]["id"].as_str().unwrap().to_owned();
    let target = format!("/sessions/{id}");
    let ended = http::request(admin, "DELETE", &target, Some(TOKEN)).unwrap();
    assert_eq!(ended.status, 200, "{}", ended.body);
    assert_eq!(bob.refresh(600).await.unwrap().error_code(), Some(437));
    let again = http::request(admin, "DELETE", &target, Some(TOKEN)).unwrap();
    assert_eq!(again.status, 404, "{}", again.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_drain_without_a_sibling_refuses_new_allocations_with_403_and_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let toml = operations_toml(
        dir.path(),
        22060..=22079,
        "users = [{ name = \"alice\", password = \"wonderland\" }]\n",
    );
    let server = TestServer::turnd(&toml, Auth::alice()).unwrap();
    let admin = server.admin();
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let mut old = MiniClient::new(server.addr, "alice", "wonderland")
        .await
        .unwrap();
    old.allocate().await.unwrap().success().unwrap();
    old.create_permission(peer.addr)
        .await
        .unwrap()
        .success()
        .unwrap();
    assert_eq!(http::get(admin, "/ready").unwrap().status, 200);

    let drain = http::request(admin, "POST", "/drain", Some(TOKEN)).unwrap();
    assert_eq!(drain.status, 202, "{}", drain.body);
    let v: serde_json::Value = serde_json::from_str(&drain.body).unwrap();
    assert_eq!(v["draining"], true, "{v}");
    assert_eq!(http::get(admin, "/ready").unwrap().status, 503);
    let metrics = http::get(admin, "/metrics").unwrap().body;
    assert!(
        metrics.lines().any(|l| l == "turnd_draining 1"),
        "turnd_draining"
    );

    let mut newcomer = MiniClient::new(server.addr, "alice", "wonderland")
        .await
        .unwrap();
    let r = newcomer.allocate().await.unwrap();
    assert_eq!(
        r.error_code(),
        Some(403),
        "a new Allocate while draining, no sibling"
    );
    for i in 0..5 {
        echo(&mut old, peer.addr, &format!("draining {i}")).await;
    }
    old.refresh(600).await.unwrap().success().unwrap();
}
