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
//!   extra query, after a random delay below [`RECHECK_JITTER`] and coalesced with any query
//!   under way; its answer redials only addresses whose last connection stayed up.
//! - A failed query is retried at once on the next lookupd, at most three lookupds per poll, as
//!   go-nsq's `queryLookupd` does; a query unanswered for `lookupd_poll_timeout` counts as failed.
//!
//! A lookupd query is a connection of the consumer, in the same `ConnId` space as its nsqd
//! connections: `Action::Connect` to the lookupd's `host:port`, the request and response
//! through `poll_transmit` and `handle_input` (TLS for `https://` inside [`Exchange`]), and
//! `Action::Close` once the response is complete, parsed, or failed.

use std::time::{Duration, Instant};

use std::fmt;

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, warn};

use super::{check_addr, Consumer, DialState, Direct, Timer};
use crate::action::{Action, ConnId};
use crate::connection::deadline;
use crate::consumer::{ConsumerError, ConsumerEvent};
use crate::error::{ConnectionError, SocketError};
use crate::lookupd::{Exchange, Lookup, LookupdAddress, LookupdError};
use crate::rng::RetryDelay;

/// Delay before the first redial of a direct nsqd; doubles per failed attempt.
pub(crate) const RECONNECT_BASE: Duration = Duration::from_secs(1);
/// A connection that stayed subscribed this long counts as healthy: its address's count of
/// failed attempts starts over.
pub(crate) const STABLE_AFTER: Duration = Duration::from_secs(10);
/// The longest random delay before the lookupd query a lost connection triggers.
pub(crate) const RECHECK_JITTER: Duration = Duration::from_secs(1);
/// How many lookupds one poll tries before giving up until the next poll.
const LOOKUPD_ATTEMPTS: usize = 3;

/// The application's hook over the nsqd addresses a lookupd answer lists (go-nsq's
/// `DiscoveryFilter`).
pub(crate) type DiscoveryFilter = Box<dyn FnMut(Vec<String>) -> Vec<String> + Send>;

/// The lookupds of a consumer and their polling schedule.
#[derive(Debug, Default)]
pub(crate) struct Lookupd {
    addrs: Vec<LookupdAddress>,
    next: usize,
    /// Queries under way, each on its own connection.
    pending: Vec<Pending>,
    /// The first periodic poll was scheduled (with its jitter).
    scheduled: bool,
    filter: Filter,
}

#[derive(Default)]
struct Filter(Option<DiscoveryFilter>);

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Filter(set)" } else { "Filter(none)" })
    }
}

/// One lookupd query: its connection and where it stands.
#[derive(Debug)]
struct Pending {
    conn: ConnId,
    addr: LookupdAddress,
    kind: QueryKind,
    /// Lookupds tried before this one in the same poll.
    attempt: usize,
    expires: Instant,
    exchange: Exchange,
    /// The socket is connected: the request may be written.
    connected: bool,
}

/// Why a lookupd query was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum QueryKind {
    /// The periodic poll (or the first query): every listed address may be dialled.
    Poll,
    /// A connection that was up closed: only addresses whose last connection stayed up (or new
    /// ones) are dialled.
    Recheck,
}

impl Lookupd {
    pub(crate) fn has_lookupds(&self) -> bool {
        !self.addrs.is_empty()
    }

    /// Whether `conn` is a lookupd query's connection.
    pub(super) fn is_query(&self, conn: ConnId) -> bool {
        self.pending.iter().any(|p| p.conn == conn)
    }

    fn query(&mut self, conn: ConnId) -> Option<&mut Pending> {
        self.pending.iter_mut().find(|p| p.conn == conn)
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
            self.timers.get(Timer::Lookupd)
        } else {
            None
        };
        if !was_up {
            warn!(%conn, %addr, %error, ?retry_at, "could not connect to nsqd");
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
        if self.lookupd.addrs.contains(&parsed) {
            return Err(ConsumerError::AlreadyConnected(addr.to_owned()));
        }
        self.lookupd.addrs.push(parsed);
        if !self.lookupd.scheduled {
            // The first lookupd is queried at once; polling (with jitter) follows.
            self.lookupd.scheduled = true;
            self.query_lookupd(QueryKind::Poll, 0);
            let interval = self.config.lookupd_poll_interval;
            // go-nsq jitters only the first interval, so consumers started together spread
            // their polls for good.
            let jitter = interval.mul_f64(self.config.lookupd_poll_jitter * self.rng.unit());
            self.set_lookupd_timer(Some(deadline(self.now, interval + jitter)));
        }
        Ok(())
    }

