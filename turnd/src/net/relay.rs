//! Relay sockets: bound from the shared port pools, kept by index (the core's
//! [`RelayHandle`]), and the process-wide table of ports held for a RESERVATION-TOKEN.
//!
//! **Relay addresses.** Every configured relay address of a family serves allocations: a new
//! relay socket goes to the address with the most free ports (so allocations spread evenly
//! and the capacity is the sum of all addresses). With no address configured, the address the
//! request arrived on is used.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use slab::Slab;
use turn_proto::codec::AddressFamily;
use turn_proto::server::RelayHandle;

use super::io::UdpKey;
use super::ports::PortPools;
use super::udp::{self, Buffers};

/// One relay socket of a worker.
#[derive(Debug)]
pub struct RelaySocket {
    /// The socket.
    pub sock: std::net::UdpSocket,
    /// Its local address.
    pub local: SocketAddr,
    /// Whether DF is set on it (DONT-FRAGMENT at Allocate).
    pub dont_fragment: bool,
    /// Distinguishes this socket from earlier ones at the same index.
    pub generation: u32,
    /// The backend's registration, once made.
    pub key: Option<UdpKey>,
}

impl RelaySocket {
    /// The raw descriptor (for the send queue).
    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// A worker's relay sockets, indexed by [`RelayHandle`].
#[derive(Debug, Default)]
pub struct Relays {
    slab: Slab<RelaySocket>,
    generation: u32,
}

impl Relays {
    /// Stores a new socket; returns its handle and generation.
    pub fn insert(
        &mut self,
        sock: std::net::UdpSocket,
        local: SocketAddr,
        dont_fragment: bool,
    ) -> (RelayHandle, u32) {
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let idx = self.slab.insert(RelaySocket {
            sock,
            local,
            dont_fragment,
            generation,
            key: None,
        });
        (
            RelayHandle(u32::try_from(idx).unwrap_or(u32::MAX)),
            generation,
        )
    }

    /// The socket at `handle`.
    #[must_use]
    pub fn get(&self, handle: RelayHandle) -> Option<&RelaySocket> {
        self.slab.get(handle.0 as usize)
    }

    /// The socket at `handle`, mutably.
    pub fn get_mut(&mut self, handle: RelayHandle) -> Option<&mut RelaySocket> {
        self.slab.get_mut(handle.0 as usize)
    }

    /// Removes the socket at `handle` when it is the one bound at `local`.
    pub fn remove(&mut self, handle: RelayHandle, local: SocketAddr) -> Option<RelaySocket> {
        let idx = handle.0 as usize;
        if self.slab.get(idx).is_some_and(|r| r.local == local) {
            Some(self.slab.remove(idx))
        } else {
            None
        }
    }

    /// How many sockets are open.
    #[must_use]
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Whether none is open.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Every socket (shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = RelaySocket> + '_ {
        self.slab.drain()
    }
}

/// Sockets bound for a RESERVATION-TOKEN (EVEN-PORT with the R bit, RFC 8656 §7.2), shared
/// by every worker: the token may be redeemed by a request that reaches another worker.
/// Touched only when an allocation is created or a reservation ends.
#[derive(Debug, Default)]
pub struct ReservedSockets {
    held: Mutex<HashMap<SocketAddr, std::net::UdpSocket>>,
}

impl ReservedSockets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, std::net::UdpSocket>> {
        match self.held.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Holds `sock`, bound at `local`.
    pub fn hold(&self, local: SocketAddr, sock: std::net::UdpSocket) {
        self.lock().insert(local, sock);
    }

    /// Takes the socket held at `local`.
    pub fn take(&self, local: SocketAddr) -> Option<std::net::UdpSocket> {
        self.lock().remove(&local)
    }

    /// How many are held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a relay socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Every port of every relay address of the family is taken.
    #[error("no relay port free")]
    NoPort,
    /// No relay address of the requested family.
    #[error("no relay address of that family")]
    Family,
    /// The process is out of file descriptors.
    #[error("out of file descriptors: {0}")]
    Descriptors(io::Error),
}

/// Picks the relay IP for a new socket of `family`: among `configured` addresses of that
/// family the one with the most free ports, else `arrival` when it has that family.
#[must_use]
pub fn pick_ip(
    configured: &[IpAddr],
    ports: &PortPools,
    family: AddressFamily,
    arrival: IpAddr,
) -> Option<IpAddr> {
    let want_v4 = family == AddressFamily::IPV4;
    if configured.is_empty() {
        return (arrival.is_ipv4() == want_v4 && !arrival.is_unspecified()).then_some(arrival);
    }
    configured
        .iter()
        .copied()
        .filter(|ip| ip.is_ipv4() == want_v4)
        .max_by_key(|ip| ports.free(*ip))
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Binds a relay socket (and, for an EVEN-PORT reservation, the next port too) on `ip`.
///
/// # Errors
/// No port free, or the process is out of descriptors.
pub fn bind(
    ports: &PortPools,
    ip: IpAddr,
    even: bool,
    pair: bool,
    start: usize,
    buffers: Buffers,
) -> Result<(std::net::UdpSocket, Option<std::net::UdpSocket>), BindError> {
    let mut exhausted = None;
    let got = ports.acquire(ip, even, pair, start, |p| {
        if exhausted.is_some() {
            return None;
        }
        let a = match udp::bind(SocketAddr::new(ip, p), false, buffers) {
            Ok(a) => a,
            Err(e) if is_fd_exhaustion(&e) => {
                exhausted = Some(e);
                return None;
            }
            Err(_) => return None,
        };
        let b = if pair {
            match udp::bind(SocketAddr::new(ip, p + 1), false, buffers) {
                Ok(b) => Some(b),
                Err(e) if is_fd_exhaustion(&e) => {
                    exhausted = Some(e);
                    return None;
                }
                Err(_) => return None,
            }
        } else {
            None
        };
        Some((a, b))
    });
    match (got, exhausted) {
        (Some((_, socks)), _) => Ok(socks),
        (None, Some(e)) => Err(BindError::Descriptors(e)),
        (None, None) => Err(BindError::NoPort),
    }
}
