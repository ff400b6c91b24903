//! Cost per message at fleet scale: one `ConsumerState` taking messages from 1 and from 16
//! connections (as if from 16 nsqds), and one `ProducerPoolState` publishing over 1 and 16
//! nsqds. The cost per message should not grow with the number of connections. The control
//! `consume_and_fin_16_reads/1` takes the messages of the 16-connection case in as many reads
//! from one connection: it separates what the reads cost from what the connections cost.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use nsq_sansio::{
    Action, Channel, Config, ConnId, ConsumerEvent, ConsumerState, Frame, PoolEvent, PoolOptions, ProducerPoolState,
    Response, Strategy, Topic,
};

#[path = "../tests/common/load.rs"]
mod load;

const MESSAGES: usize = 2000;

fn ok() -> BytesMut {
    let mut b = BytesMut::new();
    Frame::Response(Bytes::from_static(b"OK")).encode(&mut b);
    b
}

/// A consumer subscribed on `conns` connections, with max_in_flight 2500.
fn consumer(conns: usize, now: Instant) -> (ConsumerState, Vec<ConnId>) {
    let mut config = Config::new();
    config.max_in_flight(2500).rng_seed(1);
    let mut c = ConsumerState::new(Topic::new("t").unwrap(), Channel::new("c").unwrap(), Arc::new(config), now);
    for i in 0..conns {
        c.connect_to_nsqd(&format!("10.0.0.{}:4150", i + 1), now).unwrap();
    }
    let mut ids = Vec::new();
    while let Some(action) = c.poll_action() {
        if let Action::Connect { conn, .. } = action {
            ids.push(conn);
        }
    }
    for &id in &ids {
        c.handle_connected(id, now);
        c.handle_input(id, now, ok());
        c.handle_input(id, now, ok());
    }
    while c.poll_transmit().is_some() {}
    while c.poll_event().is_some() {}
    (c, ids)
}

fn consumer_fleet(c: &mut Criterion) {
    let mut group = c.benchmark_group("fleet_consumer");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    // The messages come in 16 reads either way: from 16 connections, or all from one (the
    // control: what the reads themselves cost, whatever the number of connections).
    for (name, conns) in [("consume_and_fin", 1), ("consume_and_fin", 16), ("consume_and_fin_16_reads", 1)] {
        let now = Instant::now();
        let (mut consumer, ids) = consumer(conns, now);
        let reads = if name == "consume_and_fin" { conns } else { 16 };
        // Each read's share of the messages, with ids distinct across reads.
        let inputs: Vec<BytesMut> = (0..reads).map(|round| load::frames(MESSAGES / reads, round, 200)).collect();
        group.bench_with_input(BenchmarkId::new(name, conns), &conns, |b, _| {
            b.iter_batched(
                || inputs.clone(),
                |inputs| {
                    for (&id, input) in ids.iter().cycle().zip(inputs) {
                        consumer.handle_input(id, now, input);
                    }
                    while let Some(event) = consumer.poll_event() {
                        if let ConsumerEvent::Message { conn, message } = event {
                            consumer.respond(conn, &message.id, message.attempts, Response::Finish, now).unwrap();
                        }
                    }
                    let mut written = 0;
                    while let Some((_, out)) = consumer.poll_transmit() {
                        written += out.len();
                    }
                    written
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// A round-robin pool over `members` nsqds, every one connected.
fn pool(members: usize, now: Instant) -> (ProducerPoolState, Vec<ConnId>) {
    let mut config = Config::new();
    config.rng_seed(1);
    let addrs: Vec<String> = (0..members).map(|i| format!("10.0.0.{}:4150", i + 1)).collect();
    let mut p = ProducerPoolState::new(addrs, PoolOptions::new(Strategy::RoundRobin), Arc::new(config), now);
    p.connect(now).unwrap();
    let mut ids = Vec::new();
    while let Some(action) = p.poll_action() {
        if let Action::Connect { conn, .. } = action {
            ids.push(conn);
        }
    }
    for &id in &ids {
        p.handle_connected(id, now);
        while p.poll_transmit_for(id).is_some() {}
        p.handle_input(id, now, ok());
    }
    while p.poll_event().is_some() {}
    (p, ids)
}

fn pool_fleet(c: &mut Criterion) {
    let mut group = c.benchmark_group("fleet_pool");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    let topic = Topic::new("t").unwrap();
    let body = Bytes::from(vec![b'x'; 200]);
    for members in [1, 16] {
        let now = Instant::now();
        let (mut pool, ids) = pool(members, now);
        // Every member answers its share of the publishes with OK, in one read.
        let answers: Vec<BytesMut> = (0..members)
            .map(|_| {
                let mut b = BytesMut::new();
                for _ in 0..MESSAGES / members {
                    b.extend_from_slice(&ok());
                }
                b
            })
            .collect();
        group.bench_with_input(BenchmarkId::new("publish_and_ack", members), &members, |b, _| {
            b.iter_batched(
                || answers.clone(),
                |answers| {
                    for _ in 0..MESSAGES {
                        pool.publish(&topic, body.clone(), now).unwrap();
                    }
                    let mut written = 0;
                    while let Some((_, out)) = pool.poll_transmit() {
                        written += out.len();
                    }
                    for (&id, answer) in ids.iter().zip(answers) {
                        pool.handle_input(id, now, answer);
                    }
                    let mut acked = 0;
                    while let Some(event) = pool.poll_event() {
                        if let PoolEvent::Published { result: Ok(()), .. } = event {
                            acked += 1;
                        }
                    }
                    assert_eq!(acked, MESSAGES);
                    written
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, consumer_fleet, pool_fleet);
criterion_main!(benches);
