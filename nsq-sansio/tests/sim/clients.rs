//! The glue to the client state machines. This is the only file that calls `ConsumerState`,
//! `ProducerState`, `ConnectionState` and `Config`, so an API change of theirs is adapted here
//! alone; the rest of the simulator sees the plain types below.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nsq_sansio::{
    Action, BackoffStrategy, Channel, Config, ConnId, ConnectionError, ConnectionState, ConsumerEvent, ConsumerState,
    Event, MessageId, ProducerEvent, ProducerState, PublishError, QueryId, Response, Topic,
};

/// The options the simulation varies, for either kind of client.
#[derive(Debug, Clone)]
pub struct Settings {
    pub rng_seed: u64,
    pub dial_timeout: Duration,
    pub read_timeout: Duration,
    /// `None`: heartbeats off (producers only: nsqd refuses SUB without them).
    pub heartbeat: Option<Duration>,
    /// `None`: nsqd's output buffering off.
    pub output_buffer: Option<(u64, Duration)>,
    pub msg_timeout: Option<Duration>,
    pub auth_secret: Option<String>,
    pub max_in_flight: u32,
    pub max_attempts: u16,
    pub lookupd_poll_interval: Duration,
    pub lookupd_poll_jitter: f64,
    pub default_requeue_delay: Duration,
    pub max_requeue_delay: Duration,
    pub backoff_multiplier: Duration,
    pub max_backoff_duration: Duration,
    pub full_jitter: bool,
    pub low_rdy_idle_timeout: Duration,
    pub low_rdy_timeout: Duration,
    pub rdy_redistribute_interval: Duration,
    /// Producers: PUBs queued during a write go out as one MPUB of at most this many.
    pub auto_batch: usize,
}

impl Default for Settings {
    /// go-nsq's defaults.
    fn default() -> Self {
        Self {
            rng_seed: 0,
            dial_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(60),
            heartbeat: Some(Duration::from_secs(30)),
            output_buffer: Some((16 * 1024, Duration::from_millis(250))),
            msg_timeout: None,
            auth_secret: None,
            max_in_flight: 1,
            max_attempts: 5,
            lookupd_poll_interval: Duration::from_secs(60),
            lookupd_poll_jitter: 0.3,
            default_requeue_delay: Duration::from_secs(90),
            max_requeue_delay: Duration::from_secs(15 * 60),
            backoff_multiplier: Duration::from_secs(1),
            max_backoff_duration: Duration::from_secs(120),
            full_jitter: false,
            low_rdy_idle_timeout: Duration::from_secs(10),
            low_rdy_timeout: Duration::from_secs(30),
            rdy_redistribute_interval: Duration::from_secs(5),
            auto_batch: 0,
        }
    }
}

impl Settings {
    fn config(&self) -> Arc<Config> {
        let mut c = Config::new();
        c.rng_seed(self.rng_seed)
            .dial_timeout(self.dial_timeout)
            .heartbeat_interval(self.heartbeat)
            .output_buffer_size(self.output_buffer.map(|(size, _)| size))
            .output_buffer_timeout(self.output_buffer.map(|(_, timeout)| timeout))
            .msg_timeout(self.msg_timeout)
            .max_in_flight(self.max_in_flight)
            .max_attempts(self.max_attempts)
            .backoff_strategy(if self.full_jitter { BackoffStrategy::FullJitter } else { BackoffStrategy::Exponential })
            .client_id("sim")
            .hostname("sim");
        c.read_timeout(self.read_timeout)
            .and_then(|c| c.lookupd_poll_interval(self.lookupd_poll_interval))
            .and_then(|c| c.lookupd_poll_jitter(self.lookupd_poll_jitter))
            .and_then(|c| c.default_requeue_delay(self.default_requeue_delay))
            .and_then(|c| c.max_requeue_delay(self.max_requeue_delay))
            .and_then(|c| c.backoff_multiplier(self.backoff_multiplier))
            .and_then(|c| c.max_backoff_duration(self.max_backoff_duration))
            .and_then(|c| c.low_rdy_idle_timeout(self.low_rdy_idle_timeout))
            .and_then(|c| c.low_rdy_timeout(self.low_rdy_timeout))
            .and_then(|c| c.rdy_redistribute_interval(self.rdy_redistribute_interval))
            .expect("the simulation draws settings within their ranges");
        if let Some(secret) = &self.auth_secret {
            c.auth_secret(secret.clone());
        }
        c.validate().expect("the simulation draws consistent settings");
        Arc::new(c)
    }
}

