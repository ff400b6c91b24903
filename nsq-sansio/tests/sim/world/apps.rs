//! The clients and their applications: lifetimes, publishers, handlers, and what the clients
//! tell them (each step drained until quiet, with the per-client invariants after it).

use super::*;

impl World {
    pub(super) fn start_producer(&mut self, i: usize) -> Result<(), Violation> {
        if self.phase != Phase::Faults {
            self.producers[i].stopped = true;
            return Ok(());
        }
        let now = self.instant();
        let p = &mut self.producers[i];
        let mut client = match &p.target {
            Target::One(_) => SimProducer::new(&p.addrs[0], &p.settings, now),
            Target::Pool { settings, .. } => SimProducer::pool(&p.addrs, settings, &p.settings, now),
        };
        for addr in &p.lookupds {
            client
                .connect_to_lookupd(addr, now)
                .map_err(|e| Violation { invariant: name::CLIENT_PROTOCOL, detail: e })?;
        }
        p.client = Some(client);
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
            c.direct_live.insert(addr.clone());
        }
        for addr in &c.lookupds {
            client
                .connect_to_lookupd(addr, now)
                .map_err(|e| Violation { invariant: name::CLIENT_PROTOCOL, detail: e })?;
        }
        self.drain(Party::Consumer(i))
    }

    /// The application's own retry of a direct nsqd whose `connect_to_nsqd` failed.
    pub(super) fn reconnect(&mut self, i: usize, addr: String) -> Result<(), Violation> {
        let now = self.instant();
        self.note("app reconnects", Who::Party(Party::Consumer(i)), 0, 0);
        let c = &mut self.consumers[i];
        let Some(client) = c.client.as_mut() else { return Ok(()) };
        if c.stopping_since.is_some() || c.direct_live.contains(&addr) {
            return Ok(());
        }
        // Refused when a lookupd-found connection to it exists: it is reached anyway.
        if client.connect_to_nsqd(&addr, now).is_ok() {
            c.direct_live.insert(addr);
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

    pub(super) fn change_max_in_flight(&mut self, i: usize, to: u32) -> Result<(), Violation> {
        let now = self.instant();
        let c = &mut self.consumers[i];
        let Some(client) = c.client.as_mut() else { return Ok(()) };
        if c.stopping_since.is_some() {
            return Ok(());
        }
        let from = c.settings.max_in_flight;
        if to < from {
            c.lowering_from = Some(c.lowering_from.unwrap_or(0).max(from));
        }
        c.settings.max_in_flight = to;
        client.change_max_in_flight(to, now);
        self.note("max_in_flight", Who::Party(Party::Consumer(i)), 0, u64::from(to));
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
        match self.publish_late(i, tx) {
            // Not late yet: its attempts under way may take until the next check.
            Ok(Some(next)) => {
                let jumped = self.jumped;
                self.at(next, Ev::PublishDeadline { producer: i, tx, due: next, jumped });
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(c) => self.check(Err(c)),
        }
    }

    /// Whether publish `tx` is past its bound now: a violation if so; else, for a pool, when
    /// to look again (its attempts under way may still take that long).
    pub(super) fn publish_late(&self, i: usize, tx: u64) -> Result<Option<Duration>, Violation> {
        let p = &self.producers[i];
        let Some(t) = p.txs.get(&tx) else { return Ok(None) };
        let s = &p.settings;
        let elapsed =
            self.now.saturating_sub(t.issued) - (self.jumped - t.jumped).min(self.now.saturating_sub(t.issued));
        let Target::Pool { settings: pool, .. } = &p.target else {
            let bound = inv::publish_bound(s.dial_timeout, s.read_timeout);
            if elapsed < bound {
                return Ok(Some(self.now + (bound - elapsed)));
            }
            return Err(Violation {
                invariant: name::PUBLISH_RESOLVES_IN_TIME,
                detail: format!(
                    "producer-{i}: tx {tx} unresolved {bound:?} after it was issued (auto_batch {})",
                    s.auto_batch
                ),
            });
        };
        let cap = inv::pool_attempt_cap(s.read_timeout);
        let mut took = Duration::ZERO;
        let mut open = false;
        for &(l, start) in &t.attempts {
            let end = self.links[l].closed_at.unwrap_or(self.now);
            open |= self.links[l].closed_at.is_none();
            took += end.saturating_sub(start).min(cap);
        }
        // A publish queued on a connection with MAX_UNANSWERED_WRITES writes unanswered waits
        // there unwritten: each such stretch counts as an attempt on that connection.
        let mut attempts = t.attempts.len();
        let party = Party::Producer(i);
        for link in self.links.iter().filter(|link| link.party == party) {
            let held = link.full_within(t.issued, self.now);
            if held > Duration::ZERO || link.is_full() {
                attempts += 1;
                took += held.min(cap);
                open |= link.is_full();
            }
        }
        let bound = inv::pool_publish_bound(pool.wait, attempts, took);
        if elapsed <= bound {
            // Attempts under way may count up to their cap. The next look is later than now
            // even at the bound itself.
            let more = if open { cap } else { Duration::from_nanos(1) };
            return Ok(Some(self.now + (bound - elapsed) + more));
        }
        Err(Violation {
            invariant: name::PUBLISH_RESOLVES_IN_TIME,
            detail: format!(
                "producer-{i} (pool, {:?}, wait {:?}): tx {tx} unresolved {elapsed:?} after it was issued; {attempts} attempts took {took:?} (bound {bound:?})",
                pool.strategy,
                pool.wait,
            ),
        })
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
                if matches!(p.target, Target::Pool { .. }) {
                    p.by_body.insert(bodies[0].clone(), tx);
                }
                let entry = Tx { bodies, issued: self.now, jumped: self.jumped, attempts: Vec::new() };
                let first = p.txs.insert(tx, entry).is_none();
                if !first {
                    let c =
                        inv::violated(name::PUBLISH_RESOLVES_ONCE, format!("producer-{i}: tx {tx} handed out twice"));
                    self.check(c)?;
                }
                self.note("publish", Who::Party(Party::Producer(i)), 0, tx);
                let s = &self.producers[i].settings;
                let bound = match &self.producers[i].target {
                    Target::One(_) => inv::publish_bound(s.dial_timeout, s.read_timeout),
                    Target::Pool { settings, .. } => inv::pool_publish_bound(settings.wait, 0, Duration::ZERO),
                };
                let (due, jumped) = (self.now + bound, self.jumped);
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
        self.failover = None;
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
                    .filter(|link| link.writable() && !link.is_lookupd())
                    .map(|link| inv::ConnRdy {
                        conn: link.conn.0,
                        written: link.rdy,
                        held: client.and_then(|c| c.rdy(link.conn)),
                        writing: link.writing,
                    })
                    .collect();
                // After a lowering, the nsqds may hold what the old value let them have until
                // the lowers are written; from the moment the total fits the new value, it must
                // stay within it.
                let node = &mut self.consumers[i];
                let granted: u64 = conns.iter().map(|c| c.written).sum();
                if granted <= u64::from(node.settings.max_in_flight) {
                    node.lowering_from = None;
                }
                let max = node.lowering_from.unwrap_or(node.settings.max_in_flight);
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
            Io::Connect { conn, addr, timeout } => {
                if stopped {
                    let c = inv::violated(
                        name::STOPPED_IS_QUIET,
                        format!("{party} asks to dial {addr} after (or with) its Stopped"),
                    );
                    self.check(c)?;
                }
                self.dial(party, conn, addr, timeout)
            }
            Io::Close { conn } => {
                // A lookupd query's close followed at once by another query is the next attempt
                // of the same poll round (a failed query is retried on the next lookupd), if
                // the round has attempts left.
                self.failover = None;
                if let Some(&l) = self.by_client.get(&(party, conn)) {
                    if let Some(round) = self.links[l].round {
                        let lookupds = match party {
                            Party::Producer(i) => self.producers[i].lookupds.len(),
                            Party::Consumer(i) => self.consumers[i].lookupds.len(),
                        };
                        if round.attempt + 1 < inv::LOOKUPD_ATTEMPTS.min(lookupds) {
                            self.failover = Some((party, round));
                        }
                    }
                }
                self.client_close(party, conn)
            }
        }
    }

    pub(super) fn producer_note(&mut self, i: usize, note: ProducerNote) -> Result<(), Violation> {
        let party = Party::Producer(i);
        let now = self.now;
        match note {
            ProducerNote::Published { tx, outcome } => {
                self.note("published", Who::Party(party), 0, tx);
                let late = self.publish_late(i, tx);
                let Some(t) = self.producers[i].txs.remove(&tx) else {
                    let c = inv::violated(
                        name::PUBLISH_RESOLVES_ONCE,
                        format!("producer-{i}: tx {tx} resolved twice or never issued"),
                    );
                    return self.check(c);
                };
                self.producers[i].by_body.remove(&t.bodies[0]);
                if let Some(&(l, written)) = t.attempts.last() {
                    self.links[l].publish_resolved(written, now);
                }
                if let Err(v) = late {
                    self.check(Err(v))?;
                }
                match outcome {
                    PublishOutcome::Acked => {
                        // The nsqds it went to: a pool's attempts as seen on the wire.
                        let went_to: Vec<usize> = match &self.producers[i].target {
                            Target::One(n) => vec![*n],
                            Target::Pool { .. } => t.attempts.iter().map(|&(l, _)| self.links[l].nsqd).collect(),
                        };
                        for body in t.bodies {
                            let holder = went_to
                                .iter()
                                .copied()
                                .find(|&n| self.nsqds.get(n).is_some_and(|n| n.model.holds(&body)));
                            let delivered = self.ledger.delivered.contains(&body);
                            let lost = self.ledger.lost.contains(&body);
                            let c = inv::acked_publish_held(&body, holder.is_some(), delivered, lost);
                            self.check(c)?;
                            if !lost && !self.ledger.handled.contains(&body) {
                                self.ledger.unhandled.insert(body.clone());
                            }
                            self.ledger.acked.insert(body, holder.unwrap_or(usize::MAX));
                        }
                    }
                    PublishOutcome::Failed(attempts) => self.publish_failed(i, tx, &attempts)?,
                }
            }
            ProducerNote::Connected { conn, addr } => {
                self.note("producer connected", Who::Party(party), conn.0, 0);
                if let Some(&l) = self.by_client.get(&(party, conn)) {
                    self.links[l].up = true;
                    self.links[l].up_at = Some(now);
                }
                self.producers[i].redials.up(&addr, now);
            }
            ProducerNote::ConnectFailed { conn, addr, cause, retry_at } => {
                self.note("producer connect failed", Who::Party(party), conn.0, u64::from(cause.local));
                let p = &mut self.producers[i];
                let mut d = p.redials.closed(&addr, now, Duration::ZERO, false);
                let retry_in = retry_at.saturating_duration_since(self.base).saturating_sub(now);
                if !p.addrs.contains(&addr) && inv::retry_in_schedule(format_args!(""), &addr, retry_in, d).is_err() {
                    // An nsqd lookupd listed may have left the pool and come back with no history.
                    d = p.redials.restart(&addr, now, Duration::ZERO);
                }
                p.redials.retry_at(&addr, now + retry_in);
                self.detail(|| format!("{addr}: {}; retry in {retry_in:?} (nominal {d:?})", cause.text));
                self.check(inv::retry_in_schedule(format_args!("producer-{i}"), &addr, retry_in, d))?;
                self.lost_on(i, conn, cause.local)?;
            }
            ProducerNote::Disconnected { conn, addr, cause } => {
                self.note("producer disconnected", Who::Party(party), conn.0, u64::from(cause.local));
                self.detail(|| format!("{addr}: {}", cause.text));
                // A pool does not count a close it made, nor nsqd's close after refusing a
                // publish (the command's fault), against the nsqd; the stable time decides
                // the rest.
                let healthy = cause.local || cause.refused_publish;
                self.producers[i].redials.closed(&addr, now, Duration::ZERO, healthy);
                self.lost_on(i, conn, cause.local)?;
            }
            ProducerNote::LookupdFailed { addr, error } => {
                self.note("lookupd failed", Who::Party(party), 0, 0);
                self.detail(|| format!("{addr}: {error}"));
            }
            ProducerNote::Other => {}
            ProducerNote::Stopped => {
                self.note("producer stopped", Who::Party(party), 0, 0);
                self.producers[i].stopped = true;
                if self.producers[i].stopping_since.is_none() {
                    let c = inv::violated(name::STOP_COMPLETES, format!("producer-{i}: Stopped without a stop"));
                    self.check(c)?;
                }
            }
        }
        Ok(())
    }

    /// A publish failed: with a cause, never because the client closed a connection no fault
    /// touched (a stop lets what was sent finish).
    fn publish_failed(&mut self, i: usize, tx: u64, attempts: &[(String, PublishFailure)]) -> Result<(), Violation> {
        let party = Party::Producer(i);
        self.detail(|| format!("tx {tx}: {attempts:?}"));
        if attempts.is_empty() {
            let c = inv::violated(
                name::PUBLISH_FAILS_ONLY_WITH_CAUSE,
                format!("producer-{i}: tx {tx} failed with no cause"),
            );
            return self.check(c);
        }
        if matches!(self.producers[i].target, Target::One(_)) {
            // Judged when its connection's close says whether a fault touched it.
            if attempts.iter().any(|(_, f)| f.local_close()) {
                self.producers[i].lost.push(tx);
            }
            return Ok(());
        }
        let stopping = self.producers[i].stopping_since.is_some();
        for (addr, failure) in attempts {
            let blamed = match failure {
                // Sent, and lost to a close of the pool's own: only a fault excuses it.
                PublishFailure::Lost(cause) if cause.local => {
                    let faulted = self.links.iter().any(|l| l.party == party && &l.addr == addr && l.faulted);
                    (!faulted).then_some("lost with a connection the pool closed and no fault touched")
                }
                // Waiting for a connected nsqd when the pool stopped: documented.
                PublishFailure::NotSent(cause) if cause.local && !stopping => {
                    Some("not sent because the pool closed a connection, while it was not stopping")
                }
                _ => None,
            };
            if let Some(why) = blamed {
                let c = inv::violated(
                    name::PUBLISH_FAILS_ONLY_WITH_CAUSE,
                    format!("producer-{i} (pool): tx {tx} failed on {addr:?}: {why} ({failure:?})"),
                );
                self.check(c)?;
            }
        }
        Ok(())
    }

    /// A single-nsqd producer's connection closed: publishes that failed with a close of its
    /// own must have had a fault on that connection.
    fn lost_on(&mut self, i: usize, conn: ConnId, local: bool) -> Result<(), Violation> {
        let lost = std::mem::take(&mut self.producers[i].lost);
        let link = self.by_client.get(&(Party::Producer(i), conn)).map(|&l| &self.links[l]);
        let faulted = link.is_some_and(|l| l.faulted);
        if local && !faulted && !lost.is_empty() {
            let when = if link.is_some_and(|l| l.up) { "after its handshake" } else { "during its handshake" };
            let c = inv::violated(
                name::PUBLISH_FAILS_ONLY_WITH_CAUSE,
                format!(
                    "producer-{i}: {} publishes (txs {lost:?}) failed with a local close on conn {} that no fault touched, closed {when}",
                    lost.len(),
                    conn.0
                ),
            );
            self.check(c)?;
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
                    Some(&l) if self.links[l].addr == addr => {
                        self.links[l].up = true;
                        self.links[l].up_at = Some(self.now);
                    }
                    _ => {
                        let c = inv::violated(
                            name::CLIENT_PROTOCOL,
                            format!("consumer-{i}: Connected for unknown conn {} ({addr})", conn.0),
                        );
                        self.check(c)?;
                    }
                }
                self.consumers[i].redials.up(&addr, self.now);
            }
            ConsumerNote::ConnectFailed { conn, addr, cause, retry_at } => {
                self.note("consumer connect failed", Who::Party(party), conn.0, 0);
                self.detail(|| format!("{addr}: {}", cause.text));
                let now = self.now;
                let c = &mut self.consumers[i];
                if !c.direct_live.contains(&addr) {
                    c.listed.closed(&addr);
                } else if let Some(retry_at) = retry_at {
                    let d = c.redials.closed(&addr, now, c.settings.lookupd_poll_interval, false);
                    let retry_in = retry_at.saturating_duration_since(self.base).saturating_sub(now);
                    c.redials.retry_at(&addr, now + retry_in);
                    self.check(inv::retry_in_schedule(format_args!("consumer-{i}"), &addr, retry_in, d))?;
                } else {
                    // Not retried (a direct address whose first attempt failed): forgotten by
                    // the client; the application tries again later.
                    c.direct_live.remove(&addr);
                    c.redials.forget(&addr);
                    if c.stopping_since.is_none() {
                        let delay = self.rng.millis(APP_RECONNECT.0, APP_RECONNECT.1);
                        self.after(delay, Ev::Reconnect { consumer: i, addr });
                    }
                }
            }
            ConsumerNote::Closed { conn, addr, cause } => {
                self.note("consumer closed", Who::Party(party), conn.0, 0);
                self.detail(|| format!("{addr}: {}", cause.text));
                let now = self.now;
                let c = &mut self.consumers[i];
                if c.direct_live.contains(&addr) {
                    c.redials.closed(&addr, now, c.settings.lookupd_poll_interval, false);
                } else {
                    c.listed.closed(&addr);
                    if !cause.local && !c.lookupds.is_empty() {
                        c.lookupd.recheck_cause(now);
                    }
                }
            }
            ConsumerNote::LookupdFailed { addr, error } => {
                self.note("lookupd failed", Who::Party(party), 0, 0);
                self.detail(|| format!("{addr}: {error}"));
            }
            ConsumerNote::Authenticated => {}
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
