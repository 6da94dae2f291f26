//! The io backends as an operator meets them: `auto` takes io_uring where the kernel offers
//! it and falls back to epoll where it does not (forced here the way a seccomp profile would
//! force it, with `TURND_DISABLE_IO_URING=1`), explicit choices are honoured, and each serves.
//! Runs the real `turnd` binary.

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use turn_proto::codec::{
    Class, Message, MessageBuilder, MessageType, Method, TransactionId, XorMappedAddress,
};

struct Turnd {
    child: Child,
    log: std::sync::mpsc::Receiver<String>,
}

impl Drop for Turnd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Turnd {
    fn start(io: &str, env: &[(&str, &str)]) -> (Self, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("turnd.toml");
        std::fs::write(
            &cfg,
            format!(
                "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\n[auth]\nsecrets = [\"0123456789abcdef\"]\n\
                 [admin]\nlisten = \"\"\n[server]\nworkers = 2\nio = \"{io}\"\n[log]\nlevel = \"info\"\n"
            ),
        )
        .expect("config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnd"));
        cmd.arg("--config")
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .env_remove("TURND_DISABLE_IO_URING")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("turnd starts");
        // turnd logs to stdout.
        let stderr = child.stdout.take().expect("stdout");
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (Self { child, log }, dir)
    }

    /// Waits for a log line containing `needle`; returns it.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(line) = self.log.recv_timeout(Duration::from_millis(200)) {
                if line.contains(needle) {
                    return line;
                }
                seen.push(line);
            }
        }
        panic!("no log line with {needle:?}; saw:\n{}", seen.join("\n"));
    }

    /// The UDP listener address from the "listening" line.
    fn udp_addr(&self) -> SocketAddr {
        let line = self.wait_for("listening");
        let start = line.find("udp=[").expect("udp=[") + 5;
        let end = start + line[start..].find(']').expect("]");
        line[start..end].parse().expect("address")
    }
}

fn binding(server: SocketAddr) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let tid = TransactionId([7; 12]);
    let mut out = Vec::new();
    MessageBuilder::new(
        &mut out,
        MessageType::new(Method::BINDING, Class::Request),
        tid,
    )
    .finish();
    let mut buf = [0u8; 1500];
    for _ in 0..10 {
        sock.send_to(&out, server).expect("send");
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let msg = Message::decode(&buf[..n]).expect("a STUN answer");
            let XorMappedAddress(mapped) = msg
                .get::<XorMappedAddress>()
                .expect("decodes")
                .expect("XOR-MAPPED-ADDRESS");
            assert_eq!(mapped, sock.local_addr().expect("local"));
            return mapped;
        }
    }
    panic!("no Binding answer from {server}");
}

fn uring_available() -> bool {
    turnd::net::uring::Uring::new().is_ok()
}

#[test]
fn auto_falls_back_to_epoll_when_io_uring_is_unavailable_and_serves() {
    let (t, _dir) = Turnd::start("auto", &[("TURND_DISABLE_IO_URING", "1")]);
    let line = t.wait_for("io backend");
    assert!(line.contains("backend=\"epoll\""), "fell back: {line}");
    assert!(line.contains("io_uring disabled"), "says why: {line}");
    binding(t.udp_addr());
}

#[test]
fn auto_takes_io_uring_where_the_kernel_offers_it_and_serves() {
    let (t, _dir) = Turnd::start("auto", &[]);
    let line = t.wait_for("io backend");
    let expected = if uring_available() {
        "io_uring"
    } else {
        "epoll"
    };
    assert!(
        line.contains(&format!("backend=\"{expected}\"")),
        "expected {expected}: {line}"
    );
    binding(t.udp_addr());
}

#[test]
fn explicit_epoll_is_honoured_and_serves() {
    let (t, _dir) = Turnd::start("epoll", &[]);
    let line = t.wait_for("io backend");
    assert!(line.contains("backend=\"epoll\""), "{line}");
    binding(t.udp_addr());
}

#[test]
fn explicit_io_uring_serves_or_fails_with_the_reason() {
    let (mut t, _dir) = Turnd::start("io_uring", &[]);
    if uring_available() {
        let line = t.wait_for("io backend");
        assert!(line.contains("backend=\"io_uring\""), "{line}");
        binding(t.udp_addr());
    } else {
        let status = t.child.wait().expect("exits");
        assert!(
            !status.success(),
            "io_uring asked for and unavailable: start fails"
        );
    }
}
