//! The input vocabulary the structured targets share, and [`Seed`]: for every input type, the
//! bytes `arbitrary` decodes back into the same value, so seed corpora can be written from
//! captured traffic.

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};

use crate::{ErrorCode, Frame, Message, MessageId, ServerError};

/// Writes the bytes that `Arbitrary::arbitrary` (or `arbitrary_take_rest`, for the last field of
/// a top-level input) turns back into `self`.
///
/// It mirrors `arbitrary` 1.x: integers little-endian, `bool` one byte, an enum variant as a
/// `u32` scaled to the variant count, a `Vec` as elements each preceded by a `1` byte and
/// followed by a `0` byte. `fuzzing::tests` checks every type against `arbitrary` itself.
pub trait Seed {
    /// Appends the encoding of `self`.
    fn seed(&self, out: &mut Vec<u8>);

    /// The encoding of `self` alone.
    fn to_seed(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.seed(&mut out);
        out
    }
}

macro_rules! seed_int {
    ($($t:ty),*) => {$(
        impl Seed for $t {
            fn seed(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
seed_int!(u8, u16, u32, u64);

impl Seed for bool {
    fn seed(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Seed> Seed for Vec<T> {
    fn seed(&self, out: &mut Vec<u8>) {
        for item in self {
            out.push(1);
            item.seed(out);
        }
        out.push(0);
    }
}

/// Writes the selector of variant `index` of an enum with `count` variants, as the derived
/// `Arbitrary` reads it: `(u64::from(u32) * count) >> 32`.
pub(crate) fn seed_variant(out: &mut Vec<u8>, index: u32, count: u32) {
    let x = (u64::from(index) << 32).div_ceil(u64::from(count));
    u32::try_from(x).unwrap_or(u32::MAX).seed(out);
}

/// Bytes behind a 2-byte little-endian length (cut to what is left of the input), so a payload
/// stays in one piece under mutation.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({:?})", Bytes::copy_from_slice(&self.0))
    }
}

impl<'a> Arbitrary<'a> for Blob {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = usize::from(u16::arbitrary(u)?).min(u.len());
        Ok(Self(u.bytes(len)?.to_vec()))
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (2, None)
    }
}

impl Seed for Blob {
    fn seed(&self, out: &mut Vec<u8>) {
        let len = u16::try_from(self.0.len()).unwrap_or(u16::MAX);
        len.seed(out);
        out.extend_from_slice(&self.0[..usize::from(len)]);
    }
}

/// The code an [`ServerFrame::Error`] with this index carries: [`ErrorCode::KNOWN`], then one
/// this library does not know, modulo their number.
pub fn error_code(index: u8) -> &'static str {
    let i = usize::from(index) % (ErrorCode::KNOWN.len() + 1);
    ErrorCode::KNOWN.get(i).copied().unwrap_or("E_SOMETHING_NEW")
}

/// One thing nsqd may send on the plaintext stream.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// The response `OK`.
    Ok,
    /// The response `_heartbeat_`.
    Heartbeat,
    /// The response `CLOSE_WAIT`.
    CloseWait,
    /// A message with the id [`ServerFrame::message_id`]`(id)`.
    Message {
        /// Index into a small id space, so ids repeat and answers can name them.
        id: u8,
        /// Delivery count.
        attempts: u16,
        /// Nanoseconds since the epoch.
        timestamp: u64,
        /// The body.
        body: Blob,
    },
    /// A message whose body is `4 × len` copies of `byte`: large frames (and compressed
    /// streams that expand a lot) from a small input.
    Run {
        /// As for [`ServerFrame::Message`].
        id: u8,
        /// The body's byte.
        byte: u8,
        /// A quarter of the body's length.
        len: u16,
    },
    /// An error frame: [`error_code`]`(code)`, then a space and the text if not empty.
    Error {
        /// See [`error_code`].
        code: u8,
        /// The description.
        text: Blob,
    },
    /// Any other response (JSON, or text nsqd never sends).
    Response(Blob),
    /// Bytes that need not be a frame: a bad size, a partial frame, garbage.
    Raw(Blob),
}

impl ServerFrame {
    const VARIANTS: u32 = 8;

    /// The 16-byte id of message number `n`: ASCII, as nsqd's ids are.
    pub fn message_id(n: u8) -> MessageId {
        let mut id = *b"0000000000000000";
        id[14..].copy_from_slice(format!("{n:02x}").as_bytes());
        MessageId(id)
    }

    /// The frame this stands for; `None` for [`ServerFrame::Raw`].
    pub fn to_frame(&self) -> Option<Frame> {
        let response = |b: &'static [u8]| Some(Frame::Response(Bytes::from_static(b)));
        match self {
            Self::Ok => response(b"OK"),
            Self::Heartbeat => response(b"_heartbeat_"),
            Self::CloseWait => response(b"CLOSE_WAIT"),
            Self::Message { id, attempts, timestamp, body } => Some(Frame::Message(Message {
                id: Self::message_id(*id),
                timestamp: *timestamp,
                attempts: *attempts,
                body: Bytes::copy_from_slice(&body.0),
            })),
            Self::Run { id, byte, len } => Some(Frame::Message(Message {
                id: Self::message_id(*id),
                timestamp: 0,
                attempts: 1,
                body: Bytes::from(vec![*byte; 4 * usize::from(*len)]),
            })),
            Self::Error { code, text } => Some(Frame::Error(ServerError {
                code: ErrorCode::parse(error_code(*code)),
                message: String::from_utf8_lossy(&text.0).into_owned(),
            })),
            Self::Response(data) => Some(Frame::Response(Bytes::copy_from_slice(&data.0))),
            Self::Raw(_) => None,
        }
    }

    /// Appends the wire bytes.
    pub fn encode(&self, out: &mut BytesMut) {
        match (self, self.to_frame()) {
            (Self::Raw(bytes), _) => out.extend_from_slice(&bytes.0),
            (_, Some(frame)) => frame.encode(out),
            (_, None) => {}
        }
    }

    /// What a decoded frame is as a `ServerFrame`, with message ids mapped through `ids`
    /// (an id not in it is appended; `None` once 256 are taken). A body over 4 KiB becomes a
    /// [`ServerFrame::Run`] of about its length.
    pub fn from_frame(frame: &Frame, ids: &mut Vec<MessageId>) -> Option<Self> {
        Some(match frame {
            Frame::Response(data) if data.as_ref() == b"OK" => Self::Ok,
            Frame::Response(data) if data.as_ref() == b"_heartbeat_" => Self::Heartbeat,
            Frame::Response(data) if data.as_ref() == b"CLOSE_WAIT" => Self::CloseWait,
            Frame::Response(data) => Self::Response(Blob(data.to_vec())),
            Frame::Error(err) => {
                let code =
                    ErrorCode::KNOWN.iter().position(|c| *c == err.code.as_str()).unwrap_or(ErrorCode::KNOWN.len());
                Self::Error { code: u8::try_from(code).ok()?, text: Blob(err.message.clone().into_bytes()) }
            }
            Frame::Message(m) => {
                let index = match ids.iter().position(|id| *id == m.id) {
                    Some(i) => i,
                    None => {
                        ids.push(m.id);
                        ids.len() - 1
                    }
                };
                let id = u8::try_from(index).ok()?;
                if m.body.len() > 4096 {
                    // A large body as a run of as many bytes, keeping the input small.
                    let len = u16::try_from(m.body.len() / 4).unwrap_or(u16::MAX);
                    return Some(Self::Run { id, byte: m.body[0], len });
                }
                Self::Message { id, attempts: m.attempts, timestamp: m.timestamp, body: Blob(m.body.to_vec()) }
            }
        })
    }
}

impl Seed for ServerFrame {
    fn seed(&self, out: &mut Vec<u8>) {
        let index = match self {
            Self::Ok => 0,
            Self::Heartbeat => 1,
            Self::CloseWait => 2,
            Self::Message { .. } => 3,
            Self::Run { .. } => 4,
            Self::Error { .. } => 5,
            Self::Response(_) => 6,
            Self::Raw(_) => 7,
        };
        seed_variant(out, index, Self::VARIANTS);
        match self {
            Self::Ok | Self::Heartbeat | Self::CloseWait => {}
            Self::Message { id, attempts, timestamp, body } => {
                id.seed(out);
                attempts.seed(out);
                timestamp.seed(out);
                body.seed(out);
            }
            Self::Run { id, byte, len } => {
                id.seed(out);
                byte.seed(out);
                len.seed(out);
            }
            Self::Error { code, text } => {
                code.seed(out);
                text.seed(out);
            }
            Self::Response(b) | Self::Raw(b) => b.seed(out),
        }
    }
}

/// Splits `bytes` into reads of `size` bytes (`0`: one read).
pub(crate) fn reads(bytes: &[u8], size: u16) -> impl Iterator<Item = &[u8]> {
    let size = if size == 0 { bytes.len().max(1) } else { usize::from(size) };
    bytes.chunks(size)
}

/// Decodes every frame of `stream` and checks that each re-encodes to the bytes it came from
/// (an error frame's text, which is decoded lossily and split at its first space, only when
/// that is reversible). Returns the frames and how many bytes they took.
pub(crate) fn check_frames(stream: &[u8], max_size: u32) -> (Vec<Frame>, usize) {
    let mut rx = BytesMut::from(stream);
    let mut frames = Vec::new();
    let mut at = 0;
    let mut again = BytesMut::new();
    while let Ok(Some(frame)) = crate::decode(&mut rx, max_size) {
        let used = stream.len() - rx.len() - at;
        let original = &stream[at..at + used];
        again.clear();
        frame.encode(&mut again);
        if let Frame::Error(_) = &frame {
            let data = &original[crate::FRAME_HEADER_LEN..];
            let reversible =
                std::str::from_utf8(data).is_ok_and(|t| t.split_once(' ').is_none_or(|(_, m)| !m.is_empty()));
            if reversible {
                assert_eq!(&again[..], original, "an error frame did not re-encode to its bytes");
            }
            // Whatever the text, the re-encoded frame decodes to the same frame.
            assert_eq!(crate::decode(&mut again, u32::MAX).ok().flatten().as_ref(), Some(&frame));
        } else {
            assert_eq!(&again[..], original, "{frame:?} did not re-encode to its bytes");
        }
        at += used;
        frames.push(frame);
    }
    (frames, at)
}
