//! [`ConsumerState`]: one topic/channel across every nsqd that has it.

mod state;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::action::{Action, ConnId};
use crate::config::BackoffStrategy;
use crate::error::{CommandError, ConnectionError, SocketError};
use crate::lookupd::LookupdError;
use crate::rng::Rng;
use crate::{AuthResponse, Channel, Config, Message, MessageId, Topic};

pub(crate) use state::host_of;
use state::Consumer;

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
    /// nsqd accepted the AUTH secret of `conn`, with what its auth server said (identity,
    /// permissions). Comes before that connection's [`Connected`](Self::Connected).
    Authenticated {
        /// The connection.
        conn: ConnId,
        /// Its nsqd address.
        addr: String,
        /// nsqd's AUTH answer.
        auth: AuthResponse,
    },
    /// A connection finished its handshake and subscribed.
    Connected {
        /// The connection.
        conn: ConnId,
        /// Its nsqd address.
        addr: String,
    },
    /// A connection never subscribed: the dial failed ([`ConnectionError::Dial`]: refused,
    /// unknown host, timed out) or nsqd refused the handshake (TLS, AUTH, IDENTIFY, SUB).
    ConnectFailed {
        /// The connection.
        conn: ConnId,
        /// Its nsqd address.
        addr: String,
        /// The cause.
        error: ConnectionError,
        /// When the address is tried again: the redial of a direct address, the next lookupd
        /// poll for an address lookupd lists. `None`: it is not retried (the first attempt at
        /// an address given to `connect_to_nsqd` — the application decides — or the consumer
        /// is stopping).
        retry_at: Option<Instant>,
    },
    /// A subscribed connection ended.
    Disconnected {
        /// The connection.
        conn: ConnId,
        /// Its nsqd address.
        addr: String,
        /// Why.
        error: ConnectionError,
    },
    /// A lookupd query failed. The next lookupd (if any) is tried at once, up to three per
    /// poll; otherwise the query waits for the next poll.
    LookupdFailed {
        /// The lookupd address.
        addr: String,
        /// What went wrong.
        error: LookupdError,
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
/// # Failures
///
/// Sources are direct nsqd addresses and/or lookupd addresses. Every attempt that never
/// subscribes (refused, unknown host, dial timeout, TLS or AUTH refused, `E_BAD_*`) arrives as
/// [`ConsumerEvent::ConnectFailed`] with its cause; the loss of a subscribed connection as
/// [`ConsumerEvent::Disconnected`]. Then:
///
/// - The first attempt at an address given to [`connect_to_nsqd`](Self::connect_to_nsqd) is
///   not retried if it fails: the application hears why and decides (go-nsq's
///   `ConnectToNSQD` returns the error).
/// - A direct nsqd whose connection was up and dropped is redialled after a random delay in
///   `[d/2, d)`, where `d` starts at 1 s and doubles per attempt that does not stay subscribed
///   for 10 s, capped at `lookupd_poll_interval`.
/// - An nsqd found through lookupd is dialled when a lookupd poll lists it, so a dead one is
///   tried at most once per `lookupd_poll_interval`; a failed dial never triggers a query. A
///   subscribed connection that drops triggers one extra query (after a random delay below
///   1 s, merged with any query under way) and is redialled if lookupd still lists it.
/// - A failed lookupd query ([`ConsumerEvent::LookupdFailed`]) is retried at once on the next
///   lookupd, at most three per poll; a query unanswered for `lookupd_poll_timeout` counts as
///   failed.
///
/// The generator behind every jitter is seeded from the operating system unless
/// [`Config::rng_seed`] fixes it, so a fleet started together spreads its retries.
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

    /// Adds a direct nsqd connection (`host:port`). The outcome of the first attempt arrives as
    /// [`ConsumerEvent::Connected`] or [`ConsumerEvent::ConnectFailed`] (and the address is
    /// then forgotten); once connected, it is redialled with backoff if it drops.
    pub fn connect_to_nsqd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.inner.connect_to_nsqd(addr, now)
    }

    /// Closes the connection to an nsqd (given directly or found through lookupd) gracefully;
    /// it is not dialled again, even when lookupd lists it, until `connect_to_nsqd` names it.
    pub fn disconnect_from_nsqd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.inner.disconnect_from_nsqd(addr, now)
    }

    /// Adds a lookupd (`host:port`, `http://host:port[/path]` or `https://host:port[/path]`);
    /// it is queried at once, then every `lookupd_poll_interval` (lookupds take turns).
    ///
    /// Each query is a connection of this consumer, driven like an nsqd connection: an
    /// [`Action::Connect`] to the lookupd's `host:port`, the request through
    /// [`poll_transmit_for`](Self::poll_transmit_for), the response through
    /// [`handle_input`](Self::handle_input) and [`handle_eof`](Self::handle_eof), and an
    /// [`Action::Close`] once the answer is complete. `https://` is TLS inside the core, with
    /// the same TLS settings as nsqd connections, verifying the lookupd's host name. When
    /// `auth_secret` is set, queries carry `Authorization: Bearer <auth_secret>` (over `http://`
    /// too, as go-nsq sends it) unless [`Config::lookupd_authorization`] is off.
    pub fn connect_to_nsqlookupd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.inner.connect_to_nsqlookupd(addr, now)
    }

    /// Removes a lookupd.
    pub fn disconnect_from_nsqlookupd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.inner.disconnect_from_nsqlookupd(addr, now)
    }

    /// Sets the hook every lookupd answer goes through (go-nsq's `DiscoveryFilter`): it gets
    /// the nsqd addresses lookupd listed (`host:port`, in lookupd's order) and returns those to
    /// dial, in the order to dial them. Addresses it adds are dialled like listed ones; one
    /// that is not `host:port` is ignored with a warning. Replaces any previous filter.
    pub fn set_discovery_filter(&mut self, filter: impl FnMut(Vec<String>) -> Vec<String> + Send + 'static) {
        self.inner.set_discovery_filter(Box::new(filter))
    }

    /// Answers a message delivered as [`ConsumerEvent::Message`] on `conn`; `attempts` is the
    /// message's, used for the default requeue delay.
    ///
    /// Refused with [`CommandError::Closed`] when `conn` has ended (nsqd has requeued the
    /// message already), and with [`CommandError::NotInFlight`] when the message was answered
    /// already or timed out.
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

    /// The adapter connected the socket of `conn` (an nsqd connection or a lookupd query).
    pub fn handle_connected(&mut self, conn: ConnId, now: Instant) {
        self.inner.handle_connected(conn, now)
    }

    /// The adapter could not connect `conn` (pass the `std::io::Error` of the dial; a dial
    /// timeout is [`std::io::ErrorKind::TimedOut`]).
    pub fn handle_connect_failed(&mut self, conn: ConnId, error: impl Into<SocketError>, now: Instant) {
        self.inner.handle_connect_failed(conn, error.into(), now)
    }

    /// Bytes read from `conn`'s socket.
    pub fn handle_input(&mut self, conn: ConnId, now: Instant, data: BytesMut) {
        self.inner.handle_input(conn, now, data)
    }

    /// `conn`'s socket reached end of file: nsqd closed it.
    pub fn handle_eof(&mut self, conn: ConnId, now: Instant) {
        self.inner.handle_eof(conn, now)
    }

    /// Reading or writing `conn`'s socket failed (pass the `std::io::Error`).
    pub fn handle_io_error(&mut self, conn: ConnId, error: impl Into<SocketError>, now: Instant) {
        self.inner.handle_io_error(conn, error.into(), now)
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

    /// Whether a connection is held back by the application (go-nsq's `IsStarved`): it has
    /// messages in flight, at least 85% of its RDY count, and is not closing. A consumer that
    /// stays starved has handlers too slow (or too few) for its `max_in_flight`.
    pub fn is_starved(&self) -> bool {
        self.inner.is_starved()
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
