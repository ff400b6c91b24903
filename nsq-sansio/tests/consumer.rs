//! `ConsumerState` in virtual time: a scripted driver plays nsqd and lookupd, asserts commands.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nsq_sansio::{
    Action, Channel, Config, ConnId, ConnectionError, ConsumerError, ConsumerEvent, ConsumerState, Frame, Message,
    MessageId, QueryId, Response, Topic,
};
use proptest::prelude::*;

fn frame(f: Frame) -> BytesMut {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    b
}

fn ok() -> BytesMut {
    frame(Frame::Response(Bytes::from_static(b"OK")))
}

/// The scripted world around one `ConsumerState`.
struct Sim {
    consumer: ConsumerState,
    now: Instant,
    start: Instant,
    /// Connections the consumer asked for, by id, with their address.
    dialled: BTreeMap<ConnId, String>,
    /// What each connection wrote.
    written: BTreeMap<ConnId, Vec<u8>>,
    closed: Vec<ConnId>,
    queries: Vec<(QueryId, String)>,
    events: Vec<ConsumerEvent>,
    next_msg: u64,
}

impl Sim {
    fn new(cfg: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::new();
        cfg(&mut config);
        let now = Instant::now();
        let consumer = ConsumerState::new(Topic::new("t").unwrap(), Channel::new("c").unwrap(), Arc::new(config), now);
        Self {
            consumer,
            now,
            start: now,
            dialled: BTreeMap::new(),
            written: BTreeMap::new(),
            closed: Vec::new(),
            queries: Vec::new(),
            events: Vec::new(),
            next_msg: 0,
        }
    }

    fn drain(&mut self) {
        while let Some(action) = self.consumer.poll_action() {
            match action {
                Action::Connect { conn, addr } => {
                    self.dialled.insert(conn, addr);
                }
                Action::Close { conn } => self.closed.push(conn),
                Action::QueryLookupd { query, addr, request } => {
                    assert!(request.starts_with(b"GET /lookup?topic=t "), "{request:?}");
                    self.queries.push((query, addr));
                }
                other => panic!("{other:?}"),
            }
        }
        while let Some((conn, bytes)) = self.consumer.poll_transmit() {
            self.written.entry(conn).or_default().extend_from_slice(&bytes);
        }
        while let Some(e) = self.consumer.poll_event() {
            self.events.push(e);
        }
    }

    /// Plays nsqd for `conn`: socket connected, IDENTIFY answered (plain OK), SUB answered.
    fn accept(&mut self, conn: ConnId) {
        self.consumer.handle_connected(conn, self.now);
        self.drain();
        self.input(conn, ok());
        self.input(conn, ok());
    }

    fn connect(&mut self, addr: &str) -> ConnId {
        self.consumer.connect_to_nsqd(addr, self.now).unwrap();
        self.drain();
        let conn = *self.dialled.iter().rev().find(|(_, a)| *a == addr).unwrap().0;
        self.accept(conn);
        conn
    }

    fn input(&mut self, conn: ConnId, bytes: BytesMut) {
        self.consumer.handle_input(conn, self.now, bytes);
        self.drain();
    }

    fn deliver(&mut self, conn: ConnId, attempts: u16) -> Message {
        self.next_msg += 1;
        let mut id = [b'0'; 16];
        id[..8].copy_from_slice(format!("{:08}", self.next_msg).as_bytes());
        let msg = Message { id: MessageId(id), timestamp: 1, attempts, body: Bytes::from_static(b"body") };
        self.input(conn, frame(Frame::Message(msg.clone())));
        msg
    }

    fn respond(&mut self, conn: ConnId, msg: &Message, response: Response) {
        self.consumer.respond(conn, &msg.id, msg.attempts, response, self.now).unwrap();
        self.drain();
    }

