//! The clients and their applications: lifetimes, publishers, handlers, and what the clients
//! tell them (each step drained until quiet, with the per-client invariants after it).

use super::*;

impl World {
    pub(super) fn start_producer(&mut self, i: usize) -> Result<(), Violation> {
        if self.phase != Phase::Faults {
            self.producers[i].stopped = true;
            return Ok(());
        }
        let p = &mut self.producers[i];
        let addr = format!("nsqd-{}:4150", p.nsqd);
        p.client = Some(SimProducer::new(&addr, &p.settings, self.base + self.now));
        self.note("producer start", Who::Party(Party::Producer(i)), 0, 0);
        let first = self.rng.exponential(self.producers[i].publish_every);
        self.after(first, Ev::Publish(i));
        self.drain(Party::Producer(i))
    }

    pub(super) fn stop_producer(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.instant();
        let p = &mut self.producers[i];
        let Some(client) = p.client.as_mut() else {
            p.stopped = true;
            return Ok(());
        };
        if p.stopping_since.is_some() {
            return Ok(());
        }
        p.stopping_since = Some(self.now);
        client.stop(now);
        let bound = inv::producer_stop_bound(p.settings.read_timeout, p.settings.dial_timeout);
        self.note("producer stop", Who::Party(Party::Producer(i)), 0, 0);
        let (due, jumped) = (self.now + bound, self.jumped);
        self.at(due, Ev::StopDeadline { party: Party::Producer(i), due, jumped });
        self.drain(Party::Producer(i))
    }

    pub(super) fn start_consumer(&mut self, i: usize) -> Result<(), Violation> {
        if self.phase != Phase::Faults {
            self.consumers[i].stopped = true;
            return Ok(());
        }
        let c = &mut self.consumers[i];
        c.client = Some(SimConsumer::new(TOPIC, CHANNEL, &c.settings, self.base + self.now));
        let after = c.sources_after;
        self.note("consumer start", Who::Party(Party::Consumer(i)), 0, 0);
        self.after(after, Ev::AddSources(i));
        self.drain(Party::Consumer(i))
    }

    pub(super) fn add_sources(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.instant();
        let c = &mut self.consumers[i];
        let Some(client) = c.client.as_mut() else { return Ok(()) };
        if c.stopping_since.is_some() {
            return Ok(());
        }
        for addr in &c.direct {
            client.connect_to_nsqd(addr, now).map_err(|e| Violation { invariant: name::CLIENT_PROTOCOL, detail: e })?;
        }
        for addr in &c.lookupds {
            client
                .connect_to_lookupd(addr, now)
                .map_err(|e| Violation { invariant: name::CLIENT_PROTOCOL, detail: e })?;
        }
        self.drain(Party::Consumer(i))
    }

    pub(super) fn stop_consumer(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.instant();
        let c = &mut self.consumers[i];
        let Some(client) = c.client.as_mut() else {
            c.stopped = true;
            return Ok(());
        };
        if c.stopping_since.is_some() {
            return Ok(());
        }
        c.stopping_since = Some(self.now);
        client.stop(now);
        self.note("consumer stop", Who::Party(Party::Consumer(i)), 0, 0);
        // Once faults are over (the last phase), nothing is left to wait out.
        let healthy = self.phase == Phase::Stopping;
        let (due, jumped) = (self.now + inv::consumer_stop_bound(healthy), self.jumped);
        self.at(due, Ev::StopDeadline { party: Party::Consumer(i), due, jumped });
        self.drain(Party::Consumer(i))
    }

    pub(super) fn stop_deadline(&mut self, party: Party, due: Duration, jumped: Duration) -> Result<(), Violation> {
        // Time the clock leaped over does not count against the client.
        let due = due + (self.jumped - jumped);
        if due > self.now {
            let jumped = self.jumped;
            self.at(due, Ev::StopDeadline { party, due, jumped });
            return Ok(());
        }
        let (stopped, since) = match party {
            Party::Producer(i) => (self.producers[i].stopped, self.producers[i].stopping_since),
            Party::Consumer(i) => (self.consumers[i].stopped, self.consumers[i].stopping_since),
        };
        if stopped {
            return Ok(());
        }
        let detail =
            format!("{party} stopped at {:?} and has not finished at {:?}", since.unwrap_or_default(), self.now);
        self.check(inv::violated(name::STOP_COMPLETES, detail))
    }

