//! The `turnd.toml` of one instance, serialised from a typed subset of turnd's configuration
//! (see `deploy/turnd.example.toml`). Keys left out take turnd's defaults. A test parses and
//! validates every generated file with turnd's own `Config::validate`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Serialize;

use super::{
    mounts, K8sError, Sensitive, DRAIN_TIMEOUT_SECONDS, PORTS_TLS, PORT_ADMIN, PORT_PLAIN,
};
use crate::inventory::{Cluster, TurndInstance};

/// The configuration file, as turnd reads it.
#[derive(Debug, Serialize)]
struct TurndToml {
    listen: Listen,
    tls: Tls,
    auth: Auth,
    relay: Relay,
    log: Log,
    admin: Admin,
    drain: Drain,
}

/// `[drain]`: how long a stopping pod drains, and where new allocations go meanwhile.
#[derive(Debug, Serialize)]
struct Drain {
    timeout: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    alternate_servers: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Listen {
    udp: Vec<String>,
    tcp: Vec<String>,
    tls: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Tls {
    cert: String,
    key: String,
}

#[derive(Debug, Serialize)]
struct Auth {
    realm: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    users: Vec<User>,
}

#[derive(Debug, Serialize)]
struct User {
    name: String,
    key: String,
}

/// A review placeholder for a user whose key comes from a password at apply time.
const PLACEHOLDER_KEY: &str = "0x00000000000000000000000000000000";

/// The long-term key of RFC 8489 §9.2.2 as `turnadmin -k` prints it:
/// `0x` + hex(MD5(username ":" realm ":" password)).
pub(super) fn long_term_key(name: &str, realm: &str, password: &str) -> String {
    use md5::Digest as _;
    let digest = md5::Md5::digest(format!("{name}:{realm}:{password}").as_bytes());
    format!("0x{}", crate::render::cloudinit::hex(&digest))
}

/// The `[[auth.users]]` of `turnd.toml`: inventory keys as they are, passwords turned into
/// keys; `passwords: None` writes placeholders (review).
fn users(
    cluster: &Cluster,
    passwords: Option<&BTreeMap<String, Sensitive>>,
) -> Result<Vec<User>, K8sError> {
    let realm = cluster.realm();
    cluster
        .auth
        .users
        .iter()
        .map(|u| {
            let key = match (&u.key, &u.password_env, passwords) {
                (Some(key), _, _) => key.to_ascii_lowercase(),
                (None, Some(_), None) => PLACEHOLDER_KEY.to_owned(),
                (None, Some(var), Some(p)) => match p.get(&u.name) {
                    Some(pw) => long_term_key(&u.name, realm, pw.expose()),
                    None => {
                        return Err(K8sError::MissingUserPassword {
                            user: u.name.clone(),
                            var: var.clone(),
                        })
                    }
                },
                // A validated inventory gives exactly one of the two.
                (None, None, _) => PLACEHOLDER_KEY.to_owned(),
            };
            Ok(User {
                name: u.name.clone(),
                key,
            })
        })
        .collect()
}

#[derive(Debug, Serialize)]
struct Relay {
    addresses: Vec<String>,
    min_port: u16,
    max_port: u16,
    external_ips: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Admin {
    listen: String,
}

#[derive(Debug, Serialize)]
struct Log {
    level: &'static str,
    format: &'static str,
}

/// The worker address an instance binds: the IP of its VM.
pub(super) fn worker_ip(cluster: &Cluster, t: &TurndInstance) -> Result<Ipv4Addr, K8sError> {
    cluster
        .vm(t.vm.as_str())
        .map(|vm| vm.ip)
        .ok_or_else(|| K8sError::UnknownVm {
            vm: t.vm.to_string(),
        })
}

/// `turnd.toml` for instance `index` of the inventory: it binds the worker's address (the pod
/// runs with `hostNetwork`), advertises the public IP that the host forwards to it, reads the
/// certificate from the mounted TLS Secret and the REST-API secret from the mounted auth
/// Secret (`TURND_AUTH_SECRET_FILE`), and sends new allocations to the sibling instance while
/// it drains.
pub(super) fn turnd_toml(
    cluster: &Cluster,
    index: usize,
    passwords: Option<&BTreeMap<String, Sensitive>>,
) -> Result<String, K8sError> {
    let t = cluster
        .turnd
        .get(index)
        .ok_or(K8sError::NoInstance { index })?;
    let ip = worker_ip(cluster, t)?;
    let file = TurndToml {
        listen: Listen {
            udp: vec![format!("{ip}:{PORT_PLAIN}")],
            tcp: vec![format!("{ip}:{PORT_PLAIN}")],
            tls: PORTS_TLS.iter().map(|p| format!("{ip}:{p}")).collect(),
        },
        tls: Tls {
            cert: format!("{}/tls.crt", mounts::TLS_DIR),
            key: format!("{}/tls.key", mounts::TLS_DIR),
        },
        auth: Auth {
            realm: cluster.realm().to_owned(),
            users: users(cluster, passwords)?,
        },
        relay: Relay {
            addresses: vec![ip.to_string()],
            min_port: t.relay_port_min,
            max_port: t.relay_port_max,
            external_ips: vec![format!("{}/{ip}", t.public_ip)],
        },
        log: Log {
            level: "info",
            format: "json",
        },
        // On the worker's address, not loopback: Prometheus scrapes it from the pod network.
        admin: Admin {
            listen: format!("{ip}:{PORT_ADMIN}"),
        },
        // While this instance drains, clients are sent to the sibling's public address.
        drain: Drain {
            timeout: format!("{DRAIN_TIMEOUT_SECONDS}s"),
            alternate_servers: cluster
                .turnd
                .iter()
                .enumerate()
                .find(|(i, other)| *i != index && other.public_ip != t.public_ip)
                .map(|(_, other)| format!("{}:{PORT_PLAIN}", other.public_ip))
                .into_iter()
                .collect(),
        },
    };
    let body = toml::to_string(&file).map_err(|e| K8sError::Toml {
        vm: t.vm.to_string(),
        message: e.to_string(),
    })?;
    Ok(format!(
        "# turnd configuration for turnd[{index}] on {vm}, generated by the provisioner from\n\
         # the inventory; do not edit (re-render instead). The REST-API secret comes from the\n\
         # file named by TURND_AUTH_SECRET_FILE (Secret {secret}), not from this file.\n{body}",
        vm = t.vm,
        secret = super::AUTH_SECRET_NAME,
    ))
}
