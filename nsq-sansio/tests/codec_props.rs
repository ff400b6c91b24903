//! Property tests of the codec: every command encodes to bytes that parse back to it, every
//! frame type round-trips through `decode`, and chunking a stream never changes what it decodes to,
//! whether the reads are joined by copying, by `decode_joined` from separate allocations, or
//! from one allocation.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::Owned;
use nsq_sansio::{
    decode, decode_joined, Channel, ErrorCode, Frame, FrameError, Message, MessageId, ServerError, Topic,
};
use proptest::prelude::*;

fn name_chars() -> impl Strategy<Value = String> {
    "[.a-zA-Z0-9_-]{1,64}"
}

/// The `#ephemeral` suffix counts towards the 64-character limit.
fn with_suffix(mut name: String, ephemeral: bool) -> String {
    if ephemeral {
        name.truncate(64 - "#ephemeral".len());
        name.push_str("#ephemeral");
    }
    name
}

fn topic() -> impl Strategy<Value = Topic> {
    (name_chars(), any::<bool>()).prop_map(|(n, eph)| Topic::new(with_suffix(n, eph)).unwrap())
}

fn channel() -> impl Strategy<Value = Channel> {
    (name_chars(), any::<bool>()).prop_map(|(n, eph)| Channel::new(with_suffix(n, eph)).unwrap())
}

fn id() -> impl Strategy<Value = MessageId> {
    "[0-9a-f]{16}".prop_map(|s| MessageId(s.as_bytes().try_into().unwrap()))
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..300)
}

fn ms() -> impl Strategy<Value = Duration> {
    (0u64..=10_000_000).prop_map(Duration::from_millis)
}

