//! Attribute types and typed attribute values (RFC 8489 §14, RFC 8656 §18, RFC 6156,
//! RFC 8489 §17.3.1 for ADDITIONAL-ADDRESS-FAMILY and friends).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::channel_data::ChannelNumber;
use super::message::MAGIC_COOKIE;
use super::method::{ErrorCode, TransactionId};
use super::DecodeError;

/// An attribute type: a newtype over the 16-bit number so unknown types round-trip.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttrType(pub u16);

macro_rules! attr_types {
    ($( $(#[$m:meta])* $name:ident = $v:expr, $s:expr; )*) => {
        impl AttrType {
            $( $(#[$m])* pub const $name: Self = Self($v); )*

            /// The RFC name, or `None` for a type this implementation does not know.
            #[must_use]
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $v => Some($s), )*
                    _ => None,
                }
            }
        }
    };
}

attr_types! {
    /// MAPPED-ADDRESS (RFC 8489 §14.1).
    MAPPED_ADDRESS = 0x0001, "MAPPED-ADDRESS";
    /// USERNAME (RFC 8489 §14.3).
    USERNAME = 0x0006, "USERNAME";
    /// MESSAGE-INTEGRITY (RFC 8489 §14.5).
    MESSAGE_INTEGRITY = 0x0008, "MESSAGE-INTEGRITY";
    /// ERROR-CODE (RFC 8489 §14.8).
    ERROR_CODE = 0x0009, "ERROR-CODE";
    /// UNKNOWN-ATTRIBUTES (RFC 8489 §14.13).
    UNKNOWN_ATTRIBUTES = 0x000A, "UNKNOWN-ATTRIBUTES";
    /// CHANNEL-NUMBER (RFC 8656 §18.1).
    CHANNEL_NUMBER = 0x000C, "CHANNEL-NUMBER";
    /// LIFETIME (RFC 8656 §18.2).
    LIFETIME = 0x000D, "LIFETIME";
    /// XOR-PEER-ADDRESS (RFC 8656 §18.3).
    XOR_PEER_ADDRESS = 0x0012, "XOR-PEER-ADDRESS";
    /// DATA (RFC 8656 §18.4).
    DATA = 0x0013, "DATA";
    /// REALM (RFC 8489 §14.9).
    REALM = 0x0014, "REALM";
    /// NONCE (RFC 8489 §14.10).
    NONCE = 0x0015, "NONCE";
    /// XOR-RELAYED-ADDRESS (RFC 8656 §18.5).
    XOR_RELAYED_ADDRESS = 0x0016, "XOR-RELAYED-ADDRESS";
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6).
    REQUESTED_ADDRESS_FAMILY = 0x0017, "REQUESTED-ADDRESS-FAMILY";
    /// EVEN-PORT (RFC 8656 §18.7).
    EVEN_PORT = 0x0018, "EVEN-PORT";
    /// REQUESTED-TRANSPORT (RFC 8656 §18.8).
    REQUESTED_TRANSPORT = 0x0019, "REQUESTED-TRANSPORT";
    /// DONT-FRAGMENT (RFC 8656 §18.9).
    DONT_FRAGMENT = 0x001A, "DONT-FRAGMENT";
    /// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6).
    MESSAGE_INTEGRITY_SHA256 = 0x001C, "MESSAGE-INTEGRITY-SHA256";
    /// PASSWORD-ALGORITHM (RFC 8489 §14.12).
    PASSWORD_ALGORITHM = 0x001D, "PASSWORD-ALGORITHM";
    /// USERHASH (RFC 8489 §14.4).
    USERHASH = 0x001E, "USERHASH";
    /// XOR-MAPPED-ADDRESS (RFC 8489 §14.2).
    XOR_MAPPED_ADDRESS = 0x0020, "XOR-MAPPED-ADDRESS";
    /// RESERVATION-TOKEN (RFC 8656 §18.10).
    RESERVATION_TOKEN = 0x0022, "RESERVATION-TOKEN";
    /// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11).
    ADDITIONAL_ADDRESS_FAMILY = 0x8000, "ADDITIONAL-ADDRESS-FAMILY";
    /// ADDRESS-ERROR-CODE (RFC 8656 §18.12).
    ADDRESS_ERROR_CODE = 0x8001, "ADDRESS-ERROR-CODE";
    /// PASSWORD-ALGORITHMS (RFC 8489 §14.11).
    PASSWORD_ALGORITHMS = 0x8002, "PASSWORD-ALGORITHMS";
    /// ALTERNATE-DOMAIN (RFC 8489 §14.16).
    ALTERNATE_DOMAIN = 0x8003, "ALTERNATE-DOMAIN";
    /// ICMP (RFC 8656 §18.13).
    ICMP = 0x8004, "ICMP";
    /// SOFTWARE (RFC 8489 §14.14).
    SOFTWARE = 0x8022, "SOFTWARE";
    /// ALTERNATE-SERVER (RFC 8489 §14.15).
    ALTERNATE_SERVER = 0x8023, "ALTERNATE-SERVER";
    /// FINGERPRINT (RFC 8489 §14.7).
    FINGERPRINT = 0x8028, "FINGERPRINT";
}

