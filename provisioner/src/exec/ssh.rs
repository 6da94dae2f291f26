//! Runs commands over the system `ssh` client, one ControlMaster connection per transport,
//! optionally jumping through another host (the VMs are reached through the libvirt host).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use super::local::run_process_with;
use super::{shell_quote, Cmd, ExecError, Output, Transport};

/// How to reach one SSH destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshOptions {
    /// Remote user.
    pub user: String,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Private key (`-i`).
    pub identity: Option<PathBuf>,
    /// Known-hosts file; `None` uses ssh's default.
    pub known_hosts: Option<PathBuf>,
    /// `StrictHostKeyChecking` value (`yes`, `accept-new`).
    pub strict_host_key_checking: String,
    /// Connect through this host first.
    pub jump: Option<Box<SshOptions>>,
    /// A raw `ProxyCommand` (e.g. to enter a network namespace); wins over `jump`.
    pub proxy_command: Option<String>,
}

impl SshOptions {
    /// Options for `user@host:port` with host keys accepted on first use.
    pub fn new(user: &str, host: &str, port: u16) -> Self {
        Self {
            user: user.to_owned(),
            host: host.to_owned(),
            port,
            identity: None,
            known_hosts: None,
            strict_host_key_checking: "accept-new".to_owned(),
            jump: None,
            proxy_command: None,
        }
    }

    /// The `ssh` options for an interactive session: no ControlMaster, and not in batch mode
    /// so that ssh may ask about an unknown host key.
    pub fn command_args(&self) -> Vec<String> {
        self.args(false)
    }

    fn destination(&self) -> String {
        format!("{}@{}", self.user, self.host)
    }

    /// The `ssh` arguments before the destination (no ControlMaster options).
    fn base_args(&self) -> Vec<String> {
        self.args(true)
    }

    /// The `ssh` arguments before the destination for a batch connection of its own (a port
    /// forward): no ControlMaster.
    pub fn tunnel_args(&self) -> Vec<String> {
        self.args(true)
    }

    fn args(&self, batch: bool) -> Vec<String> {
        let mut a = vec!["-p".to_owned(), self.port.to_string()];
        if batch {
            a.push("-o".to_owned());
            a.push("BatchMode=yes".to_owned());
        }
        a.extend([
            "-o".to_owned(),
            format!("StrictHostKeyChecking={}", self.strict_host_key_checking),
            "-o".to_owned(),
            "ConnectTimeout=15".to_owned(),
            "-o".to_owned(),
            "LogLevel=ERROR".to_owned(),
        ]);
        if let Some(id) = &self.identity {
            a.push("-o".to_owned());
            a.push("IdentitiesOnly=yes".to_owned());
            a.push("-i".to_owned());
            a.push(id.display().to_string());
        }
        if let Some(kh) = &self.known_hosts {
            a.push("-o".to_owned());
            a.push(format!("UserKnownHostsFile={}", kh.display()));
        }
        if let Some(proxy) = &self.proxy_command {
            a.push("-o".to_owned());
            a.push(format!("ProxyCommand={proxy}"));
        } else if let Some(jump) = &self.jump {
            let mut proxy = vec!["ssh".to_owned()];
            proxy.extend(jump.base_args());
            proxy.push("-W".to_owned());
            proxy.push("%h:%p".to_owned());
            proxy.push(jump.destination());
            let line = proxy
                .iter()
                .map(|w| shell_quote(w))
                .collect::<Vec<_>>()
                .join(" ");
            a.push("-o".to_owned());
            a.push(format!("ProxyCommand={line}"));
        }
        a
    }
}

/// When ssh refused the destination's host key (a rebuilt VM or host), the fix: which entry
/// to remove from which known-hosts file.
pub fn host_key_hint(stderr: &str, opts: &SshOptions) -> Option<String> {
    let refused = stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || stderr.contains("Host key verification failed");
    refused.then(|| {
        let host = if opts.port == 22 {
            opts.host.clone()
        } else {
            format!("[{}]:{}", opts.host, opts.port)
        };
        let file = opts
            .known_hosts
            .as_ref()
            .map(|p| format!(" -f {}", shell_quote(&p.display().to_string())))
            .unwrap_or_default();
        format!(
            "the SSH host key of {host} is not the one recorded (was it rebuilt?): if so, remove the old key with `ssh-keygen -R {}{file}` and run again",
            shell_quote(&host)
        )
    })
}

/// Runs commands over SSH. The first command opens a ControlMaster connection that later
/// commands reuse; it is closed when the transport is dropped.
#[derive(Debug)]
pub struct SshTransport {
    opts: SshOptions,
    name: String,
    control_dir: tempfile::TempDir,
    master: Mutex<bool>,
}

