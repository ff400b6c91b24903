//! [`ProducerState`]: publishes to one nsqd, responses matched FIFO to their callers.

mod link;
mod pool;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::action::{Action, ConnId};
use crate::error::{CommandError, ConnectionError, PublishError, SocketError};
use crate::rng::Rng;
use crate::{AuthResponse, Config, Topic};

use link::{Link, LinkEvent, Txs};
pub use pool::{Health, NsqdStats, PoolError, PoolEvent, PoolOptions, ProducerPoolState, Strategy};

/// Identifies one publish (or ping) of a [`ProducerState`]; [`ProducerEvent::Published`] (or
/// [`ProducerEvent::Pinged`]) carries it back.
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
    /// A ping's NOP was handed to the socket of `conn` (`Ok`; nsqd does not answer a NOP), or
    /// the connection ended before it could be (the dial, the handshake, or a lost connection).
    Pinged {
        /// The id [`ProducerState::ping`] returned.
        tx: TxId,
        /// The connection the NOP was for.
        conn: ConnId,
        /// `Ok` once the NOP left in what `poll_transmit` returned.
        result: Result<(), ConnectionError>,
    },
    /// nsqd accepted the AUTH secret of `conn`, with what its auth server said (identity,
    /// permissions). Comes before [`Connected`](Self::Connected).
    Authenticated {
        /// The connection.
        conn: ConnId,
        /// nsqd's AUTH answer.
        auth: AuthResponse,
    },
    /// A connection finished its handshake.
    Connected(ConnId),
    /// A connection never finished its handshake: the dial failed ([`ConnectionError::Dial`])
    /// or nsqd refused the handshake (TLS, AUTH, IDENTIFY). Its publishes failed with
    /// [`PublishError::NotConnected`] carrying the same error.
    ConnectFailed {
        /// The connection.
        conn: ConnId,
        /// The cause.
        error: ConnectionError,
        /// Until then, a publish fails at once with this error instead of dialling again.
        retry_at: Instant,
    },
    /// A connection that had finished its handshake ended.
    Disconnected(ConnId, ConnectionError),
    /// `stop` finished: every transaction resolved and the connection closed.
    Stopped,
}

/// A producer: one nsqd address, connected lazily, publishes pipelined on one connection.
///
/// Publishing while disconnected opens a connection at once ([`Action::Connect`]) and queues
/// the command until its handshake is done. Responses are matched to publishes in order; each
/// resolves exactly once, as [`ProducerEvent::Published`]: `Ok` only when nsqd acknowledged it.
///
/// # Failures
///
/// - The dial or the handshake fails (refused, unknown host, timeout, TLS, AUTH): the queued
///   publishes fail with [`PublishError::NotConnected`] carrying the cause (they were never
///   sent), and [`ProducerEvent::ConnectFailed`] says until when the nsqd is left alone: for a
///   random time in `[d/2, d)`, `d` = 100 ms doubling per failure in a row up to 5 s, a publish
///   fails at once with the same error instead of dialling again, so a publishing loop cannot
///   turn a dead nsqd into a dial storm. The next publish after that dials again.
/// - A connection that was up ends: its unanswered publishes fail with
///   [`PublishError::ConnectionLost`] carrying the cause (they may or may not have been
///   stored), and the next publish dials at once.
/// - nsqd refuses a publish (`E_BAD_TOPIC`, `E_BAD_MESSAGE`, ...): that publish fails with
///   [`PublishError::Server`]; nsqd closes the connection after such errors, so the publishes
///   behind it fail with `ConnectionLost`.
///
/// Commands queued between two [`poll_transmit`](Self::poll_transmit) calls go out as one
/// buffer: an adapter that polls only when its previous write finished coalesces writes without
/// any flush timer. While [`MAX_UNANSWERED_WRITES`](crate::MAX_UNANSWERED_WRITES) writes of
/// publishes await nsqd's answers, what is queued waits for the oldest to be answered, so a
/// busy producer sends what its callers queue in a round trip as one write.
///
/// With [`set_auto_batch`](Self::set_auto_batch), consecutive PUBs to one topic that queued up
/// while a write was in flight go out as one MPUB. Each caller still gets its own result, but
/// an MPUB is atomic: the batch succeeds or fails as a whole.
#[derive(Debug)]
pub struct ProducerState {
    config: Arc<Config>,
    link: Link,
    rng: Rng,
    next_conn: u64,
    next_tx: u64,
    /// PUBs held back for batching: topic and (tx, body), in order.
    batch: Vec<(Topic, TxId, Bytes)>,
    max_batch: usize,
    events: VecDeque<ProducerEvent>,
    link_events: VecDeque<LinkEvent>,
    actions: VecDeque<Action>,
    /// Bytes a connection queued before it closed, still to be written.
    final_writes: Vec<(ConnId, Bytes)>,
    stopping: bool,
    stopped: bool,
    now: Instant,
}

