//! Servers under test and how their cost is read: turnd in-process (CPU of its threads from
//! `/proc/self/task/<tid>/stat`, memory from `/proc/self/status`) and coturn's `turnserver`
//! as a child process (`/proc/<pid>/stat` and `/proc/<pid>/status`).
//!
//! turnd's threads are every thread of this process except the main thread and the bench's
//! own (named `bench-*` and `bare-fwd-*`), so the count stays right whatever turnd names its
//! workers, and includes its admin listener when one runs.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rustls_pki_types::CertificateDer;
use turnd::config::{Config, MapEnv};

use crate::client::wait_ready;
use crate::link::{tls_client_config, Endpoint};

/// Realm both servers use.
pub const REALM: &str = "bench.turnd";
/// REST API secret both servers use.
pub const SECRET: &str = "bench-secret-not-for-production";
/// Relay ports of either server: above the integration tests' fixed ranges (inside
/// 20000–23549), so a bench beside a test run cannot take a test's port, and below the
/// kernel's ephemeral range (32768+). The servers never run at the same time.
pub const RELAY_PORTS: (u16, u16) = (24_000, 31_999);
/// Relay addresses of either server: two, so [`RELAY_PORTS`] gives 16,000 relay ports,
/// room for the 10,000 allocations the set-up scenario holds.
pub const RELAY_IPS: [&str; 2] = ["127.0.0.1", "127.0.0.2"];
/// Thread-name prefixes of the bench's own threads (never counted as server time).
const BENCH_THREADS: [&str; 2] = ["bench-", "bare-fwd-"];

/// Where a server's CPU time is read.
#[derive(Debug, Clone)]
pub enum CpuSource {
    /// Threads of this process whose name starts with the prefix.
    Threads(String),
    /// Every thread of this process but the main thread and the bench's own.
    InProcess,
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
    /// The task directories counted (`/proc/<pid>/task/<tid>`).
    fn tasks(&self) -> Vec<PathBuf> {
        let (dir, me) = match self {
            Self::Process(pid) => (format!("/proc/{pid}/task"), None),
            _ => ("/proc/self/task".to_owned(), Some(std::process::id())),
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| {
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                match self {
                    Self::Process(_) => true,
                    Self::Threads(prefix) => comm.starts_with(prefix.as_str()),
                    Self::InProcess => {
                        let tid = e.file_name().to_string_lossy().parse::<u32>().ok();
                        tid != me && !BENCH_THREADS.iter().any(|p| comm.starts_with(p))
                    }
                }
            })
            .map(|e| e.path())
            .collect()
    }

    /// CPU seconds (user + system) used so far. For a whole process this includes threads
    /// that have exited.
    #[must_use]
    pub fn cpu_seconds(&self) -> f64 {
        match self {
            Self::Process(pid) => stat_cpu(Path::new(&format!("/proc/{pid}/stat"))).unwrap_or(0.0),
            _ => self
                .tasks()
                .iter()
                .filter_map(|t| stat_cpu(&t.join("stat")))
                .sum(),
        }
    }

    /// Threads counted.
    #[must_use]
    pub fn threads(&self) -> usize {
        self.tasks().len()
    }

    /// Thread ids counted (for `perf stat -t`).
    #[must_use]
    pub fn tids(&self) -> Vec<u32> {
        self.tasks()
            .iter()
            .filter_map(|t| t.file_name()?.to_str()?.parse().ok())
            .collect()
    }
}

/// The kernel's count of UDP datagrams dropped for a full receive buffer
/// (`/proc/net/snmp`, `Udp: RcvbufErrors`; the whole network namespace).
#[must_use]
pub fn udp_rcvbuf_errors() -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// UDP receive-buffer drops by socket, summed by role: which stage of the path overflowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropsByRole {
    /// Client sockets (127.1.x.y).
    pub client: u64,
    /// The server's listener (or the bare forwarder's).
    pub listener: u64,
    /// Relay sockets ([`RELAY_IPS`], [`RELAY_PORTS`]).
    pub relay: u64,
    /// The echo peer.
    pub echo: u64,
    /// Anything else.
    pub other: u64,
}

