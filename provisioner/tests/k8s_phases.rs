//! Plans of the Kubernetes phases through the recording fake (kubeadm, kubelet, Helm and a
//! cluster cannot run here — mocked for that reason): a fresh node gets the full plan, whose
//! command lines are golden-tested; a converged node gets an empty plan; drift is detected;
//! the tools' output is parsed from samples (see tests/samples/README.md).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use provisioner::exec::{Output, Recorded, RecordingTransport, Transport};
use provisioner::inventory::{Cluster, Inventory};
use provisioner::phases::facts::sha256;
use provisioner::phases::{self, k8s, Context, Settings};
use provisioner::plan::{apply, Journal, PhaseId, Plan, Transports};
use provisioner::render::k8s::{self as files, paths};

fn example() -> Cluster {
    Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid")
}

fn sample(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/samples/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("sample")
}

struct Fakes {
    host: Arc<RecordingTransport>,
    vms: BTreeMap<String, Arc<RecordingTransport>>,
    transports: Transports,
}

fn fakes(c: &Cluster) -> Fakes {
    let host = Arc::new(RecordingTransport::new("host"));
    let vms: BTreeMap<String, Arc<RecordingTransport>> = c
        .vms
        .iter()
        .map(|v| {
            (
                v.name.to_string(),
                Arc::new(RecordingTransport::new(v.name.as_str())),
            )
        })
        .collect();
    let transports = Transports {
        host: Box::new(Arc::clone(&host)),
        vms: vms
            .iter()
            .map(|(k, v)| (k.clone(), Box::new(Arc::clone(v)) as Box<dyn Transport>))
            .collect(),
    };
    Fakes {
        host,
        vms,
        transports,
    }
}

fn plan(c: &Cluster, f: &Fakes, phase: PhaseId) -> Plan {
    let settings = Settings::default();
    let ctx = Context {
        cluster: c,
        transports: &f.transports,
        settings: &settings,
    };
    phases::plan(phase, &ctx).expect("plans")
}

/// A node as it is right after cloud-init: nothing of Kubernetes, swap on.
fn fresh_node(t: &RecordingTransport) {
    t.respond("test -f", Output::failed(1, ""));
    t.respond("test -e", Output::failed(1, ""));
    t.respond(
        "sha256sum",
        Output::failed(
            1,
            "sha256sum: /etc/modules-load.d/k8s.conf: No such file or directory\n",
        ),
    );
    t.respond(
        "dpkg-query",
        Output {
            status: 1,
            stdout: "ca-certificates\t20230311ubuntu0.22.04.1\tii \n".into(),
            stderr: "dpkg-query: no packages found matching kubeadm\n".into(),
        },
    );
    t.respond("swapon", Output::ok("/swap.img\n"));
    t.respond(
        "helm version",
        Output::failed(127, "sh: 1: helm: not found\n"),
    );
    t.respond(
        "cat /etc/kubernetes/admin.conf",
        Output::failed(
            1,
            "cat: /etc/kubernetes/admin.conf: No such file or directory\n",
        ),
    );
}

/// A node on which k8s-common has been applied.
fn converged_node(c: &Cluster, t: &RecordingTransport) {
    let hashes = [
        (paths::MODULES, files::modules()),
        (paths::SYSCTL, files::sysctl()),
        (paths::CONTAINERD, files::containerd_config()),
        (paths::APT_SOURCE, files::apt_source(c)),
    ]
    .iter()
    .map(|(p, body)| format!("{}  {p}\n", sha256(body.as_bytes())))
    .collect::<String>();
    t.respond("sha256sum", Output::ok(hashes));
    let v = files::k8s_package_version(c);
    t.respond(
        "dpkg-query",
        Output::ok(format!(
            "ca-certificates\t20230311\tii \ncurl\t7.81.0\tii \ngpg\t2.2.27\tii \ncontainerd\t1.7.12\tii \nkubelet\t{v}\tii \nkubeadm\t{v}\tii \nkubectl\t{v}\tii \n"
        )),
    );
    t.respond(
        "apt-mark showhold",
        Output::ok("kubeadm\nkubectl\nkubelet\n"),
    );
    t.respond("swapon", Output::ok(""));
    t.respond("helm version", Output::ok(format!("v{}", c.versions.helm)));
}

#[test]
fn k8s_common_full_plan_for_fresh_nodes_is_golden() {
    let c = example();
    let f = fakes(&c);
    f.vms.values().for_each(|t| fresh_node(t));
    let p = plan(&c, &f, PhaseId::K8sCommon);
    assert_eq!(p.actions.len(), 3 * 10, "{}", p.render(false));
    insta::assert_snapshot!("k8s-common-plan", p.render(true));
    // Gathering only read: nothing was written.
    for t in f.vms.values() {
        assert!(t.calls().iter().all(|c| matches!(c, Recorded::Run(_))));
    }
}

