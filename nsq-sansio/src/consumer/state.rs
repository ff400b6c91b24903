//! The consumer state machine: connections, RDY distribution, backoff, stop.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, trace, warn};

use super::{ConsumerError, ConsumerEvent, ConsumerStats, Response};
use crate::action::{Action, ConnId};
use crate::connection::{deadline, ConnectionState, Event};
use crate::error::{CommandError, ConnectionError};
use crate::timer::TimerTable;
use crate::{Channel, Config, MessageId, Topic};

/// Delay before redialling a direct nsqd the first time; doubles per failure up to
/// `lookupd_poll_interval`.
const RECONNECT_BASE: Duration = Duration::from_secs(1);
/// How long `stop` waits for in-flight messages before closing regardless.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Retry delay of a backoff resume that found no connection to test.
const RESUME_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
enum Timer {
    Redistribute,
    Backoff,
    Reconnect,
    Lookupd,
    Stop,
}

impl From<Timer> for usize {
    fn from(t: Timer) -> Self {
        t as Self
    }
}

#[derive(Debug)]
struct Conn {
    addr: String,
    state: ConnectionState,
    /// The socket is connected: bytes may be written.
    connected: bool,
    /// nsqd accepted the SUB.
    subscribed: bool,
    /// The RDY count this connection holds (last sent).
    rdy: u32,
    last_rdy_at: Instant,
}

/// A direct nsqd address to redial.
#[derive(Debug)]
struct Redial {
    addr: String,
    at: Instant,
    failures: u32,
}

/// See [`ConsumerState`](super::ConsumerState).
#[derive(Debug)]
pub(crate) struct Consumer {
    topic: Topic,
    channel: Channel,
    config: Arc<Config>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: u64,
    /// Addresses given to `connect_to_nsqd`: redialled while listed.
    direct: Vec<String>,
    redials: Vec<Redial>,
    pub(super) lookupd: super::Lookupd,
    max_in_flight: u32,
    total_rdy: u64,
    need_redistribute: bool,
    backoff_level: u32,
    /// Set while waiting out a backoff period (go-nsq's `inBackoffTimeout`).
    backoff_until: Option<Instant>,
    rng: Rng,
    timers: TimerTable<Timer, 5>,
    events: VecDeque<ConsumerEvent>,
    actions: VecDeque<Action>,
    /// Bytes a connection queued before it closed (its last FINs, CLS), still to be written.
    final_writes: Vec<(ConnId, Bytes)>,
    stats: ConsumerStats,
    stopping: bool,
    stopped: bool,
    now: Instant,
}

impl Consumer {
    pub(crate) fn new(topic: Topic, channel: Channel, config: Arc<Config>, now: Instant) -> Self {
        let mut timers = TimerTable::default();
        timers.set(Timer::Redistribute, deadline(now, config.rdy_redistribute_interval));
        let mut rng = Rng::new(config.rng_seed);
        let lookupd = super::Lookupd::new(&config, &mut rng, now);
        Self {
            topic,
            channel,
            max_in_flight: config.max_in_flight,
            conns: BTreeMap::new(),
            next_conn: 0,
            direct: Vec::new(),
            redials: Vec::new(),
            lookupd,
            total_rdy: 0,
            need_redistribute: false,
            backoff_level: 0,
            backoff_until: None,
            rng,
            timers,
            events: VecDeque::new(),
            actions: VecDeque::new(),
            final_writes: Vec::new(),
            stats: ConsumerStats::default(),
            stopping: false,
            stopped: false,
            now,
            config,
        }
    }

    // ---- sources -----------------------------------------------------------------------------

