//! Listener sockets: one per worker per configured address (SO_REUSEPORT, so the kernel
//! spreads clients over the workers by 4-tuple hash), and one owner per port.
//!
//! **One owner per port.** SO_REUSEPORT would let a second process (another turnd, a
//! coturn) join our group silently and take a share of the clients. Before binding, turnd
//! binds each fixed-port address once *without* SO_REUSEPORT: that fails when anyone else
//! holds the port, and turnd refuses to start with a message naming the address. Its own
//! workers then share the port among themselves.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use super::stream;
use super::udp::{self, Buffers};

/// Why the listeners could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another process holds the port.
    #[error("{transport} {addr} is already in use by another process (is another turnd or coturn running?)")]
    InUse {
        /// "UDP" or "TCP".
        transport: &'static str,
        /// The address.
        addr: SocketAddr,
    },
    /// Binding failed otherwise.
    #[error("binding {transport} listener {addr}: {source}")]
    Bind {
        /// "UDP" or "TCP".
        transport: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

fn probe(addr: SocketAddr, ty: Type, transport: &'static str) -> Result<(), ListenError> {
    if addr.port() == 0 {
        return Ok(());
    }
    let err = |source| ListenError::Bind {
        transport,
        addr,
        source,
    };
    let proto = if ty == Type::DGRAM {
        Protocol::UDP
    } else {
        Protocol::TCP
    };
    let sock = Socket::new(Domain::for_address(addr), ty, Some(proto)).map_err(err)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true).map_err(err)?;
    }
    if ty == Type::STREAM {
        // TIME_WAIT leftovers of an earlier run must not count as another owner.
        sock.set_reuse_address(true).map_err(err)?;
    }
    match sock.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            Err(ListenError::InUse { transport, addr })
        }
        Err(e) => Err(err(e)),
    }
}

/// Binds `addr` for every worker: the first bind resolves port 0, the others join it.
///
/// # Errors
/// The port is held by another process, or a bind failed.
pub fn bind_udp(
    addr: SocketAddr,
    workers: usize,
    buffers: Buffers,
) -> Result<(SocketAddr, Vec<std::net::UdpSocket>), ListenError> {
    probe(addr, Type::DGRAM, "UDP")?;
    let err = |addr, source| ListenError::Bind {
        transport: "UDP",
        addr,
        source,
    };
    let first = udp::bind(addr, true, buffers).map_err(|e| err(addr, e))?;
    let actual = first.local_addr().map_err(|e| err(addr, e))?;
    let mut socks = vec![first];
    for _ in 1..workers {
        socks.push(udp::bind(actual, true, buffers).map_err(|e| err(actual, e))?);
    }
    Ok((actual, socks))
}

/// As [`bind_udp`], for TCP (and TLS) listeners.
///
/// # Errors
/// The port is held by another process, or a bind failed.
pub fn bind_tcp(
    addr: SocketAddr,
    workers: usize,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), ListenError> {
    probe(addr, Type::STREAM, "TCP")?;
    let err = |addr, source| ListenError::Bind {
        transport: "TCP",
        addr,
        source,
    };
    let first = stream::bind_listener(addr).map_err(|e| err(addr, e))?;
    let actual = first.local_addr().map_err(|e| err(addr, e))?;
    let mut socks = vec![first];
    for _ in 1..workers {
        socks.push(stream::bind_listener(actual).map_err(|e| err(actual, e))?);
    }
    Ok((actual, socks))
}

/// Raises the soft open-file limit to the hard limit (each allocation holds a descriptor per
/// relayed address, each TCP/TLS client one). Returns `(before, after)`.
///
/// # Errors
/// The limit could not be read or set.
#[allow(unsafe_code)]
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}
