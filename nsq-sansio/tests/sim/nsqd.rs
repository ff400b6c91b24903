//! `NsqdModel`: one nsqd 1.3.0 as a sans-IO state machine, built to nsqd's code
//! (`nsqd/tcp.go`, `protocol_v2.go`, `client_v2.go`, `channel.go`, `topic.go`, `options.go`)
//! and to the captures in `tests/fixtures/nsqd-1.3.0`.
//!
//! Modelled: the magic, every V2 command with nsqd's checks, error texts and fatality, IDENTIFY
//! negotiation (heartbeat, output buffering, msg_timeout; no TLS, snappy or deflate, as an
//! nsqd run with `--snappy=false --deflate=false` and no certificate), AUTH against one
//! accepted secret, topics fanning out to channels (a topic without channels keeps its
//! messages), RDY as a window over in-flight messages, in-flight timeouts and deferred
//! messages processed at the queue-scan interval, the output buffer (messages wait for the
//! flusher tick unless the client's RDY is used up; any other frame flushes), heartbeats on a
//! ticker, the read deadline of twice the heartbeat interval, and `kill -9`: connections vanish,
//! in-flight and deferred messages (held in memory) are lost, queued ones (on disk) are kept.
//!
//! Faults the harness injects: a fatal error instead of a handshake answer, and stalled
//! connections (nothing sent, heartbeats included; commands are still read).
//!
//! Two nsqd behaviours the simulation spec did not expect, kept as nsqd has them: a client that
//! disconnects does not get its in-flight messages requeued at once (they wait for their
//! timeout, `RemoveClient` only forgets the client), and deferred messages do not survive
//! `kill -9` (the deferred queue lives in memory).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::rng::SimRng;
use super::wire::{self, Line, FRAME_ERROR, FRAME_RESPONSE, MAGIC_V2};

/// One accepted client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerConn(pub u64);

/// nsqd's flags that matter here, with nsqd's defaults (`NewOptions`).
#[derive(Debug, Clone)]
pub struct NsqdOptions {
    /// `--msg-timeout`.
    pub msg_timeout: Duration,
    /// `--max-msg-timeout`.
    pub max_msg_timeout: Duration,
    /// `--max-msg-size`.
    pub max_msg_size: usize,
    /// `--max-body-size`.
    pub max_body_size: usize,
    /// `--max-rdy-count`.
    pub max_rdy_count: u64,
    /// `--max-req-timeout`.
    pub max_req_timeout: Duration,
    /// `--client-timeout`: the default heartbeat interval is half of it.
    pub client_timeout: Duration,
    /// `--max-heartbeat-interval`.
    pub max_heartbeat_interval: Duration,
    /// `--output-buffer-timeout`, and its allowed range.
    pub output_buffer_timeout: Duration,
    pub min_output_buffer_timeout: Duration,
    pub max_output_buffer_timeout: Duration,
    /// `--max-output-buffer-size`.
    pub max_output_buffer_size: usize,
    /// `--queue-scan-interval`: how often in-flight timeouts and deferred messages are checked.
    pub queue_scan_interval: Duration,
    /// `--snappy` and `--deflate`. The model does not speak either: a client that negotiates
    /// one is a mistake of the simulation's setup, which turns both off.
    pub snappy: bool,
    pub deflate: bool,
    /// `--auth-http-address` set, and what the auth server says.
    pub auth: Option<AuthOptions>,
    /// This node's index: message ids are unique per node.
    pub node: u64,
    /// For the choice among a channel's ready clients (Go's channel receive is a race).
    pub seed: u64,
}

impl Default for NsqdOptions {
    fn default() -> Self {
        Self {
            msg_timeout: Duration::from_secs(60),
            max_msg_timeout: Duration::from_secs(15 * 60),
            max_msg_size: 1024 * 1024,
            max_body_size: 5 * 1024 * 1024,
            max_rdy_count: 2500,
            max_req_timeout: Duration::from_secs(3600),
            client_timeout: Duration::from_secs(60),
            max_heartbeat_interval: Duration::from_secs(60),
            output_buffer_timeout: Duration::from_millis(250),
            min_output_buffer_timeout: Duration::from_millis(25),
            max_output_buffer_timeout: Duration::from_secs(30),
            max_output_buffer_size: 64 * 1024,
            queue_scan_interval: Duration::from_millis(100),
            snappy: true,
            deflate: true,
            auth: None,
            node: 0,
            seed: 0,
        }
    }
}

/// The auth server behind nsqd: one secret with every permission.
#[derive(Debug, Clone)]
pub struct AuthOptions {
    pub secret: String,
    pub identity: String,
    pub identity_url: String,
}

/// A fatal error nsqd answers instead of a handshake step, chosen by the harness per accepted
/// connection. Each is a path nsqd really takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFault {
    /// IDENTIFY refused (`E_BAD_BODY IDENTIFY ...`, `E_IDENTIFY_FAILED ...`).
    Identify { code: &'static str, text: String },
    /// AUTH refused: the auth server could not be reached (`E_AUTH_FAILED AUTH failed`).
    Auth,
    /// SUB refused while the topic or channel is being deleted (`E_SUB_FAILED`).
    Sub,
    /// The first publish refused while the topic is exiting (`E_PUB_FAILED` and friends).
    Publish,
}

/// A topic or channel nsqd created: nsqd registers it with every lookupd.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Registration {
    pub topic: String,
    pub channel: Option<String>,
}

/// An error frame nsqd sent, for the harness to judge.
#[derive(Debug, Clone)]
pub struct SentError {
    pub conn: ServerConn,
    pub text: String,
    pub fatal: bool,
    /// Caused by a fault the harness injected.
    pub injected: bool,
}

#[derive(Debug, Clone)]
struct Msg {
    id: [u8; 16],
    body: Rc<[u8]>,
    timestamp: i64,
    attempts: u16,
}

#[derive(Debug)]
struct InFlight {
    msg: Msg,
    client: u64,
    deadline: Instant,
    delivered_at: Instant,
}

#[derive(Debug, Default)]
struct Channel {
    queue: VecDeque<Msg>,
    in_flight: BTreeMap<[u8; 16], InFlight>,
    /// In-flight deadlines, for the queue scan.
    timeouts: BTreeSet<(Instant, [u8; 16])>,
    deferred: BTreeMap<(Instant, u64), Msg>,
    clients: Vec<u64>,
}

#[derive(Debug, Default)]
struct Topic {
    channels: BTreeMap<String, Channel>,
    /// Messages put while the topic had no channel, with their DPUB deferral.
    pending: VecDeque<(Msg, Duration)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Init,
    Subscribed,
    Closing,
}

#[derive(Debug)]
struct Conn {
    rx: Vec<u8>,
    /// The magic was read; the IOLoop and the message pump run.
    started: bool,
    state: State,
    /// Zero: heartbeats disabled (IDENTIFY `heartbeat_interval: -1`).
    heartbeat: Duration,
    msg_timeout: Duration,
    output_buffer_size: usize,
    output_buffer_timeout: Duration,
    sample_rate: i64,
    /// The first IDENTIFY reconfigured the message pump (nsqd does it once).
    pump_identified: bool,
    authed: bool,
    sub: Option<(String, String)>,
    rdy: u64,
    in_flight: u64,
    max_rdy_granted: u64,
    /// Flushed to the socket, for `poll_transmit`.
    out: Vec<u8>,
    /// In the `bufio.Writer`, waiting for a flush.
    buffered: Vec<u8>,
    heartbeat_next: Option<Instant>,
    flusher_base: Instant,
    flusher_period: Option<Duration>,
    flush_at: Option<Instant>,
    read_deadline: Option<Instant>,
    stalled: bool,
    fault: Option<HandshakeFault>,
    /// nsqd closed it (fatal error, read timeout); waiting for `poll_closed`.
    closing: bool,
}

/// RDY and in-flight counts of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub rdy: u64,
    pub in_flight: u64,
    pub max_rdy_granted: u64,
}

/// Counters for a run's summary.
#[derive(Debug, Clone, Copy, Default)]
pub struct NsqdStats {
    pub accepted: u64,
    pub published: u64,
    pub delivered: u64,
    pub finished: u64,
    pub requeued: u64,
    pub timed_out: u64,
    pub heartbeats: u64,
}

