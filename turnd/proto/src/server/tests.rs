//! Fake-clock tests of the server state machine: one per rule, named after it.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::policy::PeerPolicy;
use super::*;
use crate::auth::{long_term_key_md5, long_term_key_sha256, rest_api_password};
use crate::defaults;
use crate::testing::{
    self, check_gauges, rest_credential, FakeIo, RelaySlab, Signing, REALM, SECRET, UNIX0,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn udp(client: &str) -> FiveTuple {
    over(Transport::Udp, client)
}

/// The 5-tuple of `client` talking to the server over `transport`.
fn over(transport: Transport, client: &str) -> FiveTuple {
    FiveTuple {
        client: addr(client),
        server: addr("198.51.100.1:3478"),
        transport,
    }
}

/// The server plus a fake IO layer: a fake clock, a relay port pool, captured output.
struct Harness {
    server: Server,
    now: Instant,
    ports: Vec<u16>,
    bound: Vec<SocketAddr>,
    /// Relay sockets by handle (the fake IO layer's slab).
    relays: RelaySlab,
    sent: Vec<(Destination, Vec<u8>, bool)>,
    routes: Vec<Route>,
    events: Vec<Event>,
    fail_ipv6: bool,
    /// Every bind fails with this.
    fail_with: Option<RelayError>,
}

fn config() -> ServerConfig {
    testing::server_config()
}

impl FakeIo for Harness {
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
        Harness::pump(self);
    }
}

impl Harness {
    fn new() -> Self {
        Self::with(config(), Box::new(LocalQuota::default()))
    }

    fn with(config: ServerConfig, quota: Box<dyn QuotaLedger>) -> Self {
        Self::sharing(
            config,
            quota,
            Box::new(LocalReservations::default()),
            Instant::now(),
        )
    }

    /// A shard sharing ledgers with others, on the clock `t0` (shards share one clock).
    fn sharing(
        config: ServerConfig,
        quota: Box<dyn QuotaLedger>,
        reservations: Box<dyn ReservationLedger>,
        t0: Instant,
    ) -> Self {
        // A different seed per shard, as an IO layer draws from its RNG.
        static SHARD: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let seed = [SHARD.fetch_add(1, std::sync::atomic::Ordering::Relaxed); 32];
        Self {
            server: Server::with_ledgers(config, quota, reservations, seed, t0, UNIX0),
            now: t0,
            ports: (49152..49162).collect(),
            bound: Vec::new(),
            relays: RelaySlab::default(),
            sent: Vec::new(),
            routes: Vec::new(),
            events: Vec::new(),
            fail_ipv6: false,
            fail_with: None,
        }
    }

    fn bind(
        &mut self,
        family: AddressFamily,
        port: PortRequest,
    ) -> Result<RelayedAddress, RelayError> {
        if family == AddressFamily::IPV6 && self.fail_ipv6 {
            return Err(RelayError::NoPortAvailable);
        }
        if let Some(e) = self.fail_with {
            return Err(e);
        }
        let ip = testing::relay_ip(family).ok_or(RelayError::FamilyUnavailable)?;
        let port = match port {
            PortRequest::Reserved(local) => local.port(),
            PortRequest::Even { .. } => {
                let i = self
                    .ports
                    .iter()
                    .position(|p| p % 2 == 0)
                    .ok_or(RelayError::NoPortAvailable)?;
                self.ports.remove(i)
            }
            PortRequest::Any => {
                if self.ports.is_empty() {
                    return Err(RelayError::NoPortAvailable);
                }
                self.ports.remove(0)
            }
        };
        let local = SocketAddr::new(ip, port);
        self.bound.push(local);
        Ok(self.relays.insert(local))
    }

    fn pump(&mut self) {
        loop {
            while let Some(t) = self.server.poll_transmit() {
                self.sent
                    .push((t.destination, t.payload.to_vec(), t.dont_fragment));
                self.routes.push(t.route);
            }
            let Some(ev) = self.server.poll_event() else {
                break;
            };
            match &ev {
                Event::RelayRequested(req) => {
                    let primary = self.bind(req.family, req.port);
                    let additional = req
                        .additional_ipv6
                        .then(|| self.bind(AddressFamily::IPV6, PortRequest::Any));
                    let reserved_next = match (req.port, &primary) {
                        (PortRequest::Even { reserve_next: true }, Ok(r)) => {
                            let next = r.local.port() + 1;
                            self.ports.retain(|p| *p != next);
                            Some(SocketAddr::new(r.local.ip(), next))
                        }
                        _ => None,
                    };
                    let id = req.id;
                    self.server.handle_relay_bound(
                        self.now,
                        id,
                        RelayBound {
                            primary,
                            additional,
                            reserved_next,
                        },
                    );
                }
                Event::RelayReleased(r) => {
                    self.relays.release(r);
                    self.bound.retain(|b| *b != r.local);
                    self.ports.push(r.local.port());
                }
                Event::ReservedPortReleased(local) => {
                    self.ports.push(local.port());
                }
                _ => {}
            }
            self.events.push(ev);
        }
        check_gauges(&self.server);
    }

    fn client_sends(&mut self, ft: FiveTuple, bytes: &[u8]) {
        self.client_sends_by(ft, Route::default(), bytes);
    }

    fn client_sends_by(&mut self, ft: FiveTuple, route: Route, bytes: &[u8]) {
        self.server
            .handle_client_datagram(self.now, ft, route, bytes);
        self.pump();
    }

    /// The handle of the relay socket bound at `local`.
    fn relay(&self, local: SocketAddr) -> RelayHandle {
        self.relays.handle_of(local).expect("relay socket bound")
    }

    /// How many allocations ended for `reason`.
    fn ended(&self, reason: EndReason) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::AllocationEnded { reason: r, .. } if *r == reason))
            .count()
    }

    /// Whether the relay socket at `local` was released.
    fn released(&self, local: SocketAddr) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, Event::RelayReleased(r) if r.local == local))
    }

    fn peer_sends(&mut self, local: SocketAddr, peer: SocketAddr, data: &[u8]) {
        let relay = self.relay(local);
        self.server
            .handle_peer_datagram(self.now, relay, peer, data);
        self.pump();
    }

    fn take_sent(&mut self) -> Vec<(Destination, Vec<u8>, bool)> {
        std::mem::take(&mut self.sent)
    }

    fn last_reply(&mut self) -> Vec<u8> {
        let sent = self.take_sent();
        assert_eq!(sent.len(), 1, "expected exactly one datagram, got {sent:?}");
        assert!(matches!(sent[0].0, Destination::Client(_)));
        sent[0].1.clone()
    }

    fn rejections(&self) -> Vec<Reject> {
        self.events
            .iter()
            .filter_map(|e| {
                if let Event::Rejected { reason, .. } = e {
                    Some(*reason)
                } else {
                    None
                }
            })
            .collect()
    }
}

/// How a test client authenticates.
#[derive(Clone)]
enum Cred {
    Password { user: String, password: String },
    UserHash { user: String, password: String },
    Sha256 { user: String, password: String },
}

impl Cred {
    /// USERNAME and the MD5 key, MESSAGE-INTEGRITY.
    fn password(user: &str, password: &str) -> Self {
        Self::Password {
            user: user.into(),
            password: password.into(),
        }
    }

    /// USERHASH and the MD5 key, MESSAGE-INTEGRITY-SHA256.
    fn user_hash(user: &str, password: &str) -> Self {
        Self::UserHash {
            user: user.into(),
            password: password.into(),
        }
    }

    /// USERNAME and the SHA-256 key, MESSAGE-INTEGRITY-SHA256.
    fn sha256(user: &str, password: &str) -> Self {
        Self::Sha256 {
            user: user.into(),
            password: password.into(),
        }
    }
}

fn rest(user: &str, expiry: u64) -> Cred {
    let (username, password) = rest_credential(SECRET, user, expiry);
    Cred::Password {
        user: username,
        password,
    }
}

fn alice() -> Cred {
    Cred::password("alice", "wonderland")
}

/// A long-term-credential client that handles the 401 challenge like a real one.
struct Client {
    ft: FiveTuple,
    cred: Cred,
    nonce: Option<String>,
    next_tid: u8,
}

impl Client {
    fn new(ft: FiveTuple, cred: Cred) -> Self {
        Self {
            ft,
            cred,
            nonce: None,
            next_tid: 1,
        }
    }

    fn tid(&mut self) -> TransactionId {
        self.next_tid = self.next_tid.wrapping_add(1);
        TransactionId([self.next_tid; 12])
    }

