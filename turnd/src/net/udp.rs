//! UDP sockets: batched receive (`recvmmsg`; IP_PKTINFO for the local address a datagram
//! reached, asked for only by wildcard listeners), batched send (`sendmmsg`, one call per
//! socket per loop pass, IP_PKTINFO for the source address) and the socket options a relay
//! needs.
//!
//! No socket asks for any other control message per datagram (ECN, timestamps, GRO): each
//! costs the kernel work on every receive, and a relay uses none of them.

#![allow(unsafe_code)] // setsockopt (IP_MTU_DISCOVER, IP_PKTINFO), recvmmsg and sendmmsg, which socket2 does not wrap.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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
/// Linux's default for UDP (`IP_PMTUDISC_WANT`) sets DF on every datagram; a relay only
/// wants it when asked.
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

    /// Keeps only the datagrams whose socket passes `keep` (their bytes stay in place).
    pub fn retain(&mut self, mut keep: impl FnMut(RawFd) -> bool) {
        self.items.retain(|d| keep(d.fd));
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

/// Whether UDP GSO (`UDP_SEGMENT`, Linux ≥ 4.18) is used; turned off for good the first time
/// the kernel refuses a segmented send.
static GSO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
/// Most segments in one GSO send (the kernel's limit is 64).
const GSO_SEGMENTS: usize = 64;
/// Most bytes in one GSO send.
const GSO_BYTES: usize = 65_000;

/// How many of `items` (starting at the first) can leave as one GSO send: same socket, same
/// destination and source, every segment the first one's size except a shorter last one.
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
            || d.fd != first.fd
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

/// The kernel-visible form of a pass's datagrams: one `msghdr` per message, where a message
/// is one datagram or a GSO run of datagrams to one destination. Built once per flush and
/// sent by either backend (`sendmmsg` per socket on epoll, one `SendMsg` per message on
/// io_uring); its memory stays put until the next build, so io_uring may read it after the
/// flush returns.
#[derive(Default)]
pub struct Messages {
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    ctrl: Vec<[u8; PKTINFO_SPACE]>,
    hdrs: Vec<libc::mmsghdr>,
    /// Per message: the socket, how many datagrams it carries, whether it needs DF forced.
    meta: Vec<(RawFd, usize, bool)>,
}

// SAFETY: the raw pointers inside point into the struct's own vectors and the queue it was
// built from; it is used by one thread at a time.
unsafe impl Send for Messages {}

impl std::fmt::Debug for Messages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messages")
            .field("messages", &self.hdrs.len())
            .finish()
    }
}

impl Messages {
    /// Builds the messages for `items` (grouped by [`SendQueue::grouped`]) over `data`.
    /// The messages point into `data`: keep it unchanged until they are sent.
    pub fn build(&mut self, items: &[OutDatagram], data: &[u8]) {
        let n = items.len();
        self.names.clear();
        self.iovs.clear();
        self.ctrl.clear();
        self.hdrs.clear();
        self.meta.clear();
        // Sized up front: the headers point into these vectors, which must not move.
        // SAFETY: all-zero sockaddr_storage, iovec and mmsghdr values are valid.
        self.names.resize_with(n, || unsafe { std::mem::zeroed() });
        self.ctrl.resize(n, [0; PKTINFO_SPACE]);
        self.hdrs.resize_with(n, || unsafe { std::mem::zeroed() });
        for d in items {
            let payload = SendQueue::payload(data, d);
            self.iovs.push(libc::iovec {
                iov_base: payload.as_ptr().cast_mut().cast(),
                iov_len: payload.len(),
            });
        }
        let mut m = 0;
        let mut i = 0;
        while i < n {
            let k = if items[i].force_dont_fragment {
                1
            } else {
                gso_run(&items[i..])
            };
            let d = &items[i];
            let (name, len) = sockaddr(&d.destination);
            self.names[m] = name;
            let msg = &mut self.hdrs[m].msg_hdr;
            msg.msg_name = std::ptr::addr_of_mut!(self.names[m]).cast();
            msg.msg_namelen = len;
            msg.msg_iov = std::ptr::addr_of_mut!(self.iovs[i]);
            msg.msg_iovlen = k;
            // SAFETY: the control buffer is ctrl[m], PKTINFO_SPACE bytes, owned by self.
            let mut used = unsafe { write_pktinfo(msg, &mut self.ctrl[m], d.src_ip) };
            if k > 1 {
                let size = u16::try_from(d.end - d.start).unwrap_or(u16::MAX);
                // SAFETY: as above; the UDP_SEGMENT message follows the PKTINFO one.
                used = unsafe { write_segment_size(msg, &mut self.ctrl[m], used, size) };
            }
            if used == 0 {
                msg.msg_control = std::ptr::null_mut();
                msg.msg_controllen = 0;
            }
            self.meta.push((d.fd, k, d.force_dont_fragment));
            m += 1;
            i += k;
        }
        self.hdrs.truncate(m);
    }

