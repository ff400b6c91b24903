//! The consumer state machine: connections, RDY distribution, backoff, stop.

mod sources;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, trace, warn};

use super::{ConsumerError, ConsumerEvent, ConsumerStats, Response};
use crate::action::{Action, ConnId};
use crate::connection::{deadline, ConnectionState, Event};
use crate::error::{CommandError, ConnectionError, SocketError};
use crate::rng::Rng;
use crate::timer::TimerTable;
use crate::{Channel, Config, MessageId, Topic};

pub(crate) use sources::Lookupd;
/// How long `stop` waits for in-flight messages before closing regardless.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Retry delay of a backoff resume that found no connection to test.
const RESUME_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
enum Timer {
    Redistribute,
    Backoff,
    Reconnect,
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
    /// When nsqd accepted the SUB.
    subscribed_at: Option<Instant>,
    /// The RDY count this connection is meant to hold.
    rdy: u32,
    /// The most nsqd may think it holds: the last RDY written out, or a raise queued and not
    /// written yet. The sum over connections never exceeds `max_in_flight`.
    rdy_out: u32,
    /// A raise waiting for lowers on other connections to be written first.
    rdy_pending: Option<u32>,
    last_rdy_at: Instant,
    /// When it last got RDY above 0 (`None`: never): redistribution serves the longest
    /// waiting first.
    rdy_granted_at: Option<Instant>,
}

/// An address given to `connect_to_nsqd`.
#[derive(Debug)]
struct Direct {
    addr: String,
    /// A connection to it subscribed once: later failures are redialled, not reported as the
    /// failure of `connect_to_nsqd`.
    confirmed: bool,
}

/// The dial history of one nsqd address.
#[derive(Debug, Default)]
struct DialState {
    /// Attempts in a row that failed or did not stay up for `STABLE_AFTER`.
    failures: u32,
    /// When a direct address is dialled again.
    retry_at: Option<Instant>,
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
    direct: Vec<Direct>,
    /// What happened at each address lately: how soon it may be dialled again.
    dials: BTreeMap<String, DialState>,
    /// Lookupd-found addresses the application disconnected from: not dialled again.
    excluded: BTreeSet<String>,
    lookupd: Lookupd,
    max_in_flight: u32,
    total_rdy: u64,
    need_redistribute: bool,
    backoff_level: u32,
    /// Set while waiting out a backoff period (go-nsq's `inBackoffTimeout`).
    backoff_until: Option<Instant>,
    rng: Rng,
    timers: TimerTable<Timer, 4>,
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
        Self {
            lookupd: Lookupd::new(&topic),
            topic,
            channel,
            max_in_flight: config.max_in_flight,
            conns: BTreeMap::new(),
            next_conn: 0,
            direct: Vec::new(),
            dials: BTreeMap::new(),
            excluded: BTreeSet::new(),
            total_rdy: 0,
            need_redistribute: false,
            backoff_level: 0,
            backoff_until: None,
            rng: Rng::from_seed(config.rng_seed),
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

    // ---- connections -------------------------------------------------------------------------

    /// A new connection id: nsqd connections and lookupd queries share one space.
    fn new_conn_id(&mut self) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        id
    }

    fn open(&mut self, addr: &str) {
        let id = self.new_conn_id();
        let host = host_of(addr);
        let mut state = ConnectionState::new(self.config.clone(), host, self.now);
        // Held by the connection until its handshake is done.
        if let Err(e) = state.subscribe(&self.topic, &self.channel) {
            warn!(%addr, %e, "cannot subscribe");
        }
        info!(conn = %id, %addr, "connecting to nsqd");
        self.conns.insert(
            id,
            Conn {
                addr: addr.to_owned(),
                state,
                connected: false,
                subscribed: false,
                subscribed_at: None,
                rdy: 0,
                rdy_out: 0,
                rdy_pending: None,
                last_rdy_at: self.now,
                rdy_granted_at: None,
            },
        );
        self.actions.push_back(Action::dial_nsqd(id, addr, &self.config));
    }

    // ---- inputs ------------------------------------------------------------------------------

