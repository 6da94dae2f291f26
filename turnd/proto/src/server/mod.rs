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

mod allocation;
pub mod policy;
mod quota;
mod ratelimit;
mod reservation;
mod timer;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

pub use allocation::{AllocationStats, RelayHandle, RelayedAddress};
pub use quota::{LocalQuota, QuotaExceeded, QuotaLedger, SharedQuota};
pub use reservation::{
    LocalReservations, Redeemed, Reservation, ReservationLedger, SharedReservations,
};

use crate::auth::{CredentialError, Credentials, LongTermKey, NonceCheck, NonceIssuer};
use crate::codec::*;
use crate::defaults;
use allocation::{family_index, Allocation, ChannelBinding, CHANNEL_COOLDOWN};
use policy::{PeerDenied, PeerPolicy};
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

/// What the server serves (coturn's and eturnal's `stun-only` and `no-stun`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum ServiceMode {
    /// STUN Binding and TURN (the default).
    #[default]
    Turn,
    /// STUN Binding only: every TURN request (Allocate, Refresh, CreatePermission,
    /// ChannelBind) is answered 400 with [`Reject::MethodNotServed`] and a reason phrase.
    /// coturn's `stun-only` ignores them silently; we answer, so a client fails at once
    /// instead of after its retransmission timeout, and the refusal is counted.
    StunOnly,
    /// TURN only: a Binding request without MESSAGE-INTEGRITY is answered 400 with
    /// [`Reject::MethodNotServed`] (it is not challenged: a 401 would be a larger answer to
    /// an anonymous request); one with a valid long-term credential is answered, signed.
    /// coturn's `no-stun` ignores every Binding request silently. Binding indications
    /// (keepalives) are ignored as always.
    NoStun,
}

/// Tunables of the server (RFC 8656 §7–§12 name the defaults; [`crate::defaults`] holds
/// them).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Users, REST API secrets and the realm.
    pub credentials: Credentials,
    /// Key for stateless nonces; random per process.
    pub nonce_secret: [u8; 32],
    /// How long a nonce stays fresh before a 438 (coturn's `stale-nonce`, default 600 s).
    pub nonce_lifetime: Duration,
    /// Allocation lifetime when the client asks for none or for less (600 s, RFC 8656 §7.2).
    pub default_lifetime: Duration,
    /// The longest allocation lifetime granted (3600 s, RFC 8656 §7.2).
    pub max_lifetime: Duration,
    /// Permission lifetime (300 s, RFC 8656 §9).
    pub permission_lifetime: Duration,
    /// Channel binding lifetime (600 s, RFC 8656 §12).
    pub channel_lifetime: Duration,
    /// How long a reserved (EVEN-PORT R bit) port is held (30 s, RFC 8656 §7.2).
    pub reservation_lifetime: Duration,
    /// How long a non-idempotent answer is replayed for a retransmission (40 s, RFC 8489 §6.3.1).
    pub transaction_lifetime: Duration,
    /// Whether the IO layer can relay over IPv4.
    pub relay_ipv4: bool,
    /// Whether the IO layer can relay over IPv6.
    pub relay_ipv6: bool,
    /// Which peers may be reached.
    pub policy: PeerPolicy,
    /// Most permissions one allocation may hold (RFC 8656 §10.2: 508 beyond). The one
    /// permission cap: CreatePermission and ChannelBind both check it, nothing else.
    pub max_permissions_per_allocation: usize,
    /// SOFTWARE sent to authenticated clients only; `None` sends nothing.
    pub software: Option<String>,
    /// Also accept channel numbers 0x5000–0x7FFF, which RFC 5766 allowed and RFC 8656
    /// reserved; coturn's `turnutils_uclient` still uses them. Off by default.
    pub rfc5766_channel_numbers: bool,
    /// What the server serves.
    pub mode: ServiceMode,
    /// Most 401/438 challenges answered per second to one source (an IPv4 address, or an
    /// IPv6 /64), with a burst of one second's worth; beyond it the request is dropped and
    /// counted as [`DropReason::ChallengeRateLimited`]. `None` (the default) sets no limit.
    /// The state is a fixed table of token buckets indexed by a keyed hash of the source
    /// (4096 slots, 64 KiB): memory never grows with the number of sources, and sources that
    /// share a slot share its budget.
    pub challenges_per_source_per_second: Option<u32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            credentials: Credentials::new(defaults::REALM),
            nonce_secret: [0; 32],
            nonce_lifetime: defaults::NONCE_LIFETIME,
            default_lifetime: defaults::DEFAULT_LIFETIME,
            max_lifetime: defaults::MAX_LIFETIME,
            permission_lifetime: defaults::PERMISSION_LIFETIME,
            channel_lifetime: defaults::CHANNEL_LIFETIME,
            reservation_lifetime: defaults::RESERVATION_LIFETIME,
            transaction_lifetime: defaults::TRANSACTION_LIFETIME,
            relay_ipv4: true,
            relay_ipv6: true,
            policy: PeerPolicy::default(),
            max_permissions_per_allocation: defaults::MAX_PERMISSIONS_PER_ALLOCATION,
            software: None,
            rfc5766_channel_numbers: false,
            mode: ServiceMode::Turn,
            challenges_per_source_per_second: None,
        }
    }
}

