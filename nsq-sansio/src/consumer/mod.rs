//! [`ConsumerState`]: one topic/channel across every nsqd that has it.

mod state;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{debug, warn};

use crate::action::{Action, ConnId, QueryId};
use crate::config::BackoffStrategy;
use crate::connection::deadline;
use crate::error::{CommandError, ConnectionError};
use crate::lookupd::LookupdAddress;
use crate::{Channel, Config, Message, MessageId, Topic};

use state::Consumer;
pub(crate) use state::{host_of, Rng};

/// What a consumer tells the application.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConsumerEvent {
    /// A message for the handler. Answer it with [`ConsumerState::respond`].
    Message {
        /// The connection it arrived on (answers go back on it).
        conn: ConnId,
        /// The message.
        message: Message,
    },
    /// A message past `max_attempts`: it was finished without reaching the handler; hand it to
    /// the failed-message hook.
    GaveUp {
        /// The connection it arrived on.
        conn: ConnId,
        /// The message.
        message: Message,
    },
    /// A connection finished its handshake and subscribed.
    Connected {
        /// The connection.
        conn: ConnId,
        /// Its nsqd address.
        addr: String,
    },
    /// A connection ended.
    Disconnected {
        /// The connection.
        conn: ConnId,
        /// Its nsqd address.
        addr: String,
        /// Why.
        error: ConnectionError,
    },
    /// A lookupd query failed; it is retried at the next poll.
    LookupdFailed {
        /// The lookupd address.
        addr: String,
        /// What went wrong.
        error: String,
    },
    /// `stop` finished: every connection closed, lookupd polling ended.
    Stopped,
}

/// How the application answered a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Response {
    /// FIN: handled.
    Finish,
    /// REQ: redeliver after `delay` (`None`: `default_requeue_delay × attempts`, capped at
    /// `max_requeue_delay`); `backoff` says whether this counts as a failure for backoff.
    Requeue {
        /// The delay, or `None` for the configured default.
        delay: Option<Duration>,
        /// Whether the consumer backs off.
        backoff: bool,
    },
    /// TOUCH: restart the message's timeout.
    Touch,
}

/// Why a consumer call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The consumer is stopping or stopped.
    #[error("the consumer is stopped")]
    Stopped,
    /// Already connected to this address.
    #[error("already connected to {0}")]
    AlreadyConnected(String),
    /// Not connected to this address.
    #[error("not connected to {0}")]
    NotConnected(String),
    /// The address cannot be used.
    #[error("bad address {addr:?}: {reason}")]
    BadAddress {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The connection refused the command.
    #[error(transparent)]
    Command(#[from] CommandError),
}

/// Counters of a consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Messages received.
    pub messages_received: u64,
    /// Messages finished.
    pub messages_finished: u64,
    /// Messages requeued.
    pub messages_requeued: u64,
    /// Live connections.
    pub connections: usize,
}

/// A consumer of one topic/channel: its nsqd connections, RDY, backoff and lookupd polling.
///
/// Sources are direct nsqd addresses and/or lookupd addresses. A direct nsqd that drops is
/// redialled with backoff (1 s, doubling, capped at `lookupd_poll_interval`) for as long as it
/// stays listed; an nsqd found through lookupd is reconnected only while lookupd still lists it
/// (a lost connection triggers an immediate lookupd query), as go-nsq does.
///
/// RDY: each subscribed connection gets `max_in_flight / connections` (at least 1, at most the
/// negotiated `max_rdy_count`), and the sum of RDY never exceeds `max_in_flight`. With fewer
/// `max_in_flight` than connections, RDY 1 rotates among them every `rdy_redistribute_interval`,
/// and a connection idle for `low_rdy_idle_timeout` gives its RDY up. nsqd treats RDY as a window
/// (at most that many messages in flight), so it is not re-sent as messages arrive.
///
/// Backoff: a requeue with backoff raises the level and sets RDY 0 everywhere for
/// `backoff_multiplier × 2^level` (random below that with `full_jitter`), never past
/// `max_backoff_duration`; then one connection gets RDY 1 as a test; a success lowers the
/// level, a failure raises it, and level 0 restores the normal RDY. Requeues without backoff
/// do not move the level.
#[derive(Debug)]
pub struct ConsumerState {
    inner: Consumer,
}

impl ConsumerState {
    /// A consumer for `topic`/`channel`. Add sources with
    /// [`connect_to_nsqd`](Self::connect_to_nsqd) or
    /// [`connect_to_nsqlookupd`](Self::connect_to_nsqlookupd).
    pub fn new(topic: Topic, channel: Channel, config: Arc<Config>, now: Instant) -> Self {
        Self { inner: Consumer::new(topic, channel, config, now) }
    }

