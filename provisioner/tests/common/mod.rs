//! Helpers shared by the provisioner's integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod fake_api;
pub mod image;
pub mod run;
pub mod sim;
pub mod sshd;

use std::path::Path;

/// Whether `tool` is on PATH. When it is missing: with `TURND_REQUIRE_TOOLS=1` (CI) the test
/// fails; otherwise it prints why it is skipped and the caller returns early.
pub fn have_tool(tool: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        || (tool.starts_with('/') && Path::new(tool).is_file());
    if !found {
        if std::env::var("TURND_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("`{tool}` is required (TURND_REQUIRE_TOOLS=1): apt-get install {package}");
        }
        eprintln!("SKIPPED: `{tool}` not found; apt-get install {package} to run this test");
    }
    found
}

/// Whether `kubectl apply -f DIR` picks up the file at `path` (it takes `.yaml`, `.yml` and
/// `.json` files only): a rendered placeholder Secret must not be one.
pub fn kubectl_applies(path: &str) -> bool {
    [".yaml", ".yml", ".json"].iter().any(|e| path.ends_with(e))
}
