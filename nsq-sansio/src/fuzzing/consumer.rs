//! A `ConsumerState` driven by arbitrary connection events, server frames, answers, lookupd
//! answers and time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};

use super::input::{seed_variant, Blob, Seed, ServerFrame};
use crate::{
    Action, BackoffStrategy, Channel, Config, ConnId, ConsumerEvent, ConsumerState, Frame, Message, MessageId,
    Response, Topic, DEFAULT_MAX_RDY_COUNT,
};

/// A consumer's configuration, then what happens to it.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// `max_in_flight` at the start.
    pub max_in_flight: u8,
    /// Full-jitter backoff instead of exponential.
    pub jitter: bool,
    /// What happens.
    pub ops: Vec<Op>,
}

/// One step. `conn` picks among the connections dialled so far, modulo their number.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `connect_to_nsqd` to one of four addresses.
    Connect(u8),
    /// `disconnect_from_nsqd` from one of four addresses.
    Disconnect(u8),
    /// The socket connects and nsqd answers IDENTIFY (with this `max_rdy_count` in JSON, or a
    /// plain `OK` for 0) and the SUB.
    Accept {
        /// The connection.
        conn: u8,
        /// Its `max_rdy_count`.
        max_rdy_count: u8,
    },
    /// A message with a fresh id and these attempts.
    Deliver {
        /// The connection.
        conn: u8,
        /// Delivery count.
        attempts: u16,
    },
    /// Server frames.
    Frames {
        /// The connection.
        conn: u8,
        /// The frames.
        frames: Vec<ServerFrame>,
    },
    /// Raw socket bytes.
    Input(u8, Blob),
    /// End of file.
    Eof(u8),
    /// The dial failed.
    ConnectFailed(u8),
    /// Answers the n-th unanswered message: FIN, REQ with backoff, REQ without, TOUCH.
    Answer(u8, u8),
    /// `change_max_in_flight`.
    MaxInFlight(u8),
    /// Virtual time passes (ms, modulo 10 min), then timers fire.
    Advance(u32),
    /// A valid lookupd answer to the oldest query, listing `127.0.0.(n % 8):4150` for each n.
    Lookupd(Vec<u8>),
    /// Raw bytes as the lookupd answer to the oldest query.
    LookupdRaw(Blob),
    /// The oldest lookupd query failed.
    LookupdFailed,
    /// `stop`.
    Stop,
}

impl Seed for Op {
    fn seed(&self, out: &mut Vec<u8>) {
        const N: u32 = 15;
        match self {
            Self::Connect(i) => {
                seed_variant(out, 0, N);
                i.seed(out);
            }
            Self::Disconnect(i) => {
                seed_variant(out, 1, N);
                i.seed(out);
            }
            Self::Accept { conn, max_rdy_count } => {
                seed_variant(out, 2, N);
                conn.seed(out);
                max_rdy_count.seed(out);
            }
            Self::Deliver { conn, attempts } => {
                seed_variant(out, 3, N);
                conn.seed(out);
                attempts.seed(out);
            }
            Self::Frames { conn, frames } => {
                seed_variant(out, 4, N);
                conn.seed(out);
                frames.seed(out);
            }
            Self::Input(i, b) => {
                seed_variant(out, 5, N);
                i.seed(out);
                b.seed(out);
            }
            Self::Eof(i) => {
                seed_variant(out, 6, N);
                i.seed(out);
            }
            Self::ConnectFailed(i) => {
                seed_variant(out, 7, N);
                i.seed(out);
            }
            Self::Answer(i, k) => {
                seed_variant(out, 8, N);
                i.seed(out);
                k.seed(out);
            }
            Self::MaxInFlight(n) => {
                seed_variant(out, 9, N);
                n.seed(out);
            }
            Self::Advance(ms) => {
                seed_variant(out, 10, N);
                ms.seed(out);
            }
            Self::Lookupd(p) => {
                seed_variant(out, 11, N);
                p.seed(out);
            }
            Self::LookupdRaw(b) => {
                seed_variant(out, 12, N);
                b.seed(out);
            }
            Self::LookupdFailed => seed_variant(out, 13, N),
            Self::Stop => seed_variant(out, 14, N),
        }
    }
}