    fn build(
        &self,
        method: Method,
        tid: TransactionId,
        body: &dyn Fn(&mut MessageBuilder<'_>),
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(&mut out, MessageType::new(method, Class::Request), tid);
        body(&mut b);
        if let Some(nonce) = &self.nonce {
            let (how, user, password) = match &self.cred {
                Cred::Password { user, password } => (Signing::Md5, user, password),
                Cred::UserHash { user, password } => (Signing::UserHash, user, password),
                Cred::Sha256 { user, password } => (Signing::Sha256, user, password),
            };
            testing::sign(&mut b, how, user, password, REALM, nonce);
        }
        b.add_fingerprint();
        b.finish();
        out
    }

    /// Sends a request, answering 401/438 challenges once each; returns the final reply.
    fn request(
        &mut self,
        h: &mut Harness,
        method: Method,
        body: &dyn Fn(&mut MessageBuilder<'_>),
    ) -> Vec<u8> {
        let tid = self.tid();
        for _ in 0..3 {
            let req = self.build(method, tid, body);
            h.client_sends(self.ft, &req);
            let reply = h.last_reply();
            let m = Message::decode(&reply).unwrap();
            let code = m.get::<ErrorCodeAttr<'_>>().unwrap().map(|e| e.code);
            if matches!(
                code,
                Some(ErrorCode::UNAUTHENTICATED | ErrorCode::STALE_NONCE)
            ) && self.nonce_changed(&m)
            {
                continue;
            }
            return reply;
        }
        panic!("authentication loop");
    }

    fn nonce_changed(&mut self, m: &Message<'_>) -> bool {
        let n = m.get::<Nonce<'_>>().unwrap().map(|n| n.0.to_owned());
        let changed = n.is_some() && n != self.nonce;
        if changed {
            self.nonce = n;
        }
        changed
    }

    fn allocate(&mut self, h: &mut Harness) -> Vec<u8> {
        self.request(h, Method::ALLOCATE, &|b| {
            b.add(&RequestedTransport::UDP);
        })
    }

    fn permit(&mut self, h: &mut Harness, peer: SocketAddr) -> Vec<u8> {
        self.request(h, Method::CREATE_PERMISSION, &|b| {
            b.add(&XorPeerAddress(peer));
        })
    }

    fn bind_channel(&mut self, h: &mut Harness, n: u16, peer: SocketAddr) -> Vec<u8> {
        self.request(h, Method::CHANNEL_BIND, &|b| {
            b.add_raw(AttrType::CHANNEL_NUMBER, &[(n >> 8) as u8, n as u8, 0, 0]);
            b.add(&XorPeerAddress(peer));
        })
    }

    fn refresh(&mut self, h: &mut Harness, lifetime: Option<u32>) -> Vec<u8> {
        self.request(h, Method::REFRESH, &|b| {
            if let Some(l) = lifetime {
                b.add(&Lifetime(l));
            }
        })
    }
}

/// A ChannelData message on `channel` as a UDP client sends it (unpadded).
fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ChannelData {
        channel: ChannelNumber::new(channel).unwrap(),
        data,
    }
    .encode(false, &mut out);
    out
}

/// A message with no credentials: `body` adds the attributes, then it is finished (no
/// FINGERPRINT).
fn message(
    method: Method,
    class: Class,
    tid: u8,
    body: impl FnOnce(&mut MessageBuilder<'_>),
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(method, class),
        TransactionId([tid; 12]),
    );
    body(&mut b);
    b.finish();
    out
}

/// A Send indication of `data` to `peer` (RFC 8656 §11.1).
fn send_indication(tid: u8, peer: &str, data: &[u8]) -> Vec<u8> {
    message(Method::SEND, Class::Indication, tid, |b| {
        b.add(&XorPeerAddress(addr(peer))).add(&Data(data));
    })
}

/// What the relay socket at `local` sends to `peer`: `data`, with DF or not, as
/// `Harness::take_sent` lists it.
fn to_peer(
    h: &Harness,
    local: SocketAddr,
    peer: &str,
    data: &[u8],
    dont_fragment: bool,
) -> (Destination, Vec<u8>, bool) {
    let destination = Destination::Peer {
        relay: h.relay(local),
        peer: addr(peer),
    };
    (destination, data.to_vec(), dont_fragment)
}

fn error_code(reply: &[u8]) -> Option<u16> {
    Message::decode(reply)
        .unwrap()
        .get::<ErrorCodeAttr<'_>>()
        .unwrap()
        .map(|e| e.code.0)
}

fn is_success(reply: &[u8]) -> bool {
    Message::decode(reply).unwrap().typ().class == Class::Success
}

fn relayed(reply: &[u8]) -> Vec<SocketAddr> {
    let m = Message::decode(reply).unwrap();
    m.get_all::<XorRelayedAddress>()
        .map(|r| r.unwrap().0)
        .collect()
}

const PEER: &str = "192.0.2.44:9000";

fn allocated(h: &mut Harness, client: &str) -> (Client, SocketAddr) {
    allocated_over(h, Transport::Udp, client)
}

/// Alice's allocation from `client` over `transport`, and its relay socket's local address.
fn allocated_over(h: &mut Harness, transport: Transport, client: &str) -> (Client, SocketAddr) {
    let mut c = Client::new(over(transport, client), alice());
    let r = c.allocate(h);
    assert!(is_success(&r), "allocate failed: {:?}", error_code(&r));
    let local = h.bound.last().copied().unwrap();
    (c, local)
}

// ---------------------------------------------------------------------------------------------
// Binding and challenges

#[test]
fn rfc8489_binding_answered_without_auth_with_xor_mapped_address_and_no_software() {
    let mut cfg = config();
    cfg.software = Some("turnd".into());
    let mut h = Harness::with(cfg, Box::new(LocalQuota::default()));
    let ft = udp("192.0.2.7:40000");
    let out = message(Method::BINDING, Class::Request, 1, |b| {
        b.add_fingerprint();
    });
    h.client_sends(ft, &out);
    let r = h.last_reply();
    let m = Message::decode(&r).unwrap();
    assert_eq!(m.typ(), MessageType::new(Method::BINDING, Class::Success));
    assert_eq!(m.transaction_id(), TransactionId([1; 12]));
    assert_eq!(
        m.get::<XorMappedAddress>().unwrap(),
        Some(XorMappedAddress(ft.client))
    );
    assert_eq!(m.get::<Software<'_>>().unwrap(), None);
    assert!(m.verify_fingerprint());
}

#[test]
fn rfc8489_9_2_4_request_without_integrity_gets_401_challenge_without_reason_phrase() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let tid = c.tid();
    let req = c.build(Method::ALLOCATE, tid, &|b| {
        b.add(&RequestedTransport::UDP);
    });
    h.client_sends(c.ft, &req);
    let r = h.last_reply();
    let m = Message::decode(&r).unwrap();
    assert_eq!(m.typ(), MessageType::new(Method::ALLOCATE, Class::Error));
    let e = m.get::<ErrorCodeAttr<'_>>().unwrap().unwrap();
    assert_eq!(e.code, ErrorCode::UNAUTHENTICATED);
    assert_eq!(e.reason, "");
    assert_eq!(m.get::<Realm<'_>>().unwrap(), Some(Realm(REALM)));
    assert!(m
        .get::<Nonce<'_>>()
        .unwrap()
        .unwrap()
        .0
        .starts_with("obMatJos2"));
    assert_eq!(
        m.get::<PasswordAlgorithms<'_>>().unwrap(),
        Some(PasswordAlgorithms::SERVER)
    );
    assert!(!m.has_integrity());
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(h.rejections(), vec![Reject::Unauthenticated]);
}

#[test]
fn rfc8489_9_2_4_wrong_password_gets_401() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), Cred::password("alice", "nope"));
    let r = c.allocate(&mut h);
    assert_eq!(error_code(&r), Some(401));
    assert!(h.rejections().contains(&Reject::BadIntegrity));
    let mut c = Client::new(udp("192.0.2.7:40001"), Cred::password("mallory", "x"));
    assert_eq!(error_code(&c.allocate(&mut h)), Some(401));
    assert!(h.rejections().contains(&Reject::UnknownUser));
}

#[test]
fn rfc8489_9_2_4_stale_nonce_gets_438_then_retry_succeeds() {
    let mut h = Harness::new();
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    h.advance(Duration::from_secs(601)); // nonce lifetime 600 s; allocation lifetime 600 s
    let mut c2 = Client::new(udp("192.0.2.7:40001"), alice());
    c2.nonce = c.nonce.clone();
    // c2 reuses c's nonce: bound to another address and stale → 438, then succeeds.
    let r = c2.allocate(&mut h);
    assert!(is_success(&r));
    assert!(h.rejections().contains(&Reject::StaleNonce));
    // And the original client's nonce is simply stale.
    h.events.clear();
    let r = c.allocate(&mut h);
    assert!(is_success(&r), "{:?}", error_code(&r));
    assert_eq!(h.rejections(), vec![Reject::StaleNonce]);
}

#[test]
fn turn_rest_api_credential_allocates_under_any_configured_secret() {
    let mut cfg = config();
    cfg.credentials.add_secret(b"rotated".to_vec());
    let mut h = Harness::with(cfg, Box::new(LocalQuota::default()));
    let mut c = Client::new(udp("192.0.2.7:40000"), rest("web", UNIX0 + 3600));
    assert!(is_success(&c.allocate(&mut h)));
    let username = format!("{}:web", UNIX0 + 3600);
    let password = rest_api_password(b"rotated", &username);
    let mut c = Client::new(
        udp("192.0.2.7:40001"),
        Cred::Password {
            user: username,
            password,
        },
    );
    assert!(is_success(&c.allocate(&mut h)));
}

#[test]
fn expired_rest_credential_refused_on_allocate_and_on_refresh() {
    let mut h = Harness::new();
    let mut old = Client::new(udp("192.0.2.7:40000"), rest("web", UNIX0 - 1));
    assert_eq!(error_code(&old.allocate(&mut h)), Some(401));
    assert!(h.rejections().contains(&Reject::ExpiredCredentials));

    let mut c = Client::new(udp("192.0.2.7:40001"), rest("web", UNIX0 + 100));
    assert!(is_success(&c.allocate(&mut h)));
    h.advance(Duration::from_secs(101));
    let r = c.refresh(&mut h, Some(600));
    assert_eq!(error_code(&r), Some(401));
    assert_eq!(h.rejections().last(), Some(&Reject::ExpiredCredentials));
}

