//! Property tests of the codec: every command encodes to bytes that parse back to it, every
//! frame type round-trips through `decode`, and chunking a stream never changes what it decodes to.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::Owned;
use nsq_sansio::{decode, Channel, ErrorCode, Frame, Message, MessageId, ServerError, Topic};
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
    fn a_size_over_the_limit_is_refused_before_buffering(size in 17u32.., limit in 16u32..1 << 24) {
        prop_assume!(size > limit);
        let mut rx = BytesMut::from(&size.to_be_bytes()[..]);
        let err = decode(&mut rx, limit).unwrap_err();
        prop_assert_eq!(err.to_string(), format!("frame of {size} bytes exceeds the limit of {limit} bytes"));
        prop_assert_eq!(rx.capacity() < 64, true);
    }
}
