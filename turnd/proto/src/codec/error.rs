use thiserror::Error;

/// Why bytes failed to decode. Each variant names what was wrong, so a dropped packet can be
/// counted and logged without guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the fixed header or the declared length needs.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The two most significant bits of a STUN message are not zero (RFC 8489 §5).
    #[error("first two bits of a STUN message are not zero")]
    NotStun,
    /// The magic cookie is not 0x2112A442 (RFC 8489 §5).
    #[error("bad magic cookie {0:#010x}")]
    BadMagicCookie(u32),
    /// The message length is not a multiple of four (RFC 8489 §5).
    #[error("message length {0} is not a multiple of 4")]
    UnalignedLength(u16),
    /// The datagram is longer than the header's length says (trailing bytes).
    #[error("{0} bytes after the end of the message")]
    TrailingBytes(usize),
    /// An attribute's value runs past the end of the message.
    #[error("attribute {attr:#06x} overruns the message")]
    AttributeOverrun {
        /// Attribute type.
        attr: u16,
    },
    /// An attribute follows FINGERPRINT, which must be last (RFC 8489 §14.7).
    #[error("attribute after FINGERPRINT")]
    AfterFingerprint,
    /// The message carries more attributes than this implementation accepts.
    #[error("more than {0} attributes")]
    TooManyAttributes(usize),
    /// An attribute value has the wrong size or content.
    #[error("attribute {attr:#06x} is malformed: {what}")]
    BadAttribute {
        /// Attribute type.
        attr: u16,
        /// What is wrong with it.
        what: &'static str,
    },
    /// A channel number is outside 0x4000–0x7FFF (RFC 8656 §12, RFC 5766 §11).
    #[error("channel number {0:#06x} is outside 0x4000-0x7FFF")]
    BadChannelNumber(u16),
    /// The first byte matches neither STUN nor ChannelData (RFC 7983).
    #[error("first byte {0} is neither STUN nor ChannelData")]
    UnknownFirstByte(u8),
}
