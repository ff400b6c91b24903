//! TLS, snappy and deflate through `ConnectionState`: the nsqd 1.3.0 compressed captures, and
//! TLS end to end against an in-memory rustls server.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use nsq_sansio::{
    Channel, Config, ConnectionError, ConnectionState, Event, Frame, Message, MessageId, Topic, TransportError,
};
use proptest::prelude::*;
use serde_json::Value;

#[path = "common/tls.rs"]
mod tls_harness;

use tls_harness::{delivered, drain, server_config, tls_config, tls_failure, tls_session, Pki};

fn capture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/nsqd-1.3.0/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn steps(cap: &Value, dir: &str) -> Vec<Value> {
    cap["steps"].as_array().unwrap().iter().filter(|s| s["dir"] == dir && s.get("event").is_none()).cloned().collect()
}

/// Replays a compressed capture's server stream through a connection, cut at `cuts`, and
/// returns what the client wrote after IDENTIFY and the events.
fn replay(name: &str, option: &str, cuts: &[usize]) -> (Vec<u8>, Vec<Event>, Value) {
    let cap = capture(name);
    let stream: Vec<u8> =
        steps(&cap, "s2c").iter().flat_map(|s| hex::decode(s["hex"].as_str().unwrap()).unwrap()).collect();
    let mut config = Config::new();
    config.set(option, "true").unwrap();
    let now = Instant::now();
    let mut conn = ConnectionState::new(Arc::new(config), "127.0.0.1", now);
    conn.subscribe(&Topic::new("t").unwrap(), &Channel::new("c").unwrap()).unwrap();
    let (hello, _) = drain(&mut conn);
    assert!(hello.starts_with(b"  V2IDENTIFY\n"));
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(stream.len());
    let (mut out, mut events, mut at) = (Vec::new(), Vec::new(), 0);
    for cut in cuts {
        conn.handle_input(now, BytesMut::from(&stream[at..cut]));
        let (o, e) = drain(&mut conn);
        out.extend(o);
        events.extend(e);
        at = cut;
    }
    (out, events, cap)
}

