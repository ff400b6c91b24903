//! The invariants, in one place: their names (what `SIM_ALLOW` takes), their bounds as named
//! constants with where each comes from, and the checks. The world calls the checks after
//! every step that can change what they look at.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Arguments;
use std::time::Duration;

use super::net::Round;

/// Every invariant, by the name a failure reports and `SIM_ALLOW` takes.
pub mod name {
    /// No client call panics.
    pub const NO_PANIC: &str = "no_panic";
    /// Every publish the application issued resolves exactly once; nothing else resolves.
    pub const PUBLISH_RESOLVES_ONCE: &str = "publish_resolves_once";
    /// A publish resolves (acknowledged, refused or lost) within a bound: a dial, then a read
    /// timeout at worst; for a pool, its wait per attempt plus the time its attempts took.
    pub const PUBLISH_RESOLVES_IN_TIME: &str = "publish_resolves_in_time";
    /// An acknowledged publish is held by some nsqd it went to, or was delivered, or a crash
    /// lost it.
    pub const ACKED_PUBLISH_HELD: &str = "acked_publish_held";
    /// Once faults heal, every acknowledged publish is handled within a bound: delivered to a
    /// handler that finished it (or given up after `max_attempts`). Duplicates are allowed.
    pub const ACKED_PUBLISH_DELIVERED: &str = "acked_publish_delivered";
    /// A publish fails only with a cause: never with none, and never because the client closed
    /// a connection that nothing hit (a pool's stop fails what still waits for an nsqd).
    pub const PUBLISH_FAILS_ONLY_WITH_CAUSE: &str = "publish_fails_only_with_cause";
    /// The RDY a consumer granted over its live connections stays within `max_in_flight`; after
    /// the application lowers it, within the old value until the total first fits the new one.
    pub const RDY_WITHIN_MAX_IN_FLIGHT: &str = "rdy_within_max_in_flight";
    /// Lookupd poll rounds per client per simulated minute stay within their bound, and a
    /// round tries at most three lookupds.
    pub const LOOKUPD_RATE: &str = "lookupd_rate";
    /// Two lookupd polls are one poll interval apart, unless a connection closed between.
    pub const LOOKUPD_SPACING: &str = "lookupd_spacing";
    /// Dials follow the client's documented schedule: redial backoffs (consumer direct
    /// addresses, producers, pools), one dial of a lookupd-listed nsqd per lookupd answer, a
    /// producer's dials per minute within its publish calls.
    pub const DIAL_RATE: &str = "dial_rate";
    /// Bytes in transit, outstanding publishes and messages in flight stay bounded.
    pub const BUFFERS_BOUNDED: &str = "buffers_bounded";
    /// A timer that fired does not fire again and again at the same instant.
    pub const NO_BUSY_TIMER: &str = "no_busy_timer";
    /// A stop ends with its Stopped event within a bound: the core's stop timeout while faults
    /// strike, a few round trips once the cluster is healthy and handlers answer at once.
    pub const STOP_COMPLETES: &str = "stop_completes";
    /// A stopped client opens nothing and queries nothing.
    pub const STOPPED_IS_QUIET: &str = "stopped_is_quiet";
    /// The client never makes nsqd answer with a fatal protocol error, and only writes to
    /// sockets it was told are connected.
    pub const CLIENT_PROTOCOL: &str = "client_protocol";
    /// A delivered message is one that was published, with attempts ≥ 1.
    pub const MESSAGE_INTEGRITY: &str = "message_integrity";
    /// The run ends: no event storm, no endless virtual time.
    pub const PROGRESS: &str = "progress";

    pub const ALL: &[&str] = &[
        NO_PANIC,
        PUBLISH_RESOLVES_ONCE,
        PUBLISH_RESOLVES_IN_TIME,
        ACKED_PUBLISH_HELD,
        ACKED_PUBLISH_DELIVERED,
        PUBLISH_FAILS_ONLY_WITH_CAUSE,
        RDY_WITHIN_MAX_IN_FLIGHT,
        LOOKUPD_RATE,
        LOOKUPD_SPACING,
        DIAL_RATE,
        BUFFERS_BOUNDED,
        NO_BUSY_TIMER,
        STOP_COMPLETES,
        STOPPED_IS_QUIET,
        CLIENT_PROTOCOL,
        MESSAGE_INTEGRITY,
        PROGRESS,
    ];
}

