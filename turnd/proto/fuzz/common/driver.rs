//! A fake IO layer that drives a `turn_proto::server::Server` with a sequence of operations:
//! client datagrams (well-formed TURN requests signed with real credentials, corrupted ones and
//! raw bytes) from a few 5-tuples, peer datagrams, time steps, connection closes, and relay
//! requests answered (or refused, or answered late) with fake relay addresses.
//!
//! Shared, through `#[path]`, by `tests/proptest.rs` (operations from proptest strategies) and
//! the `server` fuzz target (operations parsed from the fuzzer's bytes by [`parse_ops`]).
//!
//! While it runs it checks what any IO layer relies on: every datagram to a client decodes,
//! every datagram to a peer leaves from a relay socket the IO layer holds (by handle), every
//! answer to a client carries the route its request came by, a relay socket or a reserved
//! port is never released twice or before it was bound, and the server's gauges (allocations,
//! permissions, channels) agree with a scan of its state. [`Driver::finish`] then checks that
//! the server still answers a Binding request on every 5-tuple, and that once every lifetime
//! has run out no allocation, relay socket, quota slot, reservation, permission or channel is
//! left behind.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use turn_proto::codec::{
    AdditionalAddressFamily, AddressFamily, AttrType, ChannelData, ChannelNumber, Class, Data,
    DontFragment, ErrorCode, ErrorCodeAttr, EvenPort, Lifetime, Message, MessageBuilder,
    MessageType, Method, Nonce, RequestedAddressFamily, RequestedTransport, ReservationToken,
    TransactionId, XorMappedAddress, XorPeerAddress,
};
use turn_proto::server::{
    AllocationId, Destination, Drain, Event, FiveTuple, LocalQuota, PortRequest, RelayBound,
    RelayError, RelayHandle, RelayRequest, RelayedAddress, Route, Server, ServerConfig,
    ServiceMode, SharedQuota, SharedReservations, Transport,
};
use turn_proto::testing::{
    self, check_gauges, rest_credential, FakeIo, RelaySlab, Signing, RELAY_IPV4, RELAY_IPV6,
    SECRET, UNIX0,
};

pub(crate) use turn_proto::testing::REALM;

/// Longest single time step: a little over an hour, so one step can outlive any lifetime.
pub(crate) const MAX_STEP_MS: u32 = 4_000_000;

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(segments: [u16; 8]) -> IpAddr {
    let [a, b, c, d, e, f, g, h] = segments;
    IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h))
}

/// The client 5-tuples: UDP over IPv4 and IPv6, TCP, and a second port of the first client.
pub(crate) fn tuples() -> [FiveTuple; 4] {
    let server4 = sa(v4(198, 51, 100, 1), 3478);
    let server6 = sa(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]), 3478);
    [
        FiveTuple {
            client: sa(v4(192, 0, 2, 7), 40000),
            server: server4,
            transport: Transport::Udp,
        },
        FiveTuple {
            client: sa(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 7]), 40000),
            server: server6,
            transport: Transport::Udp,
        },
        FiveTuple {
            client: sa(v4(192, 0, 2, 8), 40001),
            server: server4,
            transport: Transport::Tcp,
        },
        FiveTuple {
            client: sa(v4(192, 0, 2, 7), 40002),
            server: server4,
            transport: Transport::Udp,
        },
    ]
}

/// Peers: allowed ones of both families, an IPv4-mapped form, and denied ones.
pub(crate) fn peers() -> [SocketAddr; 8] {
    [
        sa(v4(192, 0, 2, 44), 9000),
        sa(v4(192, 0, 2, 45), 9001),
        sa(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x44]), 9000),
        sa(v6([0, 0, 0, 0, 0, 0xffff, 0xc000, 0x022c]), 9000),
        sa(v4(127, 0, 0, 1), 9000),
        sa(v4(169, 254, 169, 254), 80),
        sa(v4(10, 0, 0, 1), 1),
        sa(v6([0x64, 0xff9b, 0, 0, 0, 0, 0xc000, 0x022c]), 9),
    ]
}

/// Server configuration knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Setup {
    pub(crate) relay_ipv4: bool,
    pub(crate) relay_ipv6: bool,
    pub(crate) per_user_quota: Option<u32>,
    pub(crate) total_quota: Option<u32>,
    pub(crate) max_permissions: usize,
    pub(crate) software: bool,
    /// Serve RFC 5766 channel numbers 0x5000-0x7FFF too.
    pub(crate) rfc5766_channels: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            relay_ipv4: true,
            relay_ipv6: true,
            per_user_quota: None,
            total_quota: None,
            max_permissions: 8,
            software: false,
            rfc5766_channels: false,
        }
    }
}

