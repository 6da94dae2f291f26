//! Phase 1, `host`: packages on the host, the verified cloud image, the NAT network, and the
//! daily certificate renewal (a systemd timer running `provisioner cert renew` then
//! `cert deploy` on the host; the operator puts the `provisioner` binary at
//! [`PROVISIONER_ON_HOST`], and the inventory and the secrets (`.env`, mode 0600) in
//! [`RENEW_DIR`]).

use std::collections::BTreeMap;

use super::facts::{file_hashes, installed_packages};
use super::virsh::{NetState, Virsh};
use super::{Context, PhaseError, Settings};
use crate::exec::Cmd;
use crate::inventory::Cluster;
use crate::plan::{Action, PhaseId, Plan, Step, Target};
use crate::render::libvirt::{uuid_of, NetworkSpec};

/// The network as libvirt has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkFacts {
    /// The managed fields of its definition.
    pub spec: NetworkSpec,
    /// Running / autostart.
    pub state: NetState,
    /// libvirt's UUID for it.
    pub uuid: Option<String>,
}

/// Where the renewal service finds the inventory and its `.env` on the host.
pub const RENEW_DIR: &str = "/etc/turnd-provisioner";
/// Where the renewal service expects the provisioner binary on the host.
pub const PROVISIONER_ON_HOST: &str = "/usr/local/bin/provisioner";
const UNIT_DIR: &str = "/etc/systemd/system";

/// The renewal timer's files as observed: path → SHA-256, and whether the timer is enabled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RenewFacts {
    /// SHA-256 of each file that exists.
    pub files: BTreeMap<String, String>,
    /// `systemctl is-enabled` said `enabled`.
    pub enabled: bool,
    /// What the timer runs that is not on the host (of [`renew_prerequisites`]).
    pub missing: Vec<String>,
}

/// What the renewal service needs on the host besides its units: the provisioner binary, the
/// inventory, and the `.env` with the Cloudflare token.
pub fn renew_prerequisites() -> [String; 3] {
    [
        PROVISIONER_ON_HOST.to_owned(),
        format!("{RENEW_DIR}/cluster.toml"),
        format!("{RENEW_DIR}/.env"),
    ]
}

/// The renewal timer's two unit files, rendered.
#[must_use]
pub fn renew_files() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(RENEW_DIR);
    let units = crate::acme::render_renew_units(
        std::path::Path::new(PROVISIONER_ON_HOST),
        dir,
        &dir.join("cluster.toml"),
    );
    vec![
        (
            format!("{UNIT_DIR}/{}", crate::acme::RENEW_SERVICE),
            units.service.into_bytes(),
        ),
        (
            format!("{UNIT_DIR}/{}", crate::acme::RENEW_TIMER),
            units.timer.into_bytes(),
        ),
    ]
}

fn gather_renew(t: &dyn crate::exec::Transport) -> Result<RenewFacts, PhaseError> {
    let gather = |source| PhaseError::Gather {
        phase: PhaseId::Host,
        source,
    };
    let want = renew_files();
    let paths: Vec<&str> = want.iter().map(|(p, _)| p.as_str()).collect();
    let files = file_hashes(t, &paths).map_err(gather)?;
    // No systemd (or no such unit) reads as "not enabled".
    let enabled = match t.run(&Cmd::new("systemctl").args(["is-enabled", crate::acme::RENEW_TIMER]))
    {
        Ok(o) => o.stdout.trim() == "enabled",
        Err(crate::exec::ExecError::Spawn { .. }) => false,
        Err(e) => return Err(gather(e)),
    };
    let mut missing = Vec::new();
    for (path, test) in renew_prerequisites().iter().zip(["-x", "-f", "-f"]) {
        if !t
            .run(&Cmd::new("test").args([test, path.as_str()]))
            .map_err(gather)?
            .success()
        {
            missing.push(path.clone());
        }
    }
    Ok(RenewFacts {
        files,
        enabled,
        missing,
    })
}

/// What `host` observed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostFacts {
    /// Installed packages (of those we asked about) → version.
    pub packages: BTreeMap<String, String>,
    /// SHA-256 of the cloud image, if it exists.
    pub image_sha256: Option<String>,
    /// The network, if defined.
    pub network: Option<NetworkFacts>,
    /// The certificate renewal timer (`None` when [`Settings::renew_timer`] is off).
    pub renew: Option<RenewFacts>,
}

