//! The client leg of one allocation: a connected UDP socket, a TCP stream or a TLS stream,
//! with the same frame-at-a-time interface over all three (RFC 8656 §3.1: over a stream, STUN
//! messages and ChannelData, padded to 4 bytes, follow each other without other framing).
//!
//! Every address a UDP client binds comes from [`next_client_addr`]: a fresh 127.1.x.y:port
//! per allocation for the life of the process, so a closed client socket's 5-tuple is never
//! reused while the server may still hold its allocation (no 437 Allocation Mismatch).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use turn_proto::codec::{frame_len, FrameLen};

/// Socket buffers the bench asks for (the kernel caps them at `net.core.*mem_max`).
pub const SOCKET_BUFFER: usize = 4 << 20;
/// Largest frame read.
const MAX_FRAME: usize = 4096;
/// Client ports used per client IP (below the kernel's ephemeral range, so nothing else
/// takes them by accident).
const PORTS: std::ops::Range<u16> = 10_000..20_000;

/// The client leg's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP (RFC 8656 §3.1 framing).
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl Transport {
    /// Lower-case name for tables.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }
}

/// Where the client legs go: the server's listener per transport, and the TLS trust.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// UDP listener.
    pub udp: SocketAddr,
    /// TCP listener, when the server has one.
    pub tcp: Option<SocketAddr>,
    /// TLS listener and a client config trusting its certificate, when the server has one.
    pub tls: Option<(SocketAddr, Arc<rustls::ClientConfig>)>,
}

static NEXT_CLIENT: AtomicU32 = AtomicU32::new(0);

/// A client address never handed out before in this process: 127.1.a.b:port.
#[must_use]
pub fn next_client_addr() -> SocketAddr {
    let n = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    let per_ip = u32::from(PORTS.end - PORTS.start);
    let ip_index = n / per_ip + 1;
    #[allow(clippy::cast_possible_truncation)]
    let port = PORTS.start + (n % per_ip) as u16;
    #[allow(clippy::cast_possible_truncation)]
    let ip = Ipv4Addr::new(127, 1, (ip_index >> 8) as u8, ip_index as u8);
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Binds a UDP socket with large buffers to `addr`.
///
/// # Errors
/// The socket could not be bound.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A UDP client socket on a fresh address (see [`next_client_addr`]), connected to `server`.
/// Must be called inside a tokio runtime.
///
/// # Errors
/// No address could be bound after a few tries.
pub fn fresh_udp(server: SocketAddr) -> anyhow::Result<UdpSocket> {
    let mut last = None;
    for _ in 0..8 {
        match bind_udp(next_client_addr()) {
            Ok(s) => {
                s.connect(server)?;
                s.set_nonblocking(true)?;
                return Ok(UdpSocket::from_std(s)?);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no client address"), Into::into))
        .context("binding a client socket")
}

/// A TLS client config that trusts exactly `cert` (for the name `localhost`).
///
/// # Errors
/// The certificate was refused by rustls.
pub fn tls_client_config(cert: &CertificateDer<'static>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One client leg.
pub struct Link {
    io: Io,
    buf: Vec<u8>,
    /// Bytes at the start of `buf` holding the frame last returned by [`Link::recv`].
    consumed: usize,
    /// Bytes of `buf` filled.
    filled: usize,
}

enum Io {
    Udp(Arc<UdpSocket>),
    Stream(Box<dyn Stream>),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("transport", &self.transport())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A UDP link over a connected socket.
    #[must_use]
    pub fn udp(socket: UdpSocket) -> Self {
        Self {
            io: Io::Udp(Arc::new(socket)),
            buf: vec![0; MAX_FRAME],
            consumed: 0,
            filled: 0,
        }
    }

    /// Opens a client leg of `transport` to `endpoint`. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// The server has no listener for `transport`, or connecting failed.
    pub async fn connect(endpoint: &Endpoint, transport: Transport) -> anyhow::Result<Self> {
        let io = match transport {
            Transport::Udp => Io::Udp(Arc::new(fresh_udp(endpoint.udp)?)),
            Transport::Tcp => {
                let addr = endpoint.tcp.context("the server has no TCP listener")?;
                let s = TcpStream::connect(addr).await.context("TCP connect")?;
                s.set_nodelay(true)?;
                Io::Stream(Box::new(s))
            }
            Transport::Tls => {
                let (addr, config) = endpoint.tls.clone().context("the server has no TLS")?;
                let s = TcpStream::connect(addr)
                    .await
                    .context("TCP connect for TLS")?;
                s.set_nodelay(true)?;
                let name = ServerName::try_from("localhost")?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, s)
                    .await
                    .context("TLS handshake")?;
                Io::Stream(Box::new(tls))
            }
        };
        Ok(Self {
            io,
            buf: vec![0; MAX_FRAME * 4],
            consumed: 0,
            filled: 0,
        })
    }

    /// The transport.
    #[must_use]
    pub fn transport(&self) -> &'static str {
        match self.io {
            Io::Udp(_) => "udp",
            Io::Stream(_) => "stream",
        }
    }

    /// The UDP socket, shared (a thread's pacer sends on it while the flow receives).
    #[must_use]
    pub fn udp_socket(&self) -> Option<Arc<UdpSocket>> {
        match &self.io {
            Io::Udp(s) => Some(s.clone()),
            Io::Stream(_) => None,
        }
    }

    /// Whether frames need stream padding (ChannelData to a multiple of 4).
    #[must_use]
    pub fn is_stream(&self) -> bool {
        matches!(self.io, Io::Stream(_))
    }

    /// Sends one frame (a datagram, or bytes on the stream).
    ///
    /// # Errors
    /// The socket failed.
    pub async fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        match &mut self.io {
            Io::Udp(s) => s.send(frame).await.map(|_| ()),
            Io::Stream(s) => {
                s.write_all(frame).await?;
                s.flush().await
            }
        }
    }

    /// Receives the next frame. Cancel-safe: a cancelled call loses nothing.
    ///
    /// # Errors
    /// The socket failed, the stream ended, or the stream carried garbage.
    pub async fn recv(&mut self) -> std::io::Result<&[u8]> {
        match &mut self.io {
            Io::Udp(s) => {
                let n = s.recv(&mut self.buf).await?;
                Ok(&self.buf[..n])
            }
            Io::Stream(s) => {
                if self.consumed > 0 {
                    self.buf.copy_within(self.consumed..self.filled, 0);
                    self.filled -= self.consumed;
                    self.consumed = 0;
                }
                loop {
                    match frame_len(&self.buf[..self.filled]) {
                        Ok(FrameLen::Complete(n)) => {
                            self.consumed = n;
                            return Ok(&self.buf[..n]);
                        }
                        Ok(FrameLen::NeedMore(n)) if n > self.buf.len() => {
                            return Err(std::io::Error::other("frame larger than the buffer"));
                        }
                        Ok(FrameLen::NeedMore(_)) => {}
                        Err(e) => return Err(std::io::Error::other(e.to_string())),
                    }
                    let n = s.read(&mut self.buf[self.filled..]).await?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    self.filled += n;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_never_handed_out_twice() {
        let a: Vec<SocketAddr> = (0..20_005).map(|_| next_client_addr()).collect();
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), a.len());
        assert!(a
            .iter()
            .all(|s| s.ip().to_string().starts_with("127.1.") && PORTS.contains(&s.port())));
    }
}
