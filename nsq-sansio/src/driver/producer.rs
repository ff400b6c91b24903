//! [`Producer`]: an async handle on a [`ProducerState`] (one nsqd) or a
//! [`ProducerPoolState`] (several), run by one engine task.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasherDefault;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_channel::oneshot;
use futures_util::future::{select, Either};
use tracing::{debug, Instrument};

use super::batch::Batch;
use super::io::{IoEvent, Sockets};
use super::{EngineTimer, Error, Runtime};
use crate::connection::IdHasher;
use crate::{
    Action, AuthResponse, CommandError, Config, ConnId, ConnectionError, Machine, NsqdStats, PoolEvent, PoolOptions,
    ProducerEvent, ProducerPoolState, ProducerState, SocketError, Topic, TxId,
};

/// Publishes to one nsqd ([`new`](Self::new)) or to a pool of nsqds ([`pool`](Self::pool)).
/// Cheap to clone; clones share the connections, and concurrent publishes are pipelined (no
/// lock is held across a round trip).
///
/// A pool spreads publishes by its [`Strategy`](crate::Strategy), retries a publish whose connection broke on
/// another nsqd, and keeps every nsqd connected in the background; its failures are
/// [`Error::Pool`], naming each nsqd tried. See [`ProducerPoolState`] for the delivery
/// guarantee of each strategy.
///
/// The connection is made at the first publish (or by [`connect`](Self::connect)) and made
/// again after it is lost. A publish resolves once nsqd acknowledged it, refused it
/// ([`PublishError::Server`](crate::PublishError::Server)), or failed with the cause:
/// [`PublishError::NotConnected`](crate::PublishError::NotConnected) when the connection could
/// not be made (the dial's "connection refused", a TLS or AUTH failure: not stored),
/// [`PublishError::ConnectionLost`](crate::PublishError::ConnectionLost) when it broke before
/// nsqd answered (maybe stored). Nothing waits forever. After a failed dial, publishes fail at
/// once with that error for a short, growing, jittered while (see
/// [`ProducerState`](crate::ProducerState)) instead of dialling again.
/// Dropping the last clone stops the producer after outstanding publishes resolve.
pub struct Producer<R: Runtime> {
    handle: Arc<Handle>,
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> Clone for Producer<R> {
    fn clone(&self) -> Self {
        Self { handle: self.handle.clone(), _runtime: PhantomData }
    }
}

impl<R: Runtime> fmt::Debug for Producer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer").field("addr", &self.handle.addr).finish()
    }
}

#[derive(Debug)]
struct Handle {
    addr: String,
    inbox: Arc<Inbox>,
    /// nsqd's last AUTH answer.
    auth: Arc<Mutex<Option<AuthResponse>>>,
}

/// Commands from the handles to the engine (see [`Batch`]), with the last topic published to,
/// validated: publishes to it share it instead of copying.
type Inbox = Batch<Command, Option<Arc<Topic>>>;

/// The topic for a publish: the cached one when the name matches, else `name` validated (and
/// cached).
fn cached_topic(cache: &mut Option<Arc<Topic>>, name: &str) -> Result<Arc<Topic>, Error> {
    match cache {
        Some(topic) if topic.as_str() == name => Ok(topic.clone()),
        _ => {
            let topic = Arc::new(Topic::new(name)?);
            *cache = Some(topic.clone());
            Ok(topic)
        }
    }
}

/// The state machine an engine runs.
#[derive(Debug)]
// One per engine task, moved once: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Publisher {
    One(ProducerState),
    Pool(ProducerPoolState),
}

/// Calls the method of the same name on whichever state machine it is.
macro_rules! either {
    ($self:ident.$method:ident($($arg:expr),*)) => {
        match $self {
            Publisher::One(m) => m.$method($($arg),*),
            Publisher::Pool(m) => m.$method($($arg),*),
        }
    };
}

