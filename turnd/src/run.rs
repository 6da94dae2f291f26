//! Starting and stopping turnd: the open-file limit, listeners, the io backend, one thread per
//! worker, the admin listener, signals, drain and configuration reload.
//!
//! * **SIGTERM** (and `POST /drain`) drains: `/ready` turns false, a new Allocate is sent to a
//!   sibling (300 ALTERNATE-SERVER) or refused (403), existing allocations keep relaying, and
//!   the process exits 0 once the last allocation ends or `[drain] timeout` passes. A second
//!   SIGTERM, or SIGINT, stops at once.
//! * **SIGHUP**, a change of the configuration file, and `POST /reload` reload the settings
//!   that can change live (auth, peer policy, quotas, lifetimes, stream limits, drain
//!   alternates) and report the rest as needing a restart; the TLS certificate is reloaded
//!   too. A broken file is refused and the old settings stay. No allocation is dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};
use turn_proto::server::{Drain, SharedQuota, SharedReservations};

use crate::admin::{self, Control, DrainReport, EndSelector, ReloadReport, Session};
use crate::config::{reload_plan, Env, ProcessEnv, Settings};
use crate::metrics::Metrics;
use crate::net::io;
use crate::net::listener;
use crate::net::ports::PortPools;
use crate::net::relay::ReservedSockets;
use crate::net::stream::ConnectionCaps;
use crate::net::tls::{self, Tls};
use crate::net::udp::Buffers;
use crate::worker::{Command, Shared, Worker, WorkerHandle};

