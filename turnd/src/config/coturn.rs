//! `turnd import-coturn`: converts a coturn `turnserver.conf` into turnd TOML and lists
//! every option that could not be carried over, with the reason.
//!
//! coturn's file has one option per line, `name=value` or a bare `name` for flags
//! (`#` starts a comment; a leading `--` is tolerated). Options turnd has no use for
//! are reported, never silently dropped.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table};

use super::settings::{parse_cidr, parse_key};

/// The result of an import: the TOML text and the notes about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// turnd configuration (TOML), with the notes repeated as comments at the top.
    pub toml: String,
    /// Options not carried over, or carried with a change in behaviour.
    pub notes: Vec<Note>,
}

/// What happened to one coturn option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    /// The option has no turnd equivalent; its effect is lost.
    NotCarried,
    /// turnd behaves this way anyway, or the option has no meaning in turnd.
    NotNeeded,
    /// Carried, but turnd's behaviour differs in the way the note says.
    Changed,
}

/// A note about one line of the coturn file (line 0: about the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// 1-based line in the coturn file; 0 for a note about the whole file.
    pub line: usize,
    /// The coturn option.
    pub option: String,
    /// What happened to it.
    pub kind: NoteKind,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            NoteKind::NotCarried => "not carried",
            NoteKind::NotNeeded => "not needed",
            NoteKind::Changed => "changed",
        };
        if self.line > 0 {
            write!(f, "line {}: ", self.line)?;
        }
        write!(f, "{}: {kind}: {}", self.option, self.reason)
    }
}

/// The coturn options turnd understands, gathered from the file.
#[derive(Debug, Default)]
struct Coturn {
    listening_port: Option<u16>,
    tls_listening_port: Option<u16>,
    alt_listening_port: Option<u16>,
    alt_tls_listening_port: Option<u16>,
    listening_ips: Vec<IpAddr>,
    relay_ips: Vec<IpAddr>,
    external_ips: Vec<String>,
    min_port: Option<u16>,
    max_port: Option<u16>,
    realm: Option<String>,
    users: Vec<(String, Credential)>,
    use_auth_secret: bool,
    secrets: Vec<String>,
    cert: Option<String>,
    pkey: Option<String>,
    denied: Vec<IpNet>,
    allowed: Vec<IpNet>,
    user_quota: Option<u32>,
    total_quota: Option<u32>,
    max_allocate_lifetime: Option<u64>,
    channel_lifetime: Option<u64>,
    permission_lifetime: Option<u64>,
    stale_nonce: Option<u64>,
    no_udp: bool,
    no_tcp: bool,
    no_tls: bool,
    no_dtls: bool,
    log_level: Option<&'static str>,
    workers: Option<usize>,
}

#[derive(Debug)]
enum Credential {
    Password(String),
    Key(String),
}

/// Converts coturn configuration text.
#[must_use]
pub fn import(text: &str) -> Import {
    let mut c = Coturn::default();
    let mut notes = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let l = l.strip_prefix("--").unwrap_or(l);
        let (name, value) = match l.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim()))),
            None => match l.split_once(char::is_whitespace) {
                Some((n, v)) => (n.trim(), Some(unquote(v.trim()))),
                None => (l, None),
            },
        };
        let mut note = |kind, reason: &str| {
            notes.push(Note {
                line,
                option: name.to_owned(),
                kind,
                reason: reason.to_owned(),
            });
        };
        take(&mut c, name, value, &mut note);
    }
    let toml = emit(&c, &mut notes);
    let mut header = String::from(
        "# turnd configuration converted from a coturn turnserver.conf by `turnd import-coturn`.\n\
         # Check it with `turnd check-config FILE`; see deploy/turnd.example.toml for every option.\n",
    );
    if !notes.is_empty() {
        header.push_str("#\n# Options not carried over or changed:\n");
        for n in &notes {
            header.push_str(&format!("#   {n}\n"));
        }
    }
    header.push('\n');
    Import {
        toml: header + &toml,
        notes,
    }
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(v)
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(s)
        .parse()
        .ok()
}

