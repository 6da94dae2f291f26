//! The runtime configuration ([`Settings`]); `validate.rs` builds it from a [`Config`].

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use turn_proto::auth::{Credentials, UserSecret};
use turn_proto::server::{policy, LocalQuota, ServerConfig, ServiceMode};

use super::error::{ConfigError, ConfigErrors};
use super::source::Origin;
use super::validate::{validate, Checks};
use super::{Config, Env};

/// Everything the server needs, checked. Built by [`Config::validate`] or
/// [`Settings::embedded_default`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file the settings came from, or `<embedded default>`.
    pub source: String,
    /// The file the settings were loaded from; `None` for the embedded default (and for
    /// settings built from text).
    pub config_path: Option<PathBuf>,
    /// The other files the settings were read from (secret files, `TURND_AUTH_SECRET_FILE`,
    /// the admin token file): a change to any of them reloads, like a change of the file.
    pub watched_files: Vec<PathBuf>,
    /// Listening sockets.
    pub listeners: Listeners,
    /// Certificate and key for TLS listeners; `None` means TLS is off.
    pub tls: Option<TlsFiles>,
    /// Realm, users and secrets.
    pub auth: Auth,
    /// Relay sockets.
    pub relay: Relay,
    /// Lifetimes.
    pub lifetimes: Lifetimes,
    /// Peer address policy.
    pub peers: PeerPolicy,
    /// Quotas.
    pub quotas: Quotas,
    /// Socket buffer sizes.
    pub sockets: SocketBuffers,
    /// Number of IO workers (one per core unless configured).
    pub workers: NonZeroUsize,
    /// Accept RFC 5766 channel numbers 0x5000–0x7FFF too.
    pub rfc5766_channel_numbers: bool,
    /// TCP/TLS connection limits.
    pub streams: crate::net::stream::StreamLimits,
    /// Logging.
    pub log: Logging,
    /// The IO backend asked for.
    pub io: IoBackend,
    /// Which services are answered: STUN and TURN, STUN only, or TURN only (the core's
    /// [`ServiceMode`], carried by [`Settings::server_config`]).
    pub mode: ServiceMode,
    /// The admin HTTP listener; `None` when `[admin] listen = ""`.
    pub admin: Option<AdminSettings>,
    /// Graceful shutdown.
    pub drain: DrainSettings,
    /// Where these settings came from, for [`Settings::reload`].
    pub(super) origin: Origin,
}

/// `[server] io`: which readiness mechanism the workers use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoBackend {
    /// io_uring when the kernel (and the container's seccomp profile) allows it, else epoll.
    #[default]
    Auto,
    /// io_uring only; start-up fails without it.
    IoUring,
    /// epoll only.
    Epoll,
}

impl IoBackend {
    /// The name as written in the configuration file (`auto`, `io_uring`, `epoll`).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::IoUring => "io_uring",
            Self::Epoll => "epoll",
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for IoBackend {
    type Err = String;

    /// The name as [`IoBackend::as_str`] writes it.
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Auto, Self::IoUring, Self::Epoll]
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not an io backend (expected auto, io_uring or epoll)"))
    }
}

/// How a [`ServiceMode`] reads in logs, reload lines and `check-config`: `stun+turn`,
/// `stun_only`, `no_stun` (the latter two as the `[server]` keys that select them).
#[must_use]
pub fn service_mode_name(mode: ServiceMode) -> &'static str {
    match mode {
        ServiceMode::Turn => "stun+turn",
        ServiceMode::StunOnly => "stun_only",
        ServiceMode::NoStun => "no_stun",
    }
}

/// The admin HTTP listener (`[admin]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Where `/metrics`, `/live`, `/ready` and the admin API listen.
    pub listen: SocketAddr,
    /// The bearer token of the admin endpoints (`[admin] token_file`, else
    /// `TURND_ADMIN_TOKEN`); `None` turns the admin endpoints off (metrics and health stay).
    pub token: Option<Secret>,
}

/// Graceful shutdown (`[drain]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSettings {
    /// The longest a drain waits for the last allocation to end.
    pub timeout: Duration,
    /// The IPv4 sibling named in 300 ALTERNATE-SERVER while draining.
    pub alternate_ipv4: Option<SocketAddr>,
    /// The IPv6 sibling named in 300 ALTERNATE-SERVER while draining.
    pub alternate_ipv6: Option<SocketAddr>,
}

impl DrainSettings {
    /// The alternate server for a client of `family_v4` (true: IPv4).
    #[must_use]
    pub fn alternate_for(&self, ipv4: bool) -> Option<SocketAddr> {
        if ipv4 {
            self.alternate_ipv4
        } else {
            self.alternate_ipv6
        }
    }
}

