//! A UDP echo peer on loopback that counts what it receives.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Echoes every datagram back to its sender, on its own thread, until dropped.
#[derive(Debug)]
pub struct EchoPeer {
    /// The address it listens on.
    pub addr: SocketAddr,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct State {
    stop: AtomicBool,
    received: AtomicU64,
    sources: Mutex<BTreeSet<SocketAddr>>,
}

/// Most distinct sources remembered (the set is bounded).
const MAX_SOURCES: usize = 1024;

impl EchoPeer {
    /// Binds `ip:0` and starts echoing.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn start(ip: IpAddr) -> io::Result<Self> {
        Self::bind(SocketAddr::new(ip, 0))
    }

    /// Binds `addr` and starts echoing.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        assert!(addr.ip().is_loopback(), "tests stay on loopback: {addr}");
        let sock = UdpSocket::bind(addr)?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        let addr = sock.local_addr()?;
        let state = Arc::new(State::default());
        let s = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("echo-{addr}"))
            .spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !s.stop.load(Ordering::Relaxed) {
                    match sock.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            s.received.fetch_add(1, Ordering::Relaxed);
                            {
                                let mut src = s.sources.lock().unwrap_or_else(|p| p.into_inner());
                                if src.len() < MAX_SOURCES {
                                    src.insert(from);
                                }
                            }
                            let _ = sock.send_to(&buf[..n], from);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) => {}
                        // ICMP port unreachable from an earlier echo surfaces here.
                        Err(_) => {}
                    }
                }
            })?;
        Ok(Self {
            addr,
            state,
            thread: Some(thread),
        })
    }

    /// Two peers on consecutive ports `P` (even) and `P + 1`: RTP and RTCP, as coturn's
    /// `turnutils_uclient` addresses them without `-c` (RTCP to the peer port + 1).
    ///
    /// # Errors
    /// No free pair was found in a bounded number of tries.
    pub fn start_pair(ip: IpAddr) -> io::Result<(Self, Self)> {
        for _ in 0..64 {
            let first = Self::start(ip)?;
            let port = first.addr.port();
            if port % 2 == 1 || port == u16::MAX {
                continue;
            }
            if let Ok(second) = Self::bind(SocketAddr::new(ip, port + 1)) {
                return Ok((first, second));
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free pair of consecutive ports",
        ))
    }

    /// Datagrams received so far.
    #[must_use]
    pub fn received(&self) -> u64 {
        self.state.received.load(Ordering::Relaxed)
    }

    /// The distinct source addresses seen so far.
    #[must_use]
    pub fn sources(&self) -> BTreeSet<SocketAddr> {
        self.state
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
