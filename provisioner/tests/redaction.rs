//! `-v` never prints a secret: the phases that read the master's `admin.conf` and create a
//! join token run over the recording transport (Kubernetes cannot run here: the fake answers
//! with a real-looking kubeconfig and `kubeadm token create` line) under the same log
//! configuration as the binary's `-v`, and the captured log shows the commands but none of
//! the credentials, nor the secrets loaded from `.env`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use provisioner::exec::{Output, RecordingTransport, Transport};
use provisioner::inventory::{Cluster, Inventory};
use provisioner::phases::{self, Context, Settings};
use provisioner::plan::{apply, Journal, PhaseId, Transports};
use provisioner::secrets::Secrets;

const CLIENT_KEY: &str = "LS0tLS1CRUdJTiBFQyBQUklWQVRFIEtFWS0tLS0tCk1IY0NBUUVF";
const CLIENT_CERT: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJrVENDQVRlZ0F3";
const JOIN_TOKEN: &str = "q7x2kd.9vbm3p0w8tz1c4ra";
const AUTH_SECRET: &str = "turnd-rest-secret-from-dotenv";
const CF_TOKEN: &str = "cloudflare-token-from-dotenv";

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn example() -> Cluster {
    Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid")
}

#[test]
fn verbose_logs_show_commands_but_no_credentials() {
    let c = example();
    let dir = tempfile::tempdir().expect("tempdir");
    let dotenv = dir.path().join(".env");
    std::fs::write(
        &dotenv,
        format!("CF_Token={CF_TOKEN}\nCF_Zone_ID=zone\nTURND_AUTH_SECRET={AUTH_SECRET}\n"),
    )
    .expect("write .env");
    let env: BTreeMap<String, String> = BTreeMap::new();
    Secrets::load(&env, &dotenv).expect("secrets load");

    let host = Arc::new(RecordingTransport::new("host"));
    let vms: BTreeMap<String, Arc<RecordingTransport>> = c
        .vms
        .iter()
        .map(|v| {
            (
                v.name.to_string(),
                Arc::new(RecordingTransport::new(v.name.as_str())),
            )
        })
        .collect();
    let master = &vms[c.master().name.as_str()];
    let admin_conf = format!(
        "apiVersion: v1\nclusters:\n- cluster:\n    server: https://{}:6443\n  name: kubernetes\nusers:\n- name: kubernetes-admin\n  user:\n    client-certificate-data: {CLIENT_CERT}\n    client-key-data: {CLIENT_KEY}\n",
        c.master().ip
    );
    master.respond("cat /etc/kubernetes/admin.conf", Output::ok(admin_conf));
    master.respond(
        "kubeadm token create",
        Output::ok(format!(
            "kubeadm join {}:6443 --token {JOIN_TOKEN} --discovery-token-ca-cert-hash sha256:{}\n",
            c.master().ip,
            "1".repeat(64)
        )),
    );
    // A command whose output echoes the .env (a careless `cat`): still masked.
    host.respond(
        "cat /etc/turnd-provisioner/.env",
        Output::ok(format!("TURND_AUTH_SECRET={AUTH_SECRET}\n")),
    );
    master.respond(
        "kubectl --kubeconfig /etc/kubernetes/admin.conf get nodes",
        Output::ok(r#"{"items": []}"#),
    );
    let transports = Transports {
        host: Box::new(Arc::clone(&host)),
        vms: vms
            .iter()
            .map(|(k, v)| (k.clone(), Box::new(Arc::clone(v)) as Box<dyn Transport>))
            .collect(),
    };

    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn,provisioner=debug"))
        .with_writer(log.clone())
        .without_time()
        .with_target(false)
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let settings = Settings::default();
        let ctx = Context {
            cluster: &c,
            transports: &transports,
            settings: &settings,
        };
        for phase in [PhaseId::HostKubectl, PhaseId::K8sWorkers] {
            let plan = phases::plan(phase, &ctx).expect("plans");
            apply(&plan, &transports, &mut Journal::in_memory()).expect("applies");
        }
        host.run(&provisioner::exec::Cmd::new("cat").arg("/etc/turnd-provisioner/.env"))
            .expect("runs");
    });

    let text = String::from_utf8(log.0.lock().expect("buffer").clone()).expect("utf8");
    assert!(
        text.contains("[k8s-master] $ cat /etc/kubernetes/admin.conf -> 0"),
        "the command is logged: {text}"
    );
    assert!(
        text.contains("client-key-data: <redacted>"),
        "the output is logged, masked: {text}"
    );
    assert!(text.contains("--token <redacted>"), "{text}");
    for secret in [CLIENT_KEY, CLIENT_CERT, JOIN_TOKEN, AUTH_SECRET, CF_TOKEN] {
        assert!(
            !text.contains(secret),
            "{secret} leaked into the log:\n{text}"
        );
    }
}
