//! Host networking for the turnd workers: the host owns the public IPs and forwards each one to
//! the worker VM whose turnd advertises it.
//!
//! For every `[[turnd]]` instance (public IP `P`, worker address `W`, relay range `R`):
//! - `nat TURND-DNAT`: `P` udp/tcp 3478, tcp 5349, udp `R` and — only for an instance marked
//!   `tcp_443` — tcp 443 → `W` (ports kept);
//! - `nat TURND-SNAT`: relay traffic `W`:udp `R` whose *original* destination is outside the
//!   VM network leaves as `P`:same port, so a peer sees the address turnd advertised. Matching
//!   the original destination (conntrack) rather than the rewritten one also covers a relay on
//!   worker 1 talking to the public relay address of worker 2 (DNAT'd back onto the bridge);
//! - `filter TURND-FWD`: accepts the forwarded ports, the outbound relay traffic and replies.
//!
//! The rules live only in those three chains. [`HostNet::restore_file`] is an
//! `iptables-restore --noflush` file that declares and flushes our chains and nothing else, so
//! Docker's and libvirt's chains survive. The jumps from the built-in chains (`PREROUTING`,
//! `OUTPUT`, `POSTROUTING`, `FORWARD`) cannot be made idempotent inside a restore file, so
//! [`HostNet::jumps_script`] keeps each jump first and present exactly once (Docker and
//! libvirt insert their own jumps at the top when they restart).
//! [`HostNet::systemd_unit`] applies both at boot and again whenever `docker.service` or
//! `libvirtd.service` restarts; its `ExecStop` removes exactly ours ([`HostNet::teardown_file`]).
//! [`verify`] compares `iptables-save` output with what we render and reports [`Drift`].
//!
//! What it leaves out: IPv6 (the inventory's public IPs are IPv4), and running anything — the
//! caller ships the [`Files`] and runs the commands.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use crate::inventory::{Cluster, Ipv4Cidr};

/// The nat chain that DNATs public addresses to workers.
pub const DNAT_CHAIN: &str = "TURND-DNAT";
/// The nat chain that SNATs the workers' relay traffic to their public address.
pub const SNAT_CHAIN: &str = "TURND-SNAT";
/// The filter chain that accepts forwarded turnd traffic.
pub const FWD_CHAIN: &str = "TURND-FWD";

/// Where the files go on the host.
pub mod paths {
    /// Directory of the rule files and the jump script.
    pub const DIR: &str = "/etc/turnd-hostnet";
    /// The `iptables-restore --noflush` file that fills our chains.
    pub const RULES: &str = "/etc/turnd-hostnet/rules.v4";
    /// The `iptables-restore --noflush` file that deletes our chains.
    pub const TEARDOWN: &str = "/etc/turnd-hostnet/teardown.v4";
    /// The script that keeps the jumps first (`apply`) or removes them (`remove`).
    pub const JUMPS: &str = "/etc/turnd-hostnet/jumps.sh";
    /// The systemd unit.
    pub const UNIT: &str = "/etc/systemd/system/turnd-hostnet.service";
    /// The sysctl file.
    pub const SYSCTL: &str = "/etc/sysctl.d/90-turnd-hostnet.conf";
}

/// The unit's name.
pub const UNIT_NAME: &str = "turnd-hostnet.service";

/// Ports turnd listens on, forwarded from each public IP: (protocol, port).
pub const SERVICE_PORTS: [(Proto, u16); 4] = [
    (Proto::Udp, 3478),
    (Proto::Tcp, 3478),
    (Proto::Tcp, 5349),
    (Proto::Tcp, 443),
];

/// Why host networking cannot be rendered from an inventory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostNetError {
    /// A `[[turnd]]` instance names a VM the inventory does not have.
    #[error("[[turnd]] vm `{vm}` is not one of the [[vms]]")]
    UnknownVm {
        /// The name.
        vm: String,
    },
    /// Two instances claim the same public IP.
    #[error("public IP {ip} is used by more than one [[turnd]] instance")]
    DuplicatePublicIp {
        /// The address.
        ip: Ipv4Addr,
    },
    /// A relay range is empty.
    #[error("[[turnd]] vm `{vm}`: relay_port_min {min} exceeds relay_port_max {max}")]
    EmptyRelayRange {
        /// The instance.
        vm: String,
        /// First port.
        min: u16,
        /// Last port.
        max: u16,
    },
}