/// Why a request was refused. Each value picks the STUN error code of the response and labels
/// the rejection metric (`as_str`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum Reject {
    /// 400: an attribute the method needs is missing.
    MissingAttribute,
    /// 400: an attribute could not be decoded.
    MalformedAttribute,
    /// 400: a request with a method the server does not serve.
    UnknownMethod,
    /// 400: PASSWORD-ALGORITHM(S) absent on one side, altered, or unsupported (RFC 8489 §9.2.4).
    BadPasswordAlgorithm,
    /// 400: attributes that must not appear together (RFC 8656 §7.2).
    ConflictingAttributes,
    /// 400: CHANNEL-NUMBER outside 0x4000–0x4FFF (0x7FFF with `rfc5766_channel_numbers`).
    InvalidChannelNumber,
    /// 400: the channel or the peer is already bound otherwise (RFC 8656 §12.2).
    ChannelConflict,
    /// 401: no integrity; the response is the challenge (REALM, NONCE).
    Unauthenticated,
    /// 401: integrity did not verify.
    BadIntegrity,
    /// 401: no such user.
    UnknownUser,
    /// 401: a TURN REST API username past its expiry.
    ExpiredCredentials,
    /// 403: the peer address is not allowed by policy.
    ForbiddenPeer,
    /// 420: comprehension-required attributes the server does not know.
    UnknownAttribute,
    /// 437: an Allocate on a 5-tuple that already has an allocation.
    AllocationExists,
    /// 437: a request that needs an allocation on a 5-tuple without one.
    NoAllocation,
    /// 438: the nonce is stale or not ours.
    StaleNonce,
    /// 440: the requested address family is not served.
    AddressFamilyNotSupported,
    /// 441: another username than the one that created the allocation.
    WrongCredentials,
    /// 442: REQUESTED-TRANSPORT other than UDP.
    UnsupportedTransport,
    /// 443: the peer's family has no relayed address in this allocation.
    PeerAddressFamilyMismatch,
    /// 486: the user's allocation quota is used up.
    UserQuotaReached,
    /// 508: the server-wide allocation quota is used up.
    TotalQuotaReached,
    /// 508: no relay port was free.
    NoRelayPort,
    /// 508: the allocation has as many permissions as it may.
    PermissionQuotaReached,
    /// 508: the RESERVATION-TOKEN is unknown, expired, or was reserved by another user.
    InvalidReservationToken,
    /// 300: the server is draining; ALTERNATE-SERVER names another one (RFC 8489 §10).
    TryAlternate,
    /// 403: the server is draining and has no alternate server for the client's family.
    Draining,
    /// 400: the message carries more attributes than the server reads.
    TooManyAttributes,
    /// 400: the service mode refuses this method (STUN-only: every TURN method; no-STUN:
    /// unauthenticated Binding).
    MethodNotServed,
    /// 400: XOR-PEER-ADDRESS with port 0 in a ChannelBind (no transport address to bind;
    /// RFC 8656 §12.2's answer to a malformed ChannelBind).
    InvalidPeerPort,
    /// 508: the IO layer ran out of file descriptors binding the relay socket.
    NoDescriptors,
}

