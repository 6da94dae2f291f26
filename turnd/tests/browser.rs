//! A real browser relays through turnd: headless Chromium loads `deploy/turn-test.html` from a
//! loopback HTTP server; for `turn:…?transport=udp`, `turn:…?transport=tcp` and `turns:` the page
//! connects two relay-only RTCPeerConnections to each other through an in-process turnd and
//! exchanges data-channel messages both ways, then POSTs its results back to the test's server.
//!
//! Everything stays on loopback. Chromium's flags (and why) are in `/work/shared/MACHINE-NOTES.md`
//! ("Chromium as a WebRTC client"). Without Chromium the test is skipped, unless
//! `TURND_REQUIRE_TOOLS=1` (CI), where it fails. `TURND_CHROMIUM` overrides the binary; set
//! `RUST_LOG=debug` to see turnd's log and `TURND_BROWSER_LOG=1` to get Chromium's.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The whole test (browser start, three URLs, report) must finish within this.
const OVERALL: Duration = Duration::from_secs(60);
/// What the page allows each URL (gathering, connecting, round trips).
const PER_URL_SECONDS: u32 = 15;
/// Debian's package installs it here; `/usr/bin/chromium` is a wrapper script that misbehaves.
const CHROMIUM: &str = "/usr/lib/chromium/chromium";
const PINGS: usize = 5;

fn require_tools() -> bool {
    std::env::var("TURND_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

fn chromium() -> Option<PathBuf> {
    let path =
        std::env::var_os("TURND_CHROMIUM").map_or_else(|| PathBuf::from(CHROMIUM), PathBuf::from);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        !require_tools(),
        "{} is missing and TURND_REQUIRE_TOOLS=1 (apt-get install -y chromium)",
        path.display()
    );
    eprintln!(
        "SKIPPED browser test: {} not found (apt-get install -y chromium, or set TURND_CHROMIUM)",
        path.display()
    );
    None
}

/// The test page, read at run time so an edited page needs no rebuild.
fn page() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/turn-test.html");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// base64(SHA-256(SubjectPublicKeyInfo)): what `--ignore-certificate-errors-spki-list` pins.
fn spki_pin(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    // SHA-256 from rustls's ring provider, which turnd already depends on.
    let sha256 = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .unwrap()
        .common
        .hash_provider;
    let digest = sha256.hash(cert.tbs_certificate.subject_pki.raw);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A tiny loopback HTTP/1.1 server: GET serves the page, POST /report hands the body to the test.

async fn serve(listener: TcpListener, page: String, reports: mpsc::Sender<String>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            return;
        };
        let (page, reports) = (page.clone(), reports.clone());
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(10), handle(conn, &page, &reports)).await;
        });
    }
}

