//! [`Message`] handles and the [`Handler`] trait.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::batch::Batch;
use crate::{ConnId, MessageId, Response};

/// A message delivered to a consumer. Cheap to clone; clones share one response.
///
/// Answer it with [`finish`](Self::finish), [`requeue`](Self::requeue),
/// [`requeue_without_backoff`](Self::requeue_without_backoff), or keep it alive with
/// [`touch`](Self::touch). Handlers answer automatically (FIN on `Ok`, REQ with backoff on
/// `Err`) unless [`disable_auto_response`](Self::disable_auto_response) was called.
///
/// **A message dropped without an answer is requeued** (with the default delay and without
/// backoff) when its last clone is dropped, so nothing leaks in flight until its timeout.
#[derive(Clone)]
pub struct Message {
    inner: crate::Message,
    shared: Arc<Shared>,
}

struct Shared {
    origin: Arc<Origin>,
    id: MessageId,
    attempts: u16,
    answered: AtomicBool,
    auto_response: AtomicBool,
}

/// What the messages of one connection share: one reference per message instead of one per
/// field.
#[derive(Debug)]
pub(crate) struct Origin {
    conn: ConnId,
    nsqd: Arc<str>,
    answers: Arc<Answers>,
    /// The connection is still up: once it is gone, nsqd has requeued its messages and no
    /// answer can reach them.
    pub(crate) alive: AtomicBool,
}

impl Origin {
    pub(crate) fn new(conn: ConnId, nsqd: Arc<str>, answers: &Arc<Answers>) -> Arc<Self> {
        Arc::new(Self { conn, nsqd, answers: answers.clone(), alive: AtomicBool::new(true) })
    }
}

/// A response travelling from a message handle to the consumer engine.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) conn: ConnId,
    pub(crate) id: MessageId,
    pub(crate) attempts: u16,
    pub(crate) response: Response,
    /// A FIN's or REQ's handle, for the engine to reuse once no clone of it is left.
    pub(crate) handle: Option<Recyclable>,
}

/// A message handle's shared part on its way back to the engine.
pub(crate) struct Recyclable(Arc<Shared>);

impl fmt::Debug for Recyclable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Recyclable")
    }
}

impl Message {
    pub(crate) fn new(inner: crate::Message, origin: Arc<Origin>) -> Self {
        let shared = Arc::new(Shared::new(&inner, origin));
        Self { inner, shared }
    }

    /// The payload.
    pub fn body(&self) -> &Bytes {
        &self.inner.body
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        self.inner.id
    }

    /// How many times nsqd delivered it, this time included.
    pub fn attempts(&self) -> u16 {
        self.inner.attempts
    }

    /// When nsqd first received it, in nanoseconds since the Unix epoch.
    pub fn timestamp(&self) -> u64 {
        self.inner.timestamp
    }

    /// The nsqd it came from (`host:port`).
    pub fn nsqd_address(&self) -> &str {
        &self.shared.origin.nsqd
    }

    /// Whether it was answered already.
    pub fn has_responded(&self) -> bool {
        self.shared.answered.load(Ordering::Acquire)
    }

    /// FIN: handled. Returns false if it was answered already.
    pub fn finish(&self) -> bool {
        self.answer(Response::Finish)
    }

    /// REQ with backoff: redeliver after `delay` (`None`: the configured default, growing with
    /// attempts). Returns false if it was answered already.
    pub fn requeue(&self, delay: Option<Duration>) -> bool {
        self.answer(Response::Requeue { delay, backoff: true })
    }

    /// REQ without backoff. Returns false if it was answered already.
    pub fn requeue_without_backoff(&self, delay: Option<Duration>) -> bool {
        self.answer(Response::Requeue { delay, backoff: false })
    }

    /// TOUCH: restart its timeout on nsqd. Any number of times before the answer.
    pub fn touch(&self) {
        if !self.has_responded() {
            self.shared.send(Response::Touch, None);
        }
    }

    /// Stops the handler from answering it automatically; the application answers it.
    pub fn disable_auto_response(&self) {
        self.shared.auto_response.store(false, Ordering::Release);
    }

    /// Whether the handler will answer it automatically.
    pub fn is_auto_response_enabled(&self) -> bool {
        self.shared.auto_response.load(Ordering::Acquire)
    }

    /// The message as the core decoded it.
    pub fn as_inner(&self) -> &crate::Message {
        &self.inner
    }

    /// Whether the connection it came on is gone (nsqd has requeued it, and will deliver it
    /// again): handing it to the application would only make a duplicate.
    pub(crate) fn is_stale(&self) -> bool {
        !self.shared.origin.alive.load(Ordering::Acquire)
    }

    fn answer(&self, response: Response) -> bool {
        Shared::answer(&self.shared, response)
    }

    /// What a handler task keeps to answer the message after the handler returns: its shared
    /// part only, not a clone of the message and its body.
    pub(crate) fn responder(&self) -> Responder {
        Responder(self.shared.clone())
    }
}

/// Answers a message on a handler's behalf.
pub(crate) struct Responder(Arc<Shared>);

impl Responder {
    pub(crate) fn id(&self) -> MessageId {
        self.0.id
    }

    pub(crate) fn is_auto_response_enabled(&self) -> bool {
        self.0.auto_response.load(Ordering::Acquire)
    }

    /// Answers unless answered already; hands the shared part back for reuse.
    pub(crate) fn answer(self, response: Response) -> bool {
        Shared::answer(&self.0, response)
    }
}

impl Shared {
    /// The unanswered shared part of `inner`.
    fn new(inner: &crate::Message, origin: Arc<Origin>) -> Self {
        Self {
            origin,
            id: inner.id,
            attempts: inner.attempts,
            answered: AtomicBool::new(false),
            auto_response: AtomicBool::new(true),
        }
    }

