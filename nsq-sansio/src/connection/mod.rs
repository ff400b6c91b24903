//! [`ConnectionState`]: one nsqd TCP connection as a pure state machine.

mod in_flight;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use tracing::{debug, trace};

use crate::error::{CommandError, ConnectionError, PublishError, SocketError};
use crate::protocol::command::Command;
use crate::protocol::frame::{self, Frame, ServerError, CLOSE_WAIT, OK};
use crate::protocol::identify::{IdentifyRequest, IdentifyResponse};
use crate::timer::TimerTable;
use crate::transport::{self, Transport};
use crate::{Channel, Config, Message, MessageId, Topic};

use in_flight::InFlight;
pub(crate) use in_flight::{deadline, IdHasher};

/// The RDY ceiling nsqd uses when IDENTIFY has not said otherwise.
pub const DEFAULT_MAX_RDY_COUNT: u32 = 2500;
/// nsqd's default `--max-msg-size`, the largest message body it accepts, and so the default of
/// [`Config::max_msg_size`].
pub const DEFAULT_MAX_MSG_SIZE: usize = 1024 * 1024;
/// nsqd's default `--max-req-timeout`: the longest DPUB deferral it accepts.
pub const DEFAULT_MAX_DEFER: Duration = Duration::from_secs(3600);
/// nsqd's default `--msg-timeout`, used until IDENTIFY says otherwise.
const DEFAULT_MSG_TIMEOUT: Duration = Duration::from_secs(60);
/// Plaintext a transport layer may produce beyond one maximal frame before the framing layer
/// consumes it.
const RX_SLACK: usize = 64 * 1024;
/// Writes carrying publishes that nsqd may have unanswered before the next one waits: what is
/// queued meanwhile goes out in one write when the oldest is answered. nsqd answers each
/// publish with a write of its own, so a busy producer would otherwise send a few publishes
/// per write, each write waking nsqd; this way every write carries what its callers queued
/// during a round trip, and nsqd always has the next writes waiting in its socket.
///
/// The wait lasts at most `write_timeout` from the oldest write: an nsqd that stopped reading
/// must still meet the write timeout, as it would without the wait.
pub const MAX_UNANSWERED_WRITES: usize = 4;

/// Identifies one publish on a connection; [`Event::Published`] carries it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublishId(pub u64);

/// What nsqd's auth server said about the secret (the AUTH response).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct AuthResponse {
    /// The identity the secret maps to.
    pub identity: String,
    /// A URL describing the identity.
    pub identity_url: String,
    /// How many topic/channel permissions the identity holds.
    pub permission_count: u64,
}

/// Something the application should know about. Drain with [`ConnectionState::poll_event`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// The handshake finished: IDENTIFY negotiated, TLS and compression on, AUTH accepted.
    /// Commands queued before this are now sent. `None` when nsqd answered IDENTIFY with a plain
    /// `OK` (no feature negotiation).
    Ready(Option<Box<IdentifyResponse>>),
    /// nsqd accepted the AUTH secret.
    Authenticated(AuthResponse),
    /// nsqd accepted the SUB.
    Subscribed,
    /// A message arrived; answer it with [`finish`](ConnectionState::finish),
    /// [`requeue`](ConnectionState::requeue) or [`touch`](ConnectionState::touch).
    Message(Message),
    /// nsqd answered a publish, or the connection ended before it could.
    Published {
        /// The id [`publish`](ConnectionState::publish) returned.
        id: PublishId,
        /// `Ok` once nsqd acknowledged it.
        result: Result<(), PublishError>,
    },
    /// A message's `msg_timeout` passed without an answer: nsqd has requeued it, and FIN, REQ
    /// and TOUCH for it are refused from now on.
    MessageTimedOut(MessageId),
    /// A non-fatal error frame (`E_FIN_FAILED`, `E_REQ_FAILED`, `E_TOUCH_FAILED`).
    ServerError(ServerError),
    /// nsqd acknowledged CLS with `CLOSE_WAIT`: no new messages will arrive.
    CloseWait,
    /// The connection is over; always the last event. The adapter closes the socket after
    /// writing what [`poll_transmit`](ConnectionState::poll_transmit) still returns.
    Closed(ConnectionError),
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Magic and IDENTIFY sent; waiting for nsqd's answer.
    Identifying,
    /// TLS handshake under way; waiting for the `OK` that comes through it.
    TlsUpgrade,
    /// Compression switched on; waiting for the `OK` that comes through it.
    CompressionUpgrade,
    /// AUTH sent; waiting for the answer.
    Authenticating,
    /// Handshake done; commands flow.
    Ready,
    /// Closing: waiting for CLOSE_WAIT, in-flight messages and outstanding publishes.
    Closing,
    /// Terminal: every call returns [`CommandError::Closed`].
    Closed,
}