/// How a request authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cred {
    /// No credentials at all.
    None,
    /// Static user, MD5 key, MESSAGE-INTEGRITY.
    Alice,
    /// Static user, SHA-256 key via PASSWORD-ALGORITHM, MESSAGE-INTEGRITY-SHA256.
    AliceSha256,
    /// USERHASH instead of USERNAME, MESSAGE-INTEGRITY-SHA256 under the MD5 key.
    AliceUserHash,
    /// A user configured with the `turnadmin -k` MD5 key.
    Bob,
    /// A TURN REST API username valid for another hour.
    Rest,
    /// A TURN REST API username that expired a minute ago.
    RestExpired,
    /// A static user with the wrong password.
    Wrong,
}

impl Cred {
    pub(crate) const ALL: [Self; 8] = [
        Self::None,
        Self::Alice,
        Self::AliceSha256,
        Self::AliceUserHash,
        Self::Bob,
        Self::Rest,
        Self::RestExpired,
        Self::Wrong,
    ];
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ReqKind {
    Binding,
    Allocate {
        /// REQUESTED-TRANSPORT protocol (17 is UDP); `None` leaves it out.
        transport: Option<u8>,
        requested_family: Option<u8>,
        additional_family: Option<u8>,
        /// EVEN-PORT with this R bit.
        even_port: Option<bool>,
        /// RESERVATION-TOKEN: one the server handed out earlier (index), or a made-up one.
        token: Option<u8>,
        lifetime: Option<u32>,
        dont_fragment: bool,
    },
    Refresh {
        lifetime: Option<u32>,
        requested_family: Option<u8>,
    },
    CreatePermission {
        peers: Vec<u8>,
    },
    ChannelBind {
        channel: u16,
        peer: u8,
    },
    /// A method the server does not serve, or a comprehension-required attribute it does not
    /// know.
    Odd {
        method: u16,
        attr: u16,
    },
}

/// One step of a scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Request {
        tuple: u8,
        cred: u8,
        kind: ReqKind,
        /// The transaction id byte (small, so retransmissions happen).
        tid: u8,
        fingerprint: bool,
        /// XOR a byte of the finished message (position, value).
        corrupt: Option<(u16, u8)>,
    },
    Send {
        tuple: u8,
        peer: u8,
        data: Vec<u8>,
        dont_fragment: bool,
    },
    ChannelData {
        tuple: u8,
        channel: u16,
        data: Vec<u8>,
    },
    Raw {
        tuple: u8,
        bytes: Vec<u8>,
    },
    Peer {
        relay: u8,
        peer: u8,
        data: Vec<u8>,
    },
    Advance {
        millis: u32,
    },
    /// Bits: 1 the primary bind fails (no port), 2 it fails (family), 4 the IPv6 one fails,
    /// 8 answers are held until [`Op::Answer`], 16 the failures are for want of descriptors.
    RelayMode(u8),
    Answer,
    Close {
        tuple: u8,
    },
    /// The operations API: drain on/off, a config reload (service mode, challenge limit),
    /// ending allocations by user or id, listing sessions. See [`Driver::operate`].
    Operate(u8),
}

/// Channel numbers: mostly a few valid ones so bindings get reused, sometimes an RFC 5766 one
/// (0x5000-0x7FFF), sometimes anything.
pub(crate) fn channel_from(c: u16) -> u16 {
    match c >> 14 {
        0 | 1 => ChannelNumber::MIN + (c % 4),
        2 => ChannelNumber::MAX + 1 + (c % 4),
        _ => c << 2,
    }
}

/// The fake IO layer plus the server.
pub(crate) struct Driver {
    pub(crate) server: Server,
    config: ServerConfig,
    reservations: SharedReservations,
    pub(crate) now: Instant,
    start: Instant,
    quota: Arc<Mutex<LocalQuota>>,
    next_port: u16,
    /// Relay sockets (and reserved ports) the fake IO layer holds.
    pub(crate) bound: BTreeSet<SocketAddr>,
    /// Relay sockets by handle (the fake IO layer's slab; reserved ports have none).
    relays: RelaySlab,
    tokens: Vec<[u8; 8]>,
    nonces: [Option<String>; 4],
    relay_mode: u8,
    deferred: Vec<RelayRequest>,
    pub(crate) created: usize,
    pub(crate) ended: usize,
    ids: BTreeSet<AllocationId>,
    pub(crate) successes: usize,
    pub(crate) sent: Vec<(Destination, Vec<u8>)>,
}

