//! The monitoring phase's rules and Alertmanager configuration, checked by the real tools
//! (Debian `prometheus` and `prometheus-alertmanager`): `promtool check rules` and
//! `promtool test rules` (a unit test per alert, in `deploy/monitoring/turnd.rules.test.yaml`)
//! on the shipped files and on the rules as the Helm values carry them; `amtool check-config`
//! on the rendered Alertmanager configuration and `amtool config routes test` showing which
//! receiver each severity reaches. Without the tools the tests skip, unless
//! `TURND_REQUIRE_TOOLS=1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::have_tool;
use provisioner::inventory::{Cluster, Inventory};
use provisioner::render::monitoring as files;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example() -> Cluster {
    Inventory::load(&root().join("deploy/cluster.example.toml")).expect("example is valid")
}

fn run(tool: &str, args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_checks_the_shipped_rules_and_every_alert_has_a_passing_unit_test() {
    if !have_tool("promtool", "prometheus") {
        return;
    }
    let dir = root().join("deploy/monitoring");
    let (ok, out) = run("promtool", &["check", "rules", "turnd.rules.yaml"], &dir);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 11 rules found"), "{out}");
    let (ok, out) = run(
        "promtool",
        &["test", "rules", "turnd.rules.test.yaml"],
        &dir,
    );
    assert!(ok, "{out}");

    // Every alert has at least one test that expects it to fire, and one evaluation where it
    // stays quiet.
    let tests: serde_json::Value = serde_norway::from_str(files::RULES_TESTS).expect("tests parse");
    let groups = files::rule_groups();
    for rule in groups
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        let alert = rule["alert"].as_str().expect("alert rules only");
        let evals: Vec<&serde_json::Value> = tests["tests"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
            .filter(|e| e["alertname"] == alert)
            .collect();
        let fires = evals
            .iter()
            .any(|e| e["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()));
        let quiet = evals
            .iter()
            .any(|e| e["exp_alerts"].as_array().is_some_and(Vec::is_empty));
        assert!(fires, "{alert}: no test where it fires");
        assert!(quiet, "{alert}: no test where it stays quiet");
        for key in ["summary", "description", "runbook"] {
            assert!(
                rule["annotations"][key].is_string(),
                "{alert}: no {key} annotation"
            );
        }
        assert!(
            rule["labels"]["severity"].is_string(),
            "{alert}: no severity"
        );
        let (key, value) = files::ALERT_SOURCE;
        assert_eq!(
            rule["labels"][key], value,
            "{alert}: without the marker label it is never mailed"
        );
    }
}

#[test]
fn the_rules_in_the_helm_values_are_the_checked_ones() {
    if !have_tool("promtool", "prometheus") {
        return;
    }
    let values = files::helm_values(&example());
    let groups = &values["additionalPrometheusRulesMap"]["turnd"];
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("from-values.rules.yaml");
    std::fs::write(&file, serde_norway::to_string(groups).expect("yaml")).expect("write");
    let (ok, out) = run(
        "promtool",
        &["check", "rules", file.to_str().expect("utf-8")],
        dir.path(),
    );
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 11 rules found"), "{out}");
    assert_eq!(groups["groups"], files::rule_groups());
}

#[test]
fn amtool_accepts_the_rendered_alertmanager_config_and_routes_by_severity() {
    if !have_tool("amtool", "prometheus-alertmanager") {
        return;
    }
    let c = example();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("alertmanager.yaml");
    let text = files::alertmanager_yaml(&c.monitoring);
    assert!(
        !text.contains("smtp_auth_password:"),
        "the password is a file, never inline"
    );
    std::fs::write(&file, &text).expect("write");
    let path = file.to_str().expect("utf-8");
    let (ok, out) = run("amtool", &["check-config", path], dir.path());
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    // turnd's alerts carry the marker label its rules set; the chart's defaults do not and
    // are not mailed, whatever their severity, unless the inventory names them (also_mail).
    let (key, value) = files::ALERT_SOURCE;
    let turnd = format!("{key}={value}");
    for (labels, receiver) in [
        (
            vec![
                "alertname=TurndPodDown",
                "severity=critical",
                "instance=k8s-worker1",
                &turnd,
            ],
            "email-critical",
        ),
        (
            vec![
                "alertname=NodeDiskHigh",
                "severity=warning",
                "instance=k8s-worker2",
                &turnd,
            ],
            "email-warning",
        ),
        (
            vec!["alertname=Watchdog", "severity=none", "instance=x"],
            "null",
        ),
        (
            vec!["alertname=KubeCPUOvercommit", "severity=warning"],
            "null",
        ),
        (
            vec!["alertname=KubeAPIErrorBudgetBurn", "severity=critical"],
            "null",
        ),
        // Named in the example inventory's `also_mail`.
        (
            vec![
                "alertname=KubeNodeNotReady",
                "severity=warning",
                "node=k8s-worker1",
            ],
            "email-warning",
        ),
    ] {
        let mut args = vec!["config", "routes", "test", "--config.file", path];
        args.extend(labels.iter().copied());
        let (ok, out) = run("amtool", &args, dir.path());
        assert!(ok, "{out}");
        assert_eq!(
            out.lines().next().map(str::trim),
            Some(receiver),
            "{labels:?} → {out}"
        );
    }
    // The critical route mails both recipients, through SendGrid as user `apikey`.
    let config: serde_json::Value = serde_norway::from_str(&text).expect("yaml");
    assert_eq!(config["global"]["smtp_auth_username"], "apikey");
    assert_eq!(config["global"]["smtp_smarthost"], "smtp.sendgrid.net:587");
    let critical = config["receivers"]
        .as_array()
        .expect("receivers")
        .iter()
        .find(|r| r["name"] == "email-critical")
        .expect("critical receiver");
    assert_eq!(
        critical["email_configs"][0]["to"],
        "oncall@example.net, ops@example.net"
    );
}

#[test]
fn without_email_alertmanager_keeps_every_alert_to_itself() {
    if !have_tool("amtool", "prometheus-alertmanager") {
        return;
    }
    let mut m = example().monitoring.clone();
    m.email = None;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("alertmanager.yaml");
    std::fs::write(&file, files::alertmanager_yaml(&m)).expect("write");
    let path = file.to_str().expect("utf-8");
    let (ok, out) = run("amtool", &["check-config", path], dir.path());
    assert!(ok, "{out}");
    let (ok, out) = run(
        "amtool",
        &[
            "config",
            "routes",
            "test",
            "--config.file",
            path,
            "severity=critical",
        ],
        dir.path(),
    );
    assert!(ok, "{out}");
    assert_eq!(out.lines().next().map(str::trim), Some("null"), "{out}");
}