    /// Moves virtual time forward to `at`, firing every timer on the way, and answering
    /// heartbeats so read timeouts stay away.
    fn advance_to(&mut self, at: Instant) {
        while let Some(t) = self.consumer.poll_timeout().filter(|&t| t <= at) {
            self.now = self.now.max(t);
            self.consumer.handle_timeout(self.now);
            self.drain();
        }
        self.now = self.now.max(at);
        let live: Vec<ConnId> = self.live();
        for conn in live {
            self.input(conn, frame(Frame::Response(Bytes::from_static(b"_heartbeat_"))));
        }
    }

    fn advance(&mut self, d: Duration) {
        let at = self.now + d;
        self.advance_to(at);
    }

    fn live(&self) -> Vec<ConnId> {
        self.dialled.keys().filter(|c| !self.closed.contains(c)).copied().collect()
    }

    /// Every `RDY n` a connection wrote, in order.
    fn rdys(&self, conn: ConnId) -> Vec<u32> {
        let text = String::from_utf8_lossy(self.written.get(&conn).map_or(&[][..], |w| &w[..])).into_owned();
        text.split('\n').filter_map(|l| l.strip_prefix("RDY ")).map(|n| n.parse().unwrap()).collect()
    }

    fn last_rdy(&self, conn: ConnId) -> u32 {
        self.rdys(conn).last().copied().unwrap_or(0)
    }

    fn wrote(&self, conn: ConnId, line: &str) -> bool {
        self.written.get(&conn).is_some_and(|w| String::from_utf8_lossy(w).contains(line))
    }

    fn messages(&self) -> usize {
        self.events.iter().filter(|e| matches!(e, ConsumerEvent::Message { .. })).count()
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }
}

#[test]
fn subscribes_then_sends_its_rdy_share() {
    let mut sim = Sim::new(|c| {
        c.set("max_in_flight", "10").unwrap();
    });
    let a = sim.connect("127.0.0.1:4150");
    assert!(sim.wrote(a, "SUB t c\n"));
    assert_eq!(sim.rdys(a), [10]);
    assert!(matches!(sim.events[..], [ConsumerEvent::Connected { conn, .. }] if conn == a));
    // A second connection lowers the first one's share, then takes its own.
    let b = sim.connect("127.0.0.2:4150");
    assert_eq!(sim.rdys(a), [10, 5]);
    assert_eq!(sim.rdys(b), [5]);
    assert_eq!(sim.consumer.total_rdy(), 10);
    assert_eq!(sim.consumer.stats().connections, 2);
    assert_eq!(
        sim.consumer.connect_to_nsqd("127.0.0.1:4150", sim.now),
        Err(ConsumerError::AlreadyConnected("127.0.0.1:4150".into()))
    );
    assert!(matches!(sim.consumer.connect_to_nsqd("nope", sim.now), Err(ConsumerError::BadAddress { .. })));
}

#[test]
fn more_connections_than_max_in_flight_rotate_rdy() {
    let mut sim = Sim::new(|c| {
        c.set("max_in_flight", "1").unwrap();
    });
    let conns: Vec<ConnId> = (1..=3).map(|i| sim.connect(&format!("127.0.0.{i}:4150"))).collect();
    assert_eq!(sim.consumer.total_rdy(), 1, "never more RDY than max_in_flight");
    let holder = *conns.iter().find(|&&c| sim.last_rdy(c) == 1).unwrap();
    // The holder goes idle: after low_rdy_idle_timeout a redistribution moves RDY around.
    let mut holders = HashSet::from([holder]);
    for _ in 0..20 {
        sim.advance(Duration::from_secs(11));
        assert!(sim.consumer.total_rdy() <= 1);
        if let Some(&c) = conns.iter().find(|&&c| sim.last_rdy(c) == 1) {
            holders.insert(c);
        }
    }
    assert!(holders.len() >= 2, "RDY rotated among connections: {holders:?}");
}