/// A broken invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

pub type Check = Result<(), Violation>;

pub fn violated(invariant: &'static str, detail: impl Into<String>) -> Check {
    Err(Violation { invariant, detail: detail.into() })
}

// ---- bounds ----------------------------------------------------------------------------------

/// The window the rate bounds are stated over: one simulated minute (the unit).
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// A poll round tries at most this many lookupds: a failed query is retried at once on the
/// next lookupd, "at most three lookupds per poll" (`ConsumerState` docs; `lookupd/poller.rs`).
pub const LOOKUPD_ATTEMPTS: usize = 3;
/// A subscribed connection to a lookupd-listed nsqd that drops causes one extra lookupd query
/// "after a random delay below 1 s" (`ConsumerState` docs, `RECHECK_JITTER` in
/// `lookupd/poller.rs`): a close allows one round that starts up to this long after it.
pub const RECHECK_JITTER: Duration = Duration::from_secs(1);

/// A direct nsqd whose connection was up is redialled after a random delay in `[d/2, d)`, "d
/// starts at 1 s and doubles per attempt that does not stay subscribed for 10 s, capped at
/// `lookupd_poll_interval`" (`ConsumerState` docs; `RECONNECT_BASE` in
/// `consumer/state/sources.rs`).
pub const CONSUMER_REDIAL: Backoff =
    Backoff { base: Duration::from_secs(1), cap: None, stable_after: Duration::from_secs(10), after_healthy: true };
/// A producer whose dial or handshake failed refuses publishes "for a random time in
/// `[d/2, d)`, d = 100 ms doubling per failure in a row up to 5 s" and dials again only after
/// it; a connection that was up and drops is redialled at the next publish
/// (`ProducerState` docs; `REDIAL_BASE`, `REDIAL_CAP` in `producer/link.rs`). The stable time
/// plays no part: any finished handshake resets the count.
pub const PRODUCER_REDIAL: Backoff = Backoff {
    base: Duration::from_millis(100),
    cap: Some(Duration::from_secs(5)),
    stable_after: Duration::ZERO,
    after_healthy: false,
};
/// A pool redials each nsqd "with jittered backoff (100 ms doubling to 5 s per failure in a
/// row; a connection lost within 10 s of being made counts as a failure)"
/// (`ProducerPoolState` docs; `STABLE_AFTER` in `producer/link.rs`).
pub const POOL_REDIAL: Backoff = Backoff {
    base: Duration::from_millis(100),
    cap: Some(Duration::from_secs(5)),
    stable_after: Duration::from_secs(10),
    after_healthy: false,
};

/// A consumer's stop ends within the core's `STOP_TIMEOUT` (documented on `stop`: "at most
/// 30 s"), plus the network's time for the last bytes.
pub const CONSUMER_STOP_TIMEOUT: Duration = Duration::from_secs(30);
pub const STOP_SLACK: Duration = Duration::from_secs(5);
/// A consumer's stop in a healthy cluster whose handlers answer within milliseconds: RDY 0,
/// CLS, CLOSE_WAIT and the last answers take round trips of milliseconds; this leaves room for
/// the slowest handler of a few hundred and a dial under way (the scenario's dial timeouts stay
/// below 3 s), and none for waiting out the 30 s stop timeout.
pub const HEALTHY_STOP: Duration = Duration::from_secs(10);
/// A producer's stop drains at most nsqd's message timeout (the connection's close drain,
/// 60 s by default) or until its read timeout notices a dead nsqd, plus a dial timeout.
pub const PRODUCER_STOP_DRAIN: Duration = Duration::from_secs(60);
/// Timer firings one party may take at one instant before it counts as a busy loop: each
/// firing handles what is due, so a second one at the same instant is already suspect.
pub const MAX_FIRINGS_PER_INSTANT: u32 = 64;
/// Bytes one direction of a connection may hold in transit. Publishes are small and a
/// consumer's answers are bounded by its RDY; megabytes mean a writer that never stops.
pub const MAX_IN_TRANSIT: usize = 8 * 1024 * 1024;
/// Events one run may take before it counts as a storm (a seed takes a few thousand).
pub const MAX_EVENTS: u64 = 2_000_000;
/// Virtual time a run may take (the phases' bounds add up to well below this).
pub const MAX_VIRTUAL_TIME: Duration = Duration::from_secs(4 * 3600);
/// How long after healing every acknowledged publish must have been delivered, beyond what
/// the consumers' own settings allow for (see [`delivery_bound`]).
pub const DELIVERY_SLACK: Duration = Duration::from_secs(60);
/// How long nsqd waits before it re-registers with a lookupd that came back (nsqd's
/// `lookupLoop` ticker, `nsqd/lookup.go`).
pub const NSQD_LOOKUPD_RECONNECT: Duration = Duration::from_secs(15);

