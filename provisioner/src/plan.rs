//! Plans: typed, concrete actions computed from observed facts, printed, then applied in
//! order. Applying records every finished action in a journal; a failure stops with the
//! phase, the action, the command and its stderr.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::exec::{Cmd, ExecError, Transport};
use crate::inventory::Vm;
use crate::render::k8s::{self, JoinCommand};

/// Where an action runs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// The libvirt host.
    Host,
    /// One VM (as root).
    Vm(String),
    /// The Kubernetes API server (reached from where the provisioner runs).
    KubeApi,
    /// Where the provisioner runs (an ACME order, its DNS-01 records through the DNS API).
    Local,
    /// The DNS provider's API (Cloudflare), reached from where the provisioner runs.
    DnsApi,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host => f.write_str("host"),
            Self::Vm(name) => f.write_str(name),
            Self::KubeApi => f.write_str("kubernetes-api"),
            Self::Local => f.write_str("local"),
            Self::DnsApi => f.write_str("dns-api"),
        }
    }
}

/// One primitive operation of an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Run a command; a non-zero exit fails the action.
    Run(Cmd),
    /// Write a file.
    Upload {
        /// Destination.
        path: String,
        /// Contents.
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Run(cmd) => write!(f, "$ {cmd}"),
            Self::Upload { path, data, mode } => {
                write!(f, "write {path} ({} bytes, mode {mode:o})", data.len())
            }
        }
    }
}

/// What an action does, as data. Most actions are a fixed list of steps on one target;
/// [`ActionKind::JoinWorker`] needs a token that only exists while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionKind {
    /// Fixed steps.
    Steps(Vec<Step>),
    /// Create a join token on `master`, write the worker's JoinConfiguration, `kubeadm join`.
    JoinWorker {
        /// The master VM.
        master: String,
        /// The worker joining.
        worker: Box<Vm>,
    },
    /// Server-side apply of turnd's Kubernetes objects (phase `turnd`).
    KubeApply(Box<crate::k8s::applier::KubeApply>),
    /// Order a certificate by ACME DNS-01 and store it (phase `turnd`, while the TLS Secret is
    /// missing and no stored certificate can be reused).
    IssueCert(Box<crate::acme::Issuer>),
    /// One change of `dns sync` through the DNS provider's API.
    Dns(Box<crate::dns::DnsStep>),
    /// Put the stored certificate into the TLS Secret (`cert deploy`).
    DeployTls(Box<crate::k8s::applier::TlsDeploy>),
    /// Server-side apply of plain objects (phase `monitoring`: namespace, Secrets, dashboard).
    KubeObjects(Box<crate::k8s::ObjectSet>),
    /// Stream a locally built image's archive into the target VM's containerd
    /// (`ctr images import`), then check that `ctr images ls` lists its digest.
    ImportImage(Box<crate::image::LocalImage>),
    /// Wait until the VM (the action's target) answers over SSH, then until cloud-init has
    /// finished (`cloud-init status --wait`), both within `timeout`, logging progress.
    WaitReady {
        /// The bound for both waits together.
        timeout: Duration,
    },
}

/// One concrete action of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// Where it runs.
    pub target: Target,
    /// One line saying what it does, e.g. `define network k8s-net (new)`.
    pub summary: String,
    /// How.
    pub kind: ActionKind,
}

impl Action {
    /// An action of fixed steps.
    pub fn steps(target: Target, summary: impl Into<String>, steps: Vec<Step>) -> Self {
        Self {
            target,
            summary: summary.into(),
            kind: ActionKind::Steps(steps),
        }
    }

    /// An action of one command.
    pub fn run(target: Target, summary: impl Into<String>, cmd: Cmd) -> Self {
        Self::steps(target, summary, vec![Step::Run(cmd)])
    }
}

/// The phases, numbered like the playbooks they replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PhaseId {
    /// 1: host packages, the cloud image, the NAT network.
    Host,
    /// 2: overlay disks, cloud-init seeds, domains.
    Vms,
    /// 3: containerd, kubeadm/kubelet/kubectl, Helm, kernel settings on every VM.
    K8sCommon,
    /// 4: `kubeadm init` and Cilium on the master.
    K8sMaster,
    /// 5: workers joined and labelled.
    K8sWorkers,
    /// 6: turnd's Kubernetes objects, server-side applied.
    Turnd,
    /// 7: public IPs forwarded to the workers (iptables rules and their systemd unit).
    HostNetworking,
    /// 8: kubectl and the kubeconfig on the host.
    HostKubectl,
    /// 9: kube-prometheus-stack (Prometheus, Alertmanager, Grafana), turnd's dashboard and
    /// alert rules.
    Monitoring,
}

