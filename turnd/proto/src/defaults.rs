//! The one home of every protocol default and cap. `ServerConfig::default()` is built from
//! these; the `turnd` config refers to them rather than repeating the numbers.

use std::time::Duration;

/// How long a nonce stays fresh before a 438 (coturn's `stale-nonce` default).
pub const NONCE_LIFETIME: Duration = Duration::from_secs(600);

/// Allocation lifetime when the client asks for none or for less: 10 minutes
/// (RFC 8656 §7.2).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);

/// The longest allocation lifetime granted: 1 hour (RFC 8656 §7.2).
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// Permission lifetime: 300 seconds (RFC 8656 §9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);

/// Channel binding lifetime: 10 minutes (RFC 8656 §12).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);

/// After a channel binding expires, its number and peer stay reserved this long: 5 minutes
/// (RFC 8656 §12).
pub const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

/// How long a port reserved by EVEN-PORT's R bit is held for its RESERVATION-TOKEN:
/// 30 seconds (RFC 8656 §7.2).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

/// How long an answer to a non-idempotent request is replayed to retransmissions: 40 s,
/// the client's whole retransmission span (RFC 8489 §6.3.1).
pub const TRANSACTION_LIFETIME: Duration = Duration::from_secs(40);

/// Most permissions one allocation may hold (508 beyond, RFC 8656 §9). The one cap on
/// permissions: a CreatePermission may carry as many peers as fit under it.
pub const MAX_PERMISSIONS_PER_ALLOCATION: usize = 64;

/// Most attributes a STUN message may carry; a request with more is answered 400. Leaves
/// room for a CreatePermission naming [`MAX_PERMISSIONS_PER_ALLOCATION`] peers and then some.
pub const MAX_ATTRIBUTES: usize = crate::codec::MAX_ATTRIBUTES;

/// Whether channel numbers 0x5000–0x7FFF are accepted besides RFC 8656 §12's 0x4000–0x4FFF:
/// yes. RFC 5766 allowed up to 0x7FFF and coturn, pion and restund still accept them; clients
/// that pick channel numbers at random (coturn's `turnutils_uclient`, 0x4000–0x7FFF) would
/// otherwise get 400 for three ChannelBinds in four. A TURN listener carries no DTLS-SRTP, so
/// RFC 7983's reason for the narrower range does not arise here. `false` is RFC 8656's range.
pub const RFC5766_CHANNEL_NUMBERS: bool = true;

/// The realm when none is configured.
pub const REALM: &str = "turnd";
