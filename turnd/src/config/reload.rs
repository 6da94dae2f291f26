//! What a configuration reload changes: [`reload_plan`] compares the running [`Settings`]
//! with newly validated ones and says, line by line, what is applied at once and what
//! waits for a restart.
//!
//! Live: auth (realm, secrets, secret files, users), peer allow/deny, quotas, lifetimes,
//! stream limits, the service mode and channel-number range, the log level, the admin
//! token, and the drain timeout and alternate servers. Everything that owns a socket or a
//! thread needs a restart: listeners, relay addresses, ports and external addresses,
//! workers, the IO backend, socket buffers, the admin listener, TLS file paths (the
//! certificate's content reloads on its own) and the log format.
//!
//! The lines never carry a secret's value: secrets are counted, users named.

use std::fmt::{self, Display};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use super::settings::{service_mode_name, Settings, StaticUser};

/// The outcome of comparing two [`Settings`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// Changes the running server takes over, one human-readable line each.
    pub applied: Vec<String>,
    /// Changes left as they are until the next restart, one line each.
    pub needs_restart: Vec<String>,
}

impl ReloadPlan {
    /// Whether nothing changed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.needs_restart.is_empty()
    }
}

/// Compares the running settings `old` with newly validated `new`.
#[must_use]
pub fn reload_plan(old: &Settings, new: &Settings) -> ReloadPlan {
    let mut plan = ReloadPlan::default();
    live(old, new, &mut plan.applied);
    restart(old, new, &mut plan.needs_restart);
    plan
}

/// `key: a → b` when the values differ.
fn value<T: PartialEq + Display>(out: &mut Vec<String>, key: &str, a: T, b: T) {
    if a != b {
        out.push(format!("{key}: {a} → {b}"));
    }
}

/// `key changed` when the values differ (for lists and values too long for one line).
fn changed<T: PartialEq>(out: &mut Vec<String>, key: &str, a: &T, b: &T) {
    if a != b {
        out.push(format!("{key} changed"));
    }
}

struct Secs(Duration);

impl Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl PartialEq for Secs {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

struct Limit(Option<NonZeroU32>);

impl Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("no limit"),
        }
    }
}

impl PartialEq for Limit {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

struct Addr(Option<SocketAddr>);

impl Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("none"),
        }
    }
}

