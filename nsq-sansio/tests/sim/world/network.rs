//! The network side of the world: dials, writes, arrivals, closes and resets between the
//! clients and the nsqd models, and lookupd queries.

use super::*;

impl World {
    pub(super) fn nsqd_of(addr: &str) -> Option<usize> {
        addr.strip_prefix("nsqd-")?.strip_suffix(":4150")?.parse().ok()
    }

    pub(super) fn lookupd_of(addr: &str) -> Option<usize> {
        addr.strip_prefix("lookupd-")?.strip_suffix(":4161")?.parse().ok()
    }

    fn peer_of(&self, addr: &str) -> Peer {
        if let Some(n) = Self::nsqd_of(addr).filter(|&n| n < self.nsqds.len()) {
            Peer::Nsqd(n)
        } else if let Some(i) = Self::lookupd_of(addr).filter(|&i| i < self.lookupds.len()) {
            Peer::Lookupd(i)
        } else {
            Peer::Nobody
        }
    }

    /// The lookupd answer the client is reading in this step, if it is `party`'s, and whether
    /// it lists `addr`.
    fn answer_for(&self, party: Party, addr: &str) -> Option<(Round, bool)> {
        let link = &self.links[self.answering?];
        if link.party != party {
            return None;
        }
        let (host, port) = addr.rsplit_once(':')?;
        let entry = format!(r#""broadcast_address":"{host}","tcp_port":{port}"#);
        let listed = String::from_utf8_lossy(&link.response).contains(&entry);
        Some((link.round?, listed))
    }

    /// Checks a client's dial against its schedule, then starts it.
    pub(super) fn dial(
        &mut self,
        party: Party,
        conn: ConnId,
        addr: String,
        timeout: Duration,
    ) -> Result<(), Violation> {
        self.note("dial", Who::Party(party), conn.0, 0);
        self.detail(|| addr.clone());
        let peer = self.peer_of(&addr);
        let now = self.now;
        let mut round = None;
        match peer {
            Peer::Lookupd(_) => {
                let failover = self.failover.take().filter(|(p, _)| *p == party).map(|(_, r)| r);
                let (lookupds, interval) = match party {
                    Party::Producer(i) => {
                        (&self.producers[i].lookupds, self.producers[i].settings.lookupd_poll_interval)
                    }
                    Party::Consumer(i) => {
                        (&self.consumers[i].lookupds, self.consumers[i].settings.lookupd_poll_interval)
                    }
                };
                let (given, count) = (lookupds.contains(&addr), lookupds.len());
                if !given {
                    let c = inv::violated(
                        name::CLIENT_PROTOCOL,
                        format!("{party} queries {addr}, a lookupd it was not given"),
                    );
                    self.check(c)?;
                }
                let rates = match party {
                    Party::Producer(i) => &mut self.producers[i].lookupd,
                    Party::Consumer(i) => &mut self.consumers[i].lookupd,
                };
                let (r, c) = rates.queried(now, interval, count, failover);
                round = Some(r);
                self.note("lookupd query", Who::Party(party), conn.0, r.attempt as u64);
                self.check(c)?;
            }
            Peer::Nsqd(_) | Peer::Nobody => {
                self.failover = None;
                let who = &match party {
                    Party::Producer(i) if self.producers[i].settings.auto_batch > 1 => {
                        format!("{party} (auto_batch {})", self.producers[i].settings.auto_batch)
                    }
                    _ => party.to_string(),
                };
                let c = match party {
                    Party::Producer(i) => {
                        let p = &mut self.producers[i];
                        if matches!(p.target, Target::One(_)) {
                            p.rates.dialled(&addr, now).and_then(|()| p.redials.dialled(who, &addr, now))
                        } else if !p.addrs.contains(&addr)
                            && self.answering.is_some_and(|l| self.links[l].party == party)
                        {
                            // A pool dials an nsqd lookupd lists for the first time (or again
                            // after it left the pool and came back) as the answer arrives.
                            p.redials.forget(&addr);
                            p.redials.dialled(who, &addr, now)
                        } else {
                            p.redials.dialled(who, &addr, now)
                        }
                    }
                    Party::Consumer(i) => {
                        let answer = self.answer_for(party, &addr);
                        let c = &mut self.consumers[i];
                        if c.direct_live.contains(&addr) {
                            c.redials.dialled(who, &addr, now)
                        } else {
                            c.listed.dialled(who, &addr, answer)
                        }
                    }
                };
                self.check(c)?;
            }
        }
        let latency = self.scenario.latency.mul_f64(0.5 + self.rng.unit());
        let link = self.links.len();
        let mut new = Link::new(party, conn, peer, addr, latency, timeout);
        new.round = round;
        new.scanner.publishes =
            matches!(party, Party::Producer(i) if matches!(self.producers[i].target, Target::Pool { .. }));
        self.links.push(new);
        self.live.entry(party).or_default().insert(link);
        if self.by_client.insert((party, conn), link).is_some() {
            let c = inv::violated(name::CLIENT_PROTOCOL, format!("{party} reused conn id {}", conn.0));
            self.check(c)?;
        }
        let refused = (2 * latency, DialOutcome::Fail(DialFailure::Refused));
        let (delay, outcome) = match peer {
            Peer::Nsqd(n) => match &self.nsqds[n] {
                node if node.up && node.refuse_until <= self.now => (2 * latency, DialOutcome::Accept),
                node if node.up && node.blackhole => (timeout, DialOutcome::Fail(DialFailure::TimedOut)),
                _ => refused,
            },
            Peer::Lookupd(i) if self.lookupds[i].mode == LookupdMode::Down => refused,
            Peer::Lookupd(_) => (2 * latency, DialOutcome::Accept),
            // An address nobody listens on (a ghost) times out or is refused.
            Peer::Nobody if link % 2 == 0 => (timeout, DialOutcome::Fail(DialFailure::TimedOut)),
            Peer::Nobody => refused,
        };
        self.after(delay, Ev::DialDone { link, outcome });
        Ok(())
    }

    pub(super) fn dial_done(&mut self, link: usize, outcome: DialOutcome) -> Result<(), Violation> {
        let (party, conn, peer) = (self.links[link].party, self.links[link].conn, self.links[link].peer);
        let now = self.instant();
        if !self.links[link].client_open {
            // The client gave up on the dial (closed it, or stopped) before it resolved.
            self.links[link].server_open = false;
            return Ok(());
        }
        // The server may have gone down meanwhile.
        let outcome = match (outcome, peer) {
            (DialOutcome::Accept, Peer::Nsqd(n)) if !self.nsqds[n].up => DialOutcome::Fail(DialFailure::Refused),
            (DialOutcome::Accept, Peer::Lookupd(i)) if self.lookupds[i].mode == LookupdMode::Down => {
                DialOutcome::Fail(DialFailure::Refused)
            }
            (other, _) => other,
        };
        match outcome {
            DialOutcome::Fail(why) => {
                self.note("dial failed", Who::Party(party), conn.0, 0);
                let l = &mut self.links[link];
                l.faulted = true;
                l.server_open = false;
                let timeout = l.dial_timeout;
                match party {
                    Party::Producer(i) => {
                        if let Some(c) = self.producers[i].client.as_mut() {
                            c.connect_failed(conn, why, timeout, now);
                        }
                    }
                    Party::Consumer(i) => {
                        if let Some(c) = self.consumers[i].client.as_mut() {
                            c.connect_failed(conn, why, timeout, now);
                        }
                    }
                }
                // The client knows: no Close is needed for a socket that never opened.
                self.links[link].client_open = false;
                self.live.entry(party).or_default().remove(&link);
            }
            DialOutcome::Accept => {
                self.note("accepted", Who::Party(party), conn.0, 0);
                self.links[link].accepted = true;
                if let Peer::Nsqd(nsqd) = peer {
                    let node = &mut self.nsqds[nsqd];
                    let fault = node.handshake.as_ref().filter(|(_, until)| *until > self.now).map(|(f, _)| f.clone());
                    let faulted = fault.is_some() || node.stall_until > self.now;
                    let server = node.model.accept_with(fault, now);
                    let incarnation = node.incarnation;
                    self.links[link].server = Some((server, incarnation));
                    self.links[link].faulted |= faulted;
                    self.by_server.insert((nsqd, server), link);
                }
                match party {
                    Party::Producer(i) => {
                        if let Some(c) = self.producers[i].client.as_mut() {
                            c.connected(conn, now);
                        }
                    }
                    Party::Consumer(i) => {
                        if let Some(c) = self.consumers[i].client.as_mut() {
                            c.connected(conn, now);
                        }
                    }
                }
                if let Peer::Nsqd(nsqd) = peer {
                    self.drain_nsqd(nsqd)?;
                }
            }
        }
        self.drain(party)
    }

    /// Bytes a client wrote.
    pub(super) fn client_write(&mut self, party: Party, conn: ConnId, bytes: &[u8]) -> Result<(), Violation> {
        let Some(&l) = self.by_client.get(&(party, conn)) else {
            return self.check(inv::violated(
                name::CLIENT_PROTOCOL,
                format!("{party} wrote to conn {} it never dialled", conn.0),
            ));
        };
        if !self.links[l].writable() {
            let c = inv::violated(
                name::CLIENT_PROTOCOL,
                format!("{party} wrote to conn {} that is not connected (or already closed)", conn.0),
            );
            return self.check(c);
        }
        self.note("client write", Who::Party(party), conn.0, bytes.len() as u64);
        let mut scanned = Vec::new();
        if !self.links[l].is_lookupd() {
            self.links[l].scanner.feed(bytes, &mut scanned);
        }
        let mut publishes = 0;
        for s in scanned {
            match s {
                Scanned::Rdy(n) => {
                    self.links[l].rdy = n;
                    self.note("RDY", Who::Party(party), conn.0, n);
                }
                Scanned::Cls => self.note("CLS", Who::Party(party), conn.0, 0),
                Scanned::Publish(body) => {
                    // A pool's attempt of a publish goes out on this connection.
                    if let Party::Producer(i) = party {
                        let p = &mut self.producers[i];
                        if let Some(tx) = p.by_body.get(body.as_slice()).and_then(|tx| p.txs.get_mut(tx)) {
                            tx.attempts.push((l, self.now));
                            publishes += 1;
                        }
                    }
                }
            }
        }
        self.links[l].publish_written(self.now, publishes);
        let link = &mut self.links[l];
        if !link.server_open {
            return Ok(());
        }
        let latency = link.latency;
        let scheduled = link.to_server.send(bytes, self.now, latency, &mut self.rng, &mut self.chunk_seq);
        let in_transit = link.to_server.in_transit;
        for (seq, at) in scheduled {
            self.at(at, Ev::Arrive { link: l, dir: Dir::ToServer, seq });
        }
        self.check(inv::in_transit_bounded(format_args!("{party} conn {} to nsqd", conn.0), in_transit))
    }

    pub(super) fn client_close(&mut self, party: Party, conn: ConnId) -> Result<(), Violation> {
        let Some(&l) = self.by_client.get(&(party, conn)) else {
            return self.check(inv::violated(
                name::CLIENT_PROTOCOL,
                format!("{party} closed conn {} it never dialled", conn.0),
            ));
        };
        self.note("client close", Who::Party(party), conn.0, 0);
        if !self.links[l].client_open {
            return Ok(());
        }
        // The connection's last bytes (final FINs, CLS) go out before the socket closes.
        while let Some(bytes) = self.poll_transmit_for(party, conn) {
            self.client_write(party, conn, &bytes)?;
        }
        self.live.entry(party).or_default().remove(&l);
        let link = &mut self.links[l];
        link.client_open = false;
        link.closed_at = Some(self.now);
        let latency = link.latency;
        if link.accepted {
            if let Some((seq, at)) = link.to_server.shutdown(self.now, latency, &mut self.rng, &mut self.chunk_seq) {
                self.at(at, Ev::Arrive { link: l, dir: Dir::ToServer, seq });
            }
        }
        Ok(())
    }

    pub(super) fn arrive(&mut self, l: usize, dir: Dir, seq: u64) -> Result<(), Violation> {
        let Some(chunk) = self.links[l].pipe(dir).take(seq) else { return Ok(()) };
        let now = self.instant();
        let link = &self.links[l];
        let (party, conn, nsqd) = (link.party, link.conn, link.nsqd);
        match dir {
            Dir::ToServer => {
                if let Peer::Lookupd(i) = link.peer {
                    return self.lookupd_recv(l, i, &chunk.bytes);
                }
                let Some((server, incarnation)) = link.server else { return Ok(()) };
                if !link.server_open || incarnation != self.nsqds[nsqd].incarnation || !self.nsqds[nsqd].up {
                    return Ok(());
                }
                if chunk.eof {
                    self.note("nsqd sees close", Who::Nsqd(nsqd), server.0, 0);
                    self.nsqds[nsqd].model.client_closed(server, now);
                    self.links[l].server_open = false;
                    self.by_server.remove(&(nsqd, server));
                } else {
                    self.note("nsqd reads", Who::Nsqd(nsqd), server.0, chunk.bytes.len() as u64);
                    self.nsqds[nsqd].model.recv(server, &chunk.bytes, now);
                }
                self.drain_nsqd(nsqd)
            }
            Dir::ToClient => {
                if !link.client_open {
                    return Ok(());
                }
                if chunk.eof {
                    self.note("client sees close", Who::Party(party), conn.0, 0);
                    self.links[l].closed_at.get_or_insert(self.now);
                } else {
                    self.note("client reads", Who::Party(party), conn.0, chunk.bytes.len() as u64);
                }
                // What the client dials while it reads a lookupd answer is that answer's doing.
                self.answering = self.links[l].is_lookupd().then_some(l);
                match party {
                    Party::Producer(i) => {
                        if let Some(c) = self.producers[i].client.as_mut() {
                            if chunk.eof {
                                c.eof(conn, now);
                            } else {
                                c.input(conn, &chunk.bytes, now);
                            }
                        }
                    }
                    Party::Consumer(i) => {
                        if let Some(c) = self.consumers[i].client.as_mut() {
                            if chunk.eof {
                                c.eof(conn, now);
                            } else {
                                c.input(conn, &chunk.bytes, now);
                            }
                        }
                    }
                }
                let drained = self.drain(party);
                self.answering = None;
                drained
            }
        }
    }

    /// Takes everything an nsqd has to say, then re-arms its timer.
    pub(super) fn drain_nsqd(&mut self, n: usize) -> Result<(), Violation> {
        loop {
            let mut progress = false;
            while let Some((server, bytes)) = self.nsqds[n].model.poll_transmit_any() {
                progress = true;
                self.server_write(n, server, bytes)?;
            }
            while let Some(reg) = self.nsqds[n].model.poll_registration() {
                progress = true;
                let addr = self.nsqds[n].addr.clone();
                for l in self.lookupds.iter_mut().filter(|l| l.mode != LookupdMode::Down) {
                    l.model.register(&addr, &reg.topic, reg.channel.as_deref());
                }
            }
            while let Some(err) = self.nsqds[n].model.poll_error() {
                progress = true;
                self.note("nsqd error", Who::Nsqd(n), err.conn.0, u64::from(err.fatal));
                self.detail(|| err.text.clone());
                if err.fatal && !err.injected {
                    let who = self
                        .by_server
                        .get(&(n, err.conn))
                        .map(|&l| format!("{} conn {}", self.links[l].party, self.links[l].conn.0));
                    let c = inv::violated(
                        name::CLIENT_PROTOCOL,
                        format!("nsqd-{n} answered {} with the fatal error {:?}", who.unwrap_or_default(), err.text),
                    );
                    self.check(c)?;
                }
            }
            // After the errors, which name the connection, and after its last bytes.
            while let Some(server) = self.nsqds[n].model.poll_closed() {
                progress = true;
                self.server_close(n, server);
            }
            if !progress {
                break;
            }
        }
        for (&(_, server), &l) in self.by_server.range(server_range(n)) {
            if let Some(flow) = self.nsqds[n].model.flow(server) {
                if flow.in_flight > flow.max_rdy_granted {
                    let party = self.links[l].party;
                    let what = format_args!("nsqd-{n} conn {} ({party})", server.0);
                    let c = inv::in_flight_within_rdy(what, flow.in_flight, flow.max_rdy_granted);
                    return self.check(c);
                }
            }
        }
        let deadline = self.nsqds[n].model.poll_timeout().map(|t| self.since_base(t).max(self.now));
        if deadline.is_some() && deadline != self.nsqds[n].timer {
            self.nsqds[n].timer = deadline;
            if let Some(at) = deadline {
                self.at(at, Ev::NsqdTimer { nsqd: n, at });
            }
        }
        Ok(())
    }

    pub(super) fn server_write(&mut self, n: usize, server: ServerConn, mut bytes: Vec<u8>) -> Result<(), Violation> {
        let Some(&l) = self.by_server.get(&(n, server)) else { return Ok(()) };
        self.note("nsqd write", Who::Nsqd(n), server.0, bytes.len() as u64);
        let reset = self.links[l].reset_armed;
        if reset {
            // Reset mid-frame: part of these bytes arrive, then the connection is gone.
            let keep = self.rng.below(bytes.len() as u64) as usize;
            bytes.truncate(keep);
        }
        let link = &mut self.links[l];
        if link.client_open {
            let latency = link.latency;
            let scheduled = link.to_client.send(&bytes, self.now, latency, &mut self.rng, &mut self.chunk_seq);
            for (seq, at) in scheduled {
                self.at(at, Ev::Arrive { link: l, dir: Dir::ToClient, seq });
            }
            let in_transit = self.links[l].to_client.in_transit;
            self.check(inv::in_transit_bounded(format_args!("nsqd-{n} conn {} to client", server.0), in_transit))?;
        }
        if reset {
            self.reset(l)?;
        }
        Ok(())
    }

    /// nsqd closed a connection: the client reads what is in transit, then end of file.
    pub(super) fn server_close(&mut self, n: usize, server: ServerConn) {
        let Some(l) = self.by_server.remove(&(n, server)) else { return };
        self.note("nsqd closes", Who::Nsqd(n), server.0, 0);
        let link = &mut self.links[l];
        link.server_open = false;
        link.faulted = true;
        let latency = link.latency;
        if let Some((seq, at)) = link.to_client.shutdown(self.now, latency, &mut self.rng, &mut self.chunk_seq) {
            self.at(at, Ev::Arrive { link: l, dir: Dir::ToClient, seq });
        }
    }

    /// A reset: what is in transit to the client is cut short (some of it may still arrive),
    /// what is in transit to nsqd is lost, and both sides see the connection end.
    pub(super) fn reset(&mut self, l: usize) -> Result<(), Violation> {
        let now = self.instant();
        let link = &mut self.links[l];
        link.reset_armed = false;
        link.faulted = true;
        let keep = self.rng.below(link.to_client.in_transit as u64 + 1) as usize;
        link.to_client.cut(keep);
        link.to_server.cut(0);
        link.to_server.shut = true;
        let latency = link.latency;
        let (party, conn) = (link.party, link.conn);
        if let Some((seq, at)) = link.to_client.shutdown(self.now, latency, &mut self.rng, &mut self.chunk_seq) {
            self.at(at, Ev::Arrive { link: l, dir: Dir::ToClient, seq });
        }
        self.note("reset", Who::Party(party), conn.0, keep as u64);
        let link = &mut self.links[l];
        if let (Some((server, incarnation)), true) = (link.server, link.server_open) {
            link.server_open = false;
            let n = link.nsqd;
            self.by_server.remove(&(n, server));
            if self.nsqds[n].incarnation == incarnation && self.nsqds[n].up {
                self.nsqds[n].model.client_closed(server, now);
                self.drain_nsqd(n)?;
            }
        }
        Ok(())
    }

    /// Request bytes reach a lookupd: once the request's head is complete, lookupd answers as
    /// its mode says (at once, late, or never) and closes (`Connection: close`).
    pub(super) fn lookupd_recv(&mut self, l: usize, i: usize, bytes: &[u8]) -> Result<(), Violation> {
        let link = &mut self.links[l];
        if link.answered || !link.server_open {
            return Ok(());
        }
        link.request.extend_from_slice(bytes);
        let complete = link.request.windows(4).any(|w| w == b"\r\n\r\n");
        if !complete && link.request.len() < LOOKUPD_MAX_REQUEST {
            return Ok(());
        }
        link.answered = true;
        let request = std::mem::take(&mut link.request);
        let conn = link.conn.0;
        let now = self.instant();
        let node = &mut self.lookupds[i];
        let (mode, bytes) = match node.mode {
            LookupdMode::Hang | LookupdMode::Down => (node.mode, Vec::new()),
            mode => (mode, node.model.handle(&request, now)),
        };
        self.note("lookupd reads query", Who::Lookupd(i), conn, request.len() as u64);
        match mode {
            LookupdMode::Up => self.lookupd_respond(l, bytes),
            LookupdMode::Slow(delay) => {
                self.after(delay, Ev::LookupdRespond { link: l, bytes });
                Ok(())
            }
            // Accepted and never answered: the client's query deadline ends it.
            LookupdMode::Hang | LookupdMode::Down => Ok(()),
        }
    }

    /// A lookupd sends its answer and closes the connection.
    pub(super) fn lookupd_respond(&mut self, l: usize, bytes: Vec<u8>) -> Result<(), Violation> {
        let link = &mut self.links[l];
        if !link.server_open {
            return Ok(());
        }
        link.server_open = false;
        let latency = link.latency;
        let (party, conn) = (link.party, link.conn);
        let scheduled = link.to_client.send(&bytes, self.now, latency, &mut self.rng, &mut self.chunk_seq);
        let eof = link.to_client.shutdown(self.now, latency, &mut self.rng, &mut self.chunk_seq);
        link.response = bytes;
        for (seq, at) in scheduled.into_iter().chain(eof) {
            self.at(at, Ev::Arrive { link: l, dir: Dir::ToClient, seq });
        }
        self.note("lookupd answers", Who::Party(party), conn.0, self.links[l].response.len() as u64);
        Ok(())
    }
}