    /// How many messages were built.
    #[must_use]
    pub fn len(&self) -> usize {
        self.hdrs.len()
    }

    /// Whether none was built.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.hdrs.is_empty()
    }

    /// Message `j`'s socket, datagram count and whether DF must be forced.
    #[must_use]
    pub fn meta(&self, j: usize) -> (RawFd, usize, bool) {
        self.meta[j]
    }

    /// Whether message `j` goes to an IPv6 destination.
    #[must_use]
    pub fn is_ipv6(&self, j: usize) -> bool {
        self.names[j].ss_family == libc::AF_INET6 as libc::sa_family_t
    }

    /// Message `j`'s header (for io_uring's `SendMsg`).
    #[must_use]
    pub fn msghdr(&self, j: usize) -> *const libc::msghdr {
        std::ptr::addr_of!(self.hdrs[j].msg_hdr)
    }

    /// Sends every message with `sendmmsg`, one call per socket (up to [`SEND_BATCH`]
    /// messages each), forcing DF around the messages that need it.
    pub fn sendmmsg(&mut self, out: &mut Flushed) {
        let m = self.hdrs.len();
        let mut j = 0;
        while j < m {
            let (fd, _, df) = self.meta[j];
            if df {
                let sock = BorrowedSocket(fd);
                let v6 = self.is_ipv6(j);
                let _ = set_dont_fragment(&sock, v6, true);
                self.send_range(j, j + 1, out);
                let _ = set_dont_fragment(&sock, v6, false);
                j += 1;
                continue;
            }
            let end = (j..m)
                .take(SEND_BATCH)
                .take_while(|&x| self.meta[x].0 == fd && !self.meta[x].2)
                .last()
                .map_or(j + 1, |x| x + 1);
            self.send_range(j, end, out);
            j = end;
        }
    }

    fn send_range(&mut self, start: usize, end: usize, out: &mut Flushed) {
        let fd = self.meta[start].0;
        let mut done = start;
        while done < end {
            out.syscalls += 1;
            // SAFETY: hdrs[done..end] point at names, iovs and ctrl of self and at the
            // queue's bytes, all alive for the call.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(done),
                    (end - done) as libc::c_uint,
                    0,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                let k = self.meta[done].1;
                if k > 1
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                    )
                {
                    // The path cannot segment: send this run's datagrams one by one, and
                    // never segment again.
                    GSO.store(false, std::sync::atomic::Ordering::Relaxed);
                    out.syscalls += self.send_unsegmented(done, out);
                } else {
                    // Full buffer, EHOSTUNREACH, EMSGSIZE …: drop this message, go on.
                    out.failed += k as u64;
                }
                done += 1;
                continue;
            }
            let sent = usize::try_from(rc).unwrap_or(0);
            for x in done..done + sent {
                out.sent += self.meta[x].1 as u64;
            }
            if sent == 0 {
                out.failed += self.meta[done].1 as u64;
                done += 1;
            }
            done += sent;
        }
    }

    /// Sends message `j`'s datagrams one `sendmsg` each (GSO refused); returns the calls made.
    fn send_unsegmented(&mut self, j: usize, out: &mut Flushed) -> u64 {
        let (fd, k, _) = self.meta[j];
        let hdr = self.hdrs[j].msg_hdr;
        let mut calls = 0;
        for x in 0..k {
            let mut one = hdr;
            // SAFETY: msg_iov points at k consecutive iovecs of self.iovs.
            one.msg_iov = unsafe { hdr.msg_iov.add(x) };
            one.msg_iovlen = 1;
            // Keep the PKTINFO message only (it comes first); drop UDP_SEGMENT.
            if !one.msg_control.is_null() {
                // SAFETY: msg_control points at this message's control buffer.
                let first = unsafe { libc::CMSG_FIRSTHDR(&one) };
                one.msg_controllen = if first.is_null()
                    // SAFETY: `first` is a valid cmsghdr inside the buffer.
                    || unsafe { (*first).cmsg_level } == libc::SOL_UDP
                {
                    0
                } else {
                    // SAFETY: as above.
                    unsafe { libc::CMSG_SPACE((*first).cmsg_len as u32 - libc::CMSG_LEN(0)) as _ }
                };
                if one.msg_controllen == 0 {
                    one.msg_control = std::ptr::null_mut();
                }
            }
            calls += 1;
            // SAFETY: `one` points at live buffers.
            if unsafe { libc::sendmsg(fd, &one, 0) } < 0 {
                out.failed += 1;
            } else {
                out.sent += 1;
            }
        }
        calls
    }
}

