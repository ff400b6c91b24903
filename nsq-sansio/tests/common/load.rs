//! Load for the allocation tests and the benches: message frames in one read buffer, and a
//! connection subscribed and ready for them.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use nsq_sansio::{Channel, Config, ConnectionState, Frame, Message, MessageId, Topic};

/// `n` message frames with `body`-byte bodies and ids distinct across `round`s (up to 10,000
/// frames a round), as one read buffer.
pub(crate) fn frames(n: usize, round: usize, body: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(n * (body + 34));
    let payload = Bytes::from(vec![b'x'; body]);
    for i in 0..n {
        let mut id = [b'0'; 16];
        id[..8].copy_from_slice(format!("{round:04}{i:04}").as_bytes());
        let msg = Message { id: MessageId(id), timestamp: 1, attempts: 1, body: payload.clone() };
        Frame::Message(msg).encode(&mut buf);
    }
    buf
}

/// A connection past IDENTIFY and SUB with RDY `max_in_flight` sent, its output drained.
pub(crate) fn subscribed(now: Instant, max_in_flight: u32) -> ConnectionState {
    let mut config = Config::new();
    config.max_in_flight(max_in_flight);
    let mut conn = ConnectionState::new(Arc::new(config), "127.0.0.1", now);
    conn.subscribe(&Topic::new("t").unwrap(), &Channel::new("c").unwrap()).unwrap();
    let mut ok = BytesMut::new();
    Frame::Response(Bytes::from_static(b"OK")).encode(&mut ok);
    conn.handle_input(now, ok.clone());
    conn.handle_input(now, ok);
    conn.ready(max_in_flight).unwrap();
    while conn.poll_event().is_some() {}
    while conn.poll_transmit().is_some() {}
    conn
}
