//! End to end with real packets: the host networking the provisioner generates, applied with
//! `iptables-restore` in a "host" network namespace, forwards two public addresses to two
//! turnd workers, and a TURN client on the public side relays through each of them.
//!
//! Topology (every namespace is created by this test and deleted when it ends, even on panic):
//! ```text
//!  client 203.0.113.2 ──┐            ┌── vmbr 10.10.10.1 ── worker1 10.10.10.11 (turnd)
//!                       host (203.0.113.10, 203.0.113.11, 198.51.100.1)
//!  peer 198.51.100.2 ───┘            └──────────────────── worker2 10.10.10.12 (turnd)
//! ```
//! The host also carries Docker- and libvirt-like foreign rules (a `DOCKER` nat chain, a
//! `LIBVIRT_FWI`-style FORWARD chain that rejects new connections into the VM network, and a
//! libvirt-style MASQUERADE): the relay only works if our jumps come first, and those rules
//! must survive apply and teardown untouched.
//!
//! Every packet stays inside these namespaces: every client, server and peer runs under
//! `ip netns exec`. Needs root, `ip`, `iptables`, coturn's `turnutils_uclient` and
//! `turnutils_stunclient`, `python3`, and the `turnd` binary next to this test's executable
//! (`cargo build -p turnd` into the same target directory; `cargo test --workspace` does it).
//! Missing pieces skip the test, or fail it under `TURND_REQUIRE_TOOLS=1`.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::run::{run, text};
use provisioner::hostnet::{HostNet, JUMPS};
use provisioner::inventory::Inventory;

const SECRET: &str = "e2e-rest-secret";
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const PUBLIC: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 10),
    Ipv4Addr::new(203, 0, 113, 11),
];
const PEER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const PEER_PORT: u16 = 3480;
const MESSAGES: u64 = 50;

fn required() -> bool {
    std::env::var("TURND_REQUIRE_TOOLS").as_deref() == Ok("1")
}

/// Says why the test skips, or fails under `TURND_REQUIRE_TOOLS=1`.
fn skip(why: &str) {
    assert!(!required(), "{why} (TURND_REQUIRE_TOOLS=1)");
    eprintln!("SKIPPED: {why}");
}

fn find(tool: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// `target/<profile>/turnd`, next to `target/<profile>/deps/<this test>`.
fn turnd_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let bin = profile_dir.join("turnd");
    bin.is_file().then_some(bin)
}

/// Runs `ip ARGS` in the root namespace (topology setup only) and requires success.
fn ip(args: &[&str]) {
    let o = run(Command::new("ip").args(args), Duration::from_secs(10));
    assert!(o.status.success(), "ip {args:?}: {}", text(&o));
}