/// A descriptor borrowed for a socket option.
#[derive(Debug)]
pub struct BorrowedSocket(pub RawFd);
impl AsRawFd for BorrowedSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

// ---------------------------------------------------------------------------------------------
// Batched receiving

/// Datagrams read per `recvmmsg`.
pub const RECV_BATCH: usize = 32;
/// Largest datagram accepted (UDP's maximum payload).
pub const DATAGRAM: usize = 65_536;
/// Control-message room per received datagram: one IP_PKTINFO or IPV6_PKTINFO message
/// (`CMSG_SPACE` of `in6_pktinfo` is 40 bytes), the only one any socket of ours asks for.
pub const RECV_CONTROL: usize = 64;

/// Asks the kernel to report the local address each datagram reached (IP_PKTINFO or
/// IPV6_RECVPKTINFO), as a control message per datagram.
///
/// Only a socket bound to a wildcard address needs it: a UDP listener on `0.0.0.0` answers
/// from the address the request reached. A relay socket or a listener bound to one address
/// already knows it, and the control message would cost the kernel a `put_cmsg` per
/// datagram (measured at ~2 % of a worker's time under paced load), so they never ask.
///
/// # Errors
/// The option could not be set.
pub fn report_destination(fd: &impl AsRawFd, is_ipv6: bool) -> io::Result<()> {
    if is_ipv6 {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
    }
}

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// The sender.
    pub from: SocketAddr,
    /// The local IP it reached, on a socket that asked for it ([`report_destination`]).
    pub dst_ip: Option<IpAddr>,
    /// Its bytes.
    pub data: &'a [u8],
}

