//! `LookupdModel`: nsqlookupd 1.3's HTTP API as the clients see it, built to
//! `nsqlookupd/http.go`, `registration_db.go`, `internal/http_api/api_response.go` and the
//! capture `tests/fixtures/nsqd-1.3.0/lookupd.json`.
//!
//! It answers `GET /lookup?topic=`, `/nodes`, `/ping` and `/info` with the complete HTTP/1.1
//! response bytes nsqlookupd sends (status line, headers in Go's order, JSON body with nsqd's
//! field order). Registrations mirror nsqd's: a topic or channel key, once registered, stays
//! even when its last producer leaves (`RemoveProducer` "leaves keys in the DB"), so a topic
//! whose nsqds are all gone answers 200 with no producers, and an unknown one 404.
//!
//! Faults set by the harness: lying (extra producers listed: dead nsqds, addresses nobody
//! listens on) and garbage (not HTTP, bad JSON, a 500, a truncated response). "Down", "slow"
//! and "hung" are the network's business (`world.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// What an nsqd tells lookupd about itself (`PeerInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Producer {
    pub remote_address: String,
    pub hostname: String,
    pub broadcast_address: String,
    pub tcp_port: u16,
    pub http_port: u16,
}

impl Producer {
    /// How the simulation's nsqd `host:port` registers: broadcast address = host name.
    pub fn for_addr(addr: &str, remote_port: u16) -> Self {
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "4150"));
        let tcp_port: u16 = port.parse().unwrap_or(4150);
        Self {
            remote_address: format!("10.0.0.1:{remote_port}"),
            hostname: host.to_owned(),
            broadcast_address: host.to_owned(),
            tcp_port,
            http_port: tcp_port + 1,
        }
    }

    fn key(&self) -> String {
        format!("{}:{}", self.broadcast_address, self.tcp_port)
    }

    fn json(&self) -> String {
        format!(
            r#"{{"remote_address":{},"hostname":{},"broadcast_address":{},"tcp_port":{},"http_port":{},"version":"1.3.0","topology_zone":"","topology_region":""}}"#,
            json_str(&self.remote_address),
            json_str(&self.hostname),
            json_str(&self.broadcast_address),
            self.tcp_port,
            self.http_port
        )
    }
}

/// A malformed answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Garbage {
    /// Something that is not HTTP answers on the port.
    NotHttp,
    /// 200 with a body that is not the JSON lookupd sends.
    BadJson,
    /// 500 `{"message":"INTERNAL_ERROR"}`.
    ServerError,
    /// The connection drops in the middle of the body.
    Truncated,
}

/// One modelled nsqlookupd.
#[derive(Debug)]
pub struct LookupdModel {
    start: Instant,
    /// Registered nsqds by `broadcast_address:tcp_port`.
    producers: BTreeMap<String, Producer>,
    /// Each nsqd's topics and channels (`channel` empty for a topic).
    registrations: BTreeMap<String, BTreeSet<(String, String)>>,
    /// Every key ever registered: they outlive their producers.
    keys: BTreeSet<(String, String)>,
    lying: Vec<Producer>,
    garbage: Option<Garbage>,
}

impl LookupdModel {
    pub fn new(now: Instant) -> Self {
        Self {
            start: now,
            producers: BTreeMap::new(),
            registrations: BTreeMap::new(),
            keys: BTreeSet::new(),
            lying: Vec::new(),
            garbage: None,
        }
    }

    /// An nsqd connected to lookupd's TCP port and identified itself.
    pub fn register_node(&mut self, producer: Producer) {
        let key = producer.key();
        self.registrations.entry(key.clone()).or_default();
        self.producers.insert(key, producer);
    }

    /// The nsqd's TCP connection to lookupd ended: it is gone from every registration.
    pub fn unregister_node(&mut self, addr: &str) {
        self.producers.remove(addr);
        self.registrations.remove(addr);
    }

    /// `REGISTER topic [channel]` from the nsqd at `addr`.
    pub fn register(&mut self, addr: &str, topic: &str, channel: Option<&str>) {
        if !self.producers.contains_key(addr) {
            return;
        }
        // REGISTER with a channel registers the topic too (`LookupProtocolV1.REGISTER`).
        let regs = self.registrations.entry(addr.to_owned()).or_default();
        for key in [Some((topic.to_owned(), String::new())), channel.map(|c| (topic.to_owned(), c.to_owned()))]
            .into_iter()
            .flatten()
        {
            self.keys.insert(key.clone());
            regs.insert(key);
        }
    }

