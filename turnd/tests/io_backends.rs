//! The io backends as an operator meets them: `auto` takes io_uring where the kernel offers
//! it and falls back to epoll where it does not (forced here the way a seccomp profile would
//! force it, with `TURND_DISABLE_IO_URING=1`), explicit choices are honoured, and each serves.
//! Runs the real `turnd` binary.

mod common;

use std::time::Duration;

use common::process::{binding, Turnd};

/// turnd on a loopback UDP port with io backend `io`, and the environment changes `env`.
fn start(io: &str, env: &[(&str, Option<&str>)]) -> Turnd {
    let toml = format!(
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\n[auth]\nsecrets = [\"0123456789abcdef\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[server]\nworkers = 2\nio = \"{io}\"\n\
         [log]\nformat = \"json\"\nlevel = \"info\"\n"
    );
    Turnd::spawn_env(&toml, env)
}

/// The `io backend` log line's `backend` and `reason` fields.
fn io_backend(t: &Turnd) -> (String, String) {
    let line = t
        .wait_for_log(Duration::from_secs(20), |l| l.contains("\"io backend\""))
        .unwrap_or_else(|| panic!("no io backend line:\n{}", t.log()));
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    let field = |k: &str| v["fields"][k].as_str().unwrap_or_default().to_owned();
    (field("backend"), field("reason"))
}

/// It answers a Binding request on its UDP listener with the sender's address.
fn serves(t: &mut Turnd) {
    t.wait_started();
    let (local, mapped) = binding(t.udp[0], 10, Duration::from_millis(500))
        .unwrap_or_else(|| panic!("no Binding answer from {}:\n{}", t.udp[0], t.log()));
    assert_eq!(mapped, Some(local), "XOR-MAPPED-ADDRESS");
}

fn uring_available() -> bool {
    turnd::net::uring::Uring::new().is_ok()
}

#[test]
fn auto_falls_back_to_epoll_when_io_uring_is_unavailable_and_serves() {
    let mut t = start("auto", &[("TURND_DISABLE_IO_URING", Some("1"))]);
    let (backend, reason) = io_backend(&t);
    assert_eq!(backend, "epoll", "fell back");
    assert!(reason.contains("io_uring disabled"), "says why: {reason}");
    serves(&mut t);
}

#[test]
fn auto_takes_io_uring_where_the_kernel_offers_it_and_serves() {
    let mut t = start("auto", &[("TURND_DISABLE_IO_URING", None)]);
    let expected = if uring_available() {
        "io_uring"
    } else {
        "epoll"
    };
    assert_eq!(io_backend(&t).0, expected);
    serves(&mut t);
}

#[test]
fn explicit_epoll_is_honoured_and_serves() {
    let mut t = start("epoll", &[("TURND_DISABLE_IO_URING", None)]);
    assert_eq!(io_backend(&t).0, "epoll");
    serves(&mut t);
}

#[test]
fn explicit_io_uring_serves_or_fails_with_the_reason() {
    let mut t = start("io_uring", &[("TURND_DISABLE_IO_URING", None)]);
    if uring_available() {
        assert_eq!(io_backend(&t).0, "io_uring");
        serves(&mut t);
    } else {
        let status = t.child.wait().expect("exits");
        assert!(
            !status.success(),
            "io_uring asked for and unavailable: start fails"
        );
    }
}