/// A socket address from the kernel's `sockaddr` bytes (`sockaddr_in` / `sockaddr_in6`).
#[must_use]
pub fn parse_name(name: &[u8]) -> Option<SocketAddr> {
    if name.len() < 2 {
        return None;
    }
    let family = i32::from(u16::from_ne_bytes([name[0], name[1]]));
    match family {
        libc::AF_INET if name.len() >= 8 => {
            let port = u16::from_be_bytes([name[2], name[3]]);
            let ip = Ipv4Addr::new(name[4], name[5], name[6], name[7]);
            Some(SocketAddr::new(IpAddr::V4(ip), port))
        }
        libc::AF_INET6 if name.len() >= 24 => {
            let port = u16::from_be_bytes([name[2], name[3]]);
            let mut o = [0u8; 16];
            o.copy_from_slice(&name[8..24]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        _ => None,
    }
}

/// The destination address from the control messages of one datagram (IP_PKTINFO /
/// IPV6_PKTINFO); `None` when there is none.
#[must_use]
pub fn parse_pktinfo(mut ctrl: &[u8]) -> Option<IpAddr> {
    let hdr = size_of::<libc::cmsghdr>();
    while ctrl.len() >= hdr {
        // SAFETY: at least a header's worth of bytes; read unaligned.
        let c: libc::cmsghdr = unsafe { std::ptr::read_unaligned(ctrl.as_ptr().cast()) };
        let len = c.cmsg_len as usize;
        if len < hdr || len > ctrl.len() {
            return None;
        }
        let data = &ctrl[hdr..len];
        if c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_PKTINFO && data.len() >= 12 {
            // in_pktinfo: ifindex (4), spec_dst (4), addr (4): the header destination.
            return Some(IpAddr::V4(Ipv4Addr::new(
                data[8], data[9], data[10], data[11],
            )));
        }
        if c.cmsg_level == libc::IPPROTO_IPV6
            && c.cmsg_type == libc::IPV6_PKTINFO
            && data.len() >= 16
        {
            let mut o = [0u8; 16];
            o.copy_from_slice(&data[..16]);
            return Some(IpAddr::V6(Ipv6Addr::from(o)));
        }
        let step = (len + size_of::<usize>() - 1) & !(size_of::<usize>() - 1);
        if step >= ctrl.len() {
            return None;
        }
        ctrl = &ctrl[step..];
    }
    None
}

/// What `recvmmsg` said about one datagram of a batch.
#[derive(Debug, Clone, Copy)]
struct RecvMeta {
    from: Option<SocketAddr>,
    dst_ip: Option<IpAddr>,
    len: usize,
}

/// The receive buffers of one worker (reused by every socket) and its `recvmmsg`.
///
/// The headers, address and control buffers are kept between calls: building them afresh
/// (zeroed) on every call cost ~8.5 KB of `memset` per `recvmmsg`, which at audio rates on
/// epoll — one datagram per relay socket per pass — was the largest user-space item per
/// datagram. Each call rewrites only the fields the kernel reads.
pub struct RecvBatch {
    data: Vec<u8>,
    meta: [RecvMeta; RECV_BATCH],
    headers: Box<Headers>,
}

/// `recvmmsg`'s arrays; the pointers in `hdrs` and `iovs` are set on every call, to buffers
/// of the same [`RecvBatch`].
struct Headers {
    names: [libc::sockaddr_storage; RECV_BATCH],
    ctrl: [[u64; RECV_CONTROL / 8]; RECV_BATCH],
    hdrs: [libc::mmsghdr; RECV_BATCH],
    iovs: [libc::iovec; RECV_BATCH],
}

// SAFETY: the raw pointers inside `hdrs`/`iovs` only ever point at buffers owned by the same
// `RecvBatch` (and are rewritten before each use); nothing is shared with another thread.
unsafe impl Send for Headers {}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").finish_non_exhaustive()
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            data: vec![0; RECV_BATCH * DATAGRAM],
            meta: [RecvMeta {
                from: None,
                dst_ip: None,
                len: 0,
            }; RECV_BATCH],
            // SAFETY: all-zero sockaddr_storage, mmsghdr and iovec arrays are valid values.
            headers: Box::new(unsafe { std::mem::zeroed() }),
        }
    }
}

