//! ChannelData messages (RFC 8656 §12.4).

use super::DecodeError;

/// A channel number, validated to 0x4000–0x7FFF: RFC 8656 §12 allows 0x4000–0x4FFF, RFC 5766
/// allowed up to 0x7FFF and older clients (coturn's `turnutils_uclient`) still pick numbers
/// there. Whether the wider range is accepted is the server's policy
/// ([`crate::server::ServerConfig::rfc5766_channel_numbers`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ChannelNumber(u16);

impl ChannelNumber {
    /// The lowest valid channel number.
    pub const MIN: u16 = 0x4000;
    /// The highest channel number of RFC 8656.
    pub const MAX: u16 = 0x4FFF;
    /// The highest channel number of RFC 5766.
    pub const MAX_RFC5766: u16 = 0x7FFF;

    /// Validates a channel number.
    ///
    /// # Errors
    /// [`DecodeError::BadChannelNumber`] outside 0x4000–0x7FFF.
    pub fn new(n: u16) -> Result<Self, DecodeError> {
        if (Self::MIN..=Self::MAX_RFC5766).contains(&n) {
            Ok(Self(n))
        } else {
            Err(DecodeError::BadChannelNumber(n))
        }
    }

    /// The number.
    #[must_use]
    pub fn get(self) -> u16 {
        self.0
    }

    /// Whether the number is inside RFC 8656's range 0x4000–0x4FFF.
    #[must_use]
    pub fn is_rfc8656(self) -> bool {
        self.0 <= Self::MAX
    }
}

/// A ChannelData message: a 4-byte header (channel number, length) and application data
/// (RFC 8656 §12.4). Borrowed from the packet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ChannelData<'a> {
    /// The channel.
    pub channel: ChannelNumber,
    /// The application data, without padding.
    pub data: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Length of the ChannelData header.
    pub const HEADER_LEN: usize = 4;

    /// Decodes a ChannelData message. Over UDP padding may be absent or present; over
    /// streams it is present (RFC 8656 §12.5). Bytes after length (+ padding) are refused.
    ///
    /// # Errors
    /// Short buffer, bad channel number, or a length that does not fit.
    pub fn decode(buf: &'a [u8]) -> Result<Self, DecodeError> {
        if buf.len() < Self::HEADER_LEN {
            return Err(DecodeError::Truncated {
                need: Self::HEADER_LEN,
                have: buf.len(),
            });
        }
        let channel = ChannelNumber::new(u16::from_be_bytes([buf[0], buf[1]]))?;
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        let end = Self::HEADER_LEN + len;
        if buf.len() < end {
            return Err(DecodeError::Truncated {
                need: end,
                have: buf.len(),
            });
        }
        let padded = (end + 3) & !3;
        if buf.len() != end && buf.len() != padded {
            return Err(DecodeError::TrailingBytes(buf.len() - end));
        }
        Ok(Self {
            channel,
            data: &buf[Self::HEADER_LEN..end],
        })
    }

    /// Writes the 4-byte header for `len` bytes of data on `channel` into `out[..4]`.
    /// The relay fast path writes the header in front of data already in place.
    pub fn write_header(channel: ChannelNumber, len: u16, out: &mut [u8; 4]) {
        out[..2].copy_from_slice(&channel.get().to_be_bytes());
        out[2..].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends the message to `out`; `pad` adds the 4-byte padding streams need.
    pub fn encode(&self, pad: bool, out: &mut Vec<u8>) {
        let len = u16::try_from(self.data.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&self.channel.get().to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.data[..usize::from(len)]);
        if pad {
            let n = (4 - usize::from(len) % 4) % 4;
            out.extend_from_slice(&[0u8; 3][..n]);
        }
    }
}
