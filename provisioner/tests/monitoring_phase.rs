//! Phase `monitoring` (gather → plan → apply) against the recording transport for the master
//! (Helm cannot run here: no Helm and no cluster; the test answers `helm list` and `sha256sum`
//! as the master would before and after an install) and the FAKE Kubernetes API server of
//! `tests/common/fake_api.rs` for the namespace, Secrets and dashboard ConfigMap (no real API
//! server can run here). A fresh cluster plans the objects and a Helm install at the pinned
//! chart version with the rendered values; the second plan is empty; a changed value plans an
//! upgrade and only that; a rotated password plans a Secret update and only that;
//! `enabled = false` plans and asks nothing. Secrets never reach a plan or the values.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::fake_api::{fake_api_server, take, Shared};
use provisioner::exec::{Output, Recorded, RecordingTransport, Transport};
use provisioner::inventory::{Cluster, Inventory, Version};
use provisioner::phases::monitoring::{self, VALUES_PATH};
use provisioner::phases::turnd::KubeApi;
use provisioner::phases::{self, facts::sha256, Context, PhaseError, Settings};
use provisioner::plan::{apply, Journal, PhaseId, Plan, Transports};
use provisioner::render::monitoring as files;

const PASSWORD: &str = "grafana-password-from-env";
const API_KEY: &str = "SG.sendgrid-key-from-env";

fn example() -> Cluster {
    Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid")
}

fn env() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("GRAFANA_ADMIN_PASSWORD".to_owned(), PASSWORD.to_owned()),
        ("SENDGRID_API_KEY".to_owned(), API_KEY.to_owned()),
    ])
}

/// The fake API server on its own runtime: the phase is synchronous and runs its own.
struct Api {
    _rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    state: Shared,
}

fn api() -> Api {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (addr, state) = rt.block_on(fake_api_server());
    Api {
        _rt: rt,
        addr,
        state,
    }
}

struct Rig {
    api: Api,
    master: Arc<RecordingTransport>,
    transports: Transports,
    settings: Settings,
}

fn rig(c: &Cluster) -> Rig {
    let api = api();
    let master = Arc::new(RecordingTransport::new(c.master().name.as_str()));
    // A cluster without the release: `helm list` prints `[]`, the values file is absent.
    master.respond("helm list", Output::ok("[]"));
    master.respond(
        "sha256sum",
        Output::failed(
            1,
            format!("sha256sum: {VALUES_PATH}: No such file or directory\n"),
        ),
    );
    let transports = Transports {
        host: Box::new(RecordingTransport::new("host")),
        vms: BTreeMap::from([(
            c.master().name.to_string(),
            Box::new(Arc::clone(&master)) as Box<dyn Transport>,
        )]),
    };
    let settings = Settings {
        kube_api: Some(KubeApi::Url(format!("http://{}", api.addr))),
        ..Settings::default()
    };
    Rig {
        api,
        master,
        transports,
        settings,
    }
}

impl Rig {
    fn plan_with(&self, c: &Cluster, env: &BTreeMap<String, String>) -> Result<Plan, PhaseError> {
        let ctx = Context {
            cluster: c,
            transports: &self.transports,
            settings: &self.settings,
        };
        monitoring::plan_phase(&ctx, env)
    }

    fn plan(&self, c: &Cluster) -> Plan {
        self.plan_with(c, &env()).expect("plans")
    }

    /// Answers like the master after the recorded install: the release deployed at `chart`,
    /// the values file as uploaded.
    fn installed(&self, chart: &str) {
        let values = self
            .master
            .calls()
            .into_iter()
            .rev()
            .find_map(|c| match c {
                Recorded::Upload { path, data, .. } if path == VALUES_PATH => Some(data),
                _ => None,
            })
            .expect("values uploaded");
        self.master.respond(
            "helm list",
            Output::ok(format!(
                r#"[{{"name":"monitoring","namespace":"monitoring","revision":"1","status":"deployed","chart":"{chart}","app_version":"v0.75.2"}}]"#
            )),
        );
        self.master.respond(
            "sha256sum",
            Output::ok(format!("{}  {VALUES_PATH}\n", sha256(values.as_bytes()))),
        );
        self.master.clear();
    }
}

fn summaries(p: &Plan) -> Vec<&str> {
    p.actions.iter().map(|a| a.summary.as_str()).collect()
}

