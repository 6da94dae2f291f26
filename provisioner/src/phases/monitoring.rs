//! Phase 9, `monitoring`: kube-prometheus-stack with Helm at the inventory's pinned chart
//! version, turnd's dashboard, alert rules and PodMonitor, and alert e-mail through SendGrid.
//!
//! Gather observes, read-only: on the master, `helm list` in the monitoring namespace and the
//! SHA-256 of the values file the last install used ([`VALUES_PATH`]); through the Kubernetes
//! API, what applying the phase's plain objects would change
//! ([`crate::render::monitoring::objects`]: the namespace, the Secrets with Grafana's admin
//! password and the SMTP password, the dashboard ConfigMap). The secrets come from
//! `GRAFANA_ADMIN_PASSWORD` and `SENDGRID_API_KEY` in the environment or `.env`
//! ([`Settings::dotenv`]), never from the inventory; they reach only the Secrets.
//!
//! [`plan`] is pure: one server-side apply of the objects when any would change, then one
//! `helm upgrade --install` when the release is missing, not `deployed`, at another chart
//! version, or was installed with other values. With `enabled = false` the phase gathers
//! nothing and plans nothing, and removes nothing either.
//!
//! Helm runs on the master with its `admin.conf`, like Cilium's chart in `k8s-master`. When an
//! earlier phase of the same run creates the master or the cluster ([`Settings::ahead`]),
//! gather asks neither and plans everything as new.

use std::path::Path;

use super::k8s::{parse_helm_list, HelmRelease};
use super::turnd::KubeApi;
use super::{Context, PhaseError, Settings};
use crate::exec::{Cmd, Transport};
use crate::inventory::Cluster;
use crate::k8s::{self, Change, ChangeKind, ObjectSet};
use crate::plan::{Action, ActionKind, PhaseId, Plan, Step, Target};
use crate::render::k8s::paths::ADMIN_CONF;
use crate::render::monitoring::{self as files, Secrets, CHART, CHART_NAME, RELEASE};
use crate::secrets::{EnvSource, SecretError};

/// The values file on the master.
pub const VALUES_PATH: &str = "/etc/kubernetes/provisioner/monitoring-values.yaml";
/// How long `helm upgrade --install --wait` may take (CRDs, images, the Prometheus volume).
pub const HELM_TIMEOUT: &str = "15m";
/// The secret with Grafana's admin password.
pub const GRAFANA_PASSWORD_VAR: &str = "GRAFANA_ADMIN_PASSWORD";
/// The secret with the SendGrid API key (the SMTP password).
pub const SENDGRID_VAR: &str = "SENDGRID_API_KEY";

const PHASE: PhaseId = PhaseId::Monitoring;

/// What `monitoring` observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitoringFacts {
    /// Helm releases in the monitoring namespace; `None`: Helm is not installed on the master.
    pub releases: Option<Vec<HelmRelease>>,
    /// SHA-256 of [`VALUES_PATH`] on the master, if it exists.
    pub values_sha256: Option<String>,
    /// What applying the objects would change.
    pub objects: Vec<Change>,
    /// Whether an API server answered (else every object is [`ChangeKind::Unverified`]).
    pub asked: bool,
}

/// The phase's secrets from `env`, else the `.env` file: Grafana's admin password always, the
/// SendGrid API key when the inventory configures e-mail.
///
/// # Errors
/// [`SecretError::Missing`] naming the variable, or an unreadable `.env`.
pub fn secrets(
    c: &Cluster,
    env: &dyn EnvSource,
    dotenv: Option<&Path>,
) -> Result<Secrets, SecretError> {
    let file = dotenv
        .map(crate::secrets::read_dotenv)
        .transpose()?
        .unwrap_or_default();
    let get = |name: &str| {
        env.var(name)
            .filter(|v| !v.is_empty())
            .or_else(|| file.get(name).filter(|v| !v.is_empty()).cloned())
    };
    let missing = |name: &'static str| SecretError::Missing {
        name,
        dotenv: dotenv.map_or_else(|| ".env".to_owned(), |p| p.display().to_string()),
        alias: String::new(),
    };
    let grafana_admin_password =
        get(GRAFANA_PASSWORD_VAR).ok_or_else(|| missing(GRAFANA_PASSWORD_VAR))?;
    let sendgrid_api_key = match &c.monitoring.email {
        Some(_) => Some(get(SENDGRID_VAR).ok_or_else(|| missing(SENDGRID_VAR))?),
        None => None,
    };
    Ok(Secrets {
        grafana_admin_password,
        sendgrid_api_key,
    })
}

