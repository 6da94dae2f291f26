//! A real sshd on a loopback port with temporary host and client keys.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use provisioner::exec::SshOptions;

/// An sshd on 127.0.0.1 that lives as long as this value.
pub struct Sshd {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    /// The user the tests log in as (whoever runs them).
    pub user: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "provisioner-test",
            "-f",
        ])
        .arg(path)
        .status()
        .expect("ssh-keygen runs");
    assert!(st.success(), "ssh-keygen failed");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

impl Sshd {
    pub fn start() -> Option<Self> {
        Self::start_with("")
    }

    /// Like [`Sshd::start`], with `extra` lines appended to sshd_config (e.g. `SetEnv` for
    /// what the sessions see).
    pub fn start_with(extra: &str) -> Option<Self> {
        if !super::have_tool("sshd", "openssh-server")
            && !super::have_tool("/usr/sbin/sshd", "openssh-server")
        {
            return None;
        }
        if !super::have_tool("ssh", "openssh-client") {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("client_key"));
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).expect("copy key");
        // sshd refuses a privilege-separation directory it cannot find.
        let _ = std::fs::create_dir_all("/run/sshd");
        let user = String::from_utf8(Command::new("id").arg("-un").output().expect("id").stdout)
            .expect("utf8")
            .trim()
            .to_owned();
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nMaxStartups 50\n{extra}",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).expect("write config");
        let sshd = if Path::new("/usr/sbin/sshd").exists() {
            "/usr/sbin/sshd"
        } else {
            "sshd"
        };
        let child = Command::new(sshd)
            .arg("-f")
            .arg(d.join("sshd_config"))
            .args(["-D", "-e"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).expect("log"))
            .spawn()
            .expect("sshd starts");
        let server = Sshd {
            child,
            port,
            dir,
            user,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not listen: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    pub fn options(&self) -> SshOptions {
        let mut o = SshOptions::new(&self.user, "127.0.0.1", self.port);
        o.identity = Some(self.dir.path().join("client_key"));
        o.known_hosts = Some(self.dir.path().join("known_hosts"));
        o
    }

    pub fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }
}

impl Sshd {
    /// The client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// A known-hosts file private to this server.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }
}
