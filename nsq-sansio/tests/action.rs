//! What every `Action::Connect` carries: the address, the local address, the dial timeout and
//! the write timeout, for each state machine that dials (consumer nsqd connections and lookupd
//! queries, producer, pool), so an event loop needs nothing from the `Config` to carry it out.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nsq_sansio::{
    Action, Channel, Config, ConsumerState, PoolOptions, ProducerPoolState, ProducerState, Strategy, Topic,
};

/// The connect actions queued so far: (addr, local_addr, timeout, write_timeout).
fn connects(mut poll: impl FnMut() -> Option<Action>) -> Vec<(String, Option<SocketAddr>, Duration, Duration)> {
    let mut out = Vec::new();
    while let Some(action) = poll() {
        if let Action::Connect { addr, local_addr, timeout, write_timeout, .. } = action {
            out.push((addr, local_addr, timeout, write_timeout));
        }
    }
    out
}

fn config() -> Arc<Config> {
    let mut config = Config::new();
    config.dial_timeout(Duration::from_millis(1500)).write_timeout(Duration::from_millis(2500)).unwrap();
    config.lookupd_poll_timeout(Duration::from_secs(7)).unwrap();
    config.local_addr(local());
    Arc::new(config)
}

/// The local address the configuration binds nsqd connections to.
fn local() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 0)))
}

const DIAL: Duration = Duration::from_millis(1500);
const WRITE: Duration = Duration::from_millis(2500);

#[test]
fn consumer_connects_carry_the_write_timeout_for_nsqd_and_lookupd() {
    let now = Instant::now();
    let local = local();
    let mut consumer = ConsumerState::new(Topic::new("t").unwrap(), Channel::new("c").unwrap(), config(), now);
    consumer.connect_to_nsqd("127.0.0.1:4150", now).unwrap();
    consumer.connect_to_nsqlookupd("127.0.0.1:4161", now).unwrap();
    assert_eq!(
        connects(|| consumer.poll_action()),
        [
            ("127.0.0.1:4150".to_owned(), local, DIAL, WRITE),
            // A lookupd query: unbound, its dial bounded by lookupd_poll_timeout.
            ("127.0.0.1:4161".to_owned(), None, Duration::from_secs(7), WRITE),
        ]
    );
}

#[test]
fn producer_and_pool_connects_carry_the_write_timeout() {
    let now = Instant::now();
    let local = local();
    let mut producer = ProducerState::new("127.0.0.1:4150", config(), now);
    producer.connect(now).unwrap();
    assert_eq!(connects(|| producer.poll_action()), [("127.0.0.1:4150".to_owned(), local, DIAL, WRITE)]);

    let addrs = ["127.0.0.1:4150", "127.0.0.1:4250"];
    let mut pool = ProducerPoolState::new(addrs, PoolOptions::new(Strategy::All), config(), now);
    pool.connect(now).unwrap();
    let expected: Vec<_> = addrs.iter().map(|a| ((*a).to_owned(), local, DIAL, WRITE)).collect();
    assert_eq!(connects(|| pool.poll_action()), expected);
}
