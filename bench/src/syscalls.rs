//! System calls per relayed packet, counted by the kernel's `syscalls:sys_enter_<call>`
//! tracepoints through `perf stat` (counting mode: no sampling, no stacks) for the calls in
//! [`COUNTED`].
//!
//! `perf stat -D -1 --control fifo:…` attaches to the server's threads with every event
//! disabled; the bench enables the events at the load window's start and disables them at
//! its deadline, so exactly the window is counted. Threads the server creates later are
//! counted into their parent's events (perf's default inheritance). The bench runs this in a
//! window of its own: tracepoints slow every system call a little, so the CPU figures are
//! never taken with them on.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};

/// How long a control command may wait for perf's acknowledgement, and perf for its exit
/// (closing tracepoint events waits for RCU grace periods: seconds on a busy machine).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The calls counted. Not `syscalls:sys_enter_*`: attaching and detaching all ~350
/// tracepoints takes tens of seconds here (each waits for an RCU grace period), so the
/// probe counts the calls a UDP/TCP relay can make on its packet path, and "all" means these.
pub const COUNTED: [&str; 28] = [
    "sendmsg",
    "sendmmsg",
    "sendto",
    "write",
    "writev",
    "pwritev",
    "recvmsg",
    "recvmmsg",
    "recvfrom",
    "read",
    "readv",
    "preadv",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_ctl",
    "io_uring_enter",
    "poll",
    "ppoll",
    "select",
    "futex",
    "sched_yield",
    "nanosleep",
    "clock_nanosleep",
    "accept4",
    "close",
    "getsockopt",
    "setsockopt",
];

/// What to attach to.
#[derive(Debug, Clone)]
pub enum Attach {
    /// These threads (and what they spawn).
    Threads(Vec<u32>),
    /// A whole process.
    Process(u32),
}

/// A running `perf stat`, events disabled until [`Probe::enable`].
#[derive(Debug)]
pub struct Probe {
    child: Child,
    ctl: File,
    ack: File,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

/// Counts per system call name (without the `sys_enter_` prefix).
#[derive(Debug, Clone, Default)]
pub struct SyscallCounts {
    /// Count per call, non-zero only.
    pub by_call: BTreeMap<String, u64>,
}

impl SyscallCounts {
    /// All calls.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.by_call.values().sum()
    }

    /// The sum of the named calls.
    #[must_use]
    pub fn sum(&self, calls: &[&str]) -> u64 {
        calls.iter().filter_map(|c| self.by_call.get(*c)).sum()
    }
}

/// Calls that send.
pub const SEND: [&str; 6] = [
    "sendmsg", "sendmmsg", "sendto", "write", "writev", "pwritev",
];
/// Calls that receive.
pub const RECV: [&str; 6] = ["recvmsg", "recvmmsg", "recvfrom", "read", "readv", "preadv"];
/// Calls that wait for readiness or completions.
pub const WAIT: [&str; 7] = [
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "io_uring_enter",
    "poll",
    "ppoll",
    "select",
];

fn mkfifo(path: &std::path::Path) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error()).context("mkfifo");
    }
    Ok(())
}

