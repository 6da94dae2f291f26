//! The container image: built by podman from the project's own `Dockerfile` (stage
//! `runtime-prebuilt`, since no registry is reachable for the `rust` builder image), run with
//! host networking inside a network namespace of this test, and asked for a STUN binding.
//!
//! Steps: a static `turnd` (`crt-static`, built here with its own `CARGO_TARGET_DIR` unless
//! `TURND_STATIC_BINARY` names one) is placed in a throw-away build context with the
//! project's `.dockerignore`; podman (its own storage under a temp dir, `vfs` driver) builds
//! the image; the image's metadata (non-root numeric user, exposed ports, entrypoint, OCI
//! labels, no healthcheck) is checked; the container runs under `ip netns exec` (podman adds
//! firewall chains to whatever namespace it runs in) and `turnutils_stunclient` in the same
//! namespace gets its own address back as XOR-MAPPED-ADDRESS.
//!
//! Ignored by default: building the static binary from nothing takes minutes here.
//! CI runs it with `cargo test -p provisioner --test image -- --ignored`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::run::{run, text, try_run};

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn required() -> bool {
    std::env::var("TURND_REQUIRE_TOOLS").as_deref() == Ok("1")
}

fn skip(why: &str) {
    assert!(!required(), "{why} (TURND_REQUIRE_TOOLS=1)");
    eprintln!("SKIPPED: {why}");
}

