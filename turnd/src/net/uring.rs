//! The io_uring backend (the `io-uring` crate; Linux ≥ 6.0 for multishot receive).
//!
//! * **Receive:** one multishot `RecvMsg` per UDP socket into a provided-buffer ring shared by
//!   every socket of the worker ([`BUFFERS`] × [`BUFFER_SIZE`]); each completion is one
//!   datagram with its source address (and IP_PKTINFO on a wildcard listener, the only
//!   socket that asks for it). A datagram larger than a buffer's payload room
//!   ([`MAX_DATAGRAM`] bytes) is dropped and counted (`turnd_oversized_datagrams_total`; a
//!   TURN datagram that crosses a real network is below 1,500). When the buffers run out the
//!   kernel ends the multishot, and it is re-armed after the buffers are returned.
//! * **Send:** every datagram of a pass becomes a `SendMsg` (with `MSG_DONTWAIT`, so a full
//!   socket buffer drops it as UDP would, never parks it), all submitted by one
//!   `io_uring_enter` — the batching epoll cannot do for the client → peer half, where each
//!   datagram leaves through its own relay socket.
//! * **Streams, TCP listeners, the waker:** readiness on a `mio::Poll`, whose descriptor the
//!   ring watches with a multishot `PollAdd`; one wait covers everything.
//!
//! * **Waiting:** one `io_uring_enter` per pass submits what the last pass queued (its sends,
//!   re-armed receives) and waits for the first completion. The ring is set up with
//!   `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN` (Linux ≥ 6.1) where the kernel
//!   takes it: completion work then runs inside that wait, on the worker, instead of
//!   interrupting it as packets arrive, and a wait that finds datagrams already queued
//!   returns without sleeping; an older kernel gets a plain ring (logged at start). A pass
//!   with work left over (a backlog, completions beyond a budget) never waits, so the
//!   per-socket bound of [`io`](super::io) holds unchanged.
//!
//!   No batch wait (`min_complete` > 1 with a short `min_wait_usec`, Linux ≥ 6.12): tried
//!   and measured (bench/RESULTS.md, "io_uring wake-ups"), it costs more than it saves on
//!   WebRTC-shaped load. Paced media arrives in bursts, so the batch timer mostly fires on
//!   an idle ring and adds a wake-up instead of removing one (50 µs: no change; 200 µs:
//!   +35 % context switches, +20 % CPU per packet, +0.2 ms latency).

#![allow(unsafe_code)] // io_uring: buffer ring memory and msghdrs shared with the kernel.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;

use super::io::{Backend, Handler, UdpKey, UDP_BUDGET};
use super::udp::{self, Datagram, Flushed, SendQueue};

/// Buffers in the provided-buffer ring (a power of two): 4 MiB per worker, allocated and
/// touched once at start (a fixed cost, not one that grows with allocations). A buffer is
/// held only from a datagram's arrival to its handling in the same pass; when every buffer is
/// busy the kernel pauses the socket's receive (the datagrams wait in its queue) until the
/// next pass re-arms it.
pub const BUFFERS: u16 = 1024;
/// Size of each buffer.
pub const BUFFER_SIZE: usize = 4096;
const NAME_LEN: usize = size_of::<libc::sockaddr_storage>();
const CONTROL_LEN: usize = udp::RECV_CONTROL;
const OUT_HEADER: usize = 16; // struct io_uring_recvmsg_out
/// The largest datagram the ring receives whole.
pub const MAX_DATAGRAM: usize = BUFFER_SIZE - OUT_HEADER - NAME_LEN - CONTROL_LEN;
const GROUP: u16 = 0;
/// Readiness events taken from the mio poll per look.
const EVENTS: usize = 1024;
const RING_ENTRIES: u32 = 4096;

const KIND_SHIFT: u32 = 60;
const KIND_RECV: u64 = 1;
const KIND_POLL: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_CANCEL: u64 = 4;

