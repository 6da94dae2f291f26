//! `validate()`: from the file as written ([`Config`]) to the checked runtime form
//! ([`Settings`]), one function per section.
//!
//! Every section is checked even after an error, and every error is kept, so
//! `turnd check-config` reports all the mistakes in a file at once. A value that failed
//! is replaced by a placeholder only so the remaining checks can run; settings are
//! returned only when there was no error at all.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use rand::RngCore as _;
use turn_proto::auth::{CandidateKeys, UserSecret};
use turn_proto::server::ServiceMode;

use super::error::{ConfigError, ConfigErrors, Reason};
use super::settings::{
    AdminSettings, Auth, DrainSettings, ExternalIp, Lifetimes, Listeners, Logging, PeerPolicy,
    Quotas, Relay, Secret, Settings, SocketBuffers, StaticUser, TlsFiles,
};
use super::source::Origin;
use super::{
    defaults, Config, DurationValue, Env, ENV_ADMIN_TOKEN, ENV_ADMIN_TOKEN_FILE, ENV_AUTH_SECRET,
    ENV_AUTH_SECRET_FILE,
};
use crate::net::stream::StreamLimits;

/// What a validation checks beyond the values themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checks {
    /// Open and parse the files the server will need at start: the TLS certificate chain
    /// and private key (PEM, and that they belong together). Secret and token files are
    /// always read, since their content is part of the settings.
    pub files: bool,
    /// Accept a configuration without any credential: its secret comes from the
    /// environment (`TURND_AUTH_SECRET` or `TURND_AUTH_SECRET_FILE`) where it runs, not
    /// where it is checked.
    pub allow_missing_secret: bool,
}

/// The smallest admin token accepted, in bytes.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// The largest socket buffer accepted, in bytes.
const MAX_BUFFER: u64 = 1 << 30;

/// The most workers accepted.
const MAX_WORKERS: usize = 1024;

/// Durations are between these bounds.
const MIN_DURATION: Duration = Duration::from_secs(1);
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Collects the errors of one validation.
struct Checker<'a> {
    origin: &'a Origin,
    env: &'a dyn Env,
    checks: Checks,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    /// Records an error at a dotted key.
    fn error(&mut self, key: &str, reason: Reason) {
        self.errors.push(self.origin.error_at(key, reason));
    }

    /// Records an error about an environment variable.
    fn env_error(&mut self, var: &str, reason: Reason) {
        let mut e = self
            .origin
            .error_at_offset(None, Some(var.to_owned()), reason);
        e.location.file = "environment".to_owned();
        self.errors.push(e);
    }

    /// The number of errors so far, to tell whether a section added any.
    fn count(&self) -> usize {
        self.errors.len()
    }
}

/// Builds [`Settings`] from `config`, reporting every error; `generate_secret` allows a
/// generated secret instead of the "no credentials" error (the embedded default).
pub(super) fn validate(
    config: &Config,
    origin: &Origin,
    env: &dyn Env,
    checks: Checks,
    generate_secret: bool,
) -> Result<Settings, ConfigErrors> {
    let mut ck = Checker {
        origin,
        env,
        checks,
        errors: Vec::new(),
    };
    let (listeners, tls) = listen(&mut ck, config);
    let auth = auth(&mut ck, config, generate_secret);
    let relay = relay(&mut ck, config);
    let lifetimes = lifetimes(&mut ck, config);
    let peers = peers(&mut ck, config);
    let quotas = quotas(&mut ck, config);
    let sockets = sockets(&mut ck, config);
    let server = server(&mut ck, config);
    let streams = streams(&mut ck, config);
    let log = log(&mut ck, config);
    let admin = admin(&mut ck, config);
    let drain = drain(&mut ck, config);

    if let Some(errors) = ConfigErrors::from_vec(ck.errors) {
        return Err(errors);
    }
    let mut watched_files: Vec<PathBuf> =
        config.auth.secret_files.iter().map(PathBuf::from).collect();
    watched_files.extend(ck.env.var(ENV_AUTH_SECRET_FILE).map(PathBuf::from));
    watched_files.extend(admin_token_file(config, ck.env).map(|(file, _)| PathBuf::from(file)));
    Ok(Settings {
        source: origin.name.clone(),
        config_path: origin.path.clone(),
        watched_files,
        listeners,
        tls,
        auth,
        relay,
        lifetimes,
        peers,
        quotas,
        sockets,
        workers: server.workers,
        rfc5766_channel_numbers: config.server.rfc5766_channel_numbers,
        streams,
        log,
        io: config.server.io,
        mode: server.mode,
        admin,
        drain,
        origin: origin.clone(),
    })
}

/// `[listen]` and `[tls]`.
fn listen(ck: &mut Checker<'_>, config: &Config) -> (Listeners, Option<TlsFiles>) {
    let before = ck.count();
    let udp = socket_addrs(ck, &config.listen.udp, "listen.udp");
    let tcp = socket_addrs(ck, &config.listen.tcp, "listen.tcp");
    let tls_files = tls_files(ck, config);
    let tls = match (&config.listen.tls, &tls_files) {
        (Some(list), _) => {
            let addrs = socket_addrs(ck, list, "listen.tls");
            if !addrs.is_empty() && tls_files.is_none() && config.tls == Default::default() {
                ck.error(
                    "listen.tls",
                    Reason::Conflict("TLS listeners need tls.cert and tls.key"),
                );
            }
            addrs
        }
        (None, Some(_)) => socket_addrs(ck, &defaults::tls_listeners(), "listen.tls"),
        (None, None) => Vec::new(),
    };
    if ck.count() == before && udp.is_empty() && tcp.is_empty() && tls.is_empty() {
        ck.error("listen", Reason::NoListener);
    }
    (Listeners { udp, tcp, tls }, tls_files)
}

