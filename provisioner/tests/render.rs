//! Golden tests of every generated file for the example inventory, and round trips of the
//! libvirt XML through our own reader.

use std::path::Path;

use provisioner::inventory::{Cluster, Inventory};
use provisioner::render::{self, k8s, libvirt};

fn example() -> Cluster {
    Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid")
}

#[test]
fn every_rendered_file_matches_its_golden_copy() {
    let files = render::all(&example());
    let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    // The host network, four files per VM, six node/master files, nine monitoring files.
    assert_eq!(names.len(), 1 + 3 * 4 + 6 + 9, "{names:?}");
    for f in &files {
        let snapshot = f.path.replace('/', "__");
        insta::assert_snapshot!(snapshot, &f.contents);
    }
}

#[test]
fn join_configuration_matches_its_golden_copy() {
    let c = example();
    let worker = c.vm("k8s-worker1").expect("worker");
    let join = k8s::JoinCommand::parse(
        "kubeadm join 10.10.10.10:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:0000000000000000000000000000000000000000000000000000000000000001\n",
    )
    .expect("parses");
    insta::assert_snapshot!(
        "worker__kubeadm-join.yaml",
        k8s::kubeadm_join(worker, &join)
    );
}

#[test]
fn network_xml_reads_back_to_the_same_spec() {
    let spec = libvirt::NetworkSpec::from_cluster(&example());
    assert_eq!(
        libvirt::NetworkSpec::from_xml(&spec.to_xml()).expect("reads"),
        spec
    );
}

#[test]
fn domain_xml_reads_back_to_the_same_spec() {
    let c = example();
    for vm in &c.vms {
        let spec = libvirt::DomainSpec::from_vm(&c, vm);
        assert_eq!(
            libvirt::DomainSpec::from_xml(&spec.to_xml()).expect("reads"),
            spec
        );
    }
}

#[test]
fn containerd_config_uses_the_systemd_cgroup_driver() {
    let parsed: toml::Value = toml::from_str(&k8s::containerd_config()).expect("valid TOML");
    let runc = &parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["runc"];
    assert_eq!(runc["options"]["SystemdCgroup"].as_bool(), Some(true));
    assert_eq!(parsed["version"].as_integer(), Some(2));
}

#[test]
fn kubeadm_init_skips_kube_proxy_and_cilium_replaces_it() {
    let c = example();
    let init = k8s::kubeadm_init(&c);
    assert!(init.contains("skipPhases:\n- addon/kube-proxy\n"), "{init}");
    assert!(init.contains("podSubnet: 10.244.0.0/16"));
    assert!(init.contains("cgroupDriver: systemd"));
    let values = k8s::cilium_values(&c);
    assert!(values.contains("kubeProxyReplacement: true"));
    assert!(values.contains("k8sServiceHost: 10.10.10.10"));
}

#[test]
fn software_emulation_with_direct_kernel_boot_reads_back() {
    let c = example();
    let mut spec = libvirt::DomainSpec::from_vm(&c, c.master());
    spec.virt_type = libvirt::VirtType::Qemu;
    spec.direct_kernel = Some(libvirt::DirectKernel {
        kernel: "/img/vmlinuz".into(),
        initrd: "/img/initrd.img".into(),
        cmdline: "root=/dev/vda rw console=ttyS0".into(),
    });
    let xml = spec.to_xml();
    assert!(xml.starts_with("<domain type='qemu'>"), "{xml}");
    assert!(
        !xml.contains("host-passthrough"),
        "TCG cannot pass the host CPU through"
    );
    assert!(xml.contains("<kernel>/img/vmlinuz</kernel>") && !xml.contains("<boot dev='hd'/>"));
    assert_eq!(libvirt::DomainSpec::from_xml(&xml).expect("reads"), spec);
}
