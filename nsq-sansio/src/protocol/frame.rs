//! The size-prefixed frames nsqd sends: `[4-byte BE size][4-byte BE type][data]`.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::message::Message;
use super::MessageId;

/// Frame type of a response (`OK`, `CLOSE_WAIT`, `_heartbeat_`, JSON).
pub const FRAME_TYPE_RESPONSE: u32 = 0;
/// Frame type of an error (`E_INVALID ...`).
pub const FRAME_TYPE_ERROR: u32 = 1;
/// Frame type of a message.
pub const FRAME_TYPE_MESSAGE: u32 = 2;

/// The response nsqd sends instead of data when a command succeeded.
pub const OK: &[u8] = b"OK";
/// The response to `CLS`.
pub const CLOSE_WAIT: &[u8] = b"CLOSE_WAIT";
/// The response nsqd sends every heartbeat interval; a client answers it with `NOP`.
pub const HEARTBEAT: &[u8] = b"_heartbeat_";

/// Bytes before a frame's data: size and type.
pub const FRAME_HEADER_LEN: usize = 8;

/// One decoded server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A response: `OK`, `CLOSE_WAIT`, `_heartbeat_`, or a JSON document (IDENTIFY, AUTH).
    Response(Bytes),
    /// An error frame, parsed into its code and description.
    Error(ServerError),
    /// A message for a subscribed connection.
    Message(Message),
}

impl Frame {
    /// Whether this is the `_heartbeat_` response.
    pub fn is_heartbeat(&self) -> bool {
        matches!(self, Self::Response(data) if data.as_ref() == HEARTBEAT)
    }

    /// Appends this frame as nsqd would send it. Used by test servers and round-trip tests.
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Self::Response(data) => put_frame(buf, FRAME_TYPE_RESPONSE, &[data]),
            Self::Error(err) => {
                let code = err.code.as_str();
                if err.message.is_empty() {
                    put_frame(buf, FRAME_TYPE_ERROR, &[code.as_bytes()]);
                } else {
                    put_frame(buf, FRAME_TYPE_ERROR, &[code.as_bytes(), b" ", err.message.as_bytes()]);
                }
            }
            Self::Message(msg) => {
                let mut head = [0u8; Message::HEADER_LEN];
                head[..8].copy_from_slice(&msg.timestamp.to_be_bytes());
                head[8..10].copy_from_slice(&msg.attempts.to_be_bytes());
                head[10..].copy_from_slice(&msg.id.0);
                put_frame(buf, FRAME_TYPE_MESSAGE, &[&head, &msg.body]);
            }
        }
    }
}

fn put_frame(buf: &mut BytesMut, kind: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    buf.reserve(FRAME_HEADER_LEN + len);
    // A frame this large cannot be sent by nsqd either; saturate rather than wrap.
    buf.put_u32(u32::try_from(len + 4).unwrap_or(u32::MAX));
    buf.put_u32(kind);
    for part in parts {
        buf.put_slice(part);
    }
}

/// Why a byte stream is not a valid sequence of frames. Every variant is fatal for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The size field is larger than the negotiated limit; the frame was not buffered.
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The declared size.
        size: u32,
        /// The limit in force.
        max: u32,
    },
    /// The size field is smaller than the 4-byte frame type it must cover.
    #[error("frame size {0} is smaller than its 4-byte type")]
    TooSmall(u32),
    /// The frame type is not 0, 1 or 2.
    #[error("unknown frame type {0}")]
    UnknownType(u32),
    /// A message frame too short to hold timestamp, attempts and id.
    #[error("message frame of {0} data bytes is shorter than the 26-byte message header")]
    ShortMessage(usize),
}

