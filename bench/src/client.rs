//! The control side of a TURN client: a long-term-credential Allocate (401 challenge, then the
//! retry with USERNAME, REALM, NONCE and MESSAGE-INTEGRITY), a ChannelBind to the peer, and a
//! Refresh with LIFETIME 0 to release the allocation (RFC 8656 §7, §12, §8).
//!
//! Blocking and simple on purpose: set-up is not what the bench measures. Every wait is
//! bounded by a receive timeout and a retransmission count.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use turn_proto::auth::{long_term_key_md5, rest_api_password};
use turn_proto::codec::{
    ChannelNumber, Class, ErrorCode, ErrorCodeAttr, Lifetime, Message, MessageBuilder, MessageType,
    Method, Nonce, Realm, RequestedTransport, TransactionId, Username, XorPeerAddress,
    XorRelayedAddress,
};

/// Wait for one response before retransmitting.
const RTO: Duration = Duration::from_millis(250);
/// Transmissions of one request before giving up.
const ATTEMPTS: usize = 6;

/// TURN REST API credentials (username `<expiry>:<user>`, password
/// `base64(HMAC-SHA1(secret, username))`), understood by turnd and coturn alike.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The username.
    pub username: String,
    /// The password.
    pub password: String,
}

impl Credentials {
    /// Credentials for `user` under the shared `secret`, valid for `ttl`.
    #[must_use]
    pub fn rest(secret: &str, user: &str, ttl: Duration) -> Self {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + ttl.as_secs();
        let username = format!("{expiry}:{user}");
        let password = rest_api_password(secret.as_bytes(), &username);
        Self { username, password }
    }
}

/// An allocation with one channel bound to a peer, ready for ChannelData.
#[derive(Debug)]
pub struct Allocation {
    /// The client socket (connected to the server).
    pub socket: UdpSocket,
    /// The relayed transport address the server advertised.
    pub relayed: SocketAddr,
    /// The channel bound to the peer.
    pub channel: ChannelNumber,
    auth: Auth,
}

#[derive(Debug, Clone)]
struct Auth {
    username: String,
    realm: String,
    nonce: String,
    key: [u8; 16],
}

fn new_tid() -> TransactionId {
    TransactionId(rand::random())
}

/// One response, owned.
struct Response {
    class: Class,
    code: Option<ErrorCode>,
    realm: Option<String>,
    nonce: Option<String>,
    relayed: Option<SocketAddr>,
}

/// Sends `request` and waits for the response with its transaction id, retransmitting.
fn transact(sock: &UdpSocket, request: &[u8], tid: TransactionId) -> anyhow::Result<Response> {
    let mut buf = [0u8; 2048];
    for _ in 0..ATTEMPTS {
        sock.send(request).context("sending a request")?;
        loop {
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(e).context("receiving a response"),
            };
            let Ok(msg) = Message::decode(&buf[..n]) else {
                continue; // a stray ChannelData or garbage: not ours
            };
            if msg.transaction_id() != tid {
                continue;
            }
            return Ok(Response {
                class: msg.typ().class,
                code: msg
                    .get::<ErrorCodeAttr<'_>>()
                    .ok()
                    .flatten()
                    .map(|e| e.code),
                realm: msg
                    .get::<Realm<'_>>()
                    .ok()
                    .flatten()
                    .map(|r| r.0.to_owned()),
                nonce: msg
                    .get::<Nonce<'_>>()
                    .ok()
                    .flatten()
                    .map(|r| r.0.to_owned()),
                relayed: msg.get::<XorRelayedAddress>().ok().flatten().map(|r| r.0),
            });
        }
    }
    bail!("no response after {ATTEMPTS} transmissions")
}

