//! TURN over TCP and TLS (RFC 8656 §3.1) against an in-process turnd on loopback: framing,
//! relaying to a UDP echo peer, TLS and TCP on one port, certificate hot reload through a
//! Kubernetes-style symlink swap, and stream hygiene (slow-loris, garbage, idle, caps).

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use turn_proto::codec::*;

struct TestCert {
    pem: String,
    key: String,
    der: CertificateDer<'static>,
}

fn make_cert() -> TestCert {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    TestCert {
        pem: c.cert.pem(),
        key: c.key_pair.serialize_pem(),
        der: c.cert.der().clone(),
    }
}

/// Writes a cert the way a Kubernetes Secret volume does: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<version>`, and an update swaps `..data` atomically.
fn k8s_secret_write(dir: &Path, version: &str, cert: &str, key: &str) {
    let v = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("tls.crt"), cert).unwrap();
    std::fs::write(v.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        if std::fs::symlink_metadata(dir.join(f)).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f)).unwrap();
        }
    }
}

fn connector(trusted: &[&CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add((*c).clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"stun.turn".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    addr: SocketAddr,
    trusted: &[&CertificateDer<'static>],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector(trusted)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

fn presented(s: &tokio_rustls::client::TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

async fn relay_through<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    client: &mut StreamClient<S>,
    peer: SocketAddr,
) {
    let relayed = client.allocate().await;
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    client.bind_channel(0x4001, peer).await;
    for len in [1usize, 3, 4, 1200] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        assert_eq!(client.channel_echo(0x4001, &data).await, data);
    }
    // A Send indication goes out too; the echo returns on the channel bound to that peer.
    let mut send = Vec::new();
    let mut b = MessageBuilder::new(
        &mut send,
        MessageType::new(Method::SEND, Class::Indication),
        TransactionId([9; 12]),
    );
    b.add(&XorPeerAddress(peer)).add(&Data(b"via-send"));
    b.finish();
    client.send_raw(&send).await;
    // The echo comes back from the channel's peer: as ChannelData.
    let frame = client.read_frame().await;
    assert_eq!(ChannelData::decode(&frame).unwrap().data, b"via-send");
}

#[tokio::test]
async fn rfc8656_3_1_tcp_allocation_relays_channel_data_and_send_to_udp_peer() {
    let running = turnd::run::start(settings("")).unwrap();
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let tcp = TcpStream::connect(running.tcp[0]).await.unwrap();
    let mut c = StreamClient::new(tcp, "u", "p");
    relay_through(&mut c, peer.addr).await;
    running.shutdown();
}

#[tokio::test]
async fn data_indication_over_tcp_for_a_peer_without_channel() {
    let running = turnd::run::start(settings("")).unwrap();
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let tcp = TcpStream::connect(running.tcp[0]).await.unwrap();
    let mut c = StreamClient::new(tcp, "u", "p");
    c.allocate().await;
    c.permit(peer.addr).await;
    let mut send = Vec::new();
    let mut b = MessageBuilder::new(
        &mut send,
        MessageType::new(Method::SEND, Class::Indication),
        TransactionId([9; 12]),
    );
    b.add(&XorPeerAddress(peer.addr)).add(&Data(b"hello"));
    b.finish();
    c.send_raw(&send).await;
    let frame = c.read_frame().await;
    let m = Message::decode(&frame).unwrap();
    assert_eq!(m.typ(), MessageType::new(Method::DATA, Class::Indication));
    assert_eq!(m.get::<Data<'_>>().unwrap().unwrap().0, b"hello");
    assert_eq!(m.get::<XorPeerAddress>().unwrap().unwrap().0, peer.addr);
    running.shutdown();
}

fn tls_settings(dir: &Path) -> turnd::config::Settings {
    settings(&format!(
        "tls = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("tls.crt").display(),
        dir.join("tls.key").display()
    ))
}

#[tokio::test]
async fn tls_allocation_relays_and_tls_and_tcp_share_every_port() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_cert();
    k8s_secret_write(dir.path(), "v1", &a.pem, &a.key);
    let running = turnd::run::start(tls_settings(dir.path())).unwrap();
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    for port in [running.tls[0], running.tcp[0]] {
        let tls = tls_connect(port, &[&a.der]).await.unwrap();
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"stun.turn"[..]),
            "RFC 7443 ALPN"
        );
        let mut c = StreamClient::new(tls, "u", "p");
        relay_through(&mut c, peer.addr).await;
        // Plain TCP on the same port.
        let mut c = StreamClient::new(TcpStream::connect(port).await.unwrap(), "u", "p");
        relay_through(&mut c, peer.addr).await;
    }
    running.shutdown();
}

#[tokio::test]
async fn certificate_hot_reload_keeps_sessions_and_refuses_a_broken_cert() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_cert();
    let b = make_cert();
    k8s_secret_write(dir.path(), "v1", &a.pem, &a.key);
    let running = turnd::run::start(tls_settings(dir.path())).unwrap();
    let addr = running.tls[0];
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let tls = tls_connect(addr, &[&a.der]).await.unwrap();
    assert_eq!(presented(&tls), a.der);
    let mut old = StreamClient::new(tls, "u", "p");
    old.allocate().await;
    old.bind_channel(0x4002, peer.addr).await;
    assert_eq!(old.channel_echo(0x4002, b"before").await, b"before");
    let not_after_a = running.certificate.as_ref().unwrap().not_after();

    // The Secret is updated: ..data now points at v2 with certificate B.
    k8s_secret_write(dir.path(), "v2", &b.pem, &b.key);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = tls_connect(addr, &[&a.der, &b.der]).await.unwrap();
        if presented(&s) == b.der {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate B never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The session from before the swap still relays, over the same TLS connection.
    assert_eq!(old.channel_echo(0x4002, b"after").await, b"after");
    assert!(running.certificate.as_ref().unwrap().not_after() >= not_after_a);

    // A broken certificate is refused: B stays in service.
    k8s_secret_write(
        dir.path(),
        "v3",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        &b.key,
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = tls_connect(addr, &[&a.der, &b.der]).await.unwrap();
    assert_eq!(presented(&s), b.der);
    assert_eq!(old.channel_echo(0x4002, b"still").await, b"still");
    running.shutdown();
}

#[tokio::test]
async fn bad_certificate_at_start_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), "garbage").unwrap();
    std::fs::write(dir.path().join("tls.key"), "garbage").unwrap();
    let err = turnd::run::start(tls_settings(dir.path())).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("tls.crt"), "{msg}");
}