#[test]
fn fresh_cluster_plans_objects_and_a_pinned_helm_install_then_nothing() {
    let c = example();
    let r = rig(&c);
    let p = r.plan(&c);
    let text = p.render(true).replace(&r.api.addr.to_string(), "FAKE");
    insta::assert_snapshot!("monitoring-plan", text);
    for secret in [PASSWORD, API_KEY] {
        assert!(!format!("{p:?}{text}").contains(secret), "{secret} leaked");
    }
    assert!(
        r.api.state.lock().expect("lock").stored.is_empty(),
        "planning stores nothing"
    );
    assert_eq!(
        r.master.commands(),
        [
            "helm list --namespace monitoring --output json --kubeconfig /etc/kubernetes/admin.conf",
            "sha256sum /etc/kubernetes/provisioner/monitoring-values.yaml",
        ],
        "gathering only reads"
    );
    r.master.clear();
    take(&r.api.state);

    apply(&p, &r.transports, &mut Journal::in_memory()).expect("applies");
    let seen = take(&r.api.state);
    assert_eq!(seen.len(), 4, "one PATCH per object: {seen:#?}");
    let stored = r.api.state.lock().expect("lock").stored.clone();
    let grafana = &stored["/api/v1/namespaces/monitoring/secrets/grafana-admin"];
    assert_eq!(grafana["stringData"]["admin-password"], PASSWORD);
    let smtp = &stored["/api/v1/namespaces/monitoring/secrets/alertmanager-smtp"];
    assert_eq!(smtp["stringData"]["password"], API_KEY);
    let dashboard = &stored["/api/v1/namespaces/monitoring/configmaps/turnd-dashboard"];
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(dashboard["data"]["turnd-dashboard.json"], files::DASHBOARD);
    assert!(stored.contains_key("/api/v1/namespaces/monitoring"));

    let calls = r.master.calls();
    let Some(Recorded::Upload { data, mode, .. }) = calls.first() else {
        panic!("values first: {calls:#?}")
    };
    assert_eq!(*data, files::helm_values_yaml(&c));
    assert_eq!(*mode, 0o644);
    for secret in [PASSWORD, API_KEY] {
        assert!(!data.contains(secret), "the values carry no secret");
    }
    assert_eq!(
        r.master.commands(),
        [
            "helm repo add prometheus-community https://prometheus-community.github.io/helm-charts --force-update",
            "helm upgrade --install monitoring prometheus-community/kube-prometheus-stack --version 61.3.0 \
             --namespace monitoring --values /etc/kubernetes/provisioner/monitoring-values.yaml \
             --wait --timeout 15m --kubeconfig /etc/kubernetes/admin.conf",
        ]
    );

    r.installed("kube-prometheus-stack-61.3.0");
    let again = r.plan(&c);
    assert!(again.is_empty(), "{}", again.render(true));
}

#[test]
fn a_changed_value_or_chart_version_plans_an_upgrade_and_only_that() {
    let c = example();
    let r = rig(&c);
    apply(&r.plan(&c), &r.transports, &mut Journal::in_memory()).expect("applies");
    r.installed("kube-prometheus-stack-61.3.0");

    let mut inv = (*c).clone();
    inv.monitoring.retention = "30d".into();
    let longer = inv.clone().validate("").expect("valid");
    let p = r.plan(&longer);
    assert_eq!(
        summaries(&p),
        ["upgrade kube-prometheus-stack 61.3.0 with Helm (values changed)"]
    );
    r.master.clear();
    apply(&p, &r.transports, &mut Journal::in_memory()).expect("applies");
    let calls = r.master.calls();
    let Some(Recorded::Upload { data, .. }) = calls.first() else {
        panic!("{calls:#?}")
    };
    assert!(data.contains("retention: 30d"), "{data}");
    r.installed("kube-prometheus-stack-61.3.0");
    assert!(r.plan(&longer).is_empty());

    inv.monitoring.chart_version = Version {
        major: 62,
        minor: 0,
        patch: 0,
    };
    let newer = inv.validate("").expect("valid");
    let p = r.plan(&newer);
    assert_eq!(
        summaries(&p),
        ["upgrade kube-prometheus-stack 62.0.0 with Helm (kube-prometheus-stack-61.3.0 → kube-prometheus-stack-62.0.0)"]
    );
    assert!(p.render(true).contains("--version 62.0.0"));
}

#[test]
fn a_failed_release_is_upgraded_again() {
    let c = example();
    let r = rig(&c);
    apply(&r.plan(&c), &r.transports, &mut Journal::in_memory()).expect("applies");
    r.installed("kube-prometheus-stack-61.3.0");
    r.master.respond(
        "helm list",
        Output::ok(
            r#"[{"name":"monitoring","status":"failed","chart":"kube-prometheus-stack-61.3.0"}]"#,
        ),
    );
    assert_eq!(
        summaries(&r.plan(&c)),
        ["upgrade kube-prometheus-stack 61.3.0 with Helm (release failed)"]
    );
}

