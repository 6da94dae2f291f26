//! The runtime configuration ([`Settings`]) and the checks that build it from a
//! [`Config`].

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use turn_proto::auth::{CandidateKeys, Credentials, UserSecret};
use turn_proto::server::{policy, LocalQuota, ServerConfig};

use super::error::{ConfigError, Reason};
use super::source::Origin;
use super::{Config, DurationValue, Env, ENV_ADMIN_TOKEN, ENV_AUTH_SECRET, ENV_AUTH_SECRET_FILE};

/// Everything the server needs, checked. Built by [`Config::validate`] or
/// [`Settings::embedded_default`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file the settings came from, or `<embedded default>`.
    pub source: String,
    /// The file the settings were loaded from; `None` for the embedded default (and for
    /// settings built from text).
    pub config_path: Option<PathBuf>,
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
    /// Which services are answered: STUN and TURN, STUN only, or TURN only.
    pub mode: ServiceMode,
    /// The admin HTTP listener; `None` when `[admin] listen = ""`.
    pub admin: Option<AdminSettings>,
    /// Graceful shutdown.
    pub drain: DrainSettings,
    /// Where these settings came from, for [`Settings::reload`].
    origin: Origin,
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

/// Which requests the server answers (`[server] stun_only`, `no_stun`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ServiceMode {
    /// STUN Binding and TURN (the default).
    #[default]
    StunAndTurn,
    /// STUN Binding only; TURN requests are refused (coturn's `stun-only`).
    StunOnly,
    /// TURN only; Binding requests are not answered (coturn's `no-stun`).
    TurnOnly,
}

impl ServiceMode {
    /// A short name for logs and reload lines.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::StunAndTurn => "stun+turn",
            Self::StunOnly => "stun only",
            Self::TurnOnly => "turn only",
        }
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
        validate(&Config::default(), &Origin::default(), env, true)
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

    /// The protocol core's configuration: credentials, lifetimes, peer policy and the
    /// permission quota. `nonce_secret` keys the stateless nonces (random per process).
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

const MAX_BUFFER: u64 = 1 << 30;

