//! Items handed from any number of senders to one engine task: a vector behind a mutex that the
//! engine swaps out whole, and the engine's waker. An item costs a lock and no allocation, and
//! a burst of them one wake-up: only the item that finds the vector empty wakes the engine (the
//! ones after it are taken with it). Message answers reach a consumer engine this way, and a
//! producer's commands reach its engine.

use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// See the module docs. `S` is state the senders share under the same lock.
pub(crate) struct Batch<T, S = ()> {
    inner: Mutex<Inner<T, S>>,
    engine: AtomicWaker,
}

struct Inner<T, S> {
    items: Vec<T>,
    state: S,
    /// The engine has ended: nothing will take the items.
    closed: bool,
}

impl<T, S: Default> Default for Batch<T, S> {
    fn default() -> Self {
        let inner = Inner { items: Vec::new(), state: S::default(), closed: false };
        Self { inner: Mutex::new(inner), engine: AtomicWaker::new() }
    }
}

impl<T, S> fmt::Debug for Batch<T, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queued = self.lock().map(|inner| inner.items.len());
        f.debug_struct("Batch").field("queued", &queued).finish_non_exhaustive()
    }
}

impl<T, S> Batch<T, S> {
    /// The lock; `None` if a panic poisoned it, which the callers treat as closed.
    fn lock(&self) -> Option<MutexGuard<'_, Inner<T, S>>> {
        self.inner.lock().ok()
    }

    /// Queues `item`; false once closed (the item is dropped).
    pub(crate) fn push(&self, item: T) -> bool {
        self.push_with(|_| Ok::<_, std::convert::Infallible>(item)).unwrap_or(false)
    }

    /// Queues the item `make` builds under the lock, with the shared state at hand. `Ok(false)`
    /// without calling `make` once closed.
    pub(crate) fn push_with<E>(&self, make: impl FnOnce(&mut S) -> Result<T, E>) -> Result<bool, E> {
        let first = {
            let Some(mut inner) = self.lock().filter(|inner| !inner.closed) else {
                return Ok(false);
            };
            let item = make(&mut inner.state)?;
            inner.items.push(item);
            inner.items.len() == 1
        };
        if first {
            self.engine.wake();
        }
        Ok(true)
    }

    /// Moves every queued item into `batch` (which must be empty); false if there were none.
    pub(crate) fn try_take(&self, batch: &mut Vec<T>) -> bool {
        match self.lock() {
            Some(mut inner) if !inner.items.is_empty() => {
                std::mem::swap(&mut inner.items, batch);
                true
            }
            _ => false,
        }
    }

    /// Like [`try_take`](Self::try_take), waiting for an item.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>, batch: &mut Vec<T>) -> Poll<()> {
        self.engine.register(cx.waker());
        if self.try_take(batch) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The engine has ended: refuses later items and drops the queued ones (outside the lock:
    /// dropping one may queue another).
    pub(crate) fn close(&self) {
        let dropped = self.lock().map(|mut inner| {
            inner.closed = true;
            std::mem::take(&mut inner.items)
        });
        drop(dropped);
    }
}
