//! The dashboard's queries and the alert rules' expressions, evaluated by a real Prometheus
//! (Debian's `prometheus`, on loopback, configuration written here) against real data:
//! - turnd itself, in-process ([`TestServer::turnd`], with its admin listener and a TLS
//!   certificate), relaying for a TURN client ([`MiniClient`]) to a UDP echo peer, refusing a
//!   wrong password and a second allocation on the same 5-tuple; Prometheus scrapes its admin
//!   listener with the relabelling the rendered PodMonitor carries, so its series get the
//!   `instance` (worker) and `public_ip` labels the dashboard and the rules use;
//! - a real node exporter (Debian's `prometheus-node-exporter`) for the node rules;
//! - a STAND-IN for what cannot run here — the kubelet's cAdvisor and kube-state-metrics (no
//!   Kubernetes on these machines): a loopback HTTP server that serves the series the pod
//!   panels and the pod rules read, in those exporters' names and labels.
//!
//! Every panel's PromQL, with the `${instance}` variable substituted, must parse and return
//! data; the panels that show traffic must show the traffic the client made. Every alert
//! expression must evaluate, and every series it selects must exist. Without `prometheus` the
//! test skips, unless `TURND_REQUIRE_TOOLS=1`.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use provisioner::inventory::{Cluster, Inventory};
use provisioner::render::monitoring as files;
use serde_json::Value;
use turnd_tests::client::MiniClient;
use turnd_tests::peer::EchoPeer;
use turnd_tests::prometheus::Prometheus;
use turnd_tests::server::{Auth, TestServer, LOCALHOST};
use turnd_tests::IO_TIMEOUT;

/// The worker the example inventory runs its first turnd on, and its public IP.
const INSTANCE: &str = "k8s-worker1";
const PUBLIC_IP: &str = "94.130.141.98";
/// Grafana's `$__rate_interval` for this test: long enough to hold the client's traffic.
const RATE_INTERVAL: &str = "1m";
const USER: &str = "alice";
const PASSWORD: &str = "wonderland";

fn example() -> Cluster {
    Inventory::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid")
}

/// A self-signed certificate for turnd's TLS listener, valid until 2099.
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let cert = params.self_signed(&key).expect("self-signed");
    let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::write(&k, key.serialize_pem()).expect("write key");
    (c, k)
}