fn command() -> impl Strategy<Value = Owned> {
    prop_oneof![
        Just(Owned::Magic),
        body().prop_map(Owned::Identify),
        body().prop_map(Owned::Auth),
        (topic(), channel()).prop_map(|(t, c)| Owned::Sub(t, c)),
        (topic(), body()).prop_map(|(t, b)| Owned::Pub(t, b)),
        (topic(), prop::collection::vec(body().prop_map(Bytes::from), 0..8)).prop_map(|(t, b)| Owned::Mpub(t, b)),
        (topic(), ms(), body()).prop_map(|(t, d, b)| Owned::Dpub(t, d, b)),
        any::<u32>().prop_map(Owned::Rdy),
        id().prop_map(Owned::Fin),
        (id(), ms()).prop_map(|(i, d)| Owned::Req(i, d)),
        id().prop_map(Owned::Touch),
        Just(Owned::Cls),
        Just(Owned::Nop),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    let code = prop_oneof![
        prop::sample::select(ErrorCode::KNOWN).prop_map(ErrorCode::parse),
        "E_[A-Z_]{1,20}".prop_map(|c| ErrorCode::parse(&c)),
    ];
    prop_oneof![
        body().prop_map(|b| Frame::Response(b.into())),
        (code, "[^\u{0}]{0,80}").prop_map(|(code, message)| Frame::Error(ServerError { code, message })),
        (id(), any::<u64>(), any::<u16>(), body()).prop_map(|(id, timestamp, attempts, body)| {
            Frame::Message(Message { id, timestamp, attempts, body: body.into() })
        }),
    ]
}

/// Decodes `wire` read by read through `decode_joined`, each read a fresh allocation of the
/// bytes between two cuts (sorted, at most `wire.len()`).
fn decode_reads(wire: &[u8], cuts: &[usize], max_size: u32) -> Result<Vec<Frame>, FrameError> {
    let (mut rx, mut got, mut at) = (BytesMut::new(), Vec::new(), 0);
    for &cut in cuts.iter().chain([&wire.len()]) {
        let read = BytesMut::from(&wire[at..cut]);
        at = cut;
        if let Some(f) = decode_joined(&mut rx, read, max_size)? {
            got.push(f);
            while let Some(f) = decode(&mut rx, max_size)? {
                got.push(f);
            }
        }
    }
    assert!(rx.is_empty(), "{} bytes left", rx.len());
    Ok(got)
}

fn message(n: u8, body: usize) -> Frame {
    let body: Vec<u8> = (0..body).map(|i| i as u8 ^ n).collect();
    Frame::Message(Message { id: MessageId([b'a' + n; 16]), timestamp: 7, attempts: 2, body: body.into() })
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut wire = BytesMut::new();
    for f in frames {
        f.encode(&mut wire);
    }
    wire
}

#[test]
fn two_reads_split_at_every_offset_decode_the_same_frames() {
    // Cuts inside the first frame's size, header and body, between frames, and in the next ones.
    let frames = vec![message(0, 40), Frame::Response(b"_heartbeat_"[..].into()), message(1, 0), message(2, 90)];
    let wire = encode_all(&frames);
    for cut in 0..=wire.len() {
        assert_eq!(decode_reads(&wire, &[cut], 1 << 20).unwrap(), frames, "cut at {cut}");
    }
}

#[test]
fn a_frame_spanning_many_reads_decodes() {
    let frames = vec![message(0, 3), message(1, 1000), message(2, 5)];
    let wire = encode_all(&frames);
    for step in [1, 2, 3, 5, 7, 64, 333] {
        let cuts: Vec<usize> = (step..wire.len()).step_by(step).collect();
        assert_eq!(decode_reads(&wire, &cuts, 1 << 20).unwrap(), frames, "reads of {step} bytes");
    }
}

#[test]
fn joining_copies_only_the_missing_bytes() {
    let frames = vec![message(0, 100), message(1, 100), message(2, 100)];
    let wire = encode_all(&frames);
    let len = wire.len() / 3;
    for cut in [2, 4, 9, 50, len - 1] {
        let mut rx = BytesMut::from(&wire[..cut]);
        assert_eq!(decode(&mut rx, 1 << 20).unwrap(), None);
        let read = BytesMut::from(&wire[cut..]);
        let rest = read.as_ptr() as usize + (len - cut);
        assert_eq!(decode_joined(&mut rx, read, 1 << 20).unwrap().as_ref(), Some(&frames[0]));
        // The rest of the read is decoded where it lies, message bodies included.
        assert_eq!(rx.as_ptr() as usize, rest, "cut at {cut}");
        let Some(Frame::Message(msg)) = decode(&mut rx, 1 << 20).unwrap() else { panic!("not a message") };
        assert_eq!(msg.body.as_ptr() as usize, rest + 34);
    }
}

#[test]
fn reads_from_one_allocation_are_joined_without_copying() {
    let frames = vec![message(0, 100), message(1, 100)];
    let mut buf = encode_all(&frames);
    let start = buf.as_ptr() as usize;
    let mut rx = BytesMut::new();
    // Half the size: nothing is reserved for the frame yet, so the next read still continues it.
    assert_eq!(decode_joined(&mut rx, buf.split_to(2), 1 << 20).unwrap(), None);
    assert_eq!(rx.as_ptr() as usize, start);
    let first = decode_joined(&mut rx, buf.split(), 1 << 20).unwrap();
    assert_eq!(first.as_ref(), Some(&frames[0]));
    let Some(Frame::Message(msg)) = decode(&mut rx, 1 << 20).unwrap() else { panic!("not a message") };
    assert_eq!(msg.body.as_ptr() as usize, start + 134 + 34);
}

#[test]
fn a_whole_frame_left_in_rx_is_decoded_first() {
    let frames = vec![message(0, 10), message(1, 10), message(2, 10)];
    let wire = encode_all(&frames);
    let cut = wire.len() / 3 + 20;
    let mut rx = BytesMut::from(&wire[..cut]);
    let first = decode_joined(&mut rx, BytesMut::from(&wire[cut..]), 1 << 20).unwrap();
    assert_eq!(first.as_ref(), Some(&frames[0]));
    assert_eq!(decode(&mut rx, 1 << 20).unwrap().as_ref(), Some(&frames[1]));
    assert_eq!(decode(&mut rx, 1 << 20).unwrap().as_ref(), Some(&frames[2]));
    assert!(rx.is_empty());
}

#[test]
fn a_joined_size_over_the_limit_is_refused_before_the_body_is_copied() {
    let size = 5000u32.to_be_bytes();
    let mut rx = BytesMut::from(&size[..1]);
    let mut read = BytesMut::from(&size[1..]);
    read.extend_from_slice(&[0; 6000]);
    let err = decode_joined(&mut rx, read, 4096).unwrap_err();
    assert_eq!(err, FrameError::TooLarge { size: 5000, max: 4096 });
    assert!(rx.capacity() < 4096, "{} bytes reserved", rx.capacity());
}

proptest! {
    #[test]
    fn every_command_parses_back_to_itself(cmd in command()) {
        let wire = cmd.encode();
        prop_assert_eq!(wire.len(), cmd.command().encoded_len());
        let (parsed, used) = common::parse(&wire).expect("parses");
        prop_assert_eq!(used, wire.len());
        prop_assert_eq!(parsed, cmd);
    }

    #[test]
    fn every_frame_round_trips(frame in frame()) {
        let mut wire = BytesMut::new();
        frame.encode(&mut wire);
        let mut rx = wire.clone();
        let back = decode(&mut rx, u32::MAX).unwrap().expect("complete");
        prop_assert!(rx.is_empty());
        if let (Frame::Error(a), Frame::Error(b)) = (&back, &frame) {
            prop_assert_eq!(&a.code, &b.code);
            let non_fatal = ["E_FIN_FAILED", "E_REQ_FAILED", "E_TOUCH_FAILED"].contains(&a.code.as_str());
            prop_assert_eq!(a.is_fatal(), !non_fatal);
        }
        prop_assert_eq!(back, frame);
        // A partial frame is never a frame, and never consumes anything.
        for cut in [0, 3, 4, 7, 8, wire.len() - 1] {
            let mut part = BytesMut::from(&wire[..cut.min(wire.len() - 1)]);
            let len = part.len();
            prop_assert_eq!(decode(&mut part, u32::MAX).unwrap(), None);
            prop_assert_eq!(part.len(), len);
        }
    }

    #[test]
    fn chunking_never_changes_the_frames(
        frames in prop::collection::vec(frame(), 1..12),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(wire.len());
        let (mut rx, mut got, mut at) = (BytesMut::new(), Vec::new(), 0);
        for cut in cuts {
            rx.extend_from_slice(&wire[at..cut]);
            at = cut;
            while let Some(f) = decode(&mut rx, u32::MAX).unwrap() {
                got.push(f);
            }
        }
        prop_assert!(rx.is_empty());
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn reads_in_separate_allocations_never_change_the_frames(
        frames in prop::collection::vec(frame(), 1..12),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let wire = encode_all(&frames);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_reads(&wire, &cuts, u32::MAX).unwrap(), frames);
    }

    #[test]
    fn a_size_over_the_limit_is_refused_before_buffering(size in 17u32.., limit in 16u32..1 << 24) {
        prop_assume!(size > limit);
        let mut rx = BytesMut::from(&size.to_be_bytes()[..]);
        let err = decode(&mut rx, limit).unwrap_err();
        prop_assert_eq!(err.to_string(), format!("frame of {size} bytes exceeds the limit of {limit} bytes"));
        prop_assert_eq!(rx.capacity() < 64, true);
    }
}
