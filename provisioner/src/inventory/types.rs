//! Small validated value types used by the inventory: each parses from its TOML string form and
//! refuses bad input at parse time, so the TOML error already points at the offending line.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 network in CIDR notation, e.g. `10.10.10.0/24`. The address must be the network
/// address (no host bits set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask_bits(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The netmask in dotted form, e.g. `255.255.255.0`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask_bits())
    }

    /// Whether `ip` is a usable host address of this network (not the network or broadcast
    /// address).
    pub fn contains_host(&self, ip: Ipv4Addr) -> bool {
        let bits = u32::from(ip);
        bits & self.mask_bits() == u32::from(self.network)
            && ip != self.network
            && ip != self.broadcast()
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not in CIDR form ADDRESS/PREFIX"))?;
        let network: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("`{prefix}` is not a prefix length 0..=32"))?;
        let cidr = Self { network, prefix };
        if u32::from(network) & !cidr.mask_bits() != 0 {
            return Err(format!(
                "`{s}` has host bits set; the network address is {}/{prefix}",
                Ipv4Addr::from(u32::from(network) & cidr.mask_bits())
            ));
        }
        Ok(cidr)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> Self {
        c.to_string()
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A MAC address written as six colon-separated lowercase-or-uppercase hex octets. Stored and
/// printed in lowercase so that comparisons are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// The octets.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a MAC address like 52:54:00:0a:0a:0a");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if out[0] & 1 == 1 {
            return Err(format!("`{s}` is a multicast MAC address"));
        }
        Ok(Self(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> Self {
        m.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

/// A DNS-1123 label: lowercase letters, digits and `-`, 1..=63 characters, starting and ending
/// with a letter or digit. Used for VM names (they become hostnames and Kubernetes node names).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostName(String);

impl HostName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HostName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if s.is_empty() || s.len() > 63 {
            return Err(format!("`{s}` must be 1 to 63 characters long"));
        }
        if !s.chars().all(ok_char) {
            return Err(format!(
                "`{s}` may contain only lowercase letters, digits and `-`"
            ));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(format!("`{s}` must not start or end with `-`"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for HostName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<HostName> for String {
    fn from(h: HostName) -> Self {
        h.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A version written `MAJOR.MINOR.PATCH` (Kubernetes, Cilium, Helm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Version {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl Version {
    /// `MAJOR.MINOR`, as used by the pkgs.k8s.io repository path.
    pub fn minor_series(&self) -> String {
        format!("{}.{}", self.major, self.minor)
    }
}

impl FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a version like 1.29.6");
        let mut it = s.split('.').map(|p| p.parse::<u32>().map_err(|_| bad()));
        let v = Self {
            major: it.next().ok_or_else(bad)??,
            minor: it.next().ok_or_else(bad)??,
            patch: it.next().ok_or_else(bad)??,
        };
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

impl TryFrom<String> for Version {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Version> for String {
    fn from(v: Version) -> Self {
        v.to_string()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// How the guest is virtualised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtType {
    /// Hardware virtualisation (needs /dev/kvm); the CPU is passed through.
    #[default]
    Kvm,
    /// Software emulation (TCG), for hosts without KVM; QEMU's default CPU model.
    Qemu,
}

impl VirtType {
    /// The libvirt domain type (`<domain type=…>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Qemu => "qemu",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_knows_its_hosts_netmask_and_broadcast() {
        let c: Ipv4Cidr = "10.10.10.0/24".parse().expect("valid");
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 10, 10, 255));
        assert!(c.contains_host(Ipv4Addr::new(10, 10, 10, 10)));
        assert!(!c.contains_host(Ipv4Addr::new(10, 10, 10, 0)));
        assert!(!c.contains_host(Ipv4Addr::new(10, 10, 10, 255)));
        assert!(!c.contains_host(Ipv4Addr::new(10, 10, 11, 1)));
    }

    #[test]
    fn cidr_with_host_bits_is_refused_with_the_right_network() {
        let err = "10.10.10.5/24".parse::<Ipv4Cidr>().expect_err("host bits");
        assert!(err.contains("10.10.10.0/24"), "{err}");
    }

    #[test]
    fn mac_parses_case_insensitively_and_prints_lowercase() {
        let m: MacAddr = "52:54:00:0A:0a:0B".parse().expect("valid");
        assert_eq!(m.to_string(), "52:54:00:0a:0a:0b");
        assert!("52:54:00:0a:0a".parse::<MacAddr>().is_err());
        assert!("52:54:00:0a:0a:0a:0a".parse::<MacAddr>().is_err());
        assert!("01:54:00:0a:0a:0a".parse::<MacAddr>().is_err());
    }

    #[test]
    fn hostname_rejects_uppercase_and_edges() {
        assert!("k8s-worker1".parse::<HostName>().is_ok());
        assert!("K8s".parse::<HostName>().is_err());
        assert!("-a".parse::<HostName>().is_err());
        assert!("a_b".parse::<HostName>().is_err());
    }

    #[test]
    fn version_needs_three_numbers() {
        let v: Version = "1.29.6".parse().expect("valid");
        assert_eq!(v.minor_series(), "1.29");
        assert!("1.29".parse::<Version>().is_err());
        assert!("1.29.x".parse::<Version>().is_err());
    }
}