fn recv_data(key: usize, generation: u32) -> u64 {
    (KIND_RECV << KIND_SHIFT) | (u64::from(generation & 0x0FFF_FFFF) << 32) | key as u64
}

struct Entry {
    fd: RawFd,
    user: u64,
    generation: u32,
    armed: bool,
    /// Datagrams delivered in pass `pass` (the per-socket budget).
    pass: u64,
    delivered: usize,
    /// Removed by the worker: the socket is kept until the kernel lets go of it.
    closing: Option<std::net::UdpSocket>,
}

/// The provided-buffer ring: `BUFFERS` entries the kernel takes buffers from.
struct BufRing {
    ring: *mut types::BufRingEntry,
    ring_layout: std::alloc::Layout,
    data: Vec<u8>,
    tail: u16,
}

// SAFETY: the ring memory is owned by this struct and only touched from the owning thread.
unsafe impl Send for BufRing {}

impl BufRing {
    fn new() -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(
            size_of::<types::BufRingEntry>() * usize::from(BUFFERS),
            4096,
        )
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a non-zero-sized layout.
        let ring = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        if ring.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut r = Self {
            ring,
            ring_layout: layout,
            data: touched(usize::from(BUFFERS) * BUFFER_SIZE),
            tail: 0,
        };
        for bid in 0..BUFFERS {
            r.push(bid);
        }
        r.publish();
        Ok(r)
    }

    fn push(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (BUFFERS - 1));
        // SAFETY: idx < BUFFERS, inside the ring allocation.
        let e = unsafe { &mut *self.ring.add(idx) };
        let addr = self.data.as_ptr() as u64 + u64::from(bid) * BUFFER_SIZE as u64;
        e.set_addr(addr);
        e.set_len(BUFFER_SIZE as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field lives in the ring's first entry; the kernel reads it.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring).cast_mut();
            std::sync::atomic::AtomicU16::from_ptr(tail)
                .store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }

    fn buffer(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * BUFFER_SIZE;
        &self.data[start..start + len.min(BUFFER_SIZE)]
    }
}

/// `len` bytes, all written (a non-zero fill cannot become calloc's untouched pages): the
/// memory is resident from the start, so it never shows up later as growth.
fn touched(len: usize) -> Vec<u8> {
    vec![0xA5; len]
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the ring is unregistered (dropped) first.
        unsafe { std::alloc::dealloc(self.ring.cast(), self.ring_layout) };
    }
}

/// See the [module docs](self).
pub struct Uring {
    ring: IoUring,
    poll: mio::Poll,
    events: mio::Events,
    poll_armed: bool,
    bufs: BufRing,
    recv_msg: Box<libc::msghdr>,
    udp: Slab<Entry>,
    generation: u32,
    /// Completions held over to the next pass (budget reached, or seen during a flush).
    deferred: VecDeque<(u64, i32, u32)>,
    /// Datagrams of the last flush still owned by the kernel.
    inflight_data: SendQueue,
    messages: udp::Messages,
    send_failed: u64,
    rearm: Vec<usize>,
    /// The pass counter (per-socket budgets).
    pass: u64,
    /// Reused buffers: completions of one look, held completions.
    batch: Vec<(u64, i32, u32)>,
    held: VecDeque<(u64, i32, u32)>,
    entries: Vec<squeue::Entry>,
    /// How the ring runs completion work (set up once, logged at start).
    mode: Mode,
    /// The ring was set up disabled (single issuer): the worker's thread enables it, and so
    /// becomes its one submitter.
    enabled: bool,
    /// Entries pushed so far, and the count when the last flush's sends were pushed: the
    /// kernel has taken those once its head passed it.
    pushed: u64,
    sends_end: u64,
}

/// How a ring runs completion work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN`: in the worker's wait.
    Deferred,
    /// The kernel refused those flags (Linux < 6.1): as packets arrive.
    Plain,
}