fn find(tool: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The static binary: `TURND_STATIC_BINARY`, or built with cargo into
/// `<this target dir>/image-static` (a separate target dir, so the outer cargo's lock is not
/// needed).
fn static_turnd() -> PathBuf {
    if let Some(p) = std::env::var_os("TURND_STATIC_BINARY") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<exe>")
        .join("image-static");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let t = Instant::now();
    let o = run(
        Command::new(cargo)
            .current_dir(workspace())
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            // The image test needs a static binary, not a fast one: the dev profile builds in a
            // fraction of the time, and the Dockerfile's prebuilt stage copies whatever is there.
            .args(["build", "-p", "turnd", "--target", TARGET]),
        Duration::from_secs(3600),
    );
    assert!(o.status.success(), "static build failed:\n{}", text(&o));
    eprintln!("static turnd built (or up to date) in {:?}", t.elapsed());
    target_dir.join(TARGET).join("debug").join("turnd")
}

/// Whether an ELF executable has no program interpreter (`PT_INTERP`), i.e. is static.
fn is_static_elf(bytes: &[u8]) -> bool {
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(bytes[4], 2, "not a 64-bit ELF file");
    let phoff = usize::try_from(u64_at(0x20)).expect("offset");
    let phentsize = usize::from(u16_at(0x36));
    let phnum = usize::from(u16_at(0x38));
    (0..phnum).all(|i| u32_at(phoff + i * phentsize) != 3)
}

/// A network namespace and podman storage, removed on drop (containers and image first).
struct Sandbox {
    ns: String,
    storage: tempfile::TempDir,
    containers: Vec<String>,
}

impl Sandbox {
    fn podman(&self, args: &[&str], timeout: Duration) -> Output {
        let root = self.storage.path().join("root");
        let runroot = self.storage.path().join("run");
        let tmp = self.storage.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("tmp");
        run(
            // nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup
            // mount runc needs.
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.ns))
                .arg("podman")
                .arg("--root")
                .arg(root)
                .arg("--runroot")
                .arg(runroot)
                .args([
                    "--storage-driver",
                    "vfs",
                    "--runtime",
                    "runc",
                    "--cgroup-manager",
                    "cgroupfs",
                    "--events-backend",
                    "file",
                ])
                .args(args)
                .env("TMPDIR", tmp),
            timeout,
        )
    }

    fn podman_ok(&self, args: &[&str], timeout: Duration) -> String {
        let o = self.podman(args, timeout);
        assert!(o.status.success(), "podman {args:?}:\n{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.podman(&["rm", "-f", "-t", "0", c], Duration::from_secs(60));
        }
        let _ = self.podman(&["rmi", "-a", "-f"], Duration::from_secs(60));
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
#[ignore = "builds a static binary (minutes); CI runs it with --ignored"]
fn image_builds_from_the_dockerfile_and_answers_a_stun_binding() {
    let started = Instant::now();
    for tool in ["podman", "runc", "ip", "nsenter", "turnutils_stunclient"] {
        if find(tool).is_none() {
            skip(&format!(
                "`{tool}` not found (apt-get install podman runc iproute2 coturn)"
            ));
            return;
        }
    }
    let binary = static_turnd();
    let bytes = std::fs::read(&binary).expect("read the static binary");
    assert!(
        is_static_elf(&bytes),
        "{} has a program interpreter: not static",
        binary.display()
    );

    // Build context: the project's .dockerignore and the binary where the stage expects it.
    let context = tempfile::tempdir().expect("tempdir");
    let rel = Path::new("target").join(TARGET).join("release");
    std::fs::create_dir_all(context.path().join(&rel)).expect("mkdir");
    std::fs::copy(&binary, context.path().join(rel.join("turnd"))).expect("copy binary");
    std::fs::copy(
        workspace().join(".dockerignore"),
        context.path().join(".dockerignore"),
    )
    .expect("copy .dockerignore");

    let ns = format!("thi{}", std::process::id());
    let o = run(
        Command::new("ip").args(["netns", "add", &ns]),
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "ip netns add: {}", text(&o));
    let mut sandbox = Sandbox {
        ns: ns.clone(),
        storage: tempfile::tempdir().expect("tempdir"),
        containers: Vec::new(),
    };
    let o = run(
        Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]),
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "lo up: {}", text(&o));

    let tag = format!("localhost/turnd-test:{}", std::process::id());
    let dockerfile = workspace().join("Dockerfile");
    let t = Instant::now();
    sandbox.podman_ok(
        &[
            "build",
            "--target",
            "runtime-prebuilt",
            "--network",
            "none",
            "-f",
            dockerfile.to_str().expect("utf-8"),
            "-t",
            &tag,
            context.path().to_str().expect("utf-8"),
        ],
        Duration::from_secs(300),
    );
    eprintln!("image built in {:?}", t.elapsed());

    // The image's metadata.
    let inspect = sandbox.podman_ok(
        &["image", "inspect", "--format", "json", &tag],
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_str(&inspect).expect("inspect is JSON");
    let cfg = &v[0]["Config"];
    assert_eq!(cfg["User"], "65532:65532", "{cfg:#}");
    assert_eq!(cfg["Entrypoint"], serde_json::json!(["/turnd"]), "{cfg:#}");
    for port in ["3478/udp", "3478/tcp", "5349/tcp", "443/tcp"] {
        assert!(
            cfg["ExposedPorts"].get(port).is_some(),
            "{port} not exposed: {cfg:#}"
        );
    }
    assert!(
        cfg.get("Healthcheck")
            .is_none_or(serde_json::Value::is_null),
        "{cfg:#}"
    );
    assert_eq!(
        cfg["Labels"]["org.opencontainers.image.title"], "turnd",
        "{cfg:#}"
    );
    assert!(
        cfg["Labels"]
            .get("org.opencontainers.image.source")
            .is_some(),
        "{cfg:#}"
    );

    // Run it with host networking inside our namespace; the config comes in as a mount.
    let config = tempfile::NamedTempFile::new().expect("config");
    std::fs::write(
        config.path(),
        "[listen]\nudp = [\"127.0.0.1:3478\"]\ntcp = []\ntls = []\n\
         [auth]\nsecrets = [\"image-test-secret\"]\n",
    )
    .expect("write config");
    // Readable by the image's non-root user, like a ConfigMap volume (mode 0644).
    std::fs::set_permissions(
        config.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod config");
    let name = format!("turnd-image-test-{}", std::process::id());
    sandbox.containers.push(name.clone());
    let mount = format!(
        "{}:/etc/turnd/turnd.toml:ro",
        config.path().to_str().expect("utf-8")
    );
    sandbox.podman_ok(
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "-v",
            &mount,
            &tag,
        ],
        Duration::from_secs(120),
    );

    // A STUN binding from the same namespace: XOR-MAPPED-ADDRESS is our own address.
    let stunclient = find("turnutils_stunclient").expect("checked");
    // turnd logs `listening` once its sockets are bound.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = text(&sandbox.podman(&["logs", &name], Duration::from_secs(20)));
        if logs.contains("listening") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the container did not start listening:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        // stunclient retransmits for a long time when nothing answers: bound each try.
        let out = try_run(
            Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(&stunclient)
                .args(["-L", "127.0.0.1", "127.0.0.1"]),
            Duration::from_secs(5),
        )
        .filter(|o| o.status.success())
        .map(|o| text(&o))
        .unwrap_or_default();
        if out.contains("UDP reflexive addr: ") {
            break out;
        }
        if Instant::now() >= deadline {
            let logs = sandbox.podman(&["logs", &name], Duration::from_secs(20));
            panic!(
                "no STUN answer from the container:\n{out}\ncontainer log:\n{}",
                text(&logs)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let key = "UDP reflexive addr: ";
    let line = answer
        .lines()
        .find(|l| l.contains(key))
        .expect("checked above");
    let mapped: std::net::SocketAddr = line[line.find(key).expect("found") + key.len()..]
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("bad reflexive address in `{line}`: {e}"));
    assert_eq!(mapped.ip().to_string(), "127.0.0.1", "{answer}");
    assert_ne!(mapped.port(), 0, "{answer}");
    assert_ne!(mapped.port(), 3478, "{answer}");

    // The process in the container is not root.
    let top = sandbox.podman_ok(&["top", &name, "user", "comm"], Duration::from_secs(30));
    assert!(
        top.lines()
            .any(|l| l.contains("turnd") && !l.contains("root")),
        "turnd runs as root?\n{top}"
    );
    drop(sandbox);
    eprintln!("image test in {:?}", started.elapsed());
}
