//! [`Producer`]: an async handle on a [`ProducerState`] run by one engine task.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_util::future::{select, Either};
use futures_util::StreamExt;
use tracing::{debug, Instrument};

use super::io::{IoEvent, Sockets};
use super::{Error, Runtime};
use crate::{AuthResponse, Config, ConnId, ConnectionError, ProducerEvent, ProducerState, Topic, TxId};

/// Publishes to one nsqd. Cheap to clone; clones share one connection, and concurrent publishes
/// are pipelined on it (no lock is held across a round trip).
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
    commands: mpsc::UnboundedSender<Command>,
    /// nsqd's last AUTH answer.
    auth: Arc<Mutex<Option<AuthResponse>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.commands.unbounded_send(Command::Shutdown);
    }
}

enum Command {
    Publish(Publish, oneshot::Sender<Result<(), Error>>),
    Connect(oneshot::Sender<Result<(), Error>>),
    Ping(oneshot::Sender<Result<(), Error>>),
    Stop(oneshot::Sender<()>),
    Shutdown,
}

enum Publish {
    One(Topic, Bytes),
    Many(Topic, Vec<Bytes>),
    Deferred(Topic, Duration, Bytes),
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
        let (commands, rx) = mpsc::unbounded();
        let mut state = ProducerState::new(addr.clone(), Arc::new(config.clone()), R::now());
        state.set_auto_batch(max_batch);
        let engine = Engine::<R>::new(state, config, rx);
        let auth = engine.auth.clone();
        let span = tracing::debug_span!("nsq_producer", nsqd = %addr);
        R::spawn(engine.run().instrument(span));
        Ok(Self { handle: Arc::new(Handle { addr, commands, auth }), _runtime: PhantomData })
    }

    /// Connects now and waits for the handshake, instead of at the first publish; returns the
    /// error that prevented it (refused, unknown host, TLS, AUTH).
    pub async fn connect(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Connect(tx))?;
        rx.await.unwrap_or(Err(Error::Stopped))
    }

    /// Checks the connection as go-nsq's `Ping` does: connects if needed and sends a `NOP`
    /// (which nsqd does not answer); resolves once the NOP was written to the socket, or with
    /// the error that prevented it: the dial, the handshake (TLS, AUTH), or the write.
    pub async fn ping(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Ping(tx))?;
        rx.await.unwrap_or(Err(Error::Stopped))
    }

    /// Publishes one message.
    pub async fn publish(&self, topic: impl AsRef<str>, body: impl Into<Bytes>) -> Result<(), Error> {
        let topic = Topic::new(topic)?;
        self.request(Publish::One(topic, body.into())).await
    }

    /// Publishes several messages atomically (MPUB).
    pub async fn multi_publish<B: Into<Bytes>>(
        &self,
        topic: impl AsRef<str>,
        bodies: impl IntoIterator<Item = B>,
    ) -> Result<(), Error> {
        let topic = Topic::new(topic)?;
        self.request(Publish::Many(topic, bodies.into_iter().map(Into::into).collect())).await
    }

    /// Publishes one message that nsqd delivers after `delay` (DPUB).
    pub async fn deferred_publish(
        &self,
        topic: impl AsRef<str>,
        delay: Duration,
        body: impl Into<Bytes>,
    ) -> Result<(), Error> {
        let topic = Topic::new(topic)?;
        self.request(Publish::Deferred(topic, delay, body.into())).await
    }

    /// Refuses new publishes, waits for outstanding ones to resolve, closes the connection.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Command::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// What nsqd's auth server said about the `auth_secret` (identity, identity URL,
    /// permission count) at the last AUTH; `None` until a connection authenticated (or when
    /// nsqd does not ask for AUTH).
    pub fn auth(&self) -> Option<AuthResponse> {
        self.handle.auth.lock().ok().and_then(|answer| answer.clone())
    }

    /// The nsqd address.
    pub fn addr(&self) -> &str {
        &self.handle.addr
    }

    async fn request(&self, publish: Publish) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Publish(publish, tx))?;
        rx.await.unwrap_or(Err(Error::Stopped))
    }

    fn send(&self, command: Command) -> Result<(), Error> {
        self.handle.commands.unbounded_send(command).map_err(|_| Error::Stopped)
    }
}

enum Input {
    Command(Command),
    Io(IoEvent),
    Timeout,
    /// Every handle is gone.
    Closed,
}

struct Engine<R: Runtime> {
    state: ProducerState,
    commands: mpsc::UnboundedReceiver<Command>,
    sockets: Sockets<R>,
    pending: HashMap<TxId, oneshot::Sender<Result<(), Error>>>,
    connect_waiters: Vec<oneshot::Sender<Result<(), Error>>>,
    pings: HashMap<TxId, oneshot::Sender<Result<(), Error>>>,
    /// Pings whose NOP was handed to the connection's writer: resolved when that write ends.
    ping_writes: Vec<(ConnId, oneshot::Sender<Result<(), Error>>)>,
    auth: Arc<Mutex<Option<AuthResponse>>>,
    stop_waiters: Vec<oneshot::Sender<()>>,
    connected: bool,
    shutdown: bool,
}

