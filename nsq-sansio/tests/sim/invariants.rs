//! The invariants, in one place: their names (what `SIM_ALLOW` takes), their bounds as named
//! constants with where each comes from, and the checks. The world calls the checks after
//! every step that can change what they look at.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Arguments;
use std::time::Duration;

/// Every invariant, by the name a failure reports and `SIM_ALLOW` takes.
pub mod name {
    /// No client call panics.
    pub const NO_PANIC: &str = "no_panic";
    /// Every publish the application issued resolves exactly once; nothing else resolves.
    pub const PUBLISH_RESOLVES_ONCE: &str = "publish_resolves_once";
    /// A publish resolves (acknowledged, refused or lost) within a bound: a dial, then a read
    /// timeout at worst.
    pub const PUBLISH_RESOLVES_IN_TIME: &str = "publish_resolves_in_time";
    /// An acknowledged publish is held by its nsqd, or was delivered, or a crash lost it.
    pub const ACKED_PUBLISH_HELD: &str = "acked_publish_held";
    /// Once faults heal, every acknowledged publish is handled within a bound: delivered to a
    /// handler that finished it (or given up after `max_attempts`). Duplicates are allowed.
    pub const ACKED_PUBLISH_DELIVERED: &str = "acked_publish_delivered";
    /// A publish fails with "connection lost" only when something hit its connection.
    pub const PUBLISH_FAILS_ONLY_WITH_CAUSE: &str = "publish_fails_only_with_cause";
    /// The RDY a consumer granted over its live connections stays within `max_in_flight`.
    pub const RDY_WITHIN_MAX_IN_FLIGHT: &str = "rdy_within_max_in_flight";
    /// Lookupd queries per consumer per simulated minute stay within their bound.
    pub const LOOKUPD_RATE: &str = "lookupd_rate";
    /// Two lookupd polls are one poll interval apart, unless a connection closed between.
    pub const LOOKUPD_SPACING: &str = "lookupd_spacing";
    /// Dials per client and address per simulated minute stay within their bound.
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
/// The slowest lookupd answer the scenario draws (`scenario.rs`, `LookupdSlow`): an answer may
/// arrive this late, so the dials it triggers may bunch up by that much.
pub const SLOW_LOOKUPD_MAX: Duration = Duration::from_secs(10);
/// The first redial delay of a direct nsqd (the core's `RECONNECT_BASE`), doubling per failure
/// up to `lookupd_poll_interval` (the consumer's documented schedule).
pub const REDIAL_BASE: Duration = Duration::from_secs(1);
/// Jitter may shorten a redial delay down to this fraction of its nominal value ("equal
/// jitter"); the bound accepts that much.
pub const REDIAL_JITTER_FLOOR: f64 = 0.5;
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

/// Lookupd queries a consumer may make in any [`RATE_WINDOW`]: go-nsq queries once at start,
/// then once per `lookupd_poll_interval`, and once more for each connection that was up and
/// then closed (`onConnClose`). A failed dial or handshake triggers none.
pub fn lookupd_queries_allowed(interval: Duration, up_closes: usize) -> usize {
    (RATE_WINDOW.as_secs_f64() / interval.as_secs_f64()).floor() as usize + 2 + up_closes
}

/// Lookupd queries a consumer may make within any one poll interval: its poll (the first
/// one after the jitter, which only lengthens the gap), plus one per close of an up
/// connection.
pub fn lookupd_queries_per_interval(up_closes: usize) -> usize {
    1 + up_closes
}

/// Dials of one address a consumer may make in any [`RATE_WINDOW`] because lookupd lists it:
/// one per lookupd answer, and answers come at most as often as queries (a slow lookupd can
/// bunch them up by [`SLOW_LOOKUPD_MAX`]).
pub fn discovered_dials_allowed(interval: Duration, up_closes: usize) -> usize {
    let bunched = (SLOW_LOOKUPD_MAX.as_secs_f64() / interval.as_secs_f64()).ceil() as usize;
    lookupd_queries_allowed(interval, up_closes) + bunched
}

/// Dials of one direct address (`connect_to_nsqd`) a consumer may make in any
/// [`RATE_WINDOW`]: its redial backoff ([`REDIAL_BASE`] doubling up to the poll interval,
/// jitter down to [`REDIAL_JITTER_FLOOR`]) from the start of the window, restarted by each
/// close of an up connection.
pub fn direct_dials_allowed(interval: Duration, up_closes: usize) -> usize {
    let cap = interval.max(REDIAL_BASE);
    let mut dials = 1;
    let mut elapsed = Duration::ZERO;
    let mut delay = REDIAL_BASE;
    loop {
        elapsed += delay.min(cap).mul_f64(REDIAL_JITTER_FLOOR);
        if elapsed > RATE_WINDOW {
            break;
        }
        dials += 1;
        delay = delay.saturating_mul(2);
    }
    dials * (1 + up_closes)
}

/// Dials a producer may make in any [`RATE_WINDOW`]: it dials lazily, only for a publish (or
/// connect) made while it had no connection.
pub fn producer_dials_allowed(publish_calls: usize) -> usize {
    publish_calls + 1
}

/// The longest a publish may wait for its answer: the dial, then (nsqd silent) the read
/// timeout, plus slack for the network.
pub fn publish_bound(dial_timeout: Duration, read_timeout: Duration) -> Duration {
    dial_timeout + read_timeout + STOP_SLACK
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
        while self.0.front().is_some_and(|&t| now.saturating_sub(t) > RATE_WINDOW + SLOW_LOOKUPD_MAX) {
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

/// A consumer's lookupd queries, dials and closes, against the bounds above.
#[derive(Debug, Default)]
pub struct ConsumerRates {
    queries: Window,
    up_closes: Window,
    /// Connections that closed without ever subscribing (refused, handshake errors): they
    /// allow nothing, but a failure report counts them.
    down_closes: Window,
    dials: BTreeMap<String, Window>,
}

impl ConsumerRates {
    /// A connection that had subscribed closed.
    pub fn up_closed(&mut self, now: Duration) {
        self.up_closes.push(now);
    }

    /// A connection that never subscribed closed.
    pub fn down_closed(&mut self, now: Duration) {
        self.down_closes.push(now);
    }

    /// A lookupd query went out.
    pub fn queried(&mut self, now: Duration, interval: Duration) -> Check {
        self.queries.push(now);
        let closes = self.up_closes.within_closed(now, RATE_WINDOW);
        let count = self.queries.within(now, RATE_WINDOW);
        let allowed = lookupd_queries_allowed(interval, closes);
        if count > allowed {
            let failed = self.down_closes.within_closed(now, RATE_WINDOW);
            return violated(
                name::LOOKUPD_RATE,
                format!("{count} lookupd queries in {RATE_WINDOW:?} (allowed {allowed}: poll interval {interval:?}, {closes} closes of up connections; {failed} connections that never came up closed)"),
            );
        }
        let closes = self.up_closes.within_closed(now, interval);
        let count = self.queries.within(now, interval);
        let allowed = lookupd_queries_per_interval(closes);
        if count > allowed {
            let failed = self.down_closes.within_closed(now, interval);
            return violated(
                name::LOOKUPD_SPACING,
                format!("{count} lookupd queries within one poll interval of {interval:?} (allowed {allowed}: {closes} closes of up connections; {failed} connections that never came up closed)"),
            );
        }
        Ok(())
    }

    /// A dial of `addr`; `direct` and `via_lookupd` say how the consumer may know it.
    pub fn dialled(&mut self, addr: &str, now: Duration, interval: Duration, direct: bool, via_lookupd: bool) -> Check {
        let window = self.dials.entry(addr.to_owned()).or_default();
        window.push(now);
        let count = window.within(now, RATE_WINDOW);
        let closes = self.up_closes.within_closed(now, RATE_WINDOW);
        let allowed = if direct { direct_dials_allowed(interval, closes) } else { 0 }
            + if via_lookupd { discovered_dials_allowed(interval, closes) } else { 0 };
        if count > allowed {
            return violated(
                name::DIAL_RATE,
                format!("{count} dials of {addr} in {RATE_WINDOW:?} (allowed {allowed}: direct {direct}, via lookupd {via_lookupd}, poll interval {interval:?}, {closes} closes of up connections)"),
            );
        }
        Ok(())
    }
}

/// A producer's publish calls and dials.
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
                "{} acknowledged but its nsqd does not hold it and no consumer got it",
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

    #[test]
    fn lookupd_bounds_follow_the_poll_interval_and_closes() {
        assert_eq!(lookupd_queries_allowed(60 * S, 0), 3);
        assert_eq!(lookupd_queries_allowed(S, 0), 62);
        assert_eq!(lookupd_queries_allowed(15 * S, 4), 10);
        assert_eq!(lookupd_queries_per_interval(2), 3);
        assert_eq!(discovered_dials_allowed(60 * S, 0), 4);
        assert_eq!(discovered_dials_allowed(5 * S, 0), 16);
    }

    #[test]
    fn direct_redials_follow_the_backoff_with_jitter() {
        // 0, then 0.5, 1, 2, 4, 8, 16, 30 (capped at half of 60 s) apart: 7 dials in a minute.
        assert_eq!(direct_dials_allowed(60 * S, 0), 7);
        // Capped at 1 s, jittered down to 0.5 s: 121.
        assert_eq!(direct_dials_allowed(S, 0), 121);
        assert_eq!(direct_dials_allowed(60 * S, 2), 21);
    }

    #[test]
    fn windows_count_what_is_inside() {
        let mut rates = ConsumerRates::default();
        for t in [0, 10, 20] {
            rates.queried(t * S, 10 * S).unwrap();
        }
        // A fourth poll 1 s after the third breaks the spacing; a close allows it.
        let early = rates.queried(21 * S, 10 * S).unwrap_err();
        assert_eq!(early.invariant, name::LOOKUPD_SPACING);
        rates.up_closed(22 * S);
        rates.queried(22 * S, 10 * S).unwrap_err();
        rates.queried(40 * S, 10 * S).unwrap();
        let mut busy = Firings::default();
        for _ in 0..MAX_FIRINGS_PER_INSTANT {
            busy.fired(S, format_args!("x")).unwrap();
        }
        assert_eq!(busy.fired(S, format_args!("x")).unwrap_err().invariant, name::NO_BUSY_TIMER);
        busy.fired(2 * S, format_args!("x")).unwrap();
    }
}
