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

/// The relay IPs to try for a new socket of `family`, in order of preference: among the
/// `configured` addresses of that family the one with the most free ports first, then the
/// family's others in configuration order (tried when none of the first's ports binds, e.g.
/// held by another process); with none configured, `arrival` when it has that family. Empty
/// when no address of the family exists.
pub fn pick_ips<'a>(
    configured: &'a [IpAddr],
    ports: &PortPools,
    family: AddressFamily,
    arrival: IpAddr,
) -> impl Iterator<Item = IpAddr> + 'a {
    let want_v4 = family == AddressFamily::IPV4;
    let of_family = move |ip: &IpAddr| ip.is_ipv4() == want_v4;
    let first = if configured.is_empty() {
        (of_family(&arrival) && !arrival.is_unspecified()).then_some(arrival)
    } else {
        configured
            .iter()
            .copied()
            .filter(of_family)
            .max_by_key(|ip| ports.free(*ip))
    };
    let rest = configured
        .iter()
        .copied()
        .filter(move |ip| of_family(ip) && Some(*ip) != first);
    first.into_iter().chain(rest)
}

/// A freshly bound relay socket and the address it is bound at (known from the bind, so no
/// `getsockname`).
#[derive(Debug)]
pub struct Bound {
    /// The socket.
    pub sock: std::net::UdpSocket,
    /// Its local address.
    pub local: SocketAddr,
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Binds a relay socket (and, for an EVEN-PORT reservation, the next port too) on the first
/// of `ips` (in [`pick_ips`]'s order) that has a port free and bindable.
///
/// # Errors
/// `ips` is empty (no relay address of the family), no port free on any of them, or the
/// process is out of descriptors.
pub fn bind(
    ports: &PortPools,
    ips: impl IntoIterator<Item = IpAddr>,
    even: bool,
    pair: bool,
    start: usize,
    buffers: Buffers,
) -> Result<(Bound, Option<Bound>), BindError> {
    let mut result = Err(BindError::Family);
    for ip in ips {
        result = bind_on(ports, ip, even, pair, start, buffers);
        if !matches!(result, Err(BindError::NoPort)) {
            break;
        }
    }
    result
}

/// [`bind`] on one IP.
fn bind_on(
    ports: &PortPools,
    ip: IpAddr,
    even: bool,
    pair: bool,
    start: usize,
    buffers: Buffers,
) -> Result<(Bound, Option<Bound>), BindError> {
    let mut exhausted = None;
    // One port: bound, or `None` (a descriptor shortage is remembered and ends the search).
    let mut bind_port = |port: u16| {
        if exhausted.is_some() {
            return None;
        }
        let local = SocketAddr::new(ip, port);
        match udp::bind(local, false, buffers) {
            Ok(sock) => Some(Bound { sock, local }),
            Err(e) => {
                if is_fd_exhaustion(&e) {
                    exhausted = Some(e);
                }
                None
            }
        }
    };
    let got = ports.acquire(ip, even, pair, start, |p| {
        let a = bind_port(p)?;
        let b = if pair { Some(bind_port(p + 1)?) } else { None };
        Some((a, b))
    });
    match (got, exhausted) {
        (Some((_, socks)), _) => Ok(socks),
        (None, Some(e)) => Err(BindError::Descriptors(e)),
        (None, None) => Err(BindError::NoPort),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn relay_ips_most_free_first_then_configuration_order() {
        let pools = PortPools::new(50000..=50009);
        let (a, b, c, v6) = (ip("127.0.0.1"), ip("127.0.0.2"), ip("127.0.0.3"), ip("::1"));
        for taken in [a, a, c] {
            assert!(pools
                .acquire(taken, false, false, 0, |_| Some(()))
                .is_some());
        }
        let configured = [a, v6, b, c];
        let order: Vec<_> = pick_ips(&configured, &pools, AddressFamily::IPV4, a).collect();
        assert_eq!(
            order,
            [b, a, c],
            "b has the most free ports; then a, c as configured"
        );
        let order: Vec<_> = pick_ips(&configured, &pools, AddressFamily::IPV6, a).collect();
        assert_eq!(order, [v6]);
        // Nothing configured: the address the request arrived on, when it has the family.
        let order: Vec<_> = pick_ips(&[], &pools, AddressFamily::IPV4, a).collect();
        assert_eq!(order, [a]);
        assert_eq!(pick_ips(&[], &pools, AddressFamily::IPV6, a).count(), 0);
        assert_eq!(
            pick_ips(&[], &pools, AddressFamily::IPV4, ip("0.0.0.0")).count(),
            0
        );
    }

    #[test]
    fn bind_falls_back_to_the_next_address_when_every_port_is_held() {
        // The one port of the range is held on 127.0.0.1 by someone else (a free port from
        // the kernel, so no fixed port is assumed).
        let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let pools = PortPools::new(port..=port);
        let (a, b) = (ip("127.0.0.1"), ip("127.0.0.2"));
        let (bound, next) = bind(&pools, [a, b], false, false, 0, Buffers::default()).unwrap();
        assert_eq!(bound.local, SocketAddr::new(b, port));
        assert_eq!(bound.sock.local_addr().unwrap(), bound.local);
        assert!(next.is_none());
        assert_eq!((pools.in_use(a), pools.in_use(b)), (0, 1));
        assert!(matches!(
            bind(&pools, [a], false, false, 0, Buffers::default()),
            Err(BindError::NoPort)
        ));
        assert!(matches!(
            bind(&pools, [], false, false, 0, Buffers::default()),
            Err(BindError::Family)
        ));
    }
}
