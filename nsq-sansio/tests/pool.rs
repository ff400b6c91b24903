//! `ProducerPoolState` against scripted nsqds, in virtual time.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nsq_sansio::{
    Action, Config, ConnId, ConnectionError, ErrorCode, Frame, Health, PoolError, PoolEvent, PoolOptions,
    ProducerPoolState, PublishError, ServerError, Strategy, Topic, TxId,
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

fn refused() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
}

const A: &str = "10.0.0.1:4150";
const B: &str = "10.0.0.2:4150";
const C: &str = "10.0.0.3:4150";

struct Sim {
    pool: ProducerPoolState,
    now: Instant,
    start: Instant,
    /// Every dial: connection → address.
    dialled: BTreeMap<ConnId, String>,
    closed: Vec<ConnId>,
    /// Connections whose handshake nsqd answered.
    up: Vec<ConnId>,
    /// Bodies each connection published, in order, not yet answered.
    unanswered: HashMap<ConnId, Vec<Vec<u8>>>,
    /// Every PUB body each address received (answered or not).
    received: HashMap<String, Vec<Vec<u8>>>,
    results: HashMap<TxId, Result<(), PoolError>>,
    events: Vec<PoolEvent>,
    written: HashMap<ConnId, Vec<u8>>,
    /// Everything each connection wrote, handshakes and lookupd requests included.
    raw: HashMap<ConnId, Vec<u8>>,
}

impl Sim {
    fn new(addrs: &[&str], strategy: Strategy) -> Self {
        Self::with(addrs, PoolOptions::new(strategy))
    }

    fn with(addrs: &[&str], options: PoolOptions) -> Self {
        let now = Instant::now();
        let mut config = Config::new();
        config.rng_seed(7);
        Self {
            pool: ProducerPoolState::new(addrs.iter().copied(), options, Arc::new(config), now),
            now,
            start: now,
            dialled: BTreeMap::new(),
            closed: Vec::new(),
            up: Vec::new(),
            unanswered: HashMap::new(),
            received: HashMap::new(),
            results: HashMap::new(),
            events: Vec::new(),
            written: HashMap::new(),
            raw: HashMap::new(),
        }
    }

    fn drain(&mut self) {
        loop {
            let mut progress = false;
            while let Some(a) = self.pool.poll_action() {
                progress = true;
                match a {
                    Action::Connect { conn, addr, .. } => {
                        self.dialled.insert(conn, addr);
                    }
                    Action::Close { conn } => {
                        self.closed.push(conn);
                        self.up.retain(|&c| c != conn);
                    }
                    other => panic!("{other:?}"),
                }
            }
            while let Some((conn, bytes)) = self.pool.poll_transmit() {
                progress = true;
                self.raw.entry(conn).or_default().extend_from_slice(&bytes);
                if !self.up.contains(&conn) {
                    // The handshake.
                    continue;
                }
                let w = self.written.entry(conn).or_default();
                w.extend_from_slice(&bytes);
                // Collect complete PUBs.
                while let Some((body, used)) = find_pub(w) {
                    w.drain(..used);
                    let addr = self.dialled[&conn].clone();
                    self.received.entry(addr).or_default().push(body.clone());
                    self.unanswered.entry(conn).or_default().push(body);
                }
            }
            while let Some(e) = self.pool.poll_event() {
                progress = true;
                if let PoolEvent::Published { tx, result } = &e {
                    assert!(self.results.insert(*tx, result.clone()).is_none(), "{tx:?} resolved twice");
                }
                self.events.push(e);
            }
            if !progress {
                return;
            }
        }
    }

    /// The live connection to `addr`.
    fn conn(&self, addr: &str) -> ConnId {
        self.live(addr).unwrap()
    }

    fn live(&self, addr: &str) -> Option<ConnId> {
        self.dialled.iter().rev().find(|(c, a)| *a == addr && !self.closed.contains(c)).map(|(&c, _)| c)
    }

