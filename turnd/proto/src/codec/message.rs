//! The STUN message: header, attribute walk, integrity and fingerprint (RFC 8489 §5, §14.5–§14.7).

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use super::attr::{AttrType, Attribute};
use super::method::{MessageType, TransactionId};
use super::DecodeError;

/// The fixed magic cookie (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN header in bytes (RFC 8489 §5).
pub const HEADER_LEN: usize = 20;
/// The most attributes a message may carry before it is refused as abusive (the server
/// answers such a request 400). Every attribute lookup walks the message, so this bounds the
/// work per request.
pub const MAX_ATTRIBUTES: usize = 128;
/// XOR constant of FINGERPRINT (RFC 8489 §14.7).
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// A decoded STUN message: a validated, zero-copy view over the packet bytes
/// (RFC 8489 §5 and §14).
///
/// Attributes after MESSAGE-INTEGRITY are ignored except MESSAGE-INTEGRITY-SHA256 and
/// FINGERPRINT; attributes after MESSAGE-INTEGRITY-SHA256 are ignored except FINGERPRINT
/// (RFC 8489 §14.5, §14.6).
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    buf: &'a [u8],
    typ: MessageType,
    tid: TransactionId,
    integrity: Option<usize>,
    integrity_sha256: Option<usize>,
    fingerprint: Option<usize>,
}

/// One attribute as it appears on the wire: its type and its unpadded value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    /// The attribute type.
    pub typ: AttrType,
    /// The value, without padding.
    pub value: &'a [u8],
    /// Offset of the attribute header within the message.
    pub offset: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

