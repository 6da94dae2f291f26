//! # turn-proto
//!
//! A sans-IO implementation of STUN ([RFC 8489]) and TURN ([RFC 8656], with IPv6 per
//! [RFC 6156]) for servers: the wire codec, authentication (long-term credentials, the TURN
//! REST API, stateless nonces, RFC 8489's SHA-256 features) and the allocation state machine.
//!
//! It does no IO and reads no clock: datagrams and the current time go in through
//! `handle_*` methods, and datagrams to send, timer deadlines, relay-port requests and events
//! come out through `poll_*` methods. Any IO layer — tokio, io_uring, a fuzzer, a fake-clock
//! test — can drive it; the `turnd` crate is the production one. The IO layer names its
//! sockets with small handles the core hands back (a `RelayHandle` per relay socket, a
//! `Route` for the way back to a client), so neither side keeps a map of the other's state;
//! and it supplies the randomness (a seed per shard for reservation tokens), so the core
//! stays deterministic under test. Protocol defaults and caps live in [`defaults`].
//!
//! What it leaves out: sockets and port binding (the core asks the IO layer for relay ports),
//! TLS, DTLS, TCP allocations (RFC 6062), ICE, and the client side of TURN.
//!
//! [RFC 8489]: https://www.rfc-editor.org/rfc/rfc8489
//! [RFC 8656]: https://www.rfc-editor.org/rfc/rfc8656
//! [RFC 6156]: https://www.rfc-editor.org/rfc/rfc6156
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod codec;
pub mod defaults;
pub mod server;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