/// Builds [`Settings`] from `config`; `generate_secret` allows a generated secret
/// instead of the "no credentials" error.
pub(super) fn validate(
    config: &Config,
    origin: &Origin,
    env: &dyn Env,
    generate_secret: bool,
) -> Result<Settings, ConfigError> {
    let err = |key: &str, reason: Reason| origin.error_at(key, reason);

    // [listen] and [tls]
    let udp = socket_addrs(&config.listen.udp, "listen.udp", origin)?;
    let tcp = socket_addrs(&config.listen.tcp, "listen.tcp", origin)?;
    let tls_files = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => {
            for (k, v) in [("tls.cert", cert), ("tls.key", key)] {
                if v.trim().is_empty() {
                    return Err(err(
                        k,
                        Reason::Unusable {
                            value: v.clone(),
                            detail: "empty path",
                        },
                    ));
                }
            }
            Some(TlsFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            })
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(err(
                "tls.cert",
                Reason::Conflict("tls.cert is set but tls.key is not"),
            ))
        }
        (None, Some(_)) => {
            return Err(err(
                "tls.key",
                Reason::Conflict("tls.key is set but tls.cert is not"),
            ))
        }
    };
    let tls = match (&config.listen.tls, &tls_files) {
        (Some(list), _) => {
            let addrs = socket_addrs(list, "listen.tls", origin)?;
            if !addrs.is_empty() && tls_files.is_none() {
                return Err(err(
                    "listen.tls",
                    Reason::Conflict("TLS listeners need tls.cert and tls.key"),
                ));
            }
            addrs
        }
        (None, Some(_)) => socket_addrs(&super::defaults::tls_listeners(), "listen.tls", origin)?,
        (None, None) => Vec::new(),
    };

    // [auth]
    let realm = config.auth.realm.clone();
    if realm.is_empty() || realm.chars().count() > 763 || realm.contains('"') {
        return Err(err(
            "auth.realm",
            Reason::Unusable {
                value: realm,
                detail: "a realm is 1 to 763 characters without `\"` (RFC 8489 §14.9)",
            },
        ));
    }
    let mut users = HashMap::new();
    for (i, u) in config.auth.users.iter().enumerate() {
        let at = format!("auth.users[{i}]");
        if u.name.is_empty() {
            return Err(err(
                &format!("{at}.name"),
                Reason::Unusable {
                    value: String::new(),
                    detail: "empty username",
                },
            ));
        }
        let user = match (&u.password, &u.key) {
            (Some(p), None) => StaticUser {
                name: u.name.clone(),
                secret: UserSecret::Password(p.clone()),
            },
            (None, Some(k)) => StaticUser {
                name: u.name.clone(),
                secret: UserSecret::Md5Key(
                    parse_key(k)
                        .ok_or_else(|| err(&format!("{at}.key"), Reason::BadKey(k.clone())))?,
                ),
            },
            _ => return Err(err(&at, Reason::UserCredential(u.name.clone()))),
        };
        if users.insert(u.name.clone(), user).is_some() {
            return Err(err(
                &format!("{at}.name"),
                Reason::Duplicate(u.name.clone()),
            ));
        }
    }
    let mut secrets = Vec::new();
    for (i, s) in config.auth.secrets.iter().enumerate() {
        let at = format!("auth.secrets[{i}]");
        if s.is_empty() {
            return Err(err(&at, Reason::EmptySecret(at.clone())));
        }
        secrets.push(Secret::new(s.clone()));
    }
    for (i, f) in config.auth.secret_files.iter().enumerate() {
        let at = format!("auth.secret_files[{i}]");
        secrets.extend(read_secret_file(f).map_err(|r| err(&at, r))?);
    }
    if let Some(s) = env.var(ENV_AUTH_SECRET) {
        let s = s.trim();
        if s.is_empty() {
            return Err(env_error(
                origin,
                ENV_AUTH_SECRET,
                Reason::EmptySecret(ENV_AUTH_SECRET.into()),
            ));
        }
        secrets.push(Secret::new(s));
    }
    if let Some(f) = env.var(ENV_AUTH_SECRET_FILE) {
        secrets
            .extend(read_secret_file(&f).map_err(|r| env_error(origin, ENV_AUTH_SECRET_FILE, r))?);
    }

    // [relay]
    let r = &config.relay;
    if r.min_port == 0 {
        return Err(err(
            "relay.min_port",
            Reason::OutOfRange {
                value: "0".into(),
                detail: "relay ports are 1..=65535",
            },
        ));
    }
    if r.min_port > r.max_port {
        return Err(err(
            "relay.max_port",
            Reason::InvertedPortRange {
                min: r.min_port,
                max: r.max_port,
            },
        ));
    }
    let mut relay_addrs = Vec::new();
    for (i, a) in r.addresses.iter().enumerate() {
        let at = format!("relay.addresses[{i}]");
        let ip = parse_ip(a).ok_or_else(|| {
            err(
                &at,
                Reason::BadAddress {
                    value: a.clone(),
                    what: "IP address",
                },
            )
        })?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(err(
                &at,
                Reason::Unusable {
                    value: a.clone(),
                    detail: "a relay address must be a unicast address of this host \
                             (omit relay.addresses to relay from the listener's address)",
                },
            ));
        }
        if relay_addrs.contains(&ip) {
            return Err(err(&at, Reason::Duplicate(a.clone())));
        }
        relay_addrs.push(ip);
    }
    let mut external_ips: Vec<ExternalIp> = Vec::new();
    for (i, e) in r.external_ips.iter().enumerate() {
        let at = format!("relay.external_ips[{i}]");
        let bad = || {
            err(
                &at,
                Reason::BadAddress {
                    value: e.clone(),
                    what: "PUBLIC or PUBLIC/PRIVATE IP pair",
                },
            )
        };
        let (public, private) = match e.split_once('/') {
            Some((p, q)) => (
                parse_ip(p).ok_or_else(bad)?,
                Some(parse_ip(q).ok_or_else(bad)?),
            ),
            None => (parse_ip(e).ok_or_else(bad)?, None),
        };
        if public.is_unspecified() || private.is_some_and(|p| p.is_unspecified()) {
            return Err(err(
                &at,
                Reason::Unusable {
                    value: e.clone(),
                    detail: "unspecified address",
                },
            ));
        }
        if private.is_some_and(|p| p.is_ipv4() != public.is_ipv4()) {
            return Err(err(
                &at,
                Reason::Unusable {
                    value: e.clone(),
                    detail: "PUBLIC and PRIVATE must be the same IP family",
                },
            ));
        }
        let clash = external_ips.iter().any(|x| match private {
            Some(p) => x.private == Some(p),
            None => x.private.is_none() && x.public.is_ipv4() == public.is_ipv4(),
        });
        if clash {
            return Err(err(&at, Reason::Duplicate(e.clone())));
        }
        if private.is_some_and(|p| !relay_addrs.is_empty() && !relay_addrs.contains(&p)) {
            return Err(err(
                &at,
                Reason::Unusable {
                    value: e.clone(),
                    detail:
                        "PRIVATE is not one of relay.addresses, so this mapping would never apply",
                },
            ));
        }
        external_ips.push(ExternalIp { public, private });
    }

    // [lifetimes]
    let l = &config.lifetimes;
    let lifetimes = Lifetimes {
        allocation: duration(&l.allocation, "lifetimes.allocation", origin)?,
        max_allocation: duration(&l.max_allocation, "lifetimes.max_allocation", origin)?,
        permission: duration(&l.permission, "lifetimes.permission", origin)?,
        channel: duration(&l.channel, "lifetimes.channel", origin)?,
        nonce: duration(&l.nonce, "lifetimes.nonce", origin)?,
    };
    if lifetimes.allocation > lifetimes.max_allocation {
        return Err(err(
            "lifetimes.allocation",
            Reason::Conflict("lifetimes.allocation is longer than lifetimes.max_allocation"),
        ));
    }

    // [peers]
    let allow = cidrs(&config.peers.allow, "peers.allow", origin)?;
    let deny = cidrs(&config.peers.deny, "peers.deny", origin)?;

    // [quotas]
    let q = &config.quotas;
    let quotas = Quotas {
        allocations_per_user: NonZeroU32::new(q.allocations_per_user),
        total_allocations: NonZeroU32::new(q.total_allocations),
        permissions_per_allocation: NonZeroUsize::new(q.permissions_per_allocation).ok_or_else(
            || {
                err(
                    "quotas.permissions_per_allocation",
                    Reason::OutOfRange {
                        value: "0".into(),
                        detail: "an allocation needs at least one permission",
                    },
                )
            },
        )?,
        challenges_per_source_per_second: NonZeroU32::new(q.challenges_per_source_per_second),
    };

    // [sockets]
    let s = &config.sockets;
    let buf = |v: u64, key: &str| -> Result<Option<usize>, ConfigError> {
        if v > MAX_BUFFER {
            return Err(err(
                key,
                Reason::OutOfRange {
                    value: v.to_string(),
                    detail: "at most 1 GiB",
                },
            ));
        }
        Ok(usize::try_from(v).ok().filter(|&v| v > 0))
    };
    let sockets = SocketBuffers {
        recv: buf(s.recv_buffer_bytes, "sockets.recv_buffer_bytes")?,
        send: buf(s.send_buffer_bytes, "sockets.send_buffer_bytes")?,
        relay_recv: buf(s.relay_recv_buffer_bytes, "sockets.relay_recv_buffer_bytes")?,
        relay_send: buf(s.relay_send_buffer_bytes, "sockets.relay_send_buffer_bytes")?,
    };

    // [server]
    if config.server.workers > 1024 {
        return Err(err(
            "server.workers",
            Reason::OutOfRange {
                value: config.server.workers.to_string(),
                detail: "0 (one per core) to 1024",
            },
        ));
    }
    let workers = NonZeroUsize::new(config.server.workers)
        .unwrap_or_else(|| std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN));
    let mode = match (config.server.stun_only, config.server.no_stun) {
        (false, false) => ServiceMode::StunAndTurn,
        (true, false) => ServiceMode::StunOnly,
        (false, true) => ServiceMode::TurnOnly,
        (true, true) => {
            return Err(err(
                "server.no_stun",
                Reason::Conflict(
                    "server.stun_only and server.no_stun together would answer nothing",
                ),
            ))
        }
    };

    // [admin]
    let admin = admin(config, origin, env)?;

    // [drain]
    let drain = drain(config, origin)?;

    // [streams]
    let st = &config.streams;
    let positive = |v: usize, key: &str| {
        if v == 0 {
            Err(err(
                key,
                Reason::OutOfRange {
                    value: "0".into(),
                    detail: "must be at least 1",
                },
            ))
        } else {
            Ok(v)
        }
    };
    let streams = crate::net::stream::StreamLimits {
        handshake_timeout: duration(&st.handshake_timeout, "streams.handshake_timeout", origin)?,
        idle_timeout: duration(&st.idle_timeout, "streams.idle_timeout", origin)?,
        max_per_ip: positive(st.max_connections_per_ip, "streams.max_connections_per_ip")?,
        max_total: positive(st.max_connections, "streams.max_connections")?,
        write_buffer: positive(st.write_buffer_bytes, "streams.write_buffer_bytes")?,
    };

    // [log]
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&config.log.level) {
        return Err(err(
            "log.level",
            Reason::BadLogLevel {
                value: config.log.level.clone(),
                detail: e.to_string(),
            },
        ));
    }

    if secrets.len() > CandidateKeys::MAX {
        return Err(err(
            "auth.secrets",
            Reason::OutOfRange {
                value: secrets.len().to_string(),
                detail: "at most 8 REST-API secrets in all (auth.secrets, auth.secret_files \
                         and the environment together)",
            },
        ));
    }
    // Checked last, so that mistakes elsewhere in the file are reported first.
    let mut generated_secret = false;
    if secrets.is_empty() && users.is_empty() {
        if !generate_secret {
            return Err(err("auth", Reason::NoCredentials));
        }
        secrets.push(random_secret());
        generated_secret = true;
    }

    Ok(Settings {
        source: origin.name.clone(),
        config_path: origin.path.clone(),
        listeners: Listeners { udp, tcp, tls },
        tls: tls_files,
        auth: Auth {
            realm,
            users,
            secrets,
            generated_secret,
        },
        relay: Relay {
            addresses: relay_addrs,
            ports: r.min_port..=r.max_port,
            external_ips,
        },
        lifetimes,
        peers: PeerPolicy { allow, deny },
        quotas,
        sockets,
        workers,
        rfc5766_channel_numbers: config.server.rfc5766_channel_numbers,
        streams,
        log: Logging {
            level: config.log.level.clone(),
            format: config.log.format,
        },
        io: config.server.io,
        mode,
        admin,
        drain,
        origin: origin.clone(),
    })
}

