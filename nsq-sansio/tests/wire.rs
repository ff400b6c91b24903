//! Every server frame in the nsqd 1.3.0 captures, decoded and checked against the capture's own
//! `frames` description; and every client command in them re-encoded byte for byte.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use nsq_sansio::{decode, ErrorCode, Frame, MAGIC_V2};
use serde_json::Value;

const CAPTURES: &[&str] = &[
    "auth",
    "errors",
    "heartbeat_timeout",
    "identify_deflate",
    "identify_no_negotiation",
    "identify_plain",
    "identify_snappy",
    "publish",
    "sub_and_messages",
];

fn capture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/nsqd-1.3.0/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The plain bytes of a step: decompressed when the capture recorded a compressed stream.
fn plain(step: &Value) -> Vec<u8> {
    let hex = step.get("decoded_hex").unwrap_or(&step["hex"]);
    hex::decode(hex.as_str().unwrap()).unwrap()
}

/// Per connection, the concatenated plain stream in one direction and the frames the capture
/// says it holds.
fn streams(cap: &Value, dir: &str) -> Vec<(Vec<u8>, Vec<Value>)> {
    let mut out: Vec<(Vec<u8>, Vec<Value>)> = Vec::new();
    for step in cap["steps"].as_array().unwrap() {
        if step["dir"] != dir || step.get("event").is_some() {
            continue;
        }
        let conn = step["conn"].as_u64().unwrap() as usize;
        if out.len() <= conn {
            out.resize(conn + 1, (Vec::new(), Vec::new()));
        }
        out[conn].0.extend(plain(step));
        if let Some(frames) = step["frames"].as_array() {
            out[conn].1.extend(frames.iter().cloned());
        }
    }
    out
}

fn check_frame(frame: &Frame, want: &Value, context: &str) {
    match frame {
        Frame::Response(data) => {
            assert_eq!(want["frame_type"], 0, "{context}");
            assert_eq!(want["size"].as_u64().unwrap() as usize, data.len() + 4, "{context}");
            assert_eq!(String::from_utf8_lossy(data), want["data_text"].as_str().unwrap(), "{context}");
        }
        Frame::Error(err) => {
            assert_eq!(want["frame_type"], 1, "{context}");
            let text = want["data_text"].as_str().unwrap();
            assert_eq!(err.to_string(), text, "{context}");
            let code = text.split(' ').next().unwrap();
            assert_eq!(err.code.as_str(), code, "{context}");
            assert!(!matches!(err.code, ErrorCode::Other(_)), "{context}: {code} is not a named code");
            let mut again = BytesMut::new();
            frame.encode(&mut again);
            assert_eq!(again.len(), want["size"].as_u64().unwrap() as usize + 4, "{context}");
        }
        Frame::Message(msg) => {
            assert_eq!(want["frame_type"], 2, "{context}");
            assert_eq!(msg.timestamp, want["timestamp_ns"].as_u64().unwrap(), "{context}");
            assert_eq!(u64::from(msg.attempts), want["attempts"].as_u64().unwrap(), "{context}");
            assert_eq!(&msg.id.0[..], want["message_id"].as_str().unwrap().as_bytes(), "{context}");
            assert_eq!(msg.body.len() as u64, want["body_len"].as_u64().unwrap(), "{context}");
            if let Some(body) = want["body_hex"].as_str() {
                assert_eq!(hex::encode(&msg.body), body, "{context}");
            }
        }
    }
}

#[test]
fn every_captured_server_frame_decodes_as_the_capture_describes() {
    let mut total = 0;
    for name in CAPTURES {
        let cap = capture(name);
        for (conn, (bytes, frames)) in streams(&cap, "s2c").into_iter().enumerate() {
            let mut rx = BytesMut::from(&bytes[..]);
            for (i, want) in frames.iter().enumerate() {
                let context = format!("{name} conn {conn} frame {i}");
                let frame = decode(&mut rx, 1 << 20).unwrap().unwrap_or_else(|| panic!("{context}: incomplete"));
                check_frame(&frame, want, &context);
                total += 1;
            }
            assert!(rx.is_empty(), "{name} conn {conn}: {} bytes left over", rx.len());
        }
    }
    assert!(total > 80, "only {total} frames checked");
}

#[test]
fn each_captured_frame_decodes_the_same_byte_by_byte() {
    let cap = capture("sub_and_messages");
    let (bytes, frames) = streams(&cap, "s2c").swap_remove(0);
    let mut rx = BytesMut::new();
    let mut got = Vec::new();
    for b in bytes {
        rx.extend_from_slice(&[b]);
        while let Some(frame) = decode(&mut rx, 1 << 20).unwrap() {
            got.push(frame);
        }
    }
    assert_eq!(got.len(), frames.len());
    for (i, (frame, want)) in got.iter().zip(&frames).enumerate() {
        check_frame(frame, want, &format!("frame {i}"));
    }
}

#[test]
fn the_size_limit_is_checked_from_the_prefix_alone() {
    let cap = capture("sub_and_messages");
    let (bytes, _) = streams(&cap, "s2c").swap_remove(0);
    // Skip to the 64 KiB message: its size field is 0x0001001e.
    let at = bytes.windows(4).position(|w| w == [0, 1, 0, 0x1e]).unwrap();
    let mut rx = BytesMut::from(&bytes[at..at + 4]);
    let err = decode(&mut rx, 65_536).unwrap_err();
    assert_eq!(err.to_string(), "frame of 65566 bytes exceeds the limit of 65536 bytes");
    assert_eq!(rx.len(), 4, "nothing consumed or buffered");
}

fn command_name(wire: &[u8]) -> String {
    String::from_utf8_lossy(wire).split([' ', '\n']).next().unwrap().to_owned()
}

#[test]
fn every_well_formed_captured_command_is_encoded_byte_for_byte() {
    let mut seen = std::collections::BTreeSet::new();
    for name in ["publish", "sub_and_messages", "auth", "identify_plain", "identify_snappy", "identify_deflate"] {
        let cap = capture(name);
        for (conn, (bytes, _)) in streams(&cap, "c2s").into_iter().enumerate() {
            // Compressed streams start with the snappy stream identifier; the plain part ends there.
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let Some((cmd, used)) = common::parse(rest) else { break };
                let ours = cmd.encode();
                assert_eq!(ours, &rest[..used], "{name} conn {conn}: {}", String::from_utf8_lossy(&rest[..used]));
                let name = if ours.starts_with(MAGIC_V2) { "  V2".into() } else { command_name(&ours) };
                seen.insert(name);
                rest = &rest[used..];
            }
        }
    }
    let want = ["  V2", "AUTH", "CLS", "DPUB", "FIN", "IDENTIFY", "MPUB", "NOP", "PUB", "RDY", "REQ", "SUB", "TOUCH"];
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), want);
}
