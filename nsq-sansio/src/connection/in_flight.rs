//! Messages delivered on a connection and not yet answered, with their nsqd-side deadlines.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use crate::MessageId;

/// Ids in flight, each with the instant nsqd will time it out and requeue it.
///
/// Deadlines are pushed in time order (delivery and TOUCH both use `now + msg_timeout`), so the
/// queue is sorted; a TOUCH leaves a stale entry behind that expiry skips.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    /// Each live id's deadline and the sequence number of its current queue entry.
    deadlines: HashMap<MessageId, (Instant, u64), BuildHasherDefault<IdHasher>>,
    queue: VecDeque<(Instant, u64, MessageId)>,
    seq: u64,
}

impl InFlight {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            deadlines: HashMap::with_capacity_and_hasher(n, Default::default()),
            queue: VecDeque::with_capacity(n),
            seq: 0,
        }
    }

    pub(crate) fn insert(&mut self, id: MessageId, deadline: Instant) {
        let entry = self.push(deadline, id);
        self.deadlines.insert(id, entry);
    }

    pub(crate) fn remove(&mut self, id: &MessageId) -> bool {
        let removed = self.deadlines.remove(id).is_some();
        // Answers mostly come in delivery order: the stale entries at the front go at once,
        // each for one lookup.
        if removed {
            self.skip_stale();
        }
        // Keep the queue's stale entries bounded by the live ones.
        if removed && self.queue.len() > 2 * self.deadlines.len() + 64 {
            let live = &self.deadlines;
            self.queue.retain(|&(at, seq, id)| live.get(&id) == Some(&(at, seq)));
        }
        removed
    }

    /// Moves `id`'s deadline to `deadline` (TOUCH). Returns false if it is not in flight.
    pub(crate) fn touch(&mut self, id: &MessageId, deadline: Instant) -> bool {
        if !self.deadlines.contains_key(id) {
            return false;
        }
        let entry = self.push(deadline, *id);
        self.deadlines.insert(*id, entry);
        true
    }

    pub(crate) fn contains(&self, id: &MessageId) -> bool {
        self.deadlines.contains_key(id)
    }

    pub(crate) fn len(&self) -> usize {
        self.deadlines.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }

    /// The earliest live deadline.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        self.skip_stale();
        self.queue.front().map(|&(at, _, _)| at)
    }

    /// Removes and returns one id whose deadline is at or before `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<MessageId> {
        self.skip_stale();
        match self.queue.front() {
            Some(&(at, _, id)) if at <= now => {
                self.queue.pop_front();
                self.deadlines.remove(&id);
                Some(id)
            }
            _ => None,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.deadlines.clear();
        self.queue.clear();
    }

    /// Queues a deadline entry and returns what the id's live entry must hold to match it.
    fn push(&mut self, deadline: Instant, id: MessageId) -> (Instant, u64) {
        // A clamped clock can hand out a deadline earlier than the back's; keep the queue sorted.
        let deadline = self.queue.back().map_or(deadline, |&(back, _, _)| back.max(deadline));
        self.seq = self.seq.wrapping_add(1);
        self.queue.push_back((deadline, self.seq, id));
        (deadline, self.seq)
    }

    fn skip_stale(&mut self) {
        while let Some(&(at, seq, id)) = self.queue.front() {
            if self.deadlines.get(&id) == Some(&(at, seq)) {
                break;
            }
            self.queue.pop_front();
        }
    }
}

/// A cheap hash for message ids instead of SipHash per message. nsqd's ids are 16 hex digits
/// that differ mostly in a few characters (a sequence in the middle or at the end), so the
/// folded words go through a full-avalanche finalizer (murmur3's fmix64): every input bit
/// reaches the low bits the table indexes with. Also for the engines' tables keyed by the
/// counters they make themselves (connection and publish ids): nothing from outside chooses
/// those keys, so they need no keyed hash.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
}

/// `now + d`, saturating instead of panicking on overflow.
pub(crate) fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or(now + Duration::from_secs(86_400 * 365))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(n: u8) -> MessageId {
        MessageId([n; 16])
    }

    #[test]
    fn expires_in_deadline_order_and_skips_touched() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut f = InFlight::default();
        f.insert(id(1), t0 + s);
        f.insert(id(2), t0 + 2 * s);
        assert!(f.touch(&id(1), t0 + 3 * s));
        assert_eq!(f.next_deadline(), Some(t0 + 2 * s));
        assert_eq!(f.pop_expired(t0 + 2 * s), Some(id(2)));
        assert_eq!(f.pop_expired(t0 + 2 * s), None);
        assert_eq!(f.pop_expired(t0 + 3 * s), Some(id(1)));
        assert!(f.is_empty());
        assert!(!f.touch(&id(1), t0));
    }

    #[test]
    fn sequential_hex_ids_spread_over_the_low_bits() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<IdHasher>::default();
        // Ids as nsqd and the test servers make them: a counter in hex, varying at either end.
        for shift in [0, 16, 32] {
            let buckets: std::collections::HashSet<u64> = (0..4096u64)
                .map(|n| {
                    let text = format!("{:016x}", (n << shift) | 0x18a7_0000_0000_0000);
                    build.hash_one(MessageId(text.as_bytes().try_into().unwrap())) & 0xfff
                })
                .collect();
            assert!(buckets.len() > 2400, "shift {shift}: only {} of 4096 buckets used", buckets.len());
        }
    }

    #[test]
    fn stale_entries_stay_bounded() {
        let t0 = Instant::now();
        let mut f = InFlight::default();
        f.insert(id(0), t0);
        for n in 0..10_000u32 {
            let mut raw = [0u8; 16];
            raw[..4].copy_from_slice(&n.to_be_bytes());
            f.insert(MessageId(raw), t0);
            f.touch(&id(0), t0);
            assert!(f.remove(&MessageId(raw)));
        }
        assert!(f.queue.len() < 200, "{}", f.queue.len());
    }
}
