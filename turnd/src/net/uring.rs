//! The io_uring backend.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use super::io::{Backend, Handler, UdpKey};
use super::udp::{Flushed, SendQueue};

/// See the [module docs](self).
#[derive(Debug)]
pub struct Uring {
    _private: (),
}

impl Uring {
    /// Sets up a ring.
    ///
    /// # Errors
    /// io_uring is unavailable.
    pub fn new() -> io::Result<Self> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring backend not built"))
    }
}

impl Backend for Uring {
    fn name(&self) -> &'static str {
        "io_uring"
    }
    fn registry(&self) -> &mio::Registry {
        unreachable!()
    }
    fn add_udp(&mut self, _fd: RawFd, _user: u64) -> io::Result<UdpKey> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn remove_udp(&mut self, _key: UdpKey, _socket: std::net::UdpSocket) {}
    fn poll(&mut self, _timeout: Option<Duration>, _handler: &mut dyn Handler) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn has_backlog(&self) -> bool {
        false
    }
    fn flush(&mut self, _queue: &mut SendQueue) -> Flushed {
        Flushed::default()
    }
}