/// Listening socket addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listeners {
    /// UDP listeners.
    pub udp: Vec<SocketAddr>,
    /// TCP listeners (served from issue 4 on).
    pub tcp: Vec<SocketAddr>,
    /// TLS listeners (issue 4); empty unless a certificate is configured.
    pub tls: Vec<SocketAddr>,
}

/// PEM files for TLS. Existence and contents are checked by the TLS loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// A secret that does not print itself in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    #[must_use]
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }
    /// The bytes used as the HMAC key (the secret's UTF-8 text, as coturn uses it).
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
    /// The secret's text, for printing it deliberately (the generated secret).
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A static long-term user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticUser {
    /// Username.
    pub name: String,
    /// The password, or the MD5 key `turnadmin -k` prints (then only the MD5 password
    /// algorithm works for this user). Its `Debug` prints no secret.
    pub secret: UserSecret,
}

impl StaticUser {
    /// MD5(name:realm:password), the key for MESSAGE-INTEGRITY (RFC 8489 §9.2.2).
    #[must_use]
    pub fn key_md5(&self, realm: &str) -> [u8; 16] {
        match &self.secret {
            UserSecret::Password(p) => turn_proto::auth::long_term_key_md5(&self.name, realm, p),
            UserSecret::Md5Key(k) => *k,
        }
    }
}

/// Authentication settings.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The realm.
    pub realm: String,
    /// Static users by name.
    pub users: HashMap<String, StaticUser>,
    /// REST-API secrets: the config's, then the secret files', then the environment's.
    /// Any of them verifies a credential.
    pub secrets: Vec<Secret>,
    /// True when `secrets` is a single secret turnd generated because none was
    /// configured (embedded default only); `main` prints it once with an example credential.
    pub generated_secret: bool,
}

impl Auth {
    /// The credential store the protocol core checks requests against.
    #[must_use]
    pub fn credentials(&self) -> Credentials {
        let mut c = Credentials::new(self.realm.clone());
        for u in self.users.values() {
            c.add_user(u.name.clone(), &u.secret);
        }
        for s in &self.secrets {
            c.add_secret(s.as_bytes());
        }
        c
    }
}

/// Relay settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// Addresses relay sockets bind to; empty means the local address the request
    /// arrived on.
    pub addresses: Vec<IpAddr>,
    /// Relay ports, inclusive.
    pub ports: RangeInclusive<u16>,
    /// Public addresses to advertise.
    pub external_ips: Vec<ExternalIp>,
}

impl Relay {
    /// The address to put in XOR-RELAYED-ADDRESS for a relay socket bound to `bound`:
    /// the `public` of an entry whose `private` is `bound`, else of an entry without
    /// `private` in the same address family, else `bound` itself.
    #[must_use]
    pub fn advertised(&self, bound: IpAddr) -> IpAddr {
        self.external_ips
            .iter()
            .find(|e| e.private == Some(bound))
            .or_else(|| {
                self.external_ips
                    .iter()
                    .find(|e| e.private.is_none() && e.public.is_ipv4() == bound.is_ipv4())
            })
            .map_or(bound, |e| e.public)
    }
}

/// One `external_ips` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalIp {
    /// The address clients see.
    pub public: IpAddr,
    /// The local address it maps to; `None` for any local address of the same family.
    pub private: Option<IpAddr>,
}

impl fmt::Display for ExternalIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.private {
            Some(p) => write!(f, "{}/{p}", self.public),
            None => write!(f, "{}", self.public),
        }
    }
}

/// Lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Allocation lifetime when the client requests none.
    pub allocation: Duration,
    /// Maximum allocation lifetime.
    pub max_allocation: Duration,
    /// Permission lifetime.
    pub permission: Duration,
    /// Channel binding lifetime.
    pub channel: Duration,
    /// Nonce validity.
    pub nonce: Duration,
}

/// Which peers clients may reach: the operator's lists on top of the core's built-in
/// deny list of non-public ranges ([`policy::DEFAULT_DENIED`]: loopback, RFC 1918, CGNAT,
/// link-local incl. 169.254.169.254, multicast, documentation, ULA, ...). A peer in
/// `allow` is allowed; else one in `deny` or in the built-in list is denied (403); else
/// it is allowed. IPv4-mapped IPv6 peers are checked as IPv4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    /// The operator's allow list; wins over both deny lists.
    pub allow: Vec<IpNet>,
    /// The operator's deny list.
    pub deny: Vec<IpNet>,
}

impl PeerPolicy {
    /// The policy the protocol core enforces.
    #[must_use]
    pub fn policy(&self) -> policy::PeerPolicy {
        policy::PeerPolicy::new(self.allow.clone(), self.deny.clone())
    }

