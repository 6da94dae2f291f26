//! turnd's Kubernetes objects: built as typed `k8s-openapi` structs (API version 1.29, the
//! cluster's) from the inventory, rendered to YAML for review (`deploy/k8s/`), and applied with
//! kube-rs server-side apply ([`apply`]).
//!
//! The objects, all in namespace [`NAMESPACE`]:
//! - the Namespace;
//! - ConfigMap [`CONFIG_MAP_NAME`] with one key `<vm>.toml` per inventory `[[turnd]]` instance;
//! - Secret [`AUTH_SECRET_NAME`] (keys [`AUTH_SECRET_KEY`] and [`ADMIN_TOKEN_KEY`]): the REST-API
//!   shared secret and the admin API's token, mounted as files (`TURND_AUTH_SECRET_FILE`,
//!   `TURND_ADMIN_TOKEN_FILE`) so that a rotation reaches running pods by reload. Its value is a parameter ([`Inputs`]), never the inventory;
//! - Secret [`TLS_SECRET_NAME`] of type `kubernetes.io/tls`, mounted as a directory (no
//!   `subPath`) so turnd's certificate reload sees the kubelet's updates;
//! - one Deployment `turnd-<vm>` per instance, pinned to its worker with `nodeSelector`,
//!   `hostNetwork: true`, `Recreate` rollouts (the old pod releases the node's ports before the
//!   new one binds them) and declared host ports (so the scheduler never places two on a node);
//! - one PodDisruptionBudget over all instances: a drain takes down at most one relay at a time.
//!
//! Why one Deployment per instance rather than a DaemonSet: every instance has its own public
//! IP, relay range and configuration key, and the inventory names its node; a Deployment per
//! instance maps that 1:1, rolls one node's relay at a time when only its configuration changes,
//! and never starts a pod on a labelled node that has no configuration.
//!
//! What it leaves out: issuing the certificate (ACME), the host's DNAT rules, and a container
//! registry: the image reference is a parameter with a default ([`DEFAULT_IMAGE`]).

pub mod applier;
mod apply;
mod config;
mod dynamic;
mod objects;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde::Serialize;

pub use apply::{
    apply, block_on, client_for_url, client_from_kubeconfig, plan, plan_or_offline, Change,
    ChangeKind, Mode, FIELD_MANAGER,
};
pub use dynamic::{object_id, ObjectSet};

use crate::inventory::Cluster;
use crate::render::Rendered;

/// The namespace every object lives in.
pub const NAMESPACE: &str = "turnd";
/// The ConfigMap holding one `<vm>.toml` per instance.
pub const CONFIG_MAP_NAME: &str = "turnd-config";
/// The Secret holding the REST-API shared secret.
pub const AUTH_SECRET_NAME: &str = "turnd-auth";
/// Its key.
pub const AUTH_SECRET_KEY: &str = "auth-secret";
/// The `kubernetes.io/tls` Secret with the certificate turnd serves.
pub const TLS_SECRET_NAME: &str = "turnd-tls";
/// The PodDisruptionBudget.
pub const PDB_NAME: &str = "turnd";
/// The numeric user and group turnd runs as (the image's `USER`).
pub const RUN_AS: i64 = 65532;
/// The image when the caller names none (the inventory has no image key yet).
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/turnd/turnd:", env!("CARGO_PKG_VERSION"));
/// STUN/TURN over UDP and TCP.
pub const PORT_PLAIN: u16 = 3478;
/// TURN over TLS: the standard port, and 443 for clients behind firewalls.
pub const PORTS_TLS: [u16; 2] = [5349, 443];
/// turnd's admin listener on the worker's address: `/metrics` (Prometheus scrapes it),
/// `/live` and `/ready` (the kubelet probes them). Not forwarded by the host: reachable from
/// the VM network and the pods only.
pub const PORT_ADMIN: u16 = 9641;
/// Its container port's name (the monitoring phase's PodMonitor scrapes it by name).
pub const PORT_ADMIN_NAME: &str = "admin";

