//! turnd's container image without a registry: built from the project's `Dockerfile` with
//! podman (or buildah) on the operator's machine, saved as an OCI archive, and imported into
//! each worker's containerd (`ctr -n k8s.io images import`) over the transport.
//!
//! The digest that pins the image is read from the archive itself (the manifest that
//! `index.json` names), not from the build tool: podman's own `Digest` is that of the manifest
//! in its local storage, and saving writes a new manifest (compressed layers) with another
//! digest. containerd keeps the archive's manifest as it is, so `ctr images ls` shows exactly
//! the digest recorded here. The import names the image both `REPO:TAG` and `REPO@DIGEST`
//! (`--digests --base-name REPO`); the second is what the Deployment refers to, and what the
//! kubelet finds with `imagePullPolicy: Never`.
//!
//! What it leaves out: building on the libvirt host (`--on-host`): the archive would have to
//! travel from the host to the VMs, which the transports do not do; build on the operator's
//! machine (or run the provisioner on the host).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::exec::{Cmd, ExecError, Output, Transport};
use crate::phases::facts::probe;

/// The containerd namespace the kubelet's images live in.
pub const CTR_NAMESPACE: &str = "k8s.io";
/// The repository `image build` tags with by default (`localhost/` never reaches a registry).
pub const DEFAULT_REPO: &str = "localhost/turnd";
/// Where `image build` writes the archive by default, relative to the inventory's directory.
pub const DEFAULT_ARCHIVE: &str = ".provisioner/image/turnd.oci.tar";
/// The Dockerfile stage built by default: a static `turnd` built beforehand, copied onto
/// `scratch` (the `runtime` stage needs the `rust` image from a registry).
pub const DEFAULT_TARGET: &str = "runtime-prebuilt";
/// How many lines of a failed build tool's stderr an error shows.
const STDERR_TAIL_LINES: usize = 20;

/// Why an image could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Neither podman nor buildah is installed where the build runs.
    #[error("on {target}: neither podman nor buildah is installed: install one (`apt-get install podman`)")]
    NoBuilder {
        /// Where.
        target: String,
    },
    /// The build tool ran and failed.
    #[error(
        "on {target}: `{command}` failed with status {status}; the end of its output:\n{tail}"
    )]
    ToolFailed {
        /// Where.
        target: String,
        /// The command line.
        command: String,
        /// Its exit status.
        status: i32,
        /// The last lines of its stderr.
        tail: String,
    },
    /// A command could not be run.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The archive is missing or is not an OCI image archive with one image.
    #[error("image archive {path}: {reason}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The archive holds another image than the inventory pins.
    #[error("image archive {path} holds {found}, but container.image is {want}: run `provisioner image build` again, or set container.image to {found}")]
    Mismatch {
        /// The archive.
        path: PathBuf,
        /// What it holds (`REPO@DIGEST`).
        found: String,
        /// What the inventory pins.
        want: String,
    },
}

/// The tool that builds the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builder {
    /// `podman build`, then `podman save --format oci-archive`.
    Podman,
    /// `buildah build`, then `buildah push … oci-archive:…`.
    Buildah,
}

impl Builder {
    /// The program's name.
    pub fn program(self) -> &'static str {
        match self {
            Self::Podman => "podman",
            Self::Buildah => "buildah",
        }
    }

    /// The first of podman and buildah that is installed on `t`.
    ///
    /// # Errors
    /// [`ImageError::NoBuilder`], or a transport failure.
    pub fn detect(t: &dyn Transport) -> Result<Self, ImageError> {
        for b in [Self::Podman, Self::Buildah] {
            if probe(t, &Cmd::new(b.program()).arg("--version"))?.is_some_and(|o| o.success()) {
                return Ok(b);
            }
        }
        Err(ImageError::NoBuilder {
            target: t.target().to_owned(),
        })
    }

    /// The build command.
    pub fn build_cmd(self, o: &BuildOptions) -> Cmd {
        Cmd::new(self.program()).args([
            "build".to_owned(),
            "--target".to_owned(),
            o.target.clone(),
            "-f".to_owned(),
            o.dockerfile.display().to_string(),
            "-t".to_owned(),
            o.tag.clone(),
            o.context.display().to_string(),
        ])
    }

    /// The command that writes `tag` as an OCI archive to `path`.
    pub fn save_cmd(self, tag: &str, path: &Path) -> Cmd {
        match self {
            Self::Podman => Cmd::new("podman").args([
                "save".to_owned(),
                "--format".to_owned(),
                "oci-archive".to_owned(),
                "-o".to_owned(),
                path.display().to_string(),
                tag.to_owned(),
            ]),
            Self::Buildah => Cmd::new("buildah").args([
                "push".to_owned(),
                tag.to_owned(),
                format!("oci-archive:{}:{tag}", path.display()),
            ]),
        }
    }
}

