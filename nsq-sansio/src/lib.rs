//! A sans-IO client core for [NSQ](https://nsq.io): the whole protocol, with no sockets, no
//! clock and no async.
//!
//! Most applications want a runtime crate built on this one: `nsq-tokio`, `nsq-async-std` or
//! `nsq-smol`. Use `nsq-sansio` directly to embed NSQ in your own event loop (mio, io_uring,
//! blocking sockets), or to test and fuzz protocol logic deterministically.
//!
//! # What is here
//!
//! - [`ConnectionState`]: one nsqd connection. Handshake and feature negotiation (IDENTIFY,
//!   TLS through rustls, snappy or deflate, AUTH), heartbeats, message delivery with in-flight
//!   tracking, FIN/REQ/TOUCH/RDY, publishes matched to their responses, graceful CLS.
//! - [`ProducerState`]: publishes to one nsqd with lazy connection and FIFO transaction
//!   matching.
//! - [`ProducerPoolState`]: publishes over several nsqds by a [`Strategy`] (failover, round
//!   robin, all), with bounded retries on another nsqd and per-nsqd health.
//! - [`ConsumerState`]: one topic/channel across many nsqds: RDY distribution, backoff,
//!   redials, lookupd polling (HTTP, and TLS for `https://`, in the core), max attempts,
//!   graceful stop.
//! - The codec: [`Command`] encoding, frame [`decode`] and [`decode_joined`],
//!   [`Topic`]/[`Channel`] validation, [`Config`] with every go-nsq option.
//!
//! # The run loop
//!
//! Every state machine has the same shape. Feed it input with `handle_input` (bytes read),
//! `handle_eof` and `handle_timeout`, call commands on it, and after each of those drain its
//! outputs: `poll_transmit` (bytes to write), `poll_action` (sockets to open or close; producer
//! and consumer only), `poll_event` (what the application should know), and finally
//! `poll_timeout` (when to call `handle_timeout` next). Time is always an argument.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Instant;
//! use bytes::BytesMut;
//! use nsq_sansio::{Channel, Config, ConnectionState, Event, Topic};
//!
//! let now = Instant::now();
//! let mut conn = ConnectionState::new(Arc::new(Config::new()), "127.0.0.1", now);
//! conn.subscribe(&Topic::new("events")?, &Channel::new("archive")?)?;
//!
//! // Write what the core queued: the magic and IDENTIFY (the SUB waits for the handshake).
//! let out = conn.poll_transmit().unwrap();
//! assert!(out.starts_with(b"  V2IDENTIFY\n"));
//!
//! // nsqd answers IDENTIFY; the SUB goes out; nsqd accepts it.
//! conn.handle_input(now, BytesMut::from(&b"\0\0\0\x06\0\0\0\0OK"[..]));
//! assert_eq!(conn.poll_transmit().unwrap(), "SUB events archive\n");
//! conn.handle_input(now, BytesMut::from(&b"\0\0\0\x06\0\0\0\0OK"[..]));
//! assert!(matches!(conn.poll_event(), Some(Event::Ready(_))));
//! assert!(matches!(conn.poll_event(), Some(Event::Subscribed)));
//!
//! conn.ready(100)?;
//! assert_eq!(conn.poll_transmit().unwrap(), "RDY 100\n");
//! // Arm a timer for the next deadline (read timeout, message expiry).
//! assert!(conn.poll_timeout().is_some());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/blocking.rs` runs this loop over a blocking `std::net::TcpStream` in under 150
//! lines: connect, then repeat: write everything `poll_transmit` returns, hand every
//! `poll_event` to the application, and block on a read with the socket timeout set to
//! `poll_timeout`; feed what was read to `handle_input`, end of file to `handle_eof`, and a
//! timed-out read to `handle_timeout`.
//!
//! # Driving a producer or consumer
//!
//! [`ProducerState`], [`ProducerPoolState`] and [`ConsumerState`] own several connections,
//! each named by a [`ConnId`]: one per nsqd, and one per lookupd query. They decide which
//! sockets exist; the event loop opens and closes sockets when told, and every input and
//! output names its connection.
//!
//! | the state machine says | the event loop does | and answers |
//! |---|---|---|
//! | [`Action::Connect`] `{ conn, addr, local_addr, timeout, write_timeout }` | resolves `addr` (`host:port`), binds to `local_addr` when set, connects with TCP_NODELAY, within `timeout` | `handle_connected(conn)`, or `handle_connect_failed(conn, error)` with the `std::io::Error` ([`TimedOut`](std::io::ErrorKind::TimedOut) past `timeout`) |
//! | `poll_transmit_for(conn)` returns bytes | writes them all, keeping what a partial write left, and asks again only once they are written: what queued meanwhile then leaves as one write | `handle_io_error(conn, error)` if writing fails, or has not finished after `write_timeout` ([`TimedOut`](std::io::ErrorKind::TimedOut)) |
//! | nothing: the socket is readable | reads | `handle_input(conn, bytes)`; at end of file `handle_eof(conn)`; if reading fails `handle_io_error(conn, error)` |
//! | [`Action::Close`] `{ conn }` | writes what `poll_transmit_for(conn)` still returns (the last FINs, CLS, TLS close_notify), shuts the socket down and drops it; a socket still being dialled is just dropped | nothing: no more input for `conn` |
//! | `poll_timeout` returns a time | wakes up no later than that | `handle_timeout(now)` |
//!
//! The order, each time round the loop:
//!
//! 1. Carry out every `poll_action`, then write `poll_transmit_for` for each connected socket
//!    whose last write finished; again until neither gives anything (closing, or a failed
//!    write reported, can make the machine decide more).
//! 2. Hand every `poll_event` to the application. Its answers (`respond`, `publish`, `stop`)
//!    queue output for step 1.
//! 3. Sleep until a socket is ready, `poll_timeout` passes, or one of the loop's own dial or
//!    write deadlines does.
//! 4. Feed back what happened with the `handle_*` calls, and `handle_timeout` once
//!    `poll_timeout` passed (calling it early does nothing).
//!
//! `stop` ends with [`ConsumerEvent::Stopped`] or [`ProducerEvent::Stopped`], which comes
//! with the [`Action::Close`]s of the last connections: carry those out too, and leave the
//! loop once every socket is closed. Connection ids are per state machine (each one starts at
//! `ConnId(0)`), so a loop that drives several keys its sockets by machine and connection.
//!
//! All three implement [`Machine`], the I/O half in one trait, so a loop can be written once
//! for any of them (and drive several: `Vec<Box<dyn Machine>>`); their events, which differ,
//! are drained with each one's own `poll_event`. `examples/mio/` is such a loop.
//!
//! A lookupd query (a consumer's, or a pool's) is driven exactly like an nsqd connection:
//! [`Action::Connect`] to the lookupd, the HTTP request out of `poll_transmit_for`, the
//! response into `handle_input` and `handle_eof`, then [`Action::Close`]. HTTP, TLS for
//! `https://` lookupds and JSON happen in the core, so the loop need not know which is which.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Instant;
//! use bytes::BytesMut;
//! use nsq_sansio::{Action, Config, ProducerEvent, ProducerState, Topic};
//!
//! let now = Instant::now();
//! let mut producer = ProducerState::new("127.0.0.1:4150", Arc::new(Config::new()), now);
//! let tx = producer.publish(&Topic::new("events")?, "hello".into(), now)?;
//!
//! // Publishing dials: open the socket asked for and say how it went.
//! let Some(Action::Connect { conn, addr, .. }) = producer.poll_action() else { panic!() };
//! assert_eq!(addr, "127.0.0.1:4150");
//! producer.handle_connected(conn, now);
//!
//! // Write what the connection has: the handshake first, the PUB once nsqd accepted it.
//! assert!(producer.poll_transmit_for(conn).unwrap().starts_with(b"  V2IDENTIFY\n"));
//! producer.handle_input(conn, now, BytesMut::from(&b"\0\0\0\x06\0\0\0\0OK"[..]));
//! assert!(producer.poll_transmit_for(conn).unwrap().starts_with(b"PUB events\n"));
//! producer.handle_input(conn, now, BytesMut::from(&b"\0\0\0\x06\0\0\0\0OK"[..]));
//! assert!(matches!(producer.poll_event(), Some(ProducerEvent::Connected(c)) if c == conn));
//! assert!(matches!(producer.poll_event(), Some(ProducerEvent::Published { tx: t, result: Ok(()) }) if t == tx));
//!
//! // Stopping closes the connection; the loop closes the socket.
//! producer.stop(now);
//! assert_eq!(producer.poll_action(), Some(Action::Close { conn }));
//! assert!(producer.poll_transmit_for(conn).is_none(), "a producer has no last words");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/mio/` is this loop on one mio `Poll`: a [`ConsumerState`] that finds its nsqds
//! through nsqlookupd and a [`ProducerState`] per nsqd, side by side on one thread.
//! `reactor.rs` carries out the actions for any number of state machines (dial timeout,
//! partial writes, write timeout, closing); `round_trip.rs` is the application.
//!
//! # Failures
//!
//! What nsqd or the network did arrives as an event carrying its cause: a connection ends with
//! [`Event::Closed`] and a [`ConnectionError`] (the adapter's [`SocketError`] for a refused
//! dial or a reset socket, nsqd's [`ServerError`], a TLS alert); a publish fails with a
//! [`PublishError`] that says whether it was sent ([`PublishError::ConnectionLost`]: maybe
//! stored) or not ([`PublishError::NotConnected`]). What the caller did wrong is an `Err` from
//! the call. The producer and consumer state machines decide every retry, each with a delay, a
//! cap and jitter: their docs give the exact schedules.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod action;
mod config;
mod connection;
mod consumer;
#[cfg(feature = "driver")]
pub mod driver;
mod error;
#[cfg(feature = "__fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod lookupd;
mod producer;
mod protocol;
mod rng;
mod timer;
mod transport;

