//! `provisioner tunnel grafana` reaches the Grafana Service the monitoring phase deploys
//! (`grafana`, port 80, in the inventory's monitoring namespace) through the host, on the
//! inventory's local port; `render --out` writes the monitoring files with placeholders only.

use std::path::Path;
use std::process::Command;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/cluster.example.toml"
);

#[test]
fn tunnel_grafana_forwards_the_local_port_to_the_deployed_service() {
    let out = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(["-i", EXAMPLE, "--dry-run", "tunnel", "grafana"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("-L 127.0.0.1:3000:127.0.0.1:3000"),
        "{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with(&format!(
            "root@94.130.141.98 -- 'kubectl --namespace monitoring port-forward service/{} 3000:80'",
            provisioner::render::monitoring::GRAFANA_SERVICE
        )),
        "{stdout}"
    );
    let values = provisioner::render::monitoring::helm_values(
        &provisioner::inventory::Inventory::load(Path::new(EXAMPLE)).expect("valid"),
    );
    assert_eq!(values["grafana"]["fullnameOverride"], "grafana");
    assert_eq!(values["grafana"]["service"]["port"], 80);
}

#[test]
fn rendered_monitoring_files_hold_placeholders_not_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(["-i", EXAMPLE, "render", "--out"])
        .arg(dir.path())
        .env("GRAFANA_ADMIN_PASSWORD", "never-rendered-password")
        .env("SENDGRID_API_KEY", "SG.never-rendered-key")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mon = dir.path().join("monitoring");
    for name in [
        "values.yaml",
        "alertmanager.yaml",
        "turnd.rules.yaml",
        "turnd-dashboard.json",
        "k8s/01-secret-grafana-admin.yaml.placeholder",
        "k8s/02-secret-alertmanager-smtp.yaml.placeholder",
    ] {
        let text = std::fs::read_to_string(mon.join(name)).expect(name);
        assert!(!text.contains("never-rendered"), "{name} carries a secret");
    }
    // `kubectl apply -f monitoring/k8s` takes the .yaml files: none of them is a Secret.
    for entry in std::fs::read_dir(mon.join("k8s")).expect("k8s dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).expect("read");
            assert!(
                !text.lines().any(|l| l == "kind: Secret"),
                "{} is a placeholder Secret kubectl apply would pick up",
                path.display()
            );
        }
    }
    let secret =
        std::fs::read_to_string(mon.join("k8s/02-secret-alertmanager-smtp.yaml.placeholder"))
            .expect("smtp secret");
    assert!(
        secret.contains(provisioner::render::monitoring::PLACEHOLDER),
        "{secret}"
    );
}

#[test]
fn preflight_names_a_missing_monitoring_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env_file = dir.path().join(".env");
    std::fs::write(&env_file, "GRAFANA_ADMIN_PASSWORD=set-in-dotenv\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(["-i", EXAMPLE, "--dry-run", "preflight", "--env-file"])
        .arg(&env_file)
        .env_remove("GRAFANA_ADMIN_PASSWORD")
        .env_remove("SENDGRID_API_KEY")
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "FAIL  monitoring secrets: missing secret SENDGRID_API_KEY: set it in the environment or in {}",
            env_file.display()
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("set-in-dotenv"), "{stdout}");
}
