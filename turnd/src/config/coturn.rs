//! `turnd import-coturn`: converts a coturn `turnserver.conf` into turnd TOML, with one
//! classified note for every option in the file.
//!
//! coturn's file has one option per line, `name=value` or a bare `name` for flags
//! (`#` starts a comment; a leading `--` is tolerated). Each option is *carried* (perhaps
//! with a change the note explains), *ignored* with the reason (turnd does that anyway, or
//! the option has no meaning here, or its effect is lost without widening access), or
//! *unsupported*: turnd cannot honour it and carrying on without it could let in what
//! coturn kept out, so the import fails and names the option.
//!
//! The rule: the result never grants more than coturn did. `user=` lines under
//! `use-auth-secret` (which coturn ignores) are not carried; `stun-only` and `no-stun`
//! become turnd's service modes; a client certificate requirement (`CA-file`), an encrypted
//! key (`pkey-pwd`), TCP-only relaying (`no-udp-relay`) and authenticated-only Binding with
//! `stun-only` are refused.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table};

use super::validate::{parse_cidr, parse_ip, parse_key};

/// The result of an import: the TOML text and one note per option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// turnd configuration (TOML), with the notes that are not plain "carried" repeated as
    /// comments at the top.
    pub toml: String,
    /// What happened to every option, and notes about the file as a whole.
    pub notes: Vec<Note>,
}

impl Import {
    /// The notes that make the import fail.
    pub fn unsupported(&self) -> impl Iterator<Item = &Note> {
        self.notes
            .iter()
            .filter(|n| n.kind == NoteKind::Unsupported)
    }

    /// Whether every option could be carried or safely ignored.
    #[must_use]
    pub fn is_ok(&self) -> bool {
        self.unsupported().next().is_none()
    }
}

/// What happened to one coturn option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    /// Carried into the TOML as it was (the note names the turnd key).
    Carried,
    /// Carried, but turnd's behaviour differs in the way the note says.
    Changed,
    /// Not carried: turnd behaves so anyway, the option has no meaning in turnd, or its
    /// effect is lost without granting anything coturn refused. The note says which.
    Ignored,
    /// turnd cannot honour it, and ignoring it could grant what coturn refused (or the
    /// value cannot be read): the import fails.
    Unsupported,
}

impl NoteKind {
    /// The word used in notes: `carried`, `changed`, `ignored`, `unsupported`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Carried => "carried",
            Self::Changed => "changed",
            Self::Ignored => "ignored",
            Self::Unsupported => "unsupported",
        }
    }
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
    /// Why, or where it went.
    pub reason: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: ", self.line)?;
        }
        write!(
            f,
            "{}: {}: {}",
            self.option,
            self.kind.as_str(),
            self.reason
        )
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
    no_tcp_relay: bool,
    stun_only: bool,
    no_stun: bool,
    secure_stun: bool,
    log_level: Option<&'static str>,
    workers: Option<usize>,
}

#[derive(Debug)]
enum Credential {
    Password(String),
    Key(String),
}

/// One option line: its number, name and value.
struct Line<'a> {
    number: usize,
    name: &'a str,
    value: Option<&'a str>,
}

/// The option lines of a coturn file (comments and blank lines left out).
fn lines(text: &str) -> impl Iterator<Item = Line<'_>> {
    text.lines().enumerate().filter_map(|(i, raw)| {
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            return None;
        }
        let l = l.strip_prefix("--").unwrap_or(l);
        let (name, value) = match l.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim()))),
            None => match l.split_once(char::is_whitespace) {
                Some((n, v)) => (n.trim(), Some(unquote(v.trim()))),
                None => (l, None),
            },
        };
        Some(Line {
            number: i + 1,
            name,
            value,
        })
    })
}