/// One modelled nsqd. See the module docs.
#[derive(Debug)]
pub struct NsqdModel {
    opts: NsqdOptions,
    rng: SimRng,
    start: Instant,
    /// When the queue-scan loop started (at start, and again at each restart).
    scan_base: Instant,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    topics: BTreeMap<String, Topic>,
    next_id: u64,
    next_deferred: u64,
    closed: VecDeque<ServerConn>,
    /// Connections with bytes to transmit.
    dirty: BTreeSet<u64>,
    registrations: VecDeque<Registration>,
    errors: VecDeque<SentError>,
    stalled_all: bool,
    stats: NsqdStats,
}

impl NsqdModel {
    pub fn new(opts: NsqdOptions, now: Instant) -> Self {
        let rng = SimRng::new(opts.seed);
        let next_id = (opts.node + 1) << 40;
        Self {
            opts,
            rng,
            start: now,
            scan_base: now,
            conns: BTreeMap::new(),
            next_conn: 0,
            topics: BTreeMap::new(),
            next_id,
            next_deferred: 0,
            closed: VecDeque::new(),
            dirty: BTreeSet::new(),
            registrations: VecDeque::new(),
            errors: VecDeque::new(),
            stalled_all: false,
            stats: NsqdStats::default(),
        }
    }

    /// A client socket was accepted.
    pub fn accept(&mut self, now: Instant) -> ServerConn {
        self.accept_with(None, now)
    }

    /// A client socket was accepted; its handshake will meet `fault`.
    pub fn accept_with(&mut self, fault: Option<HandshakeFault>, now: Instant) -> ServerConn {
        let id = self.next_conn;
        self.next_conn += 1;
        self.stats.accepted += 1;
        let conn = Conn {
            rx: Vec::new(),
            started: false,
            state: State::Init,
            heartbeat: self.opts.client_timeout / 2,
            msg_timeout: self.opts.msg_timeout,
            output_buffer_size: DEFAULT_BUFFER_SIZE,
            output_buffer_timeout: self.opts.output_buffer_timeout,
            sample_rate: 0,
            pump_identified: false,
            authed: false,
            sub: None,
            rdy: 0,
            in_flight: 0,
            max_rdy_granted: 0,
            out: Vec::new(),
            buffered: Vec::new(),
            heartbeat_next: None,
            flusher_base: now,
            flusher_period: None,
            flush_at: None,
            // tcp.go reads the magic with no deadline.
            read_deadline: None,
            stalled: self.stalled_all,
            fault,
            closing: false,
        };
        self.conns.insert(id, conn);
        ServerConn(id)
    }

    /// Bytes from the client, in any chunking.
    pub fn recv(&mut self, conn: ServerConn, bytes: &[u8], now: Instant) {
        let Some(c) = self.conns.get_mut(&conn.0) else { return };
        if c.closing {
            return;
        }
        c.rx.extend_from_slice(bytes);
        self.process(conn.0, now);
        self.pump(now);
    }

    /// The client closed or reset its socket: the IOLoop ends and the channel forgets the
    /// client. Its in-flight messages stay in flight until they time out (`RemoveClient`).
    pub fn client_closed(&mut self, conn: ServerConn, _now: Instant) {
        self.remove_conn(conn.0);
    }

    /// Everything pending for `conn`'s socket.
    pub fn poll_transmit(&mut self, conn: ServerConn) -> Option<Vec<u8>> {
        let c = self.conns.get_mut(&conn.0)?;
        if c.stalled || c.out.is_empty() {
            return None;
        }
        self.dirty.remove(&conn.0);
        Some(std::mem::take(&mut c.out))
    }

    /// Some connection with bytes to transmit, and the bytes.
    pub fn poll_transmit_any(&mut self) -> Option<(ServerConn, Vec<u8>)> {
        while let Some(id) = self.dirty.pop_first() {
            if let Some(bytes) = self.poll_transmit(ServerConn(id)) {
                return Some((ServerConn(id), bytes));
            }
        }
        None
    }

    /// A connection nsqd closed (after a fatal error, a read timeout); call it after
    /// `poll_transmit` so its last bytes go first.
    pub fn poll_closed(&mut self) -> Option<ServerConn> {
        let conn = self.closed.pop_front()?;
        self.remove_conn(conn.0);
        Some(conn)
    }

    /// A topic or channel created since the last call.
    pub fn poll_registration(&mut self) -> Option<Registration> {
        self.registrations.pop_front()
    }

