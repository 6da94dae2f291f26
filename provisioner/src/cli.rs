//! The command line: parsing (clap) and the commands. Errors here are `anyhow`; the library
//! below uses typed errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::exec::{shell_quote, Cmd, SshOptions, SshTransport, Sudo, Transport};
use crate::inventory::{Cluster, Inventory};
use crate::phases::{self, Context, Settings};
use crate::plan::{apply, confirm, Journal, NotConfirmed, PhaseId, Plan, RunLock, Transports};
use crate::secrets::{ProcessEnv, Secrets};

/// Plans and builds the cluster that hosts turnd: the libvirt host, the VMs, Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "provisioner", version, about, long_about = None)]
pub struct Cli {
    /// The inventory.
    #[arg(
        short,
        long,
        global = true,
        default_value = "cluster.toml",
        value_name = "FILE"
    )]
    pub inventory: PathBuf,
    /// The secrets file (default: `.env` next to the inventory).
    #[arg(long, global = true, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// Show plans and commands without changing anything.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Show every command run and its output.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Apply disruptive actions (marked DISRUPTIVE in the plan) without asking.
    #[arg(long, global = true)]
    pub yes: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the inventory, the secrets, local tools and that the host is reachable.
    Preflight,
    /// Gather facts and print what `apply` would do.
    Plan {
        /// Phases (names or numbers); all implemented phases when none are given.
        #[arg(value_parser = parse_phase, conflicts_with = "all")]
        phases: Vec<PhaseId>,
        /// Every implemented phase, in order (the default).
        #[arg(long)]
        all: bool,
    },
    /// Plan and apply phases in order.
    Apply {
        /// Phases (names or numbers).
        #[arg(value_parser = parse_phase, conflicts_with = "all")]
        phases: Vec<PhaseId>,
        /// Every implemented phase, in order.
        #[arg(long)]
        all: bool,
    },
    /// Succeed only when every implemented phase has nothing to do and every node is Ready.
    Verify,
    /// One line per phase: up to date, or how many actions are pending.
    Status,
    /// Remove the VMs, their disks and the network (or only reset Kubernetes).
    Teardown {
        /// Keep the VMs; run `kubeadm reset` on them instead.
        #[arg(long)]
        keep_vms: bool,
    },
    /// Write every generated file under DIR, for review or GitOps.
    Render {
        /// Output directory.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Open a shell on a VM (through the host), or run a command there.
    Ssh {
        /// The VM.
        vm: String,
        /// A command to run instead of a shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run kubectl on the host.
    Kubectl {
        /// kubectl's arguments (after `--`).
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Forward a local port to a cluster service through the host.
    Tunnel {
        /// The service.
        service: TunnelService,
    },
    /// DNS records on Cloudflare (`CF_Token`, `CF_Zone_ID`).
    Dns {
        /// What to do.
        #[command(subcommand)]
        command: crate::dns::DnsCommand,
    },
    /// The TLS certificate: ACME DNS-01 issue, renew, deploy to Kubernetes, status.
    Cert {
        /// What to do.
        #[command(subcommand)]
        command: crate::acme::CertCommand,
    },
    /// turnd's container image without a registry: build it here, load it into the workers.
    Image {
        /// What to do.
        #[command(subcommand)]
        command: ImageCommand,
    },
}

/// `image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the image from the Dockerfile with podman (or buildah) on this machine, save it
    /// as an OCI archive, and print the digest to pin in `[container] image`.
    Build {
        /// The Dockerfile.
        #[arg(long, default_value = "Dockerfile", value_name = "FILE")]
        dockerfile: PathBuf,
        /// The build context (the Dockerfile's stage `runtime-prebuilt` copies
        /// `target/x86_64-unknown-linux-gnu/release/turnd` from it).
        #[arg(long, default_value = ".", value_name = "DIR")]
        context: PathBuf,
        /// The Dockerfile stage.
        #[arg(long, default_value = crate::image::DEFAULT_TARGET)]
        target: String,
        /// The tag, `REPO:TAG` (default: the repository of `[container] image` when it has an
        /// archive, else `localhost/turnd`, and this provisioner's version).
        #[arg(long)]
        tag: Option<String>,
        /// Where to write the archive (default: `[container] archive`, else
        /// `.provisioner/image/turnd.oci.tar` next to the inventory).
        #[arg(long, value_name = "FILE")]
        archive: Option<PathBuf>,
    },
    /// Import `[container] archive` into the containerd of every worker that lacks its digest
    /// (`ctr -n k8s.io images import` over SSH), then check that `ctr images ls` lists it.
    Load,
}

/// Services `tunnel` can reach.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TunnelService {
    /// Grafana in the monitoring namespace.
    Grafana,
}

