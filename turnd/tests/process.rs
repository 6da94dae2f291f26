//! The `turnd` binary as an operator runs it, driven through its real signal paths
//! (issues 11 and 12):
//!
//! - SIGTERM drains: `/ready` turns 503, a relaying client keeps relaying, a new Allocate gets
//!   300 with the configured sibling in ALTERNATE-SERVER, and the process exits 0 once the
//!   client's allocation ends — or at `[drain] timeout` when it does not;
//! - SIGHUP without TLS is survived (it reloads) and the server keeps serving;
//! - a second turnd on a port the first holds is refused (non-zero exit, the address named)
//!   while the first still serves;
//! - a low soft open-file limit is raised to the hard limit at start.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::process::{binding_answered, log_and_server, Turnd};
use common::*;
use tokio::net::TcpStream;
use turn_proto::codec::*;

/// The sibling new allocations are sent to while draining.
const SIBLING: &str = "127.0.0.1:3479";

fn base_toml(first_port: u16, drain_timeout: &str, workers: usize) -> String {
    format!(
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = [\"127.0.0.1:0\"]\ntls = []\n\
         [auth]\nrealm = \"test\"\nusers = [{{ name = \"u\", password = \"p\" }}]\n\
         [relay]\naddresses = [\"127.0.0.1\"]\nmin_port = {first_port}\nmax_port = {}\n\
         [peers]\nallow = [\"127.0.0.0/8\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [drain]\ntimeout = \"{drain_timeout}\"\nalternate_servers = [\"{SIBLING}\"]\n{}",
        first_port + 49,
        log_and_server(workers)
    )
}

/// A TCP client with an allocation and channel 0x4001 bound to `peer`, relaying.
async fn relaying_client(server: SocketAddr, peer: SocketAddr) -> StreamClient<TcpStream> {
    let mut c = StreamClient::new(TcpStream::connect(server).await.unwrap(), "u", "p");
    c.allocate().await;
    c.bind_channel(0x4001, peer).await;
    assert_eq!(c.channel_echo(0x4001, b"before").await, b"before");
    c
}

/// Polls `/ready` until it answers `want`.
fn wait_ready_status(t: &Turnd, want: u16) -> u16 {
    let mut last = 0;
    for _ in 0..100 {
        last = t.admin_get("/ready").0;
        if last == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_redirects_new_allocations_and_exits_0_when_the_last_one_ends() {
    let mut t = Turnd::start(&base_toml(23000, "60s", 2));
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    assert_eq!(wait_ready_status(&t, 200), 200, "{}", t.log());
    let mut c = relaying_client(t.tcp[0], peer.addr).await;

    t.signal("TERM");
    assert_eq!(wait_ready_status(&t, 503), 503, "/ready while draining");
    assert_eq!(t.admin_get("/live").0, 200, "/live while draining");
    for i in 0..20 {
        let d = format!("during the drain {i}");
        assert_eq!(c.channel_echo(0x4001, d.as_bytes()).await, d.as_bytes());
    }

    // A new Allocate is sent to the sibling: 300 with ALTERNATE-SERVER (RFC 8489 §10).
    let mut newcomer = StreamClient::new(TcpStream::connect(t.tcp[0]).await.unwrap(), "u", "p");
    let reply = newcomer
        .request(Method::ALLOCATE, &|b| {
            b.add(&RequestedTransport::UDP);
        })
        .await;
    let m = Message::decode(&reply).unwrap();
    assert_eq!(m.typ().class, Class::Error);
    let code = m.get::<ErrorCodeAttr<'_>>().unwrap().map(|e| e.code.0);
    assert_eq!(code, Some(300), "a new Allocate while draining");
    let alternate = m.get::<AlternateServer>().unwrap().map(|a| a.0);
    assert_eq!(alternate, Some(SIBLING.parse().unwrap()));
    assert!(t.running(), "exited with an allocation open:\n{}", t.log());

    // A Refresh is granted, capped to the drain's time left (60 s).
    let refreshed = c
        .request(Method::REFRESH, &|b| {
            b.add(&Lifetime(3600));
        })
        .await;
    assert_success(&refreshed);
    let granted = Message::decode(&refreshed)
        .unwrap()
        .get::<Lifetime>()
        .unwrap()
        .map(|l| l.0);
    assert!(
        granted.is_some_and(|l| l > 0 && l <= 60),
        "Refresh while draining granted {granted:?}"
    );

    // The client ends its allocation: the process exits 0.
    let bye = c
        .request(Method::REFRESH, &|b| {
            b.add(&Lifetime(0));
        })
        .await;
    assert_success(&bye);
    let status = t.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?} after the last allocation ended:\n{}",
        t.log()
    );
    assert!(t.log().contains("drained"), "{}", t.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_an_allocation_left_exits_0_at_the_drain_timeout() {
    let mut t = Turnd::start(&base_toml(23050, "2s", 2));
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let mut c = relaying_client(t.tcp[0], peer.addr).await;
    t.signal("TERM");
    assert_eq!(wait_ready_status(&t, 503), 503);
    assert_eq!(c.channel_echo(0x4001, b"draining").await, b"draining");
    let status = t.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?}:\n{}",
        t.log()
    );
    let log = t.log();
    assert!(
        log.contains("drain timeout"),
        "the exit was the deadline's, with the allocation still open:\n{log}"
    );
    assert!(
        log.contains("allocations open") || log.contains("still open"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_tls_reloads_and_keeps_serving() {
    let mut t = Turnd::start(&base_toml(23100, "60s", 2));
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let mut c = relaying_client(t.tcp[0], peer.addr).await;
    for round in 1..=2 {
        t.signal("HUP");
        let reloads = || {
            t.log()
                .lines()
                .filter(|l| l.contains("reloading the configuration"))
                .count()
        };
        for _ in 0..100 {
            if reloads() >= round {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(reloads(), round, "SIGHUP {round} not handled:\n{}", t.log());
        assert!(t.running(), "SIGHUP {round} killed turnd:\n{}", t.log());
        assert!(binding_answered(t.udp[0]), "UDP after SIGHUP {round}");
        let d = format!("after SIGHUP {round}");
        assert_eq!(c.channel_echo(0x4001, d.as_bytes()).await, d.as_bytes());
        assert_eq!(t.admin_get("/ready").0, 200);
    }
}

#[test]
fn a_second_turnd_on_a_held_port_is_refused_and_the_first_keeps_serving() {
    let first = Turnd::start(&base_toml(23150, "60s", 2));
    let (udp, tcp) = (first.udp[0], first.tcp[0]);
    // The UDP port, then the TCP port, each held by the first process.
    for (listen, held) in [
        (format!("udp = [\"{udp}\"]\ntcp = []"), udp),
        (format!("udp = []\ntcp = [\"{tcp}\"]"), tcp),
    ] {
        let toml = base_toml(23200, "60s", 2)
            .replace("udp = [\"127.0.0.1:0\"]\ntcp = [\"127.0.0.1:0\"]", &listen);
        assert!(toml.contains(&held.to_string()));
        let mut second = Turnd::spawn(&toml, &[]);
        let status = second.wait_exit(Duration::from_secs(20));
        assert!(
            status.is_some_and(|s| !s.success()),
            "a second turnd on {held}: {status:?}\n{}",
            second.log()
        );
        let log = second.log();
        assert!(
            log.contains(&held.to_string()),
            "the refusal names {held}:\n{log}"
        );
        assert!(binding_answered(udp), "the first turnd stopped answering");
    }
}

/// `Max open files` soft and hard limits of `pid`.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

#[test]
fn a_low_soft_open_file_limit_is_raised_to_the_hard_limit_at_start() {
    let prlimit = ["/usr/bin/prlimit", "/bin/prlimit"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(prlimit) = prlimit else {
        assert!(
            std::env::var("TURND_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "prlimit is missing (apt-get install -y util-linux)"
        );
        eprintln!("SKIPPED: prlimit is missing (apt-get install -y util-linux)");
        return;
    };
    let mut t = Turnd::spawn(&base_toml(23250, "60s", 2), &[prlimit, "--nofile=256:4096"]);
    t.wait_started();
    assert_eq!(nofile(t.pid()), (4096, 4096), "{}", t.log());
    let raised = t
        .wait_for_log(Duration::from_secs(5), |l| {
            l.contains("raised the open-file limit")
        })
        .unwrap_or_else(|| panic!("the raise is not logged:\n{}", t.log()));
    assert!(
        raised.contains("256") && raised.contains("4096"),
        "{raised}"
    );
    assert!(binding_answered(t.udp[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_at_once() {
    let mut t = Turnd::start(&base_toml(23300, "120s", 2));
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let _c = relaying_client(t.tcp[0], peer.addr).await;
    t.signal("TERM");
    assert_eq!(wait_ready_status(&t, 503), 503);
    assert!(t.running());
    t.signal("TERM");
    let status = t.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?} after the second SIGTERM:\n{}",
        t.log()
    );
    assert!(t.log().contains("second SIGTERM"), "{}", t.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_config_file_is_reloaded_without_a_signal() {
    let mut t = Turnd::start(&base_toml(23350, "60s", 2));
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let mut c = relaying_client(t.tcp[0], peer.addr).await;
    // A new user appears in the file (written to a temporary name and renamed over, as an
    // editor or a ConfigMap update does).
    let text = std::fs::read_to_string(&t.config).unwrap().replace(
        "users = [{ name = \"u\", password = \"p\" }]",
        "users = [{ name = \"u\", password = \"p\" }, { name = \"v\", password = \"q\" }]",
    );
    assert!(text.contains("\"v\""));
    let tmp = t.path("turnd.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &t.config).unwrap();
    let reloaded = t.wait_for_log(Duration::from_secs(20), |l| {
        l.contains("reloading the configuration") && l.contains("file changed")
    });
    assert!(
        reloaded.is_some(),
        "no reload on the file change:\n{}",
        t.log()
    );
    // The reload is applied before the log says so; give the workers their command.
    let mut v = None;
    for _ in 0..50 {
        let mut candidate =
            StreamClient::new(TcpStream::connect(t.tcp[0]).await.unwrap(), "v", "q");
        let r = candidate
            .request(Method::ALLOCATE, &|b| {
                b.add(&RequestedTransport::UDP);
            })
            .await;
        let m = Message::decode(&r).unwrap();
        if m.typ().class == Class::Success {
            v = Some(candidate);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(v.is_some(), "the new user is not accepted:\n{}", t.log());
    assert_eq!(c.channel_echo(0x4001, b"kept").await, b"kept");
    assert!(t.running());
}

/// The value of an unlabelled sample in a Prometheus exposition.
fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_an_allocate_gets_508_and_is_counted() {
    let Some(prlimit) = ["/usr/bin/prlimit", "/bin/prlimit"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        eprintln!("SKIPPED: prlimit is missing (apt-get install -y util-linux)");
        return;
    };
    // A hard limit of 64: the raise at start cannot go above it.
    let mut t = Turnd::spawn(&base_toml(23450, "60s", 1), &[prlimit, "--nofile=64:64"]);
    t.wait_started();
    assert_eq!(nofile(t.pid()), (64, 64));
    let mut held = Vec::new();
    let mut refused = None;
    for i in 0..49 {
        let mut c = StreamClient::new(UdpStream::connect(t.udp[0]).await, "u", "p");
        let r = tokio::time::timeout(
            Duration::from_secs(4),
            c.request(Method::ALLOCATE, &|b| {
                b.add(&RequestedTransport::UDP);
            }),
        )
        .await;
        let Ok(r) = r else {
            let log = t.log();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            panic!(
                "Allocate {i} unanswered (running: {}):\n{tail:#?}",
                t.running()
            );
        };
        let m = Message::decode(&r).unwrap();
        match m.get::<ErrorCodeAttr<'_>>().unwrap().map(|e| e.code.0) {
            None => held.push(c),
            Some(code) => {
                refused = Some(code);
                break;
            }
        }
    }
    assert!(!held.is_empty(), "no allocation at all:\n{}", t.log());
    assert_eq!(
        refused,
        Some(508),
        "{} allocations, then {refused:?} (the relay range holds 50)",
        held.len()
    );
    eprintln!("{} allocations, then 508", held.len());
    assert!(t.running(), "out of descriptors, turnd died:\n{}", t.log());
    // Give two descriptors back, then read the count over the admin listener.
    for (i, mut c) in held.drain(..2).enumerate() {
        let r = tokio::time::timeout(
            Duration::from_secs(4),
            c.request(Method::REFRESH, &|b| {
                b.add(&Lifetime(0));
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("Refresh {i} unanswered:\n{}", t.log()));
        assert_success(&r);
    }
    let mut counted = None;
    // Workers publish their counters on a timer: a loaded machine may take a while.
    for _ in 0..300 {
        let (status, body) = t.admin_get("/metrics");
        counted = sample(&body, "turnd_descriptor_exhaustion_total").filter(|_| status == 200);
        if counted.is_some_and(|v| v >= 1.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        counted.is_some_and(|v| v >= 1.0),
        "turnd_descriptor_exhaustion_total {counted:?}:\n{}",
        t.log()
            .lines()
            .rev()
            .take(12)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The allocations it holds still relay (a payload of 4n bytes: ChannelData over UDP
    // is not padded, and the stream client reads padded frames).
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let c = &mut held[0];
    c.bind_channel(0x4001, peer.addr).await;
    assert_eq!(c.channel_echo(0x4001, b"relaying").await, b"relaying");
}

/// A REST API credential (`expiry:user`, HMAC-SHA1 password) under `secret`, valid an hour.
fn rest(secret: &str, user: &str) -> (String, String) {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let name = format!("{expiry}:{user}");
    let pass = turn_proto::auth::rest_api_password(secret.as_bytes(), &name);
    (name, pass)
}

/// Whether an Allocate over a new TCP connection with `cred` succeeds.
async fn allocates(server: SocketAddr, cred: &(String, String)) -> bool {
    let mut c = StreamClient::new(TcpStream::connect(server).await.unwrap(), &cred.0, &cred.1);
    let r = c
        .request(Method::ALLOCATE, &|b| {
            b.add(&RequestedTransport::UDP);
        })
        .await;
    Message::decode(&r).unwrap().typ().class == Class::Success
}

/// Rotating the REST API secret the way Kubernetes updates a mounted Secret (a new
/// `..<timestamp>` directory, then the `..data` symlink swapped over it) reaches the running
/// server without a signal or a restart: the new secret's credentials are accepted, the old
/// one's refused, and an allocation made before keeps relaying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_file_reaches_the_running_server_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("auth");
    std::fs::create_dir(&vol).unwrap();
    let publish = |stamp: &str, secret: &str| {
        let data = vol.join(stamp);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("secret"), format!("{secret}\n")).unwrap();
        let tmp = vol.join("..data_tmp");
        std::os::unix::fs::symlink(stamp, &tmp).unwrap();
        std::fs::rename(&tmp, vol.join("..data")).unwrap();
    };
    publish("..2026_11_29_a", "old-secret-0123456789");
    std::os::unix::fs::symlink("..data/secret", vol.join("secret")).unwrap();
    let toml = base_toml(23500, "60s", 2).replace(
        "users = [{ name = \"u\", password = \"p\" }]",
        &format!(
            "users = [{{ name = \"u\", password = \"p\" }}]\nsecret_files = [\"{}\"]",
            vol.join("secret").display()
        ),
    );
    let mut t = Turnd::start(&toml);
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let mut c = relaying_client(t.tcp[0], peer.addr).await;
    let old = rest("old-secret-0123456789", "alice");
    let new = rest("new-secret-9876543210", "alice");
    assert!(allocates(t.tcp[0], &old).await, "the first secret works");
    assert!(
        !allocates(t.tcp[0], &new).await,
        "the second is not known yet"
    );

    publish("..2026_11_29_b", "new-secret-9876543210");
    let reloaded = t.wait_for_log(Duration::from_secs(20), |l| {
        l.contains("reloading the configuration") && l.contains("file changed")
    });
    assert!(
        reloaded.is_some(),
        "no reload on the Secret update:\n{}",
        t.log()
    );
    let mut accepted = false;
    for _ in 0..50 {
        if allocates(t.tcp[0], &new).await {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "the rotated secret is not accepted:\n{}", t.log());
    assert!(
        !allocates(t.tcp[0], &old).await,
        "the old secret is refused"
    );
    assert_eq!(c.channel_echo(0x4001, b"kept").await, b"kept");
    assert!(t.running());
}
