//! `ProducerState` against scripted nsqd bytes, in virtual time.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nsq_sansio::{
    Action, CommandError, Config, ConnId, ConnectionError, ErrorCode, Frame, ProducerEvent, ProducerState,
    PublishError, ServerError, Topic, TxId, MAX_UNANSWERED_WRITES,
};
use proptest::prelude::*;

fn response(data: &'static [u8]) -> BytesMut {
    let mut b = BytesMut::new();
    Frame::Response(Bytes::from_static(data)).encode(&mut b);
    b
}

fn error(data: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    Frame::Error(ServerError::parse(data)).encode(&mut b);
    b
}

struct Sim {
    p: ProducerState,
    now: Instant,
    dialled: Vec<ConnId>,
    closed: Vec<ConnId>,
    writes: Vec<(ConnId, Bytes)>,
    results: HashMap<TxId, Result<(), PublishError>>,
    events: Vec<ProducerEvent>,
}

impl Sim {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            p: ProducerState::new("127.0.0.1:4150", Arc::new(Config::new().rng_seed(1).clone()), now),
            now,
            dialled: Vec::new(),
            closed: Vec::new(),
            writes: Vec::new(),
            results: HashMap::new(),
            events: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(a) = self.p.poll_action() {
            match a {
                Action::Connect { conn, addr, .. } => {
                    assert_eq!(addr, "127.0.0.1:4150");
                    self.dialled.push(conn);
                }
                Action::Close { conn } => self.closed.push(conn),
                other => panic!("{other:?}"),
            }
        }
        while let Some(w) = self.p.poll_transmit() {
            self.writes.push(w);
        }
        while let Some(e) = self.p.poll_event() {
            if let ProducerEvent::Published { tx, result } = &e {
                assert!(self.results.insert(*tx, result.clone()).is_none(), "{tx:?} resolved twice");
            }
            self.events.push(e);
        }
    }

    /// Connected at once (`connect`), the handshake done.
    fn connected() -> Self {
        let mut sim = Self::new();
        sim.p.connect(sim.now).unwrap();
        sim.drain();
        sim.accept();
        sim
    }

    fn conn(&self) -> ConnId {
        *self.dialled.last().unwrap()
    }

    /// Socket connected and IDENTIFY answered with a plain OK.
    fn accept(&mut self) {
        let conn = self.conn();
        self.p.handle_connected(conn, self.now);
        self.drain();
        self.input(response(b"OK"));
    }

    fn input(&mut self, bytes: BytesMut) {
        let conn = self.conn();
        self.p.handle_input(conn, self.now, bytes);
        self.drain();
    }

    fn publish(&mut self, body: &'static [u8]) -> TxId {
        let tx = self.p.publish(&Topic::new("fixture_pub").unwrap(), Bytes::from_static(body), self.now).unwrap();
        self.drain();
        tx
    }

    fn wire(&self) -> Vec<u8> {
        self.writes.iter().flat_map(|(_, b)| b.to_vec()).collect()
    }
}

#[test]
fn connects_lazily_and_publishes_after_the_handshake() {
    let mut sim = Sim::new();
    assert!(sim.dialled.is_empty());
    let tx = sim.publish(b"hello pub");
    assert_eq!(sim.dialled.len(), 1, "the first publish dials");
    assert!(sim.writes.is_empty(), "nothing written before the socket connects");
    sim.p.handle_connected(sim.conn(), sim.now);
    sim.drain();
    assert!(sim.wire().starts_with(b"  V2IDENTIFY\n"));
    assert!(!sim.wire().ends_with(b"hello pub"), "the PUB waits for the IDENTIFY answer");
    sim.input(response(b"OK"));
    assert!(sim.wire().ends_with(b"PUB fixture_pub\n\0\0\0\x09hello pub"));
    sim.input(response(b"OK"));
    assert_eq!(sim.results[&tx], Ok(()));
    assert!(sim.events.iter().any(|e| matches!(e, ProducerEvent::Connected(_))));
}

