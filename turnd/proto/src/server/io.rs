//! What passes between the core and its IO layer: the handles the IO layer chooses
//! ([`Route`]; `RelayHandle` lives with [`RelayedAddress`]), datagrams to send
//! ([`Transmit`]), relay sockets asked for and bound ([`RelayRequest`], [`RelayBound`]), and
//! [`Event`]s.

use std::net::SocketAddr;
use std::time::Duration;

use crate::codec::{AddressFamily, Method};

use super::{AllocationStats, FiveTuple, Reject, RelayHandle, RelayedAddress, Transport};

/// Where the IO layer sends a client's answers: a listener index, a stream connection index,
/// whatever it likes. Opaque to the core, which remembers the route of each request and of
/// each allocation and hands it back in every [`Transmit`] to a client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Route(pub u32);

/// Identifies an allocation across the shards of one process: the shard number
/// ([`Server::set_shard`](super::Server::set_shard)) in the top 16 bits, a per-server counter below
/// (never reused).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct AllocationId(pub u64);

impl std::fmt::Display for AllocationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
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

/// Identifies a [`RelayRequest`] until
/// [`Server::handle_relay_bound`](super::Server::handle_relay_bound) answers it.
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

/// The IO layer must bind relay socket(s) and answer with
/// [`Server::handle_relay_bound`](super::Server::handle_relay_bound).
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
    /// The port held for a later RESERVATION-TOKEN (its local address). The core answers it with
    /// exactly one [`Event::ReservedPortReleased`] unless an Allocate (on any shard sharing the
    /// [`ReservationLedger`](super::ReservationLedger)) redeems it first with
    /// `PortRequest::Reserved`.
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
    /// Ended through the operations API
    /// ([`Server::end_allocation`](super::Server::end_allocation)).
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
    /// Bind relay socket(s), then call
    /// [`Server::handle_relay_bound`](super::Server::handle_relay_bound).
    RelayRequested(RelayRequest),
    /// Close this relay socket; its handle and port are free again. Sent exactly once for
    /// every relayed address the IO layer reported bound in a [`RelayBound`].
    RelayReleased(RelayedAddress),
    /// Close the port held at this local address for a RESERVATION-TOKEN (it was never
    /// redeemed, or the allocation it was held for failed); the port is free again. Emitted
    /// exactly once per `RelayBound::reserved_next` that no Allocate redeemed, by whichever
    /// shard removed the reservation from the shared ledger — not necessarily the one whose
    /// IO layer holds the socket (see [`ReservationLedger`](super::ReservationLedger)).
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
