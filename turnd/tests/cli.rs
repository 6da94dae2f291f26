//! Runs the built `turnd` binary: config errors carry file, line and key; the helper
//! commands print what coturn's tools and the TURN REST API expect.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn turnd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_turnd"));
    for var in ["TURND_AUTH_SECRET", "TURND_AUTH_SECRET_FILE", "RUST_LOG"] {
        c.env_remove(var);
    }
    c
}

fn run(args: &[&str]) -> Output {
    turnd().args(args).output().expect("turnd runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/turnd.example.toml")
}

/// Writes `text` to a file and runs `check-config` on it.
fn check(text: &str) -> (Output, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("turnd.toml");
    std::fs::write(&path, text).expect("write config");
    let out = run(&["check-config", path.to_str().expect("utf8 path")]);
    (out, path, dir)
}

/// Asserts a failed run whose message starts with `FILE:LINE:COL: KEY: ` and mentions `detail`.
fn assert_located(out: &Output, path: &Path, line: usize, key: &str, detail: &str) {
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(out));
    let err = stderr(out);
    let prefix = format!("turnd: {}:{line}:", path.display());
    assert!(err.starts_with(&prefix), "expected {prefix:?} in {err:?}");
    assert!(
        err.contains(&format!(": {key}: ")),
        "expected key {key} in {err:?}"
    );
    assert!(err.contains(detail), "expected {detail:?} in {err:?}");
}

const SECRET: &str = "[auth]\nsecrets = [\"s\"]\n";

#[test]
fn unknown_key_reports_line_and_key() {
    let (out, path, _dir) = check(&format!(
        "{SECRET}\n[relay]\nmin_port = 49152\nmax-port = 50175\n"
    ));
    assert_located(&out, &path, 6, "relay.max-port", "unknown key `max-port`");
    assert!(stderr(&out).contains("max_port"), "lists the accepted keys");
}

#[test]
fn inverted_port_range_reports_line_and_key() {
    let (out, path, _dir) = check(&format!(
        "{SECRET}[relay]\nmin_port = 50175\nmax_port = 49152\n"
    ));
    assert_located(
        &out,
        &path,
        5,
        "relay.max_port",
        "inverted relay port range",
    );
}

#[test]
fn bad_cidr_reports_line_and_key() {
    let (out, path, _dir) = check(&format!(
        "{SECRET}[peers]\ndeny = [\n  \"192.168.0.0/16\",\n  \"192.168.0.0/40\",\n]\n"
    ));
    assert_located(
        &out,
        &path,
        6,
        "peers.deny[1]",
        "`192.168.0.0/40` is not a valid CIDR",
    );
}

#[test]
fn missing_secret_file_reports_line_key_and_file() {
    let (out, path, _dir) =
        check("[auth]\nrealm = \"r\"\nsecret_files = [\"/nonexistent/turnd/secret\"]\n");
    assert_located(
        &out,
        &path,
        3,
        "auth.secret_files[0]",
        "/nonexistent/turnd/secret",
    );
}

#[test]
fn missing_secret_file_from_env_names_variable_and_file() {
    let out = turnd()
        .env("TURND_AUTH_SECRET_FILE", "/nonexistent/k8s/secret")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("TURND_AUTH_SECRET_FILE"), "{err}");
    assert!(err.contains("/nonexistent/k8s/secret"), "{err}");
}

#[test]
fn running_with_a_bad_config_fails_with_the_location() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("turnd.toml");
    std::fs::write(&path, format!("{SECRET}[log]\nformat = \"yaml\"\n")).expect("write");
    let out = run(&["--config", path.to_str().expect("utf8")]);
    assert_located(&out, &path, 4, "log.format", "yaml");
}

/// A self-signed certificate and its key, as PEM files in `dir`.
fn tls_files(dir: &Path) -> (PathBuf, PathBuf) {
    let c = rcgen::generate_simple_self_signed(vec!["turn.example.org".to_owned()])
        .expect("certificate");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, c.cert.pem()).expect("write cert");
    std::fs::write(&key, c.key_pair.serialize_pem()).expect("write key");
    (cert, key)
}

