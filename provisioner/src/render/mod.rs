//! Every generated file, from typed data: libvirt XML, cloud-init seed files, node and
//! cluster configuration. [`all`] lists them for `render --out DIR`.

pub mod cloudinit;
pub mod k8s;
pub mod libvirt;
pub mod monitoring;
pub mod xml;

use crate::inventory::Cluster;

/// One generated file: its path relative to the render directory and its contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Relative path, e.g. `vms/k8s-master/user-data`.
    pub path: String,
    /// Contents.
    pub contents: String,
}

/// Every file the provisioner would write, for review or GitOps. Join configurations are left
/// out: they carry a token that exists only while `k8s-workers` runs.
pub fn all(c: &Cluster) -> Vec<Rendered> {
    let mut out = Vec::new();
    let mut add = |path: String, contents: String| out.push(Rendered { path, contents });
    add(
        "host/network.xml".into(),
        libvirt::NetworkSpec::from_cluster(c).to_xml(),
    );
    for vm in &c.vms {
        let dir = format!("vms/{}", vm.name);
        add(
            format!("{dir}/domain.xml"),
            libvirt::DomainSpec::from_vm(c, vm).to_xml(),
        );
        let seed = cloudinit::seed(c, vm);
        add(format!("{dir}/user-data"), seed.user_data);
        add(format!("{dir}/meta-data"), seed.meta_data);
        add(format!("{dir}/network-config"), seed.network_config);
    }
    add("nodes/modules-load.d/k8s.conf".into(), k8s::modules());
    add("nodes/sysctl.d/99-kubernetes.conf".into(), k8s::sysctl());
    add(
        "nodes/containerd/config.toml".into(),
        k8s::containerd_config(),
    );
    add("nodes/apt/kubernetes.list".into(), k8s::apt_source(c));
    add("master/kubeadm-init.yaml".into(), k8s::kubeadm_init(c));
    add("master/cilium-values.yaml".into(), k8s::cilium_values(c));
    out.extend(monitoring::all(c));
    out
}
