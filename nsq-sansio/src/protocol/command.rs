//! Encoding of every client command: `NAME[ param]*\n` plus, for some, `[4-byte BE size][body]`.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use super::{Channel, MessageId, Topic, MAGIC_V2};

/// One client command, borrowed from the caller's data.
///
/// [`Command::encode`] appends its wire form to a buffer; nothing is allocated besides that
/// buffer's growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// The protocol magic `  V2`, sent once before anything else.
    Magic,
    /// `IDENTIFY` with its JSON body.
    Identify(&'a [u8]),
    /// `AUTH` with the secret as body.
    Auth(&'a [u8]),
    /// `SUB <topic> <channel>`.
    Sub(&'a Topic, &'a Channel),
    /// `PUB <topic>` with one body.
    Pub(&'a Topic, &'a [u8]),
    /// `MPUB <topic>` with several bodies.
    Mpub(&'a Topic, &'a [Bytes]),
    /// `DPUB <topic> <defer_ms>` with one body.
    Dpub(&'a Topic, Duration, &'a [u8]),
    /// `RDY <count>`.
    Rdy(u32),
    /// `FIN <id>`.
    Fin(&'a MessageId),
    /// `REQ <id> <timeout_ms>`.
    Req(&'a MessageId, Duration),
    /// `TOUCH <id>`.
    Touch(&'a MessageId),
    /// `CLS`: ask nsqd to stop sending messages.
    Cls,
    /// `NOP`: the answer to a heartbeat.
    Nop,
}

impl Command<'_> {
    /// The command's name as it goes on the wire (`"  V2"` for the magic).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Magic => "  V2",
            Self::Identify(_) => "IDENTIFY",
            Self::Auth(_) => "AUTH",
            Self::Sub(..) => "SUB",
            Self::Pub(..) => "PUB",
            Self::Mpub(..) => "MPUB",
            Self::Dpub(..) => "DPUB",
            Self::Rdy(_) => "RDY",
            Self::Fin(_) => "FIN",
            Self::Req(..) => "REQ",
            Self::Touch(_) => "TOUCH",
            Self::Cls => "CLS",
            Self::Nop => "NOP",
        }
    }

    /// Appends the command's exact wire bytes to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        match *self {
            Self::Magic => buf.put_slice(MAGIC_V2),
            Self::Identify(body) => with_body(buf, b"IDENTIFY\n", body),
            Self::Auth(body) => with_body(buf, b"AUTH\n", body),
            Self::Sub(topic, channel) => {
                line(buf, &[b"SUB ", topic.as_str().as_bytes(), b" ", channel.as_str().as_bytes()])
            }
            Self::Pub(topic, body) => {
                line(buf, &[b"PUB ", topic.as_str().as_bytes()]);
                sized(buf, body);
            }
            Self::Mpub(topic, bodies) => {
                line(buf, &[b"MPUB ", topic.as_str().as_bytes()]);
                let size = 4 + bodies.iter().map(|b| 4 + b.len()).sum::<usize>();
                buf.reserve(4 + size);
                buf.put_u32(len_u32(size));
                buf.put_u32(len_u32(bodies.len()));
                for body in bodies {
                    sized(buf, body);
                }
            }
            Self::Dpub(topic, delay, body) => {
                let mut ms = itoa_buf();
                let ms = fmt_u128(&mut ms, delay.as_millis());
                line(buf, &[b"DPUB ", topic.as_str().as_bytes(), b" ", ms]);
                sized(buf, body);
            }
            Self::Rdy(count) => {
                let mut n = itoa_buf();
                line(buf, &[b"RDY ", fmt_u128(&mut n, u128::from(count))]);
            }
            Self::Fin(id) => {
                // One copy: a consumer writes a FIN for every message.
                let mut fin = *b"FIN 0123456789abcdef\n";
                fin[4..20].copy_from_slice(id.as_bytes());
                buf.put_slice(&fin);
            }
            Self::Req(id, delay) => {
                let mut ms = itoa_buf();
                let ms = fmt_u128(&mut ms, delay.as_millis());
                line(buf, &[b"REQ ", id.as_bytes(), b" ", ms]);
            }
            Self::Touch(id) => line(buf, &[b"TOUCH ", id.as_bytes()]),
            Self::Cls => buf.put_slice(b"CLS\n"),
            Self::Nop => buf.put_slice(b"NOP\n"),
        }
    }

    /// The number of bytes [`Command::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        let mut scratch = itoa_buf();
        match *self {
            Self::Magic => 4,
            Self::Identify(body) => 9 + 4 + body.len(),
            Self::Auth(body) => 5 + 4 + body.len(),
            Self::Sub(t, c) => 4 + t.as_str().len() + 1 + c.as_str().len() + 1,
            Self::Pub(t, body) => 4 + t.as_str().len() + 1 + 4 + body.len(),
            Self::Mpub(t, bodies) => {
                5 + t.as_str().len() + 1 + 4 + 4 + bodies.iter().map(|b| 4 + b.len()).sum::<usize>()
            }
            Self::Dpub(t, delay, body) => {
                5 + t.as_str().len() + 1 + fmt_u128(&mut scratch, delay.as_millis()).len() + 1 + 4 + body.len()
            }
            Self::Rdy(n) => 4 + fmt_u128(&mut scratch, u128::from(n)).len() + 1,
            Self::Fin(_) => 4 + 16 + 1,
            Self::Req(_, delay) => 4 + 16 + 1 + fmt_u128(&mut scratch, delay.as_millis()).len() + 1,
            Self::Touch(_) => 6 + 16 + 1,
            Self::Cls | Self::Nop => 4,
        }
    }
}

