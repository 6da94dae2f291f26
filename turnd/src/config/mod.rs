//! turnd's configuration: the TOML file as written ([`Config`]), and the checked
//! runtime form the server uses ([`Settings`]).
//!
//! `Config::from_toml` parses (unknown keys are errors), `Config::load` adds reading
//! a file, and [`Config::validate`] turns a `Config` into [`Settings`], reading secrets
//! from files and the environment (through [`Env`], so tests never touch the process
//! environment). Every error carries the file, the line and the key ([`ConfigError`]).
//! [`Settings::embedded_default`] is what `turnd` runs with no configuration file.
//!
//! Addresses, CIDRs and durations are kept as text in [`Config`] and parsed in
//! `validate()`, so a bad value is reported with its key and line like any other error.

pub mod coturn;
mod error;
mod reload;
mod settings;
mod source;
mod validate;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use error::{ConfigError, ConfigErrors, Location, Reason};
pub use reload::{reload_plan, ReloadPlan};
pub use settings::{
    service_mode_name, AdminSettings, Auth, DrainSettings, ExternalIp, IoBackend, Lifetimes,
    Listeners, LogFormat, Logging, PeerPolicy, Quotas, Relay, Secret, Settings, SocketBuffers,
    StaticUser, TlsFiles,
};
use source::Origin;
/// What the server answers (`[server] stun_only`, `no_stun`): the core's type.
pub use turn_proto::server::ServiceMode;
pub use validate::{Checks, MIN_ADMIN_TOKEN_BYTES};

/// Environment variable holding one REST-API secret.
pub const ENV_AUTH_SECRET: &str = "TURND_AUTH_SECRET";
/// Environment variable naming a file of REST-API secrets (one per line).
pub const ENV_AUTH_SECRET_FILE: &str = "TURND_AUTH_SECRET_FILE";
/// Environment variable holding the admin API's bearer token. `[admin] token_file`, when
/// set, wins over it.
pub const ENV_ADMIN_TOKEN: &str = "TURND_ADMIN_TOKEN";
/// Environment variable naming a file that holds the admin API's bearer token (a mounted
/// Kubernetes Secret key: a change reloads). Used when `[admin] token_file` is not set; wins
/// over [`ENV_ADMIN_TOKEN`].
pub const ENV_ADMIN_TOKEN_FILE: &str = "TURND_ADMIN_TOKEN_FILE";