fn parse_phase(s: &str) -> Result<PhaseId, String> {
    s.parse()
}

/// A problem with what the user gave us: exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs the parsed command line.
pub fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let c = load(cli)?;
    match &cli.command {
        Command::Render { out } => render(&c, out),
        Command::Preflight => preflight(cli, &c),
        Command::Plan { phases, .. } => {
            let t = transports(&c)?;
            let list = if phases.is_empty() {
                implemented()
            } else {
                phases.clone()
            };
            if let Some(p) = list.iter().find(|p| !p.implemented()) {
                return Err(
                    UsageError(format!("phase {p} is not implemented in this version")).into(),
                );
            }
            let mut settings = phase_settings(cli, &c);
            let _api = if list.iter().any(|p| needs_api(*p)) {
                api_through_host(&c, &t, &mut settings)
            } else {
                None
            };
            let ctx = Context {
                cluster: &c,
                transports: &t,
                settings: &settings,
            };
            for plan in phases::plan_in_order(&list, &ctx)? {
                print!("{}", plan.render(cli.verbose));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply { phases, all } => {
            let t = transports(&c)?;
            if phases.is_empty() && !*all {
                return Err(UsageError(
                    "name the phases to apply (e.g. `apply host vms`) or pass --all".into(),
                )
                .into());
            }
            let list = if *all {
                for p in PhaseId::ALL.iter().filter(|p| !p.implemented()) {
                    eprintln!("skipping phase {p}: not implemented in this version");
                }
                implemented()
            } else {
                phases.clone()
            };
            let _lock = run_lock(cli)?;
            let mut journal = Journal::at(journal_path(cli));
            let mut settings = phase_settings(cli, &c);
            let mut api = None;
            for p in list {
                if api.is_none() && needs_api(p) {
                    // Opened once the cluster exists (an earlier phase of this run may create it).
                    api = api_through_host(&c, &t, &mut settings);
                }
                let plan = plan_one(&c, &t, &settings, p)?;
                print!("{}", plan.render(cli.verbose));
                if cli.dry_run {
                    settings.ahead.note(&plan);
                } else if !plan.is_empty() {
                    confirm_plan(cli, &plan)?;
                    apply(&plan, &t, &mut journal)?;
                    println!("phase {p}: applied {} action(s)", plan.actions.len());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status | Command::Verify => status(cli, &c),
        Command::Teardown { keep_vms } => {
            let t = transports(&c)?;
            let ctx = Context {
                cluster: &c,
                transports: &t,
                settings: &Settings::default(),
            };
            // Host networking first (its ExecStop removes exactly our rules), then the VMs.
            let plans = [
                phases::plan_teardown_hostnet(&ctx)?,
                phases::plan_teardown(&ctx, *keep_vms)?,
            ];
            let _lock = run_lock(cli)?;
            for plan in &plans {
                print!("{}", plan.render(cli.verbose));
                if !cli.dry_run && !plan.is_empty() {
                    confirm_plan(cli, plan)?;
                    apply(plan, &t, &mut Journal::at(journal_path(cli)))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ssh { vm, command } => {
            let vm = c.vm(vm).ok_or_else(|| {
                UsageError(format!(
                    "no VM named `{vm}` in {}; VMs are {}",
                    cli.inventory.display(),
                    c.vms
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            let opts = vm_ssh(&c, vm.ip.to_string());
            let mut args = ssh_args(&opts);
            args.push(format!("{}@{}", opts.user, opts.host));
            if !command.is_empty() {
                args.push("--".into());
                args.push(
                    command
                        .iter()
                        .map(|w| shell_quote(w))
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
            exec_interactive(cli, "ssh", &args)
        }
        Command::Kubectl { args } => {
            let opts = host_ssh(&c);
            let mut ssh = ssh_args(&opts);
            ssh.push(format!("{}@{}", opts.user, opts.host));
            ssh.push("--".into());
            ssh.push(Cmd::new("kubectl").args(args.iter().cloned()).shell_line());
            exec_interactive(cli, "ssh", &ssh)
        }
        Command::Tunnel {
            service: TunnelService::Grafana,
        } => {
            let port = c.monitoring.grafana_local_port;
            let opts = host_ssh(&c);
            let mut ssh = ssh_args(&opts);
            ssh.extend(["-L".into(), format!("127.0.0.1:{port}:127.0.0.1:{port}")]);
            ssh.push(format!("{}@{}", opts.user, opts.host));
            ssh.push("--".into());
            ssh.push(
                Cmd::new("kubectl")
                    .args([
                        "--namespace",
                        &c.monitoring.namespace,
                        "port-forward",
                        &format!("service/{}", crate::render::monitoring::GRAFANA_SERVICE),
                        &format!("{port}:80"),
                    ])
                    .shell_line(),
            );
            eprintln!("Grafana on http://127.0.0.1:{port}/ (Ctrl-C to stop)");
            exec_interactive(cli, "ssh", &ssh)
        }
        Command::Dns {
            command: crate::dns::DnsCommand::Sync { extra },
        } if !cli.dry_run => {
            let env = cli.env_file.as_deref();
            let (client, changes) = crate::dns::plan_sync_blocking(extra, &c, &cli.inventory, env)?;
            let plan = crate::dns::sync_plan(&client, &changes);
            print!("{}", plan.render(cli.verbose));
            if !plan.is_empty() {
                confirm_plan(cli, &plan)?;
                let _lock = run_lock(cli)?;
                apply(&plan, &transports(&c)?, &mut Journal::at(journal_path(cli)))?;
                println!("dns sync: applied {} change(s)", plan.actions.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dns { command } => {
            let env = cli.env_file.as_deref();
            let out = crate::dns::run_blocking(command, &c, &cli.inventory, env, cli.dry_run)?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Cert { command } => cert(cli, &c, command),
        Command::Image { command } => image(cli, &c, command),
    }
}

fn image(cli: &Cli, c: &Cluster, command: &ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Build {
            dockerfile,
            context,
            target,
            tag,
            archive,
        } => {
            let local = crate::image::LocalImage::of(c);
            let tag = tag.clone().unwrap_or_else(|| {
                let repo = local
                    .as_ref()
                    .map_or(crate::image::DEFAULT_REPO, |l| l.repo());
                format!("{repo}:{}", env!("CARGO_PKG_VERSION"))
            });
            let archive = archive
                .clone()
                .or_else(|| local.map(|l| l.archive))
                .unwrap_or_else(|| {
                    cli.inventory
                        .parent()
                        .unwrap_or(Path::new("."))
                        .join(crate::image::DEFAULT_ARCHIVE)
                });
            let opts = crate::image::BuildOptions {
                dockerfile: dockerfile.clone(),
                context: context.clone(),
                target: target.clone(),
                tag,
                archive,
            };
            if cli.dry_run {
                let b = crate::image::Builder::detect(&crate::exec::LocalTransport::new())?;
                println!(
                    "would run:\n  $ {}\n  $ {}",
                    b.build_cmd(&opts),
                    b.save_cmd(&opts.tag, &opts.archive)
                );
                return Ok(ExitCode::SUCCESS);
            }
            let built = crate::image::build(&crate::exec::LocalTransport::new(), &opts)?;
            println!(
                "built {} ({}), archive {}\n\nPin it in the inventory, then run `provisioner image load` (or `apply turnd`):\n\n[container]\nimage = \"{}\"\narchive = \"{}\"\npull = \"never\"",
                built.name,
                built.digest,
                opts.archive.display(),
                built.pinned(),
                opts.archive.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Load => {
            let t = transports(c)?;
            let settings = phase_settings(cli, c);
            let ctx = Context {
                cluster: c,
                transports: &t,
                settings: &settings,
            };
            let facts = phases::turnd::gather_image(&ctx)?.ok_or_else(|| {
                UsageError(format!(
                    "{}: [container] archive is not set: nothing to load (run `provisioner image build` and pin what it prints)",
                    cli.inventory.display()
                ))
            })?;
            let mut plan = Plan::new(PhaseId::Turnd);
            phases::turnd::plan_image(&facts, &mut plan);
            print!("{}", plan.render(cli.verbose));
            if cli.dry_run || plan.is_empty() {
                return Ok(ExitCode::SUCCESS);
            }
            let _lock = run_lock(cli)?;
            apply(&plan, &t, &mut Journal::at(journal_path(cli)))?;
            println!(
                "{} present on {} worker(s)",
                facts.image.image,
                facts.workers.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `cert ...`. The commands that read or write the TLS Secret reach the API like the phases:
/// `--kubeconfig`, else `$KUBECONFIG`, else through the host. `cert deploy` is a plan of one
/// action, applied (and journaled) like every other change.
fn cert(cli: &Cli, c: &Cluster, command: &crate::acme::CertCommand) -> anyhow::Result<ExitCode> {
    use crate::acme::CertCommand;
    let env = cli.env_file.as_deref();
    let flag = match command {
        CertCommand::Deploy { kubeconfig } | CertCommand::Status { kubeconfig, .. } => {
            Some(kubeconfig.clone().map(phases::turnd::KubeApi::Kubeconfig))
        }
        CertCommand::Issue | CertCommand::Renew { .. } => None,
    };
    let mut settings = Settings::default();
    let mut _tunnel = None;
    if let Some(flag) = flag {
        settings.kube_api = crate::k8s::applier::given_api(flag.as_ref(), &ProcessEnv);
        if settings.kube_api.is_none() {
            if let Ok(t) = transports(c) {
                _tunnel = api_through_host(c, &t, &mut settings);
            }
        }
    }
    if let (CertCommand::Deploy { .. }, false) = (command, cli.dry_run) {
        let api = settings
            .kube_api
            .clone()
            .ok_or(crate::acme::AcmeError::NoKubernetes)?;
        let (acme, _) = acme_settings(cli, c);
        let store = acme.map_or_else(
            || crate::acme::default_store_dir(&cli.inventory),
            |a| a.store.dir().to_owned(),
        );
        let plan = crate::acme::deploy_plan(api, &store)?;
        print!("{}", plan.render(cli.verbose));
        let _lock = run_lock(cli)?;
        let t = transports(c)?;
        apply(&plan, &t, &mut Journal::at(journal_path(cli)))?;
        return Ok(ExitCode::SUCCESS);
    }
    let out = crate::acme::run_blocking(
        command,
        c,
        &cli.inventory,
        env,
        settings.kube_api.as_ref(),
        cli.dry_run,
    )?;
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn implemented() -> Vec<PhaseId> {
    PhaseId::ALL
        .iter()
        .copied()
        .filter(|p| p.implemented())
        .collect()
}

fn load(cli: &Cli) -> anyhow::Result<Cluster> {
    Inventory::load(&cli.inventory).map_err(|e| UsageError(e.to_string()).into())
}

/// Whether `phase` talks to the Kubernetes API.
fn needs_api(phase: PhaseId) -> bool {
    matches!(phase, PhaseId::Turnd | PhaseId::Monitoring)
}

/// A tunnel to the API server through the host and the kubeconfig that uses it, kept open for
/// the rest of the run.
struct ApiTunnel {
    _tunnel: crate::exec::tunnel::Tunnel,
    _dir: tempfile::TempDir,
}

/// Without `KUBECONFIG`, reaches the API through the host: reads the master's `admin.conf`
/// (once the cluster exists), forwards a loopback port to the master's 6443 over SSH through
/// the host, and points [`Settings::kube_api`] at a kubeconfig (0600, in a private temporary
/// directory) that goes through it. `None` (and the settings unchanged) when `KUBECONFIG` is
/// set or the cluster cannot be reached that way yet; the phases then say what is missing.
fn api_through_host(c: &Cluster, t: &Transports, settings: &mut Settings) -> Option<ApiTunnel> {
    if crate::k8s::applier::given_api(settings.kube_api.as_ref(), &ProcessEnv).is_some() {
        return None;
    }
    let master = t.vms.get(c.master().name.as_str())?;
    let admin = master
        .run(&Cmd::new("cat").arg(crate::render::k8s::paths::ADMIN_CONF))
        .ok()
        .filter(crate::exec::Output::success)?
        .stdout;
    let remote = std::net::SocketAddr::from((c.master().ip, 6443));
    let tunnel = match crate::exec::tunnel::Tunnel::open(&host_ssh(c), remote) {
        Ok(tunnel) => tunnel,
        Err(e) => {
            tracing::warn!("cannot reach the Kubernetes API through the host: {e}");
            return None;
        }
    };
    let config = crate::exec::tunnel::kubeconfig_through(&admin, tunnel.local).ok()?;
    let dir = tempfile::Builder::new()
        .prefix("provisioner-kube-")
        .tempdir()
        .ok()?;
    let path = dir.path().join("kubeconfig");
    crate::exec::LocalTransport::new()
        .upload(config.as_bytes(), &path.display().to_string(), 0o600)
        .ok()?;
    tracing::info!(
        "Kubernetes API through the host: 127.0.0.1:{} -> {remote}",
        tunnel.local.port()
    );
    settings.kube_api = Some(phases::turnd::KubeApi::Kubeconfig(path));
    Some(ApiTunnel {
        _tunnel: tunnel,
        _dir: dir,
    })
}

/// Takes the run lock next to the journal; none for `--dry-run`, which changes nothing.
fn run_lock(cli: &Cli) -> anyhow::Result<Option<RunLock>> {
    if cli.dry_run {
        return Ok(None);
    }
    Ok(Some(RunLock::acquire(
        journal_path(cli).with_file_name("lock"),
    )?))
}

/// Lets a plan with disruptive actions through with `--yes`, or after a "y" on a terminal.
fn confirm_plan(cli: &Cli, plan: &Plan) -> Result<(), NotConfirmed> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    let mut on_terminal = |question: &str| {
        eprint!("{question}");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer).is_ok()
            && matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
    };
    let ask: Option<&mut dyn FnMut(&str) -> bool> = if std::io::stdin().is_terminal() {
        Some(&mut on_terminal)
    } else {
        None
    };
    confirm(plan, cli.yes, ask)
}

fn journal_path(cli: &Cli) -> PathBuf {
    crate::acme::renew_state_dir(&cli.inventory).join("journal.jsonl")
}

fn expand_home(p: &Path) -> PathBuf {
    match (p.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => p.to_owned(),
    }
}

/// SSH options for the host.
pub fn host_ssh(c: &Cluster) -> SshOptions {
    let mut o = SshOptions::new(&c.ssh.host_user, &c.host.ssh_address, c.ssh.host_port);
    o.identity = Some(expand_home(&c.ssh.private_key));
    o.known_hosts = c.ssh.known_hosts.as_deref().map(expand_home);
    o
}

/// SSH options for a VM at `ip`, jumping through the host.
pub fn vm_ssh(c: &Cluster, ip: String) -> SshOptions {
    let mut o = SshOptions::new(&c.ssh.vm_user, &ip, 22);
    o.identity = Some(expand_home(&c.ssh.private_key));
    o.known_hosts = c.ssh.known_hosts.as_deref().map(expand_home);
    o.jump = Some(Box::new(host_ssh(c)));
    o
}

fn ssh_args(o: &SshOptions) -> Vec<String> {
    o.command_args()
}

fn transports(c: &Cluster) -> anyhow::Result<Transports> {
    let host: Box<dyn Transport> = Box::new(SshTransport::new("host", host_ssh(c))?);
    let mut vms: BTreeMap<String, Box<dyn Transport>> = BTreeMap::new();
    for vm in &c.vms {
        let t = SshTransport::new(vm.name.as_str(), vm_ssh(c, vm.ip.to_string()))?;
        vms.insert(vm.name.to_string(), Box::new(Sudo::new(t)));
    }
    // The host user may not be root: run host commands through sudo unless it is.
    let host = if c.ssh.host_user == "root" {
        host
    } else {
        Box::new(Sudo::new(host)) as Box<dyn Transport>
    };
    Ok(Transports { host, vms })
}

/// The certificate's settings as `cert issue` uses them (the inventory, the store next to it,
/// the environment's overrides), and the DNS API when its token is in the environment or
/// `.env` (else no certificate is issued by `apply`; the plan says so).
fn acme_settings(
    cli: &Cli,
    c: &Cluster,
) -> (
    Option<crate::acme::AcmeSettings>,
    Option<crate::dns::CloudflareClient>,
) {
    let mut acme =
        crate::acme::settings_from_inventory(c, &crate::acme::default_store_dir(&cli.inventory));
    if let Err(e) = crate::acme::apply_env_overrides(&mut acme, &ProcessEnv) {
        tracing::warn!("certificate settings: {e}");
        return (None, None);
    }
    let dns = crate::dns::client_from_env(
        &ProcessEnv,
        &crate::dns::dotenv_path(&cli.inventory, cli.env_file.as_deref()),
    )
    .ok();
    (Some(acme), dns)
}

/// Phase settings for this invocation: turnd's auth secret from the environment or `.env`
/// (when the secrets load; phases that need it say so otherwise), the certificate's settings,
/// and a 5-minute rollout wait. The Kubernetes API: `$KUBECONFIG`, else [`api_through_host`].
fn phase_settings(cli: &Cli, c: &Cluster) -> Settings {
    let dotenv = cli.env_file.clone().unwrap_or_else(|| {
        cli.inventory
            .parent()
            .unwrap_or(Path::new("."))
            .join(".env")
    });
    let auth_secret = Secrets::load(&ProcessEnv, &dotenv)
        .ok()
        .map(|s| crate::k8s::Sensitive::from(&s.turnd_auth_secret));
    let user_passwords = user_passwords(c, &dotenv);
    let (acme, acme_dns) = acme_settings(cli, c);
    Settings {
        auth_secret,
        user_passwords,
        acme,
        acme_dns,
        rollout_timeout: Some(std::time::Duration::from_secs(300)),
        dotenv: Some(dotenv),
        ..Settings::default()
    }
}

/// The static users' passwords (`auth.users[].password_env`) from the environment, else
/// `.env`; each one is masked in `-v` logs from now on.
fn user_passwords(c: &Cluster, dotenv: &Path) -> BTreeMap<String, crate::k8s::Sensitive> {
    let file = std::fs::read_to_string(dotenv)
        .ok()
        .and_then(|t| crate::secrets::parse_dotenv(&t, &dotenv.display().to_string()).ok())
        .unwrap_or_default();
    c.auth
        .users
        .iter()
        .filter_map(|u| {
            let var = u.password_env.as_deref()?;
            let pw = std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| file.get(var).filter(|v| !v.is_empty()).cloned())?;
            crate::exec::redact::remember(&pw);
            Some((u.name.clone(), crate::k8s::Sensitive::new(pw)))
        })
        .collect()
}

fn plan_one(c: &Cluster, t: &Transports, settings: &Settings, p: PhaseId) -> anyhow::Result<Plan> {
    if !p.implemented() {
        return Err(UsageError(format!("phase {p} is not implemented in this version")).into());
    }
    let ctx = Context {
        cluster: c,
        transports: t,
        settings,
    };
    Ok(phases::plan(p, &ctx)?)
}

fn status(cli: &Cli, c: &Cluster) -> anyhow::Result<ExitCode> {
    let t = transports(c)?;
    let mut ok = true;
    let mut settings = phase_settings(cli, c);
    let _api = api_through_host(c, &t, &mut settings);
    for p in implemented() {
        match plan_one(c, &t, &settings, p) {
            Ok(plan) if plan.is_empty() => println!("{p}: up to date"),
            Ok(plan) => {
                settings.ahead.note(&plan);
                ok = false;
                println!("{p}: {} action(s) pending", plan.actions.len());
                if cli.verbose {
                    print!("{}", plan.render(true));
                }
            }
            Err(e) => {
                ok = false;
                println!("{p}: cannot tell: {e:#}");
            }
        }
    }
    if c.monitoring.enabled {
        let ctx = Context {
            cluster: c,
            transports: &t,
            settings: &settings,
        };
        let targets_up = monitoring_targets(c, &ctx);
        if matches!(cli.command, Command::Verify) {
            ok &= targets_up;
        }
    }
    if matches!(cli.command, Command::Verify) {
        let settings = Settings::default();
        let ctx = Context {
            cluster: c,
            transports: &t,
            settings: &settings,
        };
        match phases::k8s::gather_workers(&ctx) {
            Ok(f) => {
                for vm in &c.vms {
                    let ready = f
                        .nodes
                        .iter()
                        .any(|n| n.name == vm.name.as_str() && n.ready);
                    println!(
                        "node {}: {}",
                        vm.name,
                        if ready { "Ready" } else { "not Ready" }
                    );
                    ok &= ready;
                }
            }
            Err(e) => {
                ok = false;
                println!("nodes: cannot tell: {e}");
            }
        }
    }
    // Pending actions (or a phase that cannot tell) are a non-zero exit, for scripts and CI.
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints the monitoring release and which of the inventory's turnd instances Prometheus
/// scrapes; whether the release is deployed and all of them are up.
fn monitoring_targets(c: &Cluster, ctx: &Context<'_>) -> bool {
    let health = phases::monitoring::health(ctx);
    for line in health.lines(c) {
        println!("monitoring: {line}");
    }
    health.ok(c)
}

fn preflight(cli: &Cli, c: &Cluster) -> anyhow::Result<ExitCode> {
    let mut ok = true;
    let mut check = |name: &str, result: Result<String, String>| match result {
        Ok(detail) => println!(
            "ok    {name}{}",
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
        ),
        Err(why) => {
            ok = false;
            println!("FAIL  {name}: {why}");
        }
    };
    check("inventory", Ok(cli.inventory.display().to_string()));
    let dotenv = cli.env_file.clone().unwrap_or_else(|| {
        cli.inventory
            .parent()
            .unwrap_or(Path::new("."))
            .join(".env")
    });
    check(
        "secrets",
        Secrets::load(&ProcessEnv, &dotenv)
            .map(|_| String::new())
            .map_err(|e| e.to_string()),
    );
    if c.monitoring.enabled {
        check(
            "monitoring secrets",
            phases::monitoring::secrets(c, &ProcessEnv, Some(&dotenv))
                .map(|_| String::new())
                .map_err(|e| e.to_string()),
        );
    }
    let key = expand_home(&c.ssh.private_key);
    check(
        "ssh key",
        if key.is_file() {
            Ok(key.display().to_string())
        } else {
            Err(format!("{} does not exist", key.display()))
        },
    );
    let local = crate::exec::LocalTransport::new();
    check(
        "local ssh client",
        local
            .run(&Cmd::new("ssh").arg("-V"))
            .map(|o| o.stderr.trim().to_owned())
            .map_err(|e| e.to_string()),
    );
    if cli.dry_run {
        println!("skip  host checks (--dry-run)");
    } else {
        let host = SshTransport::new("host", host_ssh(c))?;
        match host.run_ok(&Cmd::new("true")) {
            Ok(_) => {
                check(
                    "host reachable",
                    Ok(format!("{}@{}", c.ssh.host_user, c.host.ssh_address)),
                );
                let kvm = host
                    .run(&Cmd::new("test").args(["-c", "/dev/kvm"]))
                    .map(|o| o.success());
                check(
                    "host has /dev/kvm",
                    if matches!(kvm, Ok(true)) {
                        Ok(String::new())
                    } else {
                        Err("no /dev/kvm".into())
                    },
                );
                let need: u64 = c.vms.iter().map(|v| u64::from(v.disk_gib)).sum();
                let df = host
                    .run_ok(&Cmd::new("df").args(["--output=avail", "-BG", &c.host.image_dir]))
                    .map_err(|e| e.to_string())
                    .and_then(|o| {
                        o.stdout
                            .lines()
                            .nth(1)
                            .and_then(|l| l.trim().trim_end_matches('G').parse::<u64>().ok())
                            .ok_or_else(|| format!("cannot read df output {:?}", o.stdout))
                    });
                check(
                    "host disk space",
                    df.and_then(|avail| {
                        if avail >= need {
                            Ok(format!("{avail}G free, VMs may grow to {need}G"))
                        } else {
                            Err(format!(
                                "{avail}G free in {} but the VMs may grow to {need}G",
                                c.host.image_dir
                            ))
                        }
                    }),
                );
            }
            Err(e) => check("host reachable", Err(e.to_string())),
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn render(c: &Cluster, out: &Path) -> anyhow::Result<ExitCode> {
    for f in crate::render::all(c) {
        let path = out.join(&f.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, &f.contents)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    for (path, contents) in host_files(c)? {
        let path = out.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    let review = crate::k8s::Inputs::for_review();
    for path in crate::k8s::render_manifests(c, &review, &out.join("k8s"))? {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The files the `host` and `host-networking` phases install on the host, under `host/` at
/// their absolute paths: the iptables restore and teardown files, the jump script, the
/// hostnet unit and sysctl file, and the certificate renewal service and timer.
pub fn host_files(c: &Cluster) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let hostnet = crate::hostnet::HostNet::from_cluster(c)?;
    let files = hostnet.files();
    let mut out: Vec<(String, Vec<u8>)> = files
        .list()
        .iter()
        .map(|(path, contents, _)| (format!("host{path}"), contents.as_bytes().to_vec()))
        .collect();
    out.extend(
        phases::host::renew_files()
            .into_iter()
            .map(|(path, data)| (format!("host{path}"), data)),
    );
    Ok(out)
}

fn exec_interactive(cli: &Cli, program: &str, args: &[String]) -> anyhow::Result<ExitCode> {
    let line = Cmd::new(program).args(args.iter().cloned()).shell_line();
    if cli.dry_run {
        println!("{line}");
        return Ok(ExitCode::SUCCESS);
    }
    tracing::debug!("$ {line}");
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot start {program}"))?;
    Ok(ExitCode::from(
        u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
    ))
}
