//! Sockets: listeners sharded with SO_REUSEPORT (one owner per port), relay sockets and
//! their port pools, TCP/TLS connections and certificates, batched UDP, and the two io
//! backends behind one trait.

pub mod epoll;
pub mod io;
pub mod listener;
pub mod ports;
pub mod relay;
pub mod stream;
pub mod tls;
pub mod udp;
pub mod uring;
