//! Decoding a read buffer of message frames with 200-byte bodies: the consumer's parsing cost.
#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nsq_sansio::{decode, Frame};

#[path = "../tests/common/load.rs"]
mod load;

use load::frames;

const FRAMES: usize = 4096;

fn decode_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for body in [200, 4096] {
        let input = frames(FRAMES, 0, body);
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