    /// An error frame sent since the last call.
    pub fn poll_error(&mut self) -> Option<SentError> {
        self.errors.pop_front()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.scan_queues(now);
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else { continue };
            if c.closing {
                continue;
            }
            if c.read_deadline.is_some_and(|d| d <= now) {
                // The IOLoop's read fails with a timeout: nsqd closes without an error frame
                // and what its writer still buffers is lost.
                c.buffered.clear();
                self.close_conn(id);
                continue;
            }
            if c.stalled {
                continue;
            }
            if let Some(at) = c.heartbeat_next.filter(|&at| at <= now) {
                // A ticker drops the ticks it could not deliver.
                let mut next = at;
                while next <= now {
                    next += c.heartbeat;
                }
                c.heartbeat_next = Some(next);
                self.stats.heartbeats += 1;
                self.send(id, FRAME_RESPONSE, b"_heartbeat_");
            } else if c.flush_at.is_some_and(|at| at <= now) {
                Self::flush(c);
                self.dirty.insert(id);
            }
        }
        self.pump(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        };
        for c in self.conns.values().filter(|c| !c.closing) {
            consider(c.read_deadline);
            if !c.stalled {
                consider(c.heartbeat_next);
                consider(c.flush_at);
            }
        }
        for topic in self.topics.values() {
            for ch in topic.channels.values() {
                consider(ch.timeouts.first().map(|&(at, _)| self.scan_tick(at)));
                consider(ch.deferred.keys().next().map(|&(at, _)| self.scan_tick(at)));
            }
        }
        next
    }

    /// `kill -9`: every connection vanishes; in-flight and deferred messages are lost (nsqd
    /// holds them in memory), queued ones are kept (on disk). Returns the lost bodies.
    pub fn crash(&mut self) -> Vec<Rc<[u8]>> {
        let mut lost = Vec::new();
        for topic in self.topics.values_mut() {
            for ch in topic.channels.values_mut() {
                lost.extend(std::mem::take(&mut ch.in_flight).into_values().map(|f| f.msg.body));
                lost.extend(std::mem::take(&mut ch.deferred).into_values().map(|m| m.body));
                ch.timeouts.clear();
                ch.clients.clear();
            }
        }
        self.conns.clear();
        self.closed.clear();
        self.dirty.clear();
        self.errors.clear();
        self.stalled_all = false;
        lost
    }

    /// Starts again after a crash, with the topics, channels and queued messages it kept.
    pub fn restart(&mut self, now: Instant) {
        self.scan_base = now;
    }

    /// Stops (or resumes) all output on `conn`: no frames, heartbeats or messages leave.
    pub fn set_stalled(&mut self, conn: ServerConn, stalled: bool, now: Instant) {
        if let Some(c) = self.conns.get_mut(&conn.0) {
            c.stalled = stalled;
            if !stalled {
                if !c.out.is_empty() {
                    self.dirty.insert(conn.0);
                }
                self.pump(now);
            }
        }
    }

    /// Stalls every connection, present and future, until called with `false`.
    pub fn set_stalled_all(&mut self, stalled: bool, now: Instant) {
        self.stalled_all = stalled;
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.set_stalled(ServerConn(id), stalled, now);
        }
    }

    // ---- observation ------------------------------------------------------------------------

    /// Whether a message with this body is queued, deferred or in flight in any channel (or
    /// waiting in a topic without channels).
    pub fn holds(&self, body: &[u8]) -> bool {
        self.topics.values().any(|t| {
            t.pending.iter().any(|(m, _)| &*m.body == body)
                || t.channels.values().any(|ch| {
                    ch.queue.iter().any(|m| &*m.body == body)
                        || ch.in_flight.values().any(|f| &*f.msg.body == body)
                        || ch.deferred.values().any(|m| &*m.body == body)
                })
        })
    }

    /// The RDY nsqd holds for `conn`, its messages in flight, and the largest RDY the client
    /// ever granted on it.
    pub fn flow(&self, conn: ServerConn) -> Option<Flow> {
        self.conns.get(&conn.0).map(|c| Flow { rdy: c.rdy, in_flight: c.in_flight, max_rdy_granted: c.max_rdy_granted })
    }

    /// Every topic and channel, for re-registering with lookupd after a restart.
    pub fn registrations(&self) -> Vec<Registration> {
        let mut regs = Vec::new();
        for (name, topic) in &self.topics {
            regs.push(Registration { topic: name.clone(), channel: None });
            for ch in topic.channels.keys() {
                regs.push(Registration { topic: name.clone(), channel: Some(ch.clone()) });
            }
        }
        regs
    }

    pub fn stats(&self) -> NsqdStats {
        self.stats
    }

    // ---- the IOLoop -------------------------------------------------------------------------

    fn process(&mut self, id: u64, now: Instant) {
        loop {
            let Some(c) = self.conns.get_mut(&id) else { return };
            if c.closing {
                return;
            }
            if !c.started {
                if c.rx.len() < 4 {
                    return;
                }
                if c.rx[..4] != MAGIC_V2[..] {
                    // tcp.go: the error frame, then close.
                    self.fail(id, "E_BAD_PROTOCOL".to_owned(), false);
                    return;
                }
                c.rx.drain(..4);
                c.started = true;
                c.heartbeat_next = Some(now + c.heartbeat);
                c.flusher_base = now;
                c.flusher_period = Some(c.output_buffer_timeout).filter(|d| !d.is_zero());
                c.read_deadline = read_deadline(c.heartbeat, now);
                continue;
            }
            let rx = std::mem::take(&mut c.rx);
            let step = match wire::read_line(&rx) {
                // bufio.ErrBufferFull: the IOLoop exits without an error frame.
                Line::TooLong => Step::Closed,
                Line::Partial => Step::NeedMore,
                Line::Complete(params, used) => match self.exec(id, &params, &rx[used..], now) {
                    Step::Done(n) => Step::Done(used + n),
                    other => other,
                },
            };
            let Some(c) = self.conns.get_mut(&id) else { return };
            c.rx = rx;
            match step {
                Step::NeedMore | Step::Fatal => return,
                Step::Closed => return self.close_conn(id),
                Step::Done(used) => {
                    c.rx.drain(..used);
                    c.read_deadline = read_deadline(c.heartbeat, now);
                }
            }
        }
    }

    /// One command. `rest` is what follows its line.
    fn exec(&mut self, id: u64, params: &[&[u8]], rest: &[u8], now: Instant) -> Step {
        let result = match params[0] {
            b"IDENTIFY" => self.identify(id, params, rest, now),
            b"FIN" => self.fin(id, params),
            b"RDY" => self.rdy(id, params),
            b"REQ" => self.req(id, params, now),
            b"PUB" => self.publish(id, params, rest, now, false),
            b"MPUB" => self.mpub(id, params, rest, now),
            b"DPUB" => self.publish(id, params, rest, now, true),
            b"NOP" => Ok(Reply::Used(0, None)),
            b"TOUCH" => self.touch(id, params, now),
            b"SUB" => self.sub(id, params, now),
            b"CLS" => self.cls(id),
            b"AUTH" => self.auth(id, params, rest),
            other => Err(Error::fatal("E_INVALID", format!("invalid command {}", String::from_utf8_lossy(other)))),
        };
        match result {
            Ok(Reply::NeedMore) => Step::NeedMore,
            Ok(Reply::Used(n, response)) => {
                if let Some(response) = response {
                    self.send(id, FRAME_RESPONSE, &response);
                }
                Step::Done(n)
            }
            Err(e) => {
                let injected = e.injected;
                let text = format!("{} {}", e.code, e.text);
                if e.fatal {
                    self.fail(id, text, injected);
                    Step::Fatal
                } else {
                    self.errors.push_back(SentError {
                        conn: ServerConn(id),
                        text: text.clone(),
                        fatal: false,
                        injected,
                    });
                    self.send(id, FRAME_ERROR, text.as_bytes());
                    Step::Done(0)
                }
            }
        }
    }

    fn identify(&mut self, id: u64, _params: &[&[u8]], rest: &[u8], now: Instant) -> Result<Reply, Error> {
        let max_body = self.opts.max_body_size;
        let c = self.conn(id);
        if c.state != State::Init {
            return Err(Error::fatal("E_INVALID", "cannot IDENTIFY in current state"));
        }
        let Some(len) = wire::read_len(rest) else { return Ok(Reply::NeedMore) };
        if len as i64 > max_body as i64 {
            return Err(Error::fatal("E_BAD_BODY", format!("IDENTIFY body too big {len} > {max_body}")));
        }
        if len <= 0 {
            return Err(Error::fatal("E_BAD_BODY", format!("IDENTIFY invalid body size {len}")));
        }
        let Some(body) = rest.get(4..4 + len as usize) else { return Ok(Reply::NeedMore) };
        if let Some(HandshakeFault::Identify { code, text }) = &c.fault {
            return Err(Error::injected(code, text.clone()));
        }
        let data: IdentifyData = serde_json::from_slice(body)
            .map_err(|_| Error::fatal("E_BAD_BODY", "IDENTIFY failed to decode JSON body"))?;
        let settings =
            self.identify_settings(c, &data).map_err(|e| Error::fatal("E_BAD_BODY", format!("IDENTIFY {e}")))?;
        let (max_rdy, max_msg_timeout, auth) =
            (self.opts.max_rdy_count, self.opts.max_msg_timeout.as_millis(), self.opts.auth.is_some());
        let (snappy, deflate) = (self.opts.snappy && data.snappy, self.opts.deflate && data.deflate);
        let c = self.conn_mut(id);
        c.heartbeat = settings.heartbeat;
        c.output_buffer_size = settings.output_buffer_size;
        c.output_buffer_timeout = settings.output_buffer_timeout;
        c.sample_rate = settings.sample_rate;
        c.msg_timeout = settings.msg_timeout;
        if !c.pump_identified {
            // The message pump takes the new tickers once.
            c.pump_identified = true;
            c.heartbeat_next = Some(now + c.heartbeat).filter(|_| !c.heartbeat.is_zero());
            c.flusher_base = now;
            c.flusher_period = Some(c.output_buffer_timeout).filter(|d| !d.is_zero());
        }
        let used = 4 + len as usize;
        if !data.feature_negotiation {
            return Ok(Reply::Used(used, Some(b"OK".to_vec())));
        }
        if snappy && deflate {
            return Err(Error::fatal("E_IDENTIFY_FAILED", "cannot enable both deflate and snappy compression"));
        }
        assert!(!snappy && !deflate, "the nsqd model does not speak snappy or deflate");
        // No TLS certificate: nothing is upgraded.
        let response = format!(
            concat!(
                r#"{{"max_rdy_count":{},"version":"1.3.0","max_msg_timeout":{},"msg_timeout":{},"tls_v1":false,"#,
                r#""deflate":false,"deflate_level":6,"max_deflate_level":6,"snappy":false,"sample_rate":{},"#,
                r#""auth_required":{},"output_buffer_size":{},"output_buffer_timeout":{},"#,
                r#""topology_region":"","topology_zone":""}}"#
            ),
            max_rdy,
            max_msg_timeout,
            c.msg_timeout.as_millis(),
            c.sample_rate,
            auth,
            c.output_buffer_size,
            c.output_buffer_timeout.as_millis(),
        );
        Ok(Reply::Used(used, Some(response.into_bytes())))
    }

    /// `clientV2.Identify`: the checks in nsqd's order, with its messages.
    fn identify_settings(&self, c: &Conn, data: &IdentifyData) -> Result<Settings, String> {
        let o = &self.opts;
        let mut s = Settings {
            heartbeat: c.heartbeat,
            output_buffer_size: c.output_buffer_size,
            output_buffer_timeout: c.output_buffer_timeout,
            sample_rate: c.sample_rate,
            msg_timeout: c.msg_timeout,
        };
        match data.heartbeat_interval {
            -1 => s.heartbeat = Duration::ZERO,
            0 => {}
            ms if ms >= 1000 && ms <= o.max_heartbeat_interval.as_millis() as i64 => {
                s.heartbeat = Duration::from_millis(ms as u64)
            }
            ms => return Err(format!("heartbeat interval ({ms}) is invalid")),
        }
        match data.output_buffer_timeout {
            -1 => s.output_buffer_timeout = Duration::ZERO,
            0 => {}
            ms if ms >= o.min_output_buffer_timeout.as_millis() as i64
                && ms <= o.max_output_buffer_timeout.as_millis() as i64 =>
            {
                s.output_buffer_timeout = Duration::from_millis(ms as u64)
            }
            ms => return Err(format!("output buffer timeout ({ms}) is invalid")),
        }
        match data.output_buffer_size {
            -1 => {
                s.output_buffer_size = 1;
                s.output_buffer_timeout = Duration::ZERO;
            }
            0 => {}
            n if n >= 64 && n <= o.max_output_buffer_size as i64 => s.output_buffer_size = n as usize,
            n => return Err(format!("output buffer size ({n}) is invalid")),
        }
        if !(0..=99).contains(&data.sample_rate) {
            return Err(format!("sample rate ({}) is invalid", data.sample_rate));
        }
        s.sample_rate = data.sample_rate;
        match data.msg_timeout {
            0 => {}
            ms if ms >= 1000 && ms <= o.max_msg_timeout.as_millis() as i64 => {
                s.msg_timeout = Duration::from_millis(ms as u64)
            }
            ms => return Err(format!("msg timeout ({ms}) is invalid")),
        }
        Ok(s)
    }

    fn auth(&mut self, id: u64, params: &[&[u8]], rest: &[u8]) -> Result<Reply, Error> {
        let max_body = self.opts.max_body_size;
        let c = self.conn(id);
        if c.state != State::Init {
            return Err(Error::fatal("E_INVALID", "cannot AUTH in current state"));
        }
        if params.len() != 1 {
            return Err(Error::fatal("E_INVALID", "AUTH invalid number of parameters"));
        }
        let Some(len) = wire::read_len(rest) else { return Ok(Reply::NeedMore) };
        if len as i64 > max_body as i64 {
            return Err(Error::fatal("E_BAD_BODY", format!("AUTH body too big {len} > {max_body}")));
        }
        if len <= 0 {
            return Err(Error::fatal("E_BAD_BODY", format!("AUTH invalid body size {len}")));
        }
        let Some(secret) = rest.get(4..4 + len as usize) else { return Ok(Reply::NeedMore) };
        if c.authed {
            return Err(Error::fatal("E_INVALID", "AUTH already set"));
        }
        let Some(auth) = &self.opts.auth else {
            return Err(Error::fatal("E_AUTH_DISABLED", "AUTH disabled"));
        };
        if c.fault == Some(HandshakeFault::Auth) {
            return Err(Error::injected("E_AUTH_FAILED", "AUTH failed"));
        }
        if secret != auth.secret.as_bytes() {
            return Err(Error::fatal("E_AUTH_FAILED", "AUTH failed"));
        }
        let response = format!(
            r#"{{"identity":{},"identity_url":{},"permission_count":1}}"#,
            serde_json::Value::from(auth.identity.as_str()),
            serde_json::Value::from(auth.identity_url.as_str())
        );
        self.conn_mut(id).authed = true;
        Ok(Reply::Used(4 + len as usize, Some(response.into_bytes())))
    }

    /// `CheckAuth`: with an auth server, nothing but IDENTIFY and AUTH before AUTH.
    fn check_auth(&self, c: &Conn, cmd: &str) -> Result<(), Error> {
        if self.opts.auth.is_some() && !c.authed {
            return Err(Error::fatal("E_AUTH_FIRST", format!("AUTH required before {cmd}")));
        }
        Ok(())
    }

    fn sub(&mut self, id: u64, params: &[&[u8]], now: Instant) -> Result<Reply, Error> {
        let c = self.conn(id);
        if c.state != State::Init {
            return Err(Error::fatal("E_INVALID", "cannot SUB in current state"));
        }
        if c.heartbeat.is_zero() {
            return Err(Error::fatal("E_INVALID", "cannot SUB with heartbeats disabled"));
        }
        if params.len() < 3 {
            return Err(Error::fatal("E_INVALID", "SUB insufficient number of parameters"));
        }
        if !wire::valid_name(params[1]) {
            return Err(Error::fatal(
                "E_BAD_TOPIC",
                format!("SUB topic name {} is not valid", wire::go_quote(params[1])),
            ));
        }
        if !wire::valid_name(params[2]) {
            return Err(Error::fatal(
                "E_BAD_CHANNEL",
                format!("SUB channel name {} is not valid", wire::go_quote(params[2])),
            ));
        }
        self.check_auth(c, "SUB")?;
        if c.fault == Some(HandshakeFault::Sub) {
            return Err(Error::injected("E_SUB_FAILED", "SUB failed to deleted topic/channel"));
        }
        let topic = String::from_utf8_lossy(params[1]).into_owned();
        let channel = String::from_utf8_lossy(params[2]).into_owned();
        self.create_channel(&topic, &channel, now);
        if let Some(ch) = self.topics.get_mut(&topic).and_then(|t| t.channels.get_mut(&channel)) {
            ch.clients.push(id);
        }
        let c = self.conn_mut(id);
        c.state = State::Subscribed;
        c.sub = Some((topic, channel));
        Ok(Reply::Used(0, Some(b"OK".to_vec())))
    }

    fn rdy(&mut self, id: u64, params: &[&[u8]]) -> Result<Reply, Error> {
        let max = self.opts.max_rdy_count;
        let c = self.conn_mut(id);
        match c.state {
            // "ignoring RDY after CLS in state ClientStateV2Closing"
            State::Closing => return Ok(Reply::Used(0, None)),
            State::Init => return Err(Error::fatal("E_INVALID", "cannot RDY in current state")),
            State::Subscribed => {}
        }
        let count = match params.get(1) {
            None => 1,
            Some(p) => wire::base10(p).ok_or_else(|| {
                Error::fatal("E_INVALID", format!("RDY could not parse count {}", String::from_utf8_lossy(p)))
            })?,
        };
        // Go converts to int64: a huge count turns negative and is out of range either way.
        if count > max {
            return Err(Error::fatal("E_INVALID", format!("RDY count {} out of range 0-{max}", count as i64)));
        }
        c.rdy = count;
        c.max_rdy_granted = c.max_rdy_granted.max(count);
        Ok(Reply::Used(0, None))
    }

    fn fin(&mut self, id: u64, params: &[&[u8]]) -> Result<Reply, Error> {
        let id_bytes = self.answer_checks(id, params, "FIN", 2)?;
        self.pop_in_flight(id, &id_bytes).map_err(|e| {
            Error::soft("E_FIN_FAILED", format!("FIN {} failed {e}", String::from_utf8_lossy(&id_bytes)))
        })?;
        self.stats.finished += 1;
        let c = self.conn_mut(id);
        c.in_flight = c.in_flight.saturating_sub(1);
        Ok(Reply::Used(0, None))
    }

    fn req(&mut self, id: u64, params: &[&[u8]], now: Instant) -> Result<Reply, Error> {
        let id_bytes = self.answer_checks(id, params, "REQ", 3)?;
        let ms = wire::base10(params[2]).ok_or_else(|| {
            Error::fatal("E_INVALID", format!("REQ could not parse timeout {}", String::from_utf8_lossy(params[2])))
        })?;
        // Out-of-range timeouts are clamped, not refused.
        let delay = Duration::from_millis(ms.min(u64::MAX / 2)).min(self.opts.max_req_timeout);
        let flight = self.pop_in_flight(id, &id_bytes).map_err(|e| {
            Error::soft("E_REQ_FAILED", format!("REQ {} failed {e}", String::from_utf8_lossy(&id_bytes)))
        })?;
        self.stats.requeued += 1;
        let c = self.conn_mut(id);
        c.in_flight = c.in_flight.saturating_sub(1);
        let seq = self.next_deferred;
        self.next_deferred += 1;
        let Some(ch) = self.channel_of(id) else { return Ok(Reply::Used(0, None)) };
        if delay.is_zero() {
            ch.queue.push_back(flight.msg);
        } else {
            ch.deferred.insert((now + delay, seq), flight.msg);
        }
        Ok(Reply::Used(0, None))
    }

    fn touch(&mut self, id: u64, params: &[&[u8]], now: Instant) -> Result<Reply, Error> {
        let id_bytes = self.answer_checks(id, params, "TOUCH", 2)?;
        let timeout = self.conn(id).msg_timeout;
        let max = self.opts.max_msg_timeout;
        let err =
            |e: &str| Error::soft("E_TOUCH_FAILED", format!("TOUCH {} failed {e}", String::from_utf8_lossy(&id_bytes)));
        let ch = self.channel_of(id).ok_or_else(|| err("ID not in flight"))?;
        let flight = ch.in_flight.get_mut(&id_bytes).ok_or_else(|| err("ID not in flight"))?;
        if flight.client != id {
            return Err(err("client does not own message"));
        }
        // Never past max_msg_timeout from the delivery.
        let deadline = (now + timeout).min(flight.delivered_at + max);
        ch.timeouts.remove(&(flight.deadline, id_bytes));
        flight.deadline = deadline;
        ch.timeouts.insert((deadline, id_bytes));
        Ok(Reply::Used(0, None))
    }

    /// The checks FIN, REQ and TOUCH share: state, parameters, id length.
    fn answer_checks(&self, id: u64, params: &[&[u8]], cmd: &str, want: usize) -> Result<[u8; 16], Error> {
        let c = self.conn(id);
        if !matches!(c.state, State::Subscribed | State::Closing) {
            return Err(Error::fatal("E_INVALID", format!("cannot {cmd} in current state")));
        }
        if params.len() < want {
            return Err(Error::fatal("E_INVALID", format!("{cmd} insufficient number of params")));
        }
        params[1].try_into().map_err(|_| Error::fatal("E_INVALID", "invalid message ID"))
    }

    fn cls(&mut self, id: u64) -> Result<Reply, Error> {
        let c = self.conn_mut(id);
        if c.state != State::Subscribed {
            return Err(Error::fatal("E_INVALID", "cannot CLS in current state"));
        }
        // StartClose: RDY 0, then the closing state; nsqd waits for the client to close.
        c.rdy = 0;
        c.state = State::Closing;
        Ok(Reply::Used(0, Some(b"CLOSE_WAIT".to_vec())))
    }

    /// PUB, or DPUB when `deferred`.
    fn publish(
        &mut self,
        id: u64,
        params: &[&[u8]],
        rest: &[u8],
        now: Instant,
        deferred: bool,
    ) -> Result<Reply, Error> {
        let cmd = if deferred { "DPUB" } else { "PUB" };
        if params.len() < if deferred { 3 } else { 2 } {
            return Err(Error::fatal("E_INVALID", format!("{cmd} insufficient number of parameters")));
        }
        if !wire::valid_name(params[1]) {
            return Err(Error::fatal(
                "E_BAD_TOPIC",
                format!("{cmd} topic name {} is not valid", wire::go_quote(params[1])),
            ));
        }
        let mut delay = Duration::ZERO;
        if deferred {
            let ms = wire::base10(params[2]).ok_or_else(|| {
                Error::fatal(
                    "E_INVALID",
                    format!("DPUB could not parse timeout {}", String::from_utf8_lossy(params[2])),
                )
            })?;
            let max = self.opts.max_req_timeout.as_millis() as u64;
            if ms > max {
                return Err(Error::fatal("E_INVALID", format!("DPUB timeout {ms} out of range 0-{max}")));
            }
            delay = Duration::from_millis(ms);
        }
        let Some(len) = wire::read_len(rest) else { return Ok(Reply::NeedMore) };
        if len <= 0 {
            return Err(Error::fatal("E_BAD_MESSAGE", format!("{cmd} invalid message body size {len}")));
        }
        let max = self.opts.max_msg_size;
        if len as usize > max {
            return Err(Error::fatal("E_BAD_MESSAGE", format!("{cmd} message too big {len} > {max}")));
        }
        let Some(body) = rest.get(4..4 + len as usize) else { return Ok(Reply::NeedMore) };
        let c = self.conn(id);
        self.check_auth(c, cmd)?;
        if c.fault == Some(HandshakeFault::Publish) {
            let code = if deferred { "E_DPUB_FAILED" } else { "E_PUB_FAILED" };
            return Err(Error::injected(code, format!("{cmd} failed exiting")));
        }
        let topic = String::from_utf8_lossy(params[1]).into_owned();
        self.put(&topic, body, delay, now);
        Ok(Reply::Used(4 + len as usize, Some(b"OK".to_vec())))
    }

    fn mpub(&mut self, id: u64, params: &[&[u8]], rest: &[u8], now: Instant) -> Result<Reply, Error> {
        if params.len() < 2 {
            return Err(Error::fatal("E_INVALID", "MPUB insufficient number of parameters"));
        }
        if !wire::valid_name(params[1]) {
            // nsqd writes the code twice here.
            return Err(Error::fatal(
                "E_BAD_TOPIC",
                format!("E_BAD_TOPIC MPUB topic name {} is not valid", wire::go_quote(params[1])),
            ));
        }
        let c = self.conn(id);
        self.check_auth(c, "MPUB")?;
        let Some(len) = wire::read_len(rest) else { return Ok(Reply::NeedMore) };
        let (max_body, max_msg) = (self.opts.max_body_size, self.opts.max_msg_size);
        if len <= 0 {
            return Err(Error::fatal("E_BAD_BODY", format!("MPUB invalid body size {len}")));
        }
        if len as i64 > max_body as i64 {
            return Err(Error::fatal("E_BAD_BODY", format!("MPUB body too big {len} > {max_body}")));
        }
        // readMPUB reads the messages from the stream itself; the body size only gated it.
        let mut at = 4;
        let Some(count) = wire::read_len(&rest[at..]) else { return Ok(Reply::NeedMore) };
        at += 4;
        let max_messages = (max_body as i64 - 4) / 5;
        if count <= 0 || count as i64 > max_messages {
            return Err(Error::fatal("E_BAD_BODY", format!("MPUB invalid message count {count}")));
        }
        let mut bodies = Vec::with_capacity(count as usize);
        for i in 0..count {
            let Some(size) = wire::read_len(&rest[at..]) else { return Ok(Reply::NeedMore) };
            if size <= 0 {
                return Err(Error::fatal("E_BAD_MESSAGE", format!("MPUB invalid message({i}) body size {size}")));
            }
            if size as usize > max_msg {
                return Err(Error::fatal("E_BAD_MESSAGE", format!("MPUB message too big {size} > {max_msg}")));
            }
            let Some(body) = rest.get(at + 4..at + 4 + size as usize) else { return Ok(Reply::NeedMore) };
            bodies.push(body);
            at += 4 + size as usize;
        }
        if self.conn(id).fault == Some(HandshakeFault::Publish) {
            return Err(Error::injected("E_MPUB_FAILED", "MPUB failed exiting"));
        }
        let topic = String::from_utf8_lossy(params[1]).into_owned();
        for body in bodies {
            self.put(&topic, body, Duration::ZERO, now);
        }
        Ok(Reply::Used(at, Some(b"OK".to_vec())))
    }

    // ---- topics, channels, the message pump --------------------------------------------------

    fn put(&mut self, topic: &str, body: &[u8], delay: Duration, now: Instant) {
        self.stats.published += 1;
        let id = self.next_id;
        self.next_id += 1;
        let mut hex = [0u8; 16];
        hex.copy_from_slice(format!("{id:016x}").as_bytes());
        let timestamp = EPOCH_NS + now.saturating_duration_since(self.start).as_nanos() as i64;
        let msg = Msg { id: hex, body: body.into(), timestamp, attempts: 0 };
        self.topic_mut(topic);
        let seq = self.next_deferred;
        self.next_deferred += 1;
        let Some(t) = self.topics.get_mut(topic) else { return };
        if t.channels.is_empty() {
            t.pending.push_back((msg, delay));
            return;
        }
        for ch in t.channels.values_mut() {
            if delay.is_zero() {
                ch.queue.push_back(msg.clone());
            } else {
                ch.deferred.insert((now + delay, seq), msg.clone());
            }
        }
    }

    fn topic_mut(&mut self, topic: &str) -> &mut Topic {
        if !self.topics.contains_key(topic) {
            self.registrations.push_back(Registration { topic: topic.to_owned(), channel: None });
        }
        self.topics.entry(topic.to_owned()).or_default()
    }

    /// Creates `topic`/`channel` if needed (`GetTopic`, `GetChannel`). The first channel of a
    /// topic starts the topic's pump: what waited for a channel flows into it, and deferred
    /// messages start their deferral now.
    fn create_channel(&mut self, topic: &str, channel: &str, now: Instant) {
        if self.topics.get(topic).is_some_and(|t| t.channels.contains_key(channel)) {
            return;
        }
        let mut seq = self.next_deferred;
        let t = self.topic_mut(topic);
        let mut ch = Channel::default();
        if t.channels.is_empty() {
            for (msg, delay) in std::mem::take(&mut t.pending) {
                if delay.is_zero() {
                    ch.queue.push_back(msg);
                } else {
                    ch.deferred.insert((now + delay, seq), msg);
                    seq += 1;
                }
            }
        }
        t.channels.insert(channel.to_owned(), ch);
        self.next_deferred = seq;
        self.registrations.push_back(Registration { topic: topic.to_owned(), channel: Some(channel.to_owned()) });
    }

    /// The channel `client` subscribed to.
    fn channel_of(&mut self, client: u64) -> Option<&mut Channel> {
        let (topic, channel) = self.conns.get(&client)?.sub.as_ref()?;
        self.topics.get_mut(topic)?.channels.get_mut(channel)
    }

    /// Takes `msg_id` out of flight if `client` owns it (`popInFlightMessage`).
    fn pop_in_flight(&mut self, client: u64, msg_id: &[u8; 16]) -> Result<InFlight, &'static str> {
        let ch = self.channel_of(client).ok_or("ID not in flight")?;
        match ch.in_flight.get(msg_id) {
            None => Err("ID not in flight"),
            Some(f) if f.client != client => Err("client does not own message"),
            Some(_) => {
                let f = ch.in_flight.remove(msg_id).ok_or("ID not in flight")?;
                ch.timeouts.remove(&(f.deadline, *msg_id));
                Ok(f)
            }
        }
    }

    /// The queue scan: in-flight messages past their deadline and due deferred messages go
    /// back to their channel's queue.
    fn scan_queues(&mut self, now: Instant) {
        let scan = self.opts.queue_scan_interval;
        let base = self.scan_base;
        let tick = |at: Instant| scan_tick(base, scan, at);
        for topic in self.topics.values_mut() {
            for ch in topic.channels.values_mut() {
                while let Some(&(at, msg_id)) = ch.timeouts.first() {
                    if tick(at) > now {
                        break;
                    }
                    ch.timeouts.pop_first();
                    if let Some(f) = ch.in_flight.remove(&msg_id) {
                        self.stats.timed_out += 1;
                        if let Some(c) = self.conns.get_mut(&f.client) {
                            c.in_flight = c.in_flight.saturating_sub(1);
                        }
                        ch.queue.push_back(f.msg);
                    }
                }
                while let Some(entry) = ch.deferred.first_entry() {
                    if tick(entry.key().0) > now {
                        break;
                    }
                    ch.queue.push_back(entry.remove());
                }
            }
        }
    }

    fn scan_tick(&self, at: Instant) -> Instant {
        scan_tick(self.scan_base, self.opts.queue_scan_interval, at)
    }

    /// Every client's message pump: a ready client takes the next message of its channel.
    fn pump(&mut self, now: Instant) {
        let mut touched: BTreeSet<u64> = BTreeSet::new();
        for topic in self.topics.values_mut() {
            for ch in topic.channels.values_mut() {
                while !ch.queue.is_empty() {
                    let ready: Vec<u64> =
                        ch.clients.iter().copied().filter(|id| self.conns.get(id).is_some_and(Conn::ready)).collect();
                    if ready.is_empty() {
                        break;
                    }
                    let client = ready[self.rng.index(ready.len())];
                    let Some(mut msg) = ch.queue.pop_front() else { break };
                    let Some(c) = self.conns.get_mut(&client) else { break };
                    msg.attempts = msg.attempts.saturating_add(1);
                    let deadline = now + c.msg_timeout;
                    wire::put_message(&mut c.buffered, msg.timestamp, msg.attempts, &msg.id, &msg.body);
                    c.in_flight += 1;
                    ch.timeouts.insert((deadline, msg.id));
                    ch.in_flight.insert(msg.id, InFlight { msg, client, deadline, delivered_at: now });
                    self.stats.delivered += 1;
                    touched.insert(client);
                }
            }
        }
        for id in touched {
            if let Some(c) = self.conns.get_mut(&id) {
                // The bufio.Writer flushes whole buffers as they fill.
                if c.buffered.len() >= c.output_buffer_size {
                    let keep = c.buffered.len() % c.output_buffer_size.max(1);
                    let full = c.buffered.len() - keep;
                    c.out.extend(c.buffered.drain(..full));
                    self.dirty.insert(id);
                }
            }
        }
        // The pump flushes at once when the client is not ready for more, else at the next
        // flusher tick.
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else { continue };
            if c.buffered.is_empty() || c.closing {
                c.flush_at = None;
                continue;
            }
            if !c.ready() {
                Self::flush(c);
                self.dirty.insert(id);
            } else if c.flush_at.is_none() {
                c.flush_at = c.flusher_period.map(|p| next_tick(c.flusher_base, p, now));
            }
        }
    }

    // ---- output -----------------------------------------------------------------------------

    /// `Send`: a frame, and (for anything but a message) a flush.
    fn send(&mut self, id: u64, frame_type: u32, data: &[u8]) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        wire::put_frame(&mut c.buffered, frame_type, data);
        Self::flush(c);
        self.dirty.insert(id);
    }

    fn flush(c: &mut Conn) {
        c.flush_at = None;
        if c.out.is_empty() {
            c.out = std::mem::take(&mut c.buffered);
        } else {
            c.out.append(&mut c.buffered);
        }
    }

    /// A fatal error: the error frame, then nsqd closes the connection.
    fn fail(&mut self, id: u64, text: String, injected: bool) {
        self.errors.push_back(SentError { conn: ServerConn(id), text: text.clone(), fatal: true, injected });
        self.send(id, FRAME_ERROR, text.as_bytes());
        self.close_conn(id);
    }

    fn close_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            if !c.closing {
                c.closing = true;
                c.flush_at = None;
                // Whatever a stalled connection held still goes out before the close.
                c.stalled = false;
                self.dirty.insert(id);
                self.closed.push_back(ServerConn(id));
            }
        }
    }

    fn remove_conn(&mut self, id: u64) {
        let Some(c) = self.conns.remove(&id) else { return };
        self.dirty.remove(&id);
        if let Some((topic, channel)) = &c.sub {
            if let Some(ch) = self.topics.get_mut(topic).and_then(|t| t.channels.get_mut(channel)) {
                ch.clients.retain(|&x| x != id);
            }
        }
    }

    fn conn(&self, id: u64) -> &Conn {
        &self.conns[&id]
    }

    fn conn_mut(&mut self, id: u64) -> &mut Conn {
        self.conns.get_mut(&id).expect("a live connection")
    }
}