#[test]
fn a_rotated_password_updates_its_secret_and_nothing_else() {
    let c = example();
    let r = rig(&c);
    apply(&r.plan(&c), &r.transports, &mut Journal::in_memory()).expect("applies");
    r.installed("kube-prometheus-stack-61.3.0");
    let mut rotated = env();
    rotated.insert("GRAFANA_ADMIN_PASSWORD".into(), "rotated".into());
    let p = r.plan_with(&c, &rotated).expect("plans");
    assert_eq!(
        summaries(&p),
        ["server-side apply Secret/grafana-admin (update)"]
    );
    assert!(!p.render(true).contains("rotated"));
}

#[test]
fn disabled_monitoring_asks_nothing_and_plans_nothing() {
    let mut inv = (*example()).clone();
    inv.monitoring.enabled = false;
    let c = inv.validate("").expect("valid");
    let r = rig(&c);
    // Not even the secrets are needed.
    let p = r.plan_with(&c, &BTreeMap::new()).expect("plans");
    assert!(p.is_empty());
    assert_eq!(
        p.notes,
        ["monitoring.enabled = false: nothing is installed (and nothing already installed is removed)"]
    );
    assert!(r.master.calls().is_empty());
    assert!(take(&r.api.state).is_empty());
}

#[test]
fn missing_secrets_are_named_and_dotenv_is_read() {
    let c = example();
    let r = rig(&c);
    let err = r.plan_with(&c, &BTreeMap::new()).expect_err("no password");
    assert!(
        err.to_string()
            .starts_with("phase 09-monitoring: missing secret GRAFANA_ADMIN_PASSWORD"),
        "{err}"
    );
    let only_grafana = BTreeMap::from([("GRAFANA_ADMIN_PASSWORD".to_owned(), "x".to_owned())]);
    let err = r.plan_with(&c, &only_grafana).expect_err("no API key");
    assert!(
        err.to_string().contains("missing secret SENDGRID_API_KEY"),
        "{err}"
    );

    // Without e-mail the API key is not needed, and no SMTP Secret is applied.
    let mut inv = (*c).clone();
    inv.monitoring.email = None;
    let quiet = inv.validate("").expect("valid");
    let p = r.plan_with(&quiet, &only_grafana).expect("plans");
    assert!(
        !p.render(true).contains("alertmanager-smtp"),
        "{}",
        p.render(true)
    );

    // From the .env file (the environment wins when both have it).
    let dir = tempfile::tempdir().expect("tempdir");
    let dotenv = dir.path().join(".env");
    std::fs::write(
        &dotenv,
        format!("GRAFANA_ADMIN_PASSWORD={PASSWORD}\nSENDGRID_API_KEY='{API_KEY}'\n"),
    )
    .expect("write");
    let s = monitoring::secrets(&c, &BTreeMap::new(), Some(&dotenv)).expect("from .env");
    assert_eq!(s.grafana_admin_password, PASSWORD);
    assert_eq!(s.sendgrid_api_key.as_deref(), Some(API_KEY));
    let s = monitoring::secrets(&c, &env_with_password("env-wins"), Some(&dotenv)).expect("env");
    assert_eq!(s.grafana_admin_password, "env-wins");
    assert!(!format!("{s:?}").contains("env-wins"));
}

fn env_with_password(p: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("GRAFANA_ADMIN_PASSWORD".to_owned(), p.to_owned())])
}

#[test]
fn the_phase_is_registered_and_reads_its_dotenv_through_the_settings() {
    let c = example();
    let mut r = rig(&c);
    let dir = tempfile::tempdir().expect("tempdir");
    let dotenv = dir.path().join(".env");
    std::fs::write(
        &dotenv,
        format!("GRAFANA_ADMIN_PASSWORD={PASSWORD}\nSENDGRID_API_KEY={API_KEY}\n"),
    )
    .expect("write");
    r.settings.dotenv = Some(dotenv);
    let ctx = Context {
        cluster: &c,
        transports: &r.transports,
        settings: &r.settings,
    };
    let p = phases::plan(PhaseId::Monitoring, &ctx).expect("implemented");
    assert_eq!(p.actions.len(), 2, "{}", p.render(true));
    assert!(PhaseId::Monitoring.implemented());
}

