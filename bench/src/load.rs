//! The data plane of the bench: a UDP echo peer, the ChannelData load loops, and the
//! allocation set-up loop.
//!
//! Every packet carries a sequence number and its send time (nanoseconds since the run's
//! epoch) in its first 16 bytes, so the echo's reply gives the round-trip time. Client
//! threads open their own allocations first (in their own runtime), then all start together
//! at one epoch. Loops are bounded: they send until the run's deadline, then drain for at
//! most [`DRAIN`]; set-up waits at most [`SETUP_LIMIT`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use tokio::task::JoinSet;
use turn_proto::codec::{ChannelData, ChannelNumber};

use crate::bare::{Batch, BATCH};
use crate::client::{Allocation, Credentials};
use crate::link::{bind_udp, fresh_udp, Endpoint, Link, Transport};
use crate::server::SECRET;

/// How long the loops wait for stragglers after the deadline.
pub const DRAIN: Duration = Duration::from_secs(1);
/// The longest any set-up phase may take before the run is abandoned.
pub const SETUP_LIMIT: Duration = Duration::from_secs(180);
/// Allocations being set up at once, over all client threads.
pub const SETUP_IN_FLIGHT: usize = 32;
/// In a saturated run, an allocation that hears nothing for this long re-primes its window
/// (its packets are presumed lost; they still count if they arrive later).
const STALL: Duration = Duration::from_secs(1);
/// Bytes of the stamp: sequence number and send time.
const STAMP: usize = 16;
/// First channel number (RFC 8656 range).
pub const CHANNEL: u16 = 0x4000;

/// How packets are offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Closed loop: each allocation keeps `window` packets in flight.
    Saturated {
        /// Packets in flight per allocation.
        window: usize,
    },
    /// Open loop: the allocations together send `pps` packets per second, each at an even
    /// share of it and with its own phase (as a WebRTC sender paces its packets).
    Paced {
        /// Packets per second sent by all allocations together.
        pps: u64,
    },
}

/// One load run.
#[derive(Debug, Clone, Copy)]
pub struct LoadConfig {
    /// How packets are offered.
    pub mode: Mode,
    /// How long packets are sent.
    pub duration: Duration,
    /// Application bytes per packet (at least 16, for the stamp).
    pub payload: usize,
    /// Client threads; allocations are spread over them.
    pub threads: usize,
}

/// What the load goes through.
#[derive(Debug, Clone)]
pub enum Target {
    /// The bare forwarder at this address: flow `i` is a plain UDP socket using channel
    /// 0x4000 + i, no set-up.
    Bare(SocketAddr),
    /// A TURN server: each flow is a fresh allocation over `transport`, bound to `peer`.
    Turn {
        /// The server's listeners.
        endpoint: Endpoint,
        /// The client legs' transport.
        transport: Transport,
        /// The echo peer.
        peer: SocketAddr,
    },
}

/// What a load run measured, client side.
#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    /// Packets the clients sent before the deadline.
    pub sent: u64,
    /// Echoes received, including during the drain.
    pub received: u64,
    /// Echoes received before the deadline (the throughput figure).
    pub received_in_window: u64,
    /// Round-trip times in nanoseconds, sorted.
    pub rtt_ns: Vec<u32>,
    /// How long packets were sent.
    pub elapsed: Duration,
}

impl LoadStats {
    /// Packets lost: sent and never echoed (after the drain).
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }

    /// Lost / sent.
    #[must_use]
    pub fn loss_ratio(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            self.lost() as f64 / self.sent as f64
        }
    }

    /// Round trips per second inside the window.
    #[must_use]
    pub fn round_trips_per_sec(&self) -> f64 {
        self.received_in_window as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) of the round-trip time.
    #[must_use]
    pub fn rtt_quantile(&self, q: f64) -> Duration {
        if self.rtt_ns.is_empty() {
            return Duration::ZERO;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let i = ((self.rtt_ns.len() - 1) as f64 * q).round() as usize;
        Duration::from_nanos(u64::from(self.rtt_ns[i.min(self.rtt_ns.len() - 1)]))
    }

    fn merge(&mut self, other: LoadStats) {
        self.sent += other.sent;
        self.received += other.received;
        self.received_in_window += other.received_in_window;
        self.rtt_ns.extend(other.rtt_ns);
    }
}