fn kube_api(settings: &Settings, env: &dyn EnvSource) -> Result<KubeApi, PhaseError> {
    k8s::applier::given_api(settings.kube_api.as_ref(), env)
        .ok_or(PhaseError::NoKubeApi { phase: PHASE })
}

fn helm(args: &[&str]) -> Cmd {
    Cmd::new("helm")
        .args(args.iter().copied())
        .args(["--kubeconfig", ADMIN_CONF])
}

/// Observes the master and the API server.
///
/// # Errors
/// [`PhaseError::Secret`] for a missing secret, [`PhaseError::NoKubeApi`],
/// [`PhaseError::Gather`] when the master cannot be asked, [`PhaseError::Output`] for
/// unreadable `helm list` output, [`PhaseError::K8s`] when the server refuses a dry run.
pub fn gather(
    ctx: &Context<'_>,
    env: &dyn EnvSource,
) -> Result<(ObjectSet, MonitoringFacts), PhaseError> {
    let c = ctx.cluster;
    let secrets =
        secrets(c, env, ctx.settings.dotenv.as_deref()).map_err(|source| PhaseError::Secret {
            phase: PHASE,
            source,
        })?;
    let api = kube_api(ctx.settings, env)?;
    let set = ObjectSet {
        api,
        objects: files::objects(&c.monitoring, &secrets),
    };
    let ahead = &ctx.settings.ahead;
    if ahead.cluster || ahead.vms.contains(c.master().name.as_str()) {
        // The master or the cluster is created earlier in this run: nothing is installed yet.
        let objects = set
            .ids()
            .into_iter()
            .map(|object| Change {
                object,
                kind: ChangeKind::Create,
            })
            .collect();
        let facts = MonitoringFacts {
            releases: Some(Vec::new()),
            values_sha256: None,
            objects,
            asked: true,
        };
        return Ok((set, facts));
    }
    let master = Target::Vm(c.master().name.to_string());
    let t: &dyn Transport =
        ctx.transports
            .get(&master)
            .map_err(|source| PhaseError::Transport {
                phase: PHASE,
                source,
            })?;
    let gather = |source| PhaseError::Gather {
        phase: PHASE,
        source,
    };
    let list = helm(&[
        "list",
        "--namespace",
        &c.monitoring.namespace,
        "--output",
        "json",
    ]);
    let out = t.run(&list).map_err(gather)?;
    let releases = match out.status {
        0 => Some(
            parse_helm_list(&out.stdout).map_err(|e| PhaseError::Output {
                phase: PHASE,
                command: list.shell_line(),
                reason: e.to_string(),
            })?,
        ),
        // Not installed yet (`k8s-common` installs it earlier in the same run).
        127 => None,
        status => {
            return Err(gather(crate::exec::ExecError::Failed {
                target: t.target().to_owned(),
                command: list.shell_line(),
                status,
                stderr: out.stderr.trim().to_owned(),
            }))
        }
    };
    let values_sha256 = super::facts::file_hashes(t, &[VALUES_PATH])
        .map_err(gather)?
        .remove(VALUES_PATH);
    let (objects, asked) = k8s::block_on(async {
        let client = set.api.client().await?;
        set.plan(&client).await
    })
    .and_then(|r| r)
    .map_err(|source| PhaseError::K8s {
        phase: PHASE,
        source,
    })?;
    Ok((
        set,
        MonitoringFacts {
            releases,
            values_sha256,
            objects,
            asked,
        },
    ))
}

fn kind_word(k: ChangeKind) -> &'static str {
    match k {
        ChangeKind::Create => "create",
        ChangeKind::Update => "update",
        ChangeKind::Unchanged => "unchanged",
        ChangeKind::Unverified => "unverified",
    }
}

/// The `helm upgrade --install` command line.
pub fn helm_install(c: &Cluster) -> Cmd {
    helm(&[
        "upgrade",
        "--install",
        RELEASE,
        CHART,
        "--version",
        &c.monitoring.chart_version.to_string(),
        "--namespace",
        &c.monitoring.namespace,
        "--values",
        VALUES_PATH,
        "--wait",
        "--timeout",
        HELM_TIMEOUT,
    ])
}

