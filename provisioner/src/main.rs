//! `provisioner`: see `provisioner --help`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use provisioner::cli::{run, Cli, UsageError};
use provisioner::plan::NotConfirmed;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = if cli.verbose { "debug" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(format!("warn,provisioner={level}"))
            }),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    match run(&cli) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) if e.downcast_ref::<NotConfirmed>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
