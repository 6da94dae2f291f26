//! Load generator for turnd benchmarks.
//!
//! A multi-threaded TURN client built on `turn-proto`: each allocation does the long-term
//! credential Allocate (401 challenge, authenticated Allocate), CreatePermission and
//! ChannelBind to a loopback UDP echo peer ([`client`]) over UDP, TCP or TLS ([`link`]), and
//! then exchanges ChannelData through the server and back ([`load`]). The server under test
//! is turnd in this process or coturn's `turnserver` as a child ([`server`]); its CPU is read
//! from `/proc`, its system calls from `perf stat` ([`syscalls`]). The same load also runs
//! through a protocol-less batched forwarder ([`bare`]), the floor on this kernel.
//! `cargo bench -p turnd-bench` (benches/relay.rs) runs the scenarios and prints tables.
//!
//! What it leaves out: Send indications, IPv6, more than one peer, TCP relays (RFC 6062).
//! Everything runs on loopback on the same cores as the server, so absolute packet rates are
//! bounded by the machine; the cost figures (server CPU per packet or per allocation, RSS per
//! allocation, system calls per packet) measured in one run are the ones to compare.

pub mod bare;
pub mod client;
pub mod link;
pub mod load;
pub mod server;
pub mod syscalls;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;

use crate::link::Transport;
use crate::load::{LoadConfig, LoadStats, Mode, SetupStats, Target};
use crate::server::{rss_kib, udp_rcvbuf_errors, CpuSource, DropsByRole, Server};
use crate::syscalls::{Attach, Probe, SyscallCounts};

/// One scenario: how many allocations, over what, offered how.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Short name ("saturated", "paced", "audio", "video", …).
    pub name: &'static str,
    /// The client legs' transport.
    pub transport: Transport,
    /// Allocations (flows).
    pub allocations: usize,
    /// The load.
    pub config: LoadConfig,
}

/// One measured scenario.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// Server row label.
    pub server: String,
    /// What ran.
    pub scenario: Scenario,
    /// Client-side measurements.
    pub stats: LoadStats,
    /// Server CPU seconds (user + system) spent during the sending window.
    pub server_cpu: f64,
    /// Server threads whose CPU was counted.
    pub server_threads: usize,
    /// System calls of the server during the window, when probed.
    pub syscalls: Option<SyscallCounts>,
    /// CPU seconds of the bench's own threads (clients, echo peer) over the window: the
    /// load generator shares the cores with the server.
    pub client_cpu: f64,
    /// UDP datagrams the kernel dropped for full receive buffers from the window's start to
    /// the end of the drain, machine-wide (`/proc/net/snmp`: other processes' too).
    pub rcvbuf_drops: u64,
    /// Drops in the window at this bench's and the server's own sockets, by role (sockets
    /// alive at both ends of the window).
    pub drops_by_role: DropsByRole,
}

impl ScenarioResult {
    /// Datagrams the server relayed per second inside the window: every round trip is two
    /// (client → peer and peer → client).
    #[must_use]
    pub fn relayed_pps(&self) -> f64 {
        2.0 * self.stats.round_trips_per_sec()
    }

    /// Relayed datagrams inside the window.
    #[must_use]
    pub fn relayed(&self) -> u64 {
        2 * self.stats.received_in_window
    }

