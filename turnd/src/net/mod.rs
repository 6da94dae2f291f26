//! Sockets: UDP and TCP listeners sharded with SO_REUSEPORT, relay sockets, relay port pools,
//! TCP/TLS connections and certificates.

pub mod ports;
pub mod stream;
pub mod tls;
pub mod udp;