/// Counters for one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Messages delivered.
    pub messages_received: u64,
    /// FINs sent.
    pub messages_finished: u64,
    /// REQs sent.
    pub messages_requeued: u64,
    /// Messages whose msg_timeout passed unanswered.
    pub messages_timed_out: u64,
    /// Heartbeats answered with NOP.
    pub heartbeats: u64,
    /// Publishes acknowledged.
    pub published: u64,
}

/// What a response frame from nsqd answers, in the order the commands were sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Sub,
    Publish(PublishId),
    Cls,
}

#[derive(Debug, Clone, Copy)]
enum Timer {
    Read,
    MessageExpiry,
    Drain,
    /// The wait of held commands ends (see [`MAX_UNANSWERED_WRITES`]).
    Held,
}

impl From<Timer> for usize {
    fn from(t: Timer) -> Self {
        t as Self
    }
}

/// One nsqd connection: bytes in, bytes and events out, no I/O.
///
/// # Driving it
///
/// After every input (`handle_input`, `handle_eof`, `handle_timeout`) and every command call,
/// drain the outputs in this order: [`poll_transmit`](Self::poll_transmit) until `None` and write
/// the bytes, [`poll_event`](Self::poll_event) until `None`, then arm a timer for
/// [`poll_timeout`](Self::poll_timeout) (it moves when the others run). Once
/// [`is_closed`](Self::is_closed) is true and `poll_transmit` is empty, close the socket.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Instant;
/// use bytes::BytesMut;
/// use nsq_sansio::{Config, ConnectionState, Event, Topic};
///
/// let now = Instant::now();
/// let mut conn = ConnectionState::new(Arc::new(Config::new()), "127.0.0.1", now);
/// let id = conn.publish(&Topic::new("events").unwrap(), "hello".into()).unwrap();
/// // The magic and IDENTIFY go first; the PUB waits for the handshake.
/// let hello = conn.poll_transmit().unwrap();
/// assert!(hello.starts_with(b"  V2IDENTIFY\n"));
/// // nsqd answers IDENTIFY (here without feature negotiation), then the PUB.
/// conn.handle_input(now, BytesMut::from(&b"\0\0\0\x06\0\0\0\0OK"[..]));
/// assert!(conn.poll_transmit().unwrap().starts_with(b"PUB events\n"));
/// conn.handle_input(now, BytesMut::from(&b"\0\0\0\x06\0\0\0\0OK"[..]));
/// assert!(matches!(conn.poll_event(), Some(Event::Ready(None))));
/// assert!(matches!(conn.poll_event(), Some(Event::Published { id: p, result: Ok(()) }) if p == id));
/// ```
#[derive(Debug)]
pub struct ConnectionState {
    config: Arc<Config>,
    host: String,
    phase: Phase,
    transport: Transport,
    /// Plaintext received and not yet decoded into frames.
    rx: BytesMut,
    /// Plaintext commands to hand to the transport at the next `poll_transmit`.
    tx: BytesMut,
    /// Commands queued before the handshake finished.
    held: BytesMut,
    expect: VecDeque<Expect>,
    events: VecDeque<Event>,
    timers: TimerTable<Timer, 4>,
    in_flight: InFlight,
    negotiated: Option<IdentifyResponse>,
    subscribed: bool,
    cls_sent: bool,
    /// `close` was called mid-handshake with publishes held: they go out once the handshake
    /// is done, then the connection closes.
    close_requested: bool,
    max_rdy: u32,
    rdy: u32,
    rdy_remaining: u32,
    next_publish: u64,
    /// Publishes handed to the transport: those below this id.
    publishes_out: u64,
    /// The last publish of each write whose publishes nsqd has not all answered, and when it
    /// was written, oldest first.
    unanswered_writes: VecDeque<(u64, Instant)>,
    now: Instant,
    last_message: Option<Instant>,
    stats: ConnectionStats,
}

