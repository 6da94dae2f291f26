//! The IO driver around the sans-IO [`turn_proto::server::Server`].
//!
//! One worker per core, each an OS thread with a single-threaded tokio runtime and its own
//! `Server` shard. Every worker binds every UDP listener with SO_REUSEPORT, so the kernel
//! spreads clients over the workers by 4-tuple hash, and a client's datagrams always reach the
//! same worker. An allocation's relay socket belongs to the worker that created it, so
//! there is no lock anywhere on the packet path: the only shared state is the relay port
//! pool and the allocation quota, touched when an allocation starts or ends.
//!
//! Sockets are read in batches (quinn-udp: recvmmsg) into one buffer set per worker; the
//! core writes replies into its own reused buffer, so relaying allocates nothing per packet.
//! Read loops are bounded: after a number of batches a task yields so a flooded socket cannot
//! starve the others.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};
use turn_proto::codec::AddressFamily;
use turn_proto::server::{
    Destination, Event, FiveTuple, PortRequest, RelayBound, RelayError, RelayHandle, RelayRequest,
    RelayedAddress, Route, Server, ServerConfig, SharedQuota, Transmit, Transport,
};

use crate::config::Settings;
use crate::net::ports::PortPools;
use crate::net::stream::{self, ConnectionCaps, ConnectionSlot, StreamLimits, WriteQueue};
use crate::net::tls::{self, Tls};
use crate::net::udp::{self, Buffers};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use turn_proto::codec::{frame_len, FrameLen};

/// Datagrams read per system call.
const BATCH: usize = 32;
/// Largest datagram accepted (UDP's maximum payload).
const DATAGRAM: usize = 65_536;
/// Batches read from one socket before yielding to the other tasks.
const BATCHES_PER_WAKE: usize = 8;

/// What every worker shares.
struct Shared {
    config: ServerConfig,
    quota: SharedQuota,
    ports: PortPools,
    settings: Settings,
    tls: Option<Arc<Tls>>,
    caps: Arc<ConnectionCaps>,
    limits: StreamLimits,
}

/// A running server: its bound listener addresses and the means to stop it.
pub struct Running {
    /// The UDP listener addresses actually bound (port 0 resolved).
    pub udp: Vec<SocketAddr>,
    /// The TCP listener addresses (plain TCP, and TLS too when a certificate is configured).
    pub tcp: Vec<SocketAddr>,
    /// The TLS listener addresses (plain TCP is accepted on them too).
    pub tls: Vec<SocketAddr>,
    /// The certificate in service, when TLS is configured.
    pub certificate: Option<Arc<Tls>>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    failed: Arc<Mutex<Option<usize>>>,
    failure: Arc<tokio::sync::Notify>,
    reloader: Option<Reloader>,
}