    /// Answers unless answered already; the shared part goes back with the answer for reuse.
    fn answer(this: &Arc<Self>, response: Response) -> bool {
        if this.answered.swap(true, Ordering::AcqRel) {
            return false;
        }
        this.send(response, Some(Recyclable(this.clone())));
        true
    }

    fn send(&self, response: Response, handle: Option<Recyclable>) {
        let answer = Answer { conn: self.origin.conn, id: self.id, attempts: self.attempts, response, handle };
        // Refused once the consumer is gone: nsqd requeues the message after its timeout anyway.
        self.origin.answers.push(answer);
    }
}

/// Answered handles kept for reuse: a message handle's shared part is an allocation per
/// message otherwise (a tenth of a consumer's CPU, with the system allocator). A handle is
/// reused only once every clone of it is gone.
///
/// Bounded without a cap: every spare handle was made for a message, and is spare only while
/// it is not in use, so there are never more than the most messages ever out at once
/// (`max_in_flight`, plus those of closed connections the application still held).
#[derive(Debug, Default)]
pub(crate) struct Recycler {
    spare: Vec<Recyclable>,
}

impl Recycler {
    /// A handle for `inner`, reusing an answered one when no clone of it is left.
    pub(crate) fn make(&mut self, inner: crate::Message, origin: &Arc<Origin>) -> Message {
        while let Some(Recyclable(mut shared)) = self.spare.pop() {
            // Not unique: the application still holds a clone; that handle stays its own.
            if let Some(slot) = Arc::get_mut(&mut shared) {
                // The old part was answered: dropping it sends nothing.
                *slot = Shared::new(&inner, origin.clone());
                return Message { inner, shared };
            }
        }
        Message::new(inner, origin.clone())
    }

    /// Keeps an answered handle for reuse.
    pub(crate) fn put(&mut self, handle: Recyclable) {
        self.spare.push(handle);
    }
}

/// Answers on their way from message handles to the consumer engine: a burst of FINs costs a
/// lock each, no allocation, and one wake of the engine, which takes them all in one swap.
pub(crate) type Answers = Batch<Answer>;

impl Drop for Shared {
    fn drop(&mut self) {
        if !self.answered.load(Ordering::Acquire) && self.origin.alive.load(Ordering::Acquire) {
            self.send(Response::Requeue { delay: None, backoff: false }, None);
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.inner.id)
            .field("attempts", &self.inner.attempts)
            .field("body_len", &self.inner.body.len())
            .field("nsqd", &self.shared.origin.nsqd)
            .finish()
    }
}

/// The error a handler returns: anything that converts into a boxed error.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Handles messages. `Ok` finishes the message, `Err` requeues it with backoff (unless the
/// handler disabled auto-response and answered itself).
///
/// Closures `Fn(Message) -> impl Future<Output = Result<(), E>>` implement it.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message.
    fn handle(&self, message: Message) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// What a handler closure's future may return: `Result<(), E>` with `E` convertible into
/// [`HandlerError`].
pub trait HandlerResult {
    /// Converts into the handler's result.
    fn into_result(self) -> Result<(), HandlerError>;
}

impl<E: Into<HandlerError>> HandlerResult for Result<(), E> {
    fn into_result(self) -> Result<(), HandlerError> {
        self.map_err(Into::into)
    }
}

impl<F, Fut> Handler for F
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future + Send,
    Fut::Output: HandlerResult,
{
    async fn handle(&self, message: Message) -> Result<(), HandlerError> {
        self(message).await.into_result()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::MessageId;

    fn inner(n: u8) -> crate::Message {
        crate::Message { id: MessageId([n; 16]), timestamp: 0, attempts: n.into(), body: Bytes::from_static(b"x") }
    }

    /// Answers `message` and hands its recyclable part to `recycler`, as the engine does.
    fn answer_and_return(message: &Message, answers: &Answers, recycler: &mut Recycler) {
        assert!(message.finish());
        let mut batch = Vec::new();
        assert!(answers.try_take(&mut batch));
        recycler.put(batch.pop().unwrap().handle.unwrap());
    }

    #[test]
    fn an_answered_handle_is_reused_only_once_no_clone_is_left() {
        let answers = Arc::new(Answers::default());
        let origin = Origin::new(ConnId(1), "nsqd:4150".into(), &answers);
        let mut recycler = Recycler::default();

        let first = recycler.make(inner(1), &origin);
        let first_ptr = Arc::as_ptr(&first.shared);
        answer_and_return(&first, &answers, &mut recycler);
        drop(first);
        let second = recycler.make(inner(2), &origin);
        assert_eq!(Arc::as_ptr(&second.shared), first_ptr, "the answered handle is reused");
        assert!(!second.has_responded() && second.is_auto_response_enabled());
        assert_eq!((second.id(), second.attempts()), (MessageId([2; 16]), 2));

        // The application keeps a clone after answering: that handle is not reused.
        let kept = second.clone();
        answer_and_return(&second, &answers, &mut recycler);
        drop(second);
        let third = recycler.make(inner(3), &origin);
        assert_ne!(Arc::as_ptr(&third.shared), first_ptr);
        assert!(kept.has_responded(), "the kept clone still says it was answered");
        assert!(!third.has_responded());

        // A reused handle dropped unanswered is requeued as a new one is.
        answer_and_return(&third, &answers, &mut recycler);
        drop(third);
        let fourth = recycler.make(inner(4), &origin);
        drop(fourth);
        let mut batch = Vec::new();
        assert!(answers.try_take(&mut batch));
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].id, MessageId([4; 16]));
        assert!(matches!(batch[0].response, Response::Requeue { backoff: false, .. }));
    }
}