#[test]
fn static_user_configured_with_turnadmin_key_authenticates() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), Cred::password("bob", "builder"));
    assert!(is_success(&c.allocate(&mut h)));
}

#[test]
fn rfc8489_sha256_password_algorithm_and_integrity_sha256_response() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), Cred::sha256("alice", "wonderland"));
    let r = c.allocate(&mut h);
    let m = Message::decode(&r).unwrap();
    assert_eq!(m.typ().class, Class::Success);
    assert!(m.verify_integrity_sha256(&long_term_key_sha256("alice", REALM, "wonderland")));
    assert!(!m.has_integrity());
}

#[test]
fn rfc8489_9_2_4_altered_password_algorithms_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let _ = c.allocate(&mut h); // learn a nonce
    let nonce = c.nonce.clone().unwrap();
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(Method::REFRESH, Class::Request),
        TransactionId([3; 12]),
    );
    b.add(&Username("alice"))
        .add(&Realm(REALM))
        .add(&Nonce(&nonce));
    // Only MD5 listed: a downgrade attempt.
    b.add_raw(AttrType::PASSWORD_ALGORITHMS, &[0, 1, 0, 0]);
    b.add(&PasswordAlgorithm {
        algorithm: PasswordAlgorithmId::MD5,
        params: &[],
    });
    b.add_message_integrity(&long_term_key_md5("alice", REALM, "wonderland"));
    b.finish();
    h.client_sends(c.ft, &out);
    assert_eq!(error_code(&h.last_reply()), Some(400));
    assert_eq!(h.rejections().last(), Some(&Reject::BadPasswordAlgorithm));
}

#[test]
fn rfc8489_userhash_identifies_a_static_user() {
    let mut h = Harness::new();
    let mut c = Client::new(
        udp("192.0.2.7:40000"),
        Cred::user_hash("alice", "wonderland"),
    );
    let r = c.allocate(&mut h);
    assert!(is_success(&r), "{:?}", error_code(&r));
}

#[test]
fn rfc8489_7_3_1_unknown_comprehension_required_attribute_gets_420_listing_it() {
    let mut h = Harness::new();
    let out = message(Method::BINDING, Class::Request, 4, |b| {
        b.add_raw(AttrType(0x7777), b"xx");
        b.add_raw(AttrType(0xC001), b"optional is ignored");
    });
    h.client_sends(udp("192.0.2.7:1"), &out);
    let r = h.last_reply();
    let m = Message::decode(&r).unwrap();
    assert_eq!(error_code(&r), Some(420));
    assert_eq!(
        m.get::<UnknownAttributes>().unwrap().unwrap().types(),
        &[AttrType(0x7777)]
    );

    let out = message(Method::BINDING, Class::Request, 5, |b| {
        b.add_raw(AttrType(0xC001), b"optional is ignored");
    });
    h.client_sends(udp("192.0.2.7:1"), &out);
    assert!(is_success(&h.last_reply()));
}

// ---------------------------------------------------------------------------------------------
// Allocate

#[test]
fn rfc8656_7_2_allocate_grants_relayed_address_default_lifetime_and_mapped_address() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let r = c.allocate(&mut h);
    let m = Message::decode(&r).unwrap();
    assert_eq!(m.typ(), MessageType::new(Method::ALLOCATE, Class::Success));
    assert_eq!(
        relayed(&r),
        vec![addr("203.0.113.5:49152")],
        "advertised, not bound, address"
    );
    assert_eq!(m.get::<Lifetime>().unwrap(), Some(Lifetime(600)));
    assert_eq!(
        m.get::<XorMappedAddress>().unwrap(),
        Some(XorMappedAddress(c.ft.client))
    );
    assert!(m.verify_integrity(&long_term_key_md5("alice", REALM, "wonderland")));
    assert!(m.verify_fingerprint());
    assert_eq!(h.bound, vec![addr("10.0.0.5:49152")]);
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, Event::AllocationCreated { username, .. } if &**username == "alice")));
}

#[test]
fn rfc8656_7_2_lifetime_is_clamped_between_default_and_max() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let r = c.request(&mut h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP).add(&Lifetime(100_000));
    });
    assert_eq!(
        Message::decode(&r).unwrap().get::<Lifetime>().unwrap(),
        Some(Lifetime(3600))
    );
    let r = c.refresh(&mut h, Some(30));
    assert_eq!(
        Message::decode(&r).unwrap().get::<Lifetime>().unwrap(),
        Some(Lifetime(600))
    );
}

#[test]
fn rfc8656_7_2_second_allocate_on_same_five_tuple_is_437_but_retransmission_gets_same_answer() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let tid = c.tid();
    let _ = c.request(&mut h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP);
    }); // learns the nonce (uses its own tid)
    c.request(&mut h, Method::REFRESH, &|b| {
        b.add(&Lifetime(0));
    });
    let req = c.build(Method::ALLOCATE, tid, &|b| {
        b.add(&RequestedTransport::UDP);
    });
    h.client_sends(c.ft, &req);
    let first = h.last_reply();
    assert!(is_success(&first));
    h.advance(Duration::from_secs(1));
    h.client_sends(c.ft, &req);
    assert_eq!(
        h.last_reply(),
        first,
        "retransmission answered byte for byte"
    );
    assert_eq!(h.bound.len(), 1, "no second relay");
    let r = c.allocate(&mut h);
    assert_eq!(error_code(&r), Some(437));
}

#[test]
fn rfc8656_7_2_missing_requested_transport_is_400_and_tcp_is_442() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    assert_eq!(
        error_code(&c.request(&mut h, Method::ALLOCATE, &|_| {})),
        Some(400)
    );
    let r = c.request(&mut h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::TCP);
    });
    assert_eq!(error_code(&r), Some(442));
    let m = Message::decode(&r).unwrap();
    assert_eq!(
        m.get::<ErrorCodeAttr<'_>>().unwrap().unwrap().reason,
        "Unsupported Transport Protocol"
    );
    assert!(
        m.verify_integrity(&long_term_key_md5("alice", REALM, "wonderland")),
        "authenticated errors are signed"
    );
}

#[test]
fn rfc8656_7_2_unserved_family_is_440() {
    let mut cfg = config();
    cfg.relay_ipv6 = false;
    let mut h = Harness::with(cfg, Box::new(LocalQuota::default()));
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let r = c.request(&mut h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP)
            .add(&RequestedAddressFamily(AddressFamily::IPV6));
    });
    assert_eq!(error_code(&r), Some(440));
}

#[test]
fn rfc6156_browser_without_family_gets_client_family_when_no_ipv4_relay() {
    let mut cfg = config();
    cfg.relay_ipv4 = false;
    let mut h = Harness::with(cfg, Box::new(LocalQuota::default()));
    let mut c = Client::new(udp("[2001:db8::7]:40000"), alice());
    let r = c.allocate(&mut h);
    assert_eq!(relayed(&r), vec![addr("[2001:db8::10]:49152")]);
}

#[test]
fn rfc8656_7_2_additional_address_family_gives_dual_stack_allocation() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let r = c.request(&mut h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP)
            .add(&AdditionalAddressFamily(AddressFamily::IPV6));
    });
    assert_eq!(
        relayed(&r),
        vec![addr("203.0.113.5:49152"), addr("[2001:db8::10]:49153")]
    );
    // Both families can now get permissions.
    assert!(is_success(&c.permit(&mut h, addr(PEER))));
    assert!(is_success(&c.permit(&mut h, addr("[2001:db8::99]:5"))));
}

#[test]
fn rfc8656_7_2_failed_additional_family_reported_in_address_error_code() {
    let mut h = Harness::new();
    h.fail_ipv6 = true;
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let r = c.request(&mut h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP)
            .add(&AdditionalAddressFamily(AddressFamily::IPV6));
    });
    assert_eq!(relayed(&r).len(), 1);
    let m = Message::decode(&r).unwrap();
    let e = m.get::<AddressErrorCode<'_>>().unwrap().unwrap();
    assert_eq!(
        (e.family, e.code),
        (AddressFamily::IPV6, ErrorCode::INSUFFICIENT_CAPACITY)
    );
}

#[test]
fn rfc8656_7_2_conflicting_family_attributes_are_400() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let r = c.request(&mut h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP)
            .add(&RequestedAddressFamily(AddressFamily::IPV4))
            .add(&AdditionalAddressFamily(AddressFamily::IPV6));
    });
    assert_eq!(error_code(&r), Some(400));
}

#[test]
fn rfc8656_7_2_even_port_with_reservation_token_and_its_expiry() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let r = c.request(&mut h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP)
            .add(&EvenPort { reserve: true });
    });
    let m = Message::decode(&r).unwrap();
    let port = relayed(&r)[0].port();
    assert_eq!(port % 2, 0);
    let token = m.get::<ReservationToken>().unwrap().unwrap();
    // A second client redeems the token and gets port + 1.
    let mut c2 = Client::new(udp("192.0.2.7:40002"), alice());
    let r2 = c2.request(&mut h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP).add(&token);
    });
    assert_eq!(relayed(&r2)[0].port(), port + 1);
    // The token is single-use.
    let mut c3 = Client::new(udp("192.0.2.7:40003"), alice());
    let r3 = c3.request(&mut h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP).add(&token);
    });
    assert_eq!(error_code(&r3), Some(508));

    // An unredeemed reservation is released after 30 s.
    let mut c4 = Client::new(udp("192.0.2.7:40004"), alice());
    let r4 = c4.request(&mut h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP)
            .add(&EvenPort { reserve: true });
    });
    let held = relayed(&r4)[0].port() + 1;
    assert!(!h.ports.contains(&held));
    h.advance(Duration::from_secs(31));
    assert!(h.ports.contains(&held), "reserved port released");
}

