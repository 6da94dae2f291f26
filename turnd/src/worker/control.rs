//! Timers and housekeeping (stream timeouts, counters published every 100 ms), the
//! process's commands (reload, drain, sessions, end), and shutdown.

use super::*;

/// Open allocations logged one by one at exit, per worker.
const SHUTDOWN_LOG_LIMIT: usize = 100;

impl State {
    pub(super) fn timers(&mut self) {
        if self.core.poll_timeout().is_some_and(|t| t <= self.now) {
            self.core.handle_timeout(self.now);
            self.after_core();
        }
        if self.now < self.next_housekeeping {
            return;
        }
        self.next_housekeeping = self.now + HOUSEKEEPING;
        let mut expired = Vec::new();
        for (idx, c) in &self.streams {
            let has_allocation = self.core.has_allocation(&c.five_tuple);
            if let Some(e) = c.expired(self.now, &self.limits, has_allocation) {
                expired.push((idx, e));
            }
        }
        for (idx, e) in expired {
            self.close_stream(idx, Some(e));
        }
        self.stats.core = *self.core.stats();
        self.shared.metrics.publish(self.index, &self.stats);
        self.handle.store(
            self.core.allocation_count(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.heartbeat
            .store(unix_millis(), std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn commands(&mut self) {
        while let Ok(c) = self.commands.try_recv() {
            match c {
                Command::Reload { config, limits } => {
                    self.core.update_config(*config);
                    self.limits = limits;
                }
                Command::Drain(d) => self.core.set_draining(d),
                Command::Sessions { user, reply } => {
                    let list = self
                        .core
                        .sessions(self.now)
                        .filter(|s| user.as_deref().is_none_or(|u| u == s.username))
                        .map(|s| Session {
                            id: s.id.0.to_string(),
                            user: s.username.to_owned(),
                            transport: s.five_tuple.transport.as_str().to_owned(),
                            client: s.five_tuple.client.to_string(),
                            server: s.five_tuple.server.to_string(),
                            relayed: s
                                .relayed
                                .iter()
                                .flatten()
                                .map(|r| r.advertised.to_string())
                                .collect(),
                            created: s.created_unix,
                            lifetime_left_s: s.lifetime_left.as_secs(),
                            bytes_to_peer: s.stats.bytes_to_peer,
                            bytes_from_peer: s.stats.bytes_from_peer,
                            packets_to_peer: s.stats.packets_to_peer,
                            packets_from_peer: s.stats.packets_from_peer,
                            permissions: s.permissions,
                            channels: s.channels,
                        })
                        .collect();
                    let _ = reply.send(list);
                }
                Command::End { which, reply } => {
                    let n = match which {
                        EndSelector::User(u) => self.core.end_user_allocations(self.now, &u),
                        EndSelector::Id(id) => match id.parse::<u64>() {
                            Ok(id) => {
                                usize::from(self.core.end_allocation(self.now, AllocationId(id)))
                            }
                            Err(_) => 0,
                        },
                    };
                    self.after_core();
                    let _ = reply.send(n);
                }
                Command::Stop => self.stopping = true,
            }
        }
    }

    pub(super) fn shutdown(&mut self, backend: &mut dyn Backend) {
        let open = self.core.allocation_count();
        if open > 0 {
            info!(
                worker = self.index,
                allocations = open,
                "stopping with allocations open"
            );
            // What was cut, one line each (bounded: a busy server logs the first ones only).
            for s in self.core.sessions(self.now).take(SHUTDOWN_LOG_LIMIT) {
                info!(
                    worker = self.index,
                    id = s.id.0,
                    user = %s.username,
                    client = %s.five_tuple.client,
                    transport = s.five_tuple.transport.as_str(),
                    lifetime_left_s = s.lifetime_left.as_secs(),
                    bytes_to_peer = s.stats.bytes_to_peer,
                    bytes_from_peer = s.stats.bytes_from_peer,
                    "allocation open at exit"
                );
            }
        }
        let idxs: Vec<usize> = self.streams.iter().map(|(i, _)| i).collect();
        for idx in idxs {
            if let Some(mut c) = self.streams.try_remove(idx) {
                let _ = backend.registry().deregister(&mut c.sock);
            }
        }
        let released: Vec<_> = self.relays.drain().collect();
        for r in released {
            match r.key {
                Some(k) => backend.remove_udp(k, r.sock),
                None => drop(r.sock),
            }
            self.shared.ports.release(r.local.ip(), r.local.port());
        }
        self.close_released(backend);
        self.stats.core = *self.core.stats();
        self.shared.metrics.publish(self.index, &self.stats);
        self.handle.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}
