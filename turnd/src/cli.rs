//! The `turnd` command line: argument definitions (clap) and the pure parts of each
//! command, so they are unit-tested here and `main.rs` only does IO and exit codes.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::config::{Env, LogFormat, Logging};

/// A TURN/STUN server (RFC 8656, RFC 8489). Without a subcommand it runs the server,
/// from `--config FILE` or, without one, from the embedded default (UDP 3478, secret
/// from TURND_AUTH_SECRET / TURND_AUTH_SECRET_FILE or generated and printed once).
#[derive(Debug, Parser)]
#[command(name = "turnd", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Configuration file (TOML); see deploy/turnd.example.toml.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do instead of running the server.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parse and validate a configuration file, open the files it names (TLS certificate
    /// and key, secret files, token file); print a summary, or every error
    /// (file:line:col: key: reason) and exit 1.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
        /// Accept a file without any credential: its secret comes from TURND_AUTH_SECRET or
        /// TURND_AUTH_SECRET_FILE where it runs.
        #[arg(long)]
        allow_missing_secret: bool,
    },
    /// Print a TURN REST API credential (JSON: username, password, ttl, uris).
    Credentials(CredentialsArgs),
    /// Print the long-term key MD5(user:realm:password) as `0x` + hex, exactly like
    /// coturn's `turnadmin -k`; usable as `key` in [[auth.users]].
    Key {
        /// Username.
        #[arg(short = 'u', long = "user")]
        user: String,
        /// Realm (must match auth.realm).
        #[arg(short = 'r', long = "realm")]
        realm: String,
        /// Password.
        #[arg(short = 'p', long = "password")]
        password: String,
    },
    /// Convert a coturn turnserver.conf to turnd TOML (on stdout or --output). Every
    /// option gets a note on stderr: carried, changed, ignored (with the reason) or
    /// unsupported; an unsupported option fails the import (exit 1, nothing written).
    ImportCoturn {
        /// coturn's configuration file.
        file: PathBuf,
        /// Write the TOML here instead of stdout.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// `turnd credentials` arguments.
#[derive(Debug, Args)]
pub struct CredentialsArgs {
    /// The shared secret (as in auth.secrets). Without --secret or --secret-file,
    /// TURND_AUTH_SECRET or TURND_AUTH_SECRET_FILE is used.
    #[arg(long, conflicts_with = "secret_file")]
    pub secret: Option<String>,
    /// A file whose first non-empty line is the secret.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// The user part of the username (`<expiry>:<user>`).
    #[arg(long, short = 'u')]
    pub user: String,
    /// How long the credential is valid, e.g. `24h`, `90m`, `3600s`.
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// TURN URIs to include, e.g. `turn:turn.example.org:3478?transport=udp` (repeatable).
    #[arg(long = "uri", value_name = "URI")]
    pub uris: Vec<String>,
}

/// Parses a `--ttl` value: humantime (`24h`, `1h30m`) or whole seconds.
///
/// # Errors
/// Not a duration, or zero.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s).map_err(|e| e.to_string())?,
    };
    if d.as_secs() == 0 {
        return Err("the ttl must be at least one second".to_owned());
    }
    Ok(d)
}

/// A TURN REST API credential, as the JSON the REST API returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestCredential {
    /// `<unix-expiry>:<user>`.
    pub username: String,
    /// base64(HMAC-SHA1(secret, username)).
    pub password: String,
    /// Validity in seconds.
    pub ttl: u64,
    /// TURN URIs.
    pub uris: Vec<String>,
}

/// Builds a REST API credential valid for `ttl` from `now`.
#[must_use]
pub fn rest_credential(
    secret: &[u8],
    user: &str,
    ttl: Duration,
    now: SystemTime,
    uris: Vec<String>,
) -> RestCredential {
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let username = format!("{}:{user}", now.saturating_add(ttl.as_secs()));
    let password = turn_proto::auth::rest_api_password(secret, &username);
    RestCredential {
        username,
        password,
        ttl: ttl.as_secs(),
        uris,
    }
}

/// `0x` + lowercase hex of MD5(user:realm:password), the `turnadmin -k` format.
#[must_use]
pub fn key_hex(user: &str, realm: &str, password: &str) -> String {
    let key = turn_proto::auth::long_term_key_md5(user, realm, password);
    let mut out = String::with_capacity(34);
    out.push_str("0x");
    for b in key {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The text `turnd` prints once when it runs with a generated secret: the secret and a
/// ready credential for `host:port`.
#[must_use]
pub fn generated_secret_banner(secret: &str, host: &str, port: u16, now: SystemTime) -> String {
    let uri = if host.contains(':') {
        format!("turn:[{host}]:{port}?transport=udp")
    } else {
        format!("turn:{host}:{port}?transport=udp")
    };
    let c = rest_credential(
        secret.as_bytes(),
        "example",
        Duration::from_secs(86_400),
        now,
        vec![uri],
    );
    format!(
        "turnd: no auth secret configured (config file, TURND_AUTH_SECRET or TURND_AUTH_SECRET_FILE);\n\
         turnd: generated one for this run only. It changes at every start.\n\
         \n\
         secret:   {secret}\n\
         example credential, valid 24h:\n\
         \x20 username: {}\n\
         \x20 password: {}\n\
         \x20 uri:      {}\n\
         \n\
         more with: turnd credentials --secret {secret} --user NAME --ttl 24h --uri {}\n",
        c.username, c.password, c.uris[0], c.uris[0],
    )
}

/// Failure to install the log subscriber.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogInitError {
    /// `RUST_LOG` does not parse (the configured level was checked by `validate()`).
    #[error("RUST_LOG `{value}` is not a valid log filter: {detail}")]
    BadFilter {
        /// The variable's value.
        value: String,
        /// The parser's explanation.
        detail: String,
    },
    /// A global subscriber was already installed.
    #[error("a log subscriber is already installed")]
    AlreadyInstalled,
}

/// Installs the global tracing subscriber: `log.level` (or `RUST_LOG` when set), text
/// or JSON lines on stdout.
///
/// # Errors
/// `RUST_LOG` is invalid, or a subscriber is already installed.
pub fn init_logging(log: &Logging, env: &dyn Env) -> Result<(), LogInitError> {
    let directive = env.var("RUST_LOG").filter(|v| !v.trim().is_empty());
    let filter_text = directive.clone().unwrap_or_else(|| log.level.clone());
    let filter = parse_filter(&filter_text)?;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match log.format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json())
            .try_init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()))
            .try_init(),
    };
    result.map_err(|_| LogInitError::AlreadyInstalled)?;
    // RUST_LOG pins the filter; otherwise a reload may change `[log] level` live.
    if directive.is_none() {
        let _ = LOG_RELOAD.set(Box::new(move |text: &str| {
            let filter = parse_filter(text).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        }));
    }
    Ok(())
}

