//! UDP sockets with batched receive (quinn-udp: recvmmsg, IP_PKTINFO for the local address a
//! datagram reached) and the socket options a relay needs.

#![allow(unsafe_code)] // setsockopt for IP_MTU_DISCOVER / UDP_GRO, which socket2 does not wrap.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Receive/send buffer sizes to request; `None` keeps the OS default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Buffers {
    /// SO_RCVBUF.
    pub recv: Option<usize>,
    /// SO_SNDBUF.
    pub send: Option<usize>,
}

/// Binds a non-blocking UDP socket. `reuse_port` lets every worker bind the same listener
/// address so the kernel shards clients between them.
///
/// # Errors
/// The bind or an option failed.
pub fn bind(
    addr: SocketAddr,
    reuse_port: bool,
    buffers: Buffers,
) -> io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if let Some(n) = buffers.recv {
        sock.set_recv_buffer_size(n)?;
    }
    if let Some(n) = buffers.send {
        sock.set_send_buffer_size(n)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

fn setsockopt_int(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid fd, and a pointer to an int of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::addr_of!(value).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets or clears the IP "don't fragment" behaviour (DONT-FRAGMENT, RFC 8656 §18.9).
/// quinn-udp turns DF on for every socket; a relay only wants it when asked.
///
/// # Errors
/// The option could not be set.
pub fn set_dont_fragment(fd: &impl AsRawFd, is_ipv6: bool, on: bool) -> io::Result<()> {
    if is_ipv6 {
        let v = if on {
            libc::IPV6_PMTUDISC_DO
        } else {
            libc::IPV6_PMTUDISC_DONT
        };
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, v)
    } else {
        let v = if on {
            libc::IP_PMTUDISC_DO
        } else {
            libc::IP_PMTUDISC_DONT
        };
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, v)
    }
}

/// Turns UDP GRO off: quinn-udp enables it, but coalesced reads need 64 KiB × segments of
/// buffer per read, and a relay reads single datagrams into shared buffers.
///
/// # Errors
/// The option could not be set.
pub fn disable_gro(fd: &impl AsRawFd) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 0)
}
