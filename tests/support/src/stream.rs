//! A TURN client over a byte stream (TCP, TLS, or UDP through [`UdpStream`]), RFC 8656 §3.1
//! framing, built on turn-proto's codec: enough to drive turnd in tests without trusting
//! turnd's own server code.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use turn_proto::codec::*;
use turn_proto::testing::{sign, Signing};

use crate::client::Response;
use crate::IO_TIMEOUT;

/// A connected UDP socket as a byte stream, one datagram per write and per read, so the
/// [`StreamClient`] drives a UDP client too (every datagram is one whole frame).
pub struct UdpStream(pub tokio::net::UdpSocket);

impl UdpStream {
    /// A socket on 127.0.0.1 connected to `server`.
    pub async fn connect(server: SocketAddr) -> Self {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.connect(server).await.unwrap();
        Self(s)
    }
}

impl AsyncRead for UdpStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.poll_recv(cx, buf)
    }
}

impl AsyncWrite for UdpStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.poll_send(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A TURN client over a byte stream (TCP or TLS), RFC 8656 §3.1 framing.
pub struct StreamClient<S> {
    pub io: S,
    buf: Vec<u8>,
    user: String,
    pass: String,
    realm: String,
    nonce: Option<String>,
    tid: u8,
}

impl<S: AsyncRead + AsyncWrite + Unpin> StreamClient<S> {
    pub fn new(io: S, user: &str, pass: &str) -> Self {
        Self {
            io,
            buf: Vec::new(),
            user: user.into(),
            pass: pass.into(),
            realm: String::new(),
            nonce: None,
            tid: 0,
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
        self.io.flush().await.unwrap();
    }

    /// The next frame (STUN message or padded ChannelData).
    pub async fn read_frame(&mut self) -> Vec<u8> {
        tokio::time::timeout(IO_TIMEOUT, async {
            loop {
                if let Ok(FrameLen::Complete(n)) = frame_len(&self.buf) {
                    return self.buf.drain(..n).collect();
                }
                let mut chunk = [0u8; 4096];
                let n = self.io.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed while waiting for a frame");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("timed out waiting for a frame")
    }

    fn build(
        &mut self,
        method: Method,
        tid: TransactionId,
        body: &dyn Fn(&mut MessageBuilder<'_>),
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(&mut out, MessageType::new(method, Class::Request), tid);
        body(&mut b);
        if let Some(nonce) = &self.nonce {
            sign(
                &mut b,
                Signing::Md5,
                &self.user,
                &self.pass,
                &self.realm,
                nonce,
            );
        }
        b.finish();
        out
    }

    /// A request, answering the 401/438 challenge once.
    pub async fn request(
        &mut self,
        method: Method,
        body: &dyn Fn(&mut MessageBuilder<'_>),
    ) -> Vec<u8> {
        self.tid = self.tid.wrapping_add(1);
        let tid = TransactionId([self.tid; 12]);
        for _ in 0..2 {
            let req = self.build(method, tid, body);
            self.send_raw(&req).await;
            let reply = self.read_frame().await;
            let m = Message::decode(&reply).unwrap();
            let code = m.get::<ErrorCodeAttr<'_>>().unwrap().map(|e| e.code.0);
            if matches!(code, Some(401 | 438)) && self.nonce.is_none() || code == Some(438) {
                self.realm = m.get::<Realm<'_>>().unwrap().unwrap().0.to_owned();
                self.nonce = Some(m.get::<Nonce<'_>>().unwrap().unwrap().0.to_owned());
                continue;
            }
            return reply;
        }
        panic!("authentication failed");
    }

    /// Allocate; returns the XOR-RELAYED-ADDRESS.
    pub async fn allocate(&mut self) -> SocketAddr {
        let r = self
            .request(Method::ALLOCATE, &|b| {
                b.add(&RequestedTransport::UDP);
            })
            .await;
        relayed_address(&r)
    }

    pub async fn bind_channel(&mut self, channel: u16, peer: SocketAddr) {
        let r = self
            .request(Method::CHANNEL_BIND, &|b| {
                b.add(&ChannelNumber::new(channel).unwrap())
                    .add(&XorPeerAddress(peer));
            })
            .await;
        assert_success(&r);
    }

    pub async fn permit(&mut self, peer: SocketAddr) {
        let r = self
            .request(Method::CREATE_PERMISSION, &|b| {
                b.add(&XorPeerAddress(peer));
            })
            .await;
        assert_success(&r);
    }

    /// Sends `data` on `channel` and returns what comes back on the channel.
    pub async fn channel_echo(&mut self, channel: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        ChannelData {
            channel: ChannelNumber::new(channel).unwrap(),
            data,
        }
        .encode(true, &mut out);
        self.send_raw(&out).await;
        let frame = self.read_frame().await;
        assert_eq!(
            frame.len() % 4,
            0,
            "ChannelData over a stream is padded (RFC 8656 §12.5)"
        );
        let cd = ChannelData::decode(&frame).unwrap();
        assert_eq!(cd.channel.get(), channel);
        cd.data.to_vec()
    }
}

/// The XOR-RELAYED-ADDRESS of `reply`, which must be a success response.
pub fn relayed_address(reply: &[u8]) -> SocketAddr {
    success(reply).relayed().expect("XOR-RELAYED-ADDRESS")
}

/// Panics unless `reply` is a success response.
pub fn assert_success(reply: &[u8]) {
    success(reply);
}

fn success(reply: &[u8]) -> Response {
    Response::decode(reply.to_vec()).unwrap().success().unwrap()
}