impl Driver {
    pub(crate) fn new(setup: Setup) -> Self {
        let config = ServerConfig {
            relay_ipv4: setup.relay_ipv4,
            relay_ipv6: setup.relay_ipv6,
            max_permissions_per_allocation: setup.max_permissions,
            software: setup.software.then(|| "turnd-fuzz".to_owned()),
            rfc5766_channel_numbers: setup.rfc5766_channels,
            ..testing::server_config()
        };
        let quota = Arc::new(Mutex::new(LocalQuota::new(
            setup.per_user_quota,
            setup.total_quota,
        )));
        let now = Instant::now();
        let reservations = SharedReservations::default();
        let server = Server::with_ledgers(
            config.clone(),
            Box::new(SharedQuota(quota.clone())),
            Box::new(reservations.clone()),
            [3; 32],
            now,
            UNIX0,
        );
        Self {
            server,
            config,
            reservations,
            now,
            start: now,
            quota,
            next_port: 49152,
            bound: BTreeSet::new(),
            relays: RelaySlab::default(),
            tokens: Vec::new(),
            nonces: [None, None, None, None],
            relay_mode: 0,
            deferred: Vec::new(),
            created: 0,
            ended: 0,
            ids: BTreeSet::new(),
            successes: 0,
            sent: Vec::new(),
        }
    }

    fn unix_now(&self) -> u64 {
        UNIX0 + self.now.duration_since(self.start).as_secs()
    }

    pub(crate) fn run(&mut self, ops: &[Op]) {
        for op in ops {
            self.step(op);
        }
    }

    pub(crate) fn step(&mut self, op: &Op) {
        let tuples = tuples();
        let peers = peers();
        let pick = |i: u8| tuples[usize::from(i) % tuples.len()];
        match op {
            Op::Request {
                tuple,
                cred,
                kind,
                tid,
                fingerprint,
                corrupt,
            } => {
                let t = usize::from(*tuple) % tuples.len();
                let cred = Cred::ALL[usize::from(*cred) % Cred::ALL.len()];
                let had_nonce = self.nonces[t].clone();
                let req = self.build(t, cred, kind, *tid, *fingerprint, *corrupt);
                self.client_sends(tuples[t], &req);
                // A real client answers a fresh challenge once.
                if cred != Cred::None && corrupt.is_none() && self.nonces[t] != had_nonce {
                    let req = self.build(t, cred, kind, *tid, *fingerprint, None);
                    self.client_sends(tuples[t], &req);
                }
            }
            Op::Send {
                tuple,
                peer,
                data,
                dont_fragment,
            } => {
                let peer = peers[usize::from(*peer) % peers.len()];
                let mut out = Vec::new();
                let mut b = MessageBuilder::new(
                    &mut out,
                    MessageType::new(Method::SEND, Class::Indication),
                    TransactionId([0x5e; 12]),
                );
                b.add(&XorPeerAddress(peer)).add(&Data(data));
                if *dont_fragment {
                    b.add(&DontFragment);
                }
                b.finish();
                self.client_sends(pick(*tuple), &out);
            }
            Op::ChannelData {
                tuple,
                channel,
                data,
            } => {
                let ft = pick(*tuple);
                let n = channel_from(*channel);
                let mut out = Vec::new();
                match ChannelNumber::new(n) {
                    Ok(ch) => {
                        ChannelData { channel: ch, data }.encode(ft.transport.is_stream(), &mut out)
                    }
                    Err(_) => {
                        out.extend_from_slice(&n.to_be_bytes());
                        out.extend_from_slice(
                            &u16::try_from(data.len()).unwrap_or(0).to_be_bytes(),
                        );
                        out.extend_from_slice(data);
                    }
                }
                self.client_sends(ft, &out);
            }
            Op::Raw { tuple, bytes } => self.client_sends(pick(*tuple), bytes),
            Op::Peer { relay, peer, data } => {
                let peer = peers[usize::from(*peer) % peers.len()];
                // A handle of a live relay socket, or any (released, never bound) one.
                let live = self.relays.live();
                let relay = if relay & 0x80 == 0 && !live.is_empty() {
                    live[usize::from(*relay) % live.len()]
                } else {
                    RelayHandle(u32::from(*relay & 0x7f))
                };
                self.server
                    .handle_peer_datagram(self.now, relay, peer, data);
                self.pump();
            }
            Op::Advance { millis } => {
                self.advance(Duration::from_millis(u64::from(*millis % MAX_STEP_MS)));
            }
            Op::RelayMode(m) => self.relay_mode = *m,
            Op::Answer => self.answer_deferred(),
            Op::Close { tuple } => {
                self.server.handle_connection_closed(self.now, pick(*tuple));
                self.pump();
            }
            Op::Operate(b) => self.operate(*b),
        }
    }