#[test]
fn rfc8656_7_2_user_quota_486_total_quota_508() {
    let mut h = Harness::with(config(), Box::new(LocalQuota::new(Some(1), Some(2))));
    let mut a = Client::new(udp("192.0.2.7:1"), alice());
    assert!(is_success(&a.allocate(&mut h)));
    let mut a2 = Client::new(udp("192.0.2.7:2"), alice());
    assert_eq!(error_code(&a2.allocate(&mut h)), Some(486));
    let mut b = Client::new(udp("192.0.2.7:3"), Cred::password("bob", "builder"));
    assert!(is_success(&b.allocate(&mut h)));
    let mut w = Client::new(udp("192.0.2.7:4"), rest("web", UNIX0 + 999));
    assert_eq!(error_code(&w.allocate(&mut h)), Some(508));
    assert!(h.rejections().contains(&Reject::UserQuotaReached));
    assert!(h.rejections().contains(&Reject::TotalQuotaReached));
    // Deleting frees the quota at once.
    assert!(is_success(&a.refresh(&mut h, Some(0))));
    assert!(is_success(&a2.allocate(&mut h)));
}

#[test]
fn rfc8656_7_2_out_of_descriptors_is_508_counted_apart() {
    let mut h = Harness::new();
    h.fail_with = Some(RelayError::NoDescriptors);
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    assert_eq!(error_code(&c.allocate(&mut h)), Some(508));
    assert_eq!(h.rejections().last(), Some(&Reject::NoDescriptors));
    assert_eq!(h.server.stats().allocations_active, 0);
}

#[test]
fn rfc8656_7_2_port_exhaustion_is_508_and_freed_ports_are_reusable_at_once() {
    let mut h = Harness::new();
    h.ports = vec![50000];
    let (mut a, _) = allocated(&mut h, "192.0.2.7:1");
    let mut b = Client::new(udp("192.0.2.7:2"), alice());
    assert_eq!(error_code(&b.allocate(&mut h)), Some(508));
    assert_eq!(h.rejections().last(), Some(&Reject::NoRelayPort));
    assert!(is_success(&a.refresh(&mut h, Some(0))));
    assert!(is_success(&b.allocate(&mut h)));
    assert_eq!(h.server.allocation_count(), 1);
}

// ---------------------------------------------------------------------------------------------
// Refresh and expiry

#[test]
fn rfc8656_8_refresh_zero_deletes_and_releases_the_relay() {
    let mut h = Harness::new();
    let (mut c, local) = allocated(&mut h, "192.0.2.7:40000");
    let r = c.refresh(&mut h, Some(0));
    assert!(is_success(&r));
    assert_eq!(
        Message::decode(&r).unwrap().get::<Lifetime>().unwrap(),
        Some(Lifetime(0))
    );
    assert!(h.released(local));
    assert!(h.ended(EndReason::Deleted) > 0);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(error_code(&c.refresh(&mut h, None)), Some(437));
}

#[test]
fn rfc8656_8_refresh_without_allocation_is_437_and_other_user_is_441() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    assert_eq!(error_code(&c.refresh(&mut h, None)), Some(437));
    let _ = c.allocate(&mut h);
    let mut other = Client::new(c.ft, Cred::password("bob", "builder"));
    assert_eq!(error_code(&other.refresh(&mut h, None)), Some(441));
    assert_eq!(error_code(&other.permit(&mut h, addr(PEER))), Some(441));
}

#[test]
fn rfc8656_8_refresh_with_unallocated_family_is_443() {
    let mut h = Harness::new();
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    let r = c.request(&mut h, Method::REFRESH, &|b| {
        b.add(&RequestedAddressFamily(AddressFamily::IPV6));
    });
    assert_eq!(error_code(&r), Some(443));
}

#[test]
fn rfc8656_7_allocation_expires_after_its_lifetime_unless_refreshed() {
    let mut h = Harness::new();
    let (mut c, local) = allocated(&mut h, "192.0.2.7:40000");
    h.advance(Duration::from_secs(500));
    assert!(is_success(&c.refresh(&mut h, Some(600))));
    h.advance(Duration::from_secs(500));
    assert_eq!(
        h.server.allocation_count(),
        1,
        "refreshed at 500 s: alive at 1000 s"
    );
    h.advance(Duration::from_secs(101));
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.released(local));
    assert!(h.ended(EndReason::Expired) > 0);
}

#[test]
fn rfc8656_3_1_allocation_dies_with_its_connection() {
    let mut h = Harness::new();
    let ft = over(Transport::Tcp, "192.0.2.7:40000");
    let mut c = Client::new(ft, alice());
    assert!(is_success(&c.allocate(&mut h)));
    h.server.handle_connection_closed(h.now, ft);
    h.pump();
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.ended(EndReason::ConnectionClosed) > 0);
}

// ---------------------------------------------------------------------------------------------
// Permissions, Send/Data, channels