impl DropsByRole {
    /// Per-role difference `self - before` (sockets closed in between are not seen).
    #[must_use]
    pub fn since(&self, before: &Self) -> Self {
        Self {
            client: self.client.saturating_sub(before.client),
            listener: self.listener.saturating_sub(before.listener),
            relay: self.relay.saturating_sub(before.relay),
            echo: self.echo.saturating_sub(before.echo),
            other: self.other.saturating_sub(before.other),
        }
    }

    /// The sum over the roles.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.client + self.listener + self.relay + self.echo + self.other
    }

    /// Reads `/proc/net/udp` (the drops column per socket), counting only the sockets of
    /// this process and of `child` (other processes on the machine share the table).
    /// `listener` and `echo` are the ports of those sockets.
    #[must_use]
    pub fn read(listener: u16, echo: u16, child: Option<u32>) -> Self {
        let mut ours = std::collections::HashSet::new();
        let dirs = std::iter::once("/proc/self/fd".to_owned())
            .chain(child.map(|p| format!("/proc/{p}/fd")));
        for dir in dirs {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if let Ok(link) = std::fs::read_link(e.path()) {
                    let link = link.to_string_lossy().into_owned();
                    if let Some(inode) = link
                        .strip_prefix("socket:[")
                        .and_then(|l| l.strip_suffix(']'))
                    {
                        ours.insert(inode.to_owned());
                    }
                }
            }
        }
        let mut d = Self::default();
        let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode), Some(drops)) = (f.get(1), f.get(9), f.last()) else {
                continue;
            };
            if !ours.contains(*inode) {
                continue;
            }
            let Ok(drops) = drops.parse::<u64>() else {
                continue;
            };
            let Some((ip, port)) = local.split_once(':') else {
                continue;
            };
            let (Ok(ip), Ok(port)) = (u32::from_str_radix(ip, 16), u16::from_str_radix(port, 16))
            else {
                continue;
            };
            // /proc prints the address in host order of the network-order bytes.
            let ip = std::net::Ipv4Addr::from(u32::from_be(ip));
            let slot = if ip.octets()[..2] == [127, 1] {
                &mut d.client
            } else if port == listener {
                &mut d.listener
            } else if port == echo {
                &mut d.echo
            } else if (RELAY_PORTS.0..=RELAY_PORTS.1).contains(&port) {
                &mut d.relay
            } else {
                &mut d.other
            };
            *slot += drops;
        }
        d
    }
}

