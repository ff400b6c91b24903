//! Injecting faults and lifting them: nsqds down, crashed, stalled or failing handshakes,
//! connections reset, lookupds down, slow, hung, lying or garbled, clock jumps.

use super::*;

impl World {
    pub(super) fn fault(&mut self, kind: FaultKind) -> Result<(), Violation> {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        match kind {
            FaultKind::NsqdDown { nsqd, blackhole, duration } => {
                self.note("fault: nsqd down", Who::Nsqd(nsqd), 0, u64::from(blackhole));
                let node = &mut self.nsqds[nsqd];
                node.refuse_until = node.refuse_until.max(self.now + duration);
                node.blackhole = blackhole;
                self.after(duration, Ev::NsqdHeal(nsqd));
            }
            FaultKind::Crash { nsqd, downtime } => self.crash(nsqd, downtime)?,
            FaultKind::Stall { nsqd, whole, duration } => {
                let now = self.instant();
                if whole {
                    self.note("fault: nsqd stalls", Who::Nsqd(nsqd), 0, 0);
                    let node = &mut self.nsqds[nsqd];
                    node.stall_until = node.stall_until.max(self.now + duration);
                    node.model.set_stalled_all(true, now);
                    for &l in self.by_server.range(server_range(nsqd)).map(|(_, l)| l) {
                        self.links[l].faulted = true;
                    }
                    self.after(duration, Ev::NsqdHeal(nsqd));
                } else if let Some(l) = self.random_link(nsqd) {
                    self.note("fault: conn stalls", Who::Nsqd(nsqd), self.links[l].conn.0, 0);
                    self.links[l].faulted = true;
                    if let Some((server, _)) = self.links[l].server {
                        self.nsqds[nsqd].model.set_stalled(server, true, now);
                    }
                    self.after(duration, Ev::Unstall { link: l });
                }
            }
            FaultKind::Reset { nsqd } => {
                if let Some(l) = self.random_link(nsqd) {
                    self.note("fault: reset armed", Who::Nsqd(nsqd), self.links[l].conn.0, 0);
                    self.links[l].reset_armed = true;
                    let fallback = self.rng.millis(1, 10_000);
                    self.after(fallback, Ev::ResetFallback { link: l });
                }
            }
            FaultKind::Handshake { nsqd, fault, duration } => {
                self.note("fault: handshake", Who::Nsqd(nsqd), 0, 0);
                self.nsqds[nsqd].handshake = Some((fault, self.now + duration));
            }
            FaultKind::LookupdDown { lookupd, duration } => {
                self.note("fault: lookupd down", Who::Lookupd(lookupd), 0, 0);
                let l = &mut self.lookupds[lookupd];
                l.mode = LookupdMode::Down;
                // The process is gone: its registrations with it.
                l.model.forget_everything();
                l.until = l.until.max(self.now + duration);
                self.after(duration, Ev::LookupdHeal(lookupd));
                // Its open connections die with it.
                let open: Vec<usize> = (0..self.links.len())
                    .filter(|&i| {
                        let link = &self.links[i];
                        link.peer == Peer::Lookupd(lookupd) && link.accepted && link.server_open
                    })
                    .collect();
                for l in open {
                    self.reset(l)?;
                }
            }
            FaultKind::LookupdSlow { lookupd, delay, duration } => {
                self.lookupd_mode(lookupd, LookupdMode::Slow(delay), duration)
            }
            FaultKind::LookupdHang { lookupd, duration } => self.lookupd_mode(lookupd, LookupdMode::Hang, duration),
            FaultKind::LookupdLying { lookupd, duration } => {
                self.note("fault: lookupd lies", Who::Lookupd(lookupd), 0, 0);
                let mut ghosts = vec![Producer::for_addr("ghost-0:4150", 1), Producer::for_addr("ghost-1:4150", 2)];
                ghosts.extend(
                    self.nsqds
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| !n.up)
                        .map(|(i, n)| Producer::for_addr(&n.addr, 40_000 + i as u16)),
                );
                let l = &mut self.lookupds[lookupd];
                l.model.set_lying(ghosts);
                l.lying_until = l.lying_until.max(self.now + duration);
                self.after(duration, Ev::LookupdHeal(lookupd));
            }
            FaultKind::LookupdGarbage { lookupd, garbage, duration } => {
                self.note("fault: lookupd garbage", Who::Lookupd(lookupd), 0, 0);
                let l = &mut self.lookupds[lookupd];
                l.model.set_garbage(Some(garbage));
                l.garbage_until = l.garbage_until.max(self.now + duration);
                self.after(duration, Ev::LookupdHeal(lookupd));
            }
            FaultKind::ClockJump { by } => {
                self.note("fault: clock jump", Who::World, 0, by.as_secs());
                self.now += by;
                self.jumped += by;
                // Every deadline of every open connection may pass at once.
                for link in self.by_server.values().chain(self.by_client.values()) {
                    self.links[*link].faulted = true;
                }
            }
        }
        Ok(())
    }

    pub(super) fn lookupd_mode(&mut self, lookupd: usize, mode: LookupdMode, duration: Duration) {
        self.note("fault: lookupd slow", Who::Lookupd(lookupd), 0, 0);
        let l = &mut self.lookupds[lookupd];
        if l.mode != LookupdMode::Down {
            l.mode = mode;
        }
        l.until = l.until.max(self.now + duration);
        self.after(duration, Ev::LookupdHeal(lookupd));
    }

    /// A link to `nsqd` that is up on both sides, at random.
    pub(super) fn random_link(&mut self, nsqd: usize) -> Option<usize> {
        let mut candidates: Vec<usize> = self.by_server.range(server_range(nsqd)).map(|(_, &l)| l).collect();
        candidates.retain(|&l| self.links[l].client_open);
        (!candidates.is_empty()).then(|| candidates[self.rng.index(candidates.len())])
    }

    pub(super) fn crash(&mut self, n: usize, downtime: Duration) -> Result<(), Violation> {
        if !self.nsqds[n].up {
            return Ok(());
        }
        self.note("fault: crash", Who::Nsqd(n), 0, 0);
        let node = &mut self.nsqds[n];
        node.up = false;
        node.incarnation += 1;
        node.timer = None;
        for body in node.model.crash() {
            let body = Bytes::copy_from_slice(&body);
            self.ledger.unhandled.remove(&body);
            self.ledger.lost.insert(body);
        }
        let addr = node.addr.clone();
        for l in &mut self.lookupds {
            l.model.unregister_node(&addr);
        }
        // The kernel resets every connection: what is already on the wire still arrives.
        let links: Vec<usize> = self.by_server.range(server_range(n)).map(|(_, &l)| l).collect();
        for l in links {
            let link = &mut self.links[l];
            link.faulted = true;
            link.server_open = false;
            link.to_server.cut(0);
            link.to_server.shut = true;
            let latency = link.latency;
            if let Some((seq, at)) = link.to_client.shutdown(self.now, latency, &mut self.rng, &mut self.chunk_seq) {
                self.at(at, Ev::Arrive { link: l, dir: Dir::ToClient, seq });
            }
        }
        self.by_server.retain(|(node, _), _| *node != n);
        self.after(downtime, Ev::Restart(n));
        Ok(())
    }

    pub(super) fn restart(&mut self, n: usize) -> Result<(), Violation> {
        if self.nsqds[n].up {
            return Ok(());
        }
        self.note("restart", Who::Nsqd(n), 0, 0);
        let now = self.instant();
        let node = &mut self.nsqds[n];
        node.up = true;
        node.model.restart(now);
        // A stall injected while it was down ends with its own deadline, as if it were up.
        let (stalled, until) = (node.stall_until > self.now, node.stall_until);
        node.model.set_stalled_all(stalled, now);
        let (addr, regs) = (node.addr.clone(), node.model.registrations());
        if stalled {
            self.at(until, Ev::NsqdHeal(n));
        }
        for l in self.lookupds.iter_mut().filter(|l| l.mode != LookupdMode::Down) {
            l.model.register_node(Producer::for_addr(&addr, 40_000 + n as u16));
            for reg in &regs {
                l.model.register(&addr, &reg.topic, reg.channel.as_deref());
            }
        }
        self.drain_nsqd(n)
    }

    /// An nsqd fault's time may be up: lifts whatever has expired.
    pub(super) fn nsqd_heal(&mut self, n: usize) -> Result<(), Violation> {
        let now = self.instant();
        let node = &mut self.nsqds[n];
        if node.stall_until <= self.now && node.up {
            node.model.set_stalled_all(false, now);
        }
        self.drain_nsqd(n)
    }

    pub(super) fn unstall(&mut self, l: usize) -> Result<(), Violation> {
        let now = self.instant();
        let link = &self.links[l];
        let n = link.nsqd;
        if let (Some((server, incarnation)), true) = (link.server, link.server_open) {
            if incarnation == self.nsqds[n].incarnation && self.nsqds[n].up && self.nsqds[n].stall_until <= self.now {
                self.nsqds[n].model.set_stalled(server, false, now);
                return self.drain_nsqd(n);
            }
        }
        Ok(())
    }

    pub(super) fn lookupd_heal(&mut self, i: usize) {
        let now = self.now;
        let l = &mut self.lookupds[i];
        if l.until <= now && l.mode != LookupdMode::Up {
            let was_down = l.mode == LookupdMode::Down;
            l.mode = LookupdMode::Up;
            if was_down {
                // The nsqds find it again at their next lookupd tick.
                self.after(inv::NSQD_LOOKUPD_RECONNECT, Ev::Reregister(i));
            }
        }
        let l = &mut self.lookupds[i];
        if l.lying_until <= now {
            l.model.set_lying(Vec::new());
        }
        if l.garbage_until <= now {
            l.model.set_garbage(None);
        }
    }

    pub(super) fn reregister(&mut self, i: usize) {
        if self.lookupds[i].mode == LookupdMode::Down {
            return;
        }
        for (n, node) in self.nsqds.iter().enumerate().filter(|(_, node)| node.up) {
            let l = &mut self.lookupds[i];
            l.model.register_node(Producer::for_addr(&node.addr, 40_000 + n as u16));
            for reg in node.model.registrations() {
                l.model.register(&node.addr, &reg.topic, reg.channel.as_deref());
            }
        }
    }
}