/// `[tls]`: both paths or neither; with [`Checks::files`], the files load.
fn tls_files(ck: &mut Checker<'_>, config: &Config) -> Option<TlsFiles> {
    let files = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => {
            let mut ok = true;
            for (k, v) in [("tls.cert", cert), ("tls.key", key)] {
                if v.trim().is_empty() {
                    ck.error(
                        k,
                        Reason::Unusable {
                            value: v.clone(),
                            detail: "empty path",
                        },
                    );
                    ok = false;
                }
            }
            if !ok {
                return None;
            }
            TlsFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }
        }
        (None, None) => return None,
        (Some(_), None) => {
            ck.error(
                "tls.cert",
                Reason::Conflict("tls.cert is set but tls.key is not"),
            );
            return None;
        }
        (None, Some(_)) => {
            ck.error(
                "tls.key",
                Reason::Conflict("tls.key is set but tls.cert is not"),
            );
            return None;
        }
    };
    if ck.checks.files {
        // The loader the server uses, so the check is exactly what start-up will do.
        if let Err(e) = crate::net::tls::Tls::load(&files.cert, &files.key) {
            let key = match &e {
                crate::net::tls::TlsError::File { path, .. } if *path == files.cert => "tls.cert",
                _ => "tls.key",
            };
            ck.error(
                key,
                Reason::Tls {
                    detail: e.to_string(),
                },
            );
        }
    }
    Some(files)
}

/// `[auth]` and the secrets of the environment.
fn auth(ck: &mut Checker<'_>, config: &Config, generate_secret: bool) -> Auth {
    let a = &config.auth;
    let realm = a.realm.clone();
    if realm.is_empty() || realm.chars().count() > 763 || realm.contains('"') {
        ck.error(
            "auth.realm",
            Reason::Unusable {
                value: realm.clone(),
                detail: "a realm is 1 to 763 characters without `\"` (RFC 8489 §14.9)",
            },
        );
    }
    // Errors from here on are about credentials that were configured but unusable.
    let before = ck.count();
    let users = users(ck, config);
    let mut secrets = Vec::new();
    for (i, s) in a.secrets.iter().enumerate() {
        let at = format!("auth.secrets[{i}]");
        if s.is_empty() {
            ck.error(&at, Reason::EmptySecret(at.clone()));
        } else {
            secrets.push(Secret::new(s.clone()));
        }
    }
    for (i, f) in a.secret_files.iter().enumerate() {
        match read_secret_file(f) {
            Ok(s) => secrets.extend(s),
            Err(r) => ck.error(&format!("auth.secret_files[{i}]"), r),
        }
    }
    if let Some(s) = ck.env.var(ENV_AUTH_SECRET) {
        let s = s.trim();
        if s.is_empty() {
            ck.env_error(ENV_AUTH_SECRET, Reason::EmptySecret(ENV_AUTH_SECRET.into()));
        } else {
            secrets.push(Secret::new(s));
        }
    }
    if let Some(f) = ck.env.var(ENV_AUTH_SECRET_FILE) {
        match read_secret_file(&f) {
            Ok(s) => secrets.extend(s),
            Err(r) => ck.env_error(ENV_AUTH_SECRET_FILE, r),
        }
    }
    if secrets.len() > CandidateKeys::MAX {
        ck.error(
            "auth.secrets",
            Reason::OutOfRange {
                value: secrets.len().to_string(),
                detail: "at most 8 REST-API secrets in all (auth.secrets, auth.secret_files \
                         and the environment together)",
            },
        );
    }
    let mut generated_secret = false;
    // "No credentials" only when nothing was configured (a secret file that failed to read
    // has its own error already) and TURN is served at all.
    let stun_only = config.server.stun_only && !config.server.no_stun;
    if secrets.is_empty() && users.is_empty() && ck.count() == before && !stun_only {
        if generate_secret {
            secrets.push(random_secret());
            generated_secret = true;
        } else if !ck.checks.allow_missing_secret {
            ck.error("auth", Reason::NoCredentials);
        }
    }
    Auth {
        realm,
        users,
        secrets,
        generated_secret,
    }
}

/// `[[auth.users]]`.
fn users(ck: &mut Checker<'_>, config: &Config) -> HashMap<String, StaticUser> {
    let mut users = HashMap::new();
    for (i, u) in config.auth.users.iter().enumerate() {
        let at = format!("auth.users[{i}]");
        if u.name.is_empty() {
            ck.error(
                &format!("{at}.name"),
                Reason::Unusable {
                    value: String::new(),
                    detail: "empty username",
                },
            );
            continue;
        }
        let secret = match (&u.password, &u.key) {
            (Some(p), None) => UserSecret::Password(p.clone()),
            (None, Some(k)) => match parse_key(k) {
                Some(key) => UserSecret::Md5Key(key),
                None => {
                    ck.error(&format!("{at}.key"), Reason::BadKey(k.clone()));
                    continue;
                }
            },
            _ => {
                ck.error(&at, Reason::UserCredential(u.name.clone()));
                continue;
            }
        };
        let user = StaticUser {
            name: u.name.clone(),
            secret,
        };
        if users.insert(u.name.clone(), user).is_some() {
            ck.error(&format!("{at}.name"), Reason::Duplicate(u.name.clone()));
        }
    }
    users
}

