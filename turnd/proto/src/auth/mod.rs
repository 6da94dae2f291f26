//! Authentication: long-term credentials (RFC 8489 §9.2), TURN REST API ephemeral credentials
//! (draft-uberti-behave-turn-rest-00, as coturn's `use-auth-secret`), password algorithms
//! (RFC 8489 §9.2.4, §14.11, §14.12), USERHASH (§14.4) and stateless nonces with the nonce
//! cookie (§9.2.1).
//!
//! Everything here is a synchronous lookup over in-memory data; MACs are compared in constant
//! time (the `hmac` crate's `verify_*` and `subtle`).

mod nonce;

use std::collections::HashMap;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use sha1::Sha1;
use sha2::Sha256;

pub use nonce::{
    NonceCheck, NonceIssuer, NonceValue, FEATURE_PASSWORD_ALGORITHMS, FEATURE_USERNAME_ANONYMITY,
    NONCE_COOKIE,
};

use crate::codec::PasswordAlgorithmId;

fn hash_triple<D: md5::Digest>(mut h: D, a: &str, b: &str, c: Option<&str>) -> D {
    h.update(a.as_bytes());
    h.update(b":");
    h.update(b.as_bytes());
    if let Some(c) = c {
        h.update(b":");
        h.update(c.as_bytes());
    }
    h
}

/// The long-term key for MESSAGE-INTEGRITY: `MD5(username ":" realm ":" password)`
/// (RFC 8489 §9.2.2). The same 16 bytes `turnadmin -k` prints in hex.
#[must_use]
pub fn long_term_key_md5(username: &str, realm: &str, password: &str) -> [u8; 16] {
    hash_triple(Md5::new(), username, realm, Some(password))
        .finalize()
        .into()
}

/// The long-term key under PASSWORD-ALGORITHM SHA-256:
/// `SHA-256(username ":" realm ":" password)` (RFC 8489 §9.2.2, §18.5).
#[must_use]
pub fn long_term_key_sha256(username: &str, realm: &str, password: &str) -> [u8; 32] {
    hash_triple(Sha256::new(), username, realm, Some(password))
        .finalize()
        .into()
}

/// USERHASH value: `SHA-256(username ":" realm)` (RFC 8489 §14.4).
#[must_use]
pub fn user_hash(username: &str, realm: &str) -> [u8; 32] {
    hash_triple(Sha256::new(), username, realm, None)
        .finalize()
        .into()
}

/// The TURN REST API password for `username`: `base64(HMAC-SHA1(secret, username))`.
#[must_use]
pub fn rest_api_password(secret: &[u8], username: &str) -> String {
    let Ok(mut mac) = <Hmac<Sha1> as Mac>::new_from_slice(secret) else {
        unreachable!("HMAC accepts keys of any length")
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Parses a TURN REST API username, `<unix-expiry>[:<user>]` (also `<user>:<unix-expiry>`, which
/// coturn accepts), returning the expiry in UNIX seconds. `None` when no part is a timestamp.
#[must_use]
pub fn rest_api_expiry(username: &str) -> Option<u64> {
    let first = username.split(':').next()?;
    if let Ok(t) = first.parse::<u64>() {
        return Some(t);
    }
    username.rsplit(':').next()?.parse::<u64>().ok()
}

/// A long-term key, under the algorithm that derived it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LongTermKey {
    /// MD5(username:realm:password), RFC 8489 §18.5.1.1.
    Md5([u8; 16]),
    /// SHA-256(username:realm:password), RFC 8489 §18.5.1.2.
    Sha256([u8; 32]),
}

impl LongTermKey {
    /// The key bytes for the HMAC.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Md5(k) => k,
            Self::Sha256(k) => k,
        }
    }
}

impl std::fmt::Debug for LongTermKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Md5(_) => "LongTermKey::Md5(..)",
            Self::Sha256(_) => "LongTermKey::Sha256(..)",
        })
    }
}

/// How a static user's secret is configured.
#[derive(Clone, PartialEq, Eq)]
pub enum UserSecret {
    /// A plaintext password: both MD5 and SHA-256 keys can be derived.
    Password(String),
    /// The MD5 key as `turnadmin -k` prints it: only the MD5 algorithm is possible.
    Md5Key([u8; 16]),
}

impl std::fmt::Debug for UserSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Password(_) => "UserSecret::Password(..)",
            Self::Md5Key(_) => "UserSecret::Md5Key(..)",
        })
    }
}

#[derive(Clone)]
struct StaticUser {
    md5: [u8; 16],
    sha256: Option<[u8; 32]>,
}

/// Why credentials were refused. Each maps to a 401 in the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CredentialError {
    /// No static user of that name and the name is not a REST API username.
    UnknownUser,
    /// A REST API username whose expiry has passed.
    Expired,
    /// The algorithm cannot be used for this user (SHA-256 with a configured MD5 key).
    AlgorithmUnavailable,
}

/// The credential store: static users and TURN REST API shared secrets, for one realm.
///
/// REST API credentials are accepted under every configured secret, so a secret can be
/// rotated by adding the new one, rolling clients over, then removing the old one.
#[derive(Clone, Default)]
pub struct Credentials {
    realm: String,
    users: HashMap<String, StaticUser>,
    by_hash: HashMap<[u8; 32], String>,
    secrets: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("realm", &self.realm)
            .field("users", &self.users.len())
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

/// The candidate keys for one request: one for a static user, one per secret for REST API
/// usernames. Fixed capacity, so a lookup does not allocate.
#[derive(Debug, Clone)]
pub struct CandidateKeys {
    keys: [Option<LongTermKey>; Self::MAX],
}

impl CandidateKeys {
    /// At most this many REST API secrets are tried.
    pub const MAX: usize = 8;

