//! The mio example's loop (`nsq-sansio/examples/mio`), the same source files, against the fake
//! nsqlookupd and two fake nsqds.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../../nsq-sansio/examples/mio/reactor.rs"]
mod reactor;
#[path = "../../nsq-sansio/examples/mio/round_trip.rs"]
mod round_trip;

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nsq_sansio::{Config, ConnectionError, ProducerEvent, ProducerState, PublishError, Topic};
use nsq_tests::{FakeLookupd, FakeNsqd};

use reactor::{Machine, Reactor};
use round_trip::RoundTrip;

/// Runs `f` on its own thread; a hang fails the test instead of stalling the suite.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("{what} hung"))
}

/// Waits (bounded) until `done` holds.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_example_publishes_consumes_through_lookupd_from_two_nsqds_and_stops() {
    let nsqds = [FakeNsqd::start_default().unwrap(), FakeNsqd::start_default().unwrap()];
    let lookupd = FakeLookupd::start().unwrap();
    for nsqd in &nsqds {
        lookupd.register("mio", &nsqd.addr());
    }
    let round_trip = RoundTrip {
        lookupd: lookupd.addr(),
        nsqds: nsqds.iter().map(FakeNsqd::addr).collect(),
        topic: "mio".to_owned(),
        channel: "mio_example".to_owned(),
        count: 40,
    };
    let consumed = within("the round trip", move || {
        let mut consumed = Vec::new();
        round_trip.run(round_trip::config().unwrap(), |m| consumed.push(m.body.to_vec())).map(|()| consumed)
    })
    .unwrap();

    // Every message published was consumed, once.
    let expected: BTreeSet<Vec<u8>> = (0..40).map(|i| format!("message {i}").into_bytes()).collect();
    assert_eq!(consumed.len(), 40);
    assert_eq!(consumed.into_iter().collect::<BTreeSet<_>>(), expected);
    // Half went to each nsqd, and each nsqd had every one of its messages finished: the
    // consumer was subscribed to both, found through lookupd.
    for nsqd in &nsqds {
        let stats = nsqd.stats();
        assert_eq!(stats.published["mio"], 20);
        assert_eq!(stats.finished, 20);
        assert_eq!(nsqd.depth("mio", "mio_example"), 0);
    }
    assert!(lookupd.queries() >= 1);
    // The loop returned once every socket was closed: the nsqds see no client left.
    for nsqd in &nsqds {
        eventually("nsqd still has a client after the loop returned", || nsqd.clients() == 0);
    }
}

#[test]
fn a_refused_dial_fails_the_publish_with_the_operating_systems_cause() {
    let dead = nsq_tests::scenarios::dead_addr();
    let round_trip = RoundTrip {
        lookupd: "127.0.0.1:1".to_owned(),
        nsqds: vec![dead.clone()],
        topic: "mio".to_owned(),
        channel: "c".to_owned(),
        count: 1,
    };
    let error = within("the round trip", move || round_trip.run(round_trip::config().unwrap(), |_| {}).unwrap_err());
    let error = error.downcast::<PublishError>().unwrap();
    match *error {
        PublishError::NotConnected(ConnectionError::Dial { addr, error }) => {
            assert_eq!(addr, dead);
            assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused, "{error}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_reactor_binds_local_addr_and_closes_cleanly() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let from = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let addr = nsqd.addr();
    let acked = within("the publish", move || {
        let mut config = Config::new();
        config.local_addr(Some(from));
        let now = Instant::now();
        let mut producer = ProducerState::new(addr, Arc::new(config), now);
        producer.publish(&Topic::new("bound").unwrap(), "x".into(), now).unwrap();
        let mut reactor = Reactor::new().unwrap();
        let mut acked = false;
        while !(producer.is_stopped() && reactor.is_idle()) {
            while let Some(event) = producer.poll_event() {
                if let ProducerEvent::Published { result, .. } = event {
                    acked = result.is_ok();
                    producer.stop(Instant::now());
                }
            }
            reactor.turn(&mut [&mut producer as &mut dyn Machine]).unwrap();
        }
        acked
    });
    assert!(acked);
    assert_eq!(nsqd.stats().peers, [from]);
    eventually("nsqd still has a client", || nsqd.clients() == 0);
}