/// Where the pod mounts its files.
pub mod mounts {
    /// The directory of `turnd.toml` (a ConfigMap volume with one item).
    pub const CONFIG_DIR: &str = "/etc/turnd/config";
    /// The configuration file turnd is started with.
    pub const CONFIG_FILE: &str = "/etc/turnd/config/turnd.toml";
    /// The TLS Secret, mounted whole as a directory (`tls.crt`, `tls.key`).
    pub const TLS_DIR: &str = "/etc/turnd/tls";
    /// The auth Secret, mounted whole as a directory (the REST-API secret and the admin
    /// token): a rotated Secret reaches the running turnd by reload (it watches the files
    /// named by `TURND_AUTH_SECRET_FILE` and `TURND_ADMIN_TOKEN_FILE`), never by restart.
    pub const AUTH_DIR: &str = "/etc/turnd/auth";
}

/// Key of the admin API's bearer token in the auth Secret.
pub const ADMIN_TOKEN_KEY: &str = "admin-token";

/// How long a turnd pod drains after SIGTERM (`[drain] timeout`): its allocations keep
/// relaying while new ones go to the sibling instance.
pub const DRAIN_TIMEOUT_SECONDS: u64 = 120;

/// Why the objects could not be built, rendered or applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sError {
    /// A static user's password variable is not set.
    #[error("auth user `{user}`: its password variable {var} is not set (environment or .env)")]
    MissingUserPassword {
        /// The user.
        user: String,
        /// The variable named by `password_env`.
        var: String,
    },
    /// The inventory names a VM for a turnd instance that it does not list (a validated
    /// inventory never does).
    #[error("turnd instance on `{vm}`: no such VM in the inventory")]
    UnknownVm {
        /// The VM name.
        vm: String,
    },
    /// Two instances share a worker: with host networking they would bind the same ports.
    #[error("turnd[{second}] runs on `{vm}` like turnd[{first}]: one instance per worker (both would bind {vm}'s ports 3478, 5349 and 443)")]
    SharedWorker {
        /// The VM.
        vm: String,
        /// The first instance on it.
        first: usize,
        /// The second one.
        second: usize,
    },
    /// There is no instance with this index.
    #[error("there is no turnd[{index}] in the inventory")]
    NoInstance {
        /// The index asked for.
        index: usize,
    },
    /// A generated `turnd.toml` could not be serialised (a bug).
    #[error("cannot serialise turnd.toml for `{vm}`: {message}")]
    Toml {
        /// The VM.
        vm: String,
        /// What the serialiser said.
        message: String,
    },
    /// An object could not be serialised to YAML (a bug).
    #[error("cannot serialise {object} to YAML: {source}")]
    Yaml {
        /// `Kind/name`.
        object: String,
        /// The serialiser's error.
        source: serde_norway::Error,
    },
    /// A rendered file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The API server could not be reached, or did not answer like one. `plan` falls back to
    /// an offline plan on this error.
    #[error("Kubernetes API unreachable: {source}")]
    Unreachable {
        /// kube-rs's error.
        source: Box<kube::Error>,
    },
    /// The API server refused a request (validation, admission, authorisation ...).
    #[error("{verb} {object}: the API server refused: {source}")]
    Refused {
        /// `get`, `apply` or `dry-run apply`.
        verb: &'static str,
        /// `Kind/name`.
        object: String,
        /// kube-rs's error with the server's status.
        source: Box<kube::Error>,
    },
    /// A client configuration could not be built (bad URL, TLS setup).
    #[error("cannot build a Kubernetes client: {0}")]
    Client(String),
    /// The async runtime for the blocking helpers could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// A sensitive value: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive(String);

impl Sensitive {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sensitive(***)")
    }
}

impl From<&crate::secrets::Secret> for Sensitive {
    fn from(s: &crate::secrets::Secret) -> Self {
        Self::new(s.expose())
    }
}

/// Where the auth secret's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthSecret {
    /// The real value (from `TURND_AUTH_SECRET` in the environment or `.env`).
    Value(Sensitive),
    /// [`PLACEHOLDER_AUTH_SECRET`]: for files rendered for review, never for applying.
    Placeholder,
}

