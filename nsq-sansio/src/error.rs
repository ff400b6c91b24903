//! Error types: what arrives as an event, and what a call returns.
//!
//! A problem caused by nsqd or the network ends the connection and arrives once, as the last
//! event, [`Event::Closed`](crate::Event::Closed) with a [`ConnectionError`]. A problem caused by
//! the caller is returned from the call as a [`CommandError`] and changes nothing.

use std::fmt;
use std::io;

use crate::protocol::frame::{FrameError, ServerError};
use crate::transport::TransportError;
use crate::MessageId;

/// An error the operating system reported for a socket (connect, read or write), kept as its
/// kind and text so it can be cloned, compared and handed to every caller it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketError {
    kind: io::ErrorKind,
    message: String,
}

impl SocketError {
    /// An error of `kind` described by `message`.
    pub fn new(kind: io::ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// The kind, e.g. [`io::ErrorKind::ConnectionRefused`] or [`io::ErrorKind::TimedOut`].
    pub fn kind(&self) -> io::ErrorKind {
        self.kind
    }

    /// The text the operating system (or the adapter) gave.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SocketError {}

impl From<io::Error> for SocketError {
    fn from(e: io::Error) -> Self {
        Self { kind: e.kind(), message: e.to_string() }
    }
}

impl From<&io::Error> for SocketError {
    fn from(e: &io::Error) -> Self {
        Self { kind: e.kind(), message: e.to_string() }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The application closed the connection (after a graceful drain, or at once).
    #[error("connection closed locally")]
    LocallyClosed,
    /// nsqd closed the socket.
    #[error("nsqd closed the connection")]
    ServerClosed,
    /// Nothing arrived for `read_timeout`: nsqd stopped sending heartbeats.
    #[error("no data from nsqd within the read timeout (missed heartbeats)")]
    ReadTimeout,
    /// nsqd sent a fatal error frame, after which it closes the connection.
    #[error("nsqd: {0}")]
    Server(ServerError),
    /// The byte stream is not valid NSQ framing (garbage, an oversized or short frame).
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// TLS or compression failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// nsqd sent something the protocol does not allow at this point.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The configuration asks for TLS but nsqd did not agree to it. Nothing was sent in clear
    /// beyond the IDENTIFY.
    #[error("TLS was required by the configuration but nsqd did not negotiate it")]
    TlsNotNegotiated,
    /// The socket could not be connected to `addr` (refused, unknown host, timed out),
    /// reported by the adapter through `handle_connect_failed`.
    #[error("dial {addr}: {error}")]
    Dial {
        /// The address dialled.
        addr: String,
        /// What the operating system said.
        error: SocketError,
    },
    /// Reading or writing the connected socket failed (reset by the peer, broken pipe, a write
    /// timeout), reported by the adapter through `handle_io_error`.
    #[error("socket: {0}")]
    Io(SocketError),
    /// nsqd requires AUTH but no `auth_secret` is configured.
    #[error("nsqd requires AUTH but no auth_secret is configured")]
    AuthRequired,
}

impl ConnectionError {
    /// Whether this is an orderly, locally requested close rather than a failure.
    pub fn is_local_close(&self) -> bool {
        matches!(self, Self::LocallyClosed)
    }

    /// Whether the dial itself failed (nothing was ever connected).
    pub fn is_dial(&self) -> bool {
        matches!(self, Self::Dial { .. })
    }
}

/// Why a publish did not succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// nsqd refused the publish.
    #[error("nsqd refused the publish: {0}")]
    Server(ServerError),
    /// The publish was written but the connection ended, for the reason given, before nsqd
    /// answered: it may or may not have been stored.
    #[error("connection lost before the publish was acknowledged: {0}")]
    ConnectionLost(ConnectionError),
    /// The connection could not be made (dial, TLS, AUTH or another handshake failure, given
    /// here), so the publish was never sent and nsqd did not store it.
    #[error("not sent: {0}")]
    NotConnected(ConnectionError),
    /// The publish was refused locally before anything was written.
    #[error(transparent)]
    Command(#[from] CommandError),
}

/// A call the connection refused; nothing was sent and the connection is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The connection is closed or closing and takes no new commands.
    #[error("the connection is closed")]
    Closed,
    /// FIN, REQ or TOUCH for a message that is not in flight on this connection (already
    /// answered, timed out, or never delivered here).
    #[error("message {0} is not in flight on this connection")]
    NotInFlight(MessageId),
    /// The command is not valid in the connection's current state (e.g. RDY before SUB).
    #[error("{command} is not allowed {reason}")]
    InvalidState {
        /// The refused command.
        command: &'static str,
        /// Why, e.g. "before SUB".
        reason: &'static str,
    },
    /// A message body is empty; nsqd refuses empty messages.
    #[error("message body is empty")]
    EmptyBody,
    /// A message body is larger than [`Config::max_msg_size`](crate::Config::max_msg_size)
    /// (1 MiB unless set otherwise).
    #[error("message body of {size} bytes exceeds the limit of {max} bytes")]
    BodyTooLarge {
        /// The body's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// MPUB with no messages.
    #[error("MPUB needs at least one message")]
    EmptyBatch,
    /// A DPUB delay outside nsqd's range.
    #[error("DPUB delay of {delay_ms} ms is out of range 0..={max_ms} ms")]
    DelayOutOfRange {
        /// The delay asked for.
        delay_ms: u128,
        /// The largest delay nsqd accepts.
        max_ms: u128,
    },
}
