//! Phases 3–5 and 8: `k8s-common` (every VM), `k8s-master`, `k8s-workers`, `host-kubectl`;
//! and the `teardown --keep-vms` reset. Kubernetes tools cannot run in tests: these plans
//! are tested through the recording fake, their command lines golden-tested and the tools'
//! output parsed from captured samples.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::facts::{file_hashes, installed_packages, sha256};
use super::{Context, PhaseError};
use crate::exec::{Cmd, ExecError, Transport};
use crate::inventory::{Cluster, Role, Vm};
use crate::plan::{Action, ActionKind, PhaseId, Plan, Step, Target};
use crate::render::k8s::{self as files, paths};

/// Packages every node needs besides the Kubernetes ones.
pub const BASE_PACKAGES: [&str; 4] = ["ca-certificates", "curl", "gpg", "containerd"];
/// The Kubernetes packages, pinned and held.
pub const K8S_PACKAGES: [&str; 3] = ["kubelet", "kubeadm", "kubectl"];

/// One VM as `k8s-common` observed it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommonFacts {
    /// SHA-256 of the managed files that exist.
    pub files: BTreeMap<String, String>,
    /// Whether the apt keyring exists.
    pub keyring: bool,
    /// Installed packages → version.
    pub packages: BTreeMap<String, String>,
    /// Packages on hold.
    pub held: Vec<String>,
    /// Whether swap is on.
    pub swap: bool,
    /// `helm version` (e.g. `v3.14.4`), if installed.
    pub helm: Option<String>,
}

fn vm_transport<'a>(
    ctx: &'a Context<'_>,
    phase: PhaseId,
    vm: &str,
) -> Result<&'a dyn Transport, PhaseError> {
    ctx.transports
        .get(&Target::Vm(vm.to_owned()))
        .map_err(|source| PhaseError::Transport { phase, source })
}

/// Observes one VM for `k8s-common`: read-only commands only.
pub fn gather_common_vm(t: &dyn Transport) -> Result<CommonFacts, ExecError> {
    let files = file_hashes(
        t,
        &[
            paths::MODULES,
            paths::SYSCTL,
            paths::CONTAINERD,
            paths::APT_SOURCE,
        ],
    )?;
    let keyring = t
        .run(&Cmd::new("test").args(["-f", paths::APT_KEYRING]))?
        .success();
    let names: Vec<String> = BASE_PACKAGES
        .iter()
        .chain(&K8S_PACKAGES)
        .map(|s| (*s).to_owned())
        .collect();
    let packages = installed_packages(t, &names)?;
    let held = t
        .run(&Cmd::new("apt-mark").arg("showhold"))?
        .stdout
        .lines()
        .map(|l| l.trim().to_owned())
        .collect();
    let swap = !t
        .run(&Cmd::new("swapon").args(["--show=NAME", "--noheadings"]))?
        .stdout
        .trim()
        .is_empty();
    let helm_out = t.run(&Cmd::new("helm").args(["version", "--template", "{{.Version}}"]));
    let helm = match helm_out {
        Ok(o) if o.success() => Some(o.stdout.trim().to_owned()),
        Ok(_) | Err(ExecError::Spawn { .. }) => None,
        Err(e) => return Err(e),
    };
    Ok(CommonFacts {
        files,
        keyring,
        packages,
        held,
        swap,
        helm,
    })
}

/// Observes every VM for `k8s-common`.
pub fn gather_common(ctx: &Context<'_>) -> Result<BTreeMap<String, CommonFacts>, PhaseError> {
    let phase = PhaseId::K8sCommon;
    ctx.cluster
        .vms
        .iter()
        .map(|vm| {
            if ctx.settings.ahead.vms.contains(vm.name.as_str()) {
                // Created earlier in this run: a fresh cloud image.
                return Ok((vm.name.to_string(), CommonFacts::default()));
            }
            let t = vm_transport(ctx, phase, vm.name.as_str())?;
            let f = gather_common_vm(t).map_err(|source| PhaseError::Gather { phase, source })?;
            Ok((vm.name.to_string(), f))
        })
        .collect()
}

