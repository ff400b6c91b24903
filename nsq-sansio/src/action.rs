//! I/O a [`ProducerState`](crate::ProducerState) or [`ConsumerState`](crate::ConsumerState) has
//! decided on and an adapter carries out.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::SocketError;

/// Identifies one connection of a producer or consumer: to an nsqd, or a consumer's lookupd
/// query. Never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// Something the adapter must do. Drain with `poll_action` after every input.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Open a TCP connection to `addr` (`host:port`) with TCP_NODELAY, from `local_addr` when
    /// set, giving up after `timeout`. Report the outcome with `handle_connected` or
    /// `handle_connect_failed`; once connected, fail a write that takes longer than
    /// `write_timeout`.
    Connect {
        /// The connection this socket is for.
        conn: ConnId,
        /// `host:port` of the nsqd (or, for a consumer's lookupd query, of the lookupd).
        addr: String,
        /// The local address to bind the socket to before connecting (`Config::local_addr`
        /// for nsqd connections; lookupd queries get the one the OS chooses, as in go-nsq).
        local_addr: Option<SocketAddr>,
        /// How long the dial may take: `dial_timeout` for nsqd, `lookupd_poll_timeout` for a
        /// lookupd query. A dial that takes longer fails with [`std::io::ErrorKind::TimedOut`].
        timeout: Duration,
        /// How long one write of what `poll_transmit` returned may take (`write_timeout`): a
        /// write that has not finished by then is reported with `handle_io_error` as
        /// [`std::io::ErrorKind::TimedOut`], as go-nsq's write deadline does.
        write_timeout: Duration,
    },
    /// Close `conn`'s socket once what is still pending for it is written: call
    /// `poll_transmit` (or `poll_transmit_for(conn)`) first, it may return the connection's
    /// last bytes (final FINs, CLS, TLS close_notify). No more input is expected for it. A
    /// socket still being dialled is dropped, and how its dial ends is not reported.
    Close {
        /// The connection to close.
        conn: ConnId,
    },
}

impl Action {
    /// The dial of an nsqd connection, with the timeouts and local address of `config`.
    pub(crate) fn dial_nsqd(conn: ConnId, addr: &str, config: &crate::Config) -> Self {
        Self::Connect {
            conn,
            addr: addr.to_owned(),
            local_addr: config.local_addr,
            timeout: config.dial_timeout,
            write_timeout: config.write_timeout,
        }
    }
}

/// The I/O side every producer and consumer state machine ([`ConsumerState`],
/// [`ProducerState`], [`ProducerPoolState`]) shares, so one event loop can drive any of them,
/// several side by side: carry out [`poll_action`](Self::poll_action), write what
/// [`poll_transmit_for`](Self::poll_transmit_for) returns, feed back what the sockets did, and
/// sleep until [`poll_timeout`](Self::poll_timeout). Each method is the state machine's inherent
/// method of the same name; the events, which differ per machine, are drained with its own
/// `poll_event`.
///
/// [`ConsumerState`]: crate::ConsumerState
/// [`ProducerState`]: crate::ProducerState
/// [`ProducerPoolState`]: crate::ProducerPoolState
pub trait Machine {
    /// The socket of `conn` connected.
    fn handle_connected(&mut self, conn: ConnId, now: Instant);
    /// The socket of `conn` could not be connected (a `std::io::Error` converts with `.into()`).
    fn handle_connect_failed(&mut self, conn: ConnId, error: SocketError, now: Instant);
    /// Bytes read from `conn`'s socket.
    fn handle_input(&mut self, conn: ConnId, now: Instant, data: BytesMut);
    /// `conn`'s socket reached end of file.
    fn handle_eof(&mut self, conn: ConnId, now: Instant);
    /// Reading or writing `conn`'s socket failed.
    fn handle_io_error(&mut self, conn: ConnId, error: SocketError, now: Instant);
    /// Lets timers fire.
    fn handle_timeout(&mut self, now: Instant);
    /// The next I/O to carry out.
    fn poll_action(&mut self) -> Option<Action>;
    /// Bytes to write to `conn`'s socket.
    fn poll_transmit_for(&mut self, conn: ConnId) -> Option<Bytes>;
    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    fn poll_timeout(&self) -> Option<Instant>;
}

/// Implements [`Machine`] by calling the inherent methods of the same names.
macro_rules! machine {
    ($($ty:ty),*) => {$(
        impl Machine for $ty {
            fn handle_connected(&mut self, conn: ConnId, now: Instant) {
                self.handle_connected(conn, now)
            }
            fn handle_connect_failed(&mut self, conn: ConnId, error: SocketError, now: Instant) {
                self.handle_connect_failed(conn, error, now)
            }
            fn handle_input(&mut self, conn: ConnId, now: Instant, data: BytesMut) {
                self.handle_input(conn, now, data)
            }
            fn handle_eof(&mut self, conn: ConnId, now: Instant) {
                self.handle_eof(conn, now)
            }
            fn handle_io_error(&mut self, conn: ConnId, error: SocketError, now: Instant) {
                self.handle_io_error(conn, error, now)
            }
            fn handle_timeout(&mut self, now: Instant) {
                self.handle_timeout(now)
            }
            fn poll_action(&mut self) -> Option<Action> {
                self.poll_action()
            }
            fn poll_transmit_for(&mut self, conn: ConnId) -> Option<Bytes> {
                self.poll_transmit_for(conn)
            }
            fn poll_timeout(&self) -> Option<Instant> {
                self.poll_timeout()
            }
        }
    )*};
}

machine!(crate::ConsumerState, crate::ProducerState, crate::ProducerPoolState);
