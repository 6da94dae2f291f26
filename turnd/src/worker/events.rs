//! The core's events: relay sockets bound (every configured relay address, the held
//! reserved ports) and released, allocations logged, rejections logged at info with a rate
//! limit.

use super::*;

pub(super) fn fmt_relayed(relayed: &[Option<RelayedAddress>; 2]) -> String {
    relayed
        .iter()
        .flatten()
        .map(|r| {
            if r.local == r.advertised {
                r.local.to_string()
            } else {
                format!("{} (bound {})", r.advertised, r.local)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl State {
    pub(super) fn handle_event(&mut self, event: Event) {
        self.stats.on_event(&event);
        match event {
            Event::RelayRequested(req) => {
                let bound = self.bind_relays(&req);
                self.core.handle_relay_bound(self.now, req.id, bound);
            }
            Event::RelayReleased(r) => {
                if let Some(sock) = self.relays.remove(r.handle, r.local) {
                    self.to_close.push((sock.key, sock.sock, sock.local));
                } else {
                    self.release_reserved(r.local);
                }
            }
            // A reservation lapsed unredeemed (or its Allocate failed): the held socket lives
            // in the process-wide table whichever worker's core removed the reservation.
            Event::ReservedPortReleased(local) => self.release_reserved(local),
            Event::AllocationCreated {
                five_tuple,
                username,
                relayed,
                lifetime,
                id,
                ..
            } => {
                info!(
                    worker = self.index,
                    id = id.0,
                    user = %username,
                    client = %five_tuple.client,
                    server = %five_tuple.server,
                    transport = five_tuple.transport.as_str(),
                    relayed = %fmt_relayed(&relayed),
                    lifetime_s = lifetime.as_secs(),
                    "allocation created"
                );
            }
            Event::AllocationEnded {
                five_tuple,
                username,
                relayed,
                duration,
                stats,
                reason,
                route,
                id,
            } => {
                info!(
                    worker = self.index,
                    id = id.0,
                    user = %username,
                    client = %five_tuple.client,
                    transport = five_tuple.transport.as_str(),
                    relayed = %fmt_relayed(&relayed),
                    duration_s = duration.as_secs(),
                    bytes_to_peer = stats.bytes_to_peer,
                    bytes_from_peer = stats.bytes_from_peer,
                    packets_to_peer = stats.packets_to_peer,
                    packets_from_peer = stats.packets_from_peer,
                    reason = reason.as_str(),
                    "allocation ended"
                );
                // A TCP/TLS connection does not outlive its allocation (coturn closes it
                // too): once the last answer is written, it closes.
                if five_tuple.transport.is_stream() && reason != EndReason::ConnectionClosed {
                    if let Some(idx) = stream_index(route) {
                        if let Some(c) = self.streams.get_mut(idx) {
                            if c.five_tuple == five_tuple {
                                c.close_after_write = true;
                                if !c.write_listed {
                                    c.write_listed = true;
                                    self.to_write.push(idx);
                                }
                            }
                        }
                    }
                }
            }
            Event::Rejected {
                transport,
                method,
                reason,
                client,
                username,
            } => {
                let second = unix_now();
                if second != self.log.second {
                    if self.log.suppressed > 0 {
                        info!(
                            worker = self.index,
                            suppressed = self.log.suppressed,
                            "rejections not logged in the last second (rate limit)"
                        );
                    }
                    self.log = LogLimiter {
                        second,
                        logged: 0,
                        suppressed: 0,
                    };
                }
                if self.log.logged < REJECT_LOG_PER_SECOND {
                    self.log.logged += 1;
                    info!(
                        worker = self.index,
                        transport = transport.as_str(),
                        method = method.name(),
                        reason = reason.as_str(),
                        code = reason.code().0,
                        client = %client,
                        user = username.as_deref().unwrap_or("-"),
                        "rejected"
                    );
                } else {
                    self.log.suppressed += 1;
                }
            }
        }
    }

    /// Closes a socket held for a RESERVATION-TOKEN and frees its port.
    pub(super) fn release_reserved(&mut self, local: SocketAddr) {
        if let Some(sock) = self.shared.reserved.take(local) {
            drop(sock);
            self.shared.ports.release(local.ip(), local.port());
        }
    }

    pub(super) fn bind_relays(&mut self, req: &RelayRequest) -> RelayBound {
        let arrival = req.five_tuple.server.ip();
        let mut reserved_next = None;
        let primary = self.bind_one(
            req.family,
            arrival,
            req.port,
            req.dont_fragment,
            &mut reserved_next,
        );
        let additional = req.additional_ipv6.then(|| {
            self.bind_one(
                AddressFamily::IPV6,
                arrival,
                PortRequest::Any,
                req.dont_fragment,
                &mut None,
            )
        });
        RelayBound {
            primary,
            additional,
            reserved_next,
        }
    }

    pub(super) fn bind_one(
        &mut self,
        family: AddressFamily,
        arrival: IpAddr,
        port: PortRequest,
        dont_fragment: bool,
        reserved_next: &mut Option<SocketAddr>,
    ) -> Result<RelayedAddress, RelayError> {
        let s = &self.shared.settings;
        let buffers = Buffers {
            recv: s.sockets.relay_recv,
            send: s.sockets.relay_send,
        };
        let (sock, local) = if let PortRequest::Reserved(local) = port {
            let sock = self
                .shared
                .reserved
                .take(local)
                .ok_or(RelayError::NoPortAvailable)?;
            (sock, local)
        } else {
            let (even, pair) = match port {
                PortRequest::Even { reserve_next } => (true, reserve_next),
                _ => (false, false),
            };
            let start = usize::try_from(self.random() % 65_536).unwrap_or(0);
            let shared = &*self.shared;
            let ips = relay::pick_ips(
                &shared.settings.relay.addresses,
                &shared.ports,
                family,
                arrival,
            );
            let (bound, next) = match relay::bind(&shared.ports, ips, even, pair, start, buffers) {
                Ok(x) => x,
                Err(BindError::Descriptors(e)) => {
                    self.stats.descriptor_exhaustion += 1;
                    warn!(worker = self.index, error = %e, "out of file descriptors: relay socket refused (508)");
                    return Err(RelayError::NoDescriptors);
                }
                Err(BindError::Family) => return Err(RelayError::FamilyUnavailable),
                Err(BindError::NoPort) => return Err(RelayError::NoPortAvailable),
            };
            if let Some(next) = next {
                self.shared.reserved.hold(next.local, next.sock);
                *reserved_next = Some(next.local);
            }
            (bound.sock, bound.local)
        };
        let advertised = SocketAddr::new(
            self.shared.settings.relay.advertised(local.ip()),
            local.port(),
        );
        let (handle, _) = self.relays.insert(sock, local, dont_fragment);
        self.to_register.push(handle);
        Ok(RelayedAddress {
            local,
            advertised,
            handle,
        })
    }

    /// Registers the relay sockets bound since the last call with the backend.
    pub(super) fn register_relays(&mut self, backend: &mut dyn Backend) {
        for handle in std::mem::take(&mut self.to_register) {
            let Some(r) = self.relays.get_mut(handle) else {
                continue;
            };
            let user = (u64::from(r.generation) << 32) | u64::from(handle.0);
            match backend.add_udp(r.fd(), user) {
                Ok(key) => {
                    r.key = Some(key);
                    // The kernel's default sets DF; a relay wants it only when asked. No
                    // control message is asked for: the socket's local address is known.
                    let _ = udp::set_dont_fragment(&r.sock, r.local.is_ipv6(), r.dont_fragment);
                }
                Err(e) => {
                    warn!(worker = self.index, relay = %r.local, error = %e, "relay socket registration failed")
                }
            }
        }
    }

    pub(super) fn close_released(&mut self, backend: &mut dyn Backend) {
        if self.to_close.is_empty() {
            return;
        }
        // Datagrams queued to a released socket's peers this pass are dropped with it (the
        // allocation is gone, as if they had been in flight).
        let closing: Vec<_> = self
            .to_close
            .iter()
            .map(|(_, s, _)| s.as_raw_fd())
            .collect();
        self.send.retain(|fd| !closing.contains(&fd));
        for (key, sock, local) in self.to_close.drain(..) {
            match key {
                Some(k) => backend.remove_udp(k, sock),
                None => drop(sock),
            }
            self.shared.ports.release(local.ip(), local.port());
        }
    }
}
