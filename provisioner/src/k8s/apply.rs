//! Server-side apply with kube-rs: one field manager ([`FIELD_MANAGER`]) that forces
//! ownership, one `PATCH` (`application/apply-patch+yaml`) per object. Applying the same
//! objects again sends the same bodies and changes nothing on the server. [`plan`] asks the
//! server what an apply would change with a server-side dry run (`dryRun=All`).

use std::fmt::Debug;
use std::future::Future;
use std::path::Path;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{K8sError, Manifests, Object, NAMESPACE};

/// The one field manager of every apply.
pub const FIELD_MANAGER: &str = "turnd-provisioner";

/// Whether [`apply`] persists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Apply for real.
    Apply,
    /// Server-side dry run: the server validates, admits and merges, and stores nothing.
    DryRun,
}

/// The one set of patch parameters: our field manager, `force` (we own every field we send,
/// even one another manager wrote), and a dry run when asked.
pub(crate) fn params(mode: Mode) -> PatchParams {
    let p = PatchParams::apply(FIELD_MANAGER).force();
    match mode {
        Mode::Apply => p,
        Mode::DryRun => p.dry_run(),
    }
}

/// What applying would do to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `Kind/name`.
    pub object: String,
    /// The change.
    pub kind: ChangeKind,
}

/// The kinds of change [`plan`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The object does not exist.
    Create,
    /// It exists and applying changes it.
    Update,
    /// Applying leaves it as it is.
    Unchanged,
    /// No API server answered: not checked (applying sends it; the server decides).
    Unverified,
}

/// A client for the API server at `url` (e.g. `https://10.10.10.10:6443`, or a loopback
/// tunnel), without credentials; tests use it against a fake server over plain HTTP.
///
/// # Errors
/// [`K8sError::Client`] for a bad URL or TLS setup.
pub fn client_for_url(url: &str) -> Result<Client, K8sError> {
    let uri = url
        .parse()
        .map_err(|e| K8sError::Client(format!("`{url}`: {e}")))?;
    Client::try_from(kube::Config::new(uri)).map_err(|e| K8sError::Client(e.to_string()))
}

/// A client from a kubeconfig file (its current context).
///
/// # Errors
/// [`K8sError::Client`] when the file cannot be read or used.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client, K8sError> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| K8sError::Client(format!("{}: {e}", path.display())))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| K8sError::Client(format!("{}: {e}", path.display())))?;
    Client::try_from(config).map_err(|e| K8sError::Client(e.to_string()))
}

/// Runs `f` to completion on a fresh single-threaded runtime, for the synchronous phases.
///
/// # Errors
/// [`K8sError::Runtime`] when the runtime cannot start.
pub fn block_on<F: Future>(f: F) -> Result<F::Output, K8sError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(K8sError::Runtime)?;
    Ok(rt.block_on(f))
}

pub(crate) fn classify(verb: &'static str, object: String, e: kube::Error) -> K8sError {
    match e {
        kube::Error::Api(_) => K8sError::Refused {
            verb,
            object,
            source: Box::new(e),
        },
        other => K8sError::Unreachable {
            source: Box::new(other),
        },
    }
}

/// Applies every object in order with server-side apply; returns the objects as the server
/// answered (for a dry run: as they would be), keyed by `Kind/name`.
///
/// # Errors
/// [`K8sError::Unreachable`] or [`K8sError::Refused`] for the first object that failed; the
/// objects before it were applied.
pub async fn apply(
    client: &Client,
    manifests: &Manifests,
    mode: Mode,
) -> Result<Vec<(String, serde_json::Value)>, K8sError> {
    let mut out = Vec::new();
    for o in manifests.objects() {
        let answer = apply_one(client, o, mode).await?;
        out.push((o.id(), answer));
    }
    Ok(out)
}

async fn apply_one(
    client: &Client,
    o: Object<'_>,
    mode: Mode,
) -> Result<serde_json::Value, K8sError> {
    let c = client.clone();
    match o {
        Object::Namespace(x) => patch(&Api::<Namespace>::all(c), x, o, mode).await,
        Object::ConfigMap(x) => {
            patch(&Api::<ConfigMap>::namespaced(c, NAMESPACE), x, o, mode).await
        }
        Object::Secret(x) => patch(&Api::<Secret>::namespaced(c, NAMESPACE), x, o, mode).await,
        Object::Deployment(x) => {
            patch(&Api::<Deployment>::namespaced(c, NAMESPACE), x, o, mode).await
        }
        Object::PodDisruptionBudget(x) => {
            patch(
                &Api::<PodDisruptionBudget>::namespaced(c, NAMESPACE),
                x,
                o,
                mode,
            )
            .await
        }
    }
}

async fn patch<K>(
    api: &Api<K>,
    obj: &K,
    o: Object<'_>,
    mode: Mode,
) -> Result<serde_json::Value, K8sError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let verb = match mode {
        Mode::Apply => "apply",
        Mode::DryRun => "dry-run apply",
    };
    let answer = api
        .patch(o.name(), &params(mode), &Patch::Apply(obj))
        .await
        .map_err(|e| classify(verb, o.id(), e))?;
    serde_json::to_value(&answer).map_err(|e| K8sError::Client(format!("{}: {e}", o.id())))
}