/// `[relay]`.
fn relay(ck: &mut Checker<'_>, config: &Config) -> Relay {
    let r = &config.relay;
    if r.min_port == 0 {
        ck.error(
            "relay.min_port",
            Reason::OutOfRange {
                value: "0".into(),
                detail: "relay ports are 1..=65535",
            },
        );
    }
    if r.min_port > r.max_port {
        ck.error(
            "relay.max_port",
            Reason::InvertedPortRange {
                min: r.min_port,
                max: r.max_port,
            },
        );
    }
    // Several addresses per family are fine: the IO layer serves allocations on each.
    let mut addresses = Vec::new();
    for (i, a) in r.addresses.iter().enumerate() {
        let at = format!("relay.addresses[{i}]");
        let Some(ip) = parse_ip(a) else {
            ck.error(
                &at,
                Reason::BadAddress {
                    value: a.clone(),
                    what: "IP address",
                },
            );
            continue;
        };
        if ip.is_unspecified() || ip.is_multicast() {
            ck.error(
                &at,
                Reason::Unusable {
                    value: a.clone(),
                    detail: "a relay address must be a unicast address of this host \
                             (omit relay.addresses to relay from the listener's address)",
                },
            );
        } else if addresses.contains(&ip) {
            ck.error(&at, Reason::Duplicate(a.clone()));
        } else {
            addresses.push(ip);
        }
    }
    let addresses_ok = addresses.len() == r.addresses.len();
    let mut external_ips: Vec<ExternalIp> = Vec::new();
    for (i, e) in r.external_ips.iter().enumerate() {
        let at = format!("relay.external_ips[{i}]");
        let parsed = match e.split_once('/') {
            Some((p, q)) => parse_ip(p).zip(parse_ip(q).map(Some)),
            None => parse_ip(e).map(|p| (p, None)),
        };
        let Some((public, private)) = parsed else {
            ck.error(
                &at,
                Reason::BadAddress {
                    value: e.clone(),
                    what: "PUBLIC or PUBLIC/PRIVATE IP pair",
                },
            );
            continue;
        };
        let unusable = |detail| Reason::Unusable {
            value: e.clone(),
            detail,
        };
        if public.is_unspecified() || private.is_some_and(|p| p.is_unspecified()) {
            ck.error(&at, unusable("unspecified address"));
            continue;
        }
        if private.is_some_and(|p| p.is_ipv4() != public.is_ipv4()) {
            ck.error(
                &at,
                unusable("PUBLIC and PRIVATE must be the same IP family"),
            );
            continue;
        }
        let clash = external_ips.iter().any(|x| match private {
            Some(p) => x.private == Some(p),
            None => x.private.is_none() && x.public.is_ipv4() == public.is_ipv4(),
        });
        if clash {
            ck.error(&at, Reason::Duplicate(e.clone()));
            continue;
        }
        if addresses_ok && private.is_some_and(|p| !addresses.is_empty() && !addresses.contains(&p))
        {
            ck.error(
                &at,
                unusable(
                    "PRIVATE is not one of relay.addresses, so this mapping would never apply",
                ),
            );
            continue;
        }
        external_ips.push(ExternalIp { public, private });
    }
    Relay {
        addresses,
        ports: r.min_port..=r.max_port,
        external_ips,
    }
}

/// `[lifetimes]`.
fn lifetimes(ck: &mut Checker<'_>, config: &Config) -> Lifetimes {
    let l = &config.lifetimes;
    let allocation = duration(ck, &l.allocation, "lifetimes.allocation");
    let max_allocation = duration(ck, &l.max_allocation, "lifetimes.max_allocation");
    if let (Some(a), Some(m)) = (allocation, max_allocation) {
        if a > m {
            ck.error(
                "lifetimes.allocation",
                Reason::Conflict("lifetimes.allocation is longer than lifetimes.max_allocation"),
            );
        }
    }
    Lifetimes {
        allocation: allocation.unwrap_or_default(),
        max_allocation: max_allocation.unwrap_or_default(),
        permission: duration(ck, &l.permission, "lifetimes.permission").unwrap_or_default(),
        channel: duration(ck, &l.channel, "lifetimes.channel").unwrap_or_default(),
        nonce: duration(ck, &l.nonce, "lifetimes.nonce").unwrap_or_default(),
    }
}

/// `[peers]`.
fn peers(ck: &mut Checker<'_>, config: &Config) -> PeerPolicy {
    PeerPolicy {
        allow: cidrs(ck, &config.peers.allow, "peers.allow"),
        deny: cidrs(ck, &config.peers.deny, "peers.deny"),
    }
}

/// `[quotas]`.
fn quotas(ck: &mut Checker<'_>, config: &Config) -> Quotas {
    let q = &config.quotas;
    let permissions = NonZeroUsize::new(q.permissions_per_allocation);
    if permissions.is_none() {
        ck.error(
            "quotas.permissions_per_allocation",
            Reason::OutOfRange {
                value: "0".into(),
                detail: "an allocation needs at least one permission",
            },
        );
    }
    Quotas {
        allocations_per_user: NonZeroU32::new(q.allocations_per_user),
        total_allocations: NonZeroU32::new(q.total_allocations),
        permissions_per_allocation: permissions.unwrap_or(NonZeroUsize::MIN),
        challenges_per_source_per_second: NonZeroU32::new(q.challenges_per_source_per_second),
    }
}

