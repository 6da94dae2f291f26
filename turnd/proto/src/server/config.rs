//! The server's tunables: [`ServerConfig`] and the [`ServiceMode`].

use std::time::Duration;

use super::policy::PeerPolicy;
use crate::auth::Credentials;
use crate::defaults;

/// What the server serves (coturn's and eturnal's `stun-only` and `no-stun`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum ServiceMode {
    /// STUN Binding and TURN (the default).
    #[default]
    Turn,
    /// STUN Binding only: every TURN request (Allocate, Refresh, CreatePermission, ChannelBind) is
    /// answered 400 with [`Reject::MethodNotServed`](super::Reject::MethodNotServed) and a reason
    /// phrase. coturn's `stun-only` ignores them silently; we answer, so a client fails at once
    /// instead of after its retransmission timeout, and the refusal is counted.
    StunOnly,
    /// TURN only: a Binding request without MESSAGE-INTEGRITY is answered 400 with
    /// [`Reject::MethodNotServed`](super::Reject::MethodNotServed) (it is not challenged: a 401
    /// would be a larger answer to an anonymous request); one with a valid long-term credential is
    /// answered, signed. coturn's `no-stun` ignores every Binding request silently. Binding
    /// indications (keepalives) are ignored as always.
    NoStun,
}

/// Tunables of the server (RFC 8656 §7–§12 name the defaults; [`crate::defaults`] holds
/// them).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Users, REST API secrets and the realm.
    pub credentials: Credentials,
    /// Key for stateless nonces; random per process.
    pub nonce_secret: [u8; 32],
    /// How long a nonce stays fresh before a 438 (coturn's `stale-nonce`, default 600 s).
    pub nonce_lifetime: Duration,
    /// Allocation lifetime when the client asks for none or for less (600 s, RFC 8656 §7.2).
    pub default_lifetime: Duration,
    /// The longest allocation lifetime granted (3600 s, RFC 8656 §7.2).
    pub max_lifetime: Duration,
    /// Permission lifetime (300 s, RFC 8656 §9).
    pub permission_lifetime: Duration,
    /// Channel binding lifetime (600 s, RFC 8656 §12).
    pub channel_lifetime: Duration,
    /// How long a reserved (EVEN-PORT R bit) port is held (30 s, RFC 8656 §7.2).
    pub reservation_lifetime: Duration,
    /// How long a non-idempotent answer is replayed for a retransmission (40 s, RFC 8489 §6.3.1).
    pub transaction_lifetime: Duration,
    /// Whether the IO layer can relay over IPv4.
    pub relay_ipv4: bool,
    /// Whether the IO layer can relay over IPv6.
    pub relay_ipv6: bool,
    /// Which peers may be reached.
    pub policy: PeerPolicy,
    /// Most permissions one allocation may hold (RFC 8656 §10.2: 508 beyond). The one
    /// permission cap: CreatePermission and ChannelBind both check it, nothing else.
    pub max_permissions_per_allocation: usize,
    /// SOFTWARE sent to authenticated clients only; `None` sends nothing.
    pub software: Option<String>,
    /// Also accept channel numbers 0x5000–0x7FFF, which RFC 5766 allowed and RFC 8656
    /// reserved; coturn's `turnutils_uclient` still uses them. On by default
    /// ([`defaults::RFC5766_CHANNEL_NUMBERS`]); `false` keeps RFC 8656's 0x4000–0x4FFF.
    pub rfc5766_channel_numbers: bool,
    /// What the server serves.
    pub mode: ServiceMode,
    /// Most 401/438 challenges answered per second to one source (an IPv4 address, or an IPv6 /64),
    /// with a burst of one second's worth; beyond it the request is dropped and counted as
    /// [`DropReason::ChallengeRateLimited`](super::DropReason::ChallengeRateLimited). `None` (the
    /// default) sets no limit. The state is a fixed table of token buckets indexed by a keyed hash
    /// of the source (4096 slots, 64 KiB): memory never grows with the number of sources, and
    /// sources that share a slot share its budget.
    pub challenges_per_source_per_second: Option<u32>,
    /// The name in the certificate of the alternate servers a drain redirects to, when it
    /// differs from ours: sent in ALTERNATE-DOMAIN with the 300 to TLS clients that
    /// authenticated with MESSAGE-INTEGRITY-SHA256, as RFC 8489 §10 requires. `None` when the
    /// alternates share our certificate.
    pub alternate_domain: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            credentials: Credentials::new(defaults::REALM),
            nonce_secret: [0; 32],
            nonce_lifetime: defaults::NONCE_LIFETIME,
            default_lifetime: defaults::DEFAULT_LIFETIME,
            max_lifetime: defaults::MAX_LIFETIME,
            permission_lifetime: defaults::PERMISSION_LIFETIME,
            channel_lifetime: defaults::CHANNEL_LIFETIME,
            reservation_lifetime: defaults::RESERVATION_LIFETIME,
            transaction_lifetime: defaults::TRANSACTION_LIFETIME,
            relay_ipv4: true,
            relay_ipv6: true,
            policy: PeerPolicy::default(),
            max_permissions_per_allocation: defaults::MAX_PERMISSIONS_PER_ALLOCATION,
            software: None,
            rfc5766_channel_numbers: defaults::RFC5766_CHANNEL_NUMBERS,
            mode: ServiceMode::Turn,
            challenges_per_source_per_second: None,
            alternate_domain: None,
        }
    }
}