    /// A restart: the DB is empty until the nsqds reconnect.
    pub fn forget_everything(&mut self) {
        self.producers.clear();
        self.registrations.clear();
        self.keys.clear();
    }

    /// Lists these producers too, for every topic.
    pub fn set_lying(&mut self, extra: Vec<Producer>) {
        self.lying = extra;
    }

    pub fn set_garbage(&mut self, garbage: Option<Garbage>) {
        self.garbage = garbage;
    }

    /// The complete response to one HTTP request.
    pub fn handle(&mut self, request: &[u8], now: Instant) -> Vec<u8> {
        let date = http_date(now.saturating_duration_since(self.start));
        match self.garbage {
            Some(Garbage::NotHttp) => return b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
            Some(Garbage::ServerError) => return respond(&date, 500, r#"{"message":"INTERNAL_ERROR"}"#),
            _ => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let (method, target) = match req.parse(request) {
            Ok(httparse::Status::Complete(_)) => (req.method.unwrap_or(""), req.path.unwrap_or("")),
            _ => return respond(&date, 400, r#"{"message":"INVALID_REQUEST"}"#),
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut response = match (method, path) {
            ("GET", "/lookup") => self.lookup(&date, query),
            ("GET", "/nodes") => respond(&date, 200, &self.nodes()),
            ("GET", "/ping") => format!(
                "HTTP/1.1 200 OK\r\nDate: {date}\r\nContent-Length: 2\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\nOK"
            )
            .into_bytes(),
            ("GET", "/info") => respond(&date, 200, r#"{"version":"1.3.0"}"#),
            (_, "/lookup" | "/nodes" | "/ping" | "/info") => respond(&date, 405, r#"{"message":"METHOD_NOT_ALLOWED"}"#),
            _ => respond(&date, 404, r#"{"message":"NOT_FOUND"}"#),
        };
        match self.garbage {
            Some(Garbage::BadJson) => {
                let body = r#"{"channels":["c"],"producers":[{"broadcast_address":"#;
                response = respond(&date, 200, body);
            }
            Some(Garbage::Truncated) => response.truncate(response.len() * 2 / 3),
            _ => {}
        }
        response
    }

    fn lookup(&self, date: &str, query: &str) -> Vec<u8> {
        let Some(topic) = query_param(query, "topic") else {
            return respond(date, 400, r#"{"message":"MISSING_ARG_TOPIC"}"#);
        };
        if !self.keys.contains(&(topic.clone(), String::new())) && self.lying.is_empty() {
            return respond(date, 404, r#"{"message":"TOPIC_NOT_FOUND"}"#);
        }
        let channels: BTreeSet<&str> =
            self.keys.iter().filter(|(t, c)| *t == topic && !c.is_empty()).map(|(_, c)| c.as_str()).collect();
        let mut producers: Vec<String> = self
            .registrations
            .iter()
            .filter(|(_, regs)| regs.contains(&(topic.clone(), String::new())))
            .filter_map(|(addr, _)| self.producers.get(addr))
            .map(Producer::json)
            .collect();
        producers.extend(self.lying.iter().map(Producer::json));
        let channels: Vec<String> = channels.into_iter().map(json_str).collect();
        respond(date, 200, &format!(r#"{{"channels":[{}],"producers":[{}]}}"#, channels.join(","), producers.join(",")))
    }

    fn nodes(&self) -> String {
        let nodes: Vec<String> = self
            .producers
            .iter()
            .map(|(addr, p)| {
                let topics: Vec<String> = self
                    .registrations
                    .get(addr)
                    .map(|regs| regs.iter().filter(|(_, c)| c.is_empty()).map(|(t, _)| json_str(t)).collect())
                    .unwrap_or_default();
                let info = p.json();
                let tombstones = vec!["false"; topics.len()].join(",");
                format!(r#"{},"tombstones":[{tombstones}],"topics":[{}]}}"#, &info[..info.len() - 1], topics.join(","))
            })
            .collect();
        format!(r#"{{"producers":[{}]}}"#, nodes.join(","))
    }
}

/// `RespondV1`: JSON with nsq's content-type headers; Go's server adds `Date` and
/// `Content-Length`, and `Connection: close` as the request asked.
fn respond(date: &str, status: u16, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    let allow = if status == 405 { "Allow: GET, OPTIONS\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\n{allow}Content-Type: application/json; charset=utf-8\r\nX-Nsq-Content-Type: nsq; version=1.0\r\nDate: {date}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// `url.ParseQuery(...).Get(name)`: the first value, percent-decoded; `None` when absent.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `Date` header for virtual time after the simulation's wall-clock epoch.
fn http_date(since_start: Duration) -> String {
    const EPOCH_SECS: u64 = 1_700_000_000;
    let secs = EPOCH_SECS + since_start.as_secs();
    let days = secs / 86_400;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let month_name =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][month as usize - 1];
    format!("{weekday}, {day:02} {month_name} {year} {h:02}:{m:02}:{s:02} GMT")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn without_date(raw: &str) -> String {
        raw.lines().filter(|l| !l.starts_with("Date: ")).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn answers_as_captured() {
        let path = format!("{}/tests/fixtures/nsqd-1.3.0/lookupd.json", env!("CARGO_MANIFEST_DIR"));
        let cap: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let now = Instant::now();
        let mut model = LookupdModel::new(now);
        let producer = Producer {
            remote_address: "127.0.0.1:35698".into(),
            hostname: "vm".into(),
            broadcast_address: "127.0.0.1".into(),
            tcp_port: 27201,
            http_port: 25752,
        };
        model.register_node(producer);
        model.register("127.0.0.1:27201", "fixture_lookup", None);
        model.register("127.0.0.1:27201", "fixture_lookup", Some("fixture_ch"));
        model.register("127.0.0.1:27201", "fixture_lookup_nochan", None);
        let mut checked = 0;
        for exchange in cap["exchanges"].as_array().unwrap() {
            let request = exchange["request"].as_str().unwrap();
            let want = exchange["response_raw"].as_str().unwrap();
            // Go orders these by map iteration; the model serves the paths clients use.
            if ["GET /topics", "GET /channels", "GET /nodes"].iter().any(|p| request.starts_with(p)) {
                continue;
            }
            let got = String::from_utf8(model.handle(request.as_bytes(), now)).unwrap();
            assert_eq!(without_date(&got), without_date(want), "{request}");
            checked += 1;
        }
        assert_eq!(checked, 10);
        let nodes = model.handle(b"GET /nodes HTTP/1.1\r\nConnection: close\r\n\r\n", now);
        let body = String::from_utf8(nodes).unwrap();
        assert!(
            body.ends_with(r#""tombstones":[false,false],"topics":["fixture_lookup","fixture_lookup_nochan"]}]}"#),
            "{body}"
        );
    }

    #[test]
    fn keys_outlive_their_producers_and_lies_are_listed() {
        let now = Instant::now();
        let mut model = LookupdModel::new(now);
        model.register_node(Producer::for_addr("nsqd-0:4150", 40000));
        model.register("nsqd-0:4150", "t", Some("c"));
        let req = b"GET /lookup?topic=t HTTP/1.1\r\nConnection: close\r\n\r\n";
        let answer = String::from_utf8(model.handle(req, now)).unwrap();
        assert!(answer.ends_with(r#"{"channels":["c"],"producers":[{"remote_address":"10.0.0.1:40000","hostname":"nsqd-0","broadcast_address":"nsqd-0","tcp_port":4150,"http_port":4151,"version":"1.3.0","topology_zone":"","topology_region":""}]}"#), "{answer}");
        model.unregister_node("nsqd-0:4150");
        let answer = String::from_utf8(model.handle(req, now)).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with(r#"{"channels":["c"],"producers":[]}"#),
            "{answer}"
        );
        model.set_lying(vec![Producer::for_addr("ghost-1:4150", 1)]);
        let answer = String::from_utf8(model.handle(req, now)).unwrap();
        assert!(answer.contains(r#""broadcast_address":"ghost-1""#));
        let missing =
            String::from_utf8(model.handle(b"GET /lookup?topic=x%23ephemeral HTTP/1.1\r\n\r\n", now)).unwrap();
        assert!(missing.contains("ghost-1"), "a liar lists its ghosts for any topic");
        assert_eq!(http_date(Duration::ZERO), "Tue, 14 Nov 2023 22:13:20 GMT");
    }
}
