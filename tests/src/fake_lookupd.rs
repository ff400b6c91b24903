//! An in-process nsqlookupd HTTP interface: `/lookup?topic=` and `/ping`, answering like the
//! captured nsqlookupd 1.3.0; optionally over TLS, demanding a Bearer token, or failing.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::tls_stream::{TlsRead, TlsShared, TlsWrite};

/// How a [`FakeLookupd`] behaves.
#[derive(Debug, Clone, Default)]
pub struct FakeLookupdOptions {
    /// Serve HTTPS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Answer `/lookup` only with `Authorization: Bearer <this>`; 401 without the header, 403
    /// with another token (as an nsqlookupd behind an authenticating proxy would).
    pub bearer: Option<String>,
    /// Answer every request with this status (e.g. 500) after `delay`.
    pub fail: Option<u16>,
    /// Wait this long before answering.
    pub delay: Duration,
}

/// A running fake nsqlookupd. Dropping it stops it.
#[derive(Debug)]
pub struct FakeLookupd {
    addr: SocketAddr,
    producers: Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>,
    stopped: Arc<AtomicBool>,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    queries: AtomicU64,
    refused: AtomicU64,
}

impl FakeLookupd {
    /// Starts plain HTTP on a free loopback port.
    pub fn start() -> io::Result<Self> {
        Self::start_with(FakeLookupdOptions::default())
    }

    /// Starts on a free loopback port with `options`.
    pub fn start_with(options: FakeLookupdOptions) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let producers: Arc<Mutex<HashMap<String, Vec<SocketAddr>>>> = Arc::default();
        let stopped = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let (p, s, c) = (producers.clone(), stopped.clone(), counts.clone());
        thread::spawn(move || {
            for sock in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(sock) = sock {
                    c.queries.fetch_add(1, Ordering::Relaxed);
                    let (p, c, options) = (p.clone(), c.clone(), options.clone());
                    thread::spawn(move || {
                        let _ = serve(sock, &p, &c, &options);
                    });
                }
            }
        });
        Ok(Self { addr, producers, stopped, counts })
    }

    /// The HTTP address, `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Requests refused for a missing or wrong Bearer token.
    pub fn refused(&self) -> u64 {
        self.counts.refused.load(Ordering::Relaxed)
    }

    /// Lists an nsqd (its TCP address) as a producer of `topic`.
    pub fn register(&self, topic: &str, nsqd: &str) {
        let Ok(addr) = nsqd.parse() else { return };
        let mut p = self.producers.lock().unwrap_or_else(|e| e.into_inner());
        let list = p.entry(topic.to_owned()).or_default();
        if !list.contains(&addr) {
            list.push(addr);
        }
    }

    /// Stops listing an nsqd for `topic`.
    pub fn unregister(&self, topic: &str, nsqd: &str) {
        let Ok(addr) = nsqd.parse::<SocketAddr>() else {
            return;
        };
        let mut p = self.producers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = p.get_mut(topic) {
            list.retain(|a| *a != addr);
        }
    }

    /// Connections accepted so far (one per query).
    pub fn queries(&self) -> u64 {
        self.counts.queries.load(Ordering::Relaxed)
    }
}

impl Drop for FakeLookupd {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    sock: TcpStream,
    producers: &Mutex<HashMap<String, Vec<SocketAddr>>>,
    counts: &Counts,
    options: &FakeLookupdOptions,
) -> io::Result<()> {
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    match &options.tls {
        Some(config) => {
            let shared = TlsShared::handshake(config.clone(), sock)?;
            answer(&mut TlsRead(shared.clone()), &mut TlsWrite(shared), producers, counts, options)
        }
        None => answer(&mut sock.try_clone()?, &mut &sock, producers, counts, options),
    }
}

