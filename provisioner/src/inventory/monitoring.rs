//! The `[monitoring]` section: kube-prometheus-stack's chart version, Prometheus' retention,
//! storage and resources, Grafana's tunnel port, and who gets which alerts by e-mail. The
//! Grafana admin password and the SendGrid API key are secrets: they come from the
//! environment or `.env` (`GRAFANA_ADMIN_PASSWORD`, `SENDGRID_API_KEY`), never from here.

use serde::{Deserialize, Serialize};

use super::Version;

/// Monitoring settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Monitoring {
    /// Whether the monitoring phase installs anything (`false` removes nothing either).
    pub enabled: bool,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Prometheus retention, e.g. `15d`.
    pub retention: String,
    /// Local port for `tunnel grafana`.
    pub grafana_local_port: u16,
    /// The kube-prometheus-stack chart version (pinned).
    #[serde(default = "default_chart_version")]
    pub chart_version: Version,
    /// Prometheus' volume size, e.g. `20Gi`.
    #[serde(default = "default_storage_size")]
    pub storage_size: String,
    /// The StorageClass of Prometheus' volume; `None`: no volume, an `emptyDir` of
    /// `storage_size` (the data does not survive the pod).
    #[serde(default)]
    pub storage_class: Option<String>,
    /// Memory requested by and limit of Prometheus, e.g. `2Gi`.
    #[serde(default = "default_prometheus_memory")]
    pub prometheus_memory: String,
    /// CPU requested by Prometheus, e.g. `500m`.
    #[serde(default = "default_prometheus_cpu")]
    pub prometheus_cpu: String,
    /// Memory requested by and limit of Grafana.
    #[serde(default = "default_grafana_memory")]
    pub grafana_memory: String,
    /// Memory requested by and limit of Alertmanager.
    #[serde(default = "default_alertmanager_memory")]
    pub alertmanager_memory: String,
    /// E-mail alerts; `None`: Alertmanager keeps alerts to itself (Grafana and its UI only).
    #[serde(default)]
    pub email: Option<Email>,
}

/// Alert e-mail through an SMTP relay (SendGrid: user `apikey`, the API key as password).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Email {
    /// The sender address.
    pub from: String,
    /// The relay, `host:port`.
    #[serde(default = "default_smarthost")]
    pub smarthost: String,
    /// The SMTP user.
    #[serde(default = "default_smtp_user")]
    pub username: String,
    /// Who gets which severity. Alerts of a severity no route names are not mailed.
    pub routes: Vec<EmailRoute>,
    /// Alerts of kube-prometheus-stack's own rules to mail too, by name (e.g.
    /// `KubeNodeNotReady`); by default only turnd's rules (label
    /// [`crate::render::monitoring::ALERT_SOURCE`]) are mailed.
    #[serde(default)]
    pub also_mail: Vec<String>,
}

/// Alerts of one severity, to these addresses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmailRoute {
    /// The `severity` label the rules set (`critical`, `warning`).
    pub severity: String,
    /// Recipients.
    pub to: Vec<String>,
    /// How often a still-firing alert is mailed again, e.g. `4h`.
    #[serde(default = "default_repeat_interval")]
    pub repeat_interval: String,
}

/// The pinned kube-prometheus-stack chart.
pub const DEFAULT_CHART_VERSION: Version = Version {
    major: 61,
    minor: 3,
    patch: 0,
};

fn default_chart_version() -> Version {
    DEFAULT_CHART_VERSION
}
fn default_storage_size() -> String {
    "20Gi".to_owned()
}
fn default_prometheus_memory() -> String {
    "2Gi".to_owned()
}
fn default_prometheus_cpu() -> String {
    "500m".to_owned()
}
fn default_grafana_memory() -> String {
    "256Mi".to_owned()
}
fn default_alertmanager_memory() -> String {
    "128Mi".to_owned()
}
fn default_smarthost() -> String {
    "smtp.sendgrid.net:587".to_owned()
}
fn default_smtp_user() -> String {
    "apikey".to_owned()
}
fn default_repeat_interval() -> String {
    "4h".to_owned()
}