#[test]
fn status_reads_which_turnd_targets_prometheus_has_up() {
    let c = example();
    let r = rig(&c);
    r.master.respond(
        "kubectl --kubeconfig /etc/kubernetes/admin.conf get --raw",
        Output::ok(
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"up","instance":"k8s-worker1","job":"turnd","public_ip":"94.130.141.98"},"value":[1764417600,"1"]}]}}"#,
        ),
    );
    let ctx = Context {
        cluster: &c,
        transports: &r.transports,
        settings: &r.settings,
    };
    let t = monitoring::targets(&ctx).expect("answers");
    assert_eq!(t.up, ["k8s-worker1"]);
    assert_eq!(t.missing(&c), ["k8s-worker2"]);
    r.master.respond(
        "helm list",
        Output::ok(
            r#"[{"name":"monitoring","status":"deployed","chart":"kube-prometheus-stack-61.3.0"}]"#,
        ),
    );
    let h = monitoring::health(&ctx);
    assert_eq!(
        h.lines(&c),
        [
            "release monitoring: kube-prometheus-stack-61.3.0 deployed",
            "turnd targets up in Prometheus: k8s-worker1; missing: k8s-worker2",
        ]
    );
    assert!(!h.ok(&c), "a missing target fails verify");
    r.master.respond(
        "kubectl --kubeconfig /etc/kubernetes/admin.conf get --raw",
        Output::ok(
            r#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{"instance":"k8s-worker1"},"value":[1764417600,"1"]},
                {"metric":{"instance":"k8s-worker2"},"value":[1764417600,"1"]}]}}"#,
        ),
    );
    assert!(monitoring::health(&ctx).ok(&c));
    r.master.respond("helm list", Output::ok("[]"));
    let h = monitoring::health(&ctx);
    assert_eq!(h.lines(&c)[0], "release monitoring: not installed");
    assert!(!h.ok(&c));
    // Through the API server's service proxy, so nothing but the master needs to be reachable.
    assert_eq!(
        monitoring::targets_command(&c).args.last().map(String::as_str),
        Some("/api/v1/namespaces/monitoring/services/http:monitoring-prometheus:9090/proxy/api/v1/query?query=up%7Bjob%3D%22turnd%22%7D")
    );
}

#[test]
fn a_cluster_created_earlier_in_the_run_is_planned_fresh_without_asking() {
    let c = example();
    let mut r = rig(&c);
    r.settings.ahead.cluster = true;
    let p = r.plan(&c);
    assert_eq!(
        summaries(&p),
        [
            "server-side apply Namespace/monitoring (create), Secret/grafana-admin (create), \
             Secret/alertmanager-smtp (create), ConfigMap/turnd-dashboard (create)",
            "install kube-prometheus-stack 61.3.0 with Helm (monitoring not installed)",
        ]
    );
    assert!(r.master.calls().is_empty(), "{:?}", r.master.calls());
    assert!(take(&r.api.state).is_empty());
}

#[test]
fn an_unreachable_api_plans_offline_and_applying_names_the_action() {
    let c = example();
    let mut r = rig(&c);
    // Nothing listens on port 1 of loopback.
    r.settings.kube_api = Some(KubeApi::Url("http://127.0.0.1:1".into()));
    let p = r.plan(&c);
    assert_eq!(p.actions.len(), 2, "{}", p.render(true));
    assert!(p.actions[0]
        .summary
        .contains("Namespace/monitoring (unverified)"));
    assert!(
        p.notes.iter().any(|n| n
            == "the Kubernetes API (http://127.0.0.1:1) did not answer: the objects were not compared with the cluster"),
        "{:?}",
        p.notes
    );
    let err = apply(&p, &r.transports, &mut Journal::in_memory()).expect_err("no API");
    assert!(
        err.to_string().starts_with(
            "phase 09-monitoring, action 1 `server-side apply Namespace/monitoring (unverified)"
        ),
        "{err}"
    );
}

#[test]
fn a_storage_class_gives_prometheus_a_volume_of_storage_size() {
    let mut inv = (*example()).clone();
    inv.monitoring.storage_class = Some("local-path".into());
    inv.monitoring.storage_size = "50Gi".into();
    let c = inv.validate("").expect("valid");
    let values = files::helm_values(&c);
    let spec =
        &values["prometheus"]["prometheusSpec"]["storageSpec"]["volumeClaimTemplate"]["spec"];
    assert_eq!(spec["storageClassName"], "local-path");
    assert_eq!(spec["resources"]["requests"]["storage"], "50Gi");
    let r = rig(&c);
    assert!(
        r.plan(&c).notes.iter().all(|n| !n.contains("emptyDir")),
        "no emptyDir note with a volume"
    );
    // Without a class: an emptyDir of the same size, and the plan says so.
    let c = example();
    let values = files::helm_values(&c);
    assert_eq!(
        values["prometheus"]["prometheusSpec"]["storageSpec"]["emptyDir"]["sizeLimit"],
        "20Gi"
    );
}