/// Why a dial failed, as the adapter would report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialFailure {
    Refused,
    TimedOut,
}

impl DialFailure {
    fn error(self, addr: &str, dial_timeout: Duration) -> String {
        match self {
            Self::Refused => format!("{addr}: connection refused"),
            Self::TimedOut => format!("{addr}: timed out after {dial_timeout:?}"),
        }
    }
}

/// Why a lookupd query got no response bytes.
pub type LookupdFailure = DialFailure;

/// I/O a client asks for.
#[derive(Debug, Clone)]
pub enum Io {
    Connect { conn: ConnId, addr: String },
    Close { conn: ConnId },
    QueryLookupd { query: QueryId, addr: String, request: Bytes },
}

fn io(action: Action) -> Io {
    match action {
        Action::Connect { conn, addr } => Io::Connect { conn, addr },
        Action::Close { conn } => Io::Close { conn },
        Action::QueryLookupd { query, addr, request } => Io::QueryLookupd { query, addr, request },
        other => panic!("an action the simulation does not know: {other:?}"),
    }
}

/// How the application answers a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Finish,
    Requeue { delay: Option<Duration>, backoff: bool },
    Touch,
}

/// A message as the application got it: what it needs to answer.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub conn: ConnId,
    pub id: MessageId,
    pub attempts: u16,
    pub body: Bytes,
}

/// What a consumer tells the application.
#[derive(Debug)]
pub enum ConsumerNote {
    Message(Delivered),
    /// Past `max_attempts`: finished without the handler (the failed-message hook).
    GaveUp(Delivered),
    /// A connection subscribed.
    Connected {
        conn: ConnId,
        addr: String,
    },
    /// A connection ended, or never came up.
    Closed {
        conn: ConnId,
        addr: String,
        cause: String,
    },
    LookupdFailed {
        addr: String,
        error: String,
    },
    Stopped,
}

/// A consumer of one topic/channel.
#[derive(Debug)]
pub struct SimConsumer {
    state: ConsumerState,
    dial_timeout: Duration,
}

impl SimConsumer {
    pub fn new(topic: &str, channel: &str, settings: &Settings, now: Instant) -> Self {
        let topic = Topic::new(topic).expect("a valid topic");
        let channel = Channel::new(channel).expect("a valid channel");
        Self { state: ConsumerState::new(topic, channel, settings.config(), now), dial_timeout: settings.dial_timeout }
    }

    pub fn connect_to_nsqd(&mut self, addr: &str, now: Instant) -> Result<(), String> {
        self.state.connect_to_nsqd(addr, now).map_err(|e| e.to_string())
    }

    pub fn connect_to_lookupd(&mut self, addr: &str, now: Instant) -> Result<(), String> {
        self.state.connect_to_nsqlookupd(addr, now).map_err(|e| e.to_string())
    }

    pub fn connected(&mut self, conn: ConnId, now: Instant) {
        self.state.handle_connected(conn, now);
    }

    pub fn connect_failed(&mut self, conn: ConnId, addr: &str, why: DialFailure, now: Instant) {
        self.state.handle_connect_failed(conn, why.error(addr, self.dial_timeout), now);
    }

    pub fn input(&mut self, conn: ConnId, bytes: &[u8], now: Instant) {
        self.state.handle_input(conn, now, BytesMut::from(bytes));
    }

    pub fn eof(&mut self, conn: ConnId, now: Instant) {
        self.state.handle_eof(conn, now);
    }

    pub fn lookupd_answer(
        &mut self,
        query: QueryId,
        addr: &str,
        answer: Result<Vec<u8>, LookupdFailure>,
        now: Instant,
    ) {
        let answer = answer.map(Bytes::from).map_err(|why| why.error(addr, LOOKUPD_QUERY_TIMEOUT));
        self.state.handle_lookupd_response(query, answer, now);
    }

    pub fn timeout(&mut self, now: Instant) {
        self.state.handle_timeout(now);
    }

    pub fn respond(&mut self, msg: &Delivered, answer: Answer, now: Instant) -> Result<(), String> {
        let response = match answer {
            Answer::Finish => Response::Finish,
            Answer::Requeue { delay, backoff } => Response::Requeue { delay, backoff },
            Answer::Touch => Response::Touch,
        };
        self.state.respond(msg.conn, &msg.id, msg.attempts, response, now).map_err(|e| e.to_string())
    }

    pub fn stop(&mut self, now: Instant) {
        self.state.stop(now);
    }