/// A Prometheus/Alertmanager duration: digits and one unit (`ms`, `s`, `m`, `h`, `d`, `w`,
/// `y`), e.g. `15d`.
fn is_duration(s: &str) -> bool {
    let digits = s.chars().take_while(char::is_ascii_digit).count();
    digits > 0 && ["ms", "s", "m", "h", "d", "w", "y"].contains(&&s[digits..])
}

/// A Kubernetes quantity of the forms we write: digits with an optional binary or decimal
/// suffix (`20Gi`, `500m`, `2`).
fn is_quantity(s: &str) -> bool {
    let digits = s.chars().take_while(char::is_ascii_digit).count();
    digits > 0 && ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&&s[digits..])
}

fn is_address(s: &str) -> bool {
    s.split_once('@')
        .is_some_and(|(user, domain)| !user.is_empty() && domain.contains('.') && !s.contains(' '))
}

impl Monitoring {
    /// The first broken rule, as (key path below `monitoring`, reason).
    pub(super) fn check(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, reason: String| Err((format!("monitoring.{key}"), reason));
        if !is_duration(&self.retention) {
            return fail(
                "retention",
                format!("`{}` is not a duration like 15d", self.retention),
            );
        }
        for (key, value) in [
            ("storage_size", &self.storage_size),
            ("prometheus_memory", &self.prometheus_memory),
            ("prometheus_cpu", &self.prometheus_cpu),
            ("grafana_memory", &self.grafana_memory),
            ("alertmanager_memory", &self.alertmanager_memory),
        ] {
            if !is_quantity(value) {
                return fail(
                    key,
                    format!("`{value}` is not a Kubernetes quantity like 2Gi or 500m"),
                );
            }
        }
        let Some(email) = &self.email else {
            return Ok(());
        };
        if !is_address(&email.from) {
            return fail(
                "email.from",
                format!("`{}` is not an e-mail address", email.from),
            );
        }
        if !email
            .smarthost
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
        {
            return fail(
                "email.smarthost",
                format!("`{}` is not host:port", email.smarthost),
            );
        }
        if email.routes.is_empty() {
            return fail(
                "email.routes",
                "at least one route (severity and recipients) is needed".into(),
            );
        }
        for (i, name) in email.also_mail.iter().enumerate() {
            let mut chars = name.chars();
            let ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return fail(
                    &format!("email.also_mail[{i}]"),
                    format!("`{name}` is not an alert name like KubeNodeNotReady"),
                );
            }
        }
        for (i, r) in email.routes.iter().enumerate() {
            let ok_severity = !r.severity.is_empty()
                && r.severity
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !ok_severity {
                return fail(
                    &format!("email.routes[{i}].severity"),
                    format!("`{}` is not a severity like critical", r.severity),
                );
            }
            if let Some(j) = email.routes[..i]
                .iter()
                .position(|o| o.severity == r.severity)
            {
                return fail(
                    &format!("email.routes[{i}].severity"),
                    format!("`{}` is already routed by routes[{j}]", r.severity),
                );
            }
            if r.to.is_empty() {
                return fail(
                    &format!("email.routes[{i}].to"),
                    "at least one recipient is needed".into(),
                );
            }
            if let Some(bad) = r.to.iter().find(|a| !is_address(a)) {
                return fail(
                    &format!("email.routes[{i}].to"),
                    format!("`{bad}` is not an e-mail address"),
                );
            }
            if !is_duration(&r.repeat_interval) {
                return fail(
                    &format!("email.routes[{i}].repeat_interval"),
                    format!("`{}` is not a duration like 4h", r.repeat_interval),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_quantities_take_the_forms_prometheus_and_kubernetes_read() {
        assert!(is_duration("15d") && is_duration("90m") && is_duration("500ms"));
        assert!(!is_duration("15") && !is_duration("d") && !is_duration("1.5h"));
        assert!(is_quantity("20Gi") && is_quantity("500m") && is_quantity("2"));
        assert!(!is_quantity("20GB") && !is_quantity("Gi") && !is_quantity("-1"));
    }

    #[test]
    fn addresses_need_a_user_and_a_dotted_domain() {
        assert!(is_address("ops@example.net"));
        assert!(!is_address("ops") && !is_address("@example.net") && !is_address("a@b"));
    }
}