fn write(path: &str, contents: String, mode: u32) -> Step {
    Step::Upload {
        path: path.to_owned(),
        data: contents.into_bytes(),
        mode,
    }
}

fn differs(facts: &BTreeMap<String, String>, path: &str, want: &str) -> Option<&'static str> {
    match facts.get(path) {
        None => Some("missing"),
        Some(h) if *h != sha256(want.as_bytes()) => Some("changed"),
        Some(_) => None,
    }
}

/// Plans `k8s-common` for one VM.
pub fn plan_common_vm(c: &Cluster, vm: &Vm, f: &CommonFacts, p: &mut Plan) {
    let target = || Target::Vm(vm.name.to_string());
    if f.swap {
        p.actions.push(Action::steps(
            target(),
            "turn swap off now and at boot",
            vec![
                Step::Run(Cmd::new("swapoff").arg("-a")),
                Step::Run(Cmd::new("sed").args([
                    "-i",
                    "-E",
                    r"/\sswap\s/ s/^([^#])/#\1/",
                    "/etc/fstab",
                ])),
            ],
        ));
    }
    let modules = files::modules();
    if let Some(why) = differs(&f.files, paths::MODULES, &modules) {
        p.actions.push(Action::steps(
            target(),
            format!("write {} ({why}) and load the modules", paths::MODULES),
            vec![
                write(paths::MODULES, modules, 0o644),
                Step::Run(Cmd::new("modprobe").arg("overlay")),
                Step::Run(Cmd::new("modprobe").arg("br_netfilter")),
            ],
        ));
    }
    let sysctl = files::sysctl();
    if let Some(why) = differs(&f.files, paths::SYSCTL, &sysctl) {
        p.actions.push(Action::steps(
            target(),
            format!("write {} ({why}) and apply it", paths::SYSCTL),
            vec![
                write(paths::SYSCTL, sysctl, 0o644),
                Step::Run(Cmd::new("sysctl").arg("--system")),
            ],
        ));
    }
    let base_missing: Vec<String> = BASE_PACKAGES
        .iter()
        .filter(|p| !f.packages.contains_key(**p))
        .map(|p| (*p).to_owned())
        .collect();
    if !base_missing.is_empty() {
        p.actions.push(Action::steps(
            target(),
            format!("install packages {}", base_missing.join(" ")),
            super::apt::update_and_install(&base_missing),
        ));
    }
    let series = c.versions.kubernetes.minor_series();
    if !f.keyring {
        let key = "/tmp/provisioner-k8s-release.key";
        p.actions.push(Action::steps(
            target(),
            format!("install the pkgs.k8s.io v{series} signing key"),
            vec![
                Step::Run(Cmd::new("mkdir").args(["-p", "-m", "0755", "/etc/apt/keyrings"])),
                Step::Run(Cmd::new("curl").args([
                    "-fsSL",
                    "-o",
                    key,
                    &format!("https://pkgs.k8s.io/core:/stable:/v{series}/deb/Release.key"),
                ])),
                Step::Run(Cmd::new("gpg").args([
                    "--batch",
                    "--yes",
                    "--dearmor",
                    "-o",
                    paths::APT_KEYRING,
                    key,
                ])),
            ],
        ));
    }
    let source = files::apt_source(c);
    let source_changed = differs(&f.files, paths::APT_SOURCE, &source);
    if let Some(why) = source_changed {
        p.actions.push(Action::steps(
            target(),
            format!(
                "write {} ({why}) and update the package lists",
                paths::APT_SOURCE
            ),
            vec![
                write(paths::APT_SOURCE, source, 0o644),
                Step::Run(super::apt::update()),
            ],
        ));
    }
    let version = files::k8s_package_version(c);
    let wrong: Vec<String> = K8S_PACKAGES
        .iter()
        .filter(|p| f.packages.get(**p) != Some(&version))
        .map(|p| format!("{p}={version}"))
        .collect();
    if !wrong.is_empty() {
        p.actions.push(Action::run(
            target(),
            format!("install {}", wrong.join(" ")),
            super::apt::install(&wrong),
        ));
    }
    let unheld: Vec<&str> = K8S_PACKAGES
        .iter()
        .copied()
        .filter(|p| !f.held.iter().any(|h| h == p))
        .collect();
    if !unheld.is_empty() {
        p.actions.push(Action::run(
            target(),
            format!("hold {}", unheld.join(" ")),
            Cmd::new("apt-mark")
                .arg("hold")
                .args(unheld.iter().copied()),
        ));
    }
    let containerd = files::containerd_config();
    if let Some(why) = differs(&f.files, paths::CONTAINERD, &containerd) {
        p.actions.push(Action::steps(
            target(),
            format!("write {} ({why}) and restart containerd", paths::CONTAINERD),
            vec![
                write(paths::CONTAINERD, containerd, 0o644),
                Step::Run(Cmd::new("systemctl").args(["restart", "containerd"])),
            ],
        ));
    }
    let helm = format!("v{}", c.versions.helm);
    if f.helm.as_deref() != Some(helm.as_str()) {
        let tgz = "/tmp/provisioner-helm.tar.gz";
        p.actions.push(Action::steps(
            target(),
            format!("install helm {helm}"),
            vec![
                Step::Run(Cmd::new("curl").args([
                    "-fsSL",
                    "-o",
                    tgz,
                    &format!("https://get.helm.sh/helm-{helm}-linux-amd64.tar.gz"),
                ])),
                Step::Run(Cmd::new("tar").args(["-xzf", tgz, "-C", "/tmp", "linux-amd64/helm"])),
                Step::Run(Cmd::new("install").args([
                    "-m",
                    "0755",
                    "/tmp/linux-amd64/helm",
                    "/usr/local/bin/helm",
                ])),
            ],
        ));
    }
}

