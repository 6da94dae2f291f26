//! An SSH port forward through the host (`ssh -N -L`), for reaching the Kubernetes API server
//! that only the host and the VM network can reach, and the kubeconfig that goes through it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{ExecError, SshOptions};

/// How long opening a tunnel may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `ssh -N -L 127.0.0.1:PORT:REMOTE` through a host; closed when dropped.
#[derive(Debug)]
pub struct Tunnel {
    child: Child,
    /// The local end.
    pub local: SocketAddr,
}

impl Tunnel {
    /// Forwards a free loopback port to `remote` as seen from the host `via`, and waits until
    /// the local end accepts connections.
    ///
    /// # Errors
    /// ssh cannot start, exits (refused, forward failed), or the port does not open in time.
    pub fn open(via: &SshOptions, remote: SocketAddr) -> Result<Self, ExecError> {
        let proto = |reason: String| ExecError::Protocol {
            target: via.host.clone(),
            reason,
        };
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| proto(format!("no free local port: {e}")))?
            .port();
        let local = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut cmd = Command::new("ssh");
        cmd.args(via.tunnel_args())
            .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
            .arg(format!("127.0.0.1:{port}:{remote}"))
            .arg(format!("{}@{}", via.user, via.host))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
            target: via.host.clone(),
            command: format!("ssh -N -L 127.0.0.1:{port}:{remote}"),
            source,
        })?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
                return Err(proto(format!(
                    "the tunnel to {remote} exited ({status}): {}",
                    stderr.trim()
                )));
            }
            if TcpStream::connect_timeout(&local, Duration::from_millis(200)).is_ok() {
                tracing::debug!("tunnel 127.0.0.1:{port} -> {remote} through {}", via.host);
                return Ok(Self { child, local });
            }
            if start.elapsed() >= OPEN_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(proto(format!(
                    "the tunnel to {remote} did not open within {OPEN_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kubeconfig` with every cluster's `server` replaced by `https://LOCAL` and its original
/// host kept as `tls-server-name` (the API server's certificate names the master's address,
/// not the tunnel's).
///
/// # Errors
/// The kubeconfig is not YAML or has no cluster with a `server`.
pub fn kubeconfig_through(kubeconfig: &str, local: SocketAddr) -> Result<String, String> {
    let mut doc: serde_norway::Value =
        serde_norway::from_str(kubeconfig).map_err(|e| format!("kubeconfig: {e}"))?;
    let clusters = doc
        .get_mut("clusters")
        .and_then(serde_norway::Value::as_sequence_mut)
        .ok_or("kubeconfig: no clusters")?;
    let mut changed = 0;
    for entry in clusters {
        let Some(cluster) = entry
            .get_mut("cluster")
            .and_then(serde_norway::Value::as_mapping_mut)
        else {
            continue;
        };
        let Some(server) = cluster.get("server").and_then(serde_norway::Value::as_str) else {
            continue;
        };
        let host = server
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap_or_default();
        let host = host
            .rsplit_once(':')
            .map_or(host, |(h, _)| h)
            .trim_matches(['[', ']'])
            .to_owned();
        cluster.insert("server".into(), format!("https://{local}").into());
        cluster.insert("tls-server-name".into(), host.into());
        changed += 1;
    }
    if changed == 0 {
        return Err("kubeconfig: no cluster has a server".into());
    }
    serde_norway::to_string(&doc).map_err(|e| format!("kubeconfig: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_goes_through_the_local_end_and_keeps_the_server_name() {
        let admin = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: Q0E=\n    server: https://10.10.10.10:6443\n  name: kubernetes\ncontexts: []\n";
        let out =
            kubeconfig_through(admin, "127.0.0.1:40123".parse().expect("addr")).expect("rewrites");
        assert!(out.contains("server: https://127.0.0.1:40123"), "{out}");
        assert!(out.contains("tls-server-name: 10.10.10.10"), "{out}");
        assert!(out.contains("certificate-authority-data: Q0E="), "{out}");
        assert!(
            kubeconfig_through("clusters: []\n", "127.0.0.1:1".parse().expect("addr")).is_err()
        );
    }
}
