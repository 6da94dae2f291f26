//! Test support shared by turnd's own tests (`turnd/tests`) and the cross-crate suites
//! (`turnd-tests`). It does not depend on turnd — turnd's tests cannot depend on `turnd-tests`,
//! which does — only on turn-proto (its codec and `testing` signer) and nothing heavy.
//!
//! - [`tools`]: finds external tools (coturn's `turnserver` and `turnutils_*`, Prometheus's
//!   `prometheus` and `promtool`); under `TURND_REQUIRE_TOOLS=1` (CI) a missing tool fails the
//!   test instead of skipping it. Runs a tool with a deadline.
//! - [`http`]: a raw HTTP/1.1 client for turnd's admin listener and Prometheus's API.
//! - [`prometheus`]: a real Prometheus server scraping a target, and `promtool check metrics`.
//! - [`peer`]: a UDP echo peer on loopback that counts what it receives.
//! - [`client`]: a small TURN client over UDP built on turn-proto's codec, for what the other
//!   clients cannot do (Send indications on demand, malformed input, reading error codes).
//! - [`stream`]: a TURN client over a byte stream (TCP, TLS, or UDP datagrams as frames).
//! - [`free_udp_port`]: a port free on loopback right now.
//!
//! Everything binds loopback addresses only, and every network wait has a timeout.

pub mod client;
pub mod http;
pub mod peer;
pub mod prometheus;
pub mod stream;
pub mod tools;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// The upper bound for any single network wait in these tests.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The loopback address test servers listen and relay on.
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The io backend `TURND_TEST_IO` forces on the turnd a test starts (`epoll`, `io_uring`,
/// `auto`; parsed as `T`, turnd's `IoBackend`), if any: CI runs the interop and stream suites
/// once per backend.
///
/// # Panics
/// The variable holds anything else.
#[must_use]
pub fn io_backend_from_env<T: std::str::FromStr>() -> Option<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var("TURND_TEST_IO").as_deref() {
        Err(_) | Ok("") => None,
        Ok(v) => Some(
            v.parse()
                .unwrap_or_else(|e| panic!("TURND_TEST_IO={v}: {e}")),
        ),
    }
}

/// A UDP port free on 127.0.0.1 right now.
///
/// # Errors
/// Nothing could be bound.
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind((LOCALHOST, 0))?
        .local_addr()?
        .port())
}