    /// The connection to `addr` whose handshake is done, if any.
    fn up_conn(&self, addr: &str) -> Option<ConnId> {
        self.live(addr).filter(|c| self.up.contains(c))
    }

    fn has_unanswered(&self, addr: &str) -> bool {
        self.up_conn(addr).is_some_and(|c| self.unanswered.get(&c).is_some_and(|u| !u.is_empty()))
    }

    fn pending_dial(&self, addr: &str) -> Option<ConnId> {
        self.dialled
            .iter()
            .rev()
            .find(|(c, a)| *a == addr && !self.closed.contains(c) && !self.up.contains(c))
            .map(|(&c, _)| c)
    }

    /// nsqd at `addr` accepts the pending dial and answers IDENTIFY.
    fn accept(&mut self, addr: &str) {
        let conn = self.pending_dial(addr).unwrap();
        self.pool.handle_connected(conn, self.now);
        self.drain();
        self.up.push(conn);
        self.pool.handle_input(conn, self.now, response(b"OK"));
        self.drain();
    }

    fn refuse(&mut self, addr: &str) {
        let conn = self.pending_dial(addr).unwrap();
        self.pool.handle_connect_failed(conn, refused(), self.now);
        self.drain();
    }

    /// nsqd at `addr` answers its oldest unanswered publish with OK.
    fn ack(&mut self, addr: &str) -> Vec<u8> {
        let conn = self.conn(addr);
        let body = self.unanswered.get_mut(&conn).unwrap().remove(0);
        self.pool.handle_input(conn, self.now, response(b"OK"));
        self.drain();
        body
    }

    fn ack_all(&mut self) {
        for addr in [A, B, C] {
            while self.has_unanswered(addr) {
                self.ack(addr);
            }
        }
    }

    fn kill(&mut self, addr: &str) {
        let conn = self.conn(addr);
        self.pool.handle_eof(conn, self.now);
        self.drain();
    }

    fn publish(&mut self, body: &str) -> TxId {
        let t = Topic::new("t").unwrap();
        let tx = self.pool.publish(&t, Bytes::copy_from_slice(body.as_bytes()), self.now).unwrap();
        self.drain();
        tx
    }

    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(t) = self.pool.poll_timeout().filter(|&t| t <= end) {
            self.now = self.now.max(t);
            self.pool.handle_timeout(self.now);
            self.drain();
        }
        self.now = end;
    }

    fn got(&self, addr: &str) -> Vec<String> {
        self.received.get(addr).map_or(Vec::new(), |v| v.iter().map(|b| String::from_utf8_lossy(b).into()).collect())
    }

    fn health(&self, addr: &str) -> Health {
        self.pool.stats().into_iter().find(|s| s.addr == addr).unwrap().health
    }
}

/// Parses one `PUB t\n<size><body>` off the front of `w`.
fn find_pub(w: &[u8]) -> Option<(Vec<u8>, usize)> {
    let nl = w.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&w[..nl]).ok()?;
    assert!(line.starts_with("PUB ") || line.starts_with("MPUB ") || line.starts_with("DPUB "), "{line:?}");
    let size = u32::from_be_bytes(w.get(nl + 1..nl + 5)?.try_into().ok()?) as usize;
    let body = w.get(nl + 5..nl + 5 + size)?.to_vec();
    Some((body, nl + 5 + size))
}