impl<'a> Message<'a> {
    /// Decodes exactly one STUN message; `buf` must hold the whole message and nothing more
    /// (a UDP datagram, or one frame cut by [`super::frame_len`]).
    ///
    /// # Errors
    /// [`DecodeError`] naming the first thing that is wrong.
    pub fn decode(buf: &'a [u8]) -> Result<Self, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                need: HEADER_LEN,
                have: buf.len(),
            });
        }
        if buf[0] & 0xc0 != 0 {
            return Err(DecodeError::NotStun);
        }
        let cookie = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if cookie != MAGIC_COOKIE {
            return Err(DecodeError::BadMagicCookie(cookie));
        }
        let len = be16(buf, 2);
        if len % 4 != 0 {
            return Err(DecodeError::UnalignedLength(len));
        }
        let total = HEADER_LEN + usize::from(len);
        if buf.len() < total {
            return Err(DecodeError::Truncated {
                need: total,
                have: buf.len(),
            });
        }
        if buf.len() > total {
            return Err(DecodeError::TrailingBytes(buf.len() - total));
        }
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&buf[8..20]);
        let mut msg = Message {
            buf,
            typ: MessageType::from_u16(be16(buf, 0)),
            tid: TransactionId(tid),
            integrity: None,
            integrity_sha256: None,
            fingerprint: None,
        };
        let mut off = HEADER_LEN;
        let mut count = 0;
        while off < total {
            if msg.fingerprint.is_some() {
                return Err(DecodeError::AfterFingerprint);
            }
            count += 1;
            if count > MAX_ATTRIBUTES {
                return Err(DecodeError::TooManyAttributes(MAX_ATTRIBUTES));
            }
            if off + 4 > total {
                return Err(DecodeError::AttributeOverrun { attr: 0 });
            }
            let typ = be16(buf, off);
            let alen = usize::from(be16(buf, off + 2));
            let padded = (alen + 3) & !3;
            if off + 4 + padded > total {
                return Err(DecodeError::AttributeOverrun { attr: typ });
            }
            match AttrType(typ) {
                AttrType::MESSAGE_INTEGRITY => {
                    if alen != 20 {
                        return Err(DecodeError::BadAttribute {
                            attr: typ,
                            what: "length is not 20",
                        });
                    }
                    if msg.integrity.is_none() && msg.integrity_sha256.is_none() {
                        msg.integrity = Some(off);
                    }
                }
                AttrType::MESSAGE_INTEGRITY_SHA256 => {
                    if !(16..=32).contains(&alen) || alen % 4 != 0 {
                        return Err(DecodeError::BadAttribute {
                            attr: typ,
                            what: "length is not a multiple of 4 in 16..=32",
                        });
                    }
                    if msg.integrity_sha256.is_none() {
                        msg.integrity_sha256 = Some(off);
                    }
                }
                AttrType::FINGERPRINT => {
                    if alen != 4 {
                        return Err(DecodeError::BadAttribute {
                            attr: typ,
                            what: "length is not 4",
                        });
                    }
                    msg.fingerprint = Some(off);
                }
                _ => {}
            }
            off += 4 + padded;
        }
        Ok(msg)
    }

    /// The message type.
    #[must_use]
    pub fn typ(&self) -> MessageType {
        self.typ
    }

    /// The transaction id.
    #[must_use]
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    /// The whole message bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Whether MESSAGE-INTEGRITY is present.
    #[must_use]
    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some()
    }

    /// Whether MESSAGE-INTEGRITY-SHA256 is present.
    #[must_use]
    pub fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256.is_some()
    }

    /// Whether FINGERPRINT is present.
    #[must_use]
    pub fn has_fingerprint(&self) -> bool {
        self.fingerprint.is_some()
    }

    /// The attributes that count: everything up to the first integrity attribute, that
    /// attribute, MESSAGE-INTEGRITY-SHA256 after MESSAGE-INTEGRITY, and FINGERPRINT
    /// (RFC 8489 §14.5–§14.7). Others after integrity are skipped.
    pub fn attributes(&self) -> impl Iterator<Item = RawAttribute<'a>> + 'a {
        let buf = self.buf;
        let first_integrity = match (self.integrity, self.integrity_sha256) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sha = self.integrity_sha256;
        let mut off = HEADER_LEN;
        std::iter::from_fn(move || loop {
            if off >= buf.len() {
                return None;
            }
            let typ = AttrType(be16(buf, off));
            let alen = usize::from(be16(buf, off + 2));
            let here = off;
            off += 4 + ((alen + 3) & !3);
            let counts = match first_integrity {
                None => true,
                Some(fi) => here <= fi || Some(here) == sha || typ == AttrType::FINGERPRINT,
            };
            if counts {
                return Some(RawAttribute {
                    typ,
                    value: &buf[here + 4..here + 4 + alen],
                    offset: here,
                });
            }
        })
    }

    /// The first attribute of type `typ` that counts, as raw bytes.
    #[must_use]
    pub fn raw(&self, typ: AttrType) -> Option<RawAttribute<'a>> {
        self.attributes().find(|a| a.typ == typ)
    }

    /// The first attribute of type `A`, decoded. `Ok(None)` when absent.
    ///
    /// # Errors
    /// The attribute is present but malformed.
    pub fn get<A: Attribute<'a>>(&self) -> Result<Option<A>, DecodeError> {
        match self.raw(A::TYPE) {
            None => Ok(None),
            Some(raw) => A::decode(raw.value, &self.tid).map(Some),
        }
    }

    /// Every attribute of type `A`, decoded (e.g. several XOR-PEER-ADDRESS in one
    /// CreatePermission, RFC 8656 §10.1).
    pub fn get_all<A: Attribute<'a>>(&self) -> impl Iterator<Item = Result<A, DecodeError>> + 'a {
        let tid = self.tid;
        self.attributes()
            .filter(|a| a.typ == A::TYPE)
            .map(move |a| A::decode(a.value, &tid))
    }

    /// Comprehension-required attribute types this implementation does not understand
    /// (RFC 8489 §14, §7.3.1: answer 420 listing them).
    pub fn unknown_comprehension_required(&self) -> impl Iterator<Item = AttrType> + 'a {
        self.attributes()
            .map(|a| a.typ)
            .filter(|t| t.is_comprehension_required() && !t.is_known())
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5) against `key` in constant time.
    /// False when absent.
    #[must_use]
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        let Some(off) = self.integrity else {
            return false;
        };
        let Ok(mut mac) = <Hmac<Sha1> as Mac>::new_from_slice(key) else {
            return false;
        };
        self.feed_covered(off, 20, |d| mac.update(d));
        mac.verify_slice(&self.buf[off + 4..off + 24]).is_ok()
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6), possibly truncated, in constant time.
    /// False when absent.
    #[must_use]
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> bool {
        let Some(off) = self.integrity_sha256 else {
            return false;
        };
        let alen = usize::from(be16(self.buf, off + 2));
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
            return false;
        };
        self.feed_covered(off, alen, |d| mac.update(d));
        mac.verify_truncated_left(&self.buf[off + 4..off + 4 + alen])
            .is_ok()
    }

    /// Checks FINGERPRINT (RFC 8489 §14.7). False when absent.
    #[must_use]
    pub fn verify_fingerprint(&self) -> bool {
        let Some(off) = self.fingerprint else {
            return false;
        };
        let mut h = crc32fast::Hasher::new();
        self.feed_covered(off, 4, |d| h.update(d));
        let want = u32::from_be_bytes([
            self.buf[off + 4],
            self.buf[off + 5],
            self.buf[off + 6],
            self.buf[off + 7],
        ]);
        h.finalize() ^ FINGERPRINT_XOR == want
    }

    /// Feeds the bytes an integrity or fingerprint attribute at `off` covers: the message up to
    /// `off`, with the header length field rewritten to end just after that attribute.
    fn feed_covered(&self, off: usize, value_len: usize, mut f: impl FnMut(&[u8])) {
        let covered_len = u16::try_from(off + 4 + value_len - HEADER_LEN).unwrap_or(u16::MAX);
        f(&self.buf[0..2]);
        f(&covered_len.to_be_bytes());
        f(&self.buf[4..off]);
    }
}