    /// Adds a direct nsqd connection (`host:port`); it is redialled with backoff if it drops.
    pub fn connect_to_nsqd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.inner.connect_to_nsqd(addr, now)
    }

    /// Removes a direct nsqd: its connection closes gracefully and is not redialled.
    pub fn disconnect_from_nsqd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.inner.disconnect_from_nsqd(addr, now)
    }

    /// Adds a lookupd (`host:port` or `http://host:port`); it is queried at once, then every
    /// `lookupd_poll_interval` (lookupds take turns).
    pub fn connect_to_nsqlookupd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.inner.connect_to_nsqlookupd(addr, now)
    }

    /// Removes a lookupd.
    pub fn disconnect_from_nsqlookupd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.inner.disconnect_from_nsqlookupd(addr, now)
    }

    /// Answers a message delivered as [`ConsumerEvent::Message`] on `conn`; `attempts` is the
    /// message's, used for the default requeue delay.
    pub fn respond(
        &mut self,
        conn: ConnId,
        id: &MessageId,
        attempts: u16,
        response: Response,
        now: Instant,
    ) -> Result<(), ConsumerError> {
        self.inner.respond(conn, id, attempts, response, now)
    }

    /// Changes `max_in_flight` at runtime; RDY is redistributed.
    pub fn change_max_in_flight(&mut self, max_in_flight: u32, now: Instant) {
        self.inner.change_max_in_flight(max_in_flight, now)
    }

    /// Graceful stop: RDY 0 and CLS everywhere, lookupd polling and redials end; each connection
    /// closes once its in-flight messages are answered (at most 30 s). Ends with
    /// [`ConsumerEvent::Stopped`].
    pub fn stop(&mut self, now: Instant) {
        self.inner.stop(now)
    }

    /// The adapter connected the socket of `conn`.
    pub fn handle_connected(&mut self, conn: ConnId, now: Instant) {
        self.inner.handle_connected(conn, now)
    }

    /// The adapter could not connect `conn`.
    pub fn handle_connect_failed(&mut self, conn: ConnId, error: String, now: Instant) {
        self.inner.handle_connect_failed(conn, error, now)
    }

    /// Bytes read from `conn`'s socket.
    pub fn handle_input(&mut self, conn: ConnId, now: Instant, data: BytesMut) {
        self.inner.handle_input(conn, now, data)
    }

    /// `conn`'s socket reached EOF or failed.
    pub fn handle_eof(&mut self, conn: ConnId, now: Instant) {
        self.inner.handle_eof(conn, now)
    }

    /// The complete response to a lookupd query, or the transport error that prevented it.
    pub fn handle_lookupd_response(&mut self, query: QueryId, response: Result<Bytes, String>, now: Instant) {
        self.inner.handle_lookupd_response(query, response, now)
    }

    /// Lets timers fire. Calling it early or twice does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now)
    }

    /// Bytes to write to a connection's socket (only for connections the adapter reported
    /// connected).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(ConnId, Bytes)> {
        self.inner.poll_transmit()
    }

    /// Bytes to write to `conn`'s socket: everything queued for it since the last call. An
    /// adapter that calls this only when the connection's previous write finished coalesces
    /// writes with no flush timer.
    #[must_use]
    pub fn poll_transmit_for(&mut self, conn: ConnId) -> Option<Bytes> {
        self.inner.poll_transmit_for(conn)
    }

    /// I/O to carry out.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.inner.poll_action()
    }

    /// Events for the application.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ConsumerEvent> {
        self.inner.poll_event()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }

    /// Counters.
    pub fn stats(&self) -> ConsumerStats {
        self.inner.stats()
    }

    /// Whether [`stop`](Self::stop) has completed.
    pub fn is_stopped(&self) -> bool {
        self.inner.is_stopped()
    }

    /// Whether the consumer is backing off.
    pub fn in_backoff(&self) -> bool {
        self.inner.in_backoff()
    }

    /// The sum of RDY over all connections.
    pub fn total_rdy(&self) -> u64 {
        self.inner.total_rdy()
    }

    /// The RDY count `conn` holds.
    pub fn rdy(&self, conn: ConnId) -> Option<u32> {
        self.inner.rdy_of(conn)
    }
}

/// go-nsq's backoff strategies: `backoff_multiplier × 2^level`, or a uniform random duration
/// below that with full jitter.
pub(crate) fn backoff_duration(config: &Config, level: u32, rng: &mut Rng) -> Duration {
    let exp = config.backoff_multiplier.saturating_mul(1u32 << level.min(31));
    match config.backoff_strategy {
        BackoffStrategy::Exponential => exp,
        BackoffStrategy::FullJitter => exp.mul_f64(rng.unit()),
    }
}

