//! [`Consumer`]: an async handle on a [`ConsumerState`] run by one engine task.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasherDefault;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_channel::{mpsc, oneshot};
use futures_util::future::{select, Either};
use futures_util::{FutureExt, Stream, StreamExt};
use tracing::{debug, warn, Instrument};

use super::io::{IoEvent, Sockets};
use super::message::{Answer, Answers, Handler, Message, Origin, Recycler};
use super::queue::{self, Receiver, Sender};
use super::{EngineTimer, Error, Runtime};
use crate::connection::IdHasher;
use crate::{
    AuthResponse, Channel, Config, ConnId, ConnectionError, ConsumerEvent, ConsumerState, ConsumerStats, Response,
    Topic,
};

type FailedHook = Arc<dyn Fn(&crate::Message) + Send + Sync>;
/// nsqd's last AUTH answer, per nsqd address.
type AuthAnswers = Arc<Mutex<BTreeMap<String, AuthResponse>>>;

/// Consumes one topic/channel from every nsqd it is pointed at, directly or through lookupd.
///
/// Two ways to consume, both first class: handlers ([`add_handler`](Self::add_handler),
/// [`add_concurrent_handlers`](Self::add_concurrent_handlers)), or the
/// [`messages`](Self::messages) stream. Add handlers (or take the stream) before connecting:
/// connecting without either is refused with [`Error::NoHandlers`].
/// Cheap to clone. Dropping the last clone stops the consumer gracefully.
///
/// # Failures
///
/// [`connect_to_nsqd`](Self::connect_to_nsqd) resolves once the first connection subscribed,
/// or with the error that prevented it ([`Error::Connection`]: the dial's "connection
/// refused", a TLS or certificate failure, `E_AUTH_FAILED`, ...); a failed address is not
/// retried. Once connected, a lost connection is redialled with jittered backoff, and a lookupd
/// poll redials what lookupd lists; see [`ConsumerState`] for the exact schedule. Failures
/// after the first connect are logged through `tracing`.
pub struct Consumer<R: Runtime> {
    handle: Arc<Handle>,
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> Clone for Consumer<R> {
    fn clone(&self) -> Self {
        Self { handle: self.handle.clone(), _runtime: PhantomData }
    }
}

impl<R: Runtime> fmt::Debug for Consumer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer").field("topic", &self.handle.topic).field("channel", &self.handle.channel).finish()
    }
}

struct Handle {
    topic: Topic,
    channel: Channel,
    commands: mpsc::UnboundedSender<Command>,
    /// The message queue, until the stream or the handlers take it.
    messages: Mutex<Option<Receiver>>,
    /// The handlers' end of the queue: each handler task takes from a clone.
    shared_messages: Mutex<Option<Receiver>>,
    failed: Arc<Mutex<Option<FailedHook>>>,
    auth: AuthAnswers,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.commands.unbounded_send(Command::Stop(None));
    }
}

enum Command {
    /// Resolved at once, except a direct nsqd: when its first connection subscribed or failed.
    Source(Source, oneshot::Sender<Result<(), Error>>),
    MaxInFlight(u32),
    DiscoveryFilter(Box<dyn FnMut(Vec<String>) -> Vec<String> + Send>),
    Stats(oneshot::Sender<ConsumerStats>),
    Starved(oneshot::Sender<bool>),
    Stop(Option<oneshot::Sender<()>>),
    Stopped(oneshot::Sender<()>),
}

enum Source {
    Nsqd(String),
    NoNsqd(String),
    Lookupd(String),
    NoLookupd(String),
}

impl<R: Runtime> Consumer<R> {
    /// A consumer of `topic`/`channel`. Spawns its engine task; nothing connects until a source
    /// is added.
    pub fn new(topic: impl AsRef<str>, channel: impl AsRef<str>, config: Config) -> Result<Self, Error> {
        let topic = Topic::new(topic)?;
        let channel = Channel::new(channel)?;
        config.validate()?;
        let config = super::with_identity(config);
        let (commands, commands_rx) = mpsc::unbounded();
        let (messages_tx, messages_rx) = queue::queue();
        let failed: Arc<Mutex<Option<FailedHook>>> = Arc::new(Mutex::new(None));
        let state = ConsumerState::new(topic.clone(), channel.clone(), Arc::new(config), R::now());
        let engine = Engine::<R>::new(state, commands_rx, messages_tx, failed.clone());
        let auth = engine.auth.clone();
        let span = tracing::debug_span!("nsq_consumer", %topic, %channel);
        R::spawn(engine.run().instrument(span));
        let handle = Handle {
            topic,
            channel,
            commands,
            messages: Mutex::new(Some(messages_rx)),
            shared_messages: Mutex::new(None),
            failed,
            auth,
        };
        Ok(Self { handle: Arc::new(handle), _runtime: PhantomData })
    }

