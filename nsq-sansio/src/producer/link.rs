//! [`Link`]: a producer's line to one nsqd. Its current connection, the publishes it carries,
//! and its dial history: how soon it may be dialled again after failing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, warn};

use crate::action::ConnId;
use crate::connection::{deadline, AuthResponse, ConnectionState, Event, PublishId};
use crate::error::{CommandError, ConnectionError, PublishError, SocketError};
use crate::rng::{RetryDelay, Rng};
use crate::Config;

use super::{Health, NsqdStats, TxId};

/// Delay before an nsqd that could not be connected is dialled again; doubles per failure.
pub(crate) const REDIAL_BASE: Duration = Duration::from_millis(100);
/// The longest delay between two dials of an nsqd that keeps failing.
pub(crate) const REDIAL_CAP: Duration = Duration::from_secs(5);
/// With the flap guard on (a pool, which redials by itself), a connection that stayed up this
/// long proved the nsqd healthy: losing it afterwards does not count as a failure. One lost
/// sooner does, so an nsqd that accepts and drops connections is backed off like one that
/// refuses them.
pub(crate) const STABLE_AFTER: Duration = Duration::from_secs(10);

/// What a link reports to the producer that owns it.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// A publish resolved.
    Published { tx: TxId, result: Result<(), PublishError> },
    /// A ping's NOP was handed to the socket (`Ok`), or the connection ended first.
    Pinged { tx: TxId, conn: ConnId, result: Result<(), ConnectionError> },
    /// nsqd accepted the AUTH secret.
    Authenticated(ConnId, AuthResponse),
    /// The handshake finished.
    Connected(ConnId),
    /// A connection ended; `was_ready` says whether its handshake had finished. The owner
    /// emits `Action::Close` for it.
    Closed { conn: ConnId, error: ConnectionError, was_ready: bool, retry_at: Option<Instant> },
}

/// The transactions one publish answers: most often one, so without an allocation; several
/// for an auto-batched MPUB.
#[derive(Debug, Clone)]
pub(crate) enum Txs {
    One(TxId),
    Many(Vec<TxId>),
}

impl Txs {
    fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Many(txs) => txs.len(),
        }
    }
}

impl From<Vec<TxId>> for Txs {
    fn from(txs: Vec<TxId>) -> Self {
        match txs[..] {
            [tx] => Self::One(tx),
            _ => Self::Many(txs),
        }
    }
}

impl IntoIterator for Txs {
    type Item = TxId;
    type IntoIter = std::iter::Chain<std::option::IntoIter<TxId>, std::vec::IntoIter<TxId>>;

    fn into_iter(self) -> Self::IntoIter {
        // An empty vector does not allocate.
        let (one, many) = match self {
            Self::One(tx) => (Some(tx), Vec::new()),
            Self::Many(txs) => (None, txs),
        };
        one.into_iter().chain(many)
    }
}

/// A live connection and the transactions it carries.
#[derive(Debug)]
struct Conn {
    id: ConnId,
    state: ConnectionState,
    /// The socket is connected: bytes may be written.
    connected: bool,
    /// When the handshake finished.
    ready_at: Option<Instant>,
    /// Transactions by the connection's publish ids; a batch maps to several.
    txs: VecDeque<(PublishId, Txs)>,
    /// Pings whose NOP is queued and not yet handed to the socket.
    pings: Vec<TxId>,
    /// Pings whose NOP was handed to the socket, to report.
    pinged: Vec<TxId>,
}

/// One nsqd of a producer.
#[derive(Debug)]
pub(crate) struct Link {
    addr: String,
    conn: Option<Conn>,
    /// Dials in a row that did not reach the end of the handshake.
    failures: u32,
    /// Not dialled again before this.
    retry_at: Option<Instant>,
    /// Why the last attempt failed.
    last_error: Option<ConnectionError>,
    /// Count a connection lost within [`STABLE_AFTER`] as a failure.
    flap_guard: bool,
    /// Publishes (PUB, MPUB or DPUB commands) sent, acknowledged, failed.
    sent: u64,
    acknowledged: u64,
    failed: u64,
}

impl Link {
    /// A link that counts only failed dials and handshakes as failures: the owner dials only
    /// when asked to.
    pub(crate) fn new(addr: String) -> Self {
        Self {
            addr,
            conn: None,
            failures: 0,
            retry_at: None,
            last_error: None,
            flap_guard: false,
            sent: 0,
            acknowledged: 0,
            failed: 0,
        }
    }

    /// A link that also counts connections lost soon after they were made: for an owner that
    /// redials by itself.
    pub(crate) fn with_flap_guard(addr: String) -> Self {
        Self { flap_guard: true, ..Self::new(addr) }
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// The current connection, if any.
    pub(crate) fn conn_id(&self) -> Option<ConnId> {
        self.conn.as_ref().map(|c| c.id)
    }

    /// Whether the handshake of the current connection finished.
    pub(crate) fn is_ready(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.ready_at.is_some() && c.state.is_ready())
    }

