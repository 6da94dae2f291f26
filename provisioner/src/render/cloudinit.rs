//! cloud-init NoCloud seed: `user-data`, `meta-data` and `network-config` (v2) for one VM,
//! serialised from typed structs.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::inventory::{Cluster, Vm};

/// A user created by cloud-init.
#[derive(Debug, Clone, Serialize)]
pub struct User {
    /// Login.
    pub name: String,
    /// Supplementary groups.
    pub groups: Vec<String>,
    /// Login shell.
    pub shell: String,
    /// sudoers rule.
    pub sudo: String,
    /// No password login.
    pub lock_passwd: bool,
    /// Keys.
    pub ssh_authorized_keys: Vec<String>,
}

/// `growpart` module settings.
#[derive(Debug, Clone, Serialize)]
pub struct Growpart {
    /// `auto`.
    pub mode: String,
    /// Devices to grow.
    pub devices: Vec<String>,
}

/// The `#cloud-config` user-data.
#[derive(Debug, Clone, Serialize)]
pub struct UserData {
    /// Hostname.
    pub hostname: String,
    /// Let cloud-init write /etc/hosts.
    pub manage_etc_hosts: bool,
    /// Users.
    pub users: Vec<User>,
    /// Password SSH login.
    pub ssh_pwauth: bool,
    /// Disable root login.
    pub disable_root: bool,
    /// Time zone.
    pub timezone: String,
    /// Run `apt-get update` on first boot.
    pub package_update: bool,
    /// Packages installed on first boot.
    pub packages: Vec<String>,
    /// Grow the root partition to the disk.
    pub growpart: Growpart,
    /// Commands run once on first boot.
    pub runcmd: Vec<Vec<String>>,
}

/// `meta-data`.
#[derive(Debug, Clone, Serialize)]
pub struct MetaData {
    /// The VM's name, never changed: cloud-init runs its per-instance modules (users, host
    /// keys) once; a changed seed is not re-applied to a running VM (rebuild it to change
    /// them), so its SSH host keys survive.
    #[serde(rename = "instance-id")]
    pub instance_id: String,
    /// Hostname.
    #[serde(rename = "local-hostname")]
    pub local_hostname: String,
}

/// A `match` stanza.
#[derive(Debug, Clone, Serialize)]
pub struct Match {
    /// MAC address.
    pub macaddress: String,
}

/// A route.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    /// Destination; `0.0.0.0/0` (cloud-init 22.4 crashes on `default`).
    pub to: String,
    /// Gateway.
    pub via: String,
}

/// Name servers.
#[derive(Debug, Clone, Serialize)]
pub struct Nameservers {
    /// Addresses.
    pub addresses: Vec<String>,
}

/// One ethernet.
#[derive(Debug, Clone, Serialize)]
pub struct Ethernet {
    /// How to find it.
    #[serde(rename = "match")]
    pub matches: Match,
    /// Rename to.
    #[serde(rename = "set-name")]
    pub set_name: String,
    /// No DHCP: the address is static.
    pub dhcp4: bool,
    /// Addresses with prefix.
    pub addresses: Vec<String>,
    /// Routes.
    pub routes: Vec<Route>,
    /// DNS.
    pub nameservers: Nameservers,
}

/// `network-config` version 2.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkConfig {
    /// Always 2.
    pub version: u8,
    /// Interfaces by id.
    pub ethernets: BTreeMap<String, Ethernet>,
}

/// The three seed files of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// `user-data`.
    pub user_data: String,
    /// `meta-data`.
    pub meta_data: String,
    /// `network-config`.
    pub network_config: String,
}