async fn handle(
    mut conn: TcpStream,
    page: &str,
    reports: &mpsc::Sender<String>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut request_line = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (
        request_line.next().unwrap_or(""),
        request_line.next().unwrap_or(""),
    );
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length.min(16 << 20) {
        let mut chunk = [0u8; 16384];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    let (status, kind, content) = match (method, path) {
        ("GET", "/" | "/turn-test.html") => ("200 OK", "text/html; charset=utf-8", page.as_bytes()),
        ("POST", "/report") => {
            let _ = reports
                .send(String::from_utf8_lossy(&body).into_owned())
                .await;
            ("204 No Content", "text/plain", &b""[..])
        }
        _ => ("404 Not Found", "text/plain", &b"not found"[..]),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        content.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.write_all(content).await?;
    conn.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// Chromium in its own process group, killed (group and all) when dropped, on success or panic.

struct Browser {
    child: Child,
    log: PathBuf,
}

impl Browser {
    fn launch(binary: &Path, dir: &Path, spki: &str, url: &str) -> Self {
        use std::os::unix::process::CommandExt as _;
        let home = dir.join("home");
        for d in [
            "home/.config",
            "home/.cache",
            "home/.local/share",
            "profile",
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let log = dir.join("chromium.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(binary);
        cmd.args([
            "--headless=new",
            "--no-sandbox", // running as root
            &format!("--user-data-dir={}", dir.join("profile").display()),
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-quic",
            "--disable-gpu",
            "--mute-audio",
            // Every lookup fails except loopback; WebRTC resolves names with a trailing dot.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost , EXCLUDE localhost.",
            // turns: with a self-signed certificate fails closed unless its key is pinned.
            &format!("--ignore-certificate-errors-spki-list={spki}"),
            "--enable-logging=stderr",
            "--v=0",
            url,
        ])
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        Self { child, log }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let pgid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's process group (it was started with process_group(0)).
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
        if std::env::var("TURND_BROWSER_LOG").is_ok_and(|v| v == "1") || std::thread::panicking() {
            eprintln!("--- chromium log (tail) ---\n{}\n---", self.log_tail(80));
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_relays_data_channel_messages_through_turnd_over_udp_tcp_and_tls() {
    let Some(binary) = chromium() else {
        return;
    };
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();

    // turnd: UDP + TCP from common::settings, plus a TLS listener with a certificate for localhost.
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), cert.key_pair.serialize_pem()).unwrap();
    let spki = spki_pin(cert.cert.der());
    let settings = common::settings(&format!(
        "tls = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.path().join("tls.crt").display(),
        dir.path().join("tls.key").display()
    ));
    let running = turnd::run::start(settings).unwrap();
    // Each URL with the relay protocol Chromium must report for its selected candidate pair.
    let cases = [
        (
            format!("turn:127.0.0.1:{}?transport=udp", running.udp[0].port()),
            "udp",
        ),
        (
            format!("turn:127.0.0.1:{}?transport=tcp", running.tcp[0].port()),
            "tcp",
        ),
        (
            format!("turns:localhost:{}?transport=tcp", running.tls[0].port()),
            "tls",
        ),
    ];
    let urls: Vec<String> = cases.iter().map(|(u, _)| u.clone()).collect();

    // The page's server.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let (tx, mut reports) = mpsc::channel(4);
    let server = tokio::spawn(serve(listener, page(), tx));

    // Parameters in the fragment: the secret never reaches the HTTP server.
    let page_url = format!(
        "{origin}/turn-test.html#secret=s3cret&label=browser-test&ttl=600&timeout={PER_URL_SECONDS}\
         &pings={PINGS}&autorun=1&report={}&urls={}",
        encode(&format!("{origin}/report")),
        encode(&urls.join("\n")),
    );
    let mut browser = Browser::launch(&binary, dir.path(), &spki, &page_url);

    let deadline = tokio::time::Instant::now() + OVERALL.saturating_sub(started.elapsed());
    let report = loop {
        tokio::select! {
            r = reports.recv() => break r.expect("report channel closed"),
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(status) = browser.exited() {
                    panic!("chromium exited early ({status}) without reporting");
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no report from the page within {OVERALL:?}"
                );
            }
        }
    };
    drop(browser);
    server.abort();

    let v: serde_json::Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("report is not JSON ({e}): {report}"));
    if std::env::var("TURND_BROWSER_LOG").is_ok_and(|v| v == "1") {
        eprintln!("report: {}", serde_json::to_string_pretty(&v).unwrap());
    }
    eprintln!("browser: {}", v["userAgent"].as_str().unwrap_or("?"));
    eprintln!("REST username: {}", v["username"].as_str().unwrap_or("?"));
    assert!(v["error"].is_null(), "page error: {}", v["error"]);
    let results = v["results"].as_array().expect("results array");
    assert_eq!(results.len(), urls.len(), "one result per URL: {report}");
    let mut failures = Vec::new();
    for ((url, protocol), r) in cases.iter().zip(results) {
        assert_eq!(r["url"].as_str(), Some(url.as_str()));
        let t = &r["timings"];
        let relays: Vec<String> = r["relay"]["candidates"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| format!("{}:{}", c["address"].as_str().unwrap_or("?"), c["port"]))
                    .collect()
            })
            .unwrap_or_default();
        eprintln!(
            "{url}: relay [{}], a→b {} b→a {} of {PINGS}, gathering {} ms, connect {} ms, rtt {} ms{}",
            relays.join(", "),
            r["data"]["aToB"],
            r["data"]["bToA"],
            t["gatheringMs"],
            t["connectMs"],
            t["rttMs"],
            r["error"].as_str().map(|e| format!(", error: {e}")).unwrap_or_default(),
        );
        let relay_ok = r["relay"]["gathered"] == true
            && !relays.is_empty()
            && relays.iter().all(|a| a.starts_with("127.0.0.1:"));
        let data_ok = r["data"]["ok"] == true
            && r["data"]["aToB"].as_u64() == Some(PINGS as u64)
            && r["data"]["bToA"].as_u64() == Some(PINGS as u64);
        // The data went through this URL's allocation: the selected local candidate is a relay
        // candidate reached over the URL's transport.
        let selected = &r["selected"]["local"];
        let path_ok = selected["type"] == "relay"
            && selected["relayProtocol"] == *protocol
            && selected["url"].as_str() == Some(url.as_str());
        if !relay_ok || !data_ok || !path_ok || r["ok"] != true {
            failures.push(format!(
                "{url}: {}",
                serde_json::to_string_pretty(r).unwrap()
            ));
        }
    }
    running.shutdown();
    assert!(failures.is_empty(), "failed URLs:\n{}", failures.join("\n"));
    assert_eq!(v["ok"], true);
    eprintln!("browser test took {:?}", started.elapsed());
}