impl Seed for Input {
    fn seed(&self, out: &mut Vec<u8>) {
        self.max_in_flight.seed(out);
        self.jitter.seed(out);
        self.ops.seed(out);
    }
}

// The only calls of the consumer's inputs that carry adapter errors.

fn connect_failed(c: &mut ConsumerState, conn: ConnId, now: Instant) {
    c.handle_connect_failed(conn, std::io::Error::from(std::io::ErrorKind::ConnectionRefused), now);
}

/// The lookupd query connection `query` connects, reads `answer` and ends, or fails to connect.
fn lookupd_answer(c: &mut ConsumerState, query: ConnId, answer: Option<Bytes>, now: Instant) {
    match answer {
        Some(bytes) => {
            c.handle_connected(query, now);
            c.handle_input(query, now, BytesMut::from(&bytes[..]));
            c.handle_eof(query, now);
        }
        None => connect_failed(c, query, now),
    }
}

/// A lookupd answer listing `127.0.0.(n % 8):4150` for each n.
fn lookupd_response(producers: &[u8]) -> Bytes {
    let list: Vec<String> = producers
        .iter()
        .map(|n| format!(r#"{{"broadcast_address":"127.0.0.{}","hostname":"h","tcp_port":4150}}"#, n % 8))
        .collect();
    let body = format!(r#"{{"channels":["c"],"producers":[{}]}}"#, list.join(","));
    Bytes::from(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()))
}

/// The last `RDY n` and whether a `CLS` is among the commands in `bytes` (a connection's
/// output after its magic and IDENTIFY: every other command is one line).
fn scan(bytes: &[u8]) -> (Option<u32>, bool) {
    let mut rdy = None;
    let mut cls = false;
    for line in bytes.split(|&b| b == b'\n') {
        if let Some(n) = line.strip_prefix(b"RDY ") {
            rdy = std::str::from_utf8(n).ok().and_then(|n| n.parse().ok());
            assert!(rdy.is_some(), "a malformed RDY");
        }
        cls |= line == b"CLS";
    }
    (rdy, cls)
}

/// What the harness knows of one connection.
#[derive(Debug, Default)]
struct Conn {
    open: bool,
    connected: bool,
    /// The RDY count nsqd holds for it: the last one written (0 after CLS).
    wire_rdy: u32,
    /// The `max_rdy_count` negotiated.
    max_rdy: Option<u32>,
    /// Bytes were handed to it.
    fed: bool,
}

fn fed(conns: &mut BTreeMap<ConnId, Conn>, conn: ConnId) {
    if let Some(k) = conns.get_mut(&conn) {
        k.fed = true;
    }
}

/// Runs `ops`; checks after each step that RDY, as the consumer counts it and as written to
/// each socket, stays within `max_in_flight` (1 in backoff), that no connection's RDY passes its
/// `max_rdy_count`, that timers never lie in the past, and that events are consistent.
pub fn consumer(input: Input) {
    let mut config = Config::new();
    config.max_in_flight = u32::from(input.max_in_flight);
    if input.jitter {
        config.backoff_strategy = BackoffStrategy::FullJitter;
    }
    let mut now = Instant::now();
    let (Ok(topic), Ok(channel)) = (Topic::new("t"), Channel::new("c")) else {
        return;
    };
    let mut c = ConsumerState::new(topic, channel, Arc::new(config), now);
    let _ = c.connect_to_nsqlookupd("127.0.0.1:4161", now);
    let mut max = u64::from(input.max_in_flight);
    let mut dialled: Vec<ConnId> = Vec::new();
    let mut conns: BTreeMap<ConnId, Conn> = BTreeMap::new();
    // Lookupd query connections not yet answered, oldest first, and all there were.
    let mut queries: Vec<ConnId> = Vec::new();
    let mut query_conns: Vec<ConnId> = Vec::new();
    let mut pending: Vec<(ConnId, Message)> = Vec::new();
    // Messages delivered and not answered (nor their connection closed), by id.
    let mut live: Vec<(ConnId, MessageId)> = Vec::new();
    let mut next_id = 0u32;
    let mut stopped = false;
    // Connections the consumer reported as disconnected.
    let mut gone: Vec<ConnId> = Vec::new();
    let pick = |v: &[ConnId], i: u8| v.get(usize::from(i) % v.len().max(1)).copied();
    let addr = |i: u8| format!("127.0.0.{}:4150", i % 4);
    let mut frame = BytesMut::new();
    for op in input.ops {
        let mut advanced = false;
        match op {
            Op::Connect(i) => {
                let _ = c.connect_to_nsqd(&addr(i), now);
            }
            Op::Disconnect(i) => {
                let _ = c.disconnect_from_nsqd(&addr(i), now);
            }
            Op::Accept { conn: i, max_rdy_count } => {
                if let Some(conn) = pick(&dialled, i) {
                    c.handle_connected(conn, now);
                    if let Some(k) = conns.get_mut(&conn) {
                        k.connected = k.open;
                        if k.open && !k.fed {
                            // This answer completes the handshake (a later one would not).
                            let m = if max_rdy_count > 0 { u32::from(max_rdy_count) } else { DEFAULT_MAX_RDY_COUNT };
                            k.max_rdy = Some(m);
                        }
                        k.fed = true;
                    }
                    frame.clear();
                    let identify = if max_rdy_count > 0 {
                        Bytes::from(format!(r#"{{"max_rdy_count":{max_rdy_count}}}"#))
                    } else {
                        Bytes::from_static(b"OK")
                    };
                    Frame::Response(identify).encode(&mut frame);
                    Frame::Response(Bytes::from_static(b"OK")).encode(&mut frame);
                    c.handle_input(conn, now, frame.split());
                }
            }
            Op::Deliver { conn: i, attempts } => {
                if let Some(conn) = pick(&dialled, i) {
                    next_id += 1;
                    let mut id = [b'0'; 16];
                    id[..8].copy_from_slice(format!("{next_id:08x}").as_bytes());
                    let msg = Message { id: MessageId(id), timestamp: 0, attempts, body: Bytes::from_static(b"m") };
                    fed(&mut conns, conn);
                    frame.clear();
                    Frame::Message(msg).encode(&mut frame);
                    c.handle_input(conn, now, frame.split());
                }
            }
            Op::Frames { conn: i, frames } => {
                if let Some(conn) = pick(&dialled, i) {
                    fed(&mut conns, conn);
                    frame.clear();
                    for f in &frames {
                        f.encode(&mut frame);
                    }
                    c.handle_input(conn, now, frame.split());
                }
            }
            Op::Input(i, bytes) => {
                if let Some(conn) = pick(&dialled, i) {
                    fed(&mut conns, conn);
                    c.handle_input(conn, now, BytesMut::from(&bytes.0[..]));
                }
            }
            Op::Eof(i) => {
                if let Some(conn) = pick(&dialled, i) {
                    c.handle_eof(conn, now);
                }
            }
            Op::ConnectFailed(i) => {
                if let Some(conn) = pick(&dialled, i) {
                    connect_failed(&mut c, conn, now);
                }
            }
            Op::Answer(i, kind) => {
                if !pending.is_empty() {
                    let (conn, m) = pending.swap_remove(usize::from(i) % pending.len());
                    let response = match kind % 4 {
                        0 => Response::Finish,
                        1 => Response::Requeue { delay: None, backoff: true },
                        2 => Response::Requeue { delay: Some(Duration::ZERO), backoff: false },
                        _ => Response::Touch,
                    };
                    let ok = c.respond(conn, &m.id, m.attempts, response, now).is_ok();
                    // Only a delivered, unanswered message can be answered.
                    let was_live = live.iter().position(|x| *x == (conn, m.id));
                    assert!(!ok || was_live.is_some(), "answered {} on {conn}, not delivered or answered", m.id);
                    if let (true, Some(i), false) = (ok, was_live, response == Response::Touch) {
                        live.swap_remove(i);
                    }
                    if response == Response::Touch && ok {
                        pending.push((conn, m));
                    }
                }
            }
            Op::MaxInFlight(n) => {
                max = u64::from(n);
                c.change_max_in_flight(u32::from(n), now);
            }
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms % 600_000));
                c.handle_timeout(now);
                advanced = true;
            }
            Op::Lookupd(producers) => {
                if !queries.is_empty() {
                    let q = queries.remove(0);
                    lookupd_answer(&mut c, q, Some(lookupd_response(&producers)), now);
                }
            }
            Op::LookupdRaw(bytes) => {
                if !queries.is_empty() {
                    let q = queries.remove(0);
                    lookupd_answer(&mut c, q, Some(Bytes::from(bytes.0)), now);
                }
            }
            Op::LookupdFailed => {
                if !queries.is_empty() {
                    let q = queries.remove(0);
                    lookupd_answer(&mut c, q, None, now);
                }
            }
            Op::Stop => c.stop(now),
        }
        while let Some(action) = c.poll_action() {
            match action {
                Action::Connect { conn, addr, .. } if addr == "127.0.0.1:4161" => {
                    queries.push(conn);
                    query_conns.push(conn);
                }
                Action::Connect { conn, .. } => {
                    assert!(!c.is_stopped(), "a dial after stop completed");
                    dialled.push(conn);
                    conns.insert(conn, Conn { open: true, ..Conn::default() });
                }
                Action::Close { conn } if query_conns.contains(&conn) => queries.retain(|q| *q != conn),
                Action::Close { conn } => {
                    let k = conns.get_mut(&conn);
                    assert!(k.as_ref().is_some_and(|k| k.open), "closed {conn} twice, or one never dialled");
                    if let Some(k) = k {
                        k.open = false;
                    }
                }
            }
        }
        while let Some((conn, bytes)) = c.poll_transmit() {
            if query_conns.contains(&conn) {
                continue;
            }
            let k = conns.get_mut(&conn);
            assert!(k.as_ref().is_some_and(|k| k.connected), "bytes for {conn}, which is not connected");
            if let Some(k) = k.filter(|k| k.open) {
                let (rdy, cls) = scan(&bytes);
                k.wire_rdy = if cls { 0 } else { rdy.unwrap_or(k.wire_rdy) };
            }
        }
        while let Some(event) = c.poll_event() {
            assert!(!stopped, "an event after Stopped: {event:?}");
            match event {
                ConsumerEvent::Message { conn, message } => {
                    assert!(!gone.contains(&conn), "a message on {conn} after its Disconnected");
                    if !live.contains(&(conn, message.id)) {
                        live.push((conn, message.id));
                    }
                    pending.push((conn, message));
                }
                ConsumerEvent::Disconnected { conn, .. } => {
                    assert!(!gone.contains(&conn), "{conn} disconnected twice");
                    gone.push(conn);
                    pending.retain(|(p, _)| *p != conn);
                    live.retain(|(p, _)| *p != conn);
                }
                ConsumerEvent::Stopped => stopped = true,
                _ => {}
            }
        }
        assert_eq!(stopped, c.is_stopped());
        let limit = if c.in_backoff() { 1 } else { max };
        assert!(c.total_rdy() <= limit, "RDY {} > {limit}", c.total_rdy());
        let mut sum = 0;
        let mut wire = 0;
        for (id, k) in &conns {
            let rdy = c.rdy(*id);
            assert_eq!(rdy.is_some(), k.open, "{id} open for one side only");
            let rdy = rdy.unwrap_or(0);
            if let Some(m) = k.max_rdy {
                assert!(rdy <= m, "{id} has RDY {rdy} > its max_rdy_count {m}");
            }
            sum += u64::from(rdy);
            if k.open {
                wire += u64::from(k.wire_rdy);
            }
        }
        assert_eq!(sum, c.total_rdy(), "total RDY is not the sum over connections");
        assert!(wire <= limit, "RDY written to sockets {wire} > {limit}");
        match c.poll_timeout() {
            // A due timer fires in handle_timeout; anything else arms timers in the future.
            Some(t) if advanced => assert!(t > now, "an expired timer left armed"),
            Some(t) => assert!(t >= now, "a timer armed in the past"),
            None => {}
        }
        if stopped {
            assert!(c.poll_timeout().is_none(), "a timer armed after stop");
        }
    }
}
