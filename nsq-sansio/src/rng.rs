//! The generator behind every random choice of a state machine, and the retry delays built on
//! it.

use std::time::Duration;

/// A small generator (SplitMix64) for jitter and random choices.
///
/// Seeded from [`Config::rng_seed`](crate::Config::rng_seed) when it is set, so tests are
/// deterministic; otherwise from the operating system's entropy, so two processes started
/// together do not draw the same jitter.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator seeded by `seed`, or from the operating system when `None`.
    pub(crate) fn from_seed(seed: Option<u64>) -> Self {
        Self::new(seed.unwrap_or_else(entropy))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform index below `n` (`n` > 0; 0 otherwise).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// A uniform float in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform duration in `[0, max)`.
    pub(crate) fn up_to(&mut self, max: Duration) -> Duration {
        max.mul_f64(self.unit())
    }
}

/// 64 bits from the operating system's generator. Should it fail, the per-process random keys
/// of the standard library's hasher stand in, which still differ between processes.
fn entropy() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0x6e73_712d_7273);
    hasher.finish()
}

/// A retry schedule: exponential from `base`, capped at `cap`, with "equal jitter": the n-th
/// retry waits a uniform random time in `[d/2, d)` where `d = min(cap, base × 2^(n-1))`, so it
/// never comes sooner than half the nominal delay and never later than the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryDelay {
    pub(crate) base: Duration,
    pub(crate) cap: Duration,
}

impl RetryDelay {
    /// The nominal delay before retry number `n` (1 after the first failure).
    pub(crate) fn nominal(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.cap.max(self.base))
    }

    /// The jittered delay before retry number `n`.
    pub(crate) fn delay(&self, n: u32, rng: &mut Rng) -> Duration {
        let d = self.nominal(n);
        d / 2 + rng.up_to(d / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_stay_within_bounds_and_spread() {
        let policy = RetryDelay { base: Duration::from_secs(1), cap: Duration::from_secs(60) };
        let mut rng = Rng::new(7);
        let mut seen = std::collections::BTreeSet::new();
        for n in 1..40 {
            let nominal = policy.nominal(n);
            assert_eq!(nominal, Duration::from_secs(1 << (n - 1).min(6)).min(Duration::from_secs(60)));
            for _ in 0..100 {
                let d = policy.delay(n, &mut rng);
                assert!(d >= nominal / 2 && d < nominal, "{n}: {d:?}");
                seen.insert(d);
            }
        }
        assert!(seen.len() > 3000, "jitter draws differ");
    }

    #[test]
    fn unseeded_generators_differ() {
        let a = Rng::from_seed(None).next_u64();
        let b = Rng::from_seed(None).next_u64();
        assert_ne!(a, b);
        assert_eq!(Rng::from_seed(Some(3)).next_u64(), Rng::new(3).next_u64());
    }
}
