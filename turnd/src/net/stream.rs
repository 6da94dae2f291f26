//! TCP and TLS connections (RFC 8656 §3.1): listener sockets, connection caps, the bounded
//! per-connection write queue, and the read-side frame splitter.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::Notify;

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

/// The write side of one connection, as the worker sees it: a bounded queue and a wake-up
/// for the task that writes it to the socket.
#[derive(Debug, Default)]
pub struct WriteQueue {
    buf: RefCell<Vec<u8>>,
    notify: Notify,
    closed: Cell<bool>,
    dropped: Cell<u64>,
}

impl WriteQueue {
    /// Queues a frame unless that would pass `limit` bytes; returns whether it was queued.
    /// Dropping whole frames keeps the stream well-formed.
    pub fn push(&self, frame: &[u8], limit: usize) -> bool {
        if self.closed.get() {
            return false;
        }
        let mut buf = self.buf.borrow_mut();
        if buf.len() + frame.len() > limit {
            self.dropped.set(self.dropped.get() + 1);
            return false;
        }
        buf.extend_from_slice(frame);
        drop(buf);
        self.notify.notify_one();
        true
    }

    /// Moves the queued bytes into `out` (emptying the queue).
    pub fn take_into(&self, out: &mut Vec<u8>) {
        out.clear();
        std::mem::swap(&mut *self.buf.borrow_mut(), out);
    }

    /// Waits until something is queued.
    pub async fn wait(&self) {
        if self.buf.borrow().is_empty() {
            self.notify.notified().await;
        }
    }

    /// Marks the connection closed: nothing more is queued.
    pub fn close(&self) {
        self.closed.set(true);
        self.notify.notify_one();
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Frames dropped because the client did not read fast enough.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
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

    #[test]
    fn write_queue_is_bounded_and_drops_whole_frames() {
        let q = WriteQueue::default();
        assert!(q.push(&[1; 60], 100));
        assert!(!q.push(&[2; 60], 100));
        assert!(q.push(&[3; 40], 100));
        let mut out = Vec::new();
        q.take_into(&mut out);
        assert_eq!(out.len(), 100);
        assert_eq!(q.dropped(), 1);
        q.close();
        assert!(!q.push(&[1], 100));
    }
}