/// Poll rounds (a poll, or a recheck, with its retries on the next lookupds) one client may
/// start in any [`RATE_WINDOW`]: the first query comes at once, the next poll one interval
/// later (lengthened by the jitter) and then one every `lookupd_poll_interval`, so polls are at
/// least an interval apart and at most `⌊60 s / interval⌋ + 1` start in a minute; plus one
/// recheck per close of a subscribed connection to a listed nsqd. A failed dial or handshake
/// allows none.
pub fn lookupd_rounds_allowed(interval: Duration, recheck_closes: usize) -> usize {
    (RATE_WINDOW.as_secs_f64() / interval.as_secs_f64()).floor() as usize + 1 + recheck_closes
}

/// Poll rounds one client may start within any one poll interval: one poll, plus a recheck per
/// close of a subscribed connection to a listed nsqd.
pub fn lookupd_rounds_per_interval(recheck_closes: usize) -> usize {
    1 + recheck_closes
}

/// A documented redial schedule: after a failure in a row number `n`, the next dial waits a
/// random time in `[d/2, d)`, `d = min(base × 2^(n-1), cap)` (`cap`: `None` means the consumer's
/// `lookupd_poll_interval`). A connection counts as healthy (the count starts over) when it
/// stayed up `stable_after`; after a healthy connection, `after_healthy` says whether the next
/// dial still waits the first delay (the consumer) or may come at once (producers).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Option<Duration>,
    pub stable_after: Duration,
    pub after_healthy: bool,
}

impl Backoff {
    /// The nominal delay `d` after `n` failures in a row (`n` ≥ 1).
    pub fn nominal(&self, n: u32, interval: Duration) -> Duration {
        let cap = self.cap.unwrap_or(interval).max(self.base);
        self.base.saturating_mul(1u32 << n.saturating_sub(1).min(31)).min(cap)
    }
}

/// Dials a single-nsqd producer may make in any [`RATE_WINDOW`]: it dials lazily, only for a
/// publish made while it had no connection (and was not holding off after a failure).
pub fn producer_dials_allowed(publish_calls: usize) -> usize {
    publish_calls + 1
}

/// The longest a publish of a single-nsqd producer may wait for its answer: the dial, then
/// (nsqd silent) the read timeout, plus slack for the network.
pub fn publish_bound(dial_timeout: Duration, read_timeout: Duration) -> Duration {
    dial_timeout + read_timeout + STOP_SLACK
}

/// What one attempt of a pool publish may count for: it goes out on a connected nsqd, which
/// answers at once or goes silent until the read timeout ends the connection.
pub fn pool_attempt_cap(read_timeout: Duration) -> Duration {
    read_timeout + STOP_SLACK
}

/// The longest a pool publish may take: it waits at most `wait` for a connected nsqd before
/// its first attempt and again after each attempt that broke (the wait starts over when it is
/// queued again), plus the time its attempts took, plus slack for the network.
pub fn pool_publish_bound(wait: Duration, attempts: usize, attempts_took: Duration) -> Duration {
    wait * (attempts as u32 + 1) + attempts_took + STOP_SLACK
}

/// The longest a consumer's stop may take.
pub fn consumer_stop_bound(healthy: bool) -> Duration {
    if healthy {
        HEALTHY_STOP
    } else {
        CONSUMER_STOP_TIMEOUT + STOP_SLACK
    }
}

