//! The one request signer of turn-proto's tests: signs a request as a long-term-credential
//! client does (RFC 8489 §9.2), with USERNAME or USERHASH, MD5 or SHA-256 keys.

use crate::auth::{long_term_key_md5, long_term_key_sha256, user_hash};
use crate::codec::{
    MessageBuilder, Nonce, PasswordAlgorithm, PasswordAlgorithmId, PasswordAlgorithms, Realm,
    UserHash, Username,
};

/// How a request is signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signing {
    /// USERNAME, the MD5 key, MESSAGE-INTEGRITY.
    Md5,
    /// USERHASH instead of USERNAME, MESSAGE-INTEGRITY-SHA256 under the MD5 key.
    UserHash,
    /// USERNAME, PASSWORD-ALGORITHM(S) choosing SHA-256, the SHA-256 key,
    /// MESSAGE-INTEGRITY-SHA256.
    Sha256,
}

/// Adds the credential attributes and the integrity to `b` (call after the method's own
/// attributes, before FINGERPRINT).
pub fn sign(
    b: &mut MessageBuilder<'_>,
    how: Signing,
    user: &str,
    password: &str,
    realm: &str,
    nonce: &str,
) {
    match how {
        Signing::Md5 => {
            b.add(&Username(user)).add(&Realm(realm)).add(&Nonce(nonce));
            b.add_message_integrity(&long_term_key_md5(user, realm, password));
        }
        Signing::UserHash => {
            b.add(&UserHash(&user_hash(user, realm)))
                .add(&Realm(realm))
                .add(&Nonce(nonce));
            b.add_message_integrity_sha256(&long_term_key_md5(user, realm, password));
        }
        Signing::Sha256 => {
            b.add(&Username(user)).add(&Realm(realm)).add(&Nonce(nonce));
            b.add(&PasswordAlgorithms::SERVER);
            b.add(&PasswordAlgorithm {
                algorithm: PasswordAlgorithmId::SHA256,
                params: &[],
            });
            b.add_message_integrity_sha256(&long_term_key_sha256(user, realm, password));
        }
    }
}