/// Splits one complete frame off the front of `rx`.
///
/// Returns `Ok(None)` when `rx` holds only part of a frame; call again once more bytes arrived.
/// A size above `max_size` is refused from the 4-byte prefix alone, before anything is buffered
/// for it. Message bodies are [`Bytes`] views of `rx`'s allocation: nothing is copied.
pub fn decode(rx: &mut BytesMut, max_size: u32) -> Result<Option<Frame>, FrameError> {
    let Some(total) = frame_len(rx, max_size)? else {
        return Ok(None);
    };
    if rx.len() < total {
        rx.reserve(total - rx.len());
        return Ok(None);
    }
    let mut frame = rx.split_to(total).freeze();
    frame.advance(4);
    let kind = frame.get_u32();
    match kind {
        FRAME_TYPE_RESPONSE => Ok(Some(Frame::Response(frame))),
        FRAME_TYPE_ERROR => Ok(Some(Frame::Error(ServerError::parse(&frame)))),
        FRAME_TYPE_MESSAGE => {
            // The header in one read: timestamp, attempts, id.
            let Some(&[t0, t1, t2, t3, t4, t5, t6, t7, a0, a1, ref id @ ..]) =
                frame.first_chunk::<{ Message::HEADER_LEN }>()
            else {
                return Err(FrameError::ShortMessage(frame.len()));
            };
            let (timestamp, attempts, id) =
                (u64::from_be_bytes([t0, t1, t2, t3, t4, t5, t6, t7]), u16::from_be_bytes([a0, a1]), MessageId(*id));
            frame.advance(Message::HEADER_LEN);
            Ok(Some(Frame::Message(Message { id, timestamp, attempts, body: frame })))
        }
        other => Err(FrameError::UnknownType(other)),
    }
}

/// Appends `read`, the next bytes of the stream, to `rx` and decodes the first complete frame:
/// what `rx.unsplit(read)` and then [`decode`] give, without copying `read` after a partial frame.
///
/// `read` is taken whole without copying when `rx` is empty or `read` continues it in the same
/// allocation. When `rx` holds part of a frame, only the bytes it lacks are copied out of `read`
/// (its 4-byte size first, so a size above `max_size` is refused before the rest is copied);
/// once that frame is complete and decoded, `rx` becomes the rest of `read`, which the next
/// [`decode`] calls split in place. An `rx` still holding a whole frame is appended to as by
/// `unsplit`.
pub fn decode_joined(rx: &mut BytesMut, read: BytesMut, max_size: u32) -> Result<Option<Frame>, FrameError> {
    if rx.is_empty() {
        *rx = read;
        return decode(rx, max_size);
    }
    let mut read = match rx.try_unsplit(read) {
        Ok(()) => return decode(rx, max_size),
        Err(read) => read,
    };
    if rx.len() < 4 {
        take(rx, &mut read, 4);
    }
    let Some(total) = frame_len(rx, max_size)? else {
        return Ok(None);
    };
    if rx.len() >= total {
        // Not a partial frame: nothing to complete.
        rx.unsplit(read);
        return decode(rx, max_size);
    }
    if rx.capacity() < total {
        // Exactly the frame: its message keeps this buffer alive, not a read-sized one.
        let mut whole = BytesMut::with_capacity(total);
        whole.extend_from_slice(rx);
        *rx = whole;
    }
    take(rx, &mut read, total);
    if rx.len() < total {
        return Ok(None);
    }
    let frame = decode(rx, max_size);
    *rx = read;
    frame
}

/// Copies bytes from the front of `from` to `to` until `to` holds `len` bytes or `from` is empty.
fn take(to: &mut BytesMut, from: &mut BytesMut, len: usize) {
    let n = len.saturating_sub(to.len()).min(from.len());
    to.extend_from_slice(&from[..n]);
    from.advance(n);
}

/// The length of the frame at the front of `rx`, size prefix included, once its 4-byte size has
/// arrived; refused above `max_size`.
fn frame_len(rx: &[u8], max_size: u32) -> Result<Option<usize>, FrameError> {
    let Some(mut head) = rx.get(..4) else {
        return Ok(None);
    };
    let size = head.get_u32();
    if size > max_size {
        return Err(FrameError::TooLarge { size, max: max_size });
    }
    if size < 4 {
        return Err(FrameError::TooSmall(size));
    }
    Ok(Some(4 + size as usize))
}

/// An error frame from nsqd: `<CODE> <description>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}{}{message}", if message.is_empty() { "" } else { " " })]
pub struct ServerError {
    /// The parsed error code.
    pub code: ErrorCode,
    /// The description nsqd gave after the code (may be empty).
    pub message: String,
}

