//! [`ProducerState`]: publishes to one nsqd, responses matched FIFO to their callers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::debug;

use crate::action::{Action, ConnId};
use crate::connection::{ConnectionState, Event, PublishId, DEFAULT_MAX_DEFER};
use crate::error::{CommandError, ConnectionError, PublishError};
use crate::{Config, Topic};

/// Identifies one publish of a [`ProducerState`]; [`ProducerEvent::Published`] carries it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId(pub u64);

/// What a producer tells the application.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProducerEvent {
    /// A publish was acknowledged, refused, or lost with its connection.
    Published {
        /// The id the publish call returned.
        tx: TxId,
        /// `Ok` once nsqd acknowledged it.
        result: Result<(), PublishError>,
    },
    /// A connection finished its handshake.
    Connected(ConnId),
    /// A connection ended.
    Disconnected(ConnId, ConnectionError),
    /// `stop` finished: every transaction resolved and the connection closed.
    Stopped,
}

/// A producer: one nsqd address, connected lazily, publishes pipelined on one connection.
///
/// Publishing while disconnected opens a connection at once ([`Action::Connect`]) and queues
/// the command until its handshake is done. Responses are matched to publishes in order; each
/// resolves exactly once, as [`ProducerEvent::Published`]: `Ok` only when nsqd acknowledged it.
/// When the connection ends, every outstanding publish resolves with
/// [`PublishError::ConnectionLost`] and the next publish opens a new connection.
///
/// Commands queued between two [`poll_transmit`](Self::poll_transmit) calls go out as one
/// buffer: an adapter that polls only when its previous write finished coalesces writes without
/// any flush timer.
///
/// With [`set_auto_batch`](Self::set_auto_batch), consecutive PUBs to one topic that queued up
/// while a write was in flight go out as one MPUB. Each caller still gets its own result, but
/// an MPUB is atomic: the batch succeeds or fails as a whole.
#[derive(Debug)]
pub struct ProducerState {
    config: Arc<Config>,
    addr: String,
    conn: Option<Link>,
    next_conn: u64,
    next_tx: u64,
    /// PUBs held back for batching: topic and (tx, body), in order.
    batch: Vec<(Topic, TxId, Bytes)>,
    max_batch: usize,
    events: VecDeque<ProducerEvent>,
    actions: VecDeque<Action>,
    /// Bytes a connection queued before it closed, still to be written.
    final_writes: Vec<(ConnId, Bytes)>,
    stopping: bool,
    stopped: bool,
    now: Instant,
}

/// The current connection and the transactions it carries.
#[derive(Debug)]
struct Link {
    id: ConnId,
    state: ConnectionState,
    connected: bool,
    /// Transactions by the connection's publish ids; an MPUB batch maps to several.
    txs: VecDeque<(PublishId, Vec<TxId>)>,
}

impl ProducerState {
    /// A producer for the nsqd at `addr` (`host:port`). Nothing happens until the first publish
    /// or [`connect`](Self::connect).
    pub fn new(addr: impl Into<String>, config: Arc<Config>, now: Instant) -> Self {
        Self {
            config,
            addr: addr.into(),
            conn: None,
            next_conn: 0,
            next_tx: 0,
            batch: Vec::new(),
            max_batch: 0,
            events: VecDeque::new(),
            actions: VecDeque::new(),
            final_writes: Vec::new(),
            stopping: false,
            stopped: false,
            now,
        }
    }

    /// Sends consecutive PUBs to one topic, queued while a write is in flight, as one MPUB of
    /// at most `max_batch` messages. 0 (the default) turns batching off.
    pub fn set_auto_batch(&mut self, max_batch: usize) {
        self.max_batch = max_batch;
    }

    /// Connects now instead of at the first publish.
    pub fn connect(&mut self, now: Instant) -> Result<(), CommandError> {
        self.advance(now);
        self.check_running()?;
        self.link();
        Ok(())
    }

    /// Queues a PUB. Arguments are checked before anything is queued.
    pub fn publish(&mut self, topic: &Topic, body: Bytes, now: Instant) -> Result<TxId, CommandError> {
        self.advance(now);
        self.check_running()?;
        self.config.check_body(&body)?;
        let tx = self.next_tx();
        if self.max_batch > 1 {
            self.link();
            self.batch.push((topic.clone(), tx, body));
            return Ok(tx);
        }
        self.flush_batch();
        let link = self.link();
        let id = link.state.publish(topic, body)?;
        link.txs.push_back((id, vec![tx]));
        Ok(tx)
    }