/// The thread that reloads the certificate on file changes and SIGHUP.
struct Reloader {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start_reloader(tls: Arc<Tls>) -> anyhow::Result<Reloader> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new()
        .name("turnd-tls-reload".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                match tls::spawn_reloader(tls) {
                    Ok(watcher) => {
                        let _ = ready_tx.send(Ok(()));
                        let _ = stopped.await;
                        drop(watcher);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })?;
    ready_rx
        .recv()
        .context("certificate reloader did not start")??;
    Ok(Reloader {
        stop: Some(stop),
        thread: Some(thread),
    })
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("udp", &self.udp)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Stops every worker and waits for them.
    pub fn shutdown(self) {
        let _ = self.shutdown.send(true);
        drop(self.reloader);
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// Resolves when a worker has died (a panic): the process must not go on half-alive.
    pub async fn worker_failed(&self) -> usize {
        loop {
            let notified = self.failure.notified();
            if let Some(i) = *lock(&self.failed) {
                return i;
            }
            notified.await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Reports a worker's death when dropped during a panic unwind.
struct DeathWatch {
    index: usize,
    failed: Arc<Mutex<Option<usize>>>,
    failure: Arc<tokio::sync::Notify>,
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!(worker = self.index, "worker panicked; stopping turnd");
            *lock(&self.failed) = Some(self.index);
            self.failure.notify_waiters();
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Binds the listeners and starts the workers.
///
/// # Errors
/// A listener could not be bound, or a worker thread could not start.
pub fn start(settings: Settings) -> anyhow::Result<Running> {
    let mut nonce_secret = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut nonce_secret[..]);
    let config = settings.server_config(nonce_secret);
    let quota = SharedQuota(Arc::new(Mutex::new(settings.quotas.ledger())));
    let workers = settings.workers.get();
    let buffers = Buffers {
        recv: settings.sockets.recv,
        send: settings.sockets.send,
    };

    // The first worker's sockets resolve port 0; the others bind the same address.
    let mut per_worker: Vec<Vec<std::net::UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for addr in &settings.listeners.udp {
        let first = udp::bind(*addr, true, buffers)
            .with_context(|| format!("binding UDP listener {addr}"))?;
        let actual = first.local_addr()?;
        per_worker[0].push(first);
        for sockets in per_worker.iter_mut().skip(1) {
            sockets.push(
                udp::bind(actual, true, buffers)
                    .with_context(|| format!("binding UDP listener {actual}"))?,
            );
        }
        bound.push(actual);
    }
    let certificate = match &settings.tls {
        Some(files) if !settings.listeners.tls.is_empty() || !settings.listeners.tcp.is_empty() => {
            Some(Arc::new(Tls::load(&files.cert, &files.key)?))
        }
        _ => None,
    };
    let mut per_worker_tcp: Vec<Vec<std::net::TcpListener>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut bound_tcp = Vec::new();
    let mut bound_tls = Vec::new();
    let tls_addrs: &[SocketAddr] = if certificate.is_some() {
        &settings.listeners.tls
    } else {
        &[]
    };
    let stream_addrs = settings.listeners.tcp.iter().map(|a| (*a, false));
    for (addr, is_tls) in stream_addrs.chain(tls_addrs.iter().map(|a| (*a, true))) {
        let first =
            stream::bind_listener(addr).with_context(|| format!("binding TCP listener {addr}"))?;
        let actual = first.local_addr()?;
        per_worker_tcp[0].push(first);
        for listeners in per_worker_tcp.iter_mut().skip(1) {
            listeners.push(
                stream::bind_listener(actual)
                    .with_context(|| format!("binding TCP listener {actual}"))?,
            );
        }
        if is_tls {
            bound_tls.push(actual);
        } else {
            bound_tcp.push(actual);
        }
    }
    info!(udp = ?bound, tcp = ?bound_tcp, tls = ?bound_tls, workers, "listening");
    let reloader = certificate.clone().map(start_reloader).transpose()?;

    let shared = Arc::new(Shared {
        config,
        quota,
        ports: PortPools::new(settings.relay.ports.clone()),
        tls: certificate.clone(),
        caps: Arc::new(ConnectionCaps::default()),
        limits: settings.streams,
        settings,
    });
    let (tx, rx) = watch::channel(false);
    let failed = Arc::new(Mutex::new(None));
    let failure = Arc::new(tokio::sync::Notify::new());
    let mut threads = Vec::new();
    for (index, (sockets, tcp)) in per_worker.into_iter().zip(per_worker_tcp).enumerate() {
        let shared = shared.clone();
        let rx = rx.clone();
        let watch = DeathWatch {
            index,
            failed: failed.clone(),
            failure: failure.clone(),
        };
        let t = std::thread::Builder::new()
            .name(format!("turnd-worker-{index}"))
            .spawn(move || {
                let _watch = watch;
                if let Err(e) = run_worker(index, &shared, sockets, tcp, rx) {
                    error!(worker = index, error = %e, "worker failed");
                    panic!("worker {index} failed: {e}");
                }
            })
            .context("starting a worker thread")?;
        threads.push(t);
    }
    Ok(Running {
        udp: bound,
        tcp: bound_tcp,
        tls: bound_tls,
        certificate,
        reloader,
        shutdown: tx,
        threads,
        failed,
        failure,
    })
}

/// Runs turnd until SIGTERM or SIGINT, or until a worker dies.
///
/// # Errors
/// Start-up failed, or a worker died.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let running = start(settings)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); Ok(()) }
        _ = term.recv() => { info!("SIGTERM: stopping"); Ok(()) }
        i = running.worker_failed() => Err(anyhow::anyhow!("worker {i} died")),
    };
    tokio::task::spawn_blocking(move || running.shutdown())
        .await
        .context("stopping workers")?;
    outcome
}

// ---------------------------------------------------------------------------------------------
// Worker

struct Listener {
    local: SocketAddr,
    sock: tokio::net::UdpSocket,
    state: UdpSocketState,
}

struct RelayIo {
    sock: tokio::net::UdpSocket,
    state: UdpSocketState,
    dont_fragment: bool,
}

struct RelayEntry {
    io: Rc<RelayIo>,
    task: tokio::task::JoinHandle<()>,
}

struct RecvBufs {
    data: Vec<u8>,
    meta: [RecvMeta; BATCH],
}

impl RecvBufs {
    fn new() -> Self {
        Self {
            data: vec![0; BATCH * DATAGRAM],
            meta: [RecvMeta::default(); BATCH],
        }
    }

    fn recv(&mut self, state: &UdpSocketState, sock: &tokio::net::UdpSocket) -> io::Result<usize> {
        let mut chunks = self.data.chunks_mut(DATAGRAM);
        let mut slices: [IoSliceMut<'_>; BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or(&mut [])));
        state.recv(UdpSockRef::from(sock), &mut slices, &mut self.meta)
    }

    fn datagram(&self, i: usize) -> (&RecvMeta, &[u8]) {
        let m = &self.meta[i];
        let start = i * DATAGRAM;
        (m, &self.data[start..start + m.len.min(DATAGRAM)])
    }
}

struct Worker {
    index: usize,
    core: RefCell<Server>,
    listeners: Vec<Listener>,
    relays: RefCell<HashMap<SocketAddr, RelayEntry>>,
    /// Relay socket local addresses by `RelayHandle` (a slab; `None` is free).
    handles: RefCell<Vec<Option<SocketAddr>>>,
    reserved: RefCell<HashMap<SocketAddr, std::net::UdpSocket>>,
    bufs: RefCell<RecvBufs>,
    shared: Arc<Shared>,
    streams: RefCell<HashMap<FiveTuple, Rc<WriteQueue>>>,
    rng: Cell<u64>,
    send_errors: Cell<u64>,
}

fn run_worker(
    index: usize,
    shared: &Arc<Shared>,
    sockets: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut listeners = Vec::new();
        for s in sockets {
            let state = UdpSocketState::new(UdpSockRef::from(&s))?;
            udp::disable_gro(&s)?;
            let local = s.local_addr()?;
            udp::set_dont_fragment(&s, local.is_ipv6(), false)?;
            listeners.push(Listener {
                local,
                sock: tokio::net::UdpSocket::from_std(s)?,
                state,
            });
        }
        let core = Server::with_quota(
            shared.config.clone(),
            Box::new(shared.quota.clone()),
            Instant::now(),
            unix_now(),
        );
        let seed = unix_now()
            ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ u64::from(std::process::id());
        let worker = Rc::new(Worker {
            index,
            core: RefCell::new(core),
            listeners,
            relays: RefCell::new(HashMap::new()),
            handles: RefCell::new(Vec::new()),
            reserved: RefCell::new(HashMap::new()),
            bufs: RefCell::new(RecvBufs::new()),
            shared: shared.clone(),
            streams: RefCell::new(HashMap::new()),
            rng: Cell::new(seed | 1),
            send_errors: Cell::new(0),
        });
        for i in 0..worker.listeners.len() {
            tokio::task::spawn_local(listener_loop(worker.clone(), i));
        }
        for l in tcp {
            let l = tokio::net::TcpListener::from_std(l)?;
            tokio::task::spawn_local(accept_loop(worker.clone(), l));
        }
        tokio::task::spawn_local(timer_loop(worker.clone()));
        debug!(worker = index, "worker running");
        let _ = shutdown.changed().await;
        for (_, r) in worker.relays.borrow_mut().drain() {
            r.task.abort();
        }
        anyhow::Ok(())
    })
}

async fn listener_loop(w: Rc<Worker>, i: usize) {
    loop {
        let l = &w.listeners[i];
        if let Err(e) = l.sock.readable().await {
            warn!(error = %e, listener = %l.local, "listener failed");
            return;
        }
        for _ in 0..BATCHES_PER_WAKE {
            let l = &w.listeners[i];
            let mut bufs = w.bufs.borrow_mut();
            let n = match l
                .sock
                .try_io(Interest::READABLE, || bufs.recv(&l.state, &l.sock))
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!(error = %e, "recv error on listener");
                    break;
                }
            };
            let now = Instant::now();
            {
                let mut core = w.core.borrow_mut();
                for k in 0..n {
                    let (meta, data) = bufs.datagram(k);
                    let server =
                        SocketAddr::new(meta.dst_ip.unwrap_or(l.local.ip()), l.local.port());
                    let ft = FiveTuple {
                        client: meta.addr,
                        server,
                        transport: Transport::Udp,
                    };
                    let route = Route(u32::try_from(i).unwrap_or(u32::MAX));
                    core.handle_client_datagram(now, ft, route, data);
                }
            }
            drop(bufs);
            w.flush();
        }
        tokio::task::yield_now().await;
    }
}

