//! A simulated Ubuntu 22.04 machine behind the [`Transport`] trait, for tests that run the
//! phases from a fresh host to a converged cluster. It starts with nothing installed: a
//! program that no installed package provides answers like a remote shell does (status 127,
//! `command not found`), so a plan that runs a tool before installing it fails here as it would
//! on a real host. What it keeps: files, Debian packages (`apt-get install` needs an
//! `apt-get update` first), held packages, systemd unit states and qcow2 images. What it hands
//! to real components: `virsh` to libvirt's in-process test driver (one `virsh` session shared
//! by the host), and the `turnd-hostnet.service` rules to real `iptables-restore` inside a
//! network namespace the test creates. Kubernetes (kubeadm, kubectl, Helm) cannot run here and
//! is simulated in [`Kube`], shared by the VMs: that is the mocked part.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};

use provisioner::exec::{Cmd, ExecError, Output, Transport, VirshShellTransport};
use provisioner::phases::facts::sha256;

/// Programs every Ubuntu cloud image and server install has.
pub const BASE_TOOLS: [&str; 24] = [
    "sh",
    "true",
    "test",
    "cat",
    "sha256sum",
    "mkdir",
    "rm",
    "mv",
    "chmod",
    "install",
    "env",
    "apt-get",
    "apt-mark",
    "dpkg-query",
    "systemctl",
    "swapon",
    "swapoff",
    "sed",
    "modprobe",
    "sysctl",
    "tar",
    "timeout",
    "iptables-save",
    "cloud-init",
];

/// Package → the programs it puts on PATH.
pub fn provides(package: &str) -> &'static [&'static str] {
    match package {
        "libvirt-clients" => &["virsh"],
        "qemu-utils" => &["qemu-img"],
        "cloud-image-utils" => &["cloud-localds"],
        "curl" => &["curl"],
        "gpg" => &["gpg"],
        "containerd" => &["containerd", "ctr"],
        "kubeadm" => &["kubeadm"],
        "kubectl" => &["kubectl"],
        "kubelet" => &["kubelet"],
        _ => &[],
    }
}

/// The simulated Kubernetes cluster the VMs share (no kubeadm or API server can run here).
#[derive(Debug, Default)]
pub struct Kube {
    /// Node name → labels, in join order; the master after `kubeadm init`.
    pub nodes: BTreeMap<String, BTreeMap<String, String>>,
    /// Helm releases: name → chart (`cilium-1.15.6`).
    pub releases: BTreeMap<String, String>,
    /// Times `kubeadm init` ran.
    pub inits: usize,
}

/// Everything the machine keeps.
#[derive(Debug, Default)]
pub struct State {
    /// Path → contents.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Installed package → version.
    pub packages: BTreeMap<String, String>,
    /// Held packages.
    pub held: BTreeSet<String>,
    /// Whether `apt-get update` has run.
    pub lists: bool,
    /// Unit → (enabled, active).
    pub units: BTreeMap<String, (bool, bool)>,
    /// qcow2 image path → `qemu-img info --output=json`.
    pub images: BTreeMap<String, serde_json::Value>,
}

/// One simulated machine.
pub struct Machine {
    name: String,
    /// What it keeps (tests may look).
    pub state: Mutex<State>,
    /// Every command line and upload, in order (`write PATH` for uploads).
    pub log: Mutex<Vec<String>>,
    /// Downloads: URL → bytes (others download as a short placeholder).
    pub downloads: BTreeMap<String, Vec<u8>>,
    /// Program → what `PROGRAM version` reports once installed (`helm` → `v3.14.4`).
    pub versions: BTreeMap<String, String>,
    virsh: Option<VirshShellTransport>,
    scratch: tempfile::TempDir,
    netns: Option<String>,
    kube: Arc<Mutex<Kube>>,
    master_ip: String,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("name", &self.name).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ok(stdout: impl Into<String>) -> Output {
    Output::ok(stdout)
}

fn fail(status: i32, stderr: impl Into<String>) -> Output {
    Output::failed(status, stderr)
}

impl Machine {
    /// A fresh machine named `name` sharing `kube`. With `virsh`, the host: its libvirt is the
    /// test driver. With `netns`, `iptables-save` and the hostnet unit run in that namespace.
    pub fn new(
        name: &str,
        kube: Arc<Mutex<Kube>>,
        virsh: Option<VirshShellTransport>,
        netns: Option<String>,
        master_ip: &str,
    ) -> Self {
        Self {
            name: name.to_owned(),
            state: Mutex::new(State::default()),
            log: Mutex::new(Vec::new()),
            downloads: BTreeMap::new(),
            versions: BTreeMap::new(),
            virsh,
            scratch: tempfile::tempdir().expect("scratch dir"),
            netns,
            kube,
            master_ip: master_ip.to_owned(),
        }
    }