// SAFETY: every raw pointer inside (msghdrs, the buffer ring) points into memory this struct
// owns; it moves between threads only before the loop starts.
unsafe impl Send for Uring {}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("udp", &self.udp.len())
            .finish()
    }
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    // SAFETY: uname fills the struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return false;
    }
    let release: String = u
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8 as char)
        .collect();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (Some(ma), Some(mi)) = (parts.next(), parts.next()) else {
        return false;
    };
    (ma, mi) >= (major, minor)
}

impl Uring {
    /// Sets up a ring, its buffer ring and the poll it watches.
    ///
    /// # Errors
    /// io_uring is unavailable (old kernel, `kernel.io_uring_disabled`, a seccomp profile),
    /// or the kernel lacks multishot receive.
    pub fn new() -> io::Result<Self> {
        if !kernel_at_least(6, 0) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "multishot receive needs Linux 6.0 or later",
            ));
        }
        // Disabled until the worker's thread enables it: a single-issuer ring belongs to the
        // task that enables it, and this one is built on the starting thread.
        let (ring, mode) = match IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 4)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled()
            .build(RING_ENTRIES)
        {
            Ok(r) => (r, Mode::Deferred),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                IoUring::builder()
                    .setup_cqsize(RING_ENTRIES * 4)
                    .build(RING_ENTRIES)?,
                Mode::Plain,
            ),
            Err(e) => return Err(e),
        };

        let bufs = BufRing::new()?;
        // SAFETY: the ring memory lives as long as `bufs`, which lives as long as the ring
        // (fields drop in order: `ring` first).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(bufs.ring as u64, BUFFERS, GROUP, 0)?;
        }
        // SAFETY: all-zero is a valid msghdr; only the lengths matter to the kernel here.
        let mut recv_msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_msg.msg_namelen = NAME_LEN as libc::socklen_t;
        recv_msg.msg_controllen = CONTROL_LEN as _;
        let me = Self {
            ring,
            poll: mio::Poll::new()?,
            events: mio::Events::with_capacity(EVENTS),
            poll_armed: false,
            bufs,
            recv_msg,
            udp: Slab::new(),
            generation: 0,
            deferred: VecDeque::new(),
            inflight_data: SendQueue::default(),
            messages: udp::Messages::default(),
            send_failed: 0,
            rearm: Vec::new(),
            pass: 0,
            batch: Vec::with_capacity(1024),
            held: VecDeque::new(),
            entries: Vec::new(),
            enabled: mode == Mode::Plain,
            mode,
            pushed: 0,
            sends_end: 0,
        };
        // Nothing is submitted here: the ring is built on the starting thread, and io_uring
        // runs a request's completion work on the task that submitted it. The worker's first
        // wait arms the poll (and every receive), so their completions wake the worker.
        Ok(me)
    }

    /// How completion work runs (for the start-up log).
    #[must_use]
    pub fn describe(&self) -> &'static str {
        match self.mode {
            Mode::Deferred => "completion work deferred into the wait (single issuer)",
            Mode::Plain => "plain ring (the kernel refused DEFER_TASKRUN)",
        }
    }

    /// How the ring runs completion work.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Enables a ring set up disabled, from the thread that will submit to it.
    fn enable(&mut self) -> io::Result<()> {
        if !self.enabled {
            self.ring.submitter().register_enable_rings()?;
            self.enabled = true;
        }
        Ok(())
    }

    fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry's pointers (msghdrs, buffers) outlive its completion.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                self.pushed += 1;
                return Ok(());
            }
            self.enable()?;
            self.ring.submit()?;
        }
    }

    /// Submits what is queued and waits: not at all (`Some(ZERO)`), until `timeout`, or
    /// without limit. Deferred completion work runs here (every call asks for events).
    fn enter(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let res = match timeout {
            Some(t) if t.is_zero() => {
                let len = u32::try_from(self.ring.submission().len()).unwrap_or(u32::MAX);
                // SAFETY: no argument is passed; the queued entries' memory is alive.
                unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        len,
                        0,
                        io_uring::EnterFlags::GETEVENTS.bits(),
                        None,
                    )
                }
            }
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn arm_poll(&mut self) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fd(self.poll.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(KIND_POLL << KIND_SHIFT);
        self.push(&e)?;
        self.poll_armed = true;
        Ok(())
    }

    fn arm_recv(&mut self, key: usize) -> io::Result<()> {
        let Some(en) = self.udp.get_mut(key) else {
            return Ok(());
        };
        if en.armed || en.closing.is_some() {
            return Ok(());
        }
        en.armed = true;
        let data = recv_data(key, en.generation);
        let e = opcode::RecvMsgMulti::new(types::Fd(en.fd), &*self.recv_msg, GROUP)
            .build()
            .user_data(data);
        self.push(&e)
    }

    /// Handles one completion; returns false when it must wait for the next pass (budget).
    fn complete(&mut self, data: u64, result: i32, flags: u32, handler: &mut dyn Handler) -> bool {
        match data >> KIND_SHIFT {
            KIND_RECV => {
                let key = (data & 0xFFFF_FFFF) as usize;
                let generation = ((data >> 32) & 0x0FFF_FFFF) as u32;
                let more = cqueue::more(flags);
                let bid = cqueue::buffer_select(flags);
                let Some(en) = self.udp.get(key) else {
                    if let Some(b) = bid {
                        self.bufs.push(b);
                    }
                    return true;
                };
                if en.generation & 0x0FFF_FFFF != generation {
                    if let Some(b) = bid {
                        self.bufs.push(b);
                    }
                    return true;
                }
                if result >= 0 && en.closing.is_none() {
                    let pass = self.pass;
                    let Some(en) = self.udp.get_mut(key) else {
                        return true;
                    };
                    if en.pass != pass {
                        en.pass = pass;
                        en.delivered = 0;
                    }
                    if en.delivered >= UDP_BUDGET {
                        return false;
                    }
                    en.delivered += 1;
                }
                let Some(en) = self.udp.get(key) else {
                    return true;
                };
                let user = en.user;
                if result >= 0 {
                    if let Some(b) = bid {
                        let len = usize::try_from(result).unwrap_or(0);
                        if self.udp.get(key).is_some_and(|e| e.closing.is_none()) {
                            deliver(self.bufs.buffer(b, len), &self.recv_msg, user, handler);
                        }
                        self.bufs.push(b);
                    }
                } else if result != -libc::ENOBUFS && result != -libc::ECANCELED {
                    handler.receive_error(user, &io::Error::from_raw_os_error(-result));
                }
                if !more {
                    if let Some(en) = self.udp.get_mut(key) {
                        en.armed = false;
                        if en.closing.is_some() {
                            self.udp.remove(key);
                        } else {
                            self.rearm.push(key);
                        }
                    }
                }
                true
            }
            KIND_POLL => {
                if !cqueue::more(flags) {
                    self.poll_armed = false;
                }
                let events = std::mem::replace(&mut self.events, mio::Events::with_capacity(0));
                let mut events = events;
                if self.poll.poll(&mut events, Some(Duration::ZERO)).is_ok() {
                    // A full batch may have left readiness behind that no new wake-up will
                    // announce: look again next pass.
                    if events.iter().count() >= EVENTS {
                        self.deferred
                            .push_back((KIND_POLL << KIND_SHIFT, 0, cqueue_more_flag()));
                    }
                    for ev in &events {
                        handler.ready(
                            ev.token(),
                            ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                            ev.is_writable() || ev.is_write_closed(),
                        );
                    }
                }
                self.events = events;
                true
            }
            KIND_SEND => {
                if result < 0 {
                    self.send_failed += data & 0xFFFF_FFFF;
                }
                true
            }
            _ => true,
        }
    }
}

