//! Prometheus metrics: per-worker counters summed at scrape time.
//!
//! The packet path touches no shared memory. Each worker thread owns a plain [`WorkerStats`]
//! (ordinary `u64` fields it mutates directly) and copies it into its slot with
//! [`Metrics::publish`] every ~100 ms; the slot is a `Mutex` only the worker and a scrape ever
//! take, so it is uncontended. A scrape ([`Metrics::render`]) sums the slots and adds the
//! process-wide values (draining, reloads, certificate expiry, relay ports), which are not on
//! the packet path and live in [`Metrics`] itself.
//!
//! Every family is `turnd_`-prefixed, has HELP text and bounded labels: transport, family,
//! method, reason, cause, direction, result, and the server's own relay addresses — never a
//! username or a client address. Every label combination is emitted from the start (as 0), so
//! `rate()` and `increase()` see the first event of a series.
//!
//! `turnd_auth_failures_total` counts the rejections answered with 401 or 438 *except* the
//! `unauthenticated` challenge (a request without credentials, the first step of every
//! allocation; it is counted in `turnd_rejections_total{reason="unauthenticated"}`), so an alert
//! on auth failures fires on wrong secrets and expired credentials, not on normal traffic.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};
use turn_proto::codec::{ErrorCode, Method};
use turn_proto::server::{
    DropReason, EndReason, Event, Reject, RelayedAddress, RequestKind, Stats, Transport,
};

/// Relayed-address family labels, in index order.
pub const FAMILIES: [&str; 2] = ["ipv4", "ipv6"];

/// Number of [`Reject`] reasons (columns of `WorkerStats::rejections`, by [`Reject::index`]).
pub const N_REJECT: usize = Reject::ALL.len();

/// Number of method rows of `WorkerStats::rejections`: one per [`RequestKind`] (by
/// [`RequestKind::index`]) and a last row, `other`, for methods the server does not serve.
pub const N_KINDS: usize = RequestKind::ALL.len() + 1;

/// Row of a method in `WorkerStats::rejections`.
#[must_use]
pub fn method_index(m: Method) -> usize {
    RequestKind::of(m).map_or(N_KINDS - 1, RequestKind::index)
}

fn method_label(row: usize) -> &'static str {
    RequestKind::ALL.get(row).map_or("other", |k| k.as_str())
}

/// Whether a rejection counts as an authentication failure (`turnd_auth_failures_total`): a
/// 401 or 438 answer other than the `unauthenticated` challenge. See the module docs.
#[must_use]
pub fn is_auth_failure(r: Reject) -> bool {
    r != Reject::Unauthenticated
        && (r.code() == ErrorCode::UNAUTHENTICATED || r.code() == ErrorCode::STALE_NONCE)
}

/// Every [`EndReason`], in `WorkerStats::allocations_ended` column order.
pub const END_REASONS: [EndReason; 4] = [
    EndReason::Expired,
    EndReason::Deleted,
    EndReason::ConnectionClosed,
    EndReason::Admin,
];

/// Number of [`EndReason`]s.
pub const N_END: usize = END_REASONS.len();

/// Column of an end reason in `WorkerStats::allocations_ended`.
#[must_use]
pub fn end_index(r: EndReason) -> usize {
    END_REASONS.iter().position(|x| *x == r).unwrap_or(0)
}

/// Why a TCP/TLS connection was refused or dropped before it carried STUN
/// (`turnd_connections_refused_total{cause}`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum RefuseCause {
    /// The client address already holds as many connections as one address may.
    PerIpCap,
    /// The process holds as many stream connections as it may.
    TotalCap,
    /// `accept` failed for lack of file descriptors (EMFILE/ENFILE).
    NoDescriptors,
    /// The TLS handshake failed.
    HandshakeFailed,
    /// The TLS handshake did not finish in time.
    HandshakeTimeout,
    /// The first bytes were neither STUN nor ChannelData (nor a TLS ClientHello).
    NotStun,
}

impl RefuseCause {
    /// Every cause, in `WorkerStats::connections_refused` order.
    pub const ALL: [Self; N_REFUSE] = [
        Self::PerIpCap,
        Self::TotalCap,
        Self::NoDescriptors,
        Self::HandshakeFailed,
        Self::HandshakeTimeout,
        Self::NotStun,
    ];

    /// The metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerIpCap => "per_ip_cap",
            Self::TotalCap => "total_cap",
            Self::NoDescriptors => "no_descriptors",
            Self::HandshakeFailed => "handshake_failed",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::NotStun => "not_stun",
        }
    }

    /// Index in `WorkerStats::connections_refused`.
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Number of [`RefuseCause`]s.
pub const N_REFUSE: usize = 6;

/// The family index (0 = IPv4, 1 = IPv6) of an allocation from its relayed addresses: IPv4 when
/// it has an IPv4 relayed address (a dual-stack allocation counts once, as IPv4), else IPv6.
#[must_use]
pub fn allocation_family(relayed: &[Option<RelayedAddress>; 2]) -> usize {
    let v4 = relayed.iter().flatten().any(|r| r.local.is_ipv4());
    usize::from(!v4)
}

