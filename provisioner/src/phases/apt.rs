//! apt on the host and the VMs: one home for how packages are installed. Every install is
//! preceded by `apt-get update` in the same action (a fresh cloud image has no package lists),
//! and every apt command waits for the dpkg lock instead of failing while cloud-init or
//! unattended-upgrades holds it.

use crate::exec::Cmd;
use crate::plan::Step;

/// How long an apt command waits for the dpkg lock (`DPkg::Lock::Timeout`, apt ≥ 1.9.11).
pub const LOCK_TIMEOUT_SECS: u32 = 600;

fn apt_get() -> Cmd {
    Cmd::new("env").args([
        "DEBIAN_FRONTEND=noninteractive".to_owned(),
        "apt-get".to_owned(),
        "-o".to_owned(),
        format!("DPkg::Lock::Timeout={LOCK_TIMEOUT_SECS}"),
    ])
}

/// `apt-get update`, waiting for the lock.
pub fn update() -> Cmd {
    apt_get().arg("update")
}

/// `apt-get install` of `packages` (`name` or `name=version`), waiting for the lock; held
/// packages may change (the Kubernetes packages are held at their pinned version).
pub fn install(packages: &[String]) -> Cmd {
    apt_get()
        .args([
            "install",
            "-y",
            "--no-install-recommends",
            "--allow-change-held-packages",
        ])
        .args(packages.iter().cloned())
}

/// `apt-get update` then `apt-get install`.
pub fn update_and_install(packages: &[String]) -> Vec<Step> {
    vec![Step::Run(update()), Step::Run(install(packages))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_refresh_the_lists_first_and_wait_for_the_dpkg_lock() {
        let steps = update_and_install(&["curl".to_owned()]);
        let lines: Vec<String> = steps.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "$ env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update",
                "$ env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends --allow-change-held-packages curl",
            ]
        );
    }
}
