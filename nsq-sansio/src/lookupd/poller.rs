//! [`Poller`]: asks a set of lookupds, in turn and on a schedule, which nsqds they know, each
//! query on a connection of its owner (a consumer asks for a topic's nsqds, a producer pool
//! for every nsqd), and hands back what they listed.
//!
//! The rules, after go-nsq: the first lookupd is asked at once, then every
//! `lookupd_poll_interval`, the first interval lengthened by a random part of
//! `lookupd_poll_jitter` so that owners started together spread their polls. A failed query is
//! retried at once on the next lookupd, at most three lookupds per poll; a query unanswered for
//! `lookupd_poll_timeout` counts as failed. The owner may ask for one extra query (a recheck),
//! which comes after a random delay below [`RECHECK_JITTER`] and is merged with any query
//! under way.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, warn};

use super::{Exchange, Lookup, LookupdAddress, LookupdError};
use crate::action::{Action, ConnId};
use crate::connection::deadline;
use crate::error::SocketError;
use crate::rng::Rng;
use crate::{Config, Topic};

/// The longest random delay before a recheck query.
pub(crate) const RECHECK_JITTER: Duration = Duration::from_secs(1);
/// How many lookupds one poll tries before giving up until the next poll.
const LOOKUPD_ATTEMPTS: usize = 3;

/// What a poller asks lookupd for.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    /// `GET /lookup?topic=`: the nsqds that have the topic.
    Lookup(Topic),
    /// `GET /nodes`: every nsqd registered, whatever its topics.
    Nodes,
}

/// Why a query was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueryKind {
    /// The periodic poll (or the first query).
    Poll,
    /// The extra query the owner asked for.
    Recheck,
}

/// What a query came to.
#[derive(Debug)]
pub(crate) enum Answer {
    /// The lookupd listed these nsqds (their TCP addresses).
    Listed { kind: QueryKind, lookupd: LookupdAddress, nsqds: Vec<String> },
    /// The query failed; the next lookupd was asked if the poll had tries left.
    Failed { lookupd: LookupdAddress, error: LookupdError },
}

/// What a poller needs of its owner during a call: the owner's settings, clock and generator,
/// its connection ids, and its queues of actions and last writes.
pub(crate) struct Owner<'a> {
    pub(crate) config: &'a Config,
    pub(crate) now: Instant,
    pub(crate) rng: &'a mut Rng,
    pub(crate) next_conn: &'a mut u64,
    pub(crate) actions: &'a mut VecDeque<Action>,
    pub(crate) final_writes: &'a mut Vec<(ConnId, Bytes)>,
}

/// One query: its connection and where it stands.
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

/// The lookupds of one owner and their polling schedule.
#[derive(Debug)]
pub(crate) struct Poller {
    endpoint: Endpoint,
    addrs: Vec<LookupdAddress>,
    next: usize,
    pending: Vec<Pending>,
    /// The next periodic poll; `None` until a lookupd is added, and after `stop`.
    poll_at: Option<Instant>,
    recheck_at: Option<Instant>,
    answers: VecDeque<Answer>,
    stopped: bool,
}

