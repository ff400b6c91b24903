//! The glue to the client state machines. This is the only file that calls `ConsumerState`,
//! `ProducerState`, `ProducerPoolState`, `ConnectionState` and `Config`, so an API change of theirs is adapted here
//! alone; the rest of the simulator sees the plain types below.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nsq_sansio::{
    Action, BackoffStrategy, Channel, Config, ConnId, ConnectionError, ConnectionState, ConsumerEvent, ConsumerState,
    Event, MessageId, PoolEvent, PoolOptions, ProducerEvent, ProducerPoolState, ProducerState, PublishError, Response,
    Strategy, Topic,
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
    /// The `std::io::Error` a runtime's connect returns; `timeout` is the one the action gave.
    fn error(self, timeout: Duration) -> std::io::Error {
        use std::io::{Error, ErrorKind};
        match self {
            Self::Refused => Error::new(ErrorKind::ConnectionRefused, "connection refused"),
            Self::TimedOut => Error::new(ErrorKind::TimedOut, format!("connect timed out after {timeout:?}")),
        }
    }
}

/// I/O a client asks for.
#[derive(Debug, Clone)]
pub enum Io {
    /// Open a socket to `addr` (an nsqd, or a lookupd for a query), failing after `timeout`.
    Connect {
        conn: ConnId,
        addr: String,
        timeout: Duration,
    },
    Close {
        conn: ConnId,
    },
}

fn io(action: Action) -> Io {
    match action {
        Action::Connect { conn, addr, timeout, .. } => Io::Connect { conn, addr, timeout },
        Action::Close { conn } => Io::Close { conn },
        other => panic!("an action the simulation does not know: {other:?}"),
    }
}

/// Why a connection ended, as far as the invariants care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub text: String,
    /// The client closed it itself (`ConnectionError::LocallyClosed`): no fault, no nsqd.
    pub local: bool,
    /// nsqd closed it after refusing a publish (the command's fault, not the connection's):
    /// the pool does not count it against the nsqd's health.
    pub refused_publish: bool,
}

impl Cause {
    fn of(error: &ConnectionError) -> Self {
        let refused_publish = matches!(
            error,
            ConnectionError::Server(e) if matches!(
                e.code.as_str(),
                "E_INVALID" | "E_BAD_TOPIC" | "E_BAD_MESSAGE" | "E_BAD_BODY" | "E_PUB_FAILED" | "E_MPUB_FAILED"
                    | "E_DPUB_FAILED" | "E_UNAUTHORIZED"
            )
        );
        Self { text: error.to_string(), local: error.is_local_close(), refused_publish }
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
    /// A connection that never subscribed ended; `retry_at` is when the consumer says it tries
    /// the address again (`None`: never, as for the first attempt at a direct address).
    ConnectFailed {
        conn: ConnId,
        addr: String,
        cause: Cause,
        retry_at: Option<Instant>,
    },
    /// A subscribed connection ended.
    Closed {
        conn: ConnId,
        addr: String,
        cause: Cause,
    },
    LookupdFailed {
        addr: String,
        error: String,
    },
    /// nsqd accepted the AUTH secret.
    Authenticated,
    Stopped,
}

/// A consumer of one topic/channel.
#[derive(Debug)]
pub struct SimConsumer {
    state: ConsumerState,
}

impl SimConsumer {
    pub fn new(topic: &str, channel: &str, settings: &Settings, now: Instant) -> Self {
        let topic = Topic::new(topic).expect("a valid topic");
        let channel = Channel::new(channel).expect("a valid channel");
        Self { state: ConsumerState::new(topic, channel, settings.config(), now) }
    }

    pub fn connect_to_nsqd(&mut self, addr: &str, now: Instant) -> Result<(), String> {
        self.state.connect_to_nsqd(addr, now).map_err(|e| e.to_string())
    }

    pub fn connect_to_lookupd(&mut self, addr: &str, now: Instant) -> Result<(), String> {
        self.state.connect_to_nsqlookupd(addr, now).map_err(|e| e.to_string())
    }