impl Conn {
    /// `IsReadyForMessages`, plus the stall fault.
    fn ready(&self) -> bool {
        self.state == State::Subscribed && !self.closing && !self.stalled && self.in_flight < self.rdy
    }
}

/// The wall clock nsqd stamps messages with: virtual time after this epoch.
const EPOCH_NS: i64 = 1_700_000_000_000_000_000;
/// `defaultBufferSize`: the output buffer before IDENTIFY changes it.
const DEFAULT_BUFFER_SIZE: usize = 16 * 1024;

/// Twice the heartbeat interval after each command (`IOLoop`); none with heartbeats off.
fn read_deadline(heartbeat: Duration, now: Instant) -> Option<Instant> {
    (!heartbeat.is_zero()).then(|| now + heartbeat * 2)
}

/// The first queue-scan tick at or after `at`.
fn scan_tick(start: Instant, scan: Duration, at: Instant) -> Instant {
    let since = at.saturating_duration_since(start).as_nanos();
    let scan_ns = scan.as_nanos().max(1);
    start + Duration::from_nanos((since.div_ceil(scan_ns) * scan_ns) as u64)
}

/// The first tick of a ticker started at `base` with `period` strictly after `now`.
fn next_tick(base: Instant, period: Duration, now: Instant) -> Instant {
    let since = now.saturating_duration_since(base).as_nanos();
    let p = period.as_nanos().max(1);
    base + Duration::from_nanos(((since / p + 1) * p) as u64)
}

