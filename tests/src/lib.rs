//! Shared helpers for turnd's cross-crate integration and interop tests.
//!
//! - [`server`]: starts the server under test — turnd in-process, or coturn's `turnserver`
//!   when `TURND_TEST_SERVER=coturn` — so one interop suite runs against both.
//! - [`peer`]: a UDP echo peer on loopback that counts what it receives.
//! - [`client`]: a small TURN client built on turn-proto's codec, for what the other clients
//!   cannot do (Send indications on demand, malformed input, reading error codes).
//! - [`http`]: a raw HTTP client for turnd's admin listener and Prometheus's API.
//! - [`prometheus`]: a real Prometheus server scraping turnd, and `promtool check metrics`.
//! - [`tools`]: finds external tools; under `TURND_REQUIRE_TOOLS=1` (CI) a missing tool fails
//!   the test instead of skipping it.
//!
//! Everything binds loopback addresses only, and every network wait has a timeout.

pub mod client;
pub mod http;
pub mod peer;
pub mod prometheus;
pub mod server;
pub mod tools;

use std::time::Duration;

/// The upper bound for any single network wait in these tests.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
