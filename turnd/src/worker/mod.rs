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
            backend
                .add_udp(sock.as_raw_fd(), LISTENER_USER | i as u64)
                .map_err(setup("a UDP listener"))?;
            udp::disable_gro(&sock).map_err(setup("a UDP listener"))?;
            udp::set_dont_fragment(&sock, local.is_ipv6(), false)
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
        debug!(worker = self.index, error = %error, "receive error");
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

    fn handle_event(&mut self, event: Event) {
        self.stats.on_event(&event);
        match event {
            Event::RelayRequested(req) => {
                let bound = self.bind_relays(&req);
                self.core.handle_relay_bound(self.now, req.id, bound);
            }
            Event::RelayReleased(r) => {
                if let Some(sock) = self.relays.remove(r.handle, r.local) {
                    self.to_close.push((sock.key, sock.sock, sock.local));
                } else {
                    self.release_reserved(r.local);
                }
            }
            // A reservation lapsed unredeemed (or its Allocate failed): the held socket lives
            // in the process-wide table whichever worker's core removed the reservation.
            Event::ReservedPortReleased(local) => self.release_reserved(local),
            Event::AllocationCreated {
                five_tuple,
                username,
                relayed,
                lifetime,
                id,
                ..
            } => {
                info!(
                    worker = self.index,
                    id = id.0,
                    user = %username,
                    client = %five_tuple.client,
                    server = %five_tuple.server,
                    transport = five_tuple.transport.as_str(),
                    relayed = %fmt_relayed(&relayed),
                    lifetime_s = lifetime.as_secs(),
                    "allocation created"
                );
            }
            Event::AllocationEnded {
                five_tuple,
                username,
                relayed,
                duration,
                stats,
                reason,
                route,
                id,
            } => {
                info!(
                    worker = self.index,
                    id = id.0,
                    user = %username,
                    client = %five_tuple.client,
                    transport = five_tuple.transport.as_str(),
                    relayed = %fmt_relayed(&relayed),
                    duration_s = duration.as_secs(),
                    bytes_to_peer = stats.bytes_to_peer,
                    bytes_from_peer = stats.bytes_from_peer,
                    packets_to_peer = stats.packets_to_peer,
                    packets_from_peer = stats.packets_from_peer,
                    reason = reason.as_str(),
                    "allocation ended"
                );
                // A TCP/TLS connection does not outlive its allocation (coturn closes it
                // too): once the last answer is written, it closes.
                if five_tuple.transport.is_stream() && reason != EndReason::ConnectionClosed {
                    if let Some(idx) = stream_index(route) {
                        if let Some(c) = self.streams.get_mut(idx) {
                            if c.five_tuple == five_tuple {
                                c.close_after_write = true;
                                if !c.write_listed {
                                    c.write_listed = true;
                                    self.to_write.push(idx);
                                }
                            }
                        }
                    }
                }
            }
            Event::Rejected {
                transport,
                method,
                reason,
                client,
                username,
            } => {
                let second = unix_now();
                if second != self.log.second {
                    if self.log.suppressed > 0 {
                        info!(
                            worker = self.index,
                            suppressed = self.log.suppressed,
                            "rejections not logged in the last second (rate limit)"
                        );
                    }
                    self.log = LogLimiter {
                        second,
                        logged: 0,
                        suppressed: 0,
                    };
                }
                if self.log.logged < REJECT_LOG_PER_SECOND {
                    self.log.logged += 1;
                    info!(
                        worker = self.index,
                        transport = transport.as_str(),
                        method = method.name(),
                        reason = reason.as_str(),
                        code = reason.code().0,
                        client = %client,
                        user = username.as_deref().unwrap_or("-"),
                        "rejected"
                    );
                } else {
                    self.log.suppressed += 1;
                }
            }
        }
    }

    /// Closes a socket held for a RESERVATION-TOKEN and frees its port.
    fn release_reserved(&mut self, local: SocketAddr) {
        if let Some(sock) = self.shared.reserved.take(local) {
            drop(sock);
            self.shared.ports.release(local.ip(), local.port());
        }
    }

    fn bind_relays(&mut self, req: &RelayRequest) -> RelayBound {
        let arrival = req.five_tuple.server.ip();
        let mut reserved_next = None;
        let primary = self.bind_one(
            req.family,
            arrival,
            req.port,
            req.dont_fragment,
            &mut reserved_next,
        );
        let additional = req.additional_ipv6.then(|| {
            self.bind_one(
                AddressFamily::IPV6,
                arrival,
                PortRequest::Any,
                req.dont_fragment,
                &mut None,
            )
        });
        RelayBound {
            primary,
            additional,
            reserved_next,
        }
    }

    fn bind_one(
        &mut self,
        family: AddressFamily,
        arrival: IpAddr,
        port: PortRequest,
        dont_fragment: bool,
        reserved_next: &mut Option<SocketAddr>,
    ) -> Result<RelayedAddress, RelayError> {
        let s = &self.shared.settings;
        let buffers = Buffers {
            recv: s.sockets.relay_recv,
            send: s.sockets.relay_send,
        };
        let sock = if let PortRequest::Reserved(local) = port {
            self.shared
                .reserved
                .take(local)
                .ok_or(RelayError::NoPortAvailable)?
        } else {
            let ip = relay::pick_ip(&s.relay.addresses, &self.shared.ports, family, arrival)
                .ok_or(RelayError::FamilyUnavailable)?;
            let (even, pair) = match port {
                PortRequest::Even { reserve_next } => (true, reserve_next),
                _ => (false, false),
            };
            let start = usize::try_from(self.random() % 65_536).unwrap_or(0);
            // The address with the most free ports first; when none of its ports binds (held
            // by another process), the family's other relay addresses in turn.
            let shared = Arc::clone(&self.shared);
            let others = shared
                .settings
                .relay
                .addresses
                .iter()
                .copied()
                .filter(|o| *o != ip && o.is_ipv4() == ip.is_ipv4());
            let mut bound = Err(BindError::NoPort);
            for candidate in std::iter::once(ip).chain(others) {
                bound = relay::bind(&shared.ports, candidate, even, pair, start, buffers);
                if !matches!(bound, Err(BindError::NoPort)) {
                    break;
                }
            }
            let (sock, next) = match bound {
                Ok(x) => x,
                Err(BindError::Descriptors(e)) => {
                    self.stats.descriptor_exhaustion += 1;
                    warn!(worker = self.index, error = %e, "out of file descriptors: relay socket refused (508)");
                    return Err(RelayError::NoDescriptors);
                }
                Err(_) => return Err(RelayError::NoPortAvailable),
            };
            if let Some(next) = next {
                if let Ok(addr) = next.local_addr() {
                    self.shared.reserved.hold(addr, next);
                    *reserved_next = Some(addr);
                }
            }
            sock
        };
        let Ok(local) = sock.local_addr() else {
            return Err(RelayError::NoPortAvailable);
        };
        let advertised = SocketAddr::new(
            self.shared.settings.relay.advertised(local.ip()),
            local.port(),
        );
        let (handle, _) = self.relays.insert(sock, local, dont_fragment);
        self.to_register.push(handle);
        Ok(RelayedAddress {
            local,
            advertised,
            handle,
        })
    }

    /// Registers the relay sockets bound since the last call with the backend.
    fn register_relays(&mut self, backend: &mut dyn Backend) {
        for handle in std::mem::take(&mut self.to_register) {
            let Some(r) = self.relays.get_mut(handle) else {
                continue;
            };
            let user = (u64::from(r.generation) << 32) | u64::from(handle.0);
            match backend.add_udp(r.fd(), user) {
                Ok(key) => {
                    r.key = Some(key);
                    // quinn-udp's socket state turns DF and GRO on; a relay wants neither
                    // unless asked.
                    let _ = udp::disable_gro(&r.sock);
                    let _ = udp::set_dont_fragment(&r.sock, r.local.is_ipv6(), r.dont_fragment);
                }
                Err(e) => {
                    warn!(worker = self.index, relay = %r.local, error = %e, "relay socket registration failed")
                }
            }
        }
    }

    fn close_released(&mut self, backend: &mut dyn Backend) {
        if self.to_close.is_empty() {
            return;
        }
        // Datagrams queued to a released socket's peers this pass are dropped with it (the
        // allocation is gone, as if they had been in flight).
        let closing: Vec<_> = self
            .to_close
            .iter()
            .map(|(_, s, _)| s.as_raw_fd())
            .collect();
        self.send.retain(|fd| !closing.contains(&fd));
        for (key, sock, local) in self.to_close.drain(..) {
            match key {
                Some(k) => backend.remove_udp(k, sock),
                None => drop(sock),
            }
            self.shared.ports.release(local.ip(), local.port());
        }
    }

    // -----------------------------------------------------------------------------------------
    // Streams

    fn accept(&mut self, i: usize) {
        if self.accept_paused_until.is_some_and(|t| self.now < t) {
            if !self.accept_backlog.contains(&i) {
                self.accept_backlog.push(i);
            }
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            let Some(l) = self.tcp.get(i) else { return };
            let (mut sock, peer) = match l.sock.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        self.stats.on_connection_refused(RefuseCause::NoDescriptors);
                        warn!(worker = self.index, error = %e, "accept: out of file descriptors");
                    } else {
                        debug!(worker = self.index, error = %e, "accept failed");
                    }
                    // Back off briefly; the connection waits in the listen queue.
                    self.accept_paused_until = Some(self.now + Duration::from_millis(50));
                    if !self.accept_backlog.contains(&i) {
                        self.accept_backlog.push(i);
                    }
                    return;
                }
            };
            let Some(slot) = self.shared.caps.try_acquire(peer.ip(), &self.limits) else {
                let cause = if self.shared.caps.total() >= self.limits.max_total {
                    RefuseCause::TotalCap
                } else {
                    RefuseCause::PerIpCap
                };
                self.stats.on_connection_refused(cause);
                debug!(client = %peer, cause = cause.as_str(), "connection refused");
                continue;
            };
            let _ = sock.set_nodelay(true);
            let Ok(local) = sock.local_addr() else {
                continue;
            };
            let idx = self.streams.vacant_key();
            if idx >= STREAM_ROUTE as usize {
                continue;
            }
            if let Err(e) = self.registry.register(
                &mut sock,
                mio::Token(idx),
                mio::Interest::READABLE | mio::Interest::WRITABLE,
            ) {
                debug!(error = %e, "registering a connection failed");
                continue;
            }
            let ft = FiveTuple {
                client: peer,
                server: local,
                transport: Transport::Tcp,
            };
            self.streams
                .insert(Connection::new(sock, ft, slot, self.now));
        }
        // Budget used: more may wait; serve them next pass.
        if !self.accept_backlog.contains(&i) {
            self.accept_backlog.push(i);
        }
    }

    fn list_write(&mut self, idx: usize) {
        if let Some(c) = self.streams.get_mut(idx) {
            if !c.write_listed {
                c.write_listed = true;
                self.to_write.push(idx);
            }
        }
    }

    fn read_stream(&mut self, idx: usize) {
        let tls_config = self.tls_config.clone();
        let Some(c) = self.streams.get_mut(idx) else {
            return;
        };
        let was_handshaking = c.phase != Phase::Open;
        let outcome = c.read(tls_config.as_ref());
        if c.tls.is_some() && c.wants_write() && !c.write_listed {
            c.write_listed = true;
            self.to_write.push(idx);
        }
        if was_handshaking && c.phase == Phase::Open && !c.counted {
            c.counted = true;
            let t = c.five_tuple.transport;
            self.stats.on_connection_opened(t);
            if t == Transport::Tls {
                self.stats.on_tls_handshake(true);
            }
        }
        self.frames(idx);
        match outcome {
            ReadOutcome::Drained => {}
            ReadOutcome::More => {
                if let Some(c) = self.streams.get_mut(idx) {
                    if !c.read_listed {
                        c.read_listed = true;
                        self.read_backlog.push(idx);
                    }
                }
            }
            ReadOutcome::Closed => self.close_stream(idx, None),
        }
    }

    /// Hands the complete frames in a connection's read buffer to the core (at most
    /// [`FRAME_BUDGET`]; the rest waits in the buffer for the next pass).
    fn frames(&mut self, idx: usize) {
        let Some(c) = self.streams.get_mut(idx) else {
            return;
        };
        if c.phase != Phase::Open || c.rbuf.is_empty() {
            return;
        }
        let ft = c.five_tuple;
        let mut rbuf = std::mem::take(&mut c.rbuf);
        let route = Route(STREAM_ROUTE | u32::try_from(idx).unwrap_or(0));
        let mut consumed = 0;
        let mut frames = 0;
        let mut garbage = false;
        while frames < FRAME_BUDGET {
            match frame_len(&rbuf[consumed..]) {
                Ok(FrameLen::Complete(n)) => {
                    self.core.handle_client_datagram(
                        self.now,
                        ft,
                        route,
                        &rbuf[consumed..consumed + n],
                    );
                    consumed += n;
                    frames += 1;
                    self.after_core();
                }
                Ok(FrameLen::NeedMore(_)) => break,
                Err(_) => {
                    garbage = true;
                    break;
                }
            }
        }
        rbuf.drain(..consumed);
        let more_frames =
            frames == FRAME_BUDGET && matches!(frame_len(&rbuf), Ok(FrameLen::Complete(_)));
        let Some(c) = self.streams.get_mut(idx) else {
            return;
        };
        if c.five_tuple != ft {
            return;
        }
        // Bytes read after the frames were taken out (none: reads happen before) join them.
        rbuf.extend_from_slice(&c.rbuf);
        c.rbuf = rbuf;
        c.after_frames(frames > 0, self.now);
        if garbage {
            if frames == 0 && !c.counted {
                self.stats.on_connection_refused(RefuseCause::NotStun);
            }
            debug!(client = %ft.client, "not STUN or ChannelData: closing");
            self.close_stream(idx, None);
            return;
        }
        if more_frames && !c.read_listed {
            c.read_listed = true;
            self.read_backlog.push(idx);
        }
    }

    fn serve_backlogs(&mut self) {
        for idx in std::mem::take(&mut self.read_backlog) {
            if let Some(c) = self.streams.get_mut(idx) {
                c.read_listed = false;
            } else {
                continue;
            }
            // Frames left in the buffer first, then the socket.
            self.frames(idx);
            if self.streams.get(idx).is_some_and(|c| !c.read_listed) {
                self.read_stream(idx);
            }
        }
        if self.accept_paused_until.is_some_and(|t| self.now >= t) {
            self.accept_paused_until = None;
        }
        if self.accept_paused_until.is_none() {
            for i in std::mem::take(&mut self.accept_backlog) {
                self.accept(i);
            }
        }
    }

    fn write_streams(&mut self) {
        for idx in std::mem::take(&mut self.to_write) {
            let Some(c) = self.streams.get_mut(idx) else {
                continue;
            };
            c.write_listed = false;
            if c.write().is_err() {
                self.close_stream(idx, None);
                continue;
            }
            if c.close_after_write && !c.wants_write() {
                self.close_stream(idx, None);
            }
        }
    }

    /// Closes a connection: its allocation ends with it (RFC 8656 §3.1).
    fn close_stream(&mut self, idx: usize, expiry: Option<Expiry>) {
        let Some(mut c) = self.streams.try_remove(idx) else {
            return;
        };
        let _ = self.registry.deregister(&mut c.sock);
        if c.counted {
            self.stats.on_connection_closed(c.five_tuple.transport);
        } else if c.five_tuple.transport == Transport::Tls {
            let cause = if expiry == Some(Expiry::Handshake) {
                RefuseCause::HandshakeTimeout
            } else {
                RefuseCause::HandshakeFailed
            };
            self.stats.on_tls_handshake(false);
            self.stats.on_connection_refused(cause);
        } else if expiry == Some(Expiry::Handshake) {
            self.stats
                .on_connection_refused(RefuseCause::HandshakeTimeout);
        }
        if let Some(e) = expiry {
            debug!(client = %c.five_tuple.client, why = ?e, "connection timed out");
        }
        if c.phase == Phase::Open {
            self.core.handle_connection_closed(self.now, c.five_tuple);
            self.after_core();
        }
        drop(c);
    }

    // -----------------------------------------------------------------------------------------
    // Timers and commands

    fn timers(&mut self) {
        if self.core.poll_timeout().is_some_and(|t| t <= self.now) {
            self.core.handle_timeout(self.now);
            self.after_core();
        }
        if self.now < self.next_housekeeping {
            return;
        }
        self.next_housekeeping = self.now + HOUSEKEEPING;
        let mut expired = Vec::new();
        for (idx, c) in &self.streams {
            let has_allocation = self.core.has_allocation(&c.five_tuple);
            if let Some(e) = c.expired(self.now, &self.limits, has_allocation) {
                expired.push((idx, e));
            }
        }
        for (idx, e) in expired {
            self.close_stream(idx, Some(e));
        }
        self.stats.core = *self.core.stats();
        self.shared.metrics.publish(self.index, &self.stats);
        self.handle.store(
            self.core.allocation_count(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.heartbeat
            .store(unix_millis(), std::sync::atomic::Ordering::Relaxed);
    }

    fn commands(&mut self) {
        while let Ok(c) = self.commands.try_recv() {
            match c {
                Command::Reload { config, limits } => {
                    self.core.update_config(*config);
                    self.limits = limits;
                }
                Command::Drain(d) => self.core.set_draining(d),
                Command::Sessions { user, reply } => {
                    let list = self
                        .core
                        .sessions(self.now)
                        .filter(|s| user.as_deref().is_none_or(|u| u == s.username))
                        .map(|s| Session {
                            id: s.id.0.to_string(),
                            user: s.username.to_owned(),
                            transport: s.five_tuple.transport.as_str().to_owned(),
                            client: s.five_tuple.client.to_string(),
                            server: s.five_tuple.server.to_string(),
                            relayed: s
                                .relayed
                                .iter()
                                .flatten()
                                .map(|r| r.advertised.to_string())
                                .collect(),
                            created: s.created_unix,
                            lifetime_left_s: s.lifetime_left.as_secs(),
                            bytes_to_peer: s.stats.bytes_to_peer,
                            bytes_from_peer: s.stats.bytes_from_peer,
                            packets_to_peer: s.stats.packets_to_peer,
                            packets_from_peer: s.stats.packets_from_peer,
                            permissions: s.permissions,
                            channels: s.channels,
                        })
                        .collect();
                    let _ = reply.send(list);
                }
                Command::End { which, reply } => {
                    let n = match which {
                        EndSelector::User(u) => self.core.end_user_allocations(self.now, &u),
                        EndSelector::Id(id) => match id.parse::<u64>() {
                            Ok(id) => {
                                usize::from(self.core.end_allocation(self.now, AllocationId(id)))
                            }
                            Err(_) => 0,
                        },
                    };
                    self.after_core();
                    let _ = reply.send(n);
                }
                Command::Stop => self.stopping = true,
            }
        }
    }

    fn shutdown(&mut self, backend: &mut dyn Backend) {
        let open = self.core.allocation_count();
        if open > 0 {
            info!(
                worker = self.index,
                allocations = open,
                "stopping with allocations open"
            );
        }
        let idxs: Vec<usize> = self.streams.iter().map(|(i, _)| i).collect();
        for idx in idxs {
            if let Some(mut c) = self.streams.try_remove(idx) {
                let _ = backend.registry().deregister(&mut c.sock);
            }
        }
        let released: Vec<_> = self.relays.drain().collect();
        for r in released {
            match r.key {
                Some(k) => backend.remove_udp(k, r.sock),
                None => drop(r.sock),
            }
            self.shared.ports.release(r.local.ip(), r.local.port());
        }
        self.close_released(backend);
        self.stats.core = *self.core.stats();
        self.shared.metrics.publish(self.index, &self.stats);
        self.handle.store(0, std::sync::atomic::Ordering::Relaxed);
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

fn fmt_relayed(relayed: &[Option<RelayedAddress>; 2]) -> String {
    relayed
        .iter()
        .flatten()
        .map(|r| {
            if r.local == r.advertised {
                r.local.to_string()
            } else {
                format!("{} (bound {})", r.advertised, r.local)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}
