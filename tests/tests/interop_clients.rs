//! Interop: independent TURN clients relay through the server under test
//! (`TURND_TEST_SERVER=coturn` runs the same tests against coturn's `turnserver`).
//!
//! - the webrtc-rs `turn` client allocates with a REST-API credential, creates a permission,
//!   binds a channel and exchanges datagrams with an echo peer through the channel;
//! - a turn-proto client exchanges datagrams through Send and Data indications (which the
//!   webrtc-rs client only uses until its channel is bound), then through a channel.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::UdpSocket;
use tokio::time::timeout;
use turnd_tests::client::{Incoming, MiniClient};
use turnd_tests::peer::EchoPeer;
use turnd_tests::server::{Auth, Kind, Options, TestServer, LOCALHOST};
use turnd_tests::IO_TIMEOUT;
use webrtc_util::Conn;

/// What crossed the client's socket, by kind.
#[derive(Debug, Default)]
struct Counts {
    channel_data_sent: AtomicU64,
    channel_data_received: AtomicU64,
    send_indications: AtomicU64,
    data_indications: AtomicU64,
    channel_bind_requests: AtomicU64,
    channel_bind_successes: AtomicU64,
    create_permission_successes: AtomicU64,
    allocate_successes: AtomicU64,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Counts {
    fn record(&self, d: &[u8], outgoing: bool) {
        let Some(&first) = d.first() else { return };
        let bump = |a: &AtomicU64| {
            a.fetch_add(1, Ordering::Relaxed);
        };
        if (0x40..=0x7F).contains(&first) {
            bump(if outgoing {
                &self.channel_data_sent
            } else {
                &self.channel_data_received
            });
            return;
        }
        if d.len() < 20 {
            return;
        }
        match u16::from_be_bytes([d[0], d[1]]) {
            0x0016 => bump(&self.send_indications),
            0x0017 => bump(&self.data_indications),
            0x0009 => bump(&self.channel_bind_requests),
            0x0109 => bump(&self.channel_bind_successes),
            0x0108 => bump(&self.create_permission_successes),
            0x0103 => bump(&self.allocate_successes),
            _ => {}
        }
    }
}

/// The client's UDP socket, recording what it sends and receives.
struct Tap {
    sock: UdpSocket,
    counts: Arc<Counts>,
}

#[async_trait]
impl Conn for Tap {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(self.sock.connect(addr).await?)
    }
    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let n = self.sock.recv(buf).await?;
        self.counts.record(&buf[..n], false);
        Ok(n)
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let (n, from) = self.sock.recv_from(buf).await?;
        self.counts.record(&buf[..n], false);
        Ok((n, from))
    }
    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        self.counts.record(buf, true);
        Ok(self.sock.send(buf).await?)
    }
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        self.counts.record(buf, true);
        Ok(self.sock.send_to(buf, target).await?)
    }
    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

