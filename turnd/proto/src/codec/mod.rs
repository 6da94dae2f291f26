//! Wire format: STUN messages (RFC 8489 §5–§15), the TURN attributes (RFC 8656 §18,
//! RFC 6156, RFC 8489 §14), ChannelData (RFC 8656 §12.4), stream framing (RFC 8656 §3.1)
//! and first-byte demultiplexing (RFC 7983 §7).
//!
//! Decoding borrows the packet: a [`Message`] is a validated view over the caller's bytes and
//! attribute values are slices of it. Encoding writes into a `Vec<u8>` the caller lends, so a
//! reused buffer allocates nothing.

mod attr;
mod channel_data;
mod demux;
mod error;
mod message;
mod method;

pub use attr::*;
pub use channel_data::{ChannelData, ChannelNumber};
pub use demux::{frame_len, Demux, FrameLen};
pub use error::DecodeError;
pub use message::{
    Message, MessageBuilder, RawAttribute, HEADER_LEN, MAGIC_COOKIE, MAX_ATTRIBUTES,
};
pub use method::{Class, ErrorCode, MessageType, Method, TransactionId};
