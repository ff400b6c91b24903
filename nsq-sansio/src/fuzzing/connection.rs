//! A `ConnectionState` after a completed handshake, driven by arbitrary server bytes,
//! application calls and time steps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};

use crate::{Channel, Config, ConnectionState, Event, Frame, MessageId, Topic};

/// One step of a fuzzed connection.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// Server bytes.
    Input(Vec<u8>),
    /// Virtual time passes (ms), then timers fire.
    Advance(u16),
    /// The socket reaches EOF.
    Eof,
    /// RDY.
    Ready(u16),
    /// FIN of the n-th message seen (or an unknown id).
    Finish(u8),
    /// REQ of the n-th message seen.
    Requeue(u8, u16),
    /// TOUCH of the n-th message seen.
    Touch(u8),
    /// CLS.
    Close,
}

/// Which transport the connection negotiated before the ops run.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Negotiated {
    /// Plain `OK` to IDENTIFY.
    Plain,
    /// Feature negotiation with snappy on.
    Snappy,
}

/// Runs `ops` against a subscribed connection. Panics only on a broken invariant.
pub fn connection(negotiated: Negotiated, ops: Vec<Op>) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut conn = ConnectionState::new(Arc::new(Config::new()), "127.0.0.1", now);
    let (Ok(topic), Ok(channel)) = (Topic::new("t"), Channel::new("c")) else {
        return;
    };
    let _ = conn.subscribe(&topic, &channel);
    let mut handshake = BytesMut::new();
    match negotiated {
        Negotiated::Plain => Frame::Response(Bytes::from_static(b"OK")).encode(&mut handshake),
        Negotiated::Snappy => {
            let json = Bytes::from_static(br#"{"snappy":true,"msg_timeout":1000}"#);
            Frame::Response(json).encode(&mut handshake);
            // The stream identifier, then the upgrade OK as an uncompressed chunk, as nsqd sends it.
            handshake.extend_from_slice(b"\xff\x06\0\0sNaPpY\x01\x0e\0\0\x26\x98\x2b\xcf\0\0\0\x06\0\0\0\0OK");
        }
    }
    conn.handle_input(now, handshake);
    let mut seen: Vec<MessageId> = Vec::new();
    let mut closed = false;
    for op in ops {
        match op {
            Op::Input(bytes) => conn.handle_input(now, BytesMut::from(&bytes[..])),
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms));
                conn.handle_timeout(now);
            }
            Op::Eof => conn.handle_eof(now),
            Op::Ready(n) => {
                if let Ok(sent) = conn.ready(u32::from(n)) {
                    assert!(sent <= conn.max_rdy_count());
                }
            }
            Op::Finish(i) => answer(&mut conn, &seen, i, |c, id| c.finish(id)),
            Op::Requeue(i, ms) => {
                answer(&mut conn, &seen, i, |c, id| c.requeue(id, Duration::from_millis(u64::from(ms))))
            }
            Op::Touch(i) => {
                let before = conn.in_flight();
                answer(&mut conn, &seen, i, |c, id| c.touch(id, now));
                assert_eq!(conn.in_flight(), before);
            }
            Op::Close => conn.close(now),
        }
        while conn.poll_transmit().is_some() {}
        while let Some(event) = conn.poll_event() {
            assert!(!closed, "an event after Closed");
            match event {
                Event::Message(m) => seen.push(m.id),
                Event::Closed(_) => closed = true,
                _ => {}
            }
        }
        assert_eq!(closed, conn.is_closed());
        if conn.is_closed() {
            assert_eq!(conn.in_flight(), 0);
            assert!(conn.poll_timeout().is_none());
        }
        assert!(conn.poll_timeout().is_none_or(|t| t > now), "an expired timer left armed");
    }
}

fn answer(
    conn: &mut ConnectionState,
    seen: &[MessageId],
    i: u8,
    f: impl FnOnce(&mut ConnectionState, &MessageId) -> Result<(), crate::CommandError>,
) {
    let id = seen.get(usize::from(i)).copied().unwrap_or(MessageId([b'x'; 16]));
    let was = conn.is_in_flight(&id);
    let before = conn.in_flight();
    let result = f(conn, &id);
    assert_eq!(result.is_ok(), was, "answerable exactly when in flight");
    if result.is_err() {
        assert_eq!(conn.in_flight(), before, "a refused call changed in-flight");
    }
}
