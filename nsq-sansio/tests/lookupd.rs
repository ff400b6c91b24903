//! Lookupd queries as connections of a `ConsumerState`: the HTTP exchange plain and through
//! TLS (against an in-memory rustls server), response framings, bad responses, the Bearer
//! header, and the discovery filter.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nsq_sansio::{
    Action, Channel, Config, ConnId, ConsumerEvent, ConsumerState, LookupdError, Topic, TransportError,
    MAX_LOOKUPD_RESPONSE,
};

#[path = "common/tls.rs"]
mod tls_harness;

use tls_harness::{server_config, Pki};

/// A consumer and what it asked for.
struct World {
    consumer: ConsumerState,
    now: Instant,
    /// Every Connect: (conn, addr, timeout, local_addr set).
    connects: Vec<(ConnId, String, Duration, bool)>,
    closed: Vec<ConnId>,
    events: Vec<ConsumerEvent>,
}

impl World {
    fn new(config: Config) -> Self {
        let now = Instant::now();
        let consumer =
            ConsumerState::new(Topic::new("t#ephemeral").unwrap(), Channel::new("c").unwrap(), Arc::new(config), now);
        Self { consumer, now, connects: Vec::new(), closed: Vec::new(), events: Vec::new() }
    }

    fn with(f: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::new();
        config.rng_seed(3);
        f(&mut config);
        Self::new(config)
    }

    fn drain(&mut self) {
        while let Some(action) = self.consumer.poll_action() {
            match action {
                Action::Connect { conn, addr, local_addr, timeout, .. } => {
                    self.connects.push((conn, addr, timeout, local_addr.is_some()))
                }
                Action::Close { conn } => self.closed.push(conn),
                other => panic!("{other:?}"),
            }
        }
        while let Some(e) = self.consumer.poll_event() {
            self.events.push(e);
        }
    }

    /// Adds a lookupd; returns its query's connection.
    fn lookupd(&mut self, addr: &str) -> ConnId {
        self.consumer.connect_to_nsqlookupd(addr, self.now).unwrap();
        self.drain();
        self.connects.last().unwrap().0
    }

    /// The query connects; returns the request it writes.
    fn request(&mut self, q: ConnId) -> Vec<u8> {
        self.consumer.handle_connected(q, self.now);
        let mut out = Vec::new();
        while let Some(b) = self.consumer.poll_transmit_for(q) {
            out.extend_from_slice(&b);
        }
        self.drain();
        out
    }

    fn input(&mut self, q: ConnId, bytes: &[u8]) {
        self.consumer.handle_input(q, self.now, BytesMut::from(bytes));
        self.drain();
    }

    fn nsqds(&self) -> Vec<&str> {
        self.connects.iter().filter(|(_, a, _, _)| !a.ends_with(":4161")).map(|(_, a, _, _)| a.as_str()).collect()
    }

    fn failure(&self) -> Option<&LookupdError> {
        self.events.iter().find_map(|e| match e {
            ConsumerEvent::LookupdFailed { error, .. } => Some(error),
            _ => None,
        })
    }
}

