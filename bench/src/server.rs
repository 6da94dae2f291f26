//! Servers under test and how their cost is read: turnd in-process (CPU of its worker threads
//! from `/proc/self/task/<tid>/stat`, memory from `/proc/self/status`) and coturn's
//! `turnserver` as a child process (`/proc/<pid>/stat` and `/proc/<pid>/status`).

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use turnd::config::{Config, MapEnv};

use crate::client::wait_ready;

/// Realm both servers use.
pub const REALM: &str = "bench.turnd";
/// REST API secret both servers use.
pub const SECRET: &str = "bench-secret-not-for-production";

/// Where a server's CPU time is read.
#[derive(Debug, Clone)]
pub enum CpuSource {
    /// Threads of this process whose name starts with the prefix.
    Threads(String),
    /// A whole other process.
    Process(u32),
}

fn clock_tick() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a `stat` file, in seconds.
fn stat_cpu(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_tick())
}

impl CpuSource {
    /// CPU seconds (user + system) used so far.
    #[must_use]
    pub fn cpu_seconds(&self) -> f64 {
        match self {
            Self::Process(pid) => stat_cpu(Path::new(&format!("/proc/{pid}/stat"))).unwrap_or(0.0),
            Self::Threads(prefix) => {
                let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
                    return 0.0;
                };
                dir.flatten()
                    .filter(|e| {
                        std::fs::read_to_string(e.path().join("comm"))
                            .is_ok_and(|c| c.starts_with(prefix.as_str()))
                    })
                    .filter_map(|e| stat_cpu(&e.path().join("stat")))
                    .sum()
            }
        }
    }

    /// Threads counted.
    #[must_use]
    pub fn threads(&self) -> usize {
        match self {
            Self::Process(pid) => std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| d.count())
                .unwrap_or(0),
            Self::Threads(prefix) => std::fs::read_dir("/proc/self/task")
                .map(|d| {
                    d.flatten()
                        .filter(|e| {
                            std::fs::read_to_string(e.path().join("comm"))
                                .is_ok_and(|c| c.starts_with(prefix.as_str()))
                        })
                        .count()
                })
                .unwrap_or(0),
        }
    }
}

/// VmRSS of `/proc/<pid>/status` (or `self`) in KiB.
#[must_use]
pub fn rss_kib(pid: Option<u32>) -> u64 {
    let path = pid.map_or_else(
        || "/proc/self/status".to_owned(),
        |p| format!("/proc/{p}/status"),
    );
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

enum Kind {
    Turnd(turnd::driver::Running),
    Coturn {
        child: Child,
        _dir: tempfile::TempDir,
    },
}

/// A running server under test.
pub struct Server {
    /// "turnd" or "coturn".
    pub name: &'static str,
    /// Its UDP listener.
    pub addr: SocketAddr,
    /// Where its CPU time is read.
    pub cpu: CpuSource,
    kind: Option<Kind>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The turnd configuration the bench runs.
#[must_use]
pub fn turnd_toml(workers: usize, min_port: u16, max_port: u16) -> String {
    format!(
        r#"
[listen]
udp = ["127.0.0.1:0"]
tcp = []
tls = []

[auth]
realm = "{REALM}"
secrets = ["{SECRET}"]

[relay]
addresses = ["127.0.0.1"]
min_port = {min_port}
max_port = {max_port}

[peers]
allow = ["127.0.0.0/8"]

[sockets]
recv_buffer_bytes = 4194304
send_buffer_bytes = 4194304

[server]
workers = {workers}

[log]
level = "warn"
"#
    )
}

impl Server {
    /// Starts turnd in this process with `workers` worker threads and relay ports
    /// `min_port..=max_port`.
    ///
    /// # Errors
    /// The config did not validate or the server did not start.
    pub fn turnd(workers: usize, min_port: u16, max_port: u16) -> anyhow::Result<Self> {
        let settings = Config::from_toml(&turnd_toml(workers, min_port, max_port))
            .map_err(|e| anyhow::anyhow!("bench config: {e}"))?
            .validate(&MapEnv::default())
            .map_err(|e| anyhow::anyhow!("bench config: {e}"))?;
        let running = turnd::driver::start(settings)?;
        let addr = *running.udp.first().context("turnd bound no UDP listener")?;
        wait_ready(addr, Duration::from_secs(5))?;
        Ok(Self {
            name: "turnd",
            addr,
            cpu: CpuSource::Threads("turnd-worker-".to_owned()),
            kind: Some(Kind::Turnd(running)),
        })
    }

    /// Starts coturn's `turnserver` on a free loopback port, if it is installed
    /// (`Ok(None)` when it is not).
    ///
    /// # Errors
    /// It is installed but did not start or answer.
    pub fn coturn(min_port: u16, max_port: u16) -> anyhow::Result<Option<Self>> {
        let bin = std::env::var("BENCH_TURNSERVER").unwrap_or_else(|_| "turnserver".to_owned());
        let installed = Command::new(&bin)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !installed {
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        // Free port: bind port 0, note it, close it (a small race, fine on loopback).
        let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.path().join("turnserver.log");
        let mut cmd = Command::new(&bin);
        cmd.args([
            "-n",
            "--listening-ip",
            "127.0.0.1",
            "--relay-ip",
            "127.0.0.1",
        ])
        .args(["--listening-port", &port.to_string()])
        .args(["--min-port", &min_port.to_string()])
        .args(["--max-port", &max_port.to_string()])
        .args(["--use-auth-secret", "--static-auth-secret", SECRET])
        .args(["--realm", REALM])
        .args([
            "--allow-loopback-peers",
            "--no-tcp",
            "--no-tls",
            "--no-dtls",
        ])
        .args([
            "--no-cli",
            "--no-tcp-relay",
            "--simple-log",
            "--no-stdout-log",
        ])
        .arg("--log-file")
        .arg(&log)
        .arg("--pidfile")
        .arg(dir.path().join("turnserver.pid"))
        .arg("--userdb")
        .arg(dir.path().join("turndb"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Ok(threads) = std::env::var("BENCH_COTURN_RELAY_THREADS") {
            cmd.args(["--relay-threads", &threads]);
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
        if let Err(e) = wait_ready(addr, Duration::from_secs(10)) {
            let _ = child.kill();
            let status = child.wait();
            let tail = std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("log"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect::<String>();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            bail!(
                "coturn did not come up ({status:?}): {e}; log tail (newest first):\n{}",
                tail.join("\n")
            );
        }
        let pid = child.id();
        Ok(Some(Self {
            name: "coturn",
            addr,
            cpu: CpuSource::Process(pid),
            kind: Some(Kind::Coturn { child, _dir: dir }),
        }))
    }

    /// The pid whose RSS is the server's (`None` = this process).
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        match &self.kind {
            Some(Kind::Coturn { child, .. }) => Some(child.id()),
            _ => None,
        }
    }

    /// Stops the server.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        match self.kind.take() {
            Some(Kind::Turnd(running)) => running.shutdown(),
            Some(Kind::Coturn { mut child, .. }) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            None => {}
        }
    }
}

/// A bench that fails half-way must not leave a `turnserver` behind.
impl Drop for Server {
    fn drop(&mut self) {
        self.halt();
    }
}