impl Reject {
    /// Every reason, in [`Reject::index`] order.
    pub const ALL: [Self; 31] = [
        Self::MissingAttribute,
        Self::MalformedAttribute,
        Self::UnknownMethod,
        Self::BadPasswordAlgorithm,
        Self::ConflictingAttributes,
        Self::InvalidChannelNumber,
        Self::ChannelConflict,
        Self::Unauthenticated,
        Self::BadIntegrity,
        Self::UnknownUser,
        Self::ExpiredCredentials,
        Self::ForbiddenPeer,
        Self::UnknownAttribute,
        Self::AllocationExists,
        Self::NoAllocation,
        Self::StaleNonce,
        Self::AddressFamilyNotSupported,
        Self::WrongCredentials,
        Self::UnsupportedTransport,
        Self::PeerAddressFamilyMismatch,
        Self::UserQuotaReached,
        Self::TotalQuotaReached,
        Self::NoRelayPort,
        Self::PermissionQuotaReached,
        Self::InvalidReservationToken,
        Self::TryAlternate,
        Self::Draining,
        Self::TooManyAttributes,
        Self::MethodNotServed,
        Self::InvalidPeerPort,
        Self::NoDescriptors,
    ];

    /// The position in [`Reject::ALL`], for arrays of counters.
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }

    /// The STUN error code sent.
    #[must_use]
    pub fn code(self) -> ErrorCode {
        use Reject::*;
        match self {
            MissingAttribute
            | MalformedAttribute
            | UnknownMethod
            | BadPasswordAlgorithm
            | ConflictingAttributes
            | InvalidChannelNumber
            | ChannelConflict
            | TooManyAttributes
            | MethodNotServed
            | InvalidPeerPort => ErrorCode::BAD_REQUEST,
            TryAlternate => ErrorCode::TRY_ALTERNATE,
            Unauthenticated | BadIntegrity | UnknownUser | ExpiredCredentials => {
                ErrorCode::UNAUTHENTICATED
            }
            ForbiddenPeer | Draining => ErrorCode::FORBIDDEN,
            UnknownAttribute => ErrorCode::UNKNOWN_ATTRIBUTE,
            AllocationExists | NoAllocation => ErrorCode::ALLOCATION_MISMATCH,
            StaleNonce => ErrorCode::STALE_NONCE,
            AddressFamilyNotSupported => ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED,
            WrongCredentials => ErrorCode::WRONG_CREDENTIALS,
            UnsupportedTransport => ErrorCode::UNSUPPORTED_TRANSPORT_PROTOCOL,
            PeerAddressFamilyMismatch => ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH,
            UserQuotaReached => ErrorCode::ALLOCATION_QUOTA_REACHED,
            TotalQuotaReached
            | NoRelayPort
            | PermissionQuotaReached
            | InvalidReservationToken
            | NoDescriptors => ErrorCode::INSUFFICIENT_CAPACITY,
        }
    }

    /// The reason phrase sent even to an unauthenticated client, for reasons a client (or
    /// its operator) cannot work out from the code alone. Others send the code's standard
    /// phrase when authenticated and none otherwise.
    #[must_use]
    pub fn explained(self) -> Option<&'static str> {
        match self {
            Self::Draining => Some("server is draining"),
            Self::TooManyAttributes => Some("too many attributes"),
            Self::MethodNotServed => Some("method not served by this server"),
            Self::InvalidPeerPort => Some("peer port 0"),
            _ => None,
        }
    }

    /// A stable snake_case label (metrics, logs).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        use Reject::*;
        match self {
            MissingAttribute => "missing_attribute",
            MalformedAttribute => "malformed_attribute",
            UnknownMethod => "unknown_method",
            BadPasswordAlgorithm => "bad_password_algorithm",
            ConflictingAttributes => "conflicting_attributes",
            InvalidChannelNumber => "invalid_channel_number",
            ChannelConflict => "channel_conflict",
            Unauthenticated => "unauthenticated",
            BadIntegrity => "bad_integrity",
            UnknownUser => "unknown_user",
            ExpiredCredentials => "expired_credentials",
            ForbiddenPeer => "forbidden_peer",
            UnknownAttribute => "unknown_attribute",
            AllocationExists => "allocation_exists",
            NoAllocation => "no_allocation",
            StaleNonce => "stale_nonce",
            AddressFamilyNotSupported => "address_family_not_supported",
            WrongCredentials => "wrong_credentials",
            UnsupportedTransport => "unsupported_transport",
            PeerAddressFamilyMismatch => "peer_address_family_mismatch",
            UserQuotaReached => "user_quota_reached",
            TotalQuotaReached => "total_quota_reached",
            NoRelayPort => "no_relay_port",
            PermissionQuotaReached => "permission_quota_reached",
            InvalidReservationToken => "invalid_reservation_token",
            TryAlternate => "try_alternate",
            Draining => "draining",
            TooManyAttributes => "too_many_attributes",
            MethodNotServed => "method_not_served",
            InvalidPeerPort => "invalid_peer_port",
            NoDescriptors => "no_descriptors",
        }
    }
}