impl PhaseId {
    /// Every phase in order.
    pub const ALL: [Self; 9] = [
        Self::Host,
        Self::Vms,
        Self::K8sCommon,
        Self::K8sMaster,
        Self::K8sWorkers,
        Self::Turnd,
        Self::HostNetworking,
        Self::HostKubectl,
        Self::Monitoring,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Vms => "vms",
            Self::K8sCommon => "k8s-common",
            Self::K8sMaster => "k8s-master",
            Self::K8sWorkers => "k8s-workers",
            Self::Turnd => "turnd",
            Self::HostNetworking => "host-networking",
            Self::HostKubectl => "host-kubectl",
            Self::Monitoring => "monitoring",
        }
    }

    /// 1-based number.
    pub fn number(self) -> usize {
        Self::ALL
            .iter()
            .position(|p| *p == self)
            .map_or(0, |i| i + 1)
    }

    /// Whether this version implements the phase.
    pub fn implemented(self) -> bool {
        true
    }
}

impl fmt::Display for PhaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}-{}", self.number(), self.name())
    }
}

impl std::str::FromStr for PhaseId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bare = s
            .split_once('-')
            .filter(|(n, _)| n.chars().all(|c| c.is_ascii_digit()))
            .map_or(s, |(_, rest)| rest);
        Self::ALL
            .iter()
            .copied()
            .find(|p| p.name() == bare || s.parse::<usize>().ok() == Some(p.number()))
            .ok_or_else(|| {
                format!(
                    "unknown phase `{s}`; phases are {}",
                    Self::ALL
                        .iter()
                        .map(|p| p.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

/// What a plan belongs to: a phase, or a command outside the phases (`dns sync`,
/// `cert deploy`) whose changes go through [`apply`] and its journal all the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// A phase.
    Phase(PhaseId),
    /// A command, by its words (`dns sync`).
    Command(&'static str),
}

impl Scope {
    /// The name the journal records (`turnd`, `dns sync`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Phase(p) => p.name(),
            Self::Command(c) => c,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Phase(p) => write!(f, "phase {p}"),
            Self::Command(c) => f.write_str(c),
        }
    }
}

impl From<PhaseId> for Scope {
    fn from(p: PhaseId) -> Self {
        Self::Phase(p)
    }
}

impl PartialEq<PhaseId> for Scope {
    fn eq(&self, other: &PhaseId) -> bool {
        *self == Self::Phase(*other)
    }
}

/// A phase's plan: what it would do, in order, plus notes for things it will not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The phase (or command) it belongs to.
    pub phase: Scope,
    /// Actions in order.
    pub actions: Vec<Action>,
    /// Observations that need a human (e.g. drift that cannot be repaired safely).
    pub notes: Vec<String>,
    /// The actions that interrupt service (index into `actions` → how): applying them needs
    /// `--yes` or a confirmation on a terminal ([`confirm`]).
    pub disruptive: BTreeMap<usize, String>,
}

impl Plan {
    /// An empty plan for `phase` (or a command's [`Scope`]).
    pub fn new(phase: impl Into<Scope>) -> Self {
        Self {
            phase: phase.into(),
            actions: Vec::new(),
            notes: Vec::new(),
            disruptive: BTreeMap::new(),
        }
    }

    /// Appends an action that interrupts service, saying how.
    pub fn push_disruptive(&mut self, action: Action, how: impl Into<String>) {
        self.disruptive.insert(self.actions.len(), how.into());
        self.actions.push(action);
    }

    /// The disruptive actions with how each interrupts service.
    pub fn disruptions(&self) -> impl Iterator<Item = (&Action, &str)> {
        self.disruptive
            .iter()
            .filter_map(|(i, how)| Some((self.actions.get(*i)?, how.as_str())))
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The plan as text; with `verbose`, every step too. File contents are never printed.
    pub fn render(&self, verbose: bool) -> String {
        let mut out = format!("{}: ", self.phase);
        if self.actions.is_empty() {
            out.push_str("up to date\n");
        } else {
            out.push_str(&format!("{} action(s)\n", self.actions.len()));
        }
        for (i, a) in self.actions.iter().enumerate() {
            match self.disruptive.get(&i) {
                Some(how) => out.push_str(&format!(
                    "  {:>2}. [{}] {} (DISRUPTIVE: {how})\n",
                    i + 1,
                    a.target,
                    a.summary
                )),
                None => out.push_str(&format!("  {:>2}. [{}] {}\n", i + 1, a.target, a.summary)),
            }
            if verbose {
                match &a.kind {
                    ActionKind::Steps(steps) => {
                        for s in steps {
                            out.push_str(&format!("        {s}\n"));
                        }
                    }
                    ActionKind::JoinWorker { master, .. } => out.push_str(&format!(
                        "        [{master}] $ kubeadm token create --print-join-command --ttl 15m\n        write {}\n        $ kubeadm join --config {}\n",
                        k8s::paths::KUBEADM_JOIN,
                        k8s::paths::KUBEADM_JOIN
                    )),
                    ActionKind::WaitReady { timeout } => out.push_str(&format!(
                        "        $ true (every {}s until SSH answers, for up to {}s)\n        $ {}\n",
                        READY_POLL.as_secs(),
                        timeout.as_secs(),
                        cloud_init_wait(*timeout)
                    )),
                    ActionKind::ImportImage(image) => out.push_str(&format!(
                        "        $ {} < {}\n        $ {} (lists {})\n",
                        image.import_cmd(),
                        image.archive.display(),
                        crate::image::list_cmd(),
                        image.image
                    )),
                    ActionKind::IssueCert(i) => out.push_str(&format!(
                        "        ACME order at {} for {}, DNS-01 TXT records through the DNS API; stored in {}\n",
                        i.settings.directory.url(),
                        i.settings.names().join(", "),
                        i.settings.store.cert_path().display()
                    )),
                    ActionKind::Dns(d) => {
                        out.push_str(&format!("        {} via the DNS API\n", d.request()));
                    }
                    ActionKind::DeployTls(d) => out.push_str(&format!(
                        "        server-side apply (field manager {}, force) via {}:\n          Secret/{}/{} from {}\n",
                        crate::k8s::FIELD_MANAGER,
                        d.api,
                        crate::k8s::NAMESPACE,
                        crate::k8s::TLS_SECRET_NAME,
                        d.store.display()
                    )),
                    ActionKind::KubeObjects(set) => {
                        out.push_str(&format!(
                            "        server-side apply (field manager {}, force) via {}:\n",
                            crate::k8s::FIELD_MANAGER,
                            set.api
                        ));
                        for id in set.ids() {
                            out.push_str(&format!("          {id}\n"));
                        }
                    }
                    ActionKind::KubeApply(a) => {
                        out.push_str(&format!(
                            "        server-side apply (field manager {}, force) via {}:\n",
                            crate::k8s::FIELD_MANAGER,
                            a.api
                        ));
                        for o in a.manifests.objects() {
                            out.push_str(&format!("          {}\n", o.id()));
                        }
                        if let Some(t) = a.rollout_timeout {
                            out.push_str(&format!(
                                "        then wait up to {}s for each Deployment's rollout\n",
                                t.as_secs()
                            ));
                        }
                    }
                }
            }
        }
        for n in &self.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        out
    }
}

/// A plan with disruptive actions was not confirmed.
#[derive(Debug, thiserror::Error)]
#[error("{phase}: not applied: {count} disruptive action(s) need --yes (or a confirmation on a terminal):\n{list}")]
pub struct NotConfirmed {
    /// The phase.
    pub phase: Scope,
    /// How many.
    pub count: usize,
    /// One line per disruptive action.
    pub list: String,
}

/// Lets a plan with disruptive actions through only with `yes`, or when `ask` (a prompt on a
/// terminal; `None` when there is none) says yes. A plan without any passes.
///
/// # Errors
/// [`NotConfirmed`], listing the disruptive actions.
pub fn confirm(
    plan: &Plan,
    yes: bool,
    ask: Option<&mut dyn FnMut(&str) -> bool>,
) -> Result<(), NotConfirmed> {
    if plan.disruptive.is_empty() || yes {
        return Ok(());
    }
    let list: Vec<String> = plan
        .disruptions()
        .map(|(a, how)| format!("  [{}] {}: {how}", a.target, a.summary))
        .collect();
    let list = list.join("\n");
    let question = format!(
        "{}: {} disruptive action(s):\n{list}\napply them? [y/N] ",
        plan.phase,
        plan.disruptive.len()
    );
    if ask.is_some_and(|ask| ask(&question)) {
        return Ok(());
    }
    Err(NotConfirmed {
        phase: plan.phase,
        count: plan.disruptive.len(),
        list,
    })
}

/// The transports of one run.
pub struct Transports {
    /// The libvirt host.
    pub host: Box<dyn Transport>,
    /// The VMs, by name (already running as root, e.g. through [`crate::exec::Sudo`]).
    pub vms: BTreeMap<String, Box<dyn Transport>>,
}

impl fmt::Debug for Transports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transports")
            .field("host", &self.host.target())
            .field("vms", &self.vms.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// There is no transport for a target.
#[derive(Debug, thiserror::Error)]
#[error("no transport for {0}")]
pub struct NoTransport(pub Target);

impl Transports {
    /// The transport for `target`.
    pub fn get(&self, target: &Target) -> Result<&dyn Transport, NoTransport> {
        match target {
            Target::Host => Ok(self.host.as_ref()),
            Target::Vm(name) => self
                .vms
                .get(name)
                .map(AsRef::as_ref)
                .ok_or_else(|| NoTransport(target.clone())),
            Target::KubeApi | Target::Local | Target::DnsApi => Err(NoTransport(target.clone())),
        }
    }
}

/// Why applying a plan stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A step failed.
    #[error("{phase}, action {index} `{action}` on {target}: {source}")]
    Step {
        /// The phase.
        phase: Scope,
        /// 1-based action number.
        index: usize,
        /// The action's summary.
        action: String,
        /// Where.
        target: Target,
        /// The failing command and its stderr.
        source: Box<ExecError>,
    },
    /// An action's target has no transport.
    #[error("{phase}: {source}")]
    Transport {
        /// The phase.
        phase: Scope,
        /// What is missing.
        source: NoTransport,
    },
    /// A join token could not be read.
    #[error("{phase}, action {index} `{action}`: {source}")]
    Join {
        /// The phase.
        phase: Scope,
        /// 1-based action number.
        index: usize,
        /// The action's summary.
        action: String,
        /// The parse failure.
        source: k8s::JoinParseError,
    },
    /// The Kubernetes API refused or could not be reached, or a rollout did not finish.
    #[error("{phase}, action {index} `{action}`: {source}")]
    Kube {
        /// The phase.
        phase: Scope,
        /// 1-based action number.
        index: usize,
        /// The action's summary.
        action: String,
        /// What failed.
        source: crate::k8s::applier::KubeApplyError,
    },
    /// The certificate could not be issued.
    #[error("{phase}, action {index} `{action}`: {source}")]
    Cert {
        /// The phase.
        phase: Scope,
        /// 1-based action number.
        index: usize,
        /// The action's summary.
        action: String,
        /// What failed (every attempt; the stored certificate is untouched).
        source: Box<crate::acme::AcmeError>,
    },
    /// The DNS provider refused a change or could not be reached.
    #[error("{phase}, action {index} `{action}`: {source}")]
    Dns {
        /// The command.
        phase: Scope,
        /// 1-based action number.
        index: usize,
        /// The action's summary.
        action: String,
        /// What failed.
        source: Box<crate::dns::DnsError>,
    },
    /// The journal could not be written.
    #[error("cannot write the journal {path}: {source}")]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Stops two runs from changing the same cluster at once: a lock file
/// (`.provisioner/lock` next to the inventory) created exclusively, holding the owner's pid,
/// and removed when dropped. A lock whose process is gone (a killed run) is taken over.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

/// The lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another run holds it.
    #[error("another provisioner run (pid {pid}) holds {path}: wait for it to finish, or remove the file if that process is gone", path = .path.display())]
    Held {
        /// The lock file.
        path: PathBuf,
        /// The owner.
        pid: u32,
    },
    /// The file could not be created or read.
    #[error("cannot take the lock {path}: {source}", path = .path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl RunLock {
    /// Takes the lock at `path`.
    ///
    /// # Errors
    /// [`LockError::Held`] when a live process (this one included) holds it.
    pub fn acquire(path: PathBuf) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id()).map_err(io)?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok());
                    match owner {
                        Some(pid) if std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                            return Err(LockError::Held { path, pid });
                        }
                        // Stale (its process is gone) or half-written: take it over.
                        _ => std::fs::remove_file(&path).map_err(io)?,
                    }
                }
                Err(e) => return Err(io(e)),
            }
        }
        Err(io(std::io::Error::other("the lock file keeps reappearing")))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Appends one JSON line per finished or failed action, so a re-run (and a human) can see
