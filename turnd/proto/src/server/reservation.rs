//! Reserved relay ports (EVEN-PORT with the R bit, RESERVATION-TOKEN; RFC 8656 §7.2), shared
//! between the shards of a process like the [quota](super::QuotaLedger): touched when an
//! allocation is created, never per packet.
//!
//! See [`ReservationLedger`] for the contract between shards.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A port held for a RESERVATION-TOKEN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The held port's local address (the IO layer's key for the held socket).
    pub local: SocketAddr,
    /// The username that reserved it: only it may redeem the token.
    pub username: Box<str>,
    /// When the reservation lapses.
    pub expires: Instant,
}

/// What redeeming a token found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redeemed {
    /// The reservation is the caller's now: bind `PortRequest::Reserved` at this address.
    Port(SocketAddr),
    /// No such token (never issued, already redeemed, or expired and removed).
    Unknown,
    /// Reserved by another username; left in place for its owner.
    OtherUser,
    /// It had expired: removed, and the caller must emit `Event::ReservedPortReleased`
    /// for this address.
    Expired(SocketAddr),
}

/// The table of reservations, shared by the shards of a process.
///
/// # The contract
///
/// * The shard whose Allocate carried EVEN-PORT with R asks its IO layer to hold port + 1
///   (`RelayBound::reserved_next`), draws a random token (HMAC-SHA256 of a counter under the
///   shard's seed, `Server::with_ledgers`) and records a
///   [`Reservation`] under it: the held port's local address, the username that reserved
///   it, and when it expires (`ServerConfig::reservation_lifetime`, 30 s by default).
/// * Any shard may redeem the token ([`ReservationLedger::redeem`]): only the same username,
///   only before expiry. It then asks its own IO layer for `PortRequest::Reserved(local)`:
///   held ports must therefore live in a process-wide table keyed by local address, not in
///   the reserving worker. If that bind fails, the IO layer releases the held port itself.
/// * Removal is what counts: whoever removes an entry from the ledger owns the port from then
///   on. Redeeming removes it (the port becomes the allocation's relay socket). The reserving
///   shard's timer removes it when it expires, and a redeemer that finds it expired removes
///   it too; either one then emits `Event::ReservedPortReleased(local)`. Since removal happens
///   under the ledger's lock, the port is released exactly once, by whichever shard removed
///   it.
pub trait ReservationLedger: Send {
    /// Records a reservation; false (nothing recorded) when the token is already in use.
    fn insert(&mut self, token: [u8; 8], reservation: Reservation) -> bool;
    /// Redeems `token` for `username` at `now`, removing the entry unless it belongs to
    /// another username.
    fn redeem(&mut self, token: &[u8; 8], username: &str, now: Instant) -> Redeemed;
    /// Removes the entry if it has expired by `now`; returns the address to release.
    fn expire(&mut self, token: &[u8; 8], now: Instant) -> Option<SocketAddr>;
}

/// Reservations of one shard (or of every shard, behind [`SharedReservations`]).
#[derive(Debug, Default)]
pub struct LocalReservations {
    entries: HashMap<[u8; 8], Reservation>,
}

impl LocalReservations {
    /// Reservations held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl ReservationLedger for LocalReservations {
    fn insert(&mut self, token: [u8; 8], reservation: Reservation) -> bool {
        if self.entries.contains_key(&token) {
            return false;
        }
        self.entries.insert(token, reservation);
        true
    }

    fn redeem(&mut self, token: &[u8; 8], username: &str, now: Instant) -> Redeemed {
        let Some(r) = self.entries.get(token) else {
            return Redeemed::Unknown;
        };
        if r.expires <= now {
            let local = r.local;
            self.entries.remove(token);
            return Redeemed::Expired(local);
        }
        if *r.username != *username {
            return Redeemed::OtherUser;
        }
        let local = r.local;
        self.entries.remove(token);
        Redeemed::Port(local)
    }

    fn expire(&mut self, token: &[u8; 8], now: Instant) -> Option<SocketAddr> {
        match self.entries.get(token) {
            Some(r) if r.expires <= now => self.entries.remove(token).map(|r| r.local),
            _ => None,
        }
    }
}

