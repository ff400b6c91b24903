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

fn capture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/nsqd-1.3.0/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn steps(cap: &Value, dir: &str) -> Vec<Value> {
    cap["steps"].as_array().unwrap().iter().filter(|s| s["dir"] == dir && s.get("event").is_none()).cloned().collect()
}

fn drain(conn: &mut ConnectionState) -> (Vec<u8>, Vec<Event>) {
    let mut out = Vec::new();
    while let Some(b) = conn.poll_transmit() {
        out.extend_from_slice(&b);
    }
    let mut events = Vec::new();
    while let Some(e) = conn.poll_event() {
        events.push(e);
    }
    (out, events)
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

struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    dir: std::path::PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("test CA {tag}"));
        let ca = params.self_signed(&ca_key).unwrap();
        let dir = std::env::temp_dir().join(format!("nsq-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Self { ca, ca_key, dir }
    }

    /// A certificate for localhost/127.0.0.1 signed by this CA, as DER and as PEM files.
    fn issue(
        &self,
        name: &str,
    ) -> (Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        std::fs::write(self.dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        (vec![cert.der().clone()], der)
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Plays nsqd on the far side of a `ConnectionState`: plain IDENTIFY answer negotiating TLS
/// (and `compression`), the TLS handshake, `OK` through TLS, then `OK` through the compressor,
/// then a message. Returns the client's events.
fn tls_session(config: Config, server: rustls::ServerConfig, compression: Option<&str>) -> Vec<Event> {
    let now = Instant::now();
    let mut client = ConnectionState::new(Arc::new(config), "127.0.0.1", now);
    client.subscribe(&Topic::new("t").unwrap(), &Channel::new("c").unwrap()).unwrap();
    let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    let mut events = Vec::new();
    let (hello, _) = drain(&mut client);
    assert!(hello.starts_with(b"  V2IDENTIFY\n"));
    let json = format!(
        r#"{{"max_rdy_count":2500,"msg_timeout":60000,"tls_v1":true,"snappy":{},"deflate":{},"deflate_level":6}}"#,
        compression == Some("snappy"),
        compression == Some("deflate")
    );
    let mut frame = BytesMut::new();
    Frame::Response(Bytes::from(json)).encode(&mut frame);
    client.handle_input(now, frame);
    let mut sent_ok = false;
    let mut server_plain = Vec::new();
    for _ in 0..50 {
        let (out, evs) = drain(&mut client);
        events.extend(evs);
        if client.is_closed() {
            break;
        }
        let mut rd = &out[..];
        while !rd.is_empty() {
            if server.read_tls(&mut rd).is_err() {
                break;
            }
            if server.process_new_packets().is_err() {
                // Send the alert, so the client learns why.
                let mut alert = Vec::new();
                let _ = server.write_tls(&mut alert);
                client.handle_input(now, BytesMut::from(&alert[..]));
                events.extend(drain(&mut client).1);
                return events;
            }
        }
        let _ = server.reader().read_to_end(&mut server_plain);
        if !server.is_handshaking() && !sent_ok {
            sent_ok = true;
            let mut ok = BytesMut::new();
            Frame::Response(Bytes::from_static(b"OK")).encode(&mut ok);
            server.writer().write_all(&ok).unwrap();
            let mut rest = ok.to_vec();
            let mut message = BytesMut::new();
            let msg = nsq_sansio::Message {
                id: nsq_sansio::MessageId(*b"0123456789abcdef"),
                timestamp: 1,
                attempts: 1,
                body: Bytes::from_static(b"over tls"),
            };
            Frame::Message(msg).encode(&mut message);
            // Upgrade OK and SUB OK, then a message, through the compressor.
            rest.extend_from_slice(&ok);
            rest.extend_from_slice(&message);
            let compressed = match compression {
                Some("snappy") => {
                    let mut w = snap::write::FrameEncoder::new(Vec::new());
                    w.write_all(&rest).unwrap();
                    w.into_inner().unwrap()
                }
                Some("deflate") => {
                    let mut w = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
                    w.write_all(&rest).unwrap();
                    w.flush().unwrap();
                    w.get_ref().clone()
                }
                _ => rest[ok.len()..].to_vec(),
            };
            server.writer().write_all(&compressed).unwrap();
        }
        let mut back = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut back).unwrap();
        }
        if back.is_empty() && out.is_empty() {
            break;
        }
        client.handle_input(now, BytesMut::from(&back[..]));
    }
    events.extend(drain(&mut client).1);
    events
}

fn server_config(pki: &Pki, client_auth: Option<&Pki>) -> rustls::ServerConfig {
    let (chain, key) = pki.issue("server");
    let builder =
        rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().unwrap();
    let builder = match client_auth {
        Some(client_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(client_ca.ca.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder.with_single_cert(chain, key).unwrap()
}

fn tls_config(pki: &Pki) -> Config {
    let mut config = Config::new();
    config.set("tls_v1", "true").unwrap().set("tls_root_ca_file", &pki.path("ca.pem")).unwrap();
    config
}

fn delivered(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Message(m) if &m.body[..] == b"over tls"))
}

fn tls_failure(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Closed(ConnectionError::Transport(TransportError::Tls(_)))))
}

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