impl AttrType {
    /// Types 0x0000–0x7FFF must be understood or the request rejected (RFC 8489 §14).
    #[must_use]
    pub fn is_comprehension_required(self) -> bool {
        self.0 < 0x8000
    }

    /// Whether this implementation understands the type.
    #[must_use]
    pub fn is_known(self) -> bool {
        self.name().is_some()
    }
}

impl fmt::Debug for AttrType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "AttrType({:#06x})", self.0),
        }
    }
}

/// A typed attribute value: decoded from a borrowed slice, encoded by appending.
pub trait Attribute<'a>: Sized {
    /// The wire type.
    const TYPE: AttrType;
    /// Decodes the unpadded value. `tid` is needed by the XOR-address attributes.
    ///
    /// # Errors
    /// The value is malformed.
    fn decode(value: &'a [u8], tid: &TransactionId) -> Result<Self, DecodeError>;
    /// Appends the unpadded value.
    fn encode_value(&self, tid: &TransactionId, out: &mut Vec<u8>);
}

fn bad(attr: AttrType, what: &'static str) -> DecodeError {
    DecodeError::BadAttribute { attr: attr.0, what }
}

/// An address family value as used by REQUESTED-ADDRESS-FAMILY and friends (RFC 8656 §18.6).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct AddressFamily(pub u8);

impl AddressFamily {
    /// IPv4 (0x01).
    pub const IPV4: Self = Self(0x01);
    /// IPv6 (0x02).
    pub const IPV6: Self = Self(0x02);

    /// The family of an IP address.
    #[must_use]
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Self::IPV4
        } else {
            Self::IPV6
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses (RFC 8489 §14.1, §14.2)

fn decode_plain_address(typ: AttrType, v: &[u8]) -> Result<SocketAddr, DecodeError> {
    if v.len() < 4 {
        return Err(bad(typ, "shorter than 4 bytes"));
    }
    let port = u16::from_be_bytes([v[2], v[3]]);
    match (v[1], v.len()) {
        (0x01, 8) => Ok(SocketAddr::new(
            Ipv4Addr::new(v[4], v[5], v[6], v[7]).into(),
            port,
        )),
        (0x02, 20) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&v[4..20]);
            Ok(SocketAddr::new(Ipv6Addr::from(o).into(), port))
        }
        (0x01 | 0x02, _) => Err(bad(typ, "length does not match the family")),
        _ => Err(bad(typ, "unknown address family")),
    }
}