impl SshTransport {
    /// A transport to `opts`, named `name` in messages.
    pub fn new(name: &str, opts: SshOptions) -> Result<Self, ExecError> {
        let control_dir = tempfile::Builder::new()
            .prefix("provisioner-ssh-")
            .tempdir()
            .map_err(|source| ExecError::Io {
                target: name.to_owned(),
                what: "cannot create",
                path: "a control socket directory".to_owned(),
                source,
            })?;
        Ok(Self {
            opts,
            name: name.to_owned(),
            control_dir,
            master: Mutex::new(false),
        })
    }

    /// The ControlMaster socket (its directory is removed when the transport is dropped).
    pub fn control_path(&self) -> PathBuf {
        self.control_dir.path().join("c")
    }

    fn ssh(&self, control_master: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.opts.base_args())
            .arg("-o")
            .arg(format!("ControlPath={}", self.control_path().display()))
            .arg("-o")
            .arg(format!("ControlMaster={control_master}"));
        c
    }

    /// Opens the master connection once. `-f -N` backgrounds it after authentication; its
    /// stderr goes to a file, so no pipe of ours is held open by the background process.
    fn ensure_master(&self) -> Result<(), ExecError> {
        let mut started = self
            .master
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *started {
            return Ok(());
        }
        let log_path = self.control_dir.path().join("master.log");
        let log = std::fs::File::create(&log_path).map_err(|source| ExecError::Io {
            target: self.name.clone(),
            what: "cannot create",
            path: log_path.display().to_string(),
            source,
        })?;
        let mut c = self.ssh("yes");
        // Bounded, so a master outlives a killed provisioner by ten minutes at most.
        c.args(["-o", "ControlPersist=10m", "-f", "-N"])
            .arg(self.opts.destination())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let shown = Cmd::new("ssh").args(["-f", "-N", &self.opts.destination()]);
        let status = c.status().map_err(|source| ExecError::Spawn {
            target: self.name.clone(),
            command: shown.shell_line(),
            source,
        })?;
        if !status.success() {
            let stderr = std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .trim()
                .to_owned();
            if let Some(hint) = host_key_hint(&stderr, &self.opts) {
                return Err(ExecError::Protocol {
                    target: self.name.clone(),
                    reason: format!("{hint} ({stderr})"),
                });
            }
            return Err(ExecError::Failed {
                target: self.name.clone(),
                command: shown.shell_line(),
                status: status.code().unwrap_or(-1),
                stderr,
            });
        }
        *started = true;
        Ok(())
    }

    /// Whether the control socket answers (`ssh -O check`).
    pub fn master_alive(&self) -> bool {
        self.ssh("no")
            .args(["-O", "check"])
            .arg(self.opts.destination())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for SshTransport {
    fn drop(&mut self) {
        let started = *self
            .master
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if started && Path::new(&self.control_path()).exists() {
            let _ = self
                .ssh("no")
                .args(["-O", "exit"])
                .arg(self.opts.destination())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl SshTransport {
    fn run_with(
        &self,
        cmd: &Cmd,
        input: Option<&mut (dyn Read + Send)>,
    ) -> Result<Output, ExecError> {
        self.ensure_master()?;
        let mut c = self.ssh("no");
        c.arg(self.opts.destination())
            .arg("--")
            .arg(cmd.shell_line());
        let out = run_process_with(&self.name, c, cmd, input)?;
        if out.status == 255 {
            // ssh's own failure (connection lost, host key refused), not the command's.
            let reason = match host_key_hint(&out.stderr, &self.opts) {
                Some(hint) => format!("{hint} ({})", out.stderr.trim()),
                None => format!("ssh failed running `{cmd}`: {}", out.stderr.trim()),
            };
            return Err(ExecError::Protocol {
                target: self.name.clone(),
                reason,
            });
        }
        Ok(out)
    }
}

impl Transport for SshTransport {
    fn target(&self) -> &str {
        &self.name
    }

    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        let mut stdin = cmd.stdin.as_deref();
        self.run_with(cmd, stdin.as_mut().map(|s| s as &mut (dyn Read + Send)))
    }

    fn run_streaming(&self, cmd: &Cmd, input: &mut (dyn Read + Send)) -> Result<Output, ExecError> {
        self.run_with(cmd, Some(input))
    }

    fn upload(&self, data: &[u8], path: &str, mode: u32) -> Result<(), ExecError> {
        let dir = Path::new(path)
            .parent()
            .map_or_else(|| ".".to_owned(), |d| d.display().to_string());
        let tmp = format!("{path}.provisioner-tmp");
        let script = format!(
            "mkdir -p {d} && cat > {t} && chmod {mode:o} {t} && mv -f {t} {p}",
            d = shell_quote(&dir),
            t = shell_quote(&tmp),
            p = shell_quote(path),
        );
        let cmd = Cmd::new("sh").args(["-c", &script]).stdin(data.to_vec());
        self.run_ok(&cmd)?;
        Ok(())
    }
}