/// Why a datagram was dropped without an answer. Counted in [`Stats`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum DropReason {
    /// Not STUN and not ChannelData, or failed to decode.
    Malformed,
    /// A STUN response or an unknown indication from a client.
    Unexpected,
    /// Data for a 5-tuple or relay address without an allocation.
    NoAllocation,
    /// ChannelData on a channel that is not bound.
    NoChannel,
    /// To or from a peer without a permission.
    NoPermission,
    /// A Send indication missing XOR-PEER-ADDRESS or DATA, or with a bad one.
    BadIndication,
    /// A Send indication toward a peer whose family has no relayed address.
    PeerFamily,
    /// A retransmitted Allocate while its relay is still being bound.
    Pending,
    /// A request that would be answered with a 401 challenge, over the per-source limit
    /// (`ServerConfig::challenges_per_source_per_second`).
    ChallengeRateLimited,
}

impl DropReason {
    /// Every reason, in `Stats::drops` order.
    pub const ALL: [Self; 9] = [
        Self::Malformed,
        Self::Unexpected,
        Self::NoAllocation,
        Self::NoChannel,
        Self::NoPermission,
        Self::BadIndication,
        Self::PeerFamily,
        Self::Pending,
        Self::ChallengeRateLimited,
    ];

    /// A stable snake_case label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Unexpected => "unexpected",
            Self::NoAllocation => "no_allocation",
            Self::NoChannel => "no_channel",
            Self::NoPermission => "no_permission",
            Self::BadIndication => "bad_indication",
            Self::PeerFamily => "peer_family",
            Self::Pending => "pending",
            Self::ChallengeRateLimited => "challenge_rate_limited",
        }
    }

    /// The position in [`DropReason::ALL`] (and `Stats::drops`).
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The request methods the server answers, for counting requests by method.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum RequestKind {
    /// Binding (RFC 8489 §3).
    Binding,
    /// Allocate (RFC 8656 §7).
    Allocate,
    /// Refresh (RFC 8656 §8).
    Refresh,
    /// CreatePermission (RFC 8656 §10).
    CreatePermission,
    /// ChannelBind (RFC 8656 §12).
    ChannelBind,
}

impl RequestKind {
    /// Every kind, in [`RequestKind::index`] order.
    pub const ALL: [Self; 5] = [
        Self::Binding,
        Self::Allocate,
        Self::Refresh,
        Self::CreatePermission,
        Self::ChannelBind,
    ];

    /// The position in [`RequestKind::ALL`] (and `Stats::requests`).
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }

    /// A stable snake_case label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Binding => "binding",
            Self::Allocate => "allocate",
            Self::Refresh => "refresh",
            Self::CreatePermission => "create_permission",
            Self::ChannelBind => "channel_bind",
        }
    }

    /// The kind of a request method, if the server serves it.
    #[must_use]
    pub fn of(method: Method) -> Option<Self> {
        match method {
            Method::BINDING => Some(Self::Binding),
            Method::ALLOCATE => Some(Self::Allocate),
            Method::REFRESH => Some(Self::Refresh),
            Method::CREATE_PERMISSION => Some(Self::CreatePermission),
            Method::CHANNEL_BIND => Some(Self::ChannelBind),
            _ => None,
        }
    }
}

/// Counters and gauges the IO layer exports as metrics. Every field is kept up to date as
/// things happen (O(1) per event, never by scanning allocations).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Dropped datagrams by [`DropReason`] (index as in `DropReason::ALL`).
    pub drops: [u64; 9],
    /// Datagrams relayed client → peer, by the client's transport ([`Transport::index`]).
    pub packets_to_peer: [u64; 3],
    /// Payload bytes relayed client → peer, by transport.
    pub bytes_to_peer: [u64; 3],
    /// Datagrams relayed peer → client, by transport.
    pub packets_from_peer: [u64; 3],
    /// Payload bytes relayed peer → client, by transport.
    pub bytes_from_peer: [u64; 3],
    /// Requests answered, by [`RequestKind::index`]; `[0]` successes, `[1]` error responses.
    /// Retransmissions answered from the transaction cache are not counted again.
    pub requests: [[u64; 2]; 5],
    /// Permissions currently installed (gauge).
    pub permissions_active: u64,
    /// Channel bindings currently bound, not counting those in their post-expiry cooldown
    /// (gauge).
    pub channels_active: u64,
    /// Allocations currently held (gauge).
    pub allocations_active: u64,
}