/// A transport protocol in a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

impl Proto {
    /// The iptables name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// One public IP forwarded to one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The worker VM's name (for comments and messages).
    pub worker: String,
    /// The public address clients use.
    pub public_ip: Ipv4Addr,
    /// The worker's address on the VM network.
    pub worker_ip: Ipv4Addr,
    /// The relay port range turnd allocates from.
    pub relay_ports: RangeInclusive<u16>,
    /// Whether tcp/443 is forwarded too (`tcp_443` in the inventory).
    pub tcp_443: bool,
}

impl Forward {
    /// The service ports forwarded for this instance: [`SERVICE_PORTS`], tcp/443 only when
    /// the inventory marks the IP for it.
    pub fn service_ports(&self) -> impl Iterator<Item = (Proto, u16)> + '_ {
        SERVICE_PORTS
            .into_iter()
            .filter(|(_, port)| *port != 443 || self.tcp_443)
    }
}

/// Everything host networking is rendered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNet {
    /// The VM network (traffic that stays inside it is never SNATed).
    pub vm_network: Ipv4Cidr,
    /// One entry per turnd instance, in inventory order.
    pub forwards: Vec<Forward>,
}

/// A netfilter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// `filter`.
    Filter,
    /// `nat`.
    Nat,
}

impl Table {
    /// The table's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Filter => "filter",
            Self::Nat => "nat",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "filter" => Some(Self::Filter),
            "nat" => Some(Self::Nat),
            _ => None,
        }
    }
}

/// One rule in one of our chains, written exactly as `iptables-save` prints it after
/// `-A CHAIN `, so rendered and live rules compare as strings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// Table.
    pub table: Table,
    /// Chain.
    pub chain: String,
    /// The match and target, e.g. `-d 1.2.3.4/32 -p udp -m udp --dport 3478 -j DNAT ...`.
    pub spec: String,
}

impl Rule {
    fn new(table: Table, chain: &str, spec: String) -> Self {
        Self {
            table,
            chain: chain.to_owned(),
            spec,
        }
    }

    /// The arguments for `iptables -t TABLE -C CHAIN ...` (split on spaces: our specs have no
    /// quoted parts).
    pub fn check_args(&self) -> Vec<String> {
        let mut args = vec![
            "-t".to_owned(),
            self.table.as_str().to_owned(),
            "-C".to_owned(),
            self.chain.clone(),
        ];
        args.extend(self.spec.split(' ').map(str::to_owned));
        args
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "-t {} -A {} {}",
            self.table.as_str(),
            self.chain,
            self.spec
        )
    }
}

/// A jump from a built-in chain into one of ours, kept as the built-in chain's first rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Jump {
    /// Table.
    pub table: Table,
    /// The built-in chain.
    pub from: &'static str,
    /// Our chain.
    pub to: &'static str,
}

impl Jump {
    /// The rule as `iptables-save` prints it.
    pub fn save_line(&self) -> String {
        format!("-A {} -j {}", self.from, self.to)
    }
}

impl fmt::Display for Jump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-t {} {}", self.table.as_str(), self.save_line())
    }
}

/// The jumps, in the order they are applied.
pub const JUMPS: [Jump; 4] = [
    Jump {
        table: Table::Nat,
        from: "PREROUTING",
        to: DNAT_CHAIN,
    },
    // Connections the host itself opens to a public IP (monitoring, hairpin tests).
    Jump {
        table: Table::Nat,
        from: "OUTPUT",
        to: DNAT_CHAIN,
    },
    Jump {
        table: Table::Nat,
        from: "POSTROUTING",
        to: SNAT_CHAIN,
    },
    Jump {
        table: Table::Filter,
        from: "FORWARD",
        to: FWD_CHAIN,
    },
];

/// Our chains per table.
pub const CHAINS: [(Table, &str); 3] = [
    (Table::Nat, DNAT_CHAIN),
    (Table::Nat, SNAT_CHAIN),
    (Table::Filter, FWD_CHAIN),
];