fn encode_plain_address(addr: SocketAddr, out: &mut Vec<u8>) {
    out.push(0);
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(0x01);
            out.extend_from_slice(&addr.port().to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(0x02);
            out.extend_from_slice(&addr.port().to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
    }
}

fn xor_mask(tid: &TransactionId) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[4..].copy_from_slice(&tid.0);
    m
}

fn xor_addr(addr: SocketAddr, tid: &TransactionId) -> SocketAddr {
    let mask = xor_mask(tid);
    #[allow(clippy::cast_possible_truncation)]
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    match addr.ip() {
        IpAddr::V4(ip) => {
            let mut o = ip.octets();
            for (b, m) in o.iter_mut().zip(mask) {
                *b ^= m;
            }
            SocketAddr::new(Ipv4Addr::from(o).into(), port)
        }
        IpAddr::V6(ip) => {
            let mut o = ip.octets();
            for (b, m) in o.iter_mut().zip(mask) {
                *b ^= m;
            }
            SocketAddr::new(Ipv6Addr::from(o).into(), port)
        }
    }
}

macro_rules! address_attr {
    ($(#[$m:meta])* $name:ident, $ty:expr, xor = $xor:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        pub struct $name(pub SocketAddr);

        impl<'a> Attribute<'a> for $name {
            const TYPE: AttrType = $ty;
            fn decode(value: &'a [u8], tid: &TransactionId) -> Result<Self, DecodeError> {
                let a = decode_plain_address(Self::TYPE, value)?;
                Ok(Self(if $xor { xor_addr(a, tid) } else { a }))
            }
            fn encode_value(&self, tid: &TransactionId, out: &mut Vec<u8>) {
                encode_plain_address(if $xor { xor_addr(self.0, tid) } else { self.0 }, out);
            }
        }
    };
}

address_attr!(
    /// MAPPED-ADDRESS (RFC 8489 §14.1).
    MappedAddress, AttrType::MAPPED_ADDRESS, xor = false);
address_attr!(
    /// XOR-MAPPED-ADDRESS (RFC 8489 §14.2).
    XorMappedAddress, AttrType::XOR_MAPPED_ADDRESS, xor = true);
address_attr!(
    /// XOR-PEER-ADDRESS (RFC 8656 §18.3).
    XorPeerAddress, AttrType::XOR_PEER_ADDRESS, xor = true);
address_attr!(
    /// XOR-RELAYED-ADDRESS (RFC 8656 §18.5).
    XorRelayedAddress, AttrType::XOR_RELAYED_ADDRESS, xor = true);
address_attr!(
    /// ALTERNATE-SERVER (RFC 8489 §14.15).
    AlternateServer, AttrType::ALTERNATE_SERVER, xor = false);

// ---------------------------------------------------------------------------------------------
// Strings and opaque values

macro_rules! text_attr {
    ($(#[$m:meta])* $name:ident, $ty:expr, max = $max:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        pub struct $name<'a>(pub &'a str);

        impl<'a> Attribute<'a> for $name<'a> {
            const TYPE: AttrType = $ty;
            fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
                if value.len() > $max {
                    return Err(bad(Self::TYPE, "too long"));
                }
                std::str::from_utf8(value).map(Self).map_err(|_| bad(Self::TYPE, "not UTF-8"))
            }
            fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
                out.extend_from_slice(self.0.as_bytes());
            }
        }
    };
}

text_attr!(
    /// USERNAME (RFC 8489 §14.3): at most 509 bytes of UTF-8.
    Username, AttrType::USERNAME, max = 509);
text_attr!(
    /// REALM (RFC 8489 §14.9): fewer than 128 characters (763 bytes).
    Realm, AttrType::REALM, max = 763);
text_attr!(
    /// NONCE (RFC 8489 §14.10): fewer than 128 characters (763 bytes).
    Nonce, AttrType::NONCE, max = 763);
text_attr!(
    /// SOFTWARE (RFC 8489 §14.14).
    Software, AttrType::SOFTWARE, max = 763);