/// The IDENTIFY body fields nsqd reads (`identifyDataV2`); Go ignores unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct IdentifyData {
    heartbeat_interval: i64,
    output_buffer_size: i64,
    output_buffer_timeout: i64,
    feature_negotiation: bool,
    snappy: bool,
    deflate: bool,
    sample_rate: i64,
    msg_timeout: i64,
}

struct Settings {
    heartbeat: Duration,
    output_buffer_size: usize,
    output_buffer_timeout: Duration,
    sample_rate: i64,
    msg_timeout: Duration,
}

enum Reply {
    /// The command's body or arguments are not all here yet.
    NeedMore,
    /// Bytes used after the line, and the response frame to send.
    Used(usize, Option<Vec<u8>>),
}

enum Step {
    NeedMore,
    /// Bytes used.
    Done(usize),
    /// A fatal error was sent; the connection is closing.
    Fatal,
    /// The connection must close without an error frame.
    Closed,
}

#[derive(Debug)]
struct Error {
    code: &'static str,
    text: String,
    fatal: bool,
    injected: bool,
}

impl Error {
    fn fatal(code: &'static str, text: impl Into<String>) -> Self {
        Self { code, text: text.into(), fatal: true, injected: false }
    }

    fn soft(code: &'static str, text: impl Into<String>) -> Self {
        Self { code, text: text.into(), fatal: false, injected: false }
    }