/// Read access to environment variables. The server uses [`ProcessEnv`]; tests pass a
/// [`MapEnv`] so they never call `std::env::set_var`.
pub trait Env {
    /// The variable's value, if set and valid Unicode.
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

/// A fixed set of variables, for tests and for callers that build an environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapEnv(pub BTreeMap<String, String>);

impl Env for MapEnv {
    fn var(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for MapEnv {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// A duration in the file: whole seconds (`600`) or a human-readable string (`"10m"`).
/// The text is parsed in `validate()`, so a bad value is reported with its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum DurationValue {
    /// Whole seconds.
    Seconds(u64),
    /// Text such as `"10m"`, `"1h 30m"`, `"600s"`.
    Text(String),
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DurationValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration: whole seconds (600) or text (\"10m\", \"1h 30m\")")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(DurationValue::Seconds(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(DurationValue::Seconds)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(DurationValue::Text(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The configuration file as written. Every section and key is optional; see
/// `deploy/turnd.example.toml` for each key's meaning and default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listening sockets.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Certificate and key for the TLS listeners.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Realm, static users and REST-API secrets.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Relay addresses, port range and external addresses.
    #[serde(default)]
    pub relay: RelayConfig,
    /// Lifetimes of allocations, permissions, channels and nonces.
    #[serde(default)]
    pub lifetimes: LifetimesConfig,
    /// Which peer addresses clients may relay to.
    #[serde(default)]
    pub peers: PeersConfig,
    /// Limits per user, per server and per allocation.
    #[serde(default)]
    pub quotas: QuotasConfig,
    /// Socket buffer sizes.
    #[serde(default)]
    pub sockets: SocketsConfig,
    /// TCP/TLS connection limits.
    #[serde(default)]
    pub streams: StreamsConfig,
    /// Process-wide settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The admin HTTP listener: metrics, health, admin API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub drain: DrainConfig,
    #[serde(skip)]
    origin: Origin,
}

/// Named defaults, shared by serde and the `Default` impls. Protocol defaults come from
/// their one home, [`turn_proto::defaults`]; the rest (sockets, ports, streams, admin) are
/// turnd's own.
pub mod defaults {
    use std::time::Duration;

    use turn_proto::defaults as core;

    use super::DurationValue;
    use crate::net::stream::StreamLimits;

    fn seconds(d: Duration) -> DurationValue {
        DurationValue::Seconds(d.as_secs())
    }

    /// UDP (and TCP) listeners: port 3478 on every IPv4 and IPv6 address.
    #[must_use]
    pub fn plain_listeners() -> Vec<String> {
        vec!["0.0.0.0:3478".to_owned(), "[::]:3478".to_owned()]
    }
    /// TLS listeners: 5349 and 443 on every address (used only with a certificate).
    #[must_use]
    pub fn tls_listeners() -> Vec<String> {
        ["0.0.0.0:5349", "[::]:5349", "0.0.0.0:443", "[::]:443"]
            .map(str::to_owned)
            .to_vec()
    }
    /// Whether RFC 5766's channel numbers 0x5000–0x7FFF are accepted too.
    #[must_use]
    pub fn rfc5766_channel_numbers() -> bool {
        core::RFC5766_CHANNEL_NUMBERS
    }
    /// The realm.
    #[must_use]
    pub fn realm() -> String {
        core::REALM.to_owned()
    }
    /// First relay port.
    #[must_use]
    pub fn min_port() -> u16 {
        49152
    }
    /// Last relay port.
    #[must_use]
    pub fn max_port() -> u16 {
        50175
    }
    /// Allocation lifetime when the client asks for none (RFC 8656 §7.2: 10 minutes).
    #[must_use]
    pub fn allocation() -> DurationValue {
        seconds(core::DEFAULT_LIFETIME)
    }
    /// Time for the first byte and the TLS handshake of a connection.
    #[must_use]
    pub fn handshake_timeout() -> DurationValue {
        seconds(StreamLimits::default().handshake_timeout)
    }
    /// Idle time allowed to a connection without an allocation.
    #[must_use]
    pub fn idle_timeout() -> DurationValue {
        seconds(StreamLimits::default().idle_timeout)
    }
    /// Connections per source IP.
    #[must_use]
    pub fn max_connections_per_ip() -> usize {
        StreamLimits::default().max_per_ip
    }
    /// Connections in total.
    #[must_use]
    pub fn max_connections() -> usize {
        StreamLimits::default().max_total
    }
    /// Per-connection write queue.
    #[must_use]
    pub fn write_buffer_bytes() -> usize {
        StreamLimits::default().write_buffer
    }
    /// Longest allocation lifetime granted.
    #[must_use]
    pub fn max_allocation() -> DurationValue {
        seconds(core::MAX_LIFETIME)
    }
    /// Permission lifetime (RFC 8656 §9: 300 s).
    #[must_use]
    pub fn permission() -> DurationValue {
        seconds(core::PERMISSION_LIFETIME)
    }
    /// Channel binding lifetime (RFC 8656 §12: 10 minutes).
    #[must_use]
    pub fn channel() -> DurationValue {
        seconds(core::CHANNEL_LIFETIME)
    }
    /// How long a nonce stays valid before the client gets 438 Stale Nonce.
    #[must_use]
    pub fn nonce() -> DurationValue {
        seconds(core::NONCE_LIFETIME)
    }
    /// Permissions one allocation may hold.
    #[must_use]
    pub fn permissions_per_allocation() -> usize {
        core::MAX_PERMISSIONS_PER_ALLOCATION
    }
    /// Log filter.
    #[must_use]
    pub fn log_level() -> String {
        "info".to_owned()
    }
    /// The admin listener: loopback, coturn's Prometheus port.
    #[must_use]
    pub fn admin_listen() -> String {
        "127.0.0.1:9641".to_owned()
    }
    /// How long a drain waits for the last allocation before exiting.
    #[must_use]
    pub fn drain_timeout() -> DurationValue {
        DurationValue::Seconds(120)
    }
}

/// `[listen]`: addresses as `IP:port`; IPv6 as `[addr]:port`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// UDP listeners. Default `0.0.0.0:3478` and `[::]:3478`; `[]` disables UDP.
    #[serde(default = "defaults::plain_listeners")]
    pub udp: Vec<String>,
    /// TCP listeners (served once TURN over TCP lands, issue 4). Default port 3478.
    #[serde(default = "defaults::plain_listeners")]
    pub tcp: Vec<String>,
    /// TLS listeners (issue 4). Default ports 5349 and 443, only when `[tls]` has a
    /// certificate; set explicitly, they require one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Vec<String>>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            udp: defaults::plain_listeners(),
            tcp: defaults::plain_listeners(),
            tls: None,
        }
    }
}

/// `[tls]`: PEM certificate chain and private key (issue 4 loads and reloads them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// PEM private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The realm sent in 401 responses and hashed into long-term keys.
    #[serde(default = "defaults::realm")]
    pub realm: String,
    /// TURN REST API shared secrets; the first signs, all verify (rotation).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Files holding REST API secrets, one per non-empty line.
    #[serde(default)]
    pub secret_files: Vec<String>,
    /// Static long-term users.
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            realm: defaults::realm(),
            secrets: Vec::new(),
            secret_files: Vec::new(),
            users: Vec::new(),
        }
    }
}

/// `[[auth.users]]`: a name and either a password or the key `turnd key` /
/// `turnadmin -k` prints.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The username.
    pub name: String,
    /// The password in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// `0x` + 32 hex digits: MD5(name:realm:password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// `[relay]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Addresses relay sockets bind to. Empty: the address the request arrived on.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// First relay port.
    #[serde(default = "defaults::min_port")]
    pub min_port: u16,
    /// Last relay port (inclusive).
    #[serde(default = "defaults::max_port")]
    pub max_port: u16,
    /// `"PUBLIC"` or `"PUBLIC/PRIVATE"`, as coturn's `external-ip`: the address to
    /// advertise in XOR-RELAYED-ADDRESS for relay sockets bound to PRIVATE.
    #[serde(default)]
    pub external_ips: Vec<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            addresses: Vec::new(),
            min_port: defaults::min_port(),
            max_port: defaults::max_port(),
            external_ips: Vec::new(),
        }
    }
}

