//! The one readiness source of a worker, behind one small trait with two backends:
//! [`epoll`](super::epoll) (mio; every kernel) and [`uring`](super::uring) (io_uring with
//! multishot receive; Linux ≥ 6.0).
//!
//! A backend owns the waiting and the UDP datagram path (receive and batched send); stream
//! sockets, TCP listeners and the worker's waker are readiness-driven on a `mio::Poll` in
//! both backends (io_uring watches that poll's descriptor, so one `io_uring_enter` still waits
//! for everything).
//!
//! **Bounds.** A pass reads at most [`UDP_BUDGET`] datagrams from one UDP socket; a socket
//! with more waiting is served again in the next pass after every other ready socket had its
//! turn, and that pass does not sleep. So a flooded socket delays another allocation's
//! datagrams by at most one pass.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::net::udp::{Datagram, Flushed, SendQueue};

/// Datagrams read from one UDP socket per loop pass (4 × `recvmmsg` of 32).
pub const UDP_BUDGET: usize = 128;

/// mio tokens at or above this are TCP listeners (index below).
pub const TCP_LISTENER_BASE: usize = 1 << 40;
/// The worker's waker (commands from the process).
pub const WAKER: usize = usize::MAX - 1;
/// The epoll backend's own UDP registrations start here.
pub const UDP_BASE: usize = 1 << 48;

/// A backend's key for a registered UDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpKey(pub usize);

