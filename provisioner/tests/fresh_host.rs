//! From a fresh Ubuntu host to a converged cluster, through every phase of `apply --all`:
//! `plan` over all phases succeeds on a host where nothing is installed
//! (a missing tool is a fact, not a gather error), shows every install before the commands that
//! need it, and plans the VMs and the cluster that earlier phases create as fresh; applying
//! phase after phase, as `apply --all` does, runs in that order on machines that refuse a
//! program before its package is installed; a second plan is empty.
//!
//! The machines are simulated (`common::sim`): libvirt is its real in-process test driver,
//! the host-networking rules go to real `iptables-restore` in a network namespace of this
//! test, and turnd's and the monitoring phase's objects to the fake API server. Kubernetes
//! itself (kubeadm, kubectl, Helm) cannot run here and is simulated.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fake_api::fake_api_server;
use common::sim::{Kube, Machine};
use provisioner::exec::{Transport, VirshShellTransport};
use provisioner::inventory::{Cluster, Inventory};
use provisioner::k8s::Sensitive;
use provisioner::phases::{self, facts::sha256, turnd::KubeApi, Context, Settings};
use provisioner::plan::{apply, ActionKind, Journal, PhaseId, Plan, Step, Target, Transports};

const URI: &str = "test:///default";
const IMAGE: &[u8] = b"a cloud image, as far as this test is concerned";

/// A network namespace for the host's iptables, removed on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("prov-fresh-{}", std::process::id());
        let st = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {name} (needs root)");
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn cluster() -> Cluster {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    ))
    .expect("example");
    let text = example
        .replace(
            "libvirt_uri = \"qemu:///system\"",
            &format!("libvirt_uri = \"{URI}\""),
        )
        .replace(
            "0000000000000000000000000000000000000000000000000000000000000000",
            &sha256(IMAGE),
        );
    Inventory::from_toml(&text)
        .and_then(|i| i.validate(&text))
        .expect("test inventory is valid")
}

struct World {
    _netns: Netns,
    _rt: tokio::runtime::Runtime,
    host: Arc<Machine>,
    vms: BTreeMap<String, Arc<Machine>>,
    kube: Arc<Mutex<Kube>>,
    transports: Transports,
    settings: Settings,
    _dotenv: tempfile::TempDir,
}

fn world(c: &Cluster) -> World {
    let netns = Netns::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (addr, _state) = rt.block_on(fake_api_server());
    let kube = Arc::new(Mutex::new(Kube::default()));
    let master_ip = c.master().ip.to_string();
    let mut host = Machine::new(
        "host",
        Arc::clone(&kube),
        Some(VirshShellTransport::start(URI).expect("virsh session")),
        Some(netns.0.clone()),
        &master_ip,
    );
    host.downloads.insert(c.image.url.clone(), IMAGE.to_vec());
    // What the renewal timer runs, copied by the operator (step 1 of the README's sequence).
    for path in phases::host::renew_prerequisites() {
        host.state
            .lock()
            .expect("state")
            .files
            .insert(path, b"copied by the operator".to_vec());
    }
    host.versions
        .insert("kubectl".into(), format!("v{}", c.versions.kubernetes));
    let host = Arc::new(host);
    let vms: BTreeMap<String, Arc<Machine>> = c
        .vms
        .iter()
        .map(|v| {
            let mut m = Machine::new(v.name.as_str(), Arc::clone(&kube), None, None, &master_ip);
            m.versions
                .insert("helm".into(), format!("v{}", c.versions.helm));
            (v.name.to_string(), Arc::new(m))
        })
        .collect();
    let transports = Transports {
        host: Box::new(Arc::clone(&host)),
        vms: vms
            .iter()
            .map(|(k, v)| (k.clone(), Box::new(Arc::clone(v)) as Box<dyn Transport>))
            .collect(),
    };
    // The monitoring phase's secrets, from the `.env` as `apply` reads them.
    let dotenv = tempfile::tempdir().expect("tempdir");
    let env_file = dotenv.path().join(".env");
    std::fs::write(
        &env_file,
        "GRAFANA_ADMIN_PASSWORD=fresh-grafana\nSENDGRID_API_KEY=SG.fresh\n",
    )
    .expect("write .env");
    let settings = Settings {
        dotenv: Some(env_file),
        kube_api: Some(KubeApi::Url(format!("http://{addr}"))),
        auth_secret: Some(Sensitive::new("fresh-host-secret")),
        // The fake API server runs no controllers: nothing would ever roll out.
        rollout_timeout: None,
        vm_ready_timeout: Some(Duration::from_secs(60)),
        ..Settings::default()
    };
    World {
        _netns: netns,
        _rt: rt,
        host,
        vms,
        kube,
        transports,
        settings,
        _dotenv: dotenv,
    }
}

/// Every phase of `apply --all`.
fn phases_under_test() -> Vec<PhaseId> {
    PhaseId::ALL.to_vec()
}

fn plan_all(w: &World, c: &Cluster) -> Vec<Plan> {
    let ctx = Context {
        cluster: c,
        transports: &w.transports,
        settings: &w.settings,
    };
    phases::plan_in_order(&phases_under_test(), &ctx).expect("every phase plans on a fresh host")
}

