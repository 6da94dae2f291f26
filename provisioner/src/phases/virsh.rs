//! libvirt through `virsh` on the host transport.

use crate::exec::{Cmd, ExecError, Transport};

/// `virsh -c URI …` on one transport.
pub struct Virsh<'a> {
    t: &'a dyn Transport,
    uri: &'a str,
}

/// Run state of a network or domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetState {
    /// Running.
    pub active: bool,
    /// Started at boot.
    pub autostart: bool,
}

impl<'a> Virsh<'a> {
    /// virsh on `t` against `uri`.
    pub fn new(t: &'a dyn Transport, uri: &'a str) -> Self {
        Self { t, uri }
    }

    /// A `virsh -c URI ARGS` command.
    pub fn cmd(uri: &str, args: &[&str]) -> Cmd {
        Cmd::new("virsh")
            .args(["-c", uri])
            .args(args.iter().copied())
    }

    fn ok(&self, args: &[&str]) -> Result<String, ExecError> {
        Ok(self.t.run_ok(&Self::cmd(self.uri, args))?.stdout)
    }

    /// Lists names with `args`; none when virsh is not installed yet (a fresh host).
    fn list(&self, args: &[&str]) -> Result<Vec<String>, ExecError> {
        let cmd = Self::cmd(self.uri, args);
        match super::facts::probe(self.t, &cmd)? {
            None => Ok(Vec::new()),
            Some(out) if out.success() => Ok(names(&out.stdout)),
            Some(out) => Err(ExecError::Failed {
                target: self.t.target().to_owned(),
                command: cmd.shell_line(),
                status: out.status,
                stderr: out.stderr.trim().to_owned(),
            }),
        }
    }

    /// Names of all networks (none when virsh is not installed yet).
    pub fn networks(&self) -> Result<Vec<String>, ExecError> {
        self.list(&["net-list", "--all", "--name"])
    }

    /// A network's XML.
    pub fn net_xml(&self, name: &str) -> Result<String, ExecError> {
        self.ok(&["net-dumpxml", name])
    }

    /// A network's state, from `net-info`.
    pub fn net_state(&self, name: &str) -> Result<NetState, ExecError> {
        Ok(parse_net_info(&self.ok(&["net-info", name])?))
    }

    /// Names of all domains (none when virsh is not installed yet).
    pub fn domains(&self) -> Result<Vec<String>, ExecError> {
        self.list(&["list", "--all", "--name"])
    }

    /// A domain's XML (the running definition when it runs).
    pub fn dom_xml(&self, name: &str) -> Result<String, ExecError> {
        self.ok(&["dumpxml", name])
    }

    /// Whether a domain is running, from `domstate`.
    pub fn dom_running(&self, name: &str) -> Result<bool, ExecError> {
        Ok(self.ok(&["domstate", name])?.trim() == "running")
    }
}

fn names(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Parses `virsh net-info` output.
pub fn parse_net_info(stdout: &str) -> NetState {
    let field = |name: &str| {
        stdout
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .is_some_and(|(_, v)| v.trim() == "yes")
    };
    NetState {
        active: field("Active"),
        autostart: field("Autostart"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_info_is_parsed_from_captured_output() {
        // Captured from `virsh -c test:///default net-info default`.
        let out = "Name:           default\nUUID:           dd8fe884-6c02-601e-7551-cca97df1c5df\nActive:         yes\nPersistent:     yes\nAutostart:      no\nBridge:         virbr0\n";
        assert_eq!(
            parse_net_info(out),
            NetState {
                active: true,
                autostart: false
            }
        );
    }
}