    pub(super) fn publish_deadline(
        &mut self,
        i: usize,
        tx: u64,
        due: Duration,
        jumped: Duration,
    ) -> Result<(), Violation> {
        let due = due + (self.jumped - jumped);
        if due > self.now {
            let jumped = self.jumped;
            self.at(due, Ev::PublishDeadline { producer: i, tx, due, jumped });
            return Ok(());
        }
        if !self.producers[i].txs.contains_key(&tx) {
            return Ok(());
        }
        let s = &self.producers[i].settings;
        let bound = inv::publish_bound(s.dial_timeout, s.read_timeout);
        let c = inv::violated(
            name::PUBLISH_RESOLVES_IN_TIME,
            format!("producer-{i}: tx {tx} unresolved {bound:?} after it was issued (auto_batch {})", s.auto_batch),
        );
        self.check(c)
    }

    pub(super) fn publish(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.instant();
        if self.phase != Phase::Faults || self.producers[i].stopping_since.is_some() {
            return Ok(());
        }
        let kind = self.rng.below(100);
        let count = if kind < 15 { self.rng.range(2, 5) } else { 1 };
        let pad = if self.rng.chance(0.02) { 4000 } else { self.rng.range(0, 200) as usize };
        let p = &mut self.producers[i];
        let bodies: Vec<Bytes> = (0..count)
            .map(|_| {
                p.next_body += 1;
                Bytes::from(format!("p{i}-{}{}", p.next_body, ".".repeat(pad)))
            })
            .collect();
        let Some(client) = p.client.as_mut() else { return Ok(()) };
        p.rates.called(self.now);
        let result = if count > 1 {
            client.multi_publish(TOPIC, bodies.clone(), now)
        } else if kind < 30 {
            let delay = Duration::from_millis(self.rng.below(LONGEST_DPUB.as_millis() as u64 + 1));
            client.deferred_publish(TOPIC, delay, bodies[0].clone(), now)
        } else {
            client.publish(TOPIC, bodies[0].clone(), now)
        };
        match result {
            Ok(tx) => {
                self.ledger.published.extend(bodies.iter().cloned());
                let p = &mut self.producers[i];
                let first = p.txs.insert(tx, bodies).is_none();
                if !first {
                    let c =
                        inv::violated(name::PUBLISH_RESOLVES_ONCE, format!("producer-{i}: tx {tx} handed out twice"));
                    self.check(c)?;
                }
                self.note("publish", Who::Party(Party::Producer(i)), 0, tx);
                let s = &self.producers[i].settings;
                let (due, jumped) = (self.now + inv::publish_bound(s.dial_timeout, s.read_timeout), self.jumped);
                self.at(due, Ev::PublishDeadline { producer: i, tx, due, jumped });
            }
            Err(e) => {
                let c = inv::violated(name::CLIENT_PROTOCOL, format!("producer-{i}: a valid publish was refused: {e}"));
                self.check(c)?;
            }
        }
        let next = self.rng.exponential(self.producers[i].publish_every);
        self.after(next, Ev::Publish(i));
        self.drain(Party::Producer(i))
    }

    pub(super) fn respond(&mut self, consumer: usize, msg: Delivered, answer: Answer) -> Result<(), Violation> {
        let now = self.instant();
        let Some(client) = self.consumers[consumer].client.as_mut() else { return Ok(()) };
        // Refusals (the message timed out, its connection closed) are the application's lot:
        // nsqd delivers the message again.
        let accepted = client.respond(&msg, answer, now).is_ok();
        if accepted && answer == Answer::Finish {
            self.handled(&msg.body);
        }
        self.note("respond", Who::Party(Party::Consumer(consumer)), msg.conn.0, 0);
        if answer == Answer::Touch {
            let later = self.rng.exponential(self.consumers[consumer].handler.mean_delay);
            self.after(later, Ev::Respond { consumer, msg, answer: Answer::Finish });
        }
        self.drain(Party::Consumer(consumer))
    }

    pub(super) fn handled(&mut self, body: &Bytes) {
        self.ledger.unhandled.remove(body);
        self.ledger.handled.insert(body.clone());
    }

