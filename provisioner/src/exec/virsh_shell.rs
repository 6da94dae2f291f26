//! A transport that keeps one interactive `virsh` alive and sends every `virsh …` command to
//! it. libvirt's `test:///default` driver keeps its objects inside the `virsh` process, so a
//! phase that gathers, plans and applies through separate `virsh` processes would see a fresh
//! driver each time; this transport gives it one long-lived connection. Other commands and
//! uploads run locally.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

/// How long one virsh command may take before the session is declared stuck.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

use super::{log_output, shell_quote, Cmd, ExecError, LocalTransport, Output, Transport};

struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
    seq: u64,
}

/// One `virsh -c URI` session shared by every `virsh` command run through this transport.
pub struct VirshShellTransport {
    uri: String,
    local: LocalTransport,
    session: Mutex<Session>,
}

impl std::fmt::Debug for VirshShellTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirshShellTransport")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl VirshShellTransport {
    /// Starts `virsh -c uri` (stderr merged into stdout so errors arrive in order).
    pub fn start(uri: &str) -> Result<Self, ExecError> {
        let line = format!("exec virsh -c {} 2>&1", shell_quote(uri));
        let mut child = Command::new("sh")
            .args(["-c", &line])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| ExecError::Spawn {
                target: "virsh-shell".to_owned(),
                command: line.clone(),
                source,
            })?;
        let proto = |reason: &str| ExecError::Protocol {
            target: "virsh-shell".to_owned(),
            reason: reason.to_owned(),
        };
        let stdin = child.stdin.take().ok_or_else(|| proto("no stdin pipe"))?;
        let stdout = BufReader::new(child.stdout.take().ok_or_else(|| proto("no stdout pipe"))?);
        let (tx, lines) = mpsc::channel();
        // Lines are read on a thread so that a stuck virsh becomes a timeout, not a hang.
        std::thread::spawn(move || {
            for line in stdout.lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut session = Session {
            child,
            stdin,
            lines,
            seq: 0,
        };
        // Swallow the banner.
        exchange(&mut session, "echo ready")?;
        Ok(Self {
            uri: uri.to_owned(),
            local: LocalTransport::new(),
            session: Mutex::new(session),
        })
    }
}

/// Sends one command line, then an `echo` marker, and returns the lines printed in between
/// (the prompt-echo lines removed).
fn exchange(s: &mut Session, line: &str) -> Result<Vec<String>, ExecError> {
    s.seq += 1;
    let marker = format!("provisioner-mark-{}", s.seq);
    let proto = |reason: String| ExecError::Protocol {
        target: "virsh-shell".to_owned(),
        reason,
    };
    writeln!(s.stdin, "{line}\necho {marker}")
        .and_then(|()| s.stdin.flush())
        .map_err(|e| proto(format!("virsh went away: {e}")))?;
    let mut lines = Vec::new();
    loop {
        let buf = match s.lines.recv_timeout(COMMAND_TIMEOUT) {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Err(proto(format!("reading virsh: {e}"))),
            Err(RecvTimeoutError::Timeout) => {
                return Err(proto(format!(
                    "virsh did not answer `{line}` within {COMMAND_TIMEOUT:?}"
                )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(proto(format!("virsh exited while running `{line}`")))
            }
        };
        let text = buf.trim_end_matches('\r');
        if text == marker {
            break;
        }
        if text.starts_with("virsh # ") || text == "virsh #" {
            continue;
        }
        lines.push(text.to_owned());
    }
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    Ok(lines)
}

impl Drop for VirshShellTransport {
    fn drop(&mut self) {
        let s = self
            .session
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(s.stdin, "quit");
        let _ = s.stdin.flush();
        if !matches!(s.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
            if !matches!(s.child.try_wait(), Ok(Some(_))) {
                let _ = s.child.kill();
            }
        }
        let _ = s.child.wait();
    }
}

impl Transport for VirshShellTransport {
    fn target(&self) -> &str {
        "local"
    }

    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        if cmd.program != "virsh" {
            return self.local.run(cmd);
        }
        let mut args = cmd.args.as_slice();
        if let [flag, uri, rest @ ..] = args {
            if flag == "-c" {
                if *uri != self.uri {
                    return Err(ExecError::Protocol {
                        target: "virsh-shell".to_owned(),
                        reason: format!("session is {}, command wants {uri}", self.uri),
                    });
                }
                args = rest;
            }
        }
        if cmd.stdin.is_some() {
            return Err(ExecError::Protocol {
                target: "virsh-shell".to_owned(),
                reason: "virsh commands cannot take stdin in a shared session".to_owned(),
            });
        }
        let line = args
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        let lines = {
            let mut s = self
                .session
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            exchange(&mut s, &line)?
        };
        let (errors, normal): (Vec<String>, Vec<String>) =
            lines.into_iter().partition(|l| l.starts_with("error: "));
        let mut stdout = normal.join("\n");
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        let out = Output {
            status: i32::from(!errors.is_empty()),
            stdout,
            stderr: errors.join("\n"),
        };
        log_output("virsh-shell", cmd, &out);
        Ok(out)
    }

    fn upload(&self, data: &[u8], path: &str, mode: u32) -> Result<(), ExecError> {
        self.local.upload(data, path, mode)
    }
}