fn answer(
    rd: &mut impl Read,
    sock: &mut impl Write,
    producers: &Mutex<HashMap<String, Vec<SocketAddr>>>,
    counts: &Counts,
    options: &FakeLookupdOptions,
) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (path, authorization) = loop {
        let n = rd.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let authorization = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned());
                break (req.path.unwrap_or("/").to_owned(), authorization);
            }
            Ok(httparse::Status::Partial) => continue,
            Err(_) => return respond(sock, "400 Bad Request", r#"{"message":"BAD_REQUEST"}"#),
        }
    };
    thread::sleep(options.delay);
    if let Some(status) = options.fail {
        return respond(sock, &format!("{status} Failing"), r#"{"message":"FAILING"}"#);
    }
    if let Some(token) = &options.bearer {
        let expected = format!("Bearer {token}");
        match authorization {
            Some(given) if given == expected => {}
            Some(_) => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                return respond(sock, "403 Forbidden", r#"{"message":"FORBIDDEN"}"#);
            }
            None => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                return respond(sock, "401 Unauthorized", r#"{"message":"UNAUTHORIZED"}"#);
            }
        }
    }
    let (route, query) = path.split_once('?').unwrap_or((&path, ""));
    match route {
        "/ping" => respond(sock, "200 OK", "OK"),
        "/lookup" => {
            let topic = query.split('&').find_map(|kv| kv.strip_prefix("topic="));
            let Some(topic) = topic.filter(|t| !t.is_empty()) else {
                return respond(sock, "400 Bad Request", r#"{"message":"MISSING_ARG_TOPIC"}"#);
            };
            let topic = topic.replace("%23", "#");
            let list = producers.lock().unwrap_or_else(|e| e.into_inner()).get(&topic).cloned();
            match list {
                None => respond(sock, "404 Not Found", r#"{"message":"TOPIC_NOT_FOUND"}"#),
                Some(list) => {
                    let producers: Vec<String> = list
                        .iter()
                        .map(|a| {
                            format!(
                                r#"{{"remote_address":"127.0.0.1:{}","hostname":"vm","broadcast_address":"{}","tcp_port":{},"http_port":4151,"version":"1.3.0","topology_region":"","topology_zone":""}}"#,
                                a.port() + 1,
                                a.ip(),
                                a.port()
                            )
                        })
                        .collect();
                    let body = format!(r#"{{"channels":[],"producers":[{}]}}"#, producers.join(","));
                    respond(sock, "200 OK", &body)
                }
            }
        }
        "/nodes" => {
            // Every nsqd registered, with its topics, as nsqlookupd 1.3.0 answers (captured).
            let all = producers.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut nodes: Vec<(SocketAddr, Vec<String>)> = Vec::new();
            for (topic, list) in all {
                for addr in list {
                    match nodes.iter_mut().find(|(a, _)| *a == addr) {
                        Some((_, topics)) => topics.push(topic.clone()),
                        None => nodes.push((addr, vec![topic.clone()])),
                    }
                }
            }
            let producers: Vec<String> = nodes
                .iter()
                .map(|(a, topics)| {
                    let tombstones = vec!["false"; topics.len()].join(",");
                    let topics: Vec<String> = topics.iter().map(|t| format!("{t:?}")).collect();
                    format!(
                        r#"{{"remote_address":"127.0.0.1:{}","hostname":"vm","broadcast_address":"{}","tcp_port":{},"http_port":4151,"version":"1.3.0","topology_zone":"","topology_region":"","tombstones":[{tombstones}],"topics":[{}]}}"#,
                        a.port() + 1,
                        a.ip(),
                        a.port(),
                        topics.join(",")
                    )
                })
                .collect();
            respond(sock, "200 OK", &format!(r#"{{"producers":[{}]}}"#, producers.join(",")))
        }
        _ => respond(sock, "404 Not Found", r#"{"message":"NOT_FOUND"}"#),
    }
}

fn respond(sock: &mut impl Write, status: &str, body: &str) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\nX-Nsq-Content-Type: nsq; version=1.0\r\nDate: Tue, 24 Nov 2026 00:00:00 GMT\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(response.as_bytes())?;
    sock.flush()
}
