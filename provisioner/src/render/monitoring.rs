//! The monitoring phase's files, from the inventory's `[monitoring]` section and the sources in
//! `deploy/monitoring/` (embedded at build time):
//! - the Helm values of kube-prometheus-stack ([`helm_values`]): retention, storage and
//!   resources; the PodMonitor that scrapes turnd's admin port ([`crate::k8s::PORT_ADMIN`]) on the
//!   hostNetwork pods, relabelled so `instance` is the worker and `public_ip` its public IP;
//!   the alert rules ([`RULES`]); the Alertmanager configuration; Grafana with its admin
//!   password from a Secret and its dashboard sidecar;
//! - the Alertmanager configuration ([`alertmanager_config`]): SendGrid's SMTP relay, the
//!   password read from a file the Secret [`SMTP_SECRET`] provides, one e-mail receiver per
//!   severity route of the inventory;
//! - the Kubernetes objects applied beside the chart ([`objects`]): the namespace, the two
//!   Secrets and the dashboard ConfigMap the Grafana sidecar loads by its label.
//!
//! Secrets never appear in these files: the Secrets carry [`Secrets`] values at apply time and
//! placeholders when rendered for review.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::Rendered;
use crate::inventory::{Cluster, Monitoring};

/// The alert rules (Prometheus rule-file format), `deploy/monitoring/turnd.rules.yaml`.
pub const RULES: &str = include_str!("../../../deploy/monitoring/turnd.rules.yaml");
/// Their `promtool test rules` unit tests.
pub const RULES_TESTS: &str = include_str!("../../../deploy/monitoring/turnd.rules.test.yaml");
/// The Grafana dashboard, `deploy/monitoring/turnd-dashboard.json`.
pub const DASHBOARD: &str = include_str!("../../../deploy/monitoring/turnd-dashboard.json");

/// The Helm release.
pub const RELEASE: &str = "monitoring";
/// The chart.
pub const CHART: &str = "prometheus-community/kube-prometheus-stack";
/// The chart's name as `helm list` reports it (`NAME-VERSION`).
pub const CHART_NAME: &str = "kube-prometheus-stack";
/// The chart repository.
pub const REPO_NAME: &str = "prometheus-community";
/// Its URL.
pub const REPO_URL: &str = "https://prometheus-community.github.io/helm-charts";
/// Prometheus' Service (the chart's `fullnameOverride` is the release name).
pub const PROMETHEUS_SERVICE: &str = "monitoring-prometheus";
/// Prometheus' port.
pub const PROMETHEUS_PORT: u16 = 9090;
/// Grafana's Service, the one `provisioner tunnel grafana` forwards to (port 80).
pub const GRAFANA_SERVICE: &str = "grafana";
/// The Secret with Grafana's admin user and password.
pub const GRAFANA_SECRET: &str = "grafana-admin";
/// The Secret with the SMTP password (the SendGrid API key).
pub const SMTP_SECRET: &str = "alertmanager-smtp";
/// Its key.
pub const SMTP_SECRET_KEY: &str = "password";
/// The ConfigMap holding the dashboard.
pub const DASHBOARD_CONFIG_MAP: &str = "turnd-dashboard";
/// The label (and value) the Grafana sidecar loads dashboards by.
pub const DASHBOARD_LABEL: (&str, &str) = ("grafana_dashboard", "1");
/// The label (and value) every turnd alert rule carries: Alertmanager mails alerts with it,
/// not the chart's default alerts (those only with `[monitoring.email] also_mail`).
pub const ALERT_SOURCE: (&str, &str) = ("alert_source", "turnd");
/// The `job` label of turnd's series.
pub const JOB: &str = "turnd";
/// Placeholder for secret values in rendered files.
pub const PLACEHOLDER: &str = "PLACEHOLDER: set from the environment or .env at apply time";

/// Where Alertmanager finds the SMTP password (the operator mounts each Secret listed in
/// `alertmanagerSpec.secrets` there).
pub fn smtp_password_file() -> String {
    format!("/etc/alertmanager/secrets/{SMTP_SECRET}/{SMTP_SECRET_KEY}")
}