impl<R: Runtime> Engine<R> {
    fn new(state: ProducerState, config: Config, commands: mpsc::UnboundedReceiver<Command>) -> Self {
        Self {
            state,
            commands,
            sockets: Sockets::new(&config),
            pending: HashMap::new(),
            connect_waiters: Vec::new(),
            pings: HashMap::new(),
            ping_writes: Vec::new(),
            auth: Arc::default(),
            stop_waiters: Vec::new(),
            connected: false,
            shutdown: false,
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
            let timer = self.state.poll_timeout();
            let input = {
                let shutdown = self.shutdown;
                let commands = &mut self.commands;
                let commands = async move {
                    if shutdown {
                        futures_util::future::pending().await
                    } else {
                        commands.next().await.map_or(Input::Closed, Input::Command)
                    }
                };
                let io = self.sockets.next();
                let sleep = async move {
                    match timer {
                        Some(at) => R::sleep_until(at).await,
                        None => futures_util::future::pending().await,
                    }
                };
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
        use futures_util::FutureExt;
        if !self.shutdown {
            if let Some(Some(command)) = self.commands.next().now_or_never() {
                return Some(Input::Command(command));
            }
        }
        self.sockets.try_next().map(Input::Io)
    }

    fn handle(&mut self, input: Input, now: std::time::Instant) {
        match input {
            Input::Timeout => self.state.handle_timeout(now),
            Input::Closed | Input::Command(Command::Shutdown) => {
                self.shutdown = true;
                self.state.stop(now);
            }
            Input::Command(Command::Publish(publish, reply)) => {
                let queued = match publish {
                    Publish::One(topic, body) => self.state.publish(&topic, body, now),
                    Publish::Many(topic, bodies) => self.state.multi_publish(&topic, bodies, now),
                    Publish::Deferred(topic, delay, body) => self.state.deferred_publish(&topic, delay, body, now),
                };
                match queued {
                    Ok(tx) => {
                        self.pending.insert(tx, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Input::Command(Command::Connect(reply)) => {
                if self.connected {
                    let _ = reply.send(Ok(()));
                } else if let Err(e) = self.state.connect(now) {
                    let _ = reply.send(Err(e.into()));
                } else {
                    self.connect_waiters.push(reply);
                }
            }
            Input::Command(Command::Ping(reply)) => match self.state.ping(now) {
                Ok(tx) => {
                    self.pings.insert(tx, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            Input::Command(Command::Stop(reply)) => {
                self.stop_waiters.push(reply);
                self.state.stop(now);
            }
            Input::Io(event) => {
                match &event {
                    IoEvent::Written(conn) => self.ping_written(*conn, Ok(())),
                    IoEvent::Failed(conn, error) => {
                        self.ping_written(*conn, Err(ConnectionError::Io(error.clone())));
                    }
                    _ => {}
                }
                self.sockets.apply(event, &mut self.state, now)
            }
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
            while let Some(event) = self.state.poll_event() {
                progress = true;
                self.on_event(event);
            }
            if !progress {
                return;
            }
        }
    }

    fn on_event(&mut self, event: ProducerEvent) {
        match event {
            ProducerEvent::Published { tx, result } => {
                if let Some(reply) = self.pending.remove(&tx) {
                    let _ = reply.send(result.map_err(Error::from));
                }
            }
            ProducerEvent::Pinged { tx, conn, result } => {
                if let Some(reply) = self.pings.remove(&tx) {
                    match result {
                        Ok(()) => self.ping_writes.push((conn, reply)),
                        Err(e) => {
                            let _ = reply.send(Err(Error::Connection(e)));
                        }
                    }
                }
            }
            ProducerEvent::Authenticated { auth, .. } => {
                if let Ok(mut slot) = self.auth.lock() {
                    *slot = Some(auth);
                }
            }
            ProducerEvent::Connected(conn) => {
                debug!(%conn, "producer connected");
                self.connected = true;
                for waiter in self.connect_waiters.drain(..) {
                    let _ = waiter.send(Ok(()));
                }
            }
            ProducerEvent::Disconnected(conn, error) | ProducerEvent::ConnectFailed { conn, error, .. } => {
                debug!(%conn, %error, "producer disconnected");
                self.connected = false;
                self.ping_written(conn, Err(error.clone()));
                for waiter in self.connect_waiters.drain(..) {
                    let _ = waiter.send(Err(Error::Connection(error.clone())));
                }
            }
            _ => {}
        }
    }
}
