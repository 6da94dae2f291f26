//! Phase 2, `vms`: a qcow2 overlay on the cloud image, a cloud-init seed ISO, and a libvirt
//! domain for every VM. Also the full teardown.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::host::{image_path, state_dir, NetworkFacts};
use super::virsh::Virsh;
use super::{Context, PhaseError, Settings};
use crate::exec::Cmd;
use crate::inventory::{Cluster, Vm};
use crate::plan::{Action, ActionKind, PhaseId, Plan, Step, Target};
use crate::render::cloudinit;
use crate::render::libvirt::{overlay_path, seed_path, uuid_of, DomainSpec};

/// A qcow2 image as `qemu-img info --output=json` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QemuImgInfo {
    /// Format, e.g. `qcow2`.
    pub format: String,
    /// Size in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Backing file, if any.
    #[serde(rename = "backing-filename")]
    pub backing_filename: Option<String>,
}

/// One VM as observed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmFacts {
    /// The overlay, if it exists.
    pub overlay: Option<QemuImgInfo>,
    /// The hash recorded next to the seed ISO, if both exist.
    pub seed_hash: Option<String>,
    /// The domain's managed fields, if defined.
    pub domain: Option<DomainSpec>,
    /// Whether the domain runs.
    pub running: bool,
    /// libvirt's UUID for the domain.
    pub uuid: Option<String>,
}

/// What `vms` observed, by VM name.
pub type VmsFacts = BTreeMap<String, VmFacts>;

fn seed_dir(c: &Cluster, vm: &str) -> String {
    format!("{}/seed-{vm}", state_dir(c))
}

fn seed_hash_path(c: &Cluster, vm: &str) -> String {
    format!("{}/seed.sha256", seed_dir(c, vm))
}

const GIB: u64 = 1024 * 1024 * 1024;

/// Observes every VM of the inventory.
pub fn gather(ctx: &Context<'_>) -> Result<VmsFacts, PhaseError> {
    let c = ctx.cluster;
    let host = ctx.transports.host.as_ref();
    let gather = |source| PhaseError::Gather {
        phase: PhaseId::Vms,
        source,
    };
    let virsh = Virsh::new(host, &c.host.libvirt_uri);
    let domains = virsh.domains().map_err(gather)?;
    let mut out = VmsFacts::new();
    for vm in &c.vms {
        let name = vm.name.as_str();
        let mut f = VmFacts::default();
        let overlay = overlay_path(&c.host.image_dir, name);
        // --force-share: a running QEMU holds the write lock on the overlay.
        let info_cmd =
            Cmd::new("qemu-img").args(["info", "--force-share", "--output=json", &overlay]);
        let info = host.run(&info_cmd).map_err(gather)?;
        if info.success() {
            f.overlay =
                Some(
                    serde_json::from_str(&info.stdout).map_err(|e| PhaseError::Output {
                        phase: PhaseId::Vms,
                        command: info_cmd.shell_line(),
                        reason: e.to_string(),
                    })?,
                );
        }
        let seed = host
            .run(&Cmd::new("sh").args([
                "-c",
                "test -f \"$1\" && cat \"$2\"",
                "sh",
                &seed_path(&c.host.image_dir, name),
                &seed_hash_path(c, name),
            ]))
            .map_err(gather)?;
        if seed.success() {
            f.seed_hash = Some(seed.stdout.trim().to_owned());
        }
        if domains.iter().any(|d| d == name) {
            let xml = virsh.dom_xml(name).map_err(gather)?;
            let xml_err = |source| PhaseError::Xml {
                phase: PhaseId::Vms,
                source,
            };
            f.domain = Some(DomainSpec::from_xml(&xml).map_err(xml_err)?);
            f.uuid = uuid_of(&xml).map_err(xml_err)?;
            f.running = virsh.dom_running(name).map_err(gather)?;
        }
        out.insert(name.to_owned(), f);
    }
    Ok(out)
}