#[tokio::test]
async fn slow_loris_and_garbage_do_not_stop_other_clients() {
    let running = turnd::run::start(settings(
        "[streams]\nidle_timeout = 1\nhandshake_timeout = 1\nmax_connections_per_ip = 8\n",
    ))
    .unwrap();
    let addr = running.tcp[0];
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    // An attacker from 127.0.0.2 fills its per-IP quota with half frames.
    let mut loris = Vec::new();
    for _ in 0..8 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut c = s.connect(addr).await.unwrap();
        c.write_all(&[0x00, 0x03, 0x00, 0x40, 0x21, 0x12])
            .await
            .unwrap();
        loris.push(c);
    }
    // The ninth from the same IP is refused (closed at once).
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut ninth = s.connect(addr).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(IO_TIMEOUT, ninth.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "over the per-IP cap: closed");

    // Garbage closes only its own connection.
    let mut junk = TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let n = tokio::time::timeout(IO_TIMEOUT, junk.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "garbage: closed");

    // A well-behaved client from another address is served meanwhile.
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let mut good = StreamClient::new(s.connect(addr).await.unwrap(), "u", "p");
    good.allocate().await;
    good.bind_channel(0x4003, peer.addr).await;
    assert_eq!(good.channel_echo(0x4003, b"ok").await, b"ok");

    // The half-frame connections are closed by the idle timeout (no allocation).
    for mut c in loris {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "idle half-frame connection closed");
    }
    // The allocated connection outlives the idle timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(good.channel_echo(0x4003, b"later").await, b"later");
    running.shutdown();
}