/// Every file host networking installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// [`paths::RULES`].
    pub rules: String,
    /// [`paths::TEARDOWN`].
    pub teardown: String,
    /// [`paths::JUMPS`].
    pub jumps: String,
    /// [`paths::UNIT`].
    pub unit: String,
    /// [`paths::SYSCTL`].
    pub sysctl: String,
}

impl Files {
    /// (absolute path on the host, contents, mode) for each file.
    pub fn list(&self) -> [(&'static str, &str, u32); 5] {
        [
            (paths::RULES, &self.rules, 0o644),
            (paths::TEARDOWN, &self.teardown, 0o644),
            (paths::JUMPS, &self.jumps, 0o755),
            (paths::UNIT, &self.unit, 0o644),
            (paths::SYSCTL, &self.sysctl, 0o644),
        ]
    }
}

impl HostNet {
    /// Reads the `[[turnd]]` instances of a validated inventory.
    ///
    /// # Errors
    /// An instance names an unknown VM, two share a public IP, or a relay range is empty.
    pub fn from_cluster(c: &Cluster) -> Result<Self, HostNetError> {
        let mut forwards: Vec<Forward> = Vec::new();
        for t in &c.turnd {
            let vm = c.vm(t.vm.as_str()).ok_or_else(|| HostNetError::UnknownVm {
                vm: t.vm.to_string(),
            })?;
            if forwards.iter().any(|f| f.public_ip == t.public_ip) {
                return Err(HostNetError::DuplicatePublicIp { ip: t.public_ip });
            }
            if t.relay_port_min > t.relay_port_max {
                return Err(HostNetError::EmptyRelayRange {
                    vm: t.vm.to_string(),
                    min: t.relay_port_min,
                    max: t.relay_port_max,
                });
            }
            forwards.push(Forward {
                worker: vm.name.to_string(),
                public_ip: t.public_ip,
                worker_ip: vm.ip,
                relay_ports: t.relay_port_min..=t.relay_port_max,
                tcp_443: t.tcp_443,
            });
        }
        Ok(Self {
            vm_network: c.network.cidr,
            forwards,
        })
    }

