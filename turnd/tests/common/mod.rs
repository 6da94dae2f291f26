//! What turnd's integration tests share beyond `turnd-test-support` (whose TURN stream client,
//! echo peer and timeouts this re-exports): settings for an in-process turnd, and the `turnd`
//! binary as a child process ([`process`]).

#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::missing_panics_doc
)]

pub mod process;

use std::net::SocketAddr;

pub use turnd_test_support::peer::EchoPeer;
pub use turnd_test_support::stream::{assert_success, relayed_address, StreamClient, UdpStream};
pub use turnd_test_support::{IO_TIMEOUT, LOCALHOST};

/// Settings for an in-process turnd on loopback.
pub fn settings(extra: &str) -> turnd::config::Settings {
    let text = format!(
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = [\"127.0.0.1:0\"]\n{extra}\n\
         [auth]\nrealm = \"test\"\nsecrets = [\"s3cret\"]\n[[auth.users]]\nname = \"u\"\npassword = \"p\"\n\
         [peers]\nallow = [\"127.0.0.0/8\"]\n[server]\nworkers = 2\n[admin]\nlisten = \"127.0.0.1:0\"\n"
    );
    let env = turnd::config::MapEnv(Default::default());
    let mut s = turnd::config::Config::from_toml(&text)
        .unwrap()
        .validate(&env)
        .unwrap();
    if let Some(io) = turnd_test_support::io_backend_from_env() {
        s.io = io;
    }
    s
}