#[test]
fn backoff_sequence_is_exponential_and_recovers() {
    let mut sim = Sim::new(|c| {
        c.set("max_in_flight", "4").unwrap();
    });
    let a = sim.connect("127.0.0.1:4150");
    let b = sim.connect("127.0.0.2:4150");
    let m = sim.deliver(a, 1);
    let t0 = sim.now;
    sim.respond(a, &m, Response::Requeue { delay: None, backoff: true });
    assert!(sim.wrote(a, &format!("REQ {} 90000\n", m.id)), "default delay × attempts");
    assert!(sim.consumer.in_backoff());
    assert_eq!((sim.last_rdy(a), sim.last_rdy(b)), (0, 0), "RDY 0 everywhere");

    // After 2 s (backoff_multiplier × 2^1) one connection gets RDY 1 as a test.
    sim.advance_to(t0 + Duration::from_millis(1999));
    assert_eq!(sim.consumer.total_rdy(), 0);
    sim.advance_to(t0 + Duration::from_secs(2));
    assert_eq!(sim.consumer.total_rdy(), 1);
    let probe = if sim.last_rdy(a) == 1 { a } else { b };

    // The test message fails: level 2, 4 s.
    let m = sim.deliver(probe, 1);
    let t1 = sim.now;
    sim.respond(probe, &m, Response::Requeue { delay: Some(Duration::ZERO), backoff: true });
    assert_eq!(sim.consumer.total_rdy(), 0);
    sim.advance_to(t1 + Duration::from_millis(3999));
    assert_eq!(sim.consumer.total_rdy(), 0);
    sim.advance_to(t1 + Duration::from_secs(4));
    assert_eq!(sim.consumer.total_rdy(), 1);
    let probe = if sim.last_rdy(a) == 1 { a } else { b };

    // A success steps down to level 1 (2 s), another leaves backoff and restores RDY.
    let m = sim.deliver(probe, 1);
    let t2 = sim.now;
    sim.respond(probe, &m, Response::Finish);
    assert!(sim.consumer.in_backoff());
    assert_eq!(sim.consumer.total_rdy(), 0);
    sim.advance_to(t2 + Duration::from_secs(2));
    let probe = if sim.last_rdy(a) == 1 { a } else { b };
    let m = sim.deliver(probe, 1);
    sim.respond(probe, &m, Response::Finish);
    assert!(!sim.consumer.in_backoff());
    assert_eq!((sim.last_rdy(a), sim.last_rdy(b)), (2, 2));
}

#[test]
fn backoff_is_capped_by_max_backoff_duration() {
    let mut sim = Sim::new(|c| {
        c.set("max_in_flight", "1").unwrap();
    });
    let a = sim.connect("127.0.0.1:4150");
    let mut waits = Vec::new();
    for _ in 0..10 {
        let m = sim.deliver(a, 1);
        let start = sim.now;
        sim.respond(a, &m, Response::Requeue { delay: Some(Duration::ZERO), backoff: true });
        while sim.last_rdy(a) == 0 {
            sim.advance(Duration::from_millis(500));
        }
        waits.push((sim.now - start).as_secs());
    }
    // go-nsq's exponential: 2, 4, ... doubling until the next step would pass 120 s.
    assert_eq!(waits, [2, 4, 8, 16, 32, 64, 64, 64, 64, 64]);
}

#[test]
fn requeue_without_backoff_does_not_back_off() {
    let mut sim = Sim::new(|c| {
        c.set("max_attempts", "0").unwrap();
    });
    let a = sim.connect("127.0.0.1:4150");
    let m = sim.deliver(a, 3);
    sim.respond(a, &m, Response::Requeue { delay: None, backoff: false });
    assert!(!sim.consumer.in_backoff());
    assert_eq!(sim.last_rdy(a), 1);
    assert!(sim.wrote(a, &format!("REQ {} 270000\n", m.id)));
    let m = sim.deliver(a, 50);
    sim.respond(a, &m, Response::Requeue { delay: None, backoff: false });
    assert!(sim.wrote(a, &format!("REQ {} 900000\n", m.id)), "capped at max_requeue_delay");
}

