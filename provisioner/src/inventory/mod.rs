//! The inventory: one TOML document (`cluster.toml`) that describes the whole cluster — the
//! host, its NAT network, every VM, the versions, the turnd instances, the domain, ACME and
//! monitoring. Secrets are never in it: see [`crate::secrets`].
//!
//! Reading is two steps: [`Inventory::from_toml`] parses with unknown keys refused, then
//! [`Inventory::validate`] checks the cross-field rules (IPs inside the network, unique names,
//! IPs and MACs, relay ranges, sizes that fit the host). Every error names the file, the line
//! and the key.

mod monitoring;
mod types;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use monitoring::{Email, EmailRoute, Monitoring, DEFAULT_CHART_VERSION};
pub use types::{HostName, Ipv4Cidr, MacAddr, Version, VirtType};

/// Why an inventory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("cannot read inventory {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, a missing key or a value of the wrong form.
    #[error("{file}:{line}: {message}")]
    Parse {
        /// The file (or `<inline>`).
        file: String,
        /// 1-based line.
        line: usize,
        /// What the parser said.
        message: String,
    },
    /// The TOML is well formed but breaks a rule.
    #[error("{file}:{line}: `{key}`: {reason}")]
    Invalid {
        /// The file (or `<inline>`).
        file: String,
        /// 1-based line of the key (or of its table when the key is absent).
        line: usize,
        /// Dotted key path, e.g. `vms[1].ip`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The whole cluster description, as written in `cluster.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// The physical host that runs libvirt.
    pub host: Host,
    /// The libvirt NAT network the VMs live on.
    pub network: Network,
    /// SSH access to the host and the VMs.
    pub ssh: Ssh,
    /// Pinned versions.
    pub versions: Versions,
    /// The cloud image every VM boots from.
    pub image: Image,
    /// Kubernetes cluster settings.
    pub kubernetes: Kubernetes,
    /// The VMs.
    pub vms: Vec<Vm>,
    /// The turnd instances.
    #[serde(default)]
    pub turnd: Vec<TurndInstance>,
    /// Long-term credentials carried over from the coturn cluster.
    #[serde(default)]
    pub auth: Auth,
    /// turnd's container image; absent: the release image of this provisioner's version.
    #[serde(default)]
    pub container: Option<Container>,
    /// The public domain.
    pub domain: Domain,
    /// ACME (certificate) settings.
    pub acme: Acme,
    /// Monitoring settings.
    pub monitoring: Monitoring,
}

/// The physical host.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// A name for the host (used in messages and the kubeconfig context).
    pub name: String,
    /// Address used to reach the host over SSH.
    pub ssh_address: String,
    /// Public IPv4 addresses routed to the host.
    pub public_ips: Vec<Ipv4Addr>,
    /// CPU threads the VMs may use in total.
    pub cpus: u32,
    /// Memory in GiB the VMs may use in total.
    pub memory_gib: u32,
    /// Disk in GiB available in `image_dir`.
    pub disk_gib: u32,
    /// libvirt connection URI on the host.
    #[serde(default = "default_libvirt_uri")]
    pub libvirt_uri: String,
    /// Where cloud images, overlays and seed ISOs are stored on the host.
    #[serde(default = "default_image_dir")]
    pub image_dir: String,
    /// `kvm` (default) or `qemu` (software emulation, for hosts without /dev/kvm).
    #[serde(default)]
    pub virt_type: VirtType,
}

impl Host {
    /// The host's main IP: `ssh_address` when it is an IPv4 address, else the first of
    /// `public_ips`. Its tcp/443 is the host's own, never turnd's.
    pub fn main_ip(&self) -> Option<Ipv4Addr> {
        self.ssh_address
            .parse()
            .ok()
            .or_else(|| self.public_ips.first().copied())
    }
}

fn default_libvirt_uri() -> String {
    "qemu:///system".to_owned()
}

fn default_image_dir() -> String {
    "/var/lib/libvirt/images".to_owned()
}

/// The libvirt NAT network.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// libvirt network name.
    pub name: String,
    /// Bridge device on the host.
    pub bridge: String,
    /// The network, e.g. `10.10.10.0/24`.
    pub cidr: Ipv4Cidr,
    /// The host's address on the bridge (the VMs' gateway).
    pub gateway: Ipv4Addr,
    /// DNS servers handed to the VMs.
    pub dns: Vec<Ipv4Addr>,
}