fn seed_steps(c: &Cluster, vm: &Vm) -> Vec<Step> {
    let name = vm.name.as_str();
    let seed = cloudinit::seed(c, vm);
    let dir = seed_dir(c, name);
    let file = |f: &str| format!("{dir}/{f}");
    vec![
        Step::Upload {
            path: file("user-data"),
            data: seed.user_data.clone().into_bytes(),
            mode: 0o600,
        },
        Step::Upload {
            path: file("meta-data"),
            data: seed.meta_data.clone().into_bytes(),
            mode: 0o644,
        },
        Step::Upload {
            path: file("network-config"),
            data: seed.network_config.clone().into_bytes(),
            mode: 0o644,
        },
        Step::Run(Cmd::new("cloud-localds").args([
            format!("--network-config={}", file("network-config")),
            seed_path(&c.host.image_dir, name),
            file("user-data"),
            file("meta-data"),
        ])),
        Step::Upload {
            path: seed_hash_path(c, name),
            data: format!("{}\n", seed.hash()).into_bytes(),
            mode: 0o644,
        },
    ]
}

fn define_domain(c: &Cluster, spec: &DomainSpec, uuid: Option<&str>) -> Vec<Step> {
    let path = format!("{}/domain-{}.xml", state_dir(c), spec.name);
    vec![
        Step::Upload {
            path: path.clone(),
            data: spec.to_xml_with_uuid(uuid).into_bytes(),
            mode: 0o644,
        },
        Step::Run(Virsh::cmd(&c.host.libvirt_uri, &["define", &path])),
    ]
}

/// The domain wanted for `vm`.
pub fn domain_spec(c: &Cluster, settings: &Settings, vm: &Vm) -> DomainSpec {
    let mut spec = DomainSpec::from_vm(c, vm);
    spec.direct_kernel.clone_from(&settings.direct_kernel);
    spec
}

/// Plans `vms` from what was observed.
pub fn plan(c: &Cluster, settings: &Settings, facts: &VmsFacts) -> Plan {
    let mut p = Plan::new(PhaseId::Vms);
    let uri = &c.host.libvirt_uri;
    let none = VmFacts::default();
    for vm in &c.vms {
        let name = vm.name.as_str();
        let f = facts.get(name).unwrap_or(&none);
        let overlay = overlay_path(&c.host.image_dir, name);
        let size = format!("{}G", vm.disk_gib);
        match &f.overlay {
            None => p.actions.push(Action::run(
                Target::Host,
                format!("create overlay disk {overlay} ({size} on {})", c.image.file),
                Cmd::new("qemu-img").args([
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    &image_path(c),
                    &overlay,
                    &size,
                ]),
            )),
            Some(info) => {
                if info.backing_filename.as_deref() != Some(image_path(c).as_str())
                    || info.format != "qcow2"
                {
                    p.notes.push(format!(
                        "{name}: {overlay} is {} backed by {:?}, not a qcow2 overlay of {}; left alone (teardown and re-apply to rebuild)",
                        info.format,
                        info.backing_filename,
                        image_path(c)
                    ));
                }
                if info.virtual_size < u64::from(vm.disk_gib) * GIB {
                    // A running VM's disk grows through QEMU (`blockresize`): `qemu-img`
                    // must never write an image that QEMU holds open.
                    let cmd = if f.running {
                        Virsh::cmd(uri, &["blockresize", name, &overlay, &size])
                    } else {
                        Cmd::new("qemu-img").args(["resize", "-q", &overlay, &size])
                    };
                    p.actions.push(Action::run(
                        Target::Host,
                        format!("grow overlay disk {overlay} to {size}"),
                        cmd,
                    ));
                } else if info.virtual_size > u64::from(vm.disk_gib) * GIB {
                    p.notes.push(format!(
                        "{name}: {overlay} is larger than {size}; disks are never shrunk"
                    ));
                }
            }
        }
        let want_hash = cloudinit::seed(c, vm).hash();
        if f.seed_hash.as_deref() != Some(want_hash.as_str()) {
            let why = if f.seed_hash.is_some() {
                "contents differ"
            } else {
                "missing"
            };
            p.actions.push(Action::steps(
                Target::Host,
                format!(
                    "write cloud-init seed {} ({why})",
                    seed_path(&c.host.image_dir, name)
                ),
                seed_steps(c, vm),
            ));
        }
        let want = domain_spec(c, settings, vm);
        let drift = f.domain.as_ref().is_some_and(|d| *d != want);
        match &f.domain {
            None => p.actions.push(Action::steps(
                Target::Host,
                format!("define domain {name} (new)"),
                define_domain(c, &want, None),
            )),
            Some(_) if drift => {
                p.actions.push(Action::steps(
                    Target::Host,
                    format!("redefine domain {name} (definition differs)"),
                    define_domain(c, &want, f.uuid.as_deref()),
                ));
                if f.running {
                    p.push_disruptive(
                        Action::run(
                            Target::Host,
                            format!("stop domain {name} to apply the new definition"),
                            Virsh::cmd(uri, &["destroy", name]),
                        ),
                        "hard-stops the VM (its pods and their sessions end)",
                    );
                }
            }
            Some(_) => {}
        }
        if !f.running || drift {
            p.actions.push(Action::run(
                Target::Host,
                format!("start domain {name}"),
                Virsh::cmd(uri, &["start", name]),
            ));
            if let Some(timeout) = settings.vm_ready_timeout {
                p.actions.push(Action {
                    target: Target::Vm(name.to_owned()),
                    summary: format!("wait for SSH and cloud-init on {name}"),
                    kind: ActionKind::WaitReady { timeout },
                });
            }
        }
        if f.domain.is_none() {
            p.actions.push(Action::run(
                Target::Host,
                format!("autostart domain {name}"),
                Virsh::cmd(uri, &["autostart", name]),
            ));
        }
    }
    p
}

