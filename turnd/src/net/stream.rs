//! TCP and TLS connections (RFC 8656 §3.1): listener sockets, connection caps, the bounded
//! per-connection write queue, and the read-side frame splitter.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Limits that keep one client from hurting the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Time allowed for the first byte and the TLS handshake.
    pub handshake_timeout: Duration,
    /// A connection without an allocation is closed after this long without a frame.
    pub idle_timeout: Duration,
    /// Most connections from one IP address.
    pub max_per_ip: usize,
    /// Most connections in total.
    pub max_total: usize,
    /// Bytes queued toward one client before further relayed data to it is dropped.
    pub write_buffer: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_per_ip: 64,
            max_total: 10_000,
            write_buffer: 256 * 1024,
        }
    }
}

/// Counts connections per source IP and in total (shared by all workers; touched on
/// accept and close only).
#[derive(Debug, Default)]
pub struct ConnectionCaps {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
}

/// Holds one connection's place under the caps until dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    caps: Arc<ConnectionCaps>,
    ip: IpAddr,
}

impl ConnectionCaps {
    /// Takes a slot for a connection from `ip`, or `None` when a cap is reached.
    #[must_use]
    pub fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &StreamLimits,
    ) -> Option<ConnectionSlot> {
        let mut per_ip = match self.per_ip.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if self.total.load(Ordering::Relaxed) >= limits.max_total {
            return None;
        }
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= limits.max_per_ip {
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionSlot {
            caps: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    #[must_use]
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut per_ip = match self.caps.per_ip.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.caps.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds a TCP listener with SO_REUSEPORT so every worker accepts on the same address.
///
/// # Errors
/// The bind failed.
pub fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// The first byte of a TLS record carrying a handshake (ClientHello).
pub const TLS_HANDSHAKE: u8 = 0x16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_limit_per_ip_and_total_and_free_on_drop() {
        let caps = Arc::new(ConnectionCaps::default());
        let limits = StreamLimits {
            max_per_ip: 2,
            max_total: 3,
            ..StreamLimits::default()
        };
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = caps.try_acquire(a, &limits).unwrap();
        let _s2 = caps.try_acquire(a, &limits).unwrap();
        assert!(caps.try_acquire(a, &limits).is_none(), "per-IP cap");
        let _s3 = caps.try_acquire(b, &limits).unwrap();
        assert!(caps.try_acquire(b, &limits).is_none(), "total cap");
        drop(s1);
        assert!(caps.try_acquire(a, &limits).is_some());
    }

    fn pair() -> (Connection, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, peer) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let caps = Arc::new(ConnectionCaps::default());
        let slot = caps
            .try_acquire(peer.ip(), &StreamLimits::default())
            .unwrap();
        let ft = turn_proto::server::FiveTuple {
            client: peer,
            server: server.local_addr().unwrap(),
            transport: turn_proto::server::Transport::Tcp,
        };
        let now = std::time::Instant::now();
        (
            Connection::new(mio::net::TcpStream::from_std(server), ft, slot, now),
            client,
        )
    }

    #[test]
    fn write_buffer_is_bounded_and_drops_whole_frames() {
        let (mut c, _client) = pair();
        assert!(c.queue(&[1; 60], 100));
        assert!(
            !c.queue(&[2; 60], 100),
            "would pass the limit: dropped whole"
        );
        assert!(c.queue(&[3; 40], 100));
        assert_eq!(c.wbuf.len(), 100);
    }

    #[test]
    fn frame_timeout_runs_from_the_start_of_an_incomplete_frame() {
        let (mut c, _client) = pair();
        let limits = StreamLimits {
            idle_timeout: Duration::from_secs(2),
            ..StreamLimits::default()
        };
        let t0 = c.accepted;
        c.phase = Phase::Open;
        // A frame header arrives and the rest trickles: the clock does not restart per byte.
        c.rbuf.extend_from_slice(&[0x40, 0x00, 0xff, 0xfc]);
        c.after_frames(false, t0);
        c.rbuf.push(0);
        c.after_frames(false, t0 + Duration::from_secs(1));
        assert_eq!(
            c.expired(t0 + Duration::from_millis(1900), &limits, true),
            None
        );
        assert_eq!(
            c.expired(t0 + Duration::from_secs(2), &limits, true),
            Some(Expiry::Frame),
            "an allocation does not save a frame that never completes"
        );
        // Complete frames keep an idle connection with an allocation open.
        c.rbuf.clear();
        c.after_frames(true, t0 + Duration::from_secs(3));
        assert_eq!(c.expired(t0 + Duration::from_secs(60), &limits, true), None);
        assert_eq!(
            c.expired(t0 + Duration::from_secs(60), &limits, false),
            Some(Expiry::Idle)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// One connection, driven by the worker loop

/// Bytes read from one connection per loop pass, so one busy connection cannot hold the
/// worker: the rest waits for the next pass.
pub const READ_BUDGET: usize = 64 * 1024;
/// Frames handed to the core from one connection per loop pass.
pub const FRAME_BUDGET: usize = 32;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the first byte (0x16 starts TLS; anything else is plain TCP).
    Sniff,
    /// TLS handshake running.
    Handshake,
    /// Carrying STUN and ChannelData frames.
    Open,
}

/// What reading a connection produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Drained (the socket would block).
    Drained,
    /// The budget ran out with more to read.
    More,
    /// The peer closed, or the connection failed.
    Closed,
}

/// One TCP or TLS connection: the socket, rustls' state machine for TLS, the read buffer that
/// holds at most one partial frame plus one read, and the bounded write buffer.
pub struct Connection {
    /// The socket.
    pub sock: mio::net::TcpStream,
    /// Client, server address, transport (Tcp until a ClientHello makes it Tls).
    pub five_tuple: turn_proto::server::FiveTuple,
    /// rustls, when the client spoke TLS.
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// Where it is in its life.
    pub phase: Phase,
    /// Received bytes not yet handed to the core (plaintext).
    pub rbuf: Vec<u8>,
    /// Frames waiting to be written (plaintext), from `wpos`.
    pub wbuf: Vec<u8>,
    /// How much of `wbuf` was written.
    pub wpos: usize,
    /// When it was accepted.
    pub accepted: std::time::Instant,
    /// When the oldest incomplete frame in `rbuf` began (the frame timeout runs from here).
    pub frame_started: Option<std::time::Instant>,
    /// When the last complete frame arrived.
    pub last_frame: std::time::Instant,
    /// Close once everything queued is written (the allocation ended).
    pub close_after_write: bool,
    /// Counted in the "opened" metric (as `five_tuple.transport`).
    pub counted: bool,
    /// Waiting in the worker's write list.
    pub write_listed: bool,
    /// Waiting in the worker's read backlog.
    pub read_listed: bool,
    /// Its place under the connection caps.
    pub slot: ConnectionSlot,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("five_tuple", &self.five_tuple)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Connection {
    /// A freshly accepted connection.
    #[must_use]
    pub fn new(
        sock: mio::net::TcpStream,
        five_tuple: turn_proto::server::FiveTuple,
        slot: ConnectionSlot,
        now: std::time::Instant,
    ) -> Self {
        Self {
            sock,
            five_tuple,
            tls: None,
            phase: Phase::Sniff,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            accepted: now,
            frame_started: None,
            last_frame: now,
            close_after_write: false,
            counted: false,
            write_listed: false,
            read_listed: false,
            slot,
        }
    }

    /// Reads up to the budget into `rbuf` (decrypting TLS). A first byte of 0x16 turns the
    /// connection into TLS with `tls_config` (refused when there is none).
    pub fn read(&mut self, tls_config: Option<&Arc<rustls::ServerConfig>>) -> ReadOutcome {
        let mut budget = READ_BUDGET;
        let mut chunk = [0u8; 16 * 1024];
        while budget > 0 {
            if let Some(tls) = self.tls.as_mut() {
                match tls.read_tls(&mut self.sock) {
                    Ok(0) => return ReadOutcome::Closed,
                    Ok(n) => budget = budget.saturating_sub(n),
                    Err(e) if would_block(&e) => return ReadOutcome::Drained,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return ReadOutcome::Closed,
                }
                if tls.process_new_packets().is_err() {
                    // Send the alert rustls queued, best effort.
                    let _ = tls.write_tls(&mut self.sock);
                    return ReadOutcome::Closed;
                }
                if self.drain_plaintext().is_err() {
                    return ReadOutcome::Closed;
                }
                continue;
            }
            match io::Read::read(&mut self.sock, &mut chunk) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    if self.phase == Phase::Sniff && chunk[0] == TLS_HANDSHAKE {
                        let Some(cfg) = tls_config else {
                            return ReadOutcome::Closed;
                        };
                        let Ok(mut tls) = rustls::ServerConnection::new(cfg.clone()) else {
                            return ReadOutcome::Closed;
                        };
                        // The bound is ours (`queue`'s limit, and at most 64 KiB of frames
                        // handed over, only when rustls has written everything): rustls' own
                        // 64 KiB limit would refuse part of a frame, breaking the stream.
                        tls.set_buffer_limit(None);
                        let mut fed = &chunk[..n];
                        while !fed.is_empty() {
                            if tls.read_tls(&mut fed).is_err() {
                                return ReadOutcome::Closed;
                            }
                        }
                        self.phase = Phase::Handshake;
                        self.five_tuple.transport = turn_proto::server::Transport::Tls;
                        if tls.process_new_packets().is_err() {
                            let _ = tls.write_tls(&mut self.sock);
                            return ReadOutcome::Closed;
                        }
                        self.tls = Some(Box::new(tls));
                        if self.drain_plaintext().is_err() {
                            return ReadOutcome::Closed;
                        }
                        continue;
                    }
                    if self.phase == Phase::Sniff {
                        self.phase = Phase::Open;
                    }
                    self.rbuf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if would_block(&e) => return ReadOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ReadOutcome::Closed,
            }
        }
        ReadOutcome::More
    }

    fn drain_plaintext(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        if self.phase == Phase::Handshake && !tls.is_handshaking() {
            self.phase = Phase::Open;
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match io::Read::read(&mut tls.reader(), &mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues one frame unless the write buffer would pass `limit`; returns whether it was
    /// queued. Dropping whole frames keeps the stream well-formed.
    pub fn queue(&mut self, frame: &[u8], limit: usize) -> bool {
        if self.wbuf.len() - self.wpos + frame.len() > limit {
            return false;
        }
        if self.wpos > 0 && self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        self.wbuf.extend_from_slice(frame);
        true
    }

    /// Whether anything waits to be written (queued frames or TLS records).
    #[must_use]
    pub fn wants_write(&self) -> bool {
        self.wpos < self.wbuf.len() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes what it can. Over TLS each frame goes in its own record (some clients, coturn's
    /// `turnutils_uclient`, read one message per record). Returns `Err` when the connection
    /// failed.
    ///
    /// # Errors
    /// The socket failed.
    pub fn write(&mut self) -> io::Result<()> {
        loop {
            if let Some(tls) = self.tls.as_mut() {
                while tls.wants_write() {
                    match tls.write_tls(&mut self.sock) {
                        Ok(_) => {}
                        Err(e) if would_block(&e) => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                if self.phase != Phase::Open || self.wpos >= self.wbuf.len() {
                    return Ok(());
                }
                // Hand rustls up to 64 KiB of whole frames, one record each.
                let mut fed = 0;
                while self.wpos < self.wbuf.len() && fed < 64 * 1024 {
                    let rest = &self.wbuf[self.wpos..];
                    let n = match turn_proto::codec::frame_len(rest) {
                        Ok(turn_proto::codec::FrameLen::Complete(n)) => n,
                        _ => rest.len(),
                    };
                    io::Write::write_all(&mut tls.writer(), &rest[..n])?;
                    self.wpos += n;
                    fed += n;
                }
                continue;
            }
            if self.wpos >= self.wbuf.len() {
                return Ok(());
            }
            match io::Write::write(&mut self.sock, &self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if self.wpos == self.wbuf.len() {
                self.wbuf.clear();
                self.wpos = 0;
                return Ok(());
            }
        }
    }

    /// Notes what is left in `rbuf` after frames were consumed: a partial frame starts (or
    /// keeps running) the frame timeout.
    pub fn after_frames(&mut self, consumed_any: bool, now: std::time::Instant) {
        if consumed_any {
            self.last_frame = now;
        }
        if self.rbuf.is_empty() {
            self.frame_started = None;
        } else if consumed_any || self.frame_started.is_none() {
            self.frame_started = Some(now);
        }
    }

    /// Why the connection must close at `now`, if it must: the handshake took too long, a
    /// frame did not complete within `idle_timeout`, or (without an allocation) no frame came
    /// for `idle_timeout`.
    #[must_use]
    pub fn expired(
        &self,
        now: std::time::Instant,
        limits: &StreamLimits,
        has_allocation: bool,
    ) -> Option<Expiry> {
        if self.phase != Phase::Open {
            return (now.saturating_duration_since(self.accepted) >= limits.handshake_timeout)
                .then_some(Expiry::Handshake);
        }
        if let Some(t) = self.frame_started {
            if now.saturating_duration_since(t) >= limits.idle_timeout {
                return Some(Expiry::Frame);
            }
        }
        if !has_allocation && now.saturating_duration_since(self.last_frame) >= limits.idle_timeout
        {
            return Some(Expiry::Idle);
        }
        None
    }
}

/// Why a connection timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The first byte or the TLS handshake did not come in time.
    Handshake,
    /// A frame did not complete in time (a trickle).
    Frame,
    /// No frame for the idle timeout, and no allocation.
    Idle,
}
