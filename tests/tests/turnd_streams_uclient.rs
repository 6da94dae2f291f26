//! coturn's `turnutils_uclient` relays through turnd over TCP (`-t`) and TLS (`-t -S`) with
//! zero loss (issue 4). UDP, TCP and TLS share one port number: turnd's TCP listener tells a
//! TLS ClientHello from plain TCP by the first byte, so `-p PORT` works for every transport.
//! turnd only: the coturn harness runs coturn without TCP and TLS.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use turnd_tests::peer::EchoPeer;
use turnd_tests::server::{free_udp_port, Auth, TestServer, LOCALHOST};
use turnd_tests::tools::{find_tool, run_with_timeout};

fn uclient_over_stream(tls: bool, first_relay_port: u16) {
    let Some(uclient) = find_tool("turnutils_uclient") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), cert.key_pair.serialize_pem()).unwrap();
    // One port for UDP and TCP; retry if another process takes the TCP side first.
    let (server, port) = (0..5)
        .find_map(|_| {
            let port = free_udp_port().ok()?;
            let toml = format!(
                "[listen]\nudp = [\"127.0.0.1:{port}\"]\ntcp = [\"127.0.0.1:{port}\"]\ntls = []\n\
                 [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
                 [auth]\nrealm = \"interop\"\nusers = [{{ name = \"alice\", password = \"wonderland\" }}]\n\
                 [relay]\naddresses = [\"127.0.0.1\"]\nmin_port = {first_relay_port}\nmax_port = {}\n\
                 [peers]\nallow = [\"127.0.0.0/8\"]\n\
                 [server]\nworkers = 2\n",
                dir.path().join("tls.crt").display(),
                dir.path().join("tls.key").display(),
                first_relay_port + 99
            );
            TestServer::turnd(&toml, Auth::alice()).ok().map(|s| (s, port))
        })
        .expect("turnd did not start");
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let mut cmd = Command::new(uclient);
    cmd.args(["-t", "-p", &port.to_string()])
        .args(["-e", "127.0.0.1", "-r", &peer.addr.port().to_string()])
        .args(["-m", "4", "-n", "500", "-l", "120", "-z", "2", "-c", "-X"])
        .args(["-u", "alice", "-w", "wonderland"]);
    if tls {
        cmd.arg("-S");
    }
    cmd.arg("127.0.0.1");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tail: Vec<&str> = all.lines().rev().take(12).collect();
    assert!(
        out.status.success(),
        "uclient failed: {}\n{tail:#?}",
        out.status
    );
    assert!(
        all.contains("tot_send_msgs=2000, tot_recv_msgs=2000"),
        "not everything came back:\n{tail:#?}"
    );
    assert!(all.contains("Total lost packets 0 "), "loss:\n{tail:#?}");
    assert!(peer.received() >= 2000, "the peer saw {}", peer.received());
    drop(server);
}

#[test]
fn uclient_relays_over_tcp_without_loss() {
    uclient_over_stream(false, 20700);
}

#[test]
fn uclient_relays_over_tls_without_loss() {
    uclient_over_stream(true, 20800);
}