    fn injected(code: &'static str, text: impl Into<String>) -> Self {
        Self { code, text: text.into(), fatal: true, injected: true }
    }
}

#[cfg(test)]
mod tests {
    use super::super::clients::{ConnNote, Settings, SimConnection};
    use super::*;
    use nsq_sansio::MessageId;

    fn fixture(name: &str) -> serde_json::Value {
        let path = format!("{}/tests/fixtures/nsqd-1.3.0/{name}.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// One captured connection: the client's writes in order, and everything nsqd sent.
    struct Captured {
        name: String,
        c2s: Vec<Vec<u8>>,
        s2c: Vec<u8>,
        server_closed: bool,
    }

    fn connections(cap: &serde_json::Value) -> Vec<Captured> {
        let mut out: Vec<Captured> = cap["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Captured {
                name: c["name"].as_str().unwrap_or("").to_owned(),
                c2s: Vec::new(),
                s2c: Vec::new(),
                server_closed: c["server_closed"].as_bool().unwrap_or(false),
            })
            .collect();
        for step in cap["steps"].as_array().unwrap() {
            let conn = &mut out[step["conn"].as_u64().unwrap() as usize];
            let bytes = hex::decode(step["hex"].as_str().unwrap()).unwrap();
            if bytes.is_empty() {
                continue;
            }
            match step["dir"].as_str().unwrap() {
                "c2s" => conn.c2s.push(bytes),
                _ => conn.s2c.extend_from_slice(&bytes),
            }
        }
        out
    }

    /// Splits a server byte stream into frames.
    fn frames(mut bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= 8 {
            let size = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            let kind = u32::from_be_bytes(bytes[4..8].try_into().unwrap());
            out.push((kind, bytes[8..4 + size].to_vec()));
            bytes = &bytes[4 + size..];
        }
        assert!(bytes.is_empty(), "trailing bytes");
        out
    }

    fn is_heartbeat(frame: &(u32, Vec<u8>)) -> bool {
        frame.0 == FRAME_RESPONSE && frame.1 == b"_heartbeat_"
    }

    /// Replays each connection's client bytes into a fresh model at one instant and compares
    /// what it sends (heartbeats aside: the capture's came with time passing) and whether it
    /// closed.
    fn replay(cap: &serde_json::Value, opts: &NsqdOptions, skip: &[&str]) -> usize {
        let now = Instant::now();
        let mut checked = 0;
        for conn in connections(cap) {
            if skip.contains(&conn.name.as_str()) {
                continue;
            }
            let mut model = NsqdModel::new(opts.clone(), now);
            let id = model.accept(now);
            let mut sent = Vec::new();
            let mut closed = false;
            for chunk in &conn.c2s {
                model.recv(id, chunk, now);
                sent.extend(model.poll_transmit(id).unwrap_or_default());
                closed |= model.poll_closed().is_some();
            }
            let want: Vec<_> = frames(&conn.s2c).into_iter().filter(|f| !is_heartbeat(f)).collect();
            let got = frames(&sent);
            let show = |fs: &[(u32, Vec<u8>)]| {
                fs.iter().map(|f| String::from_utf8_lossy(&f.1).into_owned()).collect::<Vec<_>>()
            };
            assert_eq!(show(&got), show(&want), "{}", conn.name);
            assert_eq!(got, want, "{}", conn.name);
            assert_eq!(closed, conn.server_closed, "{}: closed", conn.name);
            checked += 1;
        }
        checked
    }

    #[test]
    fn handshakes_as_captured() {
        let opts = NsqdOptions::default();
        assert_eq!(replay(&fixture("identify_plain"), &opts, &[]), 1);
        assert_eq!(replay(&fixture("identify_no_negotiation"), &opts, &[]), 1);
        assert_eq!(replay(&fixture("publish"), &opts, &[]), 1);
    }

    #[test]
    fn errors_as_captured() {
        let opts = NsqdOptions { max_msg_size: 1024, ..NsqdOptions::default() };
        // The model has snappy off, as `--snappy=false` would.
        let n = replay(&fixture("errors"), &opts, &["snappy_missing_stream_identifier"]);
        assert_eq!(n, 31);
    }

    #[test]
    fn auth_as_captured() {
        let auth = AuthOptions {
            secret: "good-secret".into(),
            identity: "fixture-user".into(),
            identity_url: "https://auth.example.invalid/u/fixture-user".into(),
        };
        let opts = NsqdOptions { auth: Some(auth), ..NsqdOptions::default() };
        // The other cases need an auth server with per-secret grants.
        let skip =
            ["auth_no_authorizations", "publish_only_grant", "pub_other_topic", "publish_grant_with_empty_channels"];
        assert_eq!(replay(&fixture("auth"), &opts, &skip), 6);
    }

    fn identify(heartbeat_ms: i64) -> Vec<u8> {
        let body = format!(r#"{{"feature_negotiation":true,"heartbeat_interval":{heartbeat_ms}}}"#);
        let mut out = b"  V2IDENTIFY\n".to_vec();
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body.as_bytes());
        out
    }

    #[test]
    fn silent_client_gets_heartbeats_then_is_closed_after_two_intervals() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut model = NsqdModel::new(NsqdOptions::default(), t0);
        let id = model.accept(t0);
        model.recv(id, &identify(1000), t0);
        assert!(model.poll_transmit(id).is_some());
        assert_eq!(model.poll_timeout(), Some(t0 + s));
        model.handle_timeout(t0 + s);
        assert_eq!(frames(&model.poll_transmit(id).unwrap()), [(FRAME_RESPONSE, b"_heartbeat_".to_vec())]);
        model.handle_timeout(t0 + 2 * s);
        // Closed without an error frame (the capture's second heartbeat races the close).
        assert!(model.poll_transmit(id).is_none());
        assert_eq!(model.poll_closed(), Some(id));
    }

