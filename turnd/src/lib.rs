//! turnd: the TURN/STUN server around the sans-IO [`turn_proto`] core.

pub mod cli;
pub mod config;
pub mod driver;
pub mod metrics;
pub mod net;
pub mod run;