/// Reads one relay socket. The task holds only a weak reference: the worker's relay map owns
/// the socket, so releasing a relay closes its port at once (the port is reusable by the very
/// next Allocate), and the task, aborted at the same time, finds the socket gone.
async fn relay_loop(w: Rc<Worker>, io: Weak<RelayIo>, local: SocketAddr, handle: RelayHandle) {
    loop {
        let ready = std::future::poll_fn(|cx| match io.upgrade() {
            Some(io) => io.sock.poll_recv_ready(cx).map(|r| r.is_ok()),
            None => std::task::Poll::Ready(false),
        })
        .await;
        if !ready {
            return;
        }
        for _ in 0..BATCHES_PER_WAKE {
            let Some(io) = io.upgrade() else { return };
            let mut bufs = w.bufs.borrow_mut();
            let n = match io
                .sock
                .try_io(Interest::READABLE, || bufs.recv(&io.state, &io.sock))
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ICMP errors surface here as ECONNREFUSED and the like: keep reading.
                    debug!(error = %e, relay = %local, "recv error on relay");
                    continue;
                }
            };
            drop(io);
            let now = Instant::now();
            {
                let mut core = w.core.borrow_mut();
                for k in 0..n {
                    let (meta, data) = bufs.datagram(k);
                    core.handle_peer_datagram(now, handle, meta.addr, data);
                }
            }
            drop(bufs);
            w.flush();
        }
        tokio::task::yield_now().await;
    }
}