#[test]
fn rfc8656_10_2_create_permission_installs_several_peers_and_relays_both_ways() {
    let mut h = Harness::new();
    let (mut c, local) = allocated(&mut h, "192.0.2.7:40000");
    let r = c.request(&mut h, Method::CREATE_PERMISSION, &|b| {
        b.add(&XorPeerAddress(addr("192.0.2.44:1")))
            .add(&XorPeerAddress(addr("192.0.2.45:1")));
    });
    assert!(is_success(&r));
    // Send indication → peer (any port of a permitted IP).
    for peer in ["192.0.2.44:7", "192.0.2.45:9"] {
        let out = message(Method::SEND, Class::Indication, 8, |b| {
            b.add(&XorPeerAddress(addr(peer)))
                .add(&Data(b"hello"))
                .add(&DontFragment);
        });
        h.client_sends(c.ft, &out);
        let sent = h.take_sent();
        assert_eq!(sent, vec![to_peer(&h, local, peer, b"hello", true)]);
    }
    // Peer → client as a Data indication.
    h.peer_sends(local, addr("192.0.2.44:7"), b"back");
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    let m = Message::decode(&sent[0].1).unwrap();
    assert_eq!(m.typ(), MessageType::new(Method::DATA, Class::Indication));
    assert_eq!(
        m.get::<XorPeerAddress>().unwrap(),
        Some(XorPeerAddress(addr("192.0.2.44:7")))
    );
    assert_eq!(m.get::<Data<'_>>().unwrap(), Some(Data(b"back")));
    // Unpermitted peer: dropped both ways, counted.
    h.peer_sends(local, addr("192.0.2.99:7"), b"x");
    assert!(h.take_sent().is_empty());
    assert_eq!(h.server.stats().dropped(DropReason::NoPermission), 1);
}

#[test]
fn rfc8656_9_permission_expires_after_300_seconds() {
    let mut h = Harness::new();
    let (mut c, local) = allocated(&mut h, "192.0.2.7:40000");
    assert!(is_success(&c.permit(&mut h, addr(PEER))));
    h.advance(Duration::from_secs(299));
    h.peer_sends(local, addr(PEER), b"a");
    assert_eq!(h.take_sent().len(), 1);
    h.advance(Duration::from_secs(2));
    h.peer_sends(local, addr(PEER), b"b");
    assert!(h.take_sent().is_empty());
    assert_eq!(
        h.server.permission_and_channel_count(),
        (0, 0),
        "swept by the timer"
    );
}

#[test]
fn rfc8656_10_2_forbidden_peers_get_403_and_nothing_is_sent() {
    let mut h = Harness::with(
        ServerConfig {
            policy: PeerPolicy::default(),
            ..config()
        },
        Box::new(LocalQuota::default()),
    );
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    for peer in [
        "127.0.0.1:5",
        "[::ffff:127.0.0.1]:5",
        "10.0.0.1:5",
        "169.254.169.254:80",
    ] {
        let r = c.permit(&mut h, addr(peer));
        assert_eq!(error_code(&r), Some(403), "{peer}");
        let r = c.bind_channel(&mut h, 0x4000, addr(peer));
        assert_eq!(error_code(&r), Some(403), "{peer}");
    }
    assert!(h.sent.is_empty());
    assert_eq!(h.server.permission_and_channel_count(), (0, 0));
}

#[test]
fn rfc8656_10_2_one_forbidden_peer_refuses_the_whole_request() {
    let mut h = Harness::new();
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    let r = c.request(&mut h, Method::CREATE_PERMISSION, &|b| {
        b.add(&XorPeerAddress(addr(PEER)))
            .add(&XorPeerAddress(addr("10.1.1.1:1")));
    });
    assert_eq!(error_code(&r), Some(403));
    assert_eq!(h.server.permission_and_channel_count(), (0, 0));
}

#[test]
fn rfc8656_10_2_peer_family_mismatch_is_443() {
    let mut h = Harness::new();
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    assert_eq!(
        error_code(&c.permit(&mut h, addr("[2001:db8::1]:5"))),
        Some(443)
    );
}

#[test]
fn rfc8656_10_2_permission_quota_is_508() {
    let mut h = Harness::with(
        ServerConfig {
            max_permissions_per_allocation: 2,
            ..config()
        },
        Box::new(LocalQuota::default()),
    );
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    assert!(is_success(&c.permit(&mut h, addr("192.0.2.1:1"))));
    assert!(is_success(&c.permit(&mut h, addr("192.0.2.2:1"))));
    assert!(
        is_success(&c.permit(&mut h, addr("192.0.2.2:9"))),
        "refresh of an existing one"
    );
    assert_eq!(
        error_code(&c.permit(&mut h, addr("192.0.2.3:1"))),
        Some(508)
    );
}

#[test]
fn rfc8656_12_channel_bind_relays_channel_data_both_ways() {
    let mut h = Harness::new();
    let (mut c, local) = allocated(&mut h, "192.0.2.7:40000");
    assert!(is_success(&c.bind_channel(&mut h, 0x4001, addr(PEER))));
    let cd = channel_data(0x4001, b"abcde");
    h.client_sends(c.ft, &cd);
    assert_eq!(
        h.take_sent(),
        vec![to_peer(&h, local, PEER, b"abcde", false)]
    );
    h.peer_sends(local, addr(PEER), b"xyz");
    let sent = h.take_sent();
    assert_eq!(
        sent[0].1,
        vec![0x40, 0x01, 0x00, 0x03, b'x', b'y', b'z'],
        "UDP: no padding"
    );
    // Another port of the same peer IP has a permission but no channel → Data indication.
    h.peer_sends(local, addr("192.0.2.44:9001"), b"q");
    let sent = h.take_sent();
    assert_eq!(
        Message::decode(&sent[0].1).unwrap().typ().method,
        Method::DATA
    );
    assert_eq!(h.server.stats().packets_to_peer, [1, 0, 0]);
    assert_eq!(h.server.stats().packets_from_peer, [2, 0, 0]);
}

#[test]
fn rfc8656_12_5_channel_data_to_stream_clients_is_padded() {
    let mut h = Harness::new();
    let (mut c, local) = allocated_over(&mut h, Transport::Tls, "192.0.2.7:40000");
    assert!(is_success(&c.bind_channel(&mut h, 0x4fff, addr(PEER))));
    h.peer_sends(local, addr(PEER), b"xyz");
    assert_eq!(
        h.take_sent()[0].1,
        vec![0x4f, 0xff, 0x00, 0x03, b'x', b'y', b'z', 0]
    );
    // Padded ChannelData from a stream client is accepted.
    h.client_sends(c.ft, &[0x4f, 0xff, 0x00, 0x01, b'k', 0, 0, 0]);
    assert_eq!(h.take_sent()[0].1, b"k");
}

#[test]
fn rfc8656_12_2_channel_numbers_outside_range_are_400() {
    // RFC 8656's range only (`rfc5766_channel_numbers = false`).
    let mut h = Harness::with(
        ServerConfig {
            rfc5766_channel_numbers: false,
            ..config()
        },
        Box::new(LocalQuota::default()),
    );
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    for n in [0x3fff, 0x5000, 0x7fff, 0xffff] {
        assert_eq!(
            error_code(&c.bind_channel(&mut h, n, addr(PEER))),
            Some(400),
            "{n:#x}"
        );
    }
    assert_eq!(h.rejections().last(), Some(&Reject::InvalidChannelNumber));
}

#[test]
fn rfc8656_12_2_conflicting_rebinds_are_400_and_same_binding_refreshes() {
    let mut h = Harness::new();
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    assert!(is_success(&c.bind_channel(&mut h, 0x4000, addr(PEER))));
    assert!(
        is_success(&c.bind_channel(&mut h, 0x4000, addr(PEER))),
        "refresh"
    );
    assert_eq!(
        error_code(&c.bind_channel(&mut h, 0x4000, addr("192.0.2.45:1"))),
        Some(400)
    );
    assert_eq!(
        error_code(&c.bind_channel(&mut h, 0x4002, addr(PEER))),
        Some(400)
    );
    assert_eq!(h.rejections().last(), Some(&Reject::ChannelConflict));
}

#[test]
fn rfc8656_12_channel_expires_after_600_seconds_and_cools_down_for_300() {
    let mut h = Harness::new();
    let (mut c, local) = allocated(&mut h, "192.0.2.7:40000");
    assert!(is_success(&c.bind_channel(&mut h, 0x4000, addr(PEER))));
    // Keep the allocation and the permission alive, not the channel.
    for _ in 0..2 {
        h.advance(Duration::from_secs(280));
        assert!(is_success(&c.refresh(&mut h, Some(600))));
        assert!(is_success(&c.permit(&mut h, addr(PEER))));
    }
    h.advance(Duration::from_secs(41)); // 601 s after binding
    let cd = channel_data(0x4000, b"z");
    h.client_sends(c.ft, &cd);
    assert!(h.take_sent().is_empty(), "channel expired");
    assert_eq!(h.server.stats().dropped(DropReason::NoChannel), 1);
    h.peer_sends(local, addr(PEER), b"d");
    assert_eq!(
        Message::decode(&h.take_sent()[0].1).unwrap().typ().method,
        Method::DATA
    );
    // During the cooldown the number cannot go to another peer.
    assert_eq!(
        error_code(&c.bind_channel(&mut h, 0x4000, addr("192.0.2.45:1"))),
        Some(400)
    );
    h.advance(Duration::from_secs(200));
    assert!(is_success(&c.refresh(&mut h, Some(600))));
    h.advance(Duration::from_secs(100));
    assert!(
        is_success(&c.bind_channel(&mut h, 0x4000, addr("192.0.2.45:1"))),
        "free after cooldown"
    );
}

#[test]
fn rfc8656_11_2_send_indication_without_permission_is_dropped() {
    let mut h = Harness::new();
    let (c, _) = allocated(&mut h, "192.0.2.7:40000");
    let out = send_indication(8, PEER, b"hello");
    h.client_sends(c.ft, &out);
    assert!(h.take_sent().is_empty());
    assert_eq!(h.server.stats().dropped(DropReason::NoPermission), 1);
}

#[test]
fn malformed_datagrams_are_counted_and_the_server_keeps_serving() {
    let mut h = Harness::new();
    let ft = udp("192.0.2.7:40000");
    for junk in [
        &b""[..],
        b"\x00",
        b"\xff\xff\xff",
        &[0u8; 19],
        &[0x40, 0x00, 0xff, 0xff],
        &[0x00, 0x01, 0x00, 0x04, 0x21, 0x12, 0xa4, 0x42],
    ] {
        h.client_sends(ft, junk);
    }
    assert!(h.take_sent().is_empty());
    assert!(h.server.stats().dropped(DropReason::Malformed) >= 5);
    let (_c, _) = allocated(&mut h, "192.0.2.7:40001");
}

#[test]
fn allocation_state_is_under_1_kib() {
    // The core's per-allocation memory: the slab slot, its index entries (the 5-tuple map,
    // its HashMap overhead estimated at 1.5×, and two slots of the by-handle Vec), and
    // typical permission and channel vectors (4 each).
    let alloc = size_of::<Option<Allocation>>();
    let perms = 4 * size_of::<allocation::Permission>();
    let chans = 4 * size_of::<ChannelBinding>();
    let index = size_of::<(FiveTuple, u32)>() * 3 / 2 + 2 * size_of::<u32>();
    let total = alloc + perms + chans + index;
    assert!(total < 1024, "per-allocation state is {total} bytes");
}

#[test]
fn ipv4_mapped_peer_is_relayed_as_ipv4_and_matches_its_channel() {
    let mut h = Harness::new();
    let (mut c, local) = allocated(&mut h, "192.0.2.7:40000");
    assert!(is_success(&c.bind_channel(
        &mut h,
        0x4005,
        addr("[::ffff:192.0.2.44]:9000")
    )));
    let cd = channel_data(0x4005, b"m");
    h.client_sends(c.ft, &cd);
    assert_eq!(h.take_sent(), vec![to_peer(&h, local, PEER, b"m", false)]);
    h.peer_sends(local, addr(PEER), b"r");
    assert_eq!(h.take_sent()[0].1, vec![0x40, 0x05, 0x00, 0x01, b'r']);
}

#[test]
fn rfc5766_channel_numbers_are_accepted_by_default_and_the_rest_is_400() {
    let mut h = Harness::new();
    let (mut c, local) = allocated(&mut h, "192.0.2.7:40000");
    for n in [0x3fff, 0x8000, 0xffff] {
        assert_eq!(
            error_code(&c.bind_channel(&mut h, n, addr(PEER))),
            Some(400),
            "{n:#x}"
        );
    }
    assert!(is_success(&c.bind_channel(&mut h, 0x5b4b, addr(PEER))));
    h.client_sends(c.ft, &[0x5b, 0x4b, 0x00, 0x02, b'h', b'i']);
    assert_eq!(
        h.take_sent()[0].0,
        Destination::Peer {
            relay: h.relay(local),
            peer: addr(PEER)
        }
    );
    h.peer_sends(local, addr(PEER), b"yo");
    assert_eq!(h.take_sent()[0].1, vec![0x5b, 0x4b, 0x00, 0x02, b'y', b'o']);
}

#[test]
fn rfc8489_6_3_transaction_cache_replays_for_40_seconds_then_forgets() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let _ = c.refresh(&mut h, None); // learn a nonce (437: no allocation yet)
    let tid = c.tid();
    let req = c.build(Method::ALLOCATE, tid, &|b| {
        b.add(&RequestedTransport::UDP);
    });
    h.client_sends(c.ft, &req);
    let first = h.last_reply();
    assert!(is_success(&first));
    h.advance(Duration::from_secs(39));
    h.client_sends(c.ft, &req);
    assert_eq!(h.last_reply(), first, "replayed within the cache lifetime");
    h.advance(Duration::from_secs(2));
    h.client_sends(c.ft, &req);
    assert_eq!(
        error_code(&h.last_reply()),
        Some(437),
        "forgotten after 40 s"
    );
}

