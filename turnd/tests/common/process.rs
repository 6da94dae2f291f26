//! The `turnd` binary as a child process: a config file in a temporary directory, JSON logs
//! captured (stdout and stderr) and searched, the bound addresses read from the "listening"
//! and "admin listener" log lines (everything binds port 0), signals sent by pid, and every
//! wait bounded.

use std::io::{BufRead as _, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary cargo built for these tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_turnd"))
}

/// A running `turnd`; killed when dropped.
pub struct Turnd {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    pub udp: Vec<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// `[log]` (JSON, info) and `[server]` (`workers`, and the io backend `TURND_TEST_IO` forces)
/// for a config body.
pub fn log_and_server(workers: usize) -> String {
    let mut t =
        format!("[log]\nformat = \"json\"\nlevel = \"info\"\n[server]\nworkers = {workers}\n");
    if let Some(io) = turnd_test_support::io_backend_from_env::<turnd::config::IoBackend>() {
        t.push_str(&format!("io = \"{io}\"\n"));
    }
    t
}

fn capture(r: impl Read + Send + 'static, log: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            log.lock().unwrap().push(line);
        }
    });
}

/// The socket addresses in a log field such as `"[127.0.0.1:3478, 127.0.0.1:3479]"`.
pub fn addrs(field: &str) -> Vec<SocketAddr> {
    field
        .trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

impl Turnd {
    /// Writes `toml` to `turnd.toml` in a new temporary directory and runs
    /// `wrapper... turnd -c FILE` (a wrapper such as `prlimit --nofile=256:4096` execs turnd,
    /// so the pid is turnd's).
    pub fn spawn(toml: &str, wrapper: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::spawn_in(dir, toml, wrapper)
    }

    /// As [`Turnd::spawn`], in `dir` (which may hold files the config names).
    pub fn spawn_in(dir: tempfile::TempDir, toml: &str, wrapper: &[&str]) -> Self {
        Self::spawn_with(dir, toml, wrapper, &[])
    }

    /// As [`Turnd::spawn`], with environment variables set (`Some`) or removed (`None`).
    pub fn spawn_env(toml: &str, env: &[(&str, Option<&str>)]) -> Self {
        Self::spawn_with(tempfile::tempdir().unwrap(), toml, &[], env)
    }

    fn spawn_with(
        dir: tempfile::TempDir,
        toml: &str,
        wrapper: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> Self {
        let config = dir.path().join("turnd.toml");
        std::fs::write(&config, toml).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        cmd.arg("-c")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("TURND_ADMIN_TOKEN")
            .env_remove("TURND_AUTH_SECRET")
            .env_remove("TURND_AUTH_SECRET_FILE");
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        capture(child.stdout.take().unwrap(), log.clone());
        capture(child.stderr.take().unwrap(), log.clone());
        Self {
            child,
            dir,
            config,
            log,
            udp: Vec::new(),
            tcp: Vec::new(),
            admin: None,
        }
    }

    /// Spawns and waits until it has logged its listeners (and its admin listener, when the
    /// config has one).
    pub fn start(toml: &str) -> Self {
        let mut t = Self::spawn(toml, &[]);
        t.wait_started();
        t
    }

    /// Waits for the "listening" line (and "admin listener" when `[admin]` is configured) and
    /// records the addresses.
    pub fn wait_started(&mut self) {
        let listening = self
            .wait_for_log(Duration::from_secs(20), |l| l.contains("\"listening\""))
            .unwrap_or_else(|| panic!("turnd never logged its listeners:\n{}", self.log()));
        let v: serde_json::Value = serde_json::from_str(&listening).unwrap();
        let fields = &v["fields"];
        self.udp = addrs(fields["udp"].as_str().unwrap_or_default());
        self.tcp = addrs(fields["tcp"].as_str().unwrap_or_default());
        let wants_admin = std::fs::read_to_string(&self.config)
            .unwrap()
            .contains("[admin]");
        if wants_admin {
            let line = self
                .wait_for_log(Duration::from_secs(20), |l| l.contains("admin listener"))
                .unwrap_or_else(|| panic!("no admin listener line:\n{}", self.log()));
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            self.admin = v["fields"]["admin"].as_str().and_then(|a| a.parse().ok());
            assert!(self.admin.is_some(), "admin address in {line}");
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The first log line (so far or within `timeout`) for which `pred` holds.
    pub fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (`TERM`, `HUP`, `INT`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {}", self.pid());
    }

    /// The exit status, once it has exited within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// An HTTP GET on the admin listener: (status, body).
    pub fn admin_get(&self, target: &str) -> (u16, String) {
        http(self.admin.expect("an admin listener"), "GET", target)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Turnd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request (`Connection: close`): (status, body), or status 0 when nothing
/// answered.
pub fn http(addr: SocketAddr, method: &str, target: &str) -> (u16, String) {
    turnd_test_support::http::request(addr, method, target, None)
        .map_or((0, String::new()), |r| (r.status, r.body))
}

/// A STUN Binding request over UDP to `server`; true when answered within a second (three
/// tries).
pub fn binding_answered(server: SocketAddr) -> bool {
    binding(server, 3, Duration::from_millis(330)).is_some()
}

/// A STUN Binding request over UDP from 127.0.0.1 to `server`, sent up to `tries` times,
/// each answer awaited for `wait`: the local address it left from and the answer's
/// XOR-MAPPED-ADDRESS (if it has one), or `None` when nothing answered.
pub fn binding(
    server: SocketAddr,
    tries: usize,
    wait: Duration,
) -> Option<(SocketAddr, Option<SocketAddr>)> {
    use turn_proto::codec::{
        Class, Message, MessageBuilder, MessageType, Method, TransactionId, XorMappedAddress,
    };
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(wait)).unwrap();
    let local = sock.local_addr().unwrap();
    let tid = TransactionId([0x42; 12]);
    let mut req = Vec::new();
    MessageBuilder::new(
        &mut req,
        MessageType::new(Method::BINDING, Class::Request),
        tid,
    )
    .finish();
    let mut buf = [0u8; 1500];
    for _ in 0..tries {
        sock.send_to(&req, server).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let Ok(m) = Message::decode(&buf[..n]) {
                if m.transaction_id() == tid {
                    let mapped = m.get::<XorMappedAddress>().ok().flatten().map(|a| a.0);
                    return Some((local, mapped));
                }
            }
        }
    }
    None
}
