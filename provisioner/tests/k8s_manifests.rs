//! turnd's Kubernetes objects as files: the copies kept in `deploy/k8s/` are exactly what the
//! provisioner renders from `deploy/cluster.example.toml`, and a real schema validator
//! (`kubernetes-validate --strict`, PyPI, installed by `.ci/k8s-tools`) accepts them for the
//! Kubernetes version the cluster runs.
//!
//! Regenerate the golden copies after an intended change with
//! `UPDATE_GOLDEN=1 cargo test -p provisioner --test k8s_manifests`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use provisioner::inventory::{Cluster, Inventory};
use provisioner::k8s::{self, Inputs, Sensitive, TlsSource};

/// The cluster's Kubernetes version (inventory `versions.kubernetes` is 1.29.x).
const KUBERNETES_VERSION: &str = "1.29.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example() -> Cluster {
    Inventory::load(&root().join("deploy/cluster.example.toml")).expect("example is valid")
}

fn read_dir(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.expect("dir entry").path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
                .map(|p| {
                    let name = p.file_name().expect("name").to_string_lossy().into_owned();
                    (name, std::fs::read_to_string(&p).expect("readable"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn deploy_k8s_matches_what_the_provisioner_renders_from_the_example_inventory() {
    let golden = root().join("deploy/k8s");
    let tmp = tempfile::tempdir().expect("tempdir");
    let written =
        k8s::render_manifests(&example(), &Inputs::for_review(), tmp.path()).expect("renders");
    assert!(written.iter().all(|p| p.starts_with(tmp.path())));
    let rendered = read_dir(tmp.path());
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        for stale in read_dir(&golden).keys() {
            std::fs::remove_file(golden.join(stale)).expect("remove stale");
        }
        k8s::render_manifests(&example(), &Inputs::for_review(), &golden).expect("renders");
        return;
    }
    let kept = read_dir(&golden);
    assert_eq!(
        kept.keys().collect::<Vec<_>>(),
        rendered.keys().collect::<Vec<_>>(),
        "deploy/k8s has other files than the provisioner renders; \
         UPDATE_GOLDEN=1 cargo test -p provisioner --test k8s_manifests"
    );
    for (name, text) in &rendered {
        assert_eq!(
            &kept[name], text,
            "deploy/k8s/{name} is stale; UPDATE_GOLDEN=1 cargo test -p provisioner --test k8s_manifests"
        );
    }
}

#[test]
fn rendered_secrets_are_placeholders_and_say_so() {
    let files = k8s::Manifests::build(&example(), &Inputs::for_review())
        .and_then(|m| m.rendered(&Inputs::for_review()))
        .expect("renders");
    let secrets: Vec<_> = files
        .iter()
        .filter(|f| f.path.contains("-secret-"))
        .collect();
    assert_eq!(secrets.len(), 2, "auth and TLS");
    for f in secrets {
        assert!(
            f.contents.contains("# PLACEHOLDER data, for review only"),
            "{}",
            f.path
        );
    }
    // Not .yaml, .yml or .json: `kubectl apply -f DIR` skips them, so a placeholder is never
    // applied by accident; every other object is a .yaml file.
    for f in &files {
        let is_secret = f.path.contains("-secret-");
        assert_eq!(
            f.path.ends_with(".yaml.placeholder"),
            is_secret,
            "{}",
            f.path
        );
        assert_eq!(common::kubectl_applies(&f.path), !is_secret, "{}", f.path);
    }
    let auth = files
        .iter()
        .find(|f| f.path.ends_with("secret-turnd-auth.yaml.placeholder"))
        .expect("auth secret file");
    // Secret data is base64 in YAML, as k8s-openapi encodes it.
    let encoded = serde_json::to_value(k8s_openapi::ByteString(
        k8s::PLACEHOLDER_AUTH_SECRET.as_bytes().to_vec(),
    ))
    .expect("encodes");
    let encoded = encoded.as_str().expect("a string");
    assert!(auth.contents.contains(encoded), "{}", auth.contents);
}

/// Whether `kubernetes-validate` runs here. Missing: fails under `TURND_REQUIRE_TOOLS=1` (CI),
/// else the test is skipped with a note.
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

fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .expect("kubernetes-validate runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_strict_schema_validator_accepts_every_object_for_kubernetes_1_29() {
    if !have_validator() {
        return;
    }
    // The golden copies, and the objects as applied (real secret values, the TLS Secret).
    let tmp = tempfile::tempdir().expect("tempdir");
    let inputs = Inputs {
        tls: TlsSource::Pem {
            cert: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            key: Sensitive::new("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"),
        },
        ..Inputs::for_apply(Sensitive::new("s3cret"))
    };
    let mut files = k8s::render_manifests(&example(), &inputs, tmp.path()).expect("renders");
    let golden = root().join("deploy/k8s");
    files.extend(read_dir(&golden).keys().map(|n| golden.join(n)));
    let (ok, text) = validate(&files);
    assert!(ok, "kubernetes-validate refused:\n{text}");
    // One "passed" line per object: nothing was skipped as an unknown kind.
    let passed = text
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(passed, files.len(), "{text}");
}

#[test]
fn the_validator_would_catch_a_wrong_field() {
    if !have_validator() {
        return;
    }
    // Proof that the check above checks: a misspelt field in a Deployment is refused.
    let tmp = tempfile::tempdir().expect("tempdir");
    let files =
        k8s::render_manifests(&example(), &Inputs::for_review(), tmp.path()).expect("renders");
    let deployment = files
        .iter()
        .find(|p| p.to_string_lossy().contains("-deployment-"))
        .expect("a deployment");
    let text = std::fs::read_to_string(deployment).expect("read");
    let broken = text.replace(
        "hostNetwork: true",
        "hostNetwork: true\n      hostNetwrk: true",
    );
    assert_ne!(text, broken);
    std::fs::write(deployment, broken).expect("write");
    let (ok, out) = validate(std::slice::from_ref(deployment));
    assert!(!ok, "{out}");
    assert!(out.contains("hostNetwrk"), "{out}");
}

#[test]
fn each_rendered_file_reads_back_as_exactly_its_typed_object() {
    let inputs = Inputs::for_review();
    let m = k8s::Manifests::build(&example(), &inputs).expect("builds");
    let files = m.rendered(&inputs).expect("renders");
    let objects = m.objects();
    assert_eq!(files.len(), objects.len());
    for (f, o) in files.iter().zip(&objects) {
        let from_yaml: serde_json::Value =
            serde_norway::from_str(&f.contents).expect("rendered YAML parses");
        let typed = match o {
            k8s::Object::Namespace(x) => serde_json::to_value(x),
            k8s::Object::ConfigMap(x) => serde_json::to_value(x),
            k8s::Object::Secret(x) => serde_json::to_value(x),
            k8s::Object::Deployment(x) => serde_json::to_value(x),
            k8s::Object::PodDisruptionBudget(x) => serde_json::to_value(x),
        }
        .expect("serialises");
        assert_eq!(from_yaml, typed, "{}", f.path);
    }
}

#[test]
fn the_inventory_names_the_image_and_a_loaded_image_is_never_pulled() {
    let text = format!(
        "{}\n[container]\nimage = \"localhost/turnd:dev\"\npull = \"never\"\n",
        std::fs::read_to_string(root().join("deploy/cluster.example.toml")).expect("example")
    );
    let c = Inventory::from_toml(&text)
        .and_then(|i| i.validate(&text))
        .expect("valid");
    let m = k8s::Manifests::build(&c, &Inputs::for_review()).expect("builds");
    for d in &m.deployments {
        let container = &d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
            .containers[0];
        assert_eq!(container.image.as_deref(), Some("localhost/turnd:dev"));
        assert_eq!(container.image_pull_policy.as_deref(), Some("Never"));
    }
}
