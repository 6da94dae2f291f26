//! turn-proto: sans-IO STUN/TURN protocol core.
#![forbid(unsafe_code)]

pub mod auth;