/// A running server: its bound addresses and the means to steer and stop it.
pub struct Running {
    /// The UDP listener addresses actually bound (port 0 resolved).
    pub udp: Vec<SocketAddr>,
    /// The TCP listener addresses (plain TCP, and TLS too when a certificate is configured).
    pub tcp: Vec<SocketAddr>,
    /// The TLS listener addresses (plain TCP is accepted on them too).
    pub tls: Vec<SocketAddr>,
    /// The admin listener's address, when it is on.
    pub admin: Option<SocketAddr>,
    /// The certificate in service, when TLS is configured.
    pub certificate: Option<Arc<Tls>>,
    /// The io backend the workers run (`"epoll"` or `"io_uring"`).
    pub io_backend: &'static str,
    /// Drain, reload, sessions: what the admin API calls.
    pub control: Arc<ProcessControl>,
    threads: Vec<JoinHandle<()>>,
    failed: Arc<Mutex<Option<usize>>>,
    failure: Arc<tokio::sync::Notify>,
    _reloader: Option<Reloader>,
    _admin: Option<admin::AdminHandle>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("udp", &self.udp)
            .field("tcp", &self.tcp)
            .field("io_backend", &self.io_backend)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The process-wide controls: what `/ready`, `/sessions`, `/reload`, `/drain` and the signals
/// act through. Workers are reached by command and answer over a channel.
pub struct ProcessControl {
    workers: Vec<WorkerHandle>,
    settings: Mutex<Settings>,
    nonce_secret: [u8; 32],
    metrics: Arc<Metrics>,
    tls: Option<Arc<Tls>>,
    draining: AtomicBool,
    drain_deadline: Mutex<Option<Instant>>,
    drain_deadline_unix: AtomicU64,
    env: Box<dyn Env + Send + Sync>,
}

impl std::fmt::Debug for ProcessControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessControl")
            .field("workers", &self.workers.len())
            .field("draining", &self.draining.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Why turnd could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not be bound (another process holds the port, say).
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
    /// The TLS certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The certificate files cannot be watched.
    #[error(transparent)]
    Watch(#[from] tls::WatchError),
    /// The io backend could not be created for a worker.
    #[error("creating the {backend} backend for worker {worker}: {source}")]
    Backend {
        /// `epoll`, `io_uring`, or `auto` when neither could be built.
        backend: &'static str,
        /// Which worker.
        worker: usize,
        /// Why.
        source: std::io::Error,
    },
    /// A worker could not set up its sockets.
    #[error(transparent)]
    Worker(#[from] crate::worker::WorkerError),
    /// The admin listener could not start.
    #[error("starting the admin listener on {listen}: {source}")]
    Admin {
        /// Its address.
        listen: SocketAddr,
        /// Why.
        source: admin::AdminError,
    },
    /// A thread or runtime could not be started.
    #[error("starting {what}: {source}")]
    Thread {
        /// Which.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Why [`serve`] stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Start-up failed.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A signal handler could not be installed.
    #[error("installing the {signal} handler: {source}")]
    Signal {
        /// Which signal.
        signal: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A worker died (a panic or a failed wait); the process must not go on half-alive.
    #[error("worker {0} died")]
    WorkerDied(usize),
}

/// How long a worker may take to answer a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

impl ProcessControl {
    /// Allocations held by all workers (as of their last housekeeping tick, ≤ 100 ms ago).
    #[must_use]
    pub fn allocations(&self) -> usize {
        self.workers
            .iter()
            .map(|w| w.allocations.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether a drain is under way.
    #[must_use]
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The drain deadline, when draining.
    #[must_use]
    pub fn drain_deadline(&self) -> Option<Instant> {
        *lock(&self.drain_deadline)
    }

    /// Starts draining (idempotent): new allocations go to the sibling or get 403, existing
    /// ones keep relaying until they end or the deadline.
    pub fn start_drain(&self) -> DrainReport {
        if !self.draining.swap(true, Ordering::SeqCst) {
            let s = lock(&self.settings);
            let deadline = Instant::now() + s.drain.timeout;
            *lock(&self.drain_deadline) = Some(deadline);
            self.drain_deadline_unix
                .store(unix_now() + s.drain.timeout.as_secs(), Ordering::Relaxed);
            let drain = Drain {
                deadline,
                alternate_ipv4: s.drain.alternate_ipv4,
                alternate_ipv6: s.drain.alternate_ipv6,
            };
            for w in &self.workers {
                w.send(Command::Drain(Some(drain)));
            }
            self.metrics.set_draining(true);
            info!(
                allocations = self.allocations(),
                timeout_s = s.drain.timeout.as_secs(),
                alternate_ipv4 = ?s.drain.alternate_ipv4,
                alternate_ipv6 = ?s.drain.alternate_ipv6,
                "draining: new allocations are refused or redirected"
            );
        }
        DrainReport {
            draining: true,
            allocations: self.allocations(),
            deadline_unix: self.drain_deadline_unix.load(Ordering::Relaxed),
        }
    }

    /// Re-reads the configuration and applies what can change live. On error the old
    /// settings stay.
    ///
    /// # Errors
    /// The new configuration is invalid (the message names file, line, key and reason).
    pub fn reload_config(&self) -> Result<ReloadReport, String> {
        let mut current = lock(&self.settings);
        let new = match current.reload(&*self.env) {
            Ok(s) => s,
            Err(e) => {
                self.metrics.reload_result(false);
                error!(error = %e, "configuration reload refused; the running settings stay");
                return Err(e.to_string());
            }
        };
        let plan = reload_plan(&current, &new);
        if new.log.level != current.log.level {
            if let Err(e) = crate::cli::set_log_level(&new.log.level) {
                warn!(error = %e, "log level not changed");
            }
        }
        let config = new.server_config(self.nonce_secret);
        for w in &self.workers {
            w.send(Command::Reload {
                config: Box::new(config.clone()),
                limits: new.streams,
            });
        }
        if let Some(tls) = &self.tls {
            let _ = tls.reload();
            self.metrics
                .set_certificate_not_after(u64::try_from(tls.not_after()).ok());
        }
        for line in &plan.applied {
            info!(change = %line, "configuration reloaded");
        }
        for line in &plan.needs_restart {
            warn!(change = %line, "configuration change needs a restart; left as it was");
        }
        if plan.applied.is_empty() && plan.needs_restart.is_empty() {
            info!("configuration reloaded: no change");
        }
        *current = new;
        self.metrics.reload_result(true);
        Ok(ReloadReport {
            applied: plan.applied,
            needs_restart: plan.needs_restart,
        })
    }

    fn ask<T>(&self, make: impl Fn(mpsc::Sender<T>) -> Command) -> Vec<T> {
        let (tx, rx) = mpsc::channel();
        let mut asked = 0;
        for w in &self.workers {
            if w.send(make(tx.clone())) {
                asked += 1;
            }
        }
        drop(tx);
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let mut out = Vec::new();
        while out.len() < asked {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(v) => out.push(v),
                Err(_) => break,
            }
        }
        out
    }

    fn stop_workers(&self) {
        for w in &self.workers {
            w.send(Command::Stop);
        }
    }
}

impl Control for ProcessControl {
    fn live(&self) -> bool {
        // Every worker loop turned within the last few seconds.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.workers
            .iter()
            .all(|w| now.saturating_sub(w.heartbeat.load(Ordering::Relaxed)) < 5_000)
    }

    fn ready(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining".into());
        }
        if !self.live() {
            return Err("a worker loop is not turning".into());
        }
        if let Some(tls) = &self.tls {
            if tls.not_after() <= 0 {
                return Err("no TLS certificate loaded".into());
            }
        }
        Ok(())
    }

    fn sessions(&self, user: Option<&str>) -> Vec<Session> {
        let user = user.map(str::to_owned);
        let mut all: Vec<Session> = self
            .ask(|reply| Command::Sessions {
                user: user.clone(),
                reply,
            })
            .into_iter()
            .flatten()
            .collect();
        all.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        all
    }

    fn end_sessions(&self, which: EndSelector) -> usize {
        self.ask(|reply| Command::End {
            which: which.clone(),
            reply,
        })
        .into_iter()
        .sum()
    }

    fn reload(&self) -> Result<ReloadReport, String> {
        self.reload_config()
    }

    fn drain(&self) -> DrainReport {
        self.start_drain()
    }
}

/// The thread that reloads the certificate on file changes.
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

fn start_reloader(tls: Arc<Tls>, metrics: Arc<Metrics>) -> Result<Reloader, StartError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), StartError>>();
    let thread = std::thread::Builder::new()
        .name("turnd-tls-reload".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(source) => {
                    let _ = ready_tx.send(Err(StartError::Thread {
                        what: "the certificate reloader's runtime",
                        source,
                    }));
                    return;
                }
            };
            rt.block_on(async move {
                match tls::spawn_reloader(tls.clone()) {
                    Ok(watcher) => {
                        let _ = ready_tx.send(Ok(()));
                        let mut tick = tokio::time::interval(Duration::from_secs(5));
                        tokio::pin!(stopped);
                        loop {
                            tokio::select! {
                                _ = &mut stopped => break,
                                _ = tick.tick() => metrics.set_certificate_not_after(u64::try_from(tls.not_after()).ok()),
                            }
                        }
                        drop(watcher);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                    }
                }
            });
        })
        .map_err(|source| StartError::Thread {
            what: "the certificate reloader",
            source,
        })?;
    ready_rx.recv().map_err(|_| StartError::Thread {
        what: "the certificate reloader",
        source: std::io::Error::other("it stopped before it was ready"),
    })??;
    Ok(Reloader {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Reports a worker's death when dropped during a panic unwind.
struct DeathWatch {
    index: usize,
    failed: Arc<Mutex<Option<usize>>>,
    failure: Arc<tokio::sync::Notify>,
}

impl DeathWatch {
    fn fail(&self) {
        *lock(&self.failed) = Some(self.index);
        self.failure.notify_waiters();
    }
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!(worker = self.index, "worker panicked; stopping turnd");
            self.fail();
        }
    }
}

/// Binds the listeners and starts the workers (and the admin listener when configured).
///
/// # Errors
/// A listener could not be bound (another process holds the port, say), the io backend is
/// unavailable, or a worker could not start.
pub fn start(settings: Settings) -> Result<Running, StartError> {
    start_with_env(settings, Box::new(ProcessEnv))
}

/// As [`start`], with the environment reloads read (tests pass a fake).
///
/// # Errors
/// As [`start`].
pub fn start_with_env(
    settings: Settings,
    env: Box<dyn Env + Send + Sync>,
) -> Result<Running, StartError> {
    match listener::raise_nofile_limit() {
        Ok((before, after)) if before != after => {
            info!(from = before, to = after, "raised the open-file limit");
        }
        Ok((_, now)) => info!(limit = now, "open-file limit"),
        Err(e) => warn!(error = %e, "could not raise the open-file limit"),
    }
    let mut nonce_secret = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut nonce_secret[..]);
    let config = settings.server_config(nonce_secret);
    let quota = SharedQuota(Arc::new(Mutex::new(settings.quotas.ledger())));
    let workers = settings.workers.get();
    let buffers = Buffers {
        recv: settings.sockets.recv,
        send: settings.sockets.send,
    };
    // The first worker's backend settles what `auto` means here; the others are the same kind.
    let first = io::open(settings.io).map_err(|source| StartError::Backend {
        backend: settings.io.as_str(),
        worker: 0,
        source,
    })?;
    let backend_name = first.backend.name();
    info!(backend = backend_name, configured = settings.io.as_str(), reason = %first.reason, "io backend");
    let mut backends = vec![first.backend];
    for index in 1..workers {
        backends.push(
            io::create(first.kind).map_err(|source| StartError::Backend {
                backend: backend_name,
                worker: index,
                source,
            })?,
        );
    }

    let mut per_worker_udp: Vec<Vec<std::net::UdpSocket>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for addr in &settings.listeners.udp {
        let (actual, socks) = listener::bind_udp(*addr, workers, buffers)?;
        for (w, s) in per_worker_udp.iter_mut().zip(socks) {
            w.push(s);
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
        let (actual, socks) = listener::bind_tcp(addr, workers)?;
        for (w, s) in per_worker_tcp.iter_mut().zip(socks) {
            w.push(s);
        }
        if is_tls {
            bound_tls.push(actual);
        } else {
            bound_tcp.push(actual);
        }
    }
    info!(udp = ?bound, tcp = ?bound_tcp, tls = ?bound_tls, workers, "listening");

    let metrics = Arc::new(Metrics::new(
        workers,
        env!("CARGO_PKG_VERSION"),
        backend_name,
    ));
    let reloader = certificate
        .clone()
        .map(|t| start_reloader(t, metrics.clone()))
        .transpose()?;
    if let Some(t) = &certificate {
        metrics.set_certificate_not_after(u64::try_from(t.not_after()).ok());
    }
    let shared = Arc::new(Shared {
        quota,
        reservations: SharedReservations::default(),
        ports: PortPools::new(settings.relay.ports.clone()),
        reserved: ReservedSockets::default(),
        tls: certificate.clone(),
        caps: Arc::new(ConnectionCaps::default()),
        metrics: metrics.clone(),
        settings: settings.clone(),
    });
    {
        let s = shared.clone();
        metrics.set_relay_ports_source(Box::new(move || {
            s.ports
                .usage()
                .into_iter()
                .map(|(ip, used, total)| (ip, used as u64, (total - used) as u64))
                .collect()
        }));
    }

    let failed = Arc::new(Mutex::new(None));
    let failure = Arc::new(tokio::sync::Notify::new());
    let mut threads = Vec::new();
    let mut handles = Vec::new();
    let per_worker = per_worker_udp.into_iter().zip(per_worker_tcp).zip(backends);
    for (index, ((udp, tcp), backend)) in per_worker.enumerate() {
        let (w, handle) = Worker::new(index, shared.clone(), config.clone(), backend, udp, tcp)?;
        handles.push(handle);
        let watch = DeathWatch {
            index,
            failed: failed.clone(),
            failure: failure.clone(),
        };
        let t = std::thread::Builder::new()
            .name(format!("turnd-worker-{index}"))
            .spawn(move || {
                if let Err(e) = w.run() {
                    error!(worker = index, error = %e, "worker failed; stopping turnd");
                    watch.fail();
                }
                drop(watch);
            })
            .map_err(|source| StartError::Thread {
                what: "a worker thread",
                source,
            })?;
        threads.push(t);
    }
    let control = Arc::new(ProcessControl {
        workers: handles,
        settings: Mutex::new(settings.clone()),
        nonce_secret,
        metrics: metrics.clone(),
        tls: certificate.clone(),
        draining: AtomicBool::new(false),
        drain_deadline: Mutex::new(None),
        drain_deadline_unix: AtomicU64::new(0),
        env,
    });
    let admin = match &settings.admin {
        Some(a) => Some(
            admin::spawn(
                a.listen,
                a.token.as_ref().map(|t| t.expose().to_owned()),
                control.clone(),
                metrics.clone(),
            )
            .map_err(|source| StartError::Admin {
                listen: a.listen,
                source,
            })?,
        ),
        None => None,
    };
    let admin_addr = admin.as_ref().map(admin::AdminHandle::local_addr);
    if let Some(a) = admin_addr {
        info!(admin = %a, "admin listener: /metrics /live /ready");
    }
    Ok(Running {
        udp: bound,
        tcp: bound_tcp,
        tls: bound_tls,
        admin: admin_addr,
        certificate,
        io_backend: backend_name,
        control,
        threads,
        failed,
        failure,
        _reloader: reloader,
        _admin: admin,
    })
}

impl Running {
    /// Stops every worker and waits for them.
    pub fn shutdown(mut self) {
        self.control.stop_workers();
        for t in std::mem::take(&mut self.threads) {
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

/// How long a drain runs before "no allocation left" is believed: longer than two of the
/// workers' housekeeping ticks, which publish their allocation counts.
const DRAIN_SETTLE: Duration = Duration::from_millis(300);

/// Runs turnd until it is stopped: SIGTERM drains, SIGINT or a second SIGTERM stops at once,
/// SIGHUP reloads, a worker's death fails the process.
///
/// # Errors
/// Start-up failed, or a worker died.
pub async fn serve(settings: Settings) -> Result<(), ServeError> {
    use tokio::signal::unix::SignalKind;
    // Installed before anything else, so a SIGHUP can never kill the process.
    let sig = |kind, signal| {
        tokio::signal::unix::signal(kind).map_err(|source| ServeError::Signal { signal, source })
    };
    let mut hup = sig(SignalKind::hangup(), "SIGHUP")?;
    let mut term = sig(SignalKind::terminate(), "SIGTERM")?;
    let mut int = sig(SignalKind::interrupt(), "SIGINT")?;
    let mut watched: Vec<PathBuf> = settings.config_path.iter().cloned().collect();
    watched.extend(settings.watched_files.iter().cloned());
    let running = start(settings)?;
    let (file_tx, mut file_rx) = tokio::sync::mpsc::channel::<()>(8);
    let _watch = if watched.is_empty() {
        None
    } else {
        match tls::watch_files(&watched, file_tx) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(files = ?watched, error = %e, "cannot watch the configuration files; SIGHUP and POST /reload still reload them");
                None
            }
        }
    };
    let control = running.control.clone();
    let reload = |why: &str| {
        info!(trigger = why, "reloading the configuration");
        let c = control.clone();
        tokio::task::spawn_blocking(move || {
            let _ = c.reload_config();
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    // When this loop first saw the drain: the per-worker allocation counts are published
    // every housekeeping tick (100 ms), so a zero read sooner may predate an allocation made
    // just before the drain began.
    let mut drain_seen: Option<Instant> = None;
    let outcome = loop {
        tokio::select! {
            _ = int.recv() => { info!("SIGINT: stopping now"); break Ok(()); }
            _ = term.recv() => {
                if control.is_draining() {
                    info!("second SIGTERM: stopping now");
                    break Ok(());
                }
                info!("SIGTERM: draining");
                control.start_drain();
            }
            _ = hup.recv() => { let _ = reload("SIGHUP").await; }
            Some(()) = file_rx.recv() => {
                // A file update is a burst of events: let it settle, then load once.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while file_rx.try_recv().is_ok() {}
                let _ = reload("file changed").await;
            }
            i = running.worker_failed() => break Err(ServeError::WorkerDied(i)),
            _ = tick.tick() => {
                if control.is_draining() {
                    let since = *drain_seen.get_or_insert_with(Instant::now);
                    let left = control.allocations();
                    if left == 0 && since.elapsed() >= DRAIN_SETTLE {
                        info!("drained: the last allocation ended; stopping");
                        break Ok(());
                    }
                    if control.drain_deadline().is_some_and(|d| Instant::now() >= d) {
                        info!(allocations = left, "drain timeout: stopping with allocations still open");
                        break Ok(());
                    }
                }
            }
        }
    };
    if tokio::task::spawn_blocking(move || running.shutdown())
        .await
        .is_err()
    {
        error!("stopping the workers panicked");
    }
    outcome
}
