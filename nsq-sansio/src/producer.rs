//! [`ProducerState`]: publishes to one nsqd, responses matched FIFO to their callers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::action::{Action, ConnId};
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
#[derive(Debug)]
pub struct ProducerState {
    _config: Arc<Config>,
    _addr: String,
}

impl ProducerState {
    /// A producer for the nsqd at `addr` (`host:port`). Nothing happens until the first publish
    /// or [`connect`](Self::connect).
    pub fn new(addr: impl Into<String>, config: Arc<Config>, _now: Instant) -> Self {
        Self {
            _config: config,
            _addr: addr.into(),
        }
    }

    /// Connects now instead of at the first publish.
    pub fn connect(&mut self, _now: Instant) -> Result<(), CommandError> {
        Ok(())
    }

    /// Queues a PUB.
    pub fn publish(
        &mut self,
        _topic: &Topic,
        _body: Bytes,
        _now: Instant,
    ) -> Result<TxId, CommandError> {
        Err(CommandError::Closed)
    }

    /// Queues an MPUB.
    pub fn multi_publish(
        &mut self,
        _topic: &Topic,
        _bodies: Vec<Bytes>,
        _now: Instant,
    ) -> Result<TxId, CommandError> {
        Err(CommandError::Closed)
    }

    /// Queues a DPUB.
    pub fn deferred_publish(
        &mut self,
        _topic: &Topic,
        _delay: Duration,
        _body: Bytes,
        _now: Instant,
    ) -> Result<TxId, CommandError> {
        Err(CommandError::Closed)
    }

    /// Lets outstanding transactions finish, then closes; ends with [`ProducerEvent::Stopped`].
    pub fn stop(&mut self, _now: Instant) {}

    /// The adapter connected the socket of `conn`.
    pub fn handle_connected(&mut self, _conn: ConnId, _now: Instant) {}

    /// The adapter could not connect `conn`.
    pub fn handle_connect_failed(&mut self, _conn: ConnId, _error: String, _now: Instant) {}

    /// Bytes read from `conn`'s socket.
    pub fn handle_input(&mut self, _conn: ConnId, _now: Instant, _data: BytesMut) {}

    /// `conn`'s socket reached EOF or failed.
    pub fn handle_eof(&mut self, _conn: ConnId, _now: Instant) {}

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
    pub fn poll_event(&mut self) -> Option<ProducerEvent> {
        None
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// Whether [`stop`](Self::stop) has completed.
    pub fn is_stopped(&self) -> bool {
        false
    }
}
