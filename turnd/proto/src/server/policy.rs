//! Which peers an allocation may talk to (RFC 8656 §21.1 and the security considerations of
//! RFC 6156): a secure-by-default deny list of non-public ranges, with operator allow and deny
//! CIDR lists on top.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The ranges a relay must never reach unless the operator allows them explicitly: loopback,
/// "this network", RFC 1918, CGNAT, link-local (incl. cloud metadata 169.254.169.254),
/// IETF protocol assignments, benchmarking, multicast, reserved, broadcast, documentation,
/// and their IPv6 counterparts plus the translation prefixes that embed IPv4 (NAT64, 6to4,
/// Teredo).
pub const DEFAULT_DENIED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/32",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// Why a peer was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PeerDenied {
    /// In the operator's deny list.
    OperatorDenied,
    /// In the built-in list of non-public ranges and not explicitly allowed.
    NotPublic,
}

/// The peer address policy.
#[derive(Clone, Debug)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    builtin: Vec<IpNet>,
}

impl Default for PeerPolicy {
    fn default() -> Self {
        Self::new(Vec::new(), Vec::new())
    }
}

/// Makes an address canonical before any check: IPv4-mapped (`::ffff:a.b.c.d`) and
/// IPv4-compatible (`::a.b.c.d`) IPv6 addresses become the IPv4 address they carry, so a deny
/// on 127.0.0.0/8 also covers `::ffff:127.0.0.1` (the class of bypass behind coturn
/// CVE-2020-26262).
#[must_use]
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            // IPv4-compatible ::a.b.c.d (deprecated), but not :: and ::1 themselves.
            if s[..6].iter().all(|&x| x == 0)
                && v6 != Ipv6Addr::UNSPECIFIED
                && v6 != Ipv6Addr::LOCALHOST
            {
                let o = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            ip
        }
    }
}

/// [`canonical_ip`] for a transport address: `[::ffff:192.0.2.1]:5000` becomes
/// `192.0.2.1:5000`, so the relay sends from its IPv4 socket to an IPv4 destination and a
/// channel bound to either spelling matches datagrams from the peer.
#[must_use]
pub fn canonical_addr(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

impl PeerPolicy {
    /// A policy with the operator's lists on top of [`DEFAULT_DENIED`].
    #[must_use]
    pub fn new(allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        let builtin = DEFAULT_DENIED
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        Self {
            allow,
            deny,
            builtin,
        }
    }

    /// Checks a peer address. An explicit allow wins over both deny lists; the operator's deny
    /// list wins over everything else; then the built-in list applies.
    ///
    /// # Errors
    /// The peer is not allowed.
    pub fn check(&self, ip: IpAddr) -> Result<(), PeerDenied> {
        let ip = canonical_ip(ip);
        let hit = |list: &[IpNet]| list.iter().any(|n| n.contains(&ip));
        if hit(&self.allow) {
            return Ok(());
        }
        if hit(&self.deny) {
            return Err(PeerDenied::OperatorDenied);
        }
        if hit(&self.builtin) {
            return Err(PeerDenied::NotPublic);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_denies_every_non_public_range_and_allows_public() {
        let p = PeerPolicy::default();
        for s in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.1.2.3",
            "192.0.0.8",
            "198.18.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.9",
            "::",
            "::1",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "64:ff9b::a00:1",
            "2001::1",
            "2002:a00:1::",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(p.check(ip(s)).is_err(), "{s} must be denied");
        }
        for s in [
            "8.8.8.8",
            "94.130.141.98",
            "2a01:4f8::1",
            "1.1.1.1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(p.check(ip(s)), Ok(()), "{s} must be allowed");
        }
    }

    #[test]
    fn explicit_allow_wins_and_covers_mapped_forms() {
        let p = PeerPolicy::new(
            vec!["127.0.0.0/8".parse().unwrap()],
            vec!["8.8.8.0/24".parse().unwrap()],
        );
        assert_eq!(p.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(p.check(ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(p.check(ip("8.8.8.8")), Err(PeerDenied::OperatorDenied));
        assert_eq!(
            p.check(ip("::ffff:8.8.8.8")),
            Err(PeerDenied::OperatorDenied)
        );
        assert_eq!(p.check(ip("10.0.0.1")), Err(PeerDenied::NotPublic));
    }
}
