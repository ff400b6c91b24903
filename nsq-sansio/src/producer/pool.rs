//! [`ProducerPoolState`]: publishes over several nsqds, with a strategy, bounded retries and
//! per-nsqd health, built from the same per-nsqd [`Link`]s as [`ProducerState`](super::ProducerState).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, warn};

use super::link::{Link, LinkEvent, Txs};
use super::TxId;
use crate::action::{Action, ConnId};
use crate::connection::{deadline, IdHasher};
use crate::error::{CommandError, ConnectionError, PublishError, SocketError};
use crate::lookupd::{Answer, Endpoint, LookupdAddress, LookupdError, Owner, Poller};
use crate::rng::Rng;
use crate::{AuthResponse, Config, Topic};

/// How a pool spreads publishes over its nsqds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// Every publish goes to the first connected nsqd in the order given; when it fails, the
    /// next one takes over, and the first one is used again as soon as it is back.
    #[default]
    Failover,
    /// Publishes rotate over the connected nsqds.
    RoundRobin,
    /// Every publish goes to every nsqd (nsq's `to_nsq`, or dual publishing for redundancy);
    /// it succeeds when every nsqd acknowledged it.
    All,
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "failover" => Ok(Self::Failover),
            "round-robin" | "round_robin" | "roundrobin" => Ok(Self::RoundRobin),
            "all" => Ok(Self::All),
            other => Err(format!("unknown strategy {other:?} (all, round-robin or failover)")),
        }
    }
}

/// How a pool retries and waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolOptions {
    /// How publishes are spread.
    pub strategy: Strategy,
    /// How many times a publish whose connection broke before nsqd answered is sent again
    /// (on another connected nsqd when there is one). Such a publish may have been stored, so
    /// a retry may duplicate it: delivery is at least once. Default 2.
    pub max_retries: u32,
    /// How long a publish waits for a connected nsqd (to be sent, or sent again) before it
    /// fails with the last connection error. Default 10 s.
    pub wait: Duration,
}

impl PoolOptions {
    /// The defaults with `strategy`.
    pub fn new(strategy: Strategy) -> Self {
        Self { strategy, max_retries: 2, wait: Duration::from_secs(10) }
    }

    /// Sets [`max_retries`](Self::max_retries).
    #[must_use]
    pub fn max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = max_retries;
        self
    }

    /// Sets [`wait`](Self::wait).
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self::new(Strategy::default())
    }
}

/// The health of one nsqd of a pool.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Health {
    /// Not dialled yet (the pool starts at its first publish or `connect`).
    Idle,
    /// Being dialled, or its handshake is under way.
    Connecting,
    /// Connected: publishes go here.
    Connected,
    /// The last attempt failed; redialled at `retry_at`.
    Down {
        /// Why.
        error: ConnectionError,
        /// When it is dialled again.
        retry_at: Instant,
    },
}

/// Counters and health of one nsqd of a pool.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NsqdStats {
    /// The nsqd's address.
    pub addr: String,
    /// Its health now.
    pub health: Health,
    /// Publishes (PUB, MPUB or DPUB commands) sent to it.
    pub sent: u64,
    /// Of those, acknowledged.
    pub acknowledged: u64,
    /// Of those, refused by nsqd or lost with the connection.
    pub failed: u64,
    /// Of the failed ones, sent again to another nsqd (or again to this one).
    pub retried_elsewhere: u64,
}

