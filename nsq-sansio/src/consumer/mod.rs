//! [`ConsumerState`]: one topic/channel across every nsqd that has it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::action::{Action, ConnId, QueryId};
use crate::error::{CommandError, ConnectionError};
use crate::{Channel, Config, Message, MessageId, Topic};

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
#[derive(Debug)]
pub struct ConsumerState {
    _topic: Topic,
    _channel: Channel,
    _config: Arc<Config>,
}

impl ConsumerState {
    /// A consumer for `topic`/`channel`. Add sources with
    /// [`connect_to_nsqd`](Self::connect_to_nsqd) or
    /// [`connect_to_nsqlookupd`](Self::connect_to_nsqlookupd).
    pub fn new(topic: Topic, channel: Channel, config: Arc<Config>, _now: Instant) -> Self {
        Self {
            _topic: topic,
            _channel: channel,
            _config: config,
        }
    }

    /// Adds a direct nsqd connection (`host:port`); it is redialled with backoff if it drops.
    pub fn connect_to_nsqd(&mut self, _addr: &str, _now: Instant) -> Result<(), ConsumerError> {
        Ok(())
    }

    /// Removes a direct nsqd connection.
    pub fn disconnect_from_nsqd(
        &mut self,
        _addr: &str,
        _now: Instant,
    ) -> Result<(), ConsumerError> {
        Ok(())
    }

    /// Adds a lookupd (`host:port` or `http://host:port`); it is queried at once, then every
    /// `lookupd_poll_interval`.
    pub fn connect_to_nsqlookupd(
        &mut self,
        _addr: &str,
        _now: Instant,
    ) -> Result<(), ConsumerError> {
        Ok(())
    }

    /// Removes a lookupd.
    pub fn disconnect_from_nsqlookupd(
        &mut self,
        _addr: &str,
        _now: Instant,
    ) -> Result<(), ConsumerError> {
        Ok(())
    }

    /// Answers a message delivered as [`ConsumerEvent::Message`].
    pub fn respond(
        &mut self,
        _conn: ConnId,
        _id: &MessageId,
        _attempts: u16,
        _response: Response,
        _now: Instant,
    ) -> Result<(), ConsumerError> {
        Ok(())
    }

    /// Changes `max_in_flight` at runtime; RDY is redistributed.
    pub fn change_max_in_flight(&mut self, _max_in_flight: u32, _now: Instant) {}

    /// Graceful stop: RDY 0 everywhere, wait for in-flight messages (bounded), CLS, close.
    pub fn stop(&mut self, _now: Instant) {}

    /// The adapter connected the socket of `conn`.
    pub fn handle_connected(&mut self, _conn: ConnId, _now: Instant) {}

    /// The adapter could not connect `conn`.
    pub fn handle_connect_failed(&mut self, _conn: ConnId, _error: String, _now: Instant) {}

    /// Bytes read from `conn`'s socket.
    pub fn handle_input(&mut self, _conn: ConnId, _now: Instant, _data: BytesMut) {}

    /// `conn`'s socket reached EOF or failed.
    pub fn handle_eof(&mut self, _conn: ConnId, _now: Instant) {}

    /// The complete response to a lookupd query, or the transport error that prevented it.
    pub fn handle_lookupd_response(
        &mut self,
        _query: QueryId,
        _response: Result<Bytes, String>,
        _now: Instant,
    ) {
    }

    /// Lets timers fire.
    pub fn handle_timeout(&mut self, _now: Instant) {}

    /// Bytes to write to a connection's socket.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(ConnId, Bytes)> {
        None
    }

    /// I/O to carry out.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        None
    }

    /// Events for the application.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ConsumerEvent> {
        None
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// Counters.
    pub fn stats(&self) -> ConsumerStats {
        ConsumerStats::default()
    }

    /// Whether [`stop`](Self::stop) has completed.
    pub fn is_stopped(&self) -> bool {
        false
    }
}
