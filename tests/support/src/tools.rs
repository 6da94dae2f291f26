//! External tools (coturn's `turnserver` and `turnutils_*`, Prometheus's `prometheus` and
//! `promtool`).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Whether missing tools must fail tests (`TURND_REQUIRE_TOOLS=1`, set in CI).
#[must_use]
pub fn tools_required() -> bool {
    std::env::var("TURND_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Finds coturn's tool `name` on `PATH` (or in `/usr/bin`, `/usr/local/bin`).
///
/// Returns `None` (and says so on stderr) when it is missing, so the caller can skip.
///
/// # Panics
/// The tool is missing and [`tools_required`].
#[must_use]
pub fn find_tool(name: &str) -> Option<PathBuf> {
    find_tool_from(name, "coturn")
}

/// Finds `name`, which the Debian package `package` installs, as [`find_tool`] does.
///
/// # Panics
/// The tool is missing and [`tools_required`].
#[must_use]
pub fn find_tool_from(name: &str, package: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/local/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            !tools_required(),
            "{name} is not installed and TURND_REQUIRE_TOOLS=1 (apt-get install -y {package})"
        );
        eprintln!("SKIPPED: {name} is not installed (apt-get install -y {package})");
    }
    found
}

/// Runs a command to completion with a deadline, killing it when the deadline passes.
///
/// # Errors
/// It could not start, or it outlived `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    run_with_input(cmd, &[], timeout)
}

/// As [`run_with_timeout`], writing `input` to the command's standard input.
///
/// # Errors
/// It could not start, or it outlived `timeout`.
pub fn run_with_input(
    cmd: &mut Command,
    input: &[u8],
    timeout: Duration,
) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdin = child.stdin.take();
    let input = input.to_vec();
    let t_in = std::thread::spawn(move || {
        if let Some(mut s) = stdin {
            let _ = std::io::Write::write_all(&mut s, &input);
        }
    });
    // Drain the pipes on threads so a chatty tool cannot block on a full pipe.
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || read_all(out.as_mut()));
    let t_err = std::thread::spawn(move || read_all(err.as_mut()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = t_in.join();
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// What `turnutils_uclient`'s summary says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UclientSummary {
    /// `tot_send_msgs`.
    pub sent: u64,
    /// `tot_recv_msgs`.
    pub received: u64,
    /// `Total lost packets N`.
    pub lost: u64,
}

impl UclientSummary {
    /// What a run that relayed all `messages` both ways says: every message sent came back,
    /// none lost.
    #[must_use]
    pub const fn lossless(messages: u64) -> Self {
        Self {
            sent: messages,
            received: messages,
            lost: 0,
        }
    }

    /// Parses `start_mclient: tot_send_msgs=S, tot_recv_msgs=R` and `Total lost packets N`
    /// (the last of each).
    #[must_use]
    pub fn parse(out: &str) -> Option<Self> {
        let field = |line: &str, key: &str| -> Option<u64> {
            let rest = &line[line.find(key)? + key.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        let totals = out
            .lines()
            .rev()
            .find(|l| l.contains("start_mclient: tot_send_msgs="))?;
        let lost = out
            .lines()
            .rev()
            .find(|l| l.contains("Total lost packets "))?;
        Some(Self {
            sent: field(totals, "tot_send_msgs=")?,
            received: field(totals, "tot_recv_msgs=")?,
            lost: field(lost, "Total lost packets ")?,
        })
    }
}

fn read_all(r: Option<&mut impl std::io::Read>) -> Vec<u8> {
    let mut v = Vec::new();
    if let Some(r) = r {
        let _ = r.read_to_end(&mut v);
    }
    v
}
