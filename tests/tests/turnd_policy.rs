//! turnd-specific behaviour on loopback: external IP mapping, the peer policy, quotas, relay
//! port exhaustion and malformed input. (Not part of the coturn comparison: coturn's defaults
//! differ, e.g. it allows private peers.)
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use turnd_tests::client::{Incoming, MiniClient};
use turnd_tests::peer::EchoPeer;
use turnd_tests::server::{Auth, TestServer, LOCALHOST, REALM};
use turnd_tests::IO_TIMEOUT;

/// TOML for turnd on 127.0.0.1:0 with users alice and bob; `rest` is appended.
fn config(rest: &str) -> String {
    format!(
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\n\n\
         [auth]\nrealm = \"{REALM}\"\n\
         users = [{{ name = \"alice\", password = \"wonderland\" }}, \
                  {{ name = \"bob\", password = \"builder\" }}]\n\n\
         [server]\nworkers = 2\n\n{rest}"
    )
}

/// turnd serving `config(rest)`, clients authenticating as static users.
fn start(rest: &str) -> TestServer {
    TestServer::turnd(&config(rest), Auth::alice()).unwrap()
}

async fn alice(server: &TestServer) -> MiniClient {
    MiniClient::new(server.addr, "alice", "wonderland")
        .await
        .unwrap()
}