    /// Adds one handler task.
    pub fn add_handler<H: Handler>(&self, handler: H) {
        self.add_concurrent_handlers(handler, 1);
    }

    /// Adds `concurrency` handler tasks sharing `handler`. `Ok` finishes a message; `Err` (or
    /// a panic) requeues it with backoff, unless the handler disabled auto-response.
    pub fn add_concurrent_handlers<H: Handler>(&self, handler: H, concurrency: usize) {
        let Some(queue) = self.shared_queue() else {
            warn!("handlers added after messages() took the message stream; they get nothing");
            return;
        };
        let handler = Arc::new(handler);
        for _ in 0..concurrency {
            let queue = queue.clone();
            let handler = handler.clone();
            R::spawn(async move {
                loop {
                    let Some(message) = queue.recv().await else { return };
                    if message.is_stale() {
                        continue;
                    }
                    let keep = message.responder();
                    let outcome = AssertUnwindSafe(handler.handle(message)).catch_unwind().await;
                    if !keep.is_auto_response_enabled() {
                        continue;
                    }
                    let requeue = Response::Requeue { delay: None, backoff: true };
                    match outcome {
                        Ok(Ok(())) => keep.answer(Response::Finish),
                        Ok(Err(e)) => {
                            debug!(id = %keep.id(), %e, "handler failed; requeueing");
                            keep.answer(requeue)
                        }
                        Err(_) => {
                            warn!(id = %keep.id(), "handler panicked; requeueing");
                            keep.answer(requeue)
                        }
                    };
                }
            });
        }
    }

    /// Called with each message that passed `max_attempts`; such messages are finished without
    /// reaching a handler.
    pub fn set_failed_message_hook(&self, hook: impl Fn(&crate::Message) + Send + Sync + 'static) {
        if let Ok(mut slot) = self.handle.failed.lock() {
            *slot = Some(Arc::new(hook));
        }
    }

    /// The messages as a stream, instead of handlers. The stream ends when the consumer
    /// stopped. Only the first call gets the messages.
    pub fn messages(&self) -> Messages {
        let rx = self.handle.messages.lock().ok().and_then(|mut slot| slot.take());
        Messages { rx }
    }

    /// Connects to an nsqd (`host:port`); it is redialled with backoff if it drops.
    pub async fn connect_to_nsqd(&self, addr: impl Into<String>) -> Result<(), Error> {
        self.source(Source::Nsqd(addr.into())).await
    }

    /// Connects to several nsqds.
    pub async fn connect_to_nsqds<S: Into<String>>(&self, addrs: impl IntoIterator<Item = S>) -> Result<(), Error> {
        for addr in addrs {
            self.connect_to_nsqd(addr).await?;
        }
        Ok(())
    }

    /// Polls a lookupd (`host:port`, `http://host:port[/path]` or `https://host:port[/path]`)
    /// and connects to the nsqds it lists (after the [discovery
    /// filter](Self::set_discovery_filter), if any). `https://` uses the configuration's TLS
    /// settings; with an `auth_secret`, queries carry `Authorization: Bearer <auth_secret>`
    /// unless `skip_lookupd_authorization` is false. See
    /// [`ConsumerState::connect_to_nsqlookupd`].
    pub async fn connect_to_nsqlookupd(&self, addr: impl Into<String>) -> Result<(), Error> {
        self.source(Source::Lookupd(addr.into())).await
    }

    /// Polls several lookupds, in turn.
    pub async fn connect_to_nsqlookupds<S: Into<String>>(
        &self,
        addrs: impl IntoIterator<Item = S>,
    ) -> Result<(), Error> {
        for addr in addrs {
            self.connect_to_nsqlookupd(addr).await?;
        }
        Ok(())
    }

    /// Closes the connection to an nsqd, given directly or found through lookupd; it is not
    /// dialled again (even when lookupd lists it) until `connect_to_nsqd` names it.
    pub async fn disconnect_from_nsqd(&self, addr: impl Into<String>) -> Result<(), Error> {
        self.source(Source::NoNsqd(addr.into())).await
    }