/// what was done. `None` keeps the record in memory only.
#[derive(Debug, Default)]
pub struct Journal {
    path: Option<PathBuf>,
    /// Every record written in this run.
    pub records: Vec<serde_json::Value>,
}

impl Journal {
    /// A journal appending to `path`.
    pub fn at(path: PathBuf) -> Self {
        Self {
            path: Some(path),
            records: Vec::new(),
        }
    }

    /// A journal kept in memory.
    pub fn in_memory() -> Self {
        Self::default()
    }

    fn record(&mut self, value: serde_json::Value) -> Result<(), ApplyError> {
        if let Some(path) = &self.path {
            let io = |source| ApplyError::Journal {
                path: path.clone(),
                source,
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io)?;
            writeln!(f, "{value}").map_err(io)?;
        }
        self.records.push(value);
        Ok(())
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn run_steps(t: &dyn Transport, steps: &[Step]) -> Result<(), ExecError> {
    for step in steps {
        match step {
            Step::Run(cmd) => {
                t.run_ok(cmd)?;
            }
            Step::Upload { path, data, mode } => t.upload(data, path, *mode)?,
        }
    }
    Ok(())
}

/// Applies `plan` action by action, recording each in `journal`. Stops at the first failure.
pub fn apply(
    plan: &Plan,
    transports: &Transports,
    journal: &mut Journal,
) -> Result<(), ApplyError> {
    for (i, action) in plan.actions.iter().enumerate() {
        let index = i + 1;
        tracing::info!(
            "{} [{}/{}] [{}] {}",
            plan.phase,
            index,
            plan.actions.len(),
            action.target,
            action.summary
        );
        let transport = || {
            transports
                .get(&action.target)
                .map_err(|source| ApplyError::Transport {
                    phase: plan.phase,
                    source,
                })
        };
        // Long steps (apt, kubeadm, Helm's waits, a VM's SSH and cloud-init) say they are
        // still running, and how long they took.
        let result = crate::exec::progress::watch(
            &action.target.to_string(),
            &action.summary,
            crate::exec::progress::EVERY,
            Result::is_ok,
            || match &action.kind {
                ActionKind::Steps(steps) => {
                    run_steps(transport()?, steps).map_err(|source| ApplyError::Step {
                        phase: plan.phase,
                        index,
                        action: action.summary.clone(),
                        target: action.target.clone(),
                        source: Box::new(source),
                    })
                }
                ActionKind::JoinWorker { master, worker } => join_worker(
                    plan.phase,
                    index,
                    action,
                    master,
                    worker,
                    transport()?,
                    transports,
                ),
                ActionKind::WaitReady { timeout } => {
                    wait_ready(transport()?, *timeout).map_err(|source| ApplyError::Step {
                        phase: plan.phase,
                        index,
                        action: action.summary.clone(),
                        target: action.target.clone(),
                        source: Box::new(source),
                    })
                }
                ActionKind::ImportImage(image) => crate::image::import(transport()?, image)
                    .map_err(|source| ApplyError::Step {
                        phase: plan.phase,
                        index,
                        action: action.summary.clone(),
                        target: action.target.clone(),
                        source: Box::new(source),
                    }),
                ActionKind::IssueCert(i) => i
                    .run()
                    .map(|issued| {
                        tracing::info!(
                            "issued: certificate for {} valid until {}",
                            issued.cert.names.join(", "),
                            issued.cert.not_after_text
                        );
                    })
                    .map_err(|source| ApplyError::Cert {
                        phase: plan.phase,
                        index,
                        action: action.summary.clone(),
                        source: Box::new(source),
                    }),
                ActionKind::Dns(d) => d.run().map_err(|source| ApplyError::Dns {
                    phase: plan.phase,
                    index,
                    action: action.summary.clone(),
                    source: Box::new(source),
                }),
                ActionKind::DeployTls(d) => d
                    .run()
                    .map(|deployed| tracing::info!("{deployed}"))
                    .map_err(|source| ApplyError::Kube {
                        phase: plan.phase,
                        index,
                        action: action.summary.clone(),
                        source,
                    }),
                ActionKind::KubeObjects(set) => set.run().map_err(|source| ApplyError::Kube {
                    phase: plan.phase,
                    index,
                    action: action.summary.clone(),
                    source: source.into(),
                }),
                ActionKind::KubeApply(a) => a.run().map_err(|source| ApplyError::Kube {
                    phase: plan.phase,
                    index,
                    action: action.summary.clone(),
                    source,
                }),
            },
        );
        let status = if result.is_ok() { "done" } else { "failed" };
        journal.record(serde_json::json!({
            "time": now_unix(),
            "phase": plan.phase.name(),
            "index": index,
            "target": action.target.to_string(),
            "action": action.summary,
            "status": status,
            "error": result.as_ref().err().map(ToString::to_string),
        }))?;
        result?;
    }
    Ok(())
}

/// How often [`ActionKind::WaitReady`] tries SSH again.
pub const READY_POLL: Duration = Duration::from_secs(5);

fn cloud_init_wait(timeout: Duration) -> Cmd {
    Cmd::new("timeout").args([
        timeout.as_secs().max(1).to_string(),
        "cloud-init".to_owned(),
        "status".to_owned(),
        "--wait".to_owned(),
    ])
}

/// What `cloud-init status --long` says went wrong (the failed modules and their errors), to
/// add to a failed wait's message; empty when even that cannot be read.
fn cloud_init_detail(t: &dyn Transport) -> String {
    let long = Cmd::new("cloud-init").args(["status", "--long"]);
    match t.run(&long) {
        Ok(o) if !o.stdout.trim().is_empty() => {
            let detail: Vec<&str> = o
                .stdout
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("status:"))
                .collect();
            format!("\n`cloud-init status --long`:\n  {}", detail.join("\n  "))
        }
        _ => String::new(),
    }
}

/// Waits for SSH (a command that succeeds), then for cloud-init, within `timeout` in all.
fn wait_ready(t: &dyn Transport, timeout: Duration) -> Result<(), ExecError> {
    let start = Instant::now();
    let give_up = |what: &str, last: &str| ExecError::Protocol {
        target: t.target().to_owned(),
        reason: format!(
            "{what} after {}s (last: {last}); see the console with `virsh console {}`",
            start.elapsed().as_secs(),
            t.target()
        ),
    };
    loop {
        let last = match t.run(&Cmd::new("true")) {
            Ok(o) if o.success() => break,
            Ok(o) => format!("exit status {}: {}", o.status, o.stderr.trim()),
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= timeout {
            return Err(give_up("no SSH", &last));
        }
        tracing::debug!("[{}] no SSH yet: {last}", t.target());
        std::thread::sleep(READY_POLL);
    }
    tracing::info!(
        "[{}] SSH answers after {}s; waiting for cloud-init",
        t.target(),
        start.elapsed().as_secs()
    );
    let left = timeout.saturating_sub(start.elapsed());
    let out = t.run(&cloud_init_wait(left))?;
    match out.status {
        0 => Ok(()),
        // cloud-init ≥ 23.4: finished with recoverable errors; the node is usable.
        2 => {
            tracing::warn!(
                "[{}] cloud-init finished with recoverable errors: {}",
                t.target(),
                out.stdout.trim()
            );
            Ok(())
        }
        124 => Err(give_up("cloud-init still running", out.stdout.trim())),
        status => Err(ExecError::Failed {
            target: t.target().to_owned(),
            command: cloud_init_wait(left).shell_line(),
            status,
            stderr: format!(
                "{} {}{}",
                out.stdout.trim(),
                out.stderr.trim(),
                cloud_init_detail(t)
            )
            .trim()
            .to_owned(),
        }),
    }
    .inspect(|()| {
        tracing::info!(
            "[{}] ready after {}s",
            t.target(),
            start.elapsed().as_secs()
        );
    })
}

fn join_worker(
    phase: Scope,
    index: usize,
    action: &Action,
    master: &str,
    vm: &Vm,
    worker: &dyn Transport,
    transports: &Transports,
) -> Result<(), ApplyError> {
    let master_target = Target::Vm(master.to_owned());
    let step_err = |target: Target| {
        move |source| ApplyError::Step {
            phase,
            index,
            action: action.summary.clone(),
            target,
            source: Box::new(source),
        }
    };
    let m = transports
        .get(&master_target)
        .map_err(|source| ApplyError::Transport { phase, source })?;
    // A failed join is reset on the worker and retried once with a fresh token.
    let mut attempt = 1;
    loop {
        let out = m
            .run_ok(&Cmd::new("kubeadm").args([
                "token",
                "create",
                "--print-join-command",
                "--ttl",
                "15m",
            ]))
            .map_err(step_err(master_target.clone()))?;
        let join = JoinCommand::parse(&out.stdout).map_err(|source| ApplyError::Join {
            phase,
            index,
            action: action.summary.clone(),
            source,
        })?;
        let config = k8s::kubeadm_join(vm, &join);
        let joined = run_steps(
            worker,
            &[
                Step::Upload {
                    path: k8s::paths::KUBEADM_JOIN.into(),
                    data: config.into_bytes(),
                    mode: 0o600,
                },
                Step::Run(Cmd::new("kubeadm").args(["join", "--config", k8s::paths::KUBEADM_JOIN])),
            ],
        );
        match joined {
            Ok(()) => return Ok(()),
            Err(e) if attempt < JOIN_ATTEMPTS => {
                tracing::warn!(
                    "[{}] kubeadm join failed ({e}); resetting the node and retrying with a fresh token",
                    worker.target()
                );
                worker
                    .run_ok(&Cmd::new("kubeadm").args(["reset", "--force"]))
                    .map_err(step_err(action.target.clone()))?;
                attempt += 1;
            }
            Err(e) => return Err(step_err(action.target.clone())(e)),
        }
    }
}

/// How many times a worker's `kubeadm join` is tried (a failed one is reset in between).
pub const JOIN_ATTEMPTS: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{Output, RecordingTransport};

    #[test]
    fn a_failed_cloud_init_names_what_failed() {
        let vm = RecordingTransport::new("worker1");
        vm.respond("timeout", Output::failed(1, ""));
        vm.respond(
            "cloud-init status --long",
            Output::ok(
                "status: error\nextended_status: error - done\nerrors:\n\t('package_update_upgrade_install', RuntimeError('Failed to install packages'))\n",
            ),
        );
        let err = wait_ready(&vm, Duration::from_secs(60)).expect_err("cloud-init failed");
        let text = err.to_string();
        assert!(text.contains("worker1"), "{text}");
        assert!(text.contains("package_update_upgrade_install"), "{text}");
        assert!(text.contains("Failed to install packages"), "{text}");
        let cmds = vm.commands();
        assert_eq!(cmds.first().map(String::as_str), Some("true"), "{cmds:?}");
        assert!(cmds.iter().any(|c| c.starts_with("timeout ")), "{cmds:?}");
        assert_eq!(
            cmds.last().map(String::as_str),
            Some("cloud-init status --long")
        );
    }

    #[test]
    fn apply_stops_at_the_failure_and_journals_what_was_done() {
        let host = RecordingTransport::new("host");
        host.respond(
            "virsh -c qemu:///system net-start",
            Output::failed(1, "error: network is already in use\n"),
        );
        let transports = Transports {
            host: Box::new(host),
            vms: BTreeMap::new(),
        };
        let mut plan = Plan::new(PhaseId::Host);
        for (summary, args) in [
            ("define network k8s-net (new)", ["net-define", "/x.xml"]),
            ("start network k8s-net", ["net-start", "k8s-net"]),
            ("autostart network k8s-net", ["net-autostart", "k8s-net"]),
        ] {
            plan.actions.push(Action::run(
                Target::Host,
                summary,
                Cmd::new("virsh").args(["-c", "qemu:///system"]).args(args),
            ));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/journal.jsonl");
        let mut journal = Journal::at(path.clone());
        let err = apply(&plan, &transports, &mut journal).expect_err("net-start fails");
        assert_eq!(
            err.to_string(),
            "phase 01-host, action 2 `start network k8s-net` on host: on host: \
             `virsh -c qemu:///system net-start k8s-net` exited with status 1: error: network is already in use"
        );
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .expect("journal written")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2, "the third action never ran");
        assert_eq!(
            (lines[0]["status"].as_str(), lines[0]["index"].as_u64()),
            (Some("done"), Some(1))
        );
        assert_eq!(lines[1]["status"], "failed");
        assert_eq!(lines[1]["action"], "start network k8s-net");
        assert!(lines[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("network is already in use")));
    }

    #[test]
    fn render_lists_actions_and_with_verbose_their_steps_but_never_file_contents() {
        let mut plan = Plan::new(PhaseId::K8sCommon);
        plan.actions.push(Action::steps(
            Target::Vm("k8s-master".into()),
            "write /etc/x (missing)",
            vec![
                Step::Upload {
                    path: "/etc/x".into(),
                    data: b"secret-ish".to_vec(),
                    mode: 0o600,
                },
                Step::Run(Cmd::new("sysctl").arg("--system")),
            ],
        ));
        plan.notes.push("something to look at".into());
        assert_eq!(
            plan.render(false),
            "phase 03-k8s-common: 1 action(s)\n   1. [k8s-master] write /etc/x (missing)\n  note: something to look at\n"
        );
        let verbose = plan.render(true);
        assert!(
            verbose
                .contains("        write /etc/x (10 bytes, mode 600)\n        $ sysctl --system\n"),
            "{verbose}"
        );
        assert!(!verbose.contains("secret-ish"));
        assert_eq!(
            Plan::new(PhaseId::Vms).render(false),
            "phase 02-vms: up to date\n"
        );
    }

    #[test]
    fn a_failed_join_is_reset_and_retried_once_with_a_fresh_token() {
        let toml = include_str!("../../deploy/cluster.example.toml");
        let c = crate::inventory::Inventory::from_toml(toml)
            .and_then(|i| i.validate(toml))
            .expect("example");
        let master = std::sync::Arc::new(RecordingTransport::new("k8s-master"));
        master.respond(
            "kubeadm token create",
            Output::ok(format!(
                "kubeadm join 10.10.10.10:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:{}\n",
                "0".repeat(64)
            )),
        );
        let worker = std::sync::Arc::new(RecordingTransport::new("k8s-worker1"));
        worker.respond(
            "kubeadm join",
            Output::failed(1, "error execution phase kubelet-start: timed out\n"),
        );
        let transports = Transports {
            host: Box::new(RecordingTransport::new("host")),
            vms: BTreeMap::from([
                (
                    "k8s-master".to_owned(),
                    Box::new(std::sync::Arc::clone(&master)) as Box<dyn Transport>,
                ),
                (
                    "k8s-worker1".to_owned(),
                    Box::new(std::sync::Arc::clone(&worker)) as Box<dyn Transport>,
                ),
            ]),
        };
        let mut plan = Plan::new(PhaseId::K8sWorkers);
        plan.actions.push(Action {
            target: Target::Vm("k8s-worker1".into()),
            summary: "join k8s-worker1 to the cluster".into(),
            kind: ActionKind::JoinWorker {
                master: "k8s-master".into(),
                worker: Box::new(c.vm("k8s-worker1").expect("worker").clone()),
            },
        });
        let err = apply(&plan, &transports, &mut Journal::in_memory()).expect_err("join fails");
        assert!(err.to_string().contains("timed out"), "{err}");
        assert_eq!(
            worker.commands(),
            [
                "kubeadm join --config /etc/kubernetes/provisioner/kubeadm-join.yaml",
                "kubeadm reset --force",
                "kubeadm join --config /etc/kubernetes/provisioner/kubeadm-join.yaml",
            ]
        );
        assert_eq!(master.commands().len(), 2, "a fresh token for the retry");
    }

    #[test]
    fn one_run_at_a_time_and_a_dead_run_s_lock_is_taken_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(".provisioner/lock");
        let lock = RunLock::acquire(path.clone()).expect("first run");
        let err = RunLock::acquire(path.clone()).expect_err("second run");
        assert!(
            matches!(&err, LockError::Held { pid, .. } if *pid == std::process::id()),
            "{err}"
        );
        assert!(err.to_string().starts_with("another provisioner run (pid "));
        drop(lock);
        assert!(!path.exists(), "released");
        // A run killed before it could remove its lock: no such process.
        std::fs::write(&path, "4194303999\n").expect("stale lock");
        let _lock = RunLock::acquire(path.clone()).expect("stale lock taken over");
        assert_eq!(
            std::fs::read_to_string(&path).expect("lock"),
            format!("{}\n", std::process::id())
        );
    }