/// Plans `monitoring` from what gather observed (pure).
pub fn plan(c: &Cluster, set: ObjectSet, facts: &MonitoringFacts) -> Plan {
    let mut p = Plan::new(PHASE);
    let pending: Vec<String> = facts
        .objects
        .iter()
        .filter(|o| o.kind != ChangeKind::Unchanged)
        .map(|o| format!("{} ({})", o.object, kind_word(o.kind)))
        .collect();
    if c.monitoring.storage_class.is_none() {
        p.notes.push(
            "monitoring.storage_class is not set: Prometheus keeps its data in an emptyDir, lost when its pod is replaced"
                .to_owned(),
        );
    }
    if !facts.asked {
        p.notes.push(format!(
            "the Kubernetes API ({}) did not answer: the objects were not compared with the cluster",
            set.api
        ));
    }
    if !pending.is_empty() {
        p.actions.push(Action {
            target: Target::KubeApi,
            summary: format!("server-side apply {}", pending.join(", ")),
            kind: ActionKind::KubeObjects(Box::new(set)),
        });
    }
    let values = files::helm_values_yaml(c);
    let chart = format!("{CHART_NAME}-{}", c.monitoring.chart_version);
    let release = facts.releases.iter().flatten().find(|r| r.name == RELEASE);
    let why = match release {
        None => Some(format!("{RELEASE} not installed")),
        Some(r) if r.chart != chart => Some(format!("{} → {chart}", r.chart)),
        Some(r) if r.status != "deployed" => Some(format!("release {}", r.status)),
        Some(_)
            if facts.values_sha256.as_deref() != Some(&super::facts::sha256(values.as_bytes())) =>
        {
            Some("values changed".to_owned())
        }
        Some(_) => None,
    };
    if let Some(why) = why {
        let verb = if release.is_some() {
            "upgrade"
        } else {
            "install"
        };
        p.actions.push(Action::steps(
            Target::Vm(c.master().name.to_string()),
            format!(
                "{verb} kube-prometheus-stack {} with Helm ({why})",
                c.monitoring.chart_version
            ),
            vec![
                Step::Upload {
                    path: VALUES_PATH.into(),
                    data: values.into_bytes(),
                    mode: 0o644,
                },
                Step::Run(Cmd::new("helm").args([
                    "repo",
                    "add",
                    files::REPO_NAME,
                    files::REPO_URL,
                    "--force-update",
                ])),
                Step::Run(helm_install(c)),
            ],
        ));
    }
    p
}

/// Gathers and plans the phase; with `enabled = false`, an empty plan that says so.
///
/// # Errors
/// See [`gather`].
pub fn plan_phase(ctx: &Context<'_>, env: &dyn EnvSource) -> Result<Plan, PhaseError> {
    if !ctx.cluster.monitoring.enabled {
        let mut p = Plan::new(PHASE);
        p.notes.push(
            "monitoring.enabled = false: nothing is installed (and nothing already installed is removed)"
                .to_owned(),
        );
        return Ok(p);
    }
    let (set, facts) = gather(ctx, env)?;
    Ok(plan(ctx.cluster, set, &facts))
}

/// The state of turnd's scrape targets, as Prometheus reports `up{job="turnd"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// Instances (workers) whose target is up.
    pub up: Vec<String>,
    /// Instances Prometheus scrapes but cannot reach.
    pub down: Vec<String>,
}

impl Targets {
    /// Parses Prometheus' `/api/v1/query` answer for `up{job="turnd"}`.
    ///
    /// # Errors
    /// A message when the answer is not a successful vector result.
    pub fn parse(body: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(format!("Prometheus answered {}", v["status"]));
        }
        let mut t = Self {
            up: Vec::new(),
            down: Vec::new(),
        };
        for r in v["data"]["result"].as_array().into_iter().flatten() {
            let instance = r["metric"]["instance"].as_str().unwrap_or("?").to_owned();
            if r["value"][1] == "1" {
                t.up.push(instance);
            } else {
                t.down.push(instance);
            }
        }
        t.up.sort();
        t.down.sort();
        Ok(t)
    }

    /// The inventory's turnd workers that have no target up.
    pub fn missing(&self, c: &Cluster) -> Vec<String> {
        c.turnd
            .iter()
            .map(|t| t.vm.to_string())
            .filter(|vm| !self.up.contains(vm))
            .collect()
    }
}

