//! `provisioner dns ...` and `provisioner cert ...` through the binary: the fake Cloudflare
//! (the one mock: Cloudflare cannot be reached from here) and a real pebble.

mod common;
#[path = "fixtures/acme_support/fake_cloudflare.rs"]
mod fake_cloudflare;
#[path = "fixtures/acme_support/pebble.rs"]
mod pebble;

use std::path::Path;
use std::process::Output;

use fake_cloudflare::FakeCloudflare;
use pebble::Pebble;

/// The example inventory with the zone set to `example.com` and pebble's directory.
fn inventory(dir: &Path, directory: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    ))
    .expect("example inventory")
    .replace("example.net", "example.com")
    .replace("https://acme-v02.api.letsencrypt.org/directory", directory)
    // Without KUBECONFIG, `cert deploy`/`status` try the API through the host: a closed
    // loopback port here, never the example's address.
    .replace(
        "ssh_address = \"94.130.141.98\"",
        "ssh_address = \"127.0.0.1\"",
    )
    .replace("host_port = 22", "host_port = 1");
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).expect("write inventory");
    std::fs::write(dir.join(".env"), "").expect("write .env");
    path
}

async fn run(
    inv: &Path,
    cf: &FakeCloudflare,
    extra_env: &[(&str, String)],
    args: &[&str],
) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_provisioner"));
    cmd.arg("--inventory")
        .arg(inv)
        .args(args)
        .env("CF_Token", fake_cloudflare::TOKEN)
        .env("CF_Zone_ID", fake_cloudflare::ZONE_ID)
        .env("CF_API_BASE", cf.base())
        .env_remove("KUBECONFIG");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    tokio::time::timeout(std::time::Duration::from_secs(120), cmd.output())
        .await
        .expect("bounded")
        .expect("run provisioner")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_and_cert_commands_through_the_binary() {
    let p = Pebble::start(&[]);
    let cf = FakeCloudflare::start(Some(p.chall_management.clone())).await;
    let inv = inventory(p.dir.path(), &p.directory);

    // dns sync: plan shown, applied; a second sync has nothing to do.
    let o = run(
        &inv,
        &cf,
        &[],
        &["dns", "sync", "--record", "A @ 192.0.2.50"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("dns sync: 3 action(s)"), "{}", text(&o));
    assert!(
        out.contains("+ create A turn.example.com 94.130.141.98"),
        "{}",
        text(&o)
    );
    assert!(
        out.contains("+ create A example.com 192.0.2.50"),
        "{}",
        text(&o)
    );
    assert!(
        out.contains("dns sync: applied 3 change(s)"),
        "{}",
        text(&o)
    );
    // Applied through the plan's journal like every other change.
    let journal = std::fs::read_to_string(p.dir.path().join(".provisioner/journal.jsonl"))
        .expect("journal written");
    let records: Vec<serde_json::Value> = journal
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(records.len(), 3, "{journal}");
    assert!(
        records
            .iter()
            .all(|r| r["phase"] == "dns sync" && r["status"] == "done" && r["target"] == "dns-api"),
        "{journal}"
    );
    let o = run(
        &inv,
        &cf,
        &[],
        &["dns", "sync", "--record", "A @ 192.0.2.50"],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "dns sync: up to date\n",
        "{}",
        text(&o)
    );

    // dns add twice (idempotent), list as JSON, delete.
    let o = run(&inv, &cf, &[], &["dns", "add", "TXT", "@", "v=spf1 -all"]).await;
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("created TXT example.com"),
        "{}",
        text(&o)
    );
    let o = run(&inv, &cf, &[], &["dns", "add", "TXT", "@", "v=spf1 -all"]).await;
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("unchanged:"),
        "{}",
        text(&o)
    );
    let o = run(
        &inv,
        &cf,
        &[],
        &["dns", "list", "--type", "TXT", "--output", "json"],
    )
    .await;
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let id = listed[0]["id"].as_str().expect("id").to_owned();
    let o = run(&inv, &cf, &[], &["dns", "delete", &id]).await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("deleted {id}\n")
    );
    // An API error: non-zero exit, Cloudflare's message on stderr.
    let o = run(&inv, &cf, &[], &["dns", "delete", &id]).await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("code 81044: Record does not exist."),
        "{}",
        text(&o)
    );

    // cert issue / renew (not due) / status against pebble.
    let env = [
        ("TURND_ACME_CA_ROOT", p.https_root.display().to_string()),
        ("TURND_ACME_RESOLVERS", p.dns.to_string()),
    ];
    let o = run(&inv, &cf, &env, &["cert", "issue"]).await;
    assert!(o.status.success(), "{}\n{}", text(&o), p.logs());
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .starts_with("issued: certificate for example.com, *.example.com"),
        "{}",
        text(&o)
    );
    let o = run(&inv, &cf, &env, &["cert", "renew"]).await;
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("not due:"),
        "{}",
        text(&o)
    );
    let o = run(
        &inv,
        &cf,
        &env,
        &["cert", "status", "--endpoint", "127.0.0.1:9"],
    )
    .await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("stored: not after"), "{}", text(&o));
    assert!(
        out.contains("127.0.0.1:9: handshake failed"),
        "{}",
        text(&o)
    );
    // deploy without a cluster says what is missing.
    let o = run(&inv, &cf, &env, &["cert", "deploy"]).await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("pass --kubeconfig, set KUBECONFIG, or let the provisioner reach the master through the host"),
        "{}",
        text(&o)
    );
    assert!(p.dir.path().join(".provisioner/certs/tls.crt").exists());

    // deploy to the fake API server (no kube-apiserver runs here): a plan of one action,
    // applied and journaled like the phases'.
    let (addr, state) = common::fake_api::fake_api_server().await;
    let kubeconfig = p.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, common::fake_api::kubeconfig(addr)).expect("write kubeconfig");
    let kubeconfig = kubeconfig.display().to_string();
    let o = run(
        &inv,
        &cf,
        &[],
        &["cert", "deploy", "--kubeconfig", &kubeconfig],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with(
            "cert deploy: 1 action(s)\n   1. [kubernetes-api] deploy TLS Secret turnd/turnd-tls (certificate for example.com, *.example.com, expires "
        ),
        "{}",
        text(&o)
    );
    let stored = state.lock().expect("lock").stored.clone();
    assert_eq!(
        stored["/api/v1/namespaces/turnd/secrets/turnd-tls"]["type"],
        "kubernetes.io/tls"
    );
    let journal =
        std::fs::read_to_string(p.dir.path().join(".provisioner/journal.jsonl")).expect("journal");
    let last: serde_json::Value =
        serde_json::from_str(journal.lines().last().expect("a record")).expect("JSON");
    assert_eq!(
        (&last["phase"], &last["status"]),
        (
            &serde_json::json!("cert deploy"),
            &serde_json::json!("done")
        ),
        "{journal}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_issue_and_renew_dry_run_order_nothing_from_a_real_ca() {
    if !pebble::available() {
        eprintln!("SKIPPED: pebble not installed");
        return;
    }
    let p = Pebble::start(&[]);
    let cf = FakeCloudflare::start(Some(p.chall_management.clone())).await;
    let inv = inventory(p.dir.path(), &p.directory);
    let env = [
        ("TURND_ACME_CA_ROOT", p.https_root.display().to_string()),
        ("TURND_ACME_RESOLVERS", p.dns.to_string()),
    ];
    for args in [
        &["--dry-run", "cert", "issue"][..],
        &["--dry-run", "cert", "renew"][..],
    ] {
        let o = run(&inv, &cf, &env, args).await;
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            format!(
                "dry run: would order a certificate for example.com, *.example.com from {} by DNS-01; no ACME account, order or DNS record was created\n",
                p.directory
            ),
            "{}",
            text(&o)
        );
    }
    assert!(
        p.counts().is_empty(),
        "the CA saw an account or order: {:?}",
        p.counts()
    );
    assert!(!p.dir.path().join(".provisioner/certs/tls.crt").exists());

    // `apply --dry-run` of the turnd phase while the TLS Secret is missing (the fake API
    // server): the order is planned, not placed.
    let (addr, _state) = common::fake_api::fake_api_server().await;
    let kubeconfig = p.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, common::fake_api::kubeconfig(addr)).expect("write kubeconfig");
    let mut apply_env = env.to_vec();
    apply_env.push(("KUBECONFIG", kubeconfig.display().to_string()));
    apply_env.push(("TURND_AUTH_SECRET", "dry-run-secret".to_owned()));
    let o = run(&inv, &cf, &apply_env, &["--dry-run", "apply", "turnd"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!(
            "   1. [local] issue certificate for example.com, *.example.com via ACME DNS-01 ({})\n",
            p.directory
        )),
        "{}",
        text(&o)
    );
    assert!(
        out.contains(", deploy TLS Secret turnd/turnd-tls (the certificate issued above)"),
        "{}",
        text(&o)
    );
    assert!(
        p.counts().is_empty(),
        "the CA saw an account or order: {:?}",
        p.counts()
    );
    assert!(cf.records().is_empty(), "a DNS record was written");

    // The same check sees the account a real issue creates.
    let o = run(&inv, &cf, &env, &["cert", "issue"]).await;
    assert!(o.status.success(), "{}\n{}", text(&o), p.logs());
    let counts = p.counts();
    assert!(
        counts.iter().any(|l| l.contains("accounts in memory")),
        "{counts:?}\n{}",
        p.logs()
    );
}