    /// Every rule of our chains, in order.
    pub fn rules(&self) -> Vec<Rule> {
        let mut out = Vec::new();
        for f in &self.forwards {
            let (p, w) = (f.public_ip, f.worker_ip);
            let relay = port_range(&f.relay_ports);
            for (proto, port) in f.service_ports() {
                let pr = proto.as_str();
                out.push(Rule::new(
                    Table::Nat,
                    DNAT_CHAIN,
                    format!(
                        "-d {p}/32 -p {pr} -m {pr} --dport {port} -j DNAT --to-destination {w}"
                    ),
                ));
            }
            out.push(Rule::new(
                Table::Nat,
                DNAT_CHAIN,
                format!("-d {p}/32 -p udp -m udp --dport {relay} -j DNAT --to-destination {w}"),
            ));
        }
        for f in &self.forwards {
            let (p, w) = (f.public_ip, f.worker_ip);
            let relay = port_range(&f.relay_ports);
            out.push(Rule::new(
                Table::Nat,
                SNAT_CHAIN,
                format!(
                    "-s {w}/32 -p udp -m udp --sport {relay} -m conntrack ! --ctorigdst {} \
                     -j SNAT --to-source {p}",
                    self.vm_network
                ),
            ));
        }
        for f in &self.forwards {
            let w = f.worker_ip;
            let relay = port_range(&f.relay_ports);
            for (proto, port) in f.service_ports() {
                let pr = proto.as_str();
                out.push(Rule::new(
                    Table::Filter,
                    FWD_CHAIN,
                    format!("-d {w}/32 -p {pr} -m {pr} --dport {port} -j ACCEPT"),
                ));
            }
            out.push(Rule::new(
                Table::Filter,
                FWD_CHAIN,
                format!("-d {w}/32 -p udp -m udp --dport {relay} -j ACCEPT"),
            ));
            out.push(Rule::new(
                Table::Filter,
                FWD_CHAIN,
                format!("-s {w}/32 -p udp -m udp --sport {relay} -j ACCEPT"),
            ));
            out.push(Rule::new(
                Table::Filter,
                FWD_CHAIN,
                format!("-s {w}/32 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
            ));
        }
        out
    }

    /// The `iptables-restore --noflush` file: declares and flushes our three chains, fills
    /// them, and touches nothing else.
    pub fn restore_file(&self) -> String {
        let rules = self.rules();
        let mut s = String::from(
            "# Generated by the turnd provisioner (hostnet). Only turnd's own chains: apply with\n\
             #   iptables-restore --wait --noflush rules.v4\n\
             # then `jumps.sh apply` hooks them into the built-in chains.\n",
        );
        for table in [Table::Nat, Table::Filter] {
            s.push_str(&format!("*{}\n", table.as_str()));
            let chains: Vec<&str> = CHAINS
                .iter()
                .filter(|(t, _)| *t == table)
                .map(|(_, c)| *c)
                .collect();
            for c in &chains {
                s.push_str(&format!(":{c} - [0:0]\n"));
            }
            for c in &chains {
                s.push_str(&format!("-F {c}\n"));
            }
            for r in rules.iter().filter(|r| r.table == table) {
                s.push_str(&format!("-A {} {}\n", r.chain, r.spec));
            }
            s.push_str("COMMIT\n");
        }
        s
    }

    /// The `iptables-restore --noflush` file that deletes our chains (run after
    /// `jumps.sh remove`). Declaring a chain first makes it succeed when the chain is gone.
    pub fn teardown_file(&self) -> String {
        let mut s = String::from(
            "# Generated by the turnd provisioner (hostnet). Deletes only turnd's chains; run\n\
             # `jumps.sh remove` first, then iptables-restore --wait --noflush teardown.v4\n",
        );
        for table in [Table::Nat, Table::Filter] {
            s.push_str(&format!("*{}\n", table.as_str()));
            let chains: Vec<&str> = CHAINS
                .iter()
                .filter(|(t, _)| *t == table)
                .map(|(_, c)| *c)
                .collect();
            for c in &chains {
                s.push_str(&format!(":{c} - [0:0]\n"));
            }
            for c in &chains {
                s.push_str(&format!("-F {c}\n"));
            }
            for c in &chains {
                s.push_str(&format!("-X {c}\n"));
            }
            s.push_str("COMMIT\n");
        }
        s
    }

    /// The POSIX shell script that keeps each jump the first rule of its built-in chain,
    /// exactly once (`apply`), or deletes every copy (`remove`). `IPTABLES` overrides the
    /// binary (tests).
    pub fn jumps_script(&self) -> String {
        let mut s = String::from(
            r#"#!/bin/sh
# Generated by the turnd provisioner (hostnet). Keeps turnd's jumps first in the built-in
# chains (Docker and libvirt insert theirs at the top when they restart).
#   jumps.sh apply    each jump present exactly once, as the first rule of its chain
#   jumps.sh remove   every copy of each jump deleted
set -eu
ipt="${IPTABLES:-iptables}"

# Whether TABLE CHAIN's first rule is `-j TARGET` and it occurs only once.
is_first_once() {
    rules=$("$ipt" -w -t "$1" -S "$2")
    first=$(printf '%s\n' "$rules" | sed -n 2p)
    count=$(printf '%s\n' "$rules" | grep -c -x -e "-A $2 -j $3" || true)
    [ "$first" = "-A $2 -j $3" ] && [ "$count" = 1 ]
}

remove() {
    while "$ipt" -w -t "$1" -D "$2" -j "$3" 2>/dev/null; do :; done
}

ensure_first() {
    if ! is_first_once "$1" "$2" "$3"; then
        remove "$1" "$2" "$3"
        "$ipt" -w -t "$1" -I "$2" 1 -j "$3"
    fi
}

case "${1:-}" in
apply)
"#,
        );
        for j in JUMPS {
            s.push_str(&format!(
                "    ensure_first {} {} {}\n",
                j.table.as_str(),
                j.from,
                j.to
            ));
        }
        s.push_str("    ;;\nremove)\n");
        for j in JUMPS {
            s.push_str(&format!(
                "    remove {} {} {}\n",
                j.table.as_str(),
                j.from,
                j.to
            ));
        }
        s.push_str(
            "    ;;\n*)\n    echo \"usage: $0 apply|remove\" >&2\n    exit 2\n    ;;\nesac\n",
        );
        s
    }