async fn accept_loop(w: Rc<Worker>, listener: tokio::net::TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = w.shared.caps.try_acquire(peer.ip(), &w.shared.limits) else {
            debug!(client = %peer, "connection cap reached: closing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Ok(local) = tcp.local_addr() else {
            continue;
        };
        tokio::task::spawn_local(connection(w.clone(), tcp, peer, local, slot));
    }
}

/// One TCP connection: sniffs the first byte (0x16 is a TLS ClientHello, so TLS and plain
/// TCP share a port), then serves TURN frames over it.
async fn connection(
    w: Rc<Worker>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    slot: ConnectionSlot,
) {
    let limits = w.shared.limits;
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.handshake_timeout, tcp.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    let mut ft = FiveTuple {
        client: peer,
        server: local,
        transport: Transport::Tcp,
    };
    if first[0] == stream::TLS_HANDSHAKE {
        let Some(tls) = w.shared.tls.clone() else {
            debug!(client = %peer, "TLS ClientHello but no certificate configured");
            return;
        };
        match tokio::time::timeout(limits.handshake_timeout, tls.acceptor().accept(tcp)).await {
            Ok(Ok(s)) => {
                ft.transport = Transport::Tls;
                serve_stream(w, s, ft).await;
            }
            Ok(Err(e)) => debug!(client = %peer, error = %e, "TLS handshake failed"),
            Err(_) => debug!(client = %peer, "TLS handshake timed out"),
        }
    } else {
        serve_stream(w, tcp, ft).await;
    }
    drop(slot);
}