/// `[lifetimes]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LifetimesConfig {
    /// Allocation lifetime when the request has no LIFETIME.
    #[serde(default = "defaults::allocation")]
    pub allocation: DurationValue,
    /// Upper bound on the lifetime a client may request.
    #[serde(default = "defaults::max_allocation")]
    pub max_allocation: DurationValue,
    /// Permission lifetime.
    #[serde(default = "defaults::permission")]
    pub permission: DurationValue,
    /// Channel binding lifetime.
    #[serde(default = "defaults::channel")]
    pub channel: DurationValue,
    /// Nonce validity.
    #[serde(default = "defaults::nonce")]
    pub nonce: DurationValue,
}

impl Default for LifetimesConfig {
    fn default() -> Self {
        Self {
            allocation: defaults::allocation(),
            max_allocation: defaults::max_allocation(),
            permission: defaults::permission(),
            channel: defaults::channel(),
            nonce: defaults::nonce(),
        }
    }
}

/// `[peers]`: a peer is allowed if it matches `allow`, else denied if it matches
/// `deny` or the core's built-in list of non-public ranges, else allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    /// CIDRs or single IPs always allowed.
    #[serde(default)]
    pub allow: Vec<String>,
    /// CIDRs or single IPs denied.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `[quotas]`: 0 means no limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuotasConfig {
    /// Allocations one username may hold at once (486 beyond).
    #[serde(default)]
    pub allocations_per_user: u32,
    /// Allocations the server holds at once (508 Insufficient Capacity beyond).
    #[serde(default)]
    pub total_allocations: u32,
    /// Permissions one allocation may hold (508 beyond).
    #[serde(default = "defaults::permissions_per_allocation")]
    pub permissions_per_allocation: usize,
    /// 401 challenges answered per source address per second; 0 = no limit.
    #[serde(default)]
    pub challenges_per_source_per_second: u32,
}

impl Default for QuotasConfig {
    fn default() -> Self {
        Self {
            allocations_per_user: 0,
            total_allocations: 0,
            permissions_per_allocation: defaults::permissions_per_allocation(),
            challenges_per_source_per_second: 0,
        }
    }
}

