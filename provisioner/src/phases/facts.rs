//! Gathering helpers shared by the phases, and parsers of the tools' output (each tested on
//! captured samples).

use std::collections::BTreeMap;

use crate::exec::{Cmd, ExecError, Output, Transport};
use crate::render::cloudinit::hex;

/// The shell's exit status for a command that is not on `PATH`.
pub const NOT_FOUND_STATUS: i32 = 127;

/// Whether `out` says the program is not installed (the shell's status 127, which is what a
/// remote shell answers over SSH for a program not on `PATH`).
pub fn not_installed(out: &Output) -> bool {
    out.status == NOT_FOUND_STATUS
}

/// Runs a read-only probe of a tool that may not be installed yet: `Ok(None)` when the tool
/// is missing (a fact on a fresh host, never a gather error) — status 127 remotely, or a
/// program that cannot be found locally — otherwise its output.
///
/// # Errors
/// Any other failure to run it (a lost connection, a failing sudo).
pub fn probe(t: &dyn Transport, cmd: &Cmd) -> Result<Option<Output>, ExecError> {
    match t.run(cmd) {
        Ok(out) if not_installed(&out) => Ok(None),
        Ok(out) => Ok(Some(out)),
        Err(ExecError::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Installed package → version, from
/// `dpkg-query -W -f '${Package}\t${Version}\t${db:Status-Abbrev}\n' PKG…`. Packages not
/// fully installed (`ii`) are left out.
pub fn parse_dpkg_query(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (name, version, status) = (f.next()?, f.next()?, f.next()?);
            (status.trim() == "ii").then(|| {
                (
                    name.split(':').next().unwrap_or(name).to_owned(),
                    version.to_owned(),
                )
            })
        })
        .collect()
}

/// The versions of those of `names` that are installed on `t`.
pub fn installed_packages(
    t: &dyn Transport,
    names: &[String],
) -> Result<BTreeMap<String, String>, ExecError> {
    if names.is_empty() {
        return Ok(BTreeMap::new());
    }
    // dpkg-query exits 1 when one name is unknown; its stdout still lists the others.
    let out = probe(
        t,
        &Cmd::new("dpkg-query")
            .args(["-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n"])
            .args(names.iter().cloned()),
    )?;
    Ok(out.map(|o| parse_dpkg_query(&o.stdout)).unwrap_or_default())
}

/// path → SHA-256 from `sha256sum` output.
pub fn parse_sha256sum(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| {
            let (hash, path) = l.split_once("  ").or_else(|| l.split_once(" *"))?;
            (hash.len() == 64).then(|| (path.to_owned(), hash.to_owned()))
        })
        .collect()
}

/// SHA-256 of those of `paths` that exist on `t`.
pub fn file_hashes(
    t: &dyn Transport,
    paths: &[&str],
) -> Result<BTreeMap<String, String>, ExecError> {
    let out = t.run(&Cmd::new("sha256sum").args(paths.iter().copied()))?;
    Ok(parse_sha256sum(&out.stdout))
}

/// SHA-256 of `data`, lowercase hex.
pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_query_output_keeps_only_installed_packages() {
        // Captured on Debian 12 for: containerd kubeadm curl nosuchpkg (stderr omitted).
        let out = "containerd\t1.6.20~ds1-1+b1\tii \nkubeadm\t1.29.6-1.1\tii \ncurl\t7.88.1-10+deb12u8\trc \nlibc6:amd64\t2.36-9+deb12u14\tii \n";
        let got = parse_dpkg_query(out);
        assert_eq!(
            got.get("containerd").map(String::as_str),
            Some("1.6.20~ds1-1+b1")
        );
        assert_eq!(got.get("kubeadm").map(String::as_str), Some("1.29.6-1.1"));
        assert_eq!(
            got.get("libc6").map(String::as_str),
            Some("2.36-9+deb12u14")
        );
        assert!(
            !got.contains_key("curl"),
            "removed-but-configured is not installed"
        );
    }

    #[test]
    fn sha256sum_output_maps_paths_to_hashes() {
        let out = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  /etc/modules-load.d/k8s.conf\n";
        let got = parse_sha256sum(out);
        assert_eq!(got.len(), 1);
        assert_eq!(got["/etc/modules-load.d/k8s.conf"], sha256(b""));
    }
}