/// The secrets of the monitoring phase.
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    /// Grafana's admin password (`GRAFANA_ADMIN_PASSWORD`).
    pub grafana_admin_password: String,
    /// The SendGrid API key (`SENDGRID_API_KEY`), needed when e-mail is configured.
    pub sendgrid_api_key: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(***)")
    }
}

impl Secrets {
    /// Placeholders, for files rendered for review.
    pub fn placeholders() -> Self {
        Self {
            grafana_admin_password: PLACEHOLDER.to_owned(),
            sendgrid_api_key: Some(PLACEHOLDER.to_owned()),
        }
    }
}

fn yaml(v: &Value) -> String {
    // A `Value` always serialises.
    serde_norway::to_string(v).unwrap_or_default()
}

/// The rule groups of [`RULES`] as data.
///
/// # Panics
/// Never for the shipped file (a unit test parses it).
pub fn rule_groups() -> Value {
    let v: Value = serde_norway::from_str(RULES).unwrap_or(Value::Null);
    v.get("groups").cloned().unwrap_or(Value::Array(Vec::new()))
}

/// The Alertmanager configuration: everything goes to the `null` receiver unless it is one of
/// turnd's alerts ([`ALERT_SOURCE`]) or a chart alert the inventory names (`also_mail`), and
/// its `severity` has an e-mail route in the inventory.
pub fn alertmanager_config(m: &Monitoring) -> Value {
    let mut receivers = vec![json!({"name": "null"})];
    let mut severities = Vec::new();
    let mut routes = Vec::new();
    let mut global = json!({"resolve_timeout": "5m"});
    if let Some(email) = &m.email {
        global = json!({
            "resolve_timeout": "5m",
            "smtp_smarthost": email.smarthost,
            "smtp_from": email.from,
            "smtp_auth_username": email.username,
            "smtp_auth_password_file": smtp_password_file(),
            "smtp_require_tls": true,
        });
        for r in &email.routes {
            let name = format!("email-{}", r.severity);
            severities.push(json!({
                "receiver": name,
                "matchers": [format!("severity=\"{}\"", r.severity)],
                "repeat_interval": r.repeat_interval,
            }));
            receivers.push(json!({
                "name": name,
                "email_configs": [{"to": r.to.join(", "), "send_resolved": true}],
            }));
        }
        // Only what is mailed reaches the severity routes; the rest stays with `null`.
        let (label, value) = ALERT_SOURCE;
        routes.push(json!({
            "matchers": [format!("{label}=\"{value}\"")],
            "routes": severities,
        }));
        if !email.also_mail.is_empty() {
            routes.push(json!({
                "matchers": [format!("alertname=~\"{}\"", email.also_mail.join("|"))],
                "routes": severities,
            }));
        }
    }
    json!({
        "global": global,
        "route": {
            "receiver": "null",
            "group_by": ["alertname", "instance"],
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "4h",
            "routes": routes,
        },
        // A critical alert silences the warnings of the same alert name and instance.
        "inhibit_rules": [{
            "source_matchers": ["severity=\"critical\""],
            "target_matchers": ["severity=\"warning\""],
            "equal": ["alertname", "instance"],
        }],
        "receivers": receivers,
        "templates": [],
    })
}

/// The PodMonitor for turnd's pods (hostNetwork: the pod's address is its worker's): the admin
/// port's `/metrics`, with `job` set to [`JOB`], `instance` to the worker's name and
/// `public_ip` to the address the host forwards to it.
pub fn pod_monitor(c: &Cluster) -> Value {
    let mut relabelings = vec![
        json!({"targetLabel": "job", "replacement": JOB, "action": "replace"}),
        json!({
            "sourceLabels": ["__meta_kubernetes_pod_node_name"],
            "targetLabel": "instance",
            "action": "replace",
        }),
    ];
    for t in &c.turnd {
        relabelings.push(json!({
            "sourceLabels": ["__meta_kubernetes_pod_node_name"],
            "regex": t.vm.as_str(),
            "targetLabel": "public_ip",
            "replacement": t.public_ip.to_string(),
            "action": "replace",
        }));
    }
    json!({
        "name": "turnd",
        "namespaceSelector": {"matchNames": [crate::k8s::NAMESPACE]},
        "selector": {"matchLabels": {"app.kubernetes.io/name": "turnd"}},
        "podMetricsEndpoints": [{
            "port": crate::k8s::PORT_ADMIN_NAME,
            "path": "/metrics",
            "interval": "30s",
            "relabelings": relabelings,
        }],
    })
}