    /// Stops polling a lookupd.
    pub async fn disconnect_from_nsqlookupd(&self, addr: impl Into<String>) -> Result<(), Error> {
        self.source(Source::NoLookupd(addr.into())).await
    }

    /// Filters or reorders the nsqd addresses of every lookupd answer before they are dialled
    /// (go-nsq's `DiscoveryFilter`): `filter` gets the `host:port` addresses lookupd listed and
    /// returns those to dial, in order. Set it before connecting to lookupd; it replaces any
    /// earlier filter. A filter that panics dials nothing from that answer.
    pub fn set_discovery_filter(&self, mut filter: impl FnMut(Vec<String>) -> Vec<String> + Send + 'static) {
        let guarded = move |addrs: Vec<String>| match std::panic::catch_unwind(AssertUnwindSafe(|| filter(addrs))) {
            Ok(addrs) => addrs,
            Err(_) => {
                warn!("the discovery filter panicked; nothing from this lookupd answer is dialled");
                Vec::new()
            }
        };
        let _ = self.handle.commands.unbounded_send(Command::DiscoveryFilter(Box::new(guarded)));
    }

    /// Changes `max_in_flight`; RDY is redistributed.
    pub fn change_max_in_flight(&self, max_in_flight: u32) {
        let _ = self.handle.commands.unbounded_send(Command::MaxInFlight(max_in_flight));
    }

    /// What each nsqd's auth server said about the `auth_secret` (identity, identity URL,
    /// permission count), by nsqd address: the last AUTH answer of every nsqd this consumer
    /// authenticated to. Empty when no nsqd asked for AUTH.
    pub fn auth(&self) -> BTreeMap<String, AuthResponse> {
        self.handle.auth.lock().map(|answers| answers.clone()).unwrap_or_default()
    }

    /// Counters.
    pub async fn stats(&self) -> ConsumerStats {
        let (tx, rx) = oneshot::channel();
        let _ = self.handle.commands.unbounded_send(Command::Stats(tx));
        rx.await.unwrap_or_default()
    }

    /// Whether a connection has messages in flight up to 85% of its RDY count or more (go-nsq's
    /// `IsStarved`): the handlers are the bottleneck. See [`ConsumerState::is_starved`].
    pub async fn is_starved(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        let _ = self.handle.commands.unbounded_send(Command::Starved(tx));
        rx.await.unwrap_or_default()
    }

