//! UDP sockets: batched receive (quinn-udp: recvmmsg, IP_PKTINFO for the local address a
//! datagram reached), batched send (`sendmmsg`, one call per socket per loop pass, IP_PKTINFO
//! for the source address) and the socket options a relay needs.

#![allow(unsafe_code)] // setsockopt (IP_MTU_DISCOVER, UDP_GRO) and sendmmsg, which socket2 does not wrap.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

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

// ---------------------------------------------------------------------------------------------
// Batched sending

/// Datagrams handed to one `sendmmsg` call at most.
pub const SEND_BATCH: usize = 64;

/// One queued datagram: which socket, where to, and where its bytes sit in the queue.
#[derive(Debug, Clone, Copy)]
pub struct OutDatagram {
    /// The sending socket.
    pub fd: RawFd,
    /// The destination.
    pub destination: SocketAddr,
    /// The source IP to send from (IP_PKTINFO), for sockets bound to a wildcard address.
    pub src_ip: Option<IpAddr>,
    /// Send this one with DF although the socket normally sends without (DONT-FRAGMENT).
    pub force_dont_fragment: bool,
    start: usize,
    end: usize,
}

/// The datagrams of one loop pass, sent together at its end: one `sendmmsg` per socket on
/// the epoll backend, one submission for all on io_uring. Payloads are copied in (the core's
/// buffer is reused by the next call) into one growing buffer that is kept between passes.
#[derive(Debug, Default)]
pub struct SendQueue {
    data: Vec<u8>,
    items: Vec<OutDatagram>,
}

impl SendQueue {
    /// Queues `payload` for `fd` → `destination`.
    pub fn push(
        &mut self,
        fd: RawFd,
        destination: SocketAddr,
        src_ip: Option<IpAddr>,
        force_dont_fragment: bool,
        payload: &[u8],
    ) {
        let start = self.data.len();
        self.data.extend_from_slice(payload);
        self.items.push(OutDatagram {
            fd,
            destination,
            src_ip,
            force_dont_fragment,
            start,
            end: self.data.len(),
        });
    }

    /// Whether nothing is queued.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How many datagrams are queued.
    #[must_use]
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The queued datagrams, grouped by socket and destination (the order toward each
    /// destination kept: the sort is stable), and their bytes.
    pub fn grouped(&mut self) -> (&[OutDatagram], &[u8]) {
        self.items.sort_by_key(|d| (d.fd, d.destination));
        (&self.items, &self.data)
    }

    /// The bytes of one queued datagram.
    #[must_use]
    pub fn payload<'a>(data: &'a [u8], d: &OutDatagram) -> &'a [u8] {
        &data[d.start..d.end]
    }

    /// Empties the queue, keeping its memory.
    pub fn clear(&mut self) {
        self.items.clear();
        self.data.clear();
    }
}

/// A socket address in the C layout, and its length.
#[must_use]
pub fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let s = socket2::SockAddr::from(*addr);
    // SAFETY: SockAddr holds a sockaddr_storage-sized, initialised address of `len` bytes.
    let storage = unsafe { std::ptr::read(s.as_ptr().cast::<libc::sockaddr_storage>()) };
    (storage, s.len())
}

/// Space for one IP_PKTINFO or IPV6_PKTINFO control message.
pub const PKTINFO_SPACE: usize = 64;

/// Writes the control message that picks the source address `src` into `buf`; returns its
/// length (0 when none is needed).
///
/// # Safety
/// `msg` must point at `buf` as its control buffer (`msg_control`), `buf.len() >= PKTINFO_SPACE`.
pub unsafe fn write_pktinfo(msg: &mut libc::msghdr, buf: &mut [u8], src: Option<IpAddr>) -> usize {
    let Some(src) = src else { return 0 };
    msg.msg_control = buf.as_mut_ptr().cast();
    msg.msg_controllen = buf.len() as _;
    let cmsg = libc::CMSG_FIRSTHDR(msg);
    if cmsg.is_null() {
        return 0;
    }
    let len = match src {
        IpAddr::V4(ip) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            (*cmsg).cmsg_level = libc::IPPROTO_IP;
            (*cmsg).cmsg_type = libc::IP_PKTINFO;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
            libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize
        }
        IpAddr::V6(ip) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                ipi6_ifindex: 0,
            };
            (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
            (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
            libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as usize
        }
    };
    msg.msg_controllen = len as _;
    len
}

/// What a flush did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flushed {
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Datagrams dropped (full socket buffer, unreachable, …): UDP loses them as a network would.
    pub failed: u64,
    /// System calls made.
    pub syscalls: u64,
}

