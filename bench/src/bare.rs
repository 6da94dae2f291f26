//! The baseline: a bare batched UDP forwarder with no protocol (recvmmsg/sendmmsg), to put
//! turnd's cost per packet in proportion.
//!
//! It forwards what the load generator sends — a 4-byte ChannelData header and the payload —
//! to the echo peer and back, routing by the channel number alone: the client → peer
//! direction remembers which client owns a channel (a lock-free table indexed by channel),
//! the peer → client direction looks it up. No parsing beyond two bytes, no permissions, no
//! per-allocation sockets: the floor a relay cannot go below on this kernel.
//!
//! Each worker is two threads (`bare-fwd-out-N`, `bare-fwd-in-N`) over one SO_REUSEPORT
//! listener and one peer-facing socket; every wait is bounded by a receive timeout.

#![allow(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;

/// Datagrams per system call.
pub(crate) const BATCH: usize = 32;
/// Largest datagram handled.
const MTU: usize = 2048;
/// Channel numbers routed (0x4000 + index).
const CHANNELS: usize = 4096;

/// A running forwarder.
#[derive(Debug)]
pub struct BareForwarder {
    /// The client-facing address.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn pack(a: SocketAddrV4) -> u64 {
    (u64::from(a.ip().to_bits()) << 16) | u64::from(a.port()) | (1 << 48)
}

fn unpack(v: u64) -> Option<SocketAddrV4> {
    if v == 0 {
        return None;
    }
    #[allow(clippy::cast_possible_truncation)]
    Some(SocketAddrV4::new(
        Ipv4Addr::from_bits((v >> 16) as u32),
        v as u16,
    ))
}

fn to_sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = a.ip().to_bits().to_be();
    s
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from_bits(u32::from_be(s.sin_addr.s_addr)),
        u16::from_be(s.sin_port),
    )
}

/// Batch buffers for one thread: datagrams, their addresses and the mmsghdr arrays.
pub(crate) struct Batch {
    data: Vec<[u8; MTU]>,
    addrs: Vec<libc::sockaddr_in>,
    lens: [usize; BATCH],
}

impl Batch {
    pub(crate) fn new() -> Self {
        // SAFETY: zeroed sockaddr_in is valid.
        let zero: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        Self {
            data: vec![[0u8; MTU]; BATCH],
            addrs: vec![zero; BATCH],
            lens: [0; BATCH],
        }
    }

    /// recvmmsg: waits for one datagram (up to the socket's timeout), takes what else is
    /// queued. Returns the count.
    pub(crate) fn recv(&mut self, sock: &UdpSocket) -> usize {
        let mut iov: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.data[i].as_mut_ptr().cast(),
            iov_len: MTU,
        });
        // SAFETY: mmsghdr is plain old data; zero is valid.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = std::ptr::from_mut(&mut self.addrs[i]).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut iov[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every pointer refers to live buffers of the stated sizes.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let n = usize::try_from(n).unwrap_or(0);
        for (i, h) in hdrs.iter().enumerate().take(n) {
            self.lens[i] = h.msg_len as usize;
        }
        n
    }

    /// sendmmsg of `self.data[i][..lens[i]]` to `addrs[i]` for the listed indices.
    pub(crate) fn send(&mut self, sock: &UdpSocket, which: &[usize]) {
        if which.is_empty() {
            return;
        }
        let mut iov: [libc::iovec; BATCH] = std::array::from_fn(|_| libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        });
        // SAFETY: zero is valid for mmsghdr.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (k, &i) in which.iter().enumerate() {
            iov[k] = libc::iovec {
                iov_base: self.data[i].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
            hdrs[k].msg_hdr.msg_name = std::ptr::from_mut(&mut self.addrs[i]).cast();
            hdrs[k].msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdrs[k].msg_hdr.msg_iov = &mut iov[k];
            hdrs[k].msg_hdr.msg_iovlen = 1;
        }
        let mut done = 0;
        while done < which.len() {
            // SAFETY: as in recv; `done..` stays within the filled headers.
            let n = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    hdrs.as_mut_ptr().add(done),
                    (which.len() - done) as libc::c_uint,
                    0,
                )
            };
            let Ok(n) = usize::try_from(n) else { break };
            if n == 0 {
                break;
            }
            done += n;
        }
    }
}

fn reuseport_socket(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_reuse_port(true)?;
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// One direction of a worker until `stop`: receives a batch from `from`, routes each
/// datagram by its channel number's slot in `table` (`route` rewrites the address and says
/// whether to send), sends the routed ones from `to`.
fn forward(
    from: &UdpSocket,
    to: &UdpSocket,
    stop: &AtomicBool,
    table: &[AtomicU64],
    mut route: impl FnMut(&AtomicU64, &mut libc::sockaddr_in) -> bool,
) {
    let mut b = Batch::new();
    let mut which = Vec::with_capacity(BATCH);
    while !stop.load(Ordering::Relaxed) {
        let n = b.recv(from);
        which.clear();
        for i in 0..n {
            if b.lens[i] < 4 {
                continue;
            }
            let ch = usize::from(u16::from_be_bytes([b.data[i][0], b.data[i][1]]));
            let Some(slot) = ch.checked_sub(0x4000).and_then(|k| table.get(k)) else {
                continue;
            };
            if route(slot, &mut b.addrs[i]) {
                which.push(i);
            }
        }
        b.send(to, &which);
    }
}

impl BareForwarder {
    /// Starts `workers` forwarding workers to `peer` (an IPv4 address).
    ///
    /// # Errors
    /// A socket could not be bound.
    pub fn start(workers: usize, peer: SocketAddr) -> anyhow::Result<Self> {
        let SocketAddr::V4(peer) = peer else {
            anyhow::bail!("the bare forwarder handles IPv4 peers only");
        };
        let table: Arc<Vec<AtomicU64>> =
            Arc::new((0..CHANNELS).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let first = reuseport_socket(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..workers.max(1) {
            listeners.push(reuseport_socket(addr).context("bare forwarder listener")?);
        }
        let mut threads = Vec::new();
        for (w, listener) in listeners.into_iter().enumerate() {
            let relay = reuseport_socket(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            for s in [&listener, &relay] {
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
            }
            let (l_out, r_out) = (listener.try_clone()?, relay.try_clone()?);
            let (table_out, stop_out) = (table.clone(), stop.clone());
            let peer_sa = to_sockaddr(peer);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("bare-fwd-out-{w}"))
                    .spawn(move || {
                        // Client → peer: remember the channel's client, send to the peer.
                        forward(&l_out, &r_out, &stop_out, &table_out, |slot, addr| {
                            let client = pack(from_sockaddr(addr));
                            if slot.load(Ordering::Relaxed) != client {
                                slot.store(client, Ordering::Relaxed);
                            }
                            *addr = peer_sa;
                            true
                        });
                    })?,
            );
            let (table_in, stop_in) = (table.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("bare-fwd-in-{w}"))
                    .spawn(move || {
                        // Peer → client: send to the channel's client, if one is known.
                        forward(
                            &relay,
                            &listener,
                            &stop_in,
                            &table_in,
                            |slot, addr| match unpack(slot.load(Ordering::Relaxed)) {
                                Some(client) => {
                                    *addr = to_sockaddr(client);
                                    true
                                }
                                None => false,
                            },
                        );
                    })?,
            );
        }
        Ok(Self {
            addr,
            stop,
            threads,
        })
    }

    /// Stops the threads.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