    /// One call of the operations API, chosen by `b`.
    pub(crate) fn operate(&mut self, b: u8) {
        match b % 6 {
            0 => {
                let alternate = sa(v4(198, 51, 100, 2), 3478);
                self.server.set_draining(Some(Drain {
                    deadline: self.now + Duration::from_secs(u64::from(b >> 3) * 10),
                    alternate_ipv4: (b & 0x40 != 0).then_some(alternate),
                    alternate_ipv6: None,
                }));
            }
            1 => self.server.set_draining(None),
            2 => {
                let mut config = self.config.clone();
                config.mode = [
                    ServiceMode::Turn,
                    ServiceMode::StunOnly,
                    ServiceMode::NoStun,
                ][usize::from(b >> 3) % 3];
                config.challenges_per_source_per_second = (b & 0x40 != 0).then_some(1);
                config.max_lifetime = Duration::from_secs(if b & 0x80 != 0 { 900 } else { 3600 });
                // A reload hands in a fresh nonce secret; the server must keep its own.
                config.nonce_secret = [b; 32];
                self.server.update_config(config);
            }
            3 => {
                self.server.end_user_allocations(self.now, "alice");
            }
            4 => {
                let ids: Vec<AllocationId> = self.server.sessions(self.now).map(|s| s.id).collect();
                let id = if ids.is_empty() || b & 0x80 != 0 {
                    AllocationId(u64::from(b))
                } else {
                    ids[usize::from(b >> 3) % ids.len()]
                };
                let existed = ids.contains(&id);
                assert_eq!(self.server.end_allocation(self.now, id), existed);
            }
            _ => {
                let max = self
                    .server
                    .config()
                    .max_lifetime
                    .max(self.config.max_lifetime);
                let mut n = 0;
                for s in self.server.sessions(self.now) {
                    n += 1;
                    assert!(
                        s.lifetime_left <= max,
                        "lifetime left {:?}",
                        s.lifetime_left
                    );
                    assert!(s.permissions <= self.config.max_permissions_per_allocation);
                    assert!(s.relayed.iter().any(Option::is_some));
                    assert!(s.created_unix >= UNIX0 && s.created_unix <= self.unix_now());
                }
                assert_eq!(n, self.server.allocation_count());
            }
        }
        self.pump();
    }

