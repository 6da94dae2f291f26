//! The server under test: turnd in-process, or coturn's `turnserver` as a child process.
//!
//! `TURND_TEST_SERVER=coturn` points the interop suite at coturn (proof that the tests test
//! the protocol, not turnd's quirks); unset or `turnd` runs turnd. `TURND_TEST_IO=epoll` (or
//! `io_uring`, `auto`) forces turnd's io backend, so CI runs the suites once per backend.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use turnd::config::{Config, MapEnv};
use turnd::run::Running;

use crate::client::rest_credential;
use crate::tools::find_tool;

/// The realm every test server uses.
pub const REALM: &str = "turnd.test";
pub use turnd_test_support::{free_udp_port, LOCALHOST};

/// Which implementation to test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// turnd, in-process.
    Turnd,
    /// coturn's `turnserver`.
    Coturn,
}

impl Kind {
    /// From `TURND_TEST_SERVER` (`turnd`, the default, or `coturn`).
    ///
    /// # Panics
    /// Any other value.
    #[must_use]
    pub fn from_env() -> Self {
        match std::env::var("TURND_TEST_SERVER").as_deref() {
            Err(_) | Ok("" | "turnd") => Self::Turnd,
            Ok("coturn") => Self::Coturn,
            Ok(other) => panic!("TURND_TEST_SERVER={other}: expected turnd or coturn"),
        }
    }
}

/// How clients authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// A static long-term user.
    Static {
        /// Username.
        user: String,
        /// Password.
        password: String,
    },
    /// A TURN REST API shared secret.
    Secret(String),
}

impl Auth {
    /// `Static { user: "alice", password: "wonderland" }`.
    #[must_use]
    pub fn alice() -> Self {
        Self::Static {
            user: "alice".into(),
            password: "wonderland".into(),
        }
    }

    /// A REST-API secret.
    #[must_use]
    pub fn secret() -> Self {
        Self::Secret("interop-shared-secret".into())
    }
}

/// What an interop test needs from the server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Authentication.
    pub auth: Auth,
    /// The relay port range; distinct per test so parallel tests do not compete.
    pub relay_ports: RangeInclusive<u16>,
}

/// A running server; stopped when dropped.
#[derive(Debug)]
pub struct TestServer {
    /// The UDP listener.
    pub addr: SocketAddr,
    /// Which implementation.
    pub kind: Kind,
    /// Authentication.
    pub auth: Auth,
    inner: Inner,
    dir: tempfile::TempDir,
}

#[derive(Debug)]
enum Inner {
    Turnd(Option<Box<Running>>),
    Coturn(Child),
}

impl TestServer {
    /// Starts the implementation `kind` with loopback peers allowed. `Ok(None)` when it is
    /// coturn and coturn is not installed (and tools are not required).
    ///
    /// # Errors
    /// The server did not start.
    pub fn start(kind: Kind, opts: &Options) -> anyhow::Result<Option<Self>> {
        match kind {
            Kind::Turnd => Ok(Some(Self::turnd(&turnd_toml(opts, ""), opts.auth.clone())?)),
            Kind::Coturn => Self::coturn(opts),
        }
    }

    /// Starts turnd in-process from TOML text.
    ///
    /// # Errors
    /// The config is invalid or the listener cannot be bound.
    pub fn turnd(toml: &str, auth: Auth) -> anyhow::Result<Self> {
        let settings = Config::from_toml(toml)?.validate(&MapEnv::default())?;
        Self::turnd_with(settings, auth)
    }

    /// Starts turnd in-process from a configuration file, which a reload re-reads.
    ///
    /// # Errors
    /// The config is invalid or the listener cannot be bound.
    pub fn turnd_file(path: &std::path::Path, auth: Auth) -> anyhow::Result<Self> {
        let settings = Config::load(path)?.validate(&MapEnv::default())?;
        Self::turnd_with(settings, auth)
    }

