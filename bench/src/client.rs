//! The control side of a TURN client, async over any [`Link`]: the long-term-credential
//! Allocate (401 challenge, then the retry with USERNAME, REALM, NONCE and
//! MESSAGE-INTEGRITY; RFC 8656 §7), CreatePermission (§10), ChannelBind (§12), and a Refresh
//! with LIFETIME 0 to release (§8).
//!
//! The four set-up transactions are exactly what the allocation-setup scenario measures.
//! Every wait is bounded: over UDP by a retransmission timer and count, over streams by one
//! overall timeout.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use turn_proto::auth::{long_term_key_md5, rest_api_password};
use turn_proto::codec::{
    ChannelNumber, Class, ErrorCode, ErrorCodeAttr, Lifetime, Message, MessageBuilder, MessageType,
    Method, Nonce, Realm, RequestedTransport, TransactionId, Username, XorPeerAddress,
    XorRelayedAddress,
};

use crate::link::{Endpoint, Link, Transport};

/// Wait for one response before retransmitting over UDP. Set-up runs on a machine loaded by
/// the bench itself, so this is generous.
const RTO: Duration = Duration::from_millis(500);
/// Transmissions of one request over UDP before giving up.
const ATTEMPTS: usize = 6;
/// Wait for one response over a stream.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);

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

/// An allocation with a permission for, and one channel bound to, a peer.
#[derive(Debug)]
pub struct Allocation {
    /// The client leg.
    pub link: Link,
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

fn parse_response(msg: &Message<'_>) -> Response {
    Response {
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
    }
}

/// Sends `request` and waits for the response with its transaction id; over UDP it
/// retransmits every [`RTO`].
async fn transact(link: &mut Link, request: &[u8], tid: TransactionId) -> anyhow::Result<Response> {
    let (attempts, wait) = if link.is_stream() {
        (1, STREAM_TIMEOUT)
    } else {
        (ATTEMPTS, RTO)
    };
    for _ in 0..attempts {
        link.send(request).await.context("sending a request")?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame = match tokio::time::timeout_at(deadline, link.recv()).await {
                Err(_) => break,
                Ok(r) => r.context("receiving a response")?,
            };
            let Ok(msg) = Message::decode(frame) else {
                continue; // a stray ChannelData: not ours
            };
            if msg.transaction_id() == tid {
                return Ok(parse_response(&msg));
            }
        }
    }
    bail!("no response after {attempts} transmission(s)")
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
async fn authed(
    link: &mut Link,
    method: Method,
    auth: &mut Auth,
    attrs: impl Fn(&mut MessageBuilder<'_>),
) -> anyhow::Result<Response> {
    for _ in 0..2 {
        let (req, tid) = signed(method, auth, &attrs);
        let resp = transact(link, &req, tid).await?;
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
    /// Opens a client leg of `transport` to `endpoint`, allocates a UDP relay with `creds`,
    /// installs a permission for `peer` and binds `channel` to it: the four transactions of
    /// a WebRTC client's TURN set-up (401 challenge, Allocate, CreatePermission, ChannelBind).
    ///
    /// # Errors
    /// A socket error, a timeout, or an error response.
    pub async fn open(
        endpoint: &Endpoint,
        transport: Transport,
        creds: &Credentials,
        peer: SocketAddr,
        channel: u16,
    ) -> anyhow::Result<Self> {
        let mut link = Link::connect(endpoint, transport).await?;

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
        let challenge = transact(&mut link, &req, tid).await?;
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
        let resp = authed(&mut link, Method::ALLOCATE, &mut auth, |b| {
            b.add(&RequestedTransport::UDP);
        })
        .await?;
        expect_success(&resp, "Allocate")?;
        let relayed = resp
            .relayed
            .context("Allocate success without XOR-RELAYED-ADDRESS")?;

        // 3. CreatePermission for the peer.
        let resp = authed(&mut link, Method::CREATE_PERMISSION, &mut auth, |b| {
            b.add(&XorPeerAddress(peer));
        })
        .await?;
        expect_success(&resp, "CreatePermission")?;

        // 4. ChannelBind to the peer.
        let channel = ChannelNumber::new(channel).map_err(|e| anyhow!("{e}"))?;
        let resp = authed(&mut link, Method::CHANNEL_BIND, &mut auth, |b| {
            b.add(&channel).add(&XorPeerAddress(peer));
        })
        .await?;
        expect_success(&resp, "ChannelBind")?;

        Ok(Self {
            link,
            relayed,
            channel,
            auth,
        })
    }

    /// Releases the allocation: Refresh with LIFETIME 0 (RFC 8656 §8), bounded by one
    /// second; over a stream, closing the connection ends the allocation as well. Best effort.
    pub async fn release(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            authed(&mut self.link, Method::REFRESH, &mut self.auth, |b| {
                b.add(&Lifetime(0));
            }),
        )
        .await;
    }
}

/// Sends STUN Binding requests until `server` answers, for up to `within`. Blocking.
///
/// # Errors
/// The server never answered.
pub fn wait_ready(server: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
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
