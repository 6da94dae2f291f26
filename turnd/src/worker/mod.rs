//! One event loop per worker thread.
//!
//! A worker owns its share of every listener (SO_REUSEPORT: the kernel spreads clients by
//! 4-tuple hash, so a client always reaches the same worker), the relay sockets of the
//! allocations it made, its TCP/TLS connections and one [`turn_proto::server::Server`] shard,
//! and it waits on one readiness source, the [`Backend`]. No lock is on the packet path; the
//! shared state (port pools, allocation quota, reservations, connection caps) is touched when
//! allocations and connections start and end.
//!
//! **One pass of the loop** ([`Worker::run`]):
//! 1. wait (the core's next timer, the stream housekeeping tick, or nothing when a socket has
//!    a backlog) and take datagrams (at most [`UDP_BUDGET`](crate::net::io::UDP_BUDGET) per
//!    socket) and readiness;
//! 2. every datagram and frame goes to the core at once; after each, the core's events are
//!    acted on first (a released relay port is free before the response that released it
//!    leaves) and its transmits queued: UDP into the pass's [`SendQueue`], stream frames into
//!    the connection's bounded write buffer;
//! 3. new relay sockets are registered, backlogged connections read (at most
//!    [`READ_BUDGET`] bytes and [`FRAME_BUDGET`] frames per connection per pass), timers and
//!    commands handled;
//! 4. connections written, then the pass's datagrams flushed together (one `sendmmsg` per
//!    socket on epoll, one submission on io_uring), then released sockets closed.
//!
//! The core hands out small handles: a [`RelayHandle`] is the index of the relay socket here,
//! a [`Route`] the index of the listener or connection a client is reached through, so a
//! transmit finds its socket without hashing an address.
//!
//! The rooms: this file (the loop, its pass and flush order, routing transmits),
//! [`events`] (the core's events: relay sockets bound and released, allocations logged,
//! rejections logged with a rate limit), [`streams`] (accept, read with budgets, frames,
//! write, close) and [`control`] (timers, housekeeping, the process's commands, shutdown).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use slab::Slab;
use tracing::{debug, info, warn};
use turn_proto::codec::AddressFamily;
use turn_proto::codec::{frame_len, FrameLen};
use turn_proto::server::{
    AllocationId, Destination, Drain, EndReason, Event, FiveTuple, PortRequest, RelayBound,
    RelayError, RelayHandle, RelayRequest, RelayedAddress, Route, Server, ServerConfig,
    SharedQuota, SharedReservations, Transmit, Transport,
};

use crate::admin::{EndSelector, Session};
use crate::config::Settings;
use crate::metrics::{Metrics, RefuseCause, WorkerStats};
use crate::net::io::{Backend, Handler, UdpKey, TCP_LISTENER_BASE, WAKER};
use crate::net::ports::PortPools;
use crate::net::relay::{self, BindError, Relays, ReservedSockets};
use crate::net::stream::{
    Connection, ConnectionCaps, Expiry, Phase, ReadOutcome, StreamLimits, FRAME_BUDGET,
};
use crate::net::tls::Tls;
use crate::net::udp::{self, Buffers, Datagram, SendQueue};

mod control;
mod events;
mod streams;

/// How often stream timeouts are checked and counters published.
const HOUSEKEEPING: Duration = Duration::from_millis(100);
/// Connections accepted from one listener per pass.
const ACCEPT_BUDGET: usize = 64;
/// Rejections logged per worker per second at info; the rest are counted and summarised.
const REJECT_LOG_PER_SECOND: u32 = 20;
/// Routes at or above this are stream connections (index below); below, UDP listeners.
const STREAM_ROUTE: u32 = 1 << 31;
/// UDP registration users with this bit are listeners; others are relays (generation << 32 |
/// index).
const LISTENER_USER: u64 = 1 << 63;

/// What every worker shares.
pub(crate) struct Shared {
    pub settings: Settings,
    pub quota: SharedQuota,
    pub reservations: SharedReservations,
    pub ports: PortPools,
    pub reserved: ReservedSockets,
    pub tls: Option<Arc<Tls>>,
    pub caps: Arc<ConnectionCaps>,
    pub metrics: Arc<Metrics>,
}