    pub(crate) fn handle_connected(&mut self, id: ConnId, now: Instant) {
        self.advance(now);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.connected = true;
        } else {
            self.query_connected(id);
        }
    }

    pub(crate) fn handle_connect_failed(&mut self, id: ConnId, error: SocketError, now: Instant) {
        self.advance(now);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.state.abort(now);
            // The Closed event carries the connect error instead of LocallyClosed.
            while conn.state.poll_event().is_some() {}
            let addr = conn.addr.clone();
            self.on_closed(id, ConnectionError::Dial { addr, error });
        } else {
            self.query_io_error(id, error);
        }
    }

    pub(crate) fn handle_io_error(&mut self, id: ConnId, error: SocketError, now: Instant) {
        self.advance(now);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.state.handle_io_error(now, error);
            self.process(id);
        } else {
            self.query_io_error(id, error);
        }
    }

    pub(crate) fn handle_input(&mut self, id: ConnId, now: Instant, data: BytesMut) {
        self.advance(now);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.state.handle_input(now, data);
            self.process(id);
        } else {
            self.query_input(id, data);
        }
    }

    pub(crate) fn handle_eof(&mut self, id: ConnId, now: Instant) {
        self.advance(now);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.state.handle_eof(now);
            self.process(id);
        } else {
            self.query_eof(id);
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
        if self.lookupd.next_timeout().is_some_and(|at| at <= now) {
            self.lookupd_timeout();
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
        // Its connection is gone: nsqd requeued the message already.
        let conn = self.conns.get_mut(&id).ok_or(CommandError::Closed)?;
        let signal = match response {
            Response::Finish => {
                conn.state.finish(msg)?;
                self.stats.messages_finished += 1;
                Some(Signal::Success)
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
                Some(if backoff { Signal::Failure } else { Signal::Continue })
            }
            Response::Touch => {
                conn.state.touch(msg, now)?;
                None
            }
        };
        // An answer seldom makes an event (the last one of a closing connection does): the
        // connection is looked up again only then, or when backoff moved RDY.
        let events = conn.state.has_events();
        let moved = signal.is_some_and(|signal| self.backoff_signal(signal));
        if events || moved {
            self.process(id);
        }
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
        self.timers.stop(Timer::Reconnect);
        self.timers.stop(Timer::Backoff);
        self.timers.stop(Timer::Redistribute);
        self.timers.set(Timer::Stop, deadline(now, STOP_TIMEOUT));
        self.close_queries();
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
        let nsqd = self
            .conns
            .iter_mut()
            .filter(|(_, c)| c.connected)
            .find_map(|(&id, c)| c.state.poll_transmit().map(|b| (id, b)));
        match nsqd {
            Some((id, bytes)) => {
                self.written_out(id);
                Some((id, bytes))
            }
            None => self.any_query_transmit(),
        }
    }

    pub(crate) fn poll_transmit_for(&mut self, id: ConnId) -> Option<Bytes> {
        if let Some(i) = self.final_writes.iter().position(|(c, _)| *c == id) {
            return Some(self.final_writes.remove(i).1);
        }
        if self.lookupd.is_query(id) {
            return self.query_transmit(id);
        }
        let conn = self.conns.get_mut(&id).filter(|c| c.connected)?;
        let bytes = conn.state.poll_transmit();
        if bytes.is_some() {
            self.written_out(id);
        }
        // Encoding may fail inside a transport layer; that surfaces as events.
        self.process(id);
        bytes
    }

    /// `id`'s queued commands were handed to its socket: the RDY it wrote last is what nsqd
    /// holds now, and raises waiting for that lower may follow.
    fn written_out(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.rdy_out = conn.state.rdy();
        }
        self.release_pending_rdy();
    }

    /// Queues the raises that waited, as far as what the other connections hold allows.
    fn release_pending_rdy(&mut self) {
        let max_in_flight = u64::from(self.max_in_flight);
        let mut out: u64 = self.conns.values().map(|c| u64::from(c.rdy_out)).sum();
        for (id, conn) in self.conns.iter_mut() {
            let Some(raise) = conn.rdy_pending else { continue };
            if out - u64::from(conn.rdy_out) + u64::from(raise) > max_in_flight {
                continue;
            }
            conn.rdy_pending = None;
            if let Ok(sent) = conn.state.ready(raise) {
                trace!(conn = %id, rdy = sent, "RDY (after the lowers before it)");
                out = out - u64::from(conn.rdy_out) + u64::from(sent);
                conn.rdy_out = sent;
            }
        }
    }

    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub(crate) fn poll_event(&mut self) -> Option<ConsumerEvent> {
        self.events.pop_front()
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(|c| c.state.poll_timeout());
        conns.chain(self.timers.next()).chain(self.lookupd.next_timeout()).min()
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

    pub(crate) fn is_starved(&self) -> bool {
        self.conns.values().any(|c| {
            // go-nsq's threshold: 85% of the connection's RDY, rounded down.
            let in_flight = c.state.in_flight() as u64;
            c.state.is_ready() && in_flight > 0 && in_flight >= u64::from(c.rdy) * 85 / 100
        })
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

    /// Handles the events a connection produced.
    fn process(&mut self, id: ConnId) {
        loop {
            let Some(conn) = self.conns.get_mut(&id) else {
                return;
            };
            // Messages, the bulk of the events, are taken with one lookup of the connection
            // for all of them: a lookup per message would cost more with more connections.
            let event = loop {
                match conn.state.poll_event() {
                    None => return,
                    Some(Event::Message(message)) => {
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
                    Some(event) => break event,
                }
            };
            match event {
                Event::Subscribed => {
                    conn.subscribed = true;
                    conn.subscribed_at = Some(self.now);
                    let addr = conn.addr.clone();
                    info!(conn = %id, %addr, "subscribed");
                    self.on_subscribed(&addr);
                    self.events.push_back(ConsumerEvent::Connected { conn: id, addr });
                    // Lower the others' share first so the new one can get its own.
                    let ids: Vec<ConnId> = self.conns.keys().copied().filter(|&c| c != id).collect();
                    for other in ids {
                        self.maybe_update_rdy(other);
                    }
                    self.maybe_update_rdy(id);
                }
                Event::Closed(error) => self.on_closed(id, error),
                Event::MessageTimedOut(msg) => {
                    debug!(conn = %id, %msg, "message timed out in flight")
                }
                Event::ServerError(e) => warn!(conn = %id, %e, "nsqd error"),
                Event::Authenticated(auth) => {
                    let addr = conn.addr.clone();
                    self.events.push_back(ConsumerEvent::Authenticated { conn: id, addr, auth });
                }
                // Messages were taken above.
                Event::Message(_) | Event::Ready(_) | Event::CloseWait | Event::Published { .. } => {}
            }
        }
    }

    /// Closes a connection gracefully. RDY 0 goes before CLS so nothing new arrives while CLS
    /// travels, and the count is given back at once: nsqd delivers nothing more on it while
    /// it drains, and the others may need the room.
    fn close_conn(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.rdy_pending = None;
            if conn.subscribed && (conn.rdy > 0 || conn.rdy_out > 0) {
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
        self.actions.push_back(Action::Close { conn: id });
        // Subscribed connections only: one still dialling holds no RDY to share.
        let left = self.conns.values().filter(|c| c.subscribed).count() as u64;
        if conn.rdy > 0 && (left == u64::from(self.max_in_flight) || self.in_backoff()) {
            self.need_redistribute = true;
        }
        if conn.subscribed {
            info!(conn = %id, addr = %conn.addr, %error, left, "connection closed");
            let event = ConsumerEvent::Disconnected { conn: id, addr: conn.addr.clone(), error: error.clone() };
            self.events.push_back(event);
        }
        self.after_close(id, conn.addr, conn.subscribed_at, error);
        // What it held is no longer nsqd's to send: waiting raises may go.
        self.release_pending_rdy();
        self.maybe_stopped();
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
        if count == conn.rdy && (conn.state.rdy() == count || conn.rdy_pending == Some(count)) {
            return;
        }
        self.total_rdy = total - u64::from(conn.rdy) + u64::from(count);
        conn.rdy = count;
        conn.last_rdy_at = self.now;
        if count > 0 {
            conn.rdy_granted_at = Some(self.now);
        }
        // nsqd acts on each RDY as it arrives, connection by connection: a raise goes out only
        // once what the others may still hold leaves room for it, so a lower queued behind a
        // busy write on one connection is written before the raise it makes room for.
        let others: u64 = self.conns.iter().filter(|(&c, _)| c != id).map(|(_, c)| u64::from(c.rdy_out)).sum();
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let send = if count <= conn.rdy_out {
            conn.rdy_pending = None;
            conn.state.rdy() != count
        } else if others + u64::from(count) <= max_in_flight {
            conn.rdy_pending = None;
            conn.rdy_out = count;
            true
        } else {
            trace!(conn = %id, rdy = count, "RDY waits for the lowers before it");
            conn.rdy_pending = Some(count);
            false
        };
        if send {
            match conn.state.ready(count) {
                Ok(sent) => trace!(conn = %id, rdy = sent, "RDY"),
                Err(e) => debug!(conn = %id, %e, "RDY refused"),
            }
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
            // A connection that still holds RDY gains nothing from RDY 1: the free slots go to
            // those without, so none is left at RDY 0 while RDY goes unused.
            if self.conns.get(&id).is_some_and(|c| c.rdy == 0) {
                possible.push(id);
            }
        }
        let limit = if self.in_backoff() { 1 } else { u64::from(self.max_in_flight) };
        let mut available = limit.saturating_sub(self.total_rdy);
        // The connections that waited longest for RDY go first (go-nsq picks at random, which
        // can pass one over for minutes while messages wait on its nsqd); a random order
        // first breaks ties, so connections that never had RDY take turns in no fixed order.
        for i in (1..possible.len()).rev() {
            possible.swap(i, self.rng.below(i + 1));
        }
        possible.sort_by_key(|id| self.conns.get(id).and_then(|c| c.rdy_granted_at));
        for id in possible {
            if available == 0 {
                break;
            }
            available -= 1;
            self.update_rdy(id, 1);
        }
    }

    // ---- backoff -----------------------------------------------------------------------------

    /// Moves the backoff level by an answer's outcome; returns whether RDY was updated.
    fn backoff_signal(&mut self, signal: Signal) -> bool {
        // Responses arriving while a backoff period runs do not move the level.
        if self.backoff_until.is_some() || self.stopping {
            return false;
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
            return true;
        }
        updated
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

pub(super) fn check_addr(addr: &str) -> Result<(), ConsumerError> {
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