fn body(addrs: &[(&str, u16)]) -> String {
    let list: Vec<String> = addrs
        .iter()
        .map(|(h, p)| format!(r#"{{"broadcast_address":"{h}","hostname":"h","tcp_port":{p},"http_port":4151}}"#))
        .collect();
    format!(r#"{{"channels":["c"],"producers":[{}]}}"#, list.join(","))
}

fn response(addrs: &[(&str, u16)]) -> String {
    let body = body(addrs);
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn a_query_is_a_connection_closed_as_soon_as_the_answer_is_complete() {
    let mut w = World::with(|c| {
        c.set("lookupd_poll_timeout", "7s").unwrap().set("local_addr", "127.0.0.1:0").unwrap();
    });
    let q = w.lookupd("127.0.0.1:4161");
    assert_eq!(w.connects, [(q, "127.0.0.1:4161".to_owned(), Duration::from_secs(7), false)]);
    assert!(w.consumer.poll_transmit_for(q).is_none(), "nothing is written before the socket connects");
    let request = String::from_utf8(w.request(q)).unwrap();
    assert!(request.starts_with("GET /lookup?topic=t%23ephemeral HTTP/1.1\r\nHost: 127.0.0.1:4161\r\n"), "{request}");
    assert!(request.contains("\r\nConnection: close\r\n\r\n"), "{request}");
    assert!(!request.contains("Authorization"), "no secret, no header");
    // The answer arrives one byte at a time; the connection stays open (no EOF) and is closed
    // by the consumer once Content-Length bytes arrived.
    let answer = response(&[("10.0.0.1", 4150), ("10.0.0.2", 4150)]);
    for (i, b) in answer.as_bytes().iter().enumerate() {
        assert!(w.closed.is_empty(), "closed after {i} of {} bytes", answer.len());
        w.input(q, &[*b]);
    }
    assert_eq!(w.closed, [q]);
    assert_eq!(w.nsqds(), ["10.0.0.1:4150", "10.0.0.2:4150"]);
    assert!(w.connects[1..]
        .iter()
        .all(|(c, _, timeout, bound)| *c != q && *timeout == Duration::from_secs(1) && *bound));
    assert!(w.failure().is_none());
    // Late bytes and EOF for the closed query change nothing.
    w.input(q, b"garbage");
    w.consumer.handle_eof(q, w.now);
    w.drain();
    assert!(w.failure().is_none());
}

#[test]
fn chunked_answers_complete_at_the_last_chunk_and_unframed_ones_at_eof() {
    let mut w = World::with(|_| {});
    let q = w.lookupd("127.0.0.1:4161");
    w.request(q);
    let json = body(&[("10.0.0.1", 4150)]);
    let (a, b) = json.split_at(10);
    let chunked = format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let (head, tail) = chunked.split_at(chunked.len() - 4);
    w.input(q, head.as_bytes());
    assert!(w.closed.is_empty(), "the last chunk's CRLFs have not arrived");
    w.input(q, tail.as_bytes());
    assert_eq!((w.closed.as_slice(), w.nsqds()), (&[q][..], vec!["10.0.0.1:4150"]));

    let mut w = World::with(|_| {});
    let q = w.lookupd("127.0.0.1:4161");
    w.request(q);
    w.input(q, format!("HTTP/1.1 200 OK\r\n\r\n{}", body(&[("10.0.0.3", 4150)])).as_bytes());
    assert!(w.closed.is_empty(), "no length: the answer ends at EOF");
    w.consumer.handle_eof(q, w.now);
    w.drain();
    assert_eq!((w.closed.as_slice(), w.nsqds()), (&[q][..], vec!["10.0.0.3:4150"]));
}

#[test]
fn bad_answers_fail_the_query_with_their_cause_and_close_it() {
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("truncated", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"producers\":".to_vec(), true),
        ("garbage", b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec(), false),
        ("bad json", b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nnot json".to_vec(), false),
        ("unauthorized", b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno".to_vec(), false),
        ("bad chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(), false),
        ("oversized length", b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n".to_vec(), false),
        ("empty", Vec::new(), true),
    ];
    for (name, bytes, then_eof) in cases {
        let mut w = World::with(|_| {});
        let q = w.lookupd("127.0.0.1:4161");
        w.request(q);
        if !bytes.is_empty() {
            w.input(q, &bytes);
        }
        if then_eof {
            assert!(w.closed.is_empty(), "{name}: waits for more");
            w.consumer.handle_eof(q, w.now);
            w.drain();
        }
        assert_eq!(w.closed, [q], "{name}");
        let error = w.failure().unwrap_or_else(|| panic!("{name}: no failure"));
        let expected = match name {
            "truncated" | "empty" => matches!(error, LookupdError::Truncated),
            "garbage" | "bad chunk" => matches!(error, LookupdError::Http(_)),
            "bad json" => matches!(error, LookupdError::Json(_)),
            "unauthorized" => matches!(error, LookupdError::Status { status: 401, .. }),
            _ => matches!(error, LookupdError::TooLarge),
        };
        assert!(expected, "{name}: {error:?}");
        assert!(w.nsqds().is_empty(), "{name}");
    }
}

#[test]
fn an_endless_answer_is_cut_at_the_size_limit() {
    let mut w = World::with(|_| {});
    let q = w.lookupd("127.0.0.1:4161");
    w.request(q);
    w.input(q, b"HTTP/1.1 200 OK\r\n\r\n");
    let chunk = vec![b' '; 64 * 1024];
    let mut fed = 0;
    while w.closed.is_empty() {
        assert!(fed <= MAX_LOOKUPD_RESPONSE, "still reading after {fed} bytes");
        w.input(q, &chunk);
        fed += chunk.len();
    }
    assert!(matches!(w.failure(), Some(LookupdError::TooLarge)));
}

#[test]
fn the_bearer_header_follows_auth_secret_and_lookupd_authorization() {
    let request = |f: &dyn Fn(&mut Config)| {
        let mut config = Config::new();
        f(&mut config);
        let mut w = World::new(config);
        let q = w.lookupd("http://127.0.0.1:4161/v1/lookup");
        String::from_utf8(w.request(q)).unwrap()
    };
    let sent = request(&|c| {
        c.auth_secret("s3cret");
    });
    assert!(sent.starts_with("GET /v1/lookup?topic=t%23ephemeral HTTP/1.1\r\n"), "{sent}");
    assert!(sent.contains("\r\nAuthorization: Bearer s3cret\r\n"), "{sent}");
    let skipped = request(&|c| {
        c.auth_secret("s3cret").set("skip_lookupd_authorization", "false").unwrap();
    });
    assert!(!skipped.contains("Authorization"), "{skipped}");

    // A secret no header can carry fails the query, and the next lookupd is not asked either.
    let mut config = Config::new();
    config.auth_secret("a\r\nX-Evil: 1");
    let mut w = World::new(config);
    w.consumer.connect_to_nsqlookupd("127.0.0.1:4161", w.now).unwrap();
    w.drain();
    assert!(w.connects.is_empty());
    assert!(matches!(w.failure(), Some(LookupdError::Secret)));
}

#[test]
fn a_failed_dial_or_silence_fails_the_query_and_the_next_lookupd_is_asked() {
    let mut w = World::with(|_| {});
    w.consumer.connect_to_nsqlookupd("127.0.0.1:4161", w.now).unwrap();
    w.consumer.connect_to_nsqlookupd("127.0.0.2:4161", w.now).unwrap();
    w.drain();
    let first = w.connects[0].0;
    w.consumer.handle_connect_failed(first, std::io::Error::from(std::io::ErrorKind::ConnectionRefused), w.now);
    w.drain();
    assert_eq!(w.closed, [first]);
    let second = w.connects.last().unwrap().clone();
    assert_eq!(second.1, "127.0.0.2:4161");
    // The second connects and never answers: after lookupd_poll_timeout it fails and closes.
    w.request(second.0);
    let at = w.now + Duration::from_secs(60);
    w.consumer.handle_timeout(at);
    w.drain();
    assert_eq!(w.closed, [first, second.0]);
    let timed_out = w.events.iter().any(
        |e| matches!(e, ConsumerEvent::LookupdFailed { error: LookupdError::Io(e), .. } if e.kind() == std::io::ErrorKind::TimedOut),
    );
    assert!(timed_out, "{:?}", w.events);
}

#[test]
fn stop_closes_a_query_under_way() {
    let mut w = World::with(|_| {});
    let q = w.lookupd("127.0.0.1:4161");
    w.request(q);
    w.consumer.stop(w.now);
    w.drain();
    assert_eq!(w.closed, [q]);
    assert!(w.consumer.is_stopped());
    w.input(q, response(&[("10.0.0.1", 4150)]).as_bytes());
    assert!(w.nsqds().is_empty());
}

#[test]
fn the_discovery_filter_chooses_and_orders_the_nsqds_to_dial() {
    let mut w = World::with(|_| {});
    let seen: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let record = seen.clone();
    w.consumer.set_discovery_filter(move |addrs: Vec<String>| {
        record.lock().unwrap().push(addrs.clone());
        let mut keep: Vec<String> = addrs.into_iter().filter(|a| !a.starts_with("10.0.0.2:")).rev().collect();
        keep.push("not an address".to_owned());
        keep
    });
    let q = w.lookupd("127.0.0.1:4161");
    w.request(q);
    w.input(q, response(&[("10.0.0.1", 4150), ("10.0.0.2", 4150), ("10.0.0.3", 4150)]).as_bytes());
    assert_eq!(*seen.lock().unwrap(), [vec!["10.0.0.1:4150", "10.0.0.2:4150", "10.0.0.3:4150"]]);
    assert_eq!(w.nsqds(), ["10.0.0.3:4150", "10.0.0.1:4150"]);
}

/// Plays an https lookupd behind `server` for the consumer's query `q`; returns the request
/// lookupd decrypted, and whether the consumer's last bytes held a close_notify.
fn https_exchange(w: &mut World, q: ConnId, server: rustls::ServerConfig, answer: &str) -> (String, bool) {
    let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    w.consumer.handle_connected(q, w.now);
    let mut request = Vec::new();
    let mut answered = false;
    for _ in 0..20 {
        let mut out = Vec::new();
        while let Some(b) = w.consumer.poll_transmit_for(q) {
            out.extend_from_slice(&b);
        }
        w.drain();
        let mut rd = &out[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            if server.process_new_packets().is_err() {
                let mut alert = Vec::new();
                let _ = server.write_tls(&mut alert);
                w.input(q, &alert);
                return (String::from_utf8_lossy(&request).into_owned(), false);
            }
        }
        let _ = server.reader().read_to_end(&mut request);
        if w.closed.contains(&q) {
            // What the consumer wrote last: nothing readable, a close_notify alert.
            let closed = server.reader().read(&mut [0u8; 1]).is_ok_and(|n| n == 0);
            return (String::from_utf8(request).unwrap(), closed);
        }
        if !answered && request.ends_with(b"\r\n\r\n") {
            answered = true;
            server.writer().write_all(answer.as_bytes()).unwrap();
        }
        let mut back = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut back).unwrap();
        }
        if !back.is_empty() {
            w.input(q, &back);
        }
    }
    panic!("the https exchange did not finish");
}

#[test]
fn https_lookupd_through_tls_in_the_core() {
    let pki = Pki::new("lookupd-https");
    let mut w = World::with(|c| {
        // The CA file verifies lookupd; TLS to nsqd is not asked for.
        c.tls_root_ca_file(pki.path("ca.pem")).tls_v1(false).auth_secret("s3cret");
    });
    let q = w.lookupd("https://localhost:4161");
    assert_eq!(w.connects[0].1, "localhost:4161");
    let (request, close_notify) =
        https_exchange(&mut w, q, server_config(&pki, None), &response(&[("10.0.0.1", 4150)]));
    assert!(request.starts_with("GET /lookup?topic=t%23ephemeral HTTP/1.1\r\nHost: localhost:4161\r\n"), "{request}");
    assert!(request.contains("\r\nAuthorization: Bearer s3cret\r\n"), "{request}");
    assert!(close_notify, "the consumer ended TLS with close_notify");
    assert_eq!(w.closed, [q]);
    assert_eq!(w.nsqds(), ["10.0.0.1:4150"]);
    assert!(w.failure().is_none());
}

#[test]
fn https_lookupd_with_a_certificate_from_another_ca_fails() {
    let (pki, other) = (Pki::new("lookupd-server"), Pki::new("lookupd-other"));
    let mut w = World::with(|c| {
        c.tls_root_ca_file(other.path("ca.pem")).tls_v1(false);
    });
    let q = w.lookupd("https://127.0.0.1:4161");
    let (request, _) = https_exchange(&mut w, q, server_config(&pki, None), &response(&[("10.0.0.1", 4150)]));
    assert!(request.is_empty(), "nothing was sent in clear or to the wrong server");
    assert_eq!(w.closed, [q]);
    assert!(matches!(w.failure(), Some(LookupdError::Tls(TransportError::Tls(_)))), "{:?}", w.failure());
    assert!(w.nsqds().is_empty());

    // A CA file that cannot be read fails the query before anything is dialled.
    let mut w = World::with(|c| {
        c.tls_root_ca_file("/nonexistent/ca.pem");
    });
    w.consumer.connect_to_nsqlookupd("https://127.0.0.1:4161", w.now).unwrap();
    w.drain();
    assert!(w.connects.is_empty());
    assert!(matches!(w.failure(), Some(LookupdError::Tls(TransportError::TlsSetup(_)))), "{:?}", w.failure());
}