async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin + 'static>(
    w: Rc<Worker>,
    stream: S,
    ft: FiveTuple,
) {
    let limits = w.shared.limits;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let queue = Rc::new(WriteQueue::default());
    w.streams.borrow_mut().insert(ft, queue.clone());
    let wq = queue.clone();
    let per_frame_records = ft.transport == Transport::Tls;
    let writer = tokio::task::spawn_local(async move {
        let mut chunk = Vec::new();
        loop {
            wq.wait().await;
            wq.take_into(&mut chunk);
            if chunk.is_empty() {
                if wq.is_closed() {
                    break;
                }
                continue;
            }
            if write_frames(&mut wr, &chunk, per_frame_records)
                .await
                .is_err()
            {
                break;
            }
        }
        wq.close();
        let _ = wr.shutdown().await;
    });
    // Holds at most one partial frame plus one read: a frame is at most 20 + 65535 bytes.
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        if queue.is_closed() {
            break;
        }
        buf.reserve(4096);
        let idle = !w.core.borrow().has_allocation(&ft);
        let read = if idle {
            match tokio::time::timeout(limits.idle_timeout, rd.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    debug!(client = %ft.client, "idle connection without allocation: closing");
                    break;
                }
            }
        } else {
            rd.read_buf(&mut buf).await
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let now = Instant::now();
        let mut consumed = 0;
        let mut garbage = false;
        {
            let mut core = w.core.borrow_mut();
            loop {
                match frame_len(&buf[consumed..]) {
                    Ok(FrameLen::Complete(n)) => {
                        core.handle_client_datagram(
                            now,
                            ft,
                            Route::default(),
                            &buf[consumed..consumed + n],
                        );
                        consumed += n;
                    }
                    Ok(FrameLen::NeedMore(_)) => break,
                    Err(_) => {
                        garbage = true;
                        break;
                    }
                }
            }
        }
        buf.drain(..consumed);
        w.flush();
        if garbage {
            debug!(client = %ft.client, "not STUN or ChannelData: closing");
            break;
        }
    }
    w.streams.borrow_mut().remove(&ft);
    w.core
        .borrow_mut()
        .handle_connection_closed(Instant::now(), ft);
    w.flush();
    queue.close();
    // Let the writer send what is queued (the last error response, say), briefly.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}

/// Writes queued frames. Over TLS each frame goes in its own record: some clients (coturn's
/// `turnutils_uclient`) read one message per TLS record and drop the rest of a record that
/// carries several. Then flushes, since TLS keeps records in the session until flushed.
async fn write_frames<W: AsyncWrite + Unpin>(
    wr: &mut W,
    chunk: &[u8],
    per_frame_records: bool,
) -> io::Result<()> {
    if per_frame_records {
        let mut rest = chunk;
        while let Ok(FrameLen::Complete(n)) = frame_len(rest) {
            wr.write_all(&rest[..n]).await?;
            rest = &rest[n..];
        }
        wr.write_all(rest).await?;
    } else {
        wr.write_all(chunk).await?;
    }
    wr.flush().await
}

async fn timer_loop(w: Rc<Worker>) {
    loop {
        let now = Instant::now();
        let next = w.core.borrow().poll_timeout();
        let wake = next.map_or(now + Duration::from_secs(1), |t| {
            t.min(now + Duration::from_secs(1))
        });
        tokio::time::sleep_until(wake.into()).await;
        w.core.borrow_mut().handle_timeout(Instant::now());
        w.flush();
    }
}

