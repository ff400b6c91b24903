//! A message as nsqd delivers it.

use bytes::Bytes;

use super::MessageId;

/// One message delivered by nsqd: `[8-byte timestamp][2-byte attempts][16-byte id][body]`.
///
/// The body is a [`Bytes`] view of the connection's read buffer: decoding copies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The id to answer with FIN, REQ or TOUCH.
    pub id: MessageId,
    /// Nanoseconds since the Unix epoch at which nsqd first received the message.
    pub timestamp: u64,
    /// How many times nsqd has delivered this message, this delivery included (starts at 1).
    pub attempts: u16,
    /// The payload.
    pub body: Bytes,
}

impl Message {
    /// Bytes of a message frame's data before the body: timestamp, attempts and id.
    pub const HEADER_LEN: usize = 8 + 2 + 16;
}
