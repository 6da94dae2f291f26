//! First-byte demultiplexing (RFC 7983 §7) and stream framing (RFC 8656 §3.1, §12.5).

use super::message::HEADER_LEN;
use super::DecodeError;

/// What the first byte of a packet says it is (RFC 7983 §7, as updated by RFC 8656 §12).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Demux {
    /// 0–3: a STUN message.
    Stun,
    /// 64–79: TURN ChannelData.
    ChannelData,
    /// 20–63: DTLS.
    Dtls,
    /// 16–19: ZRTP.
    Zrtp,
    /// 128–191: RTP/RTCP.
    Rtp,
    /// Anything else: drop.
    Unknown,
}

impl Demux {
    /// Classifies by the first byte.
    #[must_use]
    pub fn classify(first: u8) -> Self {
        match first {
            0..=3 => Self::Stun,
            16..=19 => Self::Zrtp,
            20..=63 => Self::Dtls,
            64..=79 => Self::ChannelData,
            128..=191 => Self::Rtp,
            _ => Self::Unknown,
        }
    }
}

/// The outcome of looking for a frame at the start of a stream buffer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FrameLen {
    /// A whole frame of this many bytes (ChannelData including its padding) is buffered.
    Complete(usize),
    /// At least this many bytes in total are needed before the frame is complete.
    NeedMore(usize),
}

/// Finds the length of the first frame in a TURN-over-TCP/TLS byte stream: a STUN message
/// (20 + length) or a ChannelData message padded to a multiple of 4 (RFC 8656 §3.1, §12.5).
///
/// # Errors
/// The first byte is neither STUN nor ChannelData: the stream is garbage and must be closed.
pub fn frame_len(buf: &[u8]) -> Result<FrameLen, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(FrameLen::NeedMore(4));
    };
    let (hdr, total) = match Demux::classify(first) {
        Demux::Stun => {
            if buf.len() < 4 {
                return Ok(FrameLen::NeedMore(HEADER_LEN));
            }
            (
                HEADER_LEN,
                HEADER_LEN + usize::from(u16::from_be_bytes([buf[2], buf[3]])),
            )
        }
        // 80–127 are unassigned by RFC 7983; RFC 5766 clients put channels 0x5000–0x7FFF there.
        Demux::ChannelData | Demux::Unknown if (64..=127).contains(&first) => {
            if buf.len() < 4 {
                return Ok(FrameLen::NeedMore(4));
            }
            let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
            (4, (4 + len + 3) & !3)
        }
        _ => return Err(DecodeError::UnknownFirstByte(first)),
    };
    let need = total.max(hdr);
    if buf.len() >= need {
        Ok(FrameLen::Complete(need))
    } else {
        Ok(FrameLen::NeedMore(need))
    }
}