impl Machine for Publisher {
    fn handle_connected(&mut self, conn: ConnId, now: Instant) {
        either!(self.handle_connected(conn, now))
    }
    fn handle_connect_failed(&mut self, conn: ConnId, error: SocketError, now: Instant) {
        either!(self.handle_connect_failed(conn, error, now))
    }
    fn handle_input(&mut self, conn: ConnId, now: Instant, data: BytesMut) {
        either!(self.handle_input(conn, now, data))
    }
    fn handle_eof(&mut self, conn: ConnId, now: Instant) {
        either!(self.handle_eof(conn, now))
    }
    fn handle_io_error(&mut self, conn: ConnId, error: SocketError, now: Instant) {
        either!(self.handle_io_error(conn, error, now))
    }
    fn poll_action(&mut self) -> Option<Action> {
        either!(self.poll_action())
    }
    fn poll_transmit_for(&mut self, conn: ConnId) -> Option<Bytes> {
        either!(self.poll_transmit_for(conn))
    }
    fn handle_timeout(&mut self, now: Instant) {
        either!(self.handle_timeout(now))
    }
    fn poll_timeout(&self) -> Option<Instant> {
        either!(self.poll_timeout())
    }
}

/// What the engine does with an event.
enum Outcome {
    Published(TxId, Result<(), Error>),
    /// The answer for the `connect` calls waiting.
    Ready(Result<(), Error>),
    /// A ping's NOP was handed to `conn`'s writer, or the connection ended first.
    Pinged(TxId, ConnId, Result<(), ConnectionError>),
    Authenticated(AuthResponse),
    /// A connection ended: pings waiting for its writes fail with the cause, and so does a
    /// single nsqd's `connect`.
    Lost(ConnId, ConnectionError),
    Quiet,
}

impl Publisher {
    fn publish(&mut self, publish: Publish, now: Instant) -> Result<TxId, CommandError> {
        match publish {
            Publish::One(topic, body) => either!(self.publish(&topic, body, now)),
            Publish::Many(topic, bodies) => either!(self.multi_publish(&topic, bodies, now)),
            Publish::Deferred(topic, delay, body) => either!(self.deferred_publish(&topic, delay, body, now)),
        }
    }

    fn next_outcome(&mut self) -> Option<Outcome> {
        match self {
            Self::One(m) => m.poll_event().map(|event| match event {
                ProducerEvent::Published { tx, result } => Outcome::Published(tx, result.map_err(Error::from)),
                ProducerEvent::Connected(conn) => {
                    debug!(%conn, "producer connected");
                    Outcome::Ready(Ok(()))
                }
                ProducerEvent::Disconnected(conn, error) | ProducerEvent::ConnectFailed { conn, error, .. } => {
                    debug!(%conn, %error, "producer disconnected");
                    Outcome::Lost(conn, error)
                }
                ProducerEvent::Pinged { tx, conn, result } => Outcome::Pinged(tx, conn, result),
                ProducerEvent::Authenticated { auth, .. } => Outcome::Authenticated(auth),
                _ => Outcome::Quiet,
            }),
            Self::Pool(m) => m.poll_event().map(|event| match event {
                PoolEvent::Published { tx, result } => Outcome::Published(tx, result.map_err(Error::Pool)),
                PoolEvent::Authenticated { auth, .. } => Outcome::Authenticated(auth),
                PoolEvent::Ready(result) => Outcome::Ready(result.map_err(Error::Pool)),
                _ => Outcome::Quiet,
            }),
        }
    }

    fn is_stopped(&self) -> bool {
        either!(self.is_stopped())
    }