#[test]
fn failover_uses_the_first_connected_nsqd_and_comes_back_to_it() {
    let mut sim = Sim::new(&[A, B], Strategy::Failover);
    let tx = sim.publish("1");
    assert_eq!(sim.dialled.values().collect::<Vec<_>>(), [A, B], "every nsqd dialled at the start");
    // B is up first: the publish goes there rather than wait for A.
    sim.accept(B);
    assert_eq!(sim.got(B), ["1"]);
    sim.ack(B);
    assert_eq!(sim.results[&tx], Ok(()));
    sim.accept(A);
    sim.publish("2");
    assert_eq!(sim.got(A), ["2"], "A is first in order");
    sim.ack(A);
    // A dies: B takes over; A is redialled with backoff and used again once back.
    sim.kill(A);
    assert!(matches!(sim.health(A), Health::Down { .. }), "lost within 10 s of connecting: a failure");
    sim.publish("3");
    assert_eq!(sim.got(B), ["1", "3"]);
    sim.ack(B);
    sim.advance(Duration::from_millis(100));
    sim.refuse(A);
    assert!(matches!(sim.health(A), Health::Down { .. }));
    sim.advance(Duration::from_millis(200));
    sim.accept(A);
    assert_eq!(sim.health(A), Health::Connected);
    sim.publish("4");
    assert_eq!(sim.got(A), ["2", "4"]);
}

#[test]
fn connect_answers_once_every_nsqd_settled_so_failover_starts_on_the_first() {
    let ready = |sim: &Sim| {
        sim.events
            .iter()
            .filter_map(|e| if let PoolEvent::Ready(r) = e { Some(r.clone()) } else { None })
            .collect::<Vec<_>>()
    };
    let mut sim = Sim::new(&[A, B], Strategy::Failover);
    sim.pool.connect(sim.now).unwrap();
    sim.drain();
    sim.accept(B);
    assert!(ready(&sim).is_empty(), "B is up, but A, first in order, has not answered yet");
    sim.accept(A);
    assert_eq!(ready(&sim), [Ok(())]);
    sim.publish("x");
    assert_eq!(sim.got(A), ["x"]);
    // All down: the answer names each nsqd with its cause.
    let mut sim = Sim::new(&[A, B], Strategy::RoundRobin);
    sim.pool.connect(sim.now).unwrap();
    sim.drain();
    sim.refuse(A);
    assert!(ready(&sim).is_empty());
    sim.refuse(B);
    match &ready(&sim)[..] {
        [Err(e)] => assert_eq!(e.attempts.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(), [A, B]),
        other => panic!("{other:?}"),
    }
    // All: one refusal is enough to answer.
    let mut sim = Sim::new(&[A, B], Strategy::All);
    sim.pool.connect(sim.now).unwrap();
    sim.drain();
    sim.refuse(B);
    assert!(matches!(&ready(&sim)[..], [Err(e)] if e.attempts.len() == 1 && e.attempts[0].0 == B));
}

#[test]
fn round_robin_spreads_over_connected_nsqds() {
    let mut sim = Sim::new(&[A, B, C], Strategy::RoundRobin);
    sim.pool.connect(sim.now).unwrap();
    sim.drain();
    sim.accept(A);
    sim.accept(B);
    sim.refuse(C);
    for i in 0..6 {
        sim.publish(&i.to_string());
    }
    assert_eq!(sim.got(A).len(), 3);
    assert_eq!(sim.got(B).len(), 3);
    assert!(sim.got(C).is_empty());
    sim.ack_all();
    assert!(sim.results.values().all(Result::is_ok));
    let stats = sim.pool.stats();
    assert_eq!((stats[0].sent, stats[0].acknowledged), (3, 3));
}

#[test]
fn all_sends_to_every_nsqd_and_names_the_one_that_failed() {
    let mut sim = Sim::new(&[A, B], Strategy::All);
    let ok = sim.publish("x");
    sim.accept(A);
    sim.accept(B);
    assert_eq!((sim.got(A), sim.got(B)), (vec!["x".to_string()], vec!["x".to_string()]));
    sim.ack(A);
    assert!(!sim.results.contains_key(&ok), "waits for every nsqd");
    sim.ack(B);
    assert_eq!(sim.results[&ok], Ok(()));
    // B refuses the next one: the error names B; A stored it.
    let bad = sim.publish("y");
    sim.ack(A);
    let conn = sim.conn(B);
    sim.pool.handle_input(conn, sim.now, error(b"E_PUB_FAILED PUB failed disk full"));
    sim.drain();
    let err = sim.results[&bad].clone().unwrap_err();
    assert_eq!(err.attempts.len(), 1);
    assert_eq!(err.attempts[0].0, B);
    assert!(matches!(&err.attempts[0].1, PublishError::Server(e) if e.code == ErrorCode::PubFailed));
    assert!(err.to_string().starts_with("10.0.0.2:4150: nsqd refused the publish: E_PUB_FAILED"), "{err}");
}

