//! Messages delivered on a connection and not yet answered, with their nsqd-side deadlines.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use crate::MessageId;

/// Ids in flight, each with the instant nsqd will time it out and requeue it.
///
/// Deadlines are pushed in time order (delivery and TOUCH both use `now + msg_timeout`), so the
/// queue is sorted. Each id maps to the sequence number of its live queue entry, so FIN, REQ and
/// TOUCH mark that entry dead by index; expiry skips dead entries without looking them up.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    /// Each live id's queue entry, by sequence number.
    seqs: HashMap<MessageId, u64, BuildHasherDefault<IdHasher>>,
    queue: VecDeque<Entry>,
    /// The sequence number of the queue's front entry.
    head: u64,
}

#[derive(Debug)]
struct Entry {
    deadline: Instant,
    id: MessageId,
    live: bool,
}

impl InFlight {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            seqs: HashMap::with_capacity_and_hasher(n, Default::default()),
            queue: VecDeque::with_capacity(n),
            head: 0,
        }
    }

    pub(crate) fn insert(&mut self, id: MessageId, deadline: Instant) {
        let seq = self.push(deadline, id);
        if let Some(old) = self.seqs.insert(id, seq) {
            // nsqd does not deliver an id that is in flight; if it did, the newer entry counts.
            self.kill(old);
        }
    }

    pub(crate) fn remove(&mut self, id: &MessageId) -> bool {
        let Some(seq) = self.seqs.remove(id) else {
            return false;
        };
        self.kill(seq);
        // Answers mostly come in delivery order: the dead entries at the front go at once.
        self.skip_dead();
        self.compact_if_sparse();
        true
    }

    /// Moves `id`'s deadline to `deadline` (TOUCH). Returns false if it is not in flight.
    pub(crate) fn touch(&mut self, id: &MessageId, deadline: Instant) -> bool {
        let Some(&old) = self.seqs.get(id) else {
            return false;
        };
        self.kill(old);
        let seq = self.push(deadline, *id);
        self.seqs.insert(*id, seq);
        self.compact_if_sparse();
        true
    }

    pub(crate) fn contains(&self, id: &MessageId) -> bool {
        self.seqs.contains_key(id)
    }

    pub(crate) fn len(&self) -> usize {
        self.seqs.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// The earliest live deadline.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        self.skip_dead();
        self.queue.front().map(|e| e.deadline)
    }

    /// Removes and returns one id whose deadline is at or before `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<MessageId> {
        self.skip_dead();
        match self.queue.front() {
            Some(e) if e.deadline <= now => {
                let id = e.id;
                self.pop_front();
                self.seqs.remove(&id);
                Some(id)
            }
            _ => None,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.seqs.clear();
        self.queue.clear();
        self.head = 0;
    }

    /// Queues a live deadline entry and returns its sequence number.
    fn push(&mut self, deadline: Instant, id: MessageId) -> u64 {
        // A clamped clock can hand out a deadline earlier than the back's; keep the queue sorted.
        let deadline = self.queue.back().map_or(deadline, |back| back.deadline.max(deadline));
        let seq = self.head.wrapping_add(self.queue.len() as u64);
        self.queue.push_back(Entry { deadline, id, live: true });
        seq
    }

    /// Marks the entry with sequence number `seq` dead.
    fn kill(&mut self, seq: u64) {
        let index = seq.wrapping_sub(self.head);
        if let Some(entry) = usize::try_from(index).ok().and_then(|i| self.queue.get_mut(i)) {
            entry.live = false;
        }
    }

    fn pop_front(&mut self) {
        if self.queue.pop_front().is_some() {
            self.head = self.head.wrapping_add(1);
        }
    }

    fn skip_dead(&mut self) {
        while self.queue.front().is_some_and(|e| !e.live) {
            self.pop_front();
        }
    }

    /// Keeps the queue's dead entries bounded by the live ones: drops them and renumbers.
    fn compact_if_sparse(&mut self) {
        if self.queue.len() <= 2 * self.seqs.len() + 64 {
            return;
        }
        self.queue.retain(|e| e.live);
        self.head = 0;
        for (entry, seq) in self.queue.iter().zip(0..) {
            if let Some(s) = self.seqs.get_mut(&entry.id) {
                *s = seq;
            }
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
    fn a_clamped_clock_keeps_the_queue_sorted() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut f = InFlight::default();
        f.insert(id(1), t0 + 2 * s);
        // Earlier than the back: held at the back's deadline.
        f.insert(id(2), t0 + s);
        assert!(f.touch(&id(1), t0));
        assert_eq!(f.next_deadline(), Some(t0 + 2 * s));
        assert_eq!(f.pop_expired(t0 + s), None);
        assert_eq!(f.pop_expired(t0 + 2 * s), Some(id(2)));
        assert_eq!(f.pop_expired(t0 + 2 * s), Some(id(1)));
        assert!(f.is_empty());
    }

    /// Random deliveries, answers, TOUCHes and expiries against a map of id to deadline and
    /// push order, across compactions.
    #[test]
    fn matches_a_model_under_random_operations() {
        use std::collections::HashMap as Model;
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut rng = crate::rng::Rng::new(7);
        let mut f = InFlight::with_capacity(16);
        let mut model: Model<MessageId, (Instant, u64)> = Model::new();
        let (mut now, mut order, mut next_id) = (t0, 0u64, 0u32);
        for i in 0..50_000 {
            // Every other stretch mostly TOUCHes a few ids: dead entries pile up behind the front
            // until compaction renumbers the queue.
            let touchy = i / 2_000 % 2 == 1;
            let window = if touchy { 8 } else { 40 };
            // Mostly recent ids, some of them answered or expired already.
            let pick = |rng: &mut crate::rng::Rng| {
                let n = next_id.saturating_sub(rng.below(window) as u32);
                let mut raw = [0u8; 16];
                raw[..4].copy_from_slice(&n.to_be_bytes());
                MessageId(raw)
            };
            order += 1;
            let op = if touchy && rng.below(4) > 0 { 5 } else { rng.below(10) };
            match op {
                0..=2 => {
                    next_id += 1;
                    let mut raw = [0u8; 16];
                    raw[..4].copy_from_slice(&next_id.to_be_bytes());
                    f.insert(MessageId(raw), now + timeout);
                    model.insert(MessageId(raw), (now + timeout, order));
                }
                3..=4 => {
                    let id = pick(&mut rng);
                    let live = model.remove(&id).is_some();
                    assert_eq!(f.remove(&id), live);
                    assert!(!live || f.queue.len() <= 2 * f.len() + 64, "{} entries", f.queue.len());
                }
                5..=7 => {
                    let id = pick(&mut rng);
                    let live = model.get_mut(&id).map(|e| *e = (now + timeout, order)).is_some();
                    assert_eq!(f.touch(&id, now + timeout), live);
                    assert!(!live || f.queue.len() <= 2 * f.len() + 64, "{} entries", f.queue.len());
                }
                8 => now += Duration::from_millis(rng.below(3000) as u64),
                _ => loop {
                    let first = model.iter().min_by_key(|(_, &(_, o))| o).map(|(&id, &(at, _))| (id, at));
                    let expected = first.filter(|&(_, at)| at <= now).map(|(id, _)| id);
                    assert_eq!(f.pop_expired(now), expected);
                    let Some(id) = expected else {
                        assert_eq!(f.next_deadline(), first.map(|(_, at)| at));
                        break;
                    };
                    model.remove(&id);
                },
            }
            assert_eq!(f.len(), model.len());
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