fn resources(cpu: Option<&str>, memory: &str) -> Value {
    let mut requests = json!({"memory": memory});
    if let Some(cpu) = cpu {
        requests["cpu"] = json!(cpu);
    }
    json!({"requests": requests, "limits": {"memory": memory}})
}

/// kube-prometheus-stack's values.
pub fn helm_values(c: &Cluster) -> Value {
    let m = &c.monitoring;
    // A volume only with a StorageClass to provision it: a kubeadm cluster has none by
    // default, and a claim nothing provisions keeps Prometheus (and `helm --wait`) pending.
    let storage = match &m.storage_class {
        Some(class) => json!({"volumeClaimTemplate": {"spec": {
            "storageClassName": class,
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": m.storage_size}},
        }}}),
        None => json!({"emptyDir": {"sizeLimit": m.storage_size}}),
    };
    let (label, label_value) = DASHBOARD_LABEL;
    json!({
        "fullnameOverride": RELEASE,
        "crds": {"enabled": true},
        // kubeadm binds these to 127.0.0.1 and Cilium replaces kube-proxy: scraping them
        // would only fire "down" alerts.
        "kubeControllerManager": {"enabled": false},
        "kubeScheduler": {"enabled": false},
        "kubeEtcd": {"enabled": false},
        "kubeProxy": {"enabled": false},
        "prometheus": {
            "prometheusSpec": {
                "retention": m.retention,
                "resources": resources(Some(&m.prometheus_cpu), &m.prometheus_memory),
                "storageSpec": storage,
                "podMonitorSelectorNilUsesHelmValues": false,
                "serviceMonitorSelectorNilUsesHelmValues": false,
                "ruleSelectorNilUsesHelmValues": false,
            },
            "additionalPodMonitors": [pod_monitor(c)],
        },
        "additionalPrometheusRulesMap": {"turnd": {"groups": rule_groups()}},
        "alertmanager": {
            "config": alertmanager_config(m),
            "alertmanagerSpec": {
                "secrets": if m.email.is_some() { json!([SMTP_SECRET]) } else { json!([]) },
                "resources": resources(None, &m.alertmanager_memory),
            },
        },
        "grafana": {
            "fullnameOverride": GRAFANA_SERVICE,
            "admin": {
                "existingSecret": GRAFANA_SECRET,
                "userKey": "admin-user",
                "passwordKey": "admin-password",
            },
            "resources": resources(None, &m.grafana_memory),
            "service": {"type": "ClusterIP", "port": 80},
            "sidecar": {"dashboards": {
                "enabled": true,
                "label": label,
                "labelValue": label_value,
                "searchNamespace": m.namespace,
            }},
        },
    })
}

/// The values file as Helm reads it.
pub fn helm_values_yaml(c: &Cluster) -> String {
    format!(
        "# kube-prometheus-stack {} values: generated by the provisioner from the inventory's\n\
         # [monitoring] section and deploy/monitoring/; do not edit. No secrets: Grafana's admin\n\
         # password and the SMTP password are in the Secrets {GRAFANA_SECRET} and {SMTP_SECRET}.\n{}",
        c.monitoring.chart_version,
        yaml(&helm_values(c))
    )
}

/// The Alertmanager configuration as a file.
pub fn alertmanager_yaml(m: &Monitoring) -> String {
    format!(
        "# Alertmanager configuration: generated by the provisioner from [monitoring.email]; do\n\
         # not edit. The SMTP password is read from the file\n\
         # {} (Secret {SMTP_SECRET}).\n{}",
        smtp_password_file(),
        yaml(&alertmanager_config(m))
    )
}