impl ConnectionState {
    /// A new connection to the nsqd at `host` (the name dialled; TLS verifies the server
    /// certificate against it unless `TlsOptions::server_name` says otherwise).
    ///
    /// The magic and IDENTIFY are queued at once: call [`poll_transmit`](Self::poll_transmit)
    /// as soon as the socket is connected.
    pub fn new(config: Arc<Config>, host: &str, now: Instant) -> Self {
        let mut tx = BytesMut::with_capacity(4096);
        Command::Magic.encode(&mut tx);
        let identify = IdentifyRequest::new(&config).to_json();
        Command::Identify(&identify).encode(&mut tx);
        let mut conn = Self {
            host: host.to_owned(),
            phase: Phase::Identifying,
            transport: Transport::new(),
            rx: BytesMut::new(),
            tx,
            held: BytesMut::new(),
            expect: VecDeque::new(),
            events: VecDeque::new(),
            timers: TimerTable::default(),
            in_flight: InFlight::with_capacity(config.max_in_flight.min(DEFAULT_MAX_RDY_COUNT) as usize),
            negotiated: None,
            subscribed: false,
            cls_sent: false,
            close_requested: false,
            max_rdy: DEFAULT_MAX_RDY_COUNT,
            rdy: 0,
            rdy_remaining: 0,
            next_publish: 0,
            publishes_out: 0,
            unanswered_writes: VecDeque::new(),
            now,
            last_message: None,
            stats: ConnectionStats::default(),
            config,
        };
        conn.arm_read_timer();
        conn
    }

    // ---- input -------------------------------------------------------------------------------

    /// Feeds bytes read from the socket (ciphertext once TLS is on).
    ///
    /// Pass each read as an owned buffer, e.g. `read_buf.split()`: without TLS and compression
    /// its frames are decoded in place, and of a frame split across reads only the bytes that
    /// complete it are copied (none when both reads come from one allocation).
    pub fn handle_input(&mut self, now: Instant, data: BytesMut) {
        self.advance_clock(now);
        if self.phase == Phase::Closed {
            return;
        }
        self.arm_read_timer();
        if self.transport.is_plain() {
            match frame::decode_joined(&mut self.rx, data, self.config.frame_limit()) {
                Ok(Some(frame)) => self.handle_frame(frame),
                Ok(None) => {}
                Err(e) => return self.fail(e.into()),
            }
        } else {
            let limit = self.rx_limit();
            if let Err(e) = self.transport.recv(data, &mut self.rx, limit) {
                return self.fail(e.into());
            }
        }
        self.process_rx();
    }

    /// The socket reached end of file: nsqd closed the connection.
    pub fn handle_eof(&mut self, now: Instant) {
        self.advance_clock(now);
        if self.phase == Phase::Closed {
            return;
        }
        if self.phase == Phase::Closing && self.cls_sent && self.in_flight.is_empty() && self.expect.is_empty() {
            self.finish_close(ConnectionError::LocallyClosed);
        } else {
            self.fail(ConnectionError::ServerClosed);
        }
    }

    /// Reading or writing the socket failed (reset by the peer, broken pipe, a write timeout):
    /// the connection ends with [`ConnectionError::Io`] carrying the cause.
    pub fn handle_io_error(&mut self, now: Instant, error: SocketError) {
        self.advance_clock(now);
        if self.phase != Phase::Closed {
            self.fail(ConnectionError::Io(error));
        }
    }