/// `[sockets]`.
fn sockets(ck: &mut Checker<'_>, config: &Config) -> SocketBuffers {
    let s = &config.sockets;
    let mut buf = |v: u64, key: &str| -> Option<usize> {
        if v > MAX_BUFFER {
            ck.error(
                key,
                Reason::OutOfRange {
                    value: v.to_string(),
                    detail: "at most 1 GiB",
                },
            );
            return None;
        }
        usize::try_from(v).ok().filter(|&v| v > 0)
    };
    SocketBuffers {
        recv: buf(s.recv_buffer_bytes, "sockets.recv_buffer_bytes"),
        send: buf(s.send_buffer_bytes, "sockets.send_buffer_bytes"),
        relay_recv: buf(s.relay_recv_buffer_bytes, "sockets.relay_recv_buffer_bytes"),
        relay_send: buf(s.relay_send_buffer_bytes, "sockets.relay_send_buffer_bytes"),
    }
}

/// What `[server]` yields besides the values copied as they are.
struct Server {
    workers: NonZeroUsize,
    mode: ServiceMode,
}

/// `[server]`.
fn server(ck: &mut Checker<'_>, config: &Config) -> Server {
    let s = &config.server;
    if s.workers > MAX_WORKERS {
        ck.error(
            "server.workers",
            Reason::OutOfRange {
                value: s.workers.to_string(),
                detail: "0 (one per core) to 1024",
            },
        );
    }
    let workers = NonZeroUsize::new(s.workers)
        .unwrap_or_else(|| std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN));
    let mode = match (s.stun_only, s.no_stun) {
        (false, false) => ServiceMode::Turn,
        (true, false) => ServiceMode::StunOnly,
        (false, true) => ServiceMode::NoStun,
        (true, true) => {
            ck.error(
                "server.no_stun",
                Reason::Conflict(
                    "server.stun_only and server.no_stun together would answer nothing",
                ),
            );
            ServiceMode::Turn
        }
    };
    Server { workers, mode }
}

/// `[streams]`.
fn streams(ck: &mut Checker<'_>, config: &Config) -> StreamLimits {
    let st = &config.streams;
    let mut positive = |v: usize, key: &str| {
        if v == 0 {
            ck.error(
                key,
                Reason::OutOfRange {
                    value: "0".into(),
                    detail: "must be at least 1",
                },
            );
        }
        v
    };
    let max_per_ip = positive(st.max_connections_per_ip, "streams.max_connections_per_ip");
    let max_total = positive(st.max_connections, "streams.max_connections");
    let write_buffer = positive(st.write_buffer_bytes, "streams.write_buffer_bytes");
    StreamLimits {
        handshake_timeout: duration(ck, &st.handshake_timeout, "streams.handshake_timeout")
            .unwrap_or_default(),
        idle_timeout: duration(ck, &st.idle_timeout, "streams.idle_timeout").unwrap_or_default(),
        max_per_ip,
        max_total,
        write_buffer,
    }
}

/// `[log]`.
fn log(ck: &mut Checker<'_>, config: &Config) -> Logging {
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&config.log.level) {
        ck.error(
            "log.level",
            Reason::BadLogLevel {
                value: config.log.level.clone(),
                detail: e.to_string(),
            },
        );
    }
    Logging {
        level: config.log.level.clone(),
        format: config.log.format,
    }
}

/// `[admin]`, `TURND_ADMIN_TOKEN_FILE` and `TURND_ADMIN_TOKEN`, in that order of precedence.
fn admin(ck: &mut Checker<'_>, config: &Config) -> Option<AdminSettings> {
    let a = &config.admin;
    let token = match admin_token_file(config, ck.env) {
        Some((file, from)) => match read_token(&file) {
            Ok(t) => Some(t),
            Err(r) => {
                match from {
                    TokenFileFrom::Config => ck.error("admin.token_file", r),
                    TokenFileFrom::Env => ck.env_error(ENV_ADMIN_TOKEN_FILE, r),
                }
                None
            }
        },
        None => match ck.env.var(ENV_ADMIN_TOKEN) {
            Some(t) => match token(&t, ENV_ADMIN_TOKEN) {
                Ok(t) => Some(t),
                Err(r) => {
                    ck.env_error(ENV_ADMIN_TOKEN, r);
                    None
                }
            },
            None => None,
        },
    };
    if a.listen.trim().is_empty() {
        return None;
    }
    match a.listen.trim().parse() {
        Ok(listen) => Some(AdminSettings { listen, token }),
        Err(_) => {
            ck.error(
                "admin.listen",
                Reason::BadAddress {
                    value: a.listen.clone(),
                    what: "socket address (IP:port, [IPv6]:port), or \"\" to turn it off",
                },
            );
            None
        }
    }
}

/// Where the admin token file was named.
enum TokenFileFrom {
    /// `admin.token_file`.
    Config,
    /// `TURND_ADMIN_TOKEN_FILE`.
    Env,
}

/// The file that holds the admin token, if one is named: `admin.token_file`, else
/// `TURND_ADMIN_TOKEN_FILE` (the one rule both the token and the watched files follow).
fn admin_token_file(config: &Config, env: &dyn Env) -> Option<(String, TokenFileFrom)> {
    match &config.admin.token_file {
        Some(file) => Some((file.clone(), TokenFileFrom::Config)),
        None => env
            .var(ENV_ADMIN_TOKEN_FILE)
            .map(|file| (file, TokenFileFrom::Env)),
    }
}