    /// The sysctl file: the host forwards between the public side and the VM network.
    pub fn sysctl_file(&self) -> String {
        "# Generated by the turnd provisioner (hostnet): the host routes between its public\n\
         # addresses and the VM network.\n\
         net.ipv4.ip_forward = 1\n"
            .to_owned()
    }

    /// The systemd unit: a oneshot that applies the rules at boot and again after
    /// `docker.service` or `libvirtd.service` restarts (`PartOf=` propagates their restarts,
    /// `After=` runs us once they are up, `WantedBy=` starts us when they start).
    pub fn systemd_unit(&self) -> String {
        let hooks = "docker.service libvirtd.service";
        format!(
            "# Generated by the turnd provisioner (hostnet).\n\
             [Unit]\n\
             Description=turnd host networking (DNAT to the turnd workers, SNAT of their relays)\n\
             Documentation=man:iptables-restore(8)\n\
             After=network-pre.target {hooks}\n\
             PartOf={hooks}\n\
             \n\
             [Service]\n\
             Type=oneshot\n\
             RemainAfterExit=yes\n\
             ExecStartPre=/usr/sbin/sysctl -q -p {sysctl}\n\
             ExecStart=/usr/sbin/iptables-restore --wait --noflush {rules}\n\
             ExecStart=/bin/sh {jumps} apply\n\
             ExecReload=/usr/sbin/iptables-restore --wait --noflush {rules}\n\
             ExecReload=/bin/sh {jumps} apply\n\
             ExecStop=/bin/sh {jumps} remove\n\
             ExecStop=/usr/sbin/iptables-restore --wait --noflush {teardown}\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target {hooks}\n",
            sysctl = paths::SYSCTL,
            rules = paths::RULES,
            jumps = paths::JUMPS,
            teardown = paths::TEARDOWN,
        )
    }

    /// Every file.
    pub fn files(&self) -> Files {
        Files {
            rules: self.restore_file(),
            teardown: self.teardown_file(),
            jumps: self.jumps_script(),
            unit: self.systemd_unit(),
            sysctl: self.sysctl_file(),
        }
    }

    /// Compares live rules (`iptables-save` output, all tables) with what we render.
    pub fn verify(&self, iptables_save: &str) -> Drift {
        verify_against(&self.rules(), iptables_save)
    }
}

fn port_range(r: &RangeInclusive<u16>) -> String {
    if r.start() == r.end() {
        r.start().to_string()
    } else {
        format!("{}:{}", r.start(), r.end())
    }
}

/// How the live rules differ from the rendered ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Our chains that do not exist.
    pub missing_chains: Vec<(Table, String)>,
    /// Rendered rules not found live.
    pub missing: Vec<Rule>,
    /// Live rules in our chains that we do not render.
    pub extra: Vec<Rule>,
    /// Both sides hold the same rules, in a different order.
    pub reordered: bool,
    /// Jumps that are not the first rule of their chain exactly once.
    pub jumps: Vec<JumpDrift>,
}

/// What is wrong with one jump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JumpDrift {
    /// Not there.
    Missing(Jump),
    /// There, but not the chain's first rule (0-based position of the first copy).
    NotFirst(Jump, usize),
    /// There more than once.
    Duplicated(Jump, usize),
}

impl Drift {
    /// Whether live matches rendered.
    pub fn is_clean(&self) -> bool {
        self.missing_chains.is_empty()
            && self.missing.is_empty()
            && self.extra.is_empty()
            && !self.reordered
            && self.jumps.is_empty()
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_clean() {
            return f.write_str("no drift");
        }
        for (t, c) in &self.missing_chains {
            writeln!(f, "missing chain: -t {} {c}", t.as_str())?;
        }
        for r in &self.missing {
            writeln!(f, "missing: {r}")?;
        }
        for r in &self.extra {
            writeln!(f, "extra: {r}")?;
        }
        if self.reordered {
            writeln!(f, "rules are in a different order")?;
        }
        for j in &self.jumps {
            match j {
                JumpDrift::Missing(j) => writeln!(f, "missing jump: {j}")?,
                JumpDrift::NotFirst(j, at) => {
                    writeln!(f, "jump not first: {j} (rule {})", at + 1)?;
                }
                JumpDrift::Duplicated(j, n) => writeln!(f, "jump present {n} times: {j}")?,
            }
        }
        Ok(())
    }
}

