//! The handoff of a consumer's messages from its engine to its handler tasks or its stream.
//!
//! One queue behind one mutex, and the wakers of the receivers waiting on it. The engine
//! pushes each burst of messages under one lock and wakes as many waiting receivers as it
//! pushed; a receiver that is busy when messages arrive takes the next one when it comes back,
//! for one uncontended lock and no wake. (A general-purpose channel costs a notification per
//! message and a zeroed block per few dozen; a third of the consumer's own CPU went there.)

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::message::Message;

#[derive(Debug, Default)]
struct Queue {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    messages: VecDeque<Message>,
    /// Each receiver's waker while it waits, by receiver slot; `None` when it is not waiting.
    wakers: Vec<Option<Waker>>,
    /// Slots of dropped receivers, for reuse.
    free: Vec<usize>,
    /// The waiting receivers' slots, first come first woken.
    waiting: VecDeque<usize>,
    /// The engine stopped: receivers end once the queue is empty.
    sender_gone: bool,
    /// The stream was dropped: nothing more is taken, and pushes are refused.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while the lock is held leaves the queue as consistent as between two calls.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    /// Moves up to `n` waiting receivers' wakers into `woken`.
    fn take_waiters(&mut self, n: usize, woken: &mut Vec<Waker>) {
        for _ in 0..n {
            let Some(slot) = self.waiting.pop_front() else { return };
            woken.extend(self.wakers[slot].take());
        }
    }
}

/// A new queue: the engine's end and the first receiver.
pub(crate) fn queue() -> (Sender, Receiver) {
    let queue = Arc::new(Queue::default());
    let receiver = Receiver::new(queue.clone());
    (Sender { queue, woken: Vec::new() }, receiver)
}

/// The engine's end. Dropping it ends the receivers once they have taken what is queued.
#[derive(Debug)]
pub(crate) struct Sender {
    queue: Arc<Queue>,
    /// Wakers taken under the lock, woken after it.
    woken: Vec<Waker>,
}

impl Sender {
    /// Queues every message of `burst` (leaving it empty) and wakes a waiting receiver for
    /// each. When the stream was dropped, the messages are dropped here instead, which
    /// requeues them.
    pub(crate) fn push(&mut self, burst: &mut Vec<Message>) {
        let mut inner = self.queue.lock();
        if inner.closed {
            drop(inner);
            burst.clear();
            return;
        }
        let n = burst.len();
        inner.messages.extend(burst.drain(..));
        inner.take_waiters(n, &mut self.woken);
        drop(inner);
        for waker in self.woken.drain(..) {
            waker.wake();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut inner = self.queue.lock();
        inner.sender_gone = true;
        let n = inner.waiting.len();
        inner.take_waiters(n, &mut self.woken);
        drop(inner);
        for waker in self.woken.drain(..) {
            waker.wake();
        }
    }
}

/// A receiving end. Clones take from the same queue; each message goes to one of them.
#[derive(Debug)]
pub(crate) struct Receiver {
    queue: Arc<Queue>,
    slot: usize,
}

impl Receiver {
    fn new(queue: Arc<Queue>) -> Self {
        let slot = {
            let mut inner = queue.lock();
            match inner.free.pop() {
                Some(slot) => slot,
                None => {
                    inner.wakers.push(None);
                    inner.wakers.len() - 1
                }
            }
        };
        Self { queue, slot }
    }

    /// The next message; `None` once the engine stopped and the queue is empty, or the queue
    /// was closed.
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let mut inner = self.queue.lock();
        if inner.closed {
            return Poll::Ready(None);
        }
        if let Some(message) = inner.messages.pop_front() {
            return Poll::Ready(Some(message));
        }
        if inner.sender_gone {
            return Poll::Ready(None);
        }
        match &mut inner.wakers[self.slot] {
            Some(waker) => waker.clone_from(cx.waker()),
            empty => {
                *empty = Some(cx.waker().clone());
                inner.waiting.push_back(self.slot);
            }
        }
        Poll::Pending
    }

    /// Waits for the next message (see [`poll_recv`](Self::poll_recv)).
    pub(crate) async fn recv(&self) -> Option<Message> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Refuses every later push and drops what is queued (which requeues it), for every
    /// receiver.
    pub(crate) fn close(&self) {
        let dropped = {
            let mut inner = self.queue.lock();
            inner.closed = true;
            std::mem::take(&mut inner.messages)
        };
        // Outside the lock: dropping an unanswered message queues its requeue.
        drop(dropped);
    }
}

