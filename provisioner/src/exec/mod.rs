//! Execution: the [`Transport`] trait (run a command, upload a file) and its implementations —
//! [`LocalTransport`], [`SshTransport`] (system `ssh` with ControlMaster, jumping through the
//! host to the VMs), [`RecordingTransport`] (a scripted fake for unit tests) and
//! [`VirshShellTransport`] (keeps one `virsh` process alive, for libvirt's in-process
//! `test:///default` driver whose state lives only as long as its process).

mod fake;
mod local;
pub mod progress;
pub mod redact;
mod ssh;
mod sudo;
pub mod tunnel;
mod virsh_shell;

use std::fmt;

pub use fake::{Recorded, RecordingTransport};
pub use local::LocalTransport;
pub use ssh::{host_key_hint, SshOptions, SshTransport};
pub use sudo::Sudo;
pub use virsh_shell::VirshShellTransport;

/// A command: a program and its arguments, never a shell string; plus optional stdin.
#[derive(Clone, PartialEq, Eq)]
pub struct Cmd {
    /// The program.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Bytes fed to stdin.
    pub stdin: Option<Vec<u8>>,
}

impl Cmd {
    /// A command running `program` with no arguments.
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            stdin: None,
        }
    }

    /// Appends one argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends several arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets stdin.
    #[must_use]
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// The command as one POSIX shell line, every word quoted as needed. This is what is
    /// printed, and what the SSH transport sends.
    pub fn shell_line(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shell_line())?;
        if let Some(stdin) = &self.stdin {
            write!(f, " <<< ({} bytes)", stdin.len())?;
        }
        Ok(())
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Quotes `word` for a POSIX shell: unchanged when it is made only of safe characters,
/// otherwise in single quotes.
pub fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// What a finished command produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Output {
    /// Exit status; -1 when killed by a signal.
    pub status: i32,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl Output {
    /// A successful output with `stdout`.
    pub fn ok(stdout: impl Into<String>) -> Self {
        Self {
            status: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    /// A failed output.
    pub fn failed(status: i32, stderr: impl Into<String>) -> Self {
        Self {
            status,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Why a command could not be run or failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The program could not be started at all.
    #[error("on {target}: cannot start `{command}`: {source}")]
    Spawn {
        /// Where.
        target: String,
        /// The command line.
        command: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The command ran and exited non-zero.
    #[error("on {target}: `{command}` exited with status {status}: {stderr}")]
    Failed {
        /// Where.
        target: String,
        /// The command line.
        command: String,
        /// Exit status.
        status: i32,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// A local file operation failed.
    #[error("on {target}: {what} {path}: {source}")]
    Io {
        /// Where.
        target: String,
        /// What was being done.
        what: &'static str,
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A transport-level protocol failure (e.g. the virsh shell went away).
    #[error("on {target}: {reason}")]
    Protocol {
        /// Where.
        target: String,
        /// What happened.
        reason: String,
    },
}

/// Runs commands and uploads files somewhere: this machine, the host, a VM.
pub trait Transport: Send + Sync {
    /// A short name for messages, e.g. `local`, `root@host`, `k8s-master`.
    fn target(&self) -> &str;

    /// Runs `cmd`; a non-zero exit is an `Ok` output, not an error.
    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError>;

    /// Writes `data` to `path` with permission bits `mode`, creating parent directories and
    /// replacing the file atomically.
    fn upload(&self, data: &[u8], path: &str, mode: u32) -> Result<(), ExecError>;

    /// Runs `cmd` with its stdin copied from `input` as the command reads it (`cmd.stdin` is
    /// ignored): for data too big to hold in memory, like an image archive. The default reads
    /// `input` whole and calls [`Transport::run`]; the local and SSH transports stream.
    fn run_streaming(
        &self,
        cmd: &Cmd,
        input: &mut (dyn std::io::Read + Send),
    ) -> Result<Output, ExecError> {
        let mut data = Vec::new();
        input
            .read_to_end(&mut data)
            .map_err(|source| ExecError::Io {
                target: self.target().to_owned(),
                what: "cannot read the input of",
                path: cmd.shell_line(),
                source,
            })?;
        self.run(&cmd.clone().stdin(data))
    }

    /// Runs `cmd` and turns a non-zero exit into [`ExecError::Failed`].
    fn run_ok(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        let out = self.run(cmd)?;
        if out.success() {
            Ok(out)
        } else {
            Err(ExecError::Failed {
                target: self.target().to_owned(),
                command: cmd.shell_line(),
                status: out.status,
                stderr: out.stderr.trim().to_owned(),
            })
        }
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn target(&self) -> &str {
        (**self).target()
    }
    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        (**self).run(cmd)
    }
    fn run_streaming(
        &self,
        cmd: &Cmd,
        input: &mut (dyn std::io::Read + Send),
    ) -> Result<Output, ExecError> {
        (**self).run_streaming(cmd, input)
    }
    fn upload(&self, data: &[u8], path: &str, mode: u32) -> Result<(), ExecError> {
        (**self).upload(data, path, mode)
    }
}

impl<T: Transport + ?Sized> Transport for std::sync::Arc<T> {
    fn target(&self) -> &str {
        (**self).target()
    }
    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        (**self).run(cmd)
    }
    fn run_streaming(
        &self,
        cmd: &Cmd,
        input: &mut (dyn std::io::Read + Send),
    ) -> Result<Output, ExecError> {
        (**self).run_streaming(cmd, input)
    }
    fn upload(&self, data: &[u8], path: &str, mode: u32) -> Result<(), ExecError> {
        (**self).upload(data, path, mode)
    }
}

/// Logs a finished command at debug level (shown with `-v`), with every credential masked
/// ([`redact::redact`]): the command line, its stdout and its stderr.
pub(crate) fn log_output(target: &str, cmd: &Cmd, out: &Output) {
    if !tracing::enabled!(target: "provisioner::exec", tracing::Level::DEBUG) {
        return;
    }
    let line = redact::redact(&cmd.to_string());
    tracing::debug!(target: "provisioner::exec", "[{target}] $ {line} -> {}", out.status);
    if !out.stdout.trim().is_empty() {
        let stdout = redact::redact(out.stdout.trim_end());
        tracing::debug!(target: "provisioner::exec", "[{target}] stdout:\n{stdout}");
    }
    if !out.stderr.trim().is_empty() {
        let stderr = redact::redact(out.stderr.trim_end());
        tracing::debug!(target: "provisioner::exec", "[{target}] stderr:\n{stderr}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_line_quotes_only_what_needs_it() {
        let c = Cmd::new("kubectl")
            .args(["label", "node", "k8s-worker1", "a=b c", "it's"])
            .arg("");
        assert_eq!(
            c.shell_line(),
            r"kubectl label node k8s-worker1 'a=b c' 'it'\''s' ''"
        );
    }

    #[test]
    fn run_ok_reports_target_command_and_stderr() {
        let fake = RecordingTransport::new("k8s-master");
        fake.respond("false", Output::failed(3, "boom\n"));
        let err = fake.run_ok(&Cmd::new("false")).expect_err("fails");
        assert_eq!(
            err.to_string(),
            "on k8s-master: `false` exited with status 3: boom"
        );
    }
}