    /// Relayed datagrams per server CPU-second.
    #[must_use]
    pub fn packets_per_cpu_second(&self) -> f64 {
        if self.server_cpu <= 0.0 {
            return 0.0;
        }
        self.relayed() as f64 / self.server_cpu
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

    /// System calls per relayed datagram (all of them, or those named).
    #[must_use]
    pub fn syscalls_per_packet(&self, calls: Option<&[&str]>) -> Option<f64> {
        let s = self.syscalls.as_ref()?;
        let n = calls.map_or_else(|| s.total(), |c| s.sum(c));
        Some(n as f64 / self.relayed().max(1) as f64)
    }
}

/// What is measured, and how its cost is read.
#[derive(Debug, Clone)]
pub struct Subject {
    /// Row label.
    pub name: String,
    /// Where the load goes.
    pub target: Target,
    /// Where the server's CPU is read.
    pub cpu: CpuSource,
    /// What `perf stat` attaches to.
    pub attach: Attach,
    /// The echo peer's port (for telling its drops apart).
    pub echo_port: u16,
}

impl Subject {
    /// `server` over `transport`, echoing through `peer`.
    #[must_use]
    pub fn server(server: &Server, transport: Transport, peer: SocketAddr) -> Self {
        let attach = match (&server.cpu, server.pid()) {
            (_, Some(pid)) => Attach::Process(pid),
            (cpu, None) => Attach::Threads(cpu.tids()),
        };
        Self {
            name: server.name.clone(),
            target: Target::Turn {
                endpoint: server.endpoint.clone(),
                transport,
                peer,
            },
            cpu: server.cpu.clone(),
            attach,
            echo_port: peer.port(),
        }
    }
}

/// Runs `scenario` against `subject`. With `probe`, counts the server's system calls over
/// the window with `perf stat` (use a separate run for the CPU figures).
///
/// # Errors
/// Set-up failed, or perf failed when asked for.
pub fn measure(
    subject: &Subject,
    scenario: &Scenario,
    probe: bool,
) -> anyhow::Result<ScenarioResult> {
    let probe = if probe {
        Some(RefCell::new(Probe::start(&subject.attach)?))
    } else {
        None
    };
    let start_cpu = Cell::new(0.0);
    let end_cpu = Cell::new(0.0);
    let client = CpuSource::Threads("bench-".to_owned());
    let client_cpu = Cell::new(0.0);
    let drops = Cell::new(0);
    let (listener_port, echo_port) = match &subject.target {
        Target::Bare(addr) => (addr.port(), subject.echo_port),
        Target::Turn { endpoint, peer, .. } => (endpoint.udp.port(), peer.port()),
    };
    let child = match subject.attach {
        Attach::Process(pid) => Some(pid),
        Attach::Threads(_) => None,
    };
    let roles = Cell::new(DropsByRole::default());
    let roles_after = Cell::new(DropsByRole::default());
    let probe_error = RefCell::new(None);
    let stats = load::run(
        &subject.target,
        scenario.allocations,
        scenario.config,
        || {
            if let Some(p) = &probe {
                if let Err(e) = p.borrow_mut().enable() {
                    probe_error.borrow_mut().get_or_insert(e);
                }
            }
            start_cpu.set(subject.cpu.cpu_seconds());
            client_cpu.set(client.cpu_seconds());
            drops.set(udp_rcvbuf_errors());
            roles.set(DropsByRole::read(listener_port, echo_port, child));
        },
        || {
            end_cpu.set(subject.cpu.cpu_seconds());
            roles_after.set(DropsByRole::read(listener_port, echo_port, child));
            client_cpu.set(client.cpu_seconds() - client_cpu.get());
            if let Some(p) = &probe {
                if let Err(e) = p.borrow_mut().disable() {
                    probe_error.borrow_mut().get_or_insert(e);
                }
            }
        },
    )?;
    if let Some(e) = probe_error.into_inner() {
        return Err(e);
    }
    let syscalls = match probe {
        Some(p) => Some(p.into_inner().finish()?),
        None => None,
    };
    Ok(ScenarioResult {
        server: subject.name.clone(),
        scenario: *scenario,
        stats,
        server_cpu: end_cpu.get() - start_cpu.get(),
        server_threads: subject.cpu.threads(),
        syscalls,
        client_cpu: client_cpu.get(),
        rcvbuf_drops: udp_rcvbuf_errors().saturating_sub(drops.get()),
        drops_by_role: roles_after.get().since(&roles.get()),
    })
}

/// Runs `scenario` through a fresh bare forwarder ([`bare::BareForwarder`]) with `workers`
/// workers: the same packets, no protocol (UDP only).
///
/// # Errors
/// Set-up failed.
pub fn measure_bare(
    workers: usize,
    peer: SocketAddr,
    scenario: &Scenario,
    probe: bool,
) -> anyhow::Result<ScenarioResult> {
    let fwd = bare::BareForwarder::start(workers, peer)?;
    let cpu = CpuSource::Threads("bare-fwd-".to_owned());
    // A new thread names itself once it runs: wait (bounded) until all are visible.
    let named = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while cpu.threads() < 2 * workers.max(1) && std::time::Instant::now() < named {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let subject = Subject {
        name: "bare fwd".to_owned(),
        target: Target::Bare(fwd.addr),
        attach: Attach::Threads(cpu.tids()),
        cpu,
        echo_port: peer.port(),
    };
    let r = measure(&subject, scenario, probe);
    fwd.stop();
    r
}

/// Allocation set-up cost and the memory of the allocations it leaves behind.
#[derive(Debug, Clone)]
pub struct SetupResult {
    /// Server row label.
    pub server: String,
    /// Client-side measurements.
    pub stats: SetupStats,
    /// Server CPU seconds over the set-up.
    pub server_cpu: f64,
    /// Server RSS before (after a warm-up of [`load::SETUP_IN_FLIGHT`] allocations), KiB.
    pub rss_before_kib: u64,
    /// Server RSS with the allocations held, KiB.
    pub rss_after_kib: u64,
}

impl SetupResult {
    /// Server CPU microseconds per completed allocation.
    #[must_use]
    pub fn cpu_us_per_allocation(&self) -> f64 {
        1e6 * self.server_cpu / self.stats.opened.max(1) as f64
    }

    /// RSS growth per held allocation, bytes.
    #[must_use]
    pub fn bytes_per_allocation(&self) -> f64 {
        (self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 * 1024.0)
            / self.stats.opened.max(1) as f64
    }
}

/// Opens `total` UDP allocations on `server` ([`load::setup_run`]: 401 challenge, Allocate,
/// CreatePermission, ChannelBind; [`load::SETUP_IN_FLIGHT`] in flight) and keeps them: the
/// server CPU per allocation, allocations per second, and the RSS they hold. Warm-up
/// allocations are made first so one-time costs do not count. The allocations are not
/// released: run this last and stop the server afterwards.
///
/// For turnd in-process the RSS is this process's; the client keeps nothing per allocation
/// once it is made (its socket is closed).
///
/// # Errors
/// A client thread could not start.
pub fn setup_and_memory(
    server: &Server,
    peer: SocketAddr,
    total: usize,
    threads: usize,
) -> anyhow::Result<SetupResult> {
    load::setup_run(
        &server.endpoint,
        peer,
        load::SETUP_IN_FLIGHT,
        threads,
        || {},
        || {},
    )?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = rss_kib(server.pid());
    let start_cpu = Cell::new(0.0);
    let end_cpu = Cell::new(0.0);
    let stats = load::setup_run(
        &server.endpoint,
        peer,
        total,
        threads,
        || start_cpu.set(server.cpu.cpu_seconds()),
        || end_cpu.set(server.cpu.cpu_seconds()),
    )?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let after = rss_kib(server.pid());
    Ok(SetupResult {
        server: server.name.clone(),
        stats,
        server_cpu: end_cpu.get() - start_cpu.get(),
        rss_before_kib: before,
        rss_after_kib: after,
    })
}

/// A label for a mode.
#[must_use]
pub fn mode_name(m: Mode) -> String {
    match m {
        Mode::Saturated { window } => format!("saturated (window {window})"),
        Mode::Paced { pps } => format!("paced {} pkt/s", pps),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::load::EchoPeer;
    use crate::server::{Support, TestCert, TurndOptions};

    fn short(name: &'static str, transport: Transport, mode: Mode) -> Scenario {
        Scenario {
            name,
            transport,
            allocations: 4,
            config: LoadConfig {
                mode,
                duration: Duration::from_millis(700),
                payload: 100,
                threads: 2,
            },
        }
    }

    /// The smoke scenario: a few allocations for under a second over UDP, TCP and TLS,
    /// saturated and paced; packets came back and none (or next to none) were lost.
    fn smoke(io: Option<&'static str>) {
        // One at a time: two servers and their clients on two shared cores prove nothing more.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cert = TestCert::generate().expect("certificate");
        let server = Server::turnd(&TurndOptions {
            workers: 2,
            io,
            admin: false,
            tls: Some(&cert),
        });
        let server = match server {
            Err(e) if io == Some("io_uring") && !io_uring_backend_built() => {
                eprintln!("skipped: turnd's io_uring backend is not built yet ({e:#})");
                return;
            }
            r => r.expect("turnd starts"),
        };
        if let Some(io) = io.filter(|io| *io != "auto") {
            assert_eq!(server.io_backend, io, "the backend turnd reports");
        }
        let echo = EchoPeer::start(1).expect("echo peer");
        for transport in [Transport::Udp, Transport::Tcp, Transport::Tls] {
            for mode in [Mode::Saturated { window: 2 }, Mode::Paced { pps: 400 }] {
                let sc = short("smoke", transport, mode);
                let r = measure(&Subject::server(&server, transport, echo.addr), &sc, false)
                    .unwrap_or_else(|e| panic!("{transport:?} {mode:?}: {e:#}"));
                assert!(
                    r.stats.received_in_window > 50,
                    "{transport:?} {mode:?}: {} echoes",
                    r.stats.received_in_window
                );
                assert!(
                    r.stats.lost() * 100 <= r.stats.sent,
                    "{transport:?} {mode:?}: sent {} received {}",
                    r.stats.sent,
                    r.stats.received
                );
                assert!(r.server_threads > 0);
            }
        }
        let setup = setup_and_memory(&server, echo.addr, 64, 2).expect("set-up runs");
        assert_eq!((setup.stats.opened, setup.stats.failed), (64, 0));
        echo.stop();
        server.stop();
    }

    #[test]
    fn smoke_turnd_default_backend_relays_udp_tcp_tls() {
        smoke(None);
    }

    #[test]
    fn smoke_turnd_epoll_backend_relays_udp_tcp_tls() {
        if turnd_supports_io() {
            smoke(Some("epoll"));
        }
    }

    #[test]
    fn smoke_turnd_io_uring_backend_relays_udp_tcp_tls() {
        if turnd_supports_io() {
            smoke(Some("io_uring"));
        }
    }

    /// Whether turnd's io_uring backend does more than refuse (it is a stub until the
    /// backend lands): `auto` on this kernel picks it when it works.
    fn io_uring_backend_built() -> bool {
        Server::turnd(&TurndOptions {
            workers: 1,
            io: Some("auto"),
            ..TurndOptions::default()
        })
        .is_ok_and(|s| s.io_backend == "io_uring")
    }

    fn turnd_supports_io() -> bool {
        let yes = server::turnd_supports().0 == Support::Yes;
        if !yes {
            eprintln!("this turnd has no [server] io key yet: one backend only");
        }
        yes
    }

    #[test]
    fn bare_forwarder_echoes_every_packet() {
        let echo = EchoPeer::start(1).expect("echo peer");
        let r = measure_bare(
            1,
            echo.addr,
            &short("smoke", Transport::Udp, Mode::Saturated { window: 2 }),
            false,
        )
        .expect("scenario runs");
        echo.stop();
        assert!(r.stats.received_in_window > 100, "{}", r.stats.received);
        assert_eq!(r.stats.lost(), 0);
    }
}
