//! Shared helpers for turnd's cross-crate integration and interop tests.
//!
//! - [`server`]: starts the server under test — turnd in-process, or coturn's `turnserver`
//!   when `TURND_TEST_SERVER=coturn` — so one interop suite runs against both.
//! - [`client`]: a small TURN client built on turn-proto's codec, for what the other clients
//!   cannot do (Send indications on demand, malformed input, reading error codes).
//! - [`http`], [`prometheus`], [`peer`], [`tools`]: re-exported from `turnd-test-support`
//!   (the launchers and clients turnd's own tests share; see that crate).
//!
//! Everything binds loopback addresses only, and every network wait has a timeout.

pub mod client;
pub mod server;

pub use turnd_test_support::{http, peer, prometheus, tools, IO_TIMEOUT};