    /// Builds a request as a client would, signed with the nonce last seen on this 5-tuple.
    fn build(
        &self,
        t: usize,
        cred: Cred,
        kind: &ReqKind,
        tid: u8,
        fingerprint: bool,
        corrupt: Option<(u16, u8)>,
    ) -> Vec<u8> {
        let peers = peers();
        let method = match kind {
            ReqKind::Binding => Method::BINDING,
            ReqKind::Allocate { .. } => Method::ALLOCATE,
            ReqKind::Refresh { .. } => Method::REFRESH,
            ReqKind::CreatePermission { .. } => Method::CREATE_PERMISSION,
            ReqKind::ChannelBind { .. } => Method::CHANNEL_BIND,
            ReqKind::Odd { method, .. } => Method(method & 0x0fff),
        };
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(method, Class::Request),
            TransactionId([tid; 12]),
        );
        match kind {
            ReqKind::Binding => {}
            ReqKind::Allocate {
                transport,
                requested_family,
                additional_family,
                even_port,
                token,
                lifetime,
                dont_fragment,
            } => {
                if let Some(p) = transport {
                    b.add(&RequestedTransport(*p));
                }
                if let Some(f) = requested_family {
                    b.add(&RequestedAddressFamily(AddressFamily(*f)));
                }
                if let Some(f) = additional_family {
                    b.add(&AdditionalAddressFamily(AddressFamily(*f)));
                }
                if let Some(r) = even_port {
                    b.add(&EvenPort { reserve: *r });
                }
                if let Some(i) = token {
                    let tok = if self.tokens.is_empty() || i & 0x80 != 0 {
                        [*i; 8]
                    } else {
                        self.tokens[usize::from(*i) % self.tokens.len()]
                    };
                    b.add(&ReservationToken(tok));
                }
                if let Some(l) = lifetime {
                    b.add(&Lifetime(*l));
                }
                if *dont_fragment {
                    b.add(&DontFragment);
                }
            }
            ReqKind::Refresh {
                lifetime,
                requested_family,
            } => {
                if let Some(l) = lifetime {
                    b.add(&Lifetime(*l));
                }
                if let Some(f) = requested_family {
                    b.add(&RequestedAddressFamily(AddressFamily(*f)));
                }
            }
            ReqKind::CreatePermission { peers: list } => {
                for p in list {
                    b.add(&XorPeerAddress(peers[usize::from(*p) % peers.len()]));
                }
            }
            ReqKind::ChannelBind { channel, peer } => {
                let n = channel_from(*channel);
                let [hi, lo] = n.to_be_bytes();
                b.add_raw(AttrType::CHANNEL_NUMBER, &[hi, lo, 0, 0]);
                b.add(&XorPeerAddress(peers[usize::from(*peer) % peers.len()]));
            }
            ReqKind::Odd { attr, .. } => {
                b.add_raw(AttrType(*attr), &attr.to_be_bytes());
            }
        }
        if let Some(nonce) = self.nonces[t].as_deref() {
            self.sign(&mut b, cred, nonce);
        }
        if fingerprint {
            b.add_fingerprint();
        }
        b.finish();
        if let Some((pos, x)) = corrupt {
            let i = usize::from(pos) % out.len();
            out[i] ^= x.max(1);
        }
        out
    }

    fn sign(&self, b: &mut MessageBuilder<'_>, cred: Cred, nonce: &str) {
        let rest = |expiry: u64| rest_credential(SECRET, "carol", expiry);
        let (how, user, password) = match cred {
            Cred::None => return,
            Cred::Alice => (Signing::Md5, "alice".to_owned(), "wonderland".to_owned()),
            Cred::Wrong => (Signing::Md5, "alice".to_owned(), "wrong".to_owned()),
            Cred::AliceSha256 => (Signing::Sha256, "alice".to_owned(), "wonderland".to_owned()),
            Cred::AliceUserHash => (
                Signing::UserHash,
                "alice".to_owned(),
                "wonderland".to_owned(),
            ),
            Cred::Bob => (Signing::Md5, "bob".to_owned(), "builder".to_owned()),
            Cred::Rest => {
                let (user, password) = rest(self.unix_now() + 3600);
                (Signing::Md5, user, password)
            }
            Cred::RestExpired => {
                let (user, password) = rest(self.unix_now().saturating_sub(60));
                (Signing::Md5, user, password)
            }
        };
        testing::sign(b, how, &user, &password, REALM, nonce);
    }

    pub(crate) fn client_sends(&mut self, ft: FiveTuple, bytes: &[u8]) {
        self.server
            .handle_client_datagram(self.now, ft, Self::route_of(ft), bytes);
        self.pump();
    }

    /// The route a 5-tuple's datagrams come by: its index among [`tuples`] (plus one, so it
    /// differs from `Route::default()`).
    fn route_of(ft: FiveTuple) -> Route {
        let i = tuples()
            .iter()
            .position(|x| *x == ft)
            .unwrap_or(usize::MAX - 1);
        Route(u32::try_from(i + 1).unwrap_or(u32::MAX))
    }

    fn next_free_port(&mut self, even: bool, pair: bool) -> Option<u16> {
        for _ in 0..20_000 {
            let p = self.next_port;
            self.next_port = if self.next_port >= 65_000 {
                49152
            } else {
                self.next_port + 1
            };
            if even && p % 2 != 0 {
                continue;
            }
            let free = |q: u16| {
                !self.bound.contains(&sa(IpAddr::V4(RELAY_IPV4), q))
                    && !self.bound.contains(&sa(IpAddr::V6(RELAY_IPV6), q))
            };
            if free(p) && (!pair || free(p + 1)) {
                return Some(p);
            }
        }
        None
    }

    fn bind(
        &mut self,
        family: AddressFamily,
        port: PortRequest,
    ) -> Result<RelayedAddress, RelayError> {
        let ip = testing::relay_ip(family).ok_or(RelayError::FamilyUnavailable)?;
        let local = match port {
            PortRequest::Reserved(local) => {
                assert!(
                    self.bound.contains(&local),
                    "the server asked to bind reserved {local}, which it never had reserved"
                );
                return Ok(self.relays.insert(local));
            }
            PortRequest::Even { reserve_next } => sa(
                ip,
                self.next_free_port(true, reserve_next)
                    .ok_or(RelayError::NoPortAvailable)?,
            ),
            PortRequest::Any => sa(
                ip,
                self.next_free_port(false, false)
                    .ok_or(RelayError::NoPortAvailable)?,
            ),
        };
        assert!(self.bound.insert(local), "port {local} handed out twice");
        Ok(self.relays.insert(local))
    }

    fn answer(&mut self, req: RelayRequest) {
        let mode = self.relay_mode;
        let primary = if mode & 1 != 0 {
            Err(if mode & 16 != 0 {
                RelayError::NoDescriptors
            } else {
                RelayError::NoPortAvailable
            })
        } else if mode & 2 != 0 {
            Err(RelayError::FamilyUnavailable)
        } else {
            self.bind(req.family, req.port)
        };
        if primary.is_err() {
            // The IO layer gives back a held port it could not use.
            if let PortRequest::Reserved(local) = req.port {
                self.bound.remove(&local);
            }
        }
        let additional = req.additional_ipv6.then(|| {
            if mode & 4 != 0 {
                Err(if mode & 16 != 0 {
                    RelayError::NoDescriptors
                } else {
                    RelayError::NoPortAvailable
                })
            } else {
                self.bind(AddressFamily::IPV6, PortRequest::Any)
            }
        });
        let reserved_next = match (req.port, &primary) {
            (PortRequest::Even { reserve_next: true }, Ok(r)) => {
                let next = sa(r.local.ip(), r.local.port() + 1);
                assert!(
                    self.bound.insert(next),
                    "reserved port {next} already in use"
                );
                Some(next)
            }
            _ => None,
        };
        self.server.handle_relay_bound(
            self.now,
            req.id,
            RelayBound {
                primary,
                additional,
                reserved_next,
            },
        );
    }

    pub(crate) fn answer_deferred(&mut self) {
        let reqs = std::mem::take(&mut self.deferred);
        for r in reqs {
            self.answer(r);
        }
        self.pump();
    }

    /// Drains transmits and events, checking each and acting on relay requests.
    pub(crate) fn pump(&mut self) {
        loop {
            while let Some(t) = self.server.poll_transmit() {
                let payload = t.payload.to_vec();
                let destination = t.destination;
                let expected = match destination {
                    Destination::Client(ft) => Self::route_of(ft),
                    Destination::Peer { .. } => Route::default(),
                };
                assert_eq!(t.route, expected, "route of a transmit to {destination:?}");
                self.observe(destination, &payload);
                self.sent.push((destination, payload));
            }
            let Some(ev) = self.server.poll_event() else {
                break;
            };
            match ev {
                Event::RelayRequested(req) => {
                    if self.relay_mode & 8 != 0 {
                        self.deferred.push(req);
                    } else {
                        self.answer(req);
                    }
                }
                Event::RelayReleased(r) => {
                    self.relays.release(&r);
                    assert!(
                        self.bound.remove(&r.local),
                        "RelayReleased({r:?}) for a socket that is not bound"
                    );
                }
                Event::ReservedPortReleased(local) => {
                    assert!(
                        self.relays.handle_of(local).is_none(),
                        "ReservedPortReleased({local}) for a relay socket in use"
                    );
                    assert!(
                        self.bound.remove(&local),
                        "ReservedPortReleased({local}) for a port that is not held"
                    );
                }
                Event::AllocationCreated {
                    id,
                    route,
                    five_tuple,
                    ..
                } => {
                    assert_eq!(route, Self::route_of(five_tuple));
                    assert!(self.ids.insert(id), "allocation id {id:?} handed out twice");
                    self.created += 1;
                }
                Event::AllocationEnded {
                    route, five_tuple, ..
                } => {
                    assert_eq!(route, Self::route_of(five_tuple));
                    self.ended += 1;
                }
                Event::Rejected { .. } => {}
            }
        }
        check_gauges(&self.server);
        if self.sent.len() > 64 {
            self.sent.clear();
        }
    }

    /// Checks one outgoing datagram and learns nonces and reservation tokens from replies.
    fn observe(&mut self, destination: Destination, payload: &[u8]) {
        match destination {
            Destination::Peer { relay, .. } => {
                assert!(
                    self.relays.get(relay).is_some(),
                    "datagram to a peer from {relay:?}, which is not a bound relay socket"
                );
            }
            Destination::Client(ft) => {
                if payload.first().is_some_and(|b| b & 0xc0 == 0x40) {
                    let cd = ChannelData::decode(payload);
                    assert!(cd.is_ok(), "undecodable ChannelData to the client: {cd:?}");
                    return;
                }
                let m = Message::decode(payload);
                let Ok(m) = m else {
                    panic!("undecodable STUN to the client: {m:?} {payload:02x?}");
                };
                let Some(t) = tuples().iter().position(|x| *x == ft) else {
                    panic!("a datagram to {ft:?}, which never sent anything");
                };
                if m.typ().class == Class::Success {
                    self.successes += 1;
                }
                if let Ok(Some(e)) = m.get::<ErrorCodeAttr<'_>>() {
                    if matches!(e.code, ErrorCode::UNAUTHENTICATED | ErrorCode::STALE_NONCE) {
                        if let Ok(Some(n)) = m.get::<Nonce<'_>>() {
                            self.nonces[t] = Some(n.0.to_owned());
                        }
                    }
                }
                if let Ok(Some(tok)) = m.get::<ReservationToken>() {
                    if self.tokens.len() < 8 {
                        self.tokens.push(tok.0);
                    }
                }
            }
        }
    }

    /// After any scenario: every 5-tuple still gets its Binding answered, and once every
    /// lifetime has run out nothing is left behind.
    pub(crate) fn finish(&mut self) {
        // Back to serving everything, as configured.
        self.server.set_draining(None);
        self.server.update_config(self.config.clone());
        self.answer_deferred();
        for (i, ft) in tuples().into_iter().enumerate() {
            self.sent.clear();
            let tid = TransactionId([0xb0 + i as u8; 12]);
            let mut out = Vec::new();
            let mut b = MessageBuilder::new(
                &mut out,
                MessageType::new(Method::BINDING, Class::Request),
                tid,
            );
            b.add_fingerprint();
            b.finish();
            self.client_sends(ft, &out);
            let replies: Vec<_> = self
                .sent
                .iter()
                .filter(|(d, _)| *d == Destination::Client(ft))
                .collect();
            assert_eq!(replies.len(), 1, "Binding on {ft:?} got {replies:?}");
            let m = Message::decode(&replies[0].1);
            let Ok(m) = m else {
                panic!("Binding answer does not decode: {m:?}");
            };
            assert_eq!(m.typ(), MessageType::new(Method::BINDING, Class::Success));
            assert_eq!(m.transaction_id(), tid);
            assert_eq!(
                m.get::<XorMappedAddress>(),
                Ok(Some(XorMappedAddress(ft.client)))
            );
            assert!(m.verify_fingerprint());
        }
        assert_eq!(
            self.server.allocation_count(),
            self.created - self.ended,
            "allocations alive vs created - ended"
        );
        // Outlive every lifetime (max 3600 s, the channel cooldown, reservations).
        self.advance(Duration::from_secs(2 * 3600));
        self.advance(Duration::from_secs(600));
        assert_eq!(
            self.server.allocation_count(),
            0,
            "allocations outlived their lifetime"
        );
        assert_eq!(
            self.created, self.ended,
            "AllocationCreated without AllocationEnded"
        );
        assert_eq!(self.server.permission_and_channel_count(), (0, 0));
        let stats = self.server.stats();
        assert_eq!(
            (
                stats.allocations_active,
                stats.permissions_active,
                stats.channels_active
            ),
            (0, 0, 0),
            "gauges not back to zero"
        );
        assert!(
            self.bound.is_empty(),
            "relay sockets never released: {:?}",
            self.bound
        );
        let in_use = self.quota.lock().map_or(0, |q| q.in_use());
        assert_eq!(in_use, 0, "quota slots never given back");
        let reserved = self.reservations.0.lock().map_or(0, |r| r.len());
        assert_eq!(reserved, 0, "reservations never removed");
    }
}