fn read_token(path: &str) -> Result<Secret, Reason> {
    let text = std::fs::read_to_string(path).map_err(|source| Reason::SecretFile {
        path: PathBuf::from(path),
        source,
    })?;
    token(&text, &format!("token file {path}"))
}

/// A token: trimmed, not empty, at least [`MIN_ADMIN_TOKEN_BYTES`].
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

/// `[drain]`: the timeout and at most one alternate server per family.
fn drain(ck: &mut Checker<'_>, config: &Config) -> DrainSettings {
    let d = &config.drain;
    let mut out = DrainSettings {
        timeout: duration(ck, &d.timeout, "drain.timeout").unwrap_or_default(),
        alternate_ipv4: None,
        alternate_ipv6: None,
    };
    for (i, a) in d.alternate_servers.iter().enumerate() {
        let at = format!("drain.alternate_servers[{i}]");
        let Ok(addr) = a.trim().parse::<SocketAddr>() else {
            ck.error(
                &at,
                Reason::BadAddress {
                    value: a.clone(),
                    what: "socket address (IP:port, [IPv6]:port)",
                },
            );
            continue;
        };
        if addr.ip().is_unspecified() || addr.ip().is_multicast() || addr.port() == 0 {
            ck.error(
                &at,
                Reason::Unusable {
                    value: a.clone(),
                    detail: "an alternate server is a unicast address and a port clients can reach",
                },
            );
            continue;
        }
        let slot = if addr.is_ipv4() {
            &mut out.alternate_ipv4
        } else {
            &mut out.alternate_ipv6
        };
        if slot.is_some() {
            ck.error(
                &at,
                Reason::Conflict("at most one IPv4 and one IPv6 alternate server"),
            );
            continue;
        }
        *slot = Some(addr);
    }
    out
}

/// Accepts `1.2.3.4`, `::1` and `[::1]`.
pub(crate) fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let s = s
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(s);
    s.parse().ok()
}

/// A list of unique socket addresses; bad entries are reported and left out.
fn socket_addrs(ck: &mut Checker<'_>, list: &[String], key: &str) -> Vec<SocketAddr> {
    let mut out = Vec::with_capacity(list.len());
    for (i, a) in list.iter().enumerate() {
        let at = format!("{key}[{i}]");
        match a.trim().parse::<SocketAddr>() {
            Ok(addr) if out.contains(&addr) => ck.error(&at, Reason::Duplicate(a.clone())),
            Ok(addr) => out.push(addr),
            Err(_) => ck.error(
                &at,
                Reason::BadAddress {
                    value: a.clone(),
                    what: "socket address (IP:port, [IPv6]:port)",
                },
            ),
        }
    }
    out
}

/// A list of CIDRs; bad entries are reported and left out.
fn cidrs(ck: &mut Checker<'_>, list: &[String], key: &str) -> Vec<IpNet> {
    let mut out = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        match parse_cidr(s) {
            Ok(net) => out.push(net),
            Err(detail) => ck.error(
                &format!("{key}[{i}]"),
                Reason::BadCidr {
                    value: s.clone(),
                    detail,
                },
            ),
        }
    }
    out
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