impl Worker {
    fn random(&self) -> u64 {
        // xorshift64*: port choice only needs to be unpredictable to a casual observer.
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Sends everything the core has queued and acts on its events, until both are empty.
    /// Acts on the core's events, then sends what it queued, until both are empty. Events go
    /// first so a released relay port is free before the response that released it leaves.
    fn flush(self: &Rc<Self>) {
        loop {
            loop {
                let event = self.core.borrow_mut().poll_event();
                match event {
                    Some(e) => self.handle_event(e),
                    None => break,
                }
            }
            let mut core = self.core.borrow_mut();
            let mut sent = false;
            while let Some(t) = core.poll_transmit() {
                self.send(&t);
                sent = true;
            }
            if !sent {
                return;
            }
        }
    }

    fn send(&self, t: &Transmit<'_>) {
        let result = match t.destination {
            Destination::Client(ft) if ft.transport.is_stream() => {
                if let Some(q) = self.streams.borrow().get(&ft) {
                    q.push(t.payload, self.shared.limits.write_buffer);
                }
                return;
            }
            Destination::Client(ft) => {
                let Some(l) = self.listeners.iter().find(|l| {
                    l.local.port() == ft.server.port()
                        && (l.local.ip() == ft.server.ip()
                            || (l.local.ip().is_unspecified()
                                && l.local.is_ipv4() == ft.server.is_ipv4()))
                }) else {
                    return;
                };
                let tx = quinn_udp::Transmit {
                    destination: ft.client,
                    ecn: None,
                    contents: t.payload,
                    segment_size: None,
                    src_ip: l.local.ip().is_unspecified().then_some(ft.server.ip()),
                };
                l.state.try_send(UdpSockRef::from(&l.sock), &tx)
            }
            Destination::Peer {
                relay: handle,
                peer,
            } => {
                let Some(relay) = self
                    .handles
                    .borrow()
                    .get(handle.0 as usize)
                    .copied()
                    .flatten()
                else {
                    return;
                };
                let relays = self.relays.borrow();
                let Some(r) = relays.get(&relay) else { return };
                let tx = quinn_udp::Transmit {
                    destination: peer,
                    ecn: None,
                    contents: t.payload,
                    segment_size: None,
                    src_ip: None,
                };
                let toggle = t.dont_fragment && !r.io.dont_fragment;
                if toggle {
                    let _ = udp::set_dont_fragment(&r.io.sock, relay.is_ipv6(), true);
                }
                let res = r.io.state.try_send(UdpSockRef::from(&r.io.sock), &tx);
                if toggle {
                    let _ = udp::set_dont_fragment(&r.io.sock, relay.is_ipv6(), false);
                }
                res
            }
        };
        if let Err(e) = result {
            // UDP: a full socket buffer drops the datagram, as the network would.
            self.send_errors.set(self.send_errors.get() + 1);
            debug!(error = %e, "send failed");
        }
    }

    fn handle_event(self: &Rc<Self>, event: Event) {
        match event {
            Event::RelayRequested(req) => {
                let bound = self.bind_relays(&req);
                self.core
                    .borrow_mut()
                    .handle_relay_bound(Instant::now(), req.id, bound);
            }
            Event::RelayReleased(relayed) => {
                let local = relayed.local;
                if let Some(r) = self.relays.borrow_mut().remove(&local) {
                    r.task.abort();
                }
                if let Some(slot) = self.handles.borrow_mut().get_mut(relayed.handle.0 as usize) {
                    *slot = None;
                }
                self.reserved.borrow_mut().remove(&local);
                self.shared.ports.release(local.ip(), local.port());
            }
            Event::ReservedPortReleased(local) => {
                self.reserved.borrow_mut().remove(&local);
                self.shared.ports.release(local.ip(), local.port());
            }
            Event::AllocationCreated {
                id,
                five_tuple,
                username,
                relayed,
                lifetime,
                ..
            } => {
                info!(
                    worker = self.index,
                    id = %id,
                    user = %username,
                    client = %five_tuple.client,
                    server = %five_tuple.server,
                    transport = five_tuple.transport.as_str(),
                    relayed = %fmt_relayed(&relayed),
                    lifetime_s = lifetime.as_secs(),
                    "allocation created"
                );
            }
            Event::AllocationEnded {
                id,
                five_tuple,
                username,
                relayed,
                duration,
                stats,
                reason,
                ..
            } => {
                info!(
                    worker = self.index,
                    id = %id,
                    user = %username,
                    client = %five_tuple.client,
                    server = %five_tuple.server,
                    transport = five_tuple.transport.as_str(),
                    relayed = %fmt_relayed(&relayed),
                    duration_s = duration.as_secs(),
                    bytes_to_peer = stats.bytes_to_peer,
                    bytes_from_peer = stats.bytes_from_peer,
                    packets_to_peer = stats.packets_to_peer,
                    packets_from_peer = stats.packets_from_peer,
                    reason = reason.as_str(),
                    "allocation ended"
                );
            }
            Event::Rejected {
                client,
                username,
                transport,
                method,
                reason,
            } => {
                debug!(
                    client = %client,
                    user = ?username,
                    transport = transport.as_str(),
                    method = method.name(),
                    reason = reason.as_str(),
                    "rejected"
                );
            }
        }
    }

    /// The IP a relay socket of `family` binds to: the first configured relay address of that
    /// family, else the address the request arrived on when it has that family.
    fn relay_ip(&self, family: AddressFamily, arrival: IpAddr) -> Option<IpAddr> {
        let want_v4 = family == AddressFamily::IPV4;
        let configured = &self.shared.settings.relay.addresses;
        if configured.is_empty() {
            (arrival.is_ipv4() == want_v4 && !arrival.is_unspecified()).then_some(arrival)
        } else {
            configured
                .iter()
                .copied()
                .find(|ip| ip.is_ipv4() == want_v4)
        }
    }

    fn bind_relays(self: &Rc<Self>, req: &RelayRequest) -> RelayBound {
        let arrival = req.five_tuple.server.ip();
        let mut reserved_next = None;
        let primary = self.bind_one(
            req.family,
            arrival,
            req.port,
            req.dont_fragment,
            &mut reserved_next,
        );
        let additional = req.additional_ipv6.then(|| {
            self.bind_one(
                AddressFamily::IPV6,
                arrival,
                PortRequest::Any,
                req.dont_fragment,
                &mut None,
            )
        });
        RelayBound {
            primary,
            additional,
            reserved_next,
        }
    }

    fn bind_one(
        self: &Rc<Self>,
        family: AddressFamily,
        arrival: IpAddr,
        port: PortRequest,
        dont_fragment: bool,
        reserved_next: &mut Option<SocketAddr>,
    ) -> Result<RelayedAddress, RelayError> {
        let s = &self.shared.settings;
        let buffers = Buffers {
            recv: s.sockets.relay_recv,
            send: s.sockets.relay_send,
        };
        let sock = if let PortRequest::Reserved(local) = port {
            self.reserved
                .borrow_mut()
                .remove(&local)
                .ok_or(RelayError::NoPortAvailable)?
        } else {
            let ip = self
                .relay_ip(family, arrival)
                .ok_or(RelayError::FamilyUnavailable)?;
            let (even, pair) = match port {
                PortRequest::Even { reserve_next } => (true, reserve_next),
                _ => (false, false),
            };
            let start = usize::try_from(self.random() % 65_536).unwrap_or(0);
            let (_, (sock, next)) = self
                .shared
                .ports
                .acquire(ip, even, pair, start, |p| {
                    let a = udp::bind(SocketAddr::new(ip, p), false, buffers).ok()?;
                    let b = if pair {
                        Some(udp::bind(SocketAddr::new(ip, p + 1), false, buffers).ok()?)
                    } else {
                        None
                    };
                    Some((a, b))
                })
                .ok_or(RelayError::NoPortAvailable)?;
            if let Some(next) = next {
                if let Ok(addr) = next.local_addr() {
                    self.reserved.borrow_mut().insert(addr, next);
                    *reserved_next = Some(addr);
                }
            }
            sock
        };
        let local = sock.local_addr().map_err(|_| RelayError::NoPortAvailable)?;
        let setup = || -> io::Result<RelayIo> {
            let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
            udp::disable_gro(&sock)?;
            udp::set_dont_fragment(&sock, local.is_ipv6(), dont_fragment)?;
            Ok(RelayIo {
                sock: tokio::net::UdpSocket::from_std(sock.try_clone()?)?,
                state,
                dont_fragment,
            })
        };
        let io = match setup() {
            Ok(io) => Rc::new(io),
            Err(e) => {
                warn!(error = %e, relay = %local, "relay socket setup failed");
                self.shared.ports.release(local.ip(), local.port());
                return Err(RelayError::NoPortAvailable);
            }
        };
        drop(sock);
        let handle = {
            let mut handles = self.handles.borrow_mut();
            let i = handles.iter().position(Option::is_none).unwrap_or_else(|| {
                handles.push(None);
                handles.len() - 1
            });
            handles[i] = Some(local);
            RelayHandle(u32::try_from(i).unwrap_or(u32::MAX))
        };
        let task =
            tokio::task::spawn_local(relay_loop(self.clone(), Rc::downgrade(&io), local, handle));
        self.relays
            .borrow_mut()
            .insert(local, RelayEntry { io, task });
        let advertised = SocketAddr::new(s.relay.advertised(local.ip()), local.port());
        Ok(RelayedAddress {
            handle,
            local,
            advertised,
        })
    }
}

fn fmt_relayed(relayed: &[Option<RelayedAddress>; 2]) -> String {
    relayed
        .iter()
        .flatten()
        .map(|r| {
            if r.local == r.advertised {
                r.local.to_string()
            } else {
                format!("{} (bound {})", r.advertised, r.local)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}