impl FakeIo for Driver {
    fn server(&mut self) -> &mut Server {
        &mut self.server
    }

    fn now(&self) -> Instant {
        self.now
    }

    fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    fn pump(&mut self) {
        Driver::pump(self);
    }
}

/// Reads operations from arbitrary bytes (the fuzz target's input): every byte string is a
/// valid scenario; bytes run out as zeros.
pub(crate) struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub(crate) fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        if self.u8() & 1 == 1 {
            Some(f(self))
        } else {
            None
        }
    }

    /// A length byte, then that many bytes (fewer when the input ends).
    pub(crate) fn bytes(&mut self) -> Vec<u8> {
        let n = usize::from(self.u8()).min(self.data.len());
        let (v, rest) = self.data.split_at(n);
        self.data = rest;
        v.to_vec()
    }
}

/// The server setup from the first two bytes.
pub(crate) fn parse_setup(r: &mut Bytes<'_>) -> Setup {
    let a = r.u8();
    let b = r.u8();
    Setup {
        relay_ipv4: a & 0x03 != 0,
        relay_ipv6: a & 0x0c != 0 || a & 0x03 == 0,
        per_user_quota: (a & 0x10 != 0).then_some(u32::from(b & 0x03)),
        total_quota: (a & 0x20 != 0).then_some(u32::from((b >> 2) & 0x03)),
        max_permissions: usize::from((b >> 4) & 0x07) + 1,
        software: a & 0x40 != 0,
        rfc5766_channels: a & 0x80 != 0,
    }
}