/// Why a pool publish failed: what each nsqd it was tried on said, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolError {
    /// `(nsqd address, error)` per failed attempt.
    pub attempts: Vec<(String, PublishError)>,
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.attempts.is_empty() {
            return f.write_str("no nsqd to publish to");
        }
        for (i, (addr, error)) in self.attempts.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{addr}: {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PoolError {}

/// What a pool tells the application.
#[derive(Debug)]
#[non_exhaustive]
pub enum PoolEvent {
    /// A publish resolved: acknowledged (by every nsqd, for [`Strategy::All`]) or failed.
    Published {
        /// The id the publish call returned.
        tx: TxId,
        /// `Ok` once acknowledged.
        result: Result<(), PoolError>,
    },
    /// A connection finished its handshake.
    Connected {
        /// The connection.
        conn: ConnId,
        /// Its nsqd.
        addr: String,
    },
    /// nsqd accepted the AUTH secret and said who it belongs to.
    Authenticated {
        /// The connection.
        conn: ConnId,
        /// Its nsqd.
        addr: String,
        /// The auth server's answer.
        auth: AuthResponse,
    },
    /// A connection never finished its handshake; the nsqd is redialled at `retry_at`.
    ConnectFailed {
        /// The connection.
        conn: ConnId,
        /// Its nsqd.
        addr: String,
        /// The cause.
        error: ConnectionError,
        /// When it is dialled again.
        retry_at: Instant,
    },
    /// A connection that had finished its handshake ended; the nsqd is redialled.
    Disconnected {
        /// The connection.
        conn: ConnId,
        /// Its nsqd.
        addr: String,
        /// Why.
        error: ConnectionError,
    },
    /// The answer to [`connect`](ProducerPoolState::connect): the pool can publish by its
    /// strategy (every nsqd connected for [`Strategy::All`], any one otherwise), or it cannot:
    /// the nsqds that must be up failed their attempts, or none came up within
    /// [`PoolOptions::wait`].
    Ready(Result<(), PoolError>),
    /// A lookupd query failed (the next lookupd is asked, at most three per poll).
    LookupdFailed {
        /// The lookupd.
        addr: String,
        /// Why.
        error: LookupdError,
    },
    /// `stop` finished: every publish resolved and every connection closed.
    Stopped,
}

/// What a publish carries; kept until it resolves, so it can be sent again.
#[derive(Debug, Clone)]
enum Payload {
    One(Topic, Bytes),
    Many(Topic, Vec<Bytes>),
    Deferred(Topic, Duration, Bytes),
}

/// One application publish.
#[derive(Debug)]
struct Publish {
    payload: Payload,
    /// Until when it may wait for a connected nsqd.
    deadline: Instant,
    /// Sends after a lost connection so far.
    retries: u32,
    /// What failed so far.
    errors: Vec<(String, PublishError)>,
    /// Attempts under way.
    in_flight: usize,
    /// [`Strategy::All`]: the nsqds (indices) it has still to be sent to.
    todo: Vec<usize>,
    /// The nsqd its last attempt broke on: avoided for the next one when others are up.
    avoid: Option<usize>,
    /// It is in the pool's queue, waiting for a connected nsqd.
    queued: bool,
}

/// One nsqd of the pool.
#[derive(Debug)]
struct Member {
    link: Link,
    retried_elsewhere: u64,
    /// `remove_nsqd` was called: closing, then forgotten.
    removed: bool,
    /// Found through lookupd (not given by the application): dropped when lookupd stops
    /// listing it and it is not connected.
    discovered: bool,
}

impl Member {
    fn new(addr: String) -> Self {
        Self { link: Link::with_flap_guard(addr), retried_elsewhere: 0, removed: false, discovered: false }
    }
}

/// A producer over several nsqds.
///
/// Publishes go to the nsqds by a [`Strategy`]. Each nsqd has its own connection, dialled
/// when the pool starts (at the first publish or [`connect`](Self::connect)) and redialled
/// with jittered backoff (100 ms doubling to 5 s per failure in a row; a connection lost
/// within 10 s of being made counts as a failure) for as long as it belongs to the pool.
///
/// # Delivery
///
/// | strategy | a publish is acknowledged when | on a lost connection | refused by nsqd |
/// |---|---|---|---|
/// | `Failover` | the first connected nsqd in order acknowledged it | sent again to the next connected nsqd, at most `max_retries` times: at least once, maybe twice | fails with nsqd's error, not retried |
/// | `RoundRobin` | the next connected nsqd in turn acknowledged it | as `Failover` | as `Failover` |
/// | `All` | every nsqd acknowledged it | sent again to the same nsqd once it is back, at most `max_retries` times | that nsqd's part fails; the error lists each nsqd that failed |
///
/// A publish never sent (no nsqd connected) waits at most [`PoolOptions::wait`], then fails
/// with the last connection error; it never hangs. Every publish resolves exactly once, as
/// [`PoolEvent::Published`], with a [`PoolError`] that names each nsqd tried.
///
/// # Discovery
///
/// With [`connect_to_nsqlookupd`](Self::connect_to_nsqlookupd), the pool also takes its nsqds
/// from lookupd's `/nodes`: every nsqd registered, whatever topics it has (so the first
/// publish of a new topic has somewhere to go). lookupd is asked at once, then every
/// `lookupd_poll_interval` (as a consumer asks, with the same retries over several lookupds);
/// an nsqd it lists joins the pool, and one it no longer lists leaves it once it is not
/// connected. Queries are connections of the pool: `Action::Connect` to the lookupd, the
/// request and answer through `poll_transmit_for` and `handle_input`.
#[derive(Debug)]
pub struct ProducerPoolState {
    config: Arc<Config>,
    options: PoolOptions,
    members: Vec<Member>,
    lookupd: Poller,
    rng: Rng,
    next_conn: u64,
    next_tx: u64,
    /// The next member in turn (round robin).
    turn: usize,
    publishes: HashMap<TxId, Publish, BuildHasherDefault<IdHasher>>,
    /// Attempt ids (as the links know them) → the publish and the member.
    attempts: HashMap<TxId, (TxId, usize), BuildHasherDefault<IdHasher>>,
    /// Publishes waiting for a connected nsqd, in order.
    queue: VecDeque<TxId>,
    link_events: VecDeque<LinkEvent>,
    events: VecDeque<PoolEvent>,
    actions: VecDeque<Action>,
    final_writes: Vec<(ConnId, Bytes)>,
    started: bool,
    /// A `connect` waits for its answer until then.
    connect_deadline: Option<Instant>,
    stopping: bool,
    stopped: bool,
    now: Instant,
}

impl ProducerPoolState {
    /// A pool over `addrs` (`host:port` each; duplicates are ignored). Nothing is dialled
    /// until the first publish or [`connect`](Self::connect).
    pub fn new<S: Into<String>>(
        addrs: impl IntoIterator<Item = S>,
        options: PoolOptions,
        config: Arc<Config>,
        now: Instant,
    ) -> Self {
        let mut pool = Self {
            rng: Rng::from_seed(config.rng_seed),
            config,
            options,
            members: Vec::new(),
            lookupd: Poller::new(Endpoint::Nodes),
            next_conn: 0,
            next_tx: 0,
            turn: 0,
            publishes: HashMap::default(),
            attempts: HashMap::default(),
            queue: VecDeque::new(),
            link_events: VecDeque::new(),
            events: VecDeque::new(),
            actions: VecDeque::new(),
            final_writes: Vec::new(),
            started: false,
            connect_deadline: None,
            stopping: false,
            stopped: false,
            now,
        };
        for addr in addrs {
            let addr = addr.into();
            if pool.index_of(&addr).is_none() {
                pool.members.push(Member::new(addr));
            }
        }
        pool
    }

    /// The options in force.
    pub fn options(&self) -> PoolOptions {
        self.options
    }

    /// Adds an nsqd (dialled at once if the pool has started). False if it is there already.
    pub fn add_nsqd(&mut self, addr: &str, now: Instant) -> Result<bool, CommandError> {
        self.advance(now);
        self.check_running()?;
        if let Some(i) = self.index_of(addr) {
            if !self.members[i].removed {
                return Ok(false);
            }
            self.members[i].removed = false;
        } else {
            self.members.push(Member::new(addr.to_owned()));
        }
        self.redial_due();
        self.dispatch();
        Ok(true)
    }

    /// Adds a lookupd (`host:port`, `http://` or `https://host:port`) whose `/nodes` the pool
    /// takes its nsqds from, asked at once and then every `lookupd_poll_interval`. False if it
    /// is there already.
    pub fn connect_to_nsqlookupd(&mut self, addr: &str, now: Instant) -> Result<bool, LookupdError> {
        self.advance(now);
        let parsed = LookupdAddress::parse(addr)?;
        if self.stopping || self.lookupd.contains(&parsed) {
            return Ok(false);
        }
        self.with_lookupd(|poller, owner| poller.add(parsed, owner));
        Ok(true)
    }

    /// Runs `f` on the lookupd poller with what it needs of the pool, then acts on its answers.
    fn with_lookupd(&mut self, f: impl FnOnce(&mut Poller, &mut Owner<'_>)) {
        let mut owner = Owner {
            config: &self.config,
            now: self.now,
            rng: &mut self.rng,
            next_conn: &mut self.next_conn,
            actions: &mut self.actions,
            final_writes: &mut self.final_writes,
        };
        f(&mut self.lookupd, &mut owner);
        while let Some(answer) = self.lookupd.poll_answer() {
            match answer {
                Answer::Listed { nsqds, lookupd, .. } => self.listed(&lookupd, nsqds),
                Answer::Failed { lookupd, error } => {
                    self.events.push_back(PoolEvent::LookupdFailed { addr: lookupd.to_string(), error })
                }
            }
        }
    }

    /// lookupd listed `nsqds`: new ones join; discovered ones no longer listed and not
    /// connected leave.
    fn listed(&mut self, lookupd: &LookupdAddress, nsqds: Vec<String>) {
        debug!(%lookupd, nsqds = nsqds.len(), "lookupd listed nsqds");
        for addr in &nsqds {
            match self.index_of(addr) {
                Some(i) if self.members[i].removed && self.members[i].discovered => self.members[i].removed = false,
                Some(_) => {}
                None => {
                    info!(%addr, "pool: lookupd lists a new nsqd");
                    let mut member = Member::new(addr.clone());
                    member.discovered = true;
                    self.members.push(member);
                }
            }
        }
        let gone: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.discovered && !m.removed && !m.link.is_ready() && !nsqds.iter().any(|a| a == m.link.addr()))
            .map(|m| m.link.addr().to_owned())
            .collect();
        for addr in gone {
            info!(%addr, "pool: lookupd no longer lists nsqd");
            self.remove_nsqd(&addr, self.now);
        }
        self.redial_due();
        self.dispatch();
        self.check_ready();
    }

    /// Removes an nsqd: nothing new is sent to it; what it carries finishes, then its
    /// connection closes. False if it is not in the pool.
    pub fn remove_nsqd(&mut self, addr: &str, now: Instant) -> bool {
        self.advance(now);
        let Some(i) = self.index_of(addr).filter(|&i| !self.members[i].removed) else {
            return false;
        };
        self.members[i].removed = true;
        self.members[i].link.close(now);
        for p in self.publishes.values_mut() {
            p.todo.retain(|&m| m != i);
        }
        self.process(i);
        self.forget_removed();
        self.settle_all();
        true
    }

    /// The nsqd addresses in the pool, in order.
    pub fn nsqds(&self) -> impl Iterator<Item = &str> + '_ {
        self.members.iter().filter(|m| !m.removed).map(|m| m.link.addr())
    }

    /// Dials every nsqd now instead of at the first publish, and answers with
    /// [`PoolEvent::Ready`] once the pool can publish by its strategy or cannot: for
    /// [`Strategy::All`] when every nsqd connected or one failed; otherwise when every nsqd's
    /// attempt settled, `Ok` if one connected (or at [`PoolOptions::wait`], if one did).
    pub fn connect(&mut self, now: Instant) -> Result<(), CommandError> {
        self.advance(now);
        self.check_running()?;
        self.start();
        let wait = self.options.wait;
        self.connect_deadline.get_or_insert(deadline(now, wait));
        self.check_ready();
        Ok(())
    }

    /// Answers a waiting `connect` when there is an answer.
    fn check_ready(&mut self) {
        let Some(until) = self.connect_deadline else { return };
        let live: Vec<&Member> = self.members.iter().filter(|m| !m.removed).collect();
        let now = self.now;
        let up = |m: &&Member| m.link.is_ready();
        let down = |m: &&Member| m.link.held_until(now).is_some();
        let failures = || PoolError {
            attempts: live
                .iter()
                .filter(|m| down(m))
                .filter_map(|m| {
                    let error = m.link.last_error()?.clone();
                    Some((m.link.addr().to_owned(), PublishError::NotConnected(error)))
                })
                .collect(),
        };
        // Failover and round robin answer once every nsqd's first attempt settled, so the
        // publishes that follow go where the strategy says, not to whichever connected first.
        let settled = !live.is_empty() && live.iter().all(|m| up(m) || down(m));
        let verdict = match self.options.strategy {
            Strategy::All if !live.is_empty() && live.iter().all(up) => Some(Ok(())),
            Strategy::All if live.iter().any(down) => Some(Err(failures())),
            Strategy::Failover | Strategy::RoundRobin if settled && live.iter().any(up) => Some(Ok(())),
            Strategy::Failover | Strategy::RoundRobin if settled => Some(Err(failures())),
            Strategy::Failover | Strategy::RoundRobin if now >= until && live.iter().any(up) => Some(Ok(())),
            _ => None,
        };
        let verdict = verdict.or_else(|| {
            (now >= until).then(|| {
                let mut error = failures();
                if error.attempts.is_empty() {
                    let wait = self.options.wait;
                    let timeout =
                        SocketError::new(std::io::ErrorKind::TimedOut, format!("no nsqd connected within {wait:?}"));
                    error.attempts.push((String::new(), PublishError::NotConnected(ConnectionError::Io(timeout))));
                }
                Err(error)
            })
        });
        if let Some(verdict) = verdict {
            self.connect_deadline = None;
            self.events.push_back(PoolEvent::Ready(verdict));
        }
    }

    /// Queues a PUB. Arguments are checked before anything is queued.
    pub fn publish(&mut self, topic: &Topic, body: Bytes, now: Instant) -> Result<TxId, CommandError> {
        self.advance(now);
        self.check_running()?;
        self.config.check_body(&body)?;
        Ok(self.submit(Payload::One(topic.clone(), body)))
    }

    /// Queues an MPUB: all messages stored atomically on each nsqd that takes it.
    pub fn multi_publish(&mut self, topic: &Topic, bodies: Vec<Bytes>, now: Instant) -> Result<TxId, CommandError> {
        self.advance(now);
        self.check_running()?;
        self.config.check_batch(&bodies)?;
        Ok(self.submit(Payload::Many(topic.clone(), bodies)))
    }

    /// Queues a DPUB: delivered after `delay`.
    pub fn deferred_publish(
        &mut self,
        topic: &Topic,
        delay: Duration,
        body: Bytes,
        now: Instant,
    ) -> Result<TxId, CommandError> {
        self.advance(now);
        self.check_running()?;
        self.config.check_deferred(delay, &body)?;
        Ok(self.submit(Payload::Deferred(topic.clone(), delay, body)))
    }

    /// Refuses new publishes; what was sent finishes, what still waits for a connected nsqd
    /// fails with the last connection error; then every connection closes. Ends with
    /// [`PoolEvent::Stopped`].
    pub fn stop(&mut self, now: Instant) {
        self.advance(now);
        if self.stopping {
            return;
        }
        self.stopping = true;
        if self.connect_deadline.take().is_some() {
            let stopped = PublishError::NotConnected(ConnectionError::LocallyClosed);
            self.events.push_back(PoolEvent::Ready(Err(PoolError { attempts: vec![(String::new(), stopped)] })));
        }
        self.with_lookupd(|poller, owner| poller.stop(owner));
        for tx in std::mem::take(&mut self.queue) {
            if let Some(p) = self.publishes.get_mut(&tx) {
                p.queued = false;
            }
            self.expire(tx);
        }
        for i in 0..self.members.len() {
            self.members[i].link.close(now);
            self.process(i);
        }
        self.maybe_stopped();
    }

    /// The adapter connected the socket of `conn`.
    pub fn handle_connected(&mut self, conn: ConnId, now: Instant) {
        self.advance(now);
        if let Some(i) = self.member_of(conn) {
            self.members[i].link.handle_connected(conn);
        } else {
            self.lookupd.handle_connected(conn);
        }
    }

    /// The adapter could not connect `conn` (pass the `std::io::Error` of the dial).
    pub fn handle_connect_failed(&mut self, conn: ConnId, error: impl Into<SocketError>, now: Instant) {
        self.advance(now);
        let error = error.into();
        if let Some(i) = self.member_of(conn) {
            self.members[i].link.handle_connect_failed(conn, error, now);
            self.after(i);
        } else {
            self.with_lookupd(|poller, owner| poller.handle_io_error(conn, error, owner));
        }
    }

    /// Bytes read from `conn`'s socket.
    pub fn handle_input(&mut self, conn: ConnId, now: Instant, data: BytesMut) {
        self.advance(now);
        if let Some(i) = self.member_of(conn) {
            self.members[i].link.handle_input(conn, now, data);
            self.after(i);
        } else {
            self.with_lookupd(|poller, owner| poller.handle_input(conn, data, owner));
        }
    }

    /// `conn`'s socket reached end of file.
    pub fn handle_eof(&mut self, conn: ConnId, now: Instant) {
        self.advance(now);
        if let Some(i) = self.member_of(conn) {
            self.members[i].link.handle_eof(conn, now);
            self.after(i);
        } else {
            self.with_lookupd(|poller, owner| poller.handle_eof(conn, owner));
        }
    }

    /// Reading or writing `conn`'s socket failed (pass the `std::io::Error`).
    pub fn handle_io_error(&mut self, conn: ConnId, error: impl Into<SocketError>, now: Instant) {
        self.advance(now);
        let error = error.into();
        if let Some(i) = self.member_of(conn) {
            self.members[i].link.handle_io_error(conn, error, now);
            self.after(i);
        } else {
            self.with_lookupd(|poller, owner| poller.handle_io_error(conn, error, owner));
        }
    }

    /// Lets timers fire: connections' timers, redials, publishes that waited too long, lookupd
    /// polls.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        if self.lookupd.next_timeout().is_some_and(|at| at <= now) {
            self.with_lookupd(|poller, owner| poller.handle_timeout(owner));
        }
        for i in 0..self.members.len() {
            self.members[i].link.handle_timeout(now);
            self.process(i);
        }
        let expired: Vec<TxId> =
            self.queue.iter().copied().filter(|tx| self.publishes.get(tx).is_some_and(|p| p.deadline <= now)).collect();
        if !expired.is_empty() {
            self.queue.retain(|tx| !expired.contains(tx));
            for tx in expired {
                if let Some(p) = self.publishes.get_mut(&tx) {
                    p.queued = false;
                }
                self.expire(tx);
            }
        }
        self.forget_removed();
        self.redial_due();
        self.dispatch();
        self.check_ready();
        self.maybe_stopped();
    }

    /// Bytes to write to a connection's socket.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(ConnId, Bytes)> {
        if !self.final_writes.is_empty() {
            return Some(self.final_writes.remove(0));
        }
        let conns: Vec<ConnId> = self.members.iter().filter_map(|m| m.link.conn_id()).collect();
        let nsqd = conns.into_iter().find_map(|c| self.poll_transmit_for(c).map(|b| (c, b)));
        nsqd.or_else(|| self.lookupd.any_transmit())
    }

    /// Bytes to write to `conn`'s socket: everything queued for it since the last call.
    #[must_use]
    pub fn poll_transmit_for(&mut self, conn: ConnId) -> Option<Bytes> {
        if let Some(i) = self.final_writes.iter().position(|(c, _)| *c == conn) {
            return Some(self.final_writes.remove(i).1);
        }
        if self.lookupd.is_query(conn) {
            return self.lookupd.poll_transmit(conn);
        }
        let i = self.member_of(conn)?;
        let bytes = self.members[i].link.poll_transmit(conn);
        // A transport failure while encoding surfaces as an event.
        self.after(i);
        bytes
    }

    /// I/O to carry out.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Events for the application.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<PoolEvent> {
        self.events.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let links = self.members.iter().filter_map(|m| m.link.poll_timeout());
        let redials = self
            .members
            .iter()
            .filter(|m| self.started && !self.stopping && !m.removed && !m.link.has_conn())
            .filter_map(|m| m.link.held_until(self.now));
        let waits = self.queue.iter().filter_map(|tx| self.publishes.get(tx)).map(|p| p.deadline);
        links.chain(redials).chain(waits).chain(self.lookupd.next_timeout()).chain(self.connect_deadline).min()
    }

    /// Per nsqd: health and counters.
    pub fn stats(&self) -> Vec<NsqdStats> {
        self.members
            .iter()
            .filter(|m| !m.removed)
            .map(|m| NsqdStats { retried_elsewhere: m.retried_elsewhere, ..m.link.stats(self.now, self.started) })
            .collect()
    }

    /// Publishes not yet resolved.
    pub fn outstanding(&self) -> usize {
        self.publishes.len()
    }

    /// Whether [`stop`](Self::stop) has completed.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    // ---- internals ---------------------------------------------------------------------------

    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn check_running(&self) -> Result<(), CommandError> {
        if self.stopping {
            Err(CommandError::Closed)
        } else {
            Ok(())
        }
    }

    fn index_of(&self, addr: &str) -> Option<usize> {
        self.members.iter().position(|m| m.link.addr() == addr)
    }

    fn member_of(&self, conn: ConnId) -> Option<usize> {
        self.members.iter().position(|m| m.link.conn_id() == Some(conn))
    }

    /// Starts dialling every nsqd, once.
    fn start(&mut self) {
        if !self.started {
            self.started = true;
            self.redial_due();
        }
    }

    /// Dials every nsqd that has no connection and whose backoff is over.
    fn redial_due(&mut self) {
        if !self.started || self.stopping {
            return;
        }
        for m in &mut self.members {
            if m.removed || m.link.has_conn() || m.link.held_until(self.now).is_some() {
                continue;
            }
            let id = ConnId(self.next_conn);
            self.next_conn += 1;
            m.link.open(id, &self.config, self.now);
            self.actions.push_back(Action::dial_nsqd(id, m.link.addr(), &self.config));
        }
    }

    fn submit(&mut self, payload: Payload) -> TxId {
        self.start();
        let tx = TxId(self.next_tx);
        self.next_tx += 1;
        let todo = match self.options.strategy {
            Strategy::All => (0..self.members.len()).filter(|&i| !self.members[i].removed).collect(),
            _ => Vec::new(),
        };
        let deadline = deadline(self.now, self.options.wait);
        let publish = Publish {
            payload,
            deadline,
            retries: 0,
            errors: Vec::new(),
            in_flight: 0,
            todo,
            avoid: None,
            queued: true,
        };
        self.publishes.insert(tx, publish);
        self.queue.push_back(tx);
        self.dispatch();
        tx
    }

    /// Sends what waits in the queue to connected nsqds, by the strategy.
    fn dispatch(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        let n = self.members.len();
        let ready = |members: &[Member], i: usize| !members[i].removed && members[i].link.is_ready();
        let Some(first_ready) = (0..n).find(|&i| ready(&self.members, i)) else {
            return;
        };
        // Taken out while it is worked through; what still waits goes back into `self.queue`.
        let mut queue = std::mem::take(&mut self.queue);
        while let Some(tx) = queue.pop_front() {
            let Some(p) = self.publishes.get_mut(&tx) else { continue };
            p.queued = false;
            let avoid = p.avoid;
            match self.options.strategy {
                Strategy::All => {
                    let targets: Vec<usize> = p.todo.iter().copied().filter(|&i| ready(&self.members, i)).collect();
                    for i in targets {
                        self.send(tx, i);
                    }
                }
                Strategy::Failover => {
                    let i = (0..n).find(|&i| Some(i) != avoid && ready(&self.members, i)).unwrap_or(first_ready);
                    self.send(tx, i);
                }
                Strategy::RoundRobin => {
                    let i = (0..n)
                        .map(|k| (self.turn + k) % n)
                        .find(|&i| Some(i) != avoid && ready(&self.members, i))
                        .unwrap_or(first_ready);
                    self.turn = i + 1;
                    self.send(tx, i);
                }
            }
            let Some(p) = self.publishes.get_mut(&tx) else { continue };
            let still_waiting = match self.options.strategy {
                Strategy::All => !p.todo.is_empty(),
                _ => p.in_flight == 0 && p.errors.is_empty(),
            };
            if still_waiting {
                p.queued = true;
                self.queue.push_back(tx);
            } else {
                self.settle(tx);
            }
        }
        // Nothing waits (the usual case): keep the emptied queue's allocation for the next one.
        if self.queue.is_empty() {
            self.queue = queue;
        }
    }

    /// Sends publish `tx` to member `i` (connected).
    fn send(&mut self, tx: TxId, i: usize) {
        let Some(p) = self.publishes.get_mut(&tx) else { return };
        let attempt = TxId(self.next_tx);
        self.next_tx += 1;
        let member = &mut self.members[i];
        let Some(state) = member.link.state() else { return };
        let queued = match &p.payload {
            Payload::One(topic, body) => state.publish(topic, body.clone()),
            Payload::Many(topic, bodies) => state.multi_publish(topic, bodies),
            Payload::Deferred(topic, delay, body) => state.deferred_publish(topic, *delay, body.clone()),
        };
        p.todo.retain(|&m| m != i);
        match queued {
            Ok(id) => {
                member.link.track(id, Txs::One(attempt));
                p.in_flight += 1;
                self.attempts.insert(attempt, (tx, i));
            }
            Err(e) => {
                debug!(addr = %member.link.addr(), %e, "publish refused by the connection");
                p.errors.push((member.link.addr().to_owned(), PublishError::Command(e)));
            }
        }
    }

    /// A publish that waited for a connected nsqd past its deadline, or during stop: fails
    /// with why its nsqds were not connected.
    fn expire(&mut self, tx: TxId) {
        let Some(p) = self.publishes.get_mut(&tx) else { return };
        let members: Vec<usize> = match self.options.strategy {
            Strategy::All => std::mem::take(&mut p.todo),
            _ => (0..self.members.len()).filter(|&i| !self.members[i].removed).collect(),
        };
        let wait = self.options.wait;
        let timeout = |what: &str| {
            ConnectionError::Io(SocketError::new(std::io::ErrorKind::TimedOut, format!("{what} within {wait:?}")))
        };
        let mut blamed = false;
        for i in members {
            let m = &self.members[i];
            // A close of the pool's own (the nsqd was removed, or lookupd stopped listing it for
            // a while) says nothing about why it is not connected now.
            let error = match m.link.last_error().filter(|e| !e.is_local_close()) {
                Some(error) => error.clone(),
                // All: every nsqd it still waits for is named.
                None if self.options.strategy == Strategy::All && !self.stopping => timeout("not connected"),
                None => continue,
            };
            p.errors.push((m.link.addr().to_owned(), PublishError::NotConnected(error)));
            blamed = true;
        }
        if !blamed && p.errors.is_empty() {
            let error = if self.stopping { ConnectionError::LocallyClosed } else { timeout("no nsqd connected") };
            p.errors.push((String::new(), PublishError::NotConnected(error)));
        }
        self.settle(tx);
    }

    /// Handles what member `i`'s link reported, then what follows for the whole pool.
    fn after(&mut self, i: usize) {
        self.process(i);
        self.forget_removed();
        self.redial_due();
        self.dispatch();
        self.check_ready();
        self.maybe_stopped();
    }

    fn process(&mut self, i: usize) {
        let Some(m) = self.members.get_mut(i) else { return };
        m.link.process(self.now, &mut self.rng, &mut self.link_events, &mut self.final_writes);
        while let Some(event) = self.link_events.pop_front() {
            match event {
                LinkEvent::Published { tx: attempt, result } => self.attempt_done(attempt, result),
                LinkEvent::Authenticated(conn, auth) => {
                    let addr = self.members[i].link.addr().to_owned();
                    self.events.push_back(PoolEvent::Authenticated { conn, addr, auth });
                }
                // The pool sends no pings.
                LinkEvent::Pinged { .. } => {}
                LinkEvent::Connected(conn) => {
                    let addr = self.members[i].link.addr().to_owned();
                    info!(%conn, %addr, "pool: nsqd connected");
                    self.events.push_back(PoolEvent::Connected { conn, addr });
                }
                LinkEvent::Closed { conn, error, was_ready, retry_at } => {
                    self.actions.push_back(Action::Close { conn });
                    let addr = self.members[i].link.addr().to_owned();
                    match retry_at {
                        Some(retry_at) if !was_ready => {
                            self.events.push_back(PoolEvent::ConnectFailed { conn, addr, error, retry_at })
                        }
                        _ => self.events.push_back(PoolEvent::Disconnected { conn, addr, error }),
                    }
                }
            }
        }
    }

    /// One attempt resolved.
    fn attempt_done(&mut self, attempt: TxId, result: Result<(), PublishError>) {
        let Some((tx, i)) = self.attempts.remove(&attempt) else { return };
        let addr = self.members[i].link.addr().to_owned();
        let Some(p) = self.publishes.get_mut(&tx) else { return };
        p.in_flight = p.in_flight.saturating_sub(1);
        let member = &mut self.members[i];
        match result {
            Ok(()) => {
                if self.options.strategy != Strategy::All {
                    // Earlier failures no longer matter: it is stored.
                    p.errors.clear();
                }
            }
            Err(error) => {
                let resend = match &error {
                    // Never sent: safe to send anywhere.
                    PublishError::NotConnected(_) => true,
                    // Maybe stored: sent again only within the retry budget.
                    PublishError::ConnectionLost(_) => p.retries < self.options.max_retries,
                    _ => false,
                };
                let resend = resend && !self.stopping && !member.removed;
                if resend {
                    if matches!(error, PublishError::ConnectionLost(_)) {
                        p.retries += 1;
                    }
                    member.retried_elsewhere += 1;
                    warn!(nsqd = %addr, %error, retries = p.retries, "publish sent again");
                    p.errors.push((addr, error));
                    p.avoid = Some(i);
                    p.deadline = deadline(self.now, self.options.wait);
                    if self.options.strategy == Strategy::All {
                        p.todo.push(i);
                    }
                    if !p.queued {
                        p.queued = true;
                        self.queue.push_back(tx);
                    }
                } else {
                    p.errors.push((addr, error));
                    if self.options.strategy != Strategy::All {
                        // Refused (or out of retries): final.
                        p.todo.clear();
                    }
                }
            }
        }
        self.settle(tx);
    }

    /// Resolves `tx` if nothing more will happen to it.
    fn settle(&mut self, tx: TxId) {
        let Some(p) = self.publishes.get(&tx) else { return };
        let done = match self.options.strategy {
            Strategy::All => p.in_flight == 0 && p.todo.is_empty() && !p.queued,
            _ => p.in_flight == 0 && !p.queued,
        };
        if !done {
            return;
        }
        let Some(p) = self.publishes.remove(&tx) else { return };
        let result = if p.errors.is_empty() { Ok(()) } else { Err(PoolError { attempts: p.errors }) };
        self.events.push_back(PoolEvent::Published { tx, result });
    }

    fn settle_all(&mut self) {
        let txs: Vec<TxId> = self.publishes.keys().copied().collect();
        for tx in txs {
            self.settle(tx);
        }
    }

    /// Drops removed members whose connection has closed.
    fn forget_removed(&mut self) {
        // Indices are kept stable while anything refers to them: forget only at rest.
        if !self.attempts.is_empty() || !self.queue.is_empty() {
            return;
        }
        if self.members.iter().any(|m| m.removed && !m.link.has_conn()) {
            self.members.retain(|m| !m.removed || m.link.has_conn());
            self.turn = 0;
        }
    }

    fn maybe_stopped(&mut self) {
        if self.stopping
            && !self.stopped
            && self.publishes.is_empty()
            && self.members.iter().all(|m| !m.link.has_conn())
        {
            self.stopped = true;
            self.events.push_back(PoolEvent::Stopped);
        }
    }
}