    fn stats(&self) -> Vec<NsqdStats> {
        match self {
            Self::One(m) => vec![m.stats()],
            Self::Pool(m) => m.stats(),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inbox.push(Command::Shutdown);
    }
}

enum Command {
    Publish(Publish, oneshot::Sender<Result<(), Error>>),
    Connect(oneshot::Sender<Result<(), Error>>),
    Ping(oneshot::Sender<Result<(), Error>>),
    Stats(oneshot::Sender<Vec<NsqdStats>>),
    Lookupd(String, oneshot::Sender<Result<(), Error>>),
    Stop(oneshot::Sender<()>),
    Shutdown,
}

enum Publish {
    One(Arc<Topic>, Bytes),
    Many(Arc<Topic>, Vec<Bytes>),
    Deferred(Arc<Topic>, Duration, Bytes),
}

impl<R: Runtime> Producer<R> {
    /// A producer for the nsqd at `addr` (`host:port`). Spawns its engine task; connects at the
    /// first publish. Refuses a configuration that does not [`validate`](Config::validate).
    pub fn new(addr: impl Into<String>, config: Config) -> Result<Self, Error> {
        Self::with_auto_batch(addr, config, 0)
    }

    /// Like [`new`](Self::new), and PUBs to one topic that queue up while a write is in flight
    /// go out as one MPUB of at most `max_batch` messages. Each caller still gets its own
    /// result; an MPUB is atomic, so a batch succeeds or fails as a whole.
    pub fn with_auto_batch(addr: impl Into<String>, config: Config, max_batch: usize) -> Result<Self, Error> {
        config.validate()?;
        let addr = addr.into();
        let config = super::with_identity(config);
        let mut state = ProducerState::new(addr.clone(), Arc::new(config), R::now());
        state.set_auto_batch(max_batch);
        let span = tracing::debug_span!("nsq_producer", nsqd = %addr);
        Ok(Self::spawn(addr, Publisher::One(state), span))
    }

    /// A producer over several nsqds (`host:port` each), spread by `options.strategy`, with
    /// bounded retries; see [`ProducerPoolState`]. Spawns its engine task; dials every nsqd at
    /// the first publish (or [`connect`](Self::connect)). `addrs` may be empty when the nsqds
    /// come from lookupd ([`connect_to_nsqlookupd`](Self::connect_to_nsqlookupd)).
    ///
    /// ```no_run
    /// # async fn run<R: nsq_sansio::driver::Runtime>() -> Result<(), nsq_sansio::driver::Error> {
    /// use nsq_sansio::{Config, PoolOptions, Strategy};
    /// let addrs = ["10.0.0.1:4150", "10.0.0.2:4150"];
    /// let producer = nsq_sansio::driver::Producer::<R>::pool(addrs, PoolOptions::new(Strategy::Failover), Config::new())?;
    /// producer.publish("events", "hello").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn pool<S: Into<String>>(
        addrs: impl IntoIterator<Item = S>,
        options: PoolOptions,
        config: Config,
    ) -> Result<Self, Error> {
        config.validate()?;
        let addrs: Vec<String> = addrs.into_iter().map(Into::into).collect();
        let first = addrs.first().cloned().unwrap_or_default();
        let config = super::with_identity(config);
        let state = ProducerPoolState::new(addrs.iter().cloned(), options, Arc::new(config), R::now());
        let span = tracing::debug_span!("nsq_producer_pool", nsqds = %addrs.join(","));
        Ok(Self::spawn(first, Publisher::Pool(state), span))
    }

    fn spawn(addr: String, machine: Publisher, span: tracing::Span) -> Self {
        let inbox = Arc::new(Inbox::default());
        let engine = Engine::<R>::new(machine, EngineInbox(inbox.clone()));
        let auth = engine.auth.clone();
        R::spawn(engine.run().instrument(span));
        Self { handle: Arc::new(Handle { addr, inbox, auth }), _runtime: PhantomData }
    }

