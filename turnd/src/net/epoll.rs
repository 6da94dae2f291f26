//! The epoll backend (mio): UDP sockets are read with `recvmmsg` until a short batch (a short
//! batch means the queue is empty, and edge-triggered epoll reports the next arrival, so no
//! extra empty read), and each pass's datagrams leave with one `sendmmsg` per socket.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::io::{Backend, Handler, UdpKey, UDP_BASE, UDP_BUDGET};
use super::udp::{self, Flushed, RecvBatch, SendQueue, RECV_BATCH};

/// A registered UDP socket (the worker owns the socket itself).
struct Entry {
    fd: RawFd,
    user: u64,
}

/// See the [module docs](self).
pub struct Epoll {
    poll: Poll,
    events: Events,
    udp: Slab<Entry>,
    /// Sockets that still had datagrams when their budget ran out.
    backlog: Vec<usize>,
    next_backlog: Vec<usize>,
    recv: Box<RecvBatch>,
    messages: udp::Messages,
}

impl std::fmt::Debug for Epoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epoll")
            .field("udp", &self.udp.len())
            .finish()
    }
}

impl Epoll {
    /// A new epoll instance.
    ///
    /// # Errors
    /// epoll_create failed.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            udp: Slab::new(),
            backlog: Vec::new(),
            next_backlog: Vec::new(),
            recv: Box::default(),
            messages: udp::Messages::default(),
        })
    }

    /// Reads one socket until a short batch or the budget; returns whether it has more.
    fn drain(&mut self, key: usize, handler: &mut dyn Handler) -> bool {
        let Some(&Entry { fd, user }) = self.udp.get(key) else {
            return false;
        };
        let mut read = 0;
        while read < UDP_BUDGET {
            match self.recv.recv(fd) {
                Ok(n) => {
                    for i in 0..n {
                        if let Some(d) = self.recv.datagram(i) {
                            handler.datagram(user, d);
                        }
                    }
                    read += n;
                    if n < RECV_BATCH {
                        return false;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return false,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    // ICMP errors (ECONNREFUSED …) are queued on the socket: count and go on.
                    handler.receive_error(user, &err);
                    read += 1;
                }
            }
        }
        true
    }
}

impl Backend for Epoll {
    fn name(&self) -> &'static str {
        "epoll"
    }

    fn registry(&self) -> &mio::Registry {
        self.poll.registry()
    }

    fn add_udp(&mut self, fd: RawFd, user: u64) -> io::Result<UdpKey> {
        let key = self.udp.insert(Entry { fd, user });
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(UDP_BASE + key),
            Interest::READABLE,
        ) {
            self.udp.remove(key);
            return Err(e);
        }
        Ok(UdpKey(key))
    }

    fn remove_udp(&mut self, key: UdpKey, socket: std::net::UdpSocket) {
        if let Some(e) = self.udp.try_remove(key.0) {
            let _ = self.poll.registry().deregister(&mut SourceFd(&e.fd));
        }
        self.backlog.retain(|k| *k != key.0);
        drop(socket);
    }

    fn poll(&mut self, timeout: Option<Duration>, handler: &mut dyn Handler) -> io::Result<()> {
        let timeout = if self.backlog.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                handler.woke();
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        handler.woke();
        // Sockets left over from the last pass go first: they have waited longest.
        let backlog = std::mem::take(&mut self.backlog);
        self.next_backlog.clear();
        for key in backlog {
            if self.drain(key, handler) {
                self.next_backlog.push(key);
            }
        }
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        for ev in &events {
            let t = ev.token().0;
            if (UDP_BASE..super::io::WAKER).contains(&t) {
                let key = t - UDP_BASE;
                if self.next_backlog.contains(&key) {
                    continue;
                }
                if self.drain(key, handler) {
                    self.next_backlog.push(key);
                }
            } else {
                handler.ready(
                    ev.token(),
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable() || ev.is_write_closed(),
                );
            }
        }
        self.events = events;
        std::mem::swap(&mut self.backlog, &mut self.next_backlog);
        Ok(())
    }

    fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    fn flush(&mut self, queue: &mut SendQueue) -> Flushed {
        let mut out = Flushed::default();
        if queue.is_empty() {
            return out;
        }
        let (items, data) = queue.grouped();
        self.messages.build(items, data);
        self.messages.sendmmsg(&mut out);
        queue.clear();
        out
    }
}