fn check_replay(name: &str, option: &str, cuts: &[usize]) -> Vec<u8> {
    let (out, events, cap) = replay(name, option, cuts);
    let expected: Vec<String> = steps(&cap, "s2c")
        .iter()
        .flat_map(|s| s["frames"].as_array().cloned().unwrap_or_default())
        .filter(|f| f["kind"] == "message")
        .map(|f| f["message_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(expected.len(), 2);
    let got: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.id.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(got, expected, "{events:?}");
    assert!(matches!(events[0], Event::Ready(Some(_))), "{events:?}");
    assert!(matches!(events[1], Event::Subscribed), "{events:?}");
    assert!(!events.iter().any(|e| matches!(e, Event::Closed(_))), "{events:?}");
    out
}

#[test]
fn snappy_capture_decodes_and_our_stream_is_valid_snappy() {
    let out = check_replay("identify_snappy", "snappy", &[]);
    let mut plain = Vec::new();
    snap::read::FrameDecoder::new(&out[..]).read_to_end(&mut plain).unwrap();
    assert_eq!(plain, b"SUB t c\nNOP\n", "the SUB and the heartbeat answer");
}

#[test]
fn deflate_capture_decodes_and_our_stream_is_valid_deflate() {
    let out = check_replay("identify_deflate", "deflate", &[]);
    let mut inflater = flate2::Decompress::new(false);
    let mut plain = vec![0u8; 1024];
    inflater.decompress(&out, &mut plain, flate2::FlushDecompress::Sync).unwrap();
    plain.truncate(inflater.total_out() as usize);
    assert_eq!(plain, b"SUB t c\nNOP\n");
}

/// A message that deflates to a few dozen bytes comes out of the read that carries it: the
/// inflater takes that read whole and holds most of the output, which must not wait for the next
/// read.
#[test]
fn a_highly_compressible_deflate_message_is_delivered_from_its_own_read() {
    let now = Instant::now();
    let mut config = Config::new();
    config.set("deflate", "true").unwrap();
    let mut conn = ConnectionState::new(Arc::new(config), "127.0.0.1", now);
    conn.subscribe(&Topic::new("t").unwrap(), &Channel::new("c").unwrap()).unwrap();
    drain(&mut conn);
    let mut identify = BytesMut::new();
    Frame::Response(Bytes::from_static(br#"{"deflate":true,"deflate_level":6}"#)).encode(&mut identify);
    conn.handle_input(now, identify);
    let mut nsqd = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
    let mut send = |conn: &mut ConnectionState, frame: Frame| {
        let mut plain = BytesMut::new();
        frame.encode(&mut plain);
        nsqd.write_all(&plain).unwrap();
        nsqd.flush().unwrap();
        conn.handle_input(now, BytesMut::from(&std::mem::take(nsqd.get_mut())[..]));
        drain(conn).1
    };
    send(&mut conn, Frame::Response(Bytes::from_static(b"OK")));
    send(&mut conn, Frame::Response(Bytes::from_static(b"OK")));
    let body = Bytes::from(vec![0u8; 65_000]);
    let message = Message { id: MessageId(*b"0123456789abcdef"), timestamp: 1, attempts: 1, body: body.clone() };
    let events = send(&mut conn, Frame::Message(message));
    assert!(matches!(&events[..], [Event::Message(m)] if m.body == body), "{events:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Bytes straddling the upgrade points are neither lost nor decoded twice, however reads
    /// are cut.
    #[test]
    fn any_chunking_of_compressed_streams_decodes_the_same(cuts in prop::collection::vec(any::<usize>(), 0..30)) {
        check_replay("identify_snappy", "snappy", &cuts);
        check_replay("identify_deflate", "deflate", &cuts);
    }
}

// ---- TLS end to end, in memory -------------------------------------------------------------

#[test]
fn tls_with_the_right_ca() {
    let pki = Pki::new("right");
    let events = tls_session(tls_config(&pki), server_config(&pki, None), None);
    assert!(delivered(&events), "{events:?}");
}

#[test]
fn tls_with_a_wrong_ca_is_refused() {
    let (pki, other) = (Pki::new("server-ca"), Pki::new("other-ca"));
    let events = tls_session(tls_config(&other), server_config(&pki, None), None);
    assert!(tls_failure(&events), "{events:?}");
    assert!(!delivered(&events));
}

#[test]
fn tls_insecure_mode_accepts_any_certificate() {
    let (pki, other) = (Pki::new("insecure-server"), Pki::new("insecure-other"));
    let mut config = tls_config(&other);
    config.set("tls_insecure_skip_verify", "true").unwrap();
    let events = tls_session(config, server_config(&pki, None), None);
    assert!(delivered(&events), "{events:?}");
}

#[test]
fn tls_client_certificate_required_by_the_server() {
    let pki = Pki::new("mtls");
    pki.issue("client");
    let mut with_cert = tls_config(&pki);
    with_cert.set("tls_cert", &pki.path("client.pem")).unwrap().set("tls_key", &pki.path("client.key")).unwrap();
    let events = tls_session(with_cert, server_config(&pki, Some(&pki)), None);
    assert!(delivered(&events), "{events:?}");
    let events = tls_session(tls_config(&pki), server_config(&pki, Some(&pki)), None);
    assert!(!delivered(&events), "{events:?}");
    assert!(events.iter().any(|e| matches!(e, Event::Closed(_))), "{events:?}");
}

#[test]
fn tls_then_snappy_and_tls_then_deflate() {
    let pki = Pki::new("compress");
    for compression in ["snappy", "deflate"] {
        let mut config = tls_config(&pki);
        config.set(compression, "true").unwrap();
        let events = tls_session(config, server_config(&pki, None), Some(compression));
        assert!(delivered(&events), "{compression}: {events:?}");
    }
}

#[test]
fn a_missing_ca_file_is_a_clear_setup_error() {
    let mut config = Config::new();
    config.set("tls_v1", "true").unwrap().set("tls_root_ca_file", "/nonexistent/ca.pem").unwrap();
    let pki = Pki::new("missing");
    let events = tls_session(config, server_config(&pki, None), None);
    assert!(
        events.iter().any(|e| matches!(e, Event::Closed(ConnectionError::Transport(TransportError::TlsSetup(m))) if m.contains("/nonexistent/ca.pem"))),
        "{events:?}"
    );
}
