//! An in-process nsqlookupd HTTP interface: `/lookup?topic=` and `/ping`, answering like the
//! captured nsqlookupd 1.3.0.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// A running fake nsqlookupd. Dropping it stops it.
#[derive(Debug)]
pub struct FakeLookupd {
    addr: SocketAddr,
    producers: Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>,
    stopped: Arc<AtomicBool>,
    queries: Arc<AtomicU64>,
}

impl FakeLookupd {
    /// Starts on a free loopback port.
    pub fn start() -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let producers: Arc<Mutex<HashMap<String, Vec<SocketAddr>>>> = Arc::default();
        let stopped = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU64::new(0));
        let (p, s, q) = (producers.clone(), stopped.clone(), queries.clone());
        thread::spawn(move || {
            for sock in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(sock) = sock {
                    q.fetch_add(1, Ordering::Relaxed);
                    let _ = answer(sock, &p);
                }
            }
        });
        Ok(Self { addr, producers, stopped, queries })
    }

    /// The HTTP address, `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
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

    /// HTTP requests served so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for FakeLookupd {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn answer(mut sock: TcpStream, producers: &Mutex<HashMap<String, Vec<SocketAddr>>>) -> io::Result<()> {
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let path = loop {
        let n = sock.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => break req.path.unwrap_or("/").to_owned(),
            Ok(httparse::Status::Partial) => continue,
            Err(_) => return respond(&mut sock, "400 Bad Request", r#"{"message":"BAD_REQUEST"}"#),
        }
    };
    let (route, query) = path.split_once('?').unwrap_or((&path, ""));
    match route {
        "/ping" => respond(&mut sock, "200 OK", "OK"),
        "/lookup" => {
            let topic = query.split('&').find_map(|kv| kv.strip_prefix("topic="));
            let Some(topic) = topic.filter(|t| !t.is_empty()) else {
                return respond(&mut sock, "400 Bad Request", r#"{"message":"MISSING_ARG_TOPIC"}"#);
            };
            let topic = topic.replace("%23", "#");
            let list = producers.lock().unwrap_or_else(|e| e.into_inner()).get(&topic).cloned();
            match list {
                None => respond(&mut sock, "404 Not Found", r#"{"message":"TOPIC_NOT_FOUND"}"#),
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
                    respond(&mut sock, "200 OK", &body)
                }
            }
        }
        _ => respond(&mut sock, "404 Not Found", r#"{"message":"NOT_FOUND"}"#),
    }
}

fn respond(sock: &mut TcpStream, status: &str, body: &str) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\nX-Nsq-Content-Type: nsq; version=1.0\r\nDate: Tue, 24 Nov 2026 00:00:00 GMT\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(response.as_bytes())?;
    sock.flush()
}