    pub(crate) fn disconnect_from_nsqlookupd(&mut self, addr: &str, now: Instant) -> Result<(), ConsumerError> {
        self.advance(now);
        let parsed = parse_lookupd(addr)?;
        let Some(i) = self.lookupd.addrs.iter().position(|a| *a == parsed) else {
            return Err(ConsumerError::NotConnected(addr.to_owned()));
        };
        self.lookupd.addrs.remove(i);
        if self.lookupd.addrs.is_empty() {
            self.lookupd.scheduled = false;
            self.set_lookupd_timer(None);
            self.timers.stop(Timer::Recheck);
        }
        Ok(())
    }

    /// The periodic poll is due: query, and schedule the next one.
    pub(super) fn poll_due(&mut self) {
        self.query_lookupd(QueryKind::Poll, 0);
        let at = deadline(self.now, self.config.lookupd_poll_interval);
        self.set_lookupd_timer(Some(at));
    }

    /// The query a lost connection asked for is due.
    pub(super) fn recheck_due(&mut self) {
        if self.lookupd.pending.is_empty() {
            self.query_lookupd(QueryKind::Recheck, 0);
        }
    }

    /// Asks lookupd again soon, unless a query is already under way or planned.
    fn schedule_recheck(&mut self) {
        if self.stopping || !self.lookupd.has_lookupds() || !self.lookupd.pending.is_empty() {
            return;
        }
        if self.timers.get(Timer::Recheck).is_some() {
            return;
        }
        let delay = self.rng.up_to(RECHECK_JITTER.min(self.config.lookupd_poll_interval));
        debug!(?delay, "asking lookupd again after a lost connection");
        self.timers.set(Timer::Recheck, deadline(self.now, delay));
    }

    /// Queries the next lookupd in turn, on a new connection.
    fn query_lookupd(&mut self, kind: QueryKind, attempt: usize) {
        if self.stopping || self.lookupd.addrs.is_empty() {
            return;
        }
        let index = self.lookupd.next % self.lookupd.addrs.len();
        self.lookupd.next = index + 1;
        let addr = self.lookupd.addrs[index].clone();
        let bearer = self.config.auth_secret.as_deref().filter(|_| self.config.lookupd_authorization);
        let exchange = addr
            .request(&self.topic, &self.config.user_agent, bearer)
            .and_then(|request| Exchange::new(&addr, request, &self.config.tls));
        let exchange = match exchange {
            Ok(exchange) => exchange,
            Err(error) => return self.query_failed(&addr, kind, attempt, error),
        };
        let conn = self.new_conn_id();
        info!(lookupd = %addr, %conn, ?kind, "querying lookupd");
        self.actions.push_back(Action::Connect {
            conn,
            addr: addr.host_port().to_owned(),
            local_addr: None,
            timeout: self.config.lookupd_poll_timeout,
        });
        let expires = deadline(self.now, self.config.lookupd_poll_timeout);
        self.lookupd.pending.push(Pending { conn, addr, kind, attempt, expires, exchange, connected: false });
        self.arm_lookupd_expiry();
    }

    fn arm_lookupd_expiry(&mut self) {
        match self.lookupd.pending.iter().map(|p| p.expires).min() {
            Some(at) if !self.stopping => self.timers.set(Timer::LookupdExpiry, at),
            _ => self.timers.stop(Timer::LookupdExpiry),
        }
    }

