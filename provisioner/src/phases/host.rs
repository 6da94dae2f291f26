//! Phase 1, `host`: packages on the host, the verified cloud image, the NAT network.

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

/// What `host` observed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostFacts {
    /// Installed packages (of those we asked about) → version.
    pub packages: BTreeMap<String, String>,
    /// SHA-256 of the cloud image, if it exists.
    pub image_sha256: Option<String>,
    /// The network, if defined.
    pub network: Option<NetworkFacts>,
}

/// Where the provisioner keeps its own files on the host.
pub fn state_dir(c: &Cluster) -> String {
    format!("{}/provisioner", c.host.image_dir)
}

/// The cloud image's path on the host.
pub fn image_path(c: &Cluster) -> String {
    format!("{}/{}", c.host.image_dir, c.image.file)
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
    Ok(HostFacts {
        packages,
        image_sha256,
        network: gather_network(ctx)?,
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
        p.actions.push(Action::run(
            Target::Host,
            format!("install packages {}", missing.join(" ")),
            Cmd::new("env")
                .args([
                    "DEBIAN_FRONTEND=noninteractive",
                    "apt-get",
                    "install",
                    "-y",
                    "--no-install-recommends",
                ])
                .args(missing),
        ));
    }
    if facts.image_sha256.as_deref() != Some(c.image.sha256.as_str()) {
        let path = image_path(c);
        let part = format!("{path}.part");
        let why = if facts.image_sha256.is_some() {
            "checksum differs"
        } else {
            "missing"
        };
        p.actions.push(Action::steps(
            Target::Host,
            format!("download cloud image {} ({why})", c.image.file),
            vec![
                Step::Run(Cmd::new("mkdir").args(["-p", &c.host.image_dir])),
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
        ));
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
                    p.actions.push(Action::run(
                        Target::Host,
                        format!("stop network {name} to apply the new definition"),
                        Virsh::cmd(uri, &["net-destroy", name]),
                    ));
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
