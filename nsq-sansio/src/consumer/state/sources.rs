//! Where a consumer's connections come from and what happens when one fails: direct nsqd
//! addresses with their redials, and lookupd polling.
//!
//! The rules, after go-nsq, with every retry bounded and jittered:
//!
//! - A failed dial or handshake never triggers a lookupd query. The first connection to an
//!   address given to `connect_to_nsqd` that fails is reported with its cause
//!   ([`ConsumerEvent::ConnectFailed`] with no retry) and the address is forgotten, as go-nsq's
//!   `ConnectToNSQD` returns its error.
//! - A direct address whose connection was once up is redialled after a jittered delay that
//!   doubles from 1 s per attempt that did not stay up for [`STABLE_AFTER`], capped at
//!   `lookupd_poll_interval`.
//! - An address lookupd lists is dialled when a scheduled poll lists it, so a dead one is tried
//!   at most once per `lookupd_poll_interval`. A connection that was up and closes triggers one
//!   extra query, after a random delay below one second and coalesced with any query
//!   under way; its answer redials only addresses whose last connection stayed up.
//! - Polling itself (the lookupd poller): a failed query is retried at once on the next lookupd, at
//!   most three lookupds per poll, as go-nsq's `queryLookupd` does; a query unanswered for
//!   `lookupd_poll_timeout` counts as failed.
//!
//! A lookupd query is a connection of the consumer, in the same `ConnId` space as its nsqd
//! connections: `Action::Connect` to the lookupd's `host:port`, the request and response
//! through `poll_transmit` and `handle_input` (TLS for `https://` inside the exchange), and
//! `Action::Close` once the response is complete, parsed, or failed.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{info, warn};

use super::{check_addr, Consumer, DialState, Direct, Timer};
use crate::action::ConnId;
use crate::connection::deadline;
use crate::consumer::{ConsumerError, ConsumerEvent};
use crate::error::{ConnectionError, SocketError};
use crate::lookupd::{Answer, Endpoint, LookupdAddress, Owner, Poller, QueryKind};
use crate::rng::RetryDelay;
use crate::Topic;

/// Delay before the first redial of a direct nsqd; doubles per failed attempt.
pub(crate) const RECONNECT_BASE: Duration = Duration::from_secs(1);
/// A connection that stayed subscribed this long counts as healthy: its address's count of
/// failed attempts starts over.
pub(crate) const STABLE_AFTER: Duration = Duration::from_secs(10);
/// The application's hook over the nsqd addresses a lookupd answer lists (go-nsq's
/// `DiscoveryFilter`).
pub(crate) type DiscoveryFilter = Box<dyn FnMut(Vec<String>) -> Vec<String> + Send>;

/// The lookupds of a consumer, and the application's filter over what they list.
#[derive(Debug)]
pub(crate) struct Lookupd {
    poller: Poller,
    filter: Filter,
}

#[derive(Default)]
struct Filter(Option<DiscoveryFilter>);

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Filter(set)" } else { "Filter(none)" })
    }
}

impl Lookupd {
    pub(crate) fn new(topic: &Topic) -> Self {
        Self { poller: Poller::new(Endpoint::Lookup(topic.clone())), filter: Filter::default() }
    }

    pub(crate) fn has_lookupds(&self) -> bool {
        self.poller.has_lookupds()
    }

    /// Whether `conn` is a lookupd query's connection.
    pub(super) fn is_query(&self, conn: ConnId) -> bool {
        self.poller.is_query(conn)
    }

    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.poller.next_timeout()
    }
}

impl Consumer {
    // ---- direct nsqds ------------------------------------------------------------------------