impl PartialEq for Addr {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

fn live(old: &Settings, new: &Settings, out: &mut Vec<String>) {
    // [auth]
    let (a, b) = (&old.auth, &new.auth);
    value(out, "auth.realm", a.realm.as_str(), b.realm.as_str());
    if a.secrets != b.secrets {
        if a.secrets.len() == b.secrets.len() {
            out.push(format!(
                "auth.secrets: {} replaced (same count)",
                b.secrets.len()
            ));
        } else {
            out.push(format!(
                "auth.secrets: {} → {}",
                a.secrets.len(),
                b.secrets.len()
            ));
        }
    }
    let mut added: Vec<&str> = b
        .users
        .keys()
        .filter(|n| !a.users.contains_key(*n))
        .map(String::as_str)
        .collect();
    let mut removed: Vec<&str> = a
        .users
        .keys()
        .filter(|n| !b.users.contains_key(*n))
        .map(String::as_str)
        .collect();
    let mut credential: Vec<&str> = b
        .users
        .values()
        .filter(|u| {
            a.users
                .get(&u.name)
                .is_some_and(|old: &StaticUser| old.secret != u.secret)
        })
        .map(|u| u.name.as_str())
        .collect();
    for (list, what) in [
        (&mut added, "added"),
        (&mut removed, "removed"),
        (&mut credential, "credential changed"),
    ] {
        if !list.is_empty() {
            list.sort_unstable();
            out.push(format!("auth.users {what}: {}", list.join(", ")));
        }
    }

    // [peers]
    let (a, b) = (&old.peers, &new.peers);
    for (key, x, y) in [
        ("peers.allow", &a.allow, &b.allow),
        ("peers.deny", &a.deny, &b.deny),
    ] {
        if x != y {
            out.push(format!("{key} changed ({} → {} entries)", x.len(), y.len()));
        }
    }

    // [quotas]
    let (a, b) = (&old.quotas, &new.quotas);
    value(
        out,
        "quotas.allocations_per_user",
        Limit(a.allocations_per_user),
        Limit(b.allocations_per_user),
    );
    value(
        out,
        "quotas.total_allocations",
        Limit(a.total_allocations),
        Limit(b.total_allocations),
    );
    value(
        out,
        "quotas.permissions_per_allocation",
        a.permissions_per_allocation,
        b.permissions_per_allocation,
    );
    value(
        out,
        "quotas.challenges_per_source_per_second",
        Limit(a.challenges_per_source_per_second),
        Limit(b.challenges_per_source_per_second),
    );

    // [lifetimes]
    let (a, b) = (&old.lifetimes, &new.lifetimes);
    for (key, x, y) in [
        ("lifetimes.allocation", a.allocation, b.allocation),
        (
            "lifetimes.max_allocation",
            a.max_allocation,
            b.max_allocation,
        ),
        ("lifetimes.permission", a.permission, b.permission),
        ("lifetimes.channel", a.channel, b.channel),
        ("lifetimes.nonce", a.nonce, b.nonce),
    ] {
        value(out, key, Secs(x), Secs(y));
    }

    // [streams]
    let (a, b) = (&old.streams, &new.streams);
    value(
        out,
        "streams.handshake_timeout",
        Secs(a.handshake_timeout),
        Secs(b.handshake_timeout),
    );
    value(
        out,
        "streams.idle_timeout",
        Secs(a.idle_timeout),
        Secs(b.idle_timeout),
    );
    value(
        out,
        "streams.max_connections_per_ip",
        a.max_per_ip,
        b.max_per_ip,
    );
    value(out, "streams.max_connections", a.max_total, b.max_total);
    value(
        out,
        "streams.write_buffer_bytes",
        a.write_buffer,
        b.write_buffer,
    );

    // [server], the parts the protocol core takes live
    value(
        out,
        "server mode",
        service_mode_name(old.mode),
        service_mode_name(new.mode),
    );
    value(
        out,
        "server.rfc5766_channel_numbers",
        old.rfc5766_channel_numbers,
        new.rfc5766_channel_numbers,
    );

    // [log]
    value(
        out,
        "log.level",
        old.log.level.as_str(),
        new.log.level.as_str(),
    );

    // [admin] token (the listener itself needs a restart)
    let token = |s: &Settings| s.admin.as_ref().and_then(|a| a.token.clone());
    let (x, y) = (token(old), token(new));
    match (&x, &y) {
        (None, Some(_)) => out.push("admin.token set".to_owned()),
        (Some(_), None) => out.push("admin.token removed".to_owned()),
        _ => changed(out, "admin.token", &x, &y),
    }

    // [drain]
    let (a, b) = (&old.drain, &new.drain);
    value(out, "drain.timeout", Secs(a.timeout), Secs(b.timeout));
    value(
        out,
        "drain alternate server (IPv4)",
        Addr(a.alternate_ipv4),
        Addr(b.alternate_ipv4),
    );
    value(
        out,
        "drain alternate server (IPv6)",
        Addr(a.alternate_ipv6),
        Addr(b.alternate_ipv6),
    );
}

fn restart(old: &Settings, new: &Settings, out: &mut Vec<String>) {
    let (a, b) = (&old.listeners, &new.listeners);
    changed(out, "listen.udp", &a.udp, &b.udp);
    changed(out, "listen.tcp", &a.tcp, &b.tcp);
    changed(out, "listen.tls", &a.tls, &b.tls);
    let (a, b) = (&old.relay, &new.relay);
    changed(out, "relay.addresses", &a.addresses, &b.addresses);
    if a.ports != b.ports {
        out.push(format!(
            "relay ports: {}-{} → {}-{}",
            a.ports.start(),
            a.ports.end(),
            b.ports.start(),
            b.ports.end()
        ));
    }
    changed(out, "relay.external_ips", &a.external_ips, &b.external_ips);
    value(out, "server.workers", old.workers, new.workers);
    value(out, "server.io", old.io, new.io);
    changed(out, "sockets", &old.sockets, &new.sockets);
    let listen = |s: &Settings| Addr(s.admin.as_ref().map(|a| a.listen));
    value(out, "admin.listen", listen(old), listen(new));
    let files = |s: &Settings| s.tls.as_ref().map(|t| (t.cert.clone(), t.key.clone()));
    changed(
        out,
        "tls certificate and key paths",
        &files(old),
        &files(new),
    );
    changed(out, "log.format", &old.log.format, &new.log.format);
}

#[cfg(test)]
mod tests {
    use super::super::{Config, MapEnv, Settings};
    use super::*;

    const BASE: &str = "[auth]\nrealm = \"r\"\nsecrets = [\"old-secret\", \"second\"]\n\
                        [[auth.users]]\nname = \"alice\"\npassword = \"pw\"\n";

    fn settings(text: &str) -> Settings {
        Config::parse_named(text, "t.toml")
            .expect("parses")
            .validate(&MapEnv::default())
            .expect("valid")
    }