async fn get(client: &Client, o: Object<'_>) -> Result<Option<serde_json::Value>, K8sError> {
    async fn one<K>(api: Api<K>, o: Object<'_>) -> Result<Option<serde_json::Value>, K8sError>
    where
        K: Resource + Clone + DeserializeOwned + Serialize + Debug,
    {
        let live = api
            .get_opt(o.name())
            .await
            .map_err(|e| classify("get", o.id(), e))?;
        live.map(|k| serde_json::to_value(&k))
            .transpose()
            .map_err(|e| K8sError::Client(format!("{}: {e}", o.id())))
    }
    let c = client.clone();
    match o {
        Object::Namespace(_) => one(Api::<Namespace>::all(c), o).await,
        Object::ConfigMap(_) => one(Api::<ConfigMap>::namespaced(c, NAMESPACE), o).await,
        Object::Secret(_) => one(Api::<Secret>::namespaced(c, NAMESPACE), o).await,
        Object::Deployment(_) => one(Api::<Deployment>::namespaced(c, NAMESPACE), o).await,
        Object::PodDisruptionBudget(_) => {
            one(Api::<PodDisruptionBudget>::namespaced(c, NAMESPACE), o).await
        }
    }
}

/// The object without what the server maintains by itself (bookkeeping and status), so a
/// live object and a dry-run answer compare equal exactly when applying changes nothing.
pub(crate) fn comparable(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = v.as_object_mut() {
        obj.remove("status");
        if let Some(meta) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            for k in [
                "managedFields",
                "resourceVersion",
                "generation",
                "creationTimestamp",
                "uid",
            ] {
                meta.remove(k);
            }
        }
    }
    v
}

/// What applying `manifests` would change, asked of the server: each object is read, then
/// applied with a server-side dry run, and the two compared. Objects in a namespace that does
/// not exist yet are reported as created without a dry run (the server refuses requests into
/// a missing namespace).
///
/// # Errors
/// [`K8sError::Unreachable`] when no API server answers (the caller falls back to an offline
/// plan), [`K8sError::Refused`] when the server rejects an object: the plan would fail.
pub async fn plan(client: &Client, manifests: &Manifests) -> Result<Vec<Change>, K8sError> {
    let mut out = Vec::new();
    let mut namespace_missing = false;
    for o in manifests.objects() {
        let kind = if namespace_missing {
            ChangeKind::Create
        } else {
            let live = get(client, o).await?;
            let after = apply_one(client, o, Mode::DryRun).await?;
            match live {
                None => {
                    if matches!(o, Object::Namespace(_)) {
                        namespace_missing = true;
                    }
                    ChangeKind::Create
                }
                Some(live) if comparable(live.clone()) == comparable(after) => {
                    ChangeKind::Unchanged
                }
                Some(_) => ChangeKind::Update,
            }
        };
        out.push(Change {
            object: o.id(),
            kind,
        });
    }
    Ok(out)
}

/// [`plan`] when an API server answers; otherwise the offline plan, every object
/// [`ChangeKind::Unverified`]. The flag says whether the server was asked.
///
/// # Errors
/// [`K8sError::Refused`]: the server answered and refused an object.
pub async fn plan_or_offline(
    client: &Client,
    manifests: &Manifests,
) -> Result<(Vec<Change>, bool), K8sError> {
    match plan(client, manifests).await {
        Ok(changes) => Ok((changes, true)),
        Err(K8sError::Unreachable { source }) => {
            tracing::info!("Kubernetes API unreachable ({source}): planning offline");
            let changes = manifests
                .objects()
                .iter()
                .map(|o| Change {
                    object: o.id(),
                    kind: ChangeKind::Unverified,
                })
                .collect();
            Ok((changes, false))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_field_manager_forces_and_dry_run_adds_dry_run_all() {
        let p = params(Mode::Apply);
        assert_eq!(p.field_manager.as_deref(), Some(FIELD_MANAGER));
        assert!(p.force);
        assert!(!p.dry_run);
        let d = params(Mode::DryRun);
        assert_eq!(d.field_manager.as_deref(), Some(FIELD_MANAGER));
        assert!(d.force && d.dry_run);
    }

    #[test]
    fn comparison_ignores_server_bookkeeping_only() {
        let live = serde_json::json!({
            "metadata": {"name": "a", "resourceVersion": "7", "generation": 2,
                         "managedFields": [{}], "uid": "u", "creationTimestamp": "t"},
            "data": {"k": "v"},
            "status": {"x": 1},
        });
        let same = serde_json::json!({"metadata": {"name": "a"}, "data": {"k": "v"}});
        let other = serde_json::json!({"metadata": {"name": "a"}, "data": {"k": "w"}});
        assert_eq!(comparable(live.clone()), comparable(same));
        assert_ne!(comparable(live), comparable(other));
    }
}