/// The lookupds of a consumer and their polling schedule.
#[derive(Debug)]
pub(crate) struct Lookupd {
    addrs: Vec<LookupdAddress>,
    next: usize,
    next_query: u64,
    /// Queries under way and the lookupd each went to.
    pending: Vec<(QueryId, LookupdAddress)>,
    first_poll: Option<Instant>,
}

impl Lookupd {
    pub(crate) fn new(_config: &Config, _rng: &mut Rng, _now: Instant) -> Self {
        Self { addrs: Vec::new(), next: 0, next_query: 0, pending: Vec::new(), first_poll: None }
    }

    pub(crate) fn has_lookupds(&self) -> bool {
        !self.addrs.is_empty()
    }
}

impl Consumer {
    fn connect_to_nsqlookupd(&mut self, addr: &str, _now: Instant) -> Result<(), ConsumerError> {
        if self.is_stopping() {
            return Err(ConsumerError::Stopped);
        }
        let parsed = parse_lookupd(addr)?;
        if self.lookupd.addrs.contains(&parsed) {
            return Err(ConsumerError::AlreadyConnected(addr.to_owned()));
        }
        let first = self.lookupd.addrs.is_empty();
        self.lookupd.addrs.push(parsed);
        if first {
            // The first lookupd is queried at once; polling (with jitter) follows.
            self.poll_lookupd_now();
        }
        Ok(())
    }

    fn disconnect_from_nsqlookupd(&mut self, addr: &str, _now: Instant) -> Result<(), ConsumerError> {
        let parsed = parse_lookupd(addr)?;
        let Some(i) = self.lookupd.addrs.iter().position(|a| *a == parsed) else {
            return Err(ConsumerError::NotConnected(addr.to_owned()));
        };
        self.lookupd.addrs.remove(i);
        if self.lookupd.addrs.is_empty() {
            self.set_lookupd_timer(None);
        }
        Ok(())
    }

    /// Queries the next lookupd now, then schedules the next poll.
    fn poll_lookupd_now(&mut self) {
        self.poll_lookupd();
    }

    /// Queries the next lookupd in turn and schedules the next poll.
    fn poll_lookupd(&mut self) {
        if self.is_stopping() || self.lookupd.addrs.is_empty() {
            return self.set_lookupd_timer(None);
        }
        let index = self.lookupd.next % self.lookupd.addrs.len();
        self.lookupd.next = index + 1;
        let addr = self.lookupd.addrs[index].clone();
        let query = QueryId(self.lookupd.next_query);
        self.lookupd.next_query += 1;
        let request = addr.request(self.topic_name(), &self.config().user_agent);
        self.push_action(Action::QueryLookupd { query, addr: addr.host_port().to_owned(), request });
        self.lookupd.pending.push((query, addr));
        let interval = self.config().lookupd_poll_interval;
        let now = self.now();
        let at = match self.lookupd.first_poll {
            None => {
                // go-nsq jitters only the first interval, so many consumers started together
                // spread their polls.
                let jitter = interval.mul_f64(self.config().lookupd_poll_jitter * self.rng().unit());
                self.lookupd.first_poll = Some(now);
                deadline(now, interval + jitter)
            }
            Some(_) => deadline(now, interval),
        };
        self.set_lookupd_timer(Some(at));
    }

    fn handle_lookupd_response(&mut self, query: QueryId, response: Result<Bytes, String>, _now: Instant) {
        let Some(pos) = self.lookupd.pending.iter().position(|(q, _)| *q == query) else {
            return;
        };
        let (_, addr) = self.lookupd.pending.swap_remove(pos);
        if self.is_stopping() {
            return;
        }
        let parsed = response.and_then(|bytes| crate::lookupd::parse_response(&bytes).map_err(|e| e.to_string()));
        match parsed {
            Ok(lookup) => {
                debug!(lookupd = %addr, producers = lookup.producers.len(), "lookupd answered");
                for producer in &lookup.producers {
                    self.discovered(&producer.tcp_address());
                }
            }
            Err(error) => {
                warn!(lookupd = %addr, %error, "lookupd query failed");
                self.push_event(ConsumerEvent::LookupdFailed { addr: addr.to_string(), error });
            }
        }
    }
}

fn parse_lookupd(addr: &str) -> Result<LookupdAddress, ConsumerError> {
    LookupdAddress::parse(addr).map_err(|e| ConsumerError::BadAddress { addr: addr.to_owned(), reason: e.to_string() })
}
