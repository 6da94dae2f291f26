//! What must hold of a `Server` after any sequence of calls, checked by every fake IO layer of
//! turn-proto's tests (the unit tests' harness, the proptests and the fuzz driver).

use turn_proto::server::Server;

/// The O(1) gauges of `Server::stats` agree with a scan of the server's state.
pub(crate) fn check_gauges(server: &Server) {
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
