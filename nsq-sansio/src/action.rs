//! I/O a [`ProducerState`](crate::ProducerState) or [`ConsumerState`](crate::ConsumerState) has
//! decided on and an adapter carries out.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

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
