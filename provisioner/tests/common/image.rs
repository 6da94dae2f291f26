//! Container-image test support: a static `turnd`, a build context for the Dockerfile's
//! `runtime-prebuilt` stage, a network namespace, podman with private storage inside it, and a
//! standalone containerd inside it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::run::{run, text};

/// The static binary's target triple.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The static binary: `TURND_STATIC_BINARY`, or built with cargo into
/// `<this target dir>/image-static` (a separate target dir, so the outer cargo's lock is not
/// needed). Checked to have no program interpreter.
pub fn static_turnd() -> PathBuf {
    let path = if let Some(p) = std::env::var_os("TURND_STATIC_BINARY") {
        PathBuf::from(p)
    } else {
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
                // The image tests need a static binary, not a fast one: the dev profile builds
                // in a fraction of the time, and the Dockerfile's prebuilt stage copies
                // whatever is there.
                .args(["build", "-p", "turnd", "--target", TARGET]),
            Duration::from_secs(3600),
        );
        assert!(o.status.success(), "static build failed:\n{}", text(&o));
        eprintln!("static turnd built (or up to date) in {:?}", t.elapsed());
        target_dir.join(TARGET).join("debug").join("turnd")
    };
    let bytes = std::fs::read(&path).expect("read the static binary");
    assert!(
        is_static_elf(&bytes),
        "{} has a program interpreter: not static",
        path.display()
    );
    path
}

/// Whether an ELF executable has no program interpreter (`PT_INTERP`), i.e. is static.
pub fn is_static_elf(bytes: &[u8]) -> bool {
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

/// A throw-away build context for the `runtime-prebuilt` stage: the project's
/// `.dockerignore` and `binary` where the stage expects it.
pub fn prebuilt_context(binary: &Path) -> tempfile::TempDir {
    let context = tempfile::tempdir().expect("tempdir");
    let rel = Path::new("target").join(TARGET).join("release");
    std::fs::create_dir_all(context.path().join(&rel)).expect("mkdir");
    std::fs::copy(binary, context.path().join(rel.join("turnd"))).expect("copy binary");
    std::fs::copy(
        workspace().join(".dockerignore"),
        context.path().join(".dockerignore"),
    )
    .expect("copy .dockerignore");
    context
}

/// A network namespace of the test (loopback up), deleted on drop.
pub struct Netns {
    /// Its name (`/run/netns/<name>`).
    pub name: String,
}

impl Netns {
    /// Creates `<prefix><pid>`.
    pub fn new(prefix: &str) -> Self {
        let name = format!("{prefix}{}", std::process::id());
        let o = run(
            Command::new("ip").args(["netns", "add", &name]),
            Duration::from_secs(10),
        );
        assert!(o.status.success(), "ip netns add: {}", text(&o));
        let ns = Self { name };
        let o = run(
            Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]),
            Duration::from_secs(10),
        );
        assert!(o.status.success(), "lo up: {}", text(&o));
        ns
    }

    /// A command that runs `program` inside the namespace. `nsenter`, not `ip netns exec`:
    /// the latter remounts /sys, hiding the cgroup mount runc needs.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// podman with storage of its own (`vfs` under a temp dir) and settings that work here
/// (runc, cgroupfs, file events), given to podman — and to anything that runs podman, like
/// `provisioner image build` — through `CONTAINERS_STORAGE_CONF` and `CONTAINERS_CONF`.
/// Containers in `containers` and every image are removed on drop.
pub struct Podman {
    dir: tempfile::TempDir,
    /// Containers to remove on drop.
    pub containers: Vec<String>,
}

impl Podman {
    /// Private storage and settings.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("tmp")).expect("tmp");
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                d.join("run").display(),
                d.join("root").display()
            ),
        )
        .expect("storage.conf");
        std::fs::write(
            d.join("containers.conf"),
            "[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .expect("containers.conf");
        Self {
            dir,
            containers: Vec::new(),
        }
    }

    /// Points `cmd` (podman or a program that runs it) at this storage and these settings.
    pub fn env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        let d = self.dir.path();
        cmd.env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("TMPDIR", d.join("tmp"))
    }

    /// Runs podman inside `ns`.
    pub fn podman(&self, ns: &Netns, args: &[&str], timeout: Duration) -> Output {
        run(self.env(ns.command("podman").args(args)), timeout)
    }

    /// Runs podman inside `ns`; panics when it fails. Its stdout.
    pub fn podman_ok(&self, ns: &Netns, args: &[&str], timeout: Duration) -> String {
        let o = self.podman(ns, args, timeout);
        assert!(o.status.success(), "podman {args:?}:\n{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Removes the containers and every image (call before the namespace goes).
    pub fn clean(&mut self, ns: &Netns) {
        for c in std::mem::take(&mut self.containers) {
            let _ = self.podman(ns, &["rm", "-f", "-t", "0", &c], Duration::from_secs(60));
        }
        let _ = self.podman(ns, &["rmi", "-a", "-f"], Duration::from_secs(60));
    }
}

/// A standalone containerd (Debian's `containerd`) inside a network namespace, with its own
/// config, root, state and socket under a temp dir; killed on drop.
pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Starts it inside `ns` and waits (bounded) until `ctr version` answers.
    pub fn start(ns: &Netns) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(
            d.join("config.toml"),
            format!(
                "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\n[grpc]\n  address = \"{r}/c.sock\"\n[ttrpc]\n  address = \"{r}/c.sock.ttrpc\"\n[debug]\n  address = \"{r}/debug.sock\"\n",
                r = d.display()
            ),
        )
        .expect("config");
        let child = ns
            .command("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("containerd.log")).expect("log"))
            .spawn()
            .expect("containerd starts");
        let c = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = run(&mut c.ctr(&["version"]), Duration::from_secs(10));
            if o.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer: {}\n{}",
                text(&o),
                c.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    /// Its socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// `ctr --address SOCK ARGS…`.
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.socket()).args(args);
        c
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