    fn cmd(line: &str, body: Option<&[u8]>) -> Vec<u8> {
        let mut out = line.as_bytes().to_vec();
        out.push(b'\n');
        if let Some(body) = body {
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend_from_slice(body);
        }
        out
    }

    /// Messages as `(attempts, id, body)`.
    fn messages(bytes: &[u8]) -> Vec<(u16, String, Vec<u8>)> {
        frames(bytes)
            .into_iter()
            .filter(|f| f.0 == wire::FRAME_MESSAGE)
            .map(|(_, d)| {
                (u16::from_be_bytes([d[8], d[9]]), String::from_utf8_lossy(&d[10..26]).into_owned(), d[26..].to_vec())
            })
            .collect()
    }

    #[test]
    fn consumer_flow_as_captured() {
        // sub_and_messages: RDY 5 with 3 messages waiting; the output buffer holds them until
        // the flusher tick; FIN, REQ 0 (redelivered with attempts 2), TOUCH, CLS.
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut model = NsqdModel::new(NsqdOptions::default(), t0);
        let producer = model.accept(t0);
        let mut pubs = b"  V2".to_vec();
        for body in ["a", "b", "c"] {
            pubs.extend(cmd("PUB t", Some(body.as_bytes())));
        }
        model.recv(producer, &pubs, t0);
        assert_eq!(frames(&model.poll_transmit(producer).unwrap()).len(), 3);
        let consumer = model.accept(t0);
        let mut sub = identify(1000);
        sub.extend(cmd("SUB t c", None));
        sub.extend(cmd("RDY 5", None));
        model.recv(consumer, &sub, t0);
        let out = model.poll_transmit(consumer).unwrap();
        assert_eq!(frames(&out).len(), 2, "IDENTIFY and SUB answered, messages buffered");
        assert_eq!(model.poll_timeout(), Some(t0 + 250 * ms));
        model.handle_timeout(t0 + 250 * ms);
        let got = messages(&model.poll_transmit(consumer).unwrap());
        assert_eq!(
            got.iter().map(|m| (m.0, m.2.clone())).collect::<Vec<_>>(),
            [(1, b"a".to_vec()), (1, b"b".to_vec()), (1, b"c".to_vec())]
        );
        let (a, b, c) = (&got[0].1, &got[1].1, &got[2].1);
        let t1 = t0 + 300 * ms;
        model.recv(consumer, &[cmd(&format!("FIN {a}"), None), cmd(&format!("REQ {b} 0"), None)].concat(), t1);
        assert!(model.poll_transmit(consumer).is_none());
        model.handle_timeout(t0 + 500 * ms);
        let again = messages(&model.poll_transmit(consumer).unwrap());
        assert_eq!(again, [(2, b.clone(), b"b".to_vec())]);
        let cmds = [
            cmd(&format!("TOUCH {c}"), None),
            cmd(&format!("FIN {c}"), None),
            cmd(&format!("FIN {b}"), None),
            cmd(&format!("FIN {a}"), None),
        ]
        .concat();
        model.recv(consumer, &cmds, t1);
        let errs = frames(&model.poll_transmit(consumer).unwrap());
        assert_eq!(errs, [(FRAME_ERROR, format!("E_FIN_FAILED FIN {a} failed ID not in flight").into_bytes())]);
        model.recv(consumer, &cmd("CLS", None), t1);
        assert_eq!(frames(&model.poll_transmit(consumer).unwrap()), [(FRAME_RESPONSE, b"CLOSE_WAIT".to_vec())]);
        assert!(model.poll_closed().is_none(), "nsqd waits for the client to close");
        assert_eq!(model.stats().finished, 3);
    }