/// A duration between 1 s and 7 days; `None` (and an error) otherwise.
fn duration(ck: &mut Checker<'_>, v: &DurationValue, key: &str) -> Option<Duration> {
    let (d, text) = match v {
        DurationValue::Seconds(s) => (Duration::from_secs(*s), s.to_string()),
        DurationValue::Text(t) => match humantime::parse_duration(t.trim()) {
            Ok(d) => (d, t.clone()),
            Err(e) => {
                ck.error(
                    key,
                    Reason::BadDuration {
                        value: t.clone(),
                        detail: e.to_string(),
                    },
                );
                return None;
            }
        },
    };
    if !(MIN_DURATION..=MAX_DURATION).contains(&d) {
        ck.error(
            key,
            Reason::BadDuration {
                value: text,
                detail: "must be between 1 s and 7 days".into(),
            },
        );
        return None;
    }
    Some(d)
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

    use turn_proto::server::policy;

    use super::super::settings::{IoBackend, LogFormat};
    use super::super::{MapEnv, ENV_AUTH_SECRET};
    use super::*;

    fn env() -> MapEnv {
        MapEnv::default()
    }

    fn check(text: &str) -> Result<Settings, ConfigError> {
        Config::parse_named(text, "t.toml")?.validate(&env())
    }

    const WITH_SECRET: &str = "[auth]\nsecrets = [\"s3cret\"]\n";

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// [`WITH_SECRET`] followed by `body`.
    fn check_with_secret(body: &str) -> Result<Settings, ConfigError> {
        check(&format!("{WITH_SECRET}{body}"))
    }

    /// The first error of [`WITH_SECRET`] followed by `body`, which must name `key`.
    fn refused_at(body: &str, key: &str) -> ConfigError {
        let e = check_with_secret(body).expect_err(body);
        assert_eq!(e.location.key.as_deref(), Some(key), "{e}");
        e
    }

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
        let s = check_with_secret(
            "[relay]\naddresses = [\"10.10.10.11\"]\n\
             external_ips = [\"94.130.141.98/10.10.10.11\", \"2001:db8::1\"]\n",
        )
        .expect("valid");
        let private = ip("10.10.10.11");
        assert_eq!(s.relay.addresses, vec![private]);
        assert_eq!(s.relay.advertised(private), ip("94.130.141.98"));
        let other = ip("10.10.10.12");
        assert_eq!(
            s.relay.advertised(other),
            other,
            "no mapping for other IPv4 addresses"
        );
        let v6 = ip("fd00::5");
        assert_eq!(s.relay.advertised(v6), ip("2001:db8::1"));

        refused_at(
            "[relay]\nexternal_ips = [\"94.130.141.98/fd00::1\"]\n",
            "relay.external_ips[0]",
        );
        let e = check_with_secret("[relay]\naddresses = [\"0.0.0.0\"]\n").expect_err("unspecified");
        assert_eq!(e.location.line, Some(4));
    }

    #[test]
    fn external_ip_private_must_be_a_relay_address() {
        let e = refused_at(
            "[relay]\naddresses = [\"10.10.10.12\"]\n\
             external_ips = [\"94.130.141.98/10.10.10.11\"]\n",
            "relay.external_ips[0]",
        );
        assert_eq!(e.location.line, Some(5));
        assert!(e.to_string().contains("relay.addresses"), "{e}");
    }

    #[test]
    fn peer_policy_denies_special_purpose_unless_allowed() {
        let s =
            check_with_secret("[peers]\nallow = [\"127.0.0.1\"]\ndeny = [\"203.0.114.0/24\"]\n")
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
        let s =
            check_with_secret("[lifetimes]\nallocation = \"5m\"\nnonce = \"1h\"\n").expect("valid");
        assert_eq!(s.lifetimes.allocation, Duration::from_secs(300));
        assert_eq!(s.lifetimes.nonce, Duration::from_secs(3600));
        let e = refused_at(
            "[lifetimes]\nchannel = \"ten minutes\"\n",
            "lifetimes.channel",
        );
        assert_eq!(e.location.line, Some(4));
        refused_at("[lifetimes]\nallocation = 7200\n", "lifetimes.allocation");
        let e = check_with_secret("[lifetimes]\npermission = 0\n").expect_err("zero");
        assert!(matches!(e.reason(), Reason::BadDuration { .. }));
    }

    #[test]
    fn tls_listeners_need_a_certificate() {
        refused_at("[listen]\ntls = [\"0.0.0.0:443\"]\n", "listen.tls");
        let s = check_with_secret("[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n").expect("valid");
        assert_eq!(s.listeners.tls.len(), 4, "5349 and 443 on IPv4 and IPv6");
        assert_eq!(s.tls.expect("tls").cert, PathBuf::from("/c.pem"));
        refused_at("[tls]\ncert = \"/c.pem\"\n", "tls.cert");
    }

    #[test]
    fn listeners_must_parse_and_be_unique() {
        refused_at(
            "[listen]\nudp = [\"0.0.0.0:3478\", \"3478\"]\n",
            "listen.udp[1]",
        );
        let e = check_with_secret("[listen]\nudp = [\"0.0.0.0:3478\", \"0.0.0.0:3478\"]\n")
            .expect_err("dup");
        assert!(matches!(e.reason(), Reason::Duplicate(_)));
        let s = check_with_secret("[listen]\nudp = []\n").expect("valid");
        assert!(s.listeners.udp.is_empty());
    }

    #[test]
    fn a_config_without_any_listener_is_refused() {
        let e = check_with_secret("[listen]\nudp = []\ntcp = []\n").expect_err("serves nothing");
        assert!(matches!(e.reason(), Reason::NoListener), "{e}");
        assert_eq!(
            (e.location.line, e.location.key.as_deref()),
            (Some(3), Some("listen"))
        );
        let s =
            check_with_secret("[listen]\nudp = []\ntcp = []\n[tls]\ncert = \"/c\"\nkey = \"/k\"\n")
                .expect("the default TLS listeners remain");
        assert_eq!(s.listeners.tls.len(), 4);
    }

    fn check_all(text: &str, checks: Checks) -> Result<Settings, ConfigErrors> {
        Config::parse_named(text, "t.toml")?.validate_all(&env(), checks)
    }

    #[test]
    fn every_error_in_a_file_is_reported_in_file_order() {
        let text = "[auth]\nsecrets = [\"s\"]\n\
                    [[auth.users]]\nname = \"bob\"\nkey = \"0x12\"\n\
                    [relay]\nmin_port = 50000\nmax_port = 40000\naddresses = [\"nowhere\"]\n\
                    [lifetimes]\nchannel = \"soon\"\n\
                    [peers]\ndeny = [\"10.0.0.0/33\"]\n\
                    [server]\nstun_only = true\nno_stun = true\n\
                    [drain]\nalternate_servers = [\"192.0.2.1:1\", \"192.0.2.2:1\"]\n";
        let errors = check_all(text, Checks::default()).expect_err("many mistakes");
        let found: Vec<(Option<usize>, Option<&str>)> = errors
            .iter()
            .map(|e| (e.location.line, e.location.key.as_deref()))
            .collect();
        assert_eq!(
            found,
            [
                (Some(5), Some("auth.users[0].key")),
                (Some(8), Some("relay.max_port")),
                (Some(9), Some("relay.addresses[0]")),
                (Some(11), Some("lifetimes.channel")),
                (Some(13), Some("peers.deny[0]")),
                (Some(16), Some("server.no_stun")),
                (Some(18), Some("drain.alternate_servers[1]")),
            ]
        );
        assert_eq!(errors.len(), 7);
        let shown = errors.to_string();
        assert_eq!(shown.lines().count(), 7, "one error per line: {shown}");
        assert!(
            shown.starts_with("t.toml:5:1: auth.users[0].key: "),
            "{shown}"
        );
        let first = check(text).expect_err("validate reports the first");
        assert_eq!(first.location.key.as_deref(), Some("auth.users[0].key"));
    }

    #[test]
    fn no_credentials_is_not_added_to_a_failed_secret_file() {
        let errors = check_all(
            "[auth]\nsecret_files = [\"/nonexistent/a\", \"/nonexistent/b\"]\n",
            Checks::default(),
        )
        .expect_err("missing files");
        let keys: Vec<_> = errors
            .iter()
            .map(|e| e.location.key.clone().unwrap_or_default())
            .collect();
        assert_eq!(keys, ["auth.secret_files[0]", "auth.secret_files[1]"]);
    }

    #[test]
    fn a_bad_realm_and_missing_credentials_are_both_reported() {
        let errors = check_all("[auth]\nrealm = \"\"\n", Checks::default()).expect_err("two");
        let reasons: Vec<&Reason> = errors.iter().map(ConfigError::reason).collect();
        // "No credentials" sits at `[auth]` (line 1), the realm on line 2.
        assert!(
            matches!(
                reasons[..],
                [Reason::NoCredentials, Reason::Unusable { .. }]
            ),
            "{errors}"
        );
    }

    #[test]
    fn reload_of_text_validates_the_same_text_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("secret");
        std::fs::write(&f, "one\n").expect("write");
        let text = format!("[auth]\nsecret_files = [\"{}\"]\n", f.display());
        let s = check(&text).expect("valid");
        assert_eq!(s.config_path, None);
        std::fs::write(&f, "one\ntwo\n").expect("write");
        let again = s.reload(&env()).expect("reloads");
        assert_eq!(again.auth.secrets.len(), 2, "the secret file is read again");
        assert_eq!(again.source, "t.toml");
    }

    #[test]
    fn allow_missing_secret_accepts_a_file_without_credentials() {
        let checks = Checks {
            allow_missing_secret: true,
            ..Checks::default()
        };
        let s = check_all("[auth]\nrealm = \"r\"\n", checks).expect("secret at run time");
        assert!(s.auth.secrets.is_empty());
        assert!(!s.auth.generated_secret);
        let e = check_all("[auth]\nrealm = \"r\"\n", Checks::default()).expect_err("needs one");
        assert!(matches!(e.first().reason(), Reason::NoCredentials));
    }

    #[test]
    fn several_relay_addresses_per_family_are_accepted() {
        let s = check_with_secret("[relay]\naddresses = [\"192.0.2.10\", \"192.0.2.11\", \"2001:db8::10\", \"2001:db8::11\"]\n\
             external_ips = [\"198.51.100.10/192.0.2.10\", \"198.51.100.11/192.0.2.11\"]\n")
        .expect("valid");
        assert_eq!(s.relay.addresses.len(), 4);
        assert_eq!(
            s.relay
                .advertised("192.0.2.11".parse().expect("ip"))
                .to_string(),
            "198.51.100.11"
        );
        let c = s.server_config([0; 32]);
        assert!(c.relay_ipv4 && c.relay_ipv6);
    }

    #[test]
    fn tls_files_are_loaded_when_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = rcgen::generate_simple_self_signed(vec!["turn.example.org".to_owned()])
            .expect("certificate");
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.cert.pem()).expect("write");
        std::fs::write(&k, cert.key_pair.serialize_pem()).expect("write");
        let files = Checks {
            files: true,
            ..Checks::default()
        };
        let text = |cert: &std::path::Path, key: &std::path::Path| {
            format!(
                "{WITH_SECRET}[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                cert.display(),
                key.display()
            )
        };
        check_all(&text(&c, &k), files).expect("good files load");
        let missing = dir.path().join("missing.pem");
        let e = check_all(&text(&missing, &k), files).expect_err("missing cert");
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e.first().location.line, e.first().location.key.as_deref()),
            (Some(4), Some("tls.cert"))
        );
        assert!(e.to_string().contains("missing.pem"), "{e}");
        check_all(&text(&missing, &k), Checks::default()).expect("not opened without the check");
        std::fs::write(&k, cert.cert.pem()).expect("write");
        let e = check_all(&text(&c, &k), files).expect_err("a certificate is not a key");
        assert_eq!(e.first().location.key.as_deref(), Some("tls.key"));
        std::fs::write(&k, "-----BEGIN PRIVATE KEY-----\nnot base64\n").expect("write");
        let e = check_all(&text(&c, &k), files).expect_err("garbage key");
        assert_eq!(e.first().location.key.as_deref(), Some("tls.key"));
    }

    #[test]
    fn quotas_buffers_workers_and_log_level() {
        let s = check_with_secret(
            "[quotas]\nallocations_per_user = 10\n[sockets]\nrecv_buffer_bytes = 4194304\n\
             [server]\nworkers = 3\n[log]\nlevel = \"info,turnd=debug\"\n",
        )
        .expect("valid");
        assert_eq!(s.quotas.allocations_per_user.map(NonZeroU32::get), Some(10));
        assert_eq!(s.quotas.total_allocations, None);
        assert_eq!(s.quotas.permissions_per_allocation.get(), 64);
        assert_eq!(s.sockets.recv, Some(4 << 20));
        assert_eq!(s.sockets.send, None);
        assert_eq!(s.workers.get(), 3);
        refused_at("[log]\nlevel = \"info,[[\"\n", "log.level");
    }

    #[test]
    fn server_config_carries_the_settings_into_the_core() {
        let s = check_with_secret(
            "[relay]\naddresses = [\"10.10.10.11\"]\n[lifetimes]\nallocation = 120\n\
             nonce = 30\n[quotas]\npermissions_per_allocation = 7\nallocations_per_user = 2\n",
        )
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

        assert_eq!(c.mode, ServiceMode::Turn);
        assert_eq!(c.challenges_per_source_per_second, None);
        let c = check_with_secret(
            "[server]\nno_stun = true\n[quotas]\nchallenges_per_source_per_second = 5\n",
        )
        .expect("valid")
        .server_config([0; 32]);
        assert_eq!(c.mode, ServiceMode::NoStun);
        assert_eq!(c.challenges_per_source_per_second, Some(5));

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
        assert_eq!(s.mode, ServiceMode::Turn);
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
            assert_eq!(text.parse::<IoBackend>(), Ok(io));
        }
        assert!("kqueue".parse::<IoBackend>().is_err());
        let e = refused_at("[server]\nio = \"kqueue\"\n", "server.io");
        assert_eq!(e.location.line, Some(4));
    }

    #[test]
    fn stun_only_and_no_stun_exclude_each_other() {
        let s = check_with_secret("[server]\nstun_only = true\n").expect("valid");
        assert_eq!(s.mode, ServiceMode::StunOnly);
        let s = check_with_secret("[server]\nno_stun = true\n").expect("valid");
        assert_eq!(s.mode, ServiceMode::NoStun);
        let e = refused_at(
            "[server]\nstun_only = true\nno_stun = true\n",
            "server.no_stun",
        );
        assert_eq!(e.location.line, Some(5));
    }

    #[test]
    fn admin_listen_can_be_turned_off_or_moved() {
        let s = check_with_secret("[admin]\nlisten = \"\"\n").expect("valid");
        assert_eq!(s.admin, None);
        let s = check_with_secret("[admin]\nlisten = \"[::]:9000\"\n").expect("valid");
        assert_eq!(
            s.admin.expect("on").listen,
            "[::]:9000".parse().expect("addr")
        );
        let e = refused_at("[admin]\nlisten = \"9641\"\n", "admin.listen");
        assert_eq!(e.location.line, Some(4));
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
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("file-token"),
            "the token never prints: {shown}"
        );
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
        let e = check_with_secret("[admin]\ntoken_file = \"/nonexistent/token\"\n")
            .expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/token"), "{e}");
    }

    #[test]
    fn admin_token_file_from_the_environment_is_read_and_watched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("admin-token");
        std::fs::write(&f, "mounted-token-0123456789\n").expect("write");
        let path = f.to_str().expect("utf8");
        let env: MapEnv = [
            (ENV_ADMIN_TOKEN_FILE, path),
            (ENV_ADMIN_TOKEN, "env-token-0123456789"),
        ]
        .into_iter()
        .collect();
        let s = Config::parse_named(WITH_SECRET, "t.toml")
            .expect("parses")
            .validate(&env)
            .expect("valid");
        assert_eq!(
            s.admin.expect("on").token.expect("token").expose(),
            "mounted-token-0123456789",
            "the file wins over the value"
        );
        assert!(s.watched_files.contains(&f), "a change of it reloads");
        let missing: MapEnv = [(ENV_ADMIN_TOKEN_FILE, "/nonexistent/admin-token")]
            .into_iter()
            .collect();
        let e = Config::parse_named(WITH_SECRET, "t.toml")
            .expect("parses")
            .validate(&missing)
            .expect_err("missing file");
        assert_eq!(e.location.key.as_deref(), Some(ENV_ADMIN_TOKEN_FILE));
    }

    #[test]
    fn drain_takes_one_alternate_per_family() {
        let s = check_with_secret("[drain]\ntimeout = \"30s\"\n             alternate_servers = [\"192.0.2.10:3478\", \"[2001:db8::10]:3478\"]\n")
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
        let e = check_with_secret(
            "[drain]\nalternate_servers = [\n  \"192.0.2.10:3478\",\n  \"192.0.2.11:3478\",\n]\n",
        )
        .expect_err("two IPv4");
        assert_eq!(
            (e.location.line, e.location.key.as_deref()),
            (Some(6), Some("drain.alternate_servers[1]"))
        );
        let e = check_with_secret("[drain]\nalternate_servers = [\"turn2:3478\"]\n")
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
    fn config_defaults_are_the_cores_defaults() {
        let ours = check(WITH_SECRET).expect("valid").server_config([0; 32]);
        let core = turn_proto::server::ServerConfig::default();
        assert_eq!(ours.default_lifetime, core.default_lifetime);
        assert_eq!(ours.max_lifetime, core.max_lifetime);
        assert_eq!(ours.permission_lifetime, core.permission_lifetime);
        assert_eq!(ours.channel_lifetime, core.channel_lifetime);
        assert_eq!(ours.nonce_lifetime, core.nonce_lifetime);
        assert_eq!(
            ours.max_permissions_per_allocation,
            core.max_permissions_per_allocation
        );
        assert_eq!(ours.credentials.realm(), core.credentials.realm());
        assert_eq!(ours.mode, core.mode);
        let s = check(WITH_SECRET).expect("valid");
        assert_eq!(s.streams, StreamLimits::default());
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
