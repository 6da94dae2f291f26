//! What the core counts: why requests were refused ([`Reject`]) and datagrams dropped
//! ([`DropReason`]), requests by method ([`RequestKind`]), and the [`Stats`] the IO layer
//! exports as metrics.

use crate::codec::{ErrorCode, Method};

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
    /// Datagrams relayed client → peer, by the client's transport
    /// ([`Transport::index`](super::Transport::index)).
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
