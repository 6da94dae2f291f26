//! Load generator for turnd benchmarks.
//!
//! A multi-threaded TURN client built on `turn-proto`: each allocation does the long-term
//! credential Allocate, binds a channel to a loopback UDP echo peer, and then exchanges
//! ChannelData through the server and back ([`load`]). The server under test is turnd in this
//! process or coturn's `turnserver` as a child ([`server`]); its cost is read from `/proc`.
//! `cargo bench -p turnd-bench` (benches/relay.rs) runs the scenarios and prints a table.
//!
//! What it leaves out: TCP/TLS client legs, Send indications, IPv6, more than one peer.
//! Everything runs on 127.0.0.1 on the same cores as the server, so absolute packet rates
//! are bounded by the machine; the cost figures (server CPU per packet, RSS per allocation)
//! are the ones to compare.

pub mod bare;
pub mod client;
pub mod load;
pub mod server;

use std::time::Duration;

use anyhow::Context as _;

use crate::client::{Allocation, Credentials};
use crate::load::{Flow, LoadConfig, LoadStats, Mode};
use crate::server::{rss_kib, Server, SECRET};

/// First channel number the bench binds (RFC 8656 range).
const CHANNEL: u16 = 0x4000;

/// One measured scenario.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// Server name.
    pub server: &'static str,
    /// How packets were offered.
    pub mode: Mode,
    /// Allocations used.
    pub allocations: usize,
    /// Client-side measurements.
    pub stats: LoadStats,
    /// Server CPU seconds (user + system) spent during the sending window.
    pub server_cpu: f64,
    /// Server threads whose CPU was counted.
    pub server_threads: usize,
}

impl ScenarioResult {
    /// Datagrams the server relayed per second inside the window: every round trip is two
    /// (client → peer and peer → client).
    #[must_use]
    pub fn relayed_pps(&self) -> f64 {
        2.0 * self.stats.round_trips_per_sec()
    }

    /// Relayed datagrams per server CPU-second.
    #[must_use]
    pub fn packets_per_cpu_second(&self) -> f64 {
        if self.server_cpu <= 0.0 {
            return 0.0;
        }
        2.0 * self.stats.received_in_window as f64 / self.server_cpu
    }

    /// Server CPU microseconds per relayed datagram.
    #[must_use]
    pub fn cpu_us_per_packet(&self) -> f64 {
        let p = self.packets_per_cpu_second();
        if p > 0.0 {
            1e6 / p
        } else {
            0.0
        }
    }
}

/// Opens `n` allocations on `server`, each with a channel bound to `peer`.
///
/// # Errors
/// An allocation failed.
pub fn open_allocations(
    server: &Server,
    peer: std::net::SocketAddr,
    n: usize,
    tag: &str,
) -> anyhow::Result<Vec<Allocation>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let creds = Credentials::rest(SECRET, &format!("{tag}{i}"), Duration::from_secs(3600));
        out.push(
            Allocation::open(server.addr, &creds, peer, CHANNEL)
                .with_context(|| format!("{}: allocation {i}", server.name))?,
        );
    }
    Ok(out)
}

/// Runs one load scenario against `server` with `allocations` fresh allocations to `peer`,
/// and releases them afterwards.
///
/// # Errors
/// Set-up failed.
pub fn run_scenario(
    server: &Server,
    peer: std::net::SocketAddr,
    allocations: usize,
    config: LoadConfig,
) -> anyhow::Result<ScenarioResult> {
    let allocs = open_allocations(server, peer, allocations, "load")?;
    let mut flows = Vec::with_capacity(allocs.len());
    let mut keep = Vec::with_capacity(allocs.len());
    for a in allocs {
        flows.push(Flow {
            socket: a.socket.try_clone()?,
            channel: a.channel,
        });
        keep.push(a);
    }
    let cpu = server.cpu.clone();
    let start_cpu = std::cell::Cell::new(0.0);
    let end_cpu = std::cell::Cell::new(0.0);
    let stats = load::run(
        flows,
        config,
        || start_cpu.set(cpu.cpu_seconds()),
        || end_cpu.set(cpu.cpu_seconds()),
    )?;
    for a in keep {
        let _ = a.socket.set_nonblocking(false);
        a.release();
    }
    Ok(ScenarioResult {
        server: server.name,
        mode: config.mode,
        allocations,
        stats,
        server_cpu: end_cpu.get() - start_cpu.get(),
        server_threads: server.cpu.threads(),
    })
}