    /// Queues an MPUB: all messages stored atomically, one result.
    pub fn multi_publish(&mut self, topic: &Topic, bodies: Vec<Bytes>, now: Instant) -> Result<TxId, CommandError> {
        self.advance(now);
        self.check_running()?;
        if bodies.is_empty() {
            return Err(CommandError::EmptyBatch);
        }
        bodies.iter().try_for_each(|body| self.config.check_body(body))?;
        self.flush_batch();
        let tx = self.next_tx();
        let link = self.link();
        let id = link.state.multi_publish(topic, &bodies)?;
        link.txs.push_back((id, vec![tx]));
        Ok(tx)
    }

    /// Queues a DPUB: nsqd delivers the message after `delay`.
    pub fn deferred_publish(
        &mut self,
        topic: &Topic,
        delay: Duration,
        body: Bytes,
        now: Instant,
    ) -> Result<TxId, CommandError> {
        self.advance(now);
        self.check_running()?;
        self.config.check_body(&body)?;
        if delay > DEFAULT_MAX_DEFER {
            return Err(CommandError::DelayOutOfRange {
                delay_ms: delay.as_millis(),
                max_ms: DEFAULT_MAX_DEFER.as_millis(),
            });
        }
        self.flush_batch();
        let tx = self.next_tx();
        let link = self.link();
        let id = link.state.deferred_publish(topic, delay, body)?;
        link.txs.push_back((id, vec![tx]));
        Ok(tx)
    }

    /// Refuses new publishes, lets outstanding ones finish, then closes; ends with
    /// [`ProducerEvent::Stopped`].
    pub fn stop(&mut self, now: Instant) {
        self.advance(now);
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.flush_batch();
        match &mut self.conn {
            Some(link) => {
                link.state.close(now);
                self.process();
            }
            None => self.finish_stop(),
        }
    }

    /// The adapter connected the socket of `conn`.
    pub fn handle_connected(&mut self, conn: ConnId, now: Instant) {
        self.advance(now);
        if let Some(link) = self.conn.as_mut().filter(|l| l.id == conn) {
            link.connected = true;
        }
    }

    /// The adapter could not connect `conn`: its publishes fail with
    /// [`PublishError::ConnectionLost`].
    pub fn handle_connect_failed(&mut self, conn: ConnId, error: String, now: Instant) {
        self.advance(now);
        if let Some(link) = self.conn.as_mut().filter(|l| l.id == conn) {
            link.state.abort(now);
            self.process_with(Some(ConnectionError::Io(error)));
        }
    }

    /// Bytes read from `conn`'s socket.
    pub fn handle_input(&mut self, conn: ConnId, now: Instant, data: BytesMut) {
        self.advance(now);
        if let Some(link) = self.conn.as_mut().filter(|l| l.id == conn) {
            link.state.handle_input(now, data);
            self.process();
        }
    }

    /// `conn`'s socket reached EOF or failed.
    pub fn handle_eof(&mut self, conn: ConnId, now: Instant) {
        self.advance(now);
        if let Some(link) = self.conn.as_mut().filter(|l| l.id == conn) {
            link.state.handle_eof(now);
            self.process();
        }
    }