    /// The application's handler: decides how and when to answer a message.
    pub(super) fn handle_message(&mut self, consumer: usize, msg: Delivered) {
        let h = self.consumers[consumer].handler;
        let healing = self.phase != Phase::Faults;
        let roll = self.rng.unit();
        // Healing measures the client, not a slow application: handlers answer promptly.
        let delay = self.rng.exponential(if healing { HEALING_HANDLER_DELAY } else { h.mean_delay });
        let answer = if healing || roll >= h.requeue + h.touch + h.ignore {
            Answer::Finish
        } else if roll < h.requeue {
            let delay = self.rng.chance(0.5).then(|| self.rng.millis(0, 2_000));
            Answer::Requeue { delay, backoff: self.rng.chance(0.5) }
        } else if roll < h.requeue + h.touch {
            Answer::Touch
        } else {
            // Ignored (it times out), until the cluster heals.
            self.consumers[consumer].ignored.push(msg);
            return;
        };
        self.after(delay, Ev::Respond { consumer, msg, answer });
    }

    pub(super) fn client_timer(&mut self, party: Party, at: Duration) -> Result<(), Violation> {
        let now = self.now;
        let instant = self.instant();
        let (timer, firings) = match party {
            Party::Producer(i) => {
                let p = &mut self.producers[i];
                (&mut p.timer, &mut p.firings)
            }
            Party::Consumer(i) => {
                let c = &mut self.consumers[i];
                (&mut c.timer, &mut c.firings)
            }
        };
        if *timer != Some(at) {
            return Ok(());
        }
        *timer = None;
        let fired = firings.fired(now, format_args!("{party}"));
        self.check(fired)?;
        self.note("timer", Who::Party(party), 0, 0);
        match party {
            Party::Producer(i) => {
                if let Some(c) = self.producers[i].client.as_mut() {
                    c.timeout(instant);
                }
            }
            Party::Consumer(i) => {
                if let Some(c) = self.consumers[i].client.as_mut() {
                    c.timeout(instant);
                }
            }
        }
        self.drain(party)
    }

    /// Takes everything a client has to say, until it is quiet; then re-arms its timer and
    /// checks its invariants.
    pub(super) fn drain(&mut self, party: Party) -> Result<(), Violation> {
        loop {
            let mut progress = false;
            // As the driver does: a connection is asked for bytes only when its previous write
            // finished, so what queues meanwhile leaves as one write.
            let idle: Vec<usize> = self
                .live
                .get(&party)
                .into_iter()
                .flatten()
                .copied()
                .filter(|&l| self.links[l].writable() && !self.links[l].writing)
                .collect();
            for l in idle {
                let conn = self.links[l].conn;
                if let Some(bytes) = self.poll_transmit_for(party, conn) {
                    progress = true;
                    self.client_write(party, conn, &bytes)?;
                    self.links[l].writing = true;
                    let took = self.rng.duration(Duration::from_micros(1), self.links[l].latency);
                    self.after(took, Ev::Written { link: l });
                }
            }
            match party {
                Party::Producer(i) => {
                    while let Some(note) = self.producers[i].client.as_mut().and_then(SimProducer::poll_note) {
                        progress = true;
                        self.producer_note(i, note)?;
                    }
                }
                Party::Consumer(i) => {
                    while let Some(note) = self.consumers[i].client.as_mut().and_then(SimConsumer::poll_note) {
                        progress = true;
                        self.consumer_note(i, note)?;
                    }
                }
            }
            // After the events, so a close is on the books before the re-query it causes.
            while let Some(io) = self.poll_io(party) {
                progress = true;
                self.client_io(party, io)?;
            }
            if !progress {
                break;
            }
        }
        let deadline = match party {
            Party::Producer(i) => self.producers[i].client.as_ref().and_then(SimProducer::poll_timeout),
            Party::Consumer(i) => self.consumers[i].client.as_ref().and_then(SimConsumer::poll_timeout),
        };
        let deadline = deadline.map(|t| self.since_base(t).max(self.now));
        let timer = match party {
            Party::Producer(i) => &mut self.producers[i].timer,
            Party::Consumer(i) => &mut self.consumers[i].timer,
        };
        if deadline.is_some() && deadline != *timer {
            *timer = deadline;
            if let Some(at) = deadline {
                self.at(at, Ev::ClientTimer { party, at });
            }
        } else if deadline.is_none() {
            *timer = None;
        }
        self.check_party(party)
    }

