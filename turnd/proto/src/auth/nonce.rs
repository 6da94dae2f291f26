//! Stateless nonces (RFC 8489 §9.2.2, §9.2.1 nonce cookie).
//!
//! A nonce is `obMatJos2` + base64 of the 24-bit security feature set + the issue time (8 hex
//! digits of UNIX seconds) + a truncated HMAC-SHA1 over the features, the time and the client's
//! transport address. The server therefore keeps no memory per unauthenticated client: a nonce
//! proves itself, and it goes stale once `lifetime` has passed (→ 438).

use std::net::SocketAddr;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// The nonce cookie prefix (RFC 8489 §9.2.1).
pub const NONCE_COOKIE: &[u8; 9] = b"obMatJos2";
/// Security feature bit: password algorithms (RFC 8489 §18.1). The RFC's bit numbering is
/// read least-significant first here, as its Appendix B.1 vector ("AAAC" with USERHASH) shows.
pub const FEATURE_PASSWORD_ALGORITHMS: u32 = 0x00_0001;
/// Security feature bit: username anonymity (USERHASH).
pub const FEATURE_USERNAME_ANONYMITY: u32 = 0x00_0002;

const MAC_LEN: usize = 16;
/// cookie 9 + features 4 + time 8 + base64url(16 bytes, unpadded) 22
const NONCE_LEN: usize = 9 + 4 + 8 + 22;

/// A nonce value in a fixed buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NonceValue {
    buf: [u8; NONCE_LEN],
}

impl NonceValue {
    /// The nonce text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written into the buffer.
        std::str::from_utf8(&self.buf).unwrap_or_default()
    }
}

impl std::fmt::Debug for NonceValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nonce({})", self.as_str())
    }
}

/// What checking a nonce found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NonceCheck {
    /// Issued by us for this client and still fresh; carries its security feature bits.
    Valid {
        /// The security feature set the nonce announced.
        features: u32,
    },
    /// Issued by us but older than the nonce lifetime.
    Stale,
    /// Not one of ours, or for another client address.
    Invalid,
}

/// Issues and checks stateless nonces.
#[derive(Clone)]
pub struct NonceIssuer {
    secret: [u8; 32],
    lifetime_secs: u64,
    features: u32,
}

impl std::fmt::Debug for NonceIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceIssuer")
            .field("lifetime_secs", &self.lifetime_secs)
            .finish()
    }
}

impl NonceIssuer {
    /// A new issuer keyed with `secret` (random per process; nonces do not survive a restart,
    /// clients simply get a 438 and retry).
    #[must_use]
    pub fn new(secret: [u8; 32], lifetime_secs: u64) -> Self {
        Self {
            secret,
            lifetime_secs,
            features: FEATURE_PASSWORD_ALGORITHMS | FEATURE_USERNAME_ANONYMITY,
        }
    }

    fn mac(&self, features: &[u8], time: &[u8], client: SocketAddr) -> [u8; 20] {
        let Ok(mut m) = <Hmac<Sha1> as Mac>::new_from_slice(&self.secret) else {
            unreachable!("HMAC accepts keys of any length")
        };
        m.update(features);
        m.update(time);
        match client.ip() {
            std::net::IpAddr::V4(ip) => m.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => m.update(&ip.octets()),
        }
        m.update(&client.port().to_be_bytes());
        m.finalize().into_bytes().into()
    }

    /// Issues a nonce for `client` at UNIX time `unix_now`.
    #[must_use]
    pub fn issue(&self, unix_now: u64, client: SocketAddr) -> NonceValue {
        let mut buf = [0u8; NONCE_LEN];
        buf[..9].copy_from_slice(NONCE_COOKIE);
        let f = self.features.to_be_bytes();
        let b64 = base64::engine::general_purpose::STANDARD;
        let _ = b64.encode_slice(&f[1..4], &mut buf[9..13]);
        #[allow(clippy::cast_possible_truncation)]
        let t = (unix_now as u32).to_be_bytes();
        for (i, b) in t.iter().enumerate() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            buf[13 + 2 * i] = HEX[usize::from(b >> 4)];
            buf[14 + 2 * i] = HEX[usize::from(b & 15)];
        }
        let mac = self.mac(&buf[9..13], &buf[13..21], client);
        let _ = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode_slice(&mac[..MAC_LEN], &mut buf[21..]);
        NonceValue { buf }
    }

    /// Checks a nonce a client echoed back.
    #[must_use]
    pub fn check(&self, nonce: &[u8], unix_now: u64, client: SocketAddr) -> NonceCheck {
        if nonce.len() != NONCE_LEN || &nonce[..9] != NONCE_COOKIE {
            return NonceCheck::Invalid;
        }
        let mut macbuf = [0u8; MAC_LEN + 2];
        let Ok(n) = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode_slice(&nonce[21..], &mut macbuf)
        else {
            return NonceCheck::Invalid;
        };
        if n != MAC_LEN {
            return NonceCheck::Invalid;
        }
        let want = self.mac(&nonce[9..13], &nonce[13..21], client);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            &want[..MAC_LEN],
            &macbuf[..MAC_LEN],
        )) {
            return NonceCheck::Invalid;
        }
        let Some(issued) = std::str::from_utf8(&nonce[13..21])
            .ok()
            .and_then(|s| u32::from_str_radix(s, 16).ok())
        else {
            return NonceCheck::Invalid;
        };
        let mut fbuf = [0u8; 4];
        let Ok(3) =
            base64::engine::general_purpose::STANDARD.decode_slice(&nonce[9..13], &mut fbuf[1..])
        else {
            return NonceCheck::Invalid;
        };
        // The issue time is 32 bits; compare modulo 2^32 so the year 2106 is not a cliff.
        #[allow(clippy::cast_possible_truncation)]
        let age = (unix_now as u32).wrapping_sub(issued);
        if u64::from(age) >= self.lifetime_secs {
            return NonceCheck::Stale;
        }
        NonceCheck::Valid {
            features: u32::from_be_bytes(fbuf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rfc8489_9_2_2_nonce_is_fresh_then_stale() {
        let n = NonceIssuer::new([7; 32], 600);
        let c = addr("192.0.2.1:5000");
        let v = n.issue(1_000_000, c);
        assert!(v.as_str().starts_with("obMatJos2AAAD"), "{v:?}");
        assert!(v.as_str().len() < 128);
        assert_eq!(
            n.check(v.as_str().as_bytes(), 1_000_599, c),
            NonceCheck::Valid { features: 3 }
        );
        assert_eq!(
            n.check(v.as_str().as_bytes(), 1_000_600, c),
            NonceCheck::Stale
        );
    }

    #[test]
    fn nonce_is_bound_to_client_address_and_secret() {
        let n = NonceIssuer::new([7; 32], 600);
        let v = n.issue(10, addr("192.0.2.1:5000"));
        assert_eq!(
            n.check(v.as_str().as_bytes(), 10, addr("192.0.2.1:5001")),
            NonceCheck::Invalid
        );
        let other = NonceIssuer::new([8; 32], 600);
        assert_eq!(
            other.check(v.as_str().as_bytes(), 10, addr("192.0.2.1:5000")),
            NonceCheck::Invalid
        );
        let mut forged = *v.as_str().as_bytes().first_chunk::<43>().unwrap();
        forged[20] ^= 1; // change the time
        assert_eq!(
            n.check(&forged, 10, addr("192.0.2.1:5000")),
            NonceCheck::Invalid
        );
        assert_eq!(
            n.check(b"garbage", 10, addr("192.0.2.1:5000")),
            NonceCheck::Invalid
        );
    }
}