impl ProducerState {
    /// A producer for the nsqd at `addr` (`host:port`). Nothing happens until the first publish
    /// or [`connect`](Self::connect).
    pub fn new(addr: impl Into<String>, config: Arc<Config>, now: Instant) -> Self {
        Self {
            rng: Rng::from_seed(config.rng_seed),
            config,
            link: Link::new(addr.into()),
            next_conn: 0,
            next_tx: 0,
            batch: Vec::new(),
            max_batch: 0,
            events: VecDeque::new(),
            link_events: VecDeque::new(),
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

    /// Connects now instead of at the first publish (even while a failed nsqd is left alone:
    /// this is the application asking).
    pub fn connect(&mut self, now: Instant) -> Result<(), CommandError> {
        self.advance(now);
        self.check_running()?;
        self.ensure_conn();
        Ok(())
    }

    /// Checks the connection as go-nsq's `Ping` does: connects if there is no connection (even
    /// while a failed nsqd is left alone: this is the application asking) and queues a `NOP`,
    /// sent once the handshake is done. [`ProducerEvent::Pinged`] resolves it: `Ok` when the
    /// NOP was handed over by [`poll_transmit`](Self::poll_transmit), the connection's error
    /// when the dial or handshake failed or the connection ended first. An adapter that waits
    /// for the write of those bytes to finish reports write errors as go-nsq does.
    pub fn ping(&mut self, now: Instant) -> Result<TxId, CommandError> {
        self.advance(now);
        self.check_running()?;
        self.flush_batch();
        self.ensure_conn();
        let tx = self.next_tx();
        self.link.ping(tx)?;
        Ok(tx)
    }

    /// Queues a PUB. Arguments are checked before anything is queued.
    pub fn publish(&mut self, topic: &Topic, body: Bytes, now: Instant) -> Result<TxId, CommandError> {
        self.advance(now);
        self.check_running()?;
        self.config.check_body(&body)?;
        let tx = self.next_tx();
        if self.refuse_while_held(tx) {
            return Ok(tx);
        }
        if self.max_batch > 1 {
            self.ensure_conn();
            self.batch.push((topic.clone(), tx, body));
            return Ok(tx);
        }
        self.flush_batch();
        self.ensure_conn();
        self.queue(Txs::One(tx), |state| state.publish(topic, body))?;
        Ok(tx)
    }

    /// Queues an MPUB: all messages stored atomically, one result.
    pub fn multi_publish(&mut self, topic: &Topic, bodies: Vec<Bytes>, now: Instant) -> Result<TxId, CommandError> {
        self.advance(now);
        self.check_running()?;
        self.config.check_batch(&bodies)?;
        self.flush_batch();
        let tx = self.next_tx();
        if self.refuse_while_held(tx) {
            return Ok(tx);
        }
        self.ensure_conn();
        self.queue(Txs::One(tx), |state| state.multi_publish(topic, &bodies))?;
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
        self.config.check_deferred(delay, &body)?;
        self.flush_batch();
        let tx = self.next_tx();
        if self.refuse_while_held(tx) {
            return Ok(tx);
        }
        self.ensure_conn();
        self.queue(Txs::One(tx), |state| state.deferred_publish(topic, delay, body))?;
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
        if self.link.has_conn() {
            self.link.close(now);
            self.process();
        } else {
            self.finish_stop();
        }
    }

    /// The adapter connected the socket of `conn`.
    pub fn handle_connected(&mut self, conn: ConnId, now: Instant) {
        self.advance(now);
        self.link.handle_connected(conn);
    }

    /// The adapter could not connect `conn` (pass the `std::io::Error` of the dial; a dial
    /// timeout is [`std::io::ErrorKind::TimedOut`]): its publishes fail with
    /// [`PublishError::NotConnected`] carrying [`ConnectionError::Dial`].
    pub fn handle_connect_failed(&mut self, conn: ConnId, error: impl Into<SocketError>, now: Instant) {
        self.advance(now);
        self.link.handle_connect_failed(conn, error.into(), now);
        self.process();
    }

    /// Bytes read from `conn`'s socket.
    pub fn handle_input(&mut self, conn: ConnId, now: Instant, data: BytesMut) {
        self.advance(now);
        self.link.handle_input(conn, now, data);
        self.process();
    }

    /// `conn`'s socket reached end of file: nsqd closed it.
    pub fn handle_eof(&mut self, conn: ConnId, now: Instant) {
        self.advance(now);
        self.link.handle_eof(conn, now);
        self.process();
    }

    /// Reading or writing `conn`'s socket failed (pass the `std::io::Error`).
    pub fn handle_io_error(&mut self, conn: ConnId, error: impl Into<SocketError>, now: Instant) {
        self.advance(now);
        self.link.handle_io_error(conn, error.into(), now);
        self.process();
    }

    /// Lets timers fire. Calling it early or twice does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        self.link.handle_timeout(now);
        self.process();
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
        if self.link.conn_id() == Some(conn) {
            return self.poll_link().map(|(_, bytes)| bytes);
        }
        None
    }

    /// What the live connection has to write.
    fn poll_link(&mut self) -> Option<(ConnId, Bytes)> {
        self.flush_batch();
        let id = self.link.conn_id()?;
        let bytes = self.link.poll_transmit(id);
        // A transport failure while encoding surfaces as an event.
        self.process();
        Some((id, bytes?))
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
        self.link.poll_timeout()
    }

    /// Whether [`stop`](Self::stop) has completed.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Publishes not yet resolved.
    pub fn outstanding(&self) -> usize {
        self.batch.len() + self.link.outstanding()
    }

    /// The nsqd address.
    pub fn addr(&self) -> &str {
        self.link.addr()
    }

    /// Health and publish counters of the nsqd.
    pub fn stats(&self) -> NsqdStats {
        self.link.stats(self.now, false)
    }

    /// Whether a connection has finished its handshake and takes publishes now.
    pub fn is_connected(&self) -> bool {
        self.link.is_ready()
    }

    /// Why the last connection attempt failed, while the nsqd is being left alone after it
    /// (see [`ProducerEvent::ConnectFailed`]).
    pub fn held_error(&self, now: Instant) -> Option<&ConnectionError> {
        self.link.held_until(now).and(self.link.last_error())
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

    /// Opens a connection if there is none.
    fn ensure_conn(&mut self) {
        if self.link.has_conn() {
            return;
        }
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        self.link.open(id, &self.config, self.now);
        self.actions.push_back(Action::dial_nsqd(id, self.link.addr(), &self.config));
    }

    /// Queues a publish on the current connection for `txs`.
    fn queue(
        &mut self,
        txs: Txs,
        encode: impl FnOnce(&mut crate::ConnectionState) -> Result<crate::PublishId, CommandError>,
    ) -> Result<(), CommandError> {
        let state = self.link.state().ok_or(CommandError::Closed)?;
        let id = encode(state)?;
        self.link.track(id, txs);
        Ok(())
    }

    /// While a failed nsqd is left alone, fails `tx` at once with the failure's cause.
    fn refuse_while_held(&mut self, tx: TxId) -> bool {
        if self.link.has_conn() || self.link.held_until(self.now).is_none() {
            return false;
        }
        let Some(error) = self.link.last_error().cloned() else {
            return false;
        };
        self.events.push_back(ProducerEvent::Published { tx, result: Err(PublishError::NotConnected(error)) });
        true
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
            self.ensure_conn();
            let queued = if let [(_, _, body)] = group {
                self.queue(Txs::from(txs.clone()), |state| state.publish(topic, body.clone()))
            } else {
                let bodies: Vec<Bytes> = group.iter().map(|(_, _, b)| b.clone()).collect();
                self.queue(Txs::from(txs.clone()), |state| state.multi_publish(topic, &bodies))
            };
            match queued {
                Ok(()) => {}
                Err(e) => {
                    for tx in txs {
                        self.events
                            .push_back(ProducerEvent::Published { tx, result: Err(PublishError::Command(e.clone())) });
                    }
                }
            }
        }
    }

    /// Maps the link's events.
    fn process(&mut self) {
        self.link.process(self.now, &mut self.rng, &mut self.link_events, &mut self.final_writes);
        while let Some(event) = self.link_events.pop_front() {
            match event {
                LinkEvent::Published { tx, result } => self.events.push_back(ProducerEvent::Published { tx, result }),
                LinkEvent::Pinged { tx, conn, result } => {
                    self.events.push_back(ProducerEvent::Pinged { tx, conn, result })
                }
                LinkEvent::Authenticated(conn, auth) => {
                    self.events.push_back(ProducerEvent::Authenticated { conn, auth })
                }
                LinkEvent::Connected(conn) => self.events.push_back(ProducerEvent::Connected(conn)),
                LinkEvent::Closed { conn, error, was_ready, retry_at } => {
                    self.actions.push_back(Action::Close { conn });
                    // PUBs held for a batch were never sent: they fail with the cause rather
                    // than wait for a connection nobody may ask for again.
                    for (_, tx, _) in std::mem::take(&mut self.batch) {
                        let result = Err(PublishError::NotConnected(error.clone()));
                        self.events.push_back(ProducerEvent::Published { tx, result });
                    }
                    let event = match retry_at {
                        Some(retry_at) if !was_ready => ProducerEvent::ConnectFailed { conn, error, retry_at },
                        _ => ProducerEvent::Disconnected(conn, error),
                    };
                    self.events.push_back(event);
                    if self.stopping {
                        self.finish_stop();
                    }
                }
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
