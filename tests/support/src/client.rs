//! A small TURN client on turn-proto's codec: long-term credentials (RFC 8489 §9.2), Allocate,
//! CreatePermission, ChannelBind, Send indications and ChannelData (RFC 8656), and raw
//! datagrams for malformed-input tests.
//!
//! Requests are retransmitted (RFC 8489 §6.2.1, shortened) and every wait is bounded.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use tokio::net::UdpSocket;
use turn_proto::codec::{
    AddressFamily, ChannelData, ChannelNumber, Class, Data, ErrorCodeAttr, Lifetime, Message,
    MessageBuilder, MessageType, Method, Nonce, Realm, RequestedAddressFamily, RequestedTransport,
    TransactionId, XorMappedAddress, XorPeerAddress, XorRelayedAddress,
};
use turn_proto::testing::{sign, Signing};

use crate::IO_TIMEOUT;

/// A decoded response, owning its bytes.
#[derive(Debug, Clone)]
pub struct Response {
    bytes: Vec<u8>,
}

impl Response {
    /// `bytes`, which must decode as a STUN message.
    ///
    /// # Errors
    /// They do not.
    pub fn decode(bytes: Vec<u8>) -> anyhow::Result<Self> {
        Message::decode(&bytes).map_err(|e| anyhow::anyhow!("not a STUN message: {e}"))?;
        Ok(Self { bytes })
    }

    fn msg(&self) -> Message<'_> {
        Message::decode(&self.bytes).unwrap_or_else(|e| unreachable!("checked on receipt: {e}"))
    }

    /// The message class (success or error).
    #[must_use]
    pub fn class(&self) -> Class {
        self.msg().typ().class
    }

    /// The method.
    #[must_use]
    pub fn method(&self) -> Method {
        self.msg().typ().method
    }

    /// The ERROR-CODE number, if any.
    #[must_use]
    pub fn error_code(&self) -> Option<u16> {
        self.msg()
            .get::<ErrorCodeAttr<'_>>()
            .ok()
            .flatten()
            .map(|e| e.code.0)
    }

    /// XOR-RELAYED-ADDRESS.
    #[must_use]
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.msg()
            .get::<XorRelayedAddress>()
            .ok()
            .flatten()
            .map(|a| a.0)
    }

    /// XOR-MAPPED-ADDRESS.
    #[must_use]
    pub fn mapped(&self) -> Option<SocketAddr> {
        self.msg()
            .get::<XorMappedAddress>()
            .ok()
            .flatten()
            .map(|a| a.0)
    }

    /// LIFETIME in seconds.
    #[must_use]
    pub fn lifetime(&self) -> Option<u32> {
        self.msg().get::<Lifetime>().ok().flatten().map(|l| l.0)
    }

    /// The raw message.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Fails unless this is a success response.
    ///
    /// # Errors
    /// An error response, with its code.
    pub fn success(self) -> anyhow::Result<Self> {
        match self.class() {
            Class::Success => Ok(self),
            _ => bail!(
                "{} failed: error {:?}",
                self.method().name(),
                self.error_code()
            ),
        }
    }
}

/// Application data that arrived from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A Data indication (RFC 8656 §11.4) from `peer`.
    DataIndication {
        /// XOR-PEER-ADDRESS.
        peer: SocketAddr,
        /// DATA.
        data: Vec<u8>,
    },
    /// A ChannelData message (RFC 8656 §12.4).
    ChannelData {
        /// The channel number.
        channel: u16,
        /// The data.
        data: Vec<u8>,
    },
}

impl Incoming {
    /// The application data.
    #[must_use]
    pub fn data(&self) -> &[u8] {
        match self {
            Self::DataIndication { data, .. } | Self::ChannelData { data, .. } => data,
        }
    }
}

/// A TURN client over one UDP socket.
#[derive(Debug)]
pub struct MiniClient {
    sock: UdpSocket,
    server: SocketAddr,
    username: String,
    password: String,
    realm: Option<String>,
    nonce: Option<String>,
    /// Datagrams that were not the response awaited (data, late responses); bounded.
    pending: VecDeque<Vec<u8>>,
}

const MAX_PENDING: usize = 4096;

fn new_tid() -> TransactionId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut id = [0u8; 12];
    id[..8].copy_from_slice(&n.to_be_bytes());
    #[allow(clippy::cast_possible_truncation)]
    id[8..].copy_from_slice(&((t as u32) ^ std::process::id()).to_be_bytes());
    TransactionId(id)
}