impl Stats {
    /// Drops for one reason.
    #[must_use]
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }
}

/// Where the IO layer sends a client's answers: a listener index, a stream connection index,
/// whatever it likes. Opaque to the core, which remembers the route of each request and of
/// each allocation and hands it back in every [`Transmit`] to a client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Route(pub u32);

/// Identifies an allocation across the shards of one process: the shard number
/// ([`Server::set_shard`]) in the top 16 bits, a per-server counter below (never reused).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct AllocationId(pub u64);

impl std::fmt::Display for AllocationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A drain in progress ([`Server::set_draining`]): new allocations are sent elsewhere,
/// existing ones keep relaying and may refresh until `deadline`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Drain {
    /// When the process stops; refreshed lifetimes are capped to end by then.
    pub deadline: Instant,
    /// Sent in ALTERNATE-SERVER to IPv4 clients.
    pub alternate_ipv4: Option<SocketAddr>,
    /// Sent in ALTERNATE-SERVER to IPv6 clients.
    pub alternate_ipv6: Option<SocketAddr>,
}

/// One allocation as the operations API lists it ([`Server::sessions`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SessionInfo<'a> {
    /// Its id (for [`Server::end_allocation`]).
    pub id: AllocationId,
    /// The authenticated username.
    pub username: &'a str,
    /// Its 5-tuple.
    pub five_tuple: FiveTuple,
    /// Relayed addresses (IPv4, IPv6).
    pub relayed: [Option<RelayedAddress>; 2],
    /// When it was created (UNIX seconds).
    pub created_unix: u64,
    /// Time left before it expires unless refreshed.
    pub lifetime_left: Duration,
    /// Traffic it relayed so far.
    pub stats: AllocationStats,
    /// Permissions installed and not expired.
    pub permissions: usize,
    /// Channel bindings bound and not expired.
    pub channels: usize,
}

/// Where a [`Transmit`] goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Destination {
    /// To a client, over the listener (or connection) of this 5-tuple.
    Client(FiveTuple),
    /// To a peer, from the relay socket the IO layer knows as `relay`.
    Peer {
        /// The relay socket's handle ([`RelayedAddress::handle`]).
        relay: RelayHandle,
        /// The peer.
        peer: SocketAddr,
    },
}

/// A datagram (or stream frame) to send.
#[derive(Debug)]
pub struct Transmit<'a> {
    /// Where to.
    pub destination: Destination,
    /// The bytes.
    pub payload: &'a [u8],
    /// Send with the IP DF bit set (DONT-FRAGMENT, RFC 8656 §18.9).
    pub dont_fragment: bool,
    /// For [`Destination::Client`]: the route of the request answered, or the allocation's
    /// route for data from a peer. `Route::default()` for [`Destination::Peer`].
    pub route: Route,
}

/// Identifies a [`RelayRequest`] until [`Server::handle_relay_bound`] answers it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RelayRequestId(pub u64);

/// Which port the relay socket should get.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PortRequest {
    /// Any free port of the range.
    Any,
    /// An even port (EVEN-PORT, RFC 8656 §7.2); with `reserve_next`, hold port + 1 too and
    /// report it in [`RelayBound::reserved_next`].
    Even {
        /// Also reserve the next-higher port.
        reserve_next: bool,
    },
    /// The port held for a RESERVATION-TOKEN, possibly by another shard's IO layer: turn
    /// the socket held at exactly this local address into this allocation's relay socket.
    /// The reservation is already removed from the ledger: if this fails, the IO layer frees
    /// the held port itself (no [`Event::ReservedPortReleased`] will come for it).
    Reserved(SocketAddr),
}

/// The IO layer must bind relay socket(s) and answer with [`Server::handle_relay_bound`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RelayRequest {
    /// Echo this back.
    pub id: RelayRequestId,
    /// The allocation's 5-tuple.
    pub five_tuple: FiveTuple,
    /// The family of the (first) relayed address.
    pub family: AddressFamily,
    /// Also bind an IPv6 relayed address (ADDITIONAL-ADDRESS-FAMILY, RFC 8656 §7.2).
    pub additional_ipv6: bool,
    /// Port constraints.
    pub port: PortRequest,
    /// Set DF on the relay socket(s) (DONT-FRAGMENT).
    pub dont_fragment: bool,
}

