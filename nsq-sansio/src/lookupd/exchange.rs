//! [`Exchange`]: one lookupd query over one connection, as a sans-IO HTTP/1.1 client: the
//! request out (through TLS for `https://`), the response in, complete once its
//! `Content-Length` or final chunk arrived, or at end of file.

use bytes::{Bytes, BytesMut};

use super::{parse_response, Lookup, LookupdAddress, LookupdError, MAX_LOOKUPD_RESPONSE};
use crate::transport::tls::{self, Tls};
use crate::transport::TlsOptions;

/// Headers accepted in a lookupd response head (nsqlookupd sends five).
const MAX_HEADERS: usize = 32;

/// One lookupd request and its response.
#[derive(Debug)]
pub(crate) struct Exchange {
    tls: Option<Tls>,
    /// Bytes for the socket.
    out: BytesMut,
    /// The response so far, in plaintext.
    response: BytesMut,
    framing: Framing,
}

/// How the end of the response is found, once its head is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// The head is not complete yet.
    Head,
    /// The response ends at this offset (`Content-Length`).
    Length(usize),
    /// Chunked: the next chunk-size line starts at this offset.
    Chunked(usize),
    /// Neither: the response ends when lookupd closes the connection.
    UntilEof,
}

impl Exchange {
    /// Starts the exchange: queues `request`, encrypted for an `https://` address with the
    /// same TLS settings as nsqd connections (CA file or the system's store, client
    /// certificate, minimum version, insecure mode), verifying the certificate against the
    /// lookupd's host.
    pub(crate) fn new(addr: &LookupdAddress, request: Bytes, options: &TlsOptions) -> Result<Self, LookupdError> {
        let mut exchange = Self { tls: None, out: BytesMut::new(), response: BytesMut::new(), framing: Framing::Head };
        if addr.is_https() {
            let config = tls::client_config(options).map_err(LookupdError::Tls)?;
            // The lookupd's own host, not `tls_server_name`, which names nsqd's certificate.
            let name = tls::server_name(&TlsOptions::default(), addr.host()).map_err(LookupdError::Tls)?;
            let mut session = Tls::new(config, name).map_err(LookupdError::Tls)?;
            session.send(&request).map_err(LookupdError::Tls)?;
            session.flush(&mut exchange.out);
            exchange.tls = Some(session);
        } else {
            exchange.out.extend_from_slice(&request);
        }
        Ok(exchange)
    }

    /// Feeds bytes read from the socket. `Some` once the response is complete (or broken):
    /// the query's outcome; the connection can close.
    pub(crate) fn handle_input(&mut self, data: BytesMut) -> Option<Result<Lookup, LookupdError>> {
        match &mut self.tls {
            Some(session) => {
                if let Err(e) = session.recv(&data, &mut self.response) {
                    return Some(Err(LookupdError::Tls(e)));
                }
                // Handshake records go out at the next poll_transmit.
                session.flush(&mut self.out);
            }
            None if self.response.is_empty() => self.response = data,
            None => self.response.unsplit(data),
        }
        self.check()
    }

    /// lookupd closed the connection: the response is whatever arrived.
    pub(crate) fn handle_eof(&mut self) -> Result<Lookup, LookupdError> {
        if self.response.is_empty() {
            return Err(LookupdError::Truncated);
        }
        parse_response(&self.response)
    }