/// Sends `items` (all on one socket `fd`) with as few `sendmmsg` calls as possible.
pub fn sendmmsg_all(fd: RawFd, items: &[OutDatagram], data: &[u8], out: &mut Flushed) {
    let mut rest = items;
    while !rest.is_empty() {
        // A datagram that must carry DF on a socket that normally does not goes alone, with
        // the option toggled around it.
        if rest[0].force_dont_fragment {
            let d = rest[0];
            let sock = BorrowedSocket(fd);
            let v6 = d.destination.is_ipv6();
            let _ = set_dont_fragment(&sock, v6, true);
            send_chunk(fd, &rest[..1], data, out);
            let _ = set_dont_fragment(&sock, v6, false);
            rest = &rest[1..];
            continue;
        }
        let n = rest
            .iter()
            .take(SEND_BATCH)
            .take_while(|d| !d.force_dont_fragment)
            .count();
        send_chunk(fd, &rest[..n], data, out);
        rest = &rest[n..];
    }
}

struct BorrowedSocket(RawFd);
impl AsRawFd for BorrowedSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Whether UDP GSO (`UDP_SEGMENT`, Linux ≥ 4.18) is used; turned off for good the first time
/// the kernel refuses a segmented send.
static GSO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
/// Most segments in one GSO send (the kernel's limit is 64).
const GSO_SEGMENTS: usize = 64;
/// Most bytes in one GSO send.
const GSO_BYTES: usize = 65_000;

/// How many of `items` (starting at the first) can leave as one GSO send: same destination
/// and source, every segment the first one's size except a shorter last one.
fn gso_run(items: &[OutDatagram]) -> usize {
    let Some(first) = items.first() else { return 0 };
    if !GSO.load(std::sync::atomic::Ordering::Relaxed) {
        return 1;
    }
    let size = first.end - first.start;
    let mut n = 1;
    let mut bytes = size;
    for d in &items[1..] {
        let len = d.end - d.start;
        if n >= GSO_SEGMENTS
            || d.destination != first.destination
            || d.src_ip != first.src_ip
            || d.force_dont_fragment
            || len > size
            || bytes + len > GSO_BYTES
        {
            break;
        }
        n += 1;
        bytes += len;
        if len < size {
            break;
        }
    }
    n
}

/// Appends a `UDP_SEGMENT` control message after `used` bytes of `buf`; returns the new
/// length.
///
/// # Safety
/// `msg.msg_control` must point at `buf`.
unsafe fn write_segment_size(
    msg: &mut libc::msghdr,
    buf: &mut [u8],
    used: usize,
    size: u16,
) -> usize {
    let space = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
    if used + space > buf.len() {
        return used;
    }
    msg.msg_control = buf.as_mut_ptr().cast();
    let cmsg = buf.as_mut_ptr().add(used).cast::<libc::cmsghdr>();
    (*cmsg).cmsg_level = libc::SOL_UDP;
    (*cmsg).cmsg_type = libc::UDP_SEGMENT;
    (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size);
    msg.msg_controllen = (used + space) as _;
    used + space
}

fn send_chunk(fd: RawFd, chunk: &[OutDatagram], data: &[u8], out: &mut Flushed) {
    let n = chunk.len().min(SEND_BATCH);
    let mut names: [(libc::sockaddr_storage, libc::socklen_t); SEND_BATCH] =
        // SAFETY: all-zero is a valid sockaddr_storage.
        unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; SEND_BATCH] =
        // SAFETY: all-zero iovecs are valid (null, 0).
        unsafe { std::mem::zeroed() };
    let mut ctrl = [[0u8; PKTINFO_SPACE]; SEND_BATCH];
    // SAFETY: all-zero mmsghdrs are valid.
    let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
    // Message j covers items segs[j].0 .. segs[j].0 + segs[j].1.
    let mut segs = [(0usize, 0usize); SEND_BATCH];
    for (i, d) in chunk.iter().take(n).enumerate() {
        let payload = SendQueue::payload(data, d);
        iovs[i] = libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        };
    }
    let mut m = 0;
    let mut i = 0;
    while i < n {
        let k = gso_run(&chunk[i..n]);
        let d = &chunk[i];
        names[m] = sockaddr(&d.destination);
        let msg = &mut hdrs[m].msg_hdr;
        msg.msg_name = std::ptr::addr_of_mut!(names[m].0).cast();
        msg.msg_namelen = names[m].1;
        msg.msg_iov = std::ptr::addr_of_mut!(iovs[i]);
        msg.msg_iovlen = k;
        // SAFETY: the control buffer is ctrl[m], PKTINFO_SPACE bytes, owned for the call.
        let mut used = unsafe { write_pktinfo(msg, &mut ctrl[m], d.src_ip) };
        if k > 1 {
            let size = u16::try_from(d.end - d.start).unwrap_or(u16::MAX);
            // SAFETY: as above; the UDP_SEGMENT message follows the PKTINFO one.
            used = unsafe { write_segment_size(msg, &mut ctrl[m], used, size) };
        }
        if used == 0 {
            msg.msg_control = std::ptr::null_mut();
            msg.msg_controllen = 0;
        }
        segs[m] = (i, k);
        m += 1;
        i += k;
    }
    let mut done = 0;
    while done < m {
        out.syscalls += 1;
        // SAFETY: hdrs[done..m] point at names, iovs and ctrl, all alive for the call; the
        // payload slices borrow `data`, alive too.
        let rc = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr().add(done),
                (m - done) as libc::c_uint,
                0,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let (start, k) = segs[done];
            if k > 1
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                )
            {
                // The path cannot segment: send these one by one, and never segment again.
                GSO.store(false, std::sync::atomic::Ordering::Relaxed);
                let mut one = Flushed::default();
                for d in &chunk[start..start + k] {
                    send_chunk(fd, std::slice::from_ref(d), data, &mut one);
                }
                out.sent += one.sent;
                out.failed += one.failed;
                out.syscalls += one.syscalls;
            } else {
                // Full buffer, EHOSTUNREACH, EMSGSIZE …: drop this message, go on.
                out.failed += k as u64;
            }
            done += 1;
            continue;
        }
        let sent = usize::try_from(rc).unwrap_or(0);
        for (_, k) in &segs[done..done + sent] {
            out.sent += *k as u64;
        }
        if sent == 0 {
            out.failed += segs[done].1 as u64;
            done += 1;
        }
        done += sent;
    }
}