/// What goes into the TLS Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// A certificate chain and its key, PEM.
    Pem {
        /// `tls.crt`.
        cert: String,
        /// `tls.key`.
        key: Sensitive,
    },
    /// Placeholder PEM text, for files rendered for review.
    Placeholder,
    /// The Secret is written by someone else (the ACME phase): it is left out of the objects,
    /// so applying never overwrites a real certificate.
    External,
}

/// Placeholder value of the admin token in rendered files.
pub const PLACEHOLDER_ADMIN_TOKEN: &str =
    "PLACEHOLDER: derived from TURND_AUTH_SECRET at apply time";
/// Appended to the file name of a rendered placeholder Secret
/// (`02-secret-turnd-auth.yaml.placeholder`).
pub const PLACEHOLDER_SUFFIX: &str = ".placeholder";
/// Placeholder value of the auth secret in rendered files.
pub const PLACEHOLDER_AUTH_SECRET: &str = "PLACEHOLDER: set from TURND_AUTH_SECRET at apply time";
/// Placeholder `tls.crt` in rendered files.
pub const PLACEHOLDER_CERT: &str =
    "-----BEGIN CERTIFICATE-----\nPLACEHOLDER: the certificate issued by ACME\n-----END CERTIFICATE-----\n";
/// Placeholder `tls.key` in rendered files.
pub const PLACEHOLDER_KEY: &str =
    "-----BEGIN PRIVATE KEY-----\nPLACEHOLDER: the key issued with the certificate\n-----END PRIVATE KEY-----\n";

/// What the objects need besides the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// The container image.
    pub image: String,
    /// The REST-API secret.
    pub auth_secret: AuthSecret,
    /// The certificate.
    pub tls: TlsSource,
    /// The passwords of the `auth.users` given by `password_env`, by user name (their keys go
    /// into `turnd.toml`, never the passwords); `None` when rendering for review (a
    /// placeholder key is written).
    pub user_passwords: Option<BTreeMap<String, Sensitive>>,
}

impl Inputs {
    /// Inputs for files rendered for review: the default image and placeholders for every
    /// secret.
    pub fn for_review() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            auth_secret: AuthSecret::Placeholder,
            tls: TlsSource::Placeholder,
            user_passwords: None,
        }
    }

    /// Inputs for applying: the real auth secret; the TLS Secret is left to the ACME phase.
    pub fn for_apply(auth_secret: Sensitive) -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            auth_secret: AuthSecret::Value(auth_secret),
            tls: TlsSource::External,
            user_passwords: Some(BTreeMap::new()),
        }
    }
}

/// Every object, typed.
#[derive(Clone, PartialEq)]
pub struct Manifests {
    /// The namespace.
    pub namespace: Namespace,
    /// The ConfigMap of `turnd.toml` files.
    pub config: ConfigMap,
    /// The auth Secret.
    pub auth_secret: Secret,
    /// The TLS Secret, unless [`TlsSource::External`].
    pub tls_secret: Option<Secret>,
    /// One Deployment per instance, in inventory order.
    pub deployments: Vec<Deployment>,
    /// The PodDisruptionBudget.
    pub pdb: PodDisruptionBudget,
}

impl fmt::Debug for Manifests {
    // Names only: the Secrets' data must never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.objects().iter().map(Object::id))
            .finish()
    }
}