    pub(crate) fn connect_to_nsqd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.advance(now);
        self.check_running()?;
        check_addr(addr)?;
        if self.is_direct(addr) || self.conn_for(addr).is_some() {
            return Err(ConsumerError::AlreadyConnected(addr.to_owned()));
        }
        self.excluded.remove(addr);
        self.dials.remove(addr);
        self.direct.push(Direct { addr: addr.to_owned(), confirmed: false });
        self.open(addr);
        Ok(())
    }

    pub(crate) fn disconnect_from_nsqd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.advance(now);
        let direct = self.direct.iter().position(|d| d.addr == addr);
        let conn = self.conn_for(addr);
        match direct {
            Some(i) => {
                self.direct.remove(i);
            }
            None if conn.is_some() => {
                // Found through lookupd: not dialled again until connected to by hand.
                self.excluded.insert(addr.to_owned());
            }
            None => return Err(ConsumerError::NotConnected(addr.to_owned())),
        }
        self.dials.remove(addr);
        if let Some(id) = conn {
            self.close_conn(id);
        }
        self.arm_reconnect_timer();
        Ok(())
    }

    pub(super) fn is_direct(&self, addr: &str) -> bool {
        self.direct.iter().any(|d| d.addr == addr)
    }

    /// A connection subscribed: a direct address has proven itself.
    pub(super) fn on_subscribed(&mut self, addr: &str) {
        if let Some(d) = self.direct.iter_mut().find(|d| d.addr == addr) {
            d.confirmed = true;
        }
    }

    /// A connection ended: updates its address's history, tells the application about a failed
    /// attempt, and decides what comes next.
    pub(super) fn after_close(
        &mut self,
        conn: ConnId,
        addr: String,
        subscribed_at: Option<Instant>,
        error: ConnectionError,
    ) {
        let now = self.now;
        let was_up = subscribed_at.is_some();
        let first_direct = self.direct.iter().position(|d| d.addr == addr && !d.confirmed);
        if !was_up && (self.stopping || first_direct.is_some()) {
            // The first attempt at a direct address failed: the caller hears it, nothing retries.
            if let Some(i) = first_direct {
                self.direct.remove(i);
                self.dials.remove(&addr);
            }
            warn!(%conn, %addr, %error, "could not connect to nsqd");
            self.events.push_back(ConsumerEvent::ConnectFailed { conn, addr, error, retry_at: None });
            return;
        }
        if self.stopping {
            return;
        }
        let stable = subscribed_at.is_some_and(|at| now.saturating_duration_since(at) >= STABLE_AFTER);
        let direct = self.is_direct(&addr);
        let listed = !direct && !self.excluded.contains(&addr) && self.lookupd.has_lookupds();
        let retry_at = if direct {
            let policy = self.redial_policy();
            let dial = self.dials.entry(addr.clone()).or_default();
            dial.failures = if stable { 0 } else { dial.failures.saturating_add(1) };
            let delay = policy.delay(dial.failures.max(1), &mut self.rng);
            let at = deadline(now, delay);
            dial.retry_at = Some(at);
            info!(%addr, ?delay, "redialling nsqd");
            Some(at)
        } else if listed {
            let dial = self.dials.entry(addr.clone()).or_default();
            dial.failures = if stable { 0 } else { dial.failures.saturating_add(1) };
            dial.retry_at = None;
            self.lookupd.poller.next_poll()
        } else {
            None
        };
        if !was_up {
            let retry_in = retry_at.map(|at| at.saturating_duration_since(now));
            warn!(%conn, %addr, %error, ?retry_in, "could not connect to nsqd");
            self.events.push_back(ConsumerEvent::ConnectFailed { conn, addr, error, retry_at });
        } else if listed && !error.is_local_close() {
            // Reconnect only if lookupd still lists it: ask again, soon.
            self.schedule_recheck();
        }
        self.arm_reconnect_timer();
    }

    fn redial_policy(&self) -> RetryDelay {
        RetryDelay { base: RECONNECT_BASE, cap: self.config.lookupd_poll_interval }
    }

    /// Dials the direct addresses whose redial is due.
    pub(super) fn redial_due(&mut self) {
        let now = self.now;
        let due: Vec<String> = self
            .direct
            .iter()
            .filter(|d| self.dials.get(&d.addr).and_then(|s| s.retry_at).is_some_and(|at| at <= now))
            .map(|d| d.addr.clone())
            .collect();
        for addr in due {
            if let Some(dial) = self.dials.get_mut(&addr) {
                dial.retry_at = None;
            }
            if self.conn_for(&addr).is_none() {
                self.open(&addr);
            }
        }
        self.arm_reconnect_timer();
    }

    pub(super) fn arm_reconnect_timer(&mut self) {
        let next = self.direct.iter().filter_map(|d| self.dials.get(&d.addr).and_then(|s| s.retry_at)).min();
        match next {
            Some(at) if !self.stopping => self.timers.set(Timer::Reconnect, at),
            _ => self.timers.stop(Timer::Reconnect),
        }
    }

    // ---- lookupd -----------------------------------------------------------------------------

    pub(crate) fn connect_to_nsqlookupd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.advance(now);
        self.check_running()?;
        let parsed = parse_lookupd(addr)?;
        if self.lookupd.poller.contains(&parsed) {
            return Err(ConsumerError::AlreadyConnected(addr.to_owned()));
        }
        self.with_poller(|poller, owner| poller.add(parsed, owner));
        Ok(())
    }

    pub(crate) fn disconnect_from_nsqlookupd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.advance(now);
        let parsed = parse_lookupd(addr)?;
        if !self.lookupd.poller.remove(&parsed) {
            return Err(ConsumerError::NotConnected(addr.to_owned()));
        }
        Ok(())
    }

    /// Runs `f` on the poller with what it needs of the consumer, then acts on its answers.
    fn with_poller<T>(&mut self, f: impl FnOnce(&mut Poller, &mut Owner<'_>) -> T) -> T {
        let mut owner = Owner {
            config: &self.config,
            now: self.now,
            rng: &mut self.rng,
            next_conn: &mut self.next_conn,
            actions: &mut self.actions,
            final_writes: &mut self.final_writes,
        };
        let result = f(&mut self.lookupd.poller, &mut owner);
        while let Some(answer) = self.lookupd.poller.poll_answer() {
            match answer {
                Answer::Listed { kind, nsqds, .. } => self.lookupd_answered(kind, nsqds),
                Answer::Failed { lookupd, error } => {
                    self.events.push_back(ConsumerEvent::LookupdFailed { addr: lookupd.to_string(), error });
                }
            }
        }
        result
    }

    /// The poll schedule or a query deadline is due.
    pub(super) fn lookupd_timeout(&mut self) {
        self.with_poller(|poller, owner| poller.handle_timeout(owner));
    }

    /// Asks lookupd again soon, unless a query is already under way or planned.
    fn schedule_recheck(&mut self) {
        self.with_poller(|poller, owner| poller.schedule_recheck(owner));
    }

    // ---- a lookupd query's connection ----------------------------------------------------------

    /// The socket of a lookupd query connected.
    pub(super) fn query_connected(&mut self, conn: ConnId) {
        self.lookupd.poller.handle_connected(conn);
    }

    /// Bytes read from a lookupd query's socket.
    pub(super) fn query_input(&mut self, conn: ConnId, data: BytesMut) {
        self.with_poller(|poller, owner| poller.handle_input(conn, data, owner));
    }

    /// lookupd closed a query's connection.
    pub(super) fn query_eof(&mut self, conn: ConnId) {
        self.with_poller(|poller, owner| poller.handle_eof(conn, owner));
    }

    /// A query's socket could not connect, or failed.
    pub(super) fn query_io_error(&mut self, conn: ConnId, error: SocketError) {
        self.with_poller(|poller, owner| poller.handle_io_error(conn, error, owner));
    }

    /// What a query's connection has to write.
    pub(super) fn query_transmit(&mut self, conn: ConnId) -> Option<Bytes> {
        self.lookupd.poller.poll_transmit(conn)
    }

    /// A connected query with something to write.
    pub(super) fn any_query_transmit(&mut self) -> Option<(ConnId, Bytes)> {
        self.lookupd.poller.any_transmit()
    }

    /// Ends lookupd polling and every query under way (the consumer is stopping).
    pub(super) fn close_queries(&mut self) {
        self.with_poller(|poller, owner| poller.stop(owner));
    }

    /// lookupd answered: the nsqds it lists (through the discovery filter) are dialled.
    fn lookupd_answered(&mut self, kind: QueryKind, mut listed: Vec<String>) {
        if let Some(filter) = &mut self.lookupd.filter.0 {
            listed = filter(listed);
            listed.retain(|addr| match check_addr(addr) {
                Ok(()) => true,
                Err(error) => {
                    warn!(%error, "the discovery filter returned a bad address; ignored");
                    false
                }
            });
        }
        for addr in &listed {
            self.discovered(addr, kind);
        }
        // Forget the history of addresses no longer listed and not in use.
        let conns: Vec<String> = self.conns.values().map(|c| c.addr.clone()).collect();
        let direct: Vec<String> = self.direct.iter().map(|d| d.addr.clone()).collect();
        self.dials.retain(|a, _| listed.contains(a) || conns.contains(a) || direct.contains(a));
    }

    /// Sets the hook that filters or reorders the nsqd addresses of every lookupd answer.
    pub(crate) fn set_discovery_filter(&mut self, filter: DiscoveryFilter) {
        self.lookupd.filter = Filter(Some(filter));
    }

    /// Opens a connection to a lookupd-listed nsqd unless one exists or its history says wait.
    fn discovered(&mut self, addr: &str, kind: QueryKind) {
        if self.stopping || self.conn_for(addr).is_some() || self.is_direct(addr) || self.excluded.contains(addr) {
            return;
        }
        let failing = self.dials.get(addr).is_some_and(|d: &DialState| d.failures > 0);
        if kind == QueryKind::Recheck && failing {
            // Failed last time: it waits for the next scheduled poll.
            return;
        }
        info!(topic = %self.topic, channel = %self.channel, %addr, "lookupd lists nsqd");
        self.open(addr);
    }
}

fn parse_lookupd(addr: &str) -> Result<LookupdAddress, ConsumerError> {
    LookupdAddress::parse(addr).map_err(|e| ConsumerError::BadAddress { addr: addr.to_owned(), reason: e.to_string() })
}