text_attr!(
    /// ALTERNATE-DOMAIN (RFC 8489 §14.16).
    AlternateDomain, AttrType::ALTERNATE_DOMAIN, max = 255);

macro_rules! fixed_bytes_attr {
    ($(#[$m:meta])* $name:ident, $ty:expr, $len:literal, $what:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        pub struct $name<'a>(pub &'a [u8; $len]);

        impl<'a> Attribute<'a> for $name<'a> {
            const TYPE: AttrType = $ty;
            fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
                value.try_into().map(Self).map_err(|_| bad(Self::TYPE, $what))
            }
            fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
                out.extend_from_slice(self.0);
            }
        }
    };
}

fixed_bytes_attr!(
    /// USERHASH (RFC 8489 §14.4): SHA-256 of `username ":" realm`.
    UserHash, AttrType::USERHASH, 32, "length is not 32");

/// DATA (RFC 8656 §18.4).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Data<'a>(pub &'a [u8]);

impl<'a> Attribute<'a> for Data<'a> {
    const TYPE: AttrType = AttrType::DATA;
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        Ok(Self(value))
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(self.0);
    }
}

fixed_bytes_attr!(
    /// MESSAGE-INTEGRITY value (RFC 8489 §14.5). Written by
    /// [`super::MessageBuilder::add_message_integrity`]; decodable for inspection.
    MessageIntegrity, AttrType::MESSAGE_INTEGRITY, 20, "length is not 20");

/// MESSAGE-INTEGRITY-SHA256 value (RFC 8489 §14.6): 16 to 32 bytes, a multiple of 4.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MessageIntegritySha256<'a>(pub &'a [u8]);

impl<'a> Attribute<'a> for MessageIntegritySha256<'a> {
    const TYPE: AttrType = AttrType::MESSAGE_INTEGRITY_SHA256;
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        if (16..=32).contains(&value.len()) && value.len() % 4 == 0 {
            Ok(Self(value))
        } else {
            Err(bad(Self::TYPE, "length is not a multiple of 4 in 16..=32"))
        }
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(self.0);
    }
}

/// FINGERPRINT value (RFC 8489 §14.7).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Fingerprint(pub u32);

impl Attribute<'_> for Fingerprint {
    const TYPE: AttrType = AttrType::FINGERPRINT;
    fn decode(value: &[u8], _: &TransactionId) -> Result<Self, DecodeError> {
        let b: [u8; 4] = value
            .try_into()
            .map_err(|_| bad(Self::TYPE, "length is not 4"))?;
        Ok(Self(u32::from_be_bytes(b)))
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

fn decode_code(typ: AttrType, v: &[u8]) -> Result<ErrorCode, DecodeError> {
    let class = u16::from(v[2] & 0x07);
    let number = u16::from(v[3]);
    if !(3..=6).contains(&class) || number > 99 {
        return Err(bad(typ, "error code outside 300-699"));
    }
    Ok(ErrorCode(class * 100 + number))
}

/// The shared layout of ERROR-CODE and ADDRESS-ERROR-CODE: 2 bytes (reserved, or family and
/// reserved), class, number, then a UTF-8 reason phrase of at most 763 bytes.
fn decode_code_and_reason(typ: AttrType, v: &[u8]) -> Result<(ErrorCode, &str), DecodeError> {
    if v.len() < 4 || v.len() > 4 + 763 {
        return Err(bad(typ, "length outside 4..=767"));
    }
    let code = decode_code(typ, v)?;
    let reason = std::str::from_utf8(&v[4..]).map_err(|_| bad(typ, "reason not UTF-8"))?;
    Ok((code, reason))
}

fn encode_code(code: ErrorCode, out: &mut Vec<u8>) {
    #[allow(clippy::cast_possible_truncation)]
    {
        out.push((code.0 / 100) as u8 & 0x07);
        out.push((code.0 % 100) as u8);
    }
}

/// ERROR-CODE (RFC 8489 §14.8).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ErrorCodeAttr<'a> {
    /// The code, 300–699.
    pub code: ErrorCode,
    /// The reason phrase (may be empty).
    pub reason: &'a str,
}

