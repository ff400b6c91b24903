//! A `ConnectionState` consuming a buffer of message frames and answering each with FIN: the
//! consumer's hot loop without sockets.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nsq_sansio::{Channel, Config, ConnectionState, Event, Frame, Message, MessageId, Topic};

const MESSAGES: usize = 2000;

fn frames(n: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(n * 240);
    for i in 0..n {
        let mut id = [b'0'; 16];
        id[..8].copy_from_slice(format!("{i:08}").as_bytes());
        let msg = Message { id: MessageId(id), timestamp: 1, attempts: 1, body: Bytes::from(vec![b'x'; 200]) };
        Frame::Message(msg).encode(&mut buf);
    }
    buf
}

fn subscribed() -> ConnectionState {
    let now = Instant::now();
    let mut config = Config::new();
    config.set("max_in_flight", "2500").unwrap();
    let mut conn = ConnectionState::new(Arc::new(config), "127.0.0.1", now);
    conn.subscribe(&Topic::new("t").unwrap(), &Channel::new("c").unwrap()).unwrap();
    let mut ok = BytesMut::new();
    Frame::Response(Bytes::from_static(b"OK")).encode(&mut ok);
    conn.handle_input(now, ok.clone());
    conn.handle_input(now, ok);
    conn.ready(2500).unwrap();
    while conn.poll_event().is_some() {}
    while conn.poll_transmit().is_some() {}
    conn
}

fn consume_and_finish(c: &mut Criterion) {
    let input = frames(MESSAGES);
    let mut group = c.benchmark_group("connection");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    let mut conn = subscribed();
    let now = Instant::now();
    group.bench_function("consume_and_fin_200B", |b| {
        b.iter_batched(
            || input.clone(),
            |buf| {
                conn.handle_input(now, buf);
                while let Some(event) = conn.poll_event() {
                    if let Event::Message(msg) = event {
                        conn.finish(&msg.id).unwrap();
                    }
                }
                let mut written = 0;
                while let Some(out) = conn.poll_transmit() {
                    written += out.len();
                }
                written
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, consume_and_finish);
criterion_main!(benches);