/// The smallest admin token accepted, in bytes.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

fn admin(
    config: &Config,
    origin: &Origin,
    env: &dyn Env,
) -> Result<Option<AdminSettings>, ConfigError> {
    let a = &config.admin;
    if a.listen.trim().is_empty() {
        return Ok(None);
    }
    let listen: SocketAddr = a.listen.trim().parse().map_err(|_| {
        origin.error_at(
            "admin.listen",
            Reason::BadAddress {
                value: a.listen.clone(),
                what: "socket address (IP:port, [IPv6]:port), or \"\" to turn it off",
            },
        )
    })?;
    let token = match &a.token_file {
        Some(file) => Some(
            read_token(file, &format!("token file {file}"))
                .map_err(|r| origin.error_at("admin.token_file", r))?,
        ),
        None => match env.var(ENV_ADMIN_TOKEN) {
            Some(t) => Some(
                token(&t, ENV_ADMIN_TOKEN).map_err(|r| env_error(origin, ENV_ADMIN_TOKEN, r))?,
            ),
            None => None,
        },
    };
    Ok(Some(AdminSettings { listen, token }))
}

fn read_token(path: &str, what: &str) -> Result<Secret, Reason> {
    let text = std::fs::read_to_string(path).map_err(|source| Reason::SecretFile {
        path: PathBuf::from(path),
        source,
    })?;
    token(&text, what)
}

fn token(text: &str, what: &str) -> Result<Secret, Reason> {
    let t = text.trim();
    if t.is_empty() {
        return Err(Reason::EmptySecret(what.to_owned()));
    }
    if t.len() < MIN_ADMIN_TOKEN_BYTES {
        return Err(Reason::ShortToken {
            what: what.to_owned(),
            len: t.len(),
        });
    }
    Ok(Secret::new(t))
}