// ---------------------------------------------------------------------------------------------
// Handles, routes, ids, counters

#[test]
fn answers_take_the_route_of_their_request_and_peer_data_the_allocations_route() {
    let mut h = Harness::new();
    let ft = udp("192.0.2.7:40000");
    let mut c = Client::new(ft, alice());
    // The whole Allocate exchange (challenge, then success) comes by route 7.
    let tid = c.tid();
    for _ in 0..2 {
        let req = c.build(Method::ALLOCATE, tid, &|b| {
            b.add(&RequestedTransport::UDP);
        });
        h.client_sends_by(ft, Route(7), &req);
        let reply = h.last_reply();
        c.nonce_changed(&Message::decode(&reply).unwrap());
    }
    assert_eq!(h.routes, vec![Route(7), Route(7)]);
    let local = h.bound[0];
    // A later request by another route is answered on that route.
    h.routes.clear();
    let tid = c.tid();
    let req = c.build(Method::CREATE_PERMISSION, tid, &|b| {
        b.add(&XorPeerAddress(addr(PEER)));
    });
    h.client_sends_by(ft, Route(3), &req);
    assert!(is_success(&h.last_reply()));
    assert_eq!(h.routes, vec![Route(3)]);
    // Data from the peer goes by the allocation's route; data to the peer has none.
    h.routes.clear();
    h.peer_sends(local, addr(PEER), b"x");
    h.take_sent();
    let send = send_indication(1, PEER, b"y");
    h.client_sends_by(ft, Route(3), &send);
    assert_eq!(h.routes, vec![Route(7), Route::default()]);
    let created = h.events.iter().find_map(|e| match e {
        Event::AllocationCreated { route, .. } => Some(*route),
        _ => None,
    });
    assert_eq!(created, Some(Route(7)));
}

#[test]
fn transaction_cache_replay_goes_by_the_retransmissions_route() {
    let mut h = Harness::new();
    let ft = udp("192.0.2.7:40000");
    let mut c = Client::new(ft, alice());
    let _ = c.refresh(&mut h, None); // learn a nonce
    let tid = c.tid();
    let req = c.build(Method::ALLOCATE, tid, &|b| {
        b.add(&RequestedTransport::UDP);
    });
    h.client_sends_by(ft, Route(1), &req);
    let first = h.last_reply();
    h.routes.clear();
    h.client_sends_by(ft, Route(2), &req);
    assert_eq!(h.last_reply(), first);
    assert_eq!(h.routes, vec![Route(2)]);
}

#[test]
fn allocation_ids_carry_the_shard_and_are_never_reused() {
    let mut h = Harness::new();
    h.server.set_shard(3);
    let mut ids = Vec::new();
    for i in 0..3 {
        let (mut c, _) = allocated(&mut h, &format!("192.0.2.7:{}", 40000 + i));
        assert!(is_success(&c.refresh(&mut h, Some(0))));
    }
    for e in &h.events {
        if let Event::AllocationCreated { id, .. } = e {
            assert_eq!(id.0 >> 48, 3);
            assert!(!ids.contains(id));
            ids.push(*id);
        }
    }
    assert_eq!(ids.len(), 3);
}

#[test]
fn stats_count_relayed_traffic_by_transport_requests_by_method_and_gauges() {
    let mut h = Harness::new();
    let (mut c, local) = allocated_over(&mut h, Transport::Tls, "192.0.2.7:40000");
    assert!(is_success(&c.bind_channel(&mut h, 0x4001, addr(PEER))));
    assert!(is_success(&c.permit(&mut h, addr("192.0.2.45:1"))));
    h.peer_sends(local, addr(PEER), b"abc");
    let s = *h.server.stats();
    assert_eq!(s.packets_from_peer, [0, 0, 1]);
    assert_eq!(s.bytes_from_peer, [0, 0, 3]);
    // Allocate: one 401 challenge, one success.
    assert_eq!(s.requests[RequestKind::Allocate.index()], [1, 1]);
    assert_eq!(s.requests[RequestKind::ChannelBind.index()], [1, 0]);
    assert_eq!(s.requests[RequestKind::CreatePermission.index()], [1, 0]);
    assert_eq!(
        (
            s.allocations_active,
            s.permissions_active,
            s.channels_active
        ),
        (1, 2, 1)
    );
    // Permissions expire at 300 s, the channel at 600 s, the allocation at 600 s.
    h.advance(Duration::from_secs(301));
    let s = *h.server.stats();
    assert_eq!((s.permissions_active, s.channels_active), (0, 1));
    h.advance(Duration::from_secs(300));
    let s = *h.server.stats();
    assert_eq!(
        (
            s.allocations_active,
            s.permissions_active,
            s.channels_active
        ),
        (0, 0, 0)
    );
}

#[test]
fn reject_and_drop_reasons_index_their_all_arrays() {
    for (i, r) in Reject::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
    for (i, r) in DropReason::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
    for (i, r) in RequestKind::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
    for (i, t) in Transport::ALL.iter().enumerate() {
        assert_eq!(t.index(), i);
    }
    for (i, r) in EndReason::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
    // Labels are distinct (they are metric label values).
    let mut labels: Vec<&str> = Reject::ALL.iter().map(|r| r.as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), Reject::ALL.len());
}

#[test]
fn rejections_report_the_client_and_the_username() {
    let mut h = Harness::new();
    let mut c = Client::new(udp("192.0.2.7:40000"), Cred::password("alice", "wrong"));
    assert_eq!(error_code(&c.allocate(&mut h)), Some(401));
    let last = h.events.iter().rev().find_map(|e| match e {
        Event::Rejected {
            client,
            username,
            reason,
            ..
        } => Some((*client, username.clone(), *reason)),
        _ => None,
    });
    assert_eq!(
        last,
        Some((
            addr("192.0.2.7:40000"),
            Some("alice".into()),
            Reject::BadIntegrity
        ))
    );
}

// ---------------------------------------------------------------------------------------------
// Operations: hot reload, drain, sessions

#[test]
fn update_config_keeps_allocations_and_nonces_and_refuses_a_removed_secret() {
    let mut cfg = config();
    cfg.credentials.add_secret(b"old".to_vec());
    let mut h = Harness::with(cfg, Box::new(LocalQuota::default()));
    let user = format!("{}:web", UNIX0 + 7200);
    let old_cred = |user: &str| Cred::Password {
        user: user.to_owned(),
        password: rest_api_password(b"old", user),
    };
    let mut before = Client::new(udp("192.0.2.7:40000"), old_cred(&user));
    assert!(is_success(&before.allocate(&mut h)));
    let local = h.bound[0];
    assert!(is_success(&before.permit(&mut h, addr(PEER))));
    let mut alice_c = Client::new(udp("192.0.2.7:40001"), alice());
    assert!(is_success(&alice_c.allocate(&mut h)));

    // Reload: the "old" secret is gone; a fresh nonce secret in the new config is ignored.
    let mut new = config();
    new.nonce_secret = [1; 32];
    h.server.update_config(new);

    // The allocation made under "old" keeps relaying both ways.
    h.peer_sends(local, addr(PEER), b"still");
    assert_eq!(h.take_sent().len(), 1);
    // alice's nonce from before the reload still verifies (no 438): one reply, a success.
    let tid = alice_c.tid();
    let req = alice_c.build(Method::REFRESH, tid, &|_| {});
    h.client_sends(alice_c.ft, &req);
    assert!(is_success(&h.last_reply()));
    // A credential under the removed secret is refused for a new allocation.
    let mut after = Client::new(udp("192.0.2.7:40002"), old_cred(&user));
    assert_eq!(error_code(&after.allocate(&mut h)), Some(401));
    // And a new secret works.
    let mut cfg = config();
    cfg.credentials.add_secret(b"new".to_vec());
    h.server.update_config(cfg);
    let mut fresh = Client::new(
        udp("192.0.2.7:40003"),
        Cred::Password {
            user: user.clone(),
            password: rest_api_password(b"new", &user),
        },
    );
    assert!(is_success(&fresh.allocate(&mut h)));
    assert_eq!(h.server.allocation_count(), 3);
}

#[test]
fn update_config_refresh_of_an_old_allocation_works_while_its_credential_is_valid() {
    let mut cfg = config();
    cfg.credentials.add_secret(b"old".to_vec());
    let mut h = Harness::with(cfg.clone(), Box::new(LocalQuota::default()));
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    // Same credentials, new lifetimes: the allocation is untouched until it refreshes.
    cfg.max_lifetime = Duration::from_secs(1200);
    h.server.update_config(cfg);
    let r = c.refresh(&mut h, Some(3600));
    assert_eq!(
        Message::decode(&r).unwrap().get::<Lifetime>().unwrap(),
        Some(Lifetime(1200))
    );
}

fn drain_at(h: &Harness, secs: u64, v4: Option<&str>) -> Drain {
    Drain {
        deadline: h.now + Duration::from_secs(secs),
        alternate_ipv4: v4.map(addr),
        alternate_ipv6: None,
    }
}

