//! The objects themselves, one builder per kind.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    HTTPGetAction, KeyToPath, Namespace, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use sha2::{Digest, Sha256};

use super::config::worker_ip;
use super::{
    mounts, AuthSecret, K8sError, TlsSource, ADMIN_TOKEN_KEY, AUTH_SECRET_KEY, AUTH_SECRET_NAME,
    CONFIG_MAP_NAME, DRAIN_TIMEOUT_SECONDS, FIELD_MANAGER, NAMESPACE, PDB_NAME,
    PLACEHOLDER_ADMIN_TOKEN, PLACEHOLDER_AUTH_SECRET, PLACEHOLDER_CERT, PLACEHOLDER_KEY, PORTS_TLS,
    PORT_ADMIN, PORT_ADMIN_NAME, PORT_PLAIN, RUN_AS, TLS_SECRET_NAME,
};
use crate::inventory::{Cluster, TurndInstance};

/// Label naming the application.
const LABEL_NAME: &str = "app.kubernetes.io/name";
/// Label naming one instance.
const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// Pod annotation carrying the hash of the instance's `turnd.toml`: a changed configuration
/// changes the pod template and so rolls the pod; an unchanged one leaves it alone.
pub(super) const CONFIG_HASH_ANNOTATION: &str = "turnd.io/config-sha256";
/// The node label the kubelet sets to the node's name.
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// Seconds turnd gets to stop after SIGTERM: its drain (during which its allocations keep
/// relaying and new ones go to the sibling) plus a margin to exit, so the kubelet never cuts
/// a drain short with SIGKILL.
const TERMINATION_GRACE_SECONDS: i64 = DRAIN_TIMEOUT_SECONDS as i64 + 15;

fn labels(instance: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (LABEL_NAME.to_owned(), "turnd".to_owned()),
        ("app.kubernetes.io/part-of".to_owned(), "turnd".to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            FIELD_MANAGER.to_owned(),
        ),
    ]);
    if let Some(i) = instance {
        l.insert(LABEL_INSTANCE.to_owned(), i.to_owned());
    }
    l
}

fn meta(name: &str, namespaced: bool, instance: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespaced.then(|| NAMESPACE.to_owned()),
        labels: Some(labels(instance)),
        ..ObjectMeta::default()
    }
}

/// The Deployment (and instance) name for a VM.
pub(super) fn instance_name(t: &TurndInstance) -> String {
    format!("turnd-{}", t.vm)
}

/// The ConfigMap key of a VM's `turnd.toml`.
pub(super) fn config_key(t: &TurndInstance) -> String {
    format!("{}.toml", t.vm)
}

pub(super) fn namespace() -> Namespace {
    Namespace {
        metadata: meta(NAMESPACE, false, None),
        ..Namespace::default()
    }
}

pub(super) fn config_map(cluster: &Cluster, configs: &[String]) -> ConfigMap {
    ConfigMap {
        metadata: meta(CONFIG_MAP_NAME, true, None),
        data: Some(
            cluster
                .turnd
                .iter()
                .zip(configs)
                .map(|(t, toml)| (config_key(t), toml.clone()))
                .collect(),
        ),
        ..ConfigMap::default()
    }
}

/// The admin API's bearer token, derived from the auth secret (so one secret in `.env` is
/// enough, and rotating it rotates the token): hex SHA-256 of `turnd-admin-token:` + secret,
/// what `printf 'turnd-admin-token:%s' "$TURND_AUTH_SECRET" | sha256sum` prints.
pub(super) fn admin_token(auth_secret: &str) -> String {
    sha256_hex(&format!("turnd-admin-token:{auth_secret}"))
}

pub(super) fn auth_secret(value: &AuthSecret) -> Secret {
    let (v, token) = match value {
        AuthSecret::Value(s) => (s.expose(), admin_token(s.expose())),
        AuthSecret::Placeholder => (PLACEHOLDER_AUTH_SECRET, PLACEHOLDER_ADMIN_TOKEN.to_owned()),
    };
    Secret {
        metadata: meta(AUTH_SECRET_NAME, true, None),
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (
                AUTH_SECRET_KEY.to_owned(),
                ByteString(v.as_bytes().to_vec()),
            ),
            (ADMIN_TOKEN_KEY.to_owned(), ByteString(token.into_bytes())),
        ])),
        ..Secret::default()
    }
}

pub(super) fn tls_secret(source: &TlsSource) -> Option<Secret> {
    let (cert, key) = match source {
        TlsSource::Pem { cert, key } => (cert.as_str(), key.expose()),
        TlsSource::Placeholder => (PLACEHOLDER_CERT, PLACEHOLDER_KEY),
        TlsSource::External => return None,
    };
    Some(Secret {
        metadata: meta(TLS_SECRET_NAME, true, None),
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(cert.as_bytes().to_vec())),
            ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    })
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The host ports turnd binds, declared so the scheduler's host-port check refuses a second
/// turnd pod on the same node (with `hostNetwork`, `hostPort` must equal `containerPort`).
fn ports() -> Vec<ContainerPort> {
    let port = |name: &str, number: u16, protocol: &str| ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(number),
        host_port: Some(i32::from(number)),
        protocol: Some(protocol.to_owned()),
        ..ContainerPort::default()
    };
    let mut out = vec![
        port("turn-udp", PORT_PLAIN, "UDP"),
        port("turn-tcp", PORT_PLAIN, "TCP"),
    ];
    out.extend(
        PORTS_TLS
            .iter()
            .map(|p| port(&format!("turns-{p}"), *p, "TCP")),
    );
    out.push(port(PORT_ADMIN_NAME, PORT_ADMIN, "TCP"));
    out
}

