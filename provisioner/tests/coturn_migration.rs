//! Migration from the coturn cluster: `host-networking` finds the old `COTURN_DNAT` chain and
//! `coturn-iptables.service`, plans their removal as disruptive, and removing them in a
//! network namespace of this test (real iptables) leaves every other rule — Docker's, libvirt's,
//! the host's own — in place; a second plan does not ask again.
//!
//! systemd cannot run here: the host transport sends `iptables*` and `sh` into the namespace
//! and records everything else (`systemctl`, `rm`, uploads), answering `systemctl show` like a
//! host on which the old unit is installed.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;

use provisioner::exec::{Cmd, ExecError, LocalTransport, Output, Transport};
use provisioner::inventory::{Cluster, Inventory};
use provisioner::phases::{self, Context, Settings};
use provisioner::plan::{apply, Journal, PhaseId, Plan, Transports};

/// The old cluster's rules, as its `coturn-iptables` service left them, beside Docker's and
/// the host's own.
const OLD_HOST: &str = "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:COTURN_DNAT - [0:0]
:DOCKER - [0:0]
-A PREROUTING -j COTURN_DNAT
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m comment --comment \"old coturn, loopback\" -j COTURN_DNAT
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A COTURN_DNAT -d 94.130.141.98/32 -p udp -m udp --dport 3478 -j DNAT --to-destination 10.10.10.11
-A COTURN_DNAT -d 94.130.141.98/32 -p tcp -m tcp --dport 443 -j DNAT --to-destination 10.10.10.11
-A DOCKER -i docker0 -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -d 10.10.10.11/32 -p udp -m udp --dport 3478 -j ACCEPT
COMMIT
";

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("prov-{tag}-{}", std::process::id());
        assert!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add")
            .success());
        Self(name)
    }

    fn run(&self, cmd: &Cmd) -> Output {
        let wrapped = Cmd {
            program: "ip".into(),
            args: ["netns", "exec", &self.0, &cmd.program]
                .into_iter()
                .map(str::to_owned)
                .chain(cmd.args.iter().cloned())
                .collect(),
            stdin: cmd.stdin.clone(),
        };
        LocalTransport::new().run(&wrapped).expect("runs")
    }

    fn save(&self) -> String {
        self.run(&Cmd::new("iptables-save")).stdout
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// iptables in the namespace; systemd recorded and answered.
struct Host {
    ns: Netns,
    recorded: Mutex<Vec<String>>,
    unit_removed: Mutex<bool>,
}

impl Transport for Host {
    fn target(&self) -> &str {
        "host"
    }

    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        if cmd.program.starts_with("iptables") || cmd.program == "sh" {
            return Ok(self.ns.run(cmd));
        }
        self.recorded.lock().expect("lock").push(cmd.shell_line());
        let a: Vec<&str> = cmd.args.iter().map(String::as_str).collect();
        Ok(match (cmd.program.as_str(), a.as_slice()) {
            ("systemctl", ["show", "-P", "FragmentPath", "coturn-iptables.service"]) => {
                if *self.unit_removed.lock().expect("lock") {
                    Output::ok("\n")
                } else {
                    Output::ok("/etc/systemd/system/coturn-iptables.service\n")
                }
            }
            ("systemctl", ["disable", "--now", "coturn-iptables.service"]) => {
                *self.unit_removed.lock().expect("lock") = true;
                Output::ok("")
            }
            ("sha256sum", _) => Output::failed(1, "No such file or directory\n"),
            _ => Output::ok(""),
        })
    }

    fn upload(&self, _data: &[u8], path: &str, _mode: u32) -> Result<(), ExecError> {
        self.recorded
            .lock()
            .expect("lock")
            .push(format!("write {path}"));
        Ok(())
    }
}

fn example() -> Cluster {
    Inventory::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    )))
    .expect("example is valid")
}

fn plan(c: &Cluster, t: &Transports) -> Plan {
    let settings = Settings::default();
    let ctx = Context {
        cluster: c,
        transports: t,
        settings: &settings,
    };
    phases::plan(PhaseId::HostNetworking, &ctx).expect("plans")
}

