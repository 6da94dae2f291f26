//! The SSH transport against a real `sshd` started on a loopback port with a temporary host
//! key and client key. Nothing leaves 127.0.0.1.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::sshd::{free_port, Sshd};
use provisioner::exec::{Cmd, SshOptions, SshTransport, Transport};

#[test]
fn runs_commands_with_stdout_stderr_status_and_stdin() {
    let Some(sshd) = Sshd::start() else { return };
    let t = SshTransport::new("test-host", sshd.options()).expect("transport");
    let out = t
        .run(
            &Cmd::new("sh")
                .args(["-c", "read x; echo \"got $x\"; echo 'to err' >&2; exit 7"])
                .stdin("it's me\n"),
        )
        .expect("runs");
    assert_eq!(out.status, 7, "{}", sshd.log());
    assert_eq!(out.stdout, "got it's me\n");
    assert_eq!(out.stderr, "to err\n");
    // Arguments with spaces and quotes arrive intact.
    let out = t
        .run(&Cmd::new("printf").args(["%s|", "a b", "c'd", ""]))
        .expect("runs");
    assert_eq!(out.stdout, "a b|c'd||");
    // The control master is up and reused.
    assert!(t.master_alive());
    let err = t.run_ok(&Cmd::new("false")).expect_err("false fails");
    assert_eq!(
        err.to_string(),
        "on test-host: `false` exited with status 1: "
    );
}

#[test]
fn uploads_files_atomically_with_mode() {
    let Some(sshd) = Sshd::start() else { return };
    let t = SshTransport::new("test-host", sshd.options()).expect("transport");
    let path = sshd.scratch().join("etc/modules-load.d/k8s.conf");
    let p = path.to_str().expect("utf8");
    t.upload(b"overlay\nbr_netfilter\n", p, 0o640)
        .expect("upload");
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        "overlay\nbr_netfilter\n"
    );
    assert_eq!(
        std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
        0o640
    );
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    t.upload(&binary, p, 0o600).expect("upload again");
    assert_eq!(std::fs::read(&path).expect("read"), binary);
    assert!(!Path::new(&format!("{p}.provisioner-tmp")).exists());
}

#[test]
fn jumps_through_a_host_and_closes_the_master_on_drop() {
    let Some(sshd) = Sshd::start() else { return };
    // The "VM" is the same sshd reached through the "host" with ProxyCommand -W.
    let mut vm = sshd.options();
    vm.jump = Some(Box::new(sshd.options()));
    let control;
    {
        let t = SshTransport::new("k8s-master", vm).expect("transport");
        let out = t
            .run_ok(&Cmd::new("echo").arg("through the jump"))
            .expect("runs");
        assert_eq!(out.stdout, "through the jump\n", "{}", sshd.log());
        assert!(t.master_alive());
        control = t.control_path();
        assert!(control.exists());
    }
    // After drop the master was told to exit and its socket is gone.
    assert!(!control.exists());
}

#[test]
fn unreachable_host_is_a_clear_error() {
    if !common::have_tool("ssh", "openssh-client") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = SshOptions::new("root", "127.0.0.1", free_port());
    o.known_hosts = Some(dir.path().join("known_hosts"));
    let t = SshTransport::new("nowhere", o).expect("transport");
    let err = t.run(&Cmd::new("true")).expect_err("nothing listens");
    let msg = err.to_string();
    assert!(
        msg.starts_with("on nowhere: `ssh -f -N root@127.0.0.1` exited with status 255"),
        "{msg}"
    );
    assert!(msg.contains("Connection refused"), "{msg}");
}

#[test]
fn a_refused_host_key_names_the_fix_and_the_fix_works() {
    let Some(sshd) = Sshd::start() else { return };
    let opts = sshd.options();
    let known = sshd.known_hosts();
    // Someone else's key recorded for this host:port (the host was rebuilt).
    let other = sshd.scratch().join("other_key");
    std::fs::create_dir_all(sshd.scratch()).expect("scratch");
    assert!(std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(&other)
        .status()
        .expect("ssh-keygen")
        .success());
    let public = std::fs::read_to_string(other.with_extension("pub")).expect("pub");
    let host = format!("[127.0.0.1]:{}", sshd.port);
    std::fs::write(&known, format!("{host} {public}")).expect("known_hosts");

    let t = SshTransport::new("host", opts.clone()).expect("transport");
    let err = t.run(&Cmd::new("true")).expect_err("refused");
    let msg = err.to_string();
    let fix = format!("ssh-keygen -R '{host}' -f {}", known.display());
    assert!(
        msg.contains(&format!("remove the old key with `{fix}` and run again")),
        "{msg}"
    );
    // The named fix, then a fresh transport connects (the new key is accepted and recorded).
    assert!(std::process::Command::new("sh")
        .args(["-c", &fix])
        .output()
        .expect("ssh-keygen -R")
        .status
        .success());
    let t = SshTransport::new("host", opts).expect("transport");
    assert!(
        t.run(&Cmd::new("true")).expect("runs").success(),
        "{}",
        sshd.log()
    );
}

#[test]
fn a_tunnel_through_the_host_reaches_a_port_only_the_host_can_reach() {
    let Some(sshd) = Sshd::start() else { return };
    // "The API server": a listener that greets every connection.
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let remote = server.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in server.incoming().flatten() {
            let mut conn = conn;
            let _ = std::io::Write::write_all(&mut conn, b"hello from the API\n");
        }
    });
    let tunnel = provisioner::exec::tunnel::Tunnel::open(&sshd.options(), remote)
        .unwrap_or_else(|e| panic!("{e}\n{}", sshd.log()));
    assert_ne!(tunnel.local, remote);
    let mut got = String::new();
    let mut conn = std::net::TcpStream::connect(tunnel.local).expect("connect");
    std::io::Read::read_to_string(&mut conn, &mut got).expect("read");
    assert_eq!(got, "hello from the API\n");
    let local = tunnel.local;
    drop(tunnel);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        std::net::TcpStream::connect(local).is_err(),
        "closed when dropped"
    );
}

#[test]
fn a_streamed_file_reaches_the_remote_command_whole() {
    let Some(sshd) = Sshd::start() else { return };
    let t = SshTransport::new("test-host", sshd.options()).expect("transport");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("archive");
    // 5 MiB of varied bytes: more than any pipe or SSH window holds at once.
    let data: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).expect("write");
    let mut file = std::fs::File::open(&path).expect("open");
    let out = t
        .run_streaming(&Cmd::new("sha256sum"), &mut file)
        .expect("runs");
    let local = std::process::Command::new("sha256sum")
        .arg(&path)
        .output()
        .expect("sha256sum");
    let want = String::from_utf8_lossy(&local.stdout);
    assert_eq!(
        out.stdout.split_whitespace().next(),
        want.split_whitespace().next(),
        "{}",
        sshd.log()
    );
}