/// Whether `perf stat` can count syscall tracepoints here: `perf` is installed and
/// `syscalls:sys_enter_getpid` counts a process's own call.
#[must_use]
pub fn available() -> bool {
    Command::new("perf")
        .args([
            "stat",
            "-x;",
            "-e",
            "syscalls:sys_enter_getppid",
            "--",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Probe {
    /// Starts `perf stat` on `attach` with its events disabled, and waits until it is ready.
    ///
    /// # Errors
    /// perf could not be started or did not answer its control fifo.
    pub fn start(attach: &Attach) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (ctl_path, ack_path, out) = (
            dir.path().join("ctl"),
            dir.path().join("ack"),
            dir.path().join("out"),
        );
        mkfifo(&ctl_path)?;
        mkfifo(&ack_path)?;
        let mut cmd = Command::new("perf");
        let events: Vec<String> = COUNTED
            .iter()
            .map(|c| format!("syscalls:sys_enter_{c}"))
            .collect();
        cmd.args(["stat", "-x;", "-D", "-1", "-e", &events.join(",")])
            .arg("-o")
            .arg(&out)
            .arg("--control")
            .arg(format!(
                "fifo:{},{}",
                ctl_path.display(),
                ack_path.display()
            ));
        match attach {
            Attach::Threads(tids) => {
                if tids.is_empty() {
                    bail!("no threads to attach to");
                }
                let list: Vec<String> = tids.iter().map(u32::to_string).collect();
                cmd.args(["-t", &list.join(",")]);
            }
            Attach::Process(pid) => {
                cmd.args(["-p", &pid.to_string()]);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf")?;
        // Read-write opens of a fifo never block (Linux), whoever opens the other end when.
        let open = |p: &PathBuf| std::fs::OpenOptions::new().read(true).write(true).open(p);
        let mut probe = Self {
            ctl: open(&ctl_path)?,
            ack: open(&ack_path)?,
            child,
            out,
            _dir: dir,
        };
        probe
            .command("disable")
            .context("perf did not become ready")?;
        Ok(probe)
    }

    /// Sends a control command and waits for its acknowledgement.
    fn command(&mut self, what: &str) -> anyhow::Result<()> {
        self.ctl.write_all(format!("{what}\n").as_bytes())?;
        let mut pfd = libc::pollfd {
            fd: self.ack.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        #[allow(clippy::cast_possible_truncation)]
        let ms = ACK_TIMEOUT.as_millis() as libc::c_int;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            bail!("no acknowledgement of {what:?} from perf");
        }
        let mut buf = [0u8; 16];
        let _ = self.ack.read(&mut buf)?;
        Ok(())
    }

    /// Starts counting.
    ///
    /// # Errors
    /// perf did not acknowledge.
    pub fn enable(&mut self) -> anyhow::Result<()> {
        self.command("enable")
    }

    /// Stops counting.
    ///
    /// # Errors
    /// perf did not acknowledge.
    pub fn disable(&mut self) -> anyhow::Result<()> {
        self.command("disable")
    }

    /// Stops perf and reads its counts.
    ///
    /// # Errors
    /// perf's output could not be read.
    pub fn finish(mut self) -> anyhow::Result<SyscallCounts> {
        // SAFETY: signalling our own child.
        #[allow(clippy::cast_possible_wrap)]
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        let deadline = std::time::Instant::now() + ACK_TIMEOUT;
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&self.out).context("reading perf's output")?;
        Ok(parse(&text))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parses `perf stat -x;` output: `count;unit;event;…`, uncounted events skipped.
fn parse(text: &str) -> SyscallCounts {
    let mut by_call = BTreeMap::new();
    for line in text.lines() {
        let mut f = line.split(';');
        let (Some(count), Some(_unit), Some(event)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (Ok(count), Some(call)) = (
            count.trim().parse::<u64>(),
            event.strip_prefix("syscalls:sys_enter_"),
        ) else {
            continue;
        };
        if count > 0 {
            *by_call.entry(call.to_owned()).or_insert(0) += count;
        }
    }
    SyscallCounts { by_call }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts_and_skips_uncounted_events() {
        let c = parse(
            "# started on …\n\n3128;;syscalls:sys_enter_sendto;273772660;100.00;;\n\
             <not counted>;;syscalls:sys_enter_read;0;100.00;;\n\
             0;;syscalls:sys_enter_mmap;1;100.00;;\n12;;syscalls:sys_enter_recvmmsg;1;100.00;;\n",
        );
        assert_eq!(c.total(), 3140);
        assert_eq!(c.sum(&SEND), 3128);
        assert_eq!(c.sum(&RECV), 12);
        assert!(!c.by_call.contains_key("mmap"));
    }
}
