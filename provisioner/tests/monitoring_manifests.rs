//! The monitoring phase's files as the repository keeps them for review: the copies in
//! `deploy/monitoring/example/` are exactly what `render --out` writes for the example
//! inventory (regenerate with `UPDATE_GOLDEN=1 cargo test -p provisioner --test
//! monitoring_manifests`). Its plain Kubernetes objects (namespace, Secrets, dashboard
//! ConfigMap) pass `kubernetes-validate --strict` (PyPI, installed by `.ci/k8s-tools`) for the
//! cluster's Kubernetes version. The chart's own objects (the PodMonitor and PrometheusRule it
//! makes from our values) are custom resources that validator has no schema for; Helm cannot
//! run here.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use provisioner::inventory::Inventory;
use provisioner::render::monitoring as files;

const KUBERNETES_VERSION: &str = "1.29.0";

fn have_validator() -> bool {
    let ok = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("TURND_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "kubernetes-validate is required (TURND_REQUIRE_TOOLS=1): run .ci/k8s-tools"
        );
        eprintln!("SKIPPED: kubernetes-validate not found; run .ci/k8s-tools to install it");
    }
    ok
}

#[test]
fn rendered_monitoring_objects_pass_strict_schema_validation() {
    if !have_validator() {
        return;
    }
    let c = Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("valid");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut paths: Vec<PathBuf> = Vec::new();
    for f in files::all(&c)
        .into_iter()
        .filter(|f| f.path.starts_with("monitoring/k8s/"))
    {
        let p = dir.path().join(f.path.replace('/', "_"));
        std::fs::write(&p, &f.contents).expect("write");
        paths.push(p);
    }
    assert_eq!(paths.len(), 4);
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(&paths)
        .output()
        .expect("kubernetes-validate runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate refused:\n{text}");
    let passed = text
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(passed, paths.len(), "{text}");
}

#[test]
fn rendered_monitoring_secrets_are_placeholder_files_kubectl_apply_skips() {
    let c = Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("valid");
    let objects: Vec<_> = files::all(&c)
        .into_iter()
        .filter(|f| f.path.starts_with("monitoring/k8s/"))
        .collect();
    let mut secrets = 0;
    for f in &objects {
        let is_secret = f.contents.lines().any(|l| l == "kind: Secret");
        secrets += usize::from(is_secret);
        // `kubectl apply -f DIR` takes .yaml, .yml and .json files only.
        assert_eq!(common::kubectl_applies(&f.path), !is_secret, "{}", f.path);
        assert_eq!(
            f.path.ends_with(".yaml.placeholder"),
            is_secret,
            "{}",
            f.path
        );
        if is_secret {
            assert!(f.contents.contains(files::PLACEHOLDER), "{}", f.path);
        }
    }
    assert_eq!(secrets, 2, "Grafana's admin password and the SMTP password");
}

#[test]
fn deploy_monitoring_example_is_what_render_writes_for_the_example_inventory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let c = Inventory::load(&root.join("deploy/cluster.example.toml")).expect("valid");
    let golden = root.join("deploy/monitoring/example");
    // The sources (rules, their tests, the dashboard) live one level up, not copied.
    let rendered: Vec<_> = files::all(&c)
        .into_iter()
        .filter(|f| {
            ![
                "turnd.rules.yaml",
                "turnd.rules.test.yaml",
                "turnd-dashboard.json",
            ]
            .iter()
            .any(|s| f.path.ends_with(s))
        })
        .collect();
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        let _ = std::fs::remove_dir_all(&golden);
        for f in &rendered {
            let p = golden.join(f.path.trim_start_matches("monitoring/"));
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, &f.contents).expect("write");
        }
    }
    for f in &rendered {
        let p = golden.join(f.path.trim_start_matches("monitoring/"));
        let kept = std::fs::read_to_string(&p).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; UPDATE_GOLDEN=1 cargo test -p provisioner --test monitoring_manifests",
                p.display()
            )
        });
        assert_eq!(
            kept,
            f.contents,
            "{} is stale; UPDATE_GOLDEN=1 cargo test -p provisioner --test monitoring_manifests",
            p.display()
        );
    }
}
