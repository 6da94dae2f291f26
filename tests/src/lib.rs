//! Shared helpers for turnd's cross-crate integration and interop tests.
//!
//! - [`server`]: starts the server under test — turnd in-process, or coturn's `turnserver`
//!   when `TURND_TEST_SERVER=coturn` — so one interop suite runs against both.
//! - [`client`], [`http`], [`prometheus`], [`peer`], [`tools`]: re-exported from
//!   `turnd-test-support` (the TURN client, launchers and HTTP client turnd's own tests share;
//!   see that crate).
//!
//! Everything binds loopback addresses only, and every network wait has a timeout.

pub mod server;

pub use turnd_test_support::{client, http, peer, prometheus, tools, IO_TIMEOUT};
