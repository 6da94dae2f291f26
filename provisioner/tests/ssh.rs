//! The SSH transport against a real `sshd` started on a loopback port with a temporary host
//! key and client key. Nothing leaves 127.0.0.1.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use provisioner::exec::{Cmd, SshOptions, SshTransport, Transport};

/// An sshd on 127.0.0.1 that lives as long as this value.
struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    user: String,
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

impl Sshd {
    fn start() -> Option<Self> {
        if !common::have_tool("sshd", "openssh-server")
            && !common::have_tool("/usr/sbin/sshd", "openssh-server")
        {
            return None;
        }
        if !common::have_tool("ssh", "openssh-client") {
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
             PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nMaxStartups 50\n",
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    fn options(&self) -> SshOptions {
        let mut o = SshOptions::new(&self.user, "127.0.0.1", self.port);
        o.identity = Some(self.dir.path().join("client_key"));
        o.known_hosts = Some(self.dir.path().join("known_hosts"));
        o
    }

    fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }
}

#[test]
fn runs_commands_with_stdout_stderr_status_and_stdin() {
    let Some(sshd) = Sshd::start() else { return };
    let t = SshTransport::new("test-host", sshd.options()).expect("transport");
    let out = t
        .run(
            &Cmd::new("sh")
                .args(["-c", "read x; echo \"got $x\"; echo 'to err' >&2; exit 7"])
                .stdin("it's me\n"),
        )
        .expect("runs");
    assert_eq!(out.status, 7, "{}", sshd.log());
    assert_eq!(out.stdout, "got it's me\n");
    assert_eq!(out.stderr, "to err\n");
    // Arguments with spaces and quotes arrive intact.
    let out = t
        .run(&Cmd::new("printf").args(["%s|", "a b", "c'd", ""]))
        .expect("runs");
    assert_eq!(out.stdout, "a b|c'd||");
    // The control master is up and reused.
    assert!(t.master_alive());
    let err = t.run_ok(&Cmd::new("false")).expect_err("false fails");
    assert_eq!(
        err.to_string(),
        "on test-host: `false` exited with status 1: "
    );
}

#[test]
fn uploads_files_atomically_with_mode() {
    let Some(sshd) = Sshd::start() else { return };
    let t = SshTransport::new("test-host", sshd.options()).expect("transport");
    let path = sshd.scratch().join("etc/modules-load.d/k8s.conf");
    let p = path.to_str().expect("utf8");
    t.upload(b"overlay\nbr_netfilter\n", p, 0o640)
        .expect("upload");
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        "overlay\nbr_netfilter\n"
    );
    assert_eq!(
        std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
        0o640
    );
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    t.upload(&binary, p, 0o600).expect("upload again");
    assert_eq!(std::fs::read(&path).expect("read"), binary);
    assert!(!Path::new(&format!("{p}.provisioner-tmp")).exists());
}

#[test]
fn jumps_through_a_host_and_closes_the_master_on_drop() {
    let Some(sshd) = Sshd::start() else { return };
    // The "VM" is the same sshd reached through the "host" with ProxyCommand -W.
    let mut vm = sshd.options();
    vm.jump = Some(Box::new(sshd.options()));
    let control;
    {
        let t = SshTransport::new("k8s-master", vm).expect("transport");
        let out = t
            .run_ok(&Cmd::new("echo").arg("through the jump"))
            .expect("runs");
        assert_eq!(out.stdout, "through the jump\n", "{}", sshd.log());
        assert!(t.master_alive());
        control = t.control_path();
        assert!(control.exists());
    }
    // After drop the master was told to exit and its socket is gone.
    assert!(!control.exists());
}

#[test]
fn unreachable_host_is_a_clear_error() {
    if !common::have_tool("ssh", "openssh-client") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = SshOptions::new("root", "127.0.0.1", free_port());
    o.known_hosts = Some(dir.path().join("known_hosts"));
    let t = SshTransport::new("nowhere", o).expect("transport");
    let err = t.run(&Cmd::new("true")).expect_err("nothing listens");
    let msg = err.to_string();
    assert!(
        msg.starts_with("on nowhere: `ssh -f -N root@127.0.0.1` exited with status 255"),
        "{msg}"
    );
    assert!(msg.contains("Connection refused"), "{msg}");
}