/// Plans `k8s-common` for every VM.
pub fn plan_common(c: &Cluster, facts: &BTreeMap<String, CommonFacts>) -> Plan {
    let mut p = Plan::new(PhaseId::K8sCommon);
    let none = CommonFacts::default();
    for vm in &c.vms {
        plan_common_vm(c, vm, facts.get(vm.name.as_str()).unwrap_or(&none), &mut p);
    }
    p
}

/// A Helm release as `helm list -o json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HelmRelease {
    /// Release name.
    pub name: String,
    /// `CHART-VERSION`.
    pub chart: String,
    /// `deployed`, `failed`, …
    pub status: String,
}

/// Parses `helm list -o json`.
pub fn parse_helm_list(stdout: &str) -> Result<Vec<HelmRelease>, serde_json::Error> {
    serde_json::from_str(stdout)
}

/// The master as `k8s-master` observed it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MasterFacts {
    /// Whether `kubeadm init` has run (admin.conf exists).
    pub initialized: bool,
    /// SHA-256 of the kubeadm config and the Cilium values, where they exist.
    pub files: BTreeMap<String, String>,
    /// Helm releases in kube-system.
    pub releases: Vec<HelmRelease>,
    /// Initialised, but the API server does not answer `/readyz`: a `kubeadm init` that
    /// failed half-way (or a control plane that is down).
    pub api_down: bool,
}

fn kubectl(args: &[&str]) -> Cmd {
    Cmd::new("kubectl")
        .args(["--kubeconfig", paths::ADMIN_CONF])
        .args(args.iter().copied())
}

