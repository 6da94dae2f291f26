//! Phase 7, `host-networking`: the files rendered by [`crate::hostnet`] (the
//! `iptables-restore` rules, their teardown, `jumps.sh`, the `turnd-hostnet.service` unit and
//! the sysctl file) installed on the host, and the unit enabled and running.
//!
//! Gather (read-only, on the host): `sha256sum` of the five files, `systemctl is-enabled` and
//! `systemctl is-active` of the unit, and `iptables-save`, compared with the rendered rules by
//! [`HostNet::verify`]. The plan writes each missing or changed file; `daemon-reload` when the
//! unit file changed; then `enable --now` a new unit, `start` a stopped one, `restart` a running
//! one whose unit file changed, or `reload` a running one whose rules or jump script changed or
//! whose live rules drifted. `ExecReload` re-applies the rules with `iptables-restore --noflush`
//! (each table atomically) and puts the jumps first again, so a repair never opens a window
//! without forwarding, as a restart (`ExecStop` first) would.
//!
//! Teardown ([`plan_teardown`]) disables and stops the unit — its `ExecStop` removes exactly our
//! jumps and chains — removes the files and reloads systemd.

use std::collections::BTreeMap;

use super::facts::{file_hashes, sha256};
use super::{Context, PhaseError};
use crate::exec::{Cmd, ExecError, Transport};
use crate::hostnet::{paths, Drift, HostNet, JumpDrift, LEGACY_UNIT, UNIT_NAME};
use crate::plan::{Action, PhaseId, Plan, Step, Target};

/// What `host-networking` observed on the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostNetFacts {
    /// SHA-256 of those of our files that exist.
    pub files: BTreeMap<String, String>,
    /// `systemctl is-enabled` said `enabled`.
    pub enabled: bool,
    /// `systemctl is-active` said `active`.
    pub active: bool,
    /// The live rules compared with the rendered ones.
    pub drift: Drift,
    /// The old coturn cluster's chains still in the live rules: (table, chain).
    pub legacy_chains: Vec<(String, String)>,
    /// The old `coturn-iptables.service`'s unit file, when systemd knows the unit.
    pub legacy_unit: Option<String>,
}

/// The paths of every file the phase installs.
pub fn file_paths() -> [&'static str; 5] {
    [
        paths::RULES,
        paths::TEARDOWN,
        paths::JUMPS,
        paths::UNIT,
        paths::SYSCTL,
    ]
}

fn systemctl(verb: &str) -> Cmd {
    Cmd::new("systemctl").args([verb, UNIT_NAME])
}

