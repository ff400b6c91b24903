//! Encoding the commands a client sends most: PUB and MPUB with 200-byte bodies, and FIN.
#![allow(clippy::unwrap_used, missing_docs)]

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nsq_sansio::{Command, MessageId, Topic};

const N: usize = 4096;

fn encode(c: &mut Criterion) {
    let topic = Topic::new("bench_topic").unwrap();
    let body = vec![b'x'; 200];
    let bodies: Vec<Bytes> = (0..200).map(|_| Bytes::from(body.clone())).collect();
    let id = MessageId(*b"0123456789abcdef");
    let mut buf = BytesMut::with_capacity(N * 256);
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("pub_200B", |b| {
        b.iter(|| {
            buf.clear();
            for _ in 0..N {
                Command::Pub(&topic, &body).encode(&mut buf);
            }
        })
    });
    group.bench_function("fin", |b| {
        b.iter(|| {
            buf.clear();
            for _ in 0..N {
                Command::Fin(&id).encode(&mut buf);
            }
        })
    });
    group.throughput(Throughput::Elements(200 * 16));
    group.bench_function("mpub_200x200B/messages", |b| {
        b.iter(|| {
            buf.clear();
            for _ in 0..16 {
                Command::Mpub(&topic, &bodies).encode(&mut buf);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