/// A [`LocalReservations`] shared between shards.
#[derive(Clone, Debug, Default)]
pub struct SharedReservations(pub Arc<Mutex<LocalReservations>>);

impl SharedReservations {
    fn with<T>(&self, f: impl FnOnce(&mut LocalReservations) -> T) -> T {
        match self.0.lock() {
            Ok(mut l) => f(&mut l),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

impl ReservationLedger for SharedReservations {
    fn insert(&mut self, token: [u8; 8], reservation: Reservation) -> bool {
        self.with(|l| l.insert(token, reservation))
    }

    fn redeem(&mut self, token: &[u8; 8], username: &str, now: Instant) -> Redeemed {
        self.with(|l| l.redeem(token, username, now))
    }

    fn expire(&mut self, token: &[u8; 8], now: Instant) -> Option<SocketAddr> {
        self.with(|l| l.expire(token, now))
    }
}

/// Unpredictable reservation tokens from a seed the IO layer draws from its RNG: HMAC-SHA256
/// of a counter under the seed (a PRF), so tokens reveal nothing about each other or about
/// any other secret. Give every shard its own seed.
#[derive(Clone)]
pub(crate) struct TokenSource {
    seed: [u8; 32],
    counter: u64,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource").finish_non_exhaustive()
    }
}

impl TokenSource {
    pub(crate) fn new(seed: [u8; 32]) -> Self {
        Self { seed, counter: 0 }
    }

    pub(crate) fn next_token(&mut self) -> [u8; 8] {
        self.counter = self.counter.wrapping_add(1);
        let mut token = [0u8; 8];
        if let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.seed) {
            mac.update(b"turnd reservation token");
            mac.update(&self.counter.to_be_bytes());
            token.copy_from_slice(&mac.finalize().into_bytes()[..8]);
        }
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn r(user: &str, t0: Instant) -> Reservation {
        Reservation {
            local: SocketAddr::from(([10, 0, 0, 5], 49153)),
            username: user.into(),
            expires: t0 + Duration::from_secs(30),
        }
    }

    #[test]
    fn rfc8656_7_2_token_is_redeemed_once_by_its_user_before_expiry() {
        let t0 = Instant::now();
        let mut l = LocalReservations::default();
        assert!(l.insert([1; 8], r("alice", t0)));
        assert!(!l.insert([1; 8], r("bob", t0)), "tokens are unique");
        assert_eq!(l.redeem(&[1; 8], "bob", t0), Redeemed::OtherUser);
        let local = SocketAddr::from(([10, 0, 0, 5], 49153));
        assert_eq!(l.redeem(&[1; 8], "alice", t0), Redeemed::Port(local));
        assert_eq!(l.redeem(&[1; 8], "alice", t0), Redeemed::Unknown);
        assert_eq!(l.expire(&[1; 8], t0 + Duration::from_secs(31)), None);
    }

    #[test]
    fn rfc8656_7_2_expired_reservation_is_released_exactly_once_by_whoever_removes_it() {
        let t0 = Instant::now();
        let late = t0 + Duration::from_secs(30);
        let mut l = LocalReservations::default();
        l.insert([1; 8], r("alice", t0));
        l.insert([2; 8], r("alice", t0));
        assert_eq!(l.expire(&[1; 8], t0), None, "not yet");
        // A redeemer that comes late removes it and must release it...
        let local = SocketAddr::from(([10, 0, 0, 5], 49153));
        assert_eq!(l.redeem(&[1; 8], "alice", late), Redeemed::Expired(local));
        // ...and the reserving shard's timer then finds nothing to release.
        assert_eq!(l.expire(&[1; 8], late), None);
        // The other way round.
        assert_eq!(l.expire(&[2; 8], late), Some(local));
        assert_eq!(l.redeem(&[2; 8], "alice", late), Redeemed::Unknown);
        assert!(l.is_empty());
    }

    #[test]
    fn tokens_differ_by_seed_and_by_draw() {
        let mut a = TokenSource::new([1; 32]);
        let mut b = TokenSource::new([2; 32]);
        let (a1, a2, b1) = (a.next_token(), a.next_token(), b.next_token());
        assert_ne!(a1, a2);
        assert_ne!(a1, b1);
        assert_ne!(a1, [0; 8]);
    }
}