/// What `image build` builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// The Dockerfile.
    pub dockerfile: PathBuf,
    /// The build context.
    pub context: PathBuf,
    /// The Dockerfile stage.
    pub target: String,
    /// The tag, `REPO:TAG` (the repository must be the one of `container.image`).
    pub tag: String,
    /// Where the archive is written.
    pub archive: PathBuf,
}

/// What an image archive holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveImage {
    /// The name in the archive (`org.opencontainers.image.ref.name`), e.g. `localhost/turnd:0.1.0`.
    pub name: String,
    /// The manifest's digest, `sha256:…`: what `ctr images ls` shows after the import.
    pub digest: String,
}

impl ArchiveImage {
    /// The repository: the name without its tag.
    pub fn repo(&self) -> &str {
        repo_of(&self.name)
    }

    /// `REPO@DIGEST`, for `container.image`.
    pub fn pinned(&self) -> String {
        format!("{}@{}", self.repo(), self.digest)
    }
}

/// `REPO` of `REPO:TAG` (a port in the registry part is not a tag).
fn repo_of(name: &str) -> &str {
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    }
}

fn tool_failed(t: &dyn Transport, cmd: &Cmd, out: &Output) -> ImageError {
    let lines: Vec<&str> = out.stderr.trim_end().lines().collect();
    let tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n");
    ImageError::ToolFailed {
        target: t.target().to_owned(),
        command: cmd.shell_line(),
        status: out.status,
        tail,
    }
}

/// Builds the image on `t` (this machine), writes its OCI archive to `o.archive` (replacing
/// it only once the new one is complete), and returns what the archive holds.
///
/// # Errors
/// [`ImageError::NoBuilder`], [`ImageError::ToolFailed`] with the tool's stderr tail, or an
/// archive that cannot be read back.
pub fn build(t: &dyn Transport, o: &BuildOptions) -> Result<ArchiveImage, ImageError> {
    let builder = Builder::detect(t)?;
    let cmd = builder.build_cmd(o);
    tracing::info!("building {} with {}", o.tag, builder.program());
    let out = t.run(&cmd)?;
    if !out.success() {
        return Err(tool_failed(t, &cmd, &out));
    }
    let archive_err = |reason: String| ImageError::Archive {
        path: o.archive.clone(),
        reason,
    };
    let dir = o.archive.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| archive_err(format!("cannot create {}: {e}", dir.display())))?;
    let partial = o.archive.with_extension("partial");
    // The tools refuse (podman) or append to (buildah) an existing file.
    let _ = std::fs::remove_file(&partial);
    let save = builder.save_cmd(&o.tag, &partial);
    let out = t.run(&save)?;
    if !out.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(tool_failed(t, &save, &out));
    }
    let image = read_archive(&partial).map_err(|e| match e {
        ImageError::Archive { reason, .. } => archive_err(reason),
        other => other,
    })?;
    std::fs::rename(&partial, &o.archive)
        .map_err(|e| archive_err(format!("cannot move {} here: {e}", partial.display())))?;
    Ok(image)
}