/// Applies one option to `c`, or records why it was not carried.
#[allow(clippy::too_many_lines)]
fn take(c: &mut Coturn, name: &str, value: Option<&str>, note: &mut dyn FnMut(NoteKind, &str)) {
    use NoteKind::{Changed, NotCarried, NotNeeded};
    let v = value.unwrap_or("");
    let port = |note: &mut dyn FnMut(NoteKind, &str)| match v.parse::<u16>() {
        Ok(p) if p > 0 => Some(p),
        _ => {
            note(NotCarried, &format!("`{v}` is not a port number"));
            None
        }
    };
    let count = |note: &mut dyn FnMut(NoteKind, &str)| match v.parse::<u32>() {
        Ok(n) => Some(n),
        Err(_) => {
            note(NotCarried, &format!("`{v}` is not a number"));
            None
        }
    };
    // coturn lifetimes: seconds; 0 or negative means "use the default".
    let seconds = |note: &mut dyn FnMut(NoteKind, &str)| match v.parse::<i64>() {
        Ok(n) if n > 0 => u64::try_from(n).ok(),
        Ok(_) => {
            note(
                NotNeeded,
                "0 or negative means coturn's default, which is turnd's too",
            );
            None
        }
        Err(_) => {
            note(NotCarried, &format!("`{v}` is not a number of seconds"));
            None
        }
    };
    let ip = |note: &mut dyn FnMut(NoteKind, &str)| {
        let r = parse_ip(v);
        if r.is_none() {
            note(
                NotCarried,
                &format!("`{v}` is not an IP address (turnd does not resolve names)"),
            );
        }
        r
    };
    match name {
        "listening-port" => c.listening_port = port(note),
        "tls-listening-port" => c.tls_listening_port = port(note),
        "alt-listening-port" => {
            c.alt_listening_port = port(note);
            note(
                Changed,
                "turnd has no RFC 5780 NAT discovery; the port becomes one more listener",
            );
        }
        "alt-tls-listening-port" => {
            c.alt_tls_listening_port = port(note);
            note(
                Changed,
                "turnd has no RFC 5780 NAT discovery; the port becomes one more TLS listener",
            );
        }
        "listening-ip" => c.listening_ips.extend(ip(note)),
        "relay-ip" => c.relay_ips.extend(ip(note)),
        "external-ip" => {
            let ok = match v.split_once('/') {
                Some((p, q)) => parse_ip(p).is_some() && parse_ip(q).is_some(),
                None => parse_ip(v).is_some(),
            };
            if ok {
                c.external_ips.push(v.to_owned());
            } else {
                note(
                    NotCarried,
                    &format!("`{v}` is not PUBLIC or PUBLIC/PRIVATE IP addresses"),
                );
            }
        }
        "min-port" => c.min_port = port(note),
        "max-port" => c.max_port = port(note),
        "realm" => c.realm = Some(v.to_owned()),
        "user" => match v.split_once(':') {
            Some((u, p)) if !u.is_empty() && !p.is_empty() => {
                let cred = if p.starts_with("0x") && parse_key(p).is_some() {
                    Credential::Key(p.to_owned())
                } else {
                    Credential::Password(p.to_owned())
                };
                c.users.push((u.to_owned(), cred));
            }
            _ => note(NotCarried, "expected user=NAME:PASSWORD or user=NAME:0xKEY"),
        },
        "lt-cred-mech" | "a" => note(NotNeeded, "turnd always uses long-term credentials"),
        "use-auth-secret" => c.use_auth_secret = true,
        "static-auth-secret" => {
            if v.is_empty() {
                note(NotCarried, "empty secret");
            } else {
                c.secrets.push(v.to_owned());
            }
        }
        "rest-api-separator" if v == ":" => note(NotNeeded, "`:` is turnd's separator"),
        "rest-api-separator" => {
            note(
                NotCarried,
                "turnd's REST API usernames are always `<expiry>:<user>`",
            );
        }
        "cert" => c.cert = Some(v.to_owned()),
        "pkey" => c.pkey = Some(v.to_owned()),
        "denied-peer-ip" | "allowed-peer-ip" => match range_to_cidrs(v) {
            Some(nets) if name == "denied-peer-ip" => c.denied.extend(nets),
            Some(nets) => c.allowed.extend(nets),
            None => note(
                NotCarried,
                &format!("`{v}` is not an IP address or an IP range A-B"),
            ),
        },
        "allow-loopback-peers" => {
            c.allowed.extend(
                ["127.0.0.0/8", "::1/128"]
                    .iter()
                    .filter_map(|s| s.parse::<IpNet>().ok()),
            );
        }
        "no-loopback-peers" | "no-multicast-peers" => {
            note(
                NotNeeded,
                "turnd denies loopback and multicast peers by default (the built-in deny list)",
            );
        }
        "user-quota" => c.user_quota = count(note),
        "total-quota" => c.total_quota = count(note),
        "max-allocate-lifetime" => c.max_allocate_lifetime = seconds(note),
        "channel-lifetime" => c.channel_lifetime = seconds(note),
        "permission-lifetime" => c.permission_lifetime = seconds(note),
        "stale-nonce" => {
            c.stale_nonce = if value.is_none() {
                Some(600)
            } else {
                seconds(note)
            };
        }
        "no-udp" => c.no_udp = true,
        "no-tcp" => c.no_tcp = true,
        "no-tls" => c.no_tls = true,
        "no-dtls" => {
            c.no_dtls = true;
            note(NotNeeded, "turnd does not serve DTLS");
        }
        "verbose" | "v" => c.log_level = Some("debug"),
        "Verbose" | "V" => c.log_level = Some("trace"),
        "relay-threads" | "general-threads" => {
            match v.parse::<usize>() {
                Ok(n) if n > 0 => {
                    c.workers = Some(n);
                    note(Changed, "turnd's workers serve listeners and relays together (default: one per core)");
                }
                _ => note(NotNeeded, "0 means one per core, which is turnd's default"),
            }
        }
        "fingerprint" | "f" => {
            note(
                NotNeeded,
                "turnd has no switch for it: FINGERPRINT handling is built in (RFC 8489 §14.7)",
            );
        }
        "no-cli" | "cli-ip" | "cli-port" | "cli-password" | "cli-max-output-sessions" => {
            note(NotNeeded, "turnd has no telnet admin CLI");
        }
        "log-file"
        | "l"
        | "syslog"
        | "simple-log"
        | "new-log-timestamp"
        | "new-log-timestamp-format"
        | "log-binding"
        | "syslog-facility" => {
            note(NotCarried, "turnd logs to stdout (text or JSON, [log]); let systemd or the container runtime keep the logs");
        }
        "no-tlsv1" | "no-tlsv1_1" => note(NotNeeded, "turnd's TLS speaks only TLS 1.2 and 1.3"),
        "no-tlsv1_2" => note(NotCarried, "turnd's TLS always offers TLS 1.2 and 1.3"),
        "cipher-list" | "ec-curve-name" | "dh-file" | "dh566" | "dh1066" | "ca-file" => {
            note(
                NotCarried,
                "turnd's TLS uses rustls' safe default cipher suites and groups",
            );
        }
        "pidfile" | "proc-user" | "proc-group" => {
            note(NotCarried, "run turnd under systemd or Kubernetes with the user you want; it writes no pid file");
        }
        "userdb" | "b" | "db" | "psql-userdb" | "sql-userdb" | "e" | "mysql-userdb" | "M"
        | "mongo-userdb" | "J" | "redis-userdb" | "N" | "redis-statsdb" | "O"
        | "secret-ts-exp-time" => {
            note(
                NotCarried,
                "turnd reads no user database: list users under [auth] or use REST-API secrets",
            );
        }
        "no-auth" | "z" => note(NotCarried, "turnd always authenticates TURN requests"),
        "prometheus" | "prometheus-port" | "prometheus-username-labels" => {
            note(
                NotCarried,
                "metrics are not served yet (a later turnd issue adds /metrics)",
            );
        }
        "server-name"
        | "oauth"
        | "mobility"
        | "no-stun"
        | "stun-only"
        | "S"
        | "secure-stun"
        | "check-origin-consistency"
        | "bps-capacity"
        | "max-bps"
        | "B"
        | "alternate-server"
        | "tls-alternate-server"
        | "aux-server"
        | "udp-self-balance"
        | "listening-device"
        | "L"
        | "relay-device"
        | "web-admin"
        | "web-admin-ip"
        | "web-admin-port"
        | "web-admin-listen-on-workers"
        | "acme-redirect"
        | "server-relay"
        | "keep-address-family"
        | "allocation-default-address-family"
        | "no-software-attribute"
        | "software-name"
        | "response-origin-only-with-rfc5780"
        | "no-rfc5780"
        | "no-stun-backward-compatibility"
        | "respond-http-unsupported"
        | "max-allocate-timeout"
        | "drop-invalid-packets"
        | "sock-buf-size" => {
            note(NotCarried, "turnd has no equivalent option");
        }
        _ => note(NotCarried, "unknown to turnd's importer"),
    }
}