fn drain(config: &Config, origin: &Origin) -> Result<DrainSettings, ConfigError> {
    let d = &config.drain;
    let timeout = duration(&d.timeout, "drain.timeout", origin)?;
    let mut out = DrainSettings {
        timeout,
        alternate_ipv4: None,
        alternate_ipv6: None,
    };
    for (i, a) in d.alternate_servers.iter().enumerate() {
        let at = format!("drain.alternate_servers[{i}]");
        let addr: SocketAddr = a.trim().parse().map_err(|_| {
            origin.error_at(
                &at,
                Reason::BadAddress {
                    value: a.clone(),
                    what: "socket address (IP:port, [IPv6]:port)",
                },
            )
        })?;
        if addr.ip().is_unspecified() || addr.ip().is_multicast() || addr.port() == 0 {
            return Err(origin.error_at(
                &at,
                Reason::Unusable {
                    value: a.clone(),
                    detail: "an alternate server is a unicast address and a port clients can reach",
                },
            ));
        }
        let slot = if addr.is_ipv4() {
            &mut out.alternate_ipv4
        } else {
            &mut out.alternate_ipv6
        };
        if slot.is_some() {
            return Err(origin.error_at(
                &at,
                Reason::Conflict("at most one IPv4 and one IPv6 alternate server"),
            ));
        }
        *slot = Some(addr);
    }
    Ok(out)
}

fn env_error(origin: &Origin, var: &str, reason: Reason) -> ConfigError {
    let mut e = origin.error_at_offset(None, Some(var.to_owned()), reason);
    e.location.file = "environment".to_owned();
    e
}

/// Accepts `1.2.3.4`, `::1` and `[::1]`.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let s = s
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(s);
    s.parse().ok()
}

fn socket_addrs(
    list: &[String],
    key: &str,
    origin: &Origin,
) -> Result<Vec<SocketAddr>, ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    for (i, a) in list.iter().enumerate() {
        let at = format!("{key}[{i}]");
        let addr: SocketAddr = a.trim().parse().map_err(|_| {
            origin.error_at(
                &at,
                Reason::BadAddress {
                    value: a.clone(),
                    what: "socket address (IP:port, [IPv6]:port)",
                },
            )
        })?;
        if out.contains(&addr) {
            return Err(origin.error_at(&at, Reason::Duplicate(a.clone())));
        }
        out.push(addr);
    }
    Ok(out)
}

fn cidrs(list: &[String], key: &str, origin: &Origin) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            parse_cidr(s).map_err(|detail| {
                origin.error_at(
                    &format!("{key}[{i}]"),
                    Reason::BadCidr {
                        value: s.clone(),
                        detail,
                    },
                )
            })
        })
        .collect()
}

/// A CIDR, or a single IP taken as a host route.
pub(crate) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if t.contains('/') {
        t.parse::<IpNet>().map_err(|e| e.to_string())
    } else {
        parse_ip(t)
            .map(IpNet::from)
            .ok_or_else(|| "not an IP address".to_owned())
    }
}

/// `0x` + 32 hex digits (the `0x` is optional) → 16 bytes.
pub(crate) fn parse_key(s: &str) -> Option<[u8; 16]> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn duration(v: &DurationValue, key: &str, origin: &Origin) -> Result<Duration, ConfigError> {
    let (d, text) = match v {
        DurationValue::Seconds(s) => (Duration::from_secs(*s), s.to_string()),
        DurationValue::Text(t) => match humantime::parse_duration(t.trim()) {
            Ok(d) => (d, t.clone()),
            Err(e) => {
                return Err(origin.error_at(
                    key,
                    Reason::BadDuration {
                        value: t.clone(),
                        detail: e.to_string(),
                    },
                ))
            }
        },
    };
    if d < Duration::from_secs(1) || d > Duration::from_secs(7 * 24 * 3600) {
        return Err(origin.error_at(
            key,
            Reason::BadDuration {
                value: text,
                detail: "must be between 1 s and 7 days".into(),
            },
        ));
    }
    Ok(d)
}

fn read_secret_file(path: &str) -> Result<Vec<Secret>, Reason> {
    let text = std::fs::read_to_string(path).map_err(|source| Reason::SecretFile {
        path: PathBuf::from(path),
        source,
    })?;
    let secrets: Vec<Secret> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(Secret::new)
        .collect();
    if secrets.is_empty() {
        return Err(Reason::EmptySecret(format!("secret file {path}")));
    }
    Ok(secrets)
}

