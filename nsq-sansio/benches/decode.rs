//! Decoding a read buffer of message frames with 200-byte bodies: the consumer's parsing cost.
#![allow(clippy::unwrap_used, missing_docs)]

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nsq_sansio::{decode, Frame, Message, MessageId};

const FRAMES: usize = 4096;

fn frames(n: usize, body: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(n * (body + 34));
    for i in 0..n {
        let mut id = [b'0'; 16];
        id[..8].copy_from_slice(format!("{i:08}").as_bytes());
        let msg = Message { id: MessageId(id), timestamp: 1, attempts: 1, body: Bytes::from(vec![b'x'; body]) };
        Frame::Message(msg).encode(&mut buf);
    }
    buf
}

fn decode_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for body in [200, 4096] {
        let input = frames(FRAMES, body);
        group.throughput(Throughput::Elements(FRAMES as u64));
        group.bench_function(format!("messages_{body}B/frames"), |b| {
            b.iter_batched_ref(
                || input.clone(),
                |rx| {
                    let mut n = 0;
                    while let Some(frame) = decode(rx, 1 << 20).unwrap() {
                        n += usize::from(matches!(frame, Frame::Message(_)));
                    }
                    assert_eq!(n, FRAMES);
                },
                BatchSize::LargeInput,
            )
        });
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_function(format!("messages_{body}B/bytes"), |b| {
            b.iter_batched_ref(
                || input.clone(),
                |rx| while decode(rx, 1 << 20).unwrap().is_some() {},
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, decode_frames);
criterion_main!(benches);
