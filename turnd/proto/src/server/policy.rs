//! Which peers an allocation may talk to (RFC 8656 §21.1 and the security considerations of
//! RFC 6156): a secure-by-default deny list of non-public ranges, with operator allow and deny
//! CIDR lists on top.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The ranges a relay must never reach unless the operator allows them explicitly, each with
/// the document that defines it: loopback, "this network", RFC 1918, CGNAT, link-local (incl.
/// cloud metadata 169.254.169.254), IETF protocol assignments, benchmarking, multicast,
/// reserved, broadcast, documentation; and every block of the IANA IPv6 Special-Purpose
/// Address Registry that is not globally reachable, plus the deprecated site-local prefix,
/// multicast, and the translation prefixes that embed IPv4 (NAT64, 6to4, Teredo).
///
/// IPv4-mapped (`::ffff:0:0/96`), IPv4-compatible (`::/96`) and SIIT IPv4-translated
/// (`::ffff:0:0:0/96`) addresses are not listed: [`PeerPolicy::check`] checks them as the IPv4
/// address they carry.
pub const DEFAULT_DENIED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "RFC 791: this network"),
    ("10.0.0.0/8", "RFC 1918: private use"),
    ("100.64.0.0/10", "RFC 6598: shared address space (CGNAT)"),
    ("127.0.0.0/8", "RFC 1122: loopback"),
    ("169.254.0.0/16", "RFC 3927: link local (cloud metadata)"),
    ("172.16.0.0/12", "RFC 1918: private use"),
    ("192.0.0.0/24", "RFC 6890: IETF protocol assignments"),
    ("192.0.2.0/24", "RFC 5737: documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "RFC 7526: deprecated 6to4 relay anycast"),
    ("192.168.0.0/16", "RFC 1918: private use"),
    ("198.18.0.0/15", "RFC 2544: benchmarking"),
    ("198.51.100.0/24", "RFC 5737: documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "RFC 5737: documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "RFC 5771: multicast"),
    ("240.0.0.0/4", "RFC 1112: reserved"),
    ("255.255.255.255/32", "RFC 919: limited broadcast"),
    ("::/128", "RFC 4291: unspecified address"),
    ("::1/128", "RFC 4291: loopback"),
    (
        "64:ff9b::/96",
        "RFC 6052: IPv4/IPv6 translation (NAT64 well-known prefix)",
    ),
    (
        "64:ff9b:1::/48",
        "RFC 8215: local-use IPv4/IPv6 translation",
    ),
    ("100::/64", "RFC 6666: discard-only"),
    ("100:0:0:1::/64", "RFC 9780: dummy IPv6 prefix"),
    ("2001::/32", "RFC 4380: Teredo"),
    ("2001:2::/48", "RFC 5180: benchmarking"),
    ("2001:10::/28", "RFC 4843: deprecated ORCHID"),
    (
        "2001:20::/28",
        "RFC 7343: ORCHIDv2 (identifiers, not locators)",
    ),
    ("2001:db8::/32", "RFC 3849: documentation"),
    ("2002::/16", "RFC 3056: 6to4"),
    ("3fff::/20", "RFC 9637: documentation"),
    ("5f00::/16", "RFC 9602: segment routing (SRv6) SIDs"),
    ("fc00::/7", "RFC 4193: unique local"),
    ("fe80::/10", "RFC 4291: link-local unicast"),
    ("fec0::/10", "RFC 3879: deprecated site-local"),
    ("ff00::/8", "RFC 4291: multicast"),
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

/// The IPv4 address inside a SIIT IPv4-translated address `::ffff:0:a.b.c.d`
/// (`::ffff:0:0:0/96`, RFC 2765 §2.1, RFC 6145): a translator delivers it to that IPv4
/// address, so policy checks it as one.
fn siit_embedded(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let s = v6.segments();
    if s[..4].iter().all(|&x| x == 0) && s[4] == 0xffff && s[5] == 0 {
        let o = v6.octets();
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    None
}

impl PeerPolicy {
    /// A policy with the operator's lists on top of [`DEFAULT_DENIED`].
    #[must_use]
    pub fn new(allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        let builtin = DEFAULT_DENIED
            .iter()
            .filter_map(|(cidr, _)| cidr.parse().ok())
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
        let ip = siit_embedded(ip).map_or(ip, IpAddr::V4);
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

    /// Every built-in block, with its source, is denied at its first and last address, and
    /// each named IPv6 form from the IANA registry and the probe of issue 12 is denied.
    #[test]
    fn default_deny_table_covers_every_listed_block_with_its_source() {
        let p = PeerPolicy::default();
        for (cidr, source) in DEFAULT_DENIED {
            let net: IpNet = cidr.parse().unwrap();
            assert!(!source.is_empty());
            for a in [net.network(), net.broadcast()] {
                assert!(
                    p.check(a).is_err(),
                    "{a} in {cidr} ({source}) must be denied"
                );
            }
        }
        // (address, block, source): the IANA IPv6 special-purpose blocks that are not
        // globally reachable, and the forms that embed IPv4.
        let table = [
            ("::", "::/128", "RFC 4291"),
            ("::1", "::1/128", "RFC 4291"),
            (
                "::ffff:169.254.169.254",
                "::ffff:0:0/96 checked as IPv4",
                "RFC 4291",
            ),
            (
                "::ffff:0:a9fe:a9fe",
                "::ffff:0:0:0/96 SIIT checked as IPv4",
                "RFC 2765",
            ),
            (
                "::ffff:0:127.0.0.1",
                "::ffff:0:0:0/96 SIIT checked as IPv4",
                "RFC 2765",
            ),
            (
                "::10.0.0.1",
                "::/96 IPv4-compatible checked as IPv4",
                "RFC 4291",
            ),
            ("64:ff9b::a9fe:a9fe", "64:ff9b::/96", "RFC 6052"),
            ("64:ff9b:1::1", "64:ff9b:1::/48", "RFC 8215"),
            ("100::1", "100::/64", "RFC 6666"),
            ("100:0:0:1::1", "100:0:0:1::/64", "RFC 9780"),
            ("2001::1", "2001::/32", "RFC 4380"),
            ("2001:2::1", "2001:2::/48", "RFC 5180"),
            ("2001:10::1", "2001:10::/28", "RFC 4843"),
            ("2001:20::1", "2001:20::/28", "RFC 7343"),
            ("2001:db8::1", "2001:db8::/32", "RFC 3849"),
            ("2002:a9fe:a9fe::1", "2002::/16", "RFC 3056"),
            ("3fff::1", "3fff::/20", "RFC 9637"),
            ("3fff:fff:ffff::1", "3fff::/20", "RFC 9637"),
            ("5f00::1", "5f00::/16", "RFC 9602"),
            ("fd00::1", "fc00::/7", "RFC 4193"),
            ("fe80::1", "fe80::/10", "RFC 4291"),
            ("fec0::1", "fec0::/10", "RFC 3879"),
            ("ff02::1", "ff00::/8", "RFC 4291"),
        ];
        for (a, block, source) in table {
            assert!(
                p.check(ip(a)).is_err(),
                "{a} ({block}, {source}) must be denied"
            );
        }
        // Neighbours that are global stay allowed; a SIIT form of a public IPv4 address too.
        for a in [
            "2001:200::1",
            "4000::1",
            "5f01::1",
            "2a00::1",
            "::ffff:0:808:808",
        ] {
            assert_eq!(p.check(ip(a)), Ok(()), "{a} must be allowed");
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