/// The longest a producer's stop may take.
pub fn producer_stop_bound(read_timeout: Duration, dial_timeout: Duration) -> Duration {
    PRODUCER_STOP_DRAIN.max(read_timeout) + dial_timeout + STOP_SLACK
}

/// What one consumer's settings let delivery take once every fault is gone.
pub struct DeliveryInputs {
    pub lookupd_poll_interval: Duration,
    pub lookupd_poll_jitter: f64,
    pub dial_timeout: Duration,
    pub read_timeout: Duration,
    pub msg_timeout: Duration,
    pub max_requeue_delay: Duration,
    pub max_backoff_duration: Duration,
}

/// How long after healing every acknowledged publish must be delivered: the slowest consumer's
/// way back to every nsqd (a lookupd poll after nsqd re-registered, or the direct redial cap,
/// plus a dial), plus the longest a message may legitimately wait (a deferral, an in-flight
/// timeout of a connection that died unseen until the read timeout, backoff rounds), plus
/// [`DELIVERY_SLACK`].
pub fn delivery_bound(consumers: &[DeliveryInputs], longest_dpub: Duration) -> Duration {
    let worst = |f: &dyn Fn(&DeliveryInputs) -> Duration| consumers.iter().map(f).max().unwrap_or_default();
    let reconnect = worst(&|c| {
        let poll = c.lookupd_poll_interval.mul_f64(1.0 + c.lookupd_poll_jitter);
        NSQD_LOOKUPD_RECONNECT + poll.max(c.lookupd_poll_interval) + c.dial_timeout
    });
    // Backoff: at most ~10 levels to climb down, each at most max_backoff_duration.
    let waiting = worst(&|c| c.read_timeout + c.msg_timeout + c.max_requeue_delay + c.max_backoff_duration * 10);
    reconnect + waiting + longest_dpub + DELIVERY_SLACK
}

// ---- rate trackers ---------------------------------------------------------------------------

/// Events in a sliding window.
#[derive(Debug, Default)]
struct Window(VecDeque<Duration>);

impl Window {
    fn push(&mut self, now: Duration) {
        self.0.push_back(now);
        while self.0.front().is_some_and(|&t| now.saturating_sub(t) > RATE_WINDOW + RECHECK_JITTER) {
            self.0.pop_front();
        }
    }

    /// Events in `(now - span, now]` (the window is in time order).
    fn within(&self, now: Duration, span: Duration) -> usize {
        match now.checked_sub(span) {
            Some(start) => self.0.len() - self.0.partition_point(|&t| t <= start),
            None => self.0.len(),
        }
    }

    /// Events in `[now - span, now]`.
    fn within_closed(&self, now: Duration, span: Duration) -> usize {
        match now.checked_sub(span) {
            Some(start) => self.0.len() - self.0.partition_point(|&t| t < start),
            None => self.0.len(),
        }
    }
}

/// One client's lookupd poll rounds against [`lookupd_rounds_allowed`] and
/// [`lookupd_rounds_per_interval`], and the queries of each round against
/// [`LOOKUPD_ATTEMPTS`].
#[derive(Debug, Default)]
pub struct LookupdRates {
    rounds: Window,
    /// Closes of subscribed connections to lookupd-listed nsqds: each allows a recheck.
    recheck_closes: Window,
    next_round: u64,
}

impl LookupdRates {
    /// A subscribed connection to a lookupd-listed nsqd dropped.
    pub fn recheck_cause(&mut self, now: Duration) {
        self.recheck_closes.push(now);
    }