    fn turnd_with(mut settings: turnd::config::Settings, auth: Auth) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        // Tests run side by side; the default admin port is one fixed port.
        if let Some(admin) = settings.admin.as_mut() {
            admin.listen.set_port(0);
        }
        if let Some(io) = turnd_test_support::io_backend_from_env() {
            settings.io = io;
        }
        let running = turnd::run::start(settings)?;
        let addr = *running.udp.first().context("no UDP listener")?;
        eprintln!(
            "server under test: turnd at {addr} ({} backend)",
            running.io_backend
        );
        Ok(Self {
            addr,
            kind: Kind::Turnd,
            auth,
            inner: Inner::Turnd(Some(Box::new(running))),
            dir,
        })
    }

    fn coturn(opts: &Options) -> anyhow::Result<Option<Self>> {
        let Some(bin) = find_tool("turnserver") else {
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let port = free_udp_port()?;
        let log = dir.path().join("turnserver.log");
        let mut cmd = Command::new(bin);
        cmd.arg("-n")
            .args(["--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1"])
            .args(["--listening-port", &port.to_string()])
            .args(["--min-port", &opts.relay_ports.start().to_string()])
            .args(["--max-port", &opts.relay_ports.end().to_string()])
            .args(["--realm", REALM])
            .args([
                "--allow-loopback-peers",
                "--no-tcp",
                "--no-tls",
                "--no-dtls",
                "--no-cli",
            ])
            .args(["--no-tcp-relay", "--simple-log"])
            .arg("--log-file")
            .arg(&log)
            .arg("--pidfile")
            .arg(dir.path().join("turnserver.pid"))
            .arg("--userdb")
            .arg(dir.path().join("turndb"));
        match &opts.auth {
            Auth::Static { user, password } => {
                cmd.args(["--lt-cred-mech", "--user", &format!("{user}:{password}")]);
            }
            Auth::Secret(s) => {
                cmd.args(["--use-auth-secret", "--static-auth-secret", s]);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting turnserver")?;
        let mut server = Self {
            addr: SocketAddr::new(LOCALHOST, port),
            kind: Kind::Coturn,
            auth: opts.auth.clone(),
            inner: Inner::Coturn(child),
            dir,
        };
        server.wait_ready()?;
        eprintln!("server under test: coturn turnserver at {}", server.addr);
        Ok(Some(server))
    }

    /// Waits until the server answers a Binding request.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let sock = std::net::UdpSocket::bind((LOCALHOST, 0))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut req = Vec::new();
        let tid = turn_proto::codec::TransactionId([7; 12]);
        turn_proto::codec::MessageBuilder::new(
            &mut req,
            turn_proto::codec::MessageType::new(
                turn_proto::codec::Method::BINDING,
                turn_proto::codec::Class::Request,
            ),
            tid,
        )
        .finish();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            if let Inner::Coturn(child) = &mut self.inner {
                if let Some(status) = child.try_wait()? {
                    bail!("turnserver exited with {status}:\n{}", self.log());
                }
            }
            sock.send_to(&req, self.addr)?;
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if turn_proto::codec::Message::decode(&buf[..n])
                    .is_ok_and(|m| m.transaction_id() == tid)
                {
                    return Ok(());
                }
            }
        }
        bail!(
            "{:?} server at {} never answered:\n{}",
            self.kind,
            self.addr,
            self.log()
        )
    }

    /// The running turnd (its addresses and controls); `None` for coturn.
    #[must_use]
    pub fn running(&self) -> Option<&Running> {
        match &self.inner {
            Inner::Turnd(r) => r.as_deref(),
            Inner::Coturn(_) => None,
        }
    }

    /// The admin listener's address (turnd with `[admin] listen`).
    ///
    /// # Panics
    /// Not turnd, or the admin listener is off.
    #[must_use]
    pub fn admin(&self) -> SocketAddr {
        self.running()
            .and_then(|r| r.admin)
            .expect("turnd with an admin listener")
    }

    /// A credential for `user`: the static user's, or a fresh REST-API one.
    #[must_use]
    pub fn credential(&self, user: &str) -> (String, String) {
        match &self.auth {
            Auth::Static { user, password } => (user.clone(), password.clone()),
            Auth::Secret(s) => rest_credential(s, user, Duration::from_secs(3600)),
        }
    }

    /// A webrtc-rs TURN client (the `turn` crate) for this server with the credential
    /// [`TestServer::credential`] gives for `user`, sending through `conn`; not yet listening.
    ///
    /// # Errors
    /// The client cannot be made.
    pub async fn webrtc_client(
        &self,
        user: &str,
        conn: std::sync::Arc<dyn webrtc_util::Conn + Send + Sync>,
    ) -> anyhow::Result<turn::client::Client> {
        let (username, password) = self.credential(user);
        Ok(turn::client::Client::new(turn::client::ClientConfig {
            stun_serv_addr: self.addr.to_string(),
            turn_serv_addr: self.addr.to_string(),
            username,
            password,
            realm: String::new(),
            software: String::new(),
            rto_in_ms: 0,
            conn,
            vnet: None,
        })
        .await?)
    }

    /// coturn's log (empty for turnd, which logs through tracing).
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("turnserver.log")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        match &mut self.inner {
            Inner::Turnd(r) => {
                if let Some(r) = r.take() {
                    r.shutdown();
                }
            }
            Inner::Coturn(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// turnd's TOML for `opts`, listening on 127.0.0.1:0, relaying from 127.0.0.1 to loopback
/// peers, with turnd's default channel-number range (RFC 5766's, which coturn's uclient needs: the
/// uclient suites prove that default); `extra` is appended.
#[must_use]
pub fn turnd_toml(opts: &Options, extra: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\n");
    let _ = writeln!(t, "[auth]\nrealm = \"{REALM}\"");
    match &opts.auth {
        Auth::Static { user, password } => {
            let _ = writeln!(
                t,
                "users = [{{ name = \"{user}\", password = \"{password}\" }}]"
            );
        }
        Auth::Secret(s) => {
            let _ = writeln!(t, "secrets = [\"{s}\"]");
        }
    }
    let _ = writeln!(
        t,
        "\n[relay]\naddresses = [\"127.0.0.1\"]\nmin_port = {}\nmax_port = {}\n",
        opts.relay_ports.start(),
        opts.relay_ports.end()
    );
    let _ = writeln!(t, "[peers]\nallow = [\"127.0.0.0/8\"]\n");
    let _ = writeln!(t, "[server]\nworkers = 2\n");
    t.push_str(extra);
    t
}