    /// Lets timers fire. Calling it early or twice does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        if let Some(link) = &mut self.conn {
            link.state.handle_timeout(now);
            self.process();
        }
    }

    /// Bytes to write to a connection's socket: everything queued since the last call, as one
    /// buffer. Call it again only when the previous write finished, so writes coalesce.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(ConnId, Bytes)> {
        if !self.final_writes.is_empty() {
            return Some(self.final_writes.remove(0));
        }
        self.poll_link()
    }

    /// Bytes to write to `conn`'s socket: its last bytes if it closed, else what was queued
    /// since the last call. An adapter that calls this only when the connection's previous
    /// write finished coalesces writes with no flush timer.
    #[must_use]
    pub fn poll_transmit_for(&mut self, conn: ConnId) -> Option<Bytes> {
        if let Some(i) = self.final_writes.iter().position(|(c, _)| *c == conn) {
            return Some(self.final_writes.remove(i).1);
        }
        if self.conn.as_ref().is_some_and(|l| l.id == conn) {
            return self.poll_link().map(|(_, bytes)| bytes);
        }
        None
    }

    /// What the live connection has to write.
    fn poll_link(&mut self) -> Option<(ConnId, Bytes)> {
        self.flush_batch();
        let link = self.conn.as_mut().filter(|l| l.connected)?;
        let bytes = link.state.poll_transmit()?;
        let id = link.id;
        // A transport failure while encoding surfaces as an event.
        self.process();
        Some((id, bytes))
    }

    /// I/O to carry out.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Events for the application.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ProducerEvent> {
        self.events.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conn.as_ref().and_then(|l| l.state.poll_timeout())
    }

    /// Whether [`stop`](Self::stop) has completed.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Publishes not yet resolved.
    pub fn outstanding(&self) -> usize {
        self.batch.len() + self.conn.as_ref().map_or(0, |l| l.txs.iter().map(|(_, t)| t.len()).sum())
    }

    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn check_running(&self) -> Result<(), CommandError> {
        if self.stopping {
            Err(CommandError::Closed)
        } else {
            Ok(())
        }
    }

    fn next_tx(&mut self) -> TxId {
        let tx = TxId(self.next_tx);
        self.next_tx += 1;
        tx
    }

    /// The live connection, opened if there is none.
    fn link(&mut self) -> &mut Link {
        let link = match self.conn.take() {
            Some(link) => link,
            None => {
                let id = ConnId(self.next_conn);
                self.next_conn += 1;
                let host = crate::consumer::host_of(&self.addr);
                let state = ConnectionState::new(self.config.clone(), host, self.now);
                self.actions.push_back(Action::Connect { conn: id, addr: self.addr.clone() });
                Link { id, state, connected: false, txs: VecDeque::new() }
            }
        };
        self.conn.insert(link)
    }

    /// Encodes held PUBs: runs of one topic become one MPUB (or a PUB when alone).
    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let max = self.max_batch.max(1);
        let mut rest = &batch[..];
        while let Some((topic, _, _)) = rest.first() {
            let run = rest.iter().take(max).take_while(|(t, _, _)| t == topic).count();
            let (group, tail) = rest.split_at(run);
            rest = tail;
            let txs: Vec<TxId> = group.iter().map(|(_, tx, _)| *tx).collect();
            let link = self.link();
            let queued = if let [(_, _, body)] = group {
                link.state.publish(topic, body.clone())
            } else {
                let bodies: Vec<Bytes> = group.iter().map(|(_, _, b)| b.clone()).collect();
                link.state.multi_publish(topic, &bodies)
            };
            match queued {
                Ok(id) => link.txs.push_back((id, txs)),
                Err(e) => {
                    for tx in txs {
                        self.events
                            .push_back(ProducerEvent::Published { tx, result: Err(PublishError::Command(e.clone())) });
                    }
                }
            }
        }
    }

    fn process(&mut self) {
        self.process_with(None);
    }

    /// Maps the connection's events; `close_error` replaces the reason of a Closed event.
    fn process_with(&mut self, close_error: Option<ConnectionError>) {
        let Some(link) = &mut self.conn else { return };
        let mut close_error = close_error;
        while let Some(event) = link.state.poll_event() {
            match event {
                Event::Ready(_) => self.events.push_back(ProducerEvent::Connected(link.id)),
                Event::Published { id, result } => {
                    let Some(pos) = link.txs.iter().position(|(p, _)| *p == id) else {
                        continue;
                    };
                    if let Some((_, txs)) = link.txs.remove(pos) {
                        for tx in txs {
                            self.events.push_back(ProducerEvent::Published { tx, result: result.clone() });
                        }
                    }
                }
                Event::Closed(reason) => {
                    let reason = close_error.take().unwrap_or(reason);
                    debug!(conn = %link.id, addr = %self.addr, %reason, "producer connection closed");
                    // Anything the connection did not resolve (it resolves every publish it
                    // took) is lost with it.
                    for (_, txs) in link.txs.drain(..) {
                        for tx in txs {
                            self.events
                                .push_back(ProducerEvent::Published { tx, result: Err(PublishError::ConnectionLost) });
                        }
                    }
                    self.actions.push_back(Action::Close { conn: link.id });
                    self.events.push_back(ProducerEvent::Disconnected(link.id, reason));
                    self.conn = None;
                    if self.stopping {
                        self.finish_stop();
                    }
                    return;
                }
                _ => {}
            }
        }
    }

    fn finish_stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            self.events.push_back(ProducerEvent::Stopped);
        }
    }
}