async fn bob(server: &TestServer) -> MiniClient {
    MiniClient::new(server.addr, "bob", "builder")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_ip_is_advertised_while_the_private_address_is_bound() {
    let server = start(
        "[relay]\naddresses = [\"127.0.0.2\"]\nexternal_ips = [\"127.0.0.3/127.0.0.2\"]\n\
             min_port = 21000\nmax_port = 21009\n\n[peers]\nallow = [\"127.0.0.0/8\"]\n",
    );
    let mut c = alice(&server).await;
    let relayed = c.allocate_relayed().await.unwrap();
    assert_eq!(relayed.ip(), IpAddr::from([127, 0, 0, 3]), "advertised");
    assert!((21000..=21009).contains(&relayed.port()), "{relayed}");
    let bound = SocketAddr::from(([127, 0, 0, 2], relayed.port()));

    // A peer datagram to the private (bound) address reaches the client.
    let peer = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    peer.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    c.create_permission(peer_addr)
        .await
        .unwrap()
        .success()
        .unwrap();
    peer.send_to(b"to the private address", bound).unwrap();
    let got = c.recv_data(IO_TIMEOUT).await.unwrap();
    assert_eq!(
        got,
        Some(Incoming::DataIndication {
            peer: peer_addr,
            data: b"to the private address".to_vec()
        })
    );

    // And what the client sends leaves from the private address.
    c.send_indication(peer_addr, b"from the relay")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"from the relay");
    assert_eq!(from, bound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_peers_get_403_and_nothing_is_sent() {
    // No [peers] allow: the built-in deny list applies. Relay on IPv4 and IPv6 so that
    // ::ffff:127.0.0.1 is checked by the policy, not rejected for its family.
    let server = start(
        "[relay]\naddresses = [\"127.0.0.1\", \"::1\"]\nmin_port = 21010\nmax_port = 21019\n",
    );
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let port = peer.addr.port();
    let mut v4 = alice(&server).await;
    v4.allocate().await.unwrap().success().unwrap();
    let mut v6 = alice(&server).await;
    let r6 = v6.allocate_ipv6().await.unwrap().success().unwrap();
    assert!(r6.relayed().unwrap().is_ipv6(), "{:?}", r6.relayed());

    let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
    // (peer, whether it goes through the IPv6 allocation). turnd checks an IPv4-mapped
    // peer as the IPv4 address it maps (it must not be a way
    // around the deny list).
    let cases: [(IpAddr, bool); 5] = [
        (LOCALHOST, false),
        (mapped, false),
        (Ipv4Addr::new(10, 0, 0, 1).into(), false),
        (Ipv4Addr::new(169, 254, 169, 254).into(), false),
        ("::1".parse().unwrap(), true),
    ];
    let mut channel = 0x4000;
    for (ip, ipv6) in cases {
        let c = if ipv6 { &mut v6 } else { &mut v4 };
        let target = SocketAddr::new(ip, port);
        let r = c.create_permission(target).await.unwrap();
        assert_eq!(r.error_code(), Some(403), "CreatePermission {target}");
        channel += 1;
        let r = c.channel_bind(channel, target).await.unwrap();
        assert_eq!(r.error_code(), Some(403), "ChannelBind {target}");
        c.send_indication(target, b"must not leave").await.unwrap();
        c.send_channel(channel, b"must not leave either")
            .await
            .unwrap();
    }
    // Through the IPv6 relay, ::ffff:127.0.0.1 is refused too: 403, or 443 because turnd
    // treats the mapped address as IPv4 and this allocation has no IPv4 relay.
    let target = SocketAddr::new(mapped, port);
    let r = v6.create_permission(target).await.unwrap();
    assert!(
        matches!(r.error_code(), Some(403 | 443)),
        "{:?}",
        r.error_code()
    );
    v6.send_indication(target, b"must not leave").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        peer.received(),
        0,
        "a denied peer received {:?}",
        peer.sources()
    );
    for c in [&mut v4, &mut v6] {
        assert_eq!(c.recv_data(Duration::from_millis(50)).await.unwrap(), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_per_user_quota_gives_486_and_frees_on_delete() {
    let server = start(
        "[relay]\naddresses = [\"127.0.0.1\"]\nmin_port = 21020\nmax_port = 21039\n\n\
             [quotas]\nallocations_per_user = 2\n",
    );
    let mut a1 = alice(&server).await;
    let mut a2 = alice(&server).await;
    let mut a3 = alice(&server).await;
    a1.allocate().await.unwrap().success().unwrap();
    a2.allocate().await.unwrap().success().unwrap();
    assert_eq!(a3.allocate().await.unwrap().error_code(), Some(486));
    // Another user is not affected.
    let mut b1 = bob(&server).await;
    b1.allocate().await.unwrap().success().unwrap();
    // Deleting one allocation gives the quota back.
    assert_eq!(
        a1.refresh(0).await.unwrap().success().unwrap().lifetime(),
        Some(0)
    );
    a3.allocate().await.unwrap().success().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_allocations_quota_gives_508() {
    let server = start(
        "[relay]\naddresses = [\"127.0.0.1\"]\nmin_port = 21040\nmax_port = 21059\n\n\
             [quotas]\ntotal_allocations = 2\n",
    );
    let mut a = alice(&server).await;
    let mut b = bob(&server).await;
    let mut b2 = bob(&server).await;
    a.allocate().await.unwrap().success().unwrap();
    b.allocate().await.unwrap().success().unwrap();
    assert_eq!(b2.allocate().await.unwrap().error_code(), Some(508));
    b.refresh(0).await.unwrap().success().unwrap();
    b2.allocate().await.unwrap().success().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_port_exhaustion_gives_508_and_a_freed_port_is_reused_at_once() {
    let server = start(
        "[relay]\naddresses = [\"127.0.0.1\"]\nmin_port = 21060\nmax_port = 21061\n\n\
             [peers]\nallow = [\"127.0.0.0/8\"]\n",
    );
    let mut c1 = alice(&server).await;
    let mut c2 = bob(&server).await;
    let mut c3 = alice(&server).await;
    let p1 = c1.allocate_relayed().await.unwrap();
    let p2 = c2.allocate_relayed().await.unwrap();
    let mut ports = [p1.port(), p2.port()];
    ports.sort_unstable();
    assert_eq!(ports, [21060, 21061]);
    for _ in 0..3 {
        assert_eq!(c3.allocate().await.unwrap().error_code(), Some(508));
    }
    // Free a port and take it again at once, a few times over: each Allocate right after
    // the Refresh(0) response must get the freed port (not 508).
    let (mut holder, mut waiting) = (c1, c3);
    for round in 0..10 {
        holder.refresh(0).await.unwrap().success().unwrap();
        let r = waiting.allocate().await.unwrap();
        assert_eq!(
            r.error_code(),
            None,
            "round {round}: Allocate right after the port {p1} was freed"
        );
        assert_eq!(
            r.relayed(),
            Some(p1),
            "round {round}: the freed port is handed out again"
        );
        std::mem::swap(&mut holder, &mut waiting);
    }
    let mut c3 = holder;
    // The new allocation on the reused port relays.
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    c3.create_permission(peer.addr)
        .await
        .unwrap()
        .success()
        .unwrap();
    c3.send_indication(peer.addr, b"reused").await.unwrap();
    let got = c3.recv_data(IO_TIMEOUT).await.unwrap().expect("echo");
    assert_eq!(got.data(), b"reused");
    assert_eq!(peer.sources().into_iter().collect::<Vec<_>>(), vec![p1]);
}

/// A valid Allocate request without credentials.
fn allocate_bytes() -> Vec<u8> {
    use turn_proto::codec::{
        Class, MessageBuilder, MessageType, Method, RequestedTransport, TransactionId,
    };
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(Method::ALLOCATE, Class::Request),
        TransactionId([9; 12]),
    );
    b.add(&RequestedTransport::UDP);
    b.add_fingerprint();
    b.finish();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_datagrams_are_dropped_and_the_server_keeps_serving() {
    let server = start(
        "[relay]\naddresses = [\"127.0.0.1\"]\nmin_port = 21070\nmax_port = 21079\n\n\
             [peers]\nallow = [\"127.0.0.0/8\"]\n",
    );
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    // An established allocation with a channel, to check it survives.
    let mut c = alice(&server).await;
    c.allocate().await.unwrap().success().unwrap();
    c.channel_bind(0x4000, peer.addr)
        .await
        .unwrap()
        .success()
        .unwrap();

    let valid = allocate_bytes();
    let mut bad_length = valid.clone();
    bad_length[3] = bad_length[3].wrapping_add(40); // header length beyond the datagram
    let mut bad_cookie = valid.clone();
    bad_cookie[4] ^= 0xFF;
    let mut bad_fingerprint = valid.clone();
    let last = bad_fingerprint.len() - 1;
    bad_fingerprint[last] ^= 0x01;
    let mut garbage: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0],
        b"hello, world".to_vec(),
        vec![0xFF; 1200],
        valid[..10].to_vec(),              // truncated header
        valid[..valid.len() - 4].to_vec(), // truncated attribute
        bad_length,
        bad_cookie,
        bad_fingerprint,
        vec![0x40, 0x00, 0x00, 0x10, 1, 2, 3], // ChannelData shorter than its length
        vec![0x40, 0x00],                      // ChannelData header cut short
        vec![0x4F, 0xFE, 0x00, 0x04, 1, 2, 3, 4], // unbound channel
        vec![0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], // trailing bytes
    ];
    // Deterministic pseudo-random junk of many lengths.
    let mut x: u32 = 0x1234_5678;
    for len in 1..64usize {
        let mut d = Vec::with_capacity(len * 7);
        for _ in 0..len * 7 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            d.push(x.to_be_bytes()[0]);
        }
        garbage.push(d);
    }
    let raw = MiniClient::new(server.addr, "alice", "wonderland")
        .await
        .unwrap();
    for d in &garbage {
        raw.send_raw(d).await.unwrap();
        c.send_raw(d).await.unwrap();
    }

    let mut raw = raw;
    // Nothing answers garbage...
    assert_eq!(
        raw.recv_any(Duration::from_millis(300)).await.unwrap(),
        None
    );
    // ...and nothing of it reached the peer (the one well-formed channel message above
    // has trailing bytes, so it is refused too).
    assert_eq!(peer.received(), 0, "garbage was relayed");
    // The server still serves: a new Allocate succeeds, the old allocation still relays.
    raw.allocate().await.unwrap().success().unwrap();
    c.send_channel(0x4000, b"still alive").await.unwrap();
    let got = c.recv_data(IO_TIMEOUT).await.unwrap().expect("echo");
    assert_eq!(
        got,
        Incoming::ChannelData {
            channel: 0x4000,
            data: b"still alive".to_vec()
        }
    );
    let mut probe = MiniClient::new(server.addr, "", "").await.unwrap();
    assert_eq!(probe.binding().await.unwrap(), probe.local_addr().unwrap());
}