    /// A query went out: the next lookupd after `failover_of` failed, or a new round. Returns
    /// the query's round.
    pub fn queried(
        &mut self,
        now: Duration,
        interval: Duration,
        lookupds: usize,
        failover_of: Option<Round>,
    ) -> (Round, Check) {
        if let Some(prev) = failover_of {
            let round = Round { attempt: prev.attempt + 1, ..prev };
            let tries = LOOKUPD_ATTEMPTS.min(lookupds);
            if round.attempt >= tries {
                let detail = format!(
                    "query {} of a poll round started at {:?}: at most {tries} lookupds per poll",
                    round.attempt + 1,
                    round.start
                );
                return (round, violated(name::LOOKUPD_RATE, detail));
            }
            return (round, Ok(()));
        }
        self.next_round += 1;
        let round = Round { id: self.next_round, start: now, attempt: 0 };
        self.rounds.push(now);
        let closes = self.recheck_closes.within_closed(now, RATE_WINDOW + RECHECK_JITTER);
        let count = self.rounds.within(now, RATE_WINDOW);
        let allowed = lookupd_rounds_allowed(interval, closes);
        if count > allowed {
            let detail = format!("{count} lookupd poll rounds in {RATE_WINDOW:?} (allowed {allowed}: poll interval {interval:?}, {closes} closes of subscribed connections to listed nsqds)");
            return (round, violated(name::LOOKUPD_RATE, detail));
        }
        let closes = self.recheck_closes.within_closed(now, interval + RECHECK_JITTER);
        let count = self.rounds.within(now, interval);
        let allowed = lookupd_rounds_per_interval(closes);
        if count > allowed {
            let detail = format!("{count} lookupd poll rounds within one poll interval of {interval:?} (allowed {allowed}: {closes} closes of subscribed connections to listed nsqds)");
            return (round, violated(name::LOOKUPD_SPACING, detail));
        }
        (round, Ok(()))
    }
}

/// The dial history of one address.
#[derive(Debug, Default)]
struct AddrDials {
    /// Failures in a row, as the schedule counts them.
    failures: u32,
    /// No dial before this.
    earliest: Duration,
    /// A connection to it is open (dialled, not yet closed).
    open: bool,
    /// When the open connection came up.
    up_at: Option<Duration>,
}

/// The dials of one client, address by address, against a documented [`Backoff`].
#[derive(Debug)]
pub struct Redials {
    backoff: Backoff,
    addrs: BTreeMap<String, AddrDials>,
}

impl Redials {
    pub fn new(backoff: Backoff) -> Self {
        Self { backoff, addrs: BTreeMap::new() }
    }

    /// A dial of `addr`.
    pub fn dialled(&mut self, who: &str, addr: &str, now: Duration) -> Check {
        let a = self.addrs.entry(addr.to_owned()).or_default();
        let open = std::mem::replace(&mut a.open, true);
        a.up_at = None;
        if open {
            return violated(name::DIAL_RATE, format!("{who} dials {addr} while its connection to it is open"));
        }
        if now < a.earliest {
            return violated(
                name::DIAL_RATE,
                format!(
                    "{who} dials {addr} {:?} early: after {} failures in a row, no dial before {:?} (the backoff, or the retry time it reported)",
                    a.earliest - now,
                    a.failures,
                    a.earliest
                ),
            );
        }
        Ok(())
    }

    /// The connection to `addr` came up (subscribed, or finished its handshake).
    pub fn up(&mut self, addr: &str, now: Duration) {
        if let Some(a) = self.addrs.get_mut(addr) {
            a.up_at = Some(now);
        }
    }

    /// The connection to `addr` ended; `healthy` overrides the stable-time rule (a pool does not
    /// count a connection nsqd closed after refusing a publish, nor one closed by the client).
    /// Returns the nominal delay `d` before the next dial (zero: at once).
    pub fn closed(&mut self, addr: &str, now: Duration, interval: Duration, healthy: bool) -> Duration {
        let b = self.backoff;
        let a = self.addrs.entry(addr.to_owned()).or_default();
        a.open = false;
        let stable = a.up_at.is_some_and(|at| now.saturating_sub(at) >= b.stable_after);
        a.up_at = None;
        a.failures = if healthy || stable { 0 } else { a.failures.saturating_add(1) };
        let d = match a.failures {
            0 if !b.after_healthy => Duration::ZERO,
            n => b.nominal(n.max(1), interval),
        };
        a.earliest = now + d / 2;
        d
    }

    /// Counts the last close of `addr` as the first failure of a fresh history (the client
    /// forgot the address and met it again). Returns the nominal delay.
    pub fn restart(&mut self, addr: &str, now: Duration, interval: Duration) -> Duration {
        let d = self.backoff.nominal(1, interval);
        let a = self.addrs.entry(addr.to_owned()).or_default();
        a.failures = 1;
        a.earliest = now + d / 2;
        d
    }

