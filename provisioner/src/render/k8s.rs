//! Node and cluster configuration for Kubernetes: containerd `config.toml`, kubeadm
//! Init/Cluster/Kubelet/Join configurations, Cilium Helm values, sysctl and module lists, and
//! the pkgs.k8s.io apt source — all serialised from typed structs.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::inventory::{Cluster, Vm};

/// Where the generated files go on each node.
pub mod paths {
    /// Kernel modules loaded at boot.
    pub const MODULES: &str = "/etc/modules-load.d/k8s.conf";
    /// sysctl settings.
    pub const SYSCTL: &str = "/etc/sysctl.d/99-kubernetes.conf";
    /// containerd configuration.
    pub const CONTAINERD: &str = "/etc/containerd/config.toml";
    /// The pkgs.k8s.io apt source.
    pub const APT_SOURCE: &str = "/etc/apt/sources.list.d/kubernetes.list";
    /// The pkgs.k8s.io signing key (dearmored).
    pub const APT_KEYRING: &str = "/etc/apt/keyrings/kubernetes-apt-keyring.gpg";
    /// kubeadm init configuration on the master.
    pub const KUBEADM_INIT: &str = "/etc/kubernetes/provisioner/kubeadm-init.yaml";
    /// kubeadm join configuration on a worker.
    pub const KUBEADM_JOIN: &str = "/etc/kubernetes/provisioner/kubeadm-join.yaml";
    /// Cilium values on the master.
    pub const CILIUM_VALUES: &str = "/etc/kubernetes/provisioner/cilium-values.yaml";
    /// The admin kubeconfig kubeadm writes on the master.
    pub const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";
}

/// The containerd CRI socket.
pub const CRI_SOCKET: &str = "unix:///run/containerd/containerd.sock";
/// The pause image matching Kubernetes 1.29.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.9";
/// The API server port.
pub const API_PORT: u16 = 6443;

/// Kernel modules Kubernetes networking needs.
pub fn modules() -> String {
    ["overlay", "br_netfilter"]
        .iter()
        .map(|m| format!("{m}\n"))
        .collect()
}

/// sysctl settings Kubernetes networking needs.
pub fn sysctl() -> String {
    let settings = BTreeMap::from([
        ("net.bridge.bridge-nf-call-ip6tables", "1"),
        ("net.bridge.bridge-nf-call-iptables", "1"),
        ("net.ipv4.ip_forward", "1"),
    ]);
    settings
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect()
}

/// The apt source line for the Kubernetes minor series.
pub fn apt_source(c: &Cluster) -> String {
    let series = c.versions.kubernetes.minor_series();
    format!(
        "deb [signed-by={}] https://pkgs.k8s.io/core:/stable:/v{series}/deb/ /\n",
        paths::APT_KEYRING
    )
}

/// The pinned Debian package version of kubeadm/kubelet/kubectl, e.g. `1.29.6-1.1`.
pub fn k8s_package_version(c: &Cluster) -> String {
    format!(
        "{}-{}",
        c.versions.kubernetes, c.versions.kubernetes_package_revision
    )
}

#[derive(Debug, Serialize)]
struct ContainerdConfig {
    version: u32,
    plugins: ContainerdPlugins,
}

#[derive(Debug, Serialize)]
struct ContainerdPlugins {
    #[serde(rename = "io.containerd.grpc.v1.cri")]
    cri: Cri,
}

#[derive(Debug, Serialize)]
struct Cri {
    sandbox_image: String,
    containerd: CriContainerd,
}

#[derive(Debug, Serialize)]
struct CriContainerd {
    default_runtime_name: String,
    runtimes: BTreeMap<String, Runtime>,
}

#[derive(Debug, Serialize)]
struct Runtime {
    runtime_type: String,
    options: RuncOptions,
}

#[derive(Debug, Serialize)]
struct RuncOptions {
    #[serde(rename = "SystemdCgroup")]
    systemd_cgroup: bool,
}

