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

/// Builds the backend `choice` asks for; `auto` takes io_uring when the kernel (and any
/// seccomp profile) allows it, else epoll.
///
/// # Errors
/// io_uring was asked for explicitly and is unavailable, or epoll could not be created.
pub fn create(choice: IoBackend) -> io::Result<Box<dyn Backend>> {
    match choice {
        IoBackend::Epoll => Ok(Box::new(super::epoll::Epoll::new()?)),
        IoBackend::IoUring => Ok(Box::new(super::uring::Uring::new()?)),
        IoBackend::Auto => {
            if uring_disabled_by_env() {
                return Ok(Box::new(super::epoll::Epoll::new()?));
            }
            match super::uring::Uring::new() {
                Ok(u) => Ok(Box::new(u)),
                Err(_) => Ok(Box::new(super::epoll::Epoll::new()?)),
            }
        }
    }
}

/// The backend `auto` resolves to here, and why (logged once at start).
#[must_use]
pub fn probe(choice: IoBackend) -> (IoBackend, String) {
    match choice {
        IoBackend::Epoll => (IoBackend::Epoll, "configured".into()),
        IoBackend::IoUring => (IoBackend::IoUring, "configured".into()),
        IoBackend::Auto => {
            if uring_disabled_by_env() {
                return (
                    IoBackend::Epoll,
                    format!("io_uring disabled by {ENV_DISABLE_URING}"),
                );
            }
            match super::uring::Uring::new() {
                Ok(_) => (IoBackend::IoUring, "io_uring with multishot receive available".into()),
                Err(e) => (IoBackend::Epoll, format!("io_uring unavailable: {e}")),
            }
        }
    }
}

/// Set to `1` to make `auto` behave as if io_uring were unavailable (as under a seccomp
/// profile that blocks it); used by the fallback test.
pub const ENV_DISABLE_URING: &str = "TURND_DISABLE_IO_URING";

fn uring_disabled_by_env() -> bool {
    std::env::var_os(ENV_DISABLE_URING).is_some_and(|v| v == "1")
}