    /// The client said when it tries `addr` again: no dial before that either.
    pub fn retry_at(&mut self, addr: &str, at: Duration) {
        if let Some(a) = self.addrs.get_mut(addr) {
            a.earliest = a.earliest.max(at);
        }
    }

    /// Forgets `addr`: the client dropped it (a direct address whose first attempt failed).
    pub fn forget(&mut self, addr: &str) {
        self.addrs.remove(addr);
    }
}

/// The retry time a client reported after a failed attempt, against the schedule's `[d/2, d)`.
pub fn retry_in_schedule(who: Arguments<'_>, addr: &str, retry_in: Duration, d: Duration) -> Check {
    if retry_in < d / 2 || retry_in > d {
        return violated(
            name::DIAL_RATE,
            format!("{who} says it retries {addr} in {retry_in:?}; the schedule says within [{:?}, {d:?})", d / 2),
        );
    }
    Ok(())
}

/// A consumer's dials of lookupd-listed nsqds: each is the answer of a poll round that listed
/// the address, and one round dials an address at most once. With the round bounds above this
/// keeps a dead listed nsqd to one dial per poll (plus one per recheck).
#[derive(Debug, Default)]
pub struct ListedDials {
    last_round: BTreeMap<String, u64>,
    /// Addresses with a connection open.
    open: std::collections::BTreeSet<String>,
}

impl ListedDials {
    /// A dial of `addr`, in the step where the answer of `round` (which lists it, or not)
    /// arrived; `None`: in no answer's step.
    pub fn dialled(&mut self, who: &str, addr: &str, answer: Option<(Round, bool)>) -> Check {
        let Some((round, listed)) = answer else {
            return violated(
                name::DIAL_RATE,
                format!("{who} dials {addr}, neither a direct address nor in a lookupd answer just read"),
            );
        };
        if !listed {
            return violated(name::DIAL_RATE, format!("{who} dials {addr}, which the lookupd answer does not list"));
        }
        if !self.open.insert(addr.to_owned()) {
            return violated(name::DIAL_RATE, format!("{who} dials {addr} while its connection to it is open"));
        }
        if self.last_round.insert(addr.to_owned(), round.id) == Some(round.id) {
            return violated(name::DIAL_RATE, format!("{who} dials {addr} twice for one lookupd answer"));
        }
        Ok(())
    }

    /// The connection to `addr` ended.
    pub fn closed(&mut self, addr: &str) {
        self.open.remove(addr);
    }
}

/// A single-nsqd producer's publish calls and dials.
#[derive(Debug, Default)]
pub struct ProducerRates {
    calls: Window,
    dials: Window,
}

impl ProducerRates {
    pub fn called(&mut self, now: Duration) {
        self.calls.push(now);
    }

    pub fn dialled(&mut self, addr: &str, now: Duration) -> Check {
        self.dials.push(now);
        let count = self.dials.within(now, RATE_WINDOW);
        let allowed = producer_dials_allowed(self.calls.within_closed(now, RATE_WINDOW));
        if count > allowed {
            return violated(
                name::DIAL_RATE,
                format!(
                    "producer: {count} dials of {addr} in {RATE_WINDOW:?} (allowed {allowed}: one per publish call)"
                ),
            );
        }
        Ok(())
    }
}

/// Timer firings of one party at one instant.
#[derive(Debug, Default)]
pub struct Firings {
    at: Duration,
    count: u32,
}

impl Firings {
    pub fn fired(&mut self, now: Duration, who: Arguments<'_>) -> Check {
        if self.at == now {
            self.count += 1;
        } else {
            self.at = now;
            self.count = 1;
        }
        if self.count > MAX_FIRINGS_PER_INSTANT {
            return violated(
                name::NO_BUSY_TIMER,
                format!(
                    "{who}: {} timer firings at one instant: poll_timeout keeps returning a past deadline",
                    self.count
                ),
            );
        }
        Ok(())
    }
}

// ---- plain checks ----------------------------------------------------------------------------