/// `[sockets]`: buffer sizes in bytes; 0 or absent keeps the OS default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SocketsConfig {
    /// SO_RCVBUF of listener sockets.
    #[serde(default)]
    pub recv_buffer_bytes: u64,
    /// SO_SNDBUF of listener sockets.
    #[serde(default)]
    pub send_buffer_bytes: u64,
    /// SO_RCVBUF of relay sockets.
    #[serde(default)]
    pub relay_recv_buffer_bytes: u64,
    /// SO_SNDBUF of relay sockets.
    #[serde(default)]
    pub relay_send_buffer_bytes: u64,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// IO workers; 0 means one per CPU core.
    #[serde(default)]
    pub workers: usize,
    /// Also accept channel numbers 0x5000–0x7FFF (RFC 5766; RFC 8656 reserved them), as
    /// coturn does: on by default; `false` answers them 400 (RFC 8656's 0x4000–0x4FFF).
    /// Browsers and libwebrtc use 0x4000 upward; coturn's `turnutils_uclient` picks at random
    /// up to 0x7FFF.
    #[serde(default = "defaults::rfc5766_channel_numbers")]
    pub rfc5766_channel_numbers: bool,
    /// The IO backend: `auto` (io_uring when the kernel allows it, else epoll), `io_uring`
    /// or `epoll`.
    #[serde(default)]
    pub io: IoBackend,
    /// Answer STUN Binding only; every TURN request gets 400 (coturn's `stun-only`).
    #[serde(default)]
    pub stun_only: bool,
    /// Serve TURN only; Binding requests are not answered (coturn's `no-stun`).
    #[serde(default)]
    pub no_stun: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            rfc5766_channel_numbers: defaults::rfc5766_channel_numbers(),
            io: IoBackend::default(),
            stun_only: false,
            no_stun: false,
        }
    }
}

/// `[streams]`: TCP and TLS connection hygiene.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsConfig {
    /// Time allowed for the first byte and the TLS handshake.
    #[serde(default = "defaults::handshake_timeout")]
    pub handshake_timeout: DurationValue,
    /// A connection without an allocation is closed after this long without a frame.
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: DurationValue,
    /// Most connections from one IP address.
    #[serde(default = "defaults::max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Most connections in total.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Bytes queued toward one client before relayed data to it is dropped.
    #[serde(default = "defaults::write_buffer_bytes")]
    pub write_buffer_bytes: usize,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: defaults::handshake_timeout(),
            idle_timeout: defaults::idle_timeout(),
            max_connections_per_ip: defaults::max_connections_per_ip(),
            max_connections: defaults::max_connections(),
            write_buffer_bytes: defaults::write_buffer_bytes(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A level (`error`..`trace`) or a tracing filter such as `info,turnd=debug`.
    /// `RUST_LOG`, when set, takes precedence.
    #[serde(default = "defaults::log_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: defaults::log_level(),
            format: LogFormat::default(),
        }
    }
}

/// `[admin]`: one HTTP listener per process for `/metrics`, `/live`, `/ready` and the
/// token-protected admin API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `IP:port`; `""` turns the admin listener off.
    #[serde(default = "defaults::admin_listen")]
    pub listen: String,
    /// A file whose trimmed content is the bearer token of the admin endpoints. Wins over
    /// `TURND_ADMIN_TOKEN`. Without a token the admin endpoints are off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: defaults::admin_listen(),
            token_file: None,
        }
    }
}

/// `[drain]`: what SIGTERM (or `POST /drain`) does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DrainConfig {
    /// The longest a drain waits for the last allocation to end.
    #[serde(default = "defaults::drain_timeout")]
    pub timeout: DurationValue,
    /// Siblings named in 300 ALTERNATE-SERVER answers while draining, `"IP:port"`:
    /// at most one IPv4 and one IPv6.
    #[serde(default)]
    pub alternate_servers: Vec<String>,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            timeout: defaults::drain_timeout(),
            alternate_servers: Vec::new(),
        }
    }
}