#[test]
fn a_publish_lost_with_its_connection_is_sent_again_elsewhere_at_most_max_retries() {
    let mut sim = Sim::with(&[A, B, C], PoolOptions::new(Strategy::Failover).max_retries(1));
    sim.pool.connect(sim.now).unwrap();
    sim.drain();
    for addr in [A, B, C] {
        sim.accept(addr);
    }
    let tx = sim.publish("dup");
    assert_eq!(sim.got(A), ["dup"]);
    // A dies before answering: sent again, to B (it may now be on A and on B).
    sim.kill(A);
    assert_eq!(sim.got(B), ["dup"]);
    assert!(!sim.results.contains_key(&tx));
    // B dies too: the retry budget (1) is spent, the publish fails with both causes.
    sim.kill(B);
    let err = sim.results[&tx].clone().unwrap_err();
    let addrs: Vec<&str> = err.attempts.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(addrs, [A, B]);
    assert!(err.attempts.iter().all(|(_, e)| matches!(e, PublishError::ConnectionLost(ConnectionError::ServerClosed))));
    assert!(sim.got(C).is_empty());
    let stats = sim.pool.stats();
    assert_eq!(stats[0].retried_elsewhere, 1);
    assert_eq!(stats[1].retried_elsewhere, 0);
}

#[test]
fn a_refused_publish_is_not_sent_elsewhere() {
    let mut sim = Sim::new(&[A, B], Strategy::Failover);
    sim.pool.connect(sim.now).unwrap();
    sim.drain();
    sim.accept(A);
    sim.accept(B);
    let tx = sim.publish("bad");
    let conn = sim.conn(A);
    sim.pool.handle_input(conn, sim.now, error(b"E_BAD_MESSAGE PUB message too big 2048 > 1024"));
    sim.drain();
    let err = sim.results[&tx].clone().unwrap_err();
    assert!(matches!(&err.attempts[..], [(a, PublishError::Server(e))] if a == A && e.code == ErrorCode::BadMessage));
    assert!(sim.got(B).is_empty());
    // nsqd closed the connection after the error; that is not held against A.
    assert!(!matches!(sim.health(A), Health::Down { .. }), "{:?}", sim.health(A));
}

#[test]
fn with_no_nsqd_connected_a_publish_waits_at_most_wait_then_fails_with_the_dial_error() {
    let wait = Duration::from_secs(3);
    let mut sim = Sim::with(&[A, B], PoolOptions::new(Strategy::Failover).wait(wait));
    let tx = sim.publish("x");
    let t0 = sim.now;
    // Every dial is refused, for ever.
    while !sim.results.contains_key(&tx) {
        for addr in [A, B] {
            if sim.pending_dial(addr).is_some() {
                sim.refuse(addr);
            }
        }
        assert!(sim.now - t0 <= wait, "still waiting after {:?}", sim.now - t0);
        sim.advance(Duration::from_millis(10));
    }
    let err = sim.results[&tx].clone().unwrap_err();
    assert!(err.attempts.iter().all(|(_, e)| matches!(
        e,
        PublishError::NotConnected(ConnectionError::Dial { error, .. }) if error.kind() == std::io::ErrorKind::ConnectionRefused
    )));
    assert_eq!(err.attempts.len(), 2, "both nsqds' causes: {err}");
    // Redials of each nsqd were spaced by the jittered backoff: [d/2, d), d = 100 ms doubling.
    for addr in [A, B] {
        let times: Vec<ConnId> = sim.dialled.iter().filter(|(_, a)| *a == addr).map(|(&c, _)| c).collect();
        assert!(times.len() >= 3 && times.len() <= 8, "{addr}: {} dials in {wait:?}", times.len());
    }
}

