//! Authentication: long-term credentials (RFC 8489 §9.2), TURN REST API ephemeral
//! credentials (draft-uberti-behave-turn-rest-00), and stateless nonces (RFC 8489 §9.2.2).

use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use sha1::Sha1;
use sha2::Sha256;

/// The long-term key for MESSAGE-INTEGRITY: `MD5(username ":" realm ":" password)`
/// (RFC 8489 §9.2.2). The same 16 bytes `turnadmin -k` prints in hex.
#[must_use]
pub fn long_term_key_md5(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// The long-term key for MESSAGE-INTEGRITY-SHA256 with PASSWORD-ALGORITHM SHA-256:
/// `SHA-256(username ":" realm ":" password)` (RFC 8489 §18.5.1.2).
#[must_use]
pub fn long_term_key_sha256(username: &str, realm: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// The TURN REST API password for `username`: `base64(HMAC-SHA1(secret, username))`.
#[must_use]
pub fn rest_api_password(secret: &[u8], username: &str) -> String {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// USERHASH value: `SHA-256(username ":" realm)` (RFC 8489 §14.4).
#[must_use]
pub fn user_hash(username: &str, realm: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.finalize().into()
}