/// VmRSS of `/proc/<pid>/status` (or this process, after returning freed heap to the
/// kernel so memory freed by earlier scenarios does not hide growth) in KiB.
#[must_use]
pub fn rss_kib(pid: Option<u32>) -> u64 {
    let path = pid.map_or_else(
        || {
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only releases free heap pages.
            unsafe {
                libc::malloc_trim(0);
            }
            "/proc/self/status".to_owned()
        },
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

/// A self-signed certificate for `localhost` in a temporary directory, and a client config
/// that trusts it.
pub struct TestCert {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Client config trusting the certificate.
    pub client: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCert")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl TestCert {
    /// Generates the certificate (rcgen).
    ///
    /// # Errors
    /// Generation or writing failed.
    pub fn generate() -> anyhow::Result<Self> {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        let dir = tempfile::tempdir()?;
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, c.cert.pem())?;
        std::fs::write(&key, c.key_pair.serialize_pem())?;
        let der: CertificateDer<'static> = c.cert.der().clone();
        Ok(Self {
            cert,
            key,
            client: Arc::new(tls_client_config(&der)?),
            _dir: dir,
        })
    }
}

enum Kind {
    Turnd(Box<turnd::run::Running>),
    Coturn {
        child: Child,
        _dir: tempfile::TempDir,
    },
}

/// A running server under test.
pub struct Server {
    /// Row label: "turnd", "turnd epoll", "coturn", …
    pub name: String,
    /// Its listeners.
    pub endpoint: Endpoint,
    /// Where its CPU time is read.
    pub cpu: CpuSource,
    /// The admin listener, when one runs.
    pub admin: Option<SocketAddr>,
    /// The io backend turnd reports it runs (`""` for coturn).
    pub io_backend: &'static str,
    kind: Option<Kind>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// How the bench runs turnd.
#[derive(Debug, Clone, Copy, Default)]
pub struct TurndOptions<'a> {
    /// Worker threads.
    pub workers: usize,
    /// `[server] io` (`"io_uring"`, `"epoll"`, `"auto"`); `None` leaves the key out.
    pub io: Option<&'static str>,
    /// Run the admin listener (on a loopback port 0); off otherwise.
    pub admin: bool,
    /// Also listen on TCP and TLS with this certificate.
    pub tls: Option<&'a TestCert>,
}

/// One `GET /metrics` from turnd's admin listener at `addr`: whether it answered 200 with
/// turnd's families.
///
/// # Errors
/// Connecting, writing or reading failed.
pub fn scrape_metrics(addr: SocketAddr) -> std::io::Result<bool> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    Ok(body.starts_with(b"HTTP/1.1 200") && body.windows(6).any(|w| w == b"turnd_"))
}

/// Whether turnd's configuration knows a key: the bench's feature probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// The key parsed.
    Yes,
    /// `deny_unknown_fields` refused it: this turnd predates the key.
    No,
}

/// The turnd configuration the bench runs. `io` and `admin` are written only when given
/// (`admin: Some("")` turns the listener off).
#[must_use]
pub fn turnd_toml(opts: &TurndOptions<'_>, io: Option<&str>, admin: Option<&str>) -> String {
    let (min_port, max_port) = RELAY_PORTS;
    let relay_ips = RELAY_IPS.map(|ip| format!("\"{ip}\"")).join(", ");
    let workers = opts.workers;
    let mut s = String::from("[listen]\nudp = [\"127.0.0.1:0\"]\n");
    match opts.tls {
        Some(cert) => {
            s += "tcp = [\"127.0.0.1:0\"]\ntls = [\"127.0.0.1:0\"]\n\n[tls]\n";
            s += &format!(
                "cert = \"{}\"\nkey = \"{}\"\n",
                cert.cert.display(),
                cert.key.display()
            );
        }
        None => s += "tcp = []\ntls = []\n",
    }
    s += &format!(
        r#"
[auth]
realm = "{REALM}"
secrets = ["{SECRET}"]

[relay]
addresses = [{relay_ips}]
min_port = {min_port}
max_port = {max_port}

[peers]
allow = ["127.0.0.0/8"]

[sockets]
recv_buffer_bytes = 4194304
send_buffer_bytes = 4194304

[streams]
max_connections_per_ip = 1000000
max_connections = 1000000

[log]
level = "warn"

[server]
workers = {workers}
"#
    );
    if let Some(io) = io {
        s += &format!("io = \"{io}\"\n");
    }
    if let Some(admin) = admin {
        s += &format!("\n[admin]\nlisten = \"{admin}\"\n");
    }
    s
}

/// Whether this turnd's configuration accepts `[server] io` and `[admin] listen`.
#[must_use]
pub fn turnd_supports() -> (Support, Support) {
    let opts = TurndOptions {
        workers: 1,
        ..TurndOptions::default()
    };
    let probe = |io: Option<&str>, admin: Option<&str>| {
        if Config::from_toml(&turnd_toml(&opts, io, admin)).is_ok() {
            Support::Yes
        } else {
            Support::No
        }
    };
    (probe(Some("epoll"), None), probe(None, Some("")))
}