#[test]
fn an_nsqd_that_drops_every_connection_at_once_is_backed_off() {
    let mut sim = Sim::new(&[A], Strategy::Failover);
    sim.pool.connect(sim.now).unwrap();
    sim.drain();
    let mut dial_times = Vec::new();
    while sim.now - sim.start < Duration::from_secs(60) {
        if sim.pending_dial(A).is_some() {
            dial_times.push(sim.now);
            sim.accept(A);
            sim.kill(A);
        }
        sim.advance(Duration::from_millis(10));
    }
    // 100 ms doubling to 5 s: about 20 attempts a minute, not thousands.
    assert!(dial_times.len() <= 25, "{} dials in a minute", dial_times.len());
    for (n, w) in dial_times.windows(2).enumerate() {
        let d = Duration::from_millis(100 << n.min(6)).min(Duration::from_secs(5));
        let gap = w[1] - w[0];
        assert!(gap >= d / 2 && gap <= d + Duration::from_millis(10), "dial {n}: {gap:?} for d = {d:?}");
    }
}

#[test]
fn stop_finishes_what_was_sent_and_fails_what_waits() {
    let mut sim = Sim::new(&[A, B], Strategy::Failover);
    sim.pool.connect(sim.now).unwrap();
    sim.drain();
    sim.refuse(A);
    sim.accept(B);
    let in_flight = sim.publish("f");
    sim.pool.stop(sim.now);
    sim.drain();
    assert!(!sim.pool.is_stopped());
    assert!(!sim.results.contains_key(&in_flight));
    let t = Topic::new("t").unwrap();
    assert!(sim.pool.publish(&t, Bytes::from_static(b"late"), sim.now).is_err());
    sim.ack(B);
    assert_eq!(sim.results[&in_flight], Ok(()));
    assert!(sim.pool.is_stopped());
    assert!(matches!(sim.events.last(), Some(PoolEvent::Stopped)));

    // Waiting for a connected nsqd when stopped: fails at once with why.
    let mut sim = Sim::new(&[A], Strategy::Failover);
    let waiting = sim.publish("w");
    sim.refuse(A);
    sim.pool.stop(sim.now);
    sim.drain();
    let err = sim.results[&waiting].clone().unwrap_err();
    assert!(matches!(&err.attempts[..], [(a, PublishError::NotConnected(ConnectionError::Dial { .. }))] if a == A));
    assert!(sim.pool.is_stopped());
}

#[test]
fn nsqds_can_be_added_and_removed() {
    let mut sim = Sim::new(&[A], Strategy::RoundRobin);
    sim.pool.connect(sim.now).unwrap();
    sim.drain();
    sim.accept(A);
    assert!(sim.pool.add_nsqd(B, sim.now).unwrap());
    assert!(!sim.pool.add_nsqd(B, sim.now).unwrap());
    sim.drain();
    sim.accept(B);
    sim.publish("1");
    sim.publish("2");
    assert_eq!((sim.got(A).len(), sim.got(B).len()), (1, 1));
    sim.ack_all();
    assert!(sim.pool.remove_nsqd(A, sim.now));
    sim.drain();
    assert!(sim.closed.contains(&sim.dialled.keys().copied().next().unwrap()));
    sim.publish("3");
    assert_eq!(sim.got(B).len(), 2);
    assert_eq!(sim.pool.nsqds().collect::<Vec<_>>(), [B]);
}