/// One object, for iterating over all of them in apply order.
#[derive(Clone, Copy)]
pub enum Object<'a> {
    /// A Namespace.
    Namespace(&'a Namespace),
    /// A ConfigMap.
    ConfigMap(&'a ConfigMap),
    /// A Secret.
    Secret(&'a Secret),
    /// A Deployment.
    Deployment(&'a Deployment),
    /// A PodDisruptionBudget.
    PodDisruptionBudget(&'a PodDisruptionBudget),
}

impl Object<'_> {
    /// The kind, e.g. `Deployment`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Namespace(_) => "Namespace",
            Self::ConfigMap(_) => "ConfigMap",
            Self::Secret(_) => "Secret",
            Self::Deployment(_) => "Deployment",
            Self::PodDisruptionBudget(_) => "PodDisruptionBudget",
        }
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        let meta = match self {
            Self::Namespace(o) => &o.metadata,
            Self::ConfigMap(o) => &o.metadata,
            Self::Secret(o) => &o.metadata,
            Self::Deployment(o) => &o.metadata,
            Self::PodDisruptionBudget(o) => &o.metadata,
        };
        meta.name.as_deref().unwrap_or_default()
    }

    /// `Kind/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind(), self.name())
    }

    /// The object as YAML.
    pub fn to_yaml(&self) -> Result<String, K8sError> {
        fn yaml<T: Serialize>(o: &T, id: String) -> Result<String, K8sError> {
            serde_norway::to_string(o).map_err(|source| K8sError::Yaml { object: id, source })
        }
        match self {
            Self::Namespace(o) => yaml(o, self.id()),
            Self::ConfigMap(o) => yaml(o, self.id()),
            Self::Secret(o) => yaml(o, self.id()),
            Self::Deployment(o) => yaml(o, self.id()),
            Self::PodDisruptionBudget(o) => yaml(o, self.id()),
        }
    }
}

impl Manifests {
    /// Builds every object from a validated inventory.
    ///
    /// # Errors
    /// [`K8sError::SharedWorker`] when two instances name the same VM (host networking gives
    /// them the same ports), [`K8sError::UnknownVm`] for a VM the inventory lacks.
    pub fn build(cluster: &Cluster, inputs: &Inputs) -> Result<Self, K8sError> {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, t) in cluster.turnd.iter().enumerate() {
            if let Some(first) = seen.insert(t.vm.as_str(), i) {
                return Err(K8sError::SharedWorker {
                    vm: t.vm.to_string(),
                    first,
                    second: i,
                });
            }
        }
        let configs = (0..cluster.turnd.len())
            .map(|i| config::turnd_toml(cluster, i, inputs.user_passwords.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let deployments = cluster
            .turnd
            .iter()
            .zip(&configs)
            .map(|(t, toml)| {
                // The inventory's image wins over the release default.
                let (image, pull) = cluster.container.as_ref().map_or(
                    (
                        inputs.image.as_str(),
                        crate::inventory::PullPolicy::IfNotPresent,
                    ),
                    |c| (c.image.as_str(), c.pull),
                );
                objects::deployment(cluster, t, toml, image, pull)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            namespace: objects::namespace(),
            config: objects::config_map(cluster, &configs),
            auth_secret: objects::auth_secret(&inputs.auth_secret),
            tls_secret: objects::tls_secret(&inputs.tls),
            deployments,
            pdb: objects::pdb(),
        })
    }

    /// Every object in apply order: the namespace, configuration and secrets before the
    /// Deployments that use them, the budget last.
    pub fn objects(&self) -> Vec<Object<'_>> {
        let mut out = vec![
            Object::Namespace(&self.namespace),
            Object::ConfigMap(&self.config),
            Object::Secret(&self.auth_secret),
        ];
        out.extend(self.tls_secret.as_ref().map(Object::Secret));
        out.extend(self.deployments.iter().map(Object::Deployment));
        out.push(Object::PodDisruptionBudget(&self.pdb));
        out
    }

    /// The files `render` writes under `k8s/` (and the repository keeps in `deploy/k8s/`): one
    /// per object, numbered in apply order so `kubectl apply -f DIR` works too.
    ///
    /// # Errors
    /// [`K8sError::Yaml`] (a bug).
    pub fn rendered(&self, inputs: &Inputs) -> Result<Vec<Rendered>, K8sError> {
        let placeholders = matches!(inputs.auth_secret, AuthSecret::Placeholder)
            || matches!(inputs.tls, TlsSource::Placeholder);
        let mut out = Vec::new();
        for (i, o) in self.objects().iter().enumerate() {
            let mut contents = format!(
                "# {id}: generated by the provisioner from the inventory; do not edit.\n",
                id = o.id()
            );
            if placeholders && matches!(o, Object::Secret(_)) {
                contents.push_str(
                    "# PLACEHOLDER data, for review only: `provisioner apply` takes the auth secret\n\
                     # from TURND_AUTH_SECRET (environment or .env) and the certificate from ACME.\n",
                );
            }
            contents.push_str(&o.to_yaml()?);
            // A placeholder Secret is not a `.yaml` file, so `kubectl apply -f DIR` (which
            // reads only .yaml, .yml and .json) never applies it by accident.
            let placeholder = placeholders && matches!(o, Object::Secret(_));
            out.push(Rendered {
                path: format!(
                    "{i:02}-{kind}-{name}.yaml{suffix}",
                    kind = o.kind().to_ascii_lowercase(),
                    name = o.name(),
                    suffix = if placeholder { PLACEHOLDER_SUFFIX } else { "" }
                ),
                contents,
            });
        }
        Ok(out)
    }
}

