//! Progress of long steps (apt, kubeadm, Helm's waits, a VM's SSH and cloud-init): while a
//! step runs, a line every [`EVERY`] says it is still running and for how long; when it took
//! that long, a last line gives the elapsed time. Lines go to the log (stderr) through
//! [`super::redact::redact`], like everything the transports log.

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often a running step says it is still running.
pub const EVERY: Duration = Duration::from_secs(20);

/// `1m20s`, `45s`, `2h03m`.
pub fn elapsed_text(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Runs `f`, logging `[target] what … still running (ELAPSED)` every `every` until it returns,
/// then `[target] what: done in ELAPSED` (or `failed after`) when it ran at least `every`.
/// `ok` tells a success from a failure.
pub fn watch<T>(
    target: &str,
    what: &str,
    every: Duration,
    ok: impl Fn(&T) -> bool,
    f: impl FnOnce() -> T,
) -> T {
    let what = super::redact::redact(what);
    let start = Instant::now();
    let (done, wait) = mpsc::channel::<()>();
    // The ticker logs through this thread's subscriber (tests capture it; so does `main`).
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    let result = std::thread::scope(|scope| {
        let (what, dispatch) = (&what, &dispatch);
        scope.spawn(move || {
            tracing::dispatcher::with_default(dispatch, || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(every) {
                    tracing::info!(
                        "[{target}] {what} … still running ({})",
                        elapsed_text(start.elapsed())
                    );
                }
            });
        });
        let result = f();
        drop(done);
        result
    });
    let took = start.elapsed();
    if took >= every {
        let how = if ok(&result) {
            "done in"
        } else {
            "failed after"
        };
        tracing::info!("[{target}] {what}: {how} {}", elapsed_text(took));
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::exec::{Cmd, LocalTransport, Transport};

    /// A log sink for one test.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_slow_command_says_it_is_still_running_and_when_it_is_done_without_secrets() {
        crate::exec::redact::remember("progress-s3cret-value");
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .without_time()
            .with_target(false)
            .with_ansi(false)
            .finish();
        let out = tracing::subscriber::with_default(subscriber, || {
            watch(
                "k8s-master",
                "helm upgrade --install with password=progress-s3cret-value",
                Duration::from_millis(100),
                |r: &Result<crate::exec::Output, _>| r.as_ref().is_ok_and(|o| o.success()),
                || LocalTransport::new().run(&Cmd::new("sleep").arg("0.5")),
            )
        });
        assert!(out.expect("sleep runs").success());
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
        assert!(
            text.lines()
                .any(|l| l.contains("[k8s-master] helm upgrade --install")
                    && l.contains("… still running (")),
            "{text}"
        );
        assert!(
            text.lines()
                .last()
                .is_some_and(|l| l.contains(": done in ")),
            "{text}"
        );
        assert!(!text.contains("progress-s3cret-value"), "{text}");

        // A quick step says nothing.
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            watch("host", "true", Duration::from_secs(60), |_| true, || ());
        });
        assert!(lines.0.lock().expect("lines").is_empty());
    }

    #[test]
    fn elapsed_reads_like_a_clock() {
        assert_eq!(elapsed_text(Duration::from_secs(45)), "45s");
        assert_eq!(elapsed_text(Duration::from_secs(80)), "1m20s");
        assert_eq!(elapsed_text(Duration::from_secs(7380)), "2h03m");
    }
}