#[test]
fn check_config_accepts_the_shipped_example_with_its_tls_files_present() {
    let text = std::fs::read_to_string(example()).expect("example");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = tls_files(dir.path());
    let text = text
        .replace("/etc/turnd/tls/tls.crt", cert.to_str().expect("utf8"))
        .replace("/etc/turnd/tls/tls.key", key.to_str().expect("utf8"));
    let (out, _path, _dir) = check(&text);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(": OK"), "{text}");
    assert!(text.contains("94.130.141.98/10.10.10.11"), "{text}");
    assert!(text.contains("ports 49152-50175"), "{text}");
    assert!(text.contains("io: auto"), "{text}");
    assert!(text.contains("admin: 127.0.0.1:9641"), "{text}");
    assert!(text.contains("drain: timeout 2m"), "{text}");
}

#[test]
fn check_config_opens_the_certificate_files() {
    // As shipped, the example names the pod's certificate paths, absent here.
    let out = run(&["check-config", example().to_str().expect("utf8")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(": tls.cert: "), "{err}");
    assert!(err.contains("/etc/turnd/tls/tls.crt"), "{err}");
    assert!(err.contains(": 1 error\n"), "only the missing file: {err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = tls_files(dir.path());
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let (out, path, _d) = check(&format!(
        "{SECRET}[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    ));
    assert_located(&out, &path, 5, "tls.key", &key.display().to_string());
}

#[test]
fn check_config_reports_every_mistake_at_once() {
    let (out, path, _dir) = check(
        "[listen]\nudp = [\"0.0.0.0:3478\", \"3478\"]\n\
         [auth]\nsecret_files = [\"/nonexistent/turnd/secret\"]\n\
         [relay]\nmin_port = 50175\nmax_port = 49152\n\
         [peers]\ndeny = [\"192.168.0.0/40\"]\n\
         [server]\nstun_only = true\nno_stun = true\n\
         [admin]\nlisten = \"localhost:9641\"\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let file = path.display().to_string();
    let lines: Vec<&str> = err.lines().collect();
    let expected = [
        format!("turnd: {file}:2:"),
        format!("turnd: {file}:4:"),
        format!("turnd: {file}:7:"),
        format!("turnd: {file}:9:"),
        format!("turnd: {file}:12:"),
        format!("turnd: {file}:14:"),
    ];
    assert_eq!(lines.len(), expected.len() + 1, "{err}");
    for (line, prefix) in lines.iter().zip(&expected) {
        assert!(line.starts_with(prefix.as_str()), "{prefix:?} vs {line:?}");
    }
    for key in [
        "listen.udp[1]",
        "auth.secret_files[0]",
        "relay.max_port",
        "peers.deny[0]",
        "server.no_stun",
        "admin.listen",
    ] {
        assert!(err.contains(&format!(": {key}: ")), "{key} in {err}");
    }
    assert!(lines[6].ends_with(": 6 errors"), "{err}");
}

#[test]
fn check_config_refuses_a_config_without_listeners() {
    let (out, path, _dir) = check(&format!("{SECRET}[listen]\nudp = []\ntcp = []\ntls = []\n"));
    assert_located(&out, &path, 3, "listen", "no listener");
}

#[test]
fn check_config_can_leave_the_secret_to_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("turnd.toml");
    std::fs::write(&path, "[auth]\nrealm = \"turn.example.org\"\n").expect("write");
    let file = path.to_str().expect("utf8");
    let out = run(&["check-config", file]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no credentials"), "{}", stderr(&out));
    let out = run(&["check-config", "--allow-missing-secret", file]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("REST-API secrets: 0 (expected from TURND_AUTH_SECRET"),
        "{}",
        stdout(&out)
    );
    // A secret that is there is still checked.
    let out = turnd()
        .args(["check-config", "--allow-missing-secret", file])
        .env("TURND_AUTH_SECRET_FILE", "/nonexistent/k8s/secret")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("TURND_AUTH_SECRET_FILE"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    for args in [
        &[
            "credentials",
            "--user",
            "u",
            "--secret",
            "s",
            "--ttl",
            "whenever",
        ][..],
        &["key", "-u", "alice"][..],
        &["no-such-command"][..],
        &["check-config"][..],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&out).contains("error:"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = run(&["credentials", "--user", "u"]);
    assert_eq!(out.status.code(), Some(2), "no secret anywhere");
    assert!(stderr(&out).contains("--secret"));
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[test]
fn credentials_print_rest_api_json_that_verifies() {
    let before = unix_now();
    let out = run(&[
        "credentials",
        "--secret",
        "north-secret",
        "--user",
        "alice",
        "--ttl",
        "24h",
        "--uri",
        "turn:94.130.141.98:3478?transport=udp",
        "--uri",
        "turns:turn.example.org:443?transport=tcp",
    ]);
    let after = unix_now();
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let username = json["username"].as_str().expect("username");
    let (expiry, user) = username.split_once(':').expect("expiry:user");
    assert_eq!(user, "alice");
    let expiry: u64 = expiry.parse().expect("unix time");
    assert!(
        (before + 86_400..=after + 86_400).contains(&expiry),
        "{expiry}"
    );
    assert_eq!(
        json["password"],
        turn_proto::auth::rest_api_password(b"north-secret", username)
    );
    assert_eq!(json["ttl"], 86_400);
    assert_eq!(json["uris"][1], "turns:turn.example.org:443?transport=tcp");
}

#[test]
fn credentials_read_the_secret_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("secret");
    std::fs::write(&file, "\nfile-secret\n").expect("write");
    let out = run(&[
        "credentials",
        "--secret-file",
        file.to_str().expect("utf8"),
        "--user",
        "u",
        "--ttl",
        "60",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let username = json["username"].as_str().expect("username");
    assert_eq!(
        json["password"],
        turn_proto::auth::rest_api_password(b"file-secret", username)
    );
    assert_eq!(json["uris"], serde_json::json!([]));

    let out = turnd()
        .args(["credentials", "--user", "u"])
        .env("TURND_AUTH_SECRET", "env-secret")
        .output()
        .expect("runs");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let username = json["username"].as_str().expect("username");
    assert_eq!(
        json["password"],
        turn_proto::auth::rest_api_password(b"env-secret", username)
    );
}

fn require_tools() -> bool {
    std::env::var("TURND_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

#[test]
fn key_matches_turnadmin() {
    let cases = [
        ("alice", "example.org", "secret"),
        ("monitoring", "turn.example.org", "watch-the-relay"),
        ("ünïcode", "realm with spaces", "p@ss:word"),
    ];
    for (user, realm, pass) in cases {
        let ours = run(&["key", "-u", user, "-r", realm, "-p", pass]);
        assert!(ours.status.success());
        let ours = stdout(&ours).trim().to_owned();
        assert_eq!(ours.len(), 34);
        assert!(ours.starts_with("0x"));
        let expected = turn_proto::auth::long_term_key_md5(user, realm, pass);
        let hex: String = expected.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(ours, format!("0x{hex}"));

        match Command::new("turnadmin")
            .args(["-k", "-u", user, "-r", realm, "-p", pass])
            .output()
        {
            Ok(theirs) => {
                // turnadmin prints its own log lines too; the key is the line starting with 0x.
                let text = stdout(&theirs);
                let key = text
                    .lines()
                    .find(|l| l.starts_with("0x"))
                    .expect("turnadmin printed a key");
                assert_eq!(
                    ours,
                    key.trim(),
                    "turnd key vs turnadmin -k for {user}/{realm}"
                );
            }
            Err(e) if require_tools() => {
                panic!("TURND_REQUIRE_TOOLS=1 but turnadmin cannot run: {e}")
            }
            Err(e) => {
                eprintln!("skipping the turnadmin comparison: turnadmin not runnable ({e}); install coturn");
                return;
            }
        }
    }
}

const COTURN_CONF: &str = "\
# /etc/turnserver.conf of the production pod
listening-port=3478
tls-listening-port=5349
alt-tls-listening-port=443
listening-ip=10.10.10.11
relay-ip=10.10.10.11
external-ip=94.130.141.98/10.10.10.11
min-port=49152
max-port=50175
realm=turn.example.org
server-name=turn.example.org
fingerprint
lt-cred-mech
use-auth-secret
static-auth-secret=rotating-new
static-auth-secret=rotating-old
user=monitoring:0x04f22f94c90331bece501f446f6110e1
cert=CERT
pkey=KEY
cipher-list=\"ECDHE-RSA-AES256-GCM-SHA512:DHE-RSA-AES256-GCM-SHA512\"
no-tlsv1
no-tlsv1_1
denied-peer-ip=10.0.0.0-10.255.255.255
denied-peer-ip=172.16.0.0-172.31.255.255
denied-peer-ip=192.168.0.0-192.168.255.255
allowed-peer-ip=10.10.10.20
user-quota=12
total-quota=1200
max-allocate-lifetime=3600
stale-nonce=600
no-multicast-peers
no-dtls
no-cli
verbose
log-file=/var/log/turnserver.log
simple-log
prometheus
pidfile=/var/run/turnserver.pid
";

#[test]
fn import_coturn_produces_valid_toml_and_classifies_every_option() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = tls_files(dir.path());
    let conf = dir.path().join("turnserver.conf");
    std::fs::write(
        &conf,
        COTURN_CONF
            .replace("cert=CERT", &format!("cert={}", cert.display()))
            .replace("pkey=KEY", &format!("pkey={}", key.display())),
    )
    .expect("write");
    let out = run(&["import-coturn", conf.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let conf_name = conf.display().to_string();
    for (line, option, kind) in [
        (2, "listening-port", "carried"),
        (11, "server-name", "ignored"),
        (17, "user", "ignored"),
        (20, "cipher-list", "ignored"),
        (35, "log-file", "ignored"),
        (36, "simple-log", "ignored"),
        (37, "prometheus", "changed"),
        (38, "pidfile", "ignored"),
    ] {
        let expected = format!("{conf_name}: line {line}: {option}: {kind}: ");
        assert!(err.contains(&expected), "expected {expected:?} in\n{err}");
    }
    let option_lines = (2..=38).count();
    let noted = err.lines().filter(|l| l.contains(": line ")).count();
    assert_eq!(noted, option_lines, "one note per option: {err}");
    assert!(err.contains("(channel numbers): changed"), "{err}");
    assert!(err.contains("(TCP relay): changed"), "{err}");
    assert!(err.contains("the result validates"), "{err}");

    // The TOML on stdout is what check-config accepts, certificate files included.
    let toml = dir.path().join("turnd.toml");
    std::fs::write(&toml, &out.stdout).expect("write");
    let checked = run(&["check-config", toml.to_str().expect("utf8")]);
    assert!(
        checked.status.success(),
        "{}\n{}",
        stderr(&checked),
        stdout(&out)
    );
    let summary = stdout(&checked);
    assert!(
        summary.contains("udp listeners: [10.10.10.11:3478]"),
        "{summary}"
    );
    assert!(
        summary.contains("static users: 0, REST-API secrets: 2"),
        "coturn ignores user= under use-auth-secret: {summary}"
    );
    assert!(summary.contains("94.130.141.98/10.10.10.11"), "{summary}");
    let text = stdout(&out);
    assert!(
        text.contains("\"10.0.0.0/8\""),
        "ranges become CIDRs: {text}"
    );
    assert!(text.contains("\"172.16.0.0/12\""), "{text}");
    assert!(text.contains("rfc5766_channel_numbers = true"), "{text}");
    assert!(!text.contains("monitoring"), "{text}");

    // --output writes the same text to a file.
    let written = dir.path().join("out.toml");
    let out2 = run(&[
        "import-coturn",
        conf.to_str().expect("utf8"),
        "-o",
        written.to_str().expect("utf8"),
    ]);
    assert!(out2.status.success());
    assert_eq!(std::fs::read(&written).expect("written"), out.stdout);
}

#[test]
fn import_coturn_refuses_what_turnd_cannot_honour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("turnserver.conf");
    std::fs::write(
        &conf,
        "use-auth-secret\nstatic-auth-secret=s\npkey=/k.pem\ncert=/c.pem\npkey-pwd=hunter2\n",
    )
    .expect("write");
    let written = dir.path().join("out.toml");
    let out = run(&[
        "import-coturn",
        conf.to_str().expect("utf8"),
        "-o",
        written.to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("line 5: pkey-pwd: unsupported: "), "{err}");
    assert!(err.contains("cannot honour pkey-pwd"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    assert!(!written.exists(), "nothing written");
    assert!(stdout(&out).is_empty());
}

#[test]
fn import_coturn_converts_coturns_own_example() {
    let example = Path::new("/usr/share/doc/coturn/examples/etc/turnserver.conf");
    if !example.exists() {
        assert!(
            !require_tools(),
            "TURND_REQUIRE_TOOLS=1 but {} is absent",
            example.display()
        );
        eprintln!(
            "skipped: {} absent (apt-get install coturn)",
            example.display()
        );
        return;
    }
    let out = turnd()
        .args(["import-coturn", example.to_str().expect("utf8")])
        .env("TURND_AUTH_SECRET", "from-the-environment")
        .output()
        .expect("runs");
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(": syslog: ignored: "), "{err}");
    assert!(err.contains("the result validates"), "{err}");
}

#[test]
fn import_coturn_reports_a_result_that_needs_a_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("turnserver.conf");
    std::fs::write(&conf, "use-auth-secret\nrealm=r\n").expect("write");
    let out = run(&["import-coturn", conf.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1), "no secret: does not validate");
    let err = stderr(&out);
    assert!(err.contains("use-auth-secret: changed"), "{err}");
    assert!(err.contains("does not validate"), "{err}");
    let out = turnd()
        .args(["import-coturn", conf.to_str().expect("utf8")])
        .env("TURND_AUTH_SECRET", "from-k8s")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "validates with the secret in the environment: {}",
        stderr(&out)
    );
}

#[test]
fn no_config_prints_a_generated_secret_and_a_working_credential_once() {
    let mut child = turnd()
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let done = line.starts_with("more with:");
            lines.push(line);
            if done {
                break;
            }
        }
        let _ = tx.send(lines);
    });
    let lines = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("banner within 20 s");
    let _ = child.kill();
    let _ = child.wait();
    let field = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {name} in {lines:?}"))
    };
    let secret = field("secret:");
    assert_eq!(secret.len(), 48, "{secret}");
    let username = field("username:");
    assert!(username.ends_with(":example"), "{username}");
    assert_eq!(
        field("password:"),
        turn_proto::auth::rest_api_password(secret.as_bytes(), &username)
    );
    assert!(field("uri:").starts_with("turn:"), "{lines:?}");
}

#[test]
fn no_config_with_env_secret_prints_no_banner() {
    let out = turnd()
        .env("TURND_AUTH_SECRET", "from-k8s")
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output_with_timeout();
    assert!(!out.contains("secret:"), "{out}");
}

trait OutputWithTimeout {
    fn output_with_timeout(&mut self) -> String;
}

impl OutputWithTimeout for Command {
    /// Runs up to 3 s (the server would run forever once the driver exists) and
    /// returns what it printed on stdout.
    fn output_with_timeout(&mut self) -> String {
        let mut child = self
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child
            .wait_with_output()
            .map(|o| stdout(&o))
            .expect("output")
    }
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("turnd.toml");
    std::fs::write(
        &path,
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\n[auth]\nsecrets = [\"s\"]\n\
         [log]\nformat = \"json\"\nlevel = \"info\"\n",
    )
    .expect("write");
    let out = turnd()
        .args(["--config", path.to_str().expect("utf8")])
        .output_with_timeout();
    let first = out.lines().next().expect("a log line");
    let line: serde_json::Value = serde_json::from_str(first).expect("JSON log line");
    assert_eq!(line["level"], "INFO", "{first}");
    assert!(
        line["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("starting turnd")),
        "{first}"
    );
}

#[test]
fn rust_log_overrides_the_configured_level() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("turnd.toml");
    std::fs::write(
        &path,
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\n[auth]\nsecrets = [\"s\"]\n[log]\nlevel = \"info\"\n",
    )
    .expect("write");
    let out = turnd()
        .args(["--config", path.to_str().expect("utf8")])
        .env("RUST_LOG", "error")
        .output_with_timeout();
    assert!(!out.contains("starting turnd"), "{out}");
}
