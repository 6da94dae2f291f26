//! The opt-in limit on 401/438 challenges per source
//! (`ServerConfig::challenges_per_source_per_second`).
//!
//! A fixed table of token buckets indexed by a keyed hash of the source: an IPv4 address, or
//! the /64 of an IPv6 address (one subscriber's prefix, so rotating through it gains
//! nothing). The table never grows with the number of sources; sources that land in one slot
//! share its budget, which errs toward answering less, never toward growing. The hash key is
//! derived from the nonce secret, so which sources collide is not predictable from outside.

use std::hash::Hasher as _;
use std::net::IpAddr;

use rustc_hash::FxHasher;

use super::policy::canonical_ip;

/// Slots in the table (16 bytes each: 64 KiB).
pub(crate) const SLOTS: usize = 4096;

/// Milli-tokens per challenge.
const UNIT: u64 = 1000;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Milli-tokens left; refilled lazily.
    tokens: u64,
    /// Milliseconds since the server's epoch at the last refill.
    last_ms: u64,
}

#[derive(Debug)]
pub(crate) struct ChallengeLimiter {
    key: u64,
    /// Allocated on first use, so a server with the limit off holds nothing.
    slots: Vec<Bucket>,
}

impl ChallengeLimiter {
    pub(crate) fn new(key: u64) -> Self {
        Self {
            key,
            slots: Vec::new(),
        }
    }

    fn slot(&self, ip: IpAddr) -> usize {
        let source = match canonical_ip(ip) {
            IpAddr::V4(v4) => u64::from(u32::from(v4)),
            IpAddr::V6(v6) => (u128::from(v6) >> 64) as u64 | (1 << 63),
        };
        let mut h = FxHasher::default();
        h.write_u64(self.key);
        h.write_u64(source);
        // The top bits of an Fx hash are the well-mixed ones.
        (h.finish() >> 52) as usize % SLOTS
    }

    /// Takes one challenge from `ip`'s bucket at `now_ms`; false when it is empty. `per_second`
    /// is both the refill rate and the burst.
    pub(crate) fn allow(&mut self, ip: IpAddr, now_ms: u64, per_second: u32) -> bool {
        if self.slots.is_empty() {
            self.slots = vec![
                Bucket {
                    tokens: u64::MAX,
                    last_ms: 0,
                };
                SLOTS
            ];
        }
        let i = self.slot(ip);
        let rate = u64::from(per_second);
        let b = &mut self.slots[i];
        let elapsed = now_ms.saturating_sub(b.last_ms);
        // `rate` tokens per second is `rate` milli-tokens per millisecond.
        b.tokens = b
            .tokens
            .saturating_add(elapsed.saturating_mul(rate))
            .min(rate * UNIT);
        b.last_ms = b.last_ms.max(now_ms);
        if b.tokens >= UNIT {
            b.tokens -= UNIT;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let mut l = ChallengeLimiter::new(7);
        let ip: IpAddr = "192.0.2.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        for _ in 0..5 {
            assert!(l.allow(ip, 0, 5));
        }
        assert!(!l.allow(ip, 0, 5));
        assert!(!l.allow(ip, 199, 5), "one token takes 200 ms at 5/s");
        assert!(l.allow(ip, 200, 5));
        assert!(!l.allow(ip, 200, 5));
        // A long pause refills to the burst, not beyond.
        let allowed = (0..20).filter(|_| l.allow(ip, 100_000, 5)).count();
        assert_eq!(allowed, 5);
    }

    #[test]
    fn an_ipv6_64_shares_one_bucket_and_memory_is_fixed() {
        let mut l = ChallengeLimiter::new(7);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap_or(IpAddr::from([0; 16]));
        let b: IpAddr = "2001:db8:1:2::ffff"
            .parse()
            .unwrap_or(IpAddr::from([0; 16]));
        assert!(l.allow(a, 0, 1));
        assert!(!l.allow(b, 0, 1), "same /64, same bucket");
        for i in 0..10_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            l.allow(ip, 0, 1);
        }
        assert_eq!(l.slots.len(), SLOTS);
    }
}