    /// Connects now and waits for the handshake, instead of at the first publish; returns the
    /// error that prevented it (refused, unknown host, TLS, AUTH). A pool is connected when it
    /// can publish by its strategy: every nsqd for [`Strategy::All`](crate::Strategy::All), any one otherwise; it
    /// fails when the nsqds that must be up failed their attempts, naming each.
    pub async fn connect(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Connect(tx))?;
        rx.await.unwrap_or(Err(Error::Stopped))
    }

    /// Checks the connection as go-nsq's `Ping` does: connects if needed and sends a `NOP`
    /// (which nsqd does not answer); resolves once the NOP was written to the socket, or with
    /// the error that prevented it: the dial, the handshake (TLS, AUTH), or the write. A pool
    /// answers as [`connect`](Self::connect) does.
    pub async fn ping(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Ping(tx))?;
        rx.await.unwrap_or(Err(Error::Stopped))
    }

    /// Publishes one message.
    pub async fn publish(&self, topic: impl AsRef<str>, body: impl Into<Bytes>) -> Result<(), Error> {
        let body = body.into();
        self.request(topic.as_ref(), |topic| Publish::One(topic, body)).await
    }

    /// Publishes several messages atomically (MPUB).
    pub async fn multi_publish<B: Into<Bytes>>(
        &self,
        topic: impl AsRef<str>,
        bodies: impl IntoIterator<Item = B>,
    ) -> Result<(), Error> {
        let bodies = bodies.into_iter().map(Into::into).collect();
        self.request(topic.as_ref(), |topic| Publish::Many(topic, bodies)).await
    }

    /// Publishes one message that nsqd delivers after `delay` (DPUB).
    pub async fn deferred_publish(
        &self,
        topic: impl AsRef<str>,
        delay: Duration,
        body: impl Into<Bytes>,
    ) -> Result<(), Error> {
        let body = body.into();
        self.request(topic.as_ref(), |topic| Publish::Deferred(topic, delay, body)).await
    }

    /// Refuses new publishes, waits for outstanding ones to resolve, closes the connection.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Command::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// What nsqd's auth server said about the `auth_secret` (identity, identity URL,
    /// permission count) at the last AUTH (of any nsqd, for a pool); `None` until a connection
    /// authenticated (or when nsqd does not ask for AUTH).
    pub fn auth(&self) -> Option<AuthResponse> {
        self.handle.auth.lock().ok().and_then(|answer| answer.clone())
    }

    /// The nsqd address (a pool's first).
    pub fn addr(&self) -> &str {
        &self.handle.addr
    }

    /// Takes nsqds from a lookupd's `/nodes` too (a pool only): every nsqd registered there
    /// joins, refreshed every `lookupd_poll_interval`; see [`ProducerPoolState`].
    pub async fn connect_to_nsqlookupd(&self, addr: impl Into<String>) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Lookupd(addr.into(), tx))?;
        rx.await.unwrap_or(Err(Error::Stopped))
    }

    /// Health and publish counters per nsqd.
    pub async fn stats(&self) -> Vec<NsqdStats> {
        let (tx, rx) = oneshot::channel();
        if self.send(Command::Stats(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    async fn request(&self, topic: &str, publish: impl FnOnce(Arc<Topic>) -> Publish) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        let command = |cache: &mut _| Ok::<_, Error>(Command::Publish(publish(cached_topic(cache, topic)?), tx));
        if !self.handle.inbox.push_with(command)? {
            return Err(Error::Stopped);
        }
        rx.await.unwrap_or(Err(Error::Stopped))
    }

    fn send(&self, command: Command) -> Result<(), Error> {
        if self.handle.inbox.push(command) {
            Ok(())
        } else {
            Err(Error::Stopped)
        }
    }
}

enum Input {
    /// The commands queued since the engine last took them, in `Engine::batch`.
    Commands,
    Command(Command),
    Io(IoEvent),
    Timeout,
    /// The sockets' events ended.
    Closed,
}

/// The engine's end of the inbox: closes it when the engine ends, however it ends.
struct EngineInbox(Arc<Inbox>);

impl Drop for EngineInbox {
    fn drop(&mut self) {
        self.0.close();
    }
}

struct Engine<R: Runtime> {
    state: Publisher,
    inbox: EngineInbox,
    /// Commands taken from the inbox, handled in one turn.
    batch: Vec<Command>,
    sockets: Sockets<R>,
    pending: HashMap<TxId, oneshot::Sender<Result<(), Error>>, BuildHasherDefault<IdHasher>>,
    connect_waiters: Vec<oneshot::Sender<Result<(), Error>>>,
    pings: HashMap<TxId, oneshot::Sender<Result<(), Error>>>,
    /// Pings whose NOP was handed to the connection's writer: resolved when that write ends.
    ping_writes: Vec<(ConnId, oneshot::Sender<Result<(), Error>>)>,
    auth: Arc<Mutex<Option<AuthResponse>>>,
    stop_waiters: Vec<oneshot::Sender<()>>,
    shutdown: bool,
    timer: EngineTimer,
}

impl<R: Runtime> Engine<R> {
    fn new(state: Publisher, inbox: EngineInbox) -> Self {
        Self {
            state,
            inbox,
            batch: Vec::new(),
            sockets: Sockets::new(),
            pending: HashMap::default(),
            connect_waiters: Vec::new(),
            pings: HashMap::new(),
            ping_writes: Vec::new(),
            auth: Arc::default(),
            stop_waiters: Vec::new(),
            shutdown: false,
            timer: EngineTimer::new(),
        }
    }

    async fn run(mut self) {
        loop {
            self.drive();
            if self.state.is_stopped() && self.sockets.flushed() {
                for waiter in self.stop_waiters.drain(..) {
                    let _ = waiter.send(());
                }
                if self.shutdown {
                    return;
                }
            }
            self.timer.arm::<R>(self.state.poll_timeout());
            let input = {
                let shutdown = self.shutdown;
                let (inbox, batch) = (&self.inbox.0, &mut self.batch);
                let commands = futures_util::future::poll_fn(move |cx| {
                    if shutdown {
                        std::task::Poll::Pending
                    } else {
                        inbox.poll_take(cx, batch).map(|()| Input::Commands)
                    }
                });
                let io = self.sockets.next();
                let sleep = self.timer.fired();
                let (commands, io) = (std::pin::pin!(commands), std::pin::pin!(io));
                let inputs = select(commands, io);
                match select(inputs, std::pin::pin!(sleep)).await {
                    Either::Left((Either::Left((input, _)), _)) => input,
                    Either::Left((Either::Right((io, _)), _)) => io.map_or(Input::Closed, Input::Io),
                    Either::Right(_) => Input::Timeout,
                }
            };
            // One clock read per batch of inputs: they arrived together.
            let now = R::now();
            self.handle(input, now);
            // Take whatever else is ready before writing, so it leaves in one write.
            while let Some(input) = self.try_next() {
                self.handle(input, now);
            }
        }
    }

    fn try_next(&mut self) -> Option<Input> {
        if !self.shutdown && self.inbox.0.try_take(&mut self.batch) {
            return Some(Input::Commands);
        }
        self.sockets.try_next().map(Input::Io)
    }

    fn handle(&mut self, input: Input, now: Instant) {
        let state = &mut self.state;
        match input {
            Input::Commands => {
                let mut batch = std::mem::take(&mut self.batch);
                for command in batch.drain(..) {
                    self.handle(Input::Command(command), now);
                }
                self.batch = batch;
            }
            Input::Timeout => either!(state.handle_timeout(now)),
            Input::Closed | Input::Command(Command::Shutdown) => {
                self.shutdown = true;
                either!(state.stop(now));
            }
            Input::Command(Command::Publish(publish, reply)) => match state.publish(publish, now) {
                Ok(tx) => {
                    self.pending.insert(tx, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            Input::Command(Command::Ping(reply)) => match state {
                Publisher::One(m) => match m.ping(now) {
                    Ok(tx) => {
                        self.pings.insert(tx, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                },
                Publisher::Pool(_) => self.handle(Input::Command(Command::Connect(reply)), now),
            },
            Input::Command(Command::Connect(reply)) => {
                if matches!(state, Publisher::One(m) if m.is_connected()) {
                    let _ = reply.send(Ok(()));
                } else if let Err(e) = either!(state.connect(now)) {
                    let _ = reply.send(Err(e.into()));
                } else {
                    self.connect_waiters.push(reply);
                }
            }
            Input::Command(Command::Lookupd(addr, reply)) => {
                let result = match state {
                    Publisher::Pool(m) => m.connect_to_nsqlookupd(&addr, now).map(|_| ()).map_err(Error::from),
                    Publisher::One(_) => Err(Error::Command(CommandError::InvalidState {
                        command: "connect_to_nsqlookupd",
                        reason: "on a producer for one nsqd (use Producer::pool)",
                    })),
                };
                let _ = reply.send(result);
            }
            Input::Command(Command::Stats(reply)) => {
                let _ = reply.send(state.stats());
            }
            Input::Command(Command::Stop(reply)) => {
                self.stop_waiters.push(reply);
                either!(state.stop(now));
            }
            Input::Io(event) => {
                match &event {
                    IoEvent::Written(conn) => self.ping_written(*conn, Ok(())),
                    IoEvent::Failed(conn, error) => self.ping_written(*conn, Err(ConnectionError::Io(error.clone()))),
                    _ => {}
                }
                self.sockets.apply(event, &mut self.state, now)
            }
        }
    }

    /// Answers every waiting `connect`.
    fn answer_connect(&mut self, result: Result<(), Error>) {
        for waiter in self.connect_waiters.drain(..) {
            let _ = waiter.send(match &result {
                Ok(()) => Ok(()),
                Err(Error::Connection(e)) => Err(Error::Connection(e.clone())),
                Err(Error::Pool(e)) => Err(Error::Pool(e.clone())),
                Err(_) => Err(Error::Stopped),
            });
        }
    }

    /// The write of `conn` that carried pings' NOPs ended (or the connection did).
    fn ping_written(&mut self, conn: ConnId, result: Result<(), ConnectionError>) {
        let mut i = 0;
        while i < self.ping_writes.len() {
            if self.ping_writes[i].0 == conn {
                let (_, reply) = self.ping_writes.swap_remove(i);
                let _ = reply.send(result.clone().map_err(Error::Connection));
            } else {
                i += 1;
            }
        }
    }

    /// Carries out what the state machine decided.
    fn drive(&mut self) {
        loop {
            let mut progress = self.sockets.pump(&mut self.state);
            while let Some(outcome) = self.state.next_outcome() {
                progress = true;
                match outcome {
                    Outcome::Published(tx, result) => {
                        if let Some(reply) = self.pending.remove(&tx) {
                            let _ = reply.send(result);
                        }
                    }
                    Outcome::Pinged(tx, conn, result) => {
                        if let Some(reply) = self.pings.remove(&tx) {
                            match result {
                                Ok(()) => self.ping_writes.push((conn, reply)),
                                Err(e) => {
                                    let _ = reply.send(Err(Error::Connection(e)));
                                }
                            }
                        }
                    }
                    Outcome::Authenticated(auth) => {
                        if let Ok(mut slot) = self.auth.lock() {
                            *slot = Some(auth);
                        }
                    }
                    Outcome::Lost(conn, error) => {
                        self.ping_written(conn, Err(error.clone()));
                        if matches!(self.state, Publisher::One(_)) {
                            self.answer_connect(Err(Error::Connection(error)));
                        }
                    }
                    Outcome::Ready(result) => self.answer_connect(result),
                    Outcome::Quiet => {}
                }
            }
            if !progress {
                return;
            }
        }
    }
}
