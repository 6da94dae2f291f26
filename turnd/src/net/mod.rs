//! Sockets: UDP listeners sharded with SO_REUSEPORT, relay sockets, relay port pools.

pub mod ports;
pub mod udp;