impl Config {
    /// Parses TOML text. Errors name `<string>` as the file; [`Config::load`] names the path.
    ///
    /// # Errors
    /// Syntax errors, wrong value types and unknown keys, with line and key.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::parse_named(text, "<string>")
    }

    /// Reads and parses a file.
    ///
    /// # Errors
    /// The file cannot be read, or [`Config::from_toml`] rejects it.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                Location {
                    file: name.clone(),
                    line: None,
                    column: None,
                    key: None,
                },
                Reason::Read(e),
            )
        })?;
        let mut config = Self::parse_named(&text, &name)?;
        config.origin.path = Some(path.to_owned());
        Ok(config)
    }

    /// Parses `text`, naming it `name` in errors.
    ///
    /// # Errors
    /// As [`Config::from_toml`].
    pub fn parse_named(text: &str, name: &str) -> Result<Self, ConfigError> {
        let origin = Origin {
            name: name.to_owned(),
            text: Some(Arc::from(text)),
            path: None,
        };
        match toml::from_str::<Self>(text) {
            Ok(mut config) => {
                config.origin = origin;
                Ok(config)
            }
            Err(e) => Err(parse_error(&origin, &e)),
        }
    }

    /// The file name or label used in error messages.
    #[must_use]
    pub fn source_name(&self) -> &str {
        &self.origin.name
    }

    /// Checks every value and builds the runtime [`Settings`]. Reads the secret files,
    /// the admin token file and `TURND_AUTH_SECRET` / `TURND_AUTH_SECRET_FILE` /
    /// `TURND_ADMIN_TOKEN` from `env`.
    ///
    /// # Errors
    /// The first problem in the file, with file, line and key; [`Config::validate_all`]
    /// reports every one.
    pub fn validate(&self, env: &dyn Env) -> Result<Settings, ConfigError> {
        self.validate_all(env, Checks::default())
            .map_err(ConfigErrors::into_first)
    }

    /// As [`Config::validate`], reporting every error in the file, with the extra
    /// `checks` (`turnd check-config` opens the TLS files too).
    ///
    /// # Errors
    /// Every problem found, in file order.
    pub fn validate_all(&self, env: &dyn Env, checks: Checks) -> Result<Settings, ConfigErrors> {
        validate::validate(self, &self.origin, env, checks, false)
    }
}