    /// Everything queued for `conn` since the last call: the driver asks again only once the
    /// previous write finished, so writes coalesce.
    pub fn poll_transmit_for(&mut self, conn: ConnId) -> Option<Bytes> {
        self.state.poll_transmit_for(conn)
    }

    pub fn poll_io(&mut self) -> Option<Io> {
        self.state.poll_action().map(io)
    }

    pub fn poll_note(&mut self) -> Option<ConsumerNote> {
        let delivered = |conn, message: nsq_sansio::Message| Delivered {
            conn,
            id: message.id,
            attempts: message.attempts,
            body: message.body,
        };
        Some(match self.state.poll_event()? {
            ConsumerEvent::Message { conn, message } => ConsumerNote::Message(delivered(conn, message)),
            ConsumerEvent::GaveUp { conn, message } => ConsumerNote::GaveUp(delivered(conn, message)),
            ConsumerEvent::Connected { conn, addr } => ConsumerNote::Connected { conn, addr },
            ConsumerEvent::Disconnected { conn, addr, error } => {
                ConsumerNote::Closed { conn, addr, cause: error.to_string() }
            }
            ConsumerEvent::LookupdFailed { addr, error } => ConsumerNote::LookupdFailed { addr, error },
            ConsumerEvent::Stopped => ConsumerNote::Stopped,
            other => panic!("a consumer event the simulation does not know: {other:?}"),
        })
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.state.poll_timeout()
    }

    /// The RDY the consumer counts for `conn` (queued, if not yet written).
    pub fn rdy(&self, conn: ConnId) -> Option<u32> {
        self.state.rdy(conn)
    }
}

/// How a publish ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    Acked,
    /// nsqd answered with an error.
    Refused(String),
    /// The connection ended before an answer: it may or may not have been stored.
    Lost(String),
    /// Refused locally.
    Rejected(String),
}

/// What a producer tells the application.
#[derive(Debug)]
pub enum ProducerNote {
    Published {
        tx: u64,
        outcome: PublishOutcome,
    },
    Connected(ConnId),
    /// `local`: the producer closed it itself (stop), not the network or nsqd.
    Disconnected {
        conn: ConnId,
        cause: String,
        local: bool,
    },
    Stopped,
}

/// A producer publishing to one nsqd.
#[derive(Debug)]
pub struct SimProducer {
    state: ProducerState,
    dial_timeout: Duration,
}

impl SimProducer {
    pub fn new(addr: &str, settings: &Settings, now: Instant) -> Self {
        let mut state = ProducerState::new(addr, settings.config(), now);
        state.set_auto_batch(settings.auto_batch);
        Self { state, dial_timeout: settings.dial_timeout }
    }

    pub fn publish(&mut self, topic: &str, body: Bytes, now: Instant) -> Result<u64, String> {
        let topic = Topic::new(topic).expect("a valid topic");
        self.state.publish(&topic, body, now).map(|tx| tx.0).map_err(|e| e.to_string())
    }

    pub fn multi_publish(&mut self, topic: &str, bodies: Vec<Bytes>, now: Instant) -> Result<u64, String> {
        let topic = Topic::new(topic).expect("a valid topic");
        self.state.multi_publish(&topic, bodies, now).map(|tx| tx.0).map_err(|e| e.to_string())
    }

    pub fn deferred_publish(&mut self, topic: &str, delay: Duration, body: Bytes, now: Instant) -> Result<u64, String> {
        let topic = Topic::new(topic).expect("a valid topic");
        self.state.deferred_publish(&topic, delay, body, now).map(|tx| tx.0).map_err(|e| e.to_string())
    }

    pub fn connected(&mut self, conn: ConnId, now: Instant) {
        self.state.handle_connected(conn, now);
    }

    pub fn connect_failed(&mut self, conn: ConnId, addr: &str, why: DialFailure, now: Instant) {
        self.state.handle_connect_failed(conn, why.error(addr, self.dial_timeout), now);
    }

    pub fn input(&mut self, conn: ConnId, bytes: &[u8], now: Instant) {
        self.state.handle_input(conn, now, BytesMut::from(bytes));
    }

    pub fn eof(&mut self, conn: ConnId, now: Instant) {
        self.state.handle_eof(conn, now);
    }

    pub fn timeout(&mut self, now: Instant) {
        self.state.handle_timeout(now);
    }

    pub fn stop(&mut self, now: Instant) {
        self.state.stop(now);
    }