/// The `turnd.toml` of instance `index` (as stored in the ConfigMap under `<vm>.toml`).
///
/// # Errors
/// [`K8sError::NoInstance`] or [`K8sError::UnknownVm`].
pub fn turnd_toml(cluster: &Cluster, index: usize) -> Result<String, K8sError> {
    config::turnd_toml(cluster, index, None)
}

/// The `turnd.toml` of instance `index` with the static users' passwords from `passwords`
/// (user name → password) turned into their keys.
///
/// # Errors
/// As [`turnd_toml`], and [`K8sError::MissingUserPassword`].
pub fn turnd_toml_with_passwords(
    cluster: &Cluster,
    index: usize,
    passwords: &BTreeMap<String, Sensitive>,
) -> Result<String, K8sError> {
    config::turnd_toml(cluster, index, Some(passwords))
}

/// Builds the objects and writes one YAML file per object into `out_dir` (created if needed);
/// returns the paths written. For `provisioner render --out DIR`, call it with
/// `DIR/k8s` and [`Inputs::for_review`].
///
/// # Errors
/// See [`Manifests::build`]; [`K8sError::Write`] when a file cannot be written.
pub fn render_manifests(
    cluster: &Cluster,
    inputs: &Inputs,
    out_dir: &Path,
) -> Result<Vec<PathBuf>, K8sError> {
    let files = Manifests::build(cluster, inputs)?.rendered(inputs)?;
    std::fs::create_dir_all(out_dir).map_err(|source| K8sError::Write {
        path: out_dir.to_owned(),
        source,
    })?;
    let mut written = Vec::new();
    for f in files {
        let path = out_dir.join(&f.path);
        std::fs::write(&path, &f.contents).map_err(|source| K8sError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use turnd::config::{Config, MapEnv};

    use super::*;
    use crate::inventory::Inventory;

    fn example() -> Cluster {
        Inventory::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/cluster.example.toml"
        )))
        .expect("example inventory is valid")
    }

    fn pod(d: &Deployment) -> &k8s_openapi::api::core::v1::PodSpec {
        d.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
    }

    #[test]
    fn every_generated_turnd_toml_passes_turnds_own_validation() {
        let c = example();
        let env: MapEnv = [("TURND_AUTH_SECRET", "s3cret")].into_iter().collect();
        for (i, t) in c.turnd.iter().enumerate() {
            let text = turnd_toml(&c, i).expect("renders");
            let settings = Config::from_toml(&text)
                .and_then(|cfg| cfg.validate(&env))
                .unwrap_or_else(|e| panic!("turnd refuses the config of {}: {e}\n{text}", t.vm));
            let ip = c.vm(t.vm.as_str()).expect("vm").ip;
            let at = |port: u16| std::net::SocketAddr::from((ip, port));
            assert_eq!(settings.listeners.udp, vec![at(3478)]);
            assert_eq!(settings.listeners.tcp, vec![at(3478)]);
            assert_eq!(settings.listeners.tls, vec![at(5349), at(443)]);
            assert_eq!(settings.relay.addresses, vec![std::net::IpAddr::V4(ip)]);
            assert_eq!(settings.relay.ports, t.relay_port_min..=t.relay_port_max);
            assert_eq!(settings.relay.external_ips.len(), 1);
            assert_eq!(
                settings.relay.external_ips[0].public,
                std::net::IpAddr::V4(t.public_ip)
            );
            assert_eq!(
                settings.relay.external_ips[0].private,
                Some(std::net::IpAddr::V4(ip))
            );
            let tls = settings.tls.expect("tls on");
            assert_eq!(tls.cert, Path::new("/etc/turnd/tls/tls.crt"));
            assert_eq!(tls.key, Path::new("/etc/turnd/tls/tls.key"));
            assert_eq!(settings.auth.realm, c.domain.turn);
            assert_eq!(
                settings.auth.secrets.len(),
                1,
                "the secret from the env only"
            );
            assert!(!settings.auth.generated_secret);
        }
    }

    #[test]
    fn one_deployment_per_instance_pinned_to_its_worker_on_host_network() {
        let c = example();
        let m = Manifests::build(&c, &Inputs::for_review()).expect("builds");
        assert_eq!(m.deployments.len(), c.turnd.len());
        for (d, t) in m.deployments.iter().zip(&c.turnd) {
            assert_eq!(
                d.metadata.name.as_deref(),
                Some(format!("turnd-{}", t.vm).as_str())
            );
            let spec = d.spec.as_ref().expect("spec");
            assert_eq!(spec.replicas, Some(1));
            let strategy = spec.strategy.as_ref().expect("strategy");
            assert_eq!(strategy.type_.as_deref(), Some("Recreate"));
            assert!(strategy.rolling_update.is_none());
            let p = pod(d);
            assert_eq!(p.host_network, Some(true));
            assert_eq!(p.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
            assert_eq!(
                p.node_selector
                    .as_ref()
                    .and_then(|s| s.get("kubernetes.io/hostname")),
                Some(&t.vm.to_string())
            );
            assert!(p.termination_grace_period_seconds.is_some());
            let ctr = &p.containers[0];
            let sc = ctr.security_context.as_ref().expect("securityContext");
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.run_as_non_root, Some(true));
            assert_eq!(sc.run_as_user, Some(RUN_AS));
            let caps = sc.capabilities.as_ref().expect("capabilities");
            assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
            assert_eq!(
                caps.add.as_deref(),
                Some(&["NET_BIND_SERVICE".to_owned()][..])
            );
            // Probed on turnd's admin listener, which Prometheus scrapes by the port's name.
            for (probe, path) in [
                (&ctr.liveness_probe, "/live"),
                (&ctr.readiness_probe, "/ready"),
            ] {
                let http = probe
                    .as_ref()
                    .and_then(|p| p.http_get.as_ref())
                    .expect("httpGet");
                assert_eq!(
                    (http.path.as_deref(), &http.port),
                    (
                        Some(path),
                        &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
                            PORT_ADMIN
                        ))
                    )
                );
            }
            assert!(ctr.ports.as_ref().expect("ports").iter().any(|p| {
                p.name.as_deref() == Some(PORT_ADMIN_NAME)
                    && p.container_port == i32::from(PORT_ADMIN)
            }));
            // Every declared port is a host port: the scheduler refuses a second pod on the node.
            for port in ctr.ports.as_ref().expect("ports") {
                assert_eq!(port.host_port, Some(port.container_port));
            }
            // The TLS Secret is a directory mount (no subPath), so Secret updates reach turnd.
            let mounts = ctr.volume_mounts.as_ref().expect("mounts");
            assert!(mounts
                .iter()
                .all(|m| m.sub_path.is_none() && m.sub_path_expr.is_none()));
            let tls = mounts.iter().find(|m| m.name == "tls").expect("tls mount");
            assert_eq!(tls.mount_path, mounts::TLS_DIR);
            // The auth Secret is a directory mount too, and turnd reads it as files (which it
            // watches), never as environment values (which a running pod never sees change).
            let auth = mounts
                .iter()
                .find(|m| m.name == "auth")
                .expect("auth mount");
            assert_eq!(auth.mount_path, mounts::AUTH_DIR);
            let env = ctr.env.as_ref().expect("env");
            assert!(
                env.iter().all(|e| e.value_from.is_none()),
                "no secret values in env"
            );
            let var = |name: &str| {
                env.iter()
                    .find(|e| e.name == name)
                    .and_then(|e| e.value.clone())
            };
            assert_eq!(
                var("TURND_AUTH_SECRET_FILE"),
                Some(format!("{}/{AUTH_SECRET_KEY}", mounts::AUTH_DIR))
            );
            assert_eq!(
                var("TURND_ADMIN_TOKEN_FILE"),
                Some(format!("{}/{ADMIN_TOKEN_KEY}", mounts::AUTH_DIR))
            );
            // The kubelet waits for the whole drain before SIGKILL.
            let grace = p.termination_grace_period_seconds.expect("grace");
            assert!(grace > i64::try_from(DRAIN_TIMEOUT_SECONDS).expect("fits"));
        }
    }

    #[test]
    fn a_changed_configuration_changes_only_that_instances_pod_template() {
        let c = example();
        let before = Manifests::build(&c, &Inputs::for_review()).expect("builds");
        let mut inv = (*c).clone();
        inv.turnd[1].relay_port_max -= 1;
        let c2 = inv.validate("").expect("still valid");
        let after = Manifests::build(&c2, &Inputs::for_review()).expect("builds");
        assert_eq!(before.deployments[0], after.deployments[0]);
        assert_ne!(before.deployments[1], after.deployments[1]);
        assert_ne!(before.config, after.config);
    }

    #[test]
    fn two_instances_on_one_worker_are_refused() {
        let c = example();
        let mut inv = (*c).clone();
        inv.turnd[1].vm = inv.turnd[0].vm.clone();
        inv.turnd[1].relay_port_min = 40000;
        inv.turnd[1].relay_port_max = 40100;
        let c2 = inv.validate("").expect("the inventory allows it");
        let err = Manifests::build(&c2, &Inputs::for_review()).expect_err("refused");
        assert!(
            matches!(
                err,
                K8sError::SharedWorker {
                    first: 0,
                    second: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn each_instance_drains_to_its_sibling_and_the_file_validates() {
        let c = example();
        for (i, other) in [(0, 1), (1, 0)] {
            let text = turnd_toml(&c, i).expect("renders");
            let sibling = format!("{}:{PORT_PLAIN}", c.turnd[other].public_ip);
            assert!(
                text.contains(&format!("alternate_servers = [\"{sibling}\"]")),
                "{text}"
            );
            let env = MapEnv(
                [("TURND_AUTH_SECRET".to_owned(), "s3cret".to_owned())]
                    .into_iter()
                    .collect(),
            );
            let s = Config::from_toml(&text)
                .and_then(|cfg| cfg.validate(&env))
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(s.drain.alternate_ipv4, Some(sibling.parse().expect("addr")));
            assert_eq!(s.drain.timeout.as_secs(), DRAIN_TIMEOUT_SECONDS);
        }
    }

    #[test]
    fn secrets_come_from_inputs_and_never_show_in_debug() {
        let c = example();
        let inputs = Inputs {
            tls: TlsSource::Pem {
                cert: "CERT".into(),
                key: Sensitive::new("KEY-VALUE"),
            },
            ..Inputs::for_apply(Sensitive::new("the-real-secret"))
        };
        let m = Manifests::build(&c, &inputs).expect("builds");
        let data = m.auth_secret.data.as_ref().expect("data");
        assert_eq!(data[AUTH_SECRET_KEY].0, b"the-real-secret");
        // The admin token is derived from the secret (sha256sum of a fixed prefix + secret),
        // long enough for turnd, and rotates with it.
        let token = String::from_utf8(data[ADMIN_TOKEN_KEY].0.clone()).expect("utf8");
        assert_eq!(token.len(), 64);
        assert_eq!(token, objects::admin_token("the-real-secret"));
        assert_ne!(token, objects::admin_token("another-secret"));
        let tls = m.tls_secret.as_ref().expect("tls secret");
        assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
        let debug = format!("{m:?} {inputs:?}");
        assert!(
            !debug.contains("the-real-secret") && !debug.contains("KEY-VALUE"),
            "{debug}"
        );
        // ACME owns the certificate: applying leaves its Secret alone.
        let external =
            Manifests::build(&c, &Inputs::for_apply(Sensitive::new("x"))).expect("builds");
        assert!(external.tls_secret.is_none());
        assert!(external
            .objects()
            .iter()
            .all(|o| o.name() != TLS_SECRET_NAME));
    }
}