    pub(super) fn poll_transmit_for(&mut self, party: Party, conn: ConnId) -> Option<Bytes> {
        match party {
            Party::Producer(i) => self.producers[i].client.as_mut()?.poll_transmit_for(conn),
            Party::Consumer(i) => self.consumers[i].client.as_mut()?.poll_transmit_for(conn),
        }
    }

    pub(super) fn poll_io(&mut self, party: Party) -> Option<Io> {
        match party {
            Party::Producer(i) => self.producers[i].client.as_mut()?.poll_io(),
            Party::Consumer(i) => self.consumers[i].client.as_mut()?.poll_io(),
        }
    }

    /// The per-client invariants that hold between any two steps.
    pub(super) fn check_party(&mut self, party: Party) -> Result<(), Violation> {
        match party {
            Party::Producer(i) => {
                let p = &self.producers[i];
                if let Some(client) = &p.client {
                    let c = inv::outstanding_matches(format_args!("producer-{i}"), client.outstanding(), p.txs.len());
                    self.check(c)?;
                }
            }
            Party::Consumer(i) => {
                let client = self.consumers[i].client.as_ref();
                let conns: Vec<inv::ConnRdy> = self
                    .live
                    .get(&party)
                    .into_iter()
                    .flatten()
                    .map(|&l| &self.links[l])
                    .filter(|link| link.writable())
                    .map(|link| inv::ConnRdy {
                        conn: link.conn.0,
                        written: link.rdy,
                        held: client.and_then(|c| c.rdy(link.conn)),
                        writing: link.writing,
                    })
                    .collect();
                let max = self.consumers[i].settings.max_in_flight;
                let c = inv::rdy_within_max_in_flight(format_args!("consumer-{i}"), &conns, max);
                self.check(c)?;
            }
        }
        Ok(())
    }

    pub(super) fn client_io(&mut self, party: Party, io: Io) -> Result<(), Violation> {
        let stopped = match party {
            Party::Producer(i) => self.producers[i].stopped,
            Party::Consumer(i) => self.consumers[i].stopped,
        };
        match io {
            Io::Connect { conn, addr } => {
                if stopped {
                    let c = inv::violated(
                        name::STOPPED_IS_QUIET,
                        format!("{party} asks to dial {addr} after (or with) its Stopped"),
                    );
                    self.check(c)?;
                }
                self.dial(party, conn, addr)
            }
            Io::Close { conn } => self.client_close(party, conn),
            Io::QueryLookupd { query, addr, request } => {
                let Party::Consumer(i) = party else {
                    return self.check(inv::violated(name::CLIENT_PROTOCOL, "a producer queried lookupd"));
                };
                if stopped {
                    let c = inv::violated(name::STOPPED_IS_QUIET, format!("{party} queries {addr} after Stopped"));
                    self.check(c)?;
                }
                let interval = self.consumers[i].settings.lookupd_poll_interval;
                let c = self.consumers[i].rates.queried(self.now, interval);
                self.check(c)?;
                self.query_lookupd(i, query, addr, &request);
                Ok(())
            }
        }
    }