/// Observes the master.
pub fn gather_master(ctx: &Context<'_>) -> Result<MasterFacts, PhaseError> {
    let phase = PhaseId::K8sMaster;
    if ctx
        .settings
        .ahead
        .vms
        .contains(ctx.cluster.master().name.as_str())
    {
        return Ok(MasterFacts::default());
    }
    let t = vm_transport(ctx, phase, ctx.cluster.master().name.as_str())?;
    let gather = |source| PhaseError::Gather { phase, source };
    let initialized = t
        .run(&Cmd::new("test").args(["-f", paths::ADMIN_CONF]))
        .map_err(gather)?
        .success();
    let files = file_hashes(t, &[paths::KUBEADM_INIT, paths::CILIUM_VALUES]).map_err(gather)?;
    let mut releases = Vec::new();
    let api_down = initialized
        && !t
            .run(&kubectl(&["get", "--raw", "/readyz"]))
            .map_err(gather)?
            .success();
    if initialized && !api_down {
        let cmd = Cmd::new("helm").args([
            "list",
            "--namespace",
            "kube-system",
            "--output",
            "json",
            "--kubeconfig",
            paths::ADMIN_CONF,
        ]);
        let out = t.run_ok(&cmd).map_err(gather)?;
        releases = parse_helm_list(&out.stdout).map_err(|e| PhaseError::Output {
            phase,
            command: cmd.shell_line(),
            reason: e.to_string(),
        })?;
    }
    Ok(MasterFacts {
        initialized,
        files,
        releases,
        api_down,
    })
}

/// Plans `k8s-master`.
pub fn plan_master(c: &Cluster, f: &MasterFacts) -> Plan {
    let mut p = Plan::new(PhaseId::K8sMaster);
    let m = Target::Vm(c.master().name.to_string());
    let init = files::kubeadm_init(c);
    let init_changed = differs(&f.files, paths::KUBEADM_INIT, &init);
    let init_steps = |init: String| {
        vec![
            write(paths::KUBEADM_INIT, init, 0o600),
            Step::Run(Cmd::new("kubeadm").args(["init", "--config", paths::KUBEADM_INIT])),
        ]
    };
    if f.initialized && f.api_down {
        let mut steps = vec![
            Step::Run(Cmd::new("kubeadm").args(["reset", "--force"])),
            Step::Run(Cmd::new("rm").args(["-rf", "/etc/cni/net.d"])),
        ];
        steps.extend(init_steps(init));
        p.push_disruptive(
            Action::steps(
                m.clone(),
                "kubeadm reset and init again (initialised, but the API server does not answer /readyz)",
                steps,
            ),
            "resets the control plane: every node must join again",
        );
    } else if f.initialized {
        if init_changed.is_some() {
            p.notes.push(format!(
                "the cluster was initialised from a different {}; kubeadm does not re-apply it (reset with `teardown --keep-vms` to change it)",
                paths::KUBEADM_INIT
            ));
        }
    } else {
        p.actions.push(Action::steps(
            m.clone(),
            "kubeadm init (kube-proxy skipped)",
            init_steps(init),
        ));
    }
    let values = files::cilium_values(c);
    let values_changed = differs(&f.files, paths::CILIUM_VALUES, &values);
    let chart = format!("cilium-{}", c.versions.cilium);
    let deployed = f
        .releases
        .iter()
        .any(|r| r.name == "cilium" && r.chart == chart && r.status == "deployed");
    if values_changed.is_some() || !deployed {
        let why = if !deployed {
            format!("{chart} not deployed")
        } else {
            "values changed".to_owned()
        };
        p.actions.push(Action::steps(
            m,
            format!("install Cilium {} with Helm ({why})", c.versions.cilium),
            vec![
                write(paths::CILIUM_VALUES, values, 0o644),
                Step::Run(Cmd::new("helm").args([
                    "repo",
                    "add",
                    "cilium",
                    "https://helm.cilium.io/",
                    "--force-update",
                ])),
                Step::Run(Cmd::new("helm").args([
                    "upgrade",
                    "--install",
                    "cilium",
                    "cilium/cilium",
                    "--version",
                    &c.versions.cilium.to_string(),
                    "--namespace",
                    "kube-system",
                    "--values",
                    paths::CILIUM_VALUES,
                    "--kubeconfig",
                    paths::ADMIN_CONF,
                    "--wait",
                    "--timeout",
                    "10m",
                ])),
            ],
        ));
    }
    p
}