    pub fn change_max_in_flight(&mut self, max_in_flight: u32, now: Instant) {
        self.state.change_max_in_flight(max_in_flight, now)
    }

    pub fn connected(&mut self, conn: ConnId, now: Instant) {
        self.state.handle_connected(conn, now);
    }

    pub fn connect_failed(&mut self, conn: ConnId, why: DialFailure, timeout: Duration, now: Instant) {
        self.state.handle_connect_failed(conn, why.error(timeout), now);
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
            ConsumerEvent::ConnectFailed { conn, addr, error, retry_at } => {
                ConsumerNote::ConnectFailed { conn, addr, cause: Cause::of(&error), retry_at }
            }
            ConsumerEvent::Disconnected { conn, addr, error } => {
                ConsumerNote::Closed { conn, addr, cause: Cause::of(&error) }
            }
            ConsumerEvent::LookupdFailed { addr, error } => {
                ConsumerNote::LookupdFailed { addr, error: error.to_string() }
            }
            ConsumerEvent::Authenticated { .. } => ConsumerNote::Authenticated,
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

/// How one attempt of a publish failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// nsqd answered with an error.
    Refused(String),
    /// Sent, then the connection ended before an answer: it may or may not have been stored.
    Lost(Cause),
    /// Never sent: the connection could not be made (or the pool gave up waiting for one).
    NotSent(Cause),
    /// Refused locally.
    Rejected(String),
}

impl Failure {
    fn of(error: PublishError) -> Self {
        match error {
            PublishError::Server(e) => Self::Refused(e.to_string()),
            PublishError::ConnectionLost(cause) => Self::Lost(Cause::of(&cause)),
            PublishError::NotConnected(cause) => Self::NotSent(Cause::of(&cause)),
            e => Self::Rejected(e.to_string()),
        }
    }

    /// The cause, when it is the client closing its own connection.
    pub fn local_close(&self) -> bool {
        matches!(self, Self::Lost(c) | Self::NotSent(c) if c.local)
    }
}

/// How a publish ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    Acked,
    /// Every attempt's failure, with the nsqd it was on (`""`: none in particular). One for
    /// a single-nsqd producer.
    Failed(Vec<(String, Failure)>),
}

/// What a producer tells the application.
#[derive(Debug)]
pub enum ProducerNote {
    Published {
        tx: u64,
        outcome: PublishOutcome,
    },
    Connected {
        conn: ConnId,
        addr: String,
    },
    /// A connection that never finished its handshake ended; the nsqd is left alone until
    /// `retry_at`.
    ConnectFailed {
        conn: ConnId,
        addr: String,
        cause: Cause,
        retry_at: Instant,
    },
    /// A connection that had finished its handshake ended.
    Disconnected {
        conn: ConnId,
        addr: String,
        cause: Cause,
    },
    LookupdFailed {
        addr: String,
        error: String,
    },
    /// Authenticated, a pool's answer to `connect`: nothing the invariants look at.
    Other,
    Stopped,
}

/// How a pool spreads its publishes (`nsq_sansio::Strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolStrategy {
    Failover,
    RoundRobin,
    All,
}

/// A pool's options.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub strategy: PoolStrategy,
    pub max_retries: u32,
    pub wait: Duration,
}

#[derive(Debug)]
enum ProducerKind {
    One(Box<ProducerState>),
    Pool(Box<ProducerPoolState>),
}

/// A producer: one `ProducerState` on one nsqd, or a `ProducerPoolState` over several.
#[derive(Debug)]
pub struct SimProducer {
    kind: ProducerKind,
    /// The single producer's nsqd.
    addr: String,
}

impl SimProducer {
    pub fn new(addr: &str, settings: &Settings, now: Instant) -> Self {
        let mut state = ProducerState::new(addr, settings.config(), now);
        state.set_auto_batch(settings.auto_batch);
        Self { kind: ProducerKind::One(Box::new(state)), addr: addr.to_owned() }
    }