    /// Lets timers fire: the read timeout, message expiry, the close drain. Calling it early or
    /// twice does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance_clock(now);
        if self.phase == Phase::Closed {
            return;
        }
        if self.timers.expire(Timer::Read, self.now) {
            debug!(host = %self.host, "read timeout");
            return self.fail(ConnectionError::ReadTimeout);
        }
        while let Some(id) = self.in_flight.pop_expired(self.now) {
            trace!(%id, "message timed out in flight");
            self.stats.messages_timed_out += 1;
            self.events.push_back(Event::MessageTimedOut(id));
        }
        self.arm_expiry_timer();
        // What waited goes out at the next `poll_transmit`.
        self.timers.expire(Timer::Held, self.now);
        if self.timers.expire(Timer::Drain, self.now) {
            debug!(host = %self.host, in_flight = self.in_flight.len(), "close drain deadline passed");
            return self.finish_close(ConnectionError::LocallyClosed);
        }
        self.maybe_finish_close();
    }

    // ---- application commands ---------------------------------------------------------------

    /// Subscribes to `topic`/`channel`. A connection subscribes at most once.
    pub fn subscribe(&mut self, topic: &Topic, channel: &Channel) -> Result<(), CommandError> {
        self.check_open()?;
        if self.subscribed {
            return Err(CommandError::InvalidState { command: "SUB", reason: "twice on one connection" });
        }
        self.subscribed = true;
        self.expect.push_back(Expect::Sub);
        self.queue(Command::Sub(topic, channel));
        Ok(())
    }

    /// Sends `RDY count`: how many messages nsqd may have in flight to us. The count is clamped
    /// to the negotiated `max_rdy_count`; the count sent is returned.
    pub fn ready(&mut self, count: u32) -> Result<u32, CommandError> {
        self.check_open()?;
        if !self.subscribed {
            return Err(CommandError::InvalidState { command: "RDY", reason: "before SUB" });
        }
        let count = count.min(self.max_rdy);
        self.rdy = count;
        self.rdy_remaining = count;
        self.queue(Command::Rdy(count));
        Ok(count)
    }

    /// Sends `FIN`: the message was handled.
    pub fn finish(&mut self, id: &MessageId) -> Result<(), CommandError> {
        self.take_answerable(id)?;
        self.stats.messages_finished += 1;
        self.queue(Command::Fin(id));
        self.maybe_finish_close();
        Ok(())
    }

    /// Sends `REQ`: nsqd redelivers the message after `delay` (nsqd caps it at its
    /// `--max-req-timeout`). Backoff is the consumer's business, not the connection's.
    pub fn requeue(&mut self, id: &MessageId, delay: Duration) -> Result<(), CommandError> {
        self.take_answerable(id)?;
        self.stats.messages_requeued += 1;
        self.queue(Command::Req(id, delay));
        self.maybe_finish_close();
        Ok(())
    }

    /// Sends `TOUCH`: nsqd restarts the message's timeout, from `now`.
    pub fn touch(&mut self, id: &MessageId, now: Instant) -> Result<(), CommandError> {
        self.advance_clock(now);
        self.check_answerable(id)?;
        let timeout = self.msg_timeout();
        self.in_flight.touch(id, deadline(self.now, timeout));
        self.arm_expiry_timer();
        self.queue(Command::Touch(id));
        Ok(())
    }

    /// Sends `PUB`. The result arrives as [`Event::Published`] with the returned id.
    pub fn publish(&mut self, topic: &Topic, body: Bytes) -> Result<PublishId, CommandError> {
        self.check_publish()?;
        self.config.check_body(&body)?;
        self.queue(Command::Pub(topic, &body));
        Ok(self.expect_publish())
    }

    /// Sends `MPUB`: several messages stored atomically. One [`Event::Published`] answers all.
    pub fn multi_publish(&mut self, topic: &Topic, bodies: &[Bytes]) -> Result<PublishId, CommandError> {
        self.check_publish()?;
        self.config.check_batch(bodies)?;
        self.queue(Command::Mpub(topic, bodies));
        Ok(self.expect_publish())
    }

    /// Sends `NOP`, which nsqd reads and does not answer: a write that checks the connection
    /// (go-nsq's producer `Ping`). Queued until the handshake is done, like every command.
    pub fn nop(&mut self) -> Result<(), CommandError> {
        self.check_open()?;
        self.queue(Command::Nop);
        Ok(())
    }

    /// Sends `DPUB`: nsqd delivers the message after `delay` (at most one hour by default).
    pub fn deferred_publish(&mut self, topic: &Topic, delay: Duration, body: Bytes) -> Result<PublishId, CommandError> {
        self.check_publish()?;
        self.config.check_deferred(delay, &body)?;
        self.queue(Command::Dpub(topic, delay, &body));
        Ok(self.expect_publish())
    }

    /// Starts a graceful close.
    ///
    /// A subscribed connection sends `CLS` and waits for `CLOSE_WAIT`, for every in-flight message
    /// to be answered and for outstanding publishes to be acknowledged, at most until the
    /// message timeout passes (after which nsqd requeues whatever is left). Then it ends with
    /// [`Event::Closed`]`(`[`ConnectionError::LocallyClosed`]`)`. New commands are refused from
    /// now on; FIN, REQ and TOUCH for in-flight messages are still accepted.
    ///
    /// Called mid-handshake, it closes at once unless publishes are waiting for the handshake:
    /// those go out when it completes and are answered before the connection closes (within
    /// the same bound).
    pub fn close(&mut self, now: Instant) {
        self.advance_clock(now);
        if self.close_requested {
            return;
        }
        match self.phase {
            Phase::Closed | Phase::Closing => return,
            Phase::Ready if self.subscribed => {
                self.cls_sent = true;
                self.expect.push_back(Expect::Cls);
                Command::Cls.encode(&mut self.tx);
            }
            Phase::Ready => {}
            // Mid-handshake with publishes held: finish the handshake, send them, then close.
            _ if self.outstanding_publishes() > 0 => {
                self.close_requested = true;
                self.timers.set(Timer::Drain, deadline(self.now, self.msg_timeout()));
                return;
            }
            // Mid-handshake there is nothing else to drain.
            _ => return self.finish_close(ConnectionError::LocallyClosed),
        }
        self.phase = Phase::Closing;
        let drain = self.msg_timeout();
        self.timers.set(Timer::Drain, deadline(self.now, drain));
        self.maybe_finish_close();
    }

    /// Ends the connection at once because of `reason` (e.g. the dial failed).
    pub(crate) fn fail_with(&mut self, now: Instant, reason: ConnectionError) {
        self.advance_clock(now);
        self.finish_close(reason);
    }

    /// Ends the connection at once, without draining. In-flight messages are requeued by nsqd
    /// after their timeout; outstanding publishes fail with [`PublishError::ConnectionLost`]
    /// (or [`PublishError::NotConnected`] if the handshake had not finished).
    pub fn abort(&mut self, now: Instant) {
        self.advance_clock(now);
        if self.phase != Phase::Closed {
            self.finish_close(ConnectionError::LocallyClosed);
        }
    }

    // ---- output ------------------------------------------------------------------------------

    /// The bytes to write next: everything queued since the last call, as one buffer. While
    /// [`MAX_UNANSWERED_WRITES`] writes of publishes await nsqd's answers, commands wait for
    /// the oldest to be answered.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if !self.tx.is_empty() && !self.holds() {
            if self.next_publish > self.publishes_out {
                self.unanswered_writes.push_back((self.next_publish - 1, self.now));
                self.publishes_out = self.next_publish;
            }
            if let Err(e) = self.transport.send(&mut self.tx) {
                self.fail(e.into());
            }
        }
        self.transport.poll_transmit()
    }

    /// Whether [`poll_event`](Self::poll_event) has an event.
    pub(crate) fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next event for the application.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next; `None` once closed.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    // ---- getters -----------------------------------------------------------------------------

    /// The connection's phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Whether the handshake is done and the connection takes commands.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// The settings nsqd negotiated, once IDENTIFY was answered.
    pub fn negotiated(&self) -> Option<&IdentifyResponse> {
        self.negotiated.as_ref()
    }

    /// The highest RDY count nsqd accepts on this connection.
    pub fn max_rdy_count(&self) -> u32 {
        self.max_rdy
    }

    /// The last RDY count sent.
    pub fn rdy(&self) -> u32 {
        self.rdy
    }

    /// How many more messages nsqd may send before the RDY count runs out.
    pub fn rdy_remaining(&self) -> u32 {
        self.rdy_remaining
    }

    /// Messages delivered and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether `id` is in flight on this connection.
    pub fn is_in_flight(&self, id: &MessageId) -> bool {
        self.in_flight.contains(id)
    }

    /// Publishes sent and not yet answered.
    pub fn outstanding_publishes(&self) -> usize {
        self.expect.iter().filter(|e| matches!(e, Expect::Publish(_))).count()
    }

    /// When the last message arrived.
    pub fn last_message_at(&self) -> Option<Instant> {
        self.last_message
    }

    /// The message timeout in force: negotiated, else configured, else nsqd's default.
    pub fn msg_timeout(&self) -> Duration {
        match &self.negotiated {
            Some(n) if n.msg_timeout > 0 => Duration::from_millis(n.msg_timeout),
            _ => self.config.msg_timeout.unwrap_or(DEFAULT_MSG_TIMEOUT),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ConnectionStats {
        self.stats
    }

    /// The host this connection was made for.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The internal buffers' sizes, for the fuzz targets' bound checks.
    #[cfg(feature = "__fuzzing")]
    pub(crate) fn buffered(&self) -> Buffered {
        let (compressed, pending) = self.transport.buffered();
        Buffered {
            rx: self.rx.len(),
            tx: self.tx.len(),
            held: self.held.len(),
            compressed,
            pending,
            codec: self.transport.codec(),
            max_frame_size: self.config.frame_limit(),
            rx_head: self.rx.get(..4).map(|h| u32::from_be_bytes([h[0], h[1], h[2], h[3]])),
        }
    }

    // ---- internals ---------------------------------------------------------------------------

    fn advance_clock(&mut self, now: Instant) {
        // A clock that goes backwards is clamped.
        self.now = self.now.max(now);
    }

    fn rx_limit(&self) -> usize {
        self.config.frame_limit() as usize + frame::FRAME_HEADER_LEN + RX_SLACK
    }

    fn arm_read_timer(&mut self) {
        let at = deadline(self.now, self.config.read_timeout);
        self.timers.set(Timer::Read, at);
    }

    fn arm_expiry_timer(&mut self) {
        match self.in_flight.next_deadline() {
            Some(at) => self.timers.set(Timer::MessageExpiry, at),
            None => self.timers.stop(Timer::MessageExpiry),
        }
    }

    fn check_open(&self) -> Result<(), CommandError> {
        match self.phase {
            Phase::Closing | Phase::Closed => Err(CommandError::Closed),
            _ if self.close_requested => Err(CommandError::Closed),
            _ => Ok(()),
        }
    }

    fn check_publish(&self) -> Result<(), CommandError> {
        self.check_open()?;
        if self.subscribed {
            // nsqd allows it, but a consumer connection publishing would interleave its responses
            // with CLOSE_WAIT handling; keep the roles apart.
            return Err(CommandError::InvalidState { command: "PUB", reason: "on a subscribed connection" });
        }
        Ok(())
    }

    /// Takes `id` out of the in-flight table for its answer, in one lookup.
    fn take_answerable(&mut self, id: &MessageId) -> Result<(), CommandError> {
        if self.phase == Phase::Closed {
            return Err(CommandError::Closed);
        }
        if !self.in_flight.remove(id) {
            return Err(CommandError::NotInFlight(*id));
        }
        Ok(())
    }

    fn check_answerable(&self, id: &MessageId) -> Result<(), CommandError> {
        if self.phase == Phase::Closed {
            return Err(CommandError::Closed);
        }
        if !self.in_flight.contains(id) {
            return Err(CommandError::NotInFlight(*id));
        }
        Ok(())
    }

    /// nsqd answered publish `id`: the writes it ended are answered.
    fn answered(&mut self, id: PublishId) {
        while self.unanswered_writes.front().is_some_and(|&(last, _)| last <= id.0) {
            self.unanswered_writes.pop_front();
        }
        if self.unanswered_writes.len() < MAX_UNANSWERED_WRITES {
            self.timers.stop(Timer::Held);
        }
    }

    /// Whether queued commands wait for an answer: `MAX_UNANSWERED_WRITES` writes are out and
    /// the oldest was written within `write_timeout`. Arms the timer that ends the wait.
    fn holds(&mut self) -> bool {
        if self.unanswered_writes.len() < MAX_UNANSWERED_WRITES {
            return false;
        }
        let Some(&(_, written)) = self.unanswered_writes.front() else { return false };
        let until = deadline(written, self.config.write_timeout);
        if self.now >= until {
            return false;
        }
        self.timers.set(Timer::Held, until);
        true
    }

    fn expect_publish(&mut self) -> PublishId {
        let id = PublishId(self.next_publish);
        self.next_publish += 1;
        self.expect.push_back(Expect::Publish(id));
        id
    }

    /// Queues an application command: now if the handshake is done, else after it.
    fn queue(&mut self, cmd: Command<'_>) {
        match self.phase {
            Phase::Ready | Phase::Closing => cmd.encode(&mut self.tx),
            _ => cmd.encode(&mut self.held),
        }
    }

    /// Decodes and handles every complete frame in `rx`, pulling more plaintext from the
    /// transport while it has some buffered.
    fn process_rx(&mut self) {
        loop {
            while self.phase != Phase::Closed {
                match frame::decode(&mut self.rx, self.config.frame_limit()) {
                    Ok(Some(frame)) => self.handle_frame(frame),
                    Ok(None) => break,
                    Err(e) => return self.fail(e.into()),
                }
            }
            if self.phase == Phase::Closed || !self.transport.has_pending() {
                return;
            }
            let before = self.rx.len();
            let limit = self.rx_limit();
            if let Err(e) = self.transport.recv(BytesMut::new(), &mut self.rx, limit) {
                return self.fail(e.into());
            }
            if self.rx.len() == before {
                return;
            }
        }
    }

    fn handle_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Response(data) if data.as_ref() == frame::HEARTBEAT => {
                trace!(host = %self.host, "heartbeat");
                self.stats.heartbeats += 1;
                Command::Nop.encode(&mut self.tx);
            }
            Frame::Response(data) => self.handle_response(data),
            Frame::Error(err) => self.handle_error(err),
            Frame::Message(msg) => self.handle_message(msg),
        }
    }

    fn handle_response(&mut self, data: Bytes) {
        match self.phase {
            Phase::Identifying => self.handle_identify(&data),
            Phase::TlsUpgrade | Phase::CompressionUpgrade => {
                if data.as_ref() != OK {
                    return self.protocol_error("expected OK after the transport upgrade");
                }
                self.after_upgrade();
            }
            Phase::Authenticating => match serde_json::from_slice::<AuthResponse>(&data) {
                Ok(auth) => {
                    debug!(host = %self.host, identity = %auth.identity, "authenticated");
                    self.events.push_back(Event::Authenticated(auth));
                    self.become_ready();
                }
                Err(e) => self.protocol_error(&format!("bad AUTH response: {e}")),
            },
            Phase::Ready | Phase::Closing => match self.expect.pop_front() {
                Some(Expect::Sub) if data.as_ref() == OK => self.events.push_back(Event::Subscribed),
                Some(Expect::Publish(id)) if data.as_ref() == OK => {
                    self.answered(id);
                    self.stats.published += 1;
                    self.events.push_back(Event::Published { id, result: Ok(()) });
                    self.maybe_finish_close();
                }
                Some(Expect::Cls) if data.as_ref() == CLOSE_WAIT => {
                    self.events.push_back(Event::CloseWait);
                    self.maybe_finish_close();
                }
                Some(_) => self.protocol_error("unexpected response"),
                None => self.protocol_error("response with no command outstanding"),
            },
            Phase::Closed => {}
        }
    }

    fn handle_identify(&mut self, data: &[u8]) {
        if data == OK {
            // No feature negotiation: nothing was upgraded.
            if self.config.tls.enabled {
                return self.fail(ConnectionError::TlsNotNegotiated);
            }
            return self.become_ready();
        }
        let negotiated = match IdentifyResponse::parse(data) {
            Ok(n) => n,
            Err(e) => return self.protocol_error(&format!("bad IDENTIFY response: {e}")),
        };
        debug!(host = %self.host, ?negotiated, "identified");
        if negotiated.max_rdy_count > 0 {
            self.max_rdy = u32::try_from(negotiated.max_rdy_count).unwrap_or(u32::MAX);
        }
        let tls = negotiated.tls_v1;
        self.negotiated = Some(negotiated);
        if self.config.tls.enabled && !tls {
            return self.fail(ConnectionError::TlsNotNegotiated);
        }
        if tls {
            if let Err(e) = self.start_tls() {
                return self.fail(e);
            }
            self.phase = Phase::TlsUpgrade;
            return;
        }
        self.after_tls();
    }

    fn start_tls(&mut self) -> Result<(), ConnectionError> {
        let config = transport::tls::client_config(&self.config.tls)?;
        let name = transport::tls::server_name(&self.config.tls, &self.host)?;
        let leftover = self.rx.split();
        let limit = self.rx_limit();
        self.transport.start_tls(config, name, leftover, &mut self.rx, limit)?;
        Ok(())
    }

    fn after_upgrade(&mut self) {
        match self.phase {
            Phase::TlsUpgrade => self.after_tls(),
            _ => self.after_compression(),
        }
    }

    /// After TLS (or where there is none): switch on compression if negotiated.
    fn after_tls(&mut self) {
        let (snappy, deflate, level) = match &self.negotiated {
            Some(n) => (n.snappy, n.deflate, n.deflate_level),
            None => (false, false, 0),
        };
        if !snappy && !deflate {
            return self.after_compression();
        }
        let leftover = self.rx.split();
        let limit = self.rx_limit();
        let started = if snappy {
            self.transport.start_snappy(leftover, &mut self.rx, limit)
        } else {
            self.transport.start_deflate(level, leftover, &mut self.rx, limit)
        };
        if let Err(e) = started {
            return self.fail(e.into());
        }
        self.phase = Phase::CompressionUpgrade;
    }

    /// After the transport is complete: AUTH if required, else ready.
    fn after_compression(&mut self) {
        let auth_required = self.negotiated.as_ref().is_some_and(|n| n.auth_required);
        if !auth_required {
            return self.become_ready();
        }
        match &self.config.auth_secret {
            Some(secret) => {
                Command::Auth(secret.as_bytes()).encode(&mut self.tx);
                self.phase = Phase::Authenticating;
            }
            None => self.fail(ConnectionError::AuthRequired),
        }
    }

    fn become_ready(&mut self) {
        self.phase = Phase::Ready;
        let negotiated = self.negotiated.clone().map(Box::new);
        self.events.push_back(Event::Ready(negotiated));
        if !self.held.is_empty() {
            let held = self.held.split();
            self.tx.unsplit(held);
        }
        if self.close_requested {
            // The drain deadline armed by `close` still runs.
            self.phase = Phase::Closing;
            self.maybe_finish_close();
        }
    }

    fn handle_error(&mut self, err: ServerError) {
        if !err.is_fatal() {
            debug!(host = %self.host, %err, "non-fatal error");
            self.events.push_back(Event::ServerError(err));
            return;
        }
        debug!(host = %self.host, %err, "fatal error");
        // During the handshake the error is the handshake's; held commands were never sent.
        let sent = matches!(self.phase, Phase::Ready | Phase::Closing);
        if let (true, Some(Expect::Publish(id))) = (sent, self.expect.front().copied()) {
            self.expect.pop_front();
            self.answered(id);
            self.events.push_back(Event::Published { id, result: Err(PublishError::Server(err.clone())) });
        }
        self.fail(ConnectionError::Server(err));
    }

    fn handle_message(&mut self, msg: Message) {
        if !self.subscribed || !matches!(self.phase, Phase::Ready | Phase::Closing) {
            return self.protocol_error("message on a connection that is not subscribed");
        }
        self.stats.messages_received += 1;
        self.rdy_remaining = self.rdy_remaining.saturating_sub(1);
        self.last_message = Some(self.now);
        let at = deadline(self.now, self.msg_timeout());
        let first = self.in_flight.is_empty();
        self.in_flight.insert(msg.id, at);
        if first {
            self.timers.set(Timer::MessageExpiry, at);
        }
        self.events.push_back(Event::Message(msg));
    }

    fn protocol_error(&mut self, what: &str) {
        self.fail(ConnectionError::Protocol(what.to_owned()));
    }

    /// Ends the connection because of `err`.
    fn fail(&mut self, err: ConnectionError) {
        debug!(host = %self.host, %err, "connection failed");
        self.finish_close(err);
    }

    fn maybe_finish_close(&mut self) {
        if self.phase != Phase::Closing || !self.in_flight.is_empty() || !self.expect.is_empty() {
            return;
        }
        self.finish_close(ConnectionError::LocallyClosed);
    }

    fn finish_close(&mut self, reason: ConnectionError) {
        if self.phase == Phase::Closed {
            return;
        }
        // Before the handshake finished, held publishes were never sent.
        let sent = matches!(self.phase, Phase::Ready | Phase::Closing);
        self.phase = Phase::Closed;
        self.timers.clear();
        self.held.clear();
        self.unanswered_writes.clear();
        if !reason.is_local_close() {
            // Nothing more can be written usefully to a broken stream.
            self.tx.clear();
        }
        for expect in self.expect.drain(..) {
            if let Expect::Publish(id) = expect {
                let error = if sent {
                    PublishError::ConnectionLost(reason.clone())
                } else {
                    PublishError::NotConnected(reason.clone())
                };
                self.events.push_back(Event::Published { id, result: Err(error) });
            }
        }
        self.in_flight.clear();
        self.transport.close();
        self.events.push_back(Event::Closed(reason));
    }
}

/// See [`ConnectionState::buffered`].
#[cfg(feature = "__fuzzing")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buffered {
    /// Plaintext received and not decoded into frames.
    pub(crate) rx: usize,
    /// Plaintext commands not yet handed to the transport.
    pub(crate) tx: usize,
    /// Commands held until the handshake is done.
    pub(crate) held: usize,
    /// Compressed bytes the decompressor has not taken.
    pub(crate) compressed: usize,
    /// The decompressor stopped at the plaintext limit with input left.
    pub(crate) pending: bool,
    /// 0 plain, 1 snappy, 2 deflate.
    pub(crate) codec: u8,
    /// The frame size limit in force.
    pub(crate) max_frame_size: u32,
    /// The size field of the partial frame in `rx`, if 4 bytes of it arrived.
    pub(crate) rx_head: Option<u32>,
}