/// Orders from the process to a worker.
pub(crate) enum Command {
    /// New live settings (hot reload).
    Reload {
        config: Box<ServerConfig>,
        limits: StreamLimits,
    },
    /// Start (or stop) draining.
    Drain(Option<Drain>),
    /// List the allocations (optionally of one user).
    Sessions {
        user: Option<String>,
        reply: mpsc::Sender<Vec<Session>>,
    },
    /// End allocations now.
    End {
        which: EndSelector,
        reply: mpsc::Sender<usize>,
    },
    /// Stop the loop.
    Stop,
}

/// The process's side of a worker: its command queue and the waker of its loop.
pub(crate) struct WorkerHandle {
    pub tx: mpsc::Sender<Command>,
    pub waker: Arc<mio::Waker>,
    /// Allocations the worker holds now (for drain), updated each housekeeping tick.
    pub allocations: Arc<std::sync::atomic::AtomicUsize>,
    /// Last time the loop turned (unix ms), for `/live`.
    pub heartbeat: Arc<std::sync::atomic::AtomicU64>,
}

impl WorkerHandle {
    /// Sends `c` and wakes the loop; false when the worker is gone.
    pub(crate) fn send(&self, c: Command) -> bool {
        self.tx.send(c).is_ok() && self.waker.wake().is_ok()
    }
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A socket could not be set up.
    #[error("worker {worker}: setting up {what}: {source}")]
    Setup {
        /// Which worker.
        worker: usize,
        /// What failed.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// Waiting for events failed.
    #[error("worker {worker}: waiting for events: {source}")]
    Poll {
        /// Which worker.
        worker: usize,
        /// Why.
        source: io::Error,
    },
}

struct UdpListener {
    sock: std::net::UdpSocket,
    local: SocketAddr,
}

struct TcpListener {
    sock: mio::net::TcpListener,
}

/// Counts rejections logged this second.
struct LogLimiter {
    second: u64,
    logged: u32,
    suppressed: u64,
}

/// A worker: its backend and everything else (kept apart so the backend can deliver into the
/// rest while it runs).
pub(crate) struct Worker {
    backend: Box<dyn Backend>,
    st: State,
}

struct State {
    index: usize,
    /// The backend's mio registry (streams register and deregister through it).
    registry: mio::Registry,
    core: Server,
    shared: Arc<Shared>,
    limits: StreamLimits,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    listeners: Vec<UdpListener>,
    tcp: Vec<TcpListener>,
    relays: Relays,
    streams: Slab<Connection>,
    send: SendQueue,
    /// Relay sockets bound this pass, to register with the backend.
    to_register: Vec<RelayHandle>,
    /// Relay sockets released this pass, closed after the flush (queued datagrams may still
    /// name them) and then their ports freed.
    to_close: Vec<(Option<UdpKey>, std::net::UdpSocket, SocketAddr)>,
    /// Connections with bytes to write.
    to_write: Vec<usize>,
    /// Connections with more to read than their budget allowed.
    read_backlog: Vec<usize>,
    /// Listeners with more connections waiting than the accept budget allowed.
    accept_backlog: Vec<usize>,
    accept_paused_until: Option<Instant>,
    stats: WorkerStats,
    rng: u64,
    log: LogLimiter,
    now: Instant,
    next_housekeeping: Instant,
    commands: mpsc::Receiver<Command>,
    handle: Arc<std::sync::atomic::AtomicUsize>,
    heartbeat: Arc<std::sync::atomic::AtomicU64>,
    stopping: bool,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Worker {
    /// Sets up worker `index` over its listener sockets; returns it and its handle.
    ///
    /// # Errors
    /// A socket could not be registered or configured.
    pub(crate) fn new(
        index: usize,
        shared: Arc<Shared>,
        config: ServerConfig,
        mut backend: Box<dyn Backend>,
        udp_listeners: Vec<std::net::UdpSocket>,
        tcp_listeners: Vec<std::net::TcpListener>,
    ) -> Result<(Self, WorkerHandle), WorkerError> {
        let setup = |what: &'static str| {
            move |source| WorkerError::Setup {
                worker: index,
                what,
                source,
            }
        };
        let mut listeners = Vec::new();
        for (i, sock) in udp_listeners.into_iter().enumerate() {
            let local = sock.local_addr().map_err(setup("a UDP listener"))?;
            // Only a wildcard listener needs each datagram's destination (its answer leaves
            // from that address); one bound to an address knows it already.
            if local.ip().is_unspecified() {
                udp::report_destination(&sock, local.is_ipv6()).map_err(setup("a UDP listener"))?;
            }
            udp::set_dont_fragment(&sock, local.is_ipv6(), false)
                .map_err(setup("a UDP listener"))?;
            backend
                .add_udp(sock.as_raw_fd(), LISTENER_USER | i as u64)
                .map_err(setup("a UDP listener"))?;
            listeners.push(UdpListener { sock, local });
        }
        let mut tcp = Vec::new();
        for (i, l) in tcp_listeners.into_iter().enumerate() {
            let mut sock = mio::net::TcpListener::from_std(l);
            backend
                .registry()
                .register(
                    &mut sock,
                    mio::Token(TCP_LISTENER_BASE + i),
                    mio::Interest::READABLE,
                )
                .map_err(setup("a TCP listener"))?;
            tcp.push(TcpListener { sock });
        }
        let waker = Arc::new(
            mio::Waker::new(backend.registry(), mio::Token(WAKER)).map_err(setup("the waker"))?,
        );
        let (tx, commands) = mpsc::channel();
        let now = Instant::now();
        // Reservations (EVEN-PORT R, RESERVATION-TOKEN) are shared like the quota: the
        // second socket of an RTP/RTCP pair may hash to another worker (issue 12). Each shard
        // draws its tokens from a seed of its own.
        let mut token_seed = [0u8; 32];
        rand::Rng::fill(&mut rand::thread_rng(), &mut token_seed[..]);
        let mut core = Server::with_ledgers(
            config,
            Box::new(shared.quota.clone()),
            Box::new(shared.reservations.clone()),
            token_seed,
            now,
            unix_now(),
        );
        core.set_shard(u16::try_from(index).unwrap_or(u16::MAX));
        let seed = unix_now()
            ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ u64::from(std::process::id());
        let allocations = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let heartbeat = Arc::new(std::sync::atomic::AtomicU64::new(unix_millis()));
        let limits = shared.settings.streams;
        let tls_config = shared.tls.as_ref().map(|t| t.server_config());
        let registry = backend
            .registry()
            .try_clone()
            .map_err(setup("the stream registry"))?;
        let st = State {
            registry,
            index,
            core,
            limits,
            tls_config,
            listeners,
            tcp,
            relays: Relays::default(),
            streams: Slab::new(),
            send: SendQueue::default(),
            to_register: Vec::new(),
            to_close: Vec::new(),
            to_write: Vec::new(),
            read_backlog: Vec::new(),
            accept_backlog: Vec::new(),
            accept_paused_until: None,
            stats: WorkerStats::default(),
            rng: seed | 1,
            log: LogLimiter {
                second: 0,
                logged: 0,
                suppressed: 0,
            },
            now,
            next_housekeeping: now,
            commands,
            handle: allocations.clone(),
            heartbeat: heartbeat.clone(),
            stopping: false,
            shared,
        };
        Ok((
            Self { backend, st },
            WorkerHandle {
                tx,
                waker,
                allocations,
                heartbeat,
            },
        ))
    }