impl ServerError {
    /// Parses an error frame's data. Never fails: an unknown code becomes [`ErrorCode::Other`].
    pub fn parse(data: &[u8]) -> Self {
        let text = String::from_utf8_lossy(data);
        let (code, message) = match text.split_once(' ') {
            Some((code, message)) => (code, message),
            None => (text.as_ref(), ""),
        };
        Self { code: ErrorCode::parse(code), message: message.to_owned() }
    }

    /// Whether nsqd closes the connection after sending this error.
    ///
    /// Every nsqd error is fatal except `E_FIN_FAILED`, `E_REQ_FAILED` and `E_TOUCH_FAILED`
    /// (an id that is not in flight), which leave the connection open.
    pub fn is_fatal(&self) -> bool {
        self.code.is_fatal()
    }
}

macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $text:literal,)*) => {
        /// The code of an nsqd error frame.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
            /// A code this library does not know, kept verbatim.
            Other(String),
        }

        impl ErrorCode {
            /// Every code this library knows, as nsqd writes it.
            pub const KNOWN: &'static [&'static str] = &[$($text,)*];

            /// Parses a code such as `E_INVALID`.
            pub fn parse(code: &str) -> Self {
                match code {
                    $($text => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }

            /// The code as nsqd writes it.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)*
                    Self::Other(other) => other,
                }
            }
        }
    };
}

error_codes! {
    /// `E_INVALID`: malformed command, wrong state, or a parameter out of range.
    Invalid = "E_INVALID",
    /// `E_BAD_PROTOCOL`: the magic was not `  V2`.
    BadProtocol = "E_BAD_PROTOCOL",
    /// `E_BAD_TOPIC`: the topic name is not valid.
    BadTopic = "E_BAD_TOPIC",
    /// `E_BAD_CHANNEL`: the channel name is not valid.
    BadChannel = "E_BAD_CHANNEL",
    /// `E_BAD_MESSAGE`: a message body is empty or too big.
    BadMessage = "E_BAD_MESSAGE",
    /// `E_BAD_BODY`: a command body could not be read or decoded.
    BadBody = "E_BAD_BODY",
    /// `E_PUB_FAILED`: nsqd could not store a PUB.
    PubFailed = "E_PUB_FAILED",
    /// `E_MPUB_FAILED`: nsqd could not store an MPUB.
    MpubFailed = "E_MPUB_FAILED",
    /// `E_DPUB_FAILED`: nsqd could not store a DPUB.
    DpubFailed = "E_DPUB_FAILED",
    /// `E_FIN_FAILED`: the id was not in flight (not fatal).
    FinFailed = "E_FIN_FAILED",
    /// `E_REQ_FAILED`: the id was not in flight (not fatal).
    ReqFailed = "E_REQ_FAILED",
    /// `E_TOUCH_FAILED`: the id was not in flight (not fatal).
    TouchFailed = "E_TOUCH_FAILED",
    /// `E_IDENTIFY_FAILED`: the IDENTIFY settings were refused.
    IdentifyFailed = "E_IDENTIFY_FAILED",
    /// `E_AUTH_FAILED`: the auth server refused the secret or could not be reached.
    AuthFailed = "E_AUTH_FAILED",
    /// `E_AUTH_DISABLED`: AUTH sent to an nsqd without an auth server.
    AuthDisabled = "E_AUTH_DISABLED",
    /// `E_AUTH_FIRST`: the server requires AUTH before this command.
    AuthFirst = "E_AUTH_FIRST",
    /// `E_UNAUTHORIZED`: the identity may not do this.
    Unauthorized = "E_UNAUTHORIZED",
    /// `E_TOPIC_NOT_FOUND`.
    TopicNotFound = "E_TOPIC_NOT_FOUND",
    /// `E_CHANNEL_NOT_FOUND`.
    ChannelNotFound = "E_CHANNEL_NOT_FOUND",
}

impl ErrorCode {
    /// Whether nsqd closes the connection after an error with this code.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::FinFailed | Self::ReqFailed | Self::TouchFailed)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
