//! The nsqlookupd HTTP API: `GET /lookup?topic=...` request bytes, the exchange over a
//! consumer's connection (plain or TLS), and response parsing.
//!
//! The adapter carries the bytes over TCP like any other connection's; everything else
//! happens here: TLS through rustls, `httparse` for the head and `serde_json` for the body.

mod exchange;
mod poller;

use std::fmt;

use bytes::Bytes;
use serde::Deserialize;

use crate::transport::TransportError;
use crate::Topic;

pub(crate) use exchange::Exchange;
pub(crate) use poller::{Answer, Endpoint, Owner, Poller, QueryKind};

/// The largest lookupd response accepted, head and body.
pub const MAX_LOOKUPD_RESPONSE: usize = 4 * 1024 * 1024;

/// Why a lookupd address, query or response was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LookupdError {
    /// The address is not `host:port`, `http://host:port[/path]` or
    /// `https://host:port[/path]`.
    #[error("bad lookupd address {addr:?}: {reason}")]
    Address {
        /// The address.
        addr: String,
        /// Why.
        reason: &'static str,
    },
    /// lookupd could not be reached, or the exchange failed (refused, timed out, reset).
    #[error("{0}")]
    Io(crate::SocketError),
    /// TLS with an `https://` lookupd failed: its certificate, the handshake, or the TLS
    /// settings (CA file, client certificate).
    #[error(transparent)]
    Tls(TransportError),
    /// `auth_secret` holds characters an HTTP header cannot carry (control characters), so
    /// the `Authorization` header cannot be sent; go-nsq's HTTP client refuses such a query
    /// too.
    #[error("auth_secret cannot be sent in an Authorization header: it holds control characters")]
    Secret,
    /// The response ended before it was complete.
    #[error("truncated lookupd response")]
    Truncated,
    /// The response is larger than [`MAX_LOOKUPD_RESPONSE`].
    #[error("lookupd response larger than {MAX_LOOKUPD_RESPONSE} bytes")]
    TooLarge,
    /// The status line or headers are not HTTP/1.x.
    #[error("bad HTTP response from lookupd: {0}")]
    Http(String),
    /// lookupd answered with an error status (401 or 403: the `Authorization` header was
    /// missing or refused).
    #[error("lookupd answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The body is not the JSON lookupd sends.
    #[error("bad lookupd JSON: {0}")]
    Json(String),
}

/// A parsed lookupd address: the scheme, where to connect, and the path prefix to ask under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LookupdAddress {
    https: bool,
    host_port: String,
    path: String,
}

impl LookupdAddress {
    /// Parses `host:port`, `http://host:port[/path]` or `https://host:port[/path]` as go-nsq
    /// does: no scheme means `http://`, the port is required (for `https://` too), and
    /// `/lookup` is appended to an empty path. IPv6 hosts are bracketed: `http://[::1]:4161`.
    pub fn parse(addr: &str) -> Result<Self, LookupdError> {
        let bad = |reason| LookupdError::Address { addr: addr.to_owned(), reason };
        let (https, rest) = if let Some(rest) = addr.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = addr.strip_prefix("https://") {
            (true, rest)
        } else if addr.contains("://") {
            return Err(bad("only http:// and https:// are supported"));
        } else {
            (false, addr)
        };
        let (host_port, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let Some((host, port)) = host_port.rsplit_once(':') else {
            return Err(bad("missing port"));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad("expected host:port"));
        }
        if host.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || matches!(b, b'@' | b'?' | b'#')) {
            return Err(bad("the host holds characters a host name cannot"));
        }
        let path = match path.trim_end_matches('/') {
            "" => "/lookup".to_owned(),
            p => p.to_owned(),
        };
        if path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(bad("the path holds white space"));
        }
        Ok(Self { https, host_port: host_port.to_owned(), path })
    }

    /// `host:port` to connect to.
    pub fn host_port(&self) -> &str {
        &self.host_port
    }

    /// The host alone (an IPv6 literal without its brackets): the name an `https://` lookupd's
    /// certificate must carry.
    pub fn host(&self) -> &str {
        crate::consumer::host_of(&self.host_port)
    }

    /// Whether the address is `https://`.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// The complete `GET <path>?topic=<topic>` request, with `Connection: close`, and
    /// `Authorization: Bearer <bearer>` when `bearer` is given.
    ///
    /// Fails with [`LookupdError::Secret`] when `bearer` holds control characters, which would
    /// break the header.
    pub fn request(&self, topic: &Topic, user_agent: &str, bearer: Option<&str>) -> Result<Bytes, LookupdError> {
        // Topic names are [.a-zA-Z0-9_-] plus '#': only '#' needs escaping in a query.
        let topic = topic.as_str().replace('#', "%23");
        self.get(&format!("{}?topic={topic}", self.path), user_agent, bearer)
    }

    /// The complete `GET /nodes` request (every nsqd lookupd knows, whatever its topics), with
    /// the same headers as [`request`](Self::request). The path is the address's with a final
    /// `/lookup` replaced: `http://h:4161/prefix/lookup` asks `/prefix/nodes`.
    pub fn nodes_request(&self, user_agent: &str, bearer: Option<&str>) -> Result<Bytes, LookupdError> {
        let prefix = self.path.strip_suffix("/lookup").unwrap_or(&self.path);
        self.get(&format!("{prefix}/nodes"), user_agent, bearer)
    }

    fn get(&self, target: &str, user_agent: &str, bearer: Option<&str>) -> Result<Bytes, LookupdError> {
        let agent: String = user_agent.chars().filter(|c| !c.is_control()).collect();
        let authorization = match bearer {
            Some(secret) if secret.chars().any(char::is_control) => return Err(LookupdError::Secret),
            Some(secret) => format!("Authorization: Bearer {secret}\r\n"),
            None => String::new(),
        };
        Ok(Bytes::from(format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {agent}\r\nAccept: application/vnd.nsq; version=1.0\r\n{authorization}Connection: close\r\n\r\n",
            self.host_port
        )))
    }
}

