//! TURN over TCP connections that cannot be held open (issue 12), against an in-process turnd:
//!
//! - a frame trickled one byte at a time is cut off by the per-frame timeout, even on a
//!   connection whose allocation keeps it from the idle timeout;
//! - a connection closes when its allocation expires, and when the client deletes it.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use turn_proto::codec::*;

/// Reads until the server closes the connection (EOF or reset) or `within` passes; true when
/// it closed.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_frame_is_cut_off_by_the_frame_timeout() {
    let running = turnd::run::start(settings(
        "[streams]\nidle_timeout = \"1s\"\nhandshake_timeout = \"30s\"\n",
    ))
    .unwrap();
    let peer = EchoPeer::start(LOCALHOST).unwrap();
    let mut c = StreamClient::new(TcpStream::connect(running.tcp[0]).await.unwrap(), "u", "p");
    // An allocation: the idle timeout no longer applies, only the frame timeout.
    c.allocate().await;
    c.bind_channel(0x4001, peer.addr).await;
    assert_eq!(c.channel_echo(0x4001, b"ok").await, b"ok");

    // A STUN header announcing a 65,532-byte body, then one byte every 200 ms.
    let mut header = Vec::new();
    header.extend_from_slice(&0x0001u16.to_be_bytes());
    header.extend_from_slice(&65_532u16.to_be_bytes());
    header.extend_from_slice(&0x2112_A442u32.to_be_bytes());
    header.extend_from_slice(&[7; 12]);
    c.io.write_all(&header).await.unwrap();
    let (mut rd, mut wr) = c.io.into_split();
    let trickle = tokio::spawn(async move {
        // Bounded: 100 bytes (20 s) at most.
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(&[0]).await.is_err() {
                return true;
            }
        }
        false
    });
    // Closed long before the 30 s handshake timeout or the 20 s of trickle.
    assert!(
        closed_within(&mut rd, Duration::from_secs(15)).await,
        "the trickle kept the connection open"
    );
    trickle.abort();
    // Other clients are served.
    let mut other = StreamClient::new(TcpStream::connect(running.tcp[0]).await.unwrap(), "u", "p");
    other.allocate().await;
    running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closes_when_its_allocation_expires_or_is_deleted() {
    let running = turnd::run::start(settings(
        "[lifetimes]\nallocation = \"2s\"\nmax_allocation = \"2s\"\n[streams]\nidle_timeout = \"60s\"\n",
    ))
    .unwrap();
    let peer = EchoPeer::start(LOCALHOST).unwrap();

    // Expiry: a 2 s allocation, never refreshed.
    let mut c = StreamClient::new(TcpStream::connect(running.tcp[0]).await.unwrap(), "u", "p");
    c.allocate().await;
    c.bind_channel(0x4001, peer.addr).await;
    assert_eq!(c.channel_echo(0x4001, b"alive").await, b"alive");
    assert!(
        closed_within(&mut c.io, Duration::from_secs(20)).await,
        "the connection outlived its expired allocation"
    );

    // Deletion: Refresh with LIFETIME 0 is answered, then the connection closes.
    let mut d = StreamClient::new(TcpStream::connect(running.tcp[0]).await.unwrap(), "u", "p");
    d.allocate().await;
    let bye = d
        .request(Method::REFRESH, &|b| {
            b.add(&Lifetime(0));
        })
        .await;
    assert_success(&bye);
    assert!(
        closed_within(&mut d.io, Duration::from_secs(20)).await,
        "the connection outlived its deleted allocation"
    );
    running.shutdown();
}