/// Converts coturn configuration text. Check [`Import::is_ok`]: an unsupported option
/// makes the result unusable as it is.
#[must_use]
pub fn import(text: &str) -> Import {
    let mut c = Coturn {
        // Decides how `user=` lines are read, wherever they stand in the file.
        use_auth_secret: lines(text).any(|l| l.name == "use-auth-secret"),
        ..Coturn::default()
    };
    let mut notes = Vec::new();
    for l in lines(text) {
        let (kind, reason) = take(&mut c, l.name, l.value);
        notes.push(Note {
            line: l.number,
            option: l.name.to_owned(),
            kind,
            reason,
        });
    }
    let toml = emit(&c, &mut notes);
    let mut header = String::from(
        "# turnd configuration converted from a coturn turnserver.conf by `turnd import-coturn`.\n\
         # Check it with `turnd check-config FILE`; see deploy/turnd.example.toml for every option.\n",
    );
    let remarkable: Vec<&Note> = notes
        .iter()
        .filter(|n| n.kind != NoteKind::Carried)
        .collect();
    if !remarkable.is_empty() {
        header.push_str("#\n# Options changed, ignored or unsupported:\n");
        for n in remarkable {
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

type Outcome = (NoteKind, String);

fn carried(to: &str) -> Outcome {
    (NoteKind::Carried, format!("→ {to}"))
}

fn changed(why: &str) -> Outcome {
    (NoteKind::Changed, why.to_owned())
}

fn ignored(why: &str) -> Outcome {
    (NoteKind::Ignored, why.to_owned())
}

fn unsupported(why: &str) -> Outcome {
    (NoteKind::Unsupported, why.to_owned())
}

/// `Some(value)` or the note saying why the value cannot be read.
fn parsed<T>(v: Option<T>, what: &str, value: &str) -> Result<T, Outcome> {
    v.ok_or_else(|| unsupported(&format!("`{value}` is not {what}")))
}

/// Applies one option to `c` and classifies it.
#[allow(clippy::too_many_lines)]
fn take(c: &mut Coturn, name: &str, value: Option<&str>) -> Outcome {
    match take_value(c, name, value.unwrap_or(""), value.is_none()) {
        Ok(o) | Err(o) => o,
    }
}

#[allow(clippy::too_many_lines)]
fn take_value(c: &mut Coturn, name: &str, v: &str, bare: bool) -> Result<Outcome, Outcome> {
    let port = || parsed(v.parse::<u16>().ok().filter(|p| *p > 0), "a port number", v);
    let count = || parsed(v.parse::<u32>().ok(), "a number", v);
    let ip = || {
        parsed(
            parse_ip(v),
            "an IP address (turnd does not resolve names)",
            v,
        )
    };
    // coturn lifetimes: seconds; 0 or negative means "use the default".
    let seconds = || -> Result<Option<u64>, Outcome> {
        let n = parsed(v.parse::<i64>().ok(), "a number of seconds", v)?;
        Ok(u64::try_from(n).ok().filter(|n| *n > 0))
    };
    let lifetime = |slot: &mut Option<u64>, to: &str| -> Result<Outcome, Outcome> {
        match seconds()? {
            Some(s) => {
                *slot = Some(s);
                Ok(carried(to))
            }
            None => Ok(ignored(
                "0 or negative means coturn's default, which is turnd's too",
            )),
        }
    };
    Ok(match name {
        // Listeners.
        "listening-port" => {
            c.listening_port = Some(port()?);
            carried("listen.udp, listen.tcp")
        }
        "tls-listening-port" => {
            c.tls_listening_port = Some(port()?);
            carried("listen.tls")
        }
        "alt-listening-port" => {
            c.alt_listening_port = Some(port()?);
            changed("turnd has no RFC 5780 NAT discovery; the port becomes one more listener")
        }
        "alt-tls-listening-port" => {
            c.alt_tls_listening_port = Some(port()?);
            changed("turnd has no RFC 5780 NAT discovery; the port becomes one more TLS listener")
        }
        "listening-ip" => {
            c.listening_ips.push(ip()?);
            carried("listen.udp, listen.tcp, listen.tls")
        }
        "no-udp" => {
            c.no_udp = true;
            carried("listen.udp = []")
        }
        "no-tcp" => {
            c.no_tcp = true;
            carried("listen.tcp = []")
        }
        "no-tls" => {
            c.no_tls = true;
            carried("listen.tls = []")
        }
        "no-dtls" => {
            c.no_dtls = true;
            ignored("turnd does not serve DTLS")
        }
        "listening-device" | "relay-device" => ignored(
            "turnd does not bind to a device (SO_BINDTODEVICE); list its addresses in \
             listen.* and relay.addresses instead",
        ),
        "tcp-proxy-port" => ignored(
            "turnd reads no PROXY protocol; that listener is not carried (clients behind the \
             proxy cannot connect, nothing more is reachable)",
        ),
        "aux-server" => ignored(
            "not carried: add the address to listen.udp and listen.tcp to serve it (one less \
             listener, nothing more reachable)",
        ),
        "udp-self-balance" => {
            ignored("turnd spreads UDP over its workers with SO_REUSEPORT on every listener")
        }
        "ne" => ignored("turnd's IO backend is chosen by [server] io (default auto)"),

        // Relay.
        "relay-ip" => {
            c.relay_ips.push(ip()?);
            carried("relay.addresses (every relay-ip serves allocations)")
        }
        "external-ip" => {
            let ok = match v.split_once('/') {
                Some((p, q)) => parse_ip(p).is_some() && parse_ip(q).is_some(),
                None => parse_ip(v).is_some(),
            };
            parsed(ok.then_some(()), "PUBLIC or PUBLIC/PRIVATE IP addresses", v)?;
            c.external_ips.push(v.to_owned());
            carried("relay.external_ips")
        }
        "min-port" => {
            c.min_port = Some(port()?);
            carried("relay.min_port")
        }
        "max-port" => {
            c.max_port = Some(port()?);
            carried("relay.max_port")
        }
        "no-tcp-relay" => {
            c.no_tcp_relay = true;
            ignored(
                "turnd never relays TCP to peers (RFC 6062): an Allocate for TCP gets 442 \
                 Unsupported Transport Protocol anyway",
            )
        }
        "no-udp-relay" => unsupported(
            "coturn relayed only TCP (RFC 6062); turnd relays only UDP, which coturn refused: \
             remove the line to relay UDP",
        ),
        "server-relay" => ignored(
            "turnd always checks permissions on packets reaching a relay address (coturn's \
             non-standard exception is not carried)",
        ),
        "allocation-default-address-family" | "keep-address-family" => ignored(
            "turnd follows RFC 8656: an IPv4 relay unless the client asks \
             (REQUESTED-ADDRESS-FAMILY, ADDITIONAL-ADDRESS-FAMILY)",
        ),
        "mobility" => ignored("turnd does not implement ICE mobility (RFC 8016)"),
        "max-allocate-timeout" => {
            ignored("turnd answers an Allocate at once; there is no wait to bound")
        }
        "alternate-server" | "tls-alternate-server" => ignored(
            "turnd does not send every client elsewhere; it names siblings in 300 \
             ALTERNATE-SERVER only while draining ([drain] alternate_servers)",
        ),
        "bps-capacity" | "max-bps" | "B" => ignored(
            "turnd has no bandwidth cap; the limit is lost (quotas on allocations are carried)",
        ),

        // Authentication.
        "realm" => {
            c.realm = Some(v.to_owned());
            carried("auth.realm")
        }
        "user" => {
            let (u, p) = parsed(
                v.split_once(':')
                    .filter(|(u, p)| !u.is_empty() && !p.is_empty()),
                "NAME:PASSWORD or NAME:0xKEY",
                v,
            )?;
            if c.use_auth_secret {
                return Ok(ignored(
                    "not carried: with use-auth-secret coturn ignores user= lines and accepts \
                     only REST-API credentials, so this user could not log in there either",
                ));
            }
            let cred = if p.starts_with("0x") && parse_key(p).is_some() {
                Credential::Key(p.to_owned())
            } else {
                Credential::Password(p.to_owned())
            };
            c.users.push((u.to_owned(), cred));
            carried("[[auth.users]]")
        }
        "lt-cred-mech" | "a" => ignored("turnd always uses long-term credentials"),
        "use-auth-secret" => {
            // Set by the pre-scan in `import`.
            carried("auth.secrets (REST-API credentials)")
        }
        "static-auth-secret" => {
            parsed((!v.is_empty()).then_some(()), "a secret", v)?;
            c.secrets.push(v.to_owned());
            if c.use_auth_secret {
                carried("auth.secrets")
            } else {
                ignored(
                    "without use-auth-secret coturn ignores the secret, so it is not carried; \
                     add it to auth.secrets to enable REST-API credentials",
                )
            }
        }
        "rest-api-separator" if v == ":" => ignored("`:` is turnd's separator"),
        "rest-api-separator" => ignored(
            "turnd's REST-API usernames are `<expiry>:<user>`; credentials with another \
             separator are refused",
        ),
        "secret-key-file" | "oauth" | "server-name" => ignored(
            "turnd does not implement third-party authorization (RFC 7635); OAuth tokens are \
             refused",
        ),
        "no-auth" | "z" => {
            ignored("turnd always authenticates TURN requests; clients need credentials now")
        }
        "userdb" | "b" | "db" | "psql-userdb" | "sql-userdb" | "e" | "mysql-userdb" | "M"
        | "mongo-userdb" | "J" | "redis-userdb" | "N" | "redis-statsdb" | "O"
        | "secret-ts-exp-time" => ignored(
            "turnd reads no database: users stored there cannot log in; list them under \
             [auth] or use REST-API secrets",
        ),
        "check-origin-consistency" => {
            ignored("turnd does not look at ORIGIN (an attribute RFC 8656 does not use for access)")
        }

        // STUN.
        "stun-only" | "S" => {
            c.stun_only = true;
            carried("server.stun_only = true")
        }
        "no-stun" => {
            c.no_stun = true;
            carried("server.no_stun = true")
        }
        "secure-stun" => {
            c.secure_stun = true;
            changed(
                "turnd does not authenticate Binding requests; it answers none instead \
                 (server.no_stun = true)",
            )
        }
        "fingerprint" | "f" => {
            ignored("turnd has no switch for it: FINGERPRINT handling is built in (RFC 8489 §14.7)")
        }
        "no-rfc5780" | "response-origin-only-with-rfc5780" => {
            ignored("turnd has no RFC 5780 NAT behaviour discovery")
        }
        "no-stun-backward-compatibility" => {
            ignored("turnd answers only RFC 5389/8489 STUN (with the magic cookie), never RFC 3489")
        }
        "no-software-attribute" => ignored("turnd sends SOFTWARE only to authenticated clients"),

        // TLS.
        "cert" => {
            c.cert = Some(v.to_owned());
            carried("tls.cert")
        }
        "pkey" => {
            c.pkey = Some(v.to_owned());
            carried("tls.key")
        }
        "pkey-pwd" => unsupported(
            "turnd cannot read an encrypted private key: decrypt it (openssl pkey -in KEY \
             -out KEY.plain) and point tls.key at the result",
        ),
        "CA-file" | "ca-file" => unsupported(
            "coturn verified client certificates against this CA; turnd does not verify \
             client certificates, so it would let in clients coturn refused",
        ),
        "no-tlsv1" | "no-tlsv1_1" => ignored("turnd's TLS speaks only TLS 1.2 and 1.3"),
        "no-tlsv1_2" => unsupported("coturn refused TLS 1.2; turnd always offers TLS 1.2 and 1.3"),
        "cipher-list" | "ec-curve-name" | "dh-file" | "dh566" | "dh1066" => {
            ignored("turnd's TLS uses rustls' safe default cipher suites and groups")
        }
        "acme-redirect" => ignored(
            "turnd serves no HTTP for ACME; renew certificates outside turnd (it reloads them)",
        ),

        // Allocations and lifetimes.
        "allow-loopback-peers" => {
            c.allowed.extend(
                ["127.0.0.0/8", "::1/128"]
                    .iter()
                    .filter_map(|s| s.parse::<IpNet>().ok()),
            );
            carried("peers.allow (127.0.0.0/8, ::1)")
        }
        "no-loopback-peers" | "no-multicast-peers" => {
            ignored("turnd denies loopback and multicast peers by default (the built-in deny list)")
        }
        "denied-peer-ip" | "allowed-peer-ip" => {
            let nets = parsed(range_to_cidrs(v), "an IP address or an IP range A-B", v)?;
            if name == "denied-peer-ip" {
                c.denied.extend(nets);
                carried("peers.deny")
            } else {
                c.allowed.extend(nets);
                carried("peers.allow")
            }
        }
        "user-quota" => {
            c.user_quota = Some(count()?);
            carried("quotas.allocations_per_user")
        }
        "total-quota" => {
            c.total_quota = Some(count()?);
            carried("quotas.total_allocations")
        }
        "max-allocate-lifetime" => {
            lifetime(&mut c.max_allocate_lifetime, "lifetimes.max_allocation")?
        }
        "channel-lifetime" => lifetime(&mut c.channel_lifetime, "lifetimes.channel")?,
        "permission-lifetime" => lifetime(&mut c.permission_lifetime, "lifetimes.permission")?,
        "stale-nonce" if bare => {
            c.stale_nonce = Some(600);
            carried("lifetimes.nonce = 600")
        }
        "stale-nonce" => lifetime(&mut c.stale_nonce, "lifetimes.nonce")?,

        // Process, threads and logs.
        "verbose" | "v" => {
            c.log_level = Some("debug");
            carried("log.level = \"debug\"")
        }
        "Verbose" | "V" => {
            c.log_level = Some("trace");
            carried("log.level = \"trace\"")
        }
        "relay-threads" | "general-threads" => match v.parse::<usize>() {
            Ok(n) if n > 0 => {
                c.workers = Some(n);
                changed("→ server.workers: turnd's workers serve listeners and relays together")
            }
            Ok(_) => ignored("0 means one per core, which is turnd's default"),
            Err(_) => parsed(None, "a number", v)?,
        },
        "log-file"
        | "l"
        | "syslog"
        | "simple-log"
        | "new-log-timestamp"
        | "new-log-timestamp-format"
        | "log-binding"
        | "syslog-facility"
        | "no-stdout-log" => ignored(
            "turnd logs to stdout only (text or JSON, [log]); let systemd or the container \
                 runtime keep the logs",
        ),
        "pidfile" | "proc-user" | "proc-group" => ignored(
            "run turnd under systemd or Kubernetes with the user you want; it writes no pid file",
        ),

        // Administration.
        "no-cli" | "cli-ip" | "cli-port" | "cli-password" | "cli-max-output-sessions" => {
            ignored("turnd has no telnet admin CLI")
        }
        "web-admin" | "web-admin-ip" | "web-admin-port" | "web-admin-listen-on-workers" => {
            ignored("turnd has no web admin; its admin API ([admin]) needs a bearer token")
        }
        "prometheus" | "prometheus-port" | "prometheus-username-labels" => changed(
            "turnd serves /metrics on [admin] listen, 127.0.0.1:9641 by default (loopback \
             only; coturn listened on every address); labels never carry user names",
        ),
        "drop-invalid-packets" => ignored("turnd never answers what does not decode"),
        "sock-buf-size" => ignored("set [sockets] recv_buffer_bytes and send_buffer_bytes instead"),
        _ => unsupported(
            "not a coturn 4.6 option the importer knows, so it cannot tell whether turnd \
             would honour it; check it and remove the line",
        ),
    })
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
                NoteKind::Ignored,
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
            NoteKind::Ignored,
            "only one of cert and pkey is set; TLS needs both, so turnd serves no TLS",
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
                 secret through TURND_AUTH_SECRET or TURND_AUTH_SECRET_FILE \
                 (check the result with `turnd check-config --allow-missing-secret`)",
            );
        }
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

    // [server]
    let mut server = Table::new();
    if let Some(w) = c.workers {
        server["workers"] = toml_edit::value(i64::try_from(w).unwrap_or(0));
    }
    server["rfc5766_channel_numbers"] = toml_edit::value(true);
    whole(
        "(channel numbers)",
        NoteKind::Changed,
        "coturn accepts channel numbers 0x4000-0x7FFF (RFC 5766) and its clients, \
         turnutils_uclient among them, bind above 0x4FFF; written out as \
         server.rfc5766_channel_numbers = true (turnd's default too; false keeps RFC 8656's \
         0x4000-0x4FFF, and such clients get 400)",
    );
    if !c.no_tcp_relay && !c.stun_only {
        whole(
            "(TCP relay)",
            NoteKind::Changed,
            "coturn relays TCP to peers (RFC 6062) unless no-tcp-relay; turnd relays UDP only: \
             an Allocate for TCP gets 442 Unsupported Transport Protocol",
        );
    }
    let no_stun = c.no_stun || c.secure_stun;
    match (c.stun_only, no_stun) {
        (true, true) => whole(
            if c.secure_stun {
                "stun-only/secure-stun"
            } else {
                "stun-only/no-stun"
            },
            NoteKind::Unsupported,
            "together they leave turnd nothing it can answer (turnd does not authenticate \
             Binding requests)",
        ),
        (true, false) => {
            server["stun_only"] = toml_edit::value(true);
        }
        (false, true) => {
            server["no_stun"] = toml_edit::value(true);
        }
        (false, false) => {}
    }
    doc["server"] = Item::Table(server);
    if let Some(level) = c.log_level {
        let mut log = Table::new();
        log["level"] = toml_edit::value(level);
        doc["log"] = Item::Table(log);
    }
    doc.to_string()
}

#[cfg(test)]
mod tests {
    use super::super::{Config, MapEnv, ServiceMode};
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
        assert!(out.is_ok(), "{:?}", out.unsupported().collect::<Vec<_>>());
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
        assert!(
            s.auth.users.is_empty(),
            "user= lines under use-auth-secret are not carried"
        );
        assert!(s.peers.is_allowed("10.10.10.20".parse().expect("ip")));
        assert!(!s.peers.is_allowed("10.10.10.21".parse().expect("ip")));
        assert_eq!(s.quotas.allocations_per_user.map(|q| q.get()), Some(12));
        assert_eq!(s.quotas.total_allocations.map(|q| q.get()), Some(1200));
        assert_eq!(s.log.level, "debug");
        assert!(s.rfc5766_channel_numbers, "coturn's channel range kept");
        assert_eq!(
            s.tls.expect("tls").key.to_str(),
            Some("/etc/letsencrypt/live/example.org/privkey.pem")
        );

        let kind = |opt: &str| {
            out.notes
                .iter()
                .find(|n| n.option == opt)
                .map(|n| n.kind)
                .unwrap_or_else(|| panic!("no note for {opt}"))
        };
        for opt in ["log-file", "simple-log", "pidfile", "mobility", "user"] {
            assert_eq!(kind(opt), NoteKind::Ignored, "{opt}");
        }
        for opt in [
            "listening-port",
            "realm",
            "static-auth-secret",
            "cert",
            "external-ip",
            "relay-ip",
        ] {
            assert_eq!(kind(opt), NoteKind::Carried, "{opt}");
        }
        let log_file = out
            .notes
            .iter()
            .find(|n| n.option == "log-file")
            .expect("note");
        assert_eq!(log_file.line, 35);
        assert!(
            out.toml.contains("#   line 35: log-file: ignored"),
            "{}",
            out.toml
        );
        // One note per option line, plus notes about the whole file.
        let option_lines = COTURN
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim().starts_with('#'))
            .count();
        assert_eq!(
            out.notes.iter().filter(|n| n.line > 0).count(),
            option_lines
        );
        for whole in ["(channel numbers)", "(TCP relay)", "(peers)"] {
            assert!(
                out.notes.iter().any(|n| n.line == 0 && n.option == whole),
                "{whole}"
            );
        }
    }

    #[test]
    fn user_lines_under_use_auth_secret_never_authenticate() {
        // coturn ignores user= under use-auth-secret, wherever the line stands.
        let out = import(
            "user=alice:wonderland\nrealm=example.org\nuse-auth-secret\n\
             static-auth-secret=s3cret\nuser=bob:0x543e1aec5d3614f03141652d6ada51b2\n",
        );
        assert!(out.is_ok());
        let s = Config::from_toml(&out.toml)
            .expect("parses")
            .validate(&MapEnv::default())
            .expect("valid");
        assert!(s.auth.users.is_empty());
        let creds = s.auth.credentials();
        let md5 = turn_proto::codec::PasswordAlgorithmId::MD5;
        for user in ["alice", "bob"] {
            assert!(
                creds.keys(user, md5, 0).is_err(),
                "{user} must not authenticate"
            );
        }
        // A REST-API credential made with the secret does.
        let rest = "4000000000:alice";
        assert!(creds.keys(rest, md5, 1_000).is_ok());
        let notes: Vec<&Note> = out.notes.iter().filter(|n| n.option == "user").collect();
        assert_eq!(notes.len(), 2);
        for n in notes {
            assert_eq!(n.kind, NoteKind::Ignored);
            assert!(n.reason.contains("coturn ignores user="), "{n}");
        }
        assert!(!out.toml.contains("wonderland"), "{}", out.toml);

        // Without use-auth-secret the same lines are live users.
        let out = import("realm=example.org\nuser=alice:wonderland\n");
        let s = Config::from_toml(&out.toml)
            .expect("parses")
            .validate(&MapEnv::default())
            .expect("valid");
        assert!(s.auth.credentials().keys("alice", md5, 0).is_ok());
    }

    #[test]
    fn stun_modes_are_carried() {
        let out = import("stun-only\n");
        assert!(out.is_ok());
        let s = Config::from_toml(&out.toml)
            .expect("parses")
            .validate(&MapEnv::default())
            .expect("a STUN-only server needs no credentials");
        assert_eq!(s.mode, ServiceMode::StunOnly);
        assert!(
            !out.notes.iter().any(|n| n.option == "(TCP relay)"),
            "no relay at all"
        );

        let out = import("no-stun\nuse-auth-secret\nstatic-auth-secret=s\n");
        let s = Config::from_toml(&out.toml)
            .expect("parses")
            .validate(&MapEnv::default())
            .expect("valid");
        assert_eq!(s.mode, ServiceMode::NoStun);

        let out = import("secure-stun\nuse-auth-secret\nstatic-auth-secret=s\n");
        let s = Config::from_toml(&out.toml)
            .expect("parses")
            .validate(&MapEnv::default())
            .expect("valid");
        assert_eq!(
            s.mode,
            ServiceMode::NoStun,
            "unauthenticated Binding refused"
        );

        let out = import("stun-only\nsecure-stun\n");
        assert!(
            !out.is_ok(),
            "turnd cannot answer authenticated Binding only"
        );
    }

    #[test]
    fn options_turnd_cannot_honour_fail_the_import() {
        let out = import(
            "use-auth-secret\nstatic-auth-secret=s\npkey-pwd=hunter2\nno-udp-relay\n\
             CA-file=/etc/ca.pem\nno-tlsv1_2\nno-tcp-relay\n",
        );
        let bad: Vec<(usize, &str)> = out
            .unsupported()
            .map(|n| (n.line, n.option.as_str()))
            .collect();
        assert_eq!(
            bad,
            [
                (3, "pkey-pwd"),
                (4, "no-udp-relay"),
                (5, "CA-file"),
                (6, "no-tlsv1_2")
            ]
        );
        let tcp = out
            .notes
            .iter()
            .find(|n| n.option == "no-tcp-relay")
            .expect("note");
        assert_eq!(tcp.kind, NoteKind::Ignored);
        assert!(tcp.reason.contains("442"), "{tcp}");
        assert!(
            !out.notes.iter().any(|n| n.option == "(TCP relay)"),
            "no-tcp-relay: nothing lost"
        );
        assert!(!out.toml.contains("hunter2"));
    }

    #[test]
    fn every_relay_ip_is_carried() {
        let out = import(
            "relay-ip=192.0.2.10\nrelay-ip=192.0.2.11\nrelay-ip=2001:db8::10\n\
             use-auth-secret\nstatic-auth-secret=s\n",
        );
        let s = Config::from_toml(&out.toml)
            .expect("parses")
            .validate(&MapEnv::default())
            .expect("valid");
        let want: Vec<IpAddr> = ["192.0.2.10", "192.0.2.11", "2001:db8::10"]
            .iter()
            .map(|a| a.parse().expect("ip"))
            .collect();
        assert_eq!(s.relay.addresses, want);
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
            .any(|n| n.option == "static-auth-secret" && n.kind == NoteKind::Ignored));
        assert!(!out.toml.contains("secrets = [\"s\"]"), "{}", out.toml);
    }

    #[test]
    fn bad_values_and_unknown_options_fail_the_import() {
        let out =
            import("min-port=lots\nexternal-ip=turn.example.org\nuser=nopassword\nfrobnicate=1\n");
        let lines: Vec<(usize, &str)> = out
            .unsupported()
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

    /// Debian's coturn package ships coturn's example configuration here.
    const COTURN_EXAMPLE: &str = "/usr/share/doc/coturn/examples/etc/turnserver.conf";

    /// The example file, or `None` (with a message) when coturn is not installed; with
    /// `TURND_REQUIRE_TOOLS=1` its absence fails the test.
    fn coturn_example() -> Option<String> {
        match std::fs::read_to_string(COTURN_EXAMPLE) {
            Ok(text) => Some(text),
            Err(e) => {
                assert!(
                    std::env::var("TURND_REQUIRE_TOOLS").as_deref() != Ok("1"),
                    "{COTURN_EXAMPLE}: {e} (TURND_REQUIRE_TOOLS=1; apt-get install coturn)"
                );
                eprintln!("skipped: {COTURN_EXAMPLE}: {e} (apt-get install coturn)");
                None
            }
        }
    }

    /// Every option the example shows, active or commented out (`#name`, `#name=value`,
    /// `# name=value`, `#name "value"`), as an active line.
    fn every_example_option(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for l in text.lines() {
            let t = l.trim().trim_start_matches('#').trim();
            let name_len = t
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '-' || ch == '_'))
                .unwrap_or(t.len());
            let (name, rest) = t.split_at(name_len);
            let option = name.starts_with(|ch: char| ch.is_ascii_alphabetic())
                && (rest.is_empty()
                    || rest.starts_with('=')
                    || (rest.starts_with(" \"")
                        && rest.ends_with('"')
                        && rest.matches('"').count() == 2));
            if option {
                out.push(t.to_owned());
            }
        }
        out
    }

    #[test]
    fn coturns_example_file_imports() {
        let Some(text) = coturn_example() else { return };
        let out = import(&text);
        assert!(
            out.is_ok(),
            "{:?}",
            out.unsupported()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        );
        // The example's active lines (syslog, the RFC 5780 switches) are all classified.
        let active = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim().starts_with('#'))
            .count();
        assert!(active > 0, "the example has active lines");
        assert_eq!(out.notes.iter().filter(|n| n.line > 0).count(), active);
        // Without credentials it needs the secret at run time, like a fresh coturn.
        let e = Config::from_toml(&out.toml)
            .expect("parses")
            .validate(&MapEnv::default())
            .expect_err("no credentials in the example");
        assert!(
            matches!(e.reason(), super::super::Reason::NoCredentials),
            "{e}"
        );
    }

    #[test]
    fn every_option_in_coturns_example_is_classified() {
        let Some(text) = coturn_example() else { return };
        let options = every_example_option(&text);
        let names: BTreeSet<&str> = options
            .iter()
            .map(|o| o.split(['=', ' ']).next().unwrap_or(o))
            .collect();
        assert!(
            names.len() > 90,
            "found only {} options: {names:?}",
            names.len()
        );
        let mut unknown = Vec::new();
        for o in &options {
            let out = import(o);
            let note = out.notes.iter().find(|n| n.line == 1).expect("a note");
            if note.reason.starts_with("not a coturn 4.6 option") {
                unknown.push(o.clone());
            }
        }
        assert!(unknown.is_empty(), "unclassified: {unknown:?}");
        // The ones the issue names, classified as it asks.
        let kind_of = |o: &str| import(o).notes[0].kind;
        assert_eq!(kind_of("pkey-pwd=x"), NoteKind::Unsupported);
        assert_eq!(kind_of("no-udp-relay"), NoteKind::Unsupported);
        assert_eq!(kind_of("no-tcp-relay"), NoteKind::Ignored);
        assert_eq!(kind_of("stun-only"), NoteKind::Carried);
        assert_eq!(kind_of("no-stun"), NoteKind::Carried);
    }
}