impl MiniClient {
    /// Binds `local` (a loopback address, port 0 for any) for talking to `server`.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub async fn bind(
        local: SocketAddr,
        server: SocketAddr,
        username: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        assert!(local.ip().is_loopback() && server.ip().is_loopback());
        Ok(Self {
            sock: UdpSocket::bind(local).await?,
            server,
            username: username.to_owned(),
            password: password.to_owned(),
            realm: None,
            nonce: None,
            pending: VecDeque::new(),
        })
    }

    /// Binds `127.0.0.1:0` for talking to `server`.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub async fn new(server: SocketAddr, username: &str, password: &str) -> anyhow::Result<Self> {
        Self::bind(
            SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 0),
            server,
            username,
            password,
        )
        .await
    }

    /// The client's own socket address.
    ///
    /// # Errors
    /// The OS cannot say.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }

    /// Sends raw bytes to the server.
    ///
    /// # Errors
    /// The send failed.
    pub async fn send_raw(&self, bytes: &[u8]) -> anyhow::Result<()> {
        self.sock.send_to(bytes, self.server).await?;
        Ok(())
    }

    /// Sends a request and returns the server's response, handling 401 (first contact)
    /// and 438 (stale nonce) once each. `add` appends the method's own attributes.
    ///
    /// # Errors
    /// No response within the timeout, or a socket error.
    pub async fn request(
        &mut self,
        method: Method,
        add: impl Fn(&mut MessageBuilder<'_>),
    ) -> anyhow::Result<Response> {
        let mut retried = false;
        loop {
            let tid = new_tid();
            let mut out = Vec::new();
            let mut b =
                MessageBuilder::new(&mut out, MessageType::new(method, Class::Request), tid);
            add(&mut b);
            if let (Some(realm), Some(nonce)) = (&self.realm, &self.nonce) {
                sign(
                    &mut b,
                    Signing::Md5,
                    &self.username,
                    &self.password,
                    realm,
                    nonce,
                );
            }
            b.add_fingerprint();
            b.finish();
            let resp = self.transact(tid, &out).await?;
            let code = resp.error_code();
            let challenge = match code {
                Some(401) => self.realm.is_none(),
                Some(438) => true,
                _ => false,
            };
            if challenge && !retried {
                let msg = resp.msg();
                let realm = msg.get::<Realm<'_>>().ok().flatten().context("no REALM")?;
                let nonce = msg.get::<Nonce<'_>>().ok().flatten().context("no NONCE")?;
                self.realm = Some(realm.0.to_owned());
                self.nonce = Some(nonce.0.to_owned());
                retried = true;
                continue;
            }
            return Ok(resp);
        }
    }

    /// Sends `out` (a request with transaction id `tid`) until its response arrives.
    async fn transact(&mut self, tid: TransactionId, out: &[u8]) -> anyhow::Result<Response> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut rto = Duration::from_millis(250);
        let mut buf = vec![0u8; 65_536];
        loop {
            self.sock.send_to(out, self.server).await?;
            let resend = Instant::now() + rto;
            rto *= 2;
            loop {
                let wait = resend.min(deadline);
                let Ok(r) =
                    tokio::time::timeout_at(wait.into(), self.sock.recv_from(&mut buf)).await
                else {
                    break;
                };
                let (n, from) = r?;
                if from != self.server {
                    continue;
                }
                let d = &buf[..n];
                if let Ok(m) = Message::decode(d) {
                    if m.transaction_id() == tid
                        && matches!(m.typ().class, Class::Success | Class::Error)
                    {
                        return Ok(Response { bytes: d.to_vec() });
                    }
                }
                if self.pending.len() < MAX_PENDING {
                    self.pending.push_back(d.to_vec());
                }
            }
            if Instant::now() >= deadline {
                bail!("no response from {} within {IO_TIMEOUT:?}", self.server);
            }
        }
    }

    /// A Binding request (no authentication); returns XOR-MAPPED-ADDRESS.
    ///
    /// # Errors
    /// No (successful) response, or no XOR-MAPPED-ADDRESS.
    pub async fn binding(&mut self) -> anyhow::Result<SocketAddr> {
        let tid = new_tid();
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::BINDING, Class::Request),
            tid,
        );
        b.add_fingerprint();
        b.finish();
        self.transact(tid, &out)
            .await?
            .success()?
            .mapped()
            .context("no XOR-MAPPED-ADDRESS")
    }

    /// Allocate (UDP relay), which must succeed; returns the XOR-RELAYED-ADDRESS.
    ///
    /// # Errors
    /// No response, an error response, or no XOR-RELAYED-ADDRESS.
    pub async fn allocate_relayed(&mut self) -> anyhow::Result<SocketAddr> {
        self.allocate()
            .await?
            .success()?
            .relayed()
            .context("no XOR-RELAYED-ADDRESS")
    }

    /// Allocate (UDP relay), returning the full response.
    ///
    /// # Errors
    /// No response.
    pub async fn allocate(&mut self) -> anyhow::Result<Response> {
        self.request(Method::ALLOCATE, |b| {
            b.add(&RequestedTransport::UDP);
        })
        .await
    }

    /// Allocate an IPv6 relay (REQUESTED-ADDRESS-FAMILY, RFC 8656 §7.1).
    ///
    /// # Errors
    /// No response.
    pub async fn allocate_ipv6(&mut self) -> anyhow::Result<Response> {
        self.request(Method::ALLOCATE, |b| {
            b.add(&RequestedTransport::UDP);
            b.add(&RequestedAddressFamily(AddressFamily::IPV6));
        })
        .await
    }

    /// Refresh with `lifetime` seconds (0 deletes the allocation).
    ///
    /// # Errors
    /// No response.
    pub async fn refresh(&mut self, lifetime: u32) -> anyhow::Result<Response> {
        self.request(Method::REFRESH, |b| {
            b.add(&Lifetime(lifetime));
        })
        .await
    }

    /// CreatePermission for `peer`.
    ///
    /// # Errors
    /// No response.
    pub async fn create_permission(&mut self, peer: SocketAddr) -> anyhow::Result<Response> {
        self.request(Method::CREATE_PERMISSION, |b| {
            b.add(&XorPeerAddress(peer));
        })
        .await
    }

    /// ChannelBind `channel` to `peer`.
    ///
    /// # Errors
    /// No response, or `channel` is outside 0x4000–0x7FFF.
    pub async fn channel_bind(
        &mut self,
        channel: u16,
        peer: SocketAddr,
    ) -> anyhow::Result<Response> {
        let ch = ChannelNumber::new(channel)?;
        self.request(Method::CHANNEL_BIND, |b| {
            b.add(&ch);
            b.add(&XorPeerAddress(peer));
        })
        .await
    }

    /// Sends `data` to `peer` in a Send indication (RFC 8656 §11.3).
    ///
    /// # Errors
    /// The send failed.
    pub async fn send_indication(&self, peer: SocketAddr, data: &[u8]) -> anyhow::Result<()> {
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::SEND, Class::Indication),
            new_tid(),
        );
        b.add(&XorPeerAddress(peer));
        b.add(&Data(data));
        b.add_fingerprint();
        b.finish();
        self.send_raw(&out).await
    }

    /// Sends `data` on `channel` as ChannelData.
    ///
    /// # Errors
    /// The send failed, or the channel number is invalid.
    pub async fn send_channel(&self, channel: u16, data: &[u8]) -> anyhow::Result<()> {
        let mut out = Vec::new();
        ChannelData {
            channel: ChannelNumber::new(channel)?,
            data,
        }
        .encode(false, &mut out);
        self.send_raw(&out).await
    }

    /// The next Data indication or ChannelData, or `None` after `timeout`. Other datagrams
    /// (late responses) are skipped.
    ///
    /// # Errors
    /// A socket error.
    pub async fn recv_data(&mut self, timeout: Duration) -> anyhow::Result<Option<Incoming>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(d) = self.recv_any(left).await? else {
                return Ok(None);
            };
            if let Some(i) = parse_incoming(&d) {
                return Ok(Some(i));
            }
        }
    }
}

