//! Phase 6, `turnd`: turnd's Kubernetes objects ([`crate::k8s::Manifests`]) applied with
//! server-side apply.
//!
//! Gather builds the objects with the REST-API auth secret from the secrets
//! ([`Settings::auth_secret`], else `TURND_AUTH_SECRET` or the old `COTURN_AUTH_SECRET` from the
//! process environment) — never from the inventory — and asks the API server what applying
//! them would change ([`k8s::plan_or_offline`]: a read and a server-side dry run per object).
//! The plan is one action that applies every object when any of them would be created or
//! changed, and nothing when the server says every object is unchanged; when no API server
//! answers, every object is "unverified" and the action is planned anyway (applying will
//! tell). The TLS Secret is left out ([`k8s::TlsSource::External`]): the `cert deploy`
//! command owns it, so applying never overwrites a real certificate.
//!
//! Reaching the API server: a kubeconfig ([`KubeApi::Kubeconfig`], from
//! [`Settings::kube_api`], else `$KUBECONFIG`). The `host-kubectl` phase writes the master's
//! `admin.conf` to the host, but its server address (`https://<master>:6443`) is reachable
//! only from the host and the VM network; from the operator's machine use a copy of it whose
//! `server:` goes through a tunnel (e.g. `ssh -L 6443:<master-ip>:6443 host` with
//! `tls-server-name: <master-ip>`, which the API server's certificate names), or run the
//! provisioner on the host. This is the same kubeconfig `cert deploy --kubeconfig` uses, so
//! one tunnel serves both; the provisioner opens no tunnel by itself.
//!
//! What it leaves out: waiting for the Deployments' rollout. The objects are applied and the
//! phase returns; `kubectl -n turnd rollout status deployment/turnd-<vm>` (through
//! `provisioner kubectl`) waits. A rollout cannot finish before `cert deploy` has created the
//! TLS Secret the pods mount.

use std::path::PathBuf;

use super::{Context, PhaseError, Settings};
use crate::k8s::{self, Change, ChangeKind, Inputs, K8sError, Manifests, Mode, Sensitive};
use crate::plan::{Action, ActionKind, PhaseId, Plan, Target};
use crate::secrets::EnvSource;

/// Where the Kubernetes API server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeApi {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// A URL without credentials (tests: a fake API server over plain HTTP).
    Url(String),
}

impl std::fmt::Display for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kubeconfig(p) => write!(f, "kubeconfig {}", p.display()),
            Self::Url(u) => f.write_str(u),
        }
    }
}

impl KubeApi {
    /// A client for it.
    ///
    /// # Errors
    /// [`K8sError::Client`] when the kubeconfig or URL cannot be used.
    pub async fn client(&self) -> Result<kube::Client, K8sError> {
        match self {
            Self::Kubeconfig(p) => k8s::client_from_kubeconfig(p).await,
            Self::Url(u) => k8s::client_for_url(u),
        }
    }
}

/// The action's payload: apply these objects there.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeApply {
    /// The API server.
    pub api: KubeApi,
    /// The objects, with the real auth secret (their `Debug` shows names only).
    pub manifests: Manifests,
}

// The objects hold no floating-point fields: equality is total.
impl Eq for KubeApply {}

impl KubeApply {
    /// Applies every object with server-side apply (blocking).
    ///
    /// # Errors
    /// [`K8sError`] for the first object that failed, or a client that cannot be built.
    pub fn run(&self) -> Result<(), K8sError> {
        k8s::block_on(async {
            let client = self.api.client().await?;
            k8s::apply(&client, &self.manifests, Mode::Apply).await
        })?
        .map(|_| ())
    }
}

/// What `turnd` observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurndFacts {
    /// What applying would change, per object.
    pub changes: Vec<Change>,
    /// Whether an API server answered (else every change is [`ChangeKind::Unverified`]).
    pub asked: bool,
}

fn env_auth_secret(env: &dyn EnvSource) -> Option<Sensitive> {
    ["TURND_AUTH_SECRET", "COTURN_AUTH_SECRET"]
        .iter()
        .find_map(|n| env.var(n).filter(|v| !v.is_empty()))
        .map(Sensitive::new)
}

/// The API server and the auth secret: from `settings`, else from `env`.
///
/// # Errors
/// [`PhaseError::NoKubeApi`] or [`PhaseError::NoAuthSecret`].
pub fn inputs(
    settings: &Settings,
    env: &dyn EnvSource,
) -> Result<(KubeApi, Sensitive), PhaseError> {
    let phase = PhaseId::Turnd;
    let api = settings
        .kube_api
        .clone()
        .or_else(|| {
            env.var("KUBECONFIG")
                .filter(|v| !v.is_empty())
                .map(|p| KubeApi::Kubeconfig(PathBuf::from(p)))
        })
        .ok_or(PhaseError::NoKubeApi { phase })?;
    let secret = settings
        .auth_secret
        .clone()
        .or_else(|| env_auth_secret(env))
        .ok_or(PhaseError::NoAuthSecret { phase })?;
    Ok((api, secret))
}

/// Builds the objects and asks the API server what applying them would change.
///
/// # Errors
/// [`PhaseError::NoKubeApi`], [`PhaseError::NoAuthSecret`], or [`PhaseError::K8s`] when the
/// objects cannot be built, the client cannot be made, or the server refuses a dry run.
pub fn gather(
    ctx: &Context<'_>,
    env: &dyn EnvSource,
) -> Result<(KubeApply, TurndFacts), PhaseError> {
    let phase = PhaseId::Turnd;
    let k8s_err = |source| PhaseError::K8s { phase, source };
    let (api, secret) = inputs(ctx.settings, env)?;
    let manifests = Manifests::build(ctx.cluster, &Inputs::for_apply(secret)).map_err(k8s_err)?;
    let (changes, asked) = k8s::block_on(async {
        let client = api.client().await?;
        k8s::plan_or_offline(&client, &manifests).await
    })
    .map_err(k8s_err)?
    .map_err(k8s_err)?;
    Ok((KubeApply { api, manifests }, TurndFacts { changes, asked }))
}

fn kind_word(k: ChangeKind) -> &'static str {
    match k {
        ChangeKind::Create => "create",
        ChangeKind::Update => "update",
        ChangeKind::Unchanged => "unchanged",
        ChangeKind::Unverified => "unverified",
    }
}

/// Plans `turnd`: one server-side apply of every object when any would change.
pub fn plan(apply: KubeApply, facts: &TurndFacts) -> Plan {
    let mut p = Plan::new(PhaseId::Turnd);
    let pending: Vec<String> = facts
        .changes
        .iter()
        .filter(|c| c.kind != ChangeKind::Unchanged)
        .map(|c| format!("{} ({})", c.object, kind_word(c.kind)))
        .collect();
    if pending.is_empty() {
        return p;
    }
    if !facts.asked {
        p.notes.push(format!(
            "the Kubernetes API ({}) did not answer: the objects were not compared with the cluster",
            apply.api
        ));
    }
    p.actions.push(Action {
        target: Target::KubeApi,
        summary: format!("server-side apply {}", pending.join(", ")),
        kind: ActionKind::KubeApply(Box::new(apply)),
    });
    p
}