    /// Runs the loop until a [`Command::Stop`].
    ///
    /// # Errors
    /// Waiting for events failed.
    pub(crate) fn run(mut self) -> Result<(), WorkerError> {
        debug!(
            worker = self.st.index,
            backend = self.backend.name(),
            "worker running"
        );
        while !self.st.stopping {
            self.pass()?;
        }
        self.st.shutdown(&mut *self.backend);
        Ok(())
    }

    /// One pass of the loop (see the module docs).
    fn pass(&mut self) -> Result<(), WorkerError> {
        let timeout = self.st.timeout();
        let index = self.st.index;
        self.backend
            .poll(timeout, &mut self.st)
            .map_err(|source| WorkerError::Poll {
                worker: index,
                source,
            })?;
        let st = &mut self.st;
        st.now = Instant::now();
        st.register_relays(&mut *self.backend);
        st.serve_backlogs();
        st.timers();
        st.commands();
        st.register_relays(&mut *self.backend);
        st.write_streams();
        // Released relay sockets close before the pass's datagrams leave: the port must be
        // free again before the answer that freed it reaches the client (who may Allocate
        // at once, through another worker).
        st.close_released(&mut *self.backend);
        let flushed = self.backend.flush(&mut st.send);
        st.stats.send_errors += flushed.failed;
        Ok(())
    }
}

impl Handler for State {
    fn datagram(&mut self, user: u64, d: Datagram<'_>) {
        if user & LISTENER_USER != 0 {
            let i = (user & !LISTENER_USER) as usize;
            let Some(l) = self.listeners.get(i) else {
                return;
            };
            let server = SocketAddr::new(d.dst_ip.unwrap_or(l.local.ip()), l.local.port());
            let ft = FiveTuple {
                client: d.from,
                server,
                transport: Transport::Udp,
            };
            let route = Route(u32::try_from(i).unwrap_or(0));
            self.core
                .handle_client_datagram(self.now, ft, route, d.data);
        } else {
            let idx = (user & 0xFFFF_FFFF) as u32;
            let generation = (user >> 32) as u32;
            let handle = RelayHandle(idx);
            if self
                .relays
                .get(handle)
                .is_none_or(|r| r.generation != generation)
            {
                return;
            }
            self.core
                .handle_peer_datagram(self.now, handle, d.from, d.data);
        }
        self.after_core();
    }