    /// Whether a connection exists (dialling, handshaking or ready).
    pub(crate) fn has_conn(&self) -> bool {
        self.conn.is_some()
    }

    /// Until when the link waits before the next dial, after failures.
    pub(crate) fn held_until(&self, now: Instant) -> Option<Instant> {
        self.retry_at.filter(|&at| at > now)
    }

    /// Why the last attempt failed.
    pub(crate) fn last_error(&self) -> Option<&ConnectionError> {
        self.last_error.as_ref()
    }

    /// Publishes carried by the current connection and not yet resolved.
    pub(crate) fn outstanding(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.txs.iter().map(|(_, t)| t.len()).sum())
    }

    /// Starts a connection as `id`; the owner emits `Action::Connect`.
    pub(crate) fn open(&mut self, id: ConnId, config: &Arc<Config>, now: Instant) {
        let host = crate::consumer::host_of(&self.addr);
        let state = ConnectionState::new(config.clone(), host, now);
        info!(conn = %id, addr = %self.addr, "connecting to nsqd");
        self.conn = Some(Conn {
            id,
            state,
            connected: false,
            ready_at: None,
            txs: VecDeque::new(),
            pings: Vec::new(),
            pinged: Vec::new(),
        });
    }

    /// The current connection's state, to queue publishes on.
    pub(crate) fn state(&mut self) -> Option<&mut ConnectionState> {
        self.conn.as_mut().map(|c| &mut c.state)
    }

    /// Records that `txs` wait for the answer to publish `id` of the current connection.
    pub(crate) fn track(&mut self, id: PublishId, txs: Txs) {
        if let Some(conn) = &mut self.conn {
            self.sent += 1;
            conn.txs.push_back((id, txs));
        }
    }

    /// Health and counters; `started` says whether the owner has begun dialling.
    pub(crate) fn stats(&self, now: Instant, started: bool) -> NsqdStats {
        NsqdStats {
            addr: self.addr.clone(),
            health: self.health(now, started),
            sent: self.sent,
            acknowledged: self.acknowledged,
            failed: self.failed,
            retried_elsewhere: 0,
        }
    }

    /// The link's health now; `started` says whether its owner has begun dialling.
    pub(crate) fn health(&self, now: Instant, started: bool) -> Health {
        if self.is_ready() {
            Health::Connected
        } else if self.has_conn() {
            Health::Connecting
        } else if let (Some(retry_at), Some(error)) = (self.held_until(now), &self.last_error) {
            Health::Down { error: error.clone(), retry_at }
        } else if started {
            Health::Connecting
        } else {
            Health::Idle
        }
    }

    /// Queues a NOP for ping `tx` on the current connection.
    pub(crate) fn ping(&mut self, tx: TxId) -> Result<(), CommandError> {
        let conn = self.conn.as_mut().ok_or(CommandError::Closed)?;
        conn.state.nop()?;
        conn.pings.push(tx);
        Ok(())
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conn.as_mut().filter(|c| c.id == id)
    }

    pub(crate) fn handle_connected(&mut self, id: ConnId) {
        if let Some(conn) = self.conn_mut(id) {
            conn.connected = true;
        }
    }

    pub(crate) fn handle_connect_failed(&mut self, id: ConnId, error: SocketError, now: Instant) {
        let addr = self.addr.clone();
        if let Some(conn) = self.conn_mut(id) {
            conn.state.fail_with(now, ConnectionError::Dial { addr, error });
        }
    }

    pub(crate) fn handle_input(&mut self, id: ConnId, now: Instant, data: BytesMut) {
        if let Some(conn) = self.conn_mut(id) {
            conn.state.handle_input(now, data);
        }
    }

    pub(crate) fn handle_eof(&mut self, id: ConnId, now: Instant) {
        if let Some(conn) = self.conn_mut(id) {
            conn.state.handle_eof(now);
        }
    }

    pub(crate) fn handle_io_error(&mut self, id: ConnId, error: SocketError, now: Instant) {
        if let Some(conn) = self.conn_mut(id) {
            conn.state.handle_io_error(now, error);
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if let Some(conn) = &mut self.conn {
            if conn.state.poll_timeout().is_some_and(|at| at <= now) {
                conn.state.handle_timeout(now);
            }
        }
    }

    /// Starts a graceful close of the current connection.
    pub(crate) fn close(&mut self, now: Instant) {
        if let Some(conn) = &mut self.conn {
            conn.state.close(now);
        }
    }

    /// What the current connection has to write, once its socket is connected.
    pub(crate) fn poll_transmit(&mut self, id: ConnId) -> Option<Bytes> {
        let conn = self.conn.as_mut().filter(|c| c.id == id && c.connected)?;
        let bytes = conn.state.poll_transmit()?;
        if conn.state.is_ready() {
            // Once the handshake is done every queued command is in what poll_transmit
            // returns: the pings' NOPs are on their way to the socket.
            conn.pinged.append(&mut conn.pings);
        }
        Some(bytes)
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.conn.as_ref().and_then(|c| c.state.poll_timeout())
    }

    /// Maps the connection's events into `out`. When the connection ended, its last bytes go
    /// to `final_writes` and the dial history is updated with a jittered delay from `rng`.
    pub(crate) fn process(
        &mut self,
        now: Instant,
        rng: &mut Rng,
        out: &mut VecDeque<LinkEvent>,
        final_writes: &mut Vec<(ConnId, Bytes)>,
    ) {
        let Some(conn) = &mut self.conn else { return };
        for tx in conn.pinged.drain(..) {
            out.push_back(LinkEvent::Pinged { tx, conn: conn.id, result: Ok(()) });
        }
        while let Some(event) = conn.state.poll_event() {
            match event {
                Event::Authenticated(auth) => out.push_back(LinkEvent::Authenticated(conn.id, auth)),
                Event::Ready(_) => {
                    conn.ready_at = Some(now);
                    self.retry_at = None;
                    self.last_error = None;
                    info!(conn = %conn.id, addr = %self.addr, "connected to nsqd");
                    out.push_back(LinkEvent::Connected(conn.id));
                }
                Event::Published { id, result } => {
                    let Some(pos) = conn.txs.iter().position(|(p, _)| *p == id) else {
                        continue;
                    };
                    if let Some((_, txs)) = conn.txs.remove(pos) {
                        if result.is_ok() {
                            self.acknowledged += 1;
                        } else {
                            self.failed += 1;
                        }
                        for tx in txs {
                            out.push_back(LinkEvent::Published { tx, result: result.clone() });
                        }
                    }
                }
                Event::Closed(error) => {
                    // The connection resolves every publish it took before this event; anything
                    // left would be a bug, and still must not hang.
                    for (_, txs) in conn.txs.drain(..) {
                        self.failed += 1;
                        for tx in txs {
                            let result = Err(PublishError::ConnectionLost(error.clone()));
                            out.push_back(LinkEvent::Published { tx, result });
                        }
                    }
                    for tx in conn.pings.drain(..) {
                        out.push_back(LinkEvent::Pinged { tx, conn: conn.id, result: Err(error.clone()) });
                    }
                    if conn.connected && error.is_local_close() {
                        // What the connection queued last (a final PUB's bytes) goes out before
                        // the socket closes.
                        let mut last = BytesMut::new();
                        while let Some(bytes) = conn.state.poll_transmit() {
                            last.extend_from_slice(&bytes);
                        }
                        if !last.is_empty() {
                            final_writes.push((conn.id, last.freeze()));
                        }
                    }
                    let (id, was_ready) = (conn.id, conn.ready_at.is_some());
                    let stable = conn.ready_at.is_some_and(|at| now.saturating_duration_since(at) >= STABLE_AFTER);
                    // nsqd closes the connection after refusing a publish: that says nothing
                    // about the nsqd's health.
                    let healthy = (was_ready && !self.flap_guard) || stable || (was_ready && refused_publish(&error));
                    let retry_at = if healthy || error.is_local_close() {
                        debug!(conn = %id, addr = %self.addr, %error, "connection to nsqd closed");
                        self.failures = 0;
                        None
                    } else {
                        self.failures = self.failures.saturating_add(1);
                        let policy = RetryDelay { base: REDIAL_BASE, cap: REDIAL_CAP };
                        let retry_in = policy.delay(self.failures, rng);
                        let at = deadline(now, retry_in);
                        if was_ready {
                            let what = "connection to nsqd lost soon after it was made";
                            warn!(conn = %id, addr = %self.addr, %error, ?retry_in, "{what}");
                        } else {
                            warn!(conn = %id, addr = %self.addr, %error, ?retry_in, "could not connect to nsqd");
                        }
                        self.retry_at = Some(at);
                        Some(at)
                    };
                    self.last_error = Some(error.clone());
                    self.conn = None;
                    out.push_back(LinkEvent::Closed { conn: id, error, was_ready, retry_at });
                    return;
                }
                Event::Subscribed
                | Event::Message(_)
                | Event::MessageTimedOut(_)
                | Event::ServerError(_)
                | Event::CloseWait => {}
            }
        }
    }
}

/// Whether nsqd closed the connection because it refused a publish (the command's fault, not
/// the connection's).
fn refused_publish(error: &ConnectionError) -> bool {
    use crate::ErrorCode::*;
    matches!(
        error,
        ConnectionError::Server(e)
            if matches!(e.code, Invalid | BadTopic | BadMessage | BadBody | PubFailed | MpubFailed | DpubFailed | Unauthorized)
    )
}