/// Where the provisioner keeps its own files on the host.
pub fn state_dir(c: &Cluster) -> String {
    format!("{}/provisioner", c.host.image_dir)
}

/// The directory of the cloud image with the inventory's checksum: images are kept by
/// checksum, so a new image never replaces the backing file of running VMs' overlays.
pub fn image_dir_for_checksum(c: &Cluster) -> String {
    let sha = &c.image.sha256;
    format!(
        "{}/sha256-{}",
        c.host.image_dir,
        sha.get(..16).unwrap_or(sha.as_str())
    )
}

/// The cloud image's path on the host (see [`image_dir_for_checksum`]).
pub fn image_path(c: &Cluster) -> String {
    format!("{}/{}", image_dir_for_checksum(c), c.image.file)
}

/// Observes the network only (used by teardown too).
pub fn gather_network(ctx: &Context<'_>) -> Result<Option<NetworkFacts>, PhaseError> {
    let c = ctx.cluster;
    let gather = |source| PhaseError::Gather {
        phase: PhaseId::Host,
        source,
    };
    let virsh = Virsh::new(ctx.transports.host.as_ref(), &c.host.libvirt_uri);
    if !virsh.networks().map_err(gather)?.contains(&c.network.name) {
        return Ok(None);
    }
    let xml = virsh.net_xml(&c.network.name).map_err(gather)?;
    let spec = NetworkSpec::from_xml(&xml).map_err(|source| PhaseError::Xml {
        phase: PhaseId::Host,
        source,
    })?;
    let uuid = uuid_of(&xml).map_err(|source| PhaseError::Xml {
        phase: PhaseId::Host,
        source,
    })?;
    let state = virsh.net_state(&c.network.name).map_err(gather)?;
    Ok(Some(NetworkFacts { spec, state, uuid }))
}

/// Observes the host.
pub fn gather(ctx: &Context<'_>) -> Result<HostFacts, PhaseError> {
    let c = ctx.cluster;
    let host = ctx.transports.host.as_ref();
    let gather = |source| PhaseError::Gather {
        phase: PhaseId::Host,
        source,
    };
    let packages = installed_packages(host, &ctx.settings.host_packages).map_err(gather)?;
    let image = image_path(c);
    let image_sha256 = file_hashes(host, &[&image]).map_err(gather)?.remove(&image);
    let renew = if ctx.settings.renew_timer {
        Some(gather_renew(host)?)
    } else {
        None
    };
    Ok(HostFacts {
        packages,
        image_sha256,
        network: gather_network(ctx)?,
        renew,
    })
}

/// The steps that define the network from `spec`.
fn define_network(c: &Cluster, spec: &NetworkSpec, uuid: Option<&str>) -> Vec<Step> {
    let path = format!("{}/network-{}.xml", state_dir(c), spec.name);
    vec![
        Step::Upload {
            path: path.clone(),
            data: spec.to_xml_with_uuid(uuid).into_bytes(),
            mode: 0o644,
        },
        Step::Run(Virsh::cmd(&c.host.libvirt_uri, &["net-define", &path])),
    ]
}

