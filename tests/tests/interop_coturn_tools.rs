//! Interop: coturn's client tools against the server under test
//! (`TURND_TEST_SERVER=coturn` runs the same tests against coturn's `turnserver`).
//!
//! - `turnutils_uclient` relays a few thousand messages with zero loss: with a static user
//!   (`-u/-w`), with a REST-API secret (`-W`), and with Send indications (`-s`);
//! - `turnutils_stunclient` reports the right XOR-MAPPED-ADDRESS, cross-checked with our
//!   own Binding request.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use turnd_tests::client::MiniClient;
use turnd_tests::peer::EchoPeer;
use turnd_tests::server::{Auth, Kind, Options, TestServer, LOCALHOST};
use turnd_tests::tools::{find_tool, run_with_timeout, UclientSummary};

/// Clients per uclient run, and messages per client.
const CLIENTS: u64 = 4;
const MESSAGES: u64 = 750;

#[test]
fn uclient_summary_parses() {
    let out = "7: : start_mclient: tot_send_msgs=4000, tot_recv_msgs=3998\n\
               7: : start_mclient: tot_send_bytes ~ 400000, tot_recv_bytes ~ 400000\n\
               7: : Total lost packets 2 (0.050000%), total send dropped 0 (0.000000%)\n";
    assert_eq!(
        UclientSummary::parse(out),
        Some(UclientSummary {
            sent: 4000,
            received: 3998,
            lost: 2
        })
    );
    assert_eq!(UclientSummary::parse("Total lost packets 0"), None);
}

/// Runs uclient against a fresh server and asserts it relayed everything.
fn uclient_relays_without_loss(auth: Auth, first_port: u16, extra: &[&str]) {
    let Some(uclient) = find_tool("turnutils_uclient") else {
        return;
    };
    let opts = Options {
        auth,
        relay_ports: first_port..=first_port + 99,
    };
    let Some(server) = TestServer::start(Kind::from_env(), &opts).unwrap() else {
        return;
    };
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let mut cmd = Command::new(uclient);
    cmd.args(["-p", &server.addr.port().to_string()])
        .args(["-e", "127.0.0.1", "-r", &peer.addr.port().to_string()])
        .args(["-m", &CLIENTS.to_string(), "-n", &MESSAGES.to_string()])
        .args(["-l", "120", "-z", "2", "-c", "-X"])
        .args(extra);
    match &server.auth {
        Auth::Static { user, password } => cmd.args(["-u", user, "-w", password]),
        Auth::Secret(secret) => cmd.args(["-u", "uclient", "-W", secret]),
    };
    cmd.arg("127.0.0.1");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(45)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("{stdout}{stderr}");
    let tail: Vec<&str> = all.lines().rev().take(12).collect();
    assert!(
        out.status.success(),
        "uclient failed: {}\n{tail:#?}\n{}",
        out.status,
        server.log()
    );
    let summary = UclientSummary::parse(&all)
        .unwrap_or_else(|| panic!("no summary in uclient output:\n{tail:#?}\n{}", server.log()));
    let expected = CLIENTS * MESSAGES;
    assert_eq!(summary, UclientSummary::lossless(expected), "{tail:#?}");
    assert!(
        all.contains("Total lost packets 0 "),
        "no `Total lost packets 0` line:\n{tail:#?}"
    );
    assert!(
        peer.received() >= expected,
        "the echo peer saw {} of {expected}",
        peer.received()
    );
    assert!(
        peer.sources()
            .iter()
            .all(|s| s.ip() == LOCALHOST && opts.relay_ports.contains(&s.port())),
        "peer saw sources outside the relay range: {:?}",
        peer.sources()
    );
}

#[test]
fn uclient_relays_channel_data_without_loss_with_a_static_user() {
    uclient_relays_without_loss(Auth::alice(), 20100, &[]);
}

#[test]
fn uclient_relays_channel_data_without_loss_with_a_rest_api_secret() {
    uclient_relays_without_loss(Auth::secret(), 20200, &[]);
}

#[test]
fn uclient_relays_send_indications_without_loss() {
    uclient_relays_without_loss(Auth::alice(), 20300, &["-s"]);
}

/// The `IP:port` after `UDP reflexive addr: ` in stunclient's output.
fn reflexive(out: &str) -> Option<SocketAddr> {
    let key = "UDP reflexive addr: ";
    let line = out.lines().find(|l| l.contains(key))?;
    line[line.find(key)? + key.len()..].trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stunclient_gets_the_xor_mapped_address() {
    let Some(stunclient) = find_tool("turnutils_stunclient") else {
        return;
    };
    let opts = Options {
        auth: Auth::alice(),
        relay_ports: 20400..=20409,
    };
    let Some(server) = TestServer::start(Kind::from_env(), &opts).unwrap() else {
        return;
    };
    let port = server.addr.port().to_string();
    // From the default source address, and from a second loopback address: the reported
    // address must be the one the datagram came from, not the server's or a constant.
    for local in [None, Some(Ipv4Addr::new(127, 0, 0, 5))] {
        let mut cmd = Command::new(&stunclient);
        cmd.args(["-p", &port]);
        if let Some(l) = local {
            cmd.args(["-L", &l.to_string()]);
        }
        cmd.arg("127.0.0.1");
        let out = run_with_timeout(&mut cmd, Duration::from_secs(10)).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "stunclient failed: {text}");
        let mapped = reflexive(&text).unwrap_or_else(|| panic!("no reflexive address: {text}"));
        let want = IpAddr::V4(local.unwrap_or(Ipv4Addr::LOCALHOST));
        assert_eq!(mapped.ip(), want, "{text}");
        assert_ne!(mapped.port(), 0, "{text}");
        assert_ne!(mapped.port(), server.addr.port(), "{text}");
    }

    // Cross-check with our own Binding request from a known socket.
    for ip in [[127, 0, 0, 1], [127, 0, 0, 5]] {
        let local = SocketAddr::from((ip, 0));
        let mut c = MiniClient::bind(local, server.addr, "", "").await.unwrap();
        let mapped = c.binding().await.unwrap();
        assert_eq!(mapped, c.local_addr().unwrap());
    }
}