impl Poller {
    pub(crate) fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            addrs: Vec::new(),
            next: 0,
            pending: Vec::new(),
            poll_at: None,
            recheck_at: None,
            answers: VecDeque::new(),
            stopped: false,
        }
    }

    pub(crate) fn has_lookupds(&self) -> bool {
        !self.addrs.is_empty()
    }

    pub(crate) fn contains(&self, addr: &LookupdAddress) -> bool {
        self.addrs.contains(addr)
    }

    /// When the next periodic poll is due.
    pub(crate) fn next_poll(&self) -> Option<Instant> {
        self.poll_at
    }

    /// Adds a lookupd; the first one is queried at once and starts the schedule.
    pub(crate) fn add(&mut self, addr: LookupdAddress, owner: &mut Owner<'_>) {
        self.addrs.push(addr);
        if self.poll_at.is_none() && !self.stopped {
            self.query(QueryKind::Poll, 0, owner);
            let interval = owner.config.lookupd_poll_interval;
            let jitter = interval.mul_f64(owner.config.lookupd_poll_jitter * owner.rng.unit());
            self.poll_at = Some(deadline(owner.now, interval + jitter));
        }
    }

    /// Removes a lookupd; false if it was not there. Without lookupds, polling stops.
    pub(crate) fn remove(&mut self, addr: &LookupdAddress) -> bool {
        let Some(i) = self.addrs.iter().position(|a| a == addr) else {
            return false;
        };
        self.addrs.remove(i);
        if self.addrs.is_empty() {
            self.poll_at = None;
            self.recheck_at = None;
        }
        true
    }

    /// Asks again soon (after a random delay below [`RECHECK_JITTER`]), unless a query is under
    /// way or already planned.
    pub(crate) fn schedule_recheck(&mut self, owner: &mut Owner<'_>) {
        if self.stopped || self.addrs.is_empty() || !self.pending.is_empty() || self.recheck_at.is_some() {
            return;
        }
        let delay = owner.rng.up_to(RECHECK_JITTER.min(owner.config.lookupd_poll_interval));
        debug!(?delay, "asking lookupd again soon");
        self.recheck_at = Some(deadline(owner.now, delay));
    }

    /// Stops polling and ends every query under way (their sockets close).
    pub(crate) fn stop(&mut self, owner: &mut Owner<'_>) {
        self.stopped = true;
        self.poll_at = None;
        self.recheck_at = None;
        let conns: Vec<ConnId> = self.pending.iter().map(|p| p.conn).collect();
        for conn in conns {
            self.close(conn, owner);
        }
        self.answers.clear();
    }

    /// The earliest of the next poll, the planned recheck and the query deadlines.
    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        let expiries = self.pending.iter().map(|p| p.expires);
        self.poll_at.into_iter().chain(self.recheck_at).chain(expiries).min()
    }

    /// Lets the schedule and the query deadlines fire.
    pub(crate) fn handle_timeout(&mut self, owner: &mut Owner<'_>) {
        let now = owner.now;
        let expired: Vec<ConnId> = self.pending.iter().filter(|p| p.expires <= now).map(|p| p.conn).collect();
        for conn in expired {
            let timeout = owner.config.lookupd_poll_timeout;
            let error = SocketError::new(std::io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"));
            self.done(conn, Err(LookupdError::Io(error)), owner);
        }
        if self.poll_at.is_some_and(|at| at <= now) {
            self.query(QueryKind::Poll, 0, owner);
            self.poll_at = Some(deadline(now, owner.config.lookupd_poll_interval));
        }
        if self.recheck_at.is_some_and(|at| at <= now) {
            self.recheck_at = None;
            if self.pending.is_empty() {
                self.query(QueryKind::Recheck, 0, owner);
            }
        }
    }

    /// What the queries came to, in order.
    pub(crate) fn poll_answer(&mut self) -> Option<Answer> {
        self.answers.pop_front()
    }

    // ---- a query's connection ----------------------------------------------------------------

    /// Whether `conn` is a query's connection.
    pub(crate) fn is_query(&self, conn: ConnId) -> bool {
        self.pending.iter().any(|p| p.conn == conn)
    }

    fn query_mut(&mut self, conn: ConnId) -> Option<&mut Pending> {
        self.pending.iter_mut().find(|p| p.conn == conn)
    }

    /// The socket of a query connected.
    pub(crate) fn handle_connected(&mut self, conn: ConnId) {
        if let Some(query) = self.query_mut(conn) {
            query.connected = true;
        }
    }

    /// Bytes read from a query's socket.
    pub(crate) fn handle_input(&mut self, conn: ConnId, data: BytesMut, owner: &mut Owner<'_>) {
        let Some(query) = self.query_mut(conn) else { return };
        if let Some(outcome) = query.exchange.handle_input(data) {
            self.done(conn, outcome, owner);
        }
    }

    /// lookupd closed a query's connection.
    pub(crate) fn handle_eof(&mut self, conn: ConnId, owner: &mut Owner<'_>) {
        let Some(query) = self.query_mut(conn) else { return };
        let outcome = query.exchange.handle_eof();
        self.done(conn, outcome, owner);
    }

    /// A query's socket could not connect, or failed.
    pub(crate) fn handle_io_error(&mut self, conn: ConnId, error: SocketError, owner: &mut Owner<'_>) {
        self.done(conn, Err(LookupdError::Io(error)), owner);
    }

    /// What a query's connection has to write.
    pub(crate) fn poll_transmit(&mut self, conn: ConnId) -> Option<Bytes> {
        self.query_mut(conn).filter(|q| q.connected).and_then(|q| q.exchange.poll_transmit())
    }

    /// A connected query with something to write.
    pub(crate) fn any_transmit(&mut self) -> Option<(ConnId, Bytes)> {
        self.pending.iter_mut().filter(|q| q.connected).find_map(|q| q.exchange.poll_transmit().map(|b| (q.conn, b)))
    }

    // ---- internals ---------------------------------------------------------------------------

    /// Queries the next lookupd in turn, on a new connection.
    fn query(&mut self, kind: QueryKind, attempt: usize, owner: &mut Owner<'_>) {
        if self.stopped || self.addrs.is_empty() {
            return;
        }
        let index = self.next % self.addrs.len();
        self.next = index + 1;
        let addr = self.addrs[index].clone();
        let config = owner.config;
        let bearer = config.auth_secret.as_deref().filter(|_| config.lookupd_authorization);
        let request = match &self.endpoint {
            Endpoint::Lookup(topic) => addr.request(topic, &config.user_agent, bearer),
            Endpoint::Nodes => addr.nodes_request(&config.user_agent, bearer),
        };
        let exchange = request.and_then(|request| Exchange::new(&addr, request, &config.tls));
        let exchange = match exchange {
            Ok(exchange) => exchange,
            Err(error) => return self.failed(addr, kind, attempt, error, owner),
        };
        let conn = ConnId(*owner.next_conn);
        *owner.next_conn += 1;
        info!(lookupd = %addr, %conn, ?kind, "querying lookupd");
        owner.actions.push_back(Action::Connect {
            conn,
            addr: addr.host_port().to_owned(),
            local_addr: None,
            timeout: config.lookupd_poll_timeout,
            write_timeout: config.write_timeout,
        });
        let expires = deadline(owner.now, config.lookupd_poll_timeout);
        self.pending.push(Pending { conn, addr, kind, attempt, expires, exchange, connected: false });
    }

    /// Removes a query and closes its connection (after TLS close_notify, if any).
    fn close(&mut self, conn: ConnId, owner: &mut Owner<'_>) -> Option<Pending> {
        let pos = self.pending.iter().position(|p| p.conn == conn)?;
        let mut query = self.pending.swap_remove(pos);
        if query.connected {
            query.exchange.close();
            if let Some(last) = query.exchange.poll_transmit() {
                owner.final_writes.push((conn, last));
            }
        }
        owner.actions.push_back(Action::Close { conn });
        Some(query)
    }

    /// A query's outcome: its connection closes; the answer is recorded.
    fn done(&mut self, conn: ConnId, outcome: Result<Lookup, LookupdError>, owner: &mut Owner<'_>) {
        let Some(query) = self.close(conn, owner) else { return };
        if self.stopped {
            return;
        }
        match outcome {
            Ok(lookup) => {
                debug!(lookupd = %query.addr, nsqds = lookup.producers.len(), "lookupd answered");
                let nsqds = lookup.producers.iter().map(|p| p.tcp_address()).collect();
                self.answers.push_back(Answer::Listed { kind: query.kind, lookupd: query.addr, nsqds });
            }
            Err(error) => self.failed(query.addr, query.kind, query.attempt, error, owner),
        }
    }

    /// A query failed: recorded, and the next lookupd is tried (at most three per poll).
    fn failed(
        &mut self,
        addr: LookupdAddress,
        kind: QueryKind,
        attempt: usize,
        error: LookupdError,
        owner: &mut Owner<'_>,
    ) {
        warn!(lookupd = %addr, %error, "lookupd query failed");
        self.answers.push_back(Answer::Failed { lookupd: addr, error });
        let tries = LOOKUPD_ATTEMPTS.min(self.addrs.len());
        if attempt + 1 < tries {
            info!("trying the next lookupd");
            self.query(kind, attempt + 1, owner);
        }
    }
}
