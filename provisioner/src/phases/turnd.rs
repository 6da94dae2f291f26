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
//! A locally built image (`container.archive`, see [`crate::image`]): gather asks each
//! worker's containerd (`ctr -n k8s.io images ls`) whether it has the pinned digest — a
//! missing `ctr` is a fact, "not installed", and a VM that `vms` creates in this run is not
//! asked — and the plan imports the archive into every worker that lacks it, before the
//! objects are applied. `provisioner image load` applies just those imports.
//!
//! After applying, the action waits for each Deployment's rollout ([`Settings::rollout_timeout`],
//! polling like `kubectl rollout status`: the controller has seen the new generation, and every
//! replica is updated and available). A rollout cannot finish before `cert deploy` has created
//! the TLS Secret the pods mount, so when gather finds no Secret `turnd-tls` the plan applies
//! without waiting and says so in a note.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::{Context, PhaseError, Settings};
use crate::image::{LocalImage, NodeImage};
use crate::k8s::{
    self, Change, ChangeKind, Inputs, K8sError, Manifests, Sensitive, NAMESPACE, TLS_SECRET_NAME,
};
use crate::plan::{Action, ActionKind, PhaseId, Plan, Target};
use crate::secrets::EnvSource;

pub use crate::k8s::applier::{
    rollout_state, KubeApi, KubeApply, KubeApplyError, ROLLOUT_POLL, ROLLOUT_TIMEOUT,
};

/// What `turnd` observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurndFacts {
    /// What applying would change, per object.
    pub changes: Vec<Change>,
    /// Whether an API server answered (else every change is [`ChangeKind::Unverified`]).
    pub asked: bool,
    /// Whether the TLS Secret the pods mount exists (`None`: the server was not asked).
    pub tls_secret: Option<bool>,
    /// The certificate store, when it holds a certificate ([`Settings::cert_store`]).
    pub stored_cert: Option<PathBuf>,
    /// The locally built image and whether each worker has it (`None`: a registry image).
    pub image: Option<ImageFacts>,
}

/// Whether each worker's containerd has the locally built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    /// The image and its archive.
    pub image: LocalImage,
    /// Each worker, in inventory order, and what its containerd has.
    pub workers: Vec<(String, NodeImage)>,
}

/// Asks each worker's containerd for the inventory's locally built image, after checking that
/// the archive holds it; `None` when the image comes from a registry.
///
/// # Errors
/// [`PhaseError::Image`] (archive missing or holding another image), [`PhaseError::Transport`],
/// or [`PhaseError::Gather`] when `ctr` fails for another reason than not being installed.
pub fn gather_image(ctx: &Context<'_>) -> Result<Option<ImageFacts>, PhaseError> {
    let phase = PhaseId::Turnd;
    let Some(image) = LocalImage::of(ctx.cluster) else {
        return Ok(None);
    };
    image
        .check_archive()
        .map_err(|source| PhaseError::Image { phase, source })?;
    let mut workers = Vec::new();
    for w in ctx.cluster.workers() {
        let name = w.name.to_string();
        let state = if ctx.settings.ahead.vms.contains(&name) {
            NodeImage::NewVm
        } else {
            let t = ctx
                .transports
                .get(&Target::Vm(name.clone()))
                .map_err(|source| PhaseError::Transport { phase, source })?;
            crate::image::node_image(t, &image.image)
                .map_err(|source| PhaseError::Gather { phase, source })?
        };
        workers.push((name, state));
    }
    Ok(Some(ImageFacts { image, workers }))
}

/// Appends an import of the image to `p` for every worker that lacks it.
pub fn plan_image(facts: &ImageFacts, p: &mut Plan) {
    for (worker, state) in &facts.workers {
        let why = match state {
            NodeImage::Present => continue,
            NodeImage::Missing => "missing",
            NodeImage::NotInstalled => "containerd not installed yet",
            NodeImage::NewVm => "new VM",
        };
        p.actions.push(Action {
            target: Target::Vm(worker.clone()),
            summary: format!(
                "import image {} from {} ({why})",
                facts.image.image,
                facts.image.archive.display()
            ),
            kind: ActionKind::ImportImage(Box::new(facts.image.clone())),
        });
    }
}