/// containerd `config.toml` (version 2) with the runc runtime on the systemd cgroup driver.
pub fn containerd_config() -> String {
    let cfg = ContainerdConfig {
        version: 2,
        plugins: ContainerdPlugins {
            cri: Cri {
                sandbox_image: PAUSE_IMAGE.into(),
                containerd: CriContainerd {
                    default_runtime_name: "runc".into(),
                    runtimes: BTreeMap::from([(
                        "runc".to_owned(),
                        Runtime {
                            runtime_type: "io.containerd.runc.v2".into(),
                            options: RuncOptions {
                                systemd_cgroup: true,
                            },
                        },
                    )]),
                },
            },
        },
    };
    toml::to_string(&cfg).unwrap_or_default()
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeRegistration {
    name: String,
    cri_socket: String,
    kubelet_extra_args: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiEndpoint {
    advertise_address: String,
    bind_port: u16,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct InitConfiguration {
    api_version: &'static str,
    kind: &'static str,
    #[serde(rename = "localAPIEndpoint")]
    local_api_endpoint: ApiEndpoint,
    node_registration: NodeRegistration,
    skip_phases: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Networking {
    pod_subnet: String,
    service_subnet: String,
    dns_domain: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ApiServer {
    #[serde(rename = "certSANs")]
    cert_sans: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterConfiguration {
    api_version: &'static str,
    kind: &'static str,
    cluster_name: String,
    kubernetes_version: String,
    control_plane_endpoint: String,
    networking: Networking,
    api_server: ApiServer,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct KubeletConfiguration {
    api_version: &'static str,
    kind: &'static str,
    cgroup_driver: String,
}

fn node_registration(vm: &Vm) -> NodeRegistration {
    NodeRegistration {
        name: vm.name.to_string(),
        cri_socket: CRI_SOCKET.into(),
        kubelet_extra_args: BTreeMap::from([("node-ip".to_owned(), vm.ip.to_string())]),
    }
}

fn yaml<T: Serialize>(v: &T) -> String {
    serde_norway::to_string(v).unwrap_or_default()
}

/// kubeadm `InitConfiguration` + `ClusterConfiguration` + `KubeletConfiguration` for the
/// master, with the kube-proxy addon skipped (Cilium replaces it).
pub fn kubeadm_init(c: &Cluster) -> String {
    let m = c.master();
    let init = InitConfiguration {
        api_version: "kubeadm.k8s.io/v1beta3",
        kind: "InitConfiguration",
        local_api_endpoint: ApiEndpoint {
            advertise_address: m.ip.to_string(),
            bind_port: API_PORT,
        },
        node_registration: node_registration(m),
        skip_phases: vec!["addon/kube-proxy".into()],
    };
    let mut sans = vec![m.ip.to_string(), m.name.to_string()];
    sans.extend(c.host.public_ips.iter().map(ToString::to_string));
    let cluster = ClusterConfiguration {
        api_version: "kubeadm.k8s.io/v1beta3",
        kind: "ClusterConfiguration",
        cluster_name: c.kubernetes.cluster_name.clone(),
        kubernetes_version: format!("v{}", c.versions.kubernetes),
        control_plane_endpoint: format!("{}:{API_PORT}", m.ip),
        networking: Networking {
            pod_subnet: c.kubernetes.pod_cidr.to_string(),
            service_subnet: c.kubernetes.service_cidr.to_string(),
            dns_domain: "cluster.local".into(),
        },
        api_server: ApiServer { cert_sans: sans },
    };
    let kubelet = KubeletConfiguration {
        api_version: "kubelet.config.k8s.io/v1beta1",
        kind: "KubeletConfiguration",
        cgroup_driver: "systemd".into(),
    };
    [yaml(&init), yaml(&cluster), yaml(&kubelet)].join("---\n")
}

/// What `kubeadm token create --print-join-command` prints, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinCommand {
    /// `host:port` of the API server.
    pub endpoint: String,
    /// Bootstrap token.
    pub token: String,
    /// `sha256:…` CA public key hash.
    pub ca_cert_hash: String,
}

/// Why a join command could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("cannot parse `kubeadm token create --print-join-command` output: {0}")]
pub struct JoinParseError(String);

impl JoinCommand {
    /// Parses `kubeadm join ENDPOINT --token T --discovery-token-ca-cert-hash sha256:H`.
    pub fn parse(output: &str) -> Result<Self, JoinParseError> {
        let line = output
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("kubeadm join "))
            .ok_or_else(|| JoinParseError("no line starts with `kubeadm join`".into()))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .and_then(|i| words.get(i + 1))
                .map(|s| (*s).to_owned())
                .ok_or_else(|| JoinParseError(format!("no {flag}")))
        };
        let endpoint = words
            .get(2)
            .filter(|w| !w.starts_with("--"))
            .map(|s| (*s).to_owned())
            .ok_or_else(|| JoinParseError("no API server endpoint".into()))?;
        let token = after("--token")?;
        let valid_token = token.len() == 23
            && token.as_bytes()[6] == b'.'
            && token
                .chars()
                .filter(|c| *c != '.')
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !valid_token {
            return Err(JoinParseError(format!(
                "`{token}` is not a bootstrap token"
            )));
        }
        let ca_cert_hash = after("--discovery-token-ca-cert-hash")?;
        if !ca_cert_hash.starts_with("sha256:") || ca_cert_hash.len() != 7 + 64 {
            return Err(JoinParseError(format!(
                "`{ca_cert_hash}` is not a sha256 pin"
            )));
        }
        Ok(Self {
            endpoint,
            token,
            ca_cert_hash,
        })
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct BootstrapToken {
    api_server_endpoint: String,
    token: String,
    ca_cert_hashes: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Discovery {
    bootstrap_token: BootstrapToken,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct JoinConfiguration {
    api_version: &'static str,
    kind: &'static str,
    discovery: Discovery,
    node_registration: NodeRegistration,
}

/// kubeadm `JoinConfiguration` for a worker.
pub fn kubeadm_join(vm: &Vm, join: &JoinCommand) -> String {
    yaml(&JoinConfiguration {
        api_version: "kubeadm.k8s.io/v1beta3",
        kind: "JoinConfiguration",
        discovery: Discovery {
            bootstrap_token: BootstrapToken {
                api_server_endpoint: join.endpoint.clone(),
                token: join.token.clone(),
                ca_cert_hashes: vec![join.ca_cert_hash.clone()],
            },
        },
        node_registration: node_registration(vm),
    })
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CiliumValues {
    kube_proxy_replacement: bool,
    k8s_service_host: String,
    k8s_service_port: u16,
    ipam: CiliumIpam,
    operator: CiliumOperator,
}

#[derive(Debug, Serialize)]
struct CiliumIpam {
    mode: String,
}

#[derive(Debug, Serialize)]
struct CiliumOperator {
    replicas: u32,
}

/// Cilium Helm values: kube-proxy replacement talking to the API server directly.
pub fn cilium_values(c: &Cluster) -> String {
    yaml(&CiliumValues {
        kube_proxy_replacement: true,
        k8s_service_host: c.master().ip.to_string(),
        k8s_service_port: API_PORT,
        ipam: CiliumIpam {
            mode: "kubernetes".into(),
        },
        operator: CiliumOperator { replicas: 1 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_command_is_parsed_from_captured_output() {
        // Captured from `kubeadm token create --print-join-command` (kubeadm 1.29).
        let out = "kubeadm join 10.10.10.10:6443 --token 9a08jv.c0izixklcxtmnze7 --discovery-token-ca-cert-hash sha256:2d6b3a0c04b3cbe8d8a3fb3d4fd9c0f1eb1c3a2b3d8f3d0e8c84ebd1e5d1ea44 \n";
        let j = JoinCommand::parse(out).expect("parses");
        assert_eq!(j.endpoint, "10.10.10.10:6443");
        assert_eq!(j.token, "9a08jv.c0izixklcxtmnze7");
        assert!(j.ca_cert_hash.starts_with("sha256:2d6b"));
    }

    #[test]
    fn join_command_garbage_is_refused_with_reason() {
        let e = JoinCommand::parse("error: something\n").expect_err("no join");
        assert!(e.to_string().contains("no line starts with `kubeadm join`"));
        let e = JoinCommand::parse(
            "kubeadm join 1.2.3.4:6443 --token short --discovery-token-ca-cert-hash sha256:00",
        )
        .expect_err("bad token");
        assert!(e.to_string().contains("`short` is not a bootstrap token"));
    }
}