fn meta(name: &str, namespace: &str, labels: &[(&str, &str)]) -> Value {
    let mut l: BTreeMap<&str, &str> = BTreeMap::from([
        ("app.kubernetes.io/part-of", "turnd"),
        ("app.kubernetes.io/managed-by", crate::k8s::FIELD_MANAGER),
    ]);
    l.extend(labels.iter().copied());
    json!({"name": name, "namespace": namespace, "labels": l})
}

/// The objects applied through the Kubernetes API before the chart: the namespace, Grafana's
/// admin Secret, the SMTP Secret (when e-mail is configured), the dashboard ConfigMap.
pub fn objects(m: &Monitoring, secrets: &Secrets) -> Vec<Value> {
    let ns = &m.namespace;
    let mut ns_meta = meta(ns, ns, &[]);
    if let Some(o) = ns_meta.as_object_mut() {
        o.remove("namespace");
    }
    let mut out = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": ns_meta}),
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": meta(GRAFANA_SECRET, ns, &[]),
            "stringData": {"admin-user": "admin", "admin-password": secrets.grafana_admin_password},
        }),
    ];
    if m.email.is_some() {
        out.push(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": meta(SMTP_SECRET, ns, &[]),
            "stringData": {SMTP_SECRET_KEY: secrets.sendgrid_api_key.clone().unwrap_or_default()},
        }));
    }
    out.push(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": meta(DASHBOARD_CONFIG_MAP, ns, &[DASHBOARD_LABEL]),
        "data": {"turnd-dashboard.json": DASHBOARD},
    }));
    out
}

/// Every file `render --out DIR` writes under `monitoring/`, secrets as placeholders (in
/// `.yaml.placeholder` files, which `kubectl apply -f DIR` does not pick up).
pub fn all(c: &Cluster) -> Vec<Rendered> {
    let m = &c.monitoring;
    let mut out = vec![
        Rendered {
            path: "monitoring/values.yaml".into(),
            contents: helm_values_yaml(c),
        },
        Rendered {
            path: "monitoring/alertmanager.yaml".into(),
            contents: alertmanager_yaml(m),
        },
        Rendered {
            path: "monitoring/turnd.rules.yaml".into(),
            contents: RULES.to_owned(),
        },
        Rendered {
            path: "monitoring/turnd.rules.test.yaml".into(),
            contents: RULES_TESTS.to_owned(),
        },
        Rendered {
            path: "monitoring/turnd-dashboard.json".into(),
            contents: DASHBOARD.to_owned(),
        },
    ];
    for (i, o) in objects(m, &Secrets::placeholders()).iter().enumerate() {
        let id = crate::k8s::object_id(o);
        let mut contents =
            format!("# {id}: generated by the provisioner from the inventory; do not edit.\n");
        let secret = o["kind"] == "Secret";
        if secret {
            contents.push_str(
                "# PLACEHOLDER data, for review only: `provisioner apply` takes the values from\n\
                 # GRAFANA_ADMIN_PASSWORD and SENDGRID_API_KEY (environment or .env).\n",
            );
        }
        contents.push_str(&yaml(o));
        out.push(Rendered {
            // A placeholder Secret is not a `.yaml` file, so `kubectl apply -f DIR` skips it.
            path: format!(
                "monitoring/k8s/{i:02}-{}-{}.yaml{}",
                o["kind"].as_str().unwrap_or_default().to_ascii_lowercase(),
                o["metadata"]["name"].as_str().unwrap_or_default(),
                if secret {
                    crate::k8s::PLACEHOLDER_SUFFIX
                } else {
                    ""
                }
            ),
            contents,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_rules_and_dashboard_parse() {
        let groups = rule_groups();
        let alerts: Vec<&str> = groups
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .filter_map(|r| r["alert"].as_str())
            .collect();
        assert_eq!(alerts.len(), 11, "{alerts:?}");
        let dash: Value = serde_json::from_str(DASHBOARD).expect("dashboard is JSON");
        assert_eq!(dash["uid"], "turnd-overview");
    }

    #[test]
    fn smtp_password_is_a_file_the_operator_mounts() {
        assert_eq!(
            smtp_password_file(),
            "/etc/alertmanager/secrets/alertmanager-smtp/password"
        );
    }
}