    /// Whether a client may relay to `peer` (builds the core's policy: for tools and tests,
    /// not for the packet path).
    #[must_use]
    pub fn is_allowed(&self, peer: IpAddr) -> bool {
        self.policy().check(peer).is_ok()
    }
}

/// Quotas; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Allocations per username (486 beyond).
    pub allocations_per_user: Option<NonZeroU32>,
    /// Allocations in total (508 beyond).
    pub total_allocations: Option<NonZeroU32>,
    /// Permissions per allocation (508 beyond).
    pub permissions_per_allocation: NonZeroUsize,
    /// 401 challenges answered per source address per second; `None`: no limit.
    pub challenges_per_source_per_second: Option<NonZeroU32>,
}

/// Socket buffer sizes in bytes; `None` keeps the OS default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    /// SO_RCVBUF for listeners.
    pub recv: Option<usize>,
    /// SO_SNDBUF for listeners.
    pub send: Option<usize>,
    /// SO_RCVBUF for relay sockets.
    pub relay_recv: Option<usize>,
    /// SO_SNDBUF for relay sockets.
    pub relay_send: Option<usize>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logging {
    /// A tracing filter (checked to parse).
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

impl Settings {
    /// The settings of `turnd` run without a configuration file: every default, STUN
    /// and TURN on UDP port 3478, secrets from `TURND_AUTH_SECRET` /
    /// `TURND_AUTH_SECRET_FILE`, or else one generated secret (`auth.generated_secret`).
    ///
    /// # Errors
    /// `TURND_AUTH_SECRET_FILE` names a file that cannot be read or is empty.
    pub fn embedded_default(env: &dyn Env) -> Result<Self, ConfigError> {
        validate(
            &Config::default(),
            &Origin::default(),
            env,
            Checks::default(),
            true,
        )
        .map_err(ConfigErrors::into_first)
    }

    /// Reads and validates the same source again: the file these settings were loaded from
    /// (re-reading it, its secret files, token file and the environment), the same text, or
    /// the embedded default. A secret turnd generated for this run is kept, so a reload does
    /// not invalidate the credentials it printed. Compare with [`reload_plan`](super::reload_plan)
    /// to see what changed and what needs a restart.
    ///
    /// # Errors
    /// The new configuration does not read or validate; the caller keeps `self`.
    pub fn reload(&self, env: &dyn Env) -> Result<Self, ConfigError> {
        if let Some(path) = &self.origin.path {
            return Config::load(path)?.validate(env);
        }
        match &self.origin.text {
            Some(text) => Config::parse_named(text, &self.origin.name)?.validate(env),
            None => {
                let mut new = Self::embedded_default(env)?;
                if new.auth.generated_secret && self.auth.generated_secret {
                    new.auth.secrets.clone_from(&self.auth.secrets);
                }
                Ok(new)
            }
        }
    }

    /// The protocol core's configuration: credentials, lifetimes, peer policy, the
    /// permission quota, the service mode and the challenge rate limit. `nonce_secret` keys the stateless nonces (random per process).
    /// The relay families follow `relay.addresses`, or the listeners when it is empty.
    #[must_use]
    pub fn server_config(&self, nonce_secret: [u8; 32]) -> ServerConfig {
        let families: Vec<bool> = if self.relay.addresses.is_empty() {
            let l = &self.listeners;
            l.udp
                .iter()
                .chain(&l.tcp)
                .chain(&l.tls)
                .map(SocketAddr::is_ipv4)
                .collect()
        } else {
            self.relay.addresses.iter().map(IpAddr::is_ipv4).collect()
        };
        ServerConfig {
            credentials: self.auth.credentials(),
            nonce_secret,
            nonce_lifetime: self.lifetimes.nonce,
            default_lifetime: self.lifetimes.allocation,
            max_lifetime: self.lifetimes.max_allocation,
            permission_lifetime: self.lifetimes.permission,
            channel_lifetime: self.lifetimes.channel,
            relay_ipv4: families.contains(&true),
            relay_ipv6: families.contains(&false),
            policy: self.peers.policy(),
            max_permissions_per_allocation: self.quotas.permissions_per_allocation.get(),
            rfc5766_channel_numbers: self.rfc5766_channel_numbers,
            software: Some(concat!("turnd ", env!("CARGO_PKG_VERSION")).to_owned()),
            mode: self.mode,
            challenges_per_source_per_second: self
                .quotas
                .challenges_per_source_per_second
                .map(NonZeroU32::get),
            ..ServerConfig::default()
        }
    }
}

impl Quotas {
    /// The allocation quota ledger of one process.
    #[must_use]
    pub fn ledger(&self) -> LocalQuota {
        LocalQuota::new(
            self.allocations_per_user.map(NonZeroU32::get),
            self.total_allocations.map(NonZeroU32::get),
        )
    }
}