    /// The bytes to write next, if any.
    pub(crate) fn poll_transmit(&mut self) -> Option<Bytes> {
        if let Some(session) = &mut self.tls {
            session.flush(&mut self.out);
        }
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out).freeze())
    }

    /// Ends the exchange: queues TLS close_notify for an `https://` lookupd.
    pub(crate) fn close(&mut self) {
        if let Some(session) = &mut self.tls {
            session.close();
            session.flush(&mut self.out);
        }
    }

    /// Whether the response is complete, and if so what it says. Each call resumes where the
    /// previous one stopped, so a response read in many small pieces is scanned once.
    fn check(&mut self) -> Option<Result<Lookup, LookupdError>> {
        if self.response.len() > MAX_LOOKUPD_RESPONSE {
            return Some(Err(LookupdError::TooLarge));
        }
        loop {
            match self.framing {
                Framing::Head => match head(&self.response) {
                    Ok(Some(framing)) => self.framing = framing,
                    Ok(None) => return None,
                    Err(e) => return Some(Err(e)),
                },
                Framing::Length(end) => {
                    return (self.response.len() >= end).then(|| parse_response(&self.response[..end]));
                }
                Framing::Chunked(next) => match chunks(&self.response, next) {
                    Ok(Chunks::Complete(end)) => return Some(parse_response(&self.response[..end])),
                    Ok(Chunks::Partial(next)) => {
                        self.framing = Framing::Chunked(next);
                        return None;
                    }
                    Err(e) => return Some(Err(e)),
                },
                Framing::UntilEof => return None,
            }
        }
    }
}

/// The framing of a response whose head is complete; `None` while it is not.
fn head(response: &[u8]) -> Result<Option<Framing>, LookupdError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(response) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(LookupdError::Http(e.to_string())),
    };
    let value = |name: &str| {
        parsed.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value))
    };
    if value("transfer-encoding").is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked")) {
        return Ok(Some(Framing::Chunked(head_len)));
    }
    match value("content-length") {
        Some(len) => {
            let len: usize =
                len.trim().parse().map_err(|_| LookupdError::Http(format!("bad Content-Length {len:?}")))?;
            if len > MAX_LOOKUPD_RESPONSE {
                return Err(LookupdError::TooLarge);
            }
            Ok(Some(Framing::Length(head_len + len)))
        }
        None => Ok(Some(Framing::UntilEof)),
    }
}

/// Where a chunked body stands.
#[derive(Debug, PartialEq, Eq)]
enum Chunks {
    /// The body and its trailer end at this offset.
    Complete(usize),
    /// More is needed; the next chunk-size line starts at this offset.
    Partial(usize),
}

/// Walks the chunks of a chunked body from the chunk-size line at `at`, skipping chunk data
/// by its size.
fn chunks(response: &[u8], mut at: usize) -> Result<Chunks, LookupdError> {
    loop {
        let Some(line_len) = find_crlf(&response[at..]) else {
            return Ok(Chunks::Partial(at));
        };
        let line = String::from_utf8_lossy(&response[at..at + line_len]);
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| LookupdError::Http(format!("bad chunk size {size_text:?}")))?;
        let data = at + line_len + 2;
        if size == 0 {
            // The trailer: header lines, then an empty line.
            let mut line_start = data;
            loop {
                let Some(len) = find_crlf(&response[line_start..]) else {
                    return Ok(Chunks::Partial(at));
                };
                line_start += len + 2;
                if len == 0 {
                    return Ok(Chunks::Complete(line_start));
                }
            }
        }
        let end = data.checked_add(size).and_then(|e| e.checked_add(2)).ok_or(LookupdError::TooLarge)?;
        if end > MAX_LOOKUPD_RESPONSE {
            return Err(LookupdError::TooLarge);
        }
        if response.len() < end {
            return Ok(Chunks::Partial(at));
        }
        if &response[end - 2..end] != b"\r\n" {
            return Err(LookupdError::Http("chunk not followed by CRLF".into()));
        }
        at = end;
    }
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn chunk_walking_resumes_and_finds_the_end() {
        let body = b"HTTP/1.1 200 OK\r\n\r\n4\r\nabcd\r\n2;x=y\r\nef\r\n0\r\nTrailer: 1\r\n\r\nextra";
        let start = 19;
        for cut in start..body.len() - 5 {
            let partial = chunks(&body[..cut], start).unwrap();
            assert!(matches!(partial, Chunks::Partial(at) if at >= start && at <= cut), "{cut}: {partial:?}");
        }
        assert_eq!(chunks(body, start).unwrap(), Chunks::Complete(body.len() - 5));
        assert!(chunks(b"zz\r\n", 0).is_err());
        assert!(chunks(b"2\r\nabXY", 0).is_err());
        assert_eq!(chunks(b"fffffffffffffff0\r\n", 0), Err(LookupdError::TooLarge));
    }
}