fn line(buf: &mut BytesMut, parts: &[&[u8]]) {
    buf.reserve(parts.iter().map(|p| p.len()).sum::<usize>() + 1);
    for part in parts {
        buf.put_slice(part);
    }
    buf.put_u8(b'\n');
}

fn with_body(buf: &mut BytesMut, head: &[u8], body: &[u8]) {
    buf.reserve(head.len() + 4 + body.len());
    buf.put_slice(head);
    sized(buf, body);
}

fn sized(buf: &mut BytesMut, body: &[u8]) {
    buf.reserve(4 + body.len());
    buf.put_u32(len_u32(body.len()));
    buf.put_slice(body);
}

/// Lengths are checked against nsqd's limits before encoding; this only guards the cast.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn itoa_buf() -> [u8; 40] {
    [0; 40]
}

/// Formats `n` in decimal into `buf` without allocating.
fn fmt_u128(buf: &mut [u8; 40], mut n: u128) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(cmd: Command<'_>) -> Vec<u8> {
        let mut buf = BytesMut::new();
        cmd.encode(&mut buf);
        assert_eq!(buf.len(), cmd.encoded_len(), "{cmd:?}");
        buf.to_vec()
    }

    #[test]
    fn encodes_like_the_captures() {
        let topic = Topic::new("fixture_pub").unwrap();
        let id = MessageId(*b"0123456789abcdef");
        assert_eq!(enc(Command::Magic), b"  V2");
        assert_eq!(enc(Command::Pub(&topic, b"hello pub")), b"PUB fixture_pub\n\x00\x00\x00\x09hello pub");
        assert_eq!(
            enc(Command::Dpub(&topic, Duration::from_millis(5000), b"x")),
            b"DPUB fixture_pub 5000\n\x00\x00\x00\x01x"
        );
        assert_eq!(enc(Command::Rdy(0)), b"RDY 0\n");
        assert_eq!(enc(Command::Rdy(2500)), b"RDY 2500\n");
        assert_eq!(enc(Command::Fin(&id)), b"FIN 0123456789abcdef\n");
        assert_eq!(enc(Command::Req(&id, Duration::ZERO)), b"REQ 0123456789abcdef 0\n");
        assert_eq!(enc(Command::Touch(&id)), b"TOUCH 0123456789abcdef\n");
        assert_eq!(enc(Command::Cls), b"CLS\n");
        assert_eq!(enc(Command::Nop), b"NOP\n");
        let bodies = [Bytes::from_static(b"ab"), Bytes::from_static(b"c")];
        assert_eq!(
            enc(Command::Mpub(&topic, &bodies)),
            b"MPUB fixture_pub\n\x00\x00\x00\x0f\x00\x00\x00\x02\x00\x00\x00\x02ab\x00\x00\x00\x01c"
        );
    }
}