// ---------------------------------------------------------------------------------------------
// Batched receiving

/// Datagrams read per `recvmmsg`.
pub const RECV_BATCH: usize = 32;
/// Largest datagram accepted (UDP's maximum payload).
pub const DATAGRAM: usize = 65_536;

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// The sender.
    pub from: SocketAddr,
    /// The local IP it reached (IP_PKTINFO), when the socket reports it.
    pub dst_ip: Option<IpAddr>,
    /// Its bytes.
    pub data: &'a [u8],
}

/// The receive buffers of one worker (reused by every socket) and quinn-udp's recvmmsg.
pub struct RecvBatch {
    data: Vec<u8>,
    meta: [quinn_udp::RecvMeta; RECV_BATCH],
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").finish_non_exhaustive()
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            data: vec![0; RECV_BATCH * DATAGRAM],
            meta: [quinn_udp::RecvMeta::default(); RECV_BATCH],
        }
    }
}

impl RecvBatch {
    /// Reads one batch from `sock`; returns how many datagrams arrived (`Ok(0)` never: an
    /// empty socket is `WouldBlock`).
    ///
    /// # Errors
    /// `WouldBlock` when nothing is queued; others from the socket (ICMP errors surface here).
    pub fn recv(
        &mut self,
        state: &quinn_udp::UdpSocketState,
        sock: &std::net::UdpSocket,
    ) -> io::Result<usize> {
        let mut chunks = self.data.chunks_mut(DATAGRAM);
        let mut slices: [io::IoSliceMut<'_>; RECV_BATCH] =
            std::array::from_fn(|_| io::IoSliceMut::new(chunks.next().unwrap_or(&mut [])));
        state.recv(
            quinn_udp::UdpSockRef::from(sock),
            &mut slices,
            &mut self.meta,
        )
    }

    /// The `i`-th datagram of the last batch.
    #[must_use]
    pub fn datagram(&self, i: usize) -> Datagram<'_> {
        let m = &self.meta[i];
        let start = i * DATAGRAM;
        Datagram {
            from: m.addr,
            dst_ip: m.dst_ip,
            data: &self.data[start..start + m.len.min(DATAGRAM)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several datagrams to one destination leave as one segmented send (GSO) and arrive as
    /// separate datagrams, in order, with a shorter last one intact; other destinations in
    /// the same batch are not mixed in.
    #[test]
    fn gso_keeps_datagram_boundaries_and_order() {
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
        }
        let mut q = SendQueue::default();
        let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        for i in 0..10u8 {
            q.push(tx.as_raw_fd(), aa, None, false, &[i; 300]);
            if i % 3 == 0 {
                q.push(tx.as_raw_fd(), ba, None, false, &[100 + i; 7]);
            }
        }
        q.push(tx.as_raw_fd(), aa, None, false, &[42; 5]);
        let (items, data) = q.grouped();
        let mut out = Flushed::default();
        sendmmsg_all(tx.as_raw_fd(), items, data, &mut out);
        assert_eq!(out.sent, 15);
        assert_eq!(out.failed, 0);
        assert!(
            GSO.load(std::sync::atomic::Ordering::Relaxed),
            "the kernel took the segmented sends (no fallback)"
        );
        let mut buf = [0u8; 2048];
        for i in 0..10u8 {
            let n = a.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 300][..], "datagram {i} to a");
        }
        let n = a.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[42; 5][..], "the short last segment");
        for i in [0u8, 3, 6, 9] {
            let n = b.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[100 + i; 7][..], "datagram {i} to b");
        }
    }
}
