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
//! tell). The TLS Secret is not one of those objects ([`k8s::TlsSource::External`]), so
//! applying them never overwrites a real certificate.
//!
//! Certificates in the bootstrap: while the Secret `turnd-tls` is missing (or the cluster is
//! created in this run), the plan deploys the stored certificate as that Secret right after
//! the objects when it can be reused ([`crate::acme::reusable`]: it names the apex and the
//! wildcard and is not due for renewal), else first orders one by ACME DNS-01
//! ([`ActionKind::IssueCert`], with the DNS API of [`Settings::acme_dns`]). Planning orders
//! nothing; `--dry-run` applies nothing. Once the Secret exists, renewals are the renewal
//! timer's and `cert deploy`'s.
//!
//! Reaching the API server: [`Settings::kube_api`], else `$KUBECONFIG`
//! ([`crate::k8s::applier::given_api`]); without either, the command line forwards a port to
//! the master's API server over SSH through the host and points [`Settings::kube_api`] at it.
//!
//! A locally built image (`container.archive`, see [`crate::image`]): gather asks each
//! worker's containerd (`ctr -n k8s.io images ls`) whether it has the pinned digest — a
//! missing `ctr` is a fact, "not installed", and a VM that `vms` creates in this run is not
//! asked — and the plan imports the archive into every worker that lacks it, before the
//! objects are applied. `provisioner image load` applies just those imports.
//!
//! After applying, the action waits for each Deployment's rollout ([`Settings::rollout_timeout`],
//! polling like `kubectl rollout status`: the controller has seen the new generation, and every
//! replica is updated and available). A rollout cannot finish without the TLS Secret the pods
//! mount, so when the Secret is missing and no certificate can be deployed the plan applies
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
    /// What the plan does about the TLS Secret.
    pub cert: CertPlan,
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

/// What the `turnd` phase does about the TLS Secret the pods mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertPlan {
    /// Nothing: the Secret exists (or no certificate settings were given).
    Leave,
    /// Deploy the stored certificate, which can be reused.
    Reuse {
        /// The store.
        store: PathBuf,
        /// The certificate.
        cert: crate::acme::CertInfo,
    },
    /// Order a certificate, then deploy it.
    Issue(Box<crate::acme::Issuer>),
    /// The Secret is missing and no certificate can be deployed: why.
    Missing(String),
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
    let api = k8s::applier::given_api(settings.kube_api.as_ref(), env)
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
            cert: cert_plan(ctx.settings, true),
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
            cert: cert_plan(ctx.settings, tls_secret == Some(false)),
            image,
        },
    ))
}

/// What to do about the TLS Secret: nothing unless it is `missing`; then reuse the stored
/// certificate, or issue one when a DNS API is configured. Reads only the local store.
fn cert_plan(settings: &Settings, missing: bool) -> CertPlan {
    let Some(acme) = settings.acme.as_ref().filter(|_| missing) else {
        return CertPlan::Leave;
    };
    if let Some(cert) = crate::acme::reusable(acme, std::time::SystemTime::now()) {
        return CertPlan::Reuse {
            store: acme.store.dir().to_owned(),
            cert,
        };
    }
    match &settings.acme_dns {
        Some(dns) => CertPlan::Issue(Box::new(crate::acme::Issuer {
            settings: acme.clone(),
            dns: dns.clone(),
        })),
        None => CertPlan::Missing(format!(
            "no reusable certificate in {} and no DNS API (CF_Token, CF_Zone_ID) to issue one",
            acme.store.dir().display()
        )),
    }
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
/// `rollout_timeout` for the rollouts unless the TLS Secret is known to stay missing; while it
/// is missing, an ACME order first when no stored certificate can be reused, and the
/// certificate deployed with the objects. Workers that lack a locally built image import it
/// first.
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
    let missing = |why: &str| {
        format!(
            "Secret {NAMESPACE}/{TLS_SECRET_NAME} does not exist{why}: the pods cannot start until `provisioner cert issue` and `cert deploy`"
        )
    };
    match &facts.cert {
        CertPlan::Leave if pending.is_empty() => return p,
        CertPlan::Missing(why) if pending.is_empty() => {
            p.notes.push(missing(&format!(" and {why}")));
            return p;
        }
        _ => {}
    }
    if !facts.asked {
        p.notes.push(format!(
            "the Kubernetes API ({}) did not answer: the objects were not compared with the cluster",
            apply.api
        ));
    }
    apply.rollout_timeout = rollout_timeout;
    let cert = match &facts.cert {
        CertPlan::Reuse { store, cert } => {
            apply.tls_from_store = Some(store.clone());
            format!(
                ", deploy TLS Secret {NAMESPACE}/{TLS_SECRET_NAME} (reuse certificate for {}, expires {})",
                cert.names.join(", "),
                cert.not_after_text
            )
        }
        CertPlan::Issue(issuer) => {
            apply.tls_from_store = Some(issuer.settings.store.dir().to_owned());
            p.actions.push(Action {
                target: Target::Local,
                summary: issuer.summary(),
                kind: ActionKind::IssueCert(issuer.clone()),
            });
            format!(
                ", deploy TLS Secret {NAMESPACE}/{TLS_SECRET_NAME} (the certificate issued above)"
            )
        }
        CertPlan::Missing(why) => {
            apply.rollout_timeout = None;
            p.notes.push(format!(
                "{}; not waiting for the rollout",
                missing(&format!(" and {why}"))
            ));
            String::new()
        }
        CertPlan::Leave => {
            if facts.tls_secret == Some(false) {
                apply.rollout_timeout = None;
                p.notes
                    .push(format!("{}; not waiting for the rollout", missing("")));
            }
            String::new()
        }
    };
    let wait = match apply.rollout_timeout {
        Some(t) => format!(", then wait up to {}s for the rollout", t.as_secs()),
        None => String::new(),
    };
    let objects = if pending.is_empty() {
        "every object (unchanged)".to_owned()
    } else {
        pending.join(", ")
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