fn nodes_response(nsqds: &[&str]) -> BytesMut {
    let list: Vec<String> = nsqds
        .iter()
        .map(|addr| {
            let (host, port) = addr.rsplit_once(':').unwrap();
            format!(
                r#"{{"remote_address":"{host}:1","hostname":"h","broadcast_address":"{host}","tcp_port":{port},"http_port":4151,"version":"1.3.0","tombstones":[],"topics":["t"]}}"#
            )
        })
        .collect();
    let body = format!(r#"{{"producers":[{}]}}"#, list.join(","));
    BytesMut::from(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
}

impl Sim {
    /// lookupd at `addr` answers the pool's pending query with `nsqds`.
    fn answer_nodes(&mut self, lookupd: &str, nsqds: &[&str]) {
        let q = self.pending_dial(lookupd).unwrap();
        self.pool.handle_connected(q, self.now);
        self.drain();
        let request = String::from_utf8(self.raw[&q].clone()).unwrap();
        assert!(request.starts_with("GET /nodes HTTP/1.1\r\nHost: 127.0.0.1:4161\r\n"), "{request:?}");
        self.pool.handle_input(q, self.now, nodes_response(nsqds));
        self.drain();
        assert!(self.closed.contains(&q), "the query's connection closes once answered");
    }
}

#[test]
fn discovery_takes_the_nsqds_from_lookupd_nodes() {
    const LOOKUPD: &str = "127.0.0.1:4161";
    let mut sim = Sim::new(&[], Strategy::RoundRobin);
    assert!(sim.pool.connect_to_nsqlookupd(LOOKUPD, sim.now).unwrap());
    sim.drain();
    assert_eq!(sim.dialled.values().collect::<Vec<_>>(), [LOOKUPD], "asked at once");
    sim.answer_nodes(LOOKUPD, &[A, B]);
    assert_eq!(sim.pool.nsqds().collect::<Vec<_>>(), [A, B]);
    sim.publish("1");
    sim.accept(A);
    sim.accept(B);
    sim.publish("2");
    sim.ack_all();
    assert_eq!((sim.got(A).len(), sim.got(B).len()), (1, 1));
    // A dies and lookupd stops listing it, C appears: A leaves, C joins.
    sim.kill(A);
    let polled = sim.dialled.len();
    while sim.pending_dial(LOOKUPD).is_none() || sim.dialled.len() == polled {
        sim.advance(Duration::from_secs(1));
        if sim.pending_dial(A).is_some() {
            sim.refuse(A);
        }
    }
    assert!(sim.now - sim.start <= Duration::from_secs(79), "the next poll within the interval and its jitter");
    sim.answer_nodes(LOOKUPD, &[B, C]);
    assert_eq!(sim.pool.nsqds().collect::<Vec<_>>(), [B, C]);
    sim.accept(C);
    assert_eq!(sim.health(C), Health::Connected);
    // A failed query is reported; the nsqds stay.
    while sim.pending_dial(LOOKUPD).is_none() {
        sim.advance(Duration::from_secs(1));
    }
    let q = sim.pending_dial(LOOKUPD).unwrap();
    sim.pool.handle_connect_failed(q, refused(), sim.now);
    sim.drain();
    assert!(sim.events.iter().any(|e| matches!(e, PoolEvent::LookupdFailed { .. })));
    assert_eq!(sim.pool.nsqds().collect::<Vec<_>>(), [B, C]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Under random dials, answers, refusals, losses and time, for every strategy: every
    /// publish resolves exactly once, an acknowledged one was received by some nsqd that
    /// answered OK, and the pool stops.
    #[test]
    fn every_publish_resolves_exactly_once(
        strategy in prop::sample::select(vec![Strategy::Failover, Strategy::RoundRobin, Strategy::All]),
        ops in prop::collection::vec((0u8..9, 0usize..3), 1..150),
    ) {
        let addrs = [A, B, C];
        let mut sim = Sim::new(&addrs, strategy);
        let mut issued = Vec::new();
        for (op, k) in ops {
            let addr = addrs[k];
            match op {
                0..=2 => issued.push(sim.publish("m")),
                3 => if sim.pending_dial(addr).is_some() { sim.accept(addr) },
                4 => if sim.pending_dial(addr).is_some() { sim.refuse(addr) },
                5 => if sim.has_unanswered(addr) { sim.ack(addr); },
                6 => if sim.up_conn(addr).is_some() { sim.kill(addr) },
                7 => {
                    if sim.has_unanswered(addr) {
                        let conn = sim.conn(addr);
                        sim.pool.handle_input(conn, sim.now, error(b"E_PUB_FAILED no"));
                        sim.drain();
                    }
                }
                _ => sim.advance(Duration::from_millis(300)),
            }
            let oks = sim.results.values().filter(|r| r.is_ok()).count();
            let acks: u64 = sim.pool.stats().iter().map(|s| s.acknowledged).sum();
            prop_assert!(oks as u64 <= acks, "{} Ok results for {} acknowledgements", oks, acks);
        }
        // Stop, and let every nsqd answer or vanish: everything resolves.
        sim.pool.stop(sim.now);
        sim.drain();
        sim.ack_all();
        for addr in addrs {
            if let Some(conn) = sim.live(addr) {
                sim.pool.handle_eof(conn, sim.now);
                sim.drain();
            }
        }
        sim.advance(Duration::from_secs(120));
        prop_assert!(sim.pool.is_stopped());
        for tx in &issued {
            prop_assert!(sim.results.contains_key(tx), "{:?} never resolved", tx);
        }
        prop_assert_eq!(sim.results.len(), issued.len());
    }
}

#[test]
fn all_owes_nothing_to_an_nsqd_removed_before_the_publish_was_sent() {
    let mut sim = Sim::new(&[A, B], Strategy::All);
    sim.pool.connect(sim.now).unwrap();
    sim.drain();
    sim.accept(A);
    // B is still dialling: the publish waits on its connection.
    let tx = sim.publish("x");
    assert_eq!(sim.got(A), ["x"]);
    assert!(sim.pool.remove_nsqd(B, sim.now));
    sim.drain();
    assert!(!sim.results.contains_key(&tx), "resolved before A answered: {:?}", sim.results.get(&tx));
    sim.ack(A);
    assert_eq!(sim.results[&tx], Ok(()), "B left the pool: A's OK is the whole answer");
}

#[test]
fn an_nsqd_the_pool_closed_itself_is_not_blamed_for_a_publish_that_waited_for_it() {
    let mut sim = Sim::new(&[A, B], Strategy::All);
    sim.pool.connect(sim.now).unwrap();
    sim.drain();
    sim.accept(A);
    sim.accept(B);
    let w = sim.publish("w");
    sim.ack(A);
    // B leaves the pool while it still owes an answer, and comes back before its connection
    // closed: the pool closed that connection itself. B answers, its connection ends, and the
    // redial is never answered.
    assert!(sim.pool.remove_nsqd(B, sim.now));
    sim.drain();
    assert!(sim.pool.add_nsqd(B, sim.now).unwrap());
    sim.drain();
    sim.ack(B);
    assert_eq!(sim.results[&w], Ok(()));
    assert!(sim.pending_dial(B).is_some(), "B is redialled");
    let tx = sim.publish("x");
    sim.ack(A);
    assert!(!sim.results.contains_key(&tx), "waits for B");
    sim.advance(Duration::from_secs(11));
    let err = sim.results[&tx].clone().unwrap_err();
    assert_eq!(err.attempts.len(), 1, "{err}");
    assert_eq!(err.attempts[0].0, B);
    assert!(
        matches!(&err.attempts[0].1, PublishError::NotConnected(ConnectionError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut),
        "{err}"
    );
    assert!(err.to_string().contains("not connected within 10s"), "{err}");
}