/// Plans `host` from what was observed.
pub fn plan(c: &Cluster, settings: &Settings, facts: &HostFacts) -> Plan {
    let mut p = Plan::new(PhaseId::Host);
    let missing: Vec<String> = settings
        .host_packages
        .iter()
        .filter(|p| !facts.packages.contains_key(*p))
        .cloned()
        .collect();
    if !missing.is_empty() {
        p.actions.push(Action::steps(
            Target::Host,
            format!("install packages {}", missing.join(" ")),
            super::apt::update_and_install(&missing),
        ));
    }
    if facts.image_sha256.as_deref() != Some(c.image.sha256.as_str()) {
        let path = image_path(c);
        let part = format!("{path}.part");
        let action = Action::steps(
            Target::Host,
            format!(
                "download cloud image {} ({})",
                c.image.file,
                if facts.image_sha256.is_some() {
                    "checksum differs"
                } else {
                    "missing"
                }
            ),
            vec![
                Step::Run(Cmd::new("mkdir").args(["-p", &image_dir_for_checksum(c)])),
                Step::Run(Cmd::new("curl").args([
                    "-fsSL",
                    "--retry",
                    "3",
                    "-o",
                    &part,
                    &c.image.url,
                ])),
                Step::Run(
                    Cmd::new("sha256sum")
                        .args(["--check", "--strict", "-"])
                        .stdin(format!("{}  {part}\n", c.image.sha256)),
                ),
                Step::Run(Cmd::new("mv").args(["-f", &part, &path])),
            ],
        );
        if facts.image_sha256.is_some() {
            // The file under this checksum's name is corrupt; overlays may still use it.
            p.push_disruptive(
                action,
                "replaces a corrupt image that VM overlays may be backed by",
            );
        } else {
            p.actions.push(action);
        }
    }
    if let Some(renew) = &facts.renew {
        plan_renew(renew, &mut p);
    }
    let want = NetworkSpec::from_cluster(c);
    let uri = &c.host.libvirt_uri;
    let name = &want.name;
    match &facts.network {
        None => {
            p.actions.push(Action::steps(
                Target::Host,
                format!("define network {name} (new)"),
                define_network(c, &want, None),
            ));
            p.actions.push(Action::run(
                Target::Host,
                format!("start network {name}"),
                Virsh::cmd(uri, &["net-start", name]),
            ));
            p.actions.push(Action::run(
                Target::Host,
                format!("autostart network {name}"),
                Virsh::cmd(uri, &["net-autostart", name]),
            ));
        }
        Some(have) => {
            let drift = have.spec != want;
            if drift {
                // Stop first: libvirt applies a definition given to an active network only
                // when it stops, and the test driver never does.
                if have.state.active {
                    p.push_disruptive(
                        Action::run(
                            Target::Host,
                            format!("stop network {name} to apply the new definition"),
                            Virsh::cmd(uri, &["net-destroy", name]),
                        ),
                        "every running VM loses its network until the network starts again",
                    );
                }
                p.actions.push(Action::steps(
                    Target::Host,
                    format!("redefine network {name} (definition differs)"),
                    define_network(c, &want, have.uuid.as_deref()),
                ));
            }
            if drift || !have.state.active {
                p.actions.push(Action::run(
                    Target::Host,
                    format!("start network {name}"),
                    Virsh::cmd(uri, &["net-start", name]),
                ));
            }
            if !have.state.autostart {
                p.actions.push(Action::run(
                    Target::Host,
                    format!("autostart network {name}"),
                    Virsh::cmd(uri, &["net-autostart", name]),
                ));
            }
        }
    }
    p
}

