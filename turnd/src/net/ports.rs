//! Relay port pools: which ports of the configured range are in use, per relay IP.
//!
//! Shared by every worker behind one mutex that is taken only when an allocation is created
//! or ends, never per packet. Ports are handed out from a random starting point (like coturn)
//! so relayed addresses are not predictable, and a freed port is reusable at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::Mutex;

/// The in-use bitmap of one relay IP.
#[derive(Debug)]
struct Pool {
    used: Vec<bool>,
    free: usize,
}

/// Port pools for all relay IPs.
#[derive(Debug)]
pub struct PortPools {
    range: RangeInclusive<u16>,
    pools: Mutex<HashMap<IpAddr, Pool>>,
}

impl PortPools {
    /// Pools over `range` (inclusive).
    #[must_use]
    pub fn new(range: RangeInclusive<u16>) -> Self {
        Self {
            range,
            pools: Mutex::new(HashMap::new()),
        }
    }

    fn len(&self) -> usize {
        usize::from(*self.range.end() - *self.range.start()) + 1
    }

    /// Tries candidate ports for `ip` starting at offset `start`, calling `bind` on each free
    /// one until it succeeds; `even` selects even ports and `pair` also takes port + 1
    /// (EVEN-PORT). `bind` returns `None` when the port is taken by someone else (it is then
    /// skipped). The pool's mutex is taken only to pick and to mark a port, never across
    /// `bind`: a candidate is marked used first, and unmarked if the bind fails.
    pub fn acquire<T>(
        &self,
        ip: IpAddr,
        even: bool,
        pair: bool,
        start: usize,
        mut bind: impl FnMut(u16) -> Option<T>,
    ) -> Option<(u16, T)> {
        let n = self.len();
        let base = *self.range.start();
        let from = start % n;
        let mut scanned = 0;
        while scanned < n {
            let (i, port) = {
                let mut pools = self.lock();
                let pool = pools.entry(ip).or_insert_with(|| Pool {
                    used: vec![false; n],
                    free: n,
                });
                let mut found = None;
                while scanned < n {
                    let i = (from + scanned) % n;
                    scanned += 1;
                    let Ok(off) = u16::try_from(i) else { continue };
                    let port = base.saturating_add(off);
                    if pool.free == 0 {
                        return None;
                    }
                    if pool.used[i] || (even && port % 2 != 0) {
                        continue;
                    }
                    if pair && (i + 1 >= n || pool.used[i + 1]) {
                        continue;
                    }
                    pool.used[i] = true;
                    pool.free -= 1;
                    if pair {
                        pool.used[i + 1] = true;
                        pool.free -= 1;
                    }
                    found = Some((i, port));
                    break;
                }
                found?
            };
            if let Some(t) = bind(port) {
                return Some((port, t));
            }
            let mut pools = self.lock();
            if let Some(pool) = pools.get_mut(&ip) {
                pool.used[i] = false;
                pool.free += 1;
                if pair {
                    pool.used[i + 1] = false;
                    pool.free += 1;
                }
            }
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Pool>> {
        match self.pools.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        }
    }

    /// Ports in use and ports in the range, for every relay IP seen so far (metrics).
    #[must_use]
    pub fn usage(&self) -> Vec<(IpAddr, usize, usize)> {
        let pools = self.lock();
        let mut v: Vec<_> = pools
            .iter()
            .map(|(ip, p)| (*ip, p.used.len() - p.free, p.used.len()))
            .collect();
        v.sort();
        v
    }

    /// Free ports of `ip` (the whole range for an IP not used yet).
    #[must_use]
    pub fn free(&self, ip: IpAddr) -> usize {
        self.lock().get(&ip).map_or(self.len(), |p| p.free)
    }

    /// Frees a port of `ip`; it can be handed out again at once.
    pub fn release(&self, ip: IpAddr, port: u16) {
        let Some(i) = port.checked_sub(*self.range.start()).map(usize::from) else {
            return;
        };
        let mut pools = match self.pools.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        if let Some(pool) = pools.get_mut(&ip) {
            if pool.used.get(i).copied() == Some(true) {
                pool.used[i] = false;
                pool.free += 1;
            }
        }
    }

    /// Ports in use for `ip`.
    #[must_use]
    pub fn in_use(&self, ip: IpAddr) -> usize {
        let pools = match self.pools.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        pools.get(&ip).map_or(0, |p| p.used.len() - p.free)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhausts_then_reuses_freed_ports_and_skips_busy_ones() {
        let pools = PortPools::new(50000..=50003);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let got: Vec<u16> = (0..4)
            .map(|_| {
                pools
                    .acquire(ip, false, false, 2, |p| (p != 50001).then_some(()))
                    .map(|x| x.0)
            })
            .map_while(|x| x)
            .collect();
        assert_eq!(got, vec![50002, 50003, 50000], "50001 is busy elsewhere");
        assert!(
            pools.acquire(ip, false, false, 0, |_| Some(())).is_some(),
            "50001 freed up"
        );
        assert!(pools.acquire(ip, false, false, 0, |_| Some(())).is_none());
        pools.release(ip, 50002);
        assert_eq!(
            pools
                .acquire(ip, false, false, 0, |_| Some(()))
                .map(|x| x.0),
            Some(50002)
        );
        assert_eq!(pools.in_use(ip), 4);
    }

    #[test]
    fn even_port_pairs() {
        let pools = PortPools::new(50001..=50010);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (p, ()) = pools.acquire(ip, true, true, 0, |_| Some(())).unwrap();
        assert_eq!(p, 50002);
        assert_eq!(pools.in_use(ip), 2);
    }
}