#[test]
fn responses_match_in_order_and_an_error_fails_its_own_publish_and_the_rest() {
    let mut sim = Sim::connected();
    let txs: Vec<TxId> = [&b"a"[..], b"b", b"c", b"d"].iter().map(|b| sim.publish(b)).collect();
    sim.input(response(b"OK"));
    assert_eq!(sim.results.len(), 1);
    sim.input(error(b"E_BAD_MESSAGE PUB message too big 2048 > 1024"));
    assert_eq!(sim.results[&txs[0]], Ok(()));
    assert!(matches!(&sim.results[&txs[1]], Err(PublishError::Server(e)) if e.message.contains("too big")));
    // The rest were sent, then the connection closed: lost, with the error as the cause.
    for tx in &txs[2..] {
        assert!(matches!(
            &sim.results[tx],
            Err(PublishError::ConnectionLost(ConnectionError::Server(e))) if e.message.contains("too big")
        ));
    }
    assert_eq!(sim.closed, [sim.dialled[0]]);
    // The next publish dials a new connection.
    sim.publish(b"e");
    assert_eq!(sim.dialled.len(), 2);
    assert_ne!(sim.dialled[0], sim.dialled[1]);
}

#[test]
fn connection_loss_and_connect_failure_resolve_every_publish() {
    let mut sim = Sim::new();
    let a = sim.publish(b"a");
    sim.accept();
    let b = sim.publish(b"b");
    sim.p.handle_eof(sim.conn(), sim.now);
    sim.drain();
    for tx in [a, b] {
        assert_eq!(sim.results[&tx], Err(PublishError::ConnectionLost(ConnectionError::ServerClosed)));
    }
    assert!(sim.events.iter().any(|e| matches!(e, ProducerEvent::Disconnected(_, ConnectionError::ServerClosed))));

    // A refused dial: the publish was never sent, and the error says why.
    let c = sim.publish(b"c");
    let conn = sim.conn();
    sim.p.handle_connect_failed(conn, refused(), sim.now);
    sim.drain();
    match &sim.results[&c] {
        Err(PublishError::NotConnected(ConnectionError::Dial { addr, error })) => {
            assert_eq!((addr.as_str(), error.kind()), ("127.0.0.1:4150", std::io::ErrorKind::ConnectionRefused));
        }
        other => panic!("{other:?}"),
    }
    assert!(sim.events.iter().any(
        |e| matches!(e, ProducerEvent::ConnectFailed { conn: c, error: ConnectionError::Dial { .. }, .. } if *c == conn)
    ));
    assert_eq!(sim.p.outstanding(), 0);
}

impl Sim {
    fn pinged(&self, tx: TxId) -> Option<&Result<(), ConnectionError>> {
        self.events.iter().find_map(|e| match e {
            ProducerEvent::Pinged { tx: t, result, .. } if *t == tx => Some(result),
            _ => None,
        })
    }
}

#[test]
fn ping_connects_sends_a_nop_after_the_handshake_and_resolves_when_it_leaves() {
    let mut sim = Sim::new();
    let tx = sim.p.ping(sim.now).unwrap();
    sim.drain();
    assert_eq!(sim.dialled.len(), 1, "ping dials");
    sim.p.handle_connected(sim.conn(), sim.now);
    sim.drain();
    assert!(sim.wire().starts_with(b"  V2IDENTIFY\n"));
    assert!(sim.pinged(tx).is_none(), "the NOP waits for the handshake");
    sim.input(response(b"OK"));
    assert!(sim.wire().ends_with(b"NOP\n"));
    assert_eq!(sim.pinged(tx), Some(&Ok(())));
    // Connected: the NOP goes out in the next write; nsqd does not answer it.
    let writes = sim.writes.len();
    let again = sim.p.ping(sim.now).unwrap();
    assert!(sim.pinged(again).is_none());
    sim.drain();
    assert_eq!((sim.writes.len(), sim.wire().ends_with(b"NOP\nNOP\n")), (writes + 1, true));
    assert_eq!(sim.pinged(again), Some(&Ok(())));
    assert_eq!(sim.dialled.len(), 1);
}