/// What a backend delivers to the worker during [`Backend::poll`].
pub trait Handler {
    /// The wait is over: called once per pass before anything is delivered.
    fn woke(&mut self);
    /// A datagram arrived on the UDP socket registered with `user`.
    fn datagram(&mut self, user: u64, datagram: Datagram<'_>);
    /// A socket registered on the mio registry (stream, TCP listener, waker) is ready.
    fn ready(&mut self, token: mio::Token, readable: bool, writable: bool);
    /// A UDP socket reported an error on receive (ICMP unreachable and the like); counted.
    fn receive_error(&mut self, user: u64, error: &io::Error);
    /// A datagram longer than the backend's receive buffer arrived on the socket registered
    /// with `user` and was dropped (io_uring's provided buffers hold
    /// [`crate::net::uring::MAX_DATAGRAM`] bytes; epoll's hold any UDP datagram); counted.
    fn oversized(&mut self, user: u64);
}

/// The readiness source and UDP datagram path of one worker.
pub trait Backend: Send {
    /// `"epoll"` or `"io_uring"`.
    fn name(&self) -> &'static str;
    /// Where streams, TCP listeners and the waker register.
    fn registry(&self) -> &mio::Registry;
    /// Starts receiving on a UDP socket; `user` comes back with each datagram.
    ///
    /// # Errors
    /// The registration failed.
    fn add_udp(&mut self, fd: RawFd, user: u64) -> io::Result<UdpKey>;
    /// Stops receiving on a UDP socket and closes it once the backend no longer refers to it.
    fn remove_udp(&mut self, key: UdpKey, socket: std::net::UdpSocket);
    /// Waits until something is ready or `timeout` passes (`None`: no limit), then delivers
    /// datagrams (at most [`UDP_BUDGET`] per socket) and readiness to `handler`.
    ///
    /// # Errors
    /// Waiting itself failed (not a socket's error).
    fn poll(&mut self, timeout: Option<Duration>, handler: &mut dyn Handler) -> io::Result<()>;
    /// Whether a socket still has datagrams beyond this pass's budget (the next poll must
    /// not sleep).
    fn has_backlog(&self) -> bool;
    /// Sends everything queued and empties the queue.
    fn flush(&mut self, queue: &mut SendQueue) -> Flushed;
}

/// Which backend a worker runs.
pub use crate::config::IoBackend;

/// The first worker's backend, as [`open`] resolved it.
pub struct Opened {
    /// The backend.
    pub backend: Box<dyn Backend>,
    /// What it is ([`IoBackend::Epoll`] or [`IoBackend::IoUring`], never `Auto`): what
    /// [`create`] builds for the other workers.
    pub kind: IoBackend,
    /// Why this one, and how it runs (logged once at start).
    pub reason: String,
}

/// The first worker's backend, resolved from the configured `choice`. `auto` tries io_uring
/// and falls back to epoll when the kernel (or a seccomp profile) refuses it; the other
/// workers are then built with [`create`] for the kind this one turned out to be, so
/// io_uring is probed once, by building a ring that is used.
///
/// # Errors
/// io_uring was asked for explicitly and is unavailable, or epoll could not be created.
pub fn open(choice: IoBackend) -> io::Result<Opened> {
    let epoll = |reason: String| -> io::Result<Opened> {
        Ok(Opened {
            backend: Box::new(super::epoll::Epoll::new()?),
            kind: IoBackend::Epoll,
            reason,
        })
    };
    let uring = |u: super::uring::Uring, why: &str| Opened {
        reason: format!("{why}; {}", u.describe()),
        backend: Box::new(u),
        kind: IoBackend::IoUring,
    };
    match choice {
        IoBackend::Epoll => epoll("configured".into()),
        IoBackend::IoUring => Ok(uring(super::uring::Uring::new()?, "configured")),
        IoBackend::Auto if uring_disabled_by_env() => {
            epoll(format!("io_uring disabled by {ENV_DISABLE_URING}"))
        }
        IoBackend::Auto => match super::uring::Uring::new() {
            Ok(u) => Ok(uring(u, "io_uring with multishot receive available")),
            Err(e) => epoll(format!("io_uring unavailable: {e}")),
        },
    }
}

/// A backend of the `kind` [`open`] resolved, for the other workers.
///
/// # Errors
/// The backend could not be created.
pub fn create(kind: IoBackend) -> io::Result<Box<dyn Backend>> {
    match kind {
        IoBackend::IoUring => Ok(Box::new(super::uring::Uring::new()?)),
        IoBackend::Epoll => Ok(Box::new(super::epoll::Epoll::new()?)),
        IoBackend::Auto => open(kind).map(|o| o.backend),
    }
}

/// Set to `1` to make `auto` behave as if io_uring were unavailable (as under a seccomp
/// profile that blocks it); used by the fallback test.
pub const ENV_DISABLE_URING: &str = "TURND_DISABLE_IO_URING";

fn uring_disabled_by_env() -> bool {
    std::env::var_os(ENV_DISABLE_URING).is_some_and(|v| v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd as _;

    #[derive(Default)]
    struct Seen {
        per_user: Vec<(u64, usize)>,
        lengths: Vec<usize>,
        oversized: usize,
    }

    impl Handler for Seen {
        fn woke(&mut self) {}
        fn datagram(&mut self, user: u64, d: Datagram<'_>) {
            self.lengths.push(d.data.len());
            match self.per_user.iter_mut().find(|(u, _)| *u == user) {
                Some((_, n)) => *n += 1,
                None => self.per_user.push((user, 1)),
            }
        }
        fn ready(&mut self, _t: mio::Token, _r: bool, _w: bool) {}
        fn receive_error(&mut self, _user: u64, _e: &io::Error) {}
        fn oversized(&mut self, _user: u64) {
            self.oversized += 1;
        }
    }

    impl Seen {
        fn count(&self, user: u64) -> usize {
            self.per_user
                .iter()
                .find(|(u, _)| *u == user)
                .map_or(0, |(_, n)| *n)
        }
    }

    fn backends() -> Vec<Box<dyn Backend>> {
        let mut v: Vec<Box<dyn Backend>> =
            vec![Box::new(crate::net::epoll::Epoll::new().expect("epoll"))];
        match crate::net::uring::Uring::new() {
            Ok(u) => v.push(Box::new(u)),
            Err(e) => eprintln!("io_uring unavailable here ({e}); testing epoll only"),
        }
        v
    }

    fn bound() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_nonblocking(true).expect("nonblocking");
        s.set_recv_buffer_size_compat(4 << 20);
        s
    }

    trait RecvBuf {
        fn set_recv_buffer_size_compat(&self, n: usize);
    }
    impl RecvBuf for UdpSocket {
        fn set_recv_buffer_size_compat(&self, n: usize) {
            let _ = socket2::SockRef::from(self).set_recv_buffer_size(n);
        }
    }

    /// The loop's bound: a socket flooded with datagrams gives up the rest of the pass after
    /// `UDP_BUDGET`, so another socket's single datagram is delivered in the same pass, and
    /// the flood's remainder in the following passes (none lost).
    #[test]
    fn a_flooded_socket_does_not_delay_another_beyond_one_pass() {
        for mut backend in backends() {
            let name = backend.name();
            let flooded = bound();
            let quiet = bound();
            let sender = UdpSocket::bind("127.0.0.1:0").expect("bind");
            const FLOOD: usize = 3_000;
            for i in 0..FLOOD {
                sender
                    .send_to(&(i as u32).to_be_bytes(), flooded.local_addr().unwrap())
                    .expect("send");
            }
            sender
                .send_to(b"quiet", quiet.local_addr().unwrap())
                .expect("send");
            backend.add_udp(flooded.as_raw_fd(), 1).expect("register");
            backend.add_udp(quiet.as_raw_fd(), 2).expect("register");
            let mut seen = Seen::default();
            // Passes until the quiet socket's datagram shows up (bounded).
            let mut passes = 0;
            while seen.count(2) == 0 && passes < 50 {
                backend
                    .poll(Some(Duration::from_millis(200)), &mut seen)
                    .expect("poll");
                passes += 1;
            }
            assert_eq!(
                seen.count(2),
                1,
                "{name}: the quiet socket's datagram arrived"
            );
            assert!(
                seen.count(1) <= UDP_BUDGET * passes,
                "{name}: the flooded socket got at most its budget per pass ({} in {passes} passes)",
                seen.count(1)
            );
            assert!(
                seen.count(1) < FLOOD,
                "{name}: the quiet datagram did not wait for the whole flood"
            );
            // The rest of the flood comes in the following passes, none lost.
            let mut more = 0;
            while seen.count(1) < FLOOD && more < 100 {
                backend
                    .poll(Some(Duration::from_millis(50)), &mut seen)
                    .expect("poll");
                more += 1;
            }
            assert_eq!(
                seen.count(1),
                FLOOD,
                "{name}: every flooded datagram delivered"
            );
            assert!(
                more >= (FLOOD / UDP_BUDGET).saturating_sub(passes),
                "{name}: over several passes"
            );
        }
    }

    /// Every datagram is delivered whole or reported as oversized, never lost unseen: a
    /// 60,000-byte datagram on io_uring (larger than its provided buffers) is counted, on epoll
    /// delivered; the small one after it arrives on both.
    #[test]
    fn a_datagram_too_large_for_the_buffers_is_reported_not_lost() {
        for mut backend in backends() {
            let name = backend.name();
            let rx = bound();
            let sender = UdpSocket::bind("127.0.0.1:0").expect("bind");
            let big = vec![7u8; 60_000];
            sender
                .send_to(&big, rx.local_addr().unwrap())
                .expect("send");
            sender
                .send_to(b"small", rx.local_addr().unwrap())
                .expect("send");
            backend.add_udp(rx.as_raw_fd(), 9).expect("register");
            let mut seen = Seen::default();
            let mut passes = 0;
            while seen.count(9) + seen.oversized < 2 && passes < 50 {
                backend
                    .poll(Some(Duration::from_millis(100)), &mut seen)
                    .expect("poll");
                passes += 1;
            }
            assert!(seen.lengths.contains(&5), "{name}: the small one arrived");
            if seen.oversized == 1 {
                assert_eq!(
                    seen.lengths,
                    vec![5],
                    "{name}: only the small one delivered"
                );
            } else {
                assert_eq!(seen.oversized, 0, "{name}");
                assert_eq!(
                    seen.lengths,
                    vec![60_000, 5],
                    "{name}: both delivered whole"
                );
            }
            if name == "io_uring" {
                assert_eq!(
                    seen.oversized, 1,
                    "io_uring reports the datagram it cannot hold"
                );
            }
        }
    }

    #[test]
    fn sends_of_one_pass_leave_together_and_arrive() {
        for mut backend in backends() {
            let name = backend.name();
            let a = bound();
            let b = bound();
            let rx = bound();
            let mut q = SendQueue::default();
            for i in 0..100u32 {
                let from = if i % 2 == 0 { &a } else { &b };
                q.push(
                    from.as_raw_fd(),
                    rx.local_addr().unwrap(),
                    None,
                    false,
                    &i.to_be_bytes(),
                );
            }
            let f = backend.flush(&mut q);
            assert!(q.is_empty(), "{name}: the queue is emptied");
            assert_eq!(f.sent, 100, "{name}");
            // Let completions settle (io_uring), then count what arrived.
            let mut seen = Seen::default();
            let _ = backend.poll(Some(Duration::from_millis(20)), &mut seen);
            let mut got = 0;
            let mut buf = [0u8; 16];
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while got < 100 && std::time::Instant::now() < deadline {
                match rx.recv_from(&mut buf) {
                    Ok(_) => got += 1,
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            assert_eq!(got, 100, "{name}: every datagram arrived");
            if name == "epoll" {
                assert_eq!(f.syscalls, 2, "epoll: one sendmmsg per socket");
            }
        }
    }
}