    fn ready(&mut self, token: mio::Token, readable: bool, writable: bool) {
        let t = token.0;
        if t == WAKER {
            self.commands();
        } else if t >= TCP_LISTENER_BASE {
            self.accept(t - TCP_LISTENER_BASE);
        } else {
            if writable {
                self.list_write(t);
            }
            if readable {
                self.read_stream(t);
            }
        }
    }

    fn receive_error(&mut self, _user: u64, error: &io::Error) {
        self.stats.receive_errors += 1;
        debug!(worker = self.index, error = %error, "receive error");
    }

    fn oversized(&mut self, _user: u64) {
        self.stats.oversized_datagrams += 1;
    }

    fn woke(&mut self) {
        self.now = Instant::now();
    }
}

impl State {
    fn random(&mut self) -> u64 {
        // xorshift64*: port choice only needs to be unpredictable to a casual observer.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// How long the next wait may last.
    fn timeout(&self) -> Option<Duration> {
        if !self.read_backlog.is_empty() || !self.accept_backlog.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut until = self.next_housekeeping;
        if let Some(t) = self.core.poll_timeout() {
            until = until.min(t);
        }
        if let Some(t) = self.accept_paused_until {
            until = until.min(t);
        }
        Some(until.saturating_duration_since(now))
    }

    /// Acts on the core's events, then queues its transmits, until both are empty.
    fn after_core(&mut self) {
        loop {
            let mut any = false;
            while let Some(e) = self.core.poll_event() {
                any = true;
                self.handle_event(e);
            }
            while let Some(t) = self.core.poll_transmit() {
                any = true;
                route_transmit(
                    &t,
                    &self.listeners,
                    &self.relays,
                    &mut self.streams,
                    &mut self.send,
                    &mut self.to_write,
                    &mut self.stats,
                    self.limits.write_buffer,
                );
            }
            if !any {
                return;
            }
        }
    }
}

fn stream_index(route: Route) -> Option<usize> {
    (route.0 & STREAM_ROUTE != 0).then_some((route.0 & !STREAM_ROUTE) as usize)
}

/// Queues one transmit of the core: a UDP datagram into the pass's send queue, a frame into
/// its connection's write buffer. Found by index (route, relay handle), never by address.
#[allow(clippy::too_many_arguments)]
fn route_transmit(
    t: &Transmit<'_>,
    listeners: &[UdpListener],
    relays: &Relays,
    streams: &mut Slab<Connection>,
    send: &mut SendQueue,
    to_write: &mut Vec<usize>,
    stats: &mut WorkerStats,
    write_limit: usize,
) {
    match t.destination {
        Destination::Client(ft) if ft.transport.is_stream() => {
            let Some(idx) = stream_index(t.route) else {
                return;
            };
            let Some(c) = streams.get_mut(idx) else {
                return;
            };
            // The route must still name this client's connection (never another's).
            if c.five_tuple != ft {
                return;
            }
            if !c.queue(t.payload, write_limit) {
                stats.write_queue_drops += 1;
                return;
            }
            if !c.write_listed {
                c.write_listed = true;
                to_write.push(idx);
            }
        }
        Destination::Client(ft) => {
            let Some(l) = listeners.get(t.route.0 as usize) else {
                return;
            };
            let src_ip = l.local.ip().is_unspecified().then_some(ft.server.ip());
            send.push(l.sock.as_raw_fd(), ft.client, src_ip, false, t.payload);
        }
        Destination::Peer { relay, peer } => {
            let Some(r) = relays.get(relay) else { return };
            let force_df = t.dont_fragment && !r.dont_fragment;
            send.push(r.fd(), peer, None, force_df, t.payload);
        }
    }
}
