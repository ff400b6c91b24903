//! The IDENTIFY response parser, alone and inside a connection's handshake.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::{Config, ConnectionState, Frame, IdentifyResponse};

/// Parses arbitrary bytes as an IDENTIFY response, then feeds them as one to a connection.
pub fn identify(data: &[u8]) {
    let parsed = IdentifyResponse::parse(data);
    let now = Instant::now();
    let mut conn = ConnectionState::new(Arc::new(Config::new()), "127.0.0.1", now);
    let mut frame = BytesMut::new();
    Frame::Response(Bytes::copy_from_slice(data)).encode(&mut frame);
    conn.handle_input(now, frame);
    while conn.poll_transmit().is_some() {}
    while conn.poll_event().is_some() {}
    // A plain OK (no negotiation) and a heartbeat are valid answers the JSON parser refuses.
    if parsed.is_err() && data != b"OK" && data != b"_heartbeat_" {
        assert!(conn.is_closed(), "a connection accepted an IDENTIFY response the parser refused");
    }
    if let Some(n) = conn.negotiated() {
        assert!(u64::from(conn.max_rdy_count()) <= n.max_rdy_count.max(u64::from(crate::DEFAULT_MAX_RDY_COUNT)));
    }
}