impl Seed {
    /// SHA-256 over the three files: what `vms` compares to decide whether to rebuild the ISO.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.user_data, &self.meta_data, &self.network_config] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        hex(&h.finalize())
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The typed user-data for `vm`.
pub fn user_data(c: &Cluster, vm: &Vm) -> UserData {
    UserData {
        hostname: vm.name.to_string(),
        manage_etc_hosts: true,
        users: vec![User {
            name: c.ssh.vm_user.clone(),
            groups: vec!["sudo".into()],
            shell: "/bin/bash".into(),
            sudo: "ALL=(ALL) NOPASSWD:ALL".into(),
            lock_passwd: true,
            ssh_authorized_keys: c.ssh.authorized_keys.clone(),
        }],
        ssh_pwauth: false,
        disable_root: true,
        timezone: "UTC".into(),
        package_update: true,
        packages: vec!["qemu-guest-agent".into(), "openssh-server".into()],
        growpart: Growpart {
            mode: "auto".into(),
            devices: vec!["/".into()],
        },
        runcmd: vec![vec![
            "systemctl".into(),
            "enable".into(),
            "--now".into(),
            "qemu-guest-agent".into(),
        ]],
    }
}

/// The typed network-config for `vm`.
pub fn network_config(c: &Cluster, vm: &Vm) -> NetworkConfig {
    let eth = Ethernet {
        matches: Match {
            macaddress: vm.mac.to_string(),
        },
        set_name: "eth0".into(),
        dhcp4: false,
        addresses: vec![format!("{}/{}", vm.ip, c.network.cidr.prefix())],
        routes: vec![Route {
            to: "0.0.0.0/0".into(),
            via: c.network.gateway.to_string(),
        }],
        nameservers: Nameservers {
            addresses: c.network.dns.iter().map(ToString::to_string).collect(),
        },
    };
    NetworkConfig {
        version: 2,
        ethernets: BTreeMap::from([("eth0".to_owned(), eth)]),
    }
}

fn yaml<T: Serialize>(v: &T) -> String {
    // Serialising these plain structs cannot fail.
    serde_norway::to_string(v).unwrap_or_default()
}

/// The three seed files for `vm`.
pub fn seed(c: &Cluster, vm: &Vm) -> Seed {
    let user_data = format!("#cloud-config\n{}", yaml(&user_data(c, vm)));
    let network_config = yaml(&network_config(c, vm));
    let meta_data = yaml(&MetaData {
        // Stable across seed changes: a new instance-id makes cloud-init treat the VM as a new
        // instance and regenerate its SSH host keys, and the next run meets a refused host key.
        instance_id: vm.name.to_string(),
        local_hostname: vm.name.to_string(),
    });
    Seed {
        user_data,
        meta_data,
        network_config,
    }
}

/// Why the unknown-key check could not run.
#[derive(Debug, thiserror::Error)]
pub enum SchemaCheckError {
    /// The schema is not JSON or lacks the expected structure.
    #[error("cloud-init schema: {0}")]
    Schema(String),
    /// The user-data is not YAML.
    #[error("user-data is not YAML: {0}")]
    UserData(String),
}

/// Keys of `user_data` that cloud-init's JSON schema (`schema-cloud-config-v1.json`) does not
/// define: `cloud-init schema` accepts unknown keys, so a typo would pass it silently. Checks
/// the top level and each entry of `users`. Returns dotted paths, e.g. `packges` or
/// `users[0].shel`.
pub fn unknown_keys(user_data: &str, schema_json: &str) -> Result<Vec<String>, SchemaCheckError> {
    let schema: serde_json::Value =
        serde_json::from_str(schema_json).map_err(|e| SchemaCheckError::Schema(e.to_string()))?;
    let defs = schema
        .get("$defs")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| SchemaCheckError::Schema("no $defs".into()))?;
    let props_of = |def: &serde_json::Value| -> Vec<String> {
        def.get("properties")
            .and_then(serde_json::Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    };
    let top: Vec<String> = schema
        .get("allOf")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| SchemaCheckError::Schema("no top-level allOf".into()))?
        .iter()
        .filter_map(|r| r.get("$ref").and_then(serde_json::Value::as_str))
        .filter_map(|r| r.strip_prefix("#/$defs/"))
        .filter_map(|name| defs.get(name))
        .flat_map(props_of)
        .collect();
    let user_props = defs
        .get("users_groups.user")
        .map(props_of)
        .unwrap_or_default();
    let doc: serde_norway::Value =
        serde_norway::from_str(user_data).map_err(|e| SchemaCheckError::UserData(e.to_string()))?;
    let mut unknown = Vec::new();
    if let Some(map) = doc.as_mapping() {
        for (k, v) in map {
            let key = k.as_str().unwrap_or_default();
            if !top.iter().any(|p| p == key) {
                unknown.push(key.to_owned());
            }
            if key == "users" && !user_props.is_empty() {
                for (i, user) in v.as_sequence().into_iter().flatten().enumerate() {
                    for uk in user.as_mapping().into_iter().flat_map(|m| m.keys()) {
                        let uk = uk.as_str().unwrap_or_default();
                        if !user_props.iter().any(|p| p == uk) {
                            unknown.push(format!("users[{i}].{uk}"));
                        }
                    }
                }
            }
        }
    }
    Ok(unknown)
}