impl<'a> Attribute<'a> for ErrorCodeAttr<'a> {
    const TYPE: AttrType = AttrType::ERROR_CODE;
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        let (code, reason) = decode_code_and_reason(Self::TYPE, value)?;
        Ok(Self { code, reason })
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0, 0]);
        encode_code(self.code, out);
        out.extend_from_slice(self.reason.as_bytes());
    }
}

/// UNKNOWN-ATTRIBUTES (RFC 8489 §14.13): the comprehension-required types not understood.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct UnknownAttributes {
    types: [AttrType; Self::MAX],
    len: usize,
}

impl UnknownAttributes {
    /// How many types one attribute carries here; more are dropped (the list is advisory).
    pub const MAX: usize = 16;

    /// Collects up to [`Self::MAX`] types.
    pub fn from_types(types: impl IntoIterator<Item = AttrType>) -> Self {
        let mut s = Self {
            types: [AttrType(0); Self::MAX],
            len: 0,
        };
        for t in types.into_iter().take(Self::MAX) {
            s.types[s.len] = t;
            s.len += 1;
        }
        s
    }

    /// The listed types.
    #[must_use]
    pub fn types(&self) -> &[AttrType] {
        &self.types[..self.len]
    }
}

impl Attribute<'_> for UnknownAttributes {
    const TYPE: AttrType = AttrType::UNKNOWN_ATTRIBUTES;
    fn decode(value: &[u8], _: &TransactionId) -> Result<Self, DecodeError> {
        if value.len() % 2 != 0 {
            return Err(bad(Self::TYPE, "odd length"));
        }
        Ok(Self::from_types(
            value
                .chunks_exact(2)
                .map(|c| AttrType(u16::from_be_bytes([c[0], c[1]]))),
        ))
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        for t in self.types() {
            out.extend_from_slice(&t.0.to_be_bytes());
        }
    }
}

/// ADDRESS-ERROR-CODE (RFC 8656 §18.12): why one family of a dual allocation failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AddressErrorCode<'a> {
    /// The family that failed.
    pub family: AddressFamily,
    /// The code.
    pub code: ErrorCode,
    /// The reason phrase.
    pub reason: &'a str,
}

impl<'a> Attribute<'a> for AddressErrorCode<'a> {
    const TYPE: AttrType = AttrType::ADDRESS_ERROR_CODE;
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        let (code, reason) = decode_code_and_reason(Self::TYPE, value)?;
        Ok(Self {
            family: AddressFamily(value[0]),
            code,
            reason,
        })
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.family.0, 0]);
        encode_code(self.code, out);
        out.extend_from_slice(self.reason.as_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// TURN scalars (RFC 8656 §18)

impl Attribute<'_> for ChannelNumber {
    const TYPE: AttrType = AttrType::CHANNEL_NUMBER;
    fn decode(value: &[u8], _: &TransactionId) -> Result<Self, DecodeError> {
        if value.len() != 4 {
            return Err(bad(Self::TYPE, "length is not 4"));
        }
        ChannelNumber::new(u16::from_be_bytes([value[0], value[1]]))
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.get().to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
}

/// LIFETIME in seconds (RFC 8656 §18.2).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Lifetime(pub u32);

impl Attribute<'_> for Lifetime {
    const TYPE: AttrType = AttrType::LIFETIME;
    fn decode(value: &[u8], _: &TransactionId) -> Result<Self, DecodeError> {
        let b: [u8; 4] = value
            .try_into()
            .map_err(|_| bad(Self::TYPE, "length is not 4"))?;
        Ok(Self(u32::from_be_bytes(b)))
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
    }
}