#[test]
fn k8s_common_converged_nodes_plan_nothing_and_drift_is_repaired() {
    let c = example();
    let f = fakes(&c);
    f.vms.values().for_each(|t| converged_node(&c, t));
    assert!(plan(&c, &f, PhaseId::K8sCommon).is_empty());

    // Someone edited containerd's config on worker2 and unheld kubelet on the master.
    let w2 = &f.vms["k8s-worker2"];
    let mut hashes = w2
        .run(&provisioner::exec::Cmd::new("sha256sum"))
        .expect("fake")
        .stdout;
    hashes = hashes.replace(
        &sha256(files::containerd_config().as_bytes()),
        &sha256(b"edited"),
    );
    w2.respond("sha256sum", Output::ok(hashes));
    f.vms["k8s-master"].respond("apt-mark showhold", Output::ok("kubeadm\nkubectl\n"));
    let p = plan(&c, &f, PhaseId::K8sCommon);
    let summary: Vec<String> = p
        .actions
        .iter()
        .map(|a| format!("[{}] {}", a.target, a.summary))
        .collect();
    assert_eq!(
        summary,
        [
            "[k8s-master] hold kubelet",
            "[k8s-worker2] write /etc/containerd/config.toml (changed) and restart containerd"
        ]
    );
    // Applying writes the typed config and restarts containerd, in that order.
    f.vms.values().for_each(|t| t.clear());
    let mut journal = Journal::in_memory();
    apply(&p, &f.transports, &mut journal).expect("applies");
    assert_eq!(
        w2.calls(),
        [
            Recorded::Upload {
                path: paths::CONTAINERD.into(),
                data: files::containerd_config(),
                mode: 0o644
            },
            Recorded::Run("systemctl restart containerd".into()),
        ]
    );
    assert_eq!(f.vms["k8s-master"].commands(), ["apt-mark hold kubelet"]);
    assert_eq!(journal.records.len(), 2);
}

#[test]
fn k8s_master_init_and_cilium_plan_is_golden_and_empty_when_deployed() {
    let c = example();
    let f = fakes(&c);
    fresh_node(&f.vms["k8s-master"]);
    let p = plan(&c, &f, PhaseId::K8sMaster);
    insta::assert_snapshot!("k8s-master-plan", p.render(true));
    assert_eq!(p.actions.len(), 2);

    let m = &f.vms["k8s-master"];
    m.respond("test -f", Output::ok(""));
    m.respond(
        "sha256sum",
        Output::ok(format!(
            "{}  {}\n{}  {}\n",
            sha256(files::kubeadm_init(&c).as_bytes()),
            paths::KUBEADM_INIT,
            sha256(files::cilium_values(&c).as_bytes()),
            paths::CILIUM_VALUES
        )),
    );
    m.respond("helm list", Output::ok(sample("helm-list.json")));
    let p = plan(&c, &f, PhaseId::K8sMaster);
    assert!(p.is_empty(), "{}", p.render(true));
    assert!(p.notes.is_empty());

    // An older Cilium release is upgraded; a changed kubeadm config after init is only noted.
    m.respond(
        "helm list",
        Output::ok(sample("helm-list.json").replace("cilium-1.15.6", "cilium-1.15.1")),
    );
    m.respond("sha256sum", Output::ok(String::new()));
    let p = plan(&c, &f, PhaseId::K8sMaster);
    let summary: Vec<&str> = p.actions.iter().map(|a| a.summary.as_str()).collect();
    assert_eq!(
        summary,
        ["install Cilium 1.15.6 with Helm (cilium-1.15.6 not deployed)"]
    );
    assert_eq!(p.notes.len(), 1);
    assert!(
        p.notes[0].contains("kubeadm does not re-apply it"),
        "{:?}",
        p.notes
    );
}