    /// Publishes the producer holds and has not resolved.
    pub fn outstanding(&self) -> usize {
        self.state.outstanding()
    }

    /// Everything queued for `conn` since the last call (see [`SimConsumer::poll_transmit_for`]).
    pub fn poll_transmit_for(&mut self, conn: ConnId) -> Option<Bytes> {
        self.state.poll_transmit_for(conn)
    }

    pub fn poll_io(&mut self) -> Option<Io> {
        self.state.poll_action().map(io)
    }

    pub fn poll_note(&mut self) -> Option<ProducerNote> {
        Some(match self.state.poll_event()? {
            ProducerEvent::Published { tx, result } => {
                let outcome = match result {
                    Ok(()) => PublishOutcome::Acked,
                    Err(PublishError::Server(e)) => PublishOutcome::Refused(e.to_string()),
                    Err(PublishError::ConnectionLost) => PublishOutcome::Lost("connection lost".into()),
                    Err(e) => PublishOutcome::Rejected(e.to_string()),
                };
                ProducerNote::Published { tx: tx.0, outcome }
            }
            ProducerEvent::Connected(conn) => ProducerNote::Connected(conn),
            ProducerEvent::Disconnected(conn, error) => ProducerNote::Disconnected {
                conn,
                local: matches!(error, ConnectionError::LocallyClosed),
                cause: error.to_string(),
            },
            ProducerEvent::Stopped => ProducerNote::Stopped,
            other => panic!("a producer event the simulation does not know: {other:?}"),
        })
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.state.poll_timeout()
    }
}

/// How long the runtime crates give a lookupd query, connect to last byte (the driver's
/// `LOOKUPD_TIMEOUT`).
pub const LOOKUPD_QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a bare connection reports, for driving the nsqd model in its unit tests.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnNote {
    Ready,
    Authenticated,
    Subscribed,
    Message { id: MessageId, attempts: u16, body: Vec<u8> },
    Published { ok: bool },
    TimedOut(MessageId),
    ServerError(String),
    CloseWait,
    Closed(String),
}

/// One bare `ConnectionState`.
#[derive(Debug)]
pub struct SimConnection {
    state: ConnectionState,
}

impl SimConnection {
    pub fn new(settings: &Settings, now: Instant) -> Self {
        Self { state: ConnectionState::new(settings.config(), "nsqd-0", now) }
    }

    pub fn subscribe(&mut self, topic: &str, channel: &str) {
        self.state.subscribe(&Topic::new(topic).unwrap(), &Channel::new(channel).unwrap()).unwrap();
    }

    pub fn ready(&mut self, count: u32) {
        self.state.ready(count).unwrap();
    }

    pub fn publish(&mut self, topic: &str, body: &[u8]) {
        self.state.publish(&Topic::new(topic).unwrap(), Bytes::copy_from_slice(body)).unwrap();
    }

    pub fn finish(&mut self, id: &MessageId) {
        self.state.finish(id).unwrap();
    }

    pub fn requeue(&mut self, id: &MessageId, delay: Duration) {
        self.state.requeue(id, delay).unwrap();
    }

    pub fn touch(&mut self, id: &MessageId, now: Instant) {
        self.state.touch(id, now).unwrap();
    }

    pub fn close(&mut self, now: Instant) {
        self.state.close(now);
    }

    pub fn input(&mut self, bytes: &[u8], now: Instant) {
        self.state.handle_input(now, BytesMut::from(bytes));
    }

    pub fn timeout(&mut self, now: Instant) {
        self.state.handle_timeout(now);
    }

    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.state.poll_transmit()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.state.poll_timeout()
    }

    pub fn poll_note(&mut self) -> Option<ConnNote> {
        Some(match self.state.poll_event()? {
            Event::Ready(_) => ConnNote::Ready,
            Event::Authenticated(_) => ConnNote::Authenticated,
            Event::Subscribed => ConnNote::Subscribed,
            Event::Message(m) => ConnNote::Message { id: m.id, attempts: m.attempts, body: m.body.to_vec() },
            Event::Published { result, .. } => ConnNote::Published { ok: result.is_ok() },
            Event::MessageTimedOut(id) => ConnNote::TimedOut(id),
            Event::ServerError(e) => ConnNote::ServerError(e.to_string()),
            Event::CloseWait => ConnNote::CloseWait,
            Event::Closed(e) => ConnNote::Closed(e.to_string()),
            other => panic!("a connection event the simulation does not know: {other:?}"),
        })
    }
}