/// Reads `index.json` of the OCI archive at `path`: exactly one image, with its name.
///
/// # Errors
/// [`ImageError::Archive`] naming what is wrong.
pub fn read_archive(path: &Path) -> Result<ArchiveImage, ImageError> {
    let err = |reason: String| ImageError::Archive {
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| {
        err(format!(
            "cannot open it ({e}); `provisioner image build` writes it"
        ))
    })?;
    let index = tar_member(std::io::BufReader::new(file), "index.json")
        .map_err(|e| err(format!("cannot read it as a tar archive: {e}")))?
        .ok_or_else(|| err("no index.json: not an OCI image archive".into()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&index).map_err(|e| err(format!("index.json is not JSON: {e}")))?;
    let manifests = v["manifests"]
        .as_array()
        .ok_or_else(|| err("index.json has no manifests".into()))?;
    let [m] = manifests.as_slice() else {
        return Err(err(format!(
            "index.json lists {} manifests; one image is expected",
            manifests.len()
        )));
    };
    let digest = m["digest"].as_str().unwrap_or_default();
    if crate::inventory::pinned_image(&format!("x@{digest}")).is_none() {
        return Err(err(format!("index.json: bad manifest digest `{digest}`")));
    }
    let name = m["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .filter(|n| n.contains('/'))
        .ok_or_else(|| {
            err("index.json: the image has no full name (org.opencontainers.image.ref.name REPO:TAG)".into())
        })?;
    Ok(ArchiveImage {
        name: name.to_owned(),
        digest: digest.to_owned(),
    })
}

/// The contents of the member called `want` of an uncompressed tar stream (ustar and GNU long
/// names), or `None`.
fn tar_member(mut r: impl Read, want: &str) -> std::io::Result<Option<Vec<u8>>> {
    const BLOCK: usize = 512;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let field = |b: &[u8]| -> String {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    let mut long_name: Option<String> = None;
    let mut header = [0u8; BLOCK];
    loop {
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        if header.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let size_text = field(&header[124..136]);
        let size = u64::from_str_radix(size_text.trim(), 8).map_err(|_| bad("bad size field"))?;
        let kind = header[156];
        let mut name = field(&header[..100]);
        if &header[257..262] == b"ustar" {
            let prefix = field(&header[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        if let Some(long) = long_name.take() {
            name = long;
        }
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let wanted = name.trim_start_matches("./") == want && matches!(kind, b'0' | 0);
        if kind == b'L' || wanted {
            let len = usize::try_from(size).map_err(|_| bad("member too large"))?;
            if kind == b'L' && len > 64 * 1024 {
                return Err(bad("long name too long"));
            }
            let mut data = vec![0u8; len];
            r.read_exact(&mut data)?;
            std::io::copy(&mut (&mut r).take(padded - size), &mut std::io::sink())?;
            if wanted {
                return Ok(Some(data));
            }
            long_name = Some(field(&data));
        } else {
            let skipped = std::io::copy(&mut (&mut r).take(padded), &mut std::io::sink())?;
            if skipped != padded {
                return Err(bad("truncated archive"));
            }
        }
    }
}

/// The image the inventory loads from an archive: `container.image` (pinned) and
/// `container.archive`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// `REPO@sha256:…`.
    pub image: String,
    /// The OCI archive.
    pub archive: PathBuf,
}

impl LocalImage {
    /// The inventory's locally built image, when `container.archive` is set.
    pub fn of(c: &crate::inventory::Cluster) -> Option<Self> {
        let c = c.container.as_ref()?;
        Some(Self {
            image: c.image.clone(),
            archive: c.archive.clone()?,
        })
    }

    /// The repository (`container.image` before `@`).
    pub fn repo(&self) -> &str {
        self.image.split_once('@').map_or(&self.image, |(r, _)| r)
    }

    /// The digest, `sha256:…`.
    pub fn digest(&self) -> &str {
        self.image.split_once('@').map_or("", |(_, d)| d)
    }

    /// Checks that the archive holds this image.
    ///
    /// # Errors
    /// [`ImageError::Archive`] or [`ImageError::Mismatch`].
    pub fn check_archive(&self) -> Result<(), ImageError> {
        let found = read_archive(&self.archive)?;
        if found.pinned() == self.image {
            Ok(())
        } else {
            Err(ImageError::Mismatch {
                path: self.archive.clone(),
                found: found.pinned(),
                want: self.image.clone(),
            })
        }
    }

    /// The import command: names the image `REPO:TAG` and `REPO@DIGEST`; reads the archive
    /// from stdin.
    pub fn import_cmd(&self) -> Cmd {
        Cmd::new("ctr").args([
            "-n",
            CTR_NAMESPACE,
            "images",
            "import",
            "--digests",
            "--base-name",
            self.repo(),
            "-",
        ])
    }
}

/// The command that lists the images of the kubelet's containerd namespace.
pub fn list_cmd() -> Cmd {
    Cmd::new("ctr").args(["-n", CTR_NAMESPACE, "images", "ls"])
}

/// Whether containerd on a node has an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeImage {
    /// `ctr images ls` lists `REPO@DIGEST` with that digest.
    Present,
    /// containerd answers and does not have it.
    Missing,
    /// `ctr` is not installed (containerd comes with `k8s-common`).
    NotInstalled,
    /// The VM is created earlier in this run: not asked.
    NewVm,
}

/// Whether `ctr images ls` output lists `image` (`REPO@DIGEST`) with its digest in the
/// DIGEST column.
pub fn listed(ls: &str, image: &str) -> bool {
    let digest = image.split_once('@').map_or("", |(_, d)| d);
    ls.lines().skip(1).any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.first() == Some(&image) && cols.get(2) == Some(&digest)
    })
}

/// Asks containerd on `t` whether it has `image`.
///
/// # Errors
/// A transport failure, or `ctr` failing (containerd not running).
pub fn node_image(t: &dyn Transport, image: &str) -> Result<NodeImage, ExecError> {
    let cmd = list_cmd();
    match probe(t, &cmd)? {
        None => Ok(NodeImage::NotInstalled),
        Some(out) if out.success() => Ok(if listed(&out.stdout, image) {
            NodeImage::Present
        } else {
            NodeImage::Missing
        }),
        Some(out) => Err(ExecError::Failed {
            target: t.target().to_owned(),
            command: cmd.shell_line(),
            status: out.status,
            stderr: out.stderr.trim().to_owned(),
        }),
    }
}

/// Streams the archive into `ctr images import` on `t`, then checks with `ctr images ls` that
/// the digest is there.
///
/// # Errors
/// The archive cannot be read, the import fails, or the image is not listed afterwards.
pub fn import(t: &dyn Transport, image: &LocalImage) -> Result<(), ExecError> {
    let path = image.archive.display().to_string();
    let mut file = std::fs::File::open(&image.archive).map_err(|source| ExecError::Io {
        target: "local".to_owned(),
        what: "cannot open",
        path: path.clone(),
        source,
    })?;
    let cmd = image.import_cmd();
    let out = t.run_streaming(&cmd, &mut file)?;
    if !out.success() {
        return Err(ExecError::Failed {
            target: t.target().to_owned(),
            command: format!("{} < {path}", cmd.shell_line()),
            status: out.status,
            stderr: out.stderr.trim().to_owned(),
        });
    }
    match node_image(t, &image.image)? {
        NodeImage::Present => Ok(()),
        _ => Err(ExecError::Protocol {
            target: t.target().to_owned(),
            reason: format!(
                "after importing {path}, `{}` does not list {} (does the archive's name start with {}?)",
                list_cmd().shell_line(),
                image.image,
                image.repo()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::RecordingTransport;

    /// A tar stream of (name, data) members, as GNU tar writes it (long names as `L` entries).
    fn tar(members: &[(&str, &[u8])]) -> Vec<u8> {
        fn header(name: &str, size: usize, kind: u8) -> [u8; 512] {
            let mut h = [0u8; 512];
            h[..name.len().min(100)].copy_from_slice(&name.as_bytes()[..name.len().min(100)]);
            h[100..107].copy_from_slice(b"0000644");
            h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
            h[156] = kind;
            h[257..263].copy_from_slice(b"ustar\0");
            h
        }
        let pad = |v: &mut Vec<u8>| v.resize(v.len().div_ceil(512) * 512, 0);
        let mut out = Vec::new();
        for (name, data) in members {
            if name.len() > 100 {
                out.extend(header("././@LongLink", name.len() + 1, b'L'));
                out.extend(name.as_bytes());
                out.push(0);
                pad(&mut out);
            }
            out.extend(header(name, data.len(), b'0'));
            out.extend(*data);
            pad(&mut out);
        }
        out.extend([0u8; 1024]);
        out
    }

    const D: &str = "sha256:8bfac28e86e8ba3076ecb4ae708510d144d79105914026c56ea0fe213cc7bbe0";

    fn index(name: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D}","size":570,"annotations":{{"org.opencontainers.image.ref.name":"{name}"}}}}]}}"#
        )
    }

    #[test]
    fn the_digest_comes_from_the_archives_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.tar");
        let long = format!("blobs/sha256/{}", "b".repeat(120));
        std::fs::write(
            &path,
            tar(&[
                ("oci-layout", b"{}"),
                (&long, &[7u8; 700]),
                ("index.json", index("localhost/turnd:0.1.0").as_bytes()),
            ]),
        )
        .expect("write");
        let got = read_archive(&path).expect("reads");
        assert_eq!(got.digest, D);
        assert_eq!(got.pinned(), format!("localhost/turnd@{D}"));
        let with_port = ArchiveImage {
            name: "registry:5000/turnd:1".into(),
            digest: D.into(),
        };
        assert_eq!(with_port.repo(), "registry:5000/turnd");
    }

    #[test]
    fn a_bad_archive_says_what_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.tar");
        let err = |data: Vec<u8>| {
            std::fs::write(&path, data).expect("write");
            read_archive(&path).expect_err("bad").to_string()
        };
        assert!(
            err(tar(&[("oci-layout", b"{}")])).ends_with("no index.json: not an OCI image archive"),
            "{}",
            err(tar(&[("oci-layout", b"{}")]))
        );
        let short = err(tar(&[("index.json", index("0.1.0").as_bytes())]));
        assert!(short.contains("has no full name"), "{short}");
        let two = index("localhost/turnd:1").replace("}]}", "},{\"digest\":\"x\"}]}");
        let two = err(tar(&[("index.json", two.as_bytes())]));
        assert!(two.contains("lists 2 manifests"), "{two}");
        let truncated = tar(&[("blob", &[1u8; 2000])])[..900].to_vec();
        let truncated = err(truncated);
        assert!(truncated.contains("truncated archive"), "{truncated}");
        let missing = read_archive(&dir.path().join("nope.tar"))
            .expect_err("missing")
            .to_string();
        assert!(
            missing.contains("`provisioner image build` writes it"),
            "{missing}"
        );
    }

    #[test]
    fn ctr_listing_must_show_the_name_with_its_digest() {
        let image = format!("localhost/turnd@{D}");
        let head = "REF TYPE DIGEST SIZE PLATFORMS LABELS\n";
        let row = |r: &str, d: &str| {
            format!("{r} application/vnd.oci.image.manifest.v1+json {d} 1.3 KiB linux/amd64 -\n")
        };
        assert!(listed(&format!("{head}{}", row(&image, D)), &image));
        // The tag alone, or the name pointing elsewhere, is not the image.
        assert!(!listed(
            &format!("{head}{}", row("localhost/turnd:0.1.0", D)),
            &image
        ));
        let other = format!("sha256:{}", "c".repeat(64));
        assert!(!listed(&format!("{head}{}", row(&image, &other)), &image));
        assert!(!listed(head, &image));
    }

    #[test]
    fn no_build_tool_is_a_clear_error_and_a_failed_build_shows_the_stderr_tail() {
        let t = RecordingTransport::new("local");
        t.respond("podman", Output::failed(127, "sh: podman: not found"));
        t.respond("buildah", Output::failed(127, "sh: buildah: not found"));
        let o = BuildOptions {
            dockerfile: "Dockerfile".into(),
            context: ".".into(),
            target: DEFAULT_TARGET.into(),
            tag: "localhost/turnd:0.1.0".into(),
            archive: "/nonexistent/a.tar".into(),
        };
        let e = build(&t, &o).expect_err("no tool").to_string();
        assert_eq!(
            e,
            "on local: neither podman nor buildah is installed: install one (`apt-get install podman`)"
        );

        let t = RecordingTransport::new("local");
        t.respond("podman", Output::failed(127, ""));
        t.respond("buildah --version", Output::ok("buildah 1.28"));
        let noise: String = (1..=40).map(|i| format!("line {i}\n")).collect();
        t.respond("buildah build", Output::failed(2, noise));
        let e = build(&t, &o).expect_err("fails").to_string();
        assert!(
            e.starts_with("on local: `buildah build --target runtime-prebuilt -f Dockerfile -t localhost/turnd:0.1.0 .` failed with status 2; the end of its output:\nline 21\n"),
            "{e}"
        );
        assert!(e.ends_with("line 40"), "{e}");
        assert!(!e.contains("line 20\n"), "{e}");
    }
}