#[test]
fn host_networking_removes_the_old_coturn_chain_and_unit_and_keeps_everything_else() {
    if !(common::have_tool("iptables-restore", "iptables") && common::have_tool("ip", "iproute2")) {
        return;
    }
    let ns = Netns::new("coturn");
    let restored = ns.run(&Cmd::new("iptables-restore").stdin(OLD_HOST));
    assert!(restored.success(), "{restored:?}");
    let before = ns.save();
    let transports = Transports {
        host: Box::new(Host {
            ns,
            recorded: Mutex::new(Vec::new()),
            unit_removed: Mutex::new(false),
        }),
        vms: BTreeMap::new(),
    };
    let c = example();

    let p = plan(&c, &transports);
    let text = p.render(true);
    let legacy: Vec<(&str, &str)> = p
        .disruptions()
        .map(|(a, how)| (a.summary.as_str(), how))
        .collect();
    assert_eq!(
        legacy,
        [(
            "remove the old coturn forwarding: coturn-iptables.service, chain -t nat COTURN_DNAT",
            "the old coturn relays stop being reachable; turnd's forwarding takes over"
        )],
        "{text}"
    );
    assert_eq!(
        p.disruptive.keys().copied().collect::<Vec<_>>(),
        [p.actions.len() - 1],
        "removed last, after ours is in place:\n{text}"
    );

    apply(&p, &transports, &mut Journal::in_memory()).expect("applies");
    let host = transports.host.as_ref();
    let after = host
        .run(&Cmd::new("iptables-save"))
        .expect("iptables-save")
        .stdout;
    assert!(!after.contains("COTURN"), "{after}");
    let kept = |save: &str| -> Vec<String> {
        save.lines()
            .filter(|l| l.starts_with("-A") || l.starts_with(':'))
            .filter(|l| !l.contains("COTURN"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(kept(&after), kept(&before), "everything else stays");
    assert!(after.contains("-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER"));

    let again = plan(&c, &transports);
    assert!(
        again.disruptive.is_empty(),
        "nothing left to remove:\n{}",
        again.render(true)
    );
}

const REALM: &str = "turn.old-cluster.example";

/// `turnadmin -k`: the key coturn's own tool derives for a user.
fn turnadmin_key(turnadmin: &std::path::Path, user: &str, password: &str) -> String {
    let out = Command::new(turnadmin)
        .args(["-k", "-u", user, "-r", REALM, "-p", password])
        .output()
        .expect("turnadmin runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .rfind(|l| l.starts_with("0x"))
        .expect("a 0x key")
        .to_owned()
}

/// Runs `turnutils_uclient` as `user`/`password` against `server`; its summary when it relayed.
fn uclient(
    tool: &std::path::Path,
    server: std::net::SocketAddr,
    peer: std::net::SocketAddr,
    user: &str,
    password: &str,
) -> (bool, Option<turnd_tests::tools::UclientSummary>, String) {
    let mut cmd = Command::new(tool);
    cmd.args(["-p", &server.port().to_string()])
        .args(["-e", &peer.ip().to_string(), "-r", &peer.port().to_string()])
        .args(["-m", "1", "-n", "20", "-l", "120", "-z", "2", "-c", "-X"])
        .args(["-u", user, "-w", password])
        .arg(server.ip().to_string());
    let out = turnd_tests::tools::run_with_timeout(&mut cmd, std::time::Duration::from_secs(30))
        .expect("uclient finishes");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success(),
        turnd_tests::tools::UclientSummary::parse(&all),
        all,
    )
}

#[test]
fn coturn_users_authenticate_against_turnd_with_the_rendered_config() {
    let (Some(tool), Some(turnadmin)) = (
        turnd_tests::tools::find_tool("turnutils_uclient"),
        turnd_tests::tools::find_tool("turnadmin"),
    ) else {
        return;
    };
    // The old cluster's realm and users: alice as `turnadmin -k` printed her key, bob's
    // password in .env.
    let alice_key = turnadmin_key(&turnadmin, "alice", "alice-in-coturn");
    let text = format!(
        "{}\n[auth]\nrealm = \"{REALM}\"\n\n[[auth.users]]\nname = \"alice\"\nkey = \"{alice_key}\"\n\n[[auth.users]]\nname = \"bob\"\npassword_env = \"TURN_PASSWORD_BOB\"\n",
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/cluster.example.toml"
        ))
        .expect("example")
    );
    let c = Inventory::from_toml(&text)
        .and_then(|i| i.validate(&text))
        .expect("inventory with [auth] is valid");
    let passwords = BTreeMap::from([(
        "bob".to_owned(),
        provisioner::k8s::Sensitive::new("bob-from-dotenv"),
    )]);
    let rendered =
        provisioner::k8s::turnd_toml_with_passwords(&c, 0, &passwords).expect("turnd.toml renders");
    let bob_key = turnadmin_key(&turnadmin, "bob", "bob-from-dotenv");
    for want in [
        format!("realm = \"{REALM}\""),
        format!("name = \"alice\"\nkey = \"{alice_key}\""),
        format!("name = \"bob\"\nkey = \"{bob_key}\""),
    ] {
        assert!(rendered.contains(&want), "{want} missing from:\n{rendered}");
    }
    assert!(
        !rendered.contains("bob-from-dotenv"),
        "no password in the ConfigMap"
    );
    let err = provisioner::k8s::turnd_toml_with_passwords(&c, 0, &BTreeMap::new())
        .expect_err("bob's password is required");
    assert_eq!(
        err.to_string(),
        "auth user `bob`: its password variable TURN_PASSWORD_BOB is not set (environment or .env)"
    );

    // The rendered file, moved onto loopback for this test only: the worker's address becomes
    // 127.0.0.1 with ports chosen by the kernel, a test certificate, loopback peers allowed,
    // one worker and RFC 5766 channel numbers (for uclient). [auth] is untouched.
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).expect("write cert");
    std::fs::write(dir.path().join("tls.key"), cert.key_pair.serialize_pem()).expect("write key");
    let worker = c.vm("k8s-worker1").expect("worker").ip.to_string();
    let mut cfg: String = rendered
        .lines()
        .filter(|l| !l.starts_with("external_ips"))
        .map(|l| format!("{l}\n"))
        .collect();
    // The two TLS listeners on distinct addresses (both port 0).
    cfg = cfg.replace(&format!("{worker}:443"), "127.0.0.2:0");
    for port in [":3478", ":5349", ":9641"] {
        cfg = cfg.replace(&format!("{worker}{port}"), "127.0.0.1:0");
    }
    cfg = cfg
        .replace(&worker, "127.0.0.1")
        .replace(
            provisioner::k8s::mounts::TLS_DIR,
            &dir.path().display().to_string(),
        )
        .replace("format = \"json\"", "format = \"text\"");
    cfg.push_str("\n[peers]\nallow = [\"127.0.0.0/8\"]\n\n[server]\nworkers = 1\nrfc5766_channel_numbers = true\n");
    let settings = turnd::config::Config::from_toml(&cfg)
        .unwrap_or_else(|e| panic!("{e}\n{cfg}"))
        .validate(&turnd::config::MapEnv(BTreeMap::new()))
        .unwrap_or_else(|e| panic!("{e}\n{cfg}"));
    let running = turnd::run::start(settings).expect("turnd starts");
    let server = running.udp[0];
    let peer = turnd_tests::peer::EchoPeer::start(std::net::Ipv4Addr::LOCALHOST.into())
        .expect("echo peer");

    for (user, password) in [("alice", "alice-in-coturn"), ("bob", "bob-from-dotenv")] {
        let (ok, summary, out) = uclient(&tool, server, peer.addr, user, password);
        let tail: Vec<&str> = out.lines().rev().take(12).collect();
        assert!(ok, "{user} was refused: {tail:#?}");
        let s = summary.unwrap_or_else(|| panic!("no summary: {tail:#?}"));
        assert!(
            s.sent > 0 && s.received == s.sent,
            "{user}: {s:?} {tail:#?}"
        );
    }
    let (ok, summary, out) = uclient(&tool, server, peer.addr, "alice", "not-her-password");
    assert!(
        !ok || summary.is_none_or(|s| s.received == 0),
        "a wrong password relayed:\n{out}"
    );
    running.shutdown();
}