pub use action::{Action, ConnId, Machine};
pub use config::{BackoffStrategy, Config, ConfigError, MAX_MSG_SIZE_LIMIT, MESSAGE_FRAME_OVERHEAD};
pub use connection::{
    AuthResponse, ConnectionState, ConnectionStats, Event, Phase, PublishId, DEFAULT_MAX_DEFER, DEFAULT_MAX_MSG_SIZE,
    DEFAULT_MAX_RDY_COUNT, MAX_UNANSWERED_WRITES,
};
pub use consumer::{ConsumerError, ConsumerEvent, ConsumerState, ConsumerStats, Response};
pub use error::{CommandError, ConnectionError, PublishError, SocketError};
pub use lookupd::{
    parse_response as parse_lookup_response, Lookup, LookupProducer, LookupdAddress, LookupdError, MAX_LOOKUPD_RESPONSE,
};
pub use producer::{
    Health, NsqdStats, PoolError, PoolEvent, PoolOptions, ProducerEvent, ProducerPoolState, ProducerState, Strategy,
    TxId,
};
pub use protocol::command::Command;
pub use protocol::frame::{
    decode, decode_joined, ErrorCode, Frame, FrameError, ServerError, CLOSE_WAIT, FRAME_HEADER_LEN, FRAME_TYPE_ERROR,
    FRAME_TYPE_MESSAGE, FRAME_TYPE_RESPONSE, HEARTBEAT, OK,
};
pub use protocol::identify::IdentifyResponse;
pub use protocol::message::Message;
pub use protocol::{Channel, MessageId, NameError, Topic, MAGIC_V2, MAX_NAME_LEN};
pub use transport::{TlsOptions, TlsVersion, TransportError};