#[test]
fn rfc8489_10_draining_answers_authenticated_allocate_with_signed_300_alternate_server() {
    let mut h = Harness::new();
    let drain = drain_at(&h, 120, Some("198.51.100.2:3478"));
    h.server.set_draining(Some(drain));
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let tid = c.tid();
    // Unauthenticated: the usual 401 challenge, not a redirect anyone could forge.
    let req = c.build(Method::ALLOCATE, tid, &|b| {
        b.add(&RequestedTransport::UDP);
    });
    h.client_sends(c.ft, &req);
    let r = h.last_reply();
    assert_eq!(error_code(&r), Some(401));
    c.nonce_changed(&Message::decode(&r).unwrap());
    let req = c.build(Method::ALLOCATE, tid, &|b| {
        b.add(&RequestedTransport::UDP);
    });
    h.client_sends(c.ft, &req);
    let r = h.last_reply();
    let m = Message::decode(&r).unwrap();
    assert_eq!(error_code(&r), Some(300));
    assert_eq!(
        m.get::<AlternateServer>().unwrap(),
        Some(AlternateServer(addr("198.51.100.2:3478")))
    );
    assert!(m.verify_integrity(&long_term_key_md5("alice", REALM, "wonderland")));
    assert_eq!(h.rejections().last(), Some(&Reject::TryAlternate));
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn draining_without_alternate_for_the_clients_family_is_403_server_is_draining() {
    let mut h = Harness::new();
    let drain = drain_at(&h, 120, Some("198.51.100.2:3478"));
    h.server.set_draining(Some(drain));
    let mut ft = udp("192.0.2.7:40000");
    ft.client = addr("[2001:db8::7]:40000");
    let mut c = Client::new(ft, alice());
    let r = c.allocate(&mut h);
    assert_eq!(error_code(&r), Some(403));
    let m = Message::decode(&r).unwrap();
    let e = m.get::<ErrorCodeAttr<'_>>().unwrap().unwrap();
    assert_eq!(e.reason, "server is draining");
    assert_eq!(h.rejections().last(), Some(&Reject::Draining));
}

#[test]
fn draining_keeps_relaying_and_caps_refresh_to_the_deadline() {
    let mut h = Harness::new();
    let (mut c, local) = allocated(&mut h, "192.0.2.7:40000");
    assert!(is_success(&c.permit(&mut h, addr(PEER))));
    let drain = drain_at(&h, 120, None);
    h.server.set_draining(Some(drain));
    h.peer_sends(local, addr(PEER), b"still");
    assert_eq!(h.take_sent().len(), 1);
    h.advance(Duration::from_secs(20));
    let r = c.refresh(&mut h, Some(600));
    assert_eq!(
        Message::decode(&r).unwrap().get::<Lifetime>().unwrap(),
        Some(Lifetime(100)),
        "capped to the 100 s left"
    );
    // The allocation would have lived 600 s; it now ends at the deadline.
    h.advance(Duration::from_secs(101));
    assert_eq!(h.server.allocation_count(), 0);
    // Cancelling the drain serves new allocations again.
    h.server.set_draining(None);
    let mut c2 = Client::new(udp("192.0.2.7:40001"), alice());
    assert!(is_success(&c2.allocate(&mut h)));
}

#[test]
fn sessions_list_allocations_and_admin_ends_them_with_437_on_next_refresh() {
    let mut h = Harness::new();
    h.advance(Duration::from_secs(10));
    let (mut a1, _) = allocated(&mut h, "192.0.2.7:40000");
    let (mut a2, _) = allocated(&mut h, "192.0.2.7:40001");
    let mut b = Client::new(udp("192.0.2.8:40000"), Cred::password("bob", "builder"));
    assert!(is_success(&b.allocate(&mut h)));
    assert!(is_success(&b.bind_channel(&mut h, 0x4000, addr(PEER))));
    h.advance(Duration::from_secs(100));
    let sessions: Vec<_> = h.server.sessions(h.now).collect();
    assert_eq!(sessions.len(), 3);
    let bob = sessions.iter().find(|s| s.username == "bob").unwrap();
    assert_eq!(bob.created_unix, UNIX0 + 10);
    assert_eq!(bob.lifetime_left, Duration::from_secs(500));
    assert_eq!((bob.permissions, bob.channels), (1, 1));
    assert_eq!(bob.five_tuple, b.ft);
    let bob_id = bob.id;

    assert_eq!(h.server.end_user_allocations(h.now, "alice"), 2);
    assert_eq!(error_code(&a1.refresh(&mut h, None)), Some(437));
    assert_eq!(error_code(&a2.refresh(&mut h, None)), Some(437));
    assert!(h.server.end_allocation(h.now, bob_id));
    h.pump();
    assert!(!h.server.end_allocation(h.now, bob_id));
    assert_eq!(error_code(&b.refresh(&mut h, None)), Some(437));
    assert_eq!(h.ended(EndReason::Admin), 3);
    assert!(h.bound.is_empty(), "relay sockets released");
    assert_eq!(h.server.stats().allocations_active, 0);
}

// ---------------------------------------------------------------------------------------------
// Hardening (issue 12)

fn with_config(f: impl FnOnce(&mut ServerConfig)) -> Harness {
    let mut cfg = config();
    f(&mut cfg);
    Harness::with(cfg, Box::new(LocalQuota::default()))
}

fn peers(n: u16) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::new(IpAddr::from([192, 0, 2, (i % 250) as u8 + 1]), 1000 + i))
        .collect()
}

#[test]
fn rfc8656_10_2_create_permission_with_65_peers_is_answered_under_the_one_configured_cap() {
    // 65 distinct peers (two allowed /24s): over the default cap of 64 → 508, answered.
    let many: Vec<SocketAddr> = (0..65u16)
        .map(|i| {
            let host = (i % 200) as u8 + 1;
            let net = if i < 200 { 2 } else { 3 };
            SocketAddr::new(IpAddr::from([192, 0, net, host]), 1000 + i)
        })
        .collect();
    let mut h = Harness::new();
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    let list = many.clone();
    let r = c.request(&mut h, Method::CREATE_PERMISSION, &|b| {
        for p in &list {
            b.add(&XorPeerAddress(*p));
        }
    });
    assert_eq!(error_code(&r), Some(508), "the configured cap (64) applies");
    assert_eq!(h.server.stats().permissions_active, 0, "all or nothing");
    // With the cap raised, the same 65-peer request succeeds: no hidden per-request cap.
    let mut h = with_config(|c| c.max_permissions_per_allocation = 100);
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    let r = c.request(&mut h, Method::CREATE_PERMISSION, &|b| {
        for p in &many {
            b.add(&XorPeerAddress(*p));
        }
    });
    assert!(is_success(&r), "{:?}", error_code(&r));
    assert_eq!(h.server.stats().permissions_active, 65);
}

#[test]
fn a_request_over_the_attribute_cap_gets_400_with_a_reason_not_silence() {
    let mut h = Harness::new();
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    let list = peers(MAX_ATTRIBUTES as u16 + 1);
    let r = c.request(&mut h, Method::CREATE_PERMISSION, &|b| {
        for p in &list {
            b.add(&XorPeerAddress(*p));
        }
    });
    assert_eq!(error_code(&r), Some(400));
    let m = Message::decode(&r).unwrap();
    assert_eq!(
        m.get::<ErrorCodeAttr<'_>>().unwrap().unwrap().reason,
        "too many attributes"
    );
    assert_eq!(m.typ().method, Method::CREATE_PERMISSION);
    assert_eq!(h.rejections().last(), Some(&Reject::TooManyAttributes));
}

#[test]
fn rfc8656_12_2_channel_bind_to_peer_port_0_is_400() {
    let mut h = Harness::new();
    let (mut c, _) = allocated(&mut h, "192.0.2.7:40000");
    let r = c.bind_channel(&mut h, 0x4000, addr("192.0.2.44:0"));
    assert_eq!(error_code(&r), Some(400));
    assert_eq!(h.rejections().last(), Some(&Reject::InvalidPeerPort));
    assert_eq!(h.server.stats().channels_active, 0);
}

#[test]
fn challenges_per_source_are_limited_when_configured_and_counted_as_drops() {
    let mut h = with_config(|c| c.challenges_per_source_per_second = Some(2));
    let ft = udp("192.0.2.7:40000");
    let c = Client::new(ft, alice());
    let req = c.build(Method::ALLOCATE, TransactionId([1; 12]), &|b| {
        b.add(&RequestedTransport::UDP);
    });
    for _ in 0..5 {
        h.client_sends(ft, &req);
    }
    let answered = h.take_sent().len();
    assert_eq!(answered, 2, "a burst of 2 challenges, then drops");
    assert_eq!(
        h.server.stats().dropped(DropReason::ChallengeRateLimited),
        3
    );
    // Another source has its own budget; the first refills after a second.
    h.client_sends(udp("192.0.2.99:40000"), &req);
    assert_eq!(h.take_sent().len(), 1);
    h.advance(Duration::from_secs(1));
    h.client_sends(ft, &req);
    assert_eq!(h.take_sent().len(), 1);
    // Off by default: every challenge answered.
    let mut h = Harness::new();
    for _ in 0..50 {
        h.client_sends(ft, &req);
    }
    assert_eq!(h.take_sent().len(), 50);
}

