//! Message types (RFC 8489 §5), methods (RFC 8489 §18.2, RFC 8656 §17), transaction ids and
//! error codes (RFC 8489 §18.3, RFC 8656 §18).

use std::fmt;

/// A STUN method (12 bits). A newtype so unknown methods survive a round trip.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Method(pub u16);

impl Method {
    /// Binding (RFC 8489 §18.2).
    pub const BINDING: Self = Self(0x001);
    /// Allocate (RFC 8656 §17).
    pub const ALLOCATE: Self = Self(0x003);
    /// Refresh (RFC 8656 §17).
    pub const REFRESH: Self = Self(0x004);
    /// Send, an indication (RFC 8656 §17).
    pub const SEND: Self = Self(0x006);
    /// Data, an indication (RFC 8656 §17).
    pub const DATA: Self = Self(0x007);
    /// CreatePermission (RFC 8656 §17).
    pub const CREATE_PERMISSION: Self = Self(0x008);
    /// ChannelBind (RFC 8656 §17).
    pub const CHANNEL_BIND: Self = Self(0x009);

    /// A short stable name, for logs and metric labels.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::BINDING => "binding",
            Self::ALLOCATE => "allocate",
            Self::REFRESH => "refresh",
            Self::SEND => "send",
            Self::DATA => "data",
            Self::CREATE_PERMISSION => "create_permission",
            Self::CHANNEL_BIND => "channel_bind",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            "unknown" => write!(f, "Method({:#05x})", self.0),
            n => f.write_str(n),
        }
    }
}

/// The class of a message (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A request: expects a response.
    Request,
    /// An indication: no response.
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

/// Method plus class, as packed into the 14-bit message type field (RFC 8489 §5, Figure 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageType {
    /// The method.
    pub method: Method,
    /// The class.
    pub class: Class,
}

impl MessageType {
    /// A new message type.
    #[must_use]
    pub const fn new(method: Method, class: Class) -> Self {
        Self { method, class }
    }

    /// Unpacks the 16-bit field (the top two bits must already be known to be zero).
    #[must_use]
    pub fn from_u16(v: u16) -> Self {
        let m = (v & 0x000f) | ((v & 0x00e0) >> 1) | ((v & 0x3e00) >> 2);
        let class = match ((v >> 7) & 0b10) | ((v >> 4) & 0b01) {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        };
        Self {
            method: Method(m),
            class,
        }
    }

    /// Packs into the 16-bit field.
    #[must_use]
    pub fn to_u16(self) -> u16 {
        let m = self.method.0 & 0x0fff;
        let c: u16 = match self.class {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        };
        (m & 0x000f)
            | ((m & 0x0070) << 1)
            | ((m & 0x0f80) << 2)
            | ((c & 0b01) << 4)
            | ((c & 0b10) << 7)
    }
}

/// The 96-bit transaction id (RFC 8489 §5, §6.3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TransactionId(pub [u8; 12]);

impl fmt::Debug for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TransactionId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// An error code (RFC 8489 §14.8): a newtype over the number so any code round-trips.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// 300 Try Alternate (RFC 8489 §10).
    pub const TRY_ALTERNATE: Self = Self(300);
    /// 400 Bad Request.
    pub const BAD_REQUEST: Self = Self(400);
    /// 401 Unauthenticated (RFC 8489 §9.2.4).
    pub const UNAUTHENTICATED: Self = Self(401);
    /// 403 Forbidden (RFC 8656 §18).
    pub const FORBIDDEN: Self = Self(403);
    /// 420 Unknown Attribute.
    pub const UNKNOWN_ATTRIBUTE: Self = Self(420);
    /// 437 Allocation Mismatch (RFC 8656 §18).
    pub const ALLOCATION_MISMATCH: Self = Self(437);
    /// 438 Stale Nonce (RFC 8489 §9.2.4).
    pub const STALE_NONCE: Self = Self(438);
    /// 440 Address Family not Supported (RFC 8656 §18).
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: Self = Self(440);
    /// 441 Wrong Credentials (RFC 8656 §18).
    pub const WRONG_CREDENTIALS: Self = Self(441);
    /// 442 Unsupported Transport Protocol (RFC 8656 §18).
    pub const UNSUPPORTED_TRANSPORT_PROTOCOL: Self = Self(442);
    /// 443 Peer Address Family Mismatch (RFC 8656 §18).
    pub const PEER_ADDRESS_FAMILY_MISMATCH: Self = Self(443);
    /// 486 Allocation Quota Reached (RFC 8656 §18).
    pub const ALLOCATION_QUOTA_REACHED: Self = Self(486);
    /// 500 Server Error.
    pub const SERVER_ERROR: Self = Self(500);
    /// 508 Insufficient Capacity (RFC 8656 §18).
    pub const INSUFFICIENT_CAPACITY: Self = Self(508);

    /// The RFC's recommended reason phrase.
    #[must_use]
    pub fn reason_phrase(self) -> &'static str {
        match self.0 {
            300 => "Try Alternate",
            400 => "Bad Request",
            401 => "Unauthenticated",
            403 => "Forbidden",
            420 => "Unknown Attribute",
            437 => "Allocation Mismatch",
            438 => "Stale Nonce",
            440 => "Address Family not Supported",
            441 => "Wrong Credentials",
            442 => "Unsupported Transport Protocol",
            443 => "Peer Address Family Mismatch",
            486 => "Allocation Quota Reached",
            500 => "Server Error",
            508 => "Insufficient Capacity",
            _ => "",
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.0, self.reason_phrase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_packing_matches_rfc8489_figure_3() {
        // Binding request 0x0001, success 0x0101, error 0x0111, Allocate request 0x0003,
        // Send indication 0x0016, Data indication 0x0017.
        let cases = [
            (Method::BINDING, Class::Request, 0x0001),
            (Method::BINDING, Class::Success, 0x0101),
            (Method::BINDING, Class::Error, 0x0111),
            (Method::ALLOCATE, Class::Request, 0x0003),
            (Method::ALLOCATE, Class::Error, 0x0113),
            (Method::SEND, Class::Indication, 0x0016),
            (Method::DATA, Class::Indication, 0x0017),
            (Method::CHANNEL_BIND, Class::Success, 0x0109),
        ];
        for (m, c, v) in cases {
            assert_eq!(MessageType::new(m, c).to_u16(), v, "{m:?} {c:?}");
            assert_eq!(MessageType::from_u16(v), MessageType::new(m, c));
        }
    }

    #[test]
    fn every_method_and_class_round_trips() {
        for m in 0..0x1000u16 {
            for c in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                let t = MessageType::new(Method(m), c);
                assert_eq!(MessageType::from_u16(t.to_u16()), t);
                assert_eq!(t.to_u16() & 0xc000, 0);
            }
        }
    }
}
