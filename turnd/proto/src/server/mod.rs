//! The TURN server state machine (RFC 8656 §5–§12, RFC 6156, RFC 8489 §6–§9).
//!
//! [`Server`] holds every allocation of one shard. It is driven entirely from outside:
//!
//! * in: [`Server::handle_client_datagram`] (a UDP datagram, or one frame of a TCP/TLS
//!   stream, from a client), [`Server::handle_peer_datagram`] (a datagram that arrived on a
//!   relay socket), [`Server::handle_relay_bound`] (the IO layer's answer to a
//!   [`RelayRequest`]), [`Server::handle_connection_closed`] and [`Server::handle_timeout`];
//! * out: [`Server::poll_transmit`] (datagrams to send, in order), [`Server::poll_event`]
//!   (relay sockets to open or close, allocations created or ended, rejections to count) and
//!   [`Server::poll_timeout`] (when to call `handle_timeout` next).
//!
//! Call the `poll_*` methods after every `handle_*` call until they return `None`. Outgoing
//! datagrams are written into one reused buffer, so relaying a packet allocates nothing once
//! the buffers have grown to their working size.
//!
//! The packet path finds an allocation by indexing a `Vec` with the [`RelayHandle`] a peer
//! datagram arrived on, or by an Fx-hashed map keyed by 5-tuple for client datagrams (its
//! entries are made only by authenticated requests, so an unauthenticated sender cannot
//! choose its keys). Answers carry the [`Route`] their request came by.
//!
//! Operations (the admin API): [`Server::update_config`] (hot reload),
//! [`Server::set_draining`] (300 ALTERNATE-SERVER, refreshes capped to the deadline),
//! [`Server::sessions`], [`Server::end_allocation`] and [`Server::end_user_allocations`].
//! Counters and O(1) gauges for metrics are in [`Server::stats`].
//!
//! Where things live: this file holds the state machine (the packet path, STUN requests,
//! Allocate, Refresh, CreatePermission, ChannelBind, timers); `config.rs` its tunables;
//! `io.rs` what passes to and from the IO layer (handles, transmits, relay requests,
//! events); `stats.rs` rejection and drop reasons and counters; `ops.rs` the operations
//! API; `allocation.rs` per-allocation state; `policy.rs` which peers may be reached;
//! `quota.rs` and `reservation.rs` the ledgers shards share; `ratelimit.rs` the challenge
//! limit; `timer.rs` the one deadline heap.

mod allocation;
mod config;
mod io;
mod ops;
pub mod policy;
mod quota;
mod ratelimit;
mod reservation;
mod stats;
mod timer;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

pub use allocation::{AllocationStats, RelayHandle, RelayedAddress};
pub use config::{ServerConfig, ServiceMode};
pub use io::{
    AllocationId, Destination, EndReason, Event, PortRequest, RelayBound, RelayError, RelayRequest,
    RelayRequestId, Route, Transmit,
};
pub use ops::{Drain, SessionInfo};
pub use quota::{LocalQuota, QuotaExceeded, QuotaLedger, SharedQuota};
pub use reservation::{
    LocalReservations, Redeemed, Reservation, ReservationLedger, SharedReservations,
};
pub use stats::{DropReason, Reject, RequestKind, Stats};

use crate::auth::{CredentialError, LongTermKey, NonceCheck, NonceIssuer};
use crate::codec::*;
use allocation::{family_index, Allocation, ChannelBinding, CHANNEL_COOLDOWN};
use policy::PeerDenied;
use ratelimit::ChallengeLimiter;
use reservation::TokenSource;
use timer::{Deadlines, TimerKey};

/// The transport between client and server (RFC 8656 §3.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl Transport {
    /// Every transport, in [`Transport::index`] order.
    pub const ALL: [Self; 3] = [Self::Udp, Self::Tcp, Self::Tls];

    /// The position in [`Transport::ALL`], for arrays of counters.
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }

    /// A stable label for logs and metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }

    /// Whether ChannelData must be padded to 4 bytes (streams, RFC 8656 §12.5).
    #[must_use]
    pub fn is_stream(self) -> bool {
        !matches!(self, Self::Udp)
    }
}

/// The 5-tuple that identifies an allocation (RFC 8656 §2.2): the client's address, the
/// server address it reached, and the transport.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FiveTuple {
    /// The client's transport address as the server sees it.
    pub client: SocketAddr,
    /// The server transport address the client sent to.
    pub server: SocketAddr,
    /// The transport protocol.
    pub transport: Transport,
}

/// Where a client's datagram goes: the peer bound to a channel, or an explicit address.
#[derive(Clone, Copy, Debug)]
enum PeerTarget {
    Channel(ChannelNumber),
    Address(SocketAddr),
}

/// How to sign a response to an authenticated request.
#[derive(Clone, Copy, Debug)]
struct Signer {
    key: LongTermKey,
    sha256: bool,
    fingerprint: bool,
}

/// Why an Allocate is not turned into a relay request.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// A retransmission while its relay is being bound: dropped, the answer follows.
    Pending,
    /// Answered with an error.
    Reject(Reject),
}

/// What an error response needs of the request it answers.
#[derive(Clone, Copy, Debug)]
struct ErrorTo {
    method: Method,
    tid: TransactionId,
    fingerprint: bool,
}

struct Authenticated {
    username: String,
    signer: Signer,
}

struct Pending {
    route: Route,
    tid: TransactionId,
    username: Box<str>,
    signer: Signer,
    lifetime: Duration,
    dont_fragment: bool,
    reserve_next: bool,
}

struct QueuedTransmit {
    destination: Destination,
    route: Route,
    start: usize,
    end: usize,
    dont_fragment: bool,
}

/// No allocation at this index of `Server::by_relay`.
const NO_ALLOCATION: u32 = u32::MAX;

/// The TURN server state machine. See the [module documentation](self).
pub struct Server {
    config: ServerConfig,
    nonces: NonceIssuer,
    quota: Box<dyn QuotaLedger>,
    epoch: Instant,
    epoch_unix: u64,

    slab: Vec<Option<Allocation>>,
    free: Vec<u32>,
    by_tuple: FxHashMap<FiveTuple, u32>,
    /// Allocation slab index by [`RelayHandle`]; `NO_ALLOCATION` where none.
    by_relay: Vec<u32>,
    pending: FxHashMap<RelayRequestId, (FiveTuple, Pending)>,
    pending_tuples: FxHashMap<FiveTuple, RelayRequestId>,
    next_request: u64,
    reservations: Box<dyn ReservationLedger>,
    tokens: TokenSource,
    tx_cache: FxHashMap<u64, (FiveTuple, TransactionId, Vec<u8>)>,
    tx_cache_index: FxHashMap<(FiveTuple, TransactionId), u64>,
    next_tx: u64,
    deadlines: Deadlines,
    generations: Vec<u32>,
    last_now: Instant,
    /// The route of the request being answered (set on entry by `handle_client_datagram`
    /// and `handle_relay_bound`).
    route: Route,
    shard: u16,
    next_allocation: u64,
    drain: Option<Drain>,
    challenges: ChallengeLimiter,