#[test]
fn ping_fails_with_the_cause_when_the_connection_cannot_be_made() {
    let mut sim = Sim::new();
    let tx = sim.p.ping(sim.now).unwrap();
    sim.drain();
    sim.p.handle_connect_failed(sim.conn(), refused(), sim.now);
    sim.drain();
    assert!(matches!(sim.pinged(tx), Some(Err(ConnectionError::Dial { .. }))), "{:?}", sim.pinged(tx));
    // Left alone after the failure, a publish fails at once; a ping dials again, as go-nsq's.
    let t = Topic::new("t").unwrap();
    sim.p.publish(&t, Bytes::from_static(b"x"), sim.now).unwrap();
    sim.drain();
    assert_eq!(sim.dialled.len(), 1);
    let tx = sim.p.ping(sim.now).unwrap();
    sim.drain();
    assert_eq!(sim.dialled.len(), 2);
    sim.p.handle_connected(sim.conn(), sim.now);
    sim.drain();
    sim.input(error(b"E_BAD_BODY IDENTIFY refused"));
    assert!(matches!(sim.pinged(tx), Some(Err(ConnectionError::Server(_)))), "{:?}", sim.pinged(tx));
    assert!(!sim.wire().ends_with(b"NOP\n"), "never sent");
    sim.p.stop(sim.now);
    assert_eq!(sim.p.ping(sim.now), Err(CommandError::Closed));
}