/// The RDY of one connection: the last count written to its socket, and the count the
/// consumer holds for it (different while a newer RDY waits to be written).
#[derive(Debug, Clone, Copy)]
pub struct ConnRdy {
    pub conn: u64,
    pub written: u64,
    pub held: Option<u32>,
    pub writing: bool,
}

/// The sum of the RDY written to the consumer's live connections: what nsqd lets it have in
/// flight.
pub fn rdy_within_max_in_flight(who: Arguments<'_>, conns: &[ConnRdy], max_in_flight: u32) -> Check {
    let granted: u64 = conns.iter().map(|c| c.written).sum();
    if granted > u64::from(max_in_flight) {
        let each: Vec<String> = conns
            .iter()
            .map(|c| {
                let busy = if c.writing { ", a write under way" } else { "" };
                format!("conn {} wrote {} (holds {:?}{busy})", c.conn, c.written, c.held)
            })
            .collect();
        return violated(
            name::RDY_WITHIN_MAX_IN_FLIGHT,
            format!(
                "{who}: RDY {granted} written over {} live connections, max_in_flight {max_in_flight}: {}",
                conns.len(),
                each.join(", ")
            ),
        );
    }
    Ok(())
}

pub fn in_transit_bounded(what: Arguments<'_>, bytes: usize) -> Check {
    if bytes > MAX_IN_TRANSIT {
        return violated(name::BUFFERS_BOUNDED, format!("{what}: {bytes} bytes in transit"));
    }
    Ok(())
}

pub fn outstanding_matches(who: Arguments<'_>, client_says: usize, unresolved: usize) -> Check {
    if client_says != unresolved {
        return violated(
            name::BUFFERS_BOUNDED,
            format!("{who}: the producer holds {client_says} outstanding publishes, the application is waiting for {unresolved}"),
        );
    }
    Ok(())
}

pub fn in_flight_within_rdy(what: Arguments<'_>, in_flight: u64, max_rdy_granted: u64) -> Check {
    if in_flight > max_rdy_granted {
        return violated(
            name::BUFFERS_BOUNDED,
            format!("{what}: {in_flight} in flight, RDY never above {max_rdy_granted}"),
        );
    }
    Ok(())
}