/// Walks the plans' commands per machine and checks that each program is installed (by an
/// earlier step of the plans) or part of the base system when it runs.
fn assert_installs_come_first(plans: &[Plan]) {
    let mut installed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for plan in plans {
        for a in &plan.actions {
            let ActionKind::Steps(steps) = &a.kind else {
                continue;
            };
            let have = installed.entry(a.target.to_string()).or_default();
            for s in steps {
                let Step::Run(cmd) = s else { continue };
                let mut words = std::iter::once(&cmd.program)
                    .chain(&cmd.args)
                    .skip_while(|w| *w == "env" || w.contains('='));
                let program = words.next().expect("a program").clone();
                if program == "apt-get" && cmd.args.iter().any(|w| w == "install") {
                    let update = have.iter().any(|h| h == "<apt lists>");
                    assert!(update, "{}: `{cmd}` before apt-get update", a.target);
                    for w in cmd.args.iter().skip_while(|w| *w != "install").skip(1) {
                        if !w.starts_with('-') {
                            let pkg = w.split('=').next().unwrap_or(w);
                            have.extend(common::sim::provides(pkg).iter().map(|t| (*t).to_owned()));
                        }
                    }
                } else if program == "apt-get" {
                    have.push("<apt lists>".into());
                }
                if program == "install" || program == "mv" {
                    if let Some(dst) = cmd.args.last() {
                        if let Some(tool) = dst.strip_prefix("/usr/local/bin/") {
                            have.push(tool.to_owned());
                        }
                    }
                }
                assert!(
                    common::sim::BASE_TOOLS.contains(&program.as_str()) || have.contains(&program),
                    "phase {}: [{}] `{cmd}` runs before {program} is installed",
                    plan.phase,
                    a.target
                );
            }
        }
    }
}

#[test]
fn a_fresh_host_plans_applies_in_install_order_and_converges() {
    if !(common::have_tool("virsh", "libvirt-clients")
        && common::have_tool("iptables-restore", "iptables")
        && common::have_tool("ip", "iproute2"))
    {
        return;
    }
    let c = cluster();
    let w = world(&c);

    // 1. `plan --all` on a host with nothing installed.
    let plans = plan_all(&w, &c);
    let text: String = plans.iter().map(|p| p.render(true)).collect();
    for p in &plans {
        if p.phase != PhaseId::HostKubectl {
            assert!(!p.is_empty(), "phase {} plans nothing:\n{text}", p.phase);
        }
    }
    assert!(
        w.host.log().iter().any(|l| l.starts_with("virsh ")),
        "virsh was asked (and answered `not found`)"
    );
    assert_installs_come_first(&plans);
    let host_plan = &plans[0].actions[0];
    assert!(
        host_plan
            .summary
            .starts_with("install packages qemu-kvm libvirt-daemon-system"),
        "{text}"
    );
    assert!(
        plans[0]
            .actions
            .iter()
            .any(|a| a.summary == "install the certificate renewal timer (turnd-cert-renew.timer)"),
        "{text}"
    );
    let vms = &plans[1];
    for vm in &c.vms {
        let start = vms
            .actions
            .iter()
            .position(|a| a.summary == format!("start domain {}", vm.name))
            .expect("started");
        let wait = &vms.actions[start + 1];
        assert_eq!(wait.target, Target::Vm(vm.name.to_string()), "{text}");
        assert!(matches!(wait.kind, ActionKind::WaitReady { .. }), "{text}");
    }
    assert!(
        plans[2]
            .render(false)
            .contains("[k8s-worker2] install packages"),
        "the VMs are planned as fresh:\n{text}"
    );
    assert!(
        plans[4]
            .render(false)
            .contains("join k8s-worker1 to the cluster"),
        "the joins are planned although the master is not initialised yet:\n{text}"
    );
    for m in w.vms.values() {
        assert!(
            m.log().is_empty(),
            "VMs that do not exist yet are not asked"
        );
    }

    // 2. `apply --all`: plan each phase just before applying it.
    w.host.clear_log();
    for phase in phases_under_test() {
        let ctx = Context {
            cluster: &c,
            transports: &w.transports,
            settings: &w.settings,
        };
        let plan = phases::plan(phase, &ctx).expect("plans");
        apply(&plan, &w.transports, &mut Journal::in_memory())
            .unwrap_or_else(|e| panic!("{e}\nplan:\n{}", plan.render(true)));
    }
    let host_log = w.host.log();
    let first = |prefix: &str| {
        host_log
            .iter()
            .position(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("`{prefix}` ran on the host: {host_log:#?}"))
    };
    assert!(first("apt-get -o DPkg::Lock::Timeout=600 update") < first(" install -y"));
    assert!(first(" install -y") < first("virsh -c test:///default net-define"));
    assert!(first(" install -y") < first("qemu-img create"));
    for (name, m) in &w.vms {
        let log = m.log();
        let at = |prefix: &str| log.iter().position(|l| l.starts_with(prefix));
        assert_eq!(
            at("true"),
            Some(0),
            "{name}: SSH is waited for first: {log:#?}"
        );
        assert!(at("timeout ").expect("cloud-init waited for") < at("env ").expect("apt"));
    }
    {
        let kube = w.kube.lock().expect("kube");
        assert_eq!(kube.inits, 1);
        assert_eq!(kube.nodes.len(), c.vms.len(), "every VM joined");
        assert_eq!(
            kube.releases.get(provisioner::render::monitoring::RELEASE),
            Some(&format!(
                "{}-{}",
                provisioner::render::monitoring::CHART_NAME,
                c.monitoring.chart_version
            )),
            "kube-prometheus-stack installed at the pinned version"
        );
    }
    // Helm runs on the master only after k8s-common installed it, with the values file the
    // phase wrote.
    let master_log = w.vms[c.master().name.as_str()].log();
    let at = |prefix: &str| {
        master_log
            .iter()
            .position(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("`{prefix}` ran on the master: {master_log:#?}"))
    };
    assert!(at("helm upgrade --install monitoring") > at("kubeadm init"));

    // 3. The second plan is empty.
    let again = plan_all(&w, &c);
    let text: String = again.iter().map(|p| p.render(true)).collect();
    assert!(again.iter().all(Plan::is_empty), "{text}");
}