/// `iptables-save` output parsed into chains and their rules (specs after `-A CHAIN `).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    /// (table, chain) → rules in order. Every declared chain is present, maybe empty.
    pub chains: BTreeMap<(Table, String), Vec<String>>,
}

impl Saved {
    /// Parses `iptables-save` output; tables other than `filter` and `nat` are skipped.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        let mut table = None;
        for line in text.lines() {
            let line = line.trim_end();
            if let Some(name) = line.strip_prefix('*') {
                table = Table::parse(name);
            } else if line == "COMMIT" {
                table = None;
            } else if let Some(t) = table {
                if let Some(decl) = line.strip_prefix(':') {
                    let name = decl.split(' ').next().unwrap_or_default();
                    out.chains.entry((t, name.to_owned())).or_default();
                } else if let Some(rest) = line.strip_prefix("-A ") {
                    let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                    out.chains
                        .entry((t, chain.to_owned()))
                        .or_default()
                        .push(spec.to_owned());
                }
            }
        }
        out
    }

    /// The rules of one chain (`None` if it does not exist).
    pub fn chain(&self, table: Table, chain: &str) -> Option<&[String]> {
        self.chains
            .get(&(table, chain.to_owned()))
            .map(Vec::as_slice)
    }

    /// Our chains as `iptables-save` would print them (declaration and rules), for comparing
    /// two snapshots.
    pub fn ours(&self) -> String {
        let mut s = String::new();
        for (t, c) in CHAINS {
            if let Some(rules) = self.chain(t, c) {
                s.push_str(&format!("*{} :{c}\n", t.as_str()));
                for r in rules {
                    s.push_str(&format!("-A {c} {r}\n"));
                }
            }
        }
        for j in JUMPS {
            let n = self
                .chain(j.table, j.from)
                .map_or(0, |rules| rules.iter().filter(|r| is_jump(r, j.to)).count());
            s.push_str(&format!("{j} x{n}\n"));
        }
        s
    }

    /// Whether any rule in any chain jumps to one of our chains, or any of our chains exists.
    pub fn has_any_of_ours(&self) -> bool {
        CHAINS.iter().any(|(t, c)| self.chain(*t, c).is_some())
            || self
                .chains
                .values()
                .flatten()
                .any(|r| CHAINS.iter().any(|(_, c)| r.split(' ').any(|w| w == *c)))
    }
}

fn is_jump(spec: &str, to: &str) -> bool {
    spec == format!("-j {to}")
}