impl Clone for Receiver {
    fn clone(&self) -> Self {
        Self::new(self.queue.clone())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut inner = self.queue.lock();
        if inner.wakers[self.slot].take().is_some() {
            inner.waiting.retain(|&slot| slot != self.slot);
        }
        inner.free.push(self.slot);
        // This receiver may have been woken for a message it will not take now: pass the
        // wake on.
        let mut woken = Vec::new();
        if !inner.messages.is_empty() {
            inner.take_waiters(1, &mut woken);
        }
        drop(inner);
        woken.into_iter().for_each(Waker::wake);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;
    use crate::driver::message::{Answers, Origin};
    use crate::{ConnId, MessageId};

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    fn messages(n: u8, answers: &Arc<Answers>) -> Vec<Message> {
        let origin = Origin::new(ConnId(1), "nsqd:4150".into(), answers);
        (0..n)
            .map(|i| {
                let inner = crate::Message {
                    id: MessageId([i; 16]),
                    timestamp: 0,
                    attempts: 1,
                    body: bytes::Bytes::from_static(b"x"),
                };
                Message::new(inner, origin.clone())
            })
            .collect()
    }

    fn id(poll: Poll<Option<Message>>) -> Option<u8> {
        match poll {
            Poll::Ready(Some(m)) => {
                m.finish();
                Some(m.id().0[0])
            }
            _ => None,
        }
    }

    #[test]
    fn a_burst_wakes_as_many_waiting_receivers_as_it_holds_and_each_message_goes_once() {
        let answers = Arc::default();
        let (mut tx, a) = queue();
        let b = a.clone();
        let c = a.clone();
        let (counts, wakers): (Vec<_>, Vec<_>) = (0..3).map(|_| counter()).unzip();
        for (rx, waker) in [&a, &b, &c].into_iter().zip(&wakers) {
            assert!(rx.poll_recv(&mut Context::from_waker(waker)).is_pending());
            // Polled again while waiting: still one registration.
            assert!(rx.poll_recv(&mut Context::from_waker(waker)).is_pending());
        }
        tx.push(&mut messages(2, &answers));
        let woken: Vec<usize> = counts.iter().map(|c| c.0.load(Ordering::SeqCst)).collect();
        assert_eq!(woken, [1, 1, 0], "the first two waiters, once each");
        let got: Vec<_> =
            [&a, &b, &c].iter().map(|rx| id(rx.poll_recv(&mut Context::from_waker(&wakers[0])))).collect();
        assert_eq!(got, [Some(0), Some(1), None]);
    }

    #[test]
    fn a_receiver_dropped_after_its_wake_passes_it_on() {
        let answers = Arc::default();
        let (mut tx, a) = queue();
        let b = a.clone();
        let (count_a, waker_a) = counter();
        let (count_b, waker_b) = counter();
        assert!(a.poll_recv(&mut Context::from_waker(&waker_a)).is_pending());
        assert!(b.poll_recv(&mut Context::from_waker(&waker_b)).is_pending());
        tx.push(&mut messages(1, &answers));
        assert_eq!(count_a.0.load(Ordering::SeqCst), 1);
        drop(a);
        assert_eq!(count_b.0.load(Ordering::SeqCst), 1, "b is woken for the message a left");
        assert_eq!(id(b.poll_recv(&mut Context::from_waker(&waker_b))), Some(0));
    }

    #[test]
    fn receivers_end_after_the_queue_drains_once_the_engine_is_gone() {
        let answers = Arc::default();
        let (mut tx, a) = queue();
        let (count, waker) = counter();
        let b = a.clone();
        assert!(b.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        tx.push(&mut messages(1, &answers));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(b.poll_recv(&mut Context::from_waker(&waker)).is_ready());
        assert!(b.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        tx.push(&mut messages(1, &answers));
        drop(tx);
        assert_eq!(id(a.poll_recv(&mut Context::from_waker(&waker))), Some(0), "what was queued is still taken");
        assert!(matches!(a.poll_recv(&mut Context::from_waker(&waker)), Poll::Ready(None)));
    }

    #[test]
    fn a_closed_queue_requeues_what_it_held_and_refuses_more() {
        let answers: Arc<Answers> = Arc::default();
        let (mut tx, rx) = queue();
        tx.push(&mut messages(2, &answers));
        rx.close();
        let mut taken = Vec::new();
        assert!(answers.try_take(&mut taken));
        assert_eq!(taken.len(), 2, "both queued messages requeued");
        assert!(taken.iter().all(|a| matches!(a.response, crate::Response::Requeue { .. })));
        let mut later = messages(1, &answers);
        tx.push(&mut later);
        assert!(later.is_empty());
        let mut taken = Vec::new();
        assert!(answers.try_take(&mut taken), "a push after the close is requeued at once");
        let (_, waker) = counter();
        assert!(matches!(rx.poll_recv(&mut Context::from_waker(&waker)), Poll::Ready(None)));
    }
}
