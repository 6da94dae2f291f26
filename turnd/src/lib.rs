//! turnd: the TURN/STUN server around the sans-IO [`turn_proto`] core.
//!
//! The map: [`run`] starts and stops the process; [`worker`] is the one event loop per
//! worker thread; [`net`] holds the sockets (listeners, relays, streams, TLS, batched UDP)
//! and the two io backends; [`config`] reads and validates the TOML file; [`metrics`] and
//! [`admin`] are the operator's view.

pub mod admin;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod net;
pub mod run;
pub mod worker;