    /// The log so far.
    pub fn log(&self) -> Vec<String> {
        lock(&self.log).clone()
    }

    /// Forgets the log.
    pub fn clear_log(&self) {
        lock(&self.log).clear();
    }

    fn has_tool(&self, st: &State, tool: &str) -> bool {
        BASE_TOOLS.contains(&tool)
            || st.packages.keys().any(|p| provides(p).contains(&tool))
            || st.files.contains_key(&format!("/usr/local/bin/{tool}"))
    }

    fn not_found(&self, tool: &str) -> Output {
        fail(127, format!("bash: line 1: {tool}: command not found\n"))
    }

    fn netns_run(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let Some(ns) = &self.netns else {
            return ok("");
        };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(args);
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().expect("ip netns exec");
        {
            use std::io::Write as _;
            let mut pipe = child.stdin.take().expect("stdin");
            if let Some(data) = stdin {
                pipe.write_all(data).expect("write stdin");
            }
        }
        let out = child.wait_with_output().expect("wait");
        Output {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs the hostnet unit's ExecStart/ExecReload for real: the rules file with
    /// `iptables-restore --noflush`, then the jump script, in the namespace.
    fn hostnet_start(&self, st: &State) -> Output {
        let rules = st
            .files
            .get("/etc/turnd-hostnet/rules.v4")
            .cloned()
            .unwrap_or_default();
        let jumps = st
            .files
            .get("/etc/turnd-hostnet/jumps.sh")
            .cloned()
            .unwrap_or_default();
        let r = self.netns_run(&["iptables-restore", "--wait", "--noflush"], Some(&rules));
        if !r.success() {
            return r;
        }
        self.netns_run(&["sh", "-s", "apply"], Some(&jumps))
    }

    fn apt(&self, st: &mut State, args: &[String]) -> Output {
        let mut words = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "-o" {
                let opt = it.next().cloned().unwrap_or_default();
                assert!(
                    opt.starts_with("DPkg::Lock::Timeout="),
                    "unexpected apt option {opt}"
                );
            } else if !a.starts_with('-') {
                words.push(a.clone());
            }
        }
        match words.first().map(String::as_str) {
            Some("update") => {
                st.lists = true;
                ok("Reading package lists... Done\n")
            }
            Some("install") => {
                if !st.lists {
                    return fail(
                        100,
                        format!("E: Unable to locate package {}\n", words[1..].join(" ")),
                    );
                }
                for w in &words[1..] {
                    let (name, version) = w.split_once('=').unwrap_or((w, "1.0-sim"));
                    if st.held.contains(name)
                        && !args.iter().any(|a| a == "--allow-change-held-packages")
                    {
                        return fail(100, format!("E: Held packages were changed: {name}\n"));
                    }
                    st.packages.insert(name.to_owned(), version.to_owned());
                }
                ok("")
            }
            other => fail(100, format!("E: sim: apt-get {other:?}\n")),
        }
    }

    fn kube_command(&self, st: &mut State, program: &str, args: &[String]) -> Output {
        let mut kube = lock(&self.kube);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        match (program, a.as_slice()) {
            ("kubeadm", ["init", "--config", _]) => {
                kube.inits += 1;
                kube.nodes.insert(self.name.clone(), BTreeMap::new());
                st.files.insert(
                    "/etc/kubernetes/admin.conf".into(),
                    b"apiVersion: v1\nkind: Config\nusers:\n- name: kubernetes-admin\n  user:\n    client-key-data: SIMULATEDKEY\n".to_vec(),
                );
                ok("Your Kubernetes control-plane has initialized successfully!\n")
            }
            ("kubeadm", ["token", "create", ..]) => ok(format!(
                "kubeadm join {}:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:{}\n",
                self.master_ip,
                "0".repeat(64)
            )),
            ("kubeadm", ["join", "--config", _]) => {
                kube.nodes.insert(self.name.clone(), BTreeMap::new());
                st.files
                    .insert("/etc/kubernetes/kubelet.conf".into(), b"sim".to_vec());
                ok("")
            }
            ("kubectl", ["--kubeconfig", _, "get", "nodes", "--output", "json"]) => {
                let items: Vec<serde_json::Value> = kube
                    .nodes
                    .iter()
                    .map(|(n, labels)| {
                        serde_json::json!({
                            "metadata": {"name": n, "labels": labels},
                            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
                        })
                    })
                    .collect();
                ok(serde_json::json!({ "items": items }).to_string())
            }
            ("kubectl", ["--kubeconfig", _, "label", "node", node, "--overwrite", kvs @ ..]) => {
                let Some(labels) = kube.nodes.get_mut(*node) else {
                    return fail(1, format!("Error from server (NotFound): nodes \"{node}\" not found\n"));
                };
                for kv in kvs {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    labels.insert(k.to_owned(), v.to_owned());
                }
                ok("")
            }
            ("kubectl", ["--kubeconfig", _, "get", "--raw", "/readyz"]) => {
                if kube.inits > 0 {
                    ok("ok")
                } else {
                    fail(1, "The connection to the server was refused\n")
                }
            }
            ("kubectl", ["version", "--client", "--output=json"]) => ok(serde_json::json!({
                "clientVersion": {"gitVersion": self.versions.get("kubectl").cloned().unwrap_or_default()}
            })
            .to_string()),
            ("helm", ["version", ..]) => ok(self.versions.get("helm").cloned().unwrap_or_default()),
            ("helm", ["repo", "add", ..]) => ok(""),
            ("helm", ["upgrade", "--install", name, chart, "--version", v, ..]) => {
                // `helm list` names the chart without its repository.
                let chart = chart.rsplit('/').next().unwrap_or(chart);
                kube.releases
                    .insert((*name).to_owned(), format!("{chart}-{v}"));
                ok("")
            }
            ("helm", ["list", ..]) => ok(serde_json::Value::Array(
                kube.releases
                    .iter()
                    .map(|(n, c)| serde_json::json!({"name": n, "chart": c, "status": "deployed"}))
                    .collect(),
            )
            .to_string()),
            _ => fail(127, format!("sim: unknown {program} command {a:?}\n")),
        }
    }

    fn dispatch(&self, cmd: &Cmd) -> Output {
        let mut st = lock(&self.state);
        let mut program = cmd.program.clone();
        let mut args = cmd.args.clone();
        if program == "env" {
            let skip = args.iter().take_while(|a| a.contains('=')).count();
            args.drain(..skip);
            if args.is_empty() {
                return ok("");
            }
            program = args.remove(0);
        }
        if !self.has_tool(&st, &program) {
            return self.not_found(&program);
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        match (program.as_str(), a.as_slice()) {
            ("true", _) => ok(""),
            ("apt-get", _) => self.apt(&mut st, &args),
            ("dpkg-query", ["-W", "-f", _, names @ ..]) => {
                let mut out = String::new();
                let mut missing = false;
                for n in names {
                    match st.packages.get(*n) {
                        Some(v) => out.push_str(&format!("{n}\t{v}\tii \n")),
                        None => missing = true,
                    }
                }
                Output {
                    status: i32::from(missing),
                    stdout: out,
                    stderr: String::new(),
                }
            }
            ("apt-mark", ["showhold"]) => {
                ok(st.held.iter().map(|h| format!("{h}\n")).collect::<String>())
            }
            ("apt-mark", ["hold", names @ ..]) => {
                st.held.extend(names.iter().map(|n| (*n).to_owned()));
                ok("")
            }
            ("sha256sum", ["--check", "--strict", "-"]) => {
                let line =
                    String::from_utf8_lossy(cmd.stdin.as_deref().unwrap_or_default()).into_owned();
                let (hash, path) = line.trim().split_once("  ").unwrap_or_default();
                match st.files.get(path) {
                    Some(d) if sha256(d) == hash => ok(format!("{path}: OK\n")),
                    _ => fail(1, format!("{path}: FAILED\n")),
                }
            }
            ("sha256sum", paths) => {
                let mut out = String::new();
                let mut status = 0;
                for p in paths {
                    match st.files.get(*p) {
                        Some(d) => out.push_str(&format!("{}  {p}\n", sha256(d))),
                        None => status = 1,
                    }
                }
                Output {
                    status,
                    stdout: out,
                    stderr: String::new(),
                }
            }
            ("test", [_, path]) => {
                if st.files.contains_key(*path) {
                    ok("")
                } else {
                    fail(1, "")
                }
            }
            ("cat", [path]) => match st.files.get(*path) {
                Some(d) => ok(String::from_utf8_lossy(d).into_owned()),
                None => fail(1, format!("cat: {path}: No such file or directory\n")),
            },
            ("sh", ["-c", script, "sh", test_path, hash_path]) if script.starts_with("test -f") => {
                match (st.files.contains_key(*test_path), st.files.get(*hash_path)) {
                    (true, Some(h)) => ok(String::from_utf8_lossy(h).into_owned()),
                    _ => fail(1, ""),
                }
            }
            ("sh", ["-c", script, "sh", _]) if script.contains("sha256sum --check") => ok(""),
            ("mkdir" | "chmod" | "modprobe" | "sysctl" | "swapoff" | "sed", _) => ok(""),
            ("swapon", _) => ok(""),
            ("rm", ["-rf", paths @ ..]) => {
                for p in paths {
                    st.files
                        .retain(|k, _| !(k == p || k.starts_with(&format!("{p}/"))));
                    st.images.remove(*p);
                }
                ok("")
            }
            ("mv", ["-f", from, to]) | ("install", ["-m", _, from, to]) => {
                let Some(d) = st.files.get(*from).cloned() else {
                    return fail(1, format!("{program}: cannot stat '{from}'\n"));
                };
                if program == "mv" {
                    st.files.remove(*from);
                }
                st.files.insert((*to).to_owned(), d);
                ok("")
            }
            ("curl", [.., "-o", path, url]) => {
                let data = self
                    .downloads
                    .get(*url)
                    .cloned()
                    .unwrap_or_else(|| format!("downloaded from {url}\n").into_bytes());
                st.files.insert((*path).to_owned(), data);
                ok("")
            }
            ("gpg", [.., "-o", out, _key]) => {
                st.files.insert((*out).to_owned(), b"keyring".to_vec());
                ok("")
            }
            ("tar", ["-xzf", _, "-C", dir, member]) => {
                st.files
                    .insert(format!("{dir}/{member}"), b"binary".to_vec());
                ok("")
            }
            ("systemctl", ["daemon-reload"]) => ok(""),
            ("systemctl", ["is-enabled", unit]) => match st.units.get(*unit) {
                Some((true, _)) => ok("enabled\n"),
                Some(_) => fail(1, "disabled\n"),
                None => Output {
                    status: 1,
                    stdout: "not-found\n".into(),
                    stderr: String::new(),
                },
            },
            ("systemctl", ["is-active", unit]) => match st.units.get(*unit) {
                Some((_, true)) => ok("active\n"),
                _ => Output {
                    status: 3,
                    stdout: "inactive\n".into(),
                    stderr: String::new(),
                },
            },
            ("systemctl", ["enable", "--now", unit])
            | ("systemctl", ["start" | "restart" | "reload", unit]) => {
                if unit.starts_with("turnd-hostnet") {
                    let r = self.hostnet_start(&st);
                    if !r.success() {
                        return r;
                    }
                }
                let enabled = a[0] == "enable" || st.units.get(*unit).is_some_and(|u| u.0);
                st.units.insert((*unit).to_owned(), (enabled, true));
                ok("")
            }
            ("iptables-save", []) => self.netns_run(&["iptables-save"], None),
            ("timeout", [_, "cloud-init", "status", "--wait"]) => ok("status: done\n"),
            ("qemu-img", ["info", "--force-share", "--output=json", path]) => {
                match st.images.get(*path) {
                    Some(v) => ok(v.to_string()),
                    None => fail(1, format!("qemu-img: Could not open '{path}'\n")),
                }
            }
            (
                "qemu-img",
                ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, path, size],
            ) => {
                let gib: u64 = size.trim_end_matches('G').parse().expect("size in G");
                st.images.insert(
                    (*path).to_owned(),
                    serde_json::json!({"format": "qcow2", "virtual-size": gib << 30, "backing-filename": backing}),
                );
                st.files.insert((*path).to_owned(), b"qcow2".to_vec());
                ok("")
            }
            ("cloud-localds", [_, seed, ..]) => {
                st.files.insert((*seed).to_owned(), b"iso".to_vec());
                ok("")
            }
            ("virsh", ["-c", _, rest @ ..]) => {
                let Some(v) = &self.virsh else {
                    return fail(1, "error: failed to connect to the hypervisor\n");
                };
                // libvirt reads the definition itself: hand it a real file.
                let mut rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
                if let [verb, path] = rest.as_slice() {
                    if verb == "define" || verb == "net-define" {
                        let real = self.scratch.path().join(path.replace('/', "_"));
                        std::fs::write(&real, st.files.get(path).expect("definition uploaded"))
                            .expect("write definition");
                        rest[1] = real.display().to_string();
                    }
                }
                drop(st);
                let uri = cmd.args[1].clone();
                v.run(&Cmd::new("virsh").args(["-c".to_owned(), uri]).args(rest))
                    .expect("virsh session")
            }
            ("kubeadm" | "kubectl" | "helm", _) => self.kube_command(&mut st, &program, &args),
            _ => fail(127, format!("sim: unknown command {}\n", cmd.shell_line())),
        }
    }
}

impl Transport for Machine {
    fn target(&self) -> &str {
        &self.name
    }

    fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        lock(&self.log).push(cmd.shell_line());
        Ok(self.dispatch(cmd))
    }

    fn upload(&self, data: &[u8], path: &str, _mode: u32) -> Result<(), ExecError> {
        lock(&self.log).push(format!("write {path}"));
        lock(&self.state)
            .files
            .insert(path.to_owned(), data.to_vec());
        Ok(())
    }
}