/// Installs (or repairs) the daily certificate renewal timer.
fn plan_renew(renew: &RenewFacts, p: &mut Plan) {
    if !renew.missing.is_empty() {
        // A timer that cannot work would fail silently every night: say what is missing.
        p.notes.push(format!(
            "the certificate renewal timer is {}: missing on the host: {}; put the provisioner binary at {PROVISIONER_ON_HOST} and the inventory (cluster.toml) and .env (mode 0600) in {RENEW_DIR}/, then apply host again",
            if renew.enabled { "enabled but cannot work" } else { "not installed" },
            renew.missing.join(", ")
        ));
        return;
    }
    let files = renew_files();
    let stale: Vec<&(String, Vec<u8>)> = files
        .iter()
        .filter(|(path, data)| renew.files.get(path) != Some(&super::facts::sha256(data)))
        .collect();
    let enable =
        Step::Run(Cmd::new("systemctl").args(["enable", "--now", crate::acme::RENEW_TIMER]));
    if !stale.is_empty() {
        // The unit may write only there (ReadWritePaths): it must exist before it starts.
        let state =
            crate::acme::renew_state_dir(&std::path::Path::new(RENEW_DIR).join("cluster.toml"));
        let mut steps = vec![Step::Run(Cmd::new("mkdir").args([
            "-p",
            "-m",
            "0700",
            &state.display().to_string(),
        ]))];
        steps.extend(stale.iter().map(|(path, data)| Step::Upload {
            path: path.clone(),
            data: data.clone(),
            mode: 0o644,
        }));
        steps.push(Step::Run(Cmd::new("systemctl").arg("daemon-reload")));
        steps.push(enable);
        p.actions.push(Action::steps(
            Target::Host,
            format!(
                "install the certificate renewal timer ({})",
                crate::acme::RENEW_TIMER
            ),
            steps,
        ));
    } else if !renew.enabled {
        p.actions.push(Action::steps(
            Target::Host,
            format!("enable {}", crate::acme::RENEW_TIMER),
            vec![enable],
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renew_plan(files: BTreeMap<String, String>, enabled: bool) -> Plan {
        let mut p = Plan::new(PhaseId::Host);
        plan_renew(
            &RenewFacts {
                files,
                enabled,
                missing: Vec::new(),
            },
            &mut p,
        );
        p
    }

    #[test]
    fn no_timer_is_installed_that_cannot_work() {
        let mut p = Plan::new(PhaseId::Host);
        let missing = vec![format!("{RENEW_DIR}/.env")];
        plan_renew(
            &RenewFacts {
                files: BTreeMap::new(),
                enabled: false,
                missing,
            },
            &mut p,
        );
        assert!(p.is_empty());
        assert_eq!(
            p.notes,
            ["the certificate renewal timer is not installed: missing on the host: /etc/turnd-provisioner/.env; put the provisioner binary at /usr/local/bin/provisioner and the inventory (cluster.toml) and .env (mode 0600) in /etc/turnd-provisioner/, then apply host again"]
        );
    }

    fn cluster(toml: &str) -> Cluster {
        crate::inventory::Inventory::from_toml(toml)
            .and_then(|i| i.validate(toml))
            .expect("valid inventory")
    }

    const EXAMPLE: &str = include_str!("../../../deploy/cluster.example.toml");

    #[test]
    fn adding_a_vm_leaves_the_running_network_alone_and_a_network_change_is_disruptive() {
        let before = cluster(EXAMPLE);
        let running = HostFacts {
            packages: Settings::default()
                .host_packages
                .iter()
                .map(|p| (p.clone(), "1".to_owned()))
                .collect(),
            image_sha256: Some(before.image.sha256.clone()),
            network: Some(NetworkFacts {
                spec: NetworkSpec::from_cluster(&before),
                state: NetState {
                    active: true,
                    autostart: true,
                },
                uuid: None,
            }),
            renew: None,
        };
        let with_worker3 = EXAMPLE.replacen(
            "[[turnd]]",
            "[[vms]]\nname = \"k8s-worker3\"\nip = \"10.10.10.13\"\nmac = \"52:54:00:0a:0a:0d\"\nvcpus = 2\nmemory_gib = 2\ndisk_gib = 60\nrole = \"worker\"\n\n[[turnd]]",
            1,
        );
        let after = cluster(&with_worker3);
        assert_eq!(after.vms.len(), before.vms.len() + 1);
        let p = plan(&after, &Settings::default(), &running);
        assert!(p.is_empty(), "{}", p.render(true));

        let moved = cluster(&EXAMPLE.replace("bridge = \"virbr1\"", "bridge = \"virbr9\""));
        let p = plan(&moved, &Settings::default(), &running);
        assert_eq!(
            p.disruptions()
                .map(|(a, _)| a.summary.as_str())
                .collect::<Vec<_>>(),
            ["stop network k8s-net to apply the new definition"]
        );
    }

    #[test]
    fn renewal_timer_is_installed_then_left_alone_and_re_enabled_when_off() {
        let fresh = renew_plan(BTreeMap::new(), false);
        assert_eq!(fresh.actions.len(), 1);
        let text = fresh.render(true);
        assert!(
            text.contains("/etc/systemd/system/turnd-cert-renew.service"),
            "{text}"
        );
        assert!(
            text.contains("/etc/systemd/system/turnd-cert-renew.timer"),
            "{text}"
        );
        assert!(
            text.contains("systemctl enable --now turnd-cert-renew.timer"),
            "{text}"
        );

        let installed: BTreeMap<String, String> = renew_files()
            .into_iter()
            .map(|(path, data)| (path, crate::phases::facts::sha256(&data)))
            .collect();
        assert!(
            renew_plan(installed.clone(), true).actions.is_empty(),
            "converged"
        );

        let off = renew_plan(installed.clone(), false);
        assert_eq!(off.actions.len(), 1);
        assert!(!off.render(true).contains("write "), "only re-enabled");

        let mut edited = installed;
        if let Some(h) = edited.values_mut().next() {
            *h = "0".repeat(64);
        }
        let repaired = renew_plan(edited, true).render(true);
        assert!(repaired.contains("daemon-reload"), "{repaired}");
    }
}
