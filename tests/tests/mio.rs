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

use nsq_sansio::{
    Channel, Config, ConnectionError, ConsumerEvent, ConsumerState, ProducerEvent, ProducerState, PublishError,
    Response, Topic,
};
use nsq_tests::{FakeLookupd, FakeNsqd};

use nsq_sansio::Machine;
use reactor::Reactor;
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

/// The loop survives what the network does: nsqd drops the consumer's connection, the
/// consumer asks lookupd again and redials, and what nsqd stores afterwards is consumed.
#[test]
fn a_dropped_connection_is_found_again_through_lookupd_and_redialled() {
    let nsqds = Arc::new([FakeNsqd::start_default().unwrap(), FakeNsqd::start_default().unwrap()]);
    let lookupd = FakeLookupd::start().unwrap();
    for (n, nsqd) in nsqds.iter().enumerate() {
        lookupd.register("redial", &nsqd.addr());
        for i in 0..10 {
            nsqd.publish("redial", format!("{n}-{i}").as_bytes());
        }
    }
    let (lookupd_addr, fakes) = (lookupd.addr(), nsqds.clone());
    let (consumed, connected) = within("consuming", move || {
        let now = Instant::now();
        let (topic, channel) = (Topic::new("redial").unwrap(), Channel::new("c").unwrap());
        let mut config = round_trip::config().unwrap();
        // A connection that did not stay up for 10 s is redialled at the next poll.
        config.lookupd_poll_interval(Duration::from_millis(300)).unwrap();
        let mut consumer = ConsumerState::new(topic, channel, Arc::new(config), now);
        consumer.connect_to_nsqlookupd(&lookupd_addr, now).unwrap();
        let mut reactor = Reactor::new().unwrap();
        let (mut consumed, mut connected, mut dropped) = (BTreeSet::new(), Vec::new(), false);
        loop {
            let now = Instant::now();
            while let Some(event) = consumer.poll_event() {
                match event {
                    ConsumerEvent::Message { conn, message } => {
                        let answered = consumer.respond(conn, &message.id, message.attempts, Response::Finish, now);
                        if answered.is_ok() {
                            consumed.insert(String::from_utf8(message.body.to_vec()).unwrap());
                        }
                    }
                    ConsumerEvent::Connected { addr, .. } => connected.push(addr),
                    _ => {}
                }
            }
            if consumed.len() == 20 && connected.len() == 2 && !dropped {
                dropped = true;
                // Everything stored so far is consumed: nsqd 0 drops its clients, then stores
                // ten more that only a redialled connection can get.
                fakes[0].kill_all();
                for i in 10..20 {
                    fakes[0].publish("redial", format!("0-{i}").as_bytes());
                }
            }
            if consumed.len() == 30 {
                consumer.stop(now);
            }
            if consumer.is_stopped() && reactor.is_idle() {
                return (consumed, connected);
            }
            reactor.turn(&mut [&mut consumer as &mut dyn Machine]).unwrap();
        }
    });
    let expected: BTreeSet<String> =
        (0..20).map(|i| format!("0-{i}")).chain((0..10).map(|i| format!("1-{i}"))).collect();
    assert_eq!(consumed, expected);
    assert_eq!(connected.len(), 3, "{connected:?}");
    assert_eq!(connected[2], nsqds[0].addr(), "the dropped nsqd is the one redialled");
    assert_eq!(nsqds[0].stats().connections, 2);
    assert!(lookupd.queries() >= 2, "the loss made the consumer ask lookupd again");
}

/// Bodies far larger than a socket buffer: writes end part way and resume when the socket is
/// writable again, and reads stop after a share per turn and resume on the next.
#[test]
fn large_messages_cross_partial_writes_and_capped_reads() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let addr = nsqd.addr();
    let bodies: Vec<Vec<u8>> = (0..12u8).map(|i| vec![b'a' + i; 1_000_000]).collect();
    let sent = bodies.clone();
    let consumed = within("the large round trip", move || {
        let now = Instant::now();
        let mut config = round_trip::config().unwrap();
        // 12 MB leave in one write: a generous deadline, this is no speed test.
        config.write_timeout(Duration::from_secs(60)).unwrap();
        let config = Arc::new(config);
        let topic = Topic::new("large").unwrap();
        let mut producer = ProducerState::new(addr.as_str(), config.clone(), now);
        for body in &sent {
            producer.publish(&topic, body.clone().into(), now).unwrap();
        }
        let mut consumer = ConsumerState::new(topic, Channel::new("c").unwrap(), config, now);
        consumer.connect_to_nsqd(&addr, now).unwrap();
        let mut reactor = Reactor::new().unwrap();
        let mut consumed = Vec::new();
        loop {
            let now = Instant::now();
            while let Some(event) = producer.poll_event() {
                if let ProducerEvent::Published { result, .. } = event {
                    result.unwrap();
                }
            }
            while let Some(event) = consumer.poll_event() {
                if let ConsumerEvent::Message { conn, message } = event {
                    consumer.respond(conn, &message.id, message.attempts, Response::Finish, now).unwrap();
                    consumed.push(message.body.to_vec());
                }
            }
            if consumed.len() == sent.len() {
                consumer.stop(now);
                producer.stop(now);
            }
            if consumer.is_stopped() && producer.is_stopped() && reactor.is_idle() {
                return consumed;
            }
            reactor.turn(&mut [&mut producer as &mut dyn Machine, &mut consumer]).unwrap();
        }
    });
    let mut consumed = consumed;
    consumed.sort();
    assert_eq!(consumed, bodies);
    assert_eq!(nsqd.stats().finished, 12);
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