impl fmt::Display for LookupdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.host_port, self.path)
    }
}

/// What lookupd knows of a topic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Lookup {
    /// The topic's channels.
    #[serde(default)]
    pub channels: Vec<String>,
    /// The nsqds that have the topic.
    #[serde(default)]
    pub producers: Vec<LookupProducer>,
}

/// One nsqd in a lookupd answer. Unknown keys are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct LookupProducer {
    /// The address nsqd announces for clients.
    pub broadcast_address: String,
    /// nsqd's host name.
    pub hostname: String,
    /// Where lookupd saw nsqd connect from.
    pub remote_address: String,
    /// nsqd's TCP port.
    pub tcp_port: u16,
    /// nsqd's HTTP port.
    pub http_port: u16,
    /// nsqd's version.
    pub version: String,
}

impl LookupProducer {
    /// `broadcast_address:tcp_port` (IPv6 bracketed): the address to dial, and the key
    /// producers are de-duplicated by.
    pub fn tcp_address(&self) -> String {
        if self.broadcast_address.contains(':') && !self.broadcast_address.starts_with('[') {
            format!("[{}]:{}", self.broadcast_address, self.tcp_port)
        } else {
            format!("{}:{}", self.broadcast_address, self.tcp_port)
        }
    }
}

/// Parses a complete lookupd response (everything read until the server closed).
///
/// Both JSON shapes are accepted: the current `{"channels":..,"producers":..}` and the older
/// `{"status_code":200,"status_txt":"OK","data":{..}}`. A 404 (`TOPIC_NOT_FOUND`) is an empty
/// answer, not an error.
pub fn parse_response(response: &[u8]) -> Result<Lookup, LookupdError> {
    if response.len() > MAX_LOOKUPD_RESPONSE {
        return Err(LookupdError::TooLarge);
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(response) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(LookupdError::Truncated),
        Err(e) => return Err(LookupdError::Http(e.to_string())),
    };
    let status = parsed.code.unwrap_or(0);
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    let rest = &response[head_len..];
    let body = if header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| LookupdError::Http(format!("bad Content-Length {len:?}")))?;
        rest.get(..len).ok_or(LookupdError::Truncated)?.to_vec()
    } else {
        rest.to_vec()
    };
    match status {
        200 => {}
        404 => return Ok(Lookup::default()),
        _ => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(LookupdError::Status { status, body: text });
        }
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Shape {
        Envelope { status_code: u16, data: Option<Lookup> },
        Current(Lookup),
    }
    match serde_json::from_slice::<Shape>(&body).map_err(|e| LookupdError::Json(e.to_string()))? {
        Shape::Current(lookup) => Ok(lookup),
        Shape::Envelope { status_code: 200, data } => Ok(data.unwrap_or_default()),
        Shape::Envelope { status_code: 404, .. } => Ok(Lookup::default()),
        Shape::Envelope { status_code, .. } => {
            Err(LookupdError::Status { status: status_code, body: String::from_utf8_lossy(&body).into_owned() })
        }
    }
}