macro_rules! family_attr {
    ($(#[$m:meta])* $name:ident, $ty:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        pub struct $name(pub AddressFamily);

        impl Attribute<'_> for $name {
            const TYPE: AttrType = $ty;
            fn decode(value: &[u8], _: &TransactionId) -> Result<Self, DecodeError> {
                if value.len() != 4 {
                    return Err(bad(Self::TYPE, "length is not 4"));
                }
                Ok(Self(AddressFamily(value[0])))
            }
            fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
                out.extend_from_slice(&[self.0 .0, 0, 0, 0]);
            }
        }
    };
}

family_attr!(
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6).
    RequestedAddressFamily, AttrType::REQUESTED_ADDRESS_FAMILY);
family_attr!(
    /// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11): asks for a second, IPv6 relayed address.
    AdditionalAddressFamily, AttrType::ADDITIONAL_ADDRESS_FAMILY);

/// EVEN-PORT (RFC 8656 §18.7).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EvenPort {
    /// The R bit: also reserve the next-higher port.
    pub reserve: bool,
}

impl Attribute<'_> for EvenPort {
    const TYPE: AttrType = AttrType::EVEN_PORT;
    fn decode(value: &[u8], _: &TransactionId) -> Result<Self, DecodeError> {
        match value {
            [b] => Ok(Self {
                reserve: b & 0x80 != 0,
            }),
            _ => Err(bad(Self::TYPE, "length is not 1")),
        }
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.push(if self.reserve { 0x80 } else { 0 });
    }
}

/// REQUESTED-TRANSPORT (RFC 8656 §18.8): an IANA protocol number.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RequestedTransport(pub u8);

impl RequestedTransport {
    /// UDP (17).
    pub const UDP: Self = Self(17);
    /// TCP (6), RFC 6062.
    pub const TCP: Self = Self(6);
}

impl Attribute<'_> for RequestedTransport {
    const TYPE: AttrType = AttrType::REQUESTED_TRANSPORT;
    fn decode(value: &[u8], _: &TransactionId) -> Result<Self, DecodeError> {
        if value.len() != 4 {
            return Err(bad(Self::TYPE, "length is not 4"));
        }
        Ok(Self(value[0]))
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(&[self.0, 0, 0, 0]);
    }
}

/// DONT-FRAGMENT (RFC 8656 §18.9): no value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DontFragment;

impl Attribute<'_> for DontFragment {
    const TYPE: AttrType = AttrType::DONT_FRAGMENT;
    fn decode(value: &[u8], _: &TransactionId) -> Result<Self, DecodeError> {
        if value.is_empty() {
            Ok(Self)
        } else {
            Err(bad(Self::TYPE, "not empty"))
        }
    }
    fn encode_value(&self, _: &TransactionId, _: &mut Vec<u8>) {}
}

/// RESERVATION-TOKEN (RFC 8656 §18.10).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ReservationToken(pub [u8; 8]);

impl Attribute<'_> for ReservationToken {
    const TYPE: AttrType = AttrType::RESERVATION_TOKEN;
    fn decode(value: &[u8], _: &TransactionId) -> Result<Self, DecodeError> {
        value
            .try_into()
            .map(Self)
            .map_err(|_| bad(Self::TYPE, "length is not 8"))
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
}

/// ICMP (RFC 8656 §18.13): an ICMP error from a peer, carried in a Data indication.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Icmp {
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub code: u8,
    /// Error data (e.g. the MTU for "fragmentation needed").
    pub error_data: u32,
}