/// One worker's counters. The worker mutates its own copy directly (no atomics) and hands a
/// copy to [`Metrics::publish`] now and then. Every field is a monotonic counter except
/// `allocations_active` and the gauges inside `core`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerStats {
    /// The protocol core's counters (relayed traffic, drops, …), copied from `Server::stats()`.
    pub core: Stats,
    /// Rejected requests: `[method_index][Reject::index]` (see [`method_index`]).
    pub rejections: [[u64; N_REJECT]; N_KINDS],
    /// Allocations created: `[Transport::index][family]` (family 0 = IPv4, 1 = IPv6).
    pub allocations_created: [[u64; 2]; 3],
    /// Allocations now held: `[Transport::index][family]` (a gauge kept by the `on_*` helpers).
    pub allocations_active: [[u64; 2]; 3],
    /// Allocations ended: `[Transport::index][EndReason column]` (see [`END_REASONS`]).
    pub allocations_ended: [[u64; N_END]; 3],
    /// Stream connections accepted, by transport (UDP stays 0).
    pub connections_opened: [u64; 3],
    /// Stream connections closed, by transport; active = opened − closed.
    pub connections_closed: [u64; 3],
    /// Connections refused, by [`RefuseCause::index`].
    pub connections_refused: [u64; N_REFUSE],
    /// TLS handshakes: `[succeeded, failed]`.
    pub tls_handshakes: [u64; 2],
    /// Datagrams or frames the OS refused to send.
    pub send_errors: u64,
    /// Frames dropped because a stream connection's write queue was full.
    pub write_queue_drops: u64,
    /// Sockets not opened because the process ran out of file descriptors (accept or bind).
    pub descriptor_exhaustion: u64,
    /// Errors a UDP socket reported on receive (ICMP unreachable and the like).
    pub receive_errors: u64,
    /// Datagrams dropped for being longer than the io backend's receive buffers.
    pub oversized_datagrams: u64,
}

impl Default for WorkerStats {
    fn default() -> Self {
        Self {
            core: Stats::default(),
            rejections: [[0; N_REJECT]; N_KINDS],
            allocations_created: [[0; 2]; 3],
            allocations_active: [[0; 2]; 3],
            allocations_ended: [[0; N_END]; 3],
            connections_opened: [0; 3],
            connections_closed: [0; 3],
            connections_refused: [0; N_REFUSE],
            tls_handshakes: [0; 2],
            send_errors: 0,
            write_queue_drops: 0,
            descriptor_exhaustion: 0,
            receive_errors: 0,
            oversized_datagrams: 0,
        }
    }
}

impl WorkerStats {
    /// Counts the metric-relevant [`Event`]s of the core (allocations created and ended,
    /// rejections); other events are ignored. Call it for every event `poll_event` returns.
    pub fn on_event(&mut self, event: &Event) {
        match event {
            Event::AllocationCreated {
                five_tuple,
                relayed,
                ..
            } => self.on_allocation_created(five_tuple.transport, allocation_family(relayed)),
            Event::AllocationEnded {
                five_tuple,
                relayed,
                reason,
                ..
            } => {
                self.on_allocation_ended(five_tuple.transport, allocation_family(relayed), *reason)
            }
            Event::Rejected { method, reason, .. } => self.on_rejected(*method, *reason),
            _ => {}
        }
    }

    /// A request was answered with an error.
    pub fn on_rejected(&mut self, method: Method, reason: Reject) {
        self.rejections[method_index(method)][reason.index()] += 1;
    }

    /// An allocation was created (`family`: 0 = IPv4, 1 = IPv6; see [`allocation_family`]).
    pub fn on_allocation_created(&mut self, transport: Transport, family: usize) {
        let (t, f) = (transport.index(), family.min(1));
        self.allocations_created[t][f] += 1;
        self.allocations_active[t][f] += 1;
    }

    /// An allocation ended.
    pub fn on_allocation_ended(&mut self, transport: Transport, family: usize, reason: EndReason) {
        let (t, f) = (transport.index(), family.min(1));
        self.allocations_ended[t][end_index(reason)] += 1;
        self.allocations_active[t][f] = self.allocations_active[t][f].saturating_sub(1);
    }

    /// A stream connection was accepted.
    pub fn on_connection_opened(&mut self, transport: Transport) {
        self.connections_opened[transport.index()] += 1;
    }

    /// A stream connection closed (after [`Self::on_connection_opened`]).
    pub fn on_connection_closed(&mut self, transport: Transport) {
        self.connections_closed[transport.index()] += 1;
    }

    /// A connection was refused or dropped before carrying STUN.
    pub fn on_connection_refused(&mut self, cause: RefuseCause) {
        self.connections_refused[cause.index()] += 1;
        if cause == RefuseCause::NoDescriptors {
            self.descriptor_exhaustion += 1;
        }
    }

    /// A TLS handshake finished (`ok`) or failed.
    pub fn on_tls_handshake(&mut self, ok: bool) {
        self.tls_handshakes[usize::from(!ok)] += 1;
    }

    /// Adds every counter and gauge of `other` into `self` (a scrape's sum over workers).
    pub fn add(&mut self, other: &Self) {
        add_core(&mut self.core, &other.core);
        add2(&mut self.rejections, &other.rejections);
        add2(&mut self.allocations_created, &other.allocations_created);
        add2(&mut self.allocations_active, &other.allocations_active);
        add2(&mut self.allocations_ended, &other.allocations_ended);
        add1(&mut self.connections_opened, &other.connections_opened);
        add1(&mut self.connections_closed, &other.connections_closed);
        add1(&mut self.connections_refused, &other.connections_refused);
        add1(&mut self.tls_handshakes, &other.tls_handshakes);
        self.send_errors += other.send_errors;
        self.write_queue_drops += other.write_queue_drops;
        self.descriptor_exhaustion += other.descriptor_exhaustion;
        self.receive_errors += other.receive_errors;
        self.oversized_datagrams += other.oversized_datagrams;
    }
}