/// Compares `expected` rules (and the [`JUMPS`]) with `iptables-save` output.
pub fn verify_against(expected: &[Rule], iptables_save: &str) -> Drift {
    let saved = Saved::parse(iptables_save);
    let mut drift = Drift::default();
    for (t, c) in CHAINS {
        let want: Vec<&str> = expected
            .iter()
            .filter(|r| r.table == t && r.chain == c)
            .map(|r| r.spec.as_str())
            .collect();
        let Some(have) = saved.chain(t, c) else {
            drift.missing_chains.push((t, c.to_owned()));
            drift
                .missing
                .extend(want.iter().map(|s| Rule::new(t, c, (*s).to_owned())));
            continue;
        };
        for w in &want {
            if !have.iter().any(|h| h == w) {
                drift.missing.push(Rule::new(t, c, (*w).to_owned()));
            }
        }
        for h in have {
            if !want.iter().any(|w| w == h) {
                drift.extra.push(Rule::new(t, c, h.clone()));
            }
        }
        let have_ref: Vec<&str> = have.iter().map(String::as_str).collect();
        if drift.missing.is_empty() && drift.extra.is_empty() && have_ref != want {
            drift.reordered = true;
        }
    }
    for j in JUMPS {
        let rules = saved.chain(j.table, j.from).unwrap_or_default();
        let positions: Vec<usize> = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| is_jump(r, j.to))
            .map(|(i, _)| i)
            .collect();
        match positions.as_slice() {
            [] => drift.jumps.push(JumpDrift::Missing(j)),
            [0] => {}
            [at] => drift.jumps.push(JumpDrift::NotFirst(j, *at)),
            many => drift.jumps.push(JumpDrift::Duplicated(j, many.len())),
        }
    }
    drift
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HostNet {
        HostNet {
            vm_network: "10.10.10.0/24".parse().expect("cidr"),
            forwards: vec![Forward {
                worker: "w1".into(),
                public_ip: Ipv4Addr::new(203, 0, 113, 10),
                worker_ip: Ipv4Addr::new(10, 10, 10, 11),
                relay_ports: 49152..=50175,
                tcp_443: true,
            }],
        }
    }

    fn as_saved(h: &HostNet, jumps: &[&str]) -> String {
        let mut s = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        s.push_str(":POSTROUTING ACCEPT [0:0]\n:TURND-DNAT - [0:0]\n:TURND-SNAT - [0:0]\n");
        s.push_str(":DOCKER - [0:0]\n");
        for j in jumps.iter().filter(|j| !j.contains("TURND-FWD")) {
            s.push_str(j);
            s.push('\n');
        }
        s.push_str("-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n");
        for r in h.rules().iter().filter(|r| r.table == Table::Nat) {
            s.push_str(&format!("-A {} {}\n", r.chain, r.spec));
        }
        s.push_str("COMMIT\n*filter\n:FORWARD ACCEPT [0:0]\n:TURND-FWD - [0:0]\n");
        for j in jumps.iter().filter(|j| j.contains("TURND-FWD")) {
            s.push_str(j);
            s.push('\n');
        }
        for r in h.rules().iter().filter(|r| r.table == Table::Filter) {
            s.push_str(&format!("-A {} {}\n", r.chain, r.spec));
        }
        s.push_str("COMMIT\n");
        s
    }

    const ALL_JUMPS: [&str; 4] = [
        "-A PREROUTING -j TURND-DNAT",
        "-A OUTPUT -j TURND-DNAT",
        "-A POSTROUTING -j TURND-SNAT",
        "-A FORWARD -j TURND-FWD",
    ];

    #[test]
    fn rendered_rules_read_back_as_no_drift() {
        let h = sample();
        let d = h.verify(&as_saved(&h, &ALL_JUMPS));
        assert!(d.is_clean(), "{d}");
    }

    #[test]
    fn drift_names_missing_extra_and_jump_problems() {
        let h = sample();
        let mut live = as_saved(&h, &ALL_JUMPS[..3]);
        live = live.replacen(
            "-A TURND-SNAT",
            "-A TURND-SNAT -s 10.10.10.99/32 -j SNAT --to-source 203.0.113.99\n-A TURND-SNAT",
            1,
        );
        live = live.replace("-A TURND-DNAT -d 203.0.113.10/32 -p tcp -m tcp --dport 443 -j DNAT --to-destination 10.10.10.11\n", "");
        live = live.replace("-A PREROUTING -j TURND-DNAT\n", "").replace(
            "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n",
            "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n-A PREROUTING -j TURND-DNAT\n",
        );
        let d = h.verify(&live);
        assert_eq!(d.missing.len(), 1, "{d}");
        assert!(d.missing[0].spec.contains("--dport 443"), "{d}");
        assert_eq!(d.extra.len(), 1, "{d}");
        assert!(d.extra[0].spec.contains("10.10.10.99"), "{d}");
        assert!(d.jumps.contains(&JumpDrift::Missing(JUMPS[3])), "{d}");
        assert!(d.jumps.contains(&JumpDrift::NotFirst(JUMPS[0], 1)), "{d}");
    }

    #[test]
    fn missing_chains_are_reported_with_all_their_rules() {
        let h = sample();
        let d = h.verify("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n");
        assert_eq!(d.missing_chains.len(), 3);
        assert_eq!(d.missing.len(), h.rules().len());
        assert_eq!(d.jumps.len(), 4);
    }

    #[test]
    fn a_single_port_range_is_written_as_one_port() {
        assert_eq!(port_range(&(5000..=5000)), "5000");
        assert_eq!(port_range(&(5000..=5001)), "5000:5001");
    }
}