    /// Graceful stop: RDY 0 and CLS everywhere, in-flight messages answered (at most 30 s),
    /// connections closed, handlers ended. Resolves once stopped.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.handle.commands.unbounded_send(Command::Stop(Some(tx))).is_ok() {
            let _ = rx.await;
        }
    }

    /// Resolves once the consumer stopped, without stopping it.
    pub async fn stopped(&self) {
        let (tx, rx) = oneshot::channel();
        if self.handle.commands.unbounded_send(Command::Stopped(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    async fn source(&self, source: Source) -> Result<(), Error> {
        if matches!(source, Source::Nsqd(_) | Source::Lookupd(_)) && !self.is_consuming() {
            return Err(Error::NoHandlers);
        }
        let (tx, rx) = oneshot::channel();
        self.handle.commands.unbounded_send(Command::Source(source, tx)).map_err(|_| Error::Stopped)?;
        rx.await.unwrap_or(Err(Error::Stopped))
    }

    /// Whether handlers were added or the stream taken: something will receive the messages.
    fn is_consuming(&self) -> bool {
        self.handle.messages.lock().map_or(true, |slot| slot.is_none())
    }

    fn shared_queue(&self) -> Option<Receiver> {
        let mut shared = self.handle.shared_messages.lock().ok()?;
        if shared.is_none() {
            *shared = Some(self.handle.messages.lock().ok()?.take()?);
        }
        shared.clone()
    }
}

/// The stream of a consumer's messages; ends when the consumer stopped.
#[derive(Debug)]
pub struct Messages {
    rx: Option<Receiver>,
}

impl Stream for Messages {
    type Item = Message;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let Some(rx) = &self.rx else { return Poll::Ready(None) };
        loop {
            match rx.poll_recv(cx) {
                // Its connection is gone: nsqd delivers it again; this copy would be a duplicate.
                Poll::Ready(Some(message)) if message.is_stale() => continue,
                other => return other,
            }
        }
    }
}

impl Drop for Messages {
    fn drop(&mut self) {
        // The messages queued for the stream go back to nsqd now (a message dropped unanswered
        // is requeued), not when the consumer ends; later ones are refused at the send.
        if let Some(rx) = &self.rx {
            rx.close();
        }
    }
}

enum Input {
    Command(Command),
    Io(IoEvent),
    /// Answers from message handles, moved into `Engine::answer_batch`.
    Answers,
    Timeout,
    Closed,
}

struct Engine<R: Runtime> {
    state: ConsumerState,
    commands: mpsc::UnboundedReceiver<Command>,
    answers: Arc<Answers>,
    /// What the messages of each connection with messages out share (whether it is up).
    origins: HashMap<ConnId, Arc<Origin>, BuildHasherDefault<IdHasher>>,
    answer_batch: Vec<Answer>,
    sockets: Sockets<R>,
    messages: Option<Sender>,
    /// Messages of this turn, handed over together at its end.
    burst: Vec<Message>,
    recycler: Recycler,
    failed: Arc<Mutex<Option<FailedHook>>>,
    auth: AuthAnswers,
    stop_waiters: Vec<oneshot::Sender<()>>,
    /// `connect_to_nsqd` calls waiting for their address's first connection.
    connect_waiters: Vec<(String, oneshot::Sender<Result<(), Error>>)>,
    shutdown: bool,
    timer: EngineTimer,
}

impl<R: Runtime> Drop for Engine<R> {
    fn drop(&mut self) {
        // Messages still held elsewhere must not queue answers nobody will read.
        self.answers.close();
    }
}

impl<R: Runtime> Engine<R> {
    fn new(
        state: ConsumerState,
        commands: mpsc::UnboundedReceiver<Command>,
        messages: Sender,
        failed: Arc<Mutex<Option<FailedHook>>>,
    ) -> Self {
        Self {
            state,
            commands,
            answers: Arc::default(),
            origins: HashMap::default(),
            answer_batch: Vec::new(),
            sockets: Sockets::new(),
            messages: Some(messages),
            burst: Vec::new(),
            recycler: Recycler::default(),
            failed,
            auth: AuthAnswers::default(),
            stop_waiters: Vec::new(),
            connect_waiters: Vec::new(),
            shutdown: false,
            timer: EngineTimer::new(),
        }
    }

    async fn run(mut self) {
        loop {
            self.drive();
            if self.state.is_stopped() && self.sockets.flushed() {
                // Ends the handlers and the stream.
                self.messages = None;
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
                let commands = &mut self.commands;
                let commands = async move {
                    if shutdown {
                        futures_util::future::pending().await
                    } else {
                        commands.next().await.map_or(Input::Closed, Input::Command)
                    }
                };
                let (queue, batch) = (&self.answers, &mut self.answer_batch);
                let answers = futures_util::future::poll_fn(|cx| queue.poll_take(cx, batch)).map(|()| Input::Answers);
                let io = self.sockets.next().map(|io| io.map_or(Input::Closed, Input::Io));
                let sleep = self.timer.fired();
                let (commands, io) = (std::pin::pin!(commands), std::pin::pin!(io));
                let first = select(commands, select(answers, io));
                match select(first, std::pin::pin!(sleep)).await {
                    Either::Left((Either::Left((input, _)), _)) => input,
                    Either::Left((Either::Right((Either::Left((input, _)) | Either::Right((input, _)), _)), _)) => {
                        input
                    }
                    Either::Right(_) => Input::Timeout,
                }
            };
            // One clock read per batch of inputs: they arrived together.
            let now = R::now();
            self.handle(input, now);
            // Take whatever else is ready before writing, so FINs leave together.
            while let Some(input) = self.try_next() {
                self.handle(input, now);
            }
        }
    }

    fn try_next(&mut self) -> Option<Input> {
        if self.answers.try_take(&mut self.answer_batch) {
            return Some(Input::Answers);
        }
        if let Some(io) = self.sockets.try_next() {
            return Some(Input::Io(io));
        }
        if !self.shutdown {
            if let Some(Some(command)) = self.commands.next().now_or_never() {
                return Some(Input::Command(command));
            }
        }
        None
    }

    fn handle(&mut self, input: Input, now: std::time::Instant) {
        match input {
            Input::Timeout => self.state.handle_timeout(now),
            Input::Closed => {
                if !self.shutdown {
                    self.shutdown = true;
                    self.state.stop(now);
                }
            }
            Input::Answers => {
                let mut batch = std::mem::take(&mut self.answer_batch);
                for a in batch.drain(..) {
                    if let Err(e) = self.state.respond(a.conn, &a.id, a.attempts, a.response, now) {
                        debug!(id = %a.id, %e, "answer refused");
                    }
                    if let Some(handle) = a.handle {
                        self.recycler.put(handle);
                    }
                }
                self.answer_batch = batch;
            }
            Input::Command(Command::Source(source, reply)) => {
                let result = match source {
                    Source::Nsqd(addr) => match self.state.connect_to_nsqd(&addr, now) {
                        // Answered when the first connection subscribes or fails.
                        Ok(()) => return self.connect_waiters.push((addr, reply)),
                        Err(e) => Err(e),
                    },
                    Source::NoNsqd(addr) => self.state.disconnect_from_nsqd(&addr, now),
                    Source::Lookupd(addr) => self.state.connect_to_nsqlookupd(&addr, now),
                    Source::NoLookupd(addr) => self.state.disconnect_from_nsqlookupd(&addr, now),
                };
                let _ = reply.send(result.map_err(Error::from));
            }
            Input::Command(Command::MaxInFlight(n)) => self.state.change_max_in_flight(n, now),
            Input::Command(Command::DiscoveryFilter(filter)) => self.state.set_discovery_filter(filter),
            Input::Command(Command::Stats(reply)) => {
                let _ = reply.send(self.state.stats());
            }
            Input::Command(Command::Starved(reply)) => {
                let _ = reply.send(self.state.is_starved());
            }
            Input::Command(Command::Stop(reply)) => {
                if reply.is_none() {
                    // The last handle is gone.
                    self.shutdown = true;
                }
                self.stop_waiters.extend(reply);
                self.state.stop(now);
            }
            Input::Command(Command::Stopped(reply)) => self.stop_waiters.push(reply),
            Input::Io(event) => self.sockets.apply(event, &mut self.state, now),
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
                break;
            }
        }
        match &mut self.messages {
            Some(tx) if !self.burst.is_empty() => tx.push(&mut self.burst),
            // Nobody consumes: the messages are requeued as they drop here.
            _ => self.burst.clear(),
        }
    }

    /// Answers the `connect_to_nsqd` calls waiting for `addr`.
    fn answer_connect(&mut self, addr: &str, result: Result<(), ConnectionError>) {
        let mut i = 0;
        while i < self.connect_waiters.len() {
            if self.connect_waiters[i].0 == addr {
                let (_, reply) = self.connect_waiters.swap_remove(i);
                let _ = reply.send(result.clone().map_err(Error::Connection));
            } else {
                i += 1;
            }
        }
    }

    fn on_event(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::Message { conn, message } => {
                let (sockets, answers) = (&self.sockets, &self.answers);
                let origin = self.origins.entry(conn).or_insert_with(|| Origin::new(conn, sockets.addr(conn), answers));
                self.burst.push(self.recycler.make(message, origin));
            }
            ConsumerEvent::GaveUp { message, .. } => {
                let hook = self.failed.lock().ok().and_then(|h| h.clone());
                match hook {
                    Some(hook) => hook(&message),
                    None => {
                        warn!(id = %message.id, attempts = message.attempts, "message gave up after max_attempts")
                    }
                }
            }
            ConsumerEvent::Authenticated { addr, auth, .. } => {
                if let Ok(mut answers) = self.auth.lock() {
                    answers.insert(addr, auth);
                }
            }
            ConsumerEvent::Connected { conn, addr } => {
                debug!(%conn, %addr, "subscribed");
                self.answer_connect(&addr, Ok(()));
            }
            ConsumerEvent::ConnectFailed { conn, addr, error, .. } => {
                debug!(%conn, %addr, %error, "connection failed");
                self.answer_connect(&addr, Err(error));
            }
            ConsumerEvent::Disconnected { conn, addr, error } => {
                debug!(%conn, %addr, %error, "disconnected");
                // Its undelivered messages are nsqd's again: the handlers skip them.
                if let Some(origin) = self.origins.remove(&conn) {
                    origin.alive.store(false, Ordering::Release);
                }
            }
            ConsumerEvent::Stopped => {
                for (_, reply) in self.connect_waiters.drain(..) {
                    let _ = reply.send(Err(Error::Stopped));
                }
            }
            // The core logged these already.
            ConsumerEvent::LookupdFailed { .. } => {}
        }
    }
}
