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
