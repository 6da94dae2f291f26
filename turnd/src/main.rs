//! The `turnd` binary: parses the command line, loads the configuration, sets up
//! logging and hands over to [`turnd::run::serve`].

use std::io::Write as _;
use std::net::{IpAddr, UdpSocket};
use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use turnd::cli::{self, Cli, Command, CredentialsArgs};
use turnd::config::{
    coturn, service_mode_name, Checks, Config, ConfigErrors, Env as _, ProcessEnv, Settings,
    ENV_AUTH_SECRET, ENV_AUTH_SECRET_FILE,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_server(cli.config.as_deref()),
        Some(Command::CheckConfig {
            file,
            allow_missing_secret,
        }) => check_config(&file, allow_missing_secret),
        Some(Command::Credentials(args)) => credentials(args),
        Some(Command::Key {
            user,
            realm,
            password,
        }) => {
            println!("{}", cli::key_hex(&user, &realm, &password));
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::ImportCoturn { file, output }) => import_coturn(&file, output.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("turnd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_settings(config: Option<&Path>) -> anyhow::Result<Settings> {
    Ok(match config {
        // Every mistake in the file at once, as `check-config` reports them.
        Some(path) => Config::load(path)?
            .validate_all(&ProcessEnv, Checks::default())
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Settings::embedded_default(&ProcessEnv)?,
    })
}

fn run_server(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let settings = load_settings(config)?;
    if settings.auth.generated_secret {
        let port = settings.listeners.udp.first().map_or(3478, |a| a.port());
        let secret = settings
            .auth
            .secrets
            .first()
            .map(|s| s.expose().to_owned())
            .unwrap_or_default();
        let banner =
            cli::generated_secret_banner(&secret, &local_ip().to_string(), port, SystemTime::now());
        let mut out = std::io::stdout().lock();
        out.write_all(banner.as_bytes())
            .context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
    }
    cli::init_logging(&settings.log, &ProcessEnv)?;
    tracing::info!(
        source = %settings.source,
        udp = ?settings.listeners.udp,
        relay_ports = ?settings.relay.ports,
        workers = settings.workers.get(),
        "starting turnd {}",
        env!("CARGO_PKG_VERSION")
    );
    // The driver runs its workers on threads of its own; this runtime only awaits them
    // and the shutdown signals.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(turnd::run::serve(settings))?;
    Ok(ExitCode::SUCCESS)
}

/// The address this host uses to reach the Internet, for the example credential.
/// Connecting a UDP socket sends nothing.
fn local_ip() -> IpAddr {
    UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:3478")?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

fn check_config(file: &Path, allow_missing_secret: bool) -> anyhow::Result<ExitCode> {
    let checks = Checks {
        files: true,
        allow_missing_secret,
    };
    let checked = Config::load(file)
        .map_err(ConfigErrors::from)
        .and_then(|c| c.validate_all(&ProcessEnv, checks));
    let s = match checked {
        Ok(s) => s,
        Err(errors) => {
            for e in errors.iter() {
                eprintln!("turnd: {e}");
            }
            let n = errors.len();
            let plural = if n == 1 { "" } else { "s" };
            eprintln!("turnd: {}: {n} error{plural}", file.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let tls = if s.tls.is_some() { "on" } else { "off" };
    println!("{}: OK", file.display());
    println!("  udp listeners: {:?}", s.listeners.udp);
    println!("  tcp listeners: {:?}", s.listeners.tcp);
    println!("  tls listeners: {:?} (tls {tls})", s.listeners.tls);
    println!("  realm: {}", s.auth.realm);
    let from_env = if s.auth.secrets.is_empty() && s.auth.users.is_empty() {
        format!(" (expected from {ENV_AUTH_SECRET} or {ENV_AUTH_SECRET_FILE} at run time)")
    } else {
        String::new()
    };
    println!(
        "  static users: {}, REST-API secrets: {}{from_env}",
        s.auth.users.len(),
        s.auth.secrets.len()
    );
    let external: Vec<String> = s
        .relay
        .external_ips
        .iter()
        .map(ToString::to_string)
        .collect();
    println!(
        "  relay: addresses {:?}, ports {}-{}, external {external:?}",
        s.relay.addresses,
        s.relay.ports.start(),
        s.relay.ports.end(),
    );
    println!(
        "  workers: {}, io: {}, serves: {}",
        s.workers,
        s.io,
        service_mode_name(s.mode)
    );
    match &s.admin {
        Some(a) => println!(
            "  admin: {} (admin API {})",
            a.listen,
            if a.token.is_some() {
                "on, token set"
            } else {
                "off: no token"
            }
        ),
        None => println!("  admin: off"),
    }
    let alternates: Vec<String> = [s.drain.alternate_ipv4, s.drain.alternate_ipv6]
        .iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    println!(
        "  drain: timeout {}, alternate servers {alternates:?}",
        humantime::format_duration(s.drain.timeout)
    );
    Ok(ExitCode::SUCCESS)
}

fn credentials(args: CredentialsArgs) -> anyhow::Result<ExitCode> {
    let secret = match (&args.secret, &args.secret_file) {
        (Some(s), _) => s.clone(),
        (None, Some(f)) => first_line(f)?,
        (None, None) => {
            if let Some(s) = ProcessEnv
                .var(ENV_AUTH_SECRET)
                .filter(|s| !s.trim().is_empty())
            {
                s.trim().to_owned()
            } else if let Some(f) = ProcessEnv.var(ENV_AUTH_SECRET_FILE) {
                first_line(Path::new(&f)).with_context(|| format!("from {ENV_AUTH_SECRET_FILE}"))?
            } else {
                Cli::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "credentials needs --secret, --secret-file, or TURND_AUTH_SECRET(_FILE) in the environment",
                    )
                    .exit()
            }
        }
    };
    let c = cli::rest_credential(
        secret.as_bytes(),
        &args.user,
        args.ttl,
        SystemTime::now(),
        args.uris,
    );
    println!("{}", serde_json::to_string_pretty(&c)?);
    Ok(ExitCode::SUCCESS)
}

fn first_line(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read secret file {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
        .with_context(|| format!("secret file {} is empty", path.display()))
}

fn import_coturn(file: &Path, output: Option<&Path>) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let import = coturn::import(&text);
    for note in &import.notes {
        eprintln!("{}: {note}", file.display());
    }
    if !import.is_ok() {
        let names: Vec<&str> = import.unsupported().map(|n| n.option.as_str()).collect();
        eprintln!(
            "{}: not converted: turnd cannot honour {} (see the notes above); nothing written",
            file.display(),
            names.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    match output {
        Some(out) => std::fs::write(out, &import.toml)
            .with_context(|| format!("cannot write {}", out.display()))?,
        None => print!("{}", import.toml),
    }
    let name = output.map_or_else(|| "<converted>".to_owned(), |p| p.display().to_string());
    match Config::parse_named(&import.toml, &name).and_then(|c| c.validate(&ProcessEnv)) {
        Ok(_) => {
            eprintln!("{}: converted; the result validates", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!(
                "{}: converted, but the result does not validate: {e}",
                file.display()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}