#[test]
fn stun_only_mode_answers_binding_and_refuses_every_turn_method_with_400() {
    let mut h = with_config(|c| c.mode = ServiceMode::StunOnly);
    let ft = udp("192.0.2.7:40000");
    let out = message(Method::BINDING, Class::Request, 3, |_| {});
    h.client_sends(ft, &out);
    assert!(is_success(&h.last_reply()));
    let mut c = Client::new(ft, alice());
    for method in [
        Method::ALLOCATE,
        Method::REFRESH,
        Method::CREATE_PERMISSION,
        Method::CHANNEL_BIND,
    ] {
        let r = c.request(&mut h, method, &|_| {});
        assert_eq!(error_code(&r), Some(400), "{method:?}");
    }
    assert!(h.rejections().iter().all(|r| *r == Reject::MethodNotServed));
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn no_stun_mode_refuses_unauthenticated_binding_and_serves_turn() {
    let mut h = with_config(|c| c.mode = ServiceMode::NoStun);
    let ft = udp("192.0.2.7:40000");
    let out = message(Method::BINDING, Class::Request, 3, |_| {});
    h.client_sends(ft, &out);
    assert_eq!(error_code(&h.last_reply()), Some(400));
    assert_eq!(h.rejections(), vec![Reject::MethodNotServed]);
    let mut c = Client::new(ft, alice());
    assert!(is_success(&c.allocate(&mut h)));
    // A Binding with the client's long-term credential is answered, signed.
    let r = c.request(&mut h, Method::BINDING, &|_| {});
    assert!(is_success(&r));
    let m = Message::decode(&r).unwrap();
    assert_eq!(
        m.get::<XorMappedAddress>().unwrap(),
        Some(XorMappedAddress(ft.client))
    );
    assert!(m.verify_integrity(&long_term_key_md5("alice", REALM, "wonderland")));
}

#[test]
fn server_config_defaults_come_from_the_defaults_module() {
    let c = ServerConfig::default();
    assert_eq!(c.default_lifetime, defaults::DEFAULT_LIFETIME);
    assert_eq!(c.max_lifetime, defaults::MAX_LIFETIME);
    assert_eq!(c.permission_lifetime, defaults::PERMISSION_LIFETIME);
    assert_eq!(c.channel_lifetime, defaults::CHANNEL_LIFETIME);
    assert_eq!(c.reservation_lifetime, Duration::from_secs(30));
    assert_eq!(c.transaction_lifetime, Duration::from_secs(40));
    assert_eq!(c.max_permissions_per_allocation, 64);
    assert_eq!(c.mode, ServiceMode::Turn);
    assert_eq!(c.challenges_per_source_per_second, None);
}

// ---------------------------------------------------------------------------------------------
// Reservations across shards (RFC 8656 §7.2)

fn reserve(h: &mut Harness, c: &mut Client) -> (u16, ReservationToken) {
    let r = c.request(h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP)
            .add(&EvenPort { reserve: true });
    });
    assert!(is_success(&r), "{:?}", error_code(&r));
    let m = Message::decode(&r).unwrap();
    (
        relayed(&r)[0].port(),
        m.get::<ReservationToken>().unwrap().unwrap(),
    )
}

fn redeem(h: &mut Harness, c: &mut Client, token: ReservationToken) -> Vec<u8> {
    c.request(h, Method::ALLOCATE, &|b| {
        b.add(&RequestedTransport::UDP).add(&token);
    })
}

fn reserved_releases(h: &Harness) -> usize {
    h.events
        .iter()
        .filter(|e| matches!(e, Event::ReservedPortReleased(_)))
        .count()
}

#[test]
fn rfc8656_7_2_reservation_token_of_another_user_is_508_and_stays_for_its_owner() {
    let mut h = Harness::new();
    let mut alice_c = Client::new(udp("192.0.2.7:40000"), alice());
    let (port, token) = reserve(&mut h, &mut alice_c);
    let mut bob = Client::new(udp("192.0.2.8:40000"), Cred::password("bob", "builder"));
    assert_eq!(error_code(&redeem(&mut h, &mut bob, token)), Some(508));
    assert_eq!(
        h.rejections().last(),
        Some(&Reject::InvalidReservationToken)
    );
    assert_eq!(
        h.server.stats().allocations_active,
        1,
        "bob's quota slot given back"
    );
    let mut alice2 = Client::new(udp("192.0.2.7:40001"), alice());
    let r = redeem(&mut h, &mut alice2, token);
    assert_eq!(relayed(&r)[0].port(), port + 1);
}

#[test]
fn reservation_tokens_are_unpredictable_not_a_counter() {
    let mut h = Harness::new();
    let mut a = Client::new(udp("192.0.2.7:40000"), alice());
    let mut b = Client::new(udp("192.0.2.7:40001"), alice());
    let (_, t1) = reserve(&mut h, &mut a);
    let (_, t2) = reserve(&mut h, &mut b);
    let (x, y) = (u64::from_be_bytes(t1.0), u64::from_be_bytes(t2.0));
    assert!(x.abs_diff(y) > 1 << 32, "{x:x} {y:x}");
    // And a server with another nonce secret (another process) draws other tokens.
    let mut h2 = with_config(|c| c.nonce_secret = [4; 32]);
    let mut c = Client::new(udp("192.0.2.7:40000"), alice());
    let (_, t3) = reserve(&mut h2, &mut c);
    assert_ne!(t1, t3);
}

#[test]
fn rfc8656_7_2_a_token_reserved_on_one_shard_is_redeemed_on_another() {
    let t0 = Instant::now();
    let quota = SharedQuota::default();
    let ledger = SharedReservations::default();
    let mut a = Harness::sharing(
        config(),
        Box::new(quota.clone()),
        Box::new(ledger.clone()),
        t0,
    );
    let mut b = Harness::sharing(config(), Box::new(quota), Box::new(ledger.clone()), t0);
    let mut c1 = Client::new(udp("192.0.2.7:40000"), alice());
    let (port, token) = reserve(&mut a, &mut c1);
    let mut c2 = Client::new(udp("192.0.2.7:40001"), alice());
    let r = redeem(&mut b, &mut c2, token);
    assert_eq!(
        relayed(&r)[0].port(),
        port + 1,
        "shard B binds the reserved port"
    );
    // Shard A's timer fires later and finds nothing to release.
    a.advance(Duration::from_secs(31));
    b.advance(Duration::from_secs(31));
    assert_eq!(reserved_releases(&a) + reserved_releases(&b), 0);
    assert!(ledger.0.lock().unwrap().is_empty());
}

#[test]
fn rfc8656_7_2_an_unredeemed_reservation_is_released_once_whichever_shard_removes_it() {
    let t0 = Instant::now();
    let ledger = SharedReservations::default();
    let mk = |l: &SharedReservations| {
        Harness::sharing(
            config(),
            Box::new(LocalQuota::default()),
            Box::new(l.clone()),
            t0,
        )
    };
    // The reserving shard's timer removes it: one release, from shard A.
    let (mut a, mut b) = (mk(&ledger), mk(&ledger));
    let mut c1 = Client::new(udp("192.0.2.7:40000"), alice());
    let (_, token) = reserve(&mut a, &mut c1);
    a.advance(Duration::from_secs(31));
    b.advance(Duration::from_secs(31));
    let mut c2 = Client::new(udp("192.0.2.7:40001"), alice());
    assert_eq!(error_code(&redeem(&mut b, &mut c2, token)), Some(508));
    assert_eq!((reserved_releases(&a), reserved_releases(&b)), (1, 0));

    // A late redeemer on shard B removes it first: one release, from shard B; A's timer
    // then finds nothing.
    let (mut a, mut b) = (mk(&ledger), mk(&ledger));
    let mut c1 = Client::new(udp("192.0.2.7:40000"), alice());
    let (_, token) = reserve(&mut a, &mut c1);
    b.now += Duration::from_secs(30); // B's clock passes the expiry before A's timer runs
    let mut c2 = Client::new(udp("192.0.2.7:40001"), alice());
    assert_eq!(error_code(&redeem(&mut b, &mut c2, token)), Some(508));
    a.advance(Duration::from_secs(31));
    assert_eq!((reserved_releases(&a), reserved_releases(&b)), (0, 1));
}

#[test]
fn rfc8489_10_tls_sha256_redirect_names_the_alternate_domain() {
    let mut h = with_config(|c| c.alternate_domain = Some("turn2.example.org".into()));
    let drain = drain_at(&h, 120, Some("198.51.100.2:5349"));
    h.server.set_draining(Some(drain));
    let ft = over(Transport::Tls, "192.0.2.7:40000");
    let sha = Cred::sha256("alice", "wonderland");
    let r = Client::new(ft, sha).allocate(&mut h);
    assert_eq!(error_code(&r), Some(300));
    let m = Message::decode(&r).unwrap();
    assert_eq!(
        m.get::<AlternateDomain<'_>>().unwrap(),
        Some(AlternateDomain("turn2.example.org"))
    );
    // MESSAGE-INTEGRITY (SHA-1) over TLS, or SHA-256 over UDP: no ALTERNATE-DOMAIN.
    let r = Client::new(ft, alice()).allocate(&mut h);
    let m = Message::decode(&r).unwrap();
    assert_eq!(m.get::<AlternateDomain<'_>>().unwrap(), None);
    let sha = Cred::sha256("alice", "wonderland");
    let r = Client::new(udp("192.0.2.7:40001"), sha).allocate(&mut h);
    let m = Message::decode(&r).unwrap();
    assert_eq!(error_code(&r), Some(300));
    assert_eq!(m.get::<AlternateDomain<'_>>().unwrap(), None);
}