fn free_tcp_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Server {
    /// Starts turnd in this process (`turnd::run::start`).
    ///
    /// # Errors
    /// The config did not validate (an `io` or admin listener this turnd does not know
    /// yet is refused rather than silently ignored), or the server did not start.
    pub fn turnd(opts: &TurndOptions<'_>) -> anyhow::Result<Self> {
        let (io_ok, admin_ok) = turnd_supports();
        if opts.io.is_some() && io_ok == Support::No {
            bail!("this turnd has no [server] io key");
        }
        if opts.admin && admin_ok == Support::No {
            bail!("this turnd has no [admin] listener");
        }
        let admin = match (opts.admin, admin_ok) {
            (true, _) => Some("127.0.0.1:0"),
            (false, Support::Yes) => Some(""),
            (false, Support::No) => None,
        };
        let toml = turnd_toml(opts, opts.io, admin);
        let settings = Config::from_toml(&toml)
            .map_err(|e| anyhow::anyhow!("bench config: {e}"))?
            .validate(&MapEnv::default())
            .map_err(|e| anyhow::anyhow!("bench config: {e}"))?;
        let running = turnd::run::start(settings)?;
        let udp = *running.udp.first().context("turnd bound no UDP listener")?;
        let tcp = running.tcp.first().copied();
        let tls = match (opts.tls, running.tls.first()) {
            (Some(cert), Some(addr)) => Some((*addr, cert.client.clone())),
            _ => None,
        };
        let server = Self {
            name: "turnd".to_owned(),
            endpoint: Endpoint { udp, tcp, tls },
            cpu: CpuSource::InProcess,
            admin: running.admin,
            io_backend: running.io_backend,
            kind: Some(Kind::Turnd(Box::new(running))),
        };
        wait_ready(udp, Duration::from_secs(5))?;
        Ok(server)
    }

    /// Starts coturn's `turnserver` on a free loopback port, if it is installed
    /// (`Ok(None)` when it is not). With `tls`, it also listens on TCP (same port) and TLS;
    /// without, it runs `--no-tcp --no-tls`.
    ///
    /// # Errors
    /// It is installed but did not start or answer.
    pub fn coturn(tls: Option<&TestCert>) -> anyhow::Result<Option<Self>> {
        let bin = std::env::var("BENCH_TURNSERVER").unwrap_or_else(|_| "turnserver".to_owned());
        let installed = Command::new(&bin)
            .arg("--version")
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
        let tls_addr = match tls {
            Some(_) => Some(free_tcp_port()?),
            None => None,
        };
        let (min_port, max_port) = RELAY_PORTS;
        let log = dir.path().join("turnserver.log");
        let mut cmd = Command::new(&bin);
        cmd.args(["-n", "--listening-ip", "127.0.0.1"]);
        for ip in RELAY_IPS {
            cmd.args(["--relay-ip", ip]);
        }
        cmd.args(["--listening-port", &port.to_string()])
            .args(["--min-port", &min_port.to_string()])
            .args(["--max-port", &max_port.to_string()])
            .args(["--use-auth-secret", "--static-auth-secret", SECRET])
            .args(["--realm", REALM])
            .args(["--allow-loopback-peers", "--no-dtls"])
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
        match (tls, tls_addr) {
            (Some(cert), Some(tls_addr)) => {
                cmd.args(["--tls-listening-port", &tls_addr.port().to_string()])
                    .arg("--cert")
                    .arg(&cert.cert)
                    .arg("--pkey")
                    .arg(&cert.key);
            }
            _ => {
                cmd.args(["--no-tcp", "--no-tls"]);
            }
        }
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
            name: "coturn".to_owned(),
            endpoint: Endpoint {
                udp: addr,
                tcp: tls.map(|_| addr),
                tls: tls.zip(tls_addr).map(|(c, a)| (a, c.client.clone())),
            },
            cpu: CpuSource::Process(pid),
            admin: None,
            io_backend: "",
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