fn add1<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_add(*y);
    }
}

fn add2<const N: usize, const M: usize>(a: &mut [[u64; N]; M], b: &[[u64; N]; M]) {
    for (x, y) in a.iter_mut().zip(b) {
        add1(x, y);
    }
}

fn add_core(a: &mut Stats, b: &Stats) {
    add1(&mut a.drops, &b.drops);
    add1(&mut a.packets_to_peer, &b.packets_to_peer);
    add1(&mut a.bytes_to_peer, &b.bytes_to_peer);
    add1(&mut a.packets_from_peer, &b.packets_from_peer);
    add1(&mut a.bytes_from_peer, &b.bytes_from_peer);
    add2(&mut a.requests, &b.requests);
    a.permissions_active += b.permissions_active;
    a.channels_active += b.channels_active;
    a.allocations_active += b.allocations_active;
}

/// A source of relay port counts, called at every scrape: `(relay ip, in use, available)`.
pub type RelayPortsFn = dyn Fn() -> Vec<(IpAddr, u64, u64)> + Send + Sync;

struct Slot {
    stats: WorkerStats,
    published: Option<Instant>,
}

/// The process's metrics: one slot per worker plus the process-wide values. Share it in an
/// `Arc`; every method takes `&self`.
pub struct Metrics {
    version: String,
    io_backend: String,
    slots: Vec<Mutex<Slot>>,
    draining: AtomicBool,
    reloads: [AtomicU64; 2],
    /// Certificate not-after in unix seconds; `u64::MAX` = none.
    certificate_not_after: AtomicU64,
    relay_ports: Mutex<BTreeMap<IpAddr, (u64, u64)>>,
    relay_ports_fn: Mutex<Option<Box<RelayPortsFn>>>,
    descs: Vec<Desc>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("workers", &self.slots.len())
            .field("io_backend", &self.io_backend)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking worker must not take the scrape down with it: the data is plain counters.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Metrics {
    /// Metrics for `workers` workers; `version` and `io_backend` label `turnd_build_info`.
    #[must_use]
    pub fn new(workers: usize, version: &str, io_backend: &str) -> Self {
        let descs = FAMILIES_DEF
            .iter()
            .filter_map(|f| {
                Desc::new(
                    f.name.to_owned(),
                    f.help.to_owned(),
                    f.labels.iter().map(|l| (*l).to_owned()).collect(),
                    std::collections::HashMap::new(),
                )
                .ok()
            })
            .collect();
        Self {
            version: version.to_owned(),
            io_backend: io_backend.to_owned(),
            slots: (0..workers)
                .map(|_| {
                    Mutex::new(Slot {
                        stats: WorkerStats::default(),
                        published: None,
                    })
                })
                .collect(),
            draining: AtomicBool::new(false),
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
            certificate_not_after: AtomicU64::new(u64::MAX),
            relay_ports: Mutex::new(BTreeMap::new()),
            relay_ports_fn: Mutex::new(None),
            descs,
        }
    }

    /// Number of worker slots.
    #[must_use]
    pub fn workers(&self) -> usize {
        self.slots.len()
    }

    /// Worker `worker` publishes its counters (call every ~100 ms, and once before it exits).
    /// An index beyond the slots is ignored.
    pub fn publish(&self, worker: usize, stats: &WorkerStats) {
        if let Some(slot) = self.slots.get(worker) {
            let mut slot = lock(slot);
            slot.stats.clone_from(stats);
            slot.published = Some(Instant::now());
        }
    }

    /// How long ago the worker that published least recently did so; `None` while some worker
    /// has never published. A liveness check can compare it with a few publish periods.
    #[must_use]
    pub fn oldest_publish_age(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut oldest = Duration::ZERO;
        for slot in &self.slots {
            let published = lock(slot).published?;
            oldest = oldest.max(now.saturating_duration_since(published));
        }
        Some(oldest)
    }

    /// The sum of every worker's last published counters.
    #[must_use]
    pub fn sum(&self) -> WorkerStats {
        let mut total = WorkerStats::default();
        for slot in &self.slots {
            total.add(&lock(slot).stats);
        }
        total
    }

    /// Whether the server is draining (`turnd_draining`).
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// Counts one configuration reload attempt (`turnd_config_reloads_total{result}`).
    pub fn reload_result(&self, ok: bool) {
        self.reloads[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// The TLS certificate's not-after time in unix seconds; `None` without TLS.
    pub fn set_certificate_not_after(&self, not_after: Option<u64>) {
        self.certificate_not_after
            .store(not_after.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Port counts of one relay address (`turnd_relay_ports_in_use` / `_available`).
    pub fn set_relay_ports(&self, ip: IpAddr, in_use: u64, available: u64) {
        lock(&self.relay_ports).insert(ip, (in_use, available));
    }

    /// Registers a function called at every scrape for the relay port counts; its answers
    /// replace values given to [`Self::set_relay_ports`] for the same address.
    pub fn set_relay_ports_source(&self, source: Box<RelayPortsFn>) {
        *lock(&self.relay_ports_fn) = Some(source);
    }

    /// The Prometheus text exposition (format 0.0.4) of every family.
    #[must_use]
    pub fn render(&self) -> String {
        let families = self.collect();
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding plain families into a Vec cannot fail: the names and labels are ours.
        if TextEncoder::new().encode(&families, &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// The content type of [`Self::render`]'s output.
    #[must_use]
    pub fn content_type() -> &'static str {
        prometheus::TEXT_FORMAT
    }

    fn relay_ports_now(&self) -> BTreeMap<IpAddr, (u64, u64)> {
        let mut ports = lock(&self.relay_ports).clone();
        if let Some(source) = lock(&self.relay_ports_fn).as_ref() {
            for (ip, in_use, available) in source() {
                ports.insert(ip, (in_use, available));
            }
        }
        ports
    }

    fn build(&self) -> Vec<MetricFamily> {
        let s = self.sum();
        let c = &s.core;
        let mut b = Builder::default();

        b.family("turnd_build_info", |f| {
            f.sample(&[&self.version, &self.io_backend], 1);
        });
        b.family("turnd_allocations_active", |f| {
            f.by_transport_family(&s.allocations_active);
        });
        b.family("turnd_allocations_created_total", |f| {
            f.by_transport_family(&s.allocations_created);
        });
        b.family("turnd_allocations_ended_total", |f| {
            for (t, row) in Transport::ALL.iter().zip(&s.allocations_ended) {
                for (reason, v) in END_REASONS.iter().zip(row) {
                    f.sample(&[t.as_str(), reason.as_str()], *v);
                }
            }
        });
        b.family("turnd_relayed_packets_total", |f| {
            f.by_direction_transport(&c.packets_to_peer, &c.packets_from_peer);
        });
        b.family("turnd_relayed_bytes_total", |f| {
            f.by_direction_transport(&c.bytes_to_peer, &c.bytes_from_peer);
        });
        b.family("turnd_requests_total", |f| {
            for (kind, [ok, err]) in RequestKind::ALL.iter().zip(&c.requests) {
                f.sample(&[kind.as_str(), "success"], *ok);
                f.sample(&[kind.as_str(), "error"], *err);
            }
        });
        b.family("turnd_rejections_total", |f| {
            for (row, counts) in s.rejections.iter().enumerate() {
                for (reason, v) in Reject::ALL.iter().zip(counts) {
                    f.sample(&[method_label(row), reason.as_str()], *v);
                }
            }
        });
        b.family("turnd_auth_failures_total", |f| {
            for reason in Reject::ALL {
                if is_auth_failure(reason) {
                    let v = s.rejections.iter().map(|row| row[reason.index()]).sum();
                    f.sample(&[reason.as_str()], v);
                }
            }
        });
        b.family("turnd_drops_total", |f| {
            for (reason, v) in DropReason::ALL.iter().zip(&c.drops) {
                f.sample(&[reason.as_str()], *v);
            }
        });

        b.family("turnd_permissions_active", |f| {
            f.sample(&[], c.permissions_active);
        });
        b.family("turnd_channels_active", |f| {
            f.sample(&[], c.channels_active)
        });

        let ports = self.relay_ports_now();
        b.family("turnd_relay_ports_in_use", |f| {
            for (ip, (in_use, _)) in &ports {
                f.sample(&[&ip.to_string()], *in_use);
            }
        });
        b.family("turnd_relay_ports_available", |f| {
            for (ip, (_, available)) in &ports {
                f.sample(&[&ip.to_string()], *available);
            }
        });

        b.family("turnd_connections_active", |f| {
            for t in [Transport::Tcp, Transport::Tls] {
                let i = t.index();
                let active = s.connections_opened[i].saturating_sub(s.connections_closed[i]);
                f.sample(&[t.as_str()], active);
            }
        });
        b.family("turnd_connections_refused_total", |f| {
            for cause in RefuseCause::ALL {
                f.sample(&[cause.as_str()], s.connections_refused[cause.index()]);
            }
        });
        b.family("turnd_tls_handshakes_total", |f| {
            f.sample(&["success"], s.tls_handshakes[0]);
            f.sample(&["failure"], s.tls_handshakes[1]);
        });
        b.family("turnd_certificate_not_after_timestamp_seconds", |f| {
            let not_after = self.certificate_not_after.load(Ordering::Relaxed);
            if not_after != u64::MAX {
                f.sample(&[], not_after);
            }
        });
        b.family("turnd_config_reloads_total", |f| {
            f.sample(&["success"], self.reloads[0].load(Ordering::Relaxed));
            f.sample(&["failure"], self.reloads[1].load(Ordering::Relaxed));
        });
        b.family("turnd_draining", |f| {
            f.sample(&[], u64::from(self.draining.load(Ordering::Relaxed)));
        });
        b.family("turnd_send_errors_total", |f| f.sample(&[], s.send_errors));
        b.family("turnd_stream_write_drops_total", |f| {
            f.sample(&[], s.write_queue_drops);
        });
        b.family("turnd_descriptor_exhaustion_total", |f| {
            f.sample(&[], s.descriptor_exhaustion);
        });
        b.family("turnd_receive_errors_total", |f| {
            f.sample(&[], s.receive_errors)
        });
        b.family("turnd_oversized_datagrams_total", |f| {
            f.sample(&[], s.oversized_datagrams);
        });

        b.families
    }
}

impl Collector for Metrics {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.build()
    }
}

/// Kind of a family.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counter,
    Gauge,
}

/// One family's definition: the single home of its name, type, help text and label names.
struct FamilyDef {
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
}

const fn def(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> FamilyDef {
    FamilyDef {
        name,
        kind,
        labels,
        help,
    }
}

/// Every family turnd exports, in exposition order.
const FAMILIES_DEF: &[FamilyDef] = &[
    def("turnd_build_info", Kind::Gauge, &["version", "io_backend"],
        "Always 1; labelled with the turnd version and the IO backend in use."),
    def("turnd_allocations_active", Kind::Gauge, &["transport", "family"],
        "Allocations held now, by client transport and relayed address family (a dual-stack allocation counts as ipv4)."),
    def("turnd_allocations_created_total", Kind::Counter, &["transport", "family"],
        "Allocations created, by client transport and relayed address family."),
    def("turnd_allocations_ended_total", Kind::Counter, &["transport", "cause"],
        "Allocations ended, by client transport and cause (expired, deleted, connection_closed, admin)."),
    def("turnd_relayed_packets_total", Kind::Counter, &["direction", "transport"],
        "Datagrams relayed, by direction (client_to_peer, peer_to_client) and client transport."),
    def("turnd_relayed_bytes_total", Kind::Counter, &["direction", "transport"],
        "Payload bytes relayed, by direction and client transport."),
    def("turnd_requests_total", Kind::Counter, &["method", "result"],
        "STUN/TURN requests answered, by method and result (success, error)."),
    def("turnd_rejections_total", Kind::Counter, &["method", "reason"],
        "Requests answered with an error response, by method and reason."),
    def("turnd_auth_failures_total", Kind::Counter, &["reason"],
        "Requests refused with 401 or 438, by reason; the unauthenticated challenge is not a failure and is not counted here."),
    def("turnd_drops_total", Kind::Counter, &["reason"],
        "Datagrams dropped without an answer, by reason."),
    def("turnd_permissions_active", Kind::Gauge, &[],
        "Permissions held now over all allocations."),
    def("turnd_channels_active", Kind::Gauge, &[],
        "Channel bindings held now over all allocations."),
    def("turnd_relay_ports_in_use", Kind::Gauge, &["relay_ip"],
        "Relay ports bound or reserved now, by relay address."),
    def("turnd_relay_ports_available", Kind::Gauge, &["relay_ip"],
        "Relay ports free now, by relay address."),
    def("turnd_connections_active", Kind::Gauge, &["transport"],
        "TCP and TLS client connections open now."),
    def("turnd_connections_refused_total", Kind::Counter, &["cause"],
        "Client connections refused or closed before carrying STUN, by cause."),
    def("turnd_tls_handshakes_total", Kind::Counter, &["result"],
        "TLS handshakes with clients, by result (success, failure)."),
    def("turnd_certificate_not_after_timestamp_seconds", Kind::Gauge, &[],
        "Expiry (not-after) of the TLS certificate in use, in unix seconds; absent without TLS."),
    def("turnd_config_reloads_total", Kind::Counter, &["result"],
        "Configuration reloads, by result (success, failure)."),
    def("turnd_draining", Kind::Gauge, &[],
        "1 while the server drains (refuses new allocations, keeps existing ones), else 0."),
    def("turnd_send_errors_total", Kind::Counter, &[],
        "Datagrams or frames the operating system refused to send."),
    def("turnd_stream_write_drops_total", Kind::Counter, &[],
        "Frames dropped because a TCP/TLS connection's write queue was full."),
    def("turnd_descriptor_exhaustion_total", Kind::Counter, &[],
        "Sockets not opened because the process ran out of file descriptors."),
    def("turnd_receive_errors_total", Kind::Counter, &[],
        "Errors UDP sockets reported on receive (ICMP unreachable and the like)."),
    def("turnd_oversized_datagrams_total", Kind::Counter, &[],
        "Datagrams dropped for being longer than the io backend's receive buffers."),
];

fn family_def(name: &str) -> &'static FamilyDef {
    FAMILIES_DEF
        .iter()
        .find(|f| f.name == name)
        .unwrap_or(&FAMILIES_DEF[0])
}

#[derive(Default)]
struct Builder {
    families: Vec<MetricFamily>,
}

impl Builder {
    /// Builds one family with `fill`; a family left without samples (no certificate, no relay
    /// address) is left out, since HELP and TYPE lines without a sample only confuse a reader.
    fn family(&mut self, name: &str, fill: impl FnOnce(&mut FamilyBuilder)) {
        let def = family_def(name);
        debug_assert_eq!(def.name, name, "family {name} is not in FAMILIES_DEF");
        let mut family = MetricFamily::default();
        family.set_name(def.name.to_owned());
        family.set_help(def.help.to_owned());
        family.set_field_type(match def.kind {
            Kind::Counter => MetricType::COUNTER,
            Kind::Gauge => MetricType::GAUGE,
        });
        let mut f = FamilyBuilder { def, family };
        fill(&mut f);
        if !f.family.get_metric().is_empty() {
            self.families.push(f.family);
        }
    }
}

struct FamilyBuilder {
    def: &'static FamilyDef,
    family: MetricFamily,
}

impl FamilyBuilder {
    fn by_transport_family(&mut self, values: &[[u64; 2]; 3]) {
        for (t, row) in Transport::ALL.iter().zip(values) {
            for (family, v) in FAMILIES.iter().zip(row) {
                self.sample(&[t.as_str(), family], *v);
            }
        }
    }

    fn by_direction_transport(&mut self, to_peer: &[u64; 3], from_peer: &[u64; 3]) {
        for (direction, values) in [("client_to_peer", to_peer), ("peer_to_client", from_peer)] {
            for (t, v) in Transport::ALL.iter().zip(values) {
                self.sample(&[direction, t.as_str()], *v);
            }
        }
    }

    #[allow(clippy::cast_precision_loss)] // counters pass 2^53 after centuries of traffic
    fn sample(&mut self, labels: &[&str], value: u64) {
        debug_assert_eq!(labels.len(), self.def.labels.len(), "{}", self.def.name);
        let mut metric = proto::Metric::default();
        metric.set_label(
            self.def
                .labels
                .iter()
                .zip(labels)
                .map(|(name, value)| {
                    let mut pair = LabelPair::default();
                    pair.set_name((*name).to_owned());
                    pair.set_value((*value).to_owned());
                    pair
                })
                .collect(),
        );
        match self.def.kind {
            Kind::Counter => {
                let mut c = proto::Counter::default();
                c.set_value(value as f64);
                metric.set_counter(c);
            }
            Kind::Gauge => {
                let mut g = proto::Gauge::default();
                g.set_value(value as f64);
                metric.set_gauge(g);
            }
        }
        self.family.mut_metric().push(metric);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use std::net::SocketAddr;
    use turn_proto::server::{AllocationId, AllocationStats, FiveTuple, RelayHandle, Route};

    /// One parsed sample: family name, labels, value.
    type Series = BTreeMap<(String, BTreeMap<String, String>), f64>;

    /// A strict reader of the text exposition format 0.0.4: HELP and TYPE before a family's
    /// samples, valid metric and label names, quoted and escaped label values, float values,
    /// no series twice. Returns the series, or what was wrong with which line.
    fn parse_exposition(text: &str) -> Result<(Series, HashMap<String, String>), String> {
        fn valid_name(s: &str, colon: bool) -> bool {
            let mut chars = s.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
        }
        let mut series = Series::new();
        let mut types = HashMap::new();
        let mut helps = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let err = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest
                    .split_once(' ')
                    .ok_or_else(|| err("HELP without text"))?;
                if helps.insert(name.to_owned(), help.to_owned()).is_some() {
                    return Err(err("second HELP"));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .ok_or_else(|| err("TYPE without type"))?;
                if !["counter", "gauge"].contains(&kind) {
                    return Err(err("unexpected type"));
                }
                if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                    return Err(err("second TYPE"));
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let name_end = line.find(['{', ' ']).ok_or_else(|| err("no value"))?;
            let name = &line[..name_end];
            if !valid_name(name, true) {
                return Err(err("bad metric name"));
            }
            if !types.contains_key(name) || !helps.contains_key(name) {
                return Err(err("sample before its HELP and TYPE"));
            }
            let mut labels = BTreeMap::new();
            let mut rest = &line[name_end..];
            if let Some(mut l) = rest.strip_prefix('{') {
                loop {
                    if let Some(r) = l.strip_prefix('}') {
                        rest = r;
                        break;
                    }
                    let (key, r) = l
                        .split_once("=\"")
                        .ok_or_else(|| err("label without value"))?;
                    if !valid_name(key, false) {
                        return Err(err("bad label name"));
                    }
                    let mut value = String::new();
                    let mut chars = r.char_indices();
                    let end = loop {
                        match chars.next() {
                            Some((_, '\\')) => match chars.next() {
                                Some((_, 'n')) => value.push('\n'),
                                Some((_, c @ ('\\' | '"'))) => value.push(c),
                                _ => return Err(err("bad escape")),
                            },
                            Some((i, '"')) => break i,
                            Some((_, c)) => value.push(c),
                            None => return Err(err("unterminated label value")),
                        }
                    };
                    if labels.insert(key.to_owned(), value).is_some() {
                        return Err(err("label twice"));
                    }
                    l = &r[end + 1..];
                    l = l.strip_prefix(',').unwrap_or(l);
                }
            }
            let value: f64 = rest
                .trim()
                .parse()
                .map_err(|_| err("value is not a number"))?;
            if series.insert((name.to_owned(), labels), value).is_some() {
                return Err(err("series twice"));
            }
        }
        Ok((series, types))
    }

    fn get(series: &Series, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = (
            name.to_owned(),
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        *series
            .get(&key)
            .unwrap_or_else(|| panic!("no series {name}{labels:?}"))
    }

    fn relayed(local: &str) -> RelayedAddress {
        let local: SocketAddr = local.parse().expect("address");
        RelayedAddress {
            handle: RelayHandle(0),
            local,
            advertised: local,
        }
    }

    fn tuple(transport: Transport) -> FiveTuple {
        FiveTuple {
            client: "198.51.100.7:40000".parse().expect("address"),
            server: "192.0.2.1:3478".parse().expect("address"),
            transport,
        }
    }

    fn created(transport: Transport, relayed: [Option<RelayedAddress>; 2]) -> Event {
        Event::AllocationCreated {
            id: AllocationId(1),
            route: Route(0),
            five_tuple: tuple(transport),
            username: "alice-the-user".into(),
            relayed,
            lifetime: Duration::from_secs(600),
        }
    }

    fn ended(transport: Transport, relayed: [Option<RelayedAddress>; 2]) -> Event {
        Event::AllocationEnded {
            id: AllocationId(1),
            route: Route(0),
            five_tuple: tuple(transport),
            username: "alice-the-user".into(),
            relayed,
            duration: Duration::from_secs(5),
            stats: AllocationStats::default(),
            reason: EndReason::Deleted,
        }
    }

    fn rejected(method: Method, reason: Reject) -> Event {
        Event::Rejected {
            client: "198.51.100.7:40000".parse().expect("address"),
            username: Some("alice-the-user".into()),
            transport: Transport::Udp,
            method,
            reason,
        }
    }

    /// Two workers' traffic, as a worker loop would count it.
    fn two_workers() -> Metrics {
        let m = Metrics::new(2, "0.1.0", "epoll");
        let v4 = [Some(relayed("10.0.0.1:50000")), None];
        let v6 = [None, Some(relayed("[2001:db8::1]:50002"))];

        let mut a = WorkerStats::default();
        a.core.packets_to_peer[Transport::Udp.index()] = 10;
        a.core.bytes_to_peer[Transport::Udp.index()] = 1000;
        a.core.packets_from_peer[Transport::Tcp.index()] = 3;
        a.core.requests[RequestKind::Allocate.index()] = [2, 1];
        a.core.drops[DropReason::NoPermission.index()] = 4;
        a.core.permissions_active = 2;
        a.on_event(&created(Transport::Udp, v4));
        a.on_event(&created(Transport::Udp, v4));
        a.on_event(&ended(Transport::Udp, v4));
        a.on_event(&rejected(Method::ALLOCATE, Reject::Unauthenticated));
        a.on_event(&rejected(Method::ALLOCATE, Reject::BadIntegrity));
        a.on_event(&rejected(Method(0x0ff), Reject::UnknownMethod));
        a.on_connection_opened(Transport::Tls);
        a.on_tls_handshake(true);
        a.on_connection_refused(RefuseCause::NoDescriptors);

        let mut b = WorkerStats::default();
        b.core.packets_to_peer[Transport::Udp.index()] = 5;
        b.core.bytes_to_peer[Transport::Udp.index()] = 500;
        b.core.requests[RequestKind::Allocate.index()] = [1, 0];
        b.core.drops[DropReason::NoPermission.index()] = 1;
        b.core.permissions_active = 1;
        b.on_event(&created(Transport::Tcp, v6));
        b.on_event(&rejected(Method::REFRESH, Reject::StaleNonce));
        b.on_event(&rejected(Method::ALLOCATE, Reject::BadIntegrity));
        b.on_connection_opened(Transport::Tls);
        b.on_connection_opened(Transport::Tls);
        b.on_connection_closed(Transport::Tls);
        b.on_tls_handshake(false);
        b.send_errors = 7;

        m.publish(0, &a);
        m.publish(1, &b);
        m
    }

    #[test]
    fn scrape_sums_every_workers_counters() {
        let m = two_workers();
        let (s, _) = parse_exposition(&m.render()).expect("valid exposition");
        let udp_out = [("direction", "client_to_peer"), ("transport", "udp")];
        assert_eq!(get(&s, "turnd_relayed_packets_total", &udp_out), 15.0);
        assert_eq!(get(&s, "turnd_relayed_bytes_total", &udp_out), 1500.0);
        let tcp_in = [("direction", "peer_to_client"), ("transport", "tcp")];
        assert_eq!(get(&s, "turnd_relayed_packets_total", &tcp_in), 3.0);
        let alloc_ok = [("method", "allocate"), ("result", "success")];
        assert_eq!(get(&s, "turnd_requests_total", &alloc_ok), 3.0);
        assert_eq!(
            get(&s, "turnd_drops_total", &[("reason", "no_permission")]),
            5.0
        );
        assert_eq!(get(&s, "turnd_permissions_active", &[]), 3.0);
        assert_eq!(get(&s, "turnd_send_errors_total", &[]), 7.0);
        let bad = [("method", "allocate"), ("reason", "bad_integrity")];
        assert_eq!(get(&s, "turnd_rejections_total", &bad), 2.0);
        let other = [("method", "other"), ("reason", "unknown_method")];
        assert_eq!(get(&s, "turnd_rejections_total", &other), 1.0);
    }

    #[test]
    fn allocations_are_counted_by_transport_family_and_cause() {
        let (s, _) = parse_exposition(&two_workers().render()).expect("valid exposition");
        let udp4 = [("transport", "udp"), ("family", "ipv4")];
        let tcp6 = [("transport", "tcp"), ("family", "ipv6")];
        assert_eq!(get(&s, "turnd_allocations_created_total", &udp4), 2.0);
        assert_eq!(get(&s, "turnd_allocations_active", &udp4), 1.0);
        assert_eq!(get(&s, "turnd_allocations_active", &tcp6), 1.0);
        let deleted = [("transport", "udp"), ("cause", "deleted")];
        assert_eq!(get(&s, "turnd_allocations_ended_total", &deleted), 1.0);
        let admin = [("transport", "tls"), ("cause", "admin")];
        assert_eq!(get(&s, "turnd_allocations_ended_total", &admin), 0.0);
    }

    #[test]
    fn dual_stack_allocation_counts_once_as_ipv4() {
        let dual = [
            Some(relayed("10.0.0.1:50000")),
            Some(relayed("[2001:db8::1]:50000")),
        ];
        assert_eq!(allocation_family(&dual), 0);
        assert_eq!(allocation_family(&[None, dual[1]]), 1);
    }

    #[test]
    fn auth_failures_count_401_and_438_but_not_the_challenge() {
        let (s, _) = parse_exposition(&two_workers().render()).expect("valid exposition");
        assert_eq!(
            get(
                &s,
                "turnd_auth_failures_total",
                &[("reason", "bad_integrity")]
            ),
            2.0
        );
        assert_eq!(
            get(
                &s,
                "turnd_auth_failures_total",
                &[("reason", "stale_nonce")]
            ),
            1.0
        );
        assert!(!s
            .keys()
            .any(|(name, labels)| name == "turnd_auth_failures_total"
                && labels.get("reason").map(String::as_str) == Some("unauthenticated")));
        let challenge = [("method", "allocate"), ("reason", "unauthenticated")];
        assert_eq!(get(&s, "turnd_rejections_total", &challenge), 1.0);
    }

    #[test]
    fn connections_tls_and_refusals() {
        let (s, _) = parse_exposition(&two_workers().render()).expect("valid exposition");
        assert_eq!(
            get(&s, "turnd_connections_active", &[("transport", "tls")]),
            2.0
        );
        assert_eq!(
            get(&s, "turnd_connections_active", &[("transport", "tcp")]),
            0.0
        );
        assert_eq!(
            get(&s, "turnd_tls_handshakes_total", &[("result", "success")]),
            1.0
        );
        assert_eq!(
            get(&s, "turnd_tls_handshakes_total", &[("result", "failure")]),
            1.0
        );
        let fds = [("cause", "no_descriptors")];
        assert_eq!(get(&s, "turnd_connections_refused_total", &fds), 1.0);
        assert_eq!(get(&s, "turnd_descriptor_exhaustion_total", &[]), 1.0);
    }

    #[test]
    fn process_values_and_relay_ports() {
        let m = two_workers();
        m.set_draining(true);
        m.reload_result(true);
        m.reload_result(false);
        m.reload_result(false);
        m.set_certificate_not_after(Some(1_800_000_000));
        m.set_relay_ports("10.0.0.1".parse().expect("ip"), 3, 997);
        m.set_relay_ports_source(Box::new(|| {
            vec![("2001:db8::1".parse().expect("ip"), 1, 999)]
        }));
        let (s, types) = parse_exposition(&m.render()).expect("valid exposition");
        assert_eq!(get(&s, "turnd_draining", &[]), 1.0);
        assert_eq!(
            get(&s, "turnd_config_reloads_total", &[("result", "failure")]),
            2.0
        );
        assert_eq!(
            get(&s, "turnd_certificate_not_after_timestamp_seconds", &[]),
            1.8e9
        );
        let v4 = [("relay_ip", "10.0.0.1")];
        assert_eq!(get(&s, "turnd_relay_ports_in_use", &v4), 3.0);
        assert_eq!(get(&s, "turnd_relay_ports_available", &v4), 997.0);
        let v6 = [("relay_ip", "2001:db8::1")];
        assert_eq!(get(&s, "turnd_relay_ports_available", &v6), 999.0);
        let build = [("version", "0.1.0"), ("io_backend", "epoll")];
        assert_eq!(get(&s, "turnd_build_info", &build), 1.0);

        // With every optional value set, every family is present, typed as defined.
        for def in FAMILIES_DEF {
            let kind = types.get(def.name).map(String::as_str);
            let want = match def.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            assert_eq!(kind, Some(want), "{}", def.name);
            assert_eq!(def.kind == Kind::Counter, def.name.ends_with("_total"));
        }
    }

    #[test]
    fn families_without_a_value_are_left_out() {
        let text = Metrics::new(1, "0.1.0", "io_uring").render();
        assert!(!text.contains("turnd_certificate_not_after_timestamp_seconds"));
        assert!(!text.contains("turnd_relay_ports_in_use"));
        let (s, _) = parse_exposition(&text).expect("valid exposition");
        assert_eq!(get(&s, "turnd_draining", &[]), 0.0);
    }

    #[test]
    fn labels_never_carry_a_user_or_a_client_address() {
        let text = two_workers().render();
        assert!(!text.contains("alice"), "a username leaked");
        assert!(!text.contains("198.51.100.7"), "a client address leaked");
    }

    #[test]
    fn publish_replaces_a_workers_slot_and_ignores_unknown_workers() {
        let m = Metrics::new(2, "0.1.0", "epoll");
        assert_eq!(m.oldest_publish_age(), None);
        let mut w = WorkerStats {
            send_errors: 1,
            ..WorkerStats::default()
        };
        m.publish(0, &w);
        w.send_errors = 3;
        m.publish(0, &w);
        m.publish(7, &w);
        assert_eq!(m.sum().send_errors, 3);
        assert_eq!(m.oldest_publish_age(), None, "worker 1 never published");
        m.publish(1, &WorkerStats::default());
        assert!(m.oldest_publish_age().expect("all published") < Duration::from_secs(5));
    }

    #[test]
    fn collector_describes_every_family() {
        let m = Metrics::new(1, "0.1.0", "epoll");
        assert_eq!(m.desc().len(), FAMILIES_DEF.len());
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(Metrics::new(1, "0.1.0", "epoll")))
            .expect("registers");
        assert!(!registry.gather().is_empty());
    }

    /// `promtool check metrics` (the Prometheus project's linter) reports nothing on a scrape.
    /// Skipped with a message when promtool is not installed, unless TURND_REQUIRE_TOOLS=1.
    #[test]
    fn promtool_accepts_the_exposition() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let m = two_workers();
        m.set_certificate_not_after(Some(1_800_000_000));
        m.set_relay_ports("10.0.0.1".parse().expect("ip"), 3, 997);
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if std::env::var("TURND_REQUIRE_TOOLS").as_deref() == Ok("1") => {
                panic!("promtool is required (TURND_REQUIRE_TOOLS=1) but did not start: {e}")
            }
            Err(e) => {
                eprintln!("skipped: promtool not available ({e}); apt-get install prometheus");
                return;
            }
        };
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(m.render().as_bytes())
            .expect("write to promtool");
        let out = child.wait_with_output().expect("promtool ran");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool failed: {report}");
        assert!(report.trim().is_empty(), "promtool reported: {report}");
    }
}