fn start(auth: Auth, first_port: u16) -> Option<TestServer> {
    let opts = Options {
        auth,
        relay_ports: first_port..=first_port + 19,
    };
    TestServer::start(Kind::from_env(), &opts).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_rs_client_relays_through_a_channel_with_a_rest_credential() {
    let Some(server) = start(Auth::secret(), 20000) else {
        return;
    };
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let counts = Arc::new(Counts::default());
    let tap = Tap {
        sock: UdpSocket::bind((LOCALHOST, 0)).await.unwrap(),
        counts: counts.clone(),
    };
    let client = server
        .webrtc_client("webrtc-rs", Arc::new(tap))
        .await
        .unwrap();
    client.listen().await.unwrap();

    let relay = timeout(IO_TIMEOUT, client.allocate())
        .await
        .expect("allocate timed out")
        .expect("allocate failed");
    let relayed = relay.local_addr().unwrap();
    assert_eq!(relayed.ip(), LOCALHOST, "relayed address {relayed}");
    assert!(
        (20000..=20019).contains(&relayed.port()),
        "relay port {} outside the configured range",
        relayed.port()
    );
    assert_eq!(get(&counts.allocate_successes), 1);

    // The first datagrams go out as Send indications while the ChannelBind is in flight;
    // once it has succeeded the client switches to ChannelData.
    let mut buf = vec![0u8; 2048];
    let total = 60u32;
    for i in 0..total {
        let msg = format!("webrtc-rs datagram {i:03}");
        relay.send_to(msg.as_bytes(), peer.addr).await.unwrap();
        let (n, from) = timeout(IO_TIMEOUT, relay.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("echo {i} did not come back"))
            .unwrap();
        assert_eq!(from, peer.addr, "datagram {i} came from {from}");
        assert_eq!(&buf[..n], msg.as_bytes(), "datagram {i} garbled");
        if i == 0 {
            // Let the channel binding complete before the bulk of the exchange.
            for _ in 0..100 {
                if get(&counts.channel_bind_successes) > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(peer.received(), u64::from(total), "echo peer received");
    assert_eq!(
        peer.sources().into_iter().collect::<Vec<_>>(),
        vec![relayed],
        "the peer must see the relayed address as the source"
    );
    assert!(get(&counts.create_permission_successes) >= 1, "{counts:?}");
    assert!(get(&counts.channel_bind_requests) >= 1, "{counts:?}");
    assert!(get(&counts.channel_bind_successes) >= 1, "{counts:?}");
    // The webrtc-rs client uses Send indications until its ChannelBind completes; how many
    // that is depends on scheduling (3 were seen on a loaded 2-core machine).
    assert!(
        get(&counts.channel_data_sent) >= u64::from(total) - 10,
        "most datagrams must go out as ChannelData: {counts:?}"
    );
    assert!(
        get(&counts.channel_data_received) >= u64::from(total) - 10,
        "most echoes must come back as ChannelData: {counts:?}"
    );
    relay.close().await.unwrap();
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_data_indications_then_a_channel_relay_to_a_peer() {
    let Some(server) = start(Auth::alice(), 20020) else {
        return;
    };
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let (user, password) = server.credential("alice");
    let mut c = MiniClient::new(server.addr, &user, &password)
        .await
        .unwrap();
    let alloc = c.allocate().await.unwrap().success().unwrap();
    let relayed = alloc.relayed().expect("XOR-RELAYED-ADDRESS");
    assert_eq!(alloc.mapped(), Some(c.local_addr().unwrap()));
    assert_eq!(relayed.ip(), LOCALHOST);

    // Without a permission, a Send indication is dropped.
    c.send_indication(peer.addr, b"no permission yet")
        .await
        .unwrap();
    c.create_permission(peer.addr)
        .await
        .unwrap()
        .success()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(peer.received(), 0, "sent without a permission");

    for i in 0..20 {
        let msg = format!("send indication {i}");
        c.send_indication(peer.addr, msg.as_bytes()).await.unwrap();
        let got = c.recv_data(IO_TIMEOUT).await.unwrap();
        assert_eq!(
            got,
            Some(Incoming::DataIndication {
                peer: peer.addr,
                data: msg.into_bytes()
            }),
            "echo {i}"
        );
    }
    assert_eq!(peer.received(), 20);
    assert_eq!(
        peer.sources().into_iter().collect::<Vec<_>>(),
        vec![relayed]
    );

    // Once a channel is bound, the peer's datagrams come back as ChannelData, and Send
    // indications still work alongside it.
    c.channel_bind(0x4001, peer.addr)
        .await
        .unwrap()
        .success()
        .unwrap();
    for i in 0..20 {
        let msg = format!("channel data {i}");
        c.send_channel(0x4001, msg.as_bytes()).await.unwrap();
        let got = c.recv_data(IO_TIMEOUT).await.unwrap();
        assert_eq!(
            got,
            Some(Incoming::ChannelData {
                channel: 0x4001,
                data: msg.into_bytes()
            }),
            "echo {i}"
        );
    }
    c.send_indication(peer.addr, b"after bind").await.unwrap();
    let got = c.recv_data(IO_TIMEOUT).await.unwrap().expect("echo");
    assert_eq!(got.data(), b"after bind");
    assert_eq!(peer.received(), 41);

    let deleted = c.refresh(0).await.unwrap().success().unwrap();
    assert_eq!(deleted.lifetime(), Some(0));
}
