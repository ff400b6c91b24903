//! The frame decoder on arbitrary bytes, whole and cut into reads.

use bytes::BytesMut;

use super::input::{check_frames, reads};
use crate::{Frame, FrameError};

/// `data[0]`: read size (0: one read); `data[1]`: the frame size limit (0: 1 MiB, else
/// `4 + n²`); the rest: the stream.
///
/// Every decoded frame re-encodes to its bytes, and decoding read by read yields the same frames
/// and the same error, at the same place, as decoding the whole stream at once: reads appended
/// to one buffer, and reads in their own buffers joined by `decode_joined`.
pub fn frame(data: &[u8]) {
    let (read, max, stream) = match data {
        [read, max, stream @ ..] => {
            let max = if *max == 0 { 1 << 20 } else { 4 + u32::from(*max) * u32::from(*max) };
            (u16::from(*read), max, stream)
        }
        _ => return,
    };
    let (frames, used) = check_frames(stream, max);
    let whole_error = {
        let mut rest = BytesMut::from(&stream[used..]);
        crate::decode(&mut rest, max).err()
    };

    let mut rx = BytesMut::new();
    let mut got: Vec<Frame> = Vec::new();
    let mut error = None;
    'reads: for piece in reads(stream, read) {
        rx.extend_from_slice(piece);
        loop {
            match crate::decode(&mut rx, max) {
                Ok(Some(frame)) => got.push(frame),
                Ok(None) => {
                    // Only a partial frame is left, never more than one frame's worth.
                    assert!(rx.len() < 4 || rx.len() < 4 + u32::from_be_bytes([rx[0], rx[1], rx[2], rx[3]]) as usize);
                    break;
                }
                Err(e) => {
                    error = Some(e);
                    break 'reads;
                }
            }
        }
    }
    assert_eq!(got, frames, "read cuts changed the frames");
    assert_eq!(error, whole_error, "read cuts changed the error");

    let (got, error) = joined(stream, read, max);
    assert_eq!(got, frames, "joining reads changed the frames");
    assert_eq!(error, whole_error, "joining reads changed the error");
}

/// Decodes `stream` read by read, each read in its own buffer, through `decode_joined`.
fn joined(stream: &[u8], read: u16, max: u32) -> (Vec<Frame>, Option<FrameError>) {
    let mut rx = BytesMut::new();
    let mut got = Vec::new();
    for piece in reads(stream, read) {
        let mut next = crate::decode_joined(&mut rx, BytesMut::from(piece), max);
        loop {
            match next {
                Ok(Some(frame)) => got.push(frame),
                Ok(None) => break,
                Err(e) => return (got, Some(e)),
            }
            next = crate::decode(&mut rx, max);
        }
        // Only a partial frame is left, never more than one frame's worth.
        assert!(rx.len() < 4 || rx.len() < 4 + u32::from_be_bytes([rx[0], rx[1], rx[2], rx[3]]) as usize);
    }
    (got, None)
}