    pub(crate) fn connect_to_nsqd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.advance(now);
        self.check_running()?;
        check_addr(addr)?;
        if self.direct.iter().any(|a| a == addr) || self.conn_for(addr).is_some() {
            return Err(ConsumerError::AlreadyConnected(addr.to_owned()));
        }
        self.direct.push(addr.to_owned());
        self.open(addr);
        Ok(())
    }

    pub(crate) fn disconnect_from_nsqd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.advance(now);
        let Some(i) = self.direct.iter().position(|a| a == addr) else {
            return Err(ConsumerError::NotConnected(addr.to_owned()));
        };
        self.direct.remove(i);
        self.redials.retain(|r| r.addr != addr);
        if let Some(id) = self.conn_for(addr) {
            self.close_conn(id);
        }
        self.arm_reconnect_timer();
        Ok(())
    }

    /// Opens a connection to a lookupd-discovered nsqd unless one exists.
    pub(super) fn discovered(&mut self, addr: &str) {
        if self.stopping || self.conn_for(addr).is_some() {
            return;
        }
        info!(topic = %self.topic, channel = %self.channel, %addr, "lookupd listed a new nsqd");
        self.open(addr);
    }

    fn open(&mut self, addr: &str) {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        let host = host_of(addr);
        let mut state = ConnectionState::new(self.config.clone(), host, self.now);
        // Held by the connection until its handshake is done.
        if let Err(e) = state.subscribe(&self.topic, &self.channel) {
            warn!(%addr, %e, "cannot subscribe");
        }
        debug!(conn = %id, %addr, "connecting");
        self.conns.insert(
            id,
            Conn { addr: addr.to_owned(), state, connected: false, subscribed: false, rdy: 0, last_rdy_at: self.now },
        );
        self.actions.push_back(Action::Connect { conn: id, addr: addr.to_owned() });
    }

    // ---- inputs ------------------------------------------------------------------------------

    pub(crate) fn handle_connected(&mut self, id: ConnId, now: Instant) {
        self.advance(now);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.connected = true;
        }
    }

    pub(crate) fn handle_connect_failed(&mut self, id: ConnId, error: String, now: Instant) {
        self.advance(now);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.state.abort(now);
            // The Closed event carries the connect error instead of LocallyClosed.
            while conn.state.poll_event().is_some() {}
            self.on_closed(id, ConnectionError::Io(error));
        }
    }

    pub(crate) fn handle_input(&mut self, id: ConnId, now: Instant, data: BytesMut) {
        self.advance(now);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.state.handle_input(now, data);
            self.process(id);
        }
    }

    pub(crate) fn handle_eof(&mut self, id: ConnId, now: Instant) {
        self.advance(now);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.state.handle_eof(now);
            self.process(id);
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state.poll_timeout().is_some_and(|t| t <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            if let Some(conn) = self.conns.get_mut(&id) {
                conn.state.handle_timeout(now);
                self.process(id);
            }
        }
        if self.timers.expire(Timer::Backoff, now) {
            self.resume();
        }
        if self.timers.expire(Timer::Redistribute, now) {
            self.timers.set(Timer::Redistribute, deadline(now, self.config.rdy_redistribute_interval));
            self.redistribute();
        }
        if self.timers.expire(Timer::Reconnect, now) {
            self.redial_due();
        }
        if self.timers.expire(Timer::Lookupd, now) {
            self.poll_lookupd();
        }
        if self.timers.expire(Timer::Stop, now) {
            warn!(topic = %self.topic, channel = %self.channel, "stop timeout: closing with messages in flight");
            let ids: Vec<ConnId> = self.conns.keys().copied().collect();
            for id in ids {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.state.abort(now);
                    self.process(id);
                }
            }
        }
    }

    // ---- application -------------------------------------------------------------------------

    pub(crate) fn respond(
        &mut self,
        id: ConnId,
        msg: &MessageId,
        attempts: u16,
        response: Response,
        now: Instant,
    ) -> Result<(), ConsumerError> {
        self.advance(now);
        let conn = self.conns.get_mut(&id).ok_or(CommandError::NotInFlight(*msg))?;
        match response {
            Response::Finish => {
                conn.state.finish(msg)?;
                self.stats.messages_finished += 1;
                self.backoff_signal(Signal::Success);
            }
            Response::Requeue { delay, backoff } => {
                let delay = delay.unwrap_or_else(|| {
                    self.config
                        .default_requeue_delay
                        .saturating_mul(u32::from(attempts))
                        .min(self.config.max_requeue_delay)
                });
                conn.state.requeue(msg, delay)?;
                self.stats.messages_requeued += 1;
                self.backoff_signal(if backoff { Signal::Failure } else { Signal::Continue });
            }
            Response::Touch => conn.state.touch(msg, now)?,
        }
        self.process(id);
        Ok(())
    }

    pub(crate) fn change_max_in_flight(&mut self, max_in_flight: u32, now: Instant) {
        self.advance(now);
        self.max_in_flight = max_in_flight;
        if self.in_backoff() || self.backoff_until.is_some() || self.stopping {
            return;
        }
        // Lower every connection to its new share first, so raising one never has to wait
        // for room the others still hold.
        let share = self.per_conn_max_in_flight();
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for &id in &ids {
            if self.conns.get(&id).is_some_and(|c| c.rdy > share) {
                self.update_rdy(id, share);
            }
        }
        for id in ids {
            self.maybe_update_rdy(id);
        }
    }

    pub(crate) fn stop(&mut self, now: Instant) {
        self.advance(now);
        if self.stopping {
            return;
        }
        info!(topic = %self.topic, channel = %self.channel, "stopping");
        self.stopping = true;
        self.redials.clear();
        self.timers.stop(Timer::Reconnect);
        self.timers.stop(Timer::Lookupd);
        self.timers.stop(Timer::Backoff);
        self.timers.stop(Timer::Redistribute);
        self.timers.set(Timer::Stop, deadline(now, STOP_TIMEOUT));
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.close_conn(id);
        }
        self.maybe_stopped();
    }

    // ---- outputs -----------------------------------------------------------------------------

    pub(crate) fn poll_transmit(&mut self) -> Option<(ConnId, Bytes)> {
        if !self.final_writes.is_empty() {
            return Some(self.final_writes.remove(0));
        }
        self.conns.iter_mut().filter(|(_, c)| c.connected).find_map(|(&id, c)| c.state.poll_transmit().map(|b| (id, b)))
    }

    pub(crate) fn poll_transmit_for(&mut self, id: ConnId) -> Option<Bytes> {
        if let Some(i) = self.final_writes.iter().position(|(c, _)| *c == id) {
            return Some(self.final_writes.remove(i).1);
        }
        let conn = self.conns.get_mut(&id).filter(|c| c.connected)?;
        let bytes = conn.state.poll_transmit();
        // Encoding may fail inside a transport layer; that surfaces as events.
        self.process(id);
        bytes
    }

    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub(crate) fn poll_event(&mut self) -> Option<ConsumerEvent> {
        self.events.pop_front()
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(|c| c.state.poll_timeout()).min();
        match (self.timers.next(), conns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn stats(&self) -> ConsumerStats {
        ConsumerStats { connections: self.conns.values().filter(|c| c.subscribed).count(), ..self.stats }
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped
    }

    pub(crate) fn in_backoff(&self) -> bool {
        self.backoff_level > 0
    }

    pub(crate) fn total_rdy(&self) -> u64 {
        self.total_rdy
    }

    pub(crate) fn rdy_of(&self, id: ConnId) -> Option<u32> {
        self.conns.get(&id).map(|c| c.rdy)
    }

    // ---- internals ---------------------------------------------------------------------------

    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn check_running(&self) -> Result<(), ConsumerError> {
        if self.stopping {
            Err(ConsumerError::Stopped)
        } else {
            Ok(())
        }
    }

    pub(super) fn conn_for(&self, addr: &str) -> Option<ConnId> {
        self.conns.iter().find(|(_, c)| c.addr == addr).map(|(&id, _)| id)
    }

    pub(super) fn config(&self) -> &Config {
        &self.config
    }

    pub(super) fn topic_name(&self) -> &Topic {
        &self.topic
    }

    pub(super) fn now(&self) -> Instant {
        self.now
    }

    pub(super) fn push_action(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    pub(super) fn push_event(&mut self, event: ConsumerEvent) {
        self.events.push_back(event);
    }

    pub(super) fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    pub(super) fn set_lookupd_timer(&mut self, at: Option<Instant>) {
        match at {
            Some(at) if !self.stopping => self.timers.set(Timer::Lookupd, at),
            _ => self.timers.stop(Timer::Lookupd),
        }
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// Handles the events a connection produced.
    fn process(&mut self, id: ConnId) {
        loop {
            let Some(conn) = self.conns.get_mut(&id) else {
                return;
            };
            let Some(event) = conn.state.poll_event() else {
                return;
            };
            match event {
                Event::Subscribed => {
                    conn.subscribed = true;
                    let addr = conn.addr.clone();
                    info!(conn = %id, %addr, "subscribed");
                    self.redials.retain(|r| r.addr != addr);
                    self.events.push_back(ConsumerEvent::Connected { conn: id, addr });
                    // Lower the others' share first so the new one can get its own.
                    let ids: Vec<ConnId> = self.conns.keys().copied().filter(|&c| c != id).collect();
                    for other in ids {
                        self.maybe_update_rdy(other);
                    }
                    self.maybe_update_rdy(id);
                }
                Event::Message(message) => {
                    self.stats.messages_received += 1;
                    let max = self.config.max_attempts;
                    if max > 0 && message.attempts > max {
                        warn!(conn = %id, id = %message.id, attempts = message.attempts, "giving up on message");
                        if conn.state.finish(&message.id).is_ok() {
                            self.stats.messages_finished += 1;
                        }
                        self.events.push_back(ConsumerEvent::GaveUp { conn: id, message });
                    } else {
                        self.events.push_back(ConsumerEvent::Message { conn: id, message });
                    }
                }
                Event::Closed(error) => self.on_closed(id, error),
                Event::MessageTimedOut(msg) => {
                    debug!(conn = %id, %msg, "message timed out in flight")
                }
                Event::ServerError(e) => warn!(conn = %id, %e, "nsqd error"),
                Event::Ready(_) | Event::Authenticated(_) | Event::CloseWait | Event::Published { .. } => {}
            }
        }
    }

    /// Closes a connection gracefully. RDY 0 goes before CLS so nothing new arrives while CLS
    /// travels, and the count is given back at once: nsqd delivers nothing more on it while
    /// it drains, and the others may need the room.
    fn close_conn(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(&id) {
            if conn.subscribed && conn.rdy > 0 {
                let _ = conn.state.ready(0);
                self.total_rdy -= u64::from(conn.rdy);
                conn.rdy = 0;
            }
            conn.state.close(self.now);
            self.process(id);
        }
    }

    fn on_closed(&mut self, id: ConnId, error: ConnectionError) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        if conn.connected {
            // What the connection queued last (FINs, CLS) goes out before the socket closes.
            let mut last = BytesMut::new();
            while let Some(bytes) = conn.state.poll_transmit() {
                last.extend_from_slice(&bytes);
            }
            if !last.is_empty() {
                self.final_writes.push((id, last.freeze()));
            }
        }
        self.total_rdy -= u64::from(conn.rdy);
        info!(conn = %id, addr = %conn.addr, %error, left = self.conns.len(), "connection closed");
        self.actions.push_back(Action::Close { conn: id });
        let left = self.conns.len() as u64;
        if conn.rdy > 0 && (left == u64::from(self.max_in_flight) || self.in_backoff()) {
            self.need_redistribute = true;
        }
        let addr = conn.addr;
        self.events.push_back(ConsumerEvent::Disconnected { conn: id, addr: addr.clone(), error });
        if self.stopping {
            return self.maybe_stopped();
        }
        if self.direct.contains(&addr) {
            self.schedule_redial(addr);
        } else if self.lookupd.has_lookupds() {
            // Reconnect only if lookupd still lists it: ask now.
            self.poll_lookupd_now();
        }
    }

    fn schedule_redial(&mut self, addr: String) {
        let failures = self.redials.iter().find(|r| r.addr == addr).map_or(0, |r| r.failures);
        let delay = RECONNECT_BASE
            .saturating_mul(1u32 << failures.min(16))
            .min(self.config.lookupd_poll_interval.max(RECONNECT_BASE));
        info!(%addr, ?delay, "redialling nsqd");
        self.redials.retain(|r| r.addr != addr);
        self.redials.push(Redial { addr, at: deadline(self.now, delay), failures: failures + 1 });
        self.arm_reconnect_timer();
    }

    fn redial_due(&mut self) {
        let now = self.now;
        let (due, later): (Vec<Redial>, Vec<Redial>) = self.redials.drain(..).partition(|r| r.at <= now);
        self.redials = later;
        for redial in due {
            if self.direct.contains(&redial.addr) && self.conn_for(&redial.addr).is_none() {
                // Keep the failure count until the connection subscribes.
                self.redials.push(Redial { at: deadline(now, Duration::from_secs(86_400 * 365)), ..redial });
                if let Some(r) = self.redials.last() {
                    let addr = r.addr.clone();
                    self.open(&addr);
                }
            }
        }
        self.arm_reconnect_timer();
    }

    fn arm_reconnect_timer(&mut self) {
        match self.redials.iter().map(|r| r.at).min() {
            Some(at) => self.timers.set(Timer::Reconnect, at),
            None => self.timers.stop(Timer::Reconnect),
        }
    }

    fn maybe_stopped(&mut self) {
        if self.stopping && !self.stopped && self.conns.is_empty() {
            self.stopped = true;
            self.timers.clear();
            info!(topic = %self.topic, channel = %self.channel, "stopped");
            self.events.push_back(ConsumerEvent::Stopped);
        }
    }

    // ---- RDY ---------------------------------------------------------------------------------

    /// Each connection's share of `max_in_flight` (go-nsq's `perConnMaxInFlight`).
    fn per_conn_max_in_flight(&self) -> u32 {
        let conns = self.conns.values().filter(|c| c.subscribed).count().max(1) as u32;
        (self.max_in_flight / conns).max(1)
    }

    fn maybe_update_rdy(&mut self, id: ConnId) {
        if self.in_backoff() || self.backoff_until.is_some() || self.stopping {
            return;
        }
        let count = self.per_conn_max_in_flight();
        self.update_rdy(id, count);
    }

    /// Sets a connection's RDY, never letting the total exceed `max_in_flight`.
    fn update_rdy(&mut self, id: ConnId, count: u32) {
        let max_in_flight = u64::from(self.max_in_flight);
        let total = self.total_rdy;
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !conn.subscribed || !conn.state.is_ready() {
            return;
        }
        let wanted = count.min(conn.state.max_rdy_count());
        // What the other connections leave of max_in_flight; lowering always fits, raising is
        // truncated (unlike go-nsq, which refuses an over-limit update even when it lowers).
        let available = max_in_flight.saturating_sub(total - u64::from(conn.rdy));
        let count = if wanted <= conn.rdy && total <= max_in_flight {
            wanted
        } else {
            wanted.min(u32::try_from(available).unwrap_or(u32::MAX))
        };
        if count == 0 && wanted > 0 && conn.rdy == 0 {
            // No room now: the periodic redistribution gives this connection a turn.
            self.need_redistribute = true;
            return;
        }
        if count == conn.rdy && conn.state.rdy() == count {
            return;
        }
        match conn.state.ready(count) {
            Ok(sent) => {
                trace!(conn = %id, rdy = sent, "RDY");
                self.total_rdy = total - u64::from(conn.rdy) + u64::from(sent);
                conn.rdy = sent;
                conn.last_rdy_at = self.now;
            }
            Err(e) => debug!(conn = %id, %e, "RDY refused"),
        }
    }

    /// go-nsq's `redistributeRDY`: with fewer RDY than connections, rotate RDY 1 among them.
    fn redistribute(&mut self) {
        if self.backoff_until.is_some() || self.stopping {
            return;
        }
        let subscribed: Vec<ConnId> = self.conns.iter().filter(|(_, c)| c.subscribed).map(|(&id, _)| id).collect();
        if subscribed.is_empty() {
            return;
        }
        if subscribed.len() as u64 > u64::from(self.max_in_flight) || (self.in_backoff() && subscribed.len() > 1) {
            self.need_redistribute = true;
        }
        if !std::mem::take(&mut self.need_redistribute) {
            return;
        }
        let now = self.now;
        let (idle, low_rdy) = (self.config.low_rdy_idle_timeout, self.config.low_rdy_timeout);
        let mut possible = Vec::with_capacity(subscribed.len());
        for id in subscribed {
            let Some(conn) = self.conns.get(&id) else {
                continue;
            };
            if conn.rdy > 0 {
                let last_msg = conn.state.last_message_at().unwrap_or(conn.last_rdy_at);
                if now.saturating_duration_since(last_msg) > idle {
                    debug!(conn = %id, "idle connection gives up its RDY");
                    self.update_rdy(id, 0);
                } else if now.saturating_duration_since(conn.last_rdy_at) > low_rdy {
                    debug!(conn = %id, "RDY timeout, giving up RDY");
                    self.update_rdy(id, 0);
                }
            }
            possible.push(id);
        }
        let limit = if self.in_backoff() { 1 } else { u64::from(self.max_in_flight) };
        let mut available = limit.saturating_sub(self.total_rdy);
        while available > 0 && !possible.is_empty() {
            available -= 1;
            let i = self.rng.below(possible.len());
            let id = possible.swap_remove(i);
            self.update_rdy(id, 1);
        }
    }

    // ---- backoff -----------------------------------------------------------------------------

    fn backoff_signal(&mut self, signal: Signal) {
        // Responses arriving while a backoff period runs do not move the level.
        if self.backoff_until.is_some() || self.stopping {
            return;
        }
        let mut updated = false;
        match signal {
            Signal::Success if self.backoff_level > 0 => {
                self.backoff_level -= 1;
                updated = true;
            }
            Signal::Failure if self.backoff_duration(self.backoff_level + 1) <= self.config.max_backoff_duration => {
                self.backoff_level += 1;
                updated = true;
            }
            _ => {}
        }
        if self.backoff_level == 0 && updated {
            let count = self.per_conn_max_in_flight();
            info!(topic = %self.topic, channel = %self.channel, rdy = count, "leaving backoff");
            let ids: Vec<ConnId> = self.conns.keys().copied().collect();
            for id in ids {
                self.update_rdy(id, count);
            }
        } else if self.backoff_level > 0 {
            let duration = self.backoff_duration(self.backoff_level).min(self.config.max_backoff_duration);
            warn!(topic = %self.topic, channel = %self.channel, ?duration, level = self.backoff_level, "backing off");
            let ids: Vec<ConnId> = self.conns.keys().copied().collect();
            for id in ids {
                self.update_rdy(id, 0);
            }
            self.start_backoff_timer(duration);
        }
    }

    fn start_backoff_timer(&mut self, duration: Duration) {
        let until = deadline(self.now, duration);
        self.backoff_until = Some(until);
        self.timers.set(Timer::Backoff, until);
    }

    /// The backoff period is over: let one message through on one connection as a test.
    fn resume(&mut self) {
        self.backoff_until = None;
        if self.stopping {
            return;
        }
        let candidates: Vec<ConnId> =
            self.conns.iter().filter(|(_, c)| c.subscribed && c.state.is_ready()).map(|(&id, _)| id).collect();
        if candidates.is_empty() {
            warn!(topic = %self.topic, channel = %self.channel, "no connection to resume on");
            return self.start_backoff_timer(RESUME_RETRY);
        }
        let choice = candidates[self.rng.below(candidates.len())];
        debug!(conn = %choice, "backoff over, testing with RDY 1");
        self.update_rdy(choice, 1);
    }

    fn backoff_duration(&mut self, level: u32) -> Duration {
        super::backoff_duration(&self.config, level, &mut self.rng)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Success,
    Failure,
    Continue,
}

/// A small, seedable generator (SplitMix64) for jitter and random choices: deterministic under
/// test, no OS entropy in the core.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform index below `n` (`n` > 0; 0 otherwise).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// A uniform float in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn check_addr(addr: &str) -> Result<(), ConsumerError> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(ConsumerError::BadAddress { addr: addr.to_owned(), reason: "expected host:port".to_owned() }),
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
pub(crate) fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}