fn turnd_toml(cert: &Path, key: &Path) -> String {
    format!(
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = [\"127.0.0.1:0\"]\ntls = [\"127.0.0.1:0\"]\n\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [auth]\nrealm = \"turnd.test\"\nusers = [{{ name = \"{USER}\", password = \"{PASSWORD}\" }}]\n\n\
         [relay]\naddresses = [\"127.0.0.1\"]\nmin_port = 62400\nmax_port = 62499\n\n\
         [peers]\nallow = [\"127.0.0.0/8\"]\n\n\
         [server]\nworkers = 2\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        cert.display(),
        key.display()
    )
}

/// The STAND-IN for the kubelet's cAdvisor and kube-state-metrics: the series the pod panels
/// and pod rules read, for turnd's pod on [`INSTANCE`], named and labelled as those exporters
/// name and label them. The CPU counter grows with time, like a busy container's.
struct StandIn {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

fn standin_body(started: Instant) -> String {
    let pod = format!("turnd-{INSTANCE}-5d9c7b8f4-x2x4q");
    let cpu = 0.05 * started.elapsed().as_secs_f64();
    let c = format!("namespace=\"turnd\",pod=\"{pod}\",container=\"turnd\"");
    format!(
        "# TYPE container_cpu_usage_seconds_total counter\n\
         container_cpu_usage_seconds_total{{{c},node=\"{INSTANCE}\"}} {cpu}\n\
         # TYPE container_memory_working_set_bytes gauge\n\
         container_memory_working_set_bytes{{{c},node=\"{INSTANCE}\"}} 48234496\n\
         # TYPE kube_pod_container_resource_limits gauge\n\
         kube_pod_container_resource_limits{{{c},node=\"{INSTANCE}\",resource=\"memory\",unit=\"byte\"}} 1073741824\n\
         # TYPE kube_pod_container_status_restarts_total counter\n\
         kube_pod_container_status_restarts_total{{{c}}} 0\n\
         # TYPE kube_pod_status_ready gauge\n\
         kube_pod_status_ready{{namespace=\"turnd\",pod=\"{pod}\",condition=\"true\"}} 1\n\
         kube_pod_status_ready{{namespace=\"turnd\",pod=\"{pod}\",condition=\"false\"}} 0\n\
         # TYPE kube_deployment_status_replicas_available gauge\n\
         kube_deployment_status_replicas_available{{namespace=\"turnd\",deployment=\"turnd-{INSTANCE}\"}} 1\n"
    )
}

impl StandIn {
    fn start() -> Self {
        let listener = TcpListener::bind((LOCALHOST, 0)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let started = Instant::now();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => serve_once(s, &standin_body(started)),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { addr, stop }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_once(mut s: TcpStream, body: &str) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Debian's node exporter on a loopback port; killed on drop.
struct NodeExporter {
    child: Child,
    addr: SocketAddr,
}

impl NodeExporter {
    fn start() -> Option<Self> {
        let bin = Path::new("/usr/bin/prometheus-node-exporter");
        if !bin.is_file() {
            assert!(
                std::env::var("TURND_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "prometheus-node-exporter is required (TURND_REQUIRE_TOOLS=1)"
            );
            eprintln!("node exporter not installed: the node rules' inputs are not checked");
            return None;
        }
        let addr = TcpListener::bind((LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("free port");
        let child = Command::new(bin)
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node exporter starts");
        Some(Self { child, addr })
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rendered PodMonitor's relabelling as Prometheus scrape-config YAML (the operator's
/// camelCase fields are Prometheus's snake_case ones).
fn relabel_configs(c: &Cluster) -> String {
    let pm = files::pod_monitor(c);
    let mut out = String::from("    relabel_configs:\n");
    for r in pm["podMetricsEndpoints"][0]["relabelings"]
        .as_array()
        .expect("relabelings")
    {
        out.push_str(&format!(
            "      - action: {}\n",
            r["action"].as_str().expect("action")
        ));
        if let Some(src) = r["sourceLabels"].as_array() {
            let names: Vec<&str> = src.iter().filter_map(Value::as_str).collect();
            out.push_str(&format!("        source_labels: [{}]\n", names.join(", ")));
        }
        for (field, key) in [
            ("regex", "regex"),
            ("targetLabel", "target_label"),
            ("replacement", "replacement"),
        ] {
            if let Some(v) = r[field].as_str() {
                out.push_str(&format!("        {key}: '{v}'\n"));
            }
        }
    }
    out
}

fn scrape_configs(
    c: &Cluster,
    turnd: SocketAddr,
    standin: SocketAddr,
    node: Option<SocketAddr>,
) -> String {
    // The pod's node name as Kubernetes service discovery would give it; the PodMonitor's
    // relabelling turns it into `instance` and `public_ip`.
    let mut s = format!(
        "  - job_name: podmonitor/turnd\n    metrics_path: /metrics\n    static_configs:\n      \
         - targets: ['{turnd}']\n        labels:\n          __meta_kubernetes_pod_node_name: {INSTANCE}\n{}\
         \x20 - job_name: kubelet-and-kube-state-metrics-stand-in\n    honor_labels: true\n    \
         static_configs:\n      - targets: ['{standin}']\n",
        relabel_configs(c)
    );
    if let Some(node) = node {
        s.push_str(&format!(
            "  - job_name: node-exporter\n    static_configs:\n      - targets: ['{node}']\n"
        ));
    }
    s
}

/// Every panel's queries: (panel title, PromQL with the variables substituted).
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(files::DASHBOARD).expect("dashboard JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"]
                .as_str()
                .expect("expr")
                .replace("${instance}", INSTANCE)
                .replace("$instance", INSTANCE)
                .replace("$__rate_interval", RATE_INTERVAL);
            assert!(!expr.contains('$'), "an unsubstituted variable in {expr}");
            out.push((p["title"].as_str().expect("title").to_owned(), expr));
        }
    }
    out
}

/// The vector selectors of the exporters' series in `expr`: `name` or `name{matchers}`.
fn selectors(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts_metric = ["turnd_", "kube_", "node_", "container_"]
            .iter()
            .any(|p| rest.starts_with(p))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if !starts_metric {
            i += 1;
            continue;
        }
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let mut end = name_len;
        if rest[name_len..].starts_with('{') {
            end = name_len + rest[name_len..].find('}').expect("closing brace") + 1;
        }
        out.push(rest[..end].to_owned());
        i += end;
    }
    out
}

fn result_of(answer: &Value) -> &Vec<Value> {
    answer["data"]["result"]
        .as_array()
        .expect("a vector result")
}

fn value_of(p: &Prometheus, promql: &str) -> f64 {
    let a = p.query_answer(promql).expect("Prometheus answers");
    result_of(&a)
        .first()
        .and_then(|r| r["value"][1].as_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value for {promql}: {a}"))
}

/// Relays `n` datagrams each way through channel 0x4000 and `n` Send indications, refuses a
/// second Allocate on the same 5-tuple (437) and a wrong password (401).
async fn traffic(server: SocketAddr, peer: SocketAddr, n: usize) -> MiniClient {
    let mut c = MiniClient::new(server, USER, PASSWORD)
        .await
        .expect("client");
    c.allocate()
        .await
        .expect("allocate")
        .success()
        .expect("allocated");
    c.create_permission(peer)
        .await
        .expect("permission")
        .success()
        .expect("permitted");
    c.channel_bind(0x4000, peer)
        .await
        .expect("bind")
        .success()
        .expect("bound");
    for i in 0..n {
        c.send_channel(0x4000, format!("channel {i}").as_bytes())
            .await
            .expect("send");
        c.recv_data(IO_TIMEOUT)
            .await
            .expect("recv")
            .expect("echoed");
        c.send_indication(peer, format!("indication {i}").as_bytes())
            .await
            .expect("send");
        c.recv_data(IO_TIMEOUT)
            .await
            .expect("recv")
            .expect("echoed");
    }
    let again = c.allocate().await.expect("an answer");
    assert_eq!(again.error_code(), Some(437), "allocation mismatch");
    let mut wrong = MiniClient::new(server, USER, "not-the-password")
        .await
        .expect("client");
    let refused = wrong.allocate().await.expect("an answer");
    assert_eq!(refused.error_code(), Some(401), "wrong password");
    c
}

#[test]
fn every_dashboard_query_and_alert_expression_evaluates_against_a_relaying_turnd() {
    let Some(binary) = Prometheus::find() else {
        return;
    };
    let c = example();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = certificate(dir.path());
    let server = TestServer::turnd(&turnd_toml(&cert, &key), Auth::alice()).expect("turnd starts");
    let admin = server.admin();
    // A TCP client connection held open after a Binding request (RFC 8489 §6: type 0x0001,
    // no attributes, the magic cookie, a transaction id), as a TURN-over-TCP client would.
    let tcp = server.running().expect("turnd").tcp[0];
    let mut held = TcpStream::connect_timeout(&tcp, IO_TIMEOUT).expect("tcp connect");
    held.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut binding = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    binding.extend_from_slice(b"monitoring!!");
    held.write_all(&binding).expect("send binding");
    let mut header = [0u8; 20];
    held.read_exact(&mut header)
        .expect("binding answered over TCP");
    assert_eq!(&header[..2], &[0x01, 0x01], "a Binding success response");
    let peer = EchoPeer::start(LOCALHOST).expect("peer");
    let standin = StandIn::start();
    let node = NodeExporter::start();
    let prom = Prometheus::start_with(
        &binary,
        &scrape_configs(&c, admin, standin.addr, node.as_ref().map(|n| n.addr)),
    )
    .expect("prometheus starts");

    // Scraped once before the traffic, so the counters' rates see it.
    let up = prom.wait_for(
        &format!("up{{job=\"turnd\", instance=\"{INSTANCE}\", public_ip=\"{PUBLIC_IP}\"}}"),
        Duration::from_secs(30),
        |v| v == 1.0,
    );
    assert_eq!(up, Some(1.0), "turnd not scraped:\n{}", prom.log());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _client = rt.block_on(traffic(server.addr, peer.addr, 20));
    // Scraped again after the traffic.
    let seen = prom.wait_for(
        &format!("sum(turnd_relayed_packets_total{{instance=\"{INSTANCE}\"}})"),
        Duration::from_secs(30),
        |v| v >= 80.0,
    );
    assert!(
        seen.is_some(),
        "the relayed packets never reached Prometheus"
    );
    if node.is_some() {
        prom.wait_for("up{job=\"node-exporter\"}", Duration::from_secs(30), |v| {
            v == 1.0
        })
        .expect("node exporter scraped");
    }
    // Two stand-in scrapes at least, for the CPU rate.
    std::thread::sleep(Duration::from_secs(3));

    // The instance variable lists the worker.
    let reply = turnd_tests::http::get(
        prom.api,
        &format!(
            "/api/v1/label/instance/values?match[]={}",
            turnd_tests::http::encode("turnd_build_info")
        ),
    )
    .expect("label values");
    let values: Value = serde_json::from_str(&reply.body).expect("json");
    assert_eq!(values["data"], serde_json::json!([INSTANCE]), "{values}");

    // Every panel query parses and returns data.
    let mut failures = Vec::new();
    let queries = dashboard_queries();
    assert_eq!(queries.len(), 17);
    for (title, expr) in &queries {
        match prom.query_answer(expr) {
            Ok(a) if a["status"] == "success" && !result_of(&a).is_empty() => {}
            Ok(a) => failures.push(format!("{title}: `{expr}` → {a}")),
            Err(e) => failures.push(format!("{title}: `{expr}` → {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "panels without data:\n{}",
        failures.join("\n")
    );

    // The panels show the traffic the client made.
    let q = |title: &str, nth: usize| {
        queries
            .iter()
            .filter(|(t, _)| t == title)
            .nth(nth)
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| panic!("no panel {title}"))
    };
    assert!(value_of(&prom, &q("Active allocations", 0)) >= 1.0);
    for direction in ["client_to_peer", "peer_to_client"] {
        let bits = format!("sum({}) by (direction)", q("Relayed bits/s", 0));
        let a = prom.query_answer(&bits).expect("answer");
        let v = result_of(&a)
            .iter()
            .find(|r| r["metric"]["direction"] == direction)
            .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(v > 0.0, "no {direction} bits/s: {a}");
    }
    assert!(value_of(&prom, &format!("sum({})", q("Relayed packets/s", 0))) > 0.0);
    assert!(value_of(&prom, &format!("sum({})", q("Allocation rate", 0))) > 0.0);
    assert!(value_of(&prom, &format!("sum({})", q("Rejections by reason", 0))) > 0.0);
    assert!(value_of(&prom, &format!("sum({})", q("Authentication failures", 0))) > 0.0);
    assert!(value_of(&prom, &format!("sum({})", q("TCP/TLS connections", 0))) >= 1.0);
    assert!(
        value_of(
            &prom,
            &format!("sum({})", q("Relay ports used vs available", 0))
        ) >= 1.0
    );
    assert!(
        value_of(
            &prom,
            &format!("sum({})", q("Relay ports used vs available", 1))
        ) > 0.0
    );
    assert!(value_of(&prom, &q("Certificate days left", 0)) > 14.0);
    assert!(value_of(&prom, &q("Draining", 0)).abs() < f64::EPSILON);
    assert!(value_of(&prom, &format!("sum({})", q("Pod CPU", 0))) > 0.0);
    assert!(value_of(&prom, &format!("sum({})", q("Pod memory", 0))) > 0.0);

    // Every alert expression evaluates, and every series it selects exists.
    let groups = files::rule_groups();
    let mut checked = 0;
    for rule in groups
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        let alert = rule["alert"].as_str().expect("alert");
        let expr = rule["expr"].as_str().expect("expr");
        let a = prom.query_answer(expr).expect("answer");
        assert_eq!(a["status"], "success", "{alert}: `{expr}` → {a}");
        // A healthy, lightly loaded turnd fires none of turnd's own alerts.
        if alert.starts_with("Turnd") {
            assert!(result_of(&a).is_empty(), "{alert} fires: {a}");
        }
        for sel in selectors(expr) {
            if sel.starts_with("node_") && node.is_none() {
                continue;
            }
            let n = value_of(&prom, &format!("count({sel})"));
            assert!(n >= 1.0, "{alert}: no series for {sel}");
            checked += 1;
        }
    }
    // Eleven rules select eighteen series, five of them the node exporter's.
    let want = if node.is_some() { 18 } else { 13 };
    assert_eq!(checked, want, "selectors checked");
}

#[test]
fn selectors_are_found_with_their_matchers() {
    assert_eq!(
        selectors("sum by (x) (rate(turnd_a_total{reason!=\"u\"}[5m])) / node_b > 0 and kube_c"),
        ["turnd_a_total{reason!=\"u\"}", "node_b", "kube_c"]
    );
}
