//! The NSQ wire format as nsqd writes and reads it, written from nsqd's sources
//! (`internal/protocol`, `nsqd/protocol_v2.go`, `nsqd/message.go`) and the captures, not from
//! the client's codec, so a mistake in one is not silently shared by the other.

/// Frame types (`frameTypeResponse`, `frameTypeError`, `frameTypeMessage`).
pub const FRAME_RESPONSE: u32 = 0;
pub const FRAME_ERROR: u32 = 1;
pub const FRAME_MESSAGE: u32 = 2;

/// The magic a V2 client sends first.
pub const MAGIC_V2: &[u8; 4] = b"  V2";

/// The size of nsqd's `bufio.Reader` (`defaultBufferSize`): a command line longer than this
/// makes `ReadSlice` fail and nsqd drops the connection.
pub const MAX_LINE: usize = 16 * 1024;

/// `[size u32 BE][type u32 BE][data]`, size = 4 + len(data) (`SendFramedResponse`).
pub fn put_frame(out: &mut Vec<u8>, frame_type: u32, data: &[u8]) {
    out.extend_from_slice(&(4 + data.len() as u32).to_be_bytes());
    out.extend_from_slice(&frame_type.to_be_bytes());
    out.extend_from_slice(data);
}

/// A message frame: `[timestamp ns i64][attempts u16][16-byte id][body]` (`Message.WriteTo`).
pub fn put_message(out: &mut Vec<u8>, timestamp_ns: i64, attempts: u16, id: &[u8; 16], body: &[u8]) {
    let size = 4 + 8 + 2 + 16 + body.len();
    out.extend_from_slice(&(size as u32).to_be_bytes());
    out.extend_from_slice(&FRAME_MESSAGE.to_be_bytes());
    out.extend_from_slice(&timestamp_ns.to_be_bytes());
    out.extend_from_slice(&attempts.to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(body);
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete line, `\n` (and an optional `\r`) trimmed, split at spaces; and the bytes
    /// it took.
    Complete(Vec<&'a [u8]>, usize),
    /// No `\n` yet.
    Partial,
    /// No `\n` within [`MAX_LINE`] bytes.
    TooLong,
}

/// One command line (`ReadSlice('\n')`).
pub fn read_line(buf: &[u8]) -> Line<'_> {
    let Some(end) = buf.iter().take(MAX_LINE).position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_LINE { Line::TooLong } else { Line::Partial };
    };
    let mut line = &buf[..end];
    if let [rest @ .., b'\r'] = line {
        line = rest;
    }
    Line::Complete(line.split(|&b| b == b' ').collect(), end + 1)
}

/// A 4-byte big-endian length read as Go's `int32` (`readLen`).
pub fn read_len(buf: &[u8]) -> Option<i32> {
    Some(i32::from_be_bytes(buf.get(..4)?.try_into().ok()?))
}

/// `protocol.ByteToBase10`: digits only, as a `u64` (wrapping like Go's arithmetic).
pub fn base10(digits: &[u8]) -> Option<u64> {
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
    }
    Some(n)
}