    #[test]
    fn in_flight_of_a_gone_client_waits_for_its_timeout_and_crash_keeps_only_the_queue() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut model = NsqdModel::new(NsqdOptions::default(), t0);
        let c = model.accept(t0);
        let mut bytes = identify(30_000);
        bytes.extend(cmd(r#"IDENTIFY"#, Some(br#"{"msg_timeout":5000}"#)));
        bytes.extend(cmd("SUB t c", None));
        bytes.extend(cmd("RDY 1", None));
        bytes.extend(cmd("PUB t", Some(b"x")));
        bytes.extend(cmd("PUB t", Some(b"y")));
        bytes.extend(cmd("DPUB t 60000", Some(b"z")));
        model.recv(c, &bytes, t0);
        assert_eq!(model.flow(c), Some(Flow { rdy: 1, in_flight: 1, max_rdy_granted: 1 }));
        model.client_closed(c, t0);
        assert!(model.holds(b"x") && model.holds(b"y") && model.holds(b"z"));
        // Not requeued at once: a new client with RDY gets "y" only, "x" after the timeout.
        let d = model.accept(t0);
        model.recv(d, &[identify(30_000), cmd("SUB t c", None), cmd("RDY 5", None)].concat(), t0);
        model.handle_timeout(t0 + s);
        let got: Vec<_> = messages(&model.poll_transmit(d).unwrap()).into_iter().map(|m| m.2).collect();
        assert_eq!(got, [b"y".to_vec()]);
        model.handle_timeout(t0 + 5 * s);
        model.handle_timeout(t0 + 6 * s);
        let got: Vec<_> =
            messages(&model.poll_transmit(d).unwrap_or_default()).into_iter().map(|m| (m.0, m.2)).collect();
        assert_eq!(got, [(2, b"x".to_vec())], "the second IDENTIFY's msg_timeout of 5 s applied");
        let mut lost: Vec<Vec<u8>> = model.crash().iter().map(|b| b.to_vec()).collect();
        lost.sort();
        assert_eq!(lost, [b"x".to_vec(), b"y".to_vec(), b"z".to_vec()]);
        assert!(!model.holds(b"x"));
    }

    /// A real client connection and the model, wired back to back with no network.
    struct Pair {
        client: SimConnection,
        server: NsqdModel,
        id: ServerConn,
        now: Instant,
        notes: Vec<ConnNote>,
    }

    impl Pair {
        fn new(server: NsqdModel, settings: &Settings, now: Instant) -> Self {
            let mut server = server;
            let id = server.accept(now);
            Self { client: SimConnection::new(settings, now), server, id, now, notes: Vec::new() }
        }

        /// Moves bytes both ways until neither side has anything to say.
        fn settle(&mut self) {
            loop {
                let mut moved = false;
                while let Some(bytes) = self.client.poll_transmit() {
                    self.server.recv(self.id, &bytes, self.now);
                    moved = true;
                }
                while let Some(bytes) = self.server.poll_transmit(self.id) {
                    self.client.input(&bytes, self.now);
                    moved = true;
                }
                while let Some(note) = self.client.poll_note() {
                    self.notes.push(note);
                }
                if !moved {
                    return;
                }
            }
        }

        /// Advances to `at`, firing both sides' timers on the way.
        fn run_until(&mut self, at: Instant) {
            loop {
                self.settle();
                let next = [self.client.poll_timeout(), self.server.poll_timeout()].into_iter().flatten().min();
                match next {
                    Some(t) if t <= at => {
                        self.now = self.now.max(t);
                        self.client.timeout(self.now);
                        self.server.handle_timeout(self.now);
                    }
                    _ => {
                        self.now = at;
                        return self.settle();
                    }
                }
            }
        }

        fn messages(&mut self) -> Vec<(MessageId, u16, Vec<u8>)> {
            let (msgs, rest): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.notes).into_iter().partition(|n| matches!(n, ConnNote::Message { .. }));
            self.notes = rest;
            msgs.into_iter()
                .map(|n| match n {
                    ConnNote::Message { id, attempts, body } => (id, attempts, body),
                    _ => unreachable!(),
                })
                .collect()
        }
    }

    #[test]
    fn a_real_connection_publishes_and_consumes_through_the_model() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let settings = Settings { heartbeat: Some(5 * s), msg_timeout: Some(10 * s), ..Settings::default() };
        let mut producer = Pair::new(NsqdModel::new(NsqdOptions::default(), t0), &settings, t0);
        for body in ["one", "two", "three"] {
            producer.client.publish("t", body.as_bytes());
        }
        producer.settle();
        assert_eq!(
            producer.notes,
            [
                ConnNote::Ready,
                ConnNote::Published { ok: true },
                ConnNote::Published { ok: true },
                ConnNote::Published { ok: true }
            ]
        );

        let mut consumer = Pair::new(producer.server, &settings, t0);
        consumer.client.subscribe("t", "c");
        consumer.settle();
        assert_eq!(std::mem::take(&mut consumer.notes), [ConnNote::Ready, ConnNote::Subscribed]);
        consumer.client.ready(2);
        consumer.settle();
        // RDY used up: nsqd flushes at once.
        let first = consumer.messages();
        assert_eq!(
            first.iter().map(|m| (m.1, m.2.clone())).collect::<Vec<_>>(),
            [(1, b"one".to_vec()), (1, b"two".to_vec())]
        );
        consumer.client.finish(&first[0].0);
        consumer.client.requeue(&first[1].0, Duration::ZERO);
        consumer.settle();
        let second = consumer.messages();
        // REQ 0 puts "two" behind "three".
        assert_eq!(
            second.iter().map(|m| (m.1, m.2.clone())).collect::<Vec<_>>(),
            [(1, b"three".to_vec()), (2, b"two".to_vec())]
        );
        // "three" is touched and answered late; "two" is left to time out on both sides.
        consumer.run_until(t0 + 8 * s);
        consumer.client.touch(&second[0].0, consumer.now);
        consumer.run_until(t0 + 11 * s);
        assert!(consumer.notes.contains(&ConnNote::TimedOut(second[1].0)), "{:?}", consumer.notes);
        let third = consumer.messages();
        assert_eq!(third.iter().map(|m| (m.1, m.2.clone())).collect::<Vec<_>>(), [(3, b"two".to_vec())]);
        consumer.client.finish(&second[0].0);
        consumer.client.finish(&third[0].0);
        consumer.run_until(t0 + 12 * s);
        assert_eq!(consumer.server.stats().finished, 3);
        // Heartbeats kept the connection alive all along; now a graceful close.
        assert!(consumer.server.stats().heartbeats >= 2);
        consumer.client.close(consumer.now);
        consumer.settle();
        assert!(
            consumer.notes.ends_with(&[ConnNote::CloseWait, ConnNote::Closed("connection closed locally".into())]),
            "{:?}",
            consumer.notes
        );
        assert!(consumer.server.poll_error().is_none());
    }
}
