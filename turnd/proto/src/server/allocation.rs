//! Per-allocation state (RFC 8656 §2.2, §9, §12): relayed addresses, permissions, channel
//! bindings, lifetimes and byte counters. Kept small: see `MEMORY.md`-style note in the tests
//! (`allocation_state_is_under_1_kib`).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use crate::codec::ChannelNumber;
use crate::server::policy::canonical_ip;
use crate::server::{AllocationId, FiveTuple, Route};

pub(crate) use crate::defaults::CHANNEL_COOLDOWN;

/// The IO layer's name for one relay socket: its index in the IO layer's (dense) table of
/// relay sockets. The core indexes a `Vec` by it to find the allocation of a datagram from a
/// peer, and hands it back in [`Destination::Peer`](crate::server::Destination::Peer).
///
/// The IO layer chooses it when it binds the socket and may reuse it once the core has
/// released the socket ([`Event::RelayReleased`](crate::server::Event::RelayReleased)).
/// Keep handles dense (small): the core's table is as long as the largest handle.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct RelayHandle(pub u32);

/// A relayed transport address: the address the socket is bound to and the one advertised in
/// XOR-RELAYED-ADDRESS (different behind NAT/DNAT, like coturn's `external-ip`), plus the IO
/// layer's handle of the socket.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RelayedAddress {
    /// The IO layer's handle of the relay socket.
    pub handle: RelayHandle,
    /// Where the IO layer bound the relay socket.
    pub local: SocketAddr,
    /// What clients and peers see (the public address).
    pub advertised: SocketAddr,
}

/// A permission: the peer IP it admits and when it expires (RFC 8656 §2.3, §9).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Permission {
    pub(crate) ip: IpAddr,
    pub(crate) expires: Instant,
}

/// A channel binding (RFC 8656 §2.5, §12).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChannelBinding {
    pub(crate) number: ChannelNumber,
    pub(crate) peer: SocketAddr,
    pub(crate) expires: Instant,
    /// Counted in `Stats::channels_active`: bound and not yet swept as expired (it may still
    /// sit in its cooldown afterwards).
    pub(crate) active: bool,
}

/// Traffic counters of one allocation.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct AllocationStats {
    /// Datagrams relayed from the client to peers.
    pub packets_to_peer: u64,
    /// Bytes relayed from the client to peers (payload only).
    pub bytes_to_peer: u64,
    /// Datagrams relayed from peers to the client.
    pub packets_from_peer: u64,
    /// Bytes relayed from peers to the client (payload only).
    pub bytes_from_peer: u64,
}

/// One allocation (RFC 8656 §2.2).
#[derive(Debug)]
pub(crate) struct Allocation {
    pub(crate) id: AllocationId,
    pub(crate) route: Route,
    pub(crate) five_tuple: FiveTuple,
    pub(crate) username: Box<str>,
    /// Index 0: the IPv4 relayed address; index 1: IPv6.
    pub(crate) relayed: [Option<RelayedAddress>; 2],
    pub(crate) created: Instant,
    pub(crate) expires: Instant,
    /// The earliest deadline currently pushed for this allocation.
    pub(crate) scheduled: Instant,
    pub(crate) generation: u32,
    pub(crate) permissions: Vec<Permission>,
    pub(crate) channels: Vec<ChannelBinding>,
    pub(crate) dont_fragment: bool,
    pub(crate) stats: AllocationStats,
}

/// Pushes onto one of an allocation's short lists (permissions, channels), growing it one
/// entry at a time up to four: most allocations hold one peer, and `Vec`'s first growth
/// (room for four) would hold three empty slots for each of the thousands kept (~300 bytes
/// per allocation). Past four it doubles as usual.
fn push_small<T>(list: &mut Vec<T>, item: T) {
    if list.len() == list.capacity() && list.capacity() < 4 {
        list.reserve_exact(1);
    }
    list.push(item);
}

pub(crate) fn family_index(ip: IpAddr) -> usize {
    usize::from(canonical_ip(ip).is_ipv6())
}

impl Allocation {
    /// The relayed address used toward `peer` (same family), if the allocation has one.
    pub(crate) fn relayed_for(&self, peer: IpAddr) -> Option<RelayedAddress> {
        self.relayed[family_index(peer)]
    }

    pub(crate) fn has_permission(&self, peer: IpAddr, now: Instant) -> bool {
        let peer = canonical_ip(peer);
        self.permissions
            .iter()
            .any(|p| p.ip == peer && p.expires > now)
    }

    /// Whether a permission entry for `peer` exists (live, or expired and not yet swept:
    /// installing it again refreshes it rather than adding one).
    pub(crate) fn holds_permission(&self, peer: IpAddr) -> bool {
        let peer = canonical_ip(peer);
        self.permissions.iter().any(|p| p.ip == peer)
    }

    /// Installs or refreshes a permission. The caller has checked the permission cap
    /// (`ServerConfig::max_permissions_per_allocation`, the one place it is enforced).
    /// Returns whether a new permission was added.
    pub(crate) fn install_permission(&mut self, peer: IpAddr, expires: Instant) -> bool {
        let peer = canonical_ip(peer);
        if let Some(p) = self.permissions.iter_mut().find(|p| p.ip == peer) {
            p.expires = p.expires.max(expires);
            return false;
        }
        push_small(&mut self.permissions, Permission { ip: peer, expires });
        true
    }

    /// Adds a channel binding. The caller has checked the number, the peer and the caps.
    pub(crate) fn add_channel(&mut self, binding: ChannelBinding) {
        push_small(&mut self.channels, binding);
    }

    /// Channel bindings counted as active.
    pub(crate) fn active_channels(&self) -> usize {
        self.channels.iter().filter(|c| c.active).count()
    }

    pub(crate) fn channel_by_number(
        &self,
        n: ChannelNumber,
        now: Instant,
    ) -> Option<&ChannelBinding> {
        self.channels
            .iter()
            .find(|c| c.number == n && c.expires > now)
    }

    pub(crate) fn channel_by_peer(
        &self,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<&ChannelBinding> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
    }

    /// The earliest moment something in this allocation changes state.
    pub(crate) fn next_deadline(&self) -> Instant {
        let mut t = self.expires;
        for p in &self.permissions {
            t = t.min(p.expires);
        }
        for c in &self.channels {
            let at = if c.active {
                c.expires
            } else {
                c.expires + CHANNEL_COOLDOWN
            };
            t = t.min(at);
        }
        t
    }

    /// Drops expired permissions and channel bindings whose cooldown is over, and marks
    /// expired bindings inactive. Returns (permissions removed, bindings made inactive).
    pub(crate) fn sweep(&mut self, now: Instant) -> (usize, usize) {
        let before = self.permissions.len();
        self.permissions.retain(|p| p.expires > now);
        let mut deactivated = 0;
        for c in &mut self.channels {
            if c.active && c.expires <= now {
                c.active = false;
                deactivated += 1;
            }
        }
        self.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
        (before - self.permissions.len(), deactivated)
    }
}

#[cfg(test)]
mod tests {
    use super::push_small;

    /// An allocation's permission and channel lists hold no empty room for peers it does not
    /// have (up to four); beyond that they double like any `Vec`.
    #[test]
    fn short_lists_grow_one_entry_at_a_time_up_to_four() {
        let mut list: Vec<u64> = Vec::new();
        for n in 1..=4 {
            push_small(&mut list, n);
            assert_eq!(list.capacity(), n as usize, "{n} entries");
        }
        push_small(&mut list, 5);
        assert!(list.capacity() >= 5);
        assert_eq!(list, [1, 2, 3, 4, 5]);
    }
}