    fn plan(old: &str, new: &str) -> ReloadPlan {
        reload_plan(&settings(old), &settings(new))
    }

    #[test]
    fn identical_settings_change_nothing() {
        assert!(plan(BASE, BASE).is_empty());
    }

    #[test]
    fn rotated_secrets_are_counted_never_printed() {
        let p = plan(
            BASE,
            "[auth]\nrealm = \"r\"\nsecrets = [\"new-secret\", \"old-secret\", \"second\"]\n\
             [[auth.users]]\nname = \"alice\"\npassword = \"pw\"\n",
        );
        assert_eq!(p.applied, ["auth.secrets: 2 → 3"]);
        assert!(p.needs_restart.is_empty());
        let p = plan(
            BASE,
            "[auth]\nrealm = \"r\"\nsecrets = [\"brand-new\", \"second\"]\n\
             [[auth.users]]\nname = \"alice\"\npassword = \"changed-pw\"\n\
             [[auth.users]]\nname = \"bob\"\npassword = \"x\"\n",
        );
        assert_eq!(
            p.applied,
            [
                "auth.secrets: 2 replaced (same count)",
                "auth.users added: bob",
                "auth.users credential changed: alice",
            ]
        );
        let all = p.applied.join("\n");
        for secret in ["brand-new", "old-secret", "changed-pw", "pw\n"] {
            assert!(!all.contains(secret), "{secret} printed in {all}");
        }
    }

    #[test]
    fn live_sections_are_applied() {
        let p = plan(
            BASE,
            &format!(
                "{BASE}[peers]\ndeny = [\"203.0.113.0/24\"]\n[quotas]\nallocations_per_user = 5\n\
                 challenges_per_source_per_second = 20\n[lifetimes]\npermission = 120\n\
                 [streams]\nidle_timeout = 30\n[log]\nlevel = \"debug\"\n\
                 [drain]\ntimeout = 30\nalternate_servers = [\"192.0.2.10:3478\"]\n\
                 [server]\nstun_only = true\n"
            ),
        );
        assert_eq!(
            p.applied,
            [
                "peers.deny changed (0 → 1 entries)",
                "quotas.allocations_per_user: no limit → 5",
                "quotas.challenges_per_source_per_second: no limit → 20",
                "lifetimes.permission: 5m → 2m",
                "streams.idle_timeout: 1m → 30s",
                "server mode: stun+turn → stun_only",
                "log.level: info → debug",
                "drain.timeout: 2m → 30s",
                "drain alternate server (IPv4): none → 192.0.2.10:3478",
            ]
        );
        assert!(p.needs_restart.is_empty(), "{:?}", p.needs_restart);
    }

    #[test]
    fn sockets_and_threads_need_a_restart() {
        let p = plan(
            BASE,
            &format!(
                "{BASE}[listen]\nudp = [\"127.0.0.1:3478\"]\n[relay]\naddresses = [\"127.0.0.1\"]\n\
                 min_port = 40000\n[server]\nworkers = 3\nio = \"epoll\"\n\
                 [sockets]\nrecv_buffer_bytes = 1000000\n[admin]\nlisten = \"\"\n\
                 [tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n[log]\nformat = \"json\"\n"
            ),
        );
        assert!(p.applied.is_empty(), "{:?}", p.applied);
        for line in [
            "listen.udp changed",
            "listen.tls changed",
            "relay.addresses changed",
            "relay ports: 49152-50175 → 40000-50175",
            "server.io: auto → epoll",
            "sockets changed",
            "admin.listen: 127.0.0.1:9641 → none",
            "tls certificate and key paths changed",
            "log.format changed",
        ] {
            assert!(
                p.needs_restart.iter().any(|l| l == line),
                "{line} missing from {:?}",
                p.needs_restart
            );
        }
        assert!(p
            .needs_restart
            .iter()
            .any(|l| l.starts_with("server.workers: ")));
    }

    #[test]
    fn admin_token_changes_are_live_and_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("token");
        std::fs::write(&f, "0123456789abcdef-one\n").expect("write");
        let text = format!("{BASE}[admin]\ntoken_file = \"{}\"\n", f.display());
        let old = settings(BASE);
        let new = settings(&text);
        assert_eq!(reload_plan(&old, &new).applied, ["admin.token set"]);
        let before = new.clone();
        std::fs::write(&f, "0123456789abcdef-two\n").expect("write");
        let after = before.reload(&MapEnv::default()).expect("reloads");
        let p = reload_plan(&before, &after);
        assert_eq!(p.applied, ["admin.token changed"]);
        assert!(!format!("{p:?}").contains("abcdef"));
    }
}