#[test]
fn k8s_workers_join_with_a_fresh_token_and_get_labelled() {
    let c = example();
    let f = fakes(&c);
    let m = &f.vms["k8s-master"];
    m.respond("test -f", Output::ok(""));
    m.respond(
        "kubectl --kubeconfig /etc/kubernetes/admin.conf get nodes",
        Output::ok(sample("kubectl-get-nodes.json")),
    );
    // worker1 is in the sample (not Ready yet, no labels); worker2 is not.
    let p = plan(&c, &f, PhaseId::K8sWorkers);
    insta::assert_snapshot!("k8s-workers-plan", p.render(true));
    let summary: Vec<String> = p
        .actions
        .iter()
        .map(|a| format!("[{}] {}", a.target, a.summary))
        .collect();
    assert_eq!(
        summary,
        [
            "[k8s-master] label node k8s-worker1 node-role.kubernetes.io/worker= turnd.io/relay=true",
            "[k8s-worker2] join k8s-worker2 to the cluster",
            "[k8s-master] label node k8s-worker2 node-role.kubernetes.io/worker= turnd.io/relay=true",
        ]
    );

    m.respond(
        "kubeadm token create",
        Output::ok("kubeadm join 10.10.10.10:6443 --token 9a08jv.c0izixklcxtmnze7 --discovery-token-ca-cert-hash sha256:2d6b3a0c04b3cbe8d8a3fb3d4fd9c0f1eb1c3a2b3d8f3d0e8c84ebd1e5d1ea44 \n"),
    );
    m.clear();
    let mut journal = Journal::in_memory();
    apply(&p, &f.transports, &mut journal).expect("applies");
    let w2 = f.vms["k8s-worker2"].calls();
    assert_eq!(w2.len(), 2);
    let Recorded::Upload { path, data, mode } = &w2[0] else {
        panic!("upload first: {w2:?}")
    };
    assert_eq!((path.as_str(), *mode), (paths::KUBEADM_JOIN, 0o600));
    assert!(
        data.contains("token: 9a08jv.c0izixklcxtmnze7") && data.contains("node-ip: 10.10.10.12"),
        "{data}"
    );
    assert_eq!(
        w2[1],
        Recorded::Run("kubeadm join --config /etc/kubernetes/provisioner/kubeadm-join.yaml".into())
    );
    assert_eq!(
        m.commands(),
        [
            "kubectl --kubeconfig /etc/kubernetes/admin.conf label node k8s-worker1 --overwrite node-role.kubernetes.io/worker= turnd.io/relay=true",
            "kubeadm token create --print-join-command --ttl 15m",
            "kubectl --kubeconfig /etc/kubernetes/admin.conf label node k8s-worker2 --overwrite node-role.kubernetes.io/worker= turnd.io/relay=true",
        ]
    );
}

#[test]
fn a_garbled_join_token_stops_the_phase_with_the_reason() {
    let c = example();
    let f = fakes(&c);
    let m = &f.vms["k8s-master"];
    m.respond("test -f", Output::ok(""));
    m.respond(
        "kubectl",
        Output::ok(r#"{"items":[{"metadata":{"name":"k8s-master"}}]}"#),
    );
    m.respond(
        "kubeadm token create",
        Output::ok("failed to create token\n"),
    );
    let p = plan(&c, &f, PhaseId::K8sWorkers);
    let err = apply(&p, &f.transports, &mut Journal::in_memory()).expect_err("no token");
    assert_eq!(
        err.to_string(),
        "phase 05-k8s-workers, action 1 `join k8s-worker1 to the cluster`: cannot parse `kubeadm token create --print-join-command` output: no line starts with `kubeadm join`"
    );
}

#[test]
fn samples_parse() {
    let nodes = k8s::parse_nodes(&sample("kubectl-get-nodes.json")).expect("nodes");
    assert_eq!(nodes.len(), 2);
    assert!(nodes[0].ready && !nodes[1].ready);
    assert_eq!(
        nodes[0]
            .labels
            .get("node-role.kubernetes.io/control-plane")
            .map(String::as_str),
        Some("")
    );
    let releases = k8s::parse_helm_list(&sample("helm-list.json")).expect("releases");
    assert_eq!(
        (releases[0].chart.as_str(), releases[0].status.as_str()),
        ("cilium-1.15.6", "deployed")
    );
    assert!(
        k8s::parse_kubectl_client_version(&sample("kubectl-version-client.json"))
            .is_some_and(|v| v.starts_with("v1."))
    );
}

#[test]
fn host_kubectl_installs_kubectl_and_copies_the_kubeconfig() {
    let c = example();
    let f = fakes(&c);
    f.host.respond(
        "kubectl version",
        Output::ok(sample("kubectl-version-client.json")),
    );
    f.host.respond("sha256sum", Output::failed(1, ""));
    f.vms["k8s-master"].respond(
        "cat /etc/kubernetes/admin.conf",
        Output::ok("apiVersion: v1\nkind: Config\n"),
    );
    let p = plan(&c, &f, PhaseId::HostKubectl);
    insta::assert_snapshot!("host-kubectl-plan", p.render(true));
    f.host.respond(
        "kubectl version",
        Output::ok(r#"{"clientVersion":{"gitVersion":"v1.29.6"}}"#),
    );
    f.host.respond(
        "sha256sum",
        Output::ok(format!(
            "{}  /root/.kube/config\n",
            sha256(b"apiVersion: v1\nkind: Config\n")
        )),
    );
    assert!(plan(&c, &f, PhaseId::HostKubectl).is_empty());
}

#[test]
fn teardown_keep_vms_resets_workers_then_master() {
    let c = example();
    let f = fakes(&c);
    let settings = Settings::default();
    let ctx = Context {
        cluster: &c,
        transports: &f.transports,
        settings: &settings,
    };
    f.vms["k8s-worker2"].respond("test -e", Output::failed(1, ""));
    let p = phases::plan_teardown(&ctx, true).expect("plans");
    let summary: Vec<&str> = p.actions.iter().map(|a| a.summary.as_str()).collect();
    assert_eq!(
        summary,
        [
            "kubeadm reset on k8s-worker1",
            "kubeadm reset on k8s-master"
        ]
    );
}
