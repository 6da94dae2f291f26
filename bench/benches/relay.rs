//! `cargo bench -p turnd-bench --bench relay`: WebRTC-shaped relay load through the bare
//! forwarder, turnd (each io backend as its own row, and with its admin listener scraped)
//! and coturn, in one run. Prints markdown tables.
//!
//! Scenarios (`BENCH_SCENARIOS`, comma-separated, default all):
//! `saturated` (64 allocations, 4 packets in flight each, 100 B), `paced` (64 allocations,
//! 20k pkt/s together, 100 B), `audio` (1,000 allocations × 50 pkt/s, 160 B), `video`
//! (100 allocations × 500 pkt/s, 1,100 B), `tcp` and `tls` (the saturated and paced loads
//! over TCP / TLS client legs), `setup` (server CPU per allocation with 32 in flight, and the
//! memory of 10,000 allocations held), `syscalls` (perf tracepoint counts per packet in a
//! window of their own, saturated and audio), `metrics` (turnd with its admin listener on
//! and scraped every second against off, alternating for two rounds: saturated, paced,
//! audio). Each row also gives the client's CPU and the kernel's receive-buffer drops at
//! the bench's and the server's own sockets, by role. bench/RESULTS.md reads a run.
//!
//! Servers (`BENCH_SERVERS`, default `bare,turnd,coturn`). turnd backends (`BENCH_IO`,
//! default `io_uring,epoll` when turnd's config has `[server] io`, else the one backend it
//! has). Knobs: `BENCH_SECS` (per window, 4), `BENCH_SYSCALL_SECS` (2), `BENCH_ALLOCS` (64),
//! `BENCH_WINDOW` (4), `BENCH_PACED_PPS` (20000), `BENCH_PAYLOAD` (100), `BENCH_AUDIO_ALLOCS`
//! (1000), `BENCH_VIDEO_ALLOCS` (100), `BENCH_SETUP_ALLOCS` (10000), `BENCH_CLIENT_THREADS`
//! (2), `BENCH_ECHO_THREADS` (1), `BENCH_WORKERS` (turnd and bare workers, 2),
//! `BENCH_TURNSERVER` (coturn's binary), `BENCH_COTURN_RELAY_THREADS`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use turnd_bench::link::Transport;
use turnd_bench::load::{EchoPeer, LoadConfig, Mode};
use turnd_bench::server::{
    scrape_metrics, turnd_supports, Server, Support, TestCert, TurndOptions,
};
use turnd_bench::syscalls::{self, RECV, SEND, WAIT};
use turnd_bench::{
    measure, measure_bare, mode_name, setup_and_memory, Scenario, ScenarioResult, SetupResult,
    Subject,
};

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_list(key: &str, default: &str) -> BTreeSet<String> {
    std::env::var(key)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

struct Knobs {
    secs: f64,
    syscall_secs: f64,
    allocs: usize,
    window: usize,
    paced_pps: u64,
    payload: usize,
    audio_allocs: usize,
    video_allocs: usize,
    setup_allocs: usize,
    client_threads: usize,
    echo_threads: usize,
    workers: usize,
    scenarios: BTreeSet<String>,
}

impl Knobs {
    fn wants(&self, s: &str) -> bool {
        self.scenarios.contains(s)
    }

    fn scenario(
        &self,
        name: &'static str,
        transport: Transport,
        allocations: usize,
        mode: Mode,
        payload: usize,
        secs: f64,
    ) -> Scenario {
        Scenario {
            name,
            transport,
            allocations,
            config: LoadConfig {
                mode,
                duration: Duration::from_secs_f64(secs),
                payload,
                threads: self.client_threads,
            },
        }
    }

    fn saturated(&self, t: Transport) -> Scenario {
        self.scenario(
            "saturated",
            t,
            self.allocs,
            Mode::Saturated {
                window: self.window,
            },
            self.payload,
            self.secs,
        )
    }

    fn paced(&self, t: Transport) -> Scenario {
        self.scenario(
            "paced",
            t,
            self.allocs,
            Mode::Paced {
                pps: self.paced_pps,
            },
            self.payload,
            self.secs,
        )
    }

    fn audio(&self) -> Scenario {
        self.scenario(
            "audio",
            Transport::Udp,
            self.audio_allocs,
            Mode::Paced {
                pps: 50 * self.audio_allocs as u64,
            },
            160,
            self.secs,
        )
    }

    fn video(&self) -> Scenario {
        self.scenario(
            "video",
            Transport::Udp,
            self.video_allocs,
            Mode::Paced {
                pps: 500 * self.video_allocs as u64,
            },
            1100,
            self.secs,
        )
    }

    /// The UDP scenarios selected.
    fn udp(&self) -> Vec<Scenario> {
        let mut v = Vec::new();
        if self.wants("saturated") {
            v.push(self.saturated(Transport::Udp));
        }
        if self.wants("paced") {
            v.push(self.paced(Transport::Udp));
        }
        if self.wants("audio") {
            v.push(self.audio());
        }
        if self.wants("video") {
            v.push(self.video());
        }
        v
    }

    /// The TCP/TLS scenarios selected.
    fn streams(&self) -> Vec<Scenario> {
        let mut v = Vec::new();
        for (name, t) in [("tcp", Transport::Tcp), ("tls", Transport::Tls)] {
            if self.wants(name) {
                v.push(self.saturated(t));
                v.push(self.paced(t));
            }
        }
        v
    }

    /// The windows whose system calls are counted.
    fn syscall_windows(&self) -> Vec<Scenario> {
        if !self.wants("syscalls") {
            return Vec::new();
        }
        let mut a = self.saturated(Transport::Udp);
        let mut b = self.audio();
        for s in [&mut a, &mut b] {
            s.config.duration = Duration::from_secs_f64(self.syscall_secs);
        }
        vec![a, b]
    }

    /// The scenarios run with turnd's admin listener on.
    fn metrics(&self) -> Vec<Scenario> {
        if !self.wants("metrics") {
            return Vec::new();
        }
        vec![
            self.saturated(Transport::Udp),
            self.paced(Transport::Udp),
            self.audio(),
        ]
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn label(s: &Scenario) -> String {
    format!("{} {}", s.name, s.transport.name())
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Results of the whole run.
#[derive(Default)]
struct Run {
    rows: Vec<ScenarioResult>,
    probes: Vec<ScenarioResult>,
    setups: Vec<SetupResult>,
    metrics: Vec<(ScenarioResult, u64, bool)>,
    loads: Vec<f64>,
    notes: Vec<String>,
}

impl Run {
    fn row(&mut self, r: ScenarioResult) {
        eprintln!(
            "  {} {}: {:.0} relayed pkt/s, {:.2} us CPU/pkt ({} threads), client+echo CPU \
             {:.2} s, sent {} echoed {} ({} in window), RTT p50 {} ms p99 {} ms, \
             {} UDP receive-buffer drops machine-wide ({:?} at own sockets in the window)",
            r.server,
            label(&r.scenario),
            r.relayed_pps(),
            r.cpu_us_per_packet(),
            r.server_threads,
            r.client_cpu,
            r.stats.sent,
            r.stats.received,
            r.stats.received_in_window,
            ms(r.stats.rtt_quantile(0.5)),
            ms(r.stats.rtt_quantile(0.99)),
            r.rcvbuf_drops,
            r.drops_by_role,
        );
        self.loads.push(loadavg());
        self.rows.push(r);
    }

    fn probe(&mut self, r: ScenarioResult) {
        eprintln!(
            "  {} {} syscalls: {:.2} per relayed packet",
            r.server,
            label(&r.scenario),
            r.syscalls_per_packet(None).unwrap_or(0.0)
        );
        self.probes.push(r);
    }

    fn setup(&mut self, r: SetupResult) {
        eprintln!(
            "  {} set-up: {} allocations ({} failed) in {:.1} s, {:.0}/s, {:.0} us CPU each, \
             {:.0} B RSS each",
            r.server,
            r.stats.opened,
            r.stats.failed,
            r.stats.elapsed.as_secs_f64(),
            r.stats.per_sec(),
            r.cpu_us_per_allocation(),
            r.bytes_per_allocation()
        );
        self.setups.push(r);
    }

    fn find(&self, server: &str, name: &str, t: Transport) -> Option<&ScenarioResult> {
        self.rows
            .iter()
            .find(|r| r.server == server && r.scenario.name == name && r.scenario.transport == t)
    }
}

/// Scrapes `GET /metrics` every second until stopped; counts the good scrapes.
struct Scraper {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scraper {
    fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ok.clone());
        let thread = std::thread::Builder::new()
            .name("bench-scrape".to_owned())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if scrape_metrics(addr).unwrap_or(false) {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    let next = Instant::now() + Duration::from_secs(1);
                    while !s.load(Ordering::Relaxed) && Instant::now() < next {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })?;
        Ok(Self {
            stop,
            ok,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.ok.load(Ordering::Relaxed)
    }
}

/// Everything for one running server: UDP and stream scenarios, the syscall windows, then
/// set-up and memory (which leaves allocations behind: last).
fn server_suite(
    run: &mut Run,
    server: &Server,
    k: &Knobs,
    echo: &EchoPeer,
    udp: bool,
    streams: bool,
) -> anyhow::Result<()> {
    // (scenario, whether its window counts system calls)
    let mut windows: Vec<(Scenario, bool)> = Vec::new();
    if udp {
        windows.extend(k.udp().into_iter().map(|sc| (sc, false)));
    }
    if streams {
        windows.extend(k.streams().into_iter().map(|sc| (sc, false)));
    }
    if udp && syscalls::available() {
        windows.extend(k.syscall_windows().into_iter().map(|sc| (sc, true)));
    }
    for (sc, count_syscalls) in windows {
        let r = measure(
            &Subject::server(server, sc.transport, echo.addr),
            &sc,
            count_syscalls,
        )?;
        if count_syscalls {
            run.probe(r);
        } else {
            run.row(r);
        }
    }
    if udp && k.wants("setup") {
        run.setup(setup_and_memory(
            server,
            echo.addr,
            k.setup_allocs,
            k.client_threads,
        )?);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; a test harness run (`cargo test --benches`) is a no-op.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let k = Knobs {
        secs: env("BENCH_SECS", 4.0),
        syscall_secs: env("BENCH_SYSCALL_SECS", 2.0),
        allocs: env("BENCH_ALLOCS", 64),
        window: env("BENCH_WINDOW", 4),
        paced_pps: env("BENCH_PACED_PPS", 20_000),
        payload: env("BENCH_PAYLOAD", 100),
        audio_allocs: env("BENCH_AUDIO_ALLOCS", 1000),
        video_allocs: env("BENCH_VIDEO_ALLOCS", 100),
        setup_allocs: env("BENCH_SETUP_ALLOCS", 10_000),
        client_threads: env("BENCH_CLIENT_THREADS", 2),
        echo_threads: env("BENCH_ECHO_THREADS", 1),
        workers: env("BENCH_WORKERS", 2),
        scenarios: env_list(
            "BENCH_SCENARIOS",
            "saturated,paced,audio,video,tcp,tls,setup,syscalls,metrics",
        ),
    };
    let servers = env_list("BENCH_SERVERS", "bare,turnd,coturn");
    let (io_support, admin_support) = turnd_supports();
    let backends: Vec<Option<&'static str>> = if io_support == Support::Yes {
        let wanted = env_list("BENCH_IO", "io_uring,epoll");
        ["io_uring", "epoll", "auto"]
            .into_iter()
            .filter(|b| wanted.contains(*b))
            .map(Some)
            .collect()
    } else {
        vec![None]
    };
    let started = Instant::now();
    let mut run = Run::default();
    run.loads.push(loadavg());
    if io_support == Support::No {
        run.notes
            .push("turnd has no `[server] io` key yet: one turnd row (its only backend)".into());
    }
    if !syscalls::available() && k.wants("syscalls") {
        run.notes.push(
            "perf cannot count syscalls:sys_enter_* tracepoints here: no syscall table".into(),
        );
    }
    let echo = EchoPeer::start(k.echo_threads)?;
    let cert = TestCert::generate()?;

    if servers.contains("bare") {
        eprintln!("bare forwarder ({} workers)...", k.workers);
        for sc in k.udp() {
            run.row(measure_bare(k.workers, echo.addr, &sc, false)?);
        }
        if syscalls::available() {
            for sc in k.syscall_windows() {
                run.probe(measure_bare(k.workers, echo.addr, &sc, true)?);
            }
        }
    }

    if servers.contains("turnd") {
        let mut started_backends = Vec::new();
        for io in &backends {
            let turnd = Server::turnd(&TurndOptions {
                workers: k.workers,
                io: *io,
                admin: false,
                tls: Some(&cert),
            });
            let mut turnd = match turnd {
                Ok(t) => t,
                Err(e) => {
                    let what = format!("turnd io = {:?} did not start: {e:#}", io.unwrap_or("-"));
                    eprintln!("{what}");
                    run.notes.push(what);
                    continue;
                }
            };
            turnd.name = format!("turnd {}", turnd.io_backend);
            eprintln!("{} ({} workers)...", turnd.name, k.workers);
            started_backends.push(*io);
            server_suite(&mut run, &turnd, &k, &echo, true, true)?;
            turnd.stop();
        }
        let metrics = k.metrics();
        if !metrics.is_empty() {
            if admin_support == Support::Yes {
                // Off and on alternate, twice, so drift in the neighbours' load hits both.
                let io = started_backends.first().copied().flatten();
                for round in 0..2 {
                    for admin in [false, true] {
                        let mut turnd = Server::turnd(&TurndOptions {
                            workers: k.workers,
                            io,
                            admin,
                            tls: None,
                        })?;
                        turnd.name = format!(
                            "turnd {} admin {}",
                            turnd.io_backend,
                            if admin { "on" } else { "off" }
                        );
                        eprintln!("{} (round {round}, {:?})...", turnd.name, turnd.admin);
                        for sc in &metrics {
                            let scraper = match turnd.admin {
                                Some(a) => Some(Scraper::start(a)?),
                                None => None,
                            };
                            let r = measure(
                                &Subject::server(&turnd, sc.transport, echo.addr),
                                sc,
                                false,
                            );
                            let scrapes = scraper.map_or(0, Scraper::finish);
                            let r = r?;
                            eprintln!(
                                "  {} {}: {:.2} us CPU/pkt, {scrapes} good scrapes",
                                r.server,
                                label(&r.scenario),
                                r.cpu_us_per_packet()
                            );
                            run.loads.push(loadavg());
                            run.metrics.push((r, scrapes, admin));
                        }
                        turnd.stop();
                    }
                }
            } else {
                run.notes
                    .push("turnd has no `[admin] listen` yet: no metrics-cost rows".into());
            }
        }
    }

    if servers.contains("coturn") {
        match Server::coturn(None)? {
            Some(coturn) => {
                eprintln!("coturn, UDP only (pid {:?})...", coturn.pid());
                server_suite(&mut run, &coturn, &k, &echo, true, false)?;
                coturn.stop();
                if !k.streams().is_empty() {
                    if let Some(mut coturn) = Server::coturn(Some(&cert))? {
                        coturn.name = "coturn".to_owned();
                        eprintln!("coturn with TCP and TLS (pid {:?})...", coturn.pid());
                        server_suite(&mut run, &coturn, &k, &echo, false, true)?;
                        coturn.stop();
                    }
                }
            }
            None => run
                .notes
                .push("coturn's turnserver is not installed: no coturn rows".into()),
        }
    }
    echo.stop();
    run.loads.push(loadavg());
    report(&run, &k, started.elapsed());
    Ok(())
}

fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".to_owned()
    }
}

fn report(run: &Run, k: &Knobs, took: Duration) {
    let (lo, hi) = run
        .loads
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &l| (lo.min(l), hi.max(l)));
    println!(
        "\nrun took {:.0} s; 1-minute load average {:.2}–{:.2} over the run; {} client \
         threads, {} echo thread(s), {} server workers, {} s per window",
        took.as_secs_f64(),
        lo,
        hi,
        k.client_threads,
        k.echo_threads,
        k.workers,
        k.secs
    );
    for n in &run.notes {
        println!("note: {n}");
    }

    println!("\n| server | scenario | allocations | offered | payload B | relayed pkt/s | server CPU s (threads) | CPU µs/pkt | loss | RTT p50 ms | RTT p99 ms | added p50 ms | added p99 ms | client+echo CPU s | own sockets' rcvbuf drops: client/listener/relay/echo/other |");
    println!("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &run.rows {
        let s = &r.scenario;
        let bare = run.find("bare fwd", s.name, Transport::Udp);
        let added = |q: f64| {
            bare.filter(|_| r.server != "bare fwd" && s.transport == Transport::Udp)
                .map_or("–".to_owned(), |b| {
                    let d = r.stats.rtt_quantile(q).as_secs_f64()
                        - b.stats.rtt_quantile(q).as_secs_f64();
                    format!("{:+.3}", d * 1e3)
                })
        };
        let d = &r.drops_by_role;
        let drops = format!(
            "{}/{}/{}/{}/{}",
            d.client, d.listener, d.relay, d.echo, d.other
        );
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.2} ({}) | {:.2} | {} / {} ({:.3} %) | {} | {} | {} | {} | {:.2} | {} |",
            r.server,
            label(s),
            s.allocations,
            mode_name(s.config.mode),
            s.config.payload,
            r.relayed_pps(),
            r.server_cpu,
            r.server_threads,
            r.cpu_us_per_packet(),
            r.stats.lost(),
            r.stats.sent,
            100.0 * r.stats.loss_ratio(),
            ms(r.stats.rtt_quantile(0.5)),
            ms(r.stats.rtt_quantile(0.99)),
            added(0.5),
            added(0.99),
            r.client_cpu,
            drops,
        );
    }

    // Ratios of CPU per packet, scenario by scenario.
    let servers: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for r in &run.rows {
            if !v.contains(&r.server) {
                v.push(r.server.clone());
            }
        }
        v
    };
    let turnds: Vec<&String> = servers.iter().filter(|s| s.starts_with("turnd")).collect();
    let scenarios: Vec<(&'static str, Transport)> = {
        let mut v = Vec::new();
        for r in &run.rows {
            let key = (r.scenario.name, r.scenario.transport);
            if !v.contains(&key) {
                v.push(key);
            }
        }
        v
    };
    let cpu = |server: &str, name: &str, t: Transport| {
        run.find(server, name, t)
            .map_or(0.0, ScenarioResult::cpu_us_per_packet)
    };
    print!("\n| scenario |");
    for t in &turnds {
        print!(" {t}/bare | {t}/coturn |");
    }
    println!(" coturn/bare | epoll/io_uring |");
    print!("|---|");
    for _ in &turnds {
        print!("---:|---:|");
    }
    println!("---:|---:|");
    for (name, t) in &scenarios {
        let bare = cpu("bare fwd", name, *t);
        let coturn = cpu("coturn", name, *t);
        print!("| {name} {} |", t.name());
        for s in &turnds {
            let v = cpu(s, name, *t);
            print!(" {} | {} |", ratio(v, bare), ratio(v, coturn));
        }
        println!(
            " {} | {} |",
            ratio(coturn, bare),
            ratio(
                cpu("turnd epoll", name, *t),
                cpu("turnd io_uring", name, *t)
            )
        );
    }

    if !run.setups.is_empty() {
        println!("\n| server | allocations opened (failed) | allocations/s | server CPU µs per allocation | RSS before KiB | RSS after KiB | bytes per allocation held |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for s in &run.setups {
            println!(
                "| {} | {} ({}) | {:.0} | {:.1} | {} | {} | {:.0} |",
                s.server,
                s.stats.opened,
                s.stats.failed,
                s.stats.per_sec(),
                s.cpu_us_per_allocation(),
                s.rss_before_kib,
                s.rss_after_kib,
                s.bytes_per_allocation()
            );
        }
        if let Some(c) = run.setups.iter().find(|s| s.server == "coturn") {
            for s in run.setups.iter().filter(|s| s.server.starts_with("turnd")) {
                println!(
                    "\n{} / coturn: CPU per allocation {}, allocations/s {}, bytes per allocation {}",
                    s.server,
                    ratio(s.cpu_us_per_allocation(), c.cpu_us_per_allocation()),
                    ratio(s.stats.per_sec(), c.stats.per_sec()),
                    ratio(s.bytes_per_allocation(), c.bytes_per_allocation())
                );
            }
        }
    }

    if !run.probes.is_empty() {
        println!("\nSystem calls per relayed packet (perf stat on the syscalls:sys_enter_<call> tracepoints of the calls in turnd_bench::syscalls::COUNTED, server threads only, a window of its own):\n");
        println!("| server | scenario | relayed pkts | all | send | recv | wait | top calls per packet |");
        println!("|---|---|---:|---:|---:|---:|---:|---|");
        for r in &run.probes {
            let per = |c: &[&str]| r.syscalls_per_packet(Some(c)).unwrap_or(0.0);
            let mut top: Vec<(&String, &u64)> = r
                .syscalls
                .as_ref()
                .map(|s| s.by_call.iter().collect())
                .unwrap_or_default();
            top.sort_by(|a, b| b.1.cmp(a.1));
            let top: Vec<String> = top
                .iter()
                .take(5)
                .map(|(c, n)| format!("{c} {:.3}", **n as f64 / r.relayed().max(1) as f64))
                .collect();
            println!(
                "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} |",
                r.server,
                label(&r.scenario),
                r.relayed(),
                r.syscalls_per_packet(None).unwrap_or(0.0),
                per(&SEND),
                per(&RECV),
                per(&WAIT),
                top.join(", ")
            );
        }
    }

    if !run.metrics.is_empty() {
        println!("\nMetrics cost (turnd with the admin listener on and scraped every second, against off; off and on alternate, two rounds each, figures are the means):\n");
        println!("| backend | scenario | CPU µs/pkt off (rounds) | CPU µs/pkt on (rounds) | on/off | good scrapes |");
        println!("|---|---|---:|---:|---:|---:|");
        let mut seen = Vec::new();
        for (r, _, _) in &run.metrics {
            let key = (r.scenario.name, r.scenario.transport);
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let pick = |on: bool| -> Vec<f64> {
                run.metrics
                    .iter()
                    .filter(|(m, _, a)| *a == on && (m.scenario.name, m.scenario.transport) == key)
                    .map(|(m, _, _)| m.cpu_us_per_packet())
                    .collect()
            };
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            let show = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let (off, on) = (pick(false), pick(true));
            let scrapes: u64 = run
                .metrics
                .iter()
                .filter(|(m, _, a)| *a && (m.scenario.name, m.scenario.transport) == key)
                .map(|(_, s, _)| s)
                .sum();
            let backend = r
                .server
                .trim_end_matches(" admin on")
                .trim_end_matches(" admin off");
            println!(
                "| {backend} | {} | {:.2} ({}) | {:.2} ({}) | {} | {scrapes} |",
                label(&r.scenario),
                mean(&off),
                show(&off),
                mean(&on),
                show(&on),
                ratio(mean(&on), mean(&off)),
            );
        }
    }
}