fn parse_kind(r: &mut Bytes<'_>) -> ReqKind {
    match r.u8() % 6 {
        0 => ReqKind::Binding,
        1 => ReqKind::Allocate {
            transport: r.opt(Bytes::u8).map(|p| if p < 0x80 { 17 } else { p }),
            requested_family: r.opt(|r| r.u8() % 4),
            additional_family: r.opt(|r| r.u8() % 4),
            even_port: r.opt(|r| r.u8() & 1 == 1),
            token: r.opt(Bytes::u8),
            lifetime: r.opt(Bytes::u32),
            dont_fragment: r.u8() & 1 == 1,
        },
        2 => ReqKind::Refresh {
            lifetime: r.opt(|r| match r.u8() % 4 {
                0 => 0,
                1 => 600,
                _ => r.u32(),
            }),
            requested_family: r.opt(|r| r.u8() % 4),
        },
        3 => {
            let n = usize::from(r.u8() % 20);
            ReqKind::CreatePermission {
                peers: (0..n).map(|_| r.u8()).collect(),
            }
        }
        4 => ReqKind::ChannelBind {
            channel: r.u16(),
            peer: r.u8(),
        },
        _ => ReqKind::Odd {
            method: r.u16(),
            attr: r.u16(),
        },
    }
}

/// Parses a whole scenario: the setup, then operations until the bytes run out.
pub(crate) fn parse_ops(data: &[u8]) -> (Setup, Vec<Op>) {
    let mut r = Bytes::new(data);
    let setup = parse_setup(&mut r);
    let mut ops = Vec::new();
    while !r.is_empty() && ops.len() < 256 {
        let op = match r.u8() % 13 {
            0..=3 => {
                let tuple = r.u8();
                let cred = r.u8();
                let kind = parse_kind(&mut r);
                let tid = r.u8() % 8;
                let fingerprint = r.u8() & 1 == 1;
                let corrupt = r.opt(|r| (r.u16(), r.u8()));
                Op::Request {
                    tuple,
                    cred,
                    kind,
                    tid,
                    fingerprint,
                    corrupt,
                }
            }
            4 => Op::Send {
                tuple: r.u8(),
                peer: r.u8(),
                dont_fragment: r.u8() & 1 == 1,
                data: r.bytes(),
            },
            5 => Op::ChannelData {
                tuple: r.u8(),
                channel: r.u16(),
                data: r.bytes(),
            },
            6 => Op::Raw {
                tuple: r.u8(),
                bytes: r.bytes(),
            },
            7 => Op::Peer {
                relay: r.u8(),
                peer: r.u8(),
                data: r.bytes(),
            },
            8 => Op::Advance { millis: r.u32() },
            9 => Op::RelayMode(r.u8()),
            10 => Op::Answer,
            11 => Op::Close { tuple: r.u8() },
            _ => Op::Operate(r.u8()),
        };
        ops.push(op);
    }
    (setup, ops)
}