fn random_secret() -> Secret {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    Secret::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::super::MapEnv;
    use super::*;

    fn env() -> MapEnv {
        MapEnv::default()
    }

    fn check(text: &str) -> Result<Settings, ConfigError> {
        Config::parse_named(text, "t.toml")?.validate(&env())
    }

    const WITH_SECRET: &str = "[auth]\nsecrets = [\"s3cret\"]\n";

    #[test]
    fn defaults_match_the_issue() {
        let s = check(WITH_SECRET).expect("valid");
        assert_eq!(
            s.listeners.udp,
            vec![
                "0.0.0.0:3478".parse::<SocketAddr>().expect("addr"),
                "[::]:3478".parse().expect("addr")
            ]
        );
        assert_eq!(s.listeners.tcp.len(), 2);
        assert!(s.listeners.tls.is_empty(), "no TLS without a certificate");
        assert_eq!(s.relay.ports, 49152..=50175);
        assert_eq!(s.lifetimes.allocation, Duration::from_secs(600));
        assert_eq!(s.lifetimes.max_allocation, Duration::from_secs(3600));
        assert_eq!(s.lifetimes.permission, Duration::from_secs(300));
        assert_eq!(s.lifetimes.channel, Duration::from_secs(600));
        assert_eq!(s.log.format, LogFormat::Text);
        assert_eq!(
            s.workers,
            std::thread::available_parallelism().expect("cores"),
            "default: one worker per core"
        );
        assert_eq!(s.auth.secrets, vec![Secret::new("s3cret")]);
        assert!(!s.auth.generated_secret);
        assert_eq!(s.source, "t.toml");
    }

    #[test]
    fn inverted_port_range_names_line_and_key() {
        let e = check("[auth]\nsecrets = [\"x\"]\n[relay]\nmin_port = 50000\nmax_port = 40000\n")
            .expect_err("inverted");
        assert_eq!(e.location.line, Some(5));
        assert_eq!(e.location.key.as_deref(), Some("relay.max_port"));
        assert!(matches!(
            e.reason(),
            Reason::InvertedPortRange {
                min: 50000,
                max: 40000
            }
        ));
        assert!(
            e.to_string()
                .starts_with("t.toml:5:1: relay.max_port: inverted"),
            "{e}"
        );
    }

    #[test]
    fn bad_cidr_names_line_and_index() {
        let e = check("[auth]\nsecrets = [\"x\"]\n[peers]\ndeny = [\n \"10.0.0.0/8\",\n \"10.0.0.0/33\",\n]\n")
            .expect_err("bad cidr");
        assert_eq!(e.location.line, Some(6));
        assert_eq!(e.location.key.as_deref(), Some("peers.deny[1]"));
        assert!(matches!(e.reason(), Reason::BadCidr { value, .. } if value == "10.0.0.0/33"));
    }

    #[test]
    fn missing_secret_file_names_the_file_line_and_key() {
        let e =
            check("[auth]\nsecret_files = [\"/nonexistent/turnd-secret\"]\n").expect_err("missing");
        assert_eq!(e.location.line, Some(2));
        assert_eq!(e.location.key.as_deref(), Some("auth.secret_files[0]"));
        assert!(e.to_string().contains("/nonexistent/turnd-secret"), "{e}");
    }

    #[test]
    fn secrets_come_from_env_and_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("secret");
        std::fs::write(&f, "old\n\nnew\n").expect("write");
        let env: MapEnv = [
            (ENV_AUTH_SECRET, " from-env \n"),
            (ENV_AUTH_SECRET_FILE, f.to_str().expect("utf8")),
        ]
        .into_iter()
        .collect();
        let s = Config::from_toml("")
            .expect("parses")
            .validate(&env)
            .expect("valid");
        let got: Vec<&str> = s.auth.secrets.iter().map(Secret::expose).collect();
        assert_eq!(got, ["from-env", "old", "new"]);
    }

    #[test]
    fn missing_env_secret_file_is_an_error_naming_the_file() {
        let env: MapEnv = [(ENV_AUTH_SECRET_FILE, "/nonexistent/k8s/secret")]
            .into_iter()
            .collect();
        let e = Settings::embedded_default(&env).expect_err("missing file");
        assert_eq!(e.location.key.as_deref(), Some(ENV_AUTH_SECRET_FILE));
        assert!(e.to_string().contains("/nonexistent/k8s/secret"), "{e}");
    }

    #[test]
    fn no_credentials_is_an_error_in_a_file_but_generated_by_default() {
        let e = check("").expect_err("no credentials");
        assert!(matches!(e.reason(), Reason::NoCredentials));
        let s = Settings::embedded_default(&env()).expect("embedded default");
        assert!(s.auth.generated_secret);
        assert_eq!(s.auth.secrets.len(), 1);
        assert_eq!(s.auth.secrets[0].expose().len(), 48);
        let again = Settings::embedded_default(&env()).expect("embedded default");
        assert_ne!(again.auth.secrets, s.auth.secrets, "random each run");
        let from_env: MapEnv = [(ENV_AUTH_SECRET, "k8s")].into_iter().collect();
        let s = Settings::embedded_default(&from_env).expect("embedded default");
        assert!(!s.auth.generated_secret);
        assert_eq!(s.auth.secrets, vec![Secret::new("k8s")]);
        assert_eq!(s.source, "<embedded default>");
    }

    #[test]
    fn users_take_a_password_or_the_turnadmin_key() {
        let s = check(
            "[auth]\nrealm = \"example.org\"\n[[auth.users]]\nname = \"alice\"\npassword = \"pw\"\n\
             [[auth.users]]\nname = \"bob\"\nkey = \"0x543e1aec5d3614f03141652d6ada51b2\"\n",
        )
        .expect("valid");
        let alice = &s.auth.users["alice"];
        assert_eq!(alice.secret, UserSecret::Password("pw".into()));
        assert_eq!(
            alice.key_md5("example.org"),
            turn_proto::auth::long_term_key_md5("alice", "example.org", "pw")
        );
        assert_eq!(s.auth.users["bob"].key_md5("any")[..2], [0x54, 0x3e]);
        assert!(matches!(s.auth.users["bob"].secret, UserSecret::Md5Key(_)));

        // The core's credential store takes both: MD5 for both users, SHA-256 only with a
        // password.
        let creds = s.auth.credentials();
        assert_eq!(creds.realm(), "example.org");
        let md5 = turn_proto::codec::PasswordAlgorithmId::MD5;
        let sha = turn_proto::codec::PasswordAlgorithmId::SHA256;
        assert!(creds.keys("alice", sha, 0).is_ok());
        assert!(creds.keys("bob", md5, 0).is_ok());
        assert!(creds.keys("bob", sha, 0).is_err());
        assert!(creds.keys("carol", md5, 0).is_err());

        let e = check("[[auth.users]]\nname = \"bob\"\nkey = \"0x1234\"\n").expect_err("short key");
        assert_eq!(
            (e.location.line, e.location.key.as_deref()),
            (Some(3), Some("auth.users[0].key"))
        );
        let e = check("[[auth.users]]\nname = \"bob\"\n").expect_err("no credential");
        assert!(matches!(e.reason(), Reason::UserCredential(_)));
        let e = check("[[auth.users]]\nname = \"a\"\npassword = \"1\"\n[[auth.users]]\nname = \"a\"\npassword = \"2\"\n")
            .expect_err("duplicate");
        assert_eq!(e.location.line, Some(5));
    }

    #[test]
    fn external_ips_map_private_to_public() {
        let s = check(&format!(
            "{WITH_SECRET}[relay]\naddresses = [\"10.10.10.11\"]\n\
             external_ips = [\"94.130.141.98/10.10.10.11\", \"2001:db8::1\"]\n"
        ))
        .expect("valid");
        let private: IpAddr = "10.10.10.11".parse().expect("ip");
        assert_eq!(s.relay.addresses, vec![private]);
        assert_eq!(
            s.relay.advertised(private),
            "94.130.141.98".parse::<IpAddr>().expect("ip")
        );
        let other: IpAddr = "10.10.10.12".parse().expect("ip");
        assert_eq!(
            s.relay.advertised(other),
            other,
            "no mapping for other IPv4 addresses"
        );
        let v6: IpAddr = "fd00::5".parse().expect("ip");
        assert_eq!(
            s.relay.advertised(v6),
            "2001:db8::1".parse::<IpAddr>().expect("ip")
        );

        let e = check(&format!(
            "{WITH_SECRET}[relay]\nexternal_ips = [\"94.130.141.98/fd00::1\"]\n"
        ))
        .expect_err("mixed families");
        assert_eq!(e.location.key.as_deref(), Some("relay.external_ips[0]"));
        let e = check(&format!(
            "{WITH_SECRET}[relay]\naddresses = [\"0.0.0.0\"]\n"
        ))
        .expect_err("unspecified");
        assert_eq!(e.location.line, Some(4));
    }

    #[test]
    fn external_ip_private_must_be_a_relay_address() {
        let e = check(&format!(
            "{WITH_SECRET}[relay]\naddresses = [\"10.10.10.12\"]\n\
             external_ips = [\"94.130.141.98/10.10.10.11\"]\n"
        ))
        .expect_err("never applies");
        assert_eq!(e.location.key.as_deref(), Some("relay.external_ips[0]"));
        assert_eq!(e.location.line, Some(5));
        assert!(e.to_string().contains("relay.addresses"), "{e}");
    }

    #[test]
    fn peer_policy_denies_special_purpose_unless_allowed() {
        let s = check(&format!(
            "{WITH_SECRET}[peers]\nallow = [\"127.0.0.1\"]\ndeny = [\"203.0.114.0/24\"]\n"
        ))
        .expect("valid");
        let ok = |ip: &str| s.peers.is_allowed(ip.parse().expect("ip"));
        assert!(ok("127.0.0.1"), "explicit allow wins");
        assert!(!ok("127.0.0.2"));
        assert!(!ok("10.0.0.1"));
        assert!(!ok("169.254.169.254"));
        assert!(!ok("::ffff:10.0.0.1"), "IPv4-mapped is checked as IPv4");
        assert!(
            ok("::ffff:127.0.0.1"),
            "mapped loopback follows the IPv4 allow"
        );
        assert!(!ok("::1"));
        assert!(!ok("203.0.114.9"));
        assert!(ok("94.130.141.98"));
        assert!(ok("2a01:4f8::1"));
        assert!(s
            .peers
            .policy()
            .check(IpAddr::V6(Ipv6Addr::LOCALHOST))
            .is_err());
        assert!(!s.peers.is_allowed(IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1))));
        assert_eq!(s.peers.deny.len(), 1, "only the operator's list is kept");
        assert!(!policy::DEFAULT_DENIED.is_empty());
    }

    #[test]
    fn lifetimes_and_durations_are_checked() {
        let s = check(&format!(
            "{WITH_SECRET}[lifetimes]\nallocation = \"5m\"\nnonce = \"1h\"\n"
        ))
        .expect("valid");
        assert_eq!(s.lifetimes.allocation, Duration::from_secs(300));
        assert_eq!(s.lifetimes.nonce, Duration::from_secs(3600));
        let e = check(&format!(
            "{WITH_SECRET}[lifetimes]\nchannel = \"ten minutes\"\n"
        ))
        .expect_err("bad");
        assert_eq!(
            (e.location.line, e.location.key.as_deref()),
            (Some(4), Some("lifetimes.channel"))
        );
        let e =
            check(&format!("{WITH_SECRET}[lifetimes]\nallocation = 7200\n")).expect_err("over max");
        assert_eq!(e.location.key.as_deref(), Some("lifetimes.allocation"));
        let e = check(&format!("{WITH_SECRET}[lifetimes]\npermission = 0\n")).expect_err("zero");
        assert!(matches!(e.reason(), Reason::BadDuration { .. }));
    }

    #[test]
    fn tls_listeners_need_a_certificate() {
        let e = check(&format!("{WITH_SECRET}[listen]\ntls = [\"0.0.0.0:443\"]\n"))
            .expect_err("no cert");
        assert_eq!(e.location.key.as_deref(), Some("listen.tls"));
        let s = check(&format!(
            "{WITH_SECRET}[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n"
        ))
        .expect("valid");
        assert_eq!(s.listeners.tls.len(), 4, "5349 and 443 on IPv4 and IPv6");
        assert_eq!(s.tls.expect("tls").cert, PathBuf::from("/c.pem"));
        let e = check(&format!("{WITH_SECRET}[tls]\ncert = \"/c.pem\"\n")).expect_err("no key");
        assert_eq!(e.location.key.as_deref(), Some("tls.cert"));
    }

    #[test]
    fn listeners_must_parse_and_be_unique() {
        let e = check(&format!(
            "{WITH_SECRET}[listen]\nudp = [\"0.0.0.0:3478\", \"3478\"]\n"
        ))
        .expect_err("bad");
        assert_eq!(e.location.key.as_deref(), Some("listen.udp[1]"));
        let e = check(&format!(
            "{WITH_SECRET}[listen]\nudp = [\"0.0.0.0:3478\", \"0.0.0.0:3478\"]\n"
        ))
        .expect_err("dup");
        assert!(matches!(e.reason(), Reason::Duplicate(_)));
        let s = check(&format!("{WITH_SECRET}[listen]\nudp = []\ntcp = []\n")).expect("valid");
        assert!(s.listeners.udp.is_empty());
    }

    #[test]
    fn quotas_buffers_workers_and_log_level() {
        let s = check(&format!(
            "{WITH_SECRET}[quotas]\nallocations_per_user = 10\n[sockets]\nrecv_buffer_bytes = 4194304\n\
             [server]\nworkers = 3\n[log]\nlevel = \"info,turnd=debug\"\n"
        ))
        .expect("valid");
        assert_eq!(s.quotas.allocations_per_user.map(NonZeroU32::get), Some(10));
        assert_eq!(s.quotas.total_allocations, None);
        assert_eq!(s.quotas.permissions_per_allocation.get(), 64);
        assert_eq!(s.sockets.recv, Some(4 << 20));
        assert_eq!(s.sockets.send, None);
        assert_eq!(s.workers.get(), 3);
        let e =
            check(&format!("{WITH_SECRET}[log]\nlevel = \"info,[[\"\n")).expect_err("bad filter");
        assert_eq!(e.location.key.as_deref(), Some("log.level"));
    }

    #[test]
    fn server_config_carries_the_settings_into_the_core() {
        let s = check(&format!(
            "{WITH_SECRET}[relay]\naddresses = [\"10.10.10.11\"]\n[lifetimes]\nallocation = 120\n\
             nonce = 30\n[quotas]\npermissions_per_allocation = 7\nallocations_per_user = 2\n"
        ))
        .expect("valid");
        let c = s.server_config([7; 32]);
        assert_eq!(c.default_lifetime, Duration::from_secs(120));
        assert_eq!(c.max_lifetime, Duration::from_secs(3600));
        assert_eq!(c.nonce_lifetime, Duration::from_secs(30));
        assert_eq!(c.permission_lifetime, Duration::from_secs(300));
        assert_eq!(c.channel_lifetime, Duration::from_secs(600));
        assert_eq!(c.max_permissions_per_allocation, 7);
        assert!(c.relay_ipv4 && !c.relay_ipv6, "relay only on 10.10.10.11");
        assert_eq!(c.nonce_secret, [7; 32]);
        assert_eq!(c.credentials.realm(), "turnd");
        assert!(c.policy.check("10.0.0.1".parse().expect("ip")).is_err());
        let ledger = s.quotas.ledger();
        assert_eq!((ledger.per_user, ledger.total), (Some(2), None));

        let dual = check(WITH_SECRET).expect("valid").server_config([0; 32]);
        assert!(
            dual.relay_ipv4 && dual.relay_ipv6,
            "default listeners are dual-stack"
        );
    }

    #[test]
    fn new_sections_have_their_defaults() {
        let s = check(WITH_SECRET).expect("valid");
        assert_eq!(s.io, IoBackend::Auto);
        assert_eq!(s.mode, ServiceMode::StunAndTurn);
        let admin = s.admin.expect("admin on by default");
        assert_eq!(admin.listen, "127.0.0.1:9641".parse().expect("addr"));
        assert_eq!(admin.token, None);
        assert_eq!(
            s.drain,
            DrainSettings {
                timeout: Duration::from_secs(120),
                alternate_ipv4: None,
                alternate_ipv6: None
            }
        );
        assert_eq!(s.quotas.challenges_per_source_per_second, None);
        assert_eq!(s.config_path, None);
    }

    #[test]
    fn io_backend_names_round_trip() {
        for (text, io) in [
            ("auto", IoBackend::Auto),
            ("io_uring", IoBackend::IoUring),
            ("epoll", IoBackend::Epoll),
        ] {
            let s = check(&format!("{WITH_SECRET}[server]\nio = \"{text}\"\n")).expect("valid");
            assert_eq!(s.io, io);
            assert_eq!(io.as_str(), text);
        }
        let e = check(&format!("{WITH_SECRET}[server]\nio = \"kqueue\"\n")).expect_err("bad");
        assert_eq!(
            (e.location.line, e.location.key.as_deref()),
            (Some(4), Some("server.io"))
        );
    }

    #[test]
    fn stun_only_and_no_stun_exclude_each_other() {
        let s = check(&format!("{WITH_SECRET}[server]\nstun_only = true\n")).expect("valid");
        assert_eq!(s.mode, ServiceMode::StunOnly);
        let s = check(&format!("{WITH_SECRET}[server]\nno_stun = true\n")).expect("valid");
        assert_eq!(s.mode, ServiceMode::TurnOnly);
        let e = check(&format!(
            "{WITH_SECRET}[server]\nstun_only = true\nno_stun = true\n"
        ))
        .expect_err("both");
        assert_eq!(
            (e.location.line, e.location.key.as_deref()),
            (Some(5), Some("server.no_stun"))
        );
    }

    #[test]
    fn admin_listen_can_be_turned_off_or_moved() {
        let s = check(&format!("{WITH_SECRET}[admin]\nlisten = \"\"\n")).expect("valid");
        assert_eq!(s.admin, None);
        let s = check(&format!("{WITH_SECRET}[admin]\nlisten = \"[::]:9000\"\n")).expect("valid");
        assert_eq!(
            s.admin.expect("on").listen,
            "[::]:9000".parse().expect("addr")
        );
        let e = check(&format!("{WITH_SECRET}[admin]\nlisten = \"9641\"\n")).expect_err("bad");
        assert_eq!(
            (e.location.line, e.location.key.as_deref()),
            (Some(4), Some("admin.listen"))
        );
    }

    #[test]
    fn admin_token_from_file_wins_over_env_and_must_be_long() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("token");
        std::fs::write(&f, "  file-token-0123456789\n").expect("write");
        let env: MapEnv = [(ENV_ADMIN_TOKEN, "env-token-0123456789")]
            .into_iter()
            .collect();
        let text = format!("{WITH_SECRET}[admin]\ntoken_file = \"{}\"\n", f.display());
        let s = Config::parse_named(&text, "t.toml")
            .expect("parses")
            .validate(&env)
            .expect("valid");
        let token = s.admin.expect("on").token.expect("token");
        assert_eq!(
            token.expose(),
            "file-token-0123456789",
            "file wins, trimmed"
        );
        let s = check(WITH_SECRET).expect("valid");
        assert_eq!(s.admin.expect("on").token, None);
        let s = Config::parse_named(WITH_SECRET, "t.toml")
            .expect("parses")
            .validate(&env)
            .expect("valid");
        assert_eq!(
            s.admin.expect("on").token.expect("token").expose(),
            "env-token-0123456789"
        );
        assert!(!format!("{env:?}").is_empty());

        std::fs::write(&f, "short\n").expect("write");
        let e = check(&text).expect_err("short");
        assert_eq!(
            (e.location.line, e.location.key.as_deref()),
            (Some(4), Some("admin.token_file"))
        );
        assert!(e.to_string().contains("at least 16"), "{e}");
        assert!(!e.to_string().contains("short\n"), "{e}");
        let short: MapEnv = [(ENV_ADMIN_TOKEN, "abc")].into_iter().collect();
        let e = Config::parse_named(WITH_SECRET, "t.toml")
            .expect("parses")
            .validate(&short)
            .expect_err("short");
        assert_eq!(e.location.key.as_deref(), Some(ENV_ADMIN_TOKEN));
        let e = check(&format!(
            "{WITH_SECRET}[admin]\ntoken_file = \"/nonexistent/token\"\n"
        ))
        .expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/token"), "{e}");
    }

    #[test]
    fn drain_takes_one_alternate_per_family() {
        let s = check(&format!(
            "{WITH_SECRET}[drain]\ntimeout = \"30s\"\n             alternate_servers = [\"192.0.2.10:3478\", \"[2001:db8::10]:3478\"]\n"
        ))
        .expect("valid");
        assert_eq!(s.drain.timeout, Duration::from_secs(30));
        assert_eq!(
            s.drain.alternate_for(true),
            Some("192.0.2.10:3478".parse().expect("addr"))
        );
        assert_eq!(
            s.drain.alternate_for(false),
            Some("[2001:db8::10]:3478".parse().expect("addr"))
        );
        let e = check(&format!(
            "{WITH_SECRET}[drain]\nalternate_servers = [\n  \"192.0.2.10:3478\",\n  \"192.0.2.11:3478\",\n]\n"
        ))
        .expect_err("two IPv4");
        assert_eq!(
            (e.location.line, e.location.key.as_deref()),
            (Some(6), Some("drain.alternate_servers[1]"))
        );
        let e = check(&format!(
            "{WITH_SECRET}[drain]\nalternate_servers = [\"turn2:3478\"]\n"
        ))
        .expect_err("a name");
        assert_eq!(
            e.location.key.as_deref(),
            Some("drain.alternate_servers[0]")
        );
    }

    #[test]
    fn reload_rereads_the_file_it_came_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("turnd.toml");
        std::fs::write(&path, WITH_SECRET).expect("write");
        let s = Config::load(&path)
            .expect("loads")
            .validate(&env())
            .expect("valid");
        assert_eq!(s.config_path.as_deref(), Some(path.as_path()));
        std::fs::write(&path, "[auth]\nsecrets = [\"s3cret\", \"next\"]\n").expect("write");
        let again = s.reload(&env()).expect("reloads");
        assert_eq!(again.auth.secrets.len(), 2);
        assert_eq!(again.config_path, s.config_path);
        std::fs::write(&path, "[relay]\nmin_port = 0\n").expect("write");
        let e = s.reload(&env()).expect_err("broken file refused");
        assert!(e.to_string().contains("relay.min_port"), "{e}");
    }

    #[test]
    fn reload_of_the_embedded_default_keeps_the_generated_secret() {
        let s = Settings::embedded_default(&env()).expect("default");
        let again = s.reload(&env()).expect("reloads");
        assert_eq!(again.auth.secrets, s.auth.secrets);
        assert!(again.auth.generated_secret);
        let from_env: MapEnv = [(ENV_AUTH_SECRET, "k8s")].into_iter().collect();
        let rotated = s.reload(&from_env).expect("reloads");
        assert_eq!(rotated.auth.secrets, vec![Secret::new("k8s")]);
    }

    #[test]
    fn parse_key_wants_32_hex_digits() {
        assert_eq!(
            parse_key("0x000102030405060708090a0b0c0d0e0f").map(|k| k[15]),
            Some(15)
        );
        assert!(parse_key("0x000102030405060708090a0b0c0d0e0").is_none());
        assert!(parse_key("0x000102030405060708090a0b0c0d0e0g").is_none());
    }

    #[test]
    fn secrets_never_print() {
        let s = check(
            "[auth]\nsecrets = [\"hunter2\"]\n[[auth.users]]\nname = \"u\"\npassword = \"pw\"\n",
        )
        .expect("valid");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }
}
