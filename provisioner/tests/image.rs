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

use std::time::{Duration, Instant};

use common::image::{prebuilt_context, static_turnd, workspace, Netns, Podman};
use common::run::{text, try_run};

/// podman inside the test's namespace; its containers and images go before the namespace.
struct Sandbox {
    podman: Podman,
    ns: Netns,
}

impl Sandbox {
    fn podman(&self, args: &[&str], timeout: Duration) -> std::process::Output {
        self.podman.podman(&self.ns, args, timeout)
    }

    fn podman_ok(&self, args: &[&str], timeout: Duration) -> String {
        self.podman.podman_ok(&self.ns, args, timeout)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.podman.clean(&self.ns);
    }
}

#[test]
#[ignore = "builds a static binary (minutes); CI runs it with --ignored"]
fn image_builds_from_the_dockerfile_and_answers_a_stun_binding() {
    let started = Instant::now();
    for (tool, package) in [
        ("podman", "podman"),
        ("runc", "runc"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("turnutils_stunclient", "coturn"),
    ] {
        if !common::have_tool(tool, package) {
            return;
        }
    }
    let binary = static_turnd();
    let context = prebuilt_context(&binary);
    let ns = Netns::new("thi");
    let mut sandbox = Sandbox {
        podman: Podman::new(),
        ns,
    };

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
    sandbox.podman.containers.push(name.clone());
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
            std::process::Command::new("ip")
                .args(["netns", "exec", &sandbox.ns.name])
                .arg("turnutils_stunclient")
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
