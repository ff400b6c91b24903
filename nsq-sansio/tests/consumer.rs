//! `ConsumerState` in virtual time: a scripted driver plays nsqd and lookupd, asserts commands.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nsq_sansio::{
    Action, Channel, Config, ConnId, ConnectionError, ConsumerError, ConsumerEvent, ConsumerState, ErrorCode, Frame,
    LookupdError, Message, MessageId, Response, ServerError, Topic,
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

fn refused() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
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
    /// Lookupd queries (connections to a `:4161` address), with their address.
    queries: Vec<(ConnId, String)>,
    events: Vec<ConsumerEvent>,
    next_msg: u64,
}

impl Sim {
    fn new(cfg: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::new();
        config.rng_seed(1);
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
                Action::Connect { conn, addr, local_addr, .. } if addr.ends_with(":4161") => {
                    assert_eq!(local_addr, None, "lookupd queries are not bound to local_addr");
                    self.queries.push((conn, addr));
                }
                Action::Connect { conn, addr, .. } => {
                    self.dialled.insert(conn, addr);
                }
                Action::Close { conn } => self.closed.push(conn),
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
fn a_raise_waits_until_the_lower_it_needs_is_written() {
    let mut sim = Sim::new(|c| {
        c.set("max_in_flight", "2").unwrap();
    });
    let a = sim.connect("127.0.0.1:4150");
    assert_eq!(sim.rdys(a), [2]);
    // B subscribes while A's socket is busy writing (the adapter does not poll A): A's lower
    // to 1 waits in A's queue, so B's raise to 1 must wait too, or nsqd would see 3 > 2.
    sim.consumer.connect_to_nsqd("127.0.0.2:4150", sim.now).unwrap();
    while let Some(action) = sim.consumer.poll_action() {
        if let Action::Connect { conn, addr, .. } = action {
            sim.dialled.insert(conn, addr);
        }
    }
    let b = *sim.dialled.keys().last().unwrap();
    sim.consumer.handle_connected(b, sim.now);
    let mut wrote_b = Vec::new();
    let poll_b = |sim: &mut Sim, wrote_b: &mut Vec<u8>| {
        while let Some(bytes) = sim.consumer.poll_transmit_for(b) {
            wrote_b.extend_from_slice(&bytes);
        }
    };
    poll_b(&mut sim, &mut wrote_b);
    sim.consumer.handle_input(b, sim.now, ok());
    poll_b(&mut sim, &mut wrote_b);
    sim.consumer.handle_input(b, sim.now, ok());
    poll_b(&mut sim, &mut wrote_b);
    assert!(
        String::from_utf8_lossy(&wrote_b).ends_with("SUB t c\n"),
        "no RDY yet: {:?}",
        String::from_utf8_lossy(&wrote_b)
    );
    // A's write finishes: its lower goes out, and then B's raise.
    let a_bytes = sim.consumer.poll_transmit_for(a).unwrap();
    assert_eq!(a_bytes, "RDY 1\n");
    poll_b(&mut sim, &mut wrote_b);
    assert!(String::from_utf8_lossy(&wrote_b).ends_with("RDY 1\n"));
    assert_eq!(sim.consumer.total_rdy(), 2);
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
    let mut turns = vec![holder];
    for _ in 0..30 {
        sim.advance(Duration::from_secs(11));
        assert!(sim.consumer.total_rdy() <= 1);
        if let Some(&c) = conns.iter().find(|&&c| sim.last_rdy(c) == 1) {
            if turns.last() != Some(&c) {
                turns.push(c);
            }
        }
    }
    // In turn: the one that waited longest goes next, so no connection (and the messages
    // waiting on its nsqd) is passed over.
    assert!(turns.len() >= 9, "RDY rotated: {turns:?}");
    for window in turns.windows(3) {
        let distinct: HashSet<&ConnId> = window.iter().collect();
        assert_eq!(distinct.len(), 3, "every connection within three turns: {turns:?}");
    }
}

#[test]
fn a_freed_slot_goes_to_a_connection_without_rdy() {
    // More connections than max_in_flight: one keeps receiving messages and so keeps its RDY;
    // the others go idle in turn and pass the second slot around. A slot that frees up must go
    // to a connection holding none: RDY 1 to the one that holds it changes nothing, and would
    // leave the slot unused while messages wait on another nsqd.
    let mut sim = Sim::new(|c| {
        c.set("max_in_flight", "2").unwrap();
        c.set("low_rdy_timeout", "5m").unwrap();
    });
    let conns: Vec<ConnId> = (1..=3).map(|i| sim.connect(&format!("127.0.0.{i}:4150"))).collect();
    assert_eq!(sim.consumer.total_rdy(), 2);
    let busy = *conns.iter().find(|&&c| sim.last_rdy(c) == 1).unwrap();
    let mut holders: HashSet<ConnId> = HashSet::new();
    for second in 0..120 {
        if second % 2 == 0 {
            let m = sim.deliver(busy, 1);
            sim.respond(busy, &m, Response::Finish);
        }
        sim.advance(Duration::from_secs(1));
        let rdy: Vec<u32> = conns.iter().map(|&c| sim.last_rdy(c)).collect();
        assert_eq!(sim.consumer.total_rdy(), 2, "both slots in use at {second} s: {rdy:?}");
        assert_eq!(sim.last_rdy(busy), 1, "the busy connection keeps its RDY");
        holders.extend(conns.iter().copied().filter(|&c| c != busy && sim.last_rdy(c) == 1));
    }
    assert_eq!(holders.len(), 2, "the second slot went round both idle connections");
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
    // An answer after the connection ended says so, not "not in flight".
    let m = sim.deliver(a, 1);
    sim.consumer.handle_eof(a, sim.now);
    sim.drain();
    assert_eq!(
        sim.consumer.respond(a, &m.id, 1, Response::Finish, sim.now),
        Err(ConsumerError::Command(nsq_sansio::CommandError::Closed))
    );
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
fn a_dropped_direct_nsqd_is_redialled_with_jittered_backoff() {
    let mut sim = Sim::new(|_| {});
    let a = sim.connect("127.0.0.1:4150");
    sim.consumer.handle_eof(a, sim.now);
    sim.drain();
    assert_eq!(sim.closed, [a]);
    assert!(sim.events.iter().any(
        |e| matches!(e, ConsumerEvent::Disconnected { conn, error: ConnectionError::ServerClosed, .. } if *conn == a)
    ));
    // Every redial fails: each waits a random time in [d/2, d), d = 1 s doubling up to the cap
    // (lookupd_poll_interval, 60 s).
    let mut last = (a, sim.now);
    for n in 1..=9u32 {
        let before = sim.dialled.len();
        while sim.dialled.len() == before {
            sim.advance(Duration::from_millis(10));
        }
        let conn = *sim.dialled.keys().last().unwrap();
        assert_ne!(conn, last.0, "a new ConnId for every dial");
        let waited = sim.now - last.1;
        let d = Duration::from_secs(1 << (n - 1)).min(Duration::from_secs(60));
        assert!(waited >= d / 2 && waited <= d + Duration::from_millis(10), "redial {n} after {waited:?}, d = {d:?}");
        sim.consumer.handle_connect_failed(conn, refused(), sim.now);
        sim.drain();
        match sim.events.last() {
            Some(ConsumerEvent::ConnectFailed {
                conn: c,
                error: ConnectionError::Dial { addr, error },
                retry_at: Some(at),
                ..
            }) => {
                assert_eq!(
                    (*c, addr.as_str(), error.kind()),
                    (conn, "127.0.0.1:4150", std::io::ErrorKind::ConnectionRefused)
                );
                assert!(*at > sim.now);
            }
            other => panic!("{other:?}"),
        }
        last = (conn, sim.now);
    }
    // Removing the address stops the redials.
    sim.consumer.disconnect_from_nsqd("127.0.0.1:4150", sim.now).unwrap();
    let dialled = sim.dialled.len();
    sim.advance(Duration::from_secs(120));
    assert_eq!(sim.dialled.len(), dialled);
}

#[test]
fn redial_jitter_differs_between_consumers() {
    // Two consumers with the default seed (from the OS) lose a connection at the same instant;
    // their redials do not come at the same time.
    let redial_after = |seed: Option<u64>| {
        let mut sim = Sim::new(|c| {
            if let Some(seed) = seed {
                c.rng_seed(seed);
            }
        });
        if seed.is_none() {
            // Undo the fixed seed of the test harness: back to the default.
            sim = Sim::with_config(Config::new());
        }
        let a = sim.connect("127.0.0.1:4150");
        sim.consumer.handle_eof(a, sim.now);
        sim.drain();
        let t = sim.now;
        while sim.dialled.len() == 1 {
            sim.advance(Duration::from_millis(1));
        }
        sim.now - t
    };
    let draws: HashSet<Duration> = (0..8).map(|_| redial_after(None)).collect();
    assert!(draws.len() > 1, "all redials at {draws:?}");
    assert_eq!(redial_after(Some(5)), redial_after(Some(5)), "a fixed seed reproduces");
}

#[test]
fn a_failed_first_connect_is_reported_with_its_cause_and_not_retried() {
    let mut sim = Sim::new(|_| {});
    sim.consumer.connect_to_nsqd("127.0.0.1:4150", sim.now).unwrap();
    sim.drain();
    let conn = *sim.dialled.keys().last().unwrap();
    sim.consumer.handle_connect_failed(conn, refused(), sim.now);
    sim.drain();
    match &sim.events[..] {
        [ConsumerEvent::ConnectFailed { conn: c, addr, error, retry_at: None }] => {
            assert_eq!((*c, addr.as_str()), (conn, "127.0.0.1:4150"));
            assert!(error.to_string().starts_with("dial 127.0.0.1:4150: "), "{error}");
        }
        other => panic!("{other:?}"),
    }
    sim.advance(Duration::from_secs(600));
    assert_eq!(sim.dialled.len(), 1, "not retried");
    // The address is forgotten: it can be given again.
    sim.consumer.connect_to_nsqd("127.0.0.1:4150", sim.now).unwrap();

    // A refused handshake (E_AUTH_FAILED) is a failed first connect too.
    let mut sim = Sim::new(|_| {});
    sim.consumer.connect_to_nsqd("127.0.0.1:4150", sim.now).unwrap();
    sim.drain();
    let conn = *sim.dialled.keys().last().unwrap();
    sim.consumer.handle_connected(conn, sim.now);
    sim.input(conn, frame(Frame::Error(ServerError::parse(b"E_AUTH_FAILED AUTH failed"))));
    match &sim.events[..] {
        [ConsumerEvent::ConnectFailed { error: ConnectionError::Server(e), retry_at: None, .. }] => {
            assert_eq!(e.code, ErrorCode::AuthFailed)
        }
        other => panic!("{other:?}"),
    }
    sim.advance(Duration::from_secs(600));
    assert_eq!(sim.dialled.len(), 1, "not retried");
}

#[test]
fn starved_when_messages_in_flight_reach_85_percent_of_rdy() {
    let mut sim = Sim::new(|c| {
        c.set("max_in_flight", "10").unwrap();
    });
    let a = sim.connect("127.0.0.1:4150");
    assert!(!sim.consumer.is_starved(), "nothing in flight");
    let messages: Vec<Message> = (0..8).map(|_| sim.deliver(a, 1)).collect();
    assert!(sim.consumer.is_starved(), "8 in flight >= 85% of RDY 10");
    sim.respond(a, &messages[0], Response::Finish);
    assert!(!sim.consumer.is_starved(), "7 in flight");
    sim.deliver(a, 1);
    assert!(sim.consumer.is_starved());
    sim.consumer.stop(sim.now);
    sim.drain();
    assert!(!sim.consumer.is_starved(), "a closing connection is not starved");
}

#[test]
fn the_auth_answer_is_reported_with_the_nsqd_address() {
    let mut sim = Sim::new(|c| {
        c.auth_secret("s3cret");
    });
    sim.consumer.connect_to_nsqd("127.0.0.1:4150", sim.now).unwrap();
    sim.drain();
    let conn = *sim.dialled.keys().last().unwrap();
    sim.consumer.handle_connected(conn, sim.now);
    sim.drain();
    let identify = br#"{"max_rdy_count":2500,"msg_timeout":60000,"auth_required":true}"#;
    sim.input(conn, frame(Frame::Response(Bytes::from_static(identify))));
    assert!(sim.wrote(conn, "AUTH\n"));
    sim.input(conn, frame(Frame::Response(Bytes::from_static(br#"{"identity":"bob","permission_count":1}"#))));
    sim.input(conn, ok());
    match &sim.events[..] {
        [ConsumerEvent::Authenticated { conn: c, addr, auth }, ConsumerEvent::Connected { .. }] => {
            assert_eq!(
                (*c, addr.as_str(), auth.identity.as_str(), auth.permission_count),
                (conn, "127.0.0.1:4150", "bob", 1)
            );
        }
        other => panic!("{other:?}"),
    }
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

impl Sim {
    fn with_config(config: Config) -> Self {
        let mut sim = Self::new(|_| {});
        sim.consumer =
            ConsumerState::new(Topic::new("t").unwrap(), Channel::new("c").unwrap(), Arc::new(config), sim.now);
        sim
    }

    /// Answers the last lookupd query with `producers`.
    fn answer(&mut self, producers: &[(&str, u16)]) {
        let (q, _) = self.queries.last().unwrap().clone();
        self.answer_query(q, &lookup_response(producers));
    }

    /// Plays lookupd on query `q`: accepts the connection, reads the request, sends `response`;
    /// the consumer closes the connection once the response is complete.
    fn answer_query(&mut self, q: ConnId, response: &[u8]) {
        self.consumer.handle_connected(q, self.now);
        self.drain();
        let request = String::from_utf8(self.written.get(&q).cloned().unwrap_or_default()).unwrap();
        assert!(request.starts_with("GET /lookup?topic=t HTTP/1.1\r\n"), "{request:?}");
        assert!(request.ends_with("\r\n\r\n"), "{request:?}");
        self.consumer.handle_input(q, self.now, BytesMut::from(response));
        self.drain();
        assert!(self.closed.contains(&q), "the query's connection closes once answered");
    }

    /// Query `q`'s dial is refused.
    fn refuse_query(&mut self, q: ConnId) {
        self.consumer.handle_connect_failed(q, refused(), self.now);
        self.drain();
        assert!(self.closed.contains(&q));
    }

    fn dials_of(&self, addr: &str) -> Vec<ConnId> {
        self.dialled.iter().filter(|(_, a)| *a == addr).map(|(&c, _)| c).collect()
    }
}

#[test]
fn lookupd_discovers_producers_and_polls_on_an_interval() {
    let mut sim = Sim::new(|_| {});
    // The first lookupd is queried when it is added, not when the consumer was made.
    sim.advance(Duration::from_secs(100));
    let t0 = sim.now;
    sim.consumer.connect_to_nsqlookupd("127.0.0.1:4161", sim.now).unwrap();
    sim.drain();
    assert_eq!(sim.queries.len(), 1, "first query at once");
    let (_, addr) = sim.queries[0].clone();
    assert_eq!(addr, "127.0.0.1:4161");
    sim.answer(&[("10.0.0.1", 4150), ("10.0.0.2", 4150)]);
    let addrs: Vec<&String> = sim.dialled.values().collect();
    assert_eq!(addrs, ["10.0.0.1:4150", "10.0.0.2:4150"]);
    let conns: Vec<ConnId> = sim.dialled.keys().copied().collect();
    for &c in &conns {
        sim.accept(c);
    }
    // The next poll comes after the interval plus up to 30% jitter.
    while sim.queries.len() == 1 {
        sim.advance(Duration::from_secs(1));
    }
    let waited = sim.now - t0;
    assert!(waited >= Duration::from_secs(60) && waited <= Duration::from_secs(79), "{waited:?}");
    // Known producers are not dialled twice; a new one is.
    sim.answer(&[("10.0.0.2", 4150), ("10.0.0.3", 4150)]);
    assert_eq!(sim.dialled.len(), 3);
    // A lookupd-discovered nsqd that drops is not redialled by itself: lookupd is asked again,
    // once, within a second.
    sim.advance(Duration::from_secs(20));
    let t1 = sim.now;
    sim.consumer.handle_eof(conns[0], sim.now);
    sim.drain();
    assert_eq!(sim.queries.len(), 2, "not at once");
    while sim.queries.len() == 2 {
        sim.advance(Duration::from_millis(10));
    }
    assert!(sim.now - t1 <= Duration::from_secs(1));
    sim.answer(&[("10.0.0.2", 4150)]);
    assert_eq!(sim.dialled.len(), 3, "10.0.0.1 is no longer listed");
    // Errors are reported and retried at the next poll.
    let t2 = sim.now;
    while sim.queries.len() == 3 {
        sim.advance(Duration::from_secs(1));
    }
    assert!(sim.now - t2 <= Duration::from_secs(61));
    let (q, _) = sim.queries[3].clone();
    sim.refuse_query(q);
    sim.consumer.handle_input(ConnId(999), sim.now, BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]));
    sim.drain();
    assert!(sim.events.iter().any(|e| matches!(e, ConsumerEvent::LookupdFailed { error: LookupdError::Io(e), .. } if e.kind() == std::io::ErrorKind::ConnectionRefused)));
    assert_eq!(sim.queries.len(), 4, "one lookupd: nothing else to try until the next poll");
}

#[test]
fn a_dead_nsqd_that_lookupd_lists_is_dialled_once_per_poll_and_never_causes_a_query() {
    // lookupd lists a live nsqd and one whose port refuses; polls every second.
    let mut sim = Sim::new(|c| {
        c.set("lookupd_poll_interval", "1s").unwrap();
    });
    sim.consumer.connect_to_nsqlookupd("127.0.0.1:4161", sim.now).unwrap();
    sim.drain();
    let listed = [("10.0.0.1", 4150), ("10.0.0.9", 4150)];
    let t0 = sim.now;
    let mut handled = 0;
    while sim.now - t0 < Duration::from_secs(60) {
        // Answer every query, refuse every dial of the dead one, accept the live one.
        while handled < sim.queries.len() {
            handled += 1;
            let (q, _) = sim.queries[handled - 1].clone();
            sim.answer_query(q, &lookup_response(&listed));
        }
        for conn in sim.live() {
            match sim.dialled[&conn].as_str() {
                "10.0.0.9:4150" => {
                    sim.consumer.handle_connect_failed(conn, refused(), sim.now);
                    sim.drain();
                }
                _ if !sim.written.contains_key(&conn) => sim.accept(conn),
                _ => {}
            }
        }
        sim.advance(Duration::from_millis(50));
    }
    // One query at once, then one per interval after the first jittered one: 60 at most.
    assert!(sim.queries.len() <= 61, "{} lookupd queries in a minute", sim.queries.len());
    assert!(sim.queries.len() >= 45, "{} lookupd queries in a minute", sim.queries.len());
    let dead = sim.dials_of("10.0.0.9:4150").len();
    assert!(dead <= sim.queries.len(), "{dead} dials of the dead nsqd for {} polls", sim.queries.len());
    assert_eq!(sim.dials_of("10.0.0.1:4150").len(), 1);
    assert!(sim.events.iter().any(|e| matches!(e, ConsumerEvent::ConnectFailed { retry_at: Some(_), .. })));
}

#[test]
fn a_refused_handshake_never_causes_a_query() {
    let mut sim = Sim::new(|_| {});
    sim.consumer.connect_to_nsqlookupd("127.0.0.1:4161", sim.now).unwrap();
    sim.drain();
    sim.answer(&[("10.0.0.1", 4150)]);
    let conn = *sim.dialled.keys().last().unwrap();
    sim.consumer.handle_connected(conn, sim.now);
    sim.input(conn, frame(Frame::Error(ServerError::parse(b"E_AUTH_FAILED AUTH failed"))));
    sim.advance(Duration::from_secs(50));
    assert_eq!(sim.queries.len(), 1);
    assert_eq!(sim.dialled.len(), 1);
    // The next poll lists it again: dialled again.
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.queries.len(), 2);
    sim.answer(&[("10.0.0.1", 4150)]);
    assert_eq!(sim.dialled.len(), 2);
}

#[test]
fn many_lost_connections_cause_one_query_and_only_healthy_ones_redial_before_the_next_poll() {
    let mut sim = Sim::new(|c| {
        c.set("max_in_flight", "10").unwrap();
    });
    sim.consumer.connect_to_nsqlookupd("127.0.0.1:4161", sim.now).unwrap();
    sim.drain();
    let listed: Vec<(String, u16)> = (1..=5).map(|i| (format!("10.0.0.{i}"), 4150)).collect();
    let listed: Vec<(&str, u16)> = listed.iter().map(|(h, p)| (h.as_str(), *p)).collect();
    sim.answer(&listed);
    let conns: Vec<ConnId> = sim.dialled.keys().copied().collect();
    for &c in &conns {
        sim.accept(c);
    }
    sim.advance(Duration::from_secs(30));
    // The whole fleet restarts at once: every connection drops.
    for &c in &conns {
        sim.consumer.handle_eof(c, sim.now);
    }
    sim.drain();
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.queries.len(), 2, "one query for five lost connections");
    sim.answer(&listed);
    assert_eq!(sim.dialled.len(), 10, "long-lived connections are redialled at once");
    // They are all refused: no query, and no dial before the next poll.
    let redials: Vec<ConnId> = sim.dialled.keys().skip(5).copied().collect();
    for &c in &redials {
        sim.consumer.handle_connect_failed(c, refused(), sim.now);
    }
    sim.drain();
    sim.advance(Duration::from_secs(20));
    assert_eq!((sim.queries.len(), sim.dialled.len()), (2, 10));
}

#[test]
fn a_flapping_nsqd_waits_for_the_poll() {
    // An nsqd that accepts the SUB and drops the connection at once.
    let mut sim = Sim::new(|_| {});
    sim.consumer.connect_to_nsqlookupd("127.0.0.1:4161", sim.now).unwrap();
    sim.drain();
    sim.answer(&[("10.0.0.1", 4150)]);
    for round in 0..5 {
        let conn = *sim.dialled.keys().last().unwrap();
        sim.accept(conn);
        sim.consumer.handle_eof(conn, sim.now);
        sim.drain();
        // One query follows each drop of a connection that was up...
        let queries = sim.queries.len();
        sim.advance(Duration::from_secs(1));
        assert_eq!(sim.queries.len(), queries + 1, "round {round}");
        sim.answer(&[("10.0.0.1", 4150)]);
        // ...but a connection that did not stay up is redialled only at a poll.
        let dials = sim.dialled.len();
        assert_eq!(dials, round + 1, "round {round}");
        while sim.dialled.len() == dials {
            sim.advance(Duration::from_secs(1));
            if sim.queries.len() > queries + 1 && sim.dialled.len() == dials {
                sim.answer(&[("10.0.0.1", 4150)]);
            }
        }
    }
    // 5 connections in 5 polls (60-78 s apart): about one per poll interval.
    assert!(sim.elapsed() >= Duration::from_secs(4 * 60), "{:?}", sim.elapsed());
}

#[test]
fn a_failed_lookupd_query_tries_the_next_lookupd_at_most_three() {
    let mut sim = Sim::new(|_| {});
    for i in 1..=4 {
        sim.consumer.connect_to_nsqlookupd(&format!("127.0.0.{i}:4161"), sim.now).unwrap();
    }
    sim.drain();
    assert_eq!(sim.queries.len(), 1);
    for expected in 2..=3 {
        let (q, _) = sim.queries.last().unwrap().clone();
        sim.refuse_query(q);
        assert_eq!(sim.queries.len(), expected, "the next lookupd at once");
    }
    let (q, _) = sim.queries.last().unwrap().clone();
    sim.refuse_query(q);
    assert_eq!(sim.queries.len(), 3, "three per poll");
    let addrs: Vec<&str> = sim.queries.iter().map(|(_, a)| a.as_str()).collect();
    assert_eq!(addrs, ["127.0.0.1:4161", "127.0.0.2:4161", "127.0.0.3:4161"]);
    // An unanswered query fails after 60 s and the next lookupd is tried.
    sim.advance(Duration::from_secs(80));
    assert_eq!(sim.queries.len(), 4);
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.queries.len(), 6, "the timed-out query, then the next poll");
    assert!(sim.events.iter().any(|e| matches!(e, ConsumerEvent::LookupdFailed { error: LookupdError::Io(e), .. } if e.kind() == std::io::ErrorKind::TimedOut)));
}

#[test]
fn disconnecting_from_a_lookupd_found_nsqd_keeps_it_away() {
    let mut sim = Sim::new(|_| {});
    sim.consumer.connect_to_nsqlookupd("127.0.0.1:4161", sim.now).unwrap();
    sim.drain();
    sim.answer(&[("10.0.0.1", 4150)]);
    let conn = *sim.dialled.keys().last().unwrap();
    sim.accept(conn);
    sim.consumer.disconnect_from_nsqd("10.0.0.1:4150", sim.now).unwrap();
    sim.drain();
    sim.input(conn, frame(Frame::Response(Bytes::from_static(b"CLOSE_WAIT"))));
    assert_eq!(sim.closed.last(), Some(&conn));
    sim.advance(Duration::from_secs(100));
    sim.answer(&[("10.0.0.1", 4150)]);
    assert_eq!(sim.dialled.len(), 1, "not dialled again");
    sim.consumer.connect_to_nsqd("10.0.0.1:4150", sim.now).unwrap();
    sim.drain();
    assert_eq!(sim.dialled.len(), 2, "until asked for by name");
    assert_eq!(
        sim.consumer.disconnect_from_nsqd("10.9.9.9:4150", sim.now),
        Err(ConsumerError::NotConnected("10.9.9.9:4150".into()))
    );
}

#[test]
fn two_default_consumers_poll_lookupd_at_different_times() {
    let second_poll = || {
        let mut sim = Sim::with_config(Config::new());
        sim.consumer.connect_to_nsqlookupd("127.0.0.1:4161", sim.now).unwrap();
        sim.drain();
        let t0 = sim.now;
        while sim.queries.len() == 1 {
            let at = sim.consumer.poll_timeout().unwrap();
            sim.advance_to(at);
        }
        sim.now - t0
    };
    let times: HashSet<Duration> = (0..4).map(|_| second_poll()).collect();
    assert!(times.len() > 1, "{times:?}");
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