impl RecvBatch {
    /// Reads one batch from `fd` with `recvmmsg`; returns how many datagrams arrived
    /// (`Ok(0)` never: an empty socket is `WouldBlock`).
    ///
    /// # Errors
    /// `WouldBlock` when nothing is queued; others from the socket (ICMP errors surface here).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let Headers {
            names,
            ctrl,
            hdrs,
            iovs,
        } = &mut *self.headers;
        for (i, chunk) in self.data.chunks_mut(DATAGRAM).enumerate().take(RECV_BATCH) {
            iovs[i] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = std::ptr::addr_of_mut!(names[i]).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = std::ptr::addr_of_mut!(iovs[i]);
            h.msg_iovlen = 1;
            h.msg_control = ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = RECV_CONTROL as _;
        }
        let n = loop {
            // SAFETY: every header points at live buffers of `self.headers` and `self.data`.
            let rc = unsafe {
                libc::recvmmsg(
                    fd,
                    hdrs.as_mut_ptr(),
                    RECV_BATCH as libc::c_uint,
                    0,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                break usize::try_from(rc).unwrap_or(0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        for i in 0..n {
            let h = &hdrs[i].msg_hdr;
            // SAFETY: the kernel wrote `msg_namelen` bytes of the name and `msg_controllen`
            // bytes of control data into the buffers above.
            // `msg_controllen` is `size_t` on glibc but `socklen_t` on musl: the cast is needed.
            #[allow(clippy::unnecessary_cast)]
            let (name, control) = unsafe {
                (
                    std::slice::from_raw_parts(
                        std::ptr::addr_of!(names[i]).cast::<u8>(),
                        (h.msg_namelen as usize).min(size_of::<libc::sockaddr_storage>()),
                    ),
                    std::slice::from_raw_parts(
                        ctrl[i].as_ptr().cast::<u8>(),
                        (h.msg_controllen as usize).min(RECV_CONTROL),
                    ),
                )
            };
            self.meta[i] = RecvMeta {
                from: parse_name(name),
                dst_ip: parse_pktinfo(control),
                len: (hdrs[i].msg_len as usize).min(DATAGRAM),
            };
        }
        Ok(n)
    }

    /// The `i`-th datagram of the last batch; `None` if its sender's address could not be
    /// read (not seen on an inet socket).
    #[must_use]
    pub fn datagram(&self, i: usize) -> Option<Datagram<'_>> {
        let m = self.meta.get(i)?;
        let start = i * DATAGRAM;
        Some(Datagram {
            from: m.from?,
            dst_ip: m.dst_ip,
            data: self.data.get(start..start + m.len)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_pktinfo_parse() {
        let mut name = [0u8; 16];
        name[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        name[2..4].copy_from_slice(&3478u16.to_be_bytes());
        name[4..8].copy_from_slice(&[127, 0, 0, 9]);
        assert_eq!(parse_name(&name), Some("127.0.0.9:3478".parse().unwrap()));
        assert_eq!(parse_name(&[0u8; 1]), None);
        assert_eq!(parse_pktinfo(&[]), None);
        // A control message cut short is refused, not read past its end.
        let mut ctrl = [0u8; 32];
        ctrl[..8].copy_from_slice(&64u64.to_ne_bytes());
        assert_eq!(parse_pktinfo(&ctrl), None);
    }

    /// Only a socket that asked ([`report_destination`], a wildcard listener) gets each
    /// datagram's destination; a socket bound to one address (a relay) receives its datagrams
    /// with no control message at all.
    #[test]
    fn only_a_socket_that_asked_reports_the_destination() {
        let known = bind("127.0.0.1:0".parse().unwrap(), false, Buffers::default()).unwrap();
        let wild = bind("0.0.0.0:0".parse().unwrap(), false, Buffers::default()).unwrap();
        report_destination(&wild, false).unwrap();
        let wild_port = wild.local_addr().unwrap().port();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"to-known", known.local_addr().unwrap())
            .unwrap();
        tx.send_to(b"to-wild", ("127.0.0.1", wild_port)).unwrap();
        let mut batch = RecvBatch::default();
        for (sock, payload, dst) in [
            (&known, &b"to-known"[..], None),
            (&wild, &b"to-wild"[..], Some(IpAddr::from([127, 0, 0, 1]))),
        ] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            let n = loop {
                match batch.recv(sock.as_raw_fd()) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < deadline, "nothing arrived");
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(e) => panic!("recv: {e}"),
                }
            };
            assert_eq!(n, 1);
            let d = batch.datagram(0).expect("a datagram");
            assert_eq!(d.data, payload);
            assert_eq!(d.from, tx.local_addr().unwrap());
            assert_eq!(d.dst_ip, dst);
        }
    }

    /// Datagrams from different sockets to one destination never share a segmented send:
    /// each leaves from its own socket (a relay's traffic must come from its own relayed
    /// address).
    #[test]
    fn gso_never_merges_sockets() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let socks: Vec<_> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut q = SendQueue::default();
        for _ in 0..2 {
            for (i, s) in socks.iter().enumerate() {
                q.push(
                    s.as_raw_fd(),
                    rx.local_addr().unwrap(),
                    None,
                    false,
                    &[u8::try_from(i).unwrap(); 64],
                );
            }
        }
        let (items, data) = q.grouped();
        let mut msgs = Messages::default();
        msgs.build(items, data);
        assert_eq!(msgs.len(), 3, "one message per socket");
        let mut out = Flushed::default();
        msgs.sendmmsg(&mut out);
        assert_eq!(out.sent, 6);
        let mut buf = [0u8; 128];
        for _ in 0..6 {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            let i = usize::from(buf[0]);
            assert_eq!(n, 64);
            assert_eq!(
                from,
                socks[i].local_addr().unwrap(),
                "sent from its own socket"
            );
        }
    }

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
        let mut msgs = Messages::default();
        msgs.build(items, data);
        assert_eq!(msgs.len(), 2, "one segmented message per destination");
        let mut out = Flushed::default();
        msgs.sendmmsg(&mut out);
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