    pub fn pool(addrs: &[String], pool: &PoolSettings, settings: &Settings, now: Instant) -> Self {
        let strategy = match pool.strategy {
            PoolStrategy::Failover => Strategy::Failover,
            PoolStrategy::RoundRobin => Strategy::RoundRobin,
            PoolStrategy::All => Strategy::All,
        };
        let options = PoolOptions::new(strategy).max_retries(pool.max_retries).wait(pool.wait);
        let state = ProducerPoolState::new(addrs.iter().cloned(), options, settings.config(), now);
        Self { kind: ProducerKind::Pool(Box::new(state)), addr: String::new() }
    }

    /// Adds a lookupd whose `/nodes` a pool takes nsqds from.
    pub fn connect_to_lookupd(&mut self, addr: &str, now: Instant) -> Result<(), String> {
        match &mut self.kind {
            ProducerKind::One(_) => Err("a single-nsqd producer has no lookupds".into()),
            ProducerKind::Pool(p) => p.connect_to_nsqlookupd(addr, now).map(drop).map_err(|e| e.to_string()),
        }
    }

    pub fn publish(&mut self, topic: &str, body: Bytes, now: Instant) -> Result<u64, String> {
        let topic = Topic::new(topic).expect("a valid topic");
        let tx = match &mut self.kind {
            ProducerKind::One(p) => p.publish(&topic, body, now),
            ProducerKind::Pool(p) => p.publish(&topic, body, now),
        };
        tx.map(|tx| tx.0).map_err(|e| e.to_string())
    }

    pub fn multi_publish(&mut self, topic: &str, bodies: Vec<Bytes>, now: Instant) -> Result<u64, String> {
        let topic = Topic::new(topic).expect("a valid topic");
        let tx = match &mut self.kind {
            ProducerKind::One(p) => p.multi_publish(&topic, bodies, now),
            ProducerKind::Pool(p) => p.multi_publish(&topic, bodies, now),
        };
        tx.map(|tx| tx.0).map_err(|e| e.to_string())
    }

    pub fn deferred_publish(&mut self, topic: &str, delay: Duration, body: Bytes, now: Instant) -> Result<u64, String> {
        let topic = Topic::new(topic).expect("a valid topic");
        let tx = match &mut self.kind {
            ProducerKind::One(p) => p.deferred_publish(&topic, delay, body, now),
            ProducerKind::Pool(p) => p.deferred_publish(&topic, delay, body, now),
        };
        tx.map(|tx| tx.0).map_err(|e| e.to_string())
    }

    pub fn connected(&mut self, conn: ConnId, now: Instant) {
        match &mut self.kind {
            ProducerKind::One(p) => p.handle_connected(conn, now),
            ProducerKind::Pool(p) => p.handle_connected(conn, now),
        }
    }

    pub fn connect_failed(&mut self, conn: ConnId, why: DialFailure, timeout: Duration, now: Instant) {
        match &mut self.kind {
            ProducerKind::One(p) => p.handle_connect_failed(conn, why.error(timeout), now),
            ProducerKind::Pool(p) => p.handle_connect_failed(conn, why.error(timeout), now),
        }
    }

    pub fn input(&mut self, conn: ConnId, bytes: &[u8], now: Instant) {
        match &mut self.kind {
            ProducerKind::One(p) => p.handle_input(conn, now, BytesMut::from(bytes)),
            ProducerKind::Pool(p) => p.handle_input(conn, now, BytesMut::from(bytes)),
        }
    }

    pub fn eof(&mut self, conn: ConnId, now: Instant) {
        match &mut self.kind {
            ProducerKind::One(p) => p.handle_eof(conn, now),
            ProducerKind::Pool(p) => p.handle_eof(conn, now),
        }
    }

    pub fn timeout(&mut self, now: Instant) {
        match &mut self.kind {
            ProducerKind::One(p) => p.handle_timeout(now),
            ProducerKind::Pool(p) => p.handle_timeout(now),
        }
    }