#[test]
fn messages_past_max_attempts_are_finished_and_handed_to_the_failed_hook() {
    let mut sim = Sim::new(|_| {});
    let a = sim.connect("127.0.0.1:4150");
    let ok = sim.deliver(a, 5);
    let bad = sim.deliver(a, 6);
    assert!(sim.wrote(a, &format!("FIN {}\n", bad.id)));
    assert!(!sim.wrote(a, &format!("FIN {}\n", ok.id)));
    assert_eq!(sim.messages(), 1);
    assert!(sim.events.iter().any(|e| matches!(e, ConsumerEvent::GaveUp { message, .. } if message.id == bad.id)));
    assert_eq!(sim.consumer.stats().messages_received, 2);
}

#[test]
fn a_message_is_answered_at_most_once() {
    let mut sim = Sim::new(|_| {});
    let a = sim.connect("127.0.0.1:4150");
    let m = sim.deliver(a, 1);
    sim.respond(a, &m, Response::Finish);
    assert!(sim.consumer.respond(a, &m.id, 1, Response::Finish, sim.now).is_err());
    assert!(sim.consumer.respond(a, &m.id, 1, Response::Touch, sim.now).is_err());
}

#[test]
fn stop_drains_in_flight_messages_then_closes() {
    let mut sim = Sim::new(|c| {
        c.set("max_in_flight", "5").unwrap();
    });
    let a = sim.connect("127.0.0.1:4150");
    let m = sim.deliver(a, 1);
    sim.consumer.stop(sim.now);
    sim.drain();
    let written = String::from_utf8_lossy(&sim.written[&a]).into_owned();
    assert!(written.ends_with("RDY 0\nCLS\n"), "{written:?}");
    sim.input(a, frame(Frame::Response(Bytes::from_static(b"CLOSE_WAIT"))));
    assert!(!sim.consumer.is_stopped(), "waits for the in-flight message");
    sim.respond(a, &m, Response::Finish);
    assert!(sim.consumer.is_stopped());
    assert_eq!(sim.closed, [a]);
    assert!(matches!(sim.events.last(), Some(ConsumerEvent::Stopped)));
    assert!(matches!(sim.consumer.connect_to_nsqd("127.0.0.9:1", sim.now), Err(ConsumerError::Stopped)));
}

#[test]
fn stop_gives_up_on_stuck_handlers_after_a_bound() {
    let mut sim = Sim::new(|_| {});
    let a = sim.connect("127.0.0.1:4150");
    let _m = sim.deliver(a, 1);
    sim.consumer.stop(sim.now);
    sim.drain();
    sim.input(a, frame(Frame::Response(Bytes::from_static(b"CLOSE_WAIT"))));
    sim.advance(Duration::from_secs(31));
    assert!(sim.consumer.is_stopped());
}

#[test]
fn a_dropped_direct_nsqd_is_redialled_with_backoff() {
    let mut sim = Sim::new(|_| {});
    let a = sim.connect("127.0.0.1:4150");
    sim.consumer.handle_eof(a, sim.now);
    sim.drain();
    assert_eq!(sim.closed, [a]);
    assert!(sim.events.iter().any(
        |e| matches!(e, ConsumerEvent::Disconnected { conn, error: ConnectionError::ServerClosed, .. } if *conn == a)
    ));
    // Redials fail twice: 1 s, then 2 s, then 4 s later.
    let mut dial_times = Vec::new();
    let mut last = a;
    for _ in 0..3 {
        let before = sim.dialled.len();
        while sim.dialled.len() == before {
            sim.advance(Duration::from_millis(100));
        }
        let conn = *sim.dialled.keys().last().unwrap();
        assert_ne!(conn, last, "a new ConnId for every dial");
        last = conn;
        dial_times.push(sim.elapsed());
        sim.consumer.handle_connect_failed(conn, "refused".into(), sim.now);
        sim.drain();
    }
    let secs: Vec<u64> = dial_times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64().round() as u64).collect();
    assert_eq!(secs, [2, 4]);
    // Removing the address stops the redials.
    sim.consumer.disconnect_from_nsqd("127.0.0.1:4150", sim.now).unwrap();
    let dialled = sim.dialled.len();
    sim.advance(Duration::from_secs(120));
    assert_eq!(sim.dialled.len(), dialled);
}