/// SSH access.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ssh {
    /// User on the host.
    pub host_user: String,
    /// SSH port on the host.
    #[serde(default = "default_ssh_port")]
    pub host_port: u16,
    /// User created in each VM by cloud-init.
    pub vm_user: String,
    /// Private key used for the host and the VMs.
    pub private_key: PathBuf,
    /// Public keys authorised in each VM.
    pub authorized_keys: Vec<String>,
    /// Known-hosts file for the host and the VMs (default: ssh's own).
    #[serde(default)]
    pub known_hosts: Option<PathBuf>,
}

fn default_ssh_port() -> u16 {
    22
}

/// Pinned versions.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Versions {
    /// Kubernetes (kubeadm, kubelet, kubectl).
    pub kubernetes: Version,
    /// Debian package revision of the Kubernetes packages on pkgs.k8s.io, e.g. `1.1`.
    pub kubernetes_package_revision: String,
    /// Cilium (Helm chart).
    pub cilium: Version,
    /// Helm.
    pub helm: Version,
}

/// The cloud image.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// Download URL.
    pub url: String,
    /// Expected SHA-256 of the image, lowercase hex.
    pub sha256: String,
    /// File name under `host.image_dir`.
    pub file: String,
    /// libosinfo id, e.g. `ubuntu22.04`.
    pub os_variant: String,
}

/// Kubernetes settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    /// Cluster name.
    pub cluster_name: String,
    /// Pod network.
    pub pod_cidr: Ipv4Cidr,
    /// Service network.
    pub service_cidr: Ipv4Cidr,
}

/// A VM's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The control-plane node.
    Master,
    /// A worker node.
    Worker,
}

/// One VM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Name: libvirt domain, hostname and Kubernetes node name.
    pub name: HostName,
    /// Static address on the NAT network.
    pub ip: Ipv4Addr,
    /// MAC address of its interface.
    pub mac: MacAddr,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in GiB.
    pub memory_gib: u32,
    /// Root disk size in GiB.
    pub disk_gib: u32,
    /// Role.
    pub role: Role,
    /// Kubernetes node labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One turnd instance.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TurndInstance {
    /// The worker VM it runs on.
    pub vm: HostName,
    /// The public IP it advertises (one of `host.public_ips`).
    pub public_ip: Ipv4Addr,
    /// First relay port.
    pub relay_port_min: u16,
    /// Last relay port (inclusive).
    pub relay_port_max: u16,
    /// Forward tcp/443 on `public_ip` to turnd (TURN over TLS for clients behind firewalls
    /// that allow only HTTPS). Off by default, and refused on the host's main IP, whose 443
    /// belongs to the host's own web services.
    #[serde(default)]
    pub tcp_443: bool,
}

/// turnd's container image.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// The image. From a registry it must name a digest (`REPO@sha256:…`), so every node runs
    /// the same bytes; with `pull = "never"` it is an image already loaded into each worker's
    /// containerd.
    pub image: String,
    /// `if-not-present` (default): pulled from the registry once per node; `never`: only the
    /// image loaded on the node is used.
    #[serde(default)]
    pub pull: PullPolicy,
    /// A locally built image: the OCI archive `provisioner image build` wrote (relative to the
    /// inventory's directory). `image` must then name the digest the build printed and `pull`
    /// must be `never`; `image load` and the `turnd` phase import the archive into every
    /// worker's containerd that lacks the digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<PathBuf>,
}

impl Container {
    /// The repository and the digest (`sha256:…`) of [`Container::image`], when it names one.
    pub fn pinned(&self) -> Option<(&str, &str)> {
        pinned_image(&self.image)
    }
}

/// Splits `REPO@sha256:<64 hex digits>` into the repository and the digest (`sha256:…`).
pub fn pinned_image(image: &str) -> Option<(&str, &str)> {
    let (repo, hex) = image.split_once("@sha256:")?;
    let ok = !repo.is_empty() && hex.len() == 64 && hex.chars().all(|x| x.is_ascii_hexdigit());
    ok.then(|| (repo, &image[repo.len() + 1..]))
}

/// When the kubelet pulls the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull when the node lacks it.
    #[default]
    IfNotPresent,
    /// Never pull: the image must be loaded on the node.
    Never,
}