#[test]
fn the_auth_answer_is_reported_before_connected() {
    let mut sim = Sim::new();
    sim.p = ProducerState::new("127.0.0.1:4150", Arc::new(Config::new().auth_secret("s3cret").clone()), sim.now);
    sim.p.connect(sim.now).unwrap();
    sim.drain();
    sim.p.handle_connected(sim.conn(), sim.now);
    sim.drain();
    sim.input(response(br#"{"max_rdy_count":2500,"msg_timeout":60000,"auth_required":true}"#));
    assert!(sim.wire().ends_with(b"AUTH\n\0\0\0\x06s3cret"));
    sim.input(response(br#"{"identity":"alice","identity_url":"https://auth/alice","permission_count":3}"#));
    let auth = sim.events.iter().position(|e| {
        matches!(e, ProducerEvent::Authenticated { auth, .. }
            if auth.identity == "alice" && auth.identity_url == "https://auth/alice" && auth.permission_count == 3)
    });
    let connected = sim.events.iter().position(|e| matches!(e, ProducerEvent::Connected(_)));
    assert!(auth.is_some() && auth < connected, "{:?}", sim.events);
}

fn refused() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn after_a_failed_dial_publishes_fail_at_once_for_a_bounded_jittered_while() {
    let mut sim = Sim::new();
    let t = Topic::new("t").unwrap();
    // A publisher that retries every millisecond against an nsqd that refuses, for a minute.
    let start = sim.now;
    let mut dial_times = Vec::new();
    let mut failures = 0;
    while sim.now - start < Duration::from_secs(60) {
        let tx = sim.p.publish(&t, Bytes::from_static(b"x"), sim.now).unwrap();
        sim.drain();
        if sim.dialled.len() > dial_times.len() {
            dial_times.push(sim.now);
            let conn = sim.conn();
            sim.p.handle_connect_failed(conn, refused(), sim.now);
            sim.drain();
        }
        assert!(matches!(&sim.results[&tx], Err(PublishError::NotConnected(ConnectionError::Dial { .. }))));
        failures += 1;
        sim.now += Duration::from_millis(1);
    }
    assert_eq!(failures, 60_000, "every publish answered at once");
    // Dials: 100 ms doubling, jittered to [d/2, d), capped at 5 s.
    for (n, w) in dial_times.windows(2).enumerate() {
        let d = Duration::from_millis(100 << n.min(6)).min(Duration::from_secs(5));
        let gap = w[1] - w[0];
        assert!(gap >= d / 2 && gap <= d + Duration::from_millis(1), "dial {n}: {gap:?} for d = {d:?}");
    }
    assert!(dial_times.len() <= 30, "{} dials in a minute", dial_times.len());
    assert!(sim.p.held_error(sim.now).is_some());
    // nsqd comes back: the next dial after the hold connects, and publishing works again.
    sim.now += Duration::from_secs(5);
    let tx = sim.publish(b"back");
    sim.accept();
    sim.input(response(b"OK"));
    assert_eq!(sim.results[&tx], Ok(()));
    assert!(sim.p.held_error(sim.now).is_none());
}

#[test]
fn batched_publishes_fail_with_the_cause_when_the_dial_fails() {
    let mut sim = Sim::new();
    sim.p.set_auto_batch(16);
    let t = Topic::new("t").unwrap();
    let txs: Vec<TxId> = (0..3).map(|_| sim.p.publish(&t, Bytes::from_static(b"x"), sim.now).unwrap()).collect();
    sim.drain();
    let conn = sim.conn();
    sim.p.handle_connect_failed(conn, refused(), sim.now);
    sim.drain();
    for tx in &txs {
        assert!(matches!(&sim.results[tx], Err(PublishError::NotConnected(ConnectionError::Dial { .. }))), "{tx:?}");
    }
    assert_eq!(sim.p.outstanding(), 0);
    // And a stop afterwards has nothing to dial for.
    sim.p.stop(sim.now);
    sim.drain();
    assert!(sim.p.is_stopped());
    assert_eq!(sim.dialled.len(), 1);
}

#[test]
fn a_refused_handshake_fails_publishes_with_its_cause() {
    let mut sim = Sim::new();
    let tx = sim.publish(b"a");
    let conn = sim.conn();
    sim.p.handle_connected(conn, sim.now);
    sim.drain();
    sim.input(error(b"E_AUTH_FAILED AUTH failed"));
    match &sim.results[&tx] {
        Err(PublishError::NotConnected(ConnectionError::Server(e))) => assert_eq!(e.code, ErrorCode::AuthFailed),
        other => panic!("{other:?}"),
    }
}

#[test]
fn stop_before_the_identify_answer_lets_queued_publishes_finish() {
    let mut sim = Sim::new();
    let a = sim.publish(b"a");
    let b = sim.publish(b"b");
    sim.p.stop(sim.now);
    sim.drain();
    assert!(sim.results.is_empty(), "nothing failed: {:?}", sim.results);
    // The dial completes, nsqd answers IDENTIFY: the publishes go out and are acknowledged.
    sim.accept();
    assert!(sim.wire().ends_with(b"PUB fixture_pub\n\0\0\0\x01b"));
    sim.input(response(b"OK"));
    sim.input(response(b"OK"));
    assert_eq!((sim.results[&a].clone(), sim.results[&b].clone()), (Ok(()), Ok(())));
    assert!(sim.p.is_stopped());
    assert_eq!(sim.closed.len(), 1);
    // Stopped before the dial completes, and the dial fails: the cause, not a generic loss.
    let mut sim = Sim::new();
    let a = sim.publish(b"a");
    sim.p.stop(sim.now);
    let conn = sim.conn();
    sim.p.handle_connect_failed(conn, refused(), sim.now);
    sim.drain();
    assert!(matches!(&sim.results[&a], Err(PublishError::NotConnected(ConnectionError::Dial { .. }))));
    assert!(sim.p.is_stopped());
}

#[test]
fn local_refusals_queue_nothing() {
    let mut sim = Sim::new();
    let t = Topic::new("t").unwrap();
    assert_eq!(sim.p.publish(&t, Bytes::new(), sim.now), Err(CommandError::EmptyBody));
    assert_eq!(sim.p.multi_publish(&t, vec![], sim.now), Err(CommandError::EmptyBatch));
    assert!(matches!(
        sim.p.deferred_publish(&t, Duration::from_secs(3601), Bytes::from_static(b"x"), sim.now),
        Err(CommandError::DelayOutOfRange { .. })
    ));
    sim.drain();
    assert!(sim.dialled.is_empty(), "a refused publish does not even dial");
}

#[test]
fn replays_the_publish_capture() {
    let path = format!("{}/tests/fixtures/nsqd-1.3.0/publish.json", env!("CARGO_MANIFEST_DIR"));
    let cap: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let steps = cap["steps"].as_array().unwrap();
    let c2s: Vec<Vec<u8>> = steps
        .iter()
        .filter(|s| s["dir"] == "c2s" && s.get("event").is_none())
        .map(|s| hex::decode(s["hex"].as_str().unwrap()).unwrap())
        .collect();
    let mut sim = Sim::connected();
    let topic = Topic::new("fixture_pub").unwrap();
    let eph = Topic::new("fixture_pub#ephemeral").unwrap();
    let start = sim.wire().len();
    let mut txs = vec![sim.p.publish(&topic, Bytes::from_static(b"hello pub"), sim.now).unwrap()];
    sim.drain();
    assert_eq!(&sim.wire()[start..], &c2s[1][..]);
    // nsqd answers each command before the capture's client sends the next.
    sim.input(response(b"OK"));
    for s in &c2s[2..] {
        let before = sim.wire().len();
        let text = String::from_utf8_lossy(s).into_owned();
        let payload = Bytes::copy_from_slice(&s[s.iter().position(|&b| b == b'\n').unwrap() + 5..]);
        let tx = if text.starts_with("MPUB") {
            let mut bodies = Vec::new();
            let mut rest = &payload[4..];
            while rest.len() >= 4 {
                let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                bodies.push(Bytes::copy_from_slice(&rest[4..4 + n]));
                rest = &rest[4 + n..];
            }
            sim.p.multi_publish(&topic, bodies, sim.now)
        } else if text.starts_with("DPUB") {
            sim.p.deferred_publish(&topic, Duration::from_millis(5000), payload, sim.now)
        } else if text.starts_with("PUB fixture_pub#ephemeral") {
            sim.p.publish(&eph, payload, sim.now)
        } else {
            sim.p.publish(&topic, payload, sim.now)
        };
        txs.push(tx.unwrap());
        sim.drain();
        assert_eq!(&sim.wire()[before..], &s[..], "{text:?}");
        sim.input(response(b"OK"));
    }
    assert!(txs.iter().all(|tx| sim.results[tx] == Ok(())));
}

#[test]
fn heartbeats_are_answered_while_idle() {
    let mut sim = Sim::connected();
    let before = sim.writes.len();
    sim.input(response(b"_heartbeat_"));
    assert_eq!(sim.writes[before..].iter().map(|(_, b)| b.to_vec()).collect::<Vec<_>>(), [b"NOP\n".to_vec()]);
}

#[test]
fn stop_lets_outstanding_publishes_finish_then_closes() {
    let mut sim = Sim::new();
    let a = sim.publish(b"a");
    sim.accept();
    sim.p.stop(sim.now);
    sim.drain();
    assert!(!sim.p.is_stopped());
    assert_eq!(sim.p.publish(&Topic::new("t").unwrap(), Bytes::from_static(b"x"), sim.now), Err(CommandError::Closed));
    sim.input(response(b"OK"));
    assert_eq!(sim.results[&a], Ok(()));
    assert!(sim.p.is_stopped());
    assert!(matches!(sim.events.last(), Some(ProducerEvent::Stopped)));
    assert_eq!(sim.closed.len(), 1);
}

#[test]
fn commands_queued_between_polls_go_out_as_one_write() {
    let mut sim = Sim::connected();
    let before = sim.writes.len();
    let t = Topic::new("t").unwrap();
    for _ in 0..100 {
        sim.p.publish(&t, Bytes::from_static(b"x"), sim.now).unwrap();
    }
    sim.drain();
    assert_eq!(sim.writes.len() - before, 1, "one buffer for 100 PUBs");
    assert_eq!(sim.writes.last().unwrap().1.len(), 100 * b"PUB t\n\0\0\0\x01x".len());
}

#[test]
fn publishes_wait_while_max_unanswered_writes_are_out_then_leave_in_one_write() {
    let mut sim = Sim::connected();
    // Each write carries two publishes; none is answered.
    let mut txs = Vec::new();
    for _ in 0..MAX_UNANSWERED_WRITES {
        let before = sim.writes.len();
        txs.push(sim.p.publish(&Topic::new("t").unwrap(), Bytes::from_static(b"a"), sim.now).unwrap());
        txs.push(sim.p.publish(&Topic::new("t").unwrap(), Bytes::from_static(b"b"), sim.now).unwrap());
        sim.drain();
        assert_eq!(sim.writes.len(), before + 1);
    }
    let before = sim.writes.len();
    for _ in 0..3 {
        txs.push(sim.publish(b"held"));
    }
    // A heartbeat's NOP waits behind them too.
    sim.input(response(b"_heartbeat_"));
    assert_eq!(sim.writes.len(), before, "nothing leaves while the writes are unanswered");
    // The first publish of the oldest write answered: that write is not done yet.
    sim.input(response(b"OK"));
    assert_eq!(sim.writes.len(), before);
    // Its last publish answered: everything queued leaves in one write.
    sim.input(response(b"OK"));
    assert_eq!(sim.writes.len(), before + 1);
    let held = &sim.writes[before].1;
    assert_eq!(held.windows(4).filter(|w| w == b"PUB ").count(), 3);
    assert!(held.ends_with(b"NOP\n"));
    for _ in 2..txs.len() {
        sim.input(response(b"OK"));
    }
    assert!(txs.iter().all(|tx| sim.results[tx] == Ok(())));
    // Answered: the next publish leaves at once.
    let before = sim.writes.len();
    sim.publish(b"free");
    assert_eq!(sim.writes.len(), before + 1);
}

#[test]
fn held_publishes_wait_at_most_the_write_timeout_for_an_answer() {
    let mut sim = Sim::connected();
    for _ in 0..MAX_UNANSWERED_WRITES {
        sim.publish(b"sent");
    }
    let before = sim.writes.len();
    sim.publish(b"held");
    assert_eq!(sim.writes.len(), before);
    // An nsqd that stopped reading answers nothing; the wait ends with the write timeout (1s
    // by default), and what waited goes to the socket, where that timeout applies.
    let due = sim.p.poll_timeout().unwrap();
    assert_eq!(due, sim.now + Duration::from_secs(1));
    sim.now += Duration::from_millis(999);
    sim.p.handle_timeout(sim.now);
    sim.drain();
    assert_eq!(sim.writes.len(), before);
    sim.now = due;
    sim.p.handle_timeout(sim.now);
    sim.drain();
    assert_eq!(sim.writes.len(), before + 1);
    assert!(sim.writes[before].1.ends_with(b"held"));
}

#[test]
fn a_fatal_error_fails_held_publishes_with_the_connection() {
    let mut sim = Sim::connected();
    let sent: Vec<TxId> = (0..MAX_UNANSWERED_WRITES).map(|_| sim.publish(b"sent")).collect();
    let held = sim.publish(b"held");
    let before = sim.writes.len();
    sim.input(error(b"E_BAD_MESSAGE PUB bad"));
    assert!(matches!(sim.results[&sent[0]], Err(PublishError::Server(_))));
    assert!(sent[1..].iter().all(|tx| matches!(sim.results[tx], Err(PublishError::ConnectionLost(_)))));
    assert!(matches!(sim.results[&held], Err(PublishError::ConnectionLost(_))));
    assert_eq!(sim.writes.len(), before, "held bytes do not go out on a broken connection");
}

#[test]
fn auto_batching_turns_queued_pubs_into_one_mpub_with_a_result_each() {
    for (batch, expect_mpub) in [(0, false), (64, true)] {
        let mut sim = Sim::new();
        sim.p.set_auto_batch(batch);
        sim.p.connect(sim.now).unwrap();
        sim.drain();
        sim.accept();
        let before = sim.wire().len();
        let t = Topic::new("t").unwrap();
        let other = Topic::new("u").unwrap();
        let mut txs: Vec<TxId> =
            (0..10).map(|_| sim.p.publish(&t, Bytes::from_static(b"x"), sim.now).unwrap()).collect();
        txs.push(sim.p.publish(&other, Bytes::from_static(b"y"), sim.now).unwrap());
        sim.drain();
        let wire = String::from_utf8_lossy(&sim.wire()[before..]).into_owned();
        assert_eq!(wire.matches("MPUB t\n").count(), usize::from(expect_mpub), "{wire:?}");
        assert_eq!(wire.matches("PUB t\n").count(), if expect_mpub { 1 } else { 10 });
        assert_eq!(wire.matches("PUB u\n").count(), 1, "a lone PUB stays a PUB");
        let responses = if expect_mpub { 2 } else { 11 };
        for _ in 0..responses {
            sim.input(response(b"OK"));
        }
        assert!(txs.iter().all(|tx| sim.results.get(tx) == Some(&Ok(()))), "batch {batch}");
    }
}

proptest! {
    /// Every transaction resolves exactly once, and only acknowledged ones resolve Ok.
    #[test]
    fn every_publish_resolves_exactly_once(ops in prop::collection::vec(0u8..8, 1..80), batch in prop::sample::select(vec![0usize, 8])) {
        let mut sim = Sim::new();
        sim.p.set_auto_batch(batch);
        let mut issued = Vec::new();
        let oks = |sim: &Sim| sim.results.values().filter(|r| r.is_ok()).count();
        for op in ops {
            let before = oks(&sim);
            // How many publishes one step may acknowledge: an OK frame answers one PUB or one
            // batch; nothing else acknowledges anything.
            let mut may_ack = 0;
            match op {
                0..=2 => {
                    if let Ok(tx) = sim.p.publish(&Topic::new("t").unwrap(), Bytes::from_static(b"x"), sim.now) {
                        issued.push(tx);
                    }
                    sim.drain();
                }
                3 if !sim.dialled.is_empty() => {
                    sim.accept();
                    may_ack = batch.max(1);
                }
                4 if !sim.dialled.is_empty() => {
                    sim.input(response(b"OK"));
                    may_ack = batch.max(1);
                }
                5 if !sim.dialled.is_empty() => sim.input(error(b"E_PUB_FAILED boom")),
                6 if !sim.dialled.is_empty() => { let c = sim.conn(); sim.p.handle_eof(c, sim.now); sim.drain(); }
                7 => { sim.now += Duration::from_secs(70); sim.p.handle_timeout(sim.now); sim.drain(); }
                _ => {}
            }
            prop_assert!(oks(&sim) - before <= may_ack, "op {} acknowledged {} publishes", op, oks(&sim) - before);
        }
        sim.p.stop(sim.now);
        sim.drain();
        if let Some(&c) = sim.dialled.last() {
            sim.p.handle_eof(c, sim.now);
            sim.drain();
        }
        prop_assert!(sim.p.is_stopped());
        for tx in &issued {
            prop_assert!(sim.results.contains_key(tx), "{:?} never resolved", tx);
        }
        prop_assert_eq!(sim.results.len(), issued.len());
    }
}