/// A background process, killed when dropped.
struct Proc {
    child: Child,
    name: String,
    output: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `argv` inside namespace `ns`, collecting stdout and stderr lines.
    fn spawn(ns: &str, name: &str, argv: &[&str]) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut s = sink.lock().expect("lock");
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        Self {
            child,
            name: name.to_owned(),
            output,
        }
    }

    fn output(&self) -> String {
        self.output.lock().expect("lock").clone()
    }

    /// Waits until the output has a line containing `needle`.
    fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.name, self.output());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not print `{needle}` within {timeout:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The namespaces, deleted on drop (after the processes in them, which are declared later and
/// so dropped first).
struct Topology {
    prefix: String,
    created: Vec<String>,
}

impl Topology {
    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn build() -> Self {
        let prefix = format!("thn{}", std::process::id());
        let mut t = Self {
            prefix,
            created: Vec::new(),
        };
        for role in ["host", "client", "peer", "w1", "w2"] {
            let ns = t.ns(role);
            ip(&["netns", "add", &ns]);
            t.created.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let (host, client, peer) = (t.ns("host"), t.ns("client"), t.ns("peer"));
        // Public side: client and peer on two TEST-NET networks.
        for (other, host_if) in [(&client, "pub0"), (&peer, "peer0")] {
            ip(&[
                "link", "add", "eth0", "netns", other, "type", "veth", "peer", "name", host_if,
                "netns", &host,
            ]);
            ip(&["-n", other, "link", "set", "eth0", "up"]);
            ip(&["-n", &host, "link", "set", host_if, "up"]);
        }
        ip(&[
            "-n",
            &client,
            "addr",
            "add",
            &format!("{CLIENT}/24"),
            "dev",
            "eth0",
        ]);
        for p in PUBLIC {
            ip(&[
                "-n",
                &host,
                "addr",
                "add",
                &format!("{p}/24"),
                "dev",
                "pub0",
            ]);
        }
        ip(&[
            "-n",
            &peer,
            "addr",
            "add",
            &format!("{PEER}/24"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &host,
            "addr",
            "add",
            "198.51.100.1/24",
            "dev",
            "peer0",
        ]);
        ip(&[
            "-n",
            &peer,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.1",
        ]);
        // VM side: a bridge like libvirt's virbr1, one veth per worker.
        ip(&["-n", &host, "link", "add", "vmbr", "type", "bridge"]);
        ip(&["-n", &host, "addr", "add", "10.10.10.1/24", "dev", "vmbr"]);
        ip(&["-n", &host, "link", "set", "vmbr", "up"]);
        for (role, addr) in [("w1", "10.10.10.11/24"), ("w2", "10.10.10.12/24")] {
            let w = t.ns(role);
            let host_if = format!("v{role}");
            ip(&[
                "link", "add", "eth0", "netns", &w, "type", "veth", "peer", "name", &host_if,
                "netns", &host,
            ]);
            ip(&["-n", &host, "link", "set", &host_if, "master", "vmbr", "up"]);
            ip(&["-n", &w, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", &w, "link", "set", "eth0", "up"]);
            ip(&["-n", &w, "route", "add", "default", "via", "10.10.10.1"]);
        }
        t.exec_ok("host", &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        t
    }

    /// Runs `argv` in namespace `role` and requires success.
    fn exec_ok(&self, role: &str, argv: &[&str]) -> String {
        let o = self.exec(role, argv, Duration::from_secs(20));
        assert!(o.status.success(), "{role}: {argv:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn exec(&self, role: &str, argv: &[&str], timeout: Duration) -> Output {
        run(
            Command::new("ip")
                .args(["netns", "exec", &self.ns(role)])
                .args(argv),
            timeout,
        )
    }

    /// `iptables-save` of the host without comments and counters.
    fn save(&self) -> String {
        self.exec_ok("host", &["iptables-save"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                if l.starts_with(':') {
                    l.rsplit_once(' ').map_or(l, |(a, _)| a)
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The example inventory with the public IPs moved to TEST-NET-3.
fn inventory() -> provisioner::inventory::Cluster {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    );
    let text = std::fs::read_to_string(path)
        .expect("example inventory")
        .replace("94.130.141.98", &PUBLIC[0].to_string())
        .replace("94.130.141.99", &PUBLIC[1].to_string());
    Inventory::from_toml(&text)
        .and_then(|i| i.validate(&text))
        .expect("test inventory is valid")
}

/// turnd's configuration for one worker: the provisioner's generated `turnd.toml` (what the
/// ConfigMap carries: binds the worker, advertises its public IP, UDP/TCP 3478 and TLS 5349/443),
/// changed only where this test must: the TLS directory points at a test certificate, logs are
/// text (the test reads them), TEST-NET peers are allowed (refused by default; the echo peer
/// lives there), one worker thread, and RFC 5766 channel numbers for `turnutils_uclient`.
fn turnd_config(cluster: &provisioner::inventory::Cluster, i: usize, tls_dir: &Path) -> String {
    let generated = provisioner::k8s::turnd_toml(cluster, i).expect("generated turnd.toml");
    assert!(
        generated.contains(provisioner::k8s::mounts::TLS_DIR)
            && generated.contains("format = \"json\""),
        "the generated config changed shape:\n{generated}"
    );
    let mut cfg = generated
        .replace(
            provisioner::k8s::mounts::TLS_DIR,
            &tls_dir.display().to_string(),
        )
        .replace("format = \"json\"", "format = \"text\"");
    cfg.push_str(
        "\n[peers]\nallow = [\"198.51.100.0/24\"]\n\n[server]\nworkers = 1\nrfc5766_channel_numbers = true\n",
    );
    cfg
}

const ECHO_PEER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
seen = set()
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
    if addr not in seen:
        seen.add(addr)
        print("from %s:%d" % addr, flush=True)
"#;

/// `start_mclient: tot_send_msgs=S, tot_recv_msgs=R` and `Total lost packets N`.
fn uclient_summary(out: &str) -> Option<(u64, u64, u64)> {
    let field = |key: &str| -> Option<u64> {
        let line = out.lines().rev().find(|l| l.contains(key))?;
        let rest = &line[line.find(key)? + key.len()..];
        rest.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    Some((
        field("tot_send_msgs=")?,
        field("tot_recv_msgs=")?,
        field("Total lost packets ")?,
    ))
}

/// `relayed=IP:PORT` of every "allocation created" line of a turnd log, with the transport.
fn allocations(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter(|l| l.contains("allocation created"))
        .filter_map(|l| {
            let relayed = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("relayed="))?;
            let transport = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("transport="))
                .unwrap_or("?");
            Some((relayed.trim_matches('"').to_owned(), transport.to_owned()))
        })
        .collect()
}

#[test]
fn turn_relays_through_generated_host_dnat_to_two_workers_over_udp_and_tcp() {
    let started = Instant::now();
    if !nix_root() {
        skip("needs root for network namespaces");
        return;
    }
    for tool in [
        "ip",
        "iptables",
        "iptables-restore",
        "iptables-save",
        "turnutils_uclient",
        "turnutils_stunclient",
        "python3",
    ] {
        if find(tool).is_none() {
            skip(&format!(
                "`{tool}` not found (apt-get install iproute2 iptables coturn python3)"
            ));
            return;
        }
    }
    let Some(turnd) = turnd_binary() else {
        skip("the turnd binary is not next to this test (cargo build -p turnd)");
        return;
    };
    let uclient = find("turnutils_uclient").expect("checked");
    let stunclient = find("turnutils_stunclient").expect("checked");

    let cluster = inventory();
    let hostnet = HostNet::from_cluster(&cluster).expect("renders");
    let files = hostnet.files();
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, contents: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, contents).expect("write");
        p.to_string_lossy().into_owned()
    };
    let rules = write("rules.v4", &files.rules);
    let teardown = write("teardown.v4", &files.teardown);
    let jumps = write("jumps.sh", &files.jumps);

    let topo = Topology::build();

    // Foreign rules, as Docker and libvirt leave them, before ours.
    let foreign = [
        "iptables -t nat -N DOCKER",
        "iptables -t nat -A DOCKER -i docker0 -j RETURN",
        "iptables -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        "iptables -t nat -A POSTROUTING -s 10.10.10.0/24 ! -d 10.10.10.0/24 -j MASQUERADE",
        "iptables -N LIBVIRT_FWI",
        "iptables -A LIBVIRT_FWI -d 10.10.10.0/24 -o vmbr -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "iptables -A LIBVIRT_FWI -o vmbr -j REJECT --reject-with icmp-port-unreachable",
        "iptables -I FORWARD 1 -j LIBVIRT_FWI",
        "iptables -A FORWARD -s 192.0.2.0/24 -j DROP",
    ];
    for rule in foreign {
        topo.exec_ok("host", &rule.split(' ').collect::<Vec<_>>());
    }
    let before = topo.save();

    // Apply exactly what the systemd unit runs.
    let apply = |topo: &Topology| {
        topo.exec_ok("host", &["iptables-restore", "--wait", "--noflush", &rules]);
        topo.exec_ok("host", &["sh", &jumps, "apply"]);
    };
    let t = Instant::now();
    apply(&topo);
    eprintln!("applied in {:?}", t.elapsed());
    let applied = topo.save();
    let drift = hostnet.verify(&topo.exec_ok("host", &["iptables-save"]));
    assert!(drift.is_clean(), "after apply:\n{drift}\n{applied}");
    for line in before.lines().filter(|l| l.starts_with("-A")) {
        assert!(
            applied.contains(line),
            "apply removed a foreign rule: {line}\n{applied}"
        );
    }

    // Re-applying changes nothing: every rule checks, and the saved rules are identical.
    apply(&topo);
    assert_eq!(topo.save(), applied, "re-applying changed the rules");
    for rule in hostnet.rules() {
        let args = rule.check_args();
        let mut argv = vec!["iptables"];
        argv.extend(args.iter().map(String::as_str));
        topo.exec_ok("host", &argv);
    }
    for j in JUMPS {
        topo.exec_ok(
            "host",
            &["iptables", "-t", j.table.as_str(), "-C", j.from, "-j", j.to],
        );
    }

    // Servers: turnd in each worker, the echo peer on the public side.
    let turnd_path = turnd.to_string_lossy().into_owned();
    let mut servers = Vec::new();
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir_all(&tls_dir).expect("mkdir tls");
    let cert = rcgen::generate_simple_self_signed(vec![cluster.domain.turn.clone()]).expect("cert");
    std::fs::write(tls_dir.join("tls.crt"), cert.cert.pem()).expect("write cert");
    std::fs::write(tls_dir.join("tls.key"), cert.key_pair.serialize_pem()).expect("write key");
    let secret_env = format!("TURND_AUTH_SECRET={SECRET}");
    for (i, role) in ["w1", "w2"].iter().enumerate() {
        let cfg = write(
            &format!("turnd-{role}.toml"),
            &turnd_config(&cluster, i, &tls_dir),
        );
        servers.push(Proc::spawn(
            &topo.ns(role),
            &format!("turnd in {role}"),
            &["env", &secret_env, &turnd_path, "--config", &cfg],
        ));
    }
    let mut peer = Proc::spawn(
        &topo.ns("peer"),
        "echo peer",
        &[
            "python3",
            "-c",
            ECHO_PEER,
            &PEER.to_string(),
            &PEER_PORT.to_string(),
        ],
    );
    peer.wait_for("listening", Duration::from_secs(10));

    // STUN through each public address: turnd answers once it is up, and sees the client's
    // own address (DNAT rewrites only the destination).
    for public in PUBLIC {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let o = topo.exec(
                "client",
                &[stunclient.to_str().expect("utf-8"), &public.to_string()],
                Duration::from_secs(10),
            );
            let out = text(&o);
            if o.status.success() && out.contains("UDP reflexive addr: ") {
                assert!(
                    out.contains(&format!("UDP reflexive addr: {CLIENT}:")),
                    "{out}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no STUN answer through {public}:\n{out}\n{}\n{}",
                servers[0].output(),
                servers[1].output()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // TURN: allocate through each public IP, over UDP and TCP, relay to the peer and back.
    for (transport, extra) in [("udp", None), ("tcp", Some("-t"))] {
        for (i, public) in PUBLIC.iter().enumerate() {
            let before_allocs = allocations(&servers[i].output()).len();
            let mut argv = vec![
                uclient.to_str().expect("utf-8").to_owned(),
                "-u".into(),
                "e2e".into(),
                "-W".into(),
                SECRET.into(),
                "-e".into(),
                PEER.to_string(),
                "-r".into(),
                PEER_PORT.to_string(),
                "-n".into(),
                MESSAGES.to_string(),
                "-m".into(),
                "1".into(),
                "-l".into(),
                "120".into(),
                "-c".into(),
                "-X".into(),
            ];
            argv.extend(extra.map(str::to_owned));
            argv.push(public.to_string());
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let o = topo.exec("client", &argv, Duration::from_secs(60));
            let out = text(&o);
            let tail: Vec<&str> = out.lines().rev().take(15).collect();
            assert!(
                o.status.success(),
                "uclient over {transport} via {public} failed:\n{tail:#?}\n{}",
                servers[i].output()
            );
            let (sent, received, lost) =
                uclient_summary(&out).unwrap_or_else(|| panic!("no uclient summary:\n{tail:#?}"));
            assert!(sent > 0, "{tail:#?}");
            assert_eq!((sent, received, lost), (MESSAGES, MESSAGES, 0), "{tail:#?}");
            assert!(out.contains("Total lost packets 0 "), "{tail:#?}");

            // XOR-RELAYED-ADDRESS is the public address (turnd logs what it advertised and
            // what it bound), and the peer saw the relay from that same public address:port.
            let log = servers[i].output();
            let new: Vec<(String, String)> =
                allocations(&log).into_iter().skip(before_allocs).collect();
            assert!(!new.is_empty(), "no allocation logged:\n{log}");
            let want_transport = transport;
            for (relayed, t) in &new {
                assert!(
                    relayed.starts_with(&format!("{public}:")),
                    "relayed address {relayed} is not {public}:\n{log}"
                );
                assert!(t.contains(want_transport), "transport {t}:\n{log}");
            }
            // uclient makes a probe allocation before the one that carries data: every one
            // is bound on the worker, and the peer saw the data one from its public address.
            let worker = hostnet.forwards[i].worker_ip;
            for (relayed, _) in &new {
                let port = relayed.rsplit(':').next().unwrap_or_default();
                let line = log
                    .lines()
                    .find(|l| l.contains(&format!("relayed={relayed} ")))
                    .unwrap_or_default();
                assert!(
                    line.contains(&format!("(bound {worker}:{port})")),
                    "turnd did not bind {worker}:{port}: {line}"
                );
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while !new
                .iter()
                .any(|(relayed, _)| peer.output().contains(&format!("from {relayed}\n")))
            {
                assert!(
                    Instant::now() < deadline,
                    "the peer never saw any of {new:?} (SNAT):\n{}",
                    peer.output()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let sources: BTreeSet<String> = peer
        .output()
        .lines()
        .filter_map(|l| l.strip_prefix("from "))
        .map(|a| a.rsplit_once(':').map_or(a, |(ip, _)| ip).to_owned())
        .collect();
    let public: BTreeSet<String> = PUBLIC.iter().map(ToString::to_string).collect();
    assert_eq!(
        sources, public,
        "the peer saw sources other than the public IPs"
    );

    // A libvirt restart puts its jump above ours: verify sees it, re-applying fixes it.
    topo.exec_ok("host", &["iptables", "-D", "FORWARD", "-j", "LIBVIRT_FWI"]);
    topo.exec_ok(
        "host",
        &["iptables", "-I", "FORWARD", "1", "-j", "LIBVIRT_FWI"],
    );
    let drift = hostnet.verify(&topo.exec_ok("host", &["iptables-save"]));
    assert!(!drift.is_clean(), "verify missed the moved jump");
    apply(&topo);
    assert!(hostnet
        .verify(&topo.exec_ok("host", &["iptables-save"]))
        .is_clean());
    assert_eq!(topo.save(), applied);

    // Teardown removes exactly ours: the rules are what they were before, foreign ones kept.
    drop(servers);
    topo.exec_ok("host", &["sh", &jumps, "remove"]);
    topo.exec_ok(
        "host",
        &["iptables-restore", "--wait", "--noflush", &teardown],
    );
    assert_eq!(
        topo.save(),
        before,
        "teardown did not restore the foreign rules only"
    );
    // Tearing down twice is harmless.
    topo.exec_ok("host", &["sh", &jumps, "remove"]);
    topo.exec_ok(
        "host",
        &["iptables-restore", "--wait", "--noflush", &teardown],
    );
    assert_eq!(topo.save(), before);
    eprintln!("end to end in {:?}", started.elapsed());
}

/// Whether we run as root (namespaces and iptables need it).
fn nix_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