/// The echo peer's receive buffer: above `net.core.rmem_max` when the bench may
/// (`SO_RCVBUFFORCE`, root), so a neighbour's burst on the shared cores does not make the
/// apparatus drop what the server relayed.
const ECHO_BUFFER: usize = 32 << 20;

#[allow(unsafe_code)]
fn force_recv_buffer(sock: &std::net::UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd as _;
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket and a c_int option value of the stated size. Failure (not root)
    // leaves the buffer as bind_udp set it.
    #[allow(clippy::cast_possible_truncation)]
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A UDP echo peer on 127.0.0.1: threads that send every datagram back to its sender, in
/// batches (recvmmsg/sendmmsg).
#[derive(Debug)]
pub struct EchoPeer {
    /// The peer's address.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoPeer {
    /// Starts `threads` echo threads on one socket.
    ///
    /// # Errors
    /// The socket could not be bound.
    pub fn start(threads: usize) -> anyhow::Result<Self> {
        let sock = bind_udp(SocketAddr::from(([127, 0, 0, 1], 0))).context("echo peer")?;
        force_recv_buffer(&sock, ECHO_BUFFER);
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let sock = sock.try_clone()?;
            let stop = stop.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("bench-echo-{i}"))
                    .spawn(move || {
                        // Batched both ways (recvmmsg/sendmmsg, each reply to its sender):
                        // the echo is the bench's apparatus and must not be the bottleneck.
                        let mut batch = Batch::new();
                        let all: Vec<usize> = (0..BATCH).collect();
                        while !stop.load(Ordering::Relaxed) {
                            let n = batch.recv(&sock);
                            batch.send(&sock, &all[..n]);
                        }
                    })?,
            );
        }
        Ok(Self {
            addr,
            stop,
            threads: handles,
        })
    }

    /// Stops the echo threads.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// One flow's client leg: an allocation, or a bare-forwarder socket.
enum Leg {
    Turn(Allocation),
    Bare(Link, ChannelNumber),
}

impl Leg {
    fn parts(&mut self) -> (&mut Link, ChannelNumber) {
        match self {
            Self::Turn(a) => (&mut a.link, a.channel),
            Self::Bare(l, c) => (l, *c),
        }
    }

    async fn release(self) {
        if let Self::Turn(a) = self {
            a.release().await;
        }
    }
}

/// Fresh REST credentials for allocation `i`.
fn creds(i: usize) -> Credentials {
    Credentials::rest(SECRET, &format!("bench{i}"), Duration::from_secs(3600))
}

/// Opens the legs `indices` of `target`, `in_flight` at a time.
async fn open_legs(
    target: &Target,
    indices: Vec<usize>,
    in_flight: usize,
) -> anyhow::Result<Vec<Leg>> {
    let mut legs = Vec::with_capacity(indices.len());
    match target {
        Target::Bare(addr) => {
            for i in indices {
                let channel = u16::try_from(i)
                    .ok()
                    .and_then(|i| i.checked_add(CHANNEL))
                    .and_then(|n| ChannelNumber::new(n).ok())
                    .context("too many flows for the bare forwarder")?;
                legs.push(Leg::Bare(Link::udp(fresh_udp(*addr)?), channel));
            }
        }
        Target::Turn {
            endpoint,
            transport,
            peer,
        } => {
            let mut set = JoinSet::new();
            let mut pending = indices.into_iter();
            let spawn = |set: &mut JoinSet<_>, i: usize| {
                let (endpoint, transport, peer) = (endpoint.clone(), *transport, *peer);
                set.spawn(async move {
                    Allocation::open(&endpoint, transport, &creds(i), peer, CHANNEL)
                        .await
                        .with_context(|| format!("allocation {i} over {}", transport.name()))
                });
            };
            for i in pending.by_ref().take(in_flight.max(1)) {
                spawn(&mut set, i);
            }
            while let Some(done) = set.join_next().await {
                legs.push(Leg::Turn(done??));
                if let Some(i) = pending.next() {
                    spawn(&mut set, i);
                }
            }
        }
    }
    Ok(legs)
}