/// A node as `kubectl get nodes -o json` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Whether its Ready condition is True.
    pub ready: bool,
}

#[derive(Deserialize)]
struct NodeList {
    items: Vec<NodeItem>,
}

#[derive(Deserialize)]
struct NodeItem {
    metadata: NodeMeta,
    #[serde(default)]
    status: NodeStatus,
}

#[derive(Deserialize)]
struct NodeMeta {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct NodeStatus {
    #[serde(default)]
    conditions: Vec<Condition>,
}

#[derive(Deserialize)]
struct Condition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

/// Parses `kubectl get nodes -o json`.
pub fn parse_nodes(stdout: &str) -> Result<Vec<Node>, serde_json::Error> {
    let list: NodeList = serde_json::from_str(stdout)?;
    Ok(list
        .items
        .into_iter()
        .map(|i| Node {
            ready: i
                .status
                .conditions
                .iter()
                .any(|c| c.kind == "Ready" && c.status == "True"),
            name: i.metadata.name,
            labels: i.metadata.labels,
        })
        .collect())
}

/// The cluster as `k8s-workers` observed it from the master.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkersFacts {
    /// Whether the master is initialised.
    pub initialized: bool,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// Not initialised yet, but `k8s-master` initialises it earlier in this run: plan every
    /// join.
    pub initialized_ahead: bool,
}

/// Observes the nodes from the master.
pub fn gather_workers(ctx: &Context<'_>) -> Result<WorkersFacts, PhaseError> {
    let phase = PhaseId::K8sWorkers;
    let ahead = &ctx.settings.ahead;
    if ahead.cluster || ahead.vms.contains(ctx.cluster.master().name.as_str()) {
        return Ok(WorkersFacts {
            initialized_ahead: true,
            ..WorkersFacts::default()
        });
    }
    let t = vm_transport(ctx, phase, ctx.cluster.master().name.as_str())?;
    let gather = |source| PhaseError::Gather { phase, source };
    let initialized = t
        .run(&Cmd::new("test").args(["-f", paths::ADMIN_CONF]))
        .map_err(gather)?
        .success();
    if !initialized {
        return Ok(WorkersFacts::default());
    }
    let cmd = kubectl(&["get", "nodes", "--output", "json"]);
    let out = t.run_ok(&cmd).map_err(gather)?;
    let nodes = parse_nodes(&out.stdout).map_err(|e| PhaseError::Output {
        phase,
        command: cmd.shell_line(),
        reason: e.to_string(),
    })?;
    Ok(WorkersFacts {
        initialized,
        nodes,
        initialized_ahead: false,
    })
}

/// The label every worker gets besides its inventory labels.
pub const WORKER_ROLE_LABEL: &str = "node-role.kubernetes.io/worker";

/// Plans `k8s-workers`.
pub fn plan_workers(c: &Cluster, f: &WorkersFacts) -> Plan {
    let mut p = Plan::new(PhaseId::K8sWorkers);
    if !f.initialized && !f.initialized_ahead {
        p.notes
            .push("the master is not initialised yet: apply k8s-master first".into());
        return p;
    }
    let master = c.master().name.to_string();
    for vm in &c.vms {
        let node = f.nodes.iter().find(|n| n.name == vm.name.as_str());
        if vm.role == Role::Worker && node.is_none() {
            p.actions.push(Action {
                target: Target::Vm(vm.name.to_string()),
                summary: format!("join {} to the cluster", vm.name),
                kind: ActionKind::JoinWorker {
                    master: master.clone(),
                    worker: Box::new(vm.clone()),
                },
            });
        }
        let mut want = vm.labels.clone();
        if vm.role == Role::Worker {
            want.insert(WORKER_ROLE_LABEL.to_owned(), String::new());
        }
        let have = node.map(|n| &n.labels);
        let missing: Vec<String> = want
            .iter()
            .filter(|(k, v)| have.and_then(|h| h.get(*k)) != Some(*v))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !missing.is_empty() {
            p.actions.push(Action::run(
                Target::Vm(master.clone()),
                format!("label node {} {}", vm.name, missing.join(" ")),
                kubectl(&["label", "node", vm.name.as_str(), "--overwrite"]).args(missing),
            ));
        }
    }
    p
}

