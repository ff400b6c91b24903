//! The network side of the world: dials, writes, arrivals, closes and resets between the
//! clients and the nsqd models, and lookupd queries.

use super::*;

impl World {
    pub(super) fn nsqd_of(addr: &str) -> Option<usize> {
        addr.strip_prefix("nsqd-")?.strip_suffix(":4150")?.parse().ok()
    }

    pub(super) fn dial(&mut self, party: Party, conn: ConnId, addr: String) -> Result<(), Violation> {
        self.note("dial", Who::Party(party), conn.0, 0);
        let rate = match party {
            Party::Producer(i) => self.producers[i].rates.dialled(&addr, self.now),
            Party::Consumer(i) => {
                let c = &mut self.consumers[i];
                let interval = c.settings.lookupd_poll_interval;
                let direct = c.direct.contains(&addr);
                c.rates.dialled(&addr, self.now, interval, direct, !c.lookupds.is_empty())
            }
        };
        self.check(rate)?;
        let latency = self.scenario.latency.mul_f64(0.5 + self.rng.unit());
        let nsqd = Self::nsqd_of(&addr);
        let link = self.links.len();
        self.links.push(Link::new(party, conn, nsqd.unwrap_or(usize::MAX), addr, latency));
        self.live.entry(party).or_default().insert(link);
        if self.by_client.insert((party, conn), link).is_some() {
            let c = inv::violated(name::CLIENT_PROTOCOL, format!("{party} reused conn id {}", conn.0));
            self.check(c)?;
        }
        let dial_timeout = match party {
            Party::Producer(i) => self.producers[i].settings.dial_timeout,
            Party::Consumer(i) => self.consumers[i].settings.dial_timeout,
        };
        let (delay, outcome) = match nsqd.map(|n| &self.nsqds[n]) {
            Some(node) if node.up && node.refuse_until <= self.now => (2 * latency, DialOutcome::Accept),
            Some(node) if node.up && node.blackhole => (dial_timeout, DialOutcome::Fail(DialFailure::TimedOut)),
            // An address nobody listens on (a ghost) times out or is refused, by its name.
            None if link % 2 == 0 => (dial_timeout, DialOutcome::Fail(DialFailure::TimedOut)),
            _ => (2 * latency, DialOutcome::Fail(DialFailure::Refused)),
        };
        self.after(delay, Ev::DialDone { link, outcome });
        Ok(())
    }

    pub(super) fn dial_done(&mut self, link: usize, outcome: DialOutcome) -> Result<(), Violation> {
        let (party, conn, nsqd) = (self.links[link].party, self.links[link].conn, self.links[link].nsqd);
        let now = self.instant();
        if !self.links[link].client_open {
            // The client gave up on the dial (closed it, or stopped) before it resolved.
            self.links[link].server_open = false;
            return Ok(());
        }
        // The nsqd may have gone down meanwhile.
        let outcome = match outcome {
            DialOutcome::Accept if !self.nsqds.get(nsqd).is_some_and(|n| n.up) => {
                DialOutcome::Fail(DialFailure::Refused)
            }
            other => other,
        };
        match outcome {
            DialOutcome::Fail(why) => {
                self.note("dial failed", Who::Party(party), conn.0, 0);
                let l = &mut self.links[link];
                l.faulted = true;
                l.server_open = false;
                let addr = l.addr.clone();
                match party {
                    Party::Producer(i) => {
                        if let Some(c) = self.producers[i].client.as_mut() {
                            c.connect_failed(conn, &addr, why, now);
                        }
                    }
                    Party::Consumer(i) => {
                        if let Some(c) = self.consumers[i].client.as_mut() {
                            c.connect_failed(conn, &addr, why, now);
                        }
                    }
                }
                // The client knows: no Close is needed for a socket that never opened.
                self.links[link].client_open = false;
                self.live.entry(party).or_default().remove(&link);
            }
            DialOutcome::Accept => {
                self.note("accepted", Who::Party(party), conn.0, 0);
                let node = &mut self.nsqds[nsqd];
                let fault = node.handshake.as_ref().filter(|(_, until)| *until > self.now).map(|(f, _)| f.clone());
                let faulted = fault.is_some() || node.stall_until > self.now;
                let server = node.model.accept_with(fault, now);
                let incarnation = node.incarnation;
                self.links[link].server = Some((server, incarnation));
                self.links[link].faulted |= faulted;
                self.by_server.insert((nsqd, server), link);
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
                self.drain_nsqd(nsqd)?;
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
        self.links[l].scanner.feed(bytes, &mut scanned);
        for s in scanned {
            match s {
                Scanned::Rdy(n) => {
                    self.links[l].rdy = n;
                    self.note("RDY", Who::Party(party), conn.0, n);
                }
                Scanned::Cls => self.note("CLS", Who::Party(party), conn.0, 0),
            }
        }
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
        let latency = link.latency;
        if link.server.is_some() {
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
                } else {
                    self.note("client reads", Who::Party(party), conn.0, chunk.bytes.len() as u64);
                }
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
                self.drain(party)
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

    pub(super) fn query_lookupd(&mut self, consumer: usize, query: QueryId, addr: String, request: &[u8]) {
        self.note("lookupd query", Who::Party(Party::Consumer(consumer)), query.0, 0);
        let rtt = self.scenario.latency.mul_f64(1.0 + self.rng.unit()) * 2;
        let index =
            addr.strip_prefix("lookupd-").and_then(|a| a.strip_suffix(":4161")).and_then(|i| i.parse::<usize>().ok());
        let now = self.instant();
        let (delay, answer) = match index.and_then(|i| self.lookupds.get_mut(i)) {
            None => (rtt, Err(DialFailure::Refused)),
            Some(l) => match l.mode {
                LookupdMode::Down => (rtt, Err(DialFailure::Refused)),
                LookupdMode::Hang => (LOOKUPD_QUERY_TIMEOUT, Err(DialFailure::TimedOut)),
                LookupdMode::Slow(d) => (rtt + d, Ok(l.model.handle(request, now))),
                LookupdMode::Up => (rtt, Ok(l.model.handle(request, now))),
            },
        };
        self.after(delay, Ev::LookupdAnswer { consumer, query, addr, answer });
    }
}