/// Plans the full teardown: domains stopped and undefined, their disks and seeds removed,
/// then the network stopped and undefined. The cloud image stays.
pub fn plan_teardown(c: &Cluster, facts: &VmsFacts, network: &Option<NetworkFacts>) -> Plan {
    let mut p = Plan::new(PhaseId::Vms);
    let uri = &c.host.libvirt_uri;
    for vm in &c.vms {
        let name = vm.name.as_str();
        let Some(f) = facts.get(name) else { continue };
        if f.running {
            p.push_disruptive(
                Action::run(
                    Target::Host,
                    format!("stop domain {name}"),
                    Virsh::cmd(uri, &["destroy", name]),
                ),
                "hard-stops the VM",
            );
        }
        if f.domain.is_some() {
            p.actions.push(Action::run(
                Target::Host,
                format!("undefine domain {name}"),
                Virsh::cmd(uri, &["undefine", name]),
            ));
        }
        if f.overlay.is_some() || f.seed_hash.is_some() {
            p.push_disruptive(
                Action::run(
                    Target::Host,
                    format!("remove disk and seed of {name}"),
                    Cmd::new("rm").args([
                        "-rf",
                        &overlay_path(&c.host.image_dir, name),
                        &seed_path(&c.host.image_dir, name),
                        &seed_dir(c, name),
                    ]),
                ),
                "deletes the VM's disk",
            );
        }
    }
    if let Some(n) = network {
        let name = &c.network.name;
        if n.state.active {
            p.push_disruptive(
                Action::run(
                    Target::Host,
                    format!("stop network {name}"),
                    Virsh::cmd(uri, &["net-destroy", name]),
                ),
                "every VM on it loses its network",
            );
        }
        p.actions.push(Action::run(
            Target::Host,
            format!("undefine network {name}"),
            Virsh::cmd(uri, &["net-undefine", name]),
        ));
    }
    p
}