/// The start line all client threads wait at after set-up.
#[derive(Default)]
struct StartLine {
    state: Mutex<StartState>,
    cv: Condvar,
}

#[derive(Default)]
struct StartState {
    ready: usize,
    failed: bool,
    /// `Some(Some(epoch))`: go; `Some(None)`: abandon.
    go: Option<Option<Instant>>,
}

impl StartLine {
    /// A client thread reports its set-up and waits for the epoch (`None`: abandon).
    fn arrive(&self, ok: bool) -> Option<Instant> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.ready += 1;
        s.failed |= !ok;
        self.cv.notify_all();
        let (s, _) = self
            .cv
            .wait_timeout_while(s, SETUP_LIMIT + Duration::from_secs(5), |s| s.go.is_none())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.go.flatten()
    }

    /// Abandons the run: every thread at (or arriving at) the line gives up.
    fn abandon(&self) {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.go = Some(None);
        self.cv.notify_all();
    }

    /// The main thread waits for `threads` arrivals, then starts everyone at `now + lead`
    /// (or abandons on a failure or a timeout). Returns the epoch.
    fn start(&self, threads: usize, lead: Duration) -> Option<Instant> {
        let s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut s, _) = self
            .cv
            .wait_timeout_while(s, SETUP_LIMIT, |s| s.ready < threads)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let go = (s.ready == threads && !s.failed).then(|| Instant::now() + lead);
        s.go = Some(go);
        self.cv.notify_all();
        go
    }
}

struct Shared {
    epoch: Instant,
    deadline: Instant,
    config: LoadConfig,
    flows: usize,
}

fn now_ns(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Writes a ChannelData frame's header (the length is the payload's) and stamp into `out`,
/// whose length is the frame's, stream padding included.
fn stamp(out: &mut [u8], channel: ChannelNumber, seq: u64, epoch: Instant, payload: usize) {
    let len = u16::try_from(payload).unwrap_or(u16::MAX);
    let mut hdr = [0u8; 4];
    ChannelData::write_header(channel, len, &mut hdr);
    out[..4].copy_from_slice(&hdr);
    out[4..12].copy_from_slice(&seq.to_be_bytes());
    out[12..20].copy_from_slice(&now_ns(epoch).to_be_bytes());
}

/// The send time stamped in an echoed ChannelData frame.
fn echoed_stamp(frame: &[u8]) -> Option<u64> {
    let cd = ChannelData::decode(frame).ok()?;
    let t: [u8; 8] = cd.data.get(8..STAMP)?.try_into().ok()?;
    Some(u64::from_be_bytes(t))
}

