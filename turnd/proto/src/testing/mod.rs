//! Test support shared by every fake IO layer of turn-proto's tests — the server's fake-clock
//! unit tests (`src/server/tests.rs`), the proptests and the cargo-fuzz driver
//! (`fuzz/common/driver.rs`) — and by nothing else: compiled for this crate's own tests and
//! under the `testing` feature (which the fuzz crate and the proptests turn on), never in a
//! release build of turnd.
//!
//! - [`FakeIo`]: the fake clock (wake at every deadline on the way, as a real driver does).
//! - [`RelaySlab`]: the fake IO layer's relay sockets by handle, and the addresses it binds
//!   and advertises.
//! - [`server_config`]: the one test server's credentials and peer policy.
//! - [`sign`]: the one request signer.
//! - [`check_gauges`]: what must hold of a `Server` after any sequence of calls.

#![allow(clippy::missing_panics_doc)]

mod signer;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

pub use signer::{sign, Signing};

use crate::auth::{long_term_key_md5, rest_api_password, Credentials, UserSecret};
use crate::codec::AddressFamily;
use crate::server::policy::PeerPolicy;
use crate::server::{RelayHandle, RelayedAddress, Server, ServerConfig};

/// The realm of the test server.
pub const REALM: &str = "example.org";
/// The UNIX time the test clock starts at.
pub const UNIX0: u64 = 1_700_000_000;
/// The TURN REST API secret of the test server.
pub const SECRET: &[u8] = b"s3cret";

/// The fake IO layer's IPv4 relay address, and the public one it advertises.
pub const RELAY_IPV4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
/// The public address advertised for [`RELAY_IPV4`].
pub const RELAY_IPV4_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
/// The fake IO layer's IPv6 relay address (advertised as it is).
pub const RELAY_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);

/// The test server's configuration: static users `alice` (password `wonderland`) and `bob`
/// (the `turnadmin -k` MD5 key of `builder`), REST API credentials under [`SECRET`], a fixed
/// nonce secret, and peers allowed in `192.0.2.0/24` and `2001:db8::/32` (documentation
/// ranges; the default denials stay).
#[must_use]
pub fn server_config() -> ServerConfig {
    let mut credentials = Credentials::new(REALM);
    credentials.add_secret(SECRET.to_vec());
    credentials.add_user("alice", &UserSecret::Password("wonderland".into()));
    credentials.add_user(
        "bob",
        &UserSecret::Md5Key(long_term_key_md5("bob", REALM, "builder")),
    );
    let allow = vec![
        "192.0.2.0/24".parse().unwrap_or_else(|_| unreachable!()),
        "2001:db8::/32".parse().unwrap_or_else(|_| unreachable!()),
    ];
    ServerConfig {
        credentials,
        nonce_secret: [9; 32],
        policy: PeerPolicy::new(allow, vec![]),
        ..ServerConfig::default()
    }
}

/// A TURN REST API credential for `user` expiring at UNIX time `expiry`, under `secret`
/// (the test server's is [`SECRET`]): (username `<expiry>:<user>`, password).
#[must_use]
pub fn rest_credential(secret: &[u8], user: &str, expiry: u64) -> (String, String) {
    let username = format!("{expiry}:{user}");
    let password = rest_api_password(secret, &username);
    (username, password)
}

/// The O(1) gauges of `Server::stats` agree with a scan of the server's state.
pub fn check_gauges(server: &Server) {
    let stats = server.stats();
    assert_eq!(
        stats.allocations_active,
        server.allocation_count() as u64,
        "allocations_active gauge"
    );
    let (permissions, channels) = server.permission_and_channel_count();
    assert_eq!(
        stats.permissions_active, permissions as u64,
        "permissions_active gauge"
    );
    assert!(
        stats.channels_active <= channels as u64,
        "channels_active gauge {} above the {channels} bindings held",
        stats.channels_active
    );
}

/// A fake IO layer around a `Server`: it owns the clock and drains the server's output.
pub trait FakeIo {
    /// The server it drives.
    fn server(&mut self) -> &mut Server;
    /// The fake clock's time.
    fn now(&self) -> Instant;
    /// Moves the fake clock.
    fn set_now(&mut self, now: Instant);
    /// Drains the server's transmits and events, acting on them as an IO layer does (and
    /// checking [`check_gauges`]).
    fn pump(&mut self);

    /// Steps the clock by `d` like a real driver: wakes at every deadline on the way.
    fn advance(&mut self, d: Duration) {
        let target = self.now() + d;
        while let Some(t) = self.server().poll_timeout() {
            if t > target {
                break;
            }
            let now = self.now().max(t);
            self.set_now(now);
            self.server().handle_timeout(now);
            self.pump();
        }
        self.set_now(target);
        self.server().handle_timeout(target);
        self.pump();
    }
}

/// The relay address the fake IO layer binds for `family` ([`RELAY_IPV4`], [`RELAY_IPV6`]).
#[must_use]
pub fn relay_ip(family: AddressFamily) -> Option<IpAddr> {
    match family {
        AddressFamily::IPV4 => Some(IpAddr::V4(RELAY_IPV4)),
        AddressFamily::IPV6 => Some(IpAddr::V6(RELAY_IPV6)),
        _ => None,
    }
}

/// The relay sockets a fake IO layer holds, by handle: a dense slab whose lowest free slot
/// names the next socket, as turnd's is.
#[derive(Debug, Default)]
pub struct RelaySlab {
    slots: Vec<Option<SocketAddr>>,
}

impl RelaySlab {
    /// Records a relay socket bound at `local` and names it: the relayed address with its
    /// handle and the address advertised for it ([`RELAY_IPV4_PUBLIC`] for IPv4).
    pub fn insert(&mut self, local: SocketAddr) -> RelayedAddress {
        let i = match self.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[i] = Some(local);
        let advertised = match local.ip() {
            IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(RELAY_IPV4_PUBLIC), local.port()),
            IpAddr::V6(_) => local,
        };
        RelayedAddress {
            handle: RelayHandle(u32::try_from(i).unwrap_or(u32::MAX)),
            local,
            advertised,
        }
    }

    /// Closes the socket `released` names; it must be the one its handle holds.
    pub fn release(&mut self, released: &RelayedAddress) {
        let slot = self.slots.get_mut(released.handle.0 as usize);
        assert!(
            slot.as_deref() == Some(&Some(released.local)),
            "RelayReleased({released:?}) for a handle that is not this socket's"
        );
        if let Some(slot) = slot {
            *slot = None;
        }
    }

    /// The socket `handle` names, if it is bound.
    #[must_use]
    pub fn get(&self, handle: RelayHandle) -> Option<SocketAddr> {
        self.slots.get(handle.0 as usize).copied().flatten()
    }

    /// The handle of the socket bound at `local`.
    #[must_use]
    pub fn handle_of(&self, local: SocketAddr) -> Option<RelayHandle> {
        let i = self.slots.iter().position(|r| *r == Some(local))?;
        u32::try_from(i).ok().map(RelayHandle)
    }

    /// The handles of every bound socket, lowest first.
    #[must_use]
    pub fn live(&self) -> Vec<RelayHandle> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].is_some())
            .filter_map(|i| u32::try_from(i).ok())
            .map(RelayHandle)
            .collect()
    }
}
