//! The operations API (what an admin endpoint needs): hot reload, drain, sessions, and
//! ending allocations by id or user.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::auth::NonceIssuer;

use super::{
    AllocationId, AllocationStats, EndReason, FiveTuple, RelayedAddress, Server, ServerConfig,
};

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

impl Server {
    /// Replaces the configuration (hot reload). New credentials, peer policy, permission cap,
    /// lifetimes and service mode apply to requests from now on; existing allocations,
    /// permissions and channel bindings are left as they are (a permission to a peer the new
    /// policy denies lives out its lifetime). The nonce secret is kept, so nonces issued
    /// before stay valid; `config.nonce_secret` is ignored. Quotas live in the
    /// [`QuotaLedger`](super::QuotaLedger), which the IO layer updates itself.
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
}