/// The host as `host-kubectl` observed it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostKubectlFacts {
    /// `clientVersion.gitVersion`, e.g. `v1.29.6`.
    pub kubectl: Option<String>,
    /// SHA-256 of the host's kubeconfig.
    pub kubeconfig_sha256: Option<String>,
    /// The master's admin.conf, if the cluster exists.
    pub admin_conf: Option<String>,
}

/// Parses `kubectl version --client --output=json`.
pub fn parse_kubectl_client_version(stdout: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(stdout).ok()?;
    v.get("clientVersion")?
        .get("gitVersion")?
        .as_str()
        .map(str::to_owned)
}

/// The kubeconfig path on the host.
pub fn host_kubeconfig(c: &Cluster) -> String {
    let home = if c.ssh.host_user == "root" {
        "/root".to_owned()
    } else {
        format!("/home/{}", c.ssh.host_user)
    };
    format!("{home}/.kube/config")
}

/// Observes the host's kubectl and kubeconfig, and the master's admin.conf.
pub fn gather_host_kubectl(ctx: &Context<'_>) -> Result<HostKubectlFacts, PhaseError> {
    let phase = PhaseId::HostKubectl;
    let c = ctx.cluster;
    let gather = |source| PhaseError::Gather { phase, source };
    let host = ctx.transports.host.as_ref();
    let kubectl =
        match host.run(&Cmd::new("kubectl").args(["version", "--client", "--output=json"])) {
            Ok(o) if o.success() => parse_kubectl_client_version(&o.stdout),
            Ok(_) | Err(ExecError::Spawn { .. }) => None,
            Err(e) => return Err(gather(e)),
        };
    let path = host_kubeconfig(c);
    let kubeconfig_sha256 = file_hashes(host, &[&path]).map_err(gather)?.remove(&path);
    if ctx.settings.ahead.vms.contains(c.master().name.as_str()) || ctx.settings.ahead.cluster {
        return Ok(HostKubectlFacts {
            kubectl,
            kubeconfig_sha256,
            admin_conf: None,
        });
    }
    let m = vm_transport(ctx, phase, c.master().name.as_str())?;
    let out = m
        .run(&Cmd::new("cat").arg(paths::ADMIN_CONF))
        .map_err(gather)?;
    let admin_conf = out.success().then_some(out.stdout);
    Ok(HostKubectlFacts {
        kubectl,
        kubeconfig_sha256,
        admin_conf,
    })
}

