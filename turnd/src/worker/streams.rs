//! TCP and TLS connections in the loop: accept (with caps and a budget), read (budgeted
//! per pass), hand frames to the core (budgeted), write, and close (the allocation ends with
//! the connection, and the connection with its allocation).

use super::*;

impl State {
    pub(super) fn accept(&mut self, i: usize) {
        if self.accept_paused_until.is_some_and(|t| self.now < t) {
            if !self.accept_backlog.contains(&i) {
                self.accept_backlog.push(i);
            }
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            let Some(l) = self.tcp.get(i) else { return };
            let (mut sock, peer) = match l.sock.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        self.stats.on_connection_refused(RefuseCause::NoDescriptors);
                        warn!(worker = self.index, error = %e, "accept: out of file descriptors");
                    } else {
                        debug!(worker = self.index, error = %e, "accept failed");
                    }
                    // Back off briefly; the connection waits in the listen queue.
                    self.accept_paused_until = Some(self.now + Duration::from_millis(50));
                    if !self.accept_backlog.contains(&i) {
                        self.accept_backlog.push(i);
                    }
                    return;
                }
            };
            let Some(slot) = self.shared.caps.try_acquire(peer.ip(), &self.limits) else {
                let cause = if self.shared.caps.total() >= self.limits.max_total {
                    RefuseCause::TotalCap
                } else {
                    RefuseCause::PerIpCap
                };
                self.stats.on_connection_refused(cause);
                debug!(client = %peer, cause = cause.as_str(), "connection refused");
                continue;
            };
            let _ = sock.set_nodelay(true);
            let Ok(local) = sock.local_addr() else {
                continue;
            };
            let idx = self.streams.vacant_key();
            if idx >= STREAM_ROUTE as usize {
                continue;
            }
            if let Err(e) = self.registry.register(
                &mut sock,
                mio::Token(idx),
                mio::Interest::READABLE | mio::Interest::WRITABLE,
            ) {
                debug!(error = %e, "registering a connection failed");
                continue;
            }
            let ft = FiveTuple {
                client: peer,
                server: local,
                transport: Transport::Tcp,
            };
            self.streams
                .insert(Connection::new(sock, ft, slot, self.now));
        }
        // Budget used: more may wait; serve them next pass.
        if !self.accept_backlog.contains(&i) {
            self.accept_backlog.push(i);
        }
    }

    pub(super) fn list_write(&mut self, idx: usize) {
        if let Some(c) = self.streams.get_mut(idx) {
            if !c.write_listed {
                c.write_listed = true;
                self.to_write.push(idx);
            }
        }
    }

    pub(super) fn read_stream(&mut self, idx: usize) {
        let tls_config = self.tls_config.clone();
        let Some(c) = self.streams.get_mut(idx) else {
            return;
        };
        let was_handshaking = c.phase != Phase::Open;
        let outcome = c.read(tls_config.as_ref());
        if c.tls.is_some() && c.wants_write() && !c.write_listed {
            c.write_listed = true;
            self.to_write.push(idx);
        }
        if was_handshaking && c.phase == Phase::Open && !c.counted {
            c.counted = true;
            let t = c.five_tuple.transport;
            self.stats.on_connection_opened(t);
            if t == Transport::Tls {
                self.stats.on_tls_handshake(true);
            }
        }
        self.frames(idx);
        match outcome {
            ReadOutcome::Drained => {}
            ReadOutcome::More => {
                if let Some(c) = self.streams.get_mut(idx) {
                    if !c.read_listed {
                        c.read_listed = true;
                        self.read_backlog.push(idx);
                    }
                }
            }
            ReadOutcome::Closed => self.close_stream(idx, None),
        }
    }

    /// Hands the complete frames in a connection's read buffer to the core (at most
    /// [`FRAME_BUDGET`]; the rest waits in the buffer for the next pass).
    pub(super) fn frames(&mut self, idx: usize) {
        let Some(c) = self.streams.get_mut(idx) else {
            return;
        };
        if c.phase != Phase::Open || c.rbuf.is_empty() {
            return;
        }
        let ft = c.five_tuple;
        let mut rbuf = std::mem::take(&mut c.rbuf);
        let route = Route(STREAM_ROUTE | u32::try_from(idx).unwrap_or(0));
        let mut consumed = 0;
        let mut frames = 0;
        let mut garbage = false;
        while frames < FRAME_BUDGET {
            match frame_len(&rbuf[consumed..]) {
                Ok(FrameLen::Complete(n)) => {
                    self.core.handle_client_datagram(
                        self.now,
                        ft,
                        route,
                        &rbuf[consumed..consumed + n],
                    );
                    consumed += n;
                    frames += 1;
                    self.after_core();
                }
                Ok(FrameLen::NeedMore(_)) => break,
                Err(_) => {
                    garbage = true;
                    break;
                }
            }
        }
        rbuf.drain(..consumed);
        let more_frames =
            frames == FRAME_BUDGET && matches!(frame_len(&rbuf), Ok(FrameLen::Complete(_)));
        let Some(c) = self.streams.get_mut(idx) else {
            return;
        };
        if c.five_tuple != ft {
            return;
        }
        // Bytes read after the frames were taken out (none: reads happen before) join them.
        rbuf.extend_from_slice(&c.rbuf);
        c.rbuf = rbuf;
        c.after_frames(frames > 0, self.now);
        if garbage {
            if frames == 0 && !c.counted {
                self.stats.on_connection_refused(RefuseCause::NotStun);
            }
            debug!(client = %ft.client, "not STUN or ChannelData: closing");
            self.close_stream(idx, None);
            return;
        }
        if more_frames && !c.read_listed {
            c.read_listed = true;
            self.read_backlog.push(idx);
        }
    }

    pub(super) fn serve_backlogs(&mut self) {
        for idx in std::mem::take(&mut self.read_backlog) {
            if let Some(c) = self.streams.get_mut(idx) {
                c.read_listed = false;
            } else {
                continue;
            }
            // Frames left in the buffer first, then the socket.
            self.frames(idx);
            if self.streams.get(idx).is_some_and(|c| !c.read_listed) {
                self.read_stream(idx);
            }
        }
        if self.accept_paused_until.is_some_and(|t| self.now >= t) {
            self.accept_paused_until = None;
        }
        if self.accept_paused_until.is_none() {
            for i in std::mem::take(&mut self.accept_backlog) {
                self.accept(i);
            }
        }
    }

    pub(super) fn write_streams(&mut self) {
        for idx in std::mem::take(&mut self.to_write) {
            let Some(c) = self.streams.get_mut(idx) else {
                continue;
            };
            c.write_listed = false;
            if c.write().is_err() {
                self.close_stream(idx, None);
                continue;
            }
            if c.close_after_write && !c.wants_write() {
                self.close_stream(idx, None);
            }
        }
    }

    /// Closes a connection: its allocation ends with it (RFC 8656 §3.1).
    pub(super) fn close_stream(&mut self, idx: usize, expiry: Option<Expiry>) {
        let Some(mut c) = self.streams.try_remove(idx) else {
            return;
        };
        let _ = self.registry.deregister(&mut c.sock);
        if c.counted {
            self.stats.on_connection_closed(c.five_tuple.transport);
        } else if c.five_tuple.transport == Transport::Tls {
            let cause = if expiry == Some(Expiry::Handshake) {
                RefuseCause::HandshakeTimeout
            } else {
                RefuseCause::HandshakeFailed
            };
            self.stats.on_tls_handshake(false);
            self.stats.on_connection_refused(cause);
        } else if expiry == Some(Expiry::Handshake) {
            self.stats
                .on_connection_refused(RefuseCause::HandshakeTimeout);
        }
        if let Some(e) = expiry {
            debug!(client = %c.five_tuple.client, why = ?e, "connection timed out");
        }
        if c.phase == Phase::Open {
            self.core.handle_connection_closed(self.now, c.five_tuple);
            self.after_core();
        }
        drop(c);
    }
}
