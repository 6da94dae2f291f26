//! A scripted, recording fake transport for unit tests of plans and phases.

use std::sync::Mutex;

use super::{Cmd, ExecError, Output, Transport};

/// One thing the fake was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// A command run.
    Run(String),
    /// A file uploaded.
    Upload {
        /// Destination.
        path: String,
        /// Contents (lossy UTF-8).
        data: String,
        /// Mode.
        mode: u32,
    },
}

/// Records every call and answers commands from a script of (command-line prefix → output)
/// rules; the last matching rule wins, and an unmatched command succeeds with empty output.
#[derive(Debug)]
pub struct RecordingTransport {
    target: String,
    rules: Mutex<Vec<(String, Output)>>,
    /// Rules that take effect once a command with the first prefix has run.
    later: Mutex<Vec<(String, String, Output)>>,
    log: Mutex<Vec<Recorded>>,
}

impl RecordingTransport {
    /// A fake named `target`.
    pub fn new(target: &str) -> Self {
        Self {
            target: target.to_owned(),
            rules: Mutex::new(Vec::new()),
            later: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
        }
    }

    /// Answers every command whose shell line starts with `prefix` with `output`.
    pub fn respond(&self, prefix: &str, output: Output) {
        lock(&self.rules).push((prefix.to_owned(), output));
    }

    /// Once a command whose shell line starts with `after` has run, answers commands starting
    /// with `prefix` with `output` (a state change: an import makes an image appear).
    pub fn respond_after(&self, after: &str, prefix: &str, output: Output) {
        lock(&self.later).push((after.to_owned(), prefix.to_owned(), output));
    }

    /// Everything recorded so far.
    pub fn calls(&self) -> Vec<Recorded> {
        lock(&self.log).clone()
    }

    /// The shell lines of the commands run so far.
    pub fn commands(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Recorded::Run(line) => Some(line),
                Recorded::Upload { .. } => None,
            })
            .collect()
    }

    /// Forgets what was recorded (the rules stay).
    pub fn clear(&self) {
        lock(&self.log).clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Transport for RecordingTransport {
    fn target(&self) -> &str {
        &self.target
    }

    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        let line = cmd.shell_line();
        lock(&self.log).push(Recorded::Run(line.clone()));
        let fired: Vec<(String, Output)> = {
            let mut later = lock(&self.later);
            let (now, wait): (Vec<_>, Vec<_>) = later
                .drain(..)
                .partition(|(after, _, _)| line.starts_with(after.as_str()));
            *later = wait;
            now.into_iter().map(|(_, p, o)| (p, o)).collect()
        };
        let out = lock(&self.rules)
            .iter()
            .rev()
            .find(|(prefix, _)| line.starts_with(prefix.as_str()))
            .map(|(_, out)| out.clone())
            .unwrap_or_default();
        lock(&self.rules).extend(fired);
        // Logged like the real transports, so `-v` over this fake shows what they would.
        super::log_output(&self.target, cmd, &out);
        Ok(out)
    }

    fn upload(&self, data: &[u8], path: &str, mode: u32) -> Result<(), ExecError> {
        lock(&self.log).push(Recorded::Upload {
            path: path.to_owned(),
            data: String::from_utf8_lossy(data).into_owned(),
            mode,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_matching_rule_wins_and_everything_is_recorded() {
        let f = RecordingTransport::new("vm");
        f.respond("virsh", Output::ok("a"));
        f.respond("virsh net-list", Output::ok("b"));
        assert_eq!(
            f.run(&Cmd::new("virsh").arg("list")).expect("runs").stdout,
            "a"
        );
        assert_eq!(
            f.run(&Cmd::new("virsh").arg("net-list"))
                .expect("runs")
                .stdout,
            "b"
        );
        assert_eq!(f.run(&Cmd::new("true")).expect("runs"), Output::default());
        f.upload(b"x", "/etc/x", 0o644).expect("upload");
        assert_eq!(
            f.calls(),
            vec![
                Recorded::Run("virsh list".into()),
                Recorded::Run("virsh net-list".into()),
                Recorded::Run("true".into()),
                Recorded::Upload {
                    path: "/etc/x".into(),
                    data: "x".into(),
                    mode: 0o644
                },
            ]
        );
    }
}
