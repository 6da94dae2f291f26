//! The data plane of the bench: a UDP echo peer and the ChannelData load loops.
//!
//! Every packet carries a sequence number and its send time (nanoseconds since the run's
//! epoch) in its first 16 bytes, so the echo's reply gives the round-trip time. Loops are
//! bounded: they send until the run's deadline, then drain for at most [`DRAIN`].

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use turn_proto::codec::{ChannelData, ChannelNumber};

/// How long the loops wait for stragglers after the deadline.
pub const DRAIN: Duration = Duration::from_millis(300);
/// In a saturated run, an allocation that hears nothing for this long re-primes its window
/// (its packets are presumed lost; they still count if they arrive later).
const STALL: Duration = Duration::from_secs(1);
/// Bytes of the stamp: sequence number and send time.
const STAMP: usize = 16;
/// Socket buffers the bench asks for (the kernel caps them at `net.core.*mem_max`).
const SOCKET_BUFFER: usize = 4 << 20;

/// How packets are offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Closed loop: each allocation keeps `window` packets in flight.
    Saturated {
        /// Packets in flight per allocation.
        window: usize,
    },
    /// Open loop: the clients together send `pps` packets per second.
    Paced {
        /// Packets per second sent by all clients together.
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

/// A UDP echo peer on 127.0.0.1: threads that send every datagram back to its sender.
#[derive(Debug)]
pub struct EchoPeer {
    /// The peer's address.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Binds a UDP socket with large buffers.
///
/// # Errors
/// The socket could not be bound.
pub fn bind_udp(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}

impl EchoPeer {
    /// Starts `threads` echo threads on one socket.
    ///
    /// # Errors
    /// The socket could not be bound.
    pub fn start(threads: usize) -> anyhow::Result<Self> {
        let sock = bind_udp(SocketAddr::from(([127, 0, 0, 1], 0))).context("echo peer")?;
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
                        let mut buf = [0u8; 2048];
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                                let _ = sock.send_to(&buf[..n], from);
                            }
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

/// One allocation's data path: its socket (connected to the server) and its channel.
#[derive(Debug)]
pub struct Flow {
    /// Client socket, connected to the server.
    pub socket: UdpSocket,
    /// The channel bound to the echo peer.
    pub channel: ChannelNumber,
}

struct Shared {
    epoch: Instant,
    deadline: Instant,
    config: LoadConfig,
}

fn stamp(packet: &mut [u8], channel: ChannelNumber, seq: u64, epoch: Instant, payload: usize) {
    let len = u16::try_from(payload).unwrap_or(u16::MAX);
    let mut hdr = [0u8; 4];
    ChannelData::write_header(channel, len, &mut hdr);
    packet[..4].copy_from_slice(&hdr);
    packet[4..12].copy_from_slice(&seq.to_be_bytes());
    let t = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    packet[12..20].copy_from_slice(&t.to_be_bytes());
}

/// Stamps and sends one packet (waiting for the socket to be writable, which on loopback
/// UDP is at once).
async fn send_one(
    sock: &tokio::net::UdpSocket,
    out: &mut [u8],
    channel: ChannelNumber,
    seq: &mut u64,
    shared: &Shared,
    stats: &mut LoadStats,
) {
    stamp(out, channel, *seq, shared.epoch, shared.config.payload);
    *seq += 1;
    if sock.send(out).await.is_ok() {
        stats.sent += 1;
    }
}

/// Per-allocation task: receives echoes, records their RTT, and in a saturated run sends the
/// next packet for each one received.
async fn flow_task(
    sock: Arc<tokio::net::UdpSocket>,
    channel: ChannelNumber,
    shared: Arc<Shared>,
    seq_base: u64,
) -> LoadStats {
    let cfg = shared.config;
    let window = match cfg.mode {
        Mode::Saturated { window } => window.max(1),
        Mode::Paced { .. } => 0,
    };
    let mut stats = LoadStats::default();
    let mut out = vec![0u8; ChannelData::HEADER_LEN + cfg.payload];
    let mut buf = vec![0u8; 2048];
    let mut seq = seq_base;
    for _ in 0..window {
        send_one(&sock, &mut out, channel, &mut seq, &shared, &mut stats).await;
    }
    let hard_stop = shared.deadline + DRAIN;
    loop {
        let now = Instant::now();
        if now >= hard_stop {
            break;
        }
        let past = now >= shared.deadline;
        if past && stats.received >= stats.sent && window > 0 {
            break;
        }
        let wait = if past { hard_stop - now } else { STALL };
        match tokio::time::timeout(wait, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let Ok(cd) = ChannelData::decode(&buf[..n]) else {
                    continue;
                };
                if cd.data.len() < STAMP {
                    continue;
                }
                let mut t = [0u8; 8];
                t.copy_from_slice(&cd.data[8..16]);
                let sent_at = u64::from_be_bytes(t);
                let now_ns = u64::try_from(shared.epoch.elapsed().as_nanos()).unwrap_or(0);
                let rtt = now_ns.saturating_sub(sent_at);
                stats.received += 1;
                if Instant::now() < shared.deadline {
                    stats.received_in_window += 1;
                    stats.rtt_ns.push(u32::try_from(rtt).unwrap_or(u32::MAX));
                    if window > 0 {
                        send_one(&sock, &mut out, channel, &mut seq, &shared, &mut stats).await;
                    }
                }
            }
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(_) => {
                // Silence for STALL with packets out: presume them lost and re-prime.
                if window > 0 && Instant::now() < shared.deadline {
                    for _ in 0..window {
                        send_one(&sock, &mut out, channel, &mut seq, &shared, &mut stats).await;
                    }
                }
            }
        }
    }
    stats
}

/// Paced sender of one client thread: `pps` packets per second round-robin over `socks`.
async fn pacer_task(
    socks: Vec<(Arc<tokio::net::UdpSocket>, ChannelNumber)>,
    shared: Arc<Shared>,
    pps: f64,
) -> LoadStats {
    let cfg = shared.config;
    let mut stats = LoadStats::default();
    let mut out = vec![0u8; ChannelData::HEADER_LEN + cfg.payload];
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut seq = 1u64 << 63;
    let mut next = 0usize;
    let mut count = 0u64;
    while Instant::now() < shared.deadline {
        tick.tick().await;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let due = (start.elapsed().as_secs_f64() * pps) as u64;
        while count < due {
            let (sock, channel) = &socks[next % socks.len()];
            next += 1;
            count += 1;
            send_one(sock, &mut out, *channel, &mut seq, &shared, &mut stats).await;
        }
    }
    stats
}

fn client_thread(flows: Vec<Flow>, shared: Arc<Shared>, pps: f64) -> anyhow::Result<LoadStats> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::sleep(shared.epoch.saturating_duration_since(Instant::now()));
    rt.block_on(async move {
        let mut tasks = Vec::new();
        let mut socks = Vec::new();
        for (i, f) in flows.into_iter().enumerate() {
            f.socket.set_nonblocking(true)?;
            let sock = Arc::new(tokio::net::UdpSocket::from_std(f.socket)?);
            socks.push((sock.clone(), f.channel));
            tasks.push(tokio::spawn(flow_task(
                sock,
                f.channel,
                shared.clone(),
                (i as u64) << 40,
            )));
        }
        let mut total = LoadStats::default();
        if matches!(shared.config.mode, Mode::Paced { .. }) && !socks.is_empty() {
            total.merge(pacer_task(socks, shared.clone(), pps).await);
        }
        for t in tasks {
            total.merge(t.await?);
        }
        anyhow::Ok(total)
    })
}

/// Drives ChannelData over `flows` for `config.duration`, then drains. Returns the flows'
/// sockets' stats; the flows are consumed (their sockets close).
///
/// `on_start` runs right before the first packet and `on_deadline` right at the deadline,
/// so the caller can sample the server's CPU time over exactly the window.
///
/// # Errors
/// A client thread failed to start or its runtime failed.
pub fn run(
    flows: Vec<Flow>,
    config: LoadConfig,
    on_start: impl FnOnce(),
    on_deadline: impl FnOnce(),
) -> anyhow::Result<LoadStats> {
    let threads = config.threads.clamp(1, flows.len().max(1));
    let mut per_thread: Vec<Vec<Flow>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, f) in flows.into_iter().enumerate() {
        per_thread[i % threads].push(f);
    }
    let pps = match config.mode {
        Mode::Paced { pps } => pps as f64 / threads as f64,
        Mode::Saturated { .. } => 0.0,
    };
    // Leave the threads a moment to build their runtimes before the clock starts.
    let epoch = Instant::now() + Duration::from_millis(100);
    let shared = Arc::new(Shared {
        epoch,
        deadline: epoch + config.duration,
        config,
    });
    let mut handles = Vec::new();
    for (i, flows) in per_thread.into_iter().enumerate() {
        let shared = shared.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("bench-client-{i}"))
                .spawn(move || client_thread(flows, shared, pps))?,
        );
    }
    std::thread::sleep(epoch.saturating_duration_since(Instant::now()));
    on_start();
    std::thread::sleep(shared.deadline.saturating_duration_since(Instant::now()));
    on_deadline();
    let mut total = LoadStats::default();
    for h in handles {
        let stats = h
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        total.merge(stats);
    }
    total.elapsed = config.duration;
    total.rtt_ns.sort_unstable();
    Ok(total)
}