impl PullPolicy {
    /// Kubernetes' `imagePullPolicy` value.
    pub fn as_k8s(self) -> &'static str {
        match self {
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Long-term credentials (RFC 8489 §9.2) carried into every `turnd.toml`, so the users and
/// realm of the old coturn cluster keep working.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// The realm (coturn's `realm`): part of every static user's key. Default: `domain.turn`.
    #[serde(default)]
    pub realm: Option<String>,
    /// Static users (coturn's `user=`).
    #[serde(default)]
    pub users: Vec<StaticUser>,
}

/// One static long-term user: its key, or the name of the variable (environment or `.env`)
/// that holds its password. Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticUser {
    /// The username.
    pub name: String,
    /// `0x` and 32 hex digits: what `turnadmin -k -u NAME -r REALM -p PASSWORD` (or
    /// `turnd key`) prints; tied to the realm.
    #[serde(default)]
    pub key: Option<String>,
    /// The variable holding the password, e.g. `TURN_PASSWORD_KIOSK`.
    #[serde(default)]
    pub password_env: Option<String>,
}

/// The public domain.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    /// The zone, e.g. `example.net`.
    pub zone: String,
    /// Name of the TURN service, e.g. `turn.example.net`.
    pub turn: String,
}

/// ACME settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    /// Account e-mail.
    pub email: String,
    /// Directory URL.
    pub directory: String,
    /// DNS-01 provider; only `cloudflare` is supported.
    pub dns_provider: String,
}

/// A validated inventory: only [`Inventory::validate`] makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    inv: Inventory,
}

impl std::ops::Deref for Cluster {
    type Target = Inventory;
    fn deref(&self) -> &Inventory {
        &self.inv
    }
}

impl Cluster {
    /// The realm of long-term credentials: `auth.realm`, else `domain.turn`.
    pub fn realm(&self) -> &str {
        self.inv
            .auth
            .realm
            .as_deref()
            .unwrap_or(&self.inv.domain.turn)
    }

    /// The control-plane VM.
    pub fn master(&self) -> &Vm {
        // validate() guarantees exactly one master.
        self.inv
            .vms
            .iter()
            .find(|v| v.role == Role::Master)
            .unwrap_or(&self.inv.vms[0])
    }

    /// The worker VMs, in inventory order.
    pub fn workers(&self) -> impl Iterator<Item = &Vm> {
        self.inv.vms.iter().filter(|v| v.role == Role::Worker)
    }

    /// The VM called `name`.
    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.inv.vms.iter().find(|v| v.name.as_str() == name)
    }
}

/// Ports below this are refused for relays.
const RELAY_PORT_FLOOR: u16 = 1024;
/// Kubernetes NodePort range, which relays must not overlap.
const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