/// Runs one load scenario through the bare forwarder ([`bare::BareForwarder`]) with
/// `workers` workers: the same packets, no protocol. Flow `i` uses channel 0x4000 + i.
///
/// # Errors
/// Set-up failed.
pub fn run_bare_scenario(
    workers: usize,
    peer: std::net::SocketAddr,
    allocations: usize,
    config: LoadConfig,
) -> anyhow::Result<ScenarioResult> {
    let fwd = bare::BareForwarder::start(workers, peer)?;
    let mut flows = Vec::with_capacity(allocations);
    for i in 0..allocations {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(fwd.addr)?;
        let n = u16::try_from(i).ok().and_then(|i| i.checked_add(CHANNEL));
        let channel = n
            .and_then(|n| turn_proto::codec::ChannelNumber::new(n).ok())
            .context("too many flows for the bare forwarder")?;
        flows.push(Flow { socket, channel });
    }
    let cpu = server::CpuSource::Threads("bare-fwd-".to_owned());
    let start_cpu = std::cell::Cell::new(0.0);
    let end_cpu = std::cell::Cell::new(0.0);
    let stats = load::run(
        flows,
        config,
        || start_cpu.set(cpu.cpu_seconds()),
        || end_cpu.set(cpu.cpu_seconds()),
    )?;
    let threads = cpu.threads();
    fwd.stop();
    Ok(ScenarioResult {
        server: "bare fwd",
        mode: config.mode,
        allocations,
        stats,
        server_cpu: end_cpu.get() - start_cpu.get(),
        server_threads: threads,
    })
}

/// Memory cost of idle allocations.
#[derive(Debug, Clone, Copy)]
pub struct MemoryResult {
    /// Server name.
    pub server: &'static str,
    /// Idle allocations opened.
    pub allocations: usize,
    /// Server RSS before, KiB.
    pub rss_before_kib: u64,
    /// Server RSS after, KiB.
    pub rss_after_kib: u64,
}

impl MemoryResult {
    /// RSS growth per allocation, bytes.
    #[must_use]
    pub fn bytes_per_allocation(&self) -> f64 {
        (self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 * 1024.0)
            / self.allocations.max(1) as f64
    }
}

/// Opens `n` idle allocations (each with one channel) and reports the server's RSS growth.
/// A few allocations are opened first so one-time costs (buffers touched on first use,
/// tables' first growth) do not count. The allocations are not released: run this last and
/// stop the server afterwards.
///
/// For turnd in-process the RSS is this process's, client included: the client keeps only
/// its sockets (file descriptors, no user memory) while the figure is taken.
///
/// # Errors
/// An allocation failed.
pub fn idle_memory(
    server: &Server,
    peer: std::net::SocketAddr,
    n: usize,
) -> anyhow::Result<MemoryResult> {
    let warm = open_allocations(server, peer, 32, "warm")?;
    let mut sockets = Vec::with_capacity(n);
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(server.pid());
    for i in 0..n {
        let creds = Credentials::rest(SECRET, &format!("idle{i}"), Duration::from_secs(3600));
        let a = Allocation::open(server.addr, &creds, peer, CHANNEL)
            .with_context(|| format!("{}: idle allocation {i}", server.name))?;
        sockets.push(a.into_socket());
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = rss_kib(server.pid());
    drop(sockets);
    drop(warm);
    Ok(MemoryResult {
        server: server.name,
        allocations: n,
        rss_before_kib: before,
        rss_after_kib: after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::EchoPeer;

    #[test]
    fn half_second_saturated_run_through_turnd_relays_without_loss() {
        let server = Server::turnd(2, 40000, 44999).expect("turnd starts");
        let echo = EchoPeer::start(1).expect("echo peer");
        let r = run_scenario(
            &server,
            echo.addr,
            4,
            LoadConfig {
                mode: Mode::Saturated { window: 2 },
                duration: Duration::from_millis(500),
                payload: 100,
                threads: 2,
            },
        )
        .expect("scenario runs");
        echo.stop();
        server.stop();
        assert!(r.stats.received_in_window > 100, "{:?}", r.stats.received);
        assert_eq!(
            r.stats.lost(),
            0,
            "sent {} received {}",
            r.stats.sent,
            r.stats.received
        );
        assert!(
            r.server_threads == 2,
            "worker threads found: {}",
            r.server_threads
        );
    }

    #[test]
    fn bare_forwarder_echoes_every_packet() {
        let echo = EchoPeer::start(1).expect("echo peer");
        let r = run_bare_scenario(
            1,
            echo.addr,
            4,
            LoadConfig {
                mode: Mode::Saturated { window: 2 },
                duration: Duration::from_millis(300),
                payload: 100,
                threads: 1,
            },
        )
        .expect("scenario runs");
        echo.stop();
        assert!(r.stats.received_in_window > 100, "{}", r.stats.received);
        assert_eq!(r.stats.lost(), 0);
    }
}