/// Plans `host-kubectl`.
pub fn plan_host_kubectl(c: &Cluster, f: &HostKubectlFacts) -> Plan {
    let mut p = Plan::new(PhaseId::HostKubectl);
    let want = format!("v{}", c.versions.kubernetes);
    if f.kubectl.as_deref() != Some(want.as_str()) {
        let url = format!("https://dl.k8s.io/release/{want}/bin/linux/amd64/kubectl");
        let part = "/usr/local/bin/kubectl.part";
        p.actions.push(Action::steps(
            Target::Host,
            format!("install kubectl {want}"),
            vec![
                Step::Run(Cmd::new("curl").args(["-fsSL", "-o", part, &url])),
                Step::Run(Cmd::new("curl").args(["-fsSL", "-o", "/tmp/provisioner-kubectl.sha256", &format!("{url}.sha256")])),
                Step::Run(Cmd::new("sh").args([
                    "-c",
                    "echo \"$(cat /tmp/provisioner-kubectl.sha256)  $1\" | sha256sum --check --strict",
                    "sh",
                    part,
                ])),
                Step::Run(Cmd::new("chmod").args(["0755", part])),
                Step::Run(Cmd::new("mv").args(["-f", part, "/usr/local/bin/kubectl"])),
            ],
        ));
    }
    match &f.admin_conf {
        None => p
            .notes
            .push("the master has no admin.conf yet: apply k8s-master first".into()),
        Some(conf) if f.kubeconfig_sha256.as_deref() != Some(sha256(conf.as_bytes()).as_str()) => {
            let path = host_kubeconfig(c);
            let mut steps = vec![Step::Upload {
                path: path.clone(),
                data: conf.clone().into_bytes(),
                mode: 0o600,
            }];
            // Uploads land as root (through sudo): the operator must be able to read it.
            if c.ssh.host_user != "root" {
                let user = &c.ssh.host_user;
                let dir = path.trim_end_matches("/config");
                steps.push(Step::Run(Cmd::new("chown").args([
                    "-R",
                    &format!("{user}:"),
                    dir,
                ])));
            }
            p.actions.push(Action::steps(
                Target::Host,
                format!("write {path} from the master's admin.conf"),
                steps,
            ));
        }
        Some(_) => {}
    }
    p
}

/// VM name → whether it has joined a cluster (kubelet.conf exists).
pub fn gather_reset(ctx: &Context<'_>) -> Result<BTreeMap<String, bool>, PhaseError> {
    let phase = PhaseId::K8sCommon;
    ctx.cluster
        .vms
        .iter()
        .map(|vm| {
            let t = vm_transport(ctx, phase, vm.name.as_str())?;
            let joined = t
                .run(&Cmd::new("test").args(["-e", "/etc/kubernetes/kubelet.conf"]))
                .map_err(|source| PhaseError::Gather { phase, source })?
                .success();
            Ok((vm.name.to_string(), joined))
        })
        .collect()
}

/// Plans `kubeadm reset` on every joined VM, workers first.
pub fn plan_reset(c: &Cluster, joined: &BTreeMap<String, bool>) -> Plan {
    let mut p = Plan::new(PhaseId::K8sCommon);
    let order = c.workers().chain(std::iter::once(c.master()));
    for vm in order {
        if joined.get(vm.name.as_str()).copied().unwrap_or(false) {
            p.push_disruptive(
                Action::steps(
                    Target::Vm(vm.name.to_string()),
                    format!("kubeadm reset on {}", vm.name),
                    vec![
                        Step::Run(Cmd::new("kubeadm").args(["reset", "--force"])),
                        Step::Run(Cmd::new("rm").args([
                            "-rf",
                            "/etc/cni/net.d",
                            paths::KUBEADM_INIT,
                            paths::KUBEADM_JOIN,
                        ])),
                    ],
                ),
                "removes the node from Kubernetes (its pods stop)",
            );
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_half_failed_kubeadm_init_is_reset_and_run_again_as_a_disruptive_action() {
        let toml = include_str!("../../../deploy/cluster.example.toml");
        let c = crate::inventory::Inventory::from_toml(toml)
            .and_then(|i| i.validate(toml))
            .expect("example");
        let f = MasterFacts {
            initialized: true,
            api_down: true,
            ..MasterFacts::default()
        };
        let p = plan_master(&c, &f);
        let text = p.render(true);
        assert_eq!(p.disruptive.len(), 1, "{text}");
        let reset = text.find("$ kubeadm reset --force").expect("reset");
        let init = text.find("$ kubeadm init --config").expect("init");
        assert!(reset < init, "{text}");
        let healthy = MasterFacts {
            api_down: false,
            ..f
        };
        assert!(plan_master(&c, &healthy).disruptive.is_empty());
    }
}
