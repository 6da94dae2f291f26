//! A real Prometheus server (Debian's `prometheus`) on loopback, with a configuration the test
//! writes and its storage in a temporary directory, scraping one target every second; PromQL
//! over its HTTP API; and `promtool check metrics` on a scrape.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::http;
use crate::tools::{find_tool_from, run_with_input};

/// A running Prometheus; killed when dropped.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    /// Its HTTP API.
    pub api: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// The `prometheus` binary, or `None` (said on stderr) when it is not installed.
    ///
    /// # Panics
    /// It is missing and `TURND_REQUIRE_TOOLS=1`.
    #[must_use]
    pub fn find() -> Option<PathBuf> {
        find_tool_from("prometheus", "prometheus")
    }

    /// Starts `binary` scraping `target`'s `/metrics` every second.
    ///
    /// # Errors
    /// The configuration cannot be written or the process cannot start.
    pub fn start(binary: &Path, target: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(
            binary,
            &format!(
                "  - job_name: turnd\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
    }

    /// Starts `binary` with `scrape_configs` (the YAML list items under `scrape_configs:`,
    /// indented two spaces), scraping every second.
    ///
    /// # Errors
    /// The configuration cannot be written or the process cannot start.
    pub fn start_with(binary: &Path, scrape_configs: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
                 scrape_configs:\n{scrape_configs}"
            ),
        )?;
        // A port free now; Prometheus binds it a moment later (loopback, port reuse is rare).
        let api = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        Ok(Self { child, api, dir })
    }

    /// Prometheus's own log, for failure messages.
    #[must_use]
    pub fn log(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The value of an instant PromQL query's first series, if it has one now.
    #[must_use]
    pub fn query(&self, promql: &str) -> Option<f64> {
        let target = format!("/api/v1/query?query={}", http::encode(promql));
        let reply = http::get(self.api, &target).ok()?;
        let v: serde_json::Value = serde_json::from_str(&reply.body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// The whole answer of Prometheus's `/api/v1/query` for `promql` (`status`, `data` or
    /// `error`), whatever its HTTP status.
    ///
    /// # Errors
    /// Prometheus did not answer, or not with JSON.
    pub fn query_answer(&self, promql: &str) -> anyhow::Result<serde_json::Value> {
        let target = format!("/api/v1/query?query={}", http::encode(promql));
        let reply = http::get(self.api, &target)?;
        serde_json::from_str(&reply.body)
            .with_context(|| format!("Prometheus answered {}: {}", reply.status, reply.body))
    }

    /// Polls `promql` until `pred` holds for its value or `timeout` passes.
    pub fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> Option<f64> {
        http::wait_until(timeout, || self.query(promql).filter(|v| pred(*v)))
    }

    /// A counter seen rising: its first value above zero, then a later, greater one (each
    /// awaited for up to `timeout`).
    ///
    /// # Panics
    /// Either value does not come within `timeout`.
    #[must_use]
    pub fn wait_rising(&self, promql: &str, timeout: Duration) -> (f64, f64) {
        let first = self
            .wait_for(promql, timeout, |v| v > 0.0)
            .unwrap_or_else(|| panic!("{promql} never scraped above 0:\n{}", self.log()));
        let later = self
            .wait_for(promql, timeout, |v| v > first)
            .unwrap_or_else(|| panic!("{promql} never rose above {first}:\n{}", self.log()));
        (first, later)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `promtool check metrics` says about `exposition` (empty when it finds nothing), or
/// `None` when promtool is not installed.
///
/// # Errors
/// promtool could not run.
pub fn promtool_check_metrics(exposition: &str) -> anyhow::Result<Option<(bool, String)>> {
    let Some(promtool) = find_tool_from("promtool", "prometheus") else {
        return Ok(None);
    };
    let out = run_with_input(
        Command::new(promtool).args(["check", "metrics"]),
        exposition.as_bytes(),
        Duration::from_secs(30),
    )?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Some((out.status.success(), said.trim().to_owned())))
}
