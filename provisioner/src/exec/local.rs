//! Runs commands on this machine.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::{log_output, Cmd, ExecError, Output, Transport};

/// Runs commands with `std::process` on this machine.
#[derive(Debug, Clone, Default)]
pub struct LocalTransport {
    _private: (),
}

impl LocalTransport {
    /// A local transport.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Spawns `cmd`, feeds its stdin, and collects its output. Shared with the SSH transport.
pub(crate) fn run_process(target: &str, command: Command, cmd: &Cmd) -> Result<Output, ExecError> {
    let mut stdin = cmd.stdin.as_deref();
    let input: Option<&mut (dyn Read + Send)> = stdin.as_mut().map(|s| s as &mut (dyn Read + Send));
    run_process_with(target, command, cmd, input)
}

/// Like [`run_process`], with stdin copied from `input` while the command runs (the command's
/// own `stdin` is ignored): for data too big to hold in memory, like an image archive.
pub(crate) fn run_process_with(
    target: &str,
    mut command: Command,
    cmd: &Cmd,
    input: Option<&mut (dyn Read + Send)>,
) -> Result<Output, ExecError> {
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |source| ExecError::Spawn {
        target: target.to_owned(),
        command: cmd.shell_line(),
        source,
    };
    let mut child = command.spawn().map_err(spawn_err)?;
    let pipe = child.stdin.take();
    let out = std::thread::scope(|s| {
        if let (Some(mut pipe), Some(input)) = (pipe, input) {
            s.spawn(move || {
                // A child that exits without reading stdin closes the pipe; that is its
                // business (its status says what went wrong).
                let _ = std::io::copy(input, &mut pipe);
            });
        }
        child.wait_with_output()
    })
    .map_err(spawn_err)?;
    let output = Output {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    log_output(target, cmd, &output);
    Ok(output)
}

impl Transport for LocalTransport {
    fn target(&self) -> &str {
        "local"
    }

    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        let mut command = Command::new(&cmd.program);
        command.args(&cmd.args);
        run_process(self.target(), command, cmd)
    }

    fn run_streaming(&self, cmd: &Cmd, input: &mut (dyn Read + Send)) -> Result<Output, ExecError> {
        let mut command = Command::new(&cmd.program);
        command.args(&cmd.args);
        run_process_with(self.target(), command, cmd, Some(input))
    }

    fn upload(&self, data: &[u8], path: &str, mode: u32) -> Result<(), ExecError> {
        let io = |what, source| ExecError::Io {
            target: "local".to_owned(),
            what,
            path: path.to_owned(),
            source,
        };
        let dest = Path::new(path);
        let dir = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create the directory of", e))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| io("cannot create a temporary file for", e))?;
        tmp.write_all(data).map_err(|e| io("cannot write", e))?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| io("cannot chmod", e))?;
        tmp.persist(dest)
            .map_err(|e| io("cannot rename into", e.error))?;
        tracing::debug!(target: "provisioner::exec", "[local] wrote {path} ({} bytes, mode {mode:o})", data.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_stdin_and_reports_status_and_streams() {
        let t = LocalTransport::new();
        let out = t
            .run(
                &Cmd::new("sh")
                    .args(["-c", "cat; echo err >&2; exit 4"])
                    .stdin("hello"),
            )
            .expect("runs");
        assert_eq!(
            out,
            Output {
                status: 4,
                stdout: "hello".into(),
                stderr: "err\n".into()
            }
        );
    }

    #[test]
    fn streamed_stdin_reaches_the_command_whole() {
        // 3 MiB: more than a pipe holds, so the command reads while we write.
        let mut input = Read::take(std::io::repeat(b'x'), 3 << 20);
        let out = LocalTransport::new()
            .run_streaming(&Cmd::new("wc").arg("-c"), &mut input)
            .expect("runs");
        assert_eq!(out.stdout.trim(), (3u32 << 20).to_string());
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = LocalTransport::new()
            .run(&Cmd::new("/nonexistent/prog"))
            .expect_err("no such program");
        assert!(
            err.to_string()
                .starts_with("on local: cannot start `/nonexistent/prog`"),
            "{err}"
        );
    }

    #[test]
    fn upload_creates_dirs_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b/file");
        let p = path.to_str().expect("utf8");
        let t = LocalTransport::new();
        t.upload(b"one", p, 0o600).expect("upload");
        t.upload(b"two", p, 0o640).expect("upload again");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }
}
