//! Fuzz target bodies, reached through the hidden `__fuzzing` feature. Not a public API.
//!
//! Each target checks invariants, not only the absence of panics. The structured targets take
//! `Arbitrary` inputs that are built into valid streams (correct CRCs, valid compression) before
//! a chosen few are damaged, so mutation reaches past checksums; [`Seed`] writes the bytes that
//! decode to a given input, so seed corpora can be built from captured traffic.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod config;
pub mod connection;
pub mod consumer;
pub mod deflate;
pub mod frame;
pub mod identify;
mod input;
pub mod lookupd;
pub mod snappy;

use arbitrary::{Arbitrary, Unstructured};

pub use input::{error_code, Blob, Seed, ServerFrame};

/// Every target, by the name of its `fuzz/fuzz_targets/<name>.rs`.
pub const TARGETS: &[&str] =
    &["config", "connection", "consumer", "deflate", "deflate_frames", "frame", "identify", "lookupd", "snappy"];

/// Runs one input of `target` as its fuzz target does (typed inputs decoded with
/// `arbitrary_take_rest`, as libfuzzer-sys does). Panics when an invariant breaks; returns false
/// for an unknown target.
pub fn run(target: &str, data: &[u8]) -> bool {
    fn typed<'a, T: Arbitrary<'a>>(data: &'a [u8], f: impl FnOnce(T)) {
        if let Ok(input) = T::arbitrary_take_rest(Unstructured::new(data)) {
            f(input);
        }
    }
    match target {
        "config" => config::set(data),
        "connection" => typed(data, connection::connection),
        "consumer" => typed(data, consumer::consumer),
        "deflate" => deflate::raw(data),
        "deflate_frames" => typed(data, deflate::frames),
        "frame" => frame::frame(data),
        "identify" => identify::identify(data),
        "lookupd" => lookupd::response(data),
        "snappy" => typed(data, snappy::snappy),
        _ => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{any, proptest};

    use super::*;

    /// `Seed` writes bytes that decode back to the value, for values decoded from any bytes.
    fn round_trips<T: for<'a> Arbitrary<'a> + Seed + PartialEq + std::fmt::Debug>(data: &[u8]) {
        let value = T::arbitrary_take_rest(Unstructured::new(data)).unwrap();
        let seed = value.to_seed();
        let again = T::arbitrary_take_rest(Unstructured::new(&seed)).unwrap();
        assert_eq!(again, value);
    }

    proptest! {
        #[test]
        fn seeds_decode_to_their_inputs(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            round_trips::<snappy::Input>(&data);
            round_trips::<deflate::Input>(&data);
            round_trips::<connection::Input>(&data);
            round_trips::<consumer::Input>(&data);
            round_trips::<Vec<ServerFrame>>(&data);
        }
    }

    #[test]
    fn variant_selectors_pick_their_variant() {
        for count in 1..40u32 {
            for index in 0..count {
                let mut out = Vec::new();
                input::seed_variant(&mut out, index, count);
                let x = u32::from_le_bytes(out.try_into().unwrap());
                assert_eq!((u64::from(x) * u64::from(count)) >> 32, u64::from(index));
            }
        }
    }

    #[test]
    fn a_valid_snappy_stream_decodes_whole() {
        let chunk = |kind, data: &[u8]| snappy::Chunk { kind, data: Blob(data.to_vec()), fault: snappy::Fault::None };
        let input = snappy::Input {
            start: 2,
            read: 3,
            limit: 5,
            chunks: vec![
                chunk(snappy::Kind::Compressed, &[b'a'; 300]),
                chunk(snappy::Kind::Padding, b"pad"),
                chunk(snappy::Kind::Uncompressed, b"hello"),
                chunk(snappy::Kind::Skippable(3), b"skip"),
                chunk(snappy::Kind::Identifier, b""),
            ],
        };
        snappy::snappy(input);
    }

    #[test]
    fn a_valid_deflate_stream_decodes_whole_and_its_end_is_refused() {
        let frames = vec![
            ServerFrame::Heartbeat,
            ServerFrame::Message { id: 1, attempts: 1, timestamp: 7, body: Blob(vec![b'x'; 5000]) },
        ];
        let write = |flush| deflate::Write { frames: frames.clone(), flush, damage: deflate::Damage::None };
        for level in [0, 1, 6, 9] {
            let writes = vec![write(deflate::Flush::None), write(deflate::Flush::Sync), write(deflate::Flush::Full)];
            deflate::frames(deflate::Input { level, read: 7, limit: 100, writes: writes.clone() });
            let mut finished = writes;
            finished.push(write(deflate::Flush::Finish));
            deflate::frames(deflate::Input { level, read: 0, limit: 1, writes: finished });
        }
    }

    #[test]
    fn compressed_connections_deliver_and_answer() {
        use connection::{Handshake, Input, Mode, Op};
        let message = |id| ServerFrame::Message { id, attempts: 1, timestamp: 1, body: Blob(b"body".to_vec()) };
        for mode in [Mode::Ok, Mode::Json, Mode::Snappy, Mode::Deflate(6)] {
            let ops = vec![
                Op::Frames { frames: vec![ServerFrame::Ok], shape: 0, read: 0 },
                Op::Ready(10),
                Op::Frames { frames: vec![message(1), ServerFrame::Heartbeat, message(2)], shape: 3, read: 5 },
                Op::Finish(1),
                Op::Requeue(2, 100),
                Op::Touch(2),
                Op::Close,
                Op::Frames { frames: vec![ServerFrame::CloseWait], shape: 1, read: 0 },
            ];
            // A body that deflates to about 100 bytes: the inflater holds most of its output.
            let big = ServerFrame::Run { id: 3, byte: 0, len: 16_250 };
            let ops = [vec![Op::Frames { frames: vec![big], shape: 1, read: 0 }], ops].concat();
            connection::connection(Input {
                handshake: Handshake { mode, max_rdy_count: 5, msg_timeout: 0, read: 3 },
                ops,
            });
        }
    }
}