/// Turns a serde/TOML error into a located [`ConfigError`].
fn parse_error(origin: &Origin, e: &toml::de::Error) -> ConfigError {
    let offset = e.span().map(|s| s.start);
    let key = offset.and_then(|o| origin.key_at(o));
    let message = e.message().trim().to_owned();
    let reason = match message.strip_prefix("unknown field `") {
        Some(rest) => {
            let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
            let expected = expected
                .trim_start_matches(',')
                .trim()
                .trim_start_matches("expected one of ")
                .trim_start_matches("expected ")
                .replace('`', "");
            Reason::UnknownKey {
                key: field.to_owned(),
                expected,
            }
        }
        None => Reason::Syntax { message },
    };
    origin.error_at_offset(offset, key, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_equals_defaults() {
        let parsed = Config::from_toml("").expect("empty parses");
        let default = Config {
            origin: parsed.origin.clone(),
            ..Config::default()
        };
        assert_eq!(parsed, default);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = "[relay]\nmin_port = 50000\nmax_prot = 50100\n";
        let err = Config::from_toml(text).expect_err("typo rejected");
        assert_eq!(err.location.line, Some(3));
        assert_eq!(err.location.key.as_deref(), Some("relay.max_prot"));
        match err.reason() {
            Reason::UnknownKey { key, expected } => {
                assert_eq!(key, "max_prot");
                assert!(expected.contains("max_port"), "{expected}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("<string>:3:1: relay.max_prot: unknown key"),
            "{err}"
        );
    }

    #[test]
    fn unknown_section_is_rejected() {
        let err = Config::from_toml("[listening]\nport = 1\n").expect_err("rejected");
        assert_eq!(err.location.line, Some(1));
        assert!(matches!(err.reason(), Reason::UnknownKey { key, .. } if key == "listening"));
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let err = Config::from_toml("[relay]\n\nmin_port = \"low\"\n").expect_err("rejected");
        assert_eq!(err.location.line, Some(3));
        assert_eq!(err.location.key.as_deref(), Some("relay.min_port"));
    }

    #[test]
    fn log_format_must_be_text_or_json() {
        let err = Config::from_toml("[log]\nformat = \"xml\"\n").expect_err("rejected");
        assert_eq!(err.location.line, Some(2));
        assert_eq!(err.location.key.as_deref(), Some("log.format"));
        let ok = Config::from_toml("[log]\nformat = \"json\"\n").expect("json ok");
        assert_eq!(ok.log.format, LogFormat::Json);
    }

    #[test]
    fn syntax_error_has_a_line() {
        let err = Config::from_toml("[relay]\nmin_port = = 3\n").expect_err("rejected");
        assert_eq!(err.location.line, Some(2));
        assert!(matches!(err.reason(), Reason::Syntax { .. }));
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "bogus = 1\n").expect("write");
        let err = Config::load(&path).expect_err("rejected");
        assert_eq!(err.location.file, path.display().to_string());
        let err = Config::load(dir.path().join("missing.toml")).expect_err("missing");
        assert!(matches!(err.reason(), Reason::Read(_)));
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[test]
    fn the_shipped_example_parses_and_validates() {
        let text = include_str!("../../../deploy/turnd.example.toml");
        let config = Config::parse_named(text, "deploy/turnd.example.toml").expect("parses");
        let s = config.validate(&MapEnv::default()).expect("validates");
        let private: std::net::IpAddr = "10.10.10.11".parse().expect("ip");
        assert_eq!(s.relay.addresses, vec![private]);
        assert_eq!(s.relay.advertised(private).to_string(), "94.130.141.98");
        assert_eq!(
            s.listeners.udp,
            vec!["10.10.10.11:3478".parse().expect("addr")]
        );
        assert_eq!(s.listeners.tls.len(), 2);
        assert_eq!(s.auth.realm, "turn.example.org");
        assert_eq!(
            s.auth.users["monitoring"].key_md5("turn.example.org"),
            turn_proto::auth::long_term_key_md5(
                "monitoring",
                "turn.example.org",
                "watch-the-relay"
            )
        );
        assert_eq!(s.log.format, LogFormat::Json);
        // Every section of Config appears in the example.
        for section in [
            "listen",
            "tls",
            "auth",
            "relay",
            "lifetimes",
            "peers",
            "quotas",
            "sockets",
            "server",
            "log",
            "admin",
            "drain",
        ] {
            assert!(
                text.contains(&format!("[{section}]")),
                "example lacks [{section}]"
            );
        }
    }

    #[test]
    fn durations_of_the_wrong_type_say_what_is_expected() {
        let err = Config::from_toml("[lifetimes]\nchannel = true\n").expect_err("bool");
        assert_eq!(err.location.key.as_deref(), Some("lifetimes.channel"));
        assert!(
            err.to_string().contains("whole seconds (600) or text"),
            "{err}"
        );
        let err = Config::from_toml("[lifetimes]\nchannel = -5\n").expect_err("negative");
        assert_eq!(err.location.line, Some(2));
    }

    #[test]
    fn every_key_is_shown_in_the_example() {
        let text = include_str!("../../../deploy/turnd.example.toml");
        let defaults = toml::Value::try_from(Config::default()).expect("serializes");
        let mut missing = Vec::new();
        let toml::Value::Table(sections) = defaults else {
            panic!("a table")
        };
        for (section, keys) in &sections {
            let toml::Value::Table(keys) = keys else {
                continue;
            };
            let names = keys.keys().map(String::as_str);
            // Optional keys without a default are not serialized; name them here.
            let optional: &[&str] = match section.as_str() {
                "listen" => &["tls"],
                "tls" => &["cert", "key"],
                "admin" => &["token_file"],
                _ => &[],
            };
            for key in names.chain(optional.iter().copied()) {
                let table_array = format!("[[{section}.{key}]]");
                // A key without a default may be shown commented out (`# key = ...`).
                if !text.lines().any(|l| {
                    let l = l.trim_start();
                    let l = l.strip_prefix("# ").unwrap_or(l);
                    l.starts_with(&format!("{key} =")) || l.starts_with(&table_array)
                }) {
                    missing.push(format!("{section}.{key}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "not in deploy/turnd.example.toml: {missing:?}"
        );
    }

    #[test]
    fn durations_accept_seconds_and_text() {
        let c = Config::from_toml("[lifetimes]\nallocation = 300\nmax_allocation = \"2h\"\n")
            .expect("parses");
        assert_eq!(c.lifetimes.allocation, DurationValue::Seconds(300));
        assert_eq!(c.lifetimes.max_allocation, DurationValue::Text("2h".into()));
    }
}
