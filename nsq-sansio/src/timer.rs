//! A fixed table of deadlines, one slot per kind of timer.

use std::time::Instant;

/// One slot per timer kind; `poll_timeout` is the earliest armed slot.
#[derive(Debug, Clone)]
pub(crate) struct TimerTable<K: Copy + Into<usize>, const N: usize> {
    slots: [Option<Instant>; N],
    _kind: std::marker::PhantomData<K>,
}

impl<K: Copy + Into<usize>, const N: usize> Default for TimerTable<K, N> {
    fn default() -> Self {
        Self { slots: [None; N], _kind: std::marker::PhantomData }
    }
}

impl<K: Copy + Into<usize>, const N: usize> TimerTable<K, N> {
    pub(crate) fn set(&mut self, kind: K, at: Instant) {
        if let Some(slot) = self.slots.get_mut(kind.into()) {
            *slot = Some(at);
        }
    }

    pub(crate) fn stop(&mut self, kind: K) {
        if let Some(slot) = self.slots.get_mut(kind.into()) {
            *slot = None;
        }
    }

    /// Whether `kind` is armed and due at `now`; disarms it if so.
    pub(crate) fn expire(&mut self, kind: K, now: Instant) -> bool {
        match self.slots.get_mut(kind.into()) {
            Some(slot) if slot.is_some_and(|at| at <= now) => {
                *slot = None;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.slots.iter().flatten().min().copied()
    }

    pub(crate) fn clear(&mut self) {
        self.slots = [None; N];
    }
}