/// The flags of a completion that keeps its multishot armed.
fn cqueue_more_flag() -> u32 {
    // IORING_CQE_F_MORE (include/uapi/linux/io_uring.h); the crate reads it with `more()`.
    1 << 1
}

/// Parses one multishot receive buffer and hands the datagram over.
fn deliver(buf: &[u8], msg: &libc::msghdr, user: u64, handler: &mut dyn Handler) {
    let Ok(out) = types::RecvMsgOut::parse(buf, msg) else {
        return;
    };
    if out.is_payload_truncated() {
        handler.oversized(user);
        return;
    }
    if out.is_name_data_truncated() {
        return;
    }
    let Some(from) = udp::parse_name(out.name_data()) else {
        return;
    };
    let dst_ip = udp::parse_pktinfo(out.control_data());
    handler.datagram(
        user,
        Datagram {
            from,
            dst_ip,
            data: out.payload_data(),
        },
    );
}

impl Backend for Uring {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn registry(&self) -> &mio::Registry {
        self.poll.registry()
    }

    fn add_udp(&mut self, fd: RawFd, user: u64) -> io::Result<UdpKey> {
        self.generation = self.generation.wrapping_add(1);
        let key = self.udp.insert(Entry {
            fd,
            user,
            generation: self.generation,
            armed: false,
            pass: 0,
            delivered: 0,
            closing: None,
        });
        self.arm_recv(key)?;
        Ok(UdpKey(key))
    }