/// Drives one flow: sends by the mode's rule, records every echo, drains after the deadline.
/// `slot` of `slots` places a paced flow's phase within its period. Timers are few and
/// long-lived (the client shares the cores with the server under test).
async fn drive(
    link: &mut Link,
    channel: ChannelNumber,
    (slot, slots): (usize, usize),
    shared: &Shared,
    paced_by_thread: Option<&AtomicU64>,
) -> LoadStats {
    let cfg = shared.config;
    let mut stats = LoadStats::default();
    let is_stream = link.is_stream();
    let frame_len = if is_stream {
        (ChannelData::HEADER_LEN + cfg.payload + 3) & !3
    } else {
        ChannelData::HEADER_LEN + cfg.payload
    };
    let mut out = vec![0u8; frame_len];
    let mut seq = (slot as u64) << 40;
    let (window, rate) = match cfg.mode {
        Mode::Saturated { window } => (window.max(1), 0.0),
        Mode::Paced { pps } => (0, pps as f64 / shared.flows.max(1) as f64),
    };
    // Paced: this flow's own schedule, phase-shifted by its slot over one period.
    let period = if rate > 0.0 {
        Duration::from_secs_f64(1.0 / rate)
    } else {
        STALL
    };
    let first = shared.epoch + period.mul_f64(slot as f64 / slots.max(1) as f64);
    let mut tick = tokio::time::interval_at(first.into(), period.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut paced_count = 0u64;
    // Saturated: a window that heard nothing for a whole STALL is presumed lost.
    let mut stall = tokio::time::interval_at((Instant::now() + STALL).into(), STALL);
    let mut heard = false;
    let end = tokio::time::sleep_until(shared.deadline.into());
    tokio::pin!(end);
    let hard_stop = shared.deadline + DRAIN;
    let mut past = false;
    let mut failed = false;

    let mut to_send = window as u64;
    loop {
        for _ in 0..to_send {
            stamp(&mut out, channel, seq, shared.epoch, cfg.payload);
            seq += 1;
            if link.send(&out).await.is_ok() {
                stats.sent += 1;
            } else if is_stream {
                failed = true;
                break;
            }
        }
        to_send = 0;
        let sent = paced_by_thread.map_or(stats.sent, |n| n.load(Ordering::Relaxed));
        if failed || (past && stats.received >= sent) {
            break;
        }
        tokio::select! {
            r = link.recv() => match r {
                Ok(frame) => {
                    if let Some(sent_at) = echoed_stamp(frame) {
                        let rtt = now_ns(shared.epoch).saturating_sub(sent_at);
                        stats.received += 1;
                        heard = true;
                        if !past && Instant::now() < shared.deadline {
                            stats.received_in_window += 1;
                            stats.rtt_ns.push(u32::try_from(rtt).unwrap_or(u32::MAX));
                            to_send = u64::from(window > 0);
                        }
                    }
                }
                Err(_) if is_stream => failed = true,
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            },
            _ = tick.tick(), if window == 0 && !past && paced_by_thread.is_none() => {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let due = (Instant::now().saturating_duration_since(first).as_secs_f64() * rate)
                    as u64
                    + 1;
                to_send = due.saturating_sub(paced_count).min(64);
                paced_count += to_send;
            },
            _ = stall.tick(), if window > 0 && !past => {
                if !std::mem::take(&mut heard) {
                    to_send = window as u64;
                }
            },
            () = &mut end => {
                if past {
                    break;
                }
                past = true;
                end.as_mut().reset(hard_stop.into());
            },
        }
    }
    stats
}

/// A thread's pacer: `shared.config`'s rate times this thread's share of the flows,
/// round-robin over `socks`, on a 1 ms tick; `counts[i]` counts what flow `i` was sent.
async fn pace(
    socks: &[(Arc<tokio::net::UdpSocket>, ChannelNumber)],
    counts: &[AtomicU64],
    shared: &Shared,
) -> LoadStats {
    let cfg = shared.config;
    let Mode::Paced { pps } = cfg.mode else {
        return LoadStats::default();
    };
    let rate = pps as f64 * socks.len() as f64 / shared.flows.max(1) as f64;
    let mut stats = LoadStats::default();
    let mut out = vec![0u8; ChannelData::HEADER_LEN + cfg.payload];
    let mut tick = tokio::time::interval_at(shared.epoch.into(), Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seq = 1u64 << 63;
    let (mut next, mut count) = (0usize, 0u64);
    while Instant::now() < shared.deadline {
        tick.tick().await;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let due = (shared.epoch.elapsed().as_secs_f64() * rate) as u64;
        while count < due && Instant::now() < shared.deadline {
            let i = next % socks.len();
            let (sock, channel) = &socks[i];
            next += 1;
            count += 1;
            stamp(&mut out, *channel, seq, shared.epoch, cfg.payload);
            seq += 1;
            if sock.send(&out).await.is_ok() {
                stats.sent += 1;
                counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    stats
}

/// One client thread of a load run: set-up, the start line, load, release.
fn client_thread(
    target: &Target,
    indices: Vec<usize>,
    in_flight: usize,
    line: &StartLine,
    config: LoadConfig,
    flows: usize,
) -> anyhow::Result<LoadStats> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let legs = rt.block_on(open_legs(target, indices, in_flight));
    let Some(epoch) = line.arrive(legs.is_ok()) else {
        return match legs {
            Ok(legs) => {
                rt.block_on(release_all(legs));
                Ok(LoadStats::default())
            }
            Err(e) => Err(e),
        };
    };
    let legs = legs?;
    let shared = Arc::new(Shared {
        epoch,
        deadline: epoch + config.duration,
        config,
        flows,
    });
    let (stats, legs) = rt.block_on(async move {
        let mut set = JoinSet::new();
        let slots = legs.len();
        // Paced UDP: one pacer per thread sends for all its flows (a timer per flow would
        // cost the client more than the server it measures); the flows only receive.
        let mut pacer = None;
        if matches!(config.mode, Mode::Paced { .. }) {
            let socks: Option<Vec<_>> = legs
                .iter()
                .map(|l| match l {
                    Leg::Turn(a) => a.link.udp_socket().map(|s| (s, a.channel)),
                    Leg::Bare(l, c) => l.udp_socket().map(|s| (s, *c)),
                })
                .collect();
            if let Some(socks) = socks.filter(|s| !s.is_empty()) {
                let counts: Arc<Vec<AtomicU64>> =
                    Arc::new((0..socks.len()).map(|_| AtomicU64::new(0)).collect());
                pacer = Some((socks, counts));
            }
        }
        let counts = pacer.as_ref().map(|(_, c)| c.clone());
        for (k, mut leg) in legs.into_iter().enumerate() {
            let shared = shared.clone();
            let counts = counts.clone();
            set.spawn(async move {
                let (link, channel) = leg.parts();
                let own = counts.as_ref().and_then(|c| c.get(k));
                let stats = drive(link, channel, (k, slots), &shared, own).await;
                (stats, leg)
            });
        }
        let mut total = LoadStats::default();
        if let Some((socks, counts)) = pacer {
            total.merge(pace(&socks, &counts, &shared).await);
        }
        let mut legs = Vec::new();
        while let Some(done) = set.join_next().await {
            let (stats, leg) = done?;
            total.merge(stats);
            legs.push(leg);
        }
        anyhow::Ok((total, legs))
    })?;
    rt.block_on(release_all(legs));
    Ok(stats)
}

async fn release_all(legs: Vec<Leg>) {
    let mut set = JoinSet::new();
    for leg in legs {
        set.spawn(leg.release());
    }
    while set.join_next().await.is_some() {}
}

/// Opens `flows` flows through `target` (spread over `config.threads` client threads, set
/// up [`SETUP_IN_FLIGHT`] at a time), drives ChannelData over them for `config.duration`,
/// drains, and releases the allocations.
///
/// `on_start` runs right before the first packet and `on_deadline` right at the deadline,
/// so the caller can sample the server's cost over exactly the window.
///
/// # Errors
/// Set-up failed, or a client thread failed.
pub fn run(
    target: &Target,
    flows: usize,
    config: LoadConfig,
    on_start: impl FnOnce(),
    on_deadline: impl FnOnce(),
) -> anyhow::Result<LoadStats> {
    let threads = config.threads.clamp(1, flows.max(1));
    let in_flight = SETUP_IN_FLIGHT.div_ceil(threads);
    let line = Arc::new(StartLine::default());
    let mut handles = Vec::new();
    for t in 0..threads {
        let indices: Vec<usize> = (t..flows).step_by(threads).collect();
        let (target, waiting) = (target.clone(), line.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("bench-client-{t}"))
            .spawn(move || client_thread(&target, indices, in_flight, &waiting, config, flows));
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                // Release the threads already waiting at the start line.
                line.abandon();
                for h in handles {
                    let _ = h.join();
                }
                return Err(e.into());
            }
        }
    }
    let epoch = line.start(threads, Duration::from_millis(100));
    let mut total = LoadStats::default();
    if let Some(epoch) = epoch {
        std::thread::sleep(epoch.saturating_duration_since(Instant::now()));
        on_start();
        std::thread::sleep((epoch + config.duration).saturating_duration_since(Instant::now()));
        on_deadline();
    }
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(stats)) => total.merge(stats),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow!("a client thread panicked"));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if epoch.is_none() {
        return Err(anyhow!("set-up did not finish within {SETUP_LIMIT:?}"));
    }
    total.elapsed = config.duration;
    total.rtt_ns.sort_unstable();
    Ok(total)
}