    /// Queries unanswered for too long count as failed.
    pub(super) fn lookupd_expired(&mut self) {
        let now = self.now;
        let expired: Vec<ConnId> = self.lookupd.pending.iter().filter(|p| p.expires <= now).map(|p| p.conn).collect();
        for conn in expired {
            let timeout = self.config.lookupd_poll_timeout;
            let error = SocketError::new(std::io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"));
            self.query_done(conn, Err(LookupdError::Io(error)));
        }
        self.arm_lookupd_expiry();
    }

    // ---- a lookupd query's connection ----------------------------------------------------------

    /// The socket of a lookupd query connected.
    pub(super) fn query_connected(&mut self, conn: ConnId) {
        if let Some(query) = self.lookupd.query(conn) {
            query.connected = true;
        }
    }

    /// Bytes read from a lookupd query's socket.
    pub(super) fn query_input(&mut self, conn: ConnId, data: BytesMut) {
        let Some(query) = self.lookupd.query(conn) else { return };
        if let Some(outcome) = query.exchange.handle_input(data) {
            self.query_done(conn, outcome);
        }
    }

    /// lookupd closed a query's connection.
    pub(super) fn query_eof(&mut self, conn: ConnId) {
        let Some(query) = self.lookupd.query(conn) else { return };
        let outcome = query.exchange.handle_eof();
        self.query_done(conn, outcome);
    }

    /// A query's socket could not connect, or failed.
    pub(super) fn query_io_error(&mut self, conn: ConnId, error: SocketError) {
        self.query_done(conn, Err(LookupdError::Io(error)));
    }

    /// What a query's connection has to write.
    pub(super) fn query_transmit(&mut self, conn: ConnId) -> Option<Bytes> {
        self.lookupd.query(conn).filter(|q| q.connected).and_then(|q| q.exchange.poll_transmit())
    }

    /// A connected query with something to write.
    pub(super) fn any_query_transmit(&mut self) -> Option<(ConnId, Bytes)> {
        self.lookupd
            .pending
            .iter_mut()
            .filter(|q| q.connected)
            .find_map(|q| q.exchange.poll_transmit().map(|b| (q.conn, b)))
    }

    /// Ends every query under way (the consumer is stopping): their sockets close.
    pub(super) fn close_queries(&mut self) {
        let conns: Vec<ConnId> = self.lookupd.pending.iter().map(|p| p.conn).collect();
        for conn in conns {
            self.close_query(conn);
        }
        self.arm_lookupd_expiry();
    }

    /// Removes a query and closes its connection (after TLS close_notify, if any).
    fn close_query(&mut self, conn: ConnId) -> Option<Pending> {
        let pos = self.lookupd.pending.iter().position(|p| p.conn == conn)?;
        let mut query = self.lookupd.pending.swap_remove(pos);
        if query.connected {
            query.exchange.close();
            if let Some(last) = query.exchange.poll_transmit() {
                self.final_writes.push((conn, last));
            }
        }
        self.actions.push_back(Action::Close { conn });
        Some(query)
    }

    /// A query's outcome: its connection closes; the answer is acted on.
    fn query_done(&mut self, conn: ConnId, outcome: Result<Lookup, LookupdError>) {
        let Some(query) = self.close_query(conn) else { return };
        self.arm_lookupd_expiry();
        if self.stopping {
            return;
        }
        match outcome {
            Ok(lookup) => self.lookupd_answered(&query, &lookup),
            Err(error) => self.query_failed(&query.addr, query.kind, query.attempt, error),
        }
    }

    /// A query failed: the application hears why, and the next lookupd is tried (at most
    /// three per poll).
    fn query_failed(&mut self, addr: &LookupdAddress, kind: QueryKind, attempt: usize, error: LookupdError) {
        warn!(lookupd = %addr, %error, "lookupd query failed");
        self.events.push_back(ConsumerEvent::LookupdFailed { addr: addr.to_string(), error });
        let tries = LOOKUPD_ATTEMPTS.min(self.lookupd.addrs.len());
        if attempt + 1 < tries {
            info!("trying the next lookupd");
            self.query_lookupd(kind, attempt + 1);
        }
    }

    /// lookupd answered: the nsqds it lists (through the discovery filter) are dialled.
    fn lookupd_answered(&mut self, query: &Pending, lookup: &Lookup) {
        debug!(lookupd = %query.addr, producers = lookup.producers.len(), "lookupd answered");
        let mut listed: Vec<String> = lookup.producers.iter().map(|p| p.tcp_address()).collect();
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
            self.discovered(addr, query.kind);
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

    fn set_lookupd_timer(&mut self, at: Option<Instant>) {
        match at {
            Some(at) if !self.stopping => self.timers.set(Timer::Lookupd, at),
            _ => self.timers.stop(Timer::Lookupd),
        }
    }
}

fn parse_lookupd(addr: &str) -> Result<LookupdAddress, ConsumerError> {
    LookupdAddress::parse(addr).map_err(|e| ConsumerError::BadAddress { addr: addr.to_owned(), reason: e.to_string() })
}