/// Liveness and readiness: turnd's admin listener on the worker's address, `/live` (the
/// process and its workers run) and `/ready` (listening, and not draining). The image
/// (`scratch`) has no shell for an `exec` probe, and an HTTP probe needs none.
fn http_probe(host: &str, path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            host: Some(host.to_owned()),
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(PORT_ADMIN)),
            scheme: Some("HTTP".to_owned()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(2),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        success_threshold: Some(1),
        ..Probe::default()
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
        .collect()
}

pub(super) fn deployment(
    cluster: &Cluster,
    t: &TurndInstance,
    toml: &str,
    image: &str,
    pull: crate::inventory::PullPolicy,
) -> Result<Deployment, K8sError> {
    let name = instance_name(t);
    let ip = worker_ip(cluster, t)?.to_string();
    let selector = BTreeMap::from([
        (LABEL_NAME.to_owned(), "turnd".to_owned()),
        (LABEL_INSTANCE.to_owned(), name.clone()),
    ]);
    let container = Container {
        name: "turnd".to_owned(),
        image: Some(image.to_owned()),
        image_pull_policy: Some(pull.as_k8s().to_owned()),
        args: Some(vec!["--config".to_owned(), mounts::CONFIG_FILE.to_owned()]),
        // Files of the mounted auth Secret, not values: turnd watches them and reloads.
        env: Some(vec![
            EnvVar {
                name: "TURND_AUTH_SECRET_FILE".to_owned(),
                value: Some(format!("{}/{AUTH_SECRET_KEY}", mounts::AUTH_DIR)),
                ..EnvVar::default()
            },
            EnvVar {
                name: "TURND_ADMIN_TOKEN_FILE".to_owned(),
                value: Some(format!("{}/{ADMIN_TOKEN_KEY}", mounts::AUTH_DIR)),
                ..EnvVar::default()
            },
        ]),
        ports: Some(ports()),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "500m"), ("memory", "256Mi")])),
            limits: Some(quantities(&[("memory", "1Gi")])),
            ..ResourceRequirements::default()
        }),
        liveness_probe: Some(http_probe(&ip, "/live", 10, 3)),
        readiness_probe: Some(http_probe(&ip, "/ready", 5, 2)),
        security_context: Some(SecurityContext {
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: Some(vec!["NET_BIND_SERVICE".to_owned()]),
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".to_owned(),
                mount_path: mounts::CONFIG_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tls".to_owned(),
                mount_path: mounts::TLS_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "auth".to_owned(),
                mount_path: mounts::AUTH_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let pod = PodSpec {
        host_network: Some(true),
        dns_policy: Some("ClusterFirstWithHostNet".to_owned()),
        node_selector: Some(BTreeMap::from([(
            HOSTNAME_LABEL.to_owned(),
            t.vm.to_string(),
        )])),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            fs_group: Some(RUN_AS),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: Some(vec![
            Volume {
                name: "config".to_owned(),
                config_map: Some(ConfigMapVolumeSource {
                    name: CONFIG_MAP_NAME.to_owned(),
                    items: Some(vec![KeyToPath {
                        key: config_key(t),
                        path: "turnd.toml".to_owned(),
                        ..KeyToPath::default()
                    }]),
                    default_mode: Some(0o444),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            // The whole Secret as a directory, never `subPath`: the kubelet swaps the
            // directory's `..data` link when the Secret changes, which turnd's reload watches.
            Volume {
                name: "tls".to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(TLS_SECRET_NAME.to_owned()),
                    default_mode: Some(0o440),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "auth".to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(AUTH_SECRET_NAME.to_owned()),
                    default_mode: Some(0o440),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    Ok(Deployment {
        metadata: meta(&name, true, Some(&name)),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            revision_history_limit: Some(3),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            // The old pod is gone before the new one starts: they would bind the same ports.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".to_owned()),
                ..DeploymentStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(Some(&name))),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH_ANNOTATION.to_owned(),
                        sha256_hex(toml),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

/// At most one turnd pod voluntarily down at a time (drains, evictions), so one public IP
/// keeps relaying; a pod that is not ready may always be evicted, so a crash-looping one
/// never blocks a drain.
pub(super) fn pdb() -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(PDB_NAME, true, None),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    LABEL_NAME.to_owned(),
                    "turnd".to_owned(),
                )])),
                ..LabelSelector::default()
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_owned()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}