/// The query `status`/`verify` send to Prometheus through the API server's service proxy.
pub fn targets_command(c: &Cluster) -> Cmd {
    Cmd::new("kubectl").args([
        "--kubeconfig",
        ADMIN_CONF,
        "get",
        "--raw",
        &format!(
            "/api/v1/namespaces/{}/services/http:{}:{}/proxy/api/v1/query?query=up%7Bjob%3D%22{}%22%7D",
            c.monitoring.namespace,
            files::PROMETHEUS_SERVICE,
            files::PROMETHEUS_PORT,
            files::JOB
        ),
    ])
}

/// Asks Prometheus (on the master, through `kubectl get --raw`) which turnd targets are up.
///
/// # Errors
/// A message when the master or Prometheus cannot be asked.
pub fn targets(ctx: &Context<'_>) -> Result<Targets, String> {
    let master = Target::Vm(ctx.cluster.master().name.to_string());
    let t = ctx.transports.get(&master).map_err(|e| e.to_string())?;
    let out = t
        .run_ok(&targets_command(ctx.cluster))
        .map_err(|e| e.to_string())?;
    Targets::parse(&out.stdout)
}

/// What `status` and `verify` report about monitoring: the Helm release and turnd's targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The release as `helm list` shows it (`None`: not installed), or why it cannot be told.
    pub release: Result<Option<HelmRelease>, String>,
    /// turnd's targets in Prometheus, or why they cannot be told.
    pub targets: Result<Targets, String>,
}

/// Asks the master for the release (`helm list`) and Prometheus for turnd's targets.
pub fn health(ctx: &Context<'_>) -> Health {
    let c = ctx.cluster;
    let master = Target::Vm(c.master().name.to_string());
    let release = ctx
        .transports
        .get(&master)
        .map_err(|e| e.to_string())
        .and_then(|t| {
            let list = helm(&[
                "list",
                "--namespace",
                &c.monitoring.namespace,
                "--output",
                "json",
            ]);
            let out = t.run_ok(&list).map_err(|e| e.to_string())?;
            let releases = parse_helm_list(&out.stdout).map_err(|e| e.to_string())?;
            Ok(releases.into_iter().find(|r| r.name == RELEASE))
        });
    Health {
        release,
        targets: targets(ctx),
    }
}

impl Health {
    /// One line each for the release and the targets.
    pub fn lines(&self, c: &Cluster) -> Vec<String> {
        let release = match &self.release {
            Ok(Some(r)) => format!("release {RELEASE}: {} {}", r.chart, r.status),
            Ok(None) => format!("release {RELEASE}: not installed"),
            Err(e) => format!("release {RELEASE}: cannot tell: {e}"),
        };
        let targets = match &self.targets {
            Ok(t) => {
                let missing = t.missing(c);
                format!(
                    "turnd targets up in Prometheus: {}{}",
                    if t.up.is_empty() {
                        "none".to_owned()
                    } else {
                        t.up.join(", ")
                    },
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!("; missing: {}", missing.join(", "))
                    }
                )
            }
            Err(e) => format!("turnd targets: cannot ask Prometheus: {e}"),
        };
        vec![release, targets]
    }

    /// Whether the release is deployed at the pinned chart and every turnd instance is up.
    pub fn ok(&self, c: &Cluster) -> bool {
        let chart = format!("{CHART_NAME}-{}", c.monitoring.chart_version);
        let release_ok =
            matches!(&self.release, Ok(Some(r)) if r.chart == chart && r.status == "deployed");
        release_ok && self.targets.as_ref().is_ok_and(|t| t.missing(c).is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_prometheus_vector_answers() {
        // Shape of Prometheus 2.x /api/v1/query for an instant vector.
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"up","instance":"k8s-worker2","job":"turnd"},"value":[1.7e9,"0"]},
            {"metric":{"__name__":"up","instance":"k8s-worker1","job":"turnd"},"value":[1.7e9,"1"]}]}}"#;
        let t = Targets::parse(body).expect("parses");
        assert_eq!(t.up, ["k8s-worker1"]);
        assert_eq!(t.down, ["k8s-worker2"]);
        assert!(Targets::parse(r#"{"status":"error","error":"bad"}"#).is_err());
    }
}
