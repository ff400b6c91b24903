//! TLS end to end, in memory: a test PKI, and an in-memory rustls server playing nsqd on the
//! far side of a `ConnectionState`.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use nsq_sansio::{Channel, Config, ConnectionError, ConnectionState, Event, Frame, Topic, TransportError};

pub(crate) fn drain(conn: &mut ConnectionState) -> (Vec<u8>, Vec<Event>) {
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

pub(crate) struct Pki {
    pub(crate) ca: rcgen::Certificate,
    pub(crate) ca_key: rcgen::KeyPair,
    pub(crate) dir: std::path::PathBuf,
}

impl Pki {
    pub(crate) fn new(tag: &str) -> Self {
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
    pub(crate) fn issue(
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

    pub(crate) fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Plays nsqd on the far side of a `ConnectionState`: plain IDENTIFY answer negotiating TLS
/// (and `compression`), the TLS handshake, `OK` through TLS, then `OK` through the compressor,
/// then a message. Returns the client's events.
pub(crate) fn tls_session(config: Config, server: rustls::ServerConfig, compression: Option<&str>) -> Vec<Event> {
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

pub(crate) fn server_config(pki: &Pki, client_auth: Option<&Pki>) -> rustls::ServerConfig {
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

pub(crate) fn tls_config(pki: &Pki) -> Config {
    let mut config = Config::new();
    config.set("tls_v1", "true").unwrap().set("tls_root_ca_file", &pki.path("ca.pem")).unwrap();
    config
}

pub(crate) fn delivered(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Message(m) if &m.body[..] == b"over tls"))
}

pub(crate) fn tls_failure(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Closed(ConnectionError::Transport(TransportError::Tls(_)))))
}
