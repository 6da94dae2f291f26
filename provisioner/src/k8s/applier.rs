//! Applying turnd's objects: where the API server is ([`KubeApi`]), the server-side apply of
//! every object and the wait for each Deployment's rollout ([`KubeApply`], the payload of
//! [`crate::plan::ActionKind::KubeApply`]). The `turnd` phase builds it; [`crate::plan`] runs
//! it, without knowing any phase.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;

use crate::k8s::{self, K8sError, Manifests, Mode, NAMESPACE};

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

/// The variable naming a kubeconfig.
pub const KUBECONFIG_VAR: &str = "KUBECONFIG";

/// The API server given to this run: `configured` (the command line or the settings), else a
/// non-empty `$KUBECONFIG` from `env`. `None`: the caller reaches the API through the host
/// (the command line's tunnel) or says what is missing. The one place that reads `KUBECONFIG`.
pub fn given_api(
    configured: Option<&KubeApi>,
    env: &dyn crate::secrets::EnvSource,
) -> Option<KubeApi> {
    configured.cloned().or_else(|| {
        env.var(KUBECONFIG_VAR)
            .filter(|v| !v.is_empty())
            .map(|p| KubeApi::Kubeconfig(PathBuf::from(p)))
    })
}

/// How long the phase waits for a rollout by default.
pub const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a rollout is polled.
pub const ROLLOUT_POLL: Duration = Duration::from_secs(1);

/// Why applying the objects failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeApplyError {
    /// The API server refused, or could not be reached.
    #[error(transparent)]
    K8s(#[from] K8sError),
    /// The stored certificate could not be deployed as the TLS Secret.
    #[error("deploying the stored certificate: {0}")]
    Certificate(String),
    /// A Deployment did not finish rolling out in time.
    #[error("Deployment/{deployment} did not finish its rollout within {waited:?}: {state} (see `provisioner kubectl -- -n {NAMESPACE} describe deployment/{deployment}`)")]
    Rollout {
        /// The Deployment.
        deployment: String,
        /// How long we waited.
        waited: Duration,
        /// Its last observed state.
        state: String,
    },
}

/// The action's payload: apply these objects there, then maybe wait for the rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeApply {
    /// The API server.
    pub api: KubeApi,
    /// The objects, with the real auth secret (their `Debug` shows names only).
    pub manifests: Manifests,
    /// Wait this long for every Deployment's rollout; `None`: do not wait.
    pub rollout_timeout: Option<Duration>,
    /// After the objects, deploy the certificate stored in this directory as the TLS Secret
    /// (the one the pods mount), so they can start in the same run.
    pub tls_from_store: Option<PathBuf>,
}

// The objects hold no floating-point fields: equality is total.
impl Eq for KubeApply {}

impl KubeApply {
    /// Applies every object with server-side apply, then waits for the rollouts (blocking).
    ///
    /// # Errors
    /// [`KubeApplyError::K8s`] for the first object that failed or a client that cannot be
    /// built; [`KubeApplyError::Rollout`] for a rollout that did not finish in time.
    pub fn run(&self) -> Result<(), KubeApplyError> {
        k8s::block_on(async {
            let client = self.api.client().await?;
            k8s::apply(&client, &self.manifests, Mode::Apply).await?;
            if let Some(dir) = &self.tls_from_store {
                let deployed = deploy_tls(&client, dir).await?;
                tracing::info!("{deployed}");
            }
            if let Some(timeout) = self.rollout_timeout {
                let api = Api::<Deployment>::namespaced(client, NAMESPACE);
                for d in &self.manifests.deployments {
                    let name = d.metadata.name.as_deref().unwrap_or_default();
                    wait_rollout(&api, name, timeout).await?;
                }
            }
            Ok(())
        })?
    }
}

/// The stored certificate deployed as the TLS Secret the pods mount, on its own (`cert
/// deploy`): the payload of [`crate::plan::ActionKind::DeployTls`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsDeploy {
    /// The API server.
    pub api: KubeApi,
    /// The certificate store.
    pub store: PathBuf,
}

impl TlsDeploy {
    /// Applies the Secret (blocking).
    ///
    /// # Errors
    /// [`KubeApplyError::K8s`] when no client can be made, [`KubeApplyError::Certificate`]
    /// when the store is empty or the server refuses.
    pub fn run(&self) -> Result<crate::acme::Deployed, KubeApplyError> {
        k8s::block_on(async {
            let client = self.api.client().await?;
            deploy_tls(&client, &self.store).await
        })?
    }
}

async fn deploy_tls(
    client: &kube::Client,
    store: &std::path::Path,
) -> Result<crate::acme::Deployed, KubeApplyError> {
    crate::acme::deploy(client, &crate::acme::CertStore::new(store), false)
        .await
        .map_err(|e| KubeApplyError::Certificate(e.to_string()))
}

/// Whether a Deployment's rollout is complete, as `kubectl rollout status` decides; otherwise
/// what is still missing.
pub fn rollout_state(d: &Deployment) -> Result<(), String> {
    let generation = d.metadata.generation.unwrap_or(0);
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(st) = d.status.as_ref() else {
        return Err("no status yet".to_owned());
    };
    if st.observed_generation.unwrap_or(0) < generation {
        return Err("the controller has not seen the new spec yet".to_owned());
    }
    let updated = st.updated_replicas.unwrap_or(0);
    let total = st.replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    if updated < want {
        return Err(format!("{updated} of {want} replicas updated"));
    }
    if total > updated {
        return Err(format!(
            "{} old replica(s) pending termination",
            total - updated
        ));
    }
    if available < updated {
        return Err(format!(
            "{available} of {updated} updated replicas available"
        ));
    }
    Ok(())
}

async fn wait_rollout(
    api: &Api<Deployment>,
    name: &str,
    timeout: Duration,
) -> Result<(), KubeApplyError> {
    let start = Instant::now();
    loop {
        let state = match api.get_opt(name).await {
            Ok(Some(d)) => rollout_state(&d),
            Ok(None) => Err("not found".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        match state {
            Ok(()) => return Ok(()),
            Err(state) if start.elapsed() >= timeout => {
                return Err(KubeApplyError::Rollout {
                    deployment: name.to_owned(),
                    waited: timeout,
                    state,
                })
            }
            Err(_) => tokio::time::sleep(ROLLOUT_POLL).await,
        }
    }
}