/// Encodes a STUN message into a lent buffer (RFC 8489 §5, §14).
///
/// The message starts at the buffer's current end, so a stream writer can append several.
/// Call the `add_*` methods in wire order: ordinary attributes, then MESSAGE-INTEGRITY,
/// MESSAGE-INTEGRITY-SHA256, FINGERPRINT.
#[derive(Debug)]
pub struct MessageBuilder<'b> {
    out: &'b mut Vec<u8>,
    start: usize,
    tid: TransactionId,
    pad: u8,
}

impl<'b> MessageBuilder<'b> {
    /// Starts a message of type `typ` with transaction id `tid`.
    pub fn new(out: &'b mut Vec<u8>, typ: MessageType, tid: TransactionId) -> Self {
        let start = out.len();
        out.extend_from_slice(&typ.to_u16().to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        out.extend_from_slice(&tid.0);
        Self {
            out,
            start,
            tid,
            pad: 0,
        }
    }

    /// Sets the byte used for padding. Its content is arbitrary (RFC 8489 §14); the default is
    /// zero. Non-zero padding exists so the RFC 5769 vectors (padded with spaces) re-encode
    /// byte for byte.
    #[must_use]
    pub fn padding(mut self, byte: u8) -> Self {
        self.pad = byte;
        self
    }

    /// The transaction id being written.
    #[must_use]
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }

    fn set_len(&mut self, extra: usize) {
        let len = self.out.len() - self.start - HEADER_LEN + extra;
        let len = u16::try_from(len).unwrap_or(u16::MAX);
        self.out[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends a typed attribute.
    pub fn add<'x, A: Attribute<'x>>(&mut self, attr: &A) -> &mut Self {
        let hdr = self.out.len();
        self.out.extend_from_slice(&A::TYPE.0.to_be_bytes());
        self.out.extend_from_slice(&[0, 0]);
        attr.encode_value(&self.tid, self.out);
        self.finish_attr(hdr)
    }

    /// Appends an attribute from raw value bytes.
    pub fn add_raw(&mut self, typ: AttrType, value: &[u8]) -> &mut Self {
        let hdr = self.out.len();
        self.out.extend_from_slice(&typ.0.to_be_bytes());
        self.out.extend_from_slice(&[0, 0]);
        self.out.extend_from_slice(value);
        self.finish_attr(hdr)
    }

    fn finish_attr(&mut self, hdr: usize) -> &mut Self {
        let vlen = self.out.len() - hdr - 4;
        let v16 = u16::try_from(vlen).unwrap_or(u16::MAX);
        self.out[hdr + 2..hdr + 4].copy_from_slice(&v16.to_be_bytes());
        let padded = (vlen + 3) & !3;
        for _ in vlen..padded {
            self.out.push(self.pad);
        }
        self.set_len(0);
        self
    }

    /// Appends MESSAGE-INTEGRITY: HMAC-SHA1 under `key` (RFC 8489 §14.5).
    pub fn add_message_integrity(&mut self, key: &[u8]) -> &mut Self {
        self.set_len(24);
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        mac.update(&self.out[self.start..]);
        let tag = mac.finalize().into_bytes();
        self.out
            .extend_from_slice(&AttrType::MESSAGE_INTEGRITY.0.to_be_bytes());
        self.out.extend_from_slice(&20u16.to_be_bytes());
        self.out.extend_from_slice(&tag);
        self
    }

    /// Appends MESSAGE-INTEGRITY-SHA256: full 32-byte HMAC-SHA256 under `key` (RFC 8489 §14.6).
    pub fn add_message_integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        self.set_len(36);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        mac.update(&self.out[self.start..]);
        let tag = mac.finalize().into_bytes();
        self.out
            .extend_from_slice(&AttrType::MESSAGE_INTEGRITY_SHA256.0.to_be_bytes());
        self.out.extend_from_slice(&32u16.to_be_bytes());
        self.out.extend_from_slice(&tag);
        self
    }

    /// Appends FINGERPRINT (RFC 8489 §14.7). Must be last.
    pub fn add_fingerprint(&mut self) -> &mut Self {
        self.set_len(8);
        let crc = crc32fast::hash(&self.out[self.start..]) ^ FINGERPRINT_XOR;
        self.out
            .extend_from_slice(&AttrType::FINGERPRINT.0.to_be_bytes());
        self.out.extend_from_slice(&4u16.to_be_bytes());
        self.out.extend_from_slice(&crc.to_be_bytes());
        self
    }

    /// Finishes the message, returning its length in bytes.
    pub fn finish(self) -> usize {
        self.out.len() - self.start
    }
}
