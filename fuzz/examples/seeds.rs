//! Writes the seed inputs `fuzz/corpus/<target>/seed-*`, built from the nsqd 1.3.0 captures in
//! `nsq-sansio/tests/fixtures/nsqd-1.3.0/`:
//!
//! ```sh
//! cargo run -p nsq-fuzz --example seeds
//! ```
//!
//! Structured targets get the bytes that decode to the captured conversation (see
//! `nsq_sansio::fuzzing::Seed`); run this again when an input type changes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use nsq_sansio::fuzzing::{connection, consumer, deflate, snappy, Blob, Seed, ServerFrame};
use nsq_sansio::{decode, Frame, MessageId};
use serde_json::Value;

const CAPTURES: &[&str] = &[
    "auth",
    "errors",
    "heartbeat_timeout",
    "identify_deflate",
    "identify_no_negotiation",
    "identify_plain",
    "identify_snappy",
    "lookupd",
    "publish",
    "sub_and_messages",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = root().join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

/// One step of a capture, bytes decoded from hex.
struct Step {
    conn: u64,
    t_ms: f64,
    s2c: bool,
    /// The bytes on the wire.
    wire: Vec<u8>,
    /// The plaintext: decompressed where the capture recorded compression.
    plain: Vec<u8>,
    compression: Option<String>,
    chunk_type: Option<u64>,
    event: Option<String>,
}

fn steps(cap: &Value) -> Vec<Step> {
    let hex = |v: &Value| hex::decode(v.as_str().unwrap_or("")).unwrap();
    cap["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let wire = hex(&s["hex"]);
            Step {
                conn: s["conn"].as_u64().unwrap(),
                t_ms: s["t_ms"].as_f64().unwrap_or(0.0),
                s2c: s["dir"] == "s2c",
                plain: s.get("decoded_hex").map_or_else(|| wire.clone(), hex),
                wire,
                compression: s["compression"].as_str().map(str::to_owned),
                chunk_type: s["chunk_type"].as_u64(),
                event: s["event"].as_str().map(str::to_owned),
            }
        })
        .collect()
}

/// Splits the complete frames off `rx`.
fn frames(rx: &mut BytesMut) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Ok(Some(frame)) = decode(rx, u32::MAX) {
        out.push(frame);
    }
    out
}

fn index(ids: &mut Vec<MessageId>, id: &[u8]) -> u8 {
    let id = MessageId(id.try_into().unwrap_or([b'?'; 16]));
    let i = ids.iter().position(|x| *x == id).unwrap_or_else(|| {
        ids.push(id);
        ids.len() - 1
    });
    u8::try_from(i).unwrap_or(u8::MAX)
}

/// A capture's connection as a `connection` target input: the handshake it negotiated, then
/// its server frames, client commands and pauses as ops.
fn conversation(steps: &[&Step]) -> Option<connection::Input> {
    use connection::{Handshake, Mode, Op};
    let mut rx = BytesMut::new();
    let mut ids: Vec<MessageId> = Vec::new();
    let mut ops = Vec::new();
    let mut handshake: Option<Handshake> = None;
    let mut upgrade_ok_pending = false;
    let mut last_t = 0.0;
    for step in steps {
        if handshake.is_some() {
            let pause = (step.t_ms - last_t).round();
            if pause >= 1.0 {
                ops.push(Op::Advance(pause.min(f64::from(u16::MAX)) as u16));
            }
        }
        last_t = step.t_ms;
        if step.event.as_deref() == Some("eof") && handshake.is_some() {
            ops.push(Op::Eof);
            continue;
        }
        if step.s2c {
            rx.extend_from_slice(&step.plain);
            let mut got = frames(&mut rx);
            if handshake.is_none() {
                let Some(Frame::Response(json)) = got.first().cloned() else {
                    continue;
                };
                got.remove(0);
                let answer: Value = serde_json::from_slice(&json).ok()?;
                let mode = if answer["snappy"] == true {
                    Mode::Snappy
                } else if answer["deflate"] == true {
                    Mode::Deflate(answer["deflate_level"].as_u64().unwrap_or(6) as u8)
                } else {
                    Mode::Json
                };
                upgrade_ok_pending = mode != Mode::Json;
                let field = |k: &str| answer[k].as_u64().map_or(0, |n| u16::try_from(n).unwrap_or(0));
                handshake = Some(Handshake {
                    mode,
                    max_rdy_count: field("max_rdy_count"),
                    msg_timeout: field("msg_timeout"),
                    read: 0,
                });
            }
            if upgrade_ok_pending && !got.is_empty() {
                // The upgrade OK is part of the harness's handshake.
                got.remove(0);
                upgrade_ok_pending = false;
            }
            let frames: Vec<ServerFrame> = got.iter().filter_map(|f| ServerFrame::from_frame(f, &mut ids)).collect();
            if !frames.is_empty() {
                let shape = if step.chunk_type == Some(0) { 1 } else { 0 };
                ops.push(Op::Frames { frames, shape, read: 0 });
            }
        } else if handshake.is_some() {
            let text = String::from_utf8_lossy(&step.plain).into_owned();
            for line in text.lines() {
                let words: Vec<&str> = line.split(' ').collect();
                match words[..] {
                    ["RDY", n] => ops.push(Op::Ready(n.parse().unwrap_or(1))),
                    ["FIN", id] => ops.push(Op::Finish(index(&mut ids, id.as_bytes()))),
                    ["TOUCH", id] => ops.push(Op::Touch(index(&mut ids, id.as_bytes()))),
                    ["REQ", id, ms] => ops.push(Op::Requeue(index(&mut ids, id.as_bytes()), ms.parse().unwrap_or(0))),
                    ["CLS"] => ops.push(Op::Close),
                    _ => {}
                }
            }
        }
    }
    Some(connection::Input { handshake: handshake?, ops })
}