/// `protocol.IsValidTopicName` / `IsValidChannelName`: `^[.a-zA-Z0-9_-]+(#ephemeral)?$`,
/// 1 to 64 bytes.
pub fn valid_name(name: &[u8]) -> bool {
    if name.is_empty() || name.len() > 64 {
        return false;
    }
    let stem = name.strip_suffix(b"#ephemeral").unwrap_or(name);
    !stem.is_empty() && stem.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Go's `%q` for the names nsqd quotes in its errors (ASCII is all that matters here).
pub fn go_quote(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// Watches the bytes a client writes and reports the RDY counts in them, for the harness's
/// RDY invariant, and (when asked) the publishes, to follow a pool's attempts. It follows the
/// framing only (line, then a body for the commands that have one); validation is the nsqd
/// model's job.
#[derive(Debug, Default)]
pub struct CommandScanner {
    /// Report PUB, DPUB and MPUB too.
    pub publishes: bool,
    buf: Vec<u8>,
    magic_seen: bool,
    /// Set once the stream stopped making sense; the nsqd model reports why.
    broken: bool,
}

/// A command the scanner recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scanned {
    Rdy(u64),
    Cls,
    /// A publish, by its (first) message body.
    Publish(Vec<u8>),
}

impl CommandScanner {
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Scanned>) {
        if self.broken {
            return;
        }
        self.buf.extend_from_slice(bytes);
        let mut pos = 0;
        if !self.magic_seen {
            if self.buf.len() < 4 {
                return;
            }
            self.magic_seen = true;
            pos = 4;
        }
        loop {
            let rest = &self.buf[pos..];
            let (params, used) = match read_line(rest) {
                Line::Complete(params, used) => (params, used),
                Line::Partial => break,
                Line::TooLong => {
                    self.broken = true;
                    break;
                }
            };
            let name = params[0];
            let has_body = matches!(name, b"IDENTIFY" | b"AUTH" | b"PUB" | b"DPUB" | b"MPUB");
            let scanned = match name {
                b"RDY" => Some(Scanned::Rdy(params.get(1).and_then(|p| base10(p)).unwrap_or(1))),
                b"CLS" => Some(Scanned::Cls),
                _ => None,
            };
            let total = if has_body {
                match read_len(&rest[used..]) {
                    Some(len) if len >= 0 => used + 4 + len as usize,
                    Some(_) => {
                        self.broken = true;
                        break;
                    }
                    None => break,
                }
            } else {
                used
            };
            if rest.len() < total {
                break;
            }
            let first_body = match name {
                _ if !self.publishes => None,
                b"PUB" | b"DPUB" => Some(&rest[used + 4..total]),
                // [count][size][body]...
                b"MPUB" => read_len(rest.get(used + 8..total).unwrap_or_default())
                    .and_then(|size| rest.get(used + 12..used + 12 + usize::try_from(size).ok()?)),
                _ => None,
            };
            out.extend(scanned);
            out.extend(first_body.map(|body| Scanned::Publish(body.to_vec())));
            pos += total;
        }
        self.buf.drain(..pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_names() {
        assert_eq!(read_line(b"RDY 5\r\nNOP\n"), Line::Complete(vec![&b"RDY"[..], b"5"], 7));
        assert_eq!(read_line(b"RDY 5"), Line::Partial);
        assert_eq!(read_line(&vec![b'x'; MAX_LINE]), Line::TooLong);
        assert!(valid_name(b"a.b_c-d#ephemeral") && !valid_name(b"#ephemeral") && !valid_name(b"bad!topic"));
        assert_eq!(go_quote(b"bad!topic"), "\"bad!topic\"");
        assert_eq!(base10(b"2501"), Some(2501));
        assert_eq!(base10(b"-1"), None);
    }

    #[test]
    fn scanner_follows_bodies_across_chunks() {
        let stream = b"  V2IDENTIFY\n\0\0\0\x02{}PUB t\n\0\0\0\x03RDYRDY 7\nCLS\nRDY\n";
        for cut in 0..stream.len() {
            let mut s = CommandScanner::default();
            let mut out = Vec::new();
            s.feed(&stream[..cut], &mut out);
            s.feed(&stream[cut..], &mut out);
            assert_eq!(out, [Scanned::Rdy(7), Scanned::Cls, Scanned::Rdy(1)], "cut at {cut}");
        }
        let stream = b"  V2PUB t\n\0\0\0\x03abcMPUB t\n\0\0\0\x0e\0\0\0\x02\0\0\0\x01x\0\0\0\x01yDPUB t 5\n\0\0\0\x01z";
        let mut s = CommandScanner { publishes: true, ..CommandScanner::default() };
        let mut out = Vec::new();
        s.feed(stream, &mut out);
        let bodies: Vec<Scanned> = [&b"abc"[..], b"x", b"z"].iter().map(|b| Scanned::Publish(b.to_vec())).collect();
        assert_eq!(out, bodies);
    }
}