/// `A` (single IP) or `A-B` (inclusive range, same family) → the fewest CIDRs covering it.
#[must_use]
pub fn range_to_cidrs(s: &str) -> Option<Vec<IpNet>> {
    let Some((a, b)) = s.split_once('-') else {
        return parse_cidr(s).ok().map(|n| vec![n]);
    };
    let (a, b) = (parse_ip(a)?, parse_ip(b)?);
    let (start, end, bits, v4) = match (a, b) {
        (IpAddr::V4(x), IpAddr::V4(y)) => {
            (u128::from(u32::from(x)), u128::from(u32::from(y)), 32, true)
        }
        (IpAddr::V6(x), IpAddr::V6(y)) => (u128::from(x), u128::from(y), 128, false),
        _ => return None,
    };
    if start > end {
        return None;
    }
    let mut out = Vec::new();
    let mut cur = start;
    loop {
        // The largest aligned block starting at `cur` that does not pass `end`.
        let mut size_bits = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        let span = |b: u32| {
            if b >= 128 {
                u128::MAX
            } else {
                (1u128 << b) - 1
            }
        };
        while size_bits > 0
            && cur
                .checked_add(span(size_bits))
                .is_none_or(|last| last > end)
        {
            size_bits -= 1;
        }
        let prefix = u8::try_from(bits - size_bits).ok()?;
        let net = if v4 {
            IpNet::new(IpAddr::V4(u32::try_from(cur).ok()?.into()), prefix).ok()?
        } else {
            IpNet::new(IpAddr::V6(cur.into()), prefix).ok()?
        };
        out.push(net);
        let last = cur + span(size_bits);
        if last >= end {
            return Some(out);
        }
        cur = last + 1;
    }
}