fn main() {
    let fixtures = root().join("../nsq-sansio/tests/fixtures/nsqd-1.3.0");
    let mut captured_messages: Vec<ServerFrame> = Vec::new();
    let mut lookupd_responses: Vec<Vec<u8>> = Vec::new();
    for name in CAPTURES {
        let cap: Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures.join(format!("{name}.json"))).unwrap()).unwrap();
        let all = steps(&cap);
        let mut by_conn: BTreeMap<u64, Vec<&Step>> = BTreeMap::new();
        for step in &all {
            by_conn.entry(step.conn).or_default().push(step);
        }
        if *name == "lookupd" {
            for (i, exchange) in cap["exchanges"].as_array().unwrap().iter().enumerate() {
                let raw = exchange["response_raw"].as_str().unwrap().as_bytes().to_vec();
                write("lookupd", &format!("{name}-{i}"), &raw);
                lookupd_responses.push(raw);
            }
            for (i, addr) in ["127.0.0.1:4161", "http://127.0.0.1:4161", "http://[::1]:4161/lookup/"].iter().enumerate()
            {
                write("lookupd", &format!("address-{i}"), addr.as_bytes());
            }
            continue;
        }
        for (conn, steps) in &by_conn {
            let tag = format!("{name}-{conn}");
            let s2c: Vec<&&Step> = steps.iter().filter(|s| s.s2c && s.event.is_none()).collect();
            let plain: Vec<u8> = s2c.iter().flat_map(|s| s.plain.clone()).collect();
            if plain.is_empty() {
                continue;
            }
            // frame: the plaintext whole, and in reads of 7 bytes (not the 64 KiB message: a
            // large seed makes every input derived from it large).
            if plain.len() <= 16 * 1024 {
                write("frame", &tag, &[&[0, 0][..], &plain].concat());
                write("frame", &format!("{tag}-cut"), &[&[7, 0][..], &plain].concat());
            }
            let mut rx = BytesMut::from(&plain[..]);
            let decoded = frames(&mut rx);
            // identify: the answer to IDENTIFY.
            let sent_identify = steps.iter().any(|s| !s.s2c && s.plain.starts_with(b"IDENTIFY"));
            if let (true, Some(Frame::Response(answer))) = (sent_identify, decoded.first()) {
                write("identify", &tag, answer);
            }
            let mut ids = Vec::new();
            captured_messages.extend(
                decoded
                    .iter()
                    .filter(|f| matches!(f, Frame::Message(_)))
                    .filter_map(|f| ServerFrame::from_frame(f, &mut ids)),
            );
            // snappy and deflate: the server's compressed stream after the IDENTIFY answer.
            let compressed: Vec<&&Step> = s2c.iter().filter(|s| s.compression.is_some()).copied().collect();
            match compressed.first().and_then(|s| s.compression.as_deref()) {
                Some("snappy") => {
                    let chunks = compressed
                        .iter()
                        .map(|s| snappy::Chunk {
                            kind: match s.chunk_type {
                                Some(0) => snappy::Kind::Compressed,
                                Some(1) => snappy::Kind::Uncompressed,
                                _ => snappy::Kind::Identifier,
                            },
                            data: Blob(s.plain.clone()),
                            fault: snappy::Fault::None,
                        })
                        .collect();
                    let input = snappy::Input { start: 0, read: 0, limit: u16::MAX, chunks };
                    write("snappy", &tag, &input.to_seed());
                    write("snappy", &format!("{tag}-cut"), &snappy::Input { read: 5, limit: 20, ..input }.to_seed());
                }
                Some("deflate") => {
                    let wire: Vec<u8> = compressed.iter().flat_map(|s| s.wire.clone()).collect();
                    write("deflate", &tag, &[&[0, 255][..], &wire].concat());
                    write("deflate", &format!("{tag}-cut"), &[&[5, 1][..], &wire].concat());
                    let mut rx = BytesMut::new();
                    let mut ids = Vec::new();
                    let writes = compressed
                        .iter()
                        .map(|s| {
                            rx.extend_from_slice(&s.plain);
                            let frames =
                                frames(&mut rx).iter().filter_map(|f| ServerFrame::from_frame(f, &mut ids)).collect();
                            deflate::Write { frames, flush: deflate::Flush::Sync, damage: deflate::Damage::None }
                        })
                        .collect();
                    let input = deflate::Input { level: 6, read: 0, limit: u16::MAX, writes };
                    write("deflate_frames", &tag, &input.to_seed());
                    let cut = deflate::Input { level: 1, read: 3, limit: 100, ..input };
                    write("deflate_frames", &format!("{tag}-cut"), &cut.to_seed());
                }
                _ => {}
            }
            if let Some(input) = conversation(steps) {
                write("connection", &tag, &input.to_seed());
            }
        }
    }

    // config: every option with a valid value.
    let options = [
        "dial_timeout=1s",
        "read_timeout=60s",
        "write_timeout=1s",
        "local_addr=127.0.0.1:0",
        "lookupd_poll_interval=1m",
        "lookupd_poll_jitter=0.3",
        "max_requeue_delay=15m",
        "default_requeue_delay=90s",
        "backoff_strategy=full_jitter",
        "max_backoff_duration=2m",
        "backoff_multiplier=1s",
        "max_attempts=5",
        "low_rdy_idle_timeout=10s",
        "low_rdy_timeout=30s",
        "rdy_redistribute_interval=5s",
        "client_id=fixture-client",
        "hostname=fixture-host",
        "user_agent=nsq-fixture/0.1",
        "heartbeat_interval=30s",
        "sample_rate=10",
        "tls_root_ca_file=/etc/ssl/ca.pem",
        "tls_cert=/etc/ssl/cert.pem",
        "tls_key=/etc/ssl/key.pem",
        "tls_insecure_skip_verify=true",
        "tls_min_version=tls1.2",
        "tls_server_name=nsqd.local",
        "deflate=true",
        "deflate_level=6",
        "snappy=true",
        "output_buffer_size=16384",
        "output_buffer_timeout=250ms",
        "max_in_flight=200",
        "msg_timeout=1m30s",
        "auth_secret=good-secret",
    ];
    for option in options {
        write("config", option.split('=').next().unwrap_or(option), option.as_bytes());
    }

    // consumer: a direct nsqd delivering the captured messages, and lookupd discovery.
    use consumer::Op;
    let deliver = Op::Frames { conn: 0, frames: captured_messages.iter().take(3).cloned().collect() };
    let direct = consumer::Input {
        max_in_flight: 5,
        jitter: false,
        ops: vec![
            Op::Connect(0),
            Op::Accept { conn: 0, max_rdy_count: 0 },
            deliver.clone(),
            Op::Answer(0, 0),
            Op::Answer(0, 1),
            Op::Advance(1500),
            deliver.clone(),
            Op::Answer(0, 3),
            Op::Answer(0, 0),
            Op::Advance(5000),
            Op::Stop,
            Op::Answer(0, 0),
            Op::Advance(31_000),
        ],
    };
    write("consumer", "direct", &direct.to_seed());
    let discovered = consumer::Input {
        max_in_flight: 2,
        jitter: true,
        ops: vec![
            Op::LookupdRaw(Blob(lookupd_responses.first().cloned().unwrap_or_default())),
            Op::Lookupd(vec![1, 2, 3]),
            Op::Accept { conn: 0, max_rdy_count: 1 },
            Op::Accept { conn: 1, max_rdy_count: 0 },
            Op::Deliver { conn: 0, attempts: 1 },
            Op::Deliver { conn: 1, attempts: 6 },
            Op::Answer(0, 1),
            Op::Advance(2000),
            Op::MaxInFlight(0),
            Op::Eof(1),
            Op::Advance(61_000),
            Op::LookupdFailed,
            Op::ConnectFailed(2),
            Op::MaxInFlight(10),
            Op::Advance(5000),
        ],
    };
    write("consumer", "lookupd", &discovered.to_seed());
}