    pub fn stop(&mut self, now: Instant) {
        match &mut self.kind {
            ProducerKind::One(p) => p.stop(now),
            ProducerKind::Pool(p) => p.stop(now),
        }
    }

    /// Publishes the producer holds and has not resolved.
    pub fn outstanding(&self) -> usize {
        match &self.kind {
            ProducerKind::One(p) => p.outstanding(),
            ProducerKind::Pool(p) => p.outstanding(),
        }
    }

    /// Everything queued for `conn` since the last call (see [`SimConsumer::poll_transmit_for`]).
    pub fn poll_transmit_for(&mut self, conn: ConnId) -> Option<Bytes> {
        match &mut self.kind {
            ProducerKind::One(p) => p.poll_transmit_for(conn),
            ProducerKind::Pool(p) => p.poll_transmit_for(conn),
        }
    }

    pub fn poll_io(&mut self) -> Option<Io> {
        match &mut self.kind {
            ProducerKind::One(p) => p.poll_action().map(io),
            ProducerKind::Pool(p) => p.poll_action().map(io),
        }
    }

    pub fn poll_note(&mut self) -> Option<ProducerNote> {
        match &mut self.kind {
            ProducerKind::One(p) => Some(Self::note(&self.addr, p.poll_event()?)),
            ProducerKind::Pool(p) => Some(Self::pool_note(p.poll_event()?)),
        }
    }

    fn note(addr: &str, event: ProducerEvent) -> ProducerNote {
        match event {
            ProducerEvent::Published { tx, result } => {
                let outcome = match result {
                    Ok(()) => PublishOutcome::Acked,
                    Err(e) => PublishOutcome::Failed(vec![(addr.to_owned(), Failure::of(e))]),
                };
                ProducerNote::Published { tx: tx.0, outcome }
            }
            ProducerEvent::Connected(conn) => ProducerNote::Connected { conn, addr: addr.to_owned() },
            ProducerEvent::ConnectFailed { conn, error, retry_at } => {
                ProducerNote::ConnectFailed { conn, addr: addr.to_owned(), cause: Cause::of(&error), retry_at }
            }
            ProducerEvent::Disconnected(conn, error) => {
                ProducerNote::Disconnected { conn, addr: addr.to_owned(), cause: Cause::of(&error) }
            }
            ProducerEvent::Authenticated { .. } => ProducerNote::Other,
            ProducerEvent::Stopped => ProducerNote::Stopped,
            other => panic!("a producer event the simulation does not know: {other:?}"),
        }
    }

    fn pool_note(event: PoolEvent) -> ProducerNote {
        match event {
            PoolEvent::Published { tx, result } => {
                let outcome = match result {
                    Ok(()) => PublishOutcome::Acked,
                    Err(e) => PublishOutcome::Failed(
                        e.attempts.into_iter().map(|(addr, error)| (addr, Failure::of(error))).collect(),
                    ),
                };
                ProducerNote::Published { tx: tx.0, outcome }
            }
            PoolEvent::Connected { conn, addr } => ProducerNote::Connected { conn, addr },
            PoolEvent::ConnectFailed { conn, addr, error, retry_at } => {
                ProducerNote::ConnectFailed { conn, addr, cause: Cause::of(&error), retry_at }
            }
            PoolEvent::Disconnected { conn, addr, error } => {
                ProducerNote::Disconnected { conn, addr, cause: Cause::of(&error) }
            }
            PoolEvent::LookupdFailed { addr, error } => ProducerNote::LookupdFailed { addr, error: error.to_string() },
            PoolEvent::Authenticated { .. } | PoolEvent::Ready(_) => ProducerNote::Other,
            PoolEvent::Stopped => ProducerNote::Stopped,
            other => panic!("a pool event the simulation does not know: {other:?}"),
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.kind {
            ProducerKind::One(p) => p.poll_timeout(),
            ProducerKind::Pool(p) => p.poll_timeout(),
        }
    }
}

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