/// What an allocation set-up run measured, client side.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetupStats {
    /// Allocations completed (all four transactions succeeded).
    pub opened: u64,
    /// Allocations that failed.
    pub failed: u64,
    /// Wall time from the first request to the last answer.
    pub elapsed: Duration,
}

impl SetupStats {
    /// Completed allocations per second.
    #[must_use]
    pub fn per_sec(&self) -> f64 {
        self.opened as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What the set-up tasks of every client thread share.
struct SetupShared {
    endpoint: Endpoint,
    peer: SocketAddr,
    total: usize,
    deadline: Instant,
    /// The next allocation's index (its credentials and client address).
    next: AtomicUsize,
    opened: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl SetupShared {
    /// One of the [`SETUP_IN_FLIGHT`] tasks: opens allocations one after another until
    /// `total` are taken or the deadline passes.
    async fn open_until_done(self: Arc<Self>) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.total || Instant::now() >= self.deadline {
                break;
            }
            let r = Allocation::open(
                &self.endpoint,
                Transport::Udp,
                &creds(1_000_000 + i),
                self.peer,
                CHANNEL,
            )
            .await;
            match r {
                Ok(a) => {
                    drop(a);
                    self.opened.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    let mut f = self
                        .first_error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    f.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
    }
}

/// Opens `total` UDP allocations on `endpoint` (each: 401 challenge, Allocate,
/// CreatePermission, ChannelBind to `peer`), [`SETUP_IN_FLIGHT`] at a time over `threads`
/// client threads, and *keeps* them: each client socket is closed once its allocation is
/// made (its address is never reused, see [`crate::link::next_client_addr`]), and the server
/// holds the allocation until its lifetime ends. Stops at `total` or after [`SETUP_LIMIT`].
///
/// `on_start` runs before the first request, `on_end` after the last answer.
///
/// # Errors
/// A client thread could not start.
pub fn setup_run(
    endpoint: &Endpoint,
    peer: SocketAddr,
    total: usize,
    threads: usize,
    on_start: impl FnOnce(),
    on_end: impl FnOnce(),
) -> anyhow::Result<SetupStats> {
    let threads = threads.max(1);
    let per_thread = SETUP_IN_FLIGHT.div_ceil(threads);
    let run = Arc::new(SetupShared {
        endpoint: endpoint.clone(),
        peer,
        total,
        deadline: Instant::now() + SETUP_LIMIT,
        next: AtomicUsize::new(0),
        opened: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    on_start();
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..threads {
        let run = run.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("bench-setup-{t}"))
                .spawn(move || -> anyhow::Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let mut set = JoinSet::new();
                        for _ in 0..per_thread {
                            set.spawn(run.clone().open_until_done());
                        }
                        while set.join_next().await.is_some() {}
                    });
                    Ok(())
                })?,
        );
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow!("a set-up thread panicked"))??;
    }
    let elapsed = start.elapsed();
    on_end();
    if let Some(e) = run
        .first_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    {
        eprintln!("  set-up: first failure: {e}");
    }
    Ok(SetupStats {
        opened: run.opened.load(Ordering::Relaxed),
        failed: run.failed.load(Ordering::Relaxed),
        elapsed,
    })
}