    #[test]
    fn disruptive_actions_are_marked_and_need_yes_or_a_confirmation() {
        let mut plan = Plan::new(PhaseId::Host);
        plan.actions.push(Action::run(
            Target::Host,
            "define network k8s-net",
            Cmd::new("true"),
        ));
        plan.push_disruptive(
            Action::run(Target::Host, "stop network k8s-net", Cmd::new("true")),
            "every VM loses its network until it starts again",
        );
        assert_eq!(
            plan.render(false),
            "phase 01-host: 2 action(s)\n   1. [host] define network k8s-net\n   2. [host] stop network k8s-net (DISRUPTIVE: every VM loses its network until it starts again)\n"
        );
        let err = confirm(&plan, false, None).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "phase 01-host: not applied: 1 disruptive action(s) need --yes (or a confirmation on a terminal):\n  [host] stop network k8s-net: every VM loses its network until it starts again"
        );
        assert!(confirm(&plan, true, None).is_ok());
        let mut asked = Vec::new();
        let mut no = |q: &str| {
            asked.push(q.to_owned());
            false
        };
        assert!(confirm(&plan, false, Some(&mut no)).is_err());
        assert!(asked[0].ends_with("apply them? [y/N] "), "{asked:?}");
        assert!(confirm(&plan, false, Some(&mut |_: &str| true)).is_ok());
        assert!(confirm(&Plan::new(PhaseId::Vms), false, None).is_ok());
    }

    #[test]
    fn phases_parse_by_name_number_and_prefixed_name() {
        assert_eq!("vms".parse::<PhaseId>(), Ok(PhaseId::Vms));
        assert_eq!("5".parse::<PhaseId>(), Ok(PhaseId::K8sWorkers));
        assert_eq!(
            "08-host-kubectl".parse::<PhaseId>(),
            Ok(PhaseId::HostKubectl)
        );
        assert_eq!(PhaseId::Monitoring.to_string(), "09-monitoring");
        let err = "sni-proxy".parse::<PhaseId>().expect_err("gone");
        assert!(
            err.starts_with("unknown phase `sni-proxy`; phases are host, vms,"),
            "{err}"
        );
    }
}