/// Decodes a chunked transfer-encoded body.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, LookupdError> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").ok_or(LookupdError::Truncated)?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| LookupdError::Http(format!("bad chunk size {size_text:?}")))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if body.len() + size > MAX_LOOKUPD_RESPONSE {
            return Err(LookupdError::TooLarge);
        }
        let chunk = rest.get(..size).ok_or(LookupdError::Truncated)?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or(LookupdError::Truncated)?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        let path = format!("{}/tests/fixtures/nsqd-1.3.0/lookupd.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn parses_every_captured_exchange() {
        let cap = fixture();
        let mut found = 0;
        for exchange in cap["exchanges"].as_array().unwrap() {
            let request = exchange["request"].as_str().unwrap_or("");
            let Some(raw) = exchange["response_raw"].as_str().or_else(|| exchange["response"].as_str()) else {
                continue;
            };
            let result = parse_response(raw.as_bytes());
            if request.starts_with("GET /lookup?topic=") && raw.starts_with("HTTP/1.1 200") {
                let lookup = result.unwrap();
                assert!(!lookup.producers.is_empty(), "{raw}");
                let p = &lookup.producers[0];
                assert_eq!(p.broadcast_address, "127.0.0.1");
                assert!(p.tcp_port > 0);
                assert_eq!(p.tcp_address(), format!("127.0.0.1:{}", p.tcp_port));
                found += 1;
            } else if raw.starts_with("HTTP/1.1 404") && raw.contains("TOPIC_NOT_FOUND") {
                assert_eq!(result.unwrap(), Lookup::default());
                found += 1;
            } else if raw.starts_with("HTTP/1.1 400") {
                assert!(matches!(result, Err(LookupdError::Status { status: 400, .. })), "{result:?}");
                found += 1;
            }
        }
        assert!(found >= 2, "no lookup exchanges recognised in the capture");
    }

    #[test]
    fn accepts_the_old_envelope_and_chunked_bodies() {
        let body = r#"{"status_code":200,"status_txt":"OK","data":{"channels":["c"],"producers":[{"broadcast_address":"::1","tcp_port":4150}]}}"#;
        let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let lookup = parse_response(raw.as_bytes()).unwrap();
        assert_eq!(lookup.channels, ["c"]);
        assert_eq!(lookup.producers[0].tcp_address(), "[::1]:4150");

        let json = r#"{"channels":[],"producers":[{"broadcast_address":"h","tcp_port":1,"extra":true}]}"#;
        let (a, b) = json.split_at(20);
        let raw = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        assert_eq!(parse_response(raw.as_bytes()).unwrap().producers[0].tcp_address(), "h:1");
    }

    #[test]
    fn refuses_garbage_truncation_and_errors() {
        assert!(matches!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Le"), Err(LookupdError::Truncated)));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"),
            Err(LookupdError::Truncated)
        ));
        assert!(matches!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n"), Err(LookupdError::Http(_))));
        assert!(matches!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nnot json"), Err(LookupdError::Json(_))));
        assert!(matches!(
            parse_response(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}"),
            Err(LookupdError::Status { status: 500, .. })
        ));
        let big = vec![b'x'; MAX_LOOKUPD_RESPONSE + 1];
        assert!(matches!(parse_response(&big), Err(LookupdError::TooLarge)));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            Err(LookupdError::Http(_))
        ));
    }

    #[test]
    fn addresses_and_requests() {
        let a = LookupdAddress::parse("127.0.0.1:4161").unwrap();
        assert_eq!(a.host_port(), "127.0.0.1:4161");
        let topic = Topic::new("t#ephemeral").unwrap();
        let req = a.request(&topic, "nsq-rs/0.1", None).unwrap();
        assert!(req.starts_with(b"GET /lookup?topic=t%23ephemeral HTTP/1.1\r\nHost: 127.0.0.1:4161\r\n"));
        let text = std::str::from_utf8(&req).unwrap();
        assert!(text.contains("Accept: application/vnd.nsq; version=1.0\r\n"));
        assert!(!text.contains("Authorization"));
        assert!(!a.is_https());
        let b = LookupdAddress::parse("http://lookupd:4161/prefix/lookup/").unwrap();
        assert_eq!(b.to_string(), "http://lookupd:4161/prefix/lookup");
        let c = LookupdAddress::parse("https://[::1]:4162").unwrap();
        assert!(c.is_https());
        assert_eq!((c.host_port(), c.host()), ("[::1]:4162", "::1"));
        assert_eq!(c.to_string(), "https://[::1]:4162/lookup");
        let req = c.request(&topic, "a", Some("s3cret")).unwrap();
        assert!(std::str::from_utf8(&req).unwrap().contains("\r\nAuthorization: Bearer s3cret\r\n"));
        assert_eq!(c.request(&topic, "a", Some("bad\r\nX-Injected: 1")), Err(LookupdError::Secret));
        for bad in [
            "x",
            "x:port",
            ":1",
            "ftp://x:1",
            "http://x:1/a b",
            "https://x",
            "https://x/lookup",
            "http://u@x:1",
            "x\r\nX-Evil: 1\r\n:1",
            "a b:1",
        ] {
            assert!(LookupdAddress::parse(bad).is_err(), "{bad}");
        }
    }
}