fn parse_filter(text: &str) -> Result<tracing_subscriber::EnvFilter, LogInitError> {
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map_err(|e| LogInitError::BadFilter {
            value: text.to_owned(),
            detail: e.to_string(),
        })
}

type Reloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_RELOAD: std::sync::OnceLock<Reloader> = std::sync::OnceLock::new();

/// Changes the log filter of the subscriber [`init_logging`] installed (a configuration
/// reload). Returns `Ok(false)` when there is nothing to change (no subscriber of ours, or
/// `RUST_LOG` pins the filter).
///
/// # Errors
/// The filter does not parse.
pub fn set_log_level(level: &str) -> Result<bool, String> {
    match LOG_RELOAD.get() {
        Some(f) => f(level).map(|()| true),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn subcommands_parse() {
        let cli = Cli::try_parse_from(["turnd", "--config", "/etc/turnd.toml"]).expect("parses");
        assert_eq!(cli.config, Some(PathBuf::from("/etc/turnd.toml")));
        assert!(cli.command.is_none());
        let cli = Cli::try_parse_from([
            "turnd",
            "credentials",
            "--secret",
            "s",
            "--user",
            "u",
            "--ttl",
            "1h",
            "--uri",
            "turn:a",
            "--uri",
            "turn:b",
        ])
        .expect("parses");
        match cli.command {
            Some(Command::Credentials(c)) => {
                assert_eq!(c.ttl, Duration::from_secs(3600));
                assert_eq!(c.uris, ["turn:a", "turn:b"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli =
            Cli::try_parse_from(["turnd", "key", "-u", "a", "-r", "b", "-p", "c"]).expect("parses");
        assert!(matches!(cli.command, Some(Command::Key { .. })));
        let cli = Cli::try_parse_from(["turnd", "check-config", "--allow-missing-secret", "f"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Some(Command::CheckConfig {
                allow_missing_secret: true,
                ..
            })
        ));
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        for args in [
            &["turnd", "credentials", "--user", "u", "--ttl", "soon"][..],
            &["turnd", "credentials", "--secret", "s"][..],
            &["turnd", "key", "-u", "a"][..],
            &["turnd", "--config", "x", "check-config", "y"][..],
            &["turnd", "frobnicate"][..],
        ] {
            let e = Cli::try_parse_from(args).expect_err("rejected");
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn ttl_accepts_humantime_and_seconds() {
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("tomorrow").is_err());
    }

    #[test]
    fn rest_credential_follows_the_turn_rest_api() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let c = rest_credential(
            b"secret",
            "alice",
            Duration::from_secs(3600),
            now,
            vec!["turn:x".into()],
        );
        assert_eq!(c.username, "1700003600:alice");
        assert_eq!(
            c.password,
            turn_proto::auth::rest_api_password(b"secret", "1700003600:alice")
        );
        assert_eq!(c.ttl, 3600);
        assert_eq!(
            turn_proto::auth::rest_api_expiry(&c.username),
            Some(1_700_003_600)
        );
        let json: serde_json::Value = serde_json::to_value(&c).expect("json");
        assert_eq!(json["uris"][0], "turn:x");
    }

    #[test]
    fn key_hex_is_0x_and_32_lowercase_hex_digits() {
        // MD5("alice:example.org:secret"), as printed by `turnadmin -k -u alice -r example.org -p secret`.
        assert_eq!(
            key_hex("alice", "example.org", "secret"),
            "0x543e1aec5d3614f03141652d6ada51b2"
        );
    }

    #[test]
    fn banner_carries_a_working_credential() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let b = generated_secret_banner("abc", "192.0.2.7", 3478, now);
        assert!(b.contains("secret:   abc\n"), "{b}");
        assert!(b.contains("username: 87400:example\n"), "{b}");
        let pw = turn_proto::auth::rest_api_password(b"abc", "87400:example");
        assert!(b.contains(&format!("password: {pw}\n")), "{b}");
        assert!(b.contains("turn:192.0.2.7:3478?transport=udp"), "{b}");
        let v6 = generated_secret_banner("abc", "2001:db8::1", 3478, now);
        assert!(v6.contains("turn:[2001:db8::1]:3478?transport=udp"), "{v6}");
    }
}
