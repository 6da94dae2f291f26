//! Per-allocation state (RFC 8656 §2.2, §9, §12): relayed addresses, permissions, channel
//! bindings, lifetimes and byte counters. Kept small: see `MEMORY.md`-style note in the tests
//! (`allocation_state_is_under_1_kib`).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::codec::ChannelNumber;
use crate::server::policy::canonical_ip;
use crate::server::FiveTuple;

/// After a channel binding expires its number and peer stay reserved this long
/// (RFC 8656 §12: no rebinding to a different peer or number for 5 minutes).
pub(crate) const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

/// A relayed transport address: the address the socket is bound to and the one advertised in
/// XOR-RELAYED-ADDRESS (different behind NAT/DNAT, like coturn's `external-ip`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RelayedAddress {
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

/// A channel binding (RFC 8656 §2.5, §11).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChannelBinding {
    pub(crate) number: ChannelNumber,
    pub(crate) peer: SocketAddr,
    pub(crate) expires: Instant,
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

    /// Installs or refreshes a permission; false when `max` would be exceeded.
    pub(crate) fn install_permission(
        &mut self,
        peer: IpAddr,
        expires: Instant,
        max: usize,
    ) -> bool {
        let peer = canonical_ip(peer);
        if let Some(p) = self.permissions.iter_mut().find(|p| p.ip == peer) {
            p.expires = p.expires.max(expires);
            return true;
        }
        if self.permissions.len() >= max {
            return false;
        }
        self.permissions.push(Permission { ip: peer, expires });
        true
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
            t = t.min(c.expires + CHANNEL_COOLDOWN);
        }
        t
    }

    /// Drops expired permissions and channel bindings whose cooldown is over.
    pub(crate) fn sweep(&mut self, now: Instant) {
        self.permissions.retain(|p| p.expires > now);
        self.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
    }
}
