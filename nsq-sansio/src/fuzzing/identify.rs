//! The IDENTIFY response parser, alone and inside a connection's handshake.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::{Config, ConnectionState, Frame, IdentifyResponse, Phase};

/// Parses arbitrary bytes as an IDENTIFY response, then feeds them as one to a connection, and
/// checks that the connection took the phase the parsed answer calls for.
pub fn identify(data: &[u8]) {
    let parsed = IdentifyResponse::parse(data);
    let now = Instant::now();
    let mut conn = ConnectionState::new(Arc::new(Config::new()), "127.0.0.1", now);
    let mut frame = BytesMut::new();
    Frame::Response(Bytes::copy_from_slice(data)).encode(&mut frame);
    conn.handle_input(now, frame);
    while conn.poll_transmit().is_some() {}
    while conn.poll_event().is_some() {}
    if data == b"_heartbeat_" {
        // Answered with NOP; the connection still waits for the answer.
        assert_eq!(conn.phase(), Phase::Identifying);
        return;
    }
    if data == b"OK" {
        assert_eq!(conn.phase(), Phase::Ready, "a plain OK is the end of the handshake");
        return;
    }
    let Ok(n) = parsed else {
        assert!(conn.is_closed(), "a connection accepted an IDENTIFY response the parser refused");
        return;
    };
    assert_eq!(conn.negotiated(), Some(&n), "the connection negotiated something else");
    let max_rdy = if n.max_rdy_count > 0 { n.max_rdy_count } else { u64::from(crate::DEFAULT_MAX_RDY_COUNT) };
    assert_eq!(u64::from(conn.max_rdy_count()), max_rdy.min(u64::from(u32::MAX)));
    // The default configuration has no TLS and no AUTH secret.
    let expected = if n.tls_v1 {
        // TLS starts (or its setup fails, closing).
        if conn.is_closed() {
            Phase::Closed
        } else {
            Phase::TlsUpgrade
        }
    } else if n.snappy || n.deflate {
        Phase::CompressionUpgrade
    } else if n.auth_required {
        Phase::Closed
    } else {
        Phase::Ready
    };
    assert_eq!(conn.phase(), expected, "{n:?}");
}
