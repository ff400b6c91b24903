//! A `ConnectionState` consuming a buffer of message frames and answering each with FIN: the
//! consumer's hot loop without sockets.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nsq_sansio::Event;

#[path = "../tests/common/load.rs"]
mod load;

use load::{frames, subscribed};

const MESSAGES: usize = 2000;

fn consume_and_finish(c: &mut Criterion) {
    let input = frames(MESSAGES, 0, 200);
    let mut group = c.benchmark_group("connection");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    let mut conn = subscribed(Instant::now(), 2500);
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