fn lookup_response(producers: &[(&str, u16)]) -> Bytes {
    let list: Vec<String> = producers
        .iter()
        .map(|(host, port)| {
            format!(
                r#"{{"remote_address":"{host}:1","hostname":"h","broadcast_address":"{host}","tcp_port":{port},"http_port":4151,"version":"1.3.0"}}"#
            )
        })
        .collect();
    let body = format!(r#"{{"channels":["c"],"producers":[{}]}}"#, list.join(","));
    Bytes::from(format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
}

#[test]
fn lookupd_discovers_producers_and_polls_on_an_interval() {
    let mut sim = Sim::new(|_| {});
    sim.consumer.connect_to_nsqlookupd("127.0.0.1:4161", sim.now).unwrap();
    sim.drain();
    assert_eq!(sim.queries.len(), 1, "first query at once");
    let (q, addr) = sim.queries[0].clone();
    assert_eq!(addr, "127.0.0.1:4161");
    sim.consumer.handle_lookupd_response(q, Ok(lookup_response(&[("10.0.0.1", 4150), ("10.0.0.2", 4150)])), sim.now);
    sim.drain();
    let addrs: Vec<&String> = sim.dialled.values().collect();
    assert_eq!(addrs, ["10.0.0.1:4150", "10.0.0.2:4150"]);
    let conns: Vec<ConnId> = sim.dialled.keys().copied().collect();
    for &c in &conns {
        sim.accept(c);
    }
    // The next poll comes after the interval plus up to 30% jitter.
    let t0 = sim.now;
    while sim.queries.len() == 1 {
        sim.advance(Duration::from_secs(1));
    }
    let waited = sim.now - t0;
    assert!(waited >= Duration::from_secs(60) && waited <= Duration::from_secs(79), "{waited:?}");
    // Known producers are not dialled twice; a new one is.
    let (q, _) = sim.queries[1].clone();
    sim.consumer.handle_lookupd_response(q, Ok(lookup_response(&[("10.0.0.2", 4150), ("10.0.0.3", 4150)])), sim.now);
    sim.drain();
    assert_eq!(sim.dialled.len(), 3);
    // A lookupd-discovered nsqd that drops is not redialled by itself: lookupd is asked again.
    sim.consumer.handle_eof(conns[0], sim.now);
    sim.drain();
    assert_eq!(sim.queries.len(), 3);
    let (q, _) = sim.queries[2].clone();
    sim.consumer.handle_lookupd_response(q, Ok(lookup_response(&[("10.0.0.2", 4150)])), sim.now);
    sim.drain();
    assert_eq!(sim.dialled.len(), 3, "10.0.0.1 is no longer listed");
    // Errors are reported and retried at the next poll.
    let t1 = sim.now;
    while sim.queries.len() == 3 {
        sim.advance(Duration::from_secs(1));
    }
    assert!(sim.now - t1 <= Duration::from_secs(61));
    let (q, _) = sim.queries[3].clone();
    sim.consumer.handle_lookupd_response(q, Err("connection refused".into()), sim.now);
    sim.consumer.handle_lookupd_response(QueryId(999), Ok(Bytes::new()), sim.now);
    sim.drain();
    assert!(sim.events.iter().any(|e| matches!(e, ConsumerEvent::LookupdFailed { .. })));
}

#[test]
fn max_in_flight_changes_at_runtime() {
    let mut sim = Sim::new(|c| {
        c.set("max_in_flight", "10").unwrap();
    });
    let a = sim.connect("127.0.0.1:4150");
    let b = sim.connect("127.0.0.2:4150");
    sim.consumer.change_max_in_flight(100, sim.now);
    sim.drain();
    assert_eq!((sim.last_rdy(a), sim.last_rdy(b)), (50, 50));
    sim.consumer.change_max_in_flight(2, sim.now);
    sim.drain();
    assert_eq!((sim.last_rdy(a), sim.last_rdy(b)), (1, 1));
    assert!(sim.consumer.total_rdy() <= 2);
}

#[test]
fn a_disconnected_nsqd_gives_its_rdy_back_while_it_drains() {
    let mut sim = Sim::new(|c| {
        c.set("max_in_flight", "10").unwrap();
    });
    let a = sim.connect("127.0.0.1:4150");
    let b = sim.connect("127.0.0.2:4150");
    // A message in flight keeps the connection draining after CLS.
    let msg = sim.deliver(a, 1);
    sim.consumer.disconnect_from_nsqd("127.0.0.1:4150", sim.now).unwrap();
    sim.drain();
    // nsqd delivers nothing after CLS: RDY 0 goes first, and the count is released.
    assert!(sim.wrote(a, "RDY 0\nCLS\n"));
    assert_eq!(sim.consumer.total_rdy(), 5);
    sim.consumer.change_max_in_flight(4, sim.now);
    sim.drain();
    assert_eq!(sim.last_rdy(b), 2);
    assert_eq!(sim.consumer.total_rdy(), 2, "a draining connection holds no RDY");
    sim.respond(a, &msg, Response::Finish);
    assert!(sim.wrote(a, "FIN "));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// For random connection events, max_in_flight changes and message outcomes, the RDY sum
    /// never exceeds max_in_flight and no message is answered twice.
    #[test]
    fn rdy_never_exceeds_max_in_flight(
        max in 1u32..6,
        ops in prop::collection::vec((0u8..9, 0u8..4, 0u16..8), 1..120),
    ) {
        let mut sim = Sim::new(|c| { c.set("max_in_flight", &max.to_string()).unwrap(); });
        let mut max_in_flight = max;
        let mut in_flight: Vec<(ConnId, Message)> = Vec::new();
        let mut answered = HashSet::new();
        for (op, k, n) in ops {
            let live = sim.live();
            match op {
                0 if live.len() < 4 => { sim.connect(&format!("127.0.0.{}:4150", sim.dialled.len() + 1)); }
                1 if !live.is_empty() => {
                    let conn = live[usize::from(k) % live.len()];
                    if sim.last_rdy(conn) > 0 {
                        let m = sim.deliver(conn, n.max(1));
                        if sim.events.iter().any(|e| matches!(e, ConsumerEvent::Message { message, .. } if message.id == m.id)) {
                            in_flight.push((conn, m));
                        }
                    }
                }
                2..=4 if !in_flight.is_empty() => {
                    let (conn, m) = in_flight.remove(usize::from(k) % in_flight.len());
                    let response = match op {
                        2 => Response::Finish,
                        3 => Response::Requeue { delay: None, backoff: true },
                        _ => Response::Requeue { delay: Some(Duration::ZERO), backoff: false },
                    };
                    let result = sim.consumer.respond(conn, &m.id, m.attempts, response, sim.now);
                    prop_assert!(answered.insert(m.id) || result.is_err(), "answered twice");
                    sim.drain();
                }
                5 if !live.is_empty() => {
                    let conn = live[usize::from(k) % live.len()];
                    sim.consumer.handle_eof(conn, sim.now);
                    sim.drain();
                    in_flight.retain(|(c, _)| *c != conn);
                }
                6 => {
                    max_in_flight = u32::from(n) + 1;
                    sim.consumer.change_max_in_flight(max_in_flight, sim.now);
                    sim.drain();
                }
                7 => sim.advance(Duration::from_millis(u64::from(n) * 700)),
                _ => {
                    for conn in sim.dialled.keys().copied().collect::<Vec<_>>() {
                        if !sim.closed.contains(&conn) && !sim.written.contains_key(&conn) {
                            sim.accept(conn);
                        }
                    }
                }
            }
            let live_rdy: u64 = sim.live().iter().map(|&c| u64::from(sim.last_rdy(c))).sum();
            prop_assert_eq!(live_rdy, sim.consumer.total_rdy());
            prop_assert!(sim.consumer.total_rdy() <= u64::from(max_in_flight),
                "total RDY {} > max_in_flight {}", sim.consumer.total_rdy(), max_in_flight);
        }
    }
}