fn env_auth_secret(env: &dyn EnvSource) -> Option<Sensitive> {
    ["TURND_AUTH_SECRET", "COTURN_AUTH_SECRET"]
        .iter()
        .find_map(|n| env.var(n).filter(|v| !v.is_empty()))
        .inspect(|v| crate::exec::redact::remember(v))
        .map(Sensitive::new)
}

/// The passwords of the static users given by `password_env`: from `settings` (the `.env`),
/// else from `env`. A missing one is reported when the objects are built.
pub fn user_passwords(
    c: &crate::inventory::Cluster,
    settings: &Settings,
    env: &dyn EnvSource,
) -> std::collections::BTreeMap<String, Sensitive> {
    c.auth
        .users
        .iter()
        .filter_map(|u| {
            let var = u.password_env.as_deref()?;
            let pw = settings.user_passwords.get(&u.name).cloned().or_else(|| {
                env.var(var)
                    .filter(|v| !v.is_empty())
                    .inspect(|v| crate::exec::redact::remember(v))
                    .map(Sensitive::new)
            })?;
            Some((u.name.clone(), pw))
        })
        .collect()
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
        // The cluster does not exist yet (planned by an earlier phase of this run): nothing is
        // asked; applying plans again once it exists and the tunnel can open.
        .or_else(|| {
            settings
                .ahead
                .cluster
                .then(|| KubeApi::Url("the cluster's API (not created yet)".to_owned()))
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
    let image = gather_image(ctx)?;
    let inputs = Inputs {
        user_passwords: Some(user_passwords(ctx.cluster, ctx.settings, env)),
        ..Inputs::for_apply(secret)
    };
    let manifests = Manifests::build(ctx.cluster, &inputs).map_err(k8s_err)?;
    if ctx.settings.ahead.cluster {
        // `k8s-master` creates the cluster earlier in this run: every object is new.
        let changes = manifests
            .objects()
            .iter()
            .map(|o| Change {
                object: o.id(),
                kind: ChangeKind::Create,
            })
            .collect();
        let apply = KubeApply {
            api,
            manifests,
            rollout_timeout: None,
            tls_from_store: None,
        };
        let facts = TurndFacts {
            changes,
            asked: true,
            tls_secret: None,
            stored_cert: stored_cert(ctx.settings),
            image,
        };
        return Ok((apply, facts));
    }
    let (changes, asked, tls_secret) = k8s::block_on(async {
        let client = api.client().await?;
        let (changes, asked) = k8s::plan_or_offline(&client, &manifests).await?;
        let tls = if asked {
            let secrets = Api::<Secret>::namespaced(client, NAMESPACE);
            let found = secrets
                .get_opt(TLS_SECRET_NAME)
                .await
                .map_err(|e| match e {
                    kube::Error::Api(_) => K8sError::Refused {
                        verb: "get",
                        object: format!("Secret/{TLS_SECRET_NAME}"),
                        source: Box::new(e),
                    },
                    other => K8sError::Unreachable {
                        source: Box::new(other),
                    },
                })?;
            Some(found.is_some())
        } else {
            None
        };
        Ok::<_, K8sError>((changes, asked, tls))
    })
    .map_err(k8s_err)?
    .map_err(k8s_err)?;
    let apply = KubeApply {
        api,
        manifests,
        rollout_timeout: None,
        tls_from_store: None,
    };
    Ok((
        apply,
        TurndFacts {
            changes,
            asked,
            tls_secret,
            stored_cert: stored_cert(ctx.settings),
            image,
        },
    ))
}

/// The certificate store of [`Settings::cert_store`], when it holds a certificate.
fn stored_cert(settings: &Settings) -> Option<PathBuf> {
    let dir = settings.cert_store.as_ref()?;
    crate::acme::CertStore::new(dir)
        .load()
        .ok()
        .flatten()
        .map(|_| dir.clone())
}

fn kind_word(k: ChangeKind) -> &'static str {
    match k {
        ChangeKind::Create => "create",
        ChangeKind::Update => "update",
        ChangeKind::Unchanged => "unchanged",
        ChangeKind::Unverified => "unverified",
    }
}

/// Plans `turnd`: one server-side apply of every object when any would change, waiting up to
/// `rollout_timeout` for the rollouts unless the TLS Secret is known to be missing.
/// Workers that lack a locally built image import it first.
pub fn plan(mut apply: KubeApply, facts: &TurndFacts, rollout_timeout: Option<Duration>) -> Plan {
    let mut p = Plan::new(PhaseId::Turnd);
    if let Some(image) = &facts.image {
        plan_image(image, &mut p);
    }
    let pending: Vec<String> = facts
        .changes
        .iter()
        .filter(|c| c.kind != ChangeKind::Unchanged)
        .map(|c| format!("{} ({})", c.object, kind_word(c.kind)))
        .collect();
    // The Secret is missing (or the cluster is new) and a certificate is stored: deploy it
    // right after the objects, so the pods start in this run.
    let deploy_cert = facts.tls_secret != Some(true) && facts.stored_cert.is_some();
    if pending.is_empty() && !deploy_cert {
        return p;
    }
    if !facts.asked {
        p.notes.push(format!(
            "the Kubernetes API ({}) did not answer: the objects were not compared with the cluster",
            apply.api
        ));
    }
    apply.rollout_timeout = rollout_timeout;
    if deploy_cert {
        apply.tls_from_store.clone_from(&facts.stored_cert);
    } else if facts.tls_secret == Some(false) {
        apply.rollout_timeout = None;
        p.notes.push(format!(
            "Secret {NAMESPACE}/{TLS_SECRET_NAME} does not exist: the pods cannot start until `provisioner cert deploy`; not waiting for the rollout"
        ));
    }
    let wait = match apply.rollout_timeout {
        Some(t) => format!(", then wait up to {}s for the rollout", t.as_secs()),
        None => String::new(),
    };
    let objects = if pending.is_empty() {
        "every object (unchanged)".to_owned()
    } else {
        pending.join(", ")
    };
    let cert = if deploy_cert {
        format!(", deploy the stored certificate as Secret {NAMESPACE}/{TLS_SECRET_NAME}")
    } else {
        String::new()
    };
    p.actions.push(Action {
        target: Target::KubeApi,
        summary: format!("server-side apply {objects}{cert}{wait}"),
        kind: ActionKind::KubeApply(Box::new(apply)),
    });
    p
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn deployment(generation: i64, status: Option<DeploymentStatus>) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                ..DeploymentSpec::default()
            }),
            status,
        }
    }

    fn status(observed: i64, replicas: i32, updated: i32, available: i32) -> DeploymentStatus {
        DeploymentStatus {
            observed_generation: Some(observed),
            replicas: Some(replicas),
            updated_replicas: Some(updated),
            available_replicas: Some(available),
            ..DeploymentStatus::default()
        }
    }

    #[test]
    fn rollout_is_complete_only_like_kubectl_rollout_status_says() {
        assert_eq!(
            rollout_state(&deployment(2, None)),
            Err("no status yet".into())
        );
        assert_eq!(
            rollout_state(&deployment(2, Some(status(1, 1, 1, 1)))),
            Err("the controller has not seen the new spec yet".into())
        );
        assert_eq!(
            rollout_state(&deployment(2, Some(status(2, 1, 0, 1)))),
            Err("0 of 1 replicas updated".into())
        );
        // Recreate: the old pod still terminating.
        assert_eq!(
            rollout_state(&deployment(2, Some(status(2, 2, 1, 0)))),
            Err("1 old replica(s) pending termination".into())
        );
        assert_eq!(
            rollout_state(&deployment(2, Some(status(2, 1, 1, 0)))),
            Err("0 of 1 updated replicas available".into())
        );
        assert_eq!(
            rollout_state(&deployment(2, Some(status(2, 1, 1, 1)))),
            Ok(())
        );
    }
}
