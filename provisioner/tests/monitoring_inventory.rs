//! The inventory's `[monitoring]` section: the example's values, defaults for the keys an
//! older inventory lacks, and one clear error (file, line, key, reason) per broken rule.

use std::path::Path;

use provisioner::inventory::{Inventory, DEFAULT_CHART_VERSION};

fn example() -> String {
    std::fs::read_to_string(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example inventory is readable")
}

fn error_of(text: &str) -> String {
    match Inventory::from_toml(text).and_then(|inv| inv.validate(text)) {
        Ok(_) => panic!("inventory was accepted"),
        Err(e) => e.to_string(),
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    let at = text.find(needle).expect("needle present");
    text[..at].matches('\n').count() + 1
}

#[test]
fn the_example_routes_critical_and_warning_by_mail() {
    let text = example();
    let c = Inventory::from_toml(&text)
        .and_then(|i| i.validate(&text))
        .expect("valid");
    let m = &c.monitoring;
    assert!(m.enabled);
    assert_eq!(m.chart_version, DEFAULT_CHART_VERSION);
    let email = m.email.as_ref().expect("email");
    assert_eq!(email.username, "apikey");
    let routes: Vec<(&str, usize)> = email
        .routes
        .iter()
        .map(|r| (r.severity.as_str(), r.to.len()))
        .collect();
    assert_eq!(routes, [("critical", 2), ("warning", 1)]);
}

#[test]
fn an_older_monitoring_section_gets_the_defaults_and_no_email() {
    let text = example();
    let start = text
        .find("# kube-prometheus-stack, pinned")
        .expect("new keys");
    let old = &text[..start];
    let c = Inventory::from_toml(old)
        .and_then(|i| i.validate(old))
        .expect("the four original keys still make a valid section");
    assert_eq!(c.monitoring.chart_version, DEFAULT_CHART_VERSION);
    assert_eq!(c.monitoring.storage_size, "20Gi");
    assert!(c.monitoring.storage_class.is_none());
    assert!(c.monitoring.email.is_none());
}

#[test]
fn broken_rules_name_the_line_and_key() {
    let text = example().replace("retention = \"15d\"", "retention = \"15 days\"");
    let msg = error_of(&text);
    assert_eq!(
        msg,
        format!(
            "<inline>:{}: `monitoring.retention`: `15 days` is not a duration like 15d",
            line_of(&text, "retention =")
        )
    );

    let text = example().replace("storage_size = \"20Gi\"", "storage_size = \"20GB\"");
    assert!(
        error_of(&text).ends_with(
            "`monitoring.storage_size`: `20GB` is not a Kubernetes quantity like 2Gi or 500m"
        ),
        "{}",
        error_of(&text)
    );

    let text = example().replace("severity = \"warning\"", "severity = \"critical\"");
    let msg = error_of(&text);
    assert!(
        msg.ends_with(
            "`monitoring.email.routes[1].severity`: `critical` is already routed by routes[0]"
        ),
        "{msg}"
    );

    let text = example().replace("to = [\"ops@example.net\"]", "to = [\"ops\"]");
    let msg = error_of(&text);
    let want_line = line_of(&text, "to = [\"ops\"]");
    assert_eq!(
        msg,
        format!(
            "<inline>:{want_line}: `monitoring.email.routes[1].to`: `ops` is not an e-mail address"
        )
    );

    let text = example().replace(
        "smarthost = \"smtp.sendgrid.net:587\"",
        "smarthost = \"smtp.sendgrid.net\"",
    );
    assert!(error_of(&text)
        .contains("`monitoring.email.smarthost`: `smtp.sendgrid.net` is not host:port"));

    let text = example().replace("[\"KubeNodeNotReady\"]", "[\"Kube Node\"]");
    assert_eq!(
        error_of(&text),
        format!(
            "<inline>:{}: `monitoring.email.also_mail[0]`: `Kube Node` is not an alert name like KubeNodeNotReady",
            line_of(&text, "also_mail =")
        )
    );

    let text = example().replace("from = \"alerts@example.net\"", "from = \"alerts\"");
    assert!(error_of(&text).contains("`monitoring.email.from`"));

    let text = example().replace("repeat_interval = \"1h\"", "smtp_password = \"x\"");
    assert!(
        error_of(&text).contains("unknown field `smtp_password`"),
        "no secret has a key in the inventory: {}",
        error_of(&text)
    );
}