/// `systemctl is-enabled|is-active UNIT` answers `word` on stdout (its exit status also says
/// so, but its stdout is the documented answer). No systemd at all reads as "no".
fn unit_is(t: &dyn Transport, verb: &str, word: &str) -> Result<bool, ExecError> {
    match t.run(&systemctl(verb)) {
        Ok(o) => Ok(o.stdout.trim() == word),
        Err(ExecError::Spawn { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The unit's files and state only (what teardown needs).
fn gather_unit(t: &dyn Transport) -> Result<HostNetFacts, ExecError> {
    Ok(HostNetFacts {
        files: file_hashes(t, &file_paths())?,
        enabled: unit_is(t, "is-enabled", "enabled")?,
        active: unit_is(t, "is-active", "active")?,
        drift: Drift::default(),
        legacy_chains: Vec::new(),
        legacy_unit: None,
    })
}

/// What the phase renders from the inventory.
///
/// # Errors
/// [`PhaseError::HostNet`] when the `[[turnd]]` instances cannot be forwarded.
pub fn desired(ctx: &Context<'_>) -> Result<HostNet, PhaseError> {
    HostNet::from_cluster(ctx.cluster).map_err(|source| PhaseError::HostNet {
        phase: PhaseId::HostNetworking,
        source,
    })
}

/// Observes the host: the files, the unit, and the live rules against `want`.
///
/// # Errors
/// [`PhaseError::Gather`] when a command cannot run or `iptables-save` fails.
pub fn gather(ctx: &Context<'_>, want: &HostNet) -> Result<HostNetFacts, PhaseError> {
    let gather = |source| PhaseError::Gather {
        phase: PhaseId::HostNetworking,
        source,
    };
    let host = ctx.transports.host.as_ref();
    let mut facts = gather_unit(host).map_err(gather)?;
    let saved = host
        .run_ok(&Cmd::new("iptables-save"))
        .map_err(gather)?
        .stdout;
    facts.drift = want.verify(&saved);
    facts.legacy_chains = crate::hostnet::legacy_chains(&saved);
    let show = Cmd::new("systemctl").args(["show", "-P", "FragmentPath", LEGACY_UNIT]);
    facts.legacy_unit = match host.run(&show) {
        Ok(o) if o.success() && !o.stdout.trim().is_empty() => Some(o.stdout.trim().to_owned()),
        Ok(_) | Err(ExecError::Spawn { .. }) => None,
        Err(e) => return Err(gather(e)),
    };
    Ok(facts)
}

fn changed(files: &BTreeMap<String, String>, path: &str, want: &str) -> Option<&'static str> {
    match files.get(path) {
        None => Some("missing"),
        Some(h) if *h != sha256(want.as_bytes()) => Some("changed"),
        Some(_) => None,
    }
}

/// One line per kind of drift, for the plan's notes.
fn drift_notes(d: &Drift) -> Vec<String> {
    let mut out = Vec::new();
    for (t, c) in &d.missing_chains {
        out.push(format!("drift: chain -t {} {c} is missing", t.as_str()));
    }
    for r in &d.missing {
        out.push(format!("drift: missing rule {r}"));
    }
    for r in &d.extra {
        out.push(format!("drift: foreign rule in our chain {r}"));
    }
    if d.reordered {
        out.push("drift: our rules are in a different order".to_owned());
    }
    for j in &d.jumps {
        out.push(match j {
            JumpDrift::Missing(j) => format!("drift: missing jump {j}"),
            JumpDrift::NotFirst(j, at) => format!("drift: jump {j} is rule {}, not 1", at + 1),
            JumpDrift::Duplicated(j, n) => format!("drift: jump {j} is present {n} times"),
        });
    }
    out
}

/// Plans `host-networking` from what was observed.
pub fn plan(want: &HostNet, facts: &HostNetFacts) -> Plan {
    let mut p = Plan::new(PhaseId::HostNetworking);
    let files = want.files();
    let mut unit_changed = false;
    let mut rules_changed = false;
    for (path, contents, mode) in files.list() {
        let Some(why) = changed(&facts.files, path, contents) else {
            continue;
        };
        let mut steps = vec![Step::Upload {
            path: path.to_owned(),
            data: contents.as_bytes().to_vec(),
            mode,
        }];
        match path {
            paths::UNIT => unit_changed = true,
            paths::RULES | paths::JUMPS => rules_changed = true,
            // Also applied by the unit's ExecStartPre at every start.
            paths::SYSCTL => steps.push(Step::Run(Cmd::new("sysctl").args(["-q", "-p", path]))),
            _ => {}
        }
        p.actions.push(Action::steps(
            Target::Host,
            format!("write {path} ({why})"),
            steps,
        ));
    }
    if unit_changed {
        p.actions.push(Action::run(
            Target::Host,
            "systemctl daemon-reload (unit file written)",
            Cmd::new("systemctl").arg("daemon-reload"),
        ));
    }
    let drifted = !facts.drift.is_clean();
    if facts.active && drifted {
        p.notes.extend(drift_notes(&facts.drift));
    }
    match (facts.enabled, facts.active) {
        (false, false) => p.actions.push(Action::run(
            Target::Host,
            format!("enable and start {UNIT_NAME}"),
            Cmd::new("systemctl").args(["enable", "--now", UNIT_NAME]),
        )),
        (true, false) => p.actions.push(Action::run(
            Target::Host,
            format!("start {UNIT_NAME}"),
            systemctl("start"),
        )),
        (enabled, true) => {
            if !enabled {
                p.actions.push(Action::run(
                    Target::Host,
                    format!("enable {UNIT_NAME} (start at boot)"),
                    systemctl("enable"),
                ));
            }
            if unit_changed {
                p.push_disruptive(
                    Action::run(
                        Target::Host,
                        format!("restart {UNIT_NAME} (unit file changed)"),
                        systemctl("restart"),
                    ),
                    "no forwarding to turnd between ExecStop and ExecStart",
                );
            } else if rules_changed || drifted {
                let why = if rules_changed {
                    "rules changed"
                } else {
                    "live rules drifted"
                };
                p.actions.push(Action::run(
                    Target::Host,
                    format!("reload {UNIT_NAME}: re-apply the rules and jumps ({why})"),
                    systemctl("reload"),
                ));
            }
        }
    }
    plan_legacy(facts, &mut p);
    p
}

/// Removes the old coturn cluster's forwarding after ours is in place: its unit stopped,
/// disabled and (when it lives in `/etc/systemd/system`) deleted, then its chains.
fn plan_legacy(facts: &HostNetFacts, p: &mut Plan) {
    if facts.legacy_chains.is_empty() && facts.legacy_unit.is_none() {
        return;
    }
    let mut steps = Vec::new();
    let mut what = Vec::new();
    if let Some(file) = &facts.legacy_unit {
        what.push(LEGACY_UNIT.to_owned());
        steps.push(Step::Run(Cmd::new("systemctl").args([
            "disable",
            "--now",
            LEGACY_UNIT,
        ])));
        if file.starts_with("/etc/systemd/system/") {
            steps.push(Step::Run(Cmd::new("rm").args(["-f", file])));
        }
        steps.push(Step::Run(Cmd::new("systemctl").arg("daemon-reload")));
    }
    if !facts.legacy_chains.is_empty() {
        what.extend(
            facts
                .legacy_chains
                .iter()
                .map(|(t, c)| format!("chain -t {t} {c}")),
        );
        steps.push(Step::Run(Cmd::new("sh").args([
            "-c".to_owned(),
            crate::hostnet::legacy_removal_script(&facts.legacy_chains),
        ])));
    }
    p.push_disruptive(
        Action::steps(
            Target::Host,
            format!("remove the old coturn forwarding: {}", what.join(", ")),
            steps,
        ),
        "the old coturn relays stop being reachable; turnd's forwarding takes over",
    );
}

/// Observes what teardown removes: the files and the unit (not the rules: `ExecStop` removes
/// exactly ours).
///
/// # Errors
/// [`PhaseError::Gather`].
pub fn gather_teardown(ctx: &Context<'_>) -> Result<HostNetFacts, PhaseError> {
    gather_unit(ctx.transports.host.as_ref()).map_err(|source| PhaseError::Gather {
        phase: PhaseId::HostNetworking,
        source,
    })
}

/// Plans the teardown: stop and disable the unit (its `ExecStop` runs `jumps.sh remove`, then
/// deletes our chains), remove the files, reload systemd. Nothing when nothing is installed.
pub fn plan_teardown(facts: &HostNetFacts) -> Plan {
    let mut p = Plan::new(PhaseId::HostNetworking);
    if facts.active || facts.enabled {
        p.push_disruptive(
            Action::run(
                Target::Host,
                format!("stop and disable {UNIT_NAME} (ExecStop removes our jumps and chains)"),
                Cmd::new("systemctl").args(["disable", "--now", UNIT_NAME]),
            ),
            "the public IPs stop reaching turnd",
        );
    }
    let present: Vec<&str> = file_paths()
        .into_iter()
        .filter(|f| facts.files.contains_key(*f))
        .collect();
    if !present.is_empty() {
        p.actions.push(Action::steps(
            Target::Host,
            format!("remove {}", present.join(" ")),
            vec![
                Step::Run(Cmd::new("rm").arg("-f").args(present.iter().copied())),
                Step::Run(Cmd::new("rm").args(["-rf", paths::DIR])),
                Step::Run(Cmd::new("systemctl").arg("daemon-reload")),
            ],
        ));
    }
    p
}