/// Why the IO layer could not bind a relay socket.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RelayError {
    /// Every port of the range is in use (→ 508).
    NoPortAvailable,
    /// No relay address of that family is configured (→ 440).
    FamilyUnavailable,
    /// The process is out of file descriptors (EMFILE/ENFILE) (→ 508, counted apart as
    /// [`Reject::NoDescriptors`]).
    NoDescriptors,
}

/// The IO layer's answer to a [`RelayRequest`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RelayBound {
    /// The first relayed address.
    pub primary: Result<RelayedAddress, RelayError>,
    /// The IPv6 one, when `additional_ipv6` was asked.
    pub additional: Option<Result<RelayedAddress, RelayError>>,
    /// The port held for a later RESERVATION-TOKEN (its local address). The core answers it
    /// with exactly one [`Event::ReservedPortReleased`] unless an Allocate (on any shard
    /// sharing the [`ReservationLedger`]) redeems it first with `PortRequest::Reserved`.
    pub reserved_next: Option<SocketAddr>,
}

/// Why an allocation ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EndReason {
    /// Its lifetime ran out.
    Expired,
    /// A Refresh with LIFETIME 0.
    Deleted,
    /// Its TCP/TLS connection closed.
    ConnectionClosed,
    /// Ended through the operations API ([`Server::end_allocation`]).
    Admin,
}

impl EndReason {
    /// Every reason, in [`EndReason::index`] order.
    pub const ALL: [Self; 4] = [
        Self::Expired,
        Self::Deleted,
        Self::ConnectionClosed,
        Self::Admin,
    ];

    /// The position in [`EndReason::ALL`], for arrays of counters.
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }

    /// A stable snake_case label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Deleted => "deleted",
            Self::ConnectionClosed => "connection_closed",
            Self::Admin => "admin",
        }
    }
}