impl Attribute<'_> for Icmp {
    const TYPE: AttrType = AttrType::ICMP;
    fn decode(value: &[u8], _: &TransactionId) -> Result<Self, DecodeError> {
        if value.len() != 8 {
            return Err(bad(Self::TYPE, "length is not 8"));
        }
        Ok(Self {
            icmp_type: value[2],
            code: value[3],
            error_data: u32::from_be_bytes([value[4], value[5], value[6], value[7]]),
        })
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0, 0, self.icmp_type, self.code]);
        out.extend_from_slice(&self.error_data.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Password algorithms (RFC 8489 §14.11, §14.12, §18.5)

/// A password algorithm number (RFC 8489 §18.5).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct PasswordAlgorithmId(pub u16);

impl PasswordAlgorithmId {
    /// MD5 (0x0001): key = MD5(username:realm:password).
    pub const MD5: Self = Self(0x0001);
    /// SHA-256 (0x0002): key = SHA-256(username:realm:password).
    pub const SHA256: Self = Self(0x0002);
}

/// PASSWORD-ALGORITHM (RFC 8489 §14.12).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PasswordAlgorithm<'a> {
    /// The algorithm.
    pub algorithm: PasswordAlgorithmId,
    /// Its parameters (none for MD5 and SHA-256).
    pub params: &'a [u8],
}

impl<'a> Attribute<'a> for PasswordAlgorithm<'a> {
    const TYPE: AttrType = AttrType::PASSWORD_ALGORITHM;
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        if value.len() < 4 {
            return Err(bad(Self::TYPE, "shorter than 4 bytes"));
        }
        let plen = usize::from(u16::from_be_bytes([value[2], value[3]]));
        if value.len() != 4 + plen {
            return Err(bad(Self::TYPE, "parameter length does not match"));
        }
        Ok(Self {
            algorithm: PasswordAlgorithmId(u16::from_be_bytes([value[0], value[1]])),
            params: &value[4..],
        })
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.algorithm.0.to_be_bytes());
        let plen = u16::try_from(self.params.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&plen.to_be_bytes());
        out.extend_from_slice(self.params);
    }
}

/// PASSWORD-ALGORITHMS (RFC 8489 §14.11): the server's list, in preference order, which the
/// client echoes back so a downgrade can be detected.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PasswordAlgorithms<'a> {
    raw: &'a [u8],
}

impl<'a> PasswordAlgorithms<'a> {
    /// The list this server offers: SHA-256 first, then MD5, neither with parameters.
    pub const SERVER: PasswordAlgorithms<'static> = PasswordAlgorithms {
        raw: &[0x00, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00],
    };

    /// The raw value bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &'a [u8] {
        self.raw
    }

    /// The listed algorithms with their parameters.
    pub fn iter(&self) -> impl Iterator<Item = PasswordAlgorithm<'a>> + 'a {
        let raw = self.raw;
        let mut off = 0;
        std::iter::from_fn(move || {
            if off + 4 > raw.len() {
                return None;
            }
            let alg = PasswordAlgorithmId(u16::from_be_bytes([raw[off], raw[off + 1]]));
            let plen = usize::from(u16::from_be_bytes([raw[off + 2], raw[off + 3]]));
            let params = &raw[off + 4..off + 4 + plen];
            off += 4 + ((plen + 3) & !3);
            Some(PasswordAlgorithm {
                algorithm: alg,
                params,
            })
        })
    }
}

impl<'a> Attribute<'a> for PasswordAlgorithms<'a> {
    const TYPE: AttrType = AttrType::PASSWORD_ALGORITHMS;
    fn decode(value: &'a [u8], _: &TransactionId) -> Result<Self, DecodeError> {
        let mut off = 0;
        while off < value.len() {
            if off + 4 > value.len() {
                return Err(bad(Self::TYPE, "truncated entry"));
            }
            let plen = usize::from(u16::from_be_bytes([value[off + 2], value[off + 3]]));
            let next = off + 4 + ((plen + 3) & !3);
            if off + 4 + plen > value.len() || (next > value.len() && off + 4 + plen != value.len())
            {
                return Err(bad(Self::TYPE, "parameters overrun"));
            }
            off = next;
        }
        if value.is_empty() {
            return Err(bad(Self::TYPE, "empty list"));
        }
        Ok(Self { raw: value })
    }
    fn encode_value(&self, _: &TransactionId, out: &mut Vec<u8>) {
        out.extend_from_slice(self.raw);
    }
}