    out: Vec<u8>,
    transmits: VecDeque<QueuedTransmit>,
    events: VecDeque<Event>,
    stats: Stats,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("allocations", &self.by_tuple.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// A token seed for a lone server: the nonce secret through a one-way, domain-separated
/// function, so tokens reveal nothing about the nonce key.
fn derived_seed(nonce_secret: &[u8; 32]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"turnd reservation seed");
    h.update(nonce_secret);
    h.finalize().into()
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

impl Server {
    /// A server with `config`; `now` and `unix_now` (seconds) anchor its clock: later `now`
    /// values map to UNIX time for REST API expiry and nonces.
    #[must_use]
    pub fn new(config: ServerConfig, now: Instant, unix_now: u64) -> Self {
        Self::with_quota(config, Box::new(LocalQuota::default()), now, unix_now)
    }

    /// As [`Server::new`], with an allocation quota ledger (shared between shards by the IO
    /// layer, e.g. [`SharedQuota`]). Reservations stay within this server, and reservation
    /// tokens come from a seed derived from the nonce secret: for one shard. A multi-shard
    /// IO layer uses [`Server::with_ledgers`].
    #[must_use]
    pub fn with_quota(
        config: ServerConfig,
        quota: Box<dyn QuotaLedger>,
        now: Instant,
        unix_now: u64,
    ) -> Self {
        let seed = derived_seed(&config.nonce_secret);
        let reservations = Box::new(LocalReservations::default());
        Self::with_ledgers(config, quota, reservations, seed, now, unix_now)
    }

    /// As [`Server::new`], with the ledgers the shards of a process share: the allocation
    /// quota ([`SharedQuota`]) and the reserved ports ([`SharedReservations`]; see
    /// [`ReservationLedger`] for the release contract). `seed` is fresh randomness from the
    /// IO layer's RNG, different for every shard: reservation tokens are drawn from it.
    #[must_use]
    pub fn with_ledgers(
        config: ServerConfig,
        quota: Box<dyn QuotaLedger>,
        reservations: Box<dyn ReservationLedger>,
        seed: [u8; 32],
        now: Instant,
        unix_now: u64,
    ) -> Self {
        let nonces = NonceIssuer::new(config.nonce_secret, config.nonce_lifetime.as_secs().max(1));
        let mut limiter_key = [0u8; 8];
        limiter_key.copy_from_slice(&config.nonce_secret[24..]);
        Self {
            config,
            nonces,
            quota,
            epoch: now,
            epoch_unix: unix_now,
            slab: Vec::new(),
            free: Vec::new(),
            by_tuple: FxHashMap::default(),
            by_relay: Vec::new(),
            pending: FxHashMap::default(),
            pending_tuples: FxHashMap::default(),
            next_request: 0,
            reservations,
            tokens: TokenSource::new(seed),
            tx_cache: FxHashMap::default(),
            tx_cache_index: FxHashMap::default(),
            next_tx: 0,
            deadlines: Deadlines::default(),
            generations: Vec::new(),
            last_now: now,
            route: Route::default(),
            shard: 0,
            next_allocation: 0,
            drain: None,
            challenges: ChallengeLimiter::new(u64::from_le_bytes(limiter_key)),
            out: Vec::with_capacity(64 * 1024),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Sets this server's shard number, which goes in the top 16 bits of every
    /// [`AllocationId`] it hands out from now on (ids are then unique across the shards of a
    /// process). Call it before serving.
    pub fn set_shard(&mut self, shard: u16) {
        self.shard = shard;
    }

    fn new_allocation_id(&mut self) -> AllocationId {
        self.next_allocation += 1;
        AllocationId((u64::from(self.shard) << 48) | (self.next_allocation & ((1u64 << 48) - 1)))
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// How many allocations exist.
    #[must_use]
    pub fn allocation_count(&self) -> usize {
        self.by_tuple.len()
    }

    /// Whether `five_tuple` has an allocation (or one being created).
    #[must_use]
    pub fn has_allocation(&self, five_tuple: &FiveTuple) -> bool {
        self.by_tuple.contains_key(five_tuple) || self.pending_tuples.contains_key(five_tuple)
    }

    /// How many permissions and channel bindings exist, across allocations (a scan: for
    /// tests and audits; metrics read the gauges in [`Server::stats`]).
    #[must_use]
    pub fn permission_and_channel_count(&self) -> (usize, usize) {
        self.slab.iter().flatten().fold((0, 0), |(p, c), a| {
            (p + a.permissions.len(), c + a.channels.len())
        })
    }

    fn unix(&self, now: Instant) -> u64 {
        self.epoch_unix + now.saturating_duration_since(self.epoch).as_secs()
    }

    // -----------------------------------------------------------------------------------------
    // Outputs

    /// The next datagram to send. Call until `None` after every `handle_*`.
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        let Some(t) = self.transmits.pop_front() else {
            self.out.clear();
            return None;
        };
        Some(Transmit {
            destination: t.destination,
            payload: &self.out[t.start..t.end],
            dont_fragment: t.dont_fragment,
            route: t.route,
        })
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Server::handle_timeout`] should next be called. It may be early; never late.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.next()
    }

    fn drop_packet(&mut self, reason: DropReason) {
        self.stats.drops[reason.index()] += 1;
    }

    fn queue(&mut self, destination: Destination, route: Route, start: usize, dont_fragment: bool) {
        let end = self.out.len();
        self.transmits.push_back(QueuedTransmit {
            destination,
            route,
            start,
            end,
            dont_fragment,
        });
    }

    /// Queues the answer to the request being handled (to its client, on its route).
    fn queue_answer(&mut self, ft: FiveTuple, start: usize) {
        self.queue(Destination::Client(ft), self.route, start, false);
    }

    fn count_request(&mut self, method: Method, ok: bool) {
        if let Some(k) = RequestKind::of(method) {
            self.stats.requests[k.index()][usize::from(!ok)] += 1;
        }
    }

    // -----------------------------------------------------------------------------------------
    // Timers

    /// Expires whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        while let Some((at, key)) = self.deadlines.pop_due(now) {
            match key {
                TimerKey::Allocation(idx, gen) => self.check_allocation(idx, gen, at, now),
                TimerKey::Reservation(token) => {
                    if let Some(local) = self.reservations.expire(&token, now) {
                        self.events.push_back(Event::ReservedPortReleased(local));
                    }
                }
                TimerKey::Transaction(id) => {
                    if let Some((ft, tid, _)) = self.tx_cache.remove(&id) {
                        self.tx_cache_index.remove(&(ft, tid));
                    }
                }
            }
        }
    }

    fn check_allocation(&mut self, idx: u32, gen: u32, fired: Instant, now: Instant) {
        let Some(Some(a)) = self.slab.get_mut(idx as usize) else {
            return;
        };
        if a.generation != gen || a.scheduled != fired {
            return; // superseded entry
        }
        if a.expires <= now {
            self.remove_allocation(idx, EndReason::Expired, now);
            return;
        }
        let (permissions, channels) = a.sweep(now);
        let next = a.next_deadline();
        a.scheduled = next;
        self.deadlines.push(next, TimerKey::Allocation(idx, gen));
        gauge_down(&mut self.stats.permissions_active, permissions);
        gauge_down(&mut self.stats.channels_active, channels);
    }

    /// Makes sure the allocation's timer fires no later than `at`.
    fn schedule(&mut self, idx: u32, at: Instant) {
        if let Some(Some(a)) = self.slab.get_mut(idx as usize) {
            if at < a.scheduled {
                a.scheduled = at;
                self.deadlines
                    .push(at, TimerKey::Allocation(idx, a.generation));
            }
        }
    }

    fn remove_allocation(&mut self, idx: u32, reason: EndReason, now: Instant) {
        let Some(slot) = self.slab.get_mut(idx as usize) else {
            return;
        };
        let Some(a) = slot.take() else { return };
        self.free.push(idx);
        self.by_tuple.remove(&a.five_tuple);
        for r in a.relayed.iter().flatten() {
            if let Some(slot) = self.by_relay.get_mut(r.handle.0 as usize) {
                *slot = NO_ALLOCATION;
            }
            self.events.push_back(Event::RelayReleased(*r));
        }
        self.quota.release(&a.username);
        gauge_down(&mut self.stats.allocations_active, 1);
        gauge_down(&mut self.stats.permissions_active, a.permissions.len());
        gauge_down(&mut self.stats.channels_active, a.active_channels());
        self.events.push_back(Event::AllocationEnded {
            id: a.id,
            route: a.route,
            five_tuple: a.five_tuple,
            username: a.username,
            relayed: a.relayed,
            duration: now.saturating_duration_since(a.created),
            stats: a.stats,
            reason,
        });
    }

    /// The client's TCP/TLS connection closed: its allocation ends with it (RFC 8656 §3.1).
    pub fn handle_connection_closed(&mut self, now: Instant, five_tuple: FiveTuple) {
        self.last_now = now;
        if let Some(&idx) = self.by_tuple.get(&five_tuple) {
            self.remove_allocation(idx, EndReason::ConnectionClosed, now);
        }
        if let Some(id) = self.pending_tuples.remove(&five_tuple) {
            if let Some((_, p)) = self.pending.remove(&id) {
                self.quota.release(&p.username);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Relay path

    /// A datagram arrived on the relay socket `relay` from `peer` (RFC 8656 §11.3, §12.7):
    /// relayed to the client as ChannelData when a channel is bound to the peer, else as a
    /// Data indication; dropped without a permission.
    pub fn handle_peer_datagram(
        &mut self,
        now: Instant,
        relay: RelayHandle,
        peer: SocketAddr,
        data: &[u8],
    ) {
        let Some(&idx) = self.by_relay.get(relay.0 as usize) else {
            return self.drop_packet(DropReason::NoAllocation);
        };
        let Some(Some(a)) = self.slab.get_mut(idx as usize) else {
            return self.drop_packet(DropReason::NoAllocation);
        };
        if !a.has_permission(peer.ip(), now) {
            return self.drop_packet(DropReason::NoPermission);
        }
        let Ok(len) = u16::try_from(data.len()) else {
            return self.drop_packet(DropReason::Malformed);
        };
        let ft = a.five_tuple;
        let route = a.route;
        a.stats.packets_from_peer += 1;
        a.stats.bytes_from_peer += u64::from(len);
        let t = ft.transport.index();
        self.stats.packets_from_peer[t] += 1;
        self.stats.bytes_from_peer[t] += u64::from(len);
        let start = self.out.len();
        if let Some(ch) = a.channel_by_peer(peer, now) {
            let mut hdr = [0u8; 4];
            ChannelData::write_header(ch.number, len, &mut hdr);
            self.out.extend_from_slice(&hdr);
            self.out.extend_from_slice(data);
            if ft.transport.is_stream() {
                let pad = (4 - data.len() % 4) % 4;
                self.out.extend_from_slice(&[0u8; 3][..pad]);
            }
        } else {
            let tid = self.fresh_tid();
            let mut b = MessageBuilder::new(
                &mut self.out,
                MessageType::new(Method::DATA, Class::Indication),
                tid,
            );
            b.add(&XorPeerAddress(peer)).add(&Data(data));
            b.finish();
        }
        self.queue(Destination::Client(ft), route, start, false);
    }

    fn fresh_tid(&mut self) -> TransactionId {
        // Indications need a unique-ish id; it protects nothing, so a counter suffices.
        self.next_tx = self.next_tx.wrapping_add(1);
        let mut t = [0u8; 12];
        t[4..].copy_from_slice(&self.next_tx.to_be_bytes());
        TransactionId(t)
    }

    /// A datagram (or one stream frame) from a client, which arrived by `route` (the IO
    /// layer's listener or connection; answers to it carry the same route). STUN requests are
    /// answered, Send indications and ChannelData relayed, anything else dropped and counted.
    pub fn handle_client_datagram(
        &mut self,
        now: Instant,
        five_tuple: FiveTuple,
        route: Route,
        data: &[u8],
    ) {
        self.last_now = now;
        self.route = route;
        let Some(&first) = data.first() else {
            return self.drop_packet(DropReason::Malformed);
        };
        match Demux::classify(first) {
            Demux::ChannelData => self.handle_channel_data(now, five_tuple, data),
            // RFC 5766 channels 0x5000–0x7FFF (only ever bound when allowed).
            Demux::Unknown if (0x50..=0x7f).contains(&first) => {
                self.handle_channel_data(now, five_tuple, data);
            }
            Demux::Stun => match Message::decode(data) {
                Ok(msg) => self.handle_stun(now, five_tuple, &msg),
                Err(DecodeError::TooManyAttributes(_)) => {
                    self.handle_too_many_attributes(five_tuple, data);
                }
                Err(_) => self.drop_packet(DropReason::Malformed),
            },
            _ => self.drop_packet(DropReason::Malformed),
        }
    }

    /// A message whose header decoded but which carries more than [`MAX_ATTRIBUTES`]: a
    /// request is answered 400 "too many attributes" (never silence); anything else dropped.
    fn handle_too_many_attributes(&mut self, ft: FiveTuple, data: &[u8]) {
        let (Some(typ), Some(tid)) = (data.get(0..2), data.get(8..HEADER_LEN)) else {
            return self.drop_packet(DropReason::Malformed);
        };
        let typ = MessageType::from_u16(u16::from_be_bytes([typ[0], typ[1]]));
        let mut t = [0u8; 12];
        t.copy_from_slice(tid);
        if typ.class != Class::Request {
            return self.drop_packet(DropReason::Malformed);
        }
        let request = ErrorTo {
            method: typ.method,
            tid: TransactionId(t),
            fingerprint: false,
        };
        self.error_response(ft, request, Reject::TooManyAttributes, None, None, |_| {});
    }

    fn handle_channel_data(&mut self, now: Instant, ft: FiveTuple, data: &[u8]) {
        let Ok(cd) = ChannelData::decode(data) else {
            return self.drop_packet(DropReason::Malformed);
        };
        self.relay_to_peer(now, ft, PeerTarget::Channel(cd.channel), cd.data, false);
    }

    fn handle_send_indication(&mut self, now: Instant, ft: FiveTuple, msg: &Message<'_>) {
        let (Ok(Some(XorPeerAddress(peer))), Ok(Some(Data(data)))) =
            (msg.get::<XorPeerAddress>(), msg.get::<Data<'_>>())
        else {
            return self.drop_packet(DropReason::BadIndication);
        };
        let peer = PeerTarget::Address(policy::canonical_addr(peer));
        let dont_fragment = msg.raw(AttrType::DONT_FRAGMENT).is_some();
        self.relay_to_peer(now, ft, peer, data, dont_fragment);
    }

    /// The client → peer relay path shared by ChannelData (RFC 8656 §12.5) and Send
    /// indications (§11.2): find the allocation and the peer, require a relayed address of the
    /// peer's family and a permission, count, and queue the payload for the relay socket.
    fn relay_to_peer(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        target: PeerTarget,
        data: &[u8],
        dont_fragment: bool,
    ) {
        let Some(&idx) = self.by_tuple.get(&ft) else {
            return self.drop_packet(DropReason::NoAllocation);
        };
        let Some(Some(a)) = self.slab.get_mut(idx as usize) else {
            return self.drop_packet(DropReason::NoAllocation);
        };
        let peer = match target {
            PeerTarget::Address(peer) => peer,
            PeerTarget::Channel(n) => match a.channel_by_number(n, now) {
                Some(c) => c.peer,
                None => return self.drop_packet(DropReason::NoChannel),
            },
        };
        let Some(relay) = a.relayed_for(peer.ip()) else {
            return self.drop_packet(DropReason::PeerFamily);
        };
        if !a.has_permission(peer.ip(), now) {
            return self.drop_packet(DropReason::NoPermission);
        }
        let n = data.len() as u64;
        a.stats.packets_to_peer += 1;
        a.stats.bytes_to_peer += n;
        let dont_fragment = dont_fragment || a.dont_fragment;
        let t = ft.transport.index();
        self.stats.packets_to_peer[t] += 1;
        self.stats.bytes_to_peer[t] += n;
        let start = self.out.len();
        self.out.extend_from_slice(data);
        let destination = Destination::Peer {
            relay: relay.handle,
            peer,
        };
        self.queue(destination, Route::default(), start, dont_fragment);
    }

    // -----------------------------------------------------------------------------------------
    // STUN requests

    fn handle_stun(&mut self, now: Instant, ft: FiveTuple, msg: &Message<'_>) {
        let typ = msg.typ();
        match typ.class {
            Class::Indication => {
                if typ.method == Method::SEND {
                    self.handle_send_indication(now, ft, msg);
                } else {
                    // Binding indications are keepalives; others are not for a server.
                    if typ.method != Method::BINDING {
                        self.drop_packet(DropReason::Unexpected);
                    }
                }
                return;
            }
            Class::Success | Class::Error => return self.drop_packet(DropReason::Unexpected),
            Class::Request => {}
        }
        // A request with FINGERPRINT that does not verify is not STUN at all (RFC 8489 §7.3).
        if msg.has_fingerprint() && !msg.verify_fingerprint() {
            return self.drop_packet(DropReason::Malformed);
        }
        if msg.unknown_comprehension_required().next().is_some() {
            let unknown = UnknownAttributes::from_types(msg.unknown_comprehension_required());
            return self.reject(ft, msg, Reject::UnknownAttribute, None, |b| {
                b.add(&unknown);
            });
        }
        match typ.method {
            Method::BINDING => match self.config.mode {
                ServiceMode::Turn | ServiceMode::StunOnly => self.handle_binding(ft, msg, None),
                ServiceMode::NoStun if !msg.has_integrity() && !msg.has_integrity_sha256() => {
                    self.reject(ft, msg, Reject::MethodNotServed, None, |_| {});
                }
                ServiceMode::NoStun => match self.authenticate(now, ft, msg) {
                    Ok(auth) => self.handle_binding(ft, msg, Some(auth.signer)),
                    Err(r) => self.reject(ft, msg, r, None, |_| {}),
                },
            },
            Method::ALLOCATE
            | Method::REFRESH
            | Method::CREATE_PERMISSION
            | Method::CHANNEL_BIND
                if self.config.mode == ServiceMode::StunOnly =>
            {
                self.reject(ft, msg, Reject::MethodNotServed, None, |_| {});
            }
            Method::ALLOCATE
            | Method::REFRESH
            | Method::CREATE_PERMISSION
            | Method::CHANNEL_BIND => {
                // Retransmission of a non-idempotent request already answered: same answer.
                if let Some(id) = self.tx_cache_index.get(&(ft, msg.transaction_id())) {
                    if let Some((_, _, bytes)) = self.tx_cache.get(id).filter(|(_, _, b)| {
                        MessageType::from_u16(u16::from_be_bytes([b[0], b[1]])).method == typ.method
                    }) {
                        let start = self.out.len();
                        self.out.extend_from_slice(bytes);
                        self.queue_answer(ft, start);
                        return;
                    }
                }
                let auth = match self.authenticate(now, ft, msg) {
                    Ok(a) => a,
                    Err(r) => return self.reject(ft, msg, r, None, |_| {}),
                };
                if typ.method == Method::ALLOCATE {
                    return self.handle_allocate(now, ft, msg, auth);
                }
                let result = match typ.method {
                    Method::REFRESH => self.handle_refresh(now, ft, msg, &auth),
                    Method::CREATE_PERMISSION => self.handle_create_permission(now, ft, msg, &auth),
                    _ => self.handle_channel_bind(now, ft, msg, &auth),
                };
                if let Err(reason) = result {
                    self.reject(ft, msg, reason, Some(&auth), |_| {});
                }
            }
            _ => self.reject(ft, msg, Reject::UnknownMethod, None, |_| {}),
        }
    }

    /// A Binding success (RFC 8489 §3): XOR-MAPPED-ADDRESS, signed when the request was
    /// authenticated (no-STUN mode), with SOFTWARE only then.
    fn handle_binding(&mut self, ft: FiveTuple, msg: &Message<'_>, signer: Option<Signer>) {
        if let Some(signer) = signer {
            self.success(ft, Method::BINDING, msg.transaction_id(), signer, |b| {
                b.add(&XorMappedAddress(ft.client));
            });
            return;
        }
        let start = self.out.len();
        let mut b = MessageBuilder::new(
            &mut self.out,
            MessageType::new(Method::BINDING, Class::Success),
            msg.transaction_id(),
        );
        b.add(&XorMappedAddress(ft.client));
        if msg.has_fingerprint() {
            b.add_fingerprint();
        }
        b.finish();
        self.queue_answer(ft, start);
        self.count_request(Method::BINDING, true);
    }

    /// RFC 8489 §9.2.4: the long-term credential checks, in the RFC's order.
    fn authenticate(
        &self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
    ) -> Result<Authenticated, Reject> {
        let sha256 = msg.has_integrity_sha256();
        if !sha256 && !msg.has_integrity() {
            return Err(Reject::Unauthenticated);
        }
        let realm = msg
            .get::<Realm<'_>>()
            .map_err(|_| Reject::MalformedAttribute)?;
        let nonce = msg
            .get::<Nonce<'_>>()
            .map_err(|_| Reject::MalformedAttribute)?;
        let username = msg
            .get::<Username<'_>>()
            .map_err(|_| Reject::MalformedAttribute)?;
        let userhash = msg
            .get::<UserHash<'_>>()
            .map_err(|_| Reject::MalformedAttribute)?;
        let (Some(_realm), Some(nonce)) = (realm, nonce) else {
            return Err(Reject::MissingAttribute);
        };
        if username.is_none() && userhash.is_none() {
            return Err(Reject::MissingAttribute);
        }
        let unix = self.unix(now);
        let features = match self.nonces.check(nonce.0.as_bytes(), unix, ft.client) {
            NonceCheck::Valid { features } => features,
            NonceCheck::Stale | NonceCheck::Invalid => return Err(Reject::StaleNonce),
        };
        let algorithm = self.password_algorithm(msg, features)?;
        let username: String = match (username, userhash) {
            (Some(u), _) => u.0.to_owned(),
            (None, Some(h)) => self
                .config
                .credentials
                .username_for_hash(h.0)
                .ok_or(Reject::UnknownUser)?
                .to_owned(),
            (None, None) => return Err(Reject::MissingAttribute),
        };
        let keys = self
            .config
            .credentials
            .keys(&username, algorithm, unix)
            .map_err(|e| match e {
                CredentialError::Expired => Reject::ExpiredCredentials,
                CredentialError::UnknownUser | CredentialError::AlgorithmUnavailable => {
                    Reject::UnknownUser
                }
            })?;
        for key in keys.iter() {
            let ok = if sha256 {
                msg.verify_integrity_sha256(key.as_bytes())
            } else {
                msg.verify_integrity(key.as_bytes())
            };
            if ok {
                return Ok(Authenticated {
                    username,
                    signer: Signer {
                        key: *key,
                        sha256,
                        fingerprint: msg.has_fingerprint(),
                    },
                });
            }
        }
        Err(Reject::BadIntegrity)
    }

    /// RFC 8489 §9.2.4 (bid-down protection): both PASSWORD-ALGORITHMS and PASSWORD-ALGORITHM
    /// or neither; the list must be ours unchanged and the choice one of them.
    fn password_algorithm(
        &self,
        msg: &Message<'_>,
        features: u32,
    ) -> Result<PasswordAlgorithmId, Reject> {
        let list = msg
            .get::<PasswordAlgorithms<'_>>()
            .map_err(|_| Reject::BadPasswordAlgorithm)?;
        let alg = msg
            .get::<PasswordAlgorithm<'_>>()
            .map_err(|_| Reject::BadPasswordAlgorithm)?;
        if features & crate::auth::FEATURE_PASSWORD_ALGORITHMS == 0 {
            return Ok(PasswordAlgorithmId::MD5);
        }
        match (list, alg) {
            (None, None) => Ok(PasswordAlgorithmId::MD5),
            (Some(list), Some(alg)) => {
                if list.as_bytes() != PasswordAlgorithms::SERVER.as_bytes()
                    || !alg.params.is_empty()
                    || !PasswordAlgorithms::SERVER
                        .iter()
                        .any(|a| a.algorithm == alg.algorithm)
                {
                    return Err(Reject::BadPasswordAlgorithm);
                }
                Ok(alg.algorithm)
            }
            _ => Err(Reject::BadPasswordAlgorithm),
        }
    }

    /// Answers request `msg` with an error. `auth` is the authenticated requester, if any:
    /// then the response is signed and carries SOFTWARE.
    fn reject(
        &mut self,
        ft: FiveTuple,
        msg: &Message<'_>,
        reason: Reject,
        auth: Option<&Authenticated>,
        extra: impl FnOnce(&mut MessageBuilder<'_>),
    ) {
        let request = ErrorTo {
            method: msg.typ().method,
            tid: msg.transaction_id(),
            fingerprint: msg.has_fingerprint(),
        };
        let username: Option<Box<str>> = match auth {
            Some(a) => Some(a.username.as_str().into()),
            None => msg.get::<Username<'_>>().ok().flatten().map(|u| u.0.into()),
        };
        self.error_response(ft, request, reason, auth.map(|a| a.signer), username, extra);
    }

    /// The one builder of error responses (RFC 8489 §6.3.4). Every rejection goes through
    /// here: it is counted, reported as [`Event::Rejected`], and answered on the request's
    /// route.
    ///
    /// Unauthenticated answers carry no SOFTWARE and, to stay small, no reason phrase unless
    /// the reason needs explaining ([`Reject::explained`]); 401 and 438 carry the challenge
    /// (REALM, NONCE, PASSWORD-ALGORITHMS). Authenticated ones are signed like the request.
    fn error_response(
        &mut self,
        ft: FiveTuple,
        request: ErrorTo,
        reason: Reject,
        signer: Option<Signer>,
        username: Option<Box<str>>,
        extra: impl FnOnce(&mut MessageBuilder<'_>),
    ) {
        let method = request.method;
        let code = reason.code();
        let challenge = matches!(code, ErrorCode::UNAUTHENTICATED | ErrorCode::STALE_NONCE);
        if let (true, Some(rate)) = (challenge, self.config.challenges_per_source_per_second) {
            let ms = self
                .last_now
                .saturating_duration_since(self.epoch)
                .as_millis();
            let ms = u64::try_from(ms).unwrap_or(u64::MAX);
            if !self.challenges.allow(ft.client.ip(), ms, rate) {
                return self.drop_packet(DropReason::ChallengeRateLimited);
            }
        }
        self.count_request(method, false);
        self.events.push_back(Event::Rejected {
            client: ft.client,
            username,
            transport: ft.transport,
            method,
            reason,
        });
        let nonce = challenge.then(|| self.nonces.issue(self.epoch_unix_now_hint(), ft.client));
        let start = self.out.len();
        let software = self.config.software.as_deref().filter(|_| signer.is_some());
        let realm = self.config.credentials.realm();
        let mut b = MessageBuilder::new(
            &mut self.out,
            MessageType::new(method, Class::Error),
            request.tid,
        );
        let phrase = match reason.explained() {
            Some(p) => p,
            None if signer.is_some() => code.reason_phrase(),
            None => "",
        };
        b.add(&ErrorCodeAttr {
            code,
            reason: phrase,
        });
        if let Some(n) = &nonce {
            b.add(&Realm(realm))
                .add(&Nonce(n.as_str()))
                .add(&PasswordAlgorithms::SERVER);
        }
        extra(&mut b);
        if let Some(s) = software {
            b.add(&Software(s));
        }
        finish_signed(&mut b, signer, request.fingerprint);
        b.finish();
        self.queue_answer(ft, start);
    }

    /// The UNIX time of the most recent `handle_*` call (nonces issued in error responses).
    fn epoch_unix_now_hint(&self) -> u64 {
        self.unix(self.last_now)
    }

    fn success(
        &mut self,
        ft: FiveTuple,
        method: Method,
        tid: TransactionId,
        signer: Signer,
        body: impl FnOnce(&mut MessageBuilder<'_>),
    ) -> (usize, usize) {
        let start = self.out.len();
        let software = self.config.software.as_deref();
        let mut b =
            MessageBuilder::new(&mut self.out, MessageType::new(method, Class::Success), tid);
        body(&mut b);
        if let Some(s) = software {
            b.add(&Software(s));
        }
        finish_signed(&mut b, Some(signer), signer.fingerprint);
        b.finish();
        self.queue_answer(ft, start);
        self.count_request(method, true);
        (start, self.out.len())
    }

    fn cache_transaction(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        tid: TransactionId,
        range: (usize, usize),
    ) {
        self.next_tx = self.next_tx.wrapping_add(1);
        let id = self.next_tx;
        let bytes = self.out[range.0..range.1].to_vec();
        self.tx_cache.insert(id, (ft, tid, bytes));
        self.tx_cache_index.insert((ft, tid), id);
        self.deadlines.push(
            now + self.config.transaction_lifetime,
            TimerKey::Transaction(id),
        );
    }

    fn allocation_for(&mut self, ft: FiveTuple, auth: &Authenticated) -> Result<u32, Reject> {
        let idx = *self.by_tuple.get(&ft).ok_or(Reject::NoAllocation)?;
        match self.slab.get(idx as usize) {
            Some(Some(a)) if *a.username == *auth.username => Ok(idx),
            Some(Some(_)) => Err(Reject::WrongCredentials),
            _ => Err(Reject::NoAllocation),
        }
    }

    fn lifetime(&self, requested: Option<Lifetime>) -> Duration {
        match requested {
            None => self.config.default_lifetime,
            Some(Lifetime(s)) => Duration::from_secs(u64::from(s))
                .min(self.config.max_lifetime)
                .max(self.config.default_lifetime),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Allocate (RFC 8656 §7.2)

    fn handle_allocate(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: Authenticated,
    ) {
        let signer = auth.signer;
        if let Some(d) = self.drain {
            let alternate = if policy::canonical_ip(ft.client.ip()).is_ipv4() {
                d.alternate_ipv4
            } else {
                d.alternate_ipv6
            };
            // RFC 8489 §10: over TLS with MESSAGE-INTEGRITY-SHA256, name the alternate's
            // certificate when it is not ours.
            let domain = (ft.transport == Transport::Tls && signer.sha256)
                .then(|| self.config.alternate_domain.clone())
                .flatten();
            return match alternate {
                Some(to) => self.reject(ft, msg, Reject::TryAlternate, Some(&auth), |b| {
                    b.add(&AlternateServer(to));
                    if let Some(d) = &domain {
                        b.add(&AlternateDomain(d));
                    }
                }),
                None => self.reject(ft, msg, Reject::Draining, Some(&auth), |_| {}),
            };
        }
        match self.check_allocate(ft, msg) {
            Ok((mut req, token)) => {
                if let Err(r) = self.quota.try_acquire(&auth.username) {
                    let reason = match r {
                        QuotaExceeded::User => Reject::UserQuotaReached,
                        QuotaExceeded::Total => Reject::TotalQuotaReached,
                    };
                    return self.reject(ft, msg, reason, Some(&auth), |_| {});
                }
                // The token is redeemed only once the quota admits the allocation.
                if let Some(token) = token {
                    match self.reservations.redeem(&token, &auth.username, now) {
                        Redeemed::Port(local) => {
                            req.port = PortRequest::Reserved(local);
                            req.family = AddressFamily::of(local.ip());
                        }
                        other => {
                            if let Redeemed::Expired(local) = other {
                                self.events.push_back(Event::ReservedPortReleased(local));
                            }
                            self.quota.release(&auth.username);
                            let reason = Reject::InvalidReservationToken;
                            return self.reject(ft, msg, reason, Some(&auth), |_| {});
                        }
                    }
                }
                let id = RelayRequestId(self.next_request);
                self.next_request += 1;
                let lifetime = self.lifetime(msg.get::<Lifetime>().ok().flatten());
                self.pending.insert(
                    id,
                    (
                        ft,
                        Pending {
                            route: self.route,
                            tid: msg.transaction_id(),
                            username: auth.username.into_boxed_str(),
                            signer,
                            lifetime,
                            dont_fragment: req.dont_fragment,
                            reserve_next: matches!(
                                req.port,
                                PortRequest::Even { reserve_next: true }
                            ),
                        },
                    ),
                );
                self.pending_tuples.insert(ft, id);
                self.events.push_back(Event::RelayRequested(RelayRequest {
                    id,
                    five_tuple: ft,
                    ..req
                }));
            }
            Err(Refusal::Pending) => self.drop_packet(DropReason::Pending),
            Err(Refusal::Reject(r)) => self.reject(ft, msg, r, Some(&auth), |_| {}),
        }
    }

    /// Validates an Allocate; returns the relay request and the RESERVATION-TOKEN to redeem,
    /// if any.
    fn check_allocate(
        &mut self,
        ft: FiveTuple,
        msg: &Message<'_>,
    ) -> Result<(RelayRequest, Option<[u8; 8]>), Refusal> {
        let reject = |r| Err(Refusal::Reject(r));
        if self.pending_tuples.contains_key(&ft) {
            return Err(Refusal::Pending);
        }
        if self.by_tuple.contains_key(&ft) {
            return reject(Reject::AllocationExists);
        }
        let transport = match msg.get::<RequestedTransport>() {
            Ok(Some(t)) => t,
            Ok(None) => return reject(Reject::MissingAttribute),
            Err(_) => return reject(Reject::MalformedAttribute),
        };
        if transport != RequestedTransport::UDP {
            return reject(Reject::UnsupportedTransport);
        }
        let bad = |_: DecodeError| Refusal::Reject(Reject::MalformedAttribute);
        let even = msg.get::<EvenPort>().map_err(bad)?;
        let token = msg.get::<ReservationToken>().map_err(bad)?;
        let requested = msg.get::<RequestedAddressFamily>().map_err(bad)?;
        let additional = msg.get::<AdditionalAddressFamily>().map_err(bad)?;
        let dont_fragment = msg.raw(AttrType::DONT_FRAGMENT).is_some();
        if token.is_some() && (even.is_some() || requested.is_some() || additional.is_some()) {
            return reject(Reject::ConflictingAttributes);
        }
        if requested.is_some() && additional.is_some() {
            return reject(Reject::ConflictingAttributes);
        }
        if let Some(AdditionalAddressFamily(f)) = additional {
            if f != AddressFamily::IPV6 {
                return reject(Reject::ConflictingAttributes);
            }
        }
        let family = match requested {
            Some(RequestedAddressFamily(f)) => f,
            // Browsers never ask: IPv4, or the client's own family when there is no IPv4 relay.
            None if self.config.relay_ipv4 => AddressFamily::IPV4,
            None => AddressFamily::of(ft.client.ip()),
        };
        let served = match family {
            AddressFamily::IPV4 => self.config.relay_ipv4,
            AddressFamily::IPV6 => self.config.relay_ipv6,
            _ => false,
        };
        if !served {
            return reject(Reject::AddressFamilyNotSupported);
        }
        if additional.is_some() && !self.config.relay_ipv4 {
            return reject(Reject::AddressFamilyNotSupported);
        }
        let port = match even {
            Some(e) => PortRequest::Even {
                reserve_next: e.reserve,
            },
            // With a token, the handler fills in the reserved port once redeemed.
            None => PortRequest::Any,
        };
        let req = RelayRequest {
            id: RelayRequestId(0),
            five_tuple: ft,
            family,
            additional_ipv6: additional.is_some() && self.config.relay_ipv6,
            port,
            dont_fragment,
        };
        Ok((req, token.map(|t| t.0)))
    }

    /// The IO layer bound (or failed to bind) the relay socket(s) for request `id`.
    pub fn handle_relay_bound(&mut self, now: Instant, id: RelayRequestId, bound: RelayBound) {
        self.last_now = now;
        let Some((ft, p)) = self.pending.remove(&id) else {
            // The client went away meanwhile: give the ports back.
            let relays = [bound.primary.ok(), bound.additional.and_then(Result::ok)];
            for r in relays.into_iter().flatten() {
                self.events.push_back(Event::RelayReleased(r));
            }
            if let Some(local) = bound.reserved_next {
                self.events.push_back(Event::ReservedPortReleased(local));
            }
            return;
        };
        self.pending_tuples.remove(&ft);
        self.route = p.route;
        let primary = match bound.primary {
            Ok(r) => r,
            Err(e) => {
                self.quota.release(&p.username);
                if let Some(r) = bound.additional.and_then(Result::ok) {
                    self.events.push_back(Event::RelayReleased(r));
                }
                if let Some(local) = bound.reserved_next {
                    self.events.push_back(Event::ReservedPortReleased(local));
                }
                let reason = match e {
                    RelayError::NoPortAvailable => Reject::NoRelayPort,
                    RelayError::FamilyUnavailable => Reject::AddressFamilyNotSupported,
                    RelayError::NoDescriptors => Reject::NoDescriptors,
                };
                let request = ErrorTo {
                    method: Method::ALLOCATE,
                    tid: p.tid,
                    fingerprint: p.signer.fingerprint,
                };
                let signer = Some(p.signer);
                return self.error_response(ft, request, reason, signer, Some(p.username), |_| {});
            }
        };
        let mut relayed = [None, None];
        relayed[family_index(primary.advertised.ip())] = Some(primary);
        let mut address_error = None;
        match bound.additional {
            Some(Ok(r)) => relayed[1] = Some(r),
            Some(Err(e)) => {
                address_error = Some(match e {
                    RelayError::NoPortAvailable | RelayError::NoDescriptors => {
                        ErrorCode::INSUFFICIENT_CAPACITY
                    }
                    RelayError::FamilyUnavailable => ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED,
                });
            }
            None => {}
        }
        let token = match (p.reserve_next, bound.reserved_next) {
            (true, Some(local)) => {
                let expires = now + self.config.reservation_lifetime;
                let reservation = Reservation {
                    local,
                    username: p.username.clone(),
                    expires,
                };
                // A clash of random 64-bit tokens is next to impossible; draw again if so.
                let mut token = None;
                for _ in 0..4 {
                    let t = self.tokens.next_token();
                    if self.reservations.insert(t, reservation.clone()) {
                        token = Some(t);
                        break;
                    }
                }
                match token {
                    Some(t) => {
                        self.deadlines.push(expires, TimerKey::Reservation(t));
                        Some(ReservationToken(t))
                    }
                    None => {
                        self.events.push_back(Event::ReservedPortReleased(local));
                        None
                    }
                }
            }
            (_, Some(local)) => {
                self.events.push_back(Event::ReservedPortReleased(local));
                None
            }
            _ => None,
        };
        let expires = now + p.lifetime;
        let (idx, generation) = match self.free.pop() {
            Some(i) => (i, self.generation_after(i)),
            None => {
                self.slab.push(None);
                (u32::try_from(self.slab.len() - 1).unwrap_or(u32::MAX), 0)
            }
        };
        let alloc_id = self.new_allocation_id();
        let alloc = Allocation {
            id: alloc_id,
            route: p.route,
            five_tuple: ft,
            username: p.username.clone(),
            relayed,
            created: now,
            expires,
            scheduled: expires,
            generation,
            permissions: Vec::new(),
            channels: Vec::new(),
            dont_fragment: p.dont_fragment,
            stats: AllocationStats::default(),
        };
        if let Some(slot) = self.slab.get_mut(idx as usize) {
            *slot = Some(alloc);
        }
        self.by_tuple.insert(ft, idx);
        for r in relayed.iter().flatten() {
            let h = r.handle.0 as usize;
            if self.by_relay.len() <= h {
                self.by_relay.resize(h + 1, NO_ALLOCATION);
            }
            self.by_relay[h] = idx;
        }
        self.stats.allocations_active += 1;
        self.deadlines
            .push(expires, TimerKey::Allocation(idx, generation));
        self.generations_bump(idx, generation);
        let lifetime = p.lifetime;
        let range = self.success(ft, Method::ALLOCATE, p.tid, p.signer, |b| {
            for r in relayed.iter().flatten() {
                b.add(&XorRelayedAddress(r.advertised));
            }
            if let Some(code) = address_error {
                b.add(&AddressErrorCode {
                    family: AddressFamily::IPV6,
                    code,
                    reason: code.reason_phrase(),
                });
            }
            b.add(&Lifetime(secs(lifetime)));
            if let Some(t) = token {
                b.add(&t);
            }
            b.add(&XorMappedAddress(ft.client));
        });
        self.cache_transaction(now, ft, p.tid, range);
        self.events.push_back(Event::AllocationCreated {
            id: alloc_id,
            route: p.route,
            five_tuple: ft,
            username: p.username,
            relayed,
            lifetime,
        });
    }

    fn generation_after(&self, idx: u32) -> u32 {
        self.generations
            .get(idx as usize)
            .map_or(0, |g| g.wrapping_add(1))
    }

    fn generations_bump(&mut self, idx: u32, generation: u32) {
        let i = idx as usize;
        if self.generations.len() <= i {
            self.generations.resize(i + 1, 0);
        }
        self.generations[i] = generation;
    }

    // -----------------------------------------------------------------------------------------
    // Refresh (RFC 8656 §8.2)

    fn handle_refresh(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Authenticated,
    ) -> Result<(), Reject> {
        let idx = self.allocation_for(ft, auth)?;
        let requested = msg
            .get::<Lifetime>()
            .map_err(|_| Reject::MalformedAttribute)?;
        if let Ok(Some(RequestedAddressFamily(f))) = msg.get::<RequestedAddressFamily>() {
            let relayed = self.relayed_of(idx)?;
            let has = match f {
                AddressFamily::IPV4 => relayed[0].is_some(),
                AddressFamily::IPV6 => relayed[1].is_some(),
                _ => false,
            };
            if !has {
                return Err(Reject::PeerAddressFamilyMismatch);
            }
        }
        let tid = msg.transaction_id();
        if requested == Some(Lifetime(0)) {
            self.remove_allocation(idx, EndReason::Deleted, now);
            let range = self.success(ft, Method::REFRESH, tid, auth.signer, |b| {
                b.add(&Lifetime(0));
            });
            self.cache_transaction(now, ft, tid, range);
            return Ok(());
        }
        let mut lifetime = self.lifetime(requested);
        if let Some(d) = &self.drain {
            lifetime = lifetime.min(d.deadline.saturating_duration_since(now));
        }
        if let Some(Some(a)) = self.slab.get_mut(idx as usize) {
            a.expires = now + lifetime;
        }
        self.schedule(idx, now + lifetime);
        self.success(ft, Method::REFRESH, tid, auth.signer, |b| {
            b.add(&Lifetime(secs(lifetime)));
        });
        Ok(())
    }

    /// The relayed addresses of allocation `idx`.
    fn relayed_of(&self, idx: u32) -> Result<[Option<RelayedAddress>; 2], Reject> {
        match self.slab.get(idx as usize) {
            Some(Some(a)) => Ok(a.relayed),
            _ => Err(Reject::NoAllocation),
        }
    }

    /// A peer must have a relayed address of its family (443) and pass the policy (403)
    /// (RFC 8656 §10.2, §12.2).
    fn check_peer(
        &self,
        relayed: &[Option<RelayedAddress>; 2],
        peer: SocketAddr,
    ) -> Result<(), Reject> {
        if relayed[family_index(peer.ip())].is_none() {
            return Err(Reject::PeerAddressFamilyMismatch);
        }
        match self.config.policy.check(peer.ip()) {
            Ok(()) => Ok(()),
            Err(PeerDenied::OperatorDenied | PeerDenied::NotPublic) => Err(Reject::ForbiddenPeer),
        }
    }

    // -----------------------------------------------------------------------------------------
    // CreatePermission (RFC 8656 §10.2)

    fn handle_create_permission(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Authenticated,
    ) -> Result<(), Reject> {
        let idx = self.allocation_for(ft, auth)?;
        let relayed = self.relayed_of(idx)?;
        // Every peer is checked before any permission is installed: all or nothing
        // (RFC 8656 §10.2). The message's attribute cap bounds this list.
        let mut peers: Vec<IpAddr> = Vec::new();
        for p in msg.get_all::<XorPeerAddress>() {
            let XorPeerAddress(peer) = p.map_err(|_| Reject::MalformedAttribute)?;
            self.check_peer(&relayed, peer)?;
            let ip = policy::canonical_ip(peer.ip());
            if !peers.contains(&ip) {
                peers.push(ip);
            }
        }
        if peers.is_empty() {
            return Err(Reject::MissingAttribute);
        }
        let expires = now + self.config.permission_lifetime;
        let max = self.config.max_permissions_per_allocation;
        let Some(Some(a)) = self.slab.get_mut(idx as usize) else {
            return Err(Reject::NoAllocation);
        };
        let new = peers.iter().filter(|ip| !a.holds_permission(**ip)).count();
        permission_cap(a.permissions.len(), new, max)?;
        let mut added = 0u64;
        for ip in peers {
            added += u64::from(a.install_permission(ip, expires));
        }
        self.stats.permissions_active += added;
        self.schedule(idx, expires);
        self.success(
            ft,
            Method::CREATE_PERMISSION,
            msg.transaction_id(),
            auth.signer,
            |_| {},
        );
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // ChannelBind (RFC 8656 §12.2)

    fn handle_channel_bind(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Authenticated,
    ) -> Result<(), Reject> {
        let idx = self.allocation_for(ft, auth)?;
        let number = match msg.get::<ChannelNumber>() {
            Ok(Some(n)) if n.is_rfc8656() || self.config.rfc5766_channel_numbers => n,
            Ok(Some(_)) | Err(_) => return Err(Reject::InvalidChannelNumber),
            Ok(None) => return Err(Reject::MissingAttribute),
        };
        let peer = match msg.get::<XorPeerAddress>() {
            Ok(Some(XorPeerAddress(p))) => policy::canonical_addr(p),
            Ok(None) => return Err(Reject::MissingAttribute),
            Err(_) => return Err(Reject::MalformedAttribute),
        };
        // A channel binds a peer transport address (RFC 8656 §12.2). Port 0 names none: no
        // peer sends from it, and IANA reserves it. The RFC lists no check for it, so we
        // answer as §12.2 answers a malformed ChannelBind, 400 (as coturn does).
        if peer.port() == 0 {
            return Err(Reject::InvalidPeerPort);
        }
        let relayed = self.relayed_of(idx)?;
        self.check_peer(&relayed, peer)?;
        let max = self.config.max_permissions_per_allocation;
        let ch_expires = now + self.config.channel_lifetime;
        let perm_expires = now + self.config.permission_lifetime;
        let Some(Some(a)) = self.slab.get_mut(idx as usize) else {
            return Err(Reject::NoAllocation);
        };
        // Conflicts include bindings in their post-expiry cooldown (RFC 8656 §12).
        let cooling = |c: &ChannelBinding| c.expires + CHANNEL_COOLDOWN > now;
        let by_number = a
            .channels
            .iter()
            .position(|c| c.number == number && cooling(c));
        let by_peer = a.channels.iter().position(|c| c.peer == peer && cooling(c));
        let new_permission = usize::from(!a.holds_permission(peer.ip()));
        let mut activated = 0u64;
        match (by_number, by_peer) {
            (Some(i), Some(j)) if i == j => {
                permission_cap(a.permissions.len(), new_permission, max)?;
                let c = &mut a.channels[i];
                c.expires = ch_expires;
                if !c.active {
                    c.active = true;
                    activated = 1;
                }
            }
            (None, None) => {
                permission_cap(a.permissions.len(), new_permission, max)?;
                a.add_channel(ChannelBinding {
                    number,
                    peer,
                    expires: ch_expires,
                    active: true,
                });
                activated = 1;
            }
            _ => return Err(Reject::ChannelConflict),
        }
        let added = a.install_permission(peer.ip(), perm_expires);
        self.stats.permissions_active += u64::from(added);
        self.stats.channels_active += activated;
        self.schedule(idx, perm_expires.min(ch_expires));
        self.success(
            ft,
            Method::CHANNEL_BIND,
            msg.transaction_id(),
            auth.signer,
            |_| {},
        );
        Ok(())
    }
}

/// Lowers a gauge of [`Stats`]. Saturating: a miscount must never panic on the packet path
/// (the fuzz driver checks every gauge against a scan of the state, so one would be found).
fn gauge_down(gauge: &mut u64, n: usize) {
    *gauge = gauge.saturating_sub(n as u64);
}

/// The permission cap (`ServerConfig::max_permissions_per_allocation`, RFC 8656 §10.2: 508
/// beyond), checked in this one place: `held` permissions plus `new` ones must fit.
fn permission_cap(held: usize, new: usize, max: usize) -> Result<(), Reject> {
    if held + new > max {
        Err(Reject::PermissionQuotaReached)
    } else {
        Ok(())
    }
}

fn finish_signed(b: &mut MessageBuilder<'_>, signer: Option<Signer>, fingerprint: bool) {
    if let Some(s) = signer {
        if s.sha256 {
            b.add_message_integrity_sha256(s.key.as_bytes());
        } else {
            b.add_message_integrity(s.key.as_bytes());
        }
    }
    if fingerprint {
        b.add_fingerprint();
    }
}

#[cfg(test)]
mod tests;