fn strings<I: IntoIterator<Item = String>>(items: I) -> Item {
    let mut a = Array::new();
    for s in items {
        a.push(s);
    }
    toml_edit::value(a)
}

fn listeners(ips: &[IpAddr], ports: &[Option<u16>]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for ip in ips {
        for port in ports.iter().flatten() {
            let a = SocketAddr::new(*ip, *port).to_string();
            if seen.insert(a.clone()) {
                out.push(a);
            }
        }
    }
    out
}

/// Builds the TOML; adds notes that concern the file as a whole.
fn emit(c: &Coturn, notes: &mut Vec<Note>) -> String {
    let mut whole = |option: &str, kind, reason: &str| {
        notes.push(Note {
            line: 0,
            option: option.to_owned(),
            kind,
            reason: reason.to_owned(),
        });
    };
    let mut doc = DocumentMut::new();

    // [listen]
    let ips: Vec<IpAddr> = if c.listening_ips.is_empty() {
        vec![IpAddr::from([0, 0, 0, 0]), IpAddr::from([0u16; 8])]
    } else {
        c.listening_ips.clone()
    };
    let plain = [c.listening_port.or(Some(3478)), c.alt_listening_port];
    let mut listen = Table::new();
    listen["udp"] = strings(if c.no_udp {
        Vec::new()
    } else {
        listeners(&ips, &plain)
    });
    listen["tcp"] = strings(if c.no_tcp {
        Vec::new()
    } else {
        listeners(&ips, &plain)
    });
    let have_cert = c.cert.is_some() && c.pkey.is_some();
    if c.no_tls {
        listen["tls"] = strings(Vec::new());
    } else if have_cert {
        listen["tls"] = strings(listeners(
            &ips,
            &[
                c.tls_listening_port.or(Some(5349)),
                c.alt_tls_listening_port,
            ],
        ));
        if !c.no_dtls {
            whole(
                "(DTLS)",
                NoteKind::NotCarried,
                "coturn also served DTLS on the TLS ports; turnd does not",
            );
        }
    } else {
        whole(
            "(TLS)",
            NoteKind::Changed,
            "no cert and pkey: turnd serves no TLS (coturn would try its default certificate files)",
        );
    }
    doc["listen"] = Item::Table(listen);

    if have_cert {
        let mut tls = Table::new();
        tls["cert"] = toml_edit::value(c.cert.clone().unwrap_or_default());
        tls["key"] = toml_edit::value(c.pkey.clone().unwrap_or_default());
        doc["tls"] = Item::Table(tls);
    } else if c.cert.is_some() != c.pkey.is_some() {
        whole(
            "cert/pkey",
            NoteKind::NotCarried,
            "only one of cert and pkey is set; TLS needs both",
        );
    }

    // [auth]
    let mut auth = Table::new();
    if let Some(realm) = &c.realm {
        auth["realm"] = toml_edit::value(realm.clone());
    }
    if c.use_auth_secret {
        auth["secrets"] = strings(c.secrets.iter().cloned());
        if c.secrets.is_empty() {
            whole(
                "use-auth-secret",
                NoteKind::Changed,
                "no static-auth-secret: coturn read the secret from its database; give turnd the \
                 secret through TURND_AUTH_SECRET or TURND_AUTH_SECRET_FILE",
            );
        }
        if !c.users.is_empty() {
            whole(
                "user",
                NoteKind::Changed,
                "turnd accepts the static users alongside REST-API credentials",
            );
        }
    } else if !c.secrets.is_empty() {
        whole(
            "static-auth-secret",
            NoteKind::NotCarried,
            "without use-auth-secret coturn ignores the secret; add it to auth.secrets to enable REST-API credentials",
        );
    }
    if !c.users.is_empty() {
        if c.realm.is_none() {
            whole(
                "user",
                NoteKind::Changed,
                "no realm set: turnd's default realm is \"turnd\"; 0x keys were computed with coturn's realm and must be recomputed",
            );
        }
        let mut users = ArrayOfTables::new();
        for (name, cred) in &c.users {
            let mut t = Table::new();
            t["name"] = toml_edit::value(name.clone());
            match cred {
                Credential::Password(p) => t["password"] = toml_edit::value(p.clone()),
                Credential::Key(k) => t["key"] = toml_edit::value(k.clone()),
            }
            users.push(t);
        }
        auth["users"] = Item::ArrayOfTables(users);
    }
    doc["auth"] = Item::Table(auth);

    // [relay]
    let mut relay = Table::new();
    if !c.relay_ips.is_empty() {
        relay["addresses"] = strings(c.relay_ips.iter().map(ToString::to_string));
    }
    match (c.min_port, c.max_port) {
        (None, None) => whole(
            "min-port/max-port",
            NoteKind::Changed,
            "unset: coturn's default relay range is 49152-65535, turnd's is 49152-50175",
        ),
        (min, max) => {
            relay["min_port"] = toml_edit::value(i64::from(min.unwrap_or(49152)));
            relay["max_port"] = toml_edit::value(i64::from(max.unwrap_or(65535)));
        }
    }
    if !c.external_ips.is_empty() {
        relay["external_ips"] = strings(c.external_ips.iter().cloned());
    }
    doc["relay"] = Item::Table(relay);

    // [lifetimes]
    let mut lifetimes = Table::new();
    let secs = |s: u64| toml_edit::value(i64::try_from(s).unwrap_or(i64::MAX));
    if let Some(s) = c.max_allocate_lifetime {
        lifetimes["max_allocation"] = secs(s);
        if s < 600 {
            lifetimes["allocation"] = secs(s);
        }
    }
    if let Some(s) = c.permission_lifetime {
        lifetimes["permission"] = secs(s);
    }
    if let Some(s) = c.channel_lifetime {
        lifetimes["channel"] = secs(s);
    }
    if let Some(s) = c.stale_nonce {
        lifetimes["nonce"] = secs(s);
    }
    if !lifetimes.is_empty() {
        doc["lifetimes"] = Item::Table(lifetimes);
    }

    // [peers]
    let mut peers = Table::new();
    whole(
        "(peers)",
        NoteKind::Changed,
        "turnd denies loopback, private, link-local and other special-purpose peers unless listed in \
         peers.allow; coturn allowed most of them unless denied-peer-ip said otherwise",
    );
    peers["allow"] = strings(c.allowed.iter().map(ToString::to_string));
    peers["deny"] = strings(c.denied.iter().map(ToString::to_string));
    doc["peers"] = Item::Table(peers);

    // [quotas]
    if c.user_quota.is_some() || c.total_quota.is_some() {
        let mut quotas = Table::new();
        if let Some(q) = c.user_quota {
            quotas["allocations_per_user"] = toml_edit::value(i64::from(q));
        }
        if let Some(q) = c.total_quota {
            quotas["total_allocations"] = toml_edit::value(i64::from(q));
        }
        doc["quotas"] = Item::Table(quotas);
    }

    if let Some(w) = c.workers {
        let mut server = Table::new();
        server["workers"] = toml_edit::value(i64::try_from(w).unwrap_or(0));
        doc["server"] = Item::Table(server);
    }
    if let Some(level) = c.log_level {
        let mut log = Table::new();
        log["level"] = toml_edit::value(level);
        doc["log"] = Item::Table(log);
    }
    doc.to_string()
}