/// Things the IO layer acts on or reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Bind relay socket(s), then call [`Server::handle_relay_bound`].
    RelayRequested(RelayRequest),
    /// Close this relay socket; its handle and port are free again. Sent exactly once for
    /// every relayed address the IO layer reported bound in a [`RelayBound`].
    RelayReleased(RelayedAddress),
    /// Close the port held at this local address for a RESERVATION-TOKEN (it was never
    /// redeemed, or the allocation it was held for failed); the port is free again. Emitted
    /// exactly once per `RelayBound::reserved_next` that no Allocate redeemed, by whichever
    /// shard removed the reservation from the shared ledger — not necessarily the one whose
    /// IO layer holds the socket (see [`ReservationLedger`]).
    ReservedPortReleased(SocketAddr),
    /// An allocation was created.
    AllocationCreated {
        /// Its id.
        id: AllocationId,
        /// The route its answers take.
        route: Route,
        /// Its 5-tuple.
        five_tuple: FiveTuple,
        /// The authenticated username.
        username: Box<str>,
        /// Relayed addresses (IPv4, IPv6).
        relayed: [Option<RelayedAddress>; 2],
        /// Granted lifetime.
        lifetime: Duration,
    },
    /// An allocation ended; its relay sockets are released by separate events.
    AllocationEnded {
        /// Its id.
        id: AllocationId,
        /// The route its answers took (a stream connection can be closed now).
        route: Route,
        /// Its 5-tuple.
        five_tuple: FiveTuple,
        /// The username.
        username: Box<str>,
        /// Relayed addresses.
        relayed: [Option<RelayedAddress>; 2],
        /// How long it lived.
        duration: Duration,
        /// Traffic it relayed.
        stats: AllocationStats,
        /// Why.
        reason: EndReason,
    },
    /// A request was answered with an error.
    Rejected {
        /// The client's transport address.
        client: SocketAddr,
        /// The username: the authenticated one, or the one claimed when authentication failed
        /// (not verified; escape it before logging). `None` when the request carried none.
        username: Option<Box<str>>,
        /// The transport.
        transport: Transport,
        /// The request's method.
        method: Method,
        /// Why.
        reason: Reject,
    },
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
    pending: HashMap<RelayRequestId, (FiveTuple, Pending)>,
    pending_tuples: FxHashMap<FiveTuple, RelayRequestId>,
    next_request: u64,
    reservations: Box<dyn ReservationLedger>,
    tokens: TokenSource,
    tx_cache: HashMap<u64, (FiveTuple, TransactionId, Vec<u8>)>,
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
            pending: HashMap::new(),
            pending_tuples: FxHashMap::default(),
            next_request: 0,
            reservations,
            tokens: TokenSource::new(seed),
            tx_cache: HashMap::new(),
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

    // -----------------------------------------------------------------------------------------
    // Operations

    /// Replaces the configuration (hot reload). New credentials, peer policy, permission cap,
    /// lifetimes and service mode apply to requests from now on; existing allocations,
    /// permissions and channel bindings are left as they are (a permission to a peer the new
    /// policy denies lives out its lifetime). The nonce secret is kept, so nonces issued
    /// before stay valid; `config.nonce_secret` is ignored. Quotas live in the
    /// [`QuotaLedger`], which the IO layer updates itself.
    pub fn update_config(&mut self, mut config: ServerConfig) {
        config.nonce_secret = self.config.nonce_secret;
        if config.nonce_lifetime != self.config.nonce_lifetime {
            self.nonces =
                NonceIssuer::new(config.nonce_secret, config.nonce_lifetime.as_secs().max(1));
        }
        self.config = config;
    }

    /// Starts (`Some`) or cancels (`None`) a drain. While draining, an authenticated Allocate
    /// is answered 300 (Try Alternate) with ALTERNATE-SERVER of the client's address family
    /// (RFC 8489 §10), or 403 "server is draining" when there is no alternate for that family.
    /// The redirect is sent only after authentication (an unauthenticated Allocate gets the
    /// usual 401 challenge first) and is signed, so the client can trust it. Existing
    /// allocations keep relaying; a Refresh is granted at most the time left until
    /// `deadline`.
    pub fn set_draining(&mut self, drain: Option<Drain>) {
        self.drain = drain;
    }

    /// The drain in progress, if any.
    #[must_use]
    pub fn draining(&self) -> Option<&Drain> {
        self.drain.as_ref()
    }

    /// Every allocation, for the operations API (a scan: not for the packet path).
    pub fn sessions(&self, now: Instant) -> impl Iterator<Item = SessionInfo<'_>> {
        self.slab.iter().flatten().map(move |a| SessionInfo {
            id: a.id,
            username: &a.username,
            five_tuple: a.five_tuple,
            relayed: a.relayed,
            created_unix: self.unix(a.created),
            lifetime_left: a.expires.saturating_duration_since(now),
            stats: a.stats,
            permissions: a.permissions.iter().filter(|p| p.expires > now).count(),
            channels: a.channels.iter().filter(|c| c.expires > now).count(),
        })
    }

    /// Ends allocation `id` now ([`EndReason::Admin`]; events as for any end, and the
    /// client's next Refresh gets 437). Returns whether it existed.
    pub fn end_allocation(&mut self, now: Instant, id: AllocationId) -> bool {
        self.last_now = now;
        let found = self
            .slab
            .iter()
            .position(|a| a.as_ref().is_some_and(|a| a.id == id));
        match found.and_then(|i| u32::try_from(i).ok()) {
            Some(idx) => {
                self.remove_allocation(idx, EndReason::Admin, now);
                true
            }
            None => false,
        }
    }

    /// Ends every allocation of `username` now ([`EndReason::Admin`]). Returns how many.
    pub fn end_user_allocations(&mut self, now: Instant, username: &str) -> usize {
        self.last_now = now;
        let found: Vec<u32> = self
            .slab
            .iter()
            .enumerate()
            .filter(|(_, a)| a.as_ref().is_some_and(|a| &*a.username == username))
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .collect();
        for &idx in &found {
            self.remove_allocation(idx, EndReason::Admin, now);
        }
        found.len()
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
        self.stats.permissions_active -= permissions as u64;
        self.stats.channels_active -= channels as u64;
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
        self.stats.allocations_active -= 1;
        self.stats.permissions_active -= a.permissions.len() as u64;
        self.stats.channels_active -= a.active_channels() as u64;
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
            return match alternate {
                Some(to) => self.reject(ft, msg, Reject::TryAlternate, Some(&auth), |b| {
                    b.add(&AlternateServer(to));
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
                a.channels.push(ChannelBinding {
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