    /// The keys to try, in order.
    pub fn iter(&self) -> impl Iterator<Item = &LongTermKey> {
        self.keys.iter().flatten()
    }
}

impl Credentials {
    /// An empty store for `realm`.
    #[must_use]
    pub fn new(realm: impl Into<String>) -> Self {
        Self {
            realm: realm.into(),
            ..Self::default()
        }
    }

    /// The realm.
    #[must_use]
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Adds (or replaces) a static user.
    pub fn add_user(&mut self, name: impl Into<String>, secret: &UserSecret) {
        let name = name.into();
        let user = match secret {
            UserSecret::Password(p) => StaticUser {
                md5: long_term_key_md5(&name, &self.realm, p),
                sha256: Some(long_term_key_sha256(&name, &self.realm, p)),
            },
            UserSecret::Md5Key(k) => StaticUser {
                md5: *k,
                sha256: None,
            },
        };
        self.by_hash
            .insert(user_hash(&name, &self.realm), name.clone());
        self.users.insert(name, user);
    }

    /// Adds a TURN REST API shared secret. At most [`CandidateKeys::MAX`] are used.
    pub fn add_secret(&mut self, secret: impl Into<Vec<u8>>) {
        self.secrets.push(secret.into());
    }

    /// Whether any credential is configured.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.secrets.is_empty()
    }

    /// The static user whose USERHASH is `hash` (RFC 8489 §14.4).
    #[must_use]
    pub fn username_for_hash(&self, hash: &[u8; 32]) -> Option<&str> {
        self.by_hash.get(hash).map(String::as_str)
    }

    /// The keys under which a request from `username` may verify, at UNIX time `unix_now`.
    ///
    /// # Errors
    /// Unknown user, expired REST credential, or an algorithm the user cannot use.
    pub fn keys(
        &self,
        username: &str,
        algorithm: PasswordAlgorithmId,
        unix_now: u64,
    ) -> Result<CandidateKeys, CredentialError> {
        let mut out = CandidateKeys {
            keys: [None; CandidateKeys::MAX],
        };
        if let Some(u) = self.users.get(username) {
            out.keys[0] = Some(match algorithm {
                PasswordAlgorithmId::SHA256 => {
                    LongTermKey::Sha256(u.sha256.ok_or(CredentialError::AlgorithmUnavailable)?)
                }
                _ => LongTermKey::Md5(u.md5),
            });
            return Ok(out);
        }
        if self.secrets.is_empty() {
            return Err(CredentialError::UnknownUser);
        }
        let expiry = rest_api_expiry(username).ok_or(CredentialError::UnknownUser)?;
        if expiry < unix_now {
            return Err(CredentialError::Expired);
        }
        for (slot, secret) in out.keys.iter_mut().zip(&self.secrets) {
            let password = rest_api_password(secret, username);
            *slot = Some(match algorithm {
                PasswordAlgorithmId::SHA256 => {
                    LongTermKey::Sha256(long_term_key_sha256(username, &self.realm, &password))
                }
                _ => LongTermKey::Md5(long_term_key_md5(username, &self.realm, &password)),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turnadmin_key_matches_known_value() {
        // `turnadmin -k -u ninefingers -r north.gov -p youhavetoberealistic` prints
        // 0xbc807ee29df3c9ffa736523fb2c4e8ee (coturn's documentation example).
        let k = long_term_key_md5("ninefingers", "north.gov", "youhavetoberealistic");
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "bc807ee29df3c9ffa736523fb2c4e8ee");
    }

    #[test]
    fn rest_username_forms() {
        assert_eq!(rest_api_expiry("1700000000:alice"), Some(1_700_000_000));
        assert_eq!(rest_api_expiry("1700000000"), Some(1_700_000_000));
        assert_eq!(rest_api_expiry("alice:1700000000"), Some(1_700_000_000));
        assert_eq!(rest_api_expiry("alice"), None);
        assert_eq!(rest_api_expiry("alice:bob"), None);
    }

    #[test]
    fn rest_credentials_verify_under_every_secret_until_expiry() {
        let mut c = Credentials::new("example.org");
        c.add_secret(b"old".to_vec());
        c.add_secret(b"new".to_vec());
        let user = "2000:alice";
        let keys = c.keys(user, PasswordAlgorithmId::MD5, 1000).unwrap();
        let want_new = long_term_key_md5(user, "example.org", &rest_api_password(b"new", user));
        let want_old = long_term_key_md5(user, "example.org", &rest_api_password(b"old", user));
        let got: Vec<_> = keys.iter().copied().collect();
        assert_eq!(
            got,
            vec![LongTermKey::Md5(want_old), LongTermKey::Md5(want_new)]
        );
        assert_eq!(
            c.keys(user, PasswordAlgorithmId::MD5, 2001).unwrap_err(),
            CredentialError::Expired
        );
        assert_eq!(
            c.keys("bob", PasswordAlgorithmId::MD5, 0).unwrap_err(),
            CredentialError::UnknownUser
        );
    }

    #[test]
    fn static_user_with_md5_key_cannot_use_sha256() {
        let mut c = Credentials::new("r");
        c.add_user("u", &UserSecret::Md5Key([1; 16]));
        c.add_user("p", &UserSecret::Password("pw".into()));
        assert_eq!(
            c.keys("u", PasswordAlgorithmId::SHA256, 0).unwrap_err(),
            CredentialError::AlgorithmUnavailable
        );
        let k = c.keys("p", PasswordAlgorithmId::SHA256, 0).unwrap();
        assert_eq!(
            k.iter().next(),
            Some(&LongTermKey::Sha256(long_term_key_sha256("p", "r", "pw")))
        );
        assert_eq!(c.username_for_hash(&user_hash("p", "r")), Some("p"));
    }
}