#[cfg(test)]
mod tests {
    use super::super::{Config, MapEnv};
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    #[test]
    fn ranges_become_minimal_cidrs() {
        assert_eq!(
            range_to_cidrs("10.0.0.0-10.255.255.255"),
            Some(nets(&["10.0.0.0/8"]))
        );
        assert_eq!(range_to_cidrs("1.2.3.4"), Some(nets(&["1.2.3.4/32"])));
        assert_eq!(
            range_to_cidrs("192.168.1.5-192.168.1.12"),
            Some(nets(&[
                "192.168.1.5/32",
                "192.168.1.6/31",
                "192.168.1.8/30",
                "192.168.1.12/32"
            ]))
        );
        assert_eq!(
            range_to_cidrs("0.0.0.0-255.255.255.255"),
            Some(nets(&["0.0.0.0/0"]))
        );
        assert_eq!(
            range_to_cidrs("::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            Some(nets(&["::/0"]))
        );
        assert_eq!(
            range_to_cidrs("fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            Some(nets(&["fc00::/7"]))
        );
        assert_eq!(range_to_cidrs("10.0.0.2-10.0.0.1"), None, "inverted");
        assert_eq!(range_to_cidrs("10.0.0.1-::1"), None, "mixed families");
        assert_eq!(range_to_cidrs("nonsense"), None);
    }

    #[test]
    fn ranges_cover_exactly_the_range() {
        let cidrs = range_to_cidrs("172.16.0.7-172.16.3.200").expect("range");
        let total: u64 = cidrs.iter().map(|n| 1u64 << (32 - n.prefix_len())).sum();
        assert_eq!(
            total,
            (172 * 16777216 + 16 * 65536 + 3 * 256 + 200) - (172 * 16777216 + 16 * 65536 + 7) + 1
        );
    }

    const COTURN: &str = r#"
# production turnserver.conf
listening-port=3478
tls-listening-port=5349
alt-tls-listening-port=443
listening-ip=10.10.10.11
relay-ip=10.10.10.11
external-ip=94.130.141.98/10.10.10.11
min-port=49152
max-port=50175
realm=turn.example.org
fingerprint
lt-cred-mech
use-auth-secret
static-auth-secret=first-secret
static-auth-secret=second-secret
user=alice:wonderland
user=bob:0x543e1aec5d3614f03141652d6ada51b2
cert=/etc/letsencrypt/live/example.org/fullchain.pem
pkey=/etc/letsencrypt/live/example.org/privkey.pem
denied-peer-ip=0.0.0.0-0.255.255.255
denied-peer-ip=10.0.0.0-10.255.255.255
denied-peer-ip=fc00::-fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff
allowed-peer-ip=10.10.10.20
user-quota=12
total-quota=1200
max-allocate-lifetime=3600
channel-lifetime=-1
permission-lifetime=0
stale-nonce=600
no-dtls
no-multicast-peers
no-cli
verbose
log-file=/var/log/turnserver/turn.log
simple-log
pidfile="/var/run/turnserver.pid"
mobility
"#;

    #[test]
    fn realistic_coturn_config_converts_and_validates() {
        let out = import(COTURN);
        let config = Config::parse_named(&out.toml, "imported.toml").expect("parses");
        let s = config.validate(&MapEnv::default()).expect("validates");
        assert_eq!(
            s.listeners.udp,
            vec!["10.10.10.11:3478".parse().expect("addr")]
        );
        assert_eq!(
            s.listeners.tls,
            vec![
                "10.10.10.11:5349".parse().expect("addr"),
                "10.10.10.11:443".parse().expect("addr")
            ]
        );
        assert_eq!(s.relay.ports, 49152..=50175);
        let private: IpAddr = "10.10.10.11".parse().expect("ip");
        assert_eq!(s.relay.advertised(private).to_string(), "94.130.141.98");
        assert_eq!(s.auth.realm, "turn.example.org");
        let secrets: Vec<&str> = s.auth.secrets.iter().map(|x| x.expose()).collect();
        assert_eq!(secrets, ["first-secret", "second-secret"]);
        assert_eq!(
            s.auth.users["alice"].key_md5("turn.example.org"),
            turn_proto::auth::long_term_key_md5("alice", "turn.example.org", "wonderland")
        );
        assert_eq!(s.auth.users["bob"].key_md5("turn.example.org")[0], 0x54);
        assert!(s.peers.is_allowed("10.10.10.20".parse().expect("ip")));
        assert!(!s.peers.is_allowed("10.10.10.21".parse().expect("ip")));
        assert_eq!(s.quotas.allocations_per_user.map(|q| q.get()), Some(12));
        assert_eq!(s.quotas.total_allocations.map(|q| q.get()), Some(1200));
        assert_eq!(s.log.level, "debug");
        assert_eq!(
            s.tls.expect("tls").key.to_str(),
            Some("/etc/letsencrypt/live/example.org/privkey.pem")
        );

        let not_carried: Vec<&str> = out
            .notes
            .iter()
            .filter(|n| n.kind == NoteKind::NotCarried)
            .map(|n| n.option.as_str())
            .collect();
        for opt in ["log-file", "simple-log", "pidfile", "mobility"] {
            assert!(
                not_carried.contains(&opt),
                "{opt} missing from {not_carried:?}"
            );
        }
        let log_file = out
            .notes
            .iter()
            .find(|n| n.option == "log-file")
            .expect("note");
        assert_eq!(log_file.line, 35);
        assert!(
            out.toml.contains("#   line 35: log-file: not carried"),
            "{}",
            out.toml
        );
        for carried in [
            "listening-port",
            "realm",
            "user",
            "static-auth-secret",
            "cert",
            "external-ip",
        ] {
            assert!(!out
                .notes
                .iter()
                .any(|n| n.option == carried && n.kind == NoteKind::NotCarried));
        }
    }

    #[test]
    fn transports_can_be_turned_off() {
        let out = import("no-udp\nno-tls\nuse-auth-secret\nstatic-auth-secret=s\n");
        let s = Config::from_toml(&out.toml)
            .expect("parses")
            .validate(&MapEnv::default())
            .expect("valid");
        assert!(s.listeners.udp.is_empty());
        assert!(s.listeners.tls.is_empty());
        assert_eq!(s.listeners.tcp.len(), 2);
    }

    #[test]
    fn secret_without_use_auth_secret_is_not_carried() {
        let out = import("static-auth-secret=s\nuser=u:p\n");
        let s = Config::from_toml(&out.toml)
            .expect("parses")
            .validate(&MapEnv::default())
            .expect("valid");
        assert!(s.auth.secrets.is_empty());
        assert!(out
            .notes
            .iter()
            .any(|n| n.option == "static-auth-secret" && n.kind == NoteKind::NotCarried));
    }

    #[test]
    fn bad_values_are_reported_not_carried() {
        let out =
            import("min-port=lots\nexternal-ip=turn.example.org\nuser=nopassword\nfrobnicate=1\n");
        let lines: Vec<(usize, &str)> = out
            .notes
            .iter()
            .filter(|n| n.kind == NoteKind::NotCarried)
            .map(|n| (n.line, n.option.as_str()))
            .collect();
        assert_eq!(
            lines,
            [
                (1, "min-port"),
                (2, "external-ip"),
                (3, "user"),
                (4, "frobnicate")
            ]
        );
    }
}