    fn remove_udp(&mut self, key: UdpKey, socket: std::net::UdpSocket) {
        let Some(en) = self.udp.get_mut(key.0) else {
            return;
        };
        if !en.armed {
            self.udp.remove(key.0);
            drop(socket);
            return;
        }
        let data = recv_data(key.0, en.generation);
        en.closing = Some(socket);
        // The receive's last completion may already wait in the held queue: then the
        // kernel has let go of the socket.
        if self
            .deferred
            .iter()
            .any(|&(d, _, f)| d == data && !cqueue::more(f))
        {
            self.udp.remove(key.0);
            return;
        }
        let cancel = (KIND_CANCEL << KIND_SHIFT) | key.0 as u64;
        let e = opcode::AsyncCancel::new(data).build().user_data(cancel);
        if self.enable().is_err() || self.push(&e).is_err() {
            return;
        }
        // Wait (briefly: a cancel completes at once) for the receive to let go of the
        // socket, then close it: its port must be free before the answer that freed it
        // leaves.
        for _ in 0..64 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let mut done = false;
            let mut batch = std::mem::take(&mut self.batch);
            batch.clear();
            batch.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(d, result, flags) in &batch {
                if d == data && !cqueue::more(flags) {
                    if let Some(b) = cqueue::buffer_select(flags) {
                        self.bufs.push(b);
                    }
                    done = true;
                } else if d == cancel {
                    // 0: found and cancelled (its last completion follows); otherwise
                    // (-ENOENT, -EALREADY) it had already ended.
                    if result != 0 {
                        done = true;
                    }
                } else if d >> KIND_SHIFT != KIND_CANCEL {
                    self.deferred.push_back((d, result, flags));
                }
            }
            self.batch = batch;
            if done {
                self.udp.remove(key.0);
                self.bufs.publish();
                return;
            }
        }
    }

    fn poll(&mut self, timeout: Option<Duration>, handler: &mut dyn Handler) -> io::Result<()> {
        self.enable()?;
        for key in std::mem::take(&mut self.rearm) {
            self.arm_recv(key)?;
        }
        if !self.poll_armed {
            self.arm_poll()?;
        }
        self.bufs.publish();
        // The one `io_uring_enter` of the pass: it submits the last pass's sends too.
        let ready = !self.deferred.is_empty() || !self.ring.completion().is_empty();
        self.enter(if ready { Some(Duration::ZERO) } else { timeout })?;
        handler.woke();
        self.pass = self.pass.wrapping_add(1);
        let mut held = std::mem::take(&mut self.held);
        held.clear();
        let deferred = std::mem::take(&mut self.deferred);
        for (data, result, flags) in deferred {
            if !self.complete(data, result, flags, handler) {
                held.push_back((data, result, flags));
            }
        }
        loop {
            let mut batch = std::mem::take(&mut self.batch);
            batch.clear();
            batch.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            if batch.is_empty() {
                self.batch = batch;
                break;
            }
            for &(data, result, flags) in &batch {
                if !self.complete(data, result, flags, handler) {
                    held.push_back((data, result, flags));
                }
            }
            self.batch = batch;
            if held.len() > usize::from(BUFFERS) / 2 {
                break;
            }
        }
        // Completions queued while handling (a re-look at the poll) join the held ones.
        held.append(&mut self.deferred);
        self.held = std::mem::replace(&mut self.deferred, held);
        self.bufs.publish();
        Ok(())
    }

    fn has_backlog(&self) -> bool {
        !self.deferred.is_empty()
    }

    fn flush(&mut self, queue: &mut SendQueue) -> Flushed {
        let mut out = Flushed {
            failed: std::mem::take(&mut self.send_failed),
            ..Flushed::default()
        };
        if queue.is_empty() {
            return out;
        }
        // The last flush's memory (the queue's bytes, the message headers) is reused below.
        // Its sends were `MSG_DONTWAIT`, so each completed (or failed) inside the submission
        // that carried it: this pass's wait, unless that wait failed to submit (then submit
        // them now).
        let head = self.pushed - self.ring.submission().len() as u64;
        if head < self.sends_end && self.enable().is_ok() {
            out.syscalls += 1;
            let _ = self.ring.submit();
        }
        std::mem::swap(&mut self.inflight_data, queue);
        queue.clear();
        let (items, data) = self.inflight_data.grouped();
        self.messages.build(items, data);
        let mut entries = std::mem::take(&mut self.entries);
        entries.clear();
        for j in 0..self.messages.len() {
            let (fd, k, df) = self.messages.meta(j);
            if df {
                // Rare: DF forced on a socket that normally sends without; done
                // synchronously with the option toggled around it.
                let v6 = self.messages.is_ipv6(j);
                let sock = udp::BorrowedSocket(fd);
                let _ = udp::set_dont_fragment(&sock, v6, true);
                // SAFETY: the header points at live buffers of `messages` and the queue.
                let rc = unsafe { libc::sendmsg(fd, self.messages.msghdr(j), 0) };
                let _ = udp::set_dont_fragment(&sock, v6, false);
                if rc < 0 {
                    out.failed += k as u64;
                } else {
                    out.sent += k as u64;
                }
                continue;
            }
            // Only a failure posts a completion (counted in the next flush's `failed`).
            entries.push(
                opcode::SendMsg::new(types::Fd(fd), self.messages.msghdr(j))
                    .flags(libc::MSG_DONTWAIT as u32)
                    .build()
                    .flags(squeue::Flags::SKIP_SUCCESS)
                    .user_data((KIND_SEND << KIND_SHIFT) | k as u64),
            );
        }
        for e in &entries {
            let k = e.get_user_data() & 0xFFFF_FFFF;
            if self.push(e).is_err() {
                out.failed += k;
            } else {
                out.sent += k;
            }
        }
        self.entries = entries;
        // Submitted by the next pass's wait, which follows at once: one `io_uring_enter` per
        // pass.
        self.sends_end = self.pushed;
        out
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The last pass's sends are still queued (each pass's wait submits the one before).
        if self.enabled && !self.ring.submission().is_empty() {
            let _ = self.ring.submit();
        }
        let _ = self.ring.submitter().unregister_buf_ring(GROUP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the kernel has it (Linux ≥ 6.1), the ring runs completion work in the worker's
    /// wait; only an older kernel falls back to a plain ring.
    #[test]
    fn rings_defer_task_work_where_the_kernel_allows() {
        let Ok(u) = Uring::new() else {
            eprintln!("io_uring unavailable here");
            return;
        };
        let expected = if kernel_at_least(6, 1) {
            Mode::Deferred
        } else {
            Mode::Plain
        };
        assert_eq!(u.mode(), expected, "{}", u.describe());
    }
}