impl Inventory {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Cluster, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file = path.display().to_string();
        let mut c = Self::from_toml_named(&text, &file)?.validate_named(&text, &file)?;
        // A relative image archive lives next to the inventory.
        if let Some(archive) = c.inv.container.as_mut().and_then(|c| c.archive.as_mut()) {
            if archive.is_relative() {
                *archive = path.parent().unwrap_or(Path::new(".")).join(&*archive);
            }
        }
        Ok(c)
    }

    /// Parses `text` (unknown keys are errors). Call [`Inventory::validate`] next.
    pub fn from_toml(text: &str) -> Result<Self, InventoryError> {
        Self::from_toml_named(text, "<inline>")
    }

    fn from_toml_named(text: &str, file: &str) -> Result<Self, InventoryError> {
        toml::from_str(text).map_err(|e| InventoryError::Parse {
            file: file.to_owned(),
            line: e.span().map_or(0, |s| line_of(text, s.start)),
            message: e.message().trim_end().to_owned(),
        })
    }

    /// Checks the rules that span several keys. `text` is the TOML this inventory was parsed
    /// from; it is used only to find the line of an offending key.
    pub fn validate(self, text: &str) -> Result<Cluster, InventoryError> {
        self.validate_named(text, "<inline>")
    }

    fn validate_named(self, text: &str, file: &str) -> Result<Cluster, InventoryError> {
        match self.check() {
            Ok(()) => Ok(Cluster { inv: self }),
            Err((key, reason)) => Err(InventoryError::Invalid {
                file: file.to_owned(),
                line: line_of_key(text, &key),
                key,
                reason,
            }),
        }
    }

    /// The first broken rule, as (key path, reason).
    fn check(&self) -> Result<(), (String, String)> {
        let net = &self.network;
        let fail = |key: String, reason: String| Err((key, reason));
        if !net.cidr.contains_host(net.gateway) {
            return fail(
                "network.gateway".into(),
                format!("{} is not a host address of {}", net.gateway, net.cidr),
            );
        }
        if self.host.public_ips.is_empty() {
            return fail("host.public_ips".into(), "at least one is needed".into());
        }
        if let Some(dup) = first_duplicate(self.host.public_ips.iter()) {
            return fail(format!("host.public_ips[{dup}]"), "listed twice".to_owned());
        }
        if self.ssh.authorized_keys.is_empty() {
            return fail(
                "ssh.authorized_keys".into(),
                "at least one public key is needed to reach the VMs".into(),
            );
        }
        if self.image.sha256.len() != 64
            || !self
                .image
                .sha256
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            return fail(
                "image.sha256".into(),
                "must be 64 lowercase hex digits".into(),
            );
        }
        if self.image.file.contains('/') || self.image.file.is_empty() {
            return fail(
                "image.file".into(),
                "must be a plain file name (it lives in host.image_dir)".into(),
            );
        }
        if self.kubernetes.pod_cidr == self.kubernetes.service_cidr {
            return fail(
                "kubernetes.service_cidr".into(),
                "must differ from kubernetes.pod_cidr".into(),
            );
        }
        if self.acme.dns_provider != "cloudflare" {
            return fail(
                "acme.dns_provider".into(),
                format!(
                    "`{}` is not supported; only `cloudflare` is",
                    self.acme.dns_provider
                ),
            );
        }
        if !self
            .domain
            .turn
            .ends_with(&format!(".{}", self.domain.zone))
            && self.domain.turn != self.domain.zone
        {
            return fail(
                "domain.turn".into(),
                format!(
                    "`{}` is not inside zone `{}`",
                    self.domain.turn, self.domain.zone
                ),
            );
        }

        self.monitoring.check()?;
        if let Some(c) = &self.container {
            let digest_ok = c.pinned().is_some();
            if let Some(archive) = &c.archive {
                if archive.as_os_str().is_empty() {
                    return fail("container.archive".into(), "must not be empty".into());
                }
                if !digest_ok {
                    return fail(
                        "container.image".into(),
                        format!(
                            "`{}`: an image loaded from container.archive is referred to by its digest: set it to the REPO@sha256:<64 hex digits> that `provisioner image build` printed",
                            c.image
                        ),
                    );
                }
                if c.pull != PullPolicy::Never {
                    return fail(
                        "container.pull".into(),
                        "an image loaded from container.archive is never pulled: set pull = \"never\"".into(),
                    );
                }
            }
            if c.image.is_empty() || (c.pull != PullPolicy::Never && !digest_ok) {
                return fail(
                    "container.image".into(),
                    format!(
                        "`{}`: an image from a registry must name its digest (REPO@sha256:<64 hex digits>); an image loaded on the nodes needs pull = \"never\"",
                        c.image
                    ),
                );
            }
        }
        if self.auth.realm.as_deref().is_some_and(str::is_empty) {
            return fail("auth.realm".into(), "must not be empty".into());
        }
        let mut user_names: HashMap<&str, usize> = HashMap::new();
        for (i, u) in self.auth.users.iter().enumerate() {
            if u.name.is_empty() || u.name.contains(':') {
                return fail(
                    format!("auth.users[{i}].name"),
                    "must be non-empty and without `:` (REST-API usernames have one)".into(),
                );
            }
            if let Some(first) = user_names.insert(u.name.as_str(), i) {
                return fail(
                    format!("auth.users[{i}].name"),
                    format!("`{}` is already auth.users[{first}]", u.name),
                );
            }
            match (&u.key, &u.password_env) {
                (Some(key), None) => {
                    let hex = key.strip_prefix("0x").unwrap_or_default();
                    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                        return fail(
                            format!("auth.users[{i}].key"),
                            "must be `0x` and 32 hex digits, as `turnadmin -k` prints it".into(),
                        );
                    }
                }
                (None, Some(var)) => {
                    let ok = var
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !ok {
                        return fail(
                            format!("auth.users[{i}].password_env"),
                            format!("`{var}` is not a variable name"),
                        );
                    }
                }
                _ => {
                    return fail(
                        format!("auth.users[{i}]"),
                        "give exactly one of `key` and `password_env`".into(),
                    )
                }
            }
        }
        if self.vms.is_empty() {
            return fail("vms".into(), "at least one VM is needed".into());
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut ips: HashMap<Ipv4Addr, usize> = HashMap::new();
        let mut macs: HashMap<MacAddr, usize> = HashMap::new();
        for (i, vm) in self.vms.iter().enumerate() {
            if let Some(first) = names.insert(vm.name.as_str(), i) {
                return fail(
                    format!("vms[{i}].name"),
                    format!("`{}` is already used by vms[{first}]", vm.name),
                );
            }
            if !net.cidr.contains_host(vm.ip) {
                return fail(
                    format!("vms[{i}].ip"),
                    format!("{} is outside the network {}", vm.ip, net.cidr),
                );
            }
            if vm.ip == net.gateway {
                return fail(
                    format!("vms[{i}].ip"),
                    format!("{} is the network gateway", vm.ip),
                );
            }
            if let Some(first) = ips.insert(vm.ip, i) {
                return fail(
                    format!("vms[{i}].ip"),
                    format!("{} is already used by vms[{first}]", vm.ip),
                );
            }
            if let Some(first) = macs.insert(vm.mac, i) {
                return fail(
                    format!("vms[{i}].mac"),
                    format!("{} is already used by vms[{first}]", vm.mac),
                );
            }
            for (k, v) in &vm.labels {
                if let Err(reason) = check_label(k, v) {
                    return fail(format!("vms[{i}].labels"), reason);
                }
            }
            for (field, value, min) in [
                ("vcpus", vm.vcpus, 1),
                ("memory_gib", vm.memory_gib, 1),
                ("disk_gib", vm.disk_gib, 10),
            ] {
                if value < min {
                    return fail(
                        format!("vms[{i}].{field}"),
                        format!("{value} is below the minimum {min}"),
                    );
                }
            }
        }
        let masters: Vec<usize> = (0..self.vms.len())
            .filter(|i| self.vms[*i].role == Role::Master)
            .collect();
        match masters.as_slice() {
            [_] => {}
            [] => {
                return fail(
                    "vms".into(),
                    "exactly one VM needs role = \"master\"".into(),
                )
            }
            [_, second, ..] => {
                return fail(
                    format!("vms[{second}].role"),
                    "only one master is supported".into(),
                )
            }
        }
        for (field, total, limit) in [
            (
                "vcpus",
                self.vms.iter().map(|v| u64::from(v.vcpus)).sum::<u64>(),
                self.host.cpus,
            ),
            (
                "memory_gib",
                self.vms.iter().map(|v| u64::from(v.memory_gib)).sum(),
                self.host.memory_gib,
            ),
            (
                "disk_gib",
                self.vms.iter().map(|v| u64::from(v.disk_gib)).sum(),
                self.host.disk_gib,
            ),
        ] {
            if total > u64::from(limit) {
                let last = self.vms.len() - 1;
                return fail(
                    format!("vms[{last}].{field}"),
                    format!("the VMs need {total} in total but host.{field} allows {limit}")
                        .replace("host.vcpus", "host.cpus"),
                );
            }
        }

        let mut used_public: HashMap<Ipv4Addr, usize> = HashMap::new();
        let mut ranges_on_vm: Vec<(&str, u16, u16, usize)> = Vec::new();
        for (i, t) in self.turnd.iter().enumerate() {
            match self.vms.iter().find(|v| v.name == t.vm) {
                None => {
                    return fail(
                        format!("turnd[{i}].vm"),
                        format!("there is no VM named `{}`", t.vm),
                    )
                }
                Some(vm) if vm.role != Role::Worker => {
                    return fail(
                        format!("turnd[{i}].vm"),
                        format!("`{}` is not a worker", t.vm),
                    )
                }
                Some(_) => {}
            }
            if !self.host.public_ips.contains(&t.public_ip) {
                return fail(
                    format!("turnd[{i}].public_ip"),
                    format!("{} is not one of host.public_ips", t.public_ip),
                );
            }
            if t.tcp_443 && Some(t.public_ip) == self.host.main_ip() {
                return fail(
                    format!("turnd[{i}].tcp_443"),
                    format!(
                        "{} is the host's main IP (host.ssh_address): forwarding its tcp/443 to turnd takes HTTPS away from the host's own services; give this instance another of host.public_ips",
                        t.public_ip
                    ),
                );
            }
            if let Some(first) = used_public.insert(t.public_ip, i) {
                return fail(
                    format!("turnd[{i}].public_ip"),
                    format!("{} is already used by turnd[{first}]", t.public_ip),
                );
            }
            if t.relay_port_min < RELAY_PORT_FLOOR {
                return fail(
                    format!("turnd[{i}].relay_port_min"),
                    format!("{} is below {RELAY_PORT_FLOOR}", t.relay_port_min),
                );
            }
            if t.relay_port_max < t.relay_port_min {
                return fail(
                    format!("turnd[{i}].relay_port_max"),
                    format!(
                        "{} is below relay_port_min {}",
                        t.relay_port_max, t.relay_port_min
                    ),
                );
            }
            if t.relay_port_min <= *NODE_PORTS.end() && t.relay_port_max >= *NODE_PORTS.start() {
                return fail(
                    format!("turnd[{i}].relay_port_min"),
                    format!(
                        "{}-{} overlaps the Kubernetes NodePort range {}-{}",
                        t.relay_port_min,
                        t.relay_port_max,
                        NODE_PORTS.start(),
                        NODE_PORTS.end()
                    ),
                );
            }
            for (vm, lo, hi, j) in &ranges_on_vm {
                if *vm == t.vm.as_str() && t.relay_port_min <= *hi && t.relay_port_max >= *lo {
                    return fail(
                        format!("turnd[{i}].relay_port_min"),
                        format!("overlaps the relay range of turnd[{j}] on the same VM"),
                    );
                }
            }
            ranges_on_vm.push((t.vm.as_str(), t.relay_port_min, t.relay_port_max, i));
        }
        Ok(())
    }
}