pub fn acked_publish_held(body: &[u8], held: bool, delivered: bool, lost: bool) -> Check {
    if !(held || delivered || lost) {
        return violated(
            name::ACKED_PUBLISH_HELD,
            format!(
                "{} acknowledged but no nsqd it went to holds it and no consumer got it",
                String::from_utf8_lossy(&body[..body.len().min(24)])
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn lookupd_bounds_follow_the_poll_interval_and_closes() {
        assert_eq!(lookupd_rounds_allowed(60 * S, 0), 2);
        assert_eq!(lookupd_rounds_allowed(S, 0), 61);
        assert_eq!(lookupd_rounds_allowed(15 * S, 4), 9);
        assert_eq!(lookupd_rounds_per_interval(2), 3);
    }

    #[test]
    fn backoffs_double_up_to_their_caps() {
        assert_eq!(CONSUMER_REDIAL.nominal(1, 60 * S), S);
        assert_eq!(CONSUMER_REDIAL.nominal(3, 60 * S), 4 * S);
        assert_eq!(CONSUMER_REDIAL.nominal(9, 60 * S), 60 * S);
        assert_eq!(CONSUMER_REDIAL.nominal(3, 2 * S), 2 * S);
        assert_eq!(PRODUCER_REDIAL.nominal(1, S), 100 * MS);
        assert_eq!(POOL_REDIAL.nominal(6, S), 3200 * MS);
        assert_eq!(POOL_REDIAL.nominal(40, S), 5 * S);
    }

    #[test]
    fn redials_wait_out_the_schedule() {
        // A consumer's direct address: up 5 s, lost: 1 s nominal, no dial before 0.5 s.
        let mut r = Redials::new(CONSUMER_REDIAL);
        r.dialled("c", "a:1", Duration::ZERO).unwrap();
        r.up("a:1", Duration::ZERO);
        assert_eq!(r.closed("a:1", 5 * S, 60 * S, false), S);
        assert_eq!(r.dialled("c", "a:1", 5 * S + 400 * MS).unwrap_err().invariant, name::DIAL_RATE);
        r.closed("a:1", 5 * S + 400 * MS, 60 * S, false);
        // A refused redial: the second failure in a row, 2 s nominal.
        r.dialled("c", "a:1", 7 * S).unwrap();
        assert_eq!(r.closed("a:1", 7 * S, 60 * S, false), 4 * S);
        // Up for 10 s: the count starts over, but the first delay still applies.
        r.dialled("c", "a:1", 9 * S).unwrap();
        r.up("a:1", 9 * S);
        assert_eq!(r.closed("a:1", 19 * S, 60 * S, false), S);
        assert!(r.dialled("c", "a:1", 19 * S + 499 * MS).is_err());
        // A second dial while the first is open.
        assert!(r.dialled("c", "a:1", 30 * S).is_err());

        // A producer: a failed handshake holds it off; a connection that was up does not.
        let mut p = Redials::new(PRODUCER_REDIAL);
        p.dialled("p", "n:1", Duration::ZERO).unwrap();
        assert_eq!(p.closed("n:1", S, S, false), 100 * MS);
        assert!(p.dialled("p", "n:1", S + 49 * MS).is_err());
        p.closed("n:1", S + 49 * MS, S, false);
        p.dialled("p", "n:1", 2 * S).unwrap();
        p.up("n:1", 2 * S);
        assert_eq!(p.closed("n:1", 2 * S + MS, S, false), Duration::ZERO);
        p.dialled("p", "n:1", 2 * S + MS).unwrap();

        // A pool: a connection lost within 10 s counts as a failure, unless nsqd closed it
        // after refusing a publish.
        let mut pool = Redials::new(POOL_REDIAL);
        pool.dialled("p", "n:1", Duration::ZERO).unwrap();
        pool.up("n:1", Duration::ZERO);
        assert_eq!(pool.closed("n:1", 9 * S, S, false), 100 * MS);
        pool.dialled("p", "n:1", 10 * S).unwrap();
        pool.up("n:1", 10 * S);
        assert_eq!(pool.closed("n:1", 11 * S, S, true), Duration::ZERO);
        assert!(retry_in_schedule(format_args!("p"), "n:1", 40 * MS, 100 * MS).is_err());
        retry_in_schedule(format_args!("p"), "n:1", 60 * MS, 100 * MS).unwrap();
    }

    #[test]
    fn rounds_are_counted_and_their_attempts_bounded() {
        let mut rates = LookupdRates::default();
        for t in [0, 10, 20] {
            rates.queried(t * S, 10 * S, 2, None).1.unwrap();
        }
        // A fourth poll 1 s after the third breaks the spacing; a close allows one more.
        let (round, early) = rates.queried(21 * S, 10 * S, 2, None);
        assert_eq!(early.unwrap_err().invariant, name::LOOKUPD_SPACING);
        rates.recheck_cause(22 * S);
        rates.queried(22 * S, 10 * S, 2, None).1.unwrap_err();
        rates.queried(40 * S, 10 * S, 2, None).1.unwrap();
        // The round's next lookupd after a failure is no new round; a third is one too many
        // with two lookupds.
        let (second, c) = rates.queried(41 * S, 10 * S, 2, Some(round));
        c.unwrap();
        assert_eq!((second.id, second.attempt), (round.id, 1));
        assert_eq!(rates.queried(42 * S, 10 * S, 2, Some(second)).1.unwrap_err().invariant, name::LOOKUPD_RATE);

        let mut listed = ListedDials::default();
        assert!(listed.dialled("c", "n:1", None).is_err());
        assert!(listed.dialled("c", "n:1", Some((round, false))).is_err());
        listed.dialled("c", "n:1", Some((round, true))).unwrap();
        listed.closed("n:1");
        assert!(listed.dialled("c", "n:1", Some((round, true))).is_err());

        let mut busy = Firings::default();
        for _ in 0..MAX_FIRINGS_PER_INSTANT {
            busy.fired(S, format_args!("x")).unwrap();
        }
        assert_eq!(busy.fired(S, format_args!("x")).unwrap_err().invariant, name::NO_BUSY_TIMER);
        busy.fired(2 * S, format_args!("x")).unwrap();
    }
}