#[tokio::test]
async fn allocation_dies_with_its_connection() {
    let running = turnd::run::start(settings("")).unwrap();
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let mut c = StreamClient::new(TcpStream::connect(running.tcp[0]).await.unwrap(), "u", "p");
    let relayed = c.allocate().await;
    c.permit(peer.addr).await;
    drop(c);
    // The relay port is released: a UDP socket can bind it once turnd let it go.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::UdpSocket::bind(relayed).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "relay socket {relayed} still bound"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    running.shutdown();
}

/// A TLS client that stops reading while relayed data piles up (well over rustls' own 64 KiB
/// buffer, under turnd's write limit) gets every frame once it reads again: the connection
/// stays up and the stream stays whole.
#[tokio::test]
async fn a_tls_client_that_reads_late_gets_everything() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_cert();
    k8s_secret_write(dir.path(), "v1", &a.pem, &a.key);
    let running = turnd::run::start(tls_settings(dir.path())).unwrap();
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    // A small receive buffer, so the server's socket blocks and frames wait on its side.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(running.tls[0]).await.unwrap();
    let tls = connector(&[&a.der])
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut c = StreamClient::new(tls, "u", "p");
    c.allocate().await;
    c.bind_channel(0x4003, peer.addr).await;
    const N: usize = 200;
    const LEN: usize = 1000;
    for i in 0..N {
        let mut frame = vec![0x40, 0x03];
        frame.extend_from_slice(&u16::try_from(LEN).unwrap().to_be_bytes());
        frame.extend((0..LEN).map(|k| ((i + k) % 251) as u8));
        c.send_raw(&frame).await;
        // Paced, so the UDP legs (peer and relay socket buffers) never overflow: only the
        // TLS leg toward the client backs up.
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Let the echoes pile up on the server's side before reading any.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..N {
        let f = c.read_frame().await;
        assert_eq!(&f[..2], &[0x40, 0x03], "frame {i} is ChannelData");
        let want: Vec<u8> = (0..LEN).map(|k| ((i + k) % 251) as u8).collect();
        assert_eq!(&f[4..4 + LEN], &want[..], "frame {i} intact and in order");
    }
    running.shutdown();
}

/// Allocations relaying to the same peer at the same moment each get only their own echoes,
/// every one of them: a relay's datagrams leave from its own relayed address even when a
/// pass batches several relays' datagrams to one destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_sharing_a_peer_get_only_their_own_echoes() {
    let running = turnd::run::start(settings("")).unwrap();
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    const CLIENTS: usize = 6;
    const EACH: usize = 40;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = StreamClient::new(UdpStream::connect(running.udp[0]).await, "u", "p");
        c.allocate().await;
        c.bind_channel(0x4005, peer.addr).await;
        clients.push(c);
    }
    // Everyone sends a burst at once, then reads its echoes.
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(id, mut c)| {
            tokio::spawn(async move {
                let id = u8::try_from(id).unwrap();
                for n in 0..EACH {
                    let mut frame = vec![0x40, 0x05, 0, 8];
                    frame.extend_from_slice(&[id, u8::try_from(n).unwrap(), 0, 0, 0, 0, 0, 0]);
                    c.send_raw(&frame).await;
                }
                let mut seen = [false; EACH];
                for _ in 0..EACH {
                    let f = c.read_frame().await;
                    assert_eq!(f[4], id, "client {id} got another allocation's echo");
                    seen[usize::from(f[5])] = true;
                }
                assert!(seen.iter().all(|s| *s), "client {id} missed echoes");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    running.shutdown();
}