/// Kubernetes label rules: an optional DNS-subdomain prefix and `/`, a name of at most 63
/// alphanumerics, `-`, `_` or `.` starting and ending alphanumeric; a value of the same form
/// or empty.
fn check_label(key: &str, value: &str) -> Result<(), String> {
    let segment_ok = |s: &str| {
        s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(format!("label key `{key}` has an invalid prefix `{p}`"));
        }
    }
    if !segment_ok(name) {
        return Err(format!("label key `{key}` is not a valid label name"));
    }
    if !value.is_empty() && !segment_ok(value) {
        return Err(format!("label `{key}` has an invalid value `{value}`"));
    }
    Ok(())
}

fn first_duplicate<T: PartialEq>(items: impl Iterator<Item = T>) -> Option<usize> {
    let items: Vec<T> = items.collect();
    (0..items.len()).find(|&i| items[..i].contains(&items[i]))
}

/// 1-based line number of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |head| head.bytes().filter(|b| *b == b'\n').count())
        + 1
}

/// The line of a dotted key path like `vms[1].ip` in `text`, or of the closest table that
/// exists when the key itself is absent; 0 when nothing can be found.
fn line_of_key(text: &str, path: &str) -> usize {
    let Ok(doc) = toml_edit::ImDocument::parse(text) else {
        return 0;
    };
    let mut best: Option<std::ops::Range<usize>> = doc.as_table().span();
    let mut item: Option<&toml_edit::Item> = None;
    let mut table: Option<&dyn toml_edit::TableLike> = Some(doc.as_table());
    for segment in path.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some(t) = table else { break };
        let Some((key, found)) = t.get_key_value(name) else {
            break;
        };
        best = key.span().or(best);
        item = Some(found);
        table = found.as_table_like();
        if let Some(i) = index {
            if let Some(aot) = found.as_array_of_tables() {
                match aot.get(i) {
                    Some(t) => {
                        best = t.span().or(best);
                        table = Some(t);
                    }
                    None => break,
                }
            } else if let Some(arr) = found.as_array() {
                if let Some(v) = arr.get(i) {
                    best = v.span().or(best);
                }
                table = None;
                item = None;
            }
        }
    }
    let _ = item;
    best.map_or(0, |s| line_of(text, s.start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_rules_follow_kubernetes() {
        assert!(check_label("turnd.io/relay", "true").is_ok());
        assert!(check_label("node-role.kubernetes.io/worker", "").is_ok());
        assert!(check_label("Bad_Prefix/x", "y").is_err());
        assert!(check_label("x", "has space").is_err());
        assert!(check_label("-x", "y").is_err());
    }

    #[test]
    fn line_of_counts_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
    }

    #[test]
    fn line_of_key_finds_array_of_table_fields() {
        let text = "[a]\nx = 1\n\n[[vms]]\nname = \"a\"\nip = \"1\"\n\n[[vms]]\nname = \"b\"\nip = \"2\"\n";
        assert_eq!(line_of_key(text, "a.x"), 2);
        assert_eq!(line_of_key(text, "vms[0].ip"), 6);
        assert_eq!(line_of_key(text, "vms[1].ip"), 10);
        assert_eq!(line_of_key(text, "vms[1].missing"), 8);
    }

    #[test]
    fn line_of_key_finds_array_elements() {
        let text = "[host]\npublic_ips = [\n  \"1.1.1.1\",\n  \"1.1.1.1\",\n]\n";
        assert_eq!(line_of_key(text, "host.public_ips[1]"), 4);
    }
}