impl MiniClient {
    /// Any datagram from the server (including earlier unmatched ones), or `None` after
    /// `timeout`.
    ///
    /// # Errors
    /// A socket error.
    pub async fn recv_any(&mut self, timeout: Duration) -> anyhow::Result<Option<Vec<u8>>> {
        if let Some(d) = self.pending.pop_front() {
            return Ok(Some(d));
        }
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok(r) =
                tokio::time::timeout_at(deadline.into(), self.sock.recv_from(&mut buf)).await
            else {
                return Ok(None);
            };
            let (n, from) = r?;
            if from == self.server {
                return Ok(Some(buf[..n].to_vec()));
            }
        }
    }
}

fn parse_incoming(d: &[u8]) -> Option<Incoming> {
    if let Ok(cd) = ChannelData::decode(d) {
        return Some(Incoming::ChannelData {
            channel: cd.channel.get(),
            data: cd.data.to_vec(),
        });
    }
    let m = Message::decode(d).ok()?;
    if m.typ() != MessageType::new(Method::DATA, Class::Indication) {
        return None;
    }
    let peer = m.get::<XorPeerAddress>().ok()??.0;
    let data = m.get::<Data<'_>>().ok()??.0.to_vec();
    Some(Incoming::DataIndication { peer, data })
}

/// A TURN REST API credential (username `<expiry>:<user>`, password
/// `base64(HMAC-SHA1(secret, username))`) valid for `ttl` from now.
#[must_use]
pub fn rest_credential(secret: &str, user: &str, ttl: Duration) -> (String, String) {
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + ttl.as_secs();
    turn_proto::testing::rest_credential(secret.as_bytes(), user, expiry)
}