    pub(super) fn producer_note(&mut self, i: usize, note: ProducerNote) -> Result<(), Violation> {
        match note {
            ProducerNote::Published { tx, outcome } => {
                self.note("published", Who::Party(Party::Producer(i)), 0, tx);
                let Some(bodies) = self.producers[i].txs.remove(&tx) else {
                    let c = inv::violated(
                        name::PUBLISH_RESOLVES_ONCE,
                        format!("producer-{i}: tx {tx} resolved twice or never issued"),
                    );
                    return self.check(c);
                };
                match outcome {
                    PublishOutcome::Acked => {
                        let nsqd = self.producers[i].nsqd;
                        for body in bodies {
                            let held = self.nsqds[nsqd].model.holds(&body);
                            let delivered = self.ledger.delivered.contains(&body);
                            let lost = self.ledger.lost.contains(&body);
                            let c = inv::acked_publish_held(&body, held, delivered, lost);
                            self.check(c)?;
                            if !lost && !self.ledger.handled.contains(&body) {
                                self.ledger.unhandled.insert(body.clone());
                            }
                            self.ledger.acked.insert(body, nsqd);
                        }
                    }
                    PublishOutcome::Lost(_) => self.producers[i].lost.push(tx),
                    PublishOutcome::Refused(_) | PublishOutcome::Rejected(_) => {}
                }
            }
            ProducerNote::Connected(conn) => {
                self.note("producer connected", Who::Party(Party::Producer(i)), conn.0, 0);
                if let Some(&l) = self.by_client.get(&(Party::Producer(i), conn)) {
                    self.links[l].up = true;
                }
            }
            ProducerNote::Disconnected { conn, cause, local } => {
                self.note("producer disconnected", Who::Party(Party::Producer(i)), conn.0, u64::from(local));
                self.detail(|| cause.clone());
                let lost = std::mem::take(&mut self.producers[i].lost);
                let link = self.by_client.get(&(Party::Producer(i), conn)).map(|&l| &self.links[l]);
                let faulted = link.is_some_and(|l| l.faulted);
                if local && !faulted && !lost.is_empty() {
                    let when = if link.is_some_and(|l| l.up) { "after its handshake" } else { "during its handshake" };
                    let c = inv::violated(
                        name::PUBLISH_FAILS_ONLY_WITH_CAUSE,
                        format!("producer-{i}: {} publishes (txs {lost:?}) failed with \"connection lost\" on conn {} that no fault touched, closed locally {when} ({cause})", lost.len(), conn.0),
                    );
                    self.check(c)?;
                }
            }
            ProducerNote::Stopped => {
                self.note("producer stopped", Who::Party(Party::Producer(i)), 0, 0);
                self.producers[i].stopped = true;
                if self.producers[i].stopping_since.is_none() {
                    let c = inv::violated(name::STOP_COMPLETES, format!("producer-{i}: Stopped without a stop"));
                    self.check(c)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn consumer_note(&mut self, i: usize, note: ConsumerNote) -> Result<(), Violation> {
        let party = Party::Consumer(i);
        match note {
            ConsumerNote::Message(msg) | ConsumerNote::GaveUp(msg) => {
                let gave_up = msg.attempts > self.consumers[i].settings.max_attempts
                    && self.consumers[i].settings.max_attempts > 0;
                self.note("message", Who::Party(party), msg.conn.0, u64::from(msg.attempts));
                if !self.ledger.published.contains(&msg.body) || msg.attempts == 0 {
                    let c = inv::violated(
                        name::MESSAGE_INTEGRITY,
                        format!(
                            "consumer-{i}: a message never published ({:?}, attempts {})",
                            String::from_utf8_lossy(&msg.body[..msg.body.len().min(24)]),
                            msg.attempts
                        ),
                    );
                    self.check(c)?;
                }
                self.ledger.delivered.insert(msg.body.clone());
                if gave_up {
                    self.handled(&msg.body);
                } else {
                    self.handle_message(i, msg);
                }
            }
            ConsumerNote::Connected { conn, addr } => {
                self.note("consumer connected", Who::Party(party), conn.0, 0);
                match self.by_client.get(&(party, conn)) {
                    Some(&l) if self.links[l].addr == addr => self.links[l].up = true,
                    _ => {
                        let c = inv::violated(
                            name::CLIENT_PROTOCOL,
                            format!("consumer-{i}: Connected for unknown conn {} ({addr})", conn.0),
                        );
                        self.check(c)?;
                    }
                }
            }
            ConsumerNote::Closed { conn, addr, cause } => {
                let up = self.by_client.get(&(party, conn)).is_some_and(|&l| self.links[l].up);
                self.note("consumer closed", Who::Party(party), conn.0, u64::from(up));
                self.detail(|| format!("{addr}: {cause}"));
                if up {
                    self.consumers[i].rates.up_closed(self.now);
                } else {
                    self.consumers[i].rates.down_closed(self.now);
                }
            }
            ConsumerNote::LookupdFailed { addr, error } => {
                self.note("lookupd failed", Who::Party(party), 0, 0);
                self.detail(|| format!("{addr}: {error}"));
            }
            ConsumerNote::Stopped => {
                self.note("consumer stopped", Who::Party(party), 0, 0);
                self.consumers[i].stopped = true;
                if self.consumers[i].stopping_since.is_none() {
                    let c = inv::violated(name::STOP_COMPLETES, format!("consumer-{i}: Stopped without a stop"));
                    self.check(c)?;
                }
            }
        }
        Ok(())
    }
}
