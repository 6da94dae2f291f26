//! Runs everything as root through `sudo -n` on a transport that logs in as a normal user
//! (the VMs' cloud-init user).

use super::{shell_quote, Cmd, ExecError, Output, Transport};

/// Wraps a transport so that commands run under `sudo -n` and uploads land as root.
#[derive(Debug)]
pub struct Sudo<T> {
    inner: T,
}

impl<T: Transport> Sudo<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self { inner }
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }
}

fn sudo(cmd: &Cmd) -> Cmd {
    Cmd::new("sudo")
        .arg("-n")
        .arg(&cmd.program)
        .args(cmd.args.iter().cloned())
}

impl<T: Transport> Transport for Sudo<T> {
    fn target(&self) -> &str {
        self.inner.target()
    }

    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        let mut wrapped = sudo(cmd);
        wrapped.stdin.clone_from(&cmd.stdin);
        self.inner.run(&wrapped)
    }

    fn run_streaming(
        &self,
        cmd: &Cmd,
        input: &mut (dyn std::io::Read + Send),
    ) -> Result<Output, ExecError> {
        self.inner.run_streaming(&sudo(cmd), input)
    }

    fn upload(&self, data: &[u8], path: &str, mode: u32) -> Result<(), ExecError> {
        let name: String = path
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let staging = format!("/tmp/provisioner-upload{name}");
        self.inner.upload(data, &staging, 0o600)?;
        let script = format!(
            "install -D -m {mode:o} {s} {p} && rm -f {s}",
            s = shell_quote(&staging),
            p = shell_quote(path)
        );
        self.run_ok(&Cmd::new("sh").args(["-c", &script]))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{Recorded, RecordingTransport};

    #[test]
    fn streamed_commands_go_through_sudo_too() {
        let s = Sudo::new(RecordingTransport::new("vm"));
        let mut archive: &[u8] = b"tar bytes";
        s.run_streaming(
            &Cmd::new("ctr").args(["images", "import", "-"]),
            &mut archive,
        )
        .expect("runs");
        assert_eq!(
            s.inner().calls(),
            vec![Recorded::Run("sudo -n ctr images import -".into())]
        );
    }

    #[test]
    fn commands_and_uploads_go_through_sudo() {
        let s = Sudo::new(RecordingTransport::new("vm"));
        s.run(&Cmd::new("kubeadm").args(["reset", "-f"]))
            .expect("runs");
        s.upload(b"x", "/etc/a b", 0o644).expect("uploads");
        assert_eq!(
            s.inner().calls(),
            vec![
                Recorded::Run("sudo -n kubeadm reset -f".into()),
                Recorded::Upload { path: "/tmp/provisioner-upload_etc_a_b".into(), data: "x".into(), mode: 0o600 },
                Recorded::Run(
                    r"sudo -n sh -c 'install -D -m 644 /tmp/provisioner-upload_etc_a_b '\''/etc/a b'\'' && rm -f /tmp/provisioner-upload_etc_a_b'".into()
                ),
            ]
        );
    }
}