/// Builds an authenticated request; `attrs` adds the method's own attributes.
fn signed(
    method: Method,
    auth: &Auth,
    attrs: impl FnOnce(&mut MessageBuilder<'_>),
) -> (Vec<u8>, TransactionId) {
    let tid = new_tid();
    let mut out = Vec::with_capacity(256);
    let mut b = MessageBuilder::new(&mut out, MessageType::new(method, Class::Request), tid);
    attrs(&mut b);
    b.add(&Username(&auth.username))
        .add(&Realm(&auth.realm))
        .add(&Nonce(&auth.nonce))
        .add_message_integrity(&auth.key)
        .add_fingerprint();
    b.finish();
    (out, tid)
}

/// Sends an authenticated request, refreshing the nonce once on 438 Stale Nonce.
fn authed(
    sock: &UdpSocket,
    method: Method,
    auth: &mut Auth,
    attrs: impl Fn(&mut MessageBuilder<'_>),
) -> anyhow::Result<Response> {
    for _ in 0..2 {
        let (req, tid) = signed(method, auth, &attrs);
        let resp = transact(sock, &req, tid)?;
        if resp.class == Class::Error && resp.code == Some(ErrorCode::STALE_NONCE) {
            if let Some(n) = resp.nonce {
                auth.nonce = n;
                continue;
            }
        }
        return Ok(resp);
    }
    bail!("{} kept failing with 438 Stale Nonce", method.name())
}

fn expect_success(resp: &Response, what: &str) -> anyhow::Result<()> {
    if resp.class == Class::Success {
        Ok(())
    } else {
        Err(anyhow!(
            "{what} failed: {:?} {:?}",
            resp.class,
            resp.code.map(|c| c.0)
        ))
    }
}

impl Allocation {
    /// Allocates a UDP relay on `server` with `creds`, then binds `channel` to `peer`.
    ///
    /// # Errors
    /// A socket error, a timeout, or an error response.
    pub fn open(
        server: SocketAddr,
        creds: &Credentials,
        peer: SocketAddr,
        channel: u16,
    ) -> anyhow::Result<Self> {
        // A fresh ephemeral port can be one a just-released allocation still holds on the
        // server (437 Allocation Mismatch, seen with coturn): try again from another port.
        let mut last = None;
        for _ in 0..4 {
            match Self::open_once(server, creds, peer, channel) {
                Ok(a) => return Ok(a),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("allocation failed")))
    }

    fn open_once(
        server: SocketAddr,
        creds: &Credentials,
        peer: SocketAddr,
        channel: u16,
    ) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").context("binding a client socket")?;
        socket.connect(server)?;
        socket.set_read_timeout(Some(RTO))?;

        // 1. Unauthenticated Allocate: the 401 carries REALM and NONCE.
        let tid = new_tid();
        let mut req = Vec::with_capacity(64);
        MessageBuilder::new(
            &mut req,
            MessageType::new(Method::ALLOCATE, Class::Request),
            tid,
        )
        .add(&RequestedTransport::UDP)
        .add_fingerprint();
        let challenge = transact(&socket, &req, tid)?;
        if challenge.code != Some(ErrorCode::UNAUTHENTICATED) {
            bail!(
                "expected a 401 challenge, got {:?} {:?}",
                challenge.class,
                challenge.code.map(|c| c.0)
            );
        }
        let realm = challenge.realm.context("401 without REALM")?;
        let nonce = challenge.nonce.context("401 without NONCE")?;
        let mut auth = Auth {
            key: long_term_key_md5(&creds.username, &realm, &creds.password),
            username: creds.username.clone(),
            realm,
            nonce,
        };

        // 2. Authenticated Allocate.
        let resp = authed(&socket, Method::ALLOCATE, &mut auth, |b| {
            b.add(&RequestedTransport::UDP);
        })?;
        expect_success(&resp, "Allocate")?;
        let relayed = resp
            .relayed
            .context("Allocate success without XOR-RELAYED-ADDRESS")?;

        // 3. ChannelBind to the peer.
        let channel = ChannelNumber::new(channel).map_err(|e| anyhow!("{e}"))?;
        let resp = authed(&socket, Method::CHANNEL_BIND, &mut auth, |b| {
            b.add(&channel).add(&XorPeerAddress(peer));
        })?;
        expect_success(&resp, "ChannelBind")?;

        Ok(Self {
            socket,
            relayed,
            channel,
            auth,
        })
    }

    /// Releases the allocation: Refresh with LIFETIME 0 (RFC 8656 §8). Best effort.
    pub fn release(mut self) {
        let _ = self
            .socket
            .set_read_timeout(Some(Duration::from_millis(100)));
        let _ = authed(&self.socket, Method::REFRESH, &mut self.auth, |b| {
            b.add(&Lifetime(0));
        });
    }

    /// Keeps only what the load loop needs (for the idle-allocation memory figure, where the
    /// client's own bookkeeping should not count).
    #[must_use]
    pub fn into_socket(self) -> UdpSocket {
        self.socket
    }
}

/// Sends STUN Binding requests until `server` answers, for up to `within`.
///
/// # Errors
/// The server never answered.
pub fn wait_ready(server: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 1024];
    while std::time::Instant::now() < deadline {
        let tid = new_tid();
        let mut req = Vec::with_capacity(32);
        MessageBuilder::new(
            &mut req,
            MessageType::new(Method::BINDING, Class::Request),
            tid,
        )
        .finish();
        let _ = sock.send(&req);
        // Drain everything queued: a server busy starting up answers old requests late,
        // and reading one datagram per request would never catch up.
        while let Ok(n) = sock.recv(&mut buf) {
            if Message::decode(&buf[..n]).is_ok_and(|m| m.transaction_id() == tid) {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{server} did not answer a Binding request within {within:?}")
}
