//! Raw deflate (RFC 1951, no zlib header) over `flate2::{Compress, Decompress}`: each direction
//! is one stream that never finishes, sync-flushed after every write.

use bytes::{Buf, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::TransportError;

/// The most output one inflate step produces.
const STEP: usize = 32 * 1024;
/// The least room a step gets.
const MIN_STEP: usize = 512;

/// Inflates nsqd's stream continuously from its first byte.
pub(crate) struct Decoder {
    inflate: Decompress,
    /// The last step made progress, so the inflater may hold more output even with no input
    /// left: a long run of matches takes few input bytes, and the inflater stops at the edge of
    /// its 32 KiB window or of the room it was given, with all its input read.
    progress: bool,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deflate::Decoder")
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self { inflate: Decompress::new(false), progress: false }
    }
}

impl Decoder {
    /// Inflates from `input` into `plain` while `plain` is below `limit`, until the inflater
    /// needs more input. Returns whether it stopped for the limit instead, with input left or
    /// output the inflater may still hold.
    pub(crate) fn decode(
        &mut self,
        input: &mut BytesMut,
        plain: &mut BytesMut,
        limit: usize,
    ) -> Result<bool, TransportError> {
        // The room of each step is zeroed before the inflater writes into it: start near what
        // the input is likely to give and double while steps fill up, so a small read does not
        // pay for a whole STEP.
        let mut step = input.len().saturating_mul(4).clamp(MIN_STEP, STEP);
        loop {
            if input.is_empty() && !self.progress {
                return Ok(false);
            }
            if plain.len() >= limit {
                return Ok(true);
            }
            let start = plain.len();
            let room = step.min(limit - start).max(1);
            plain.resize(start + room, 0);
            let (in_before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
            let status = self.inflate.decompress(input, &mut plain[start..], FlushDecompress::None);
            let consumed = (self.inflate.total_in() - in_before) as usize;
            let produced = (self.inflate.total_out() - out_before) as usize;
            plain.truncate(start + produced);
            input.advance(consumed);
            match status {
                Ok(Status::StreamEnd) => {
                    return Err(TransportError::Deflate("the stream ended; nsqd never ends it".into()))
                }
                Ok(_) => {}
                Err(e) => return Err(TransportError::Deflate(e.to_string())),
            }
            if produced == room {
                step = (step * 2).min(STEP);
            }
            // Only a step that neither reads nor writes says the inflater needs more input.
            self.progress = consumed > 0 || produced > 0;
            if !self.progress {
                return Ok(false);
            }
        }
    }
}

/// Deflates our stream at the negotiated level.
pub(crate) struct Encoder {
    deflate: Compress,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deflate::Encoder")
    }
}

impl Encoder {
    pub(crate) fn new(level: u32) -> Self {
        Self { deflate: Compress::new(Compression::new(level.clamp(1, 9)), false) }
    }

    /// Appends `data` deflated and sync-flushed, so nsqd can inflate all of it at once.
    pub(crate) fn encode(&mut self, data: &[u8], out: &mut BytesMut) -> Result<(), TransportError> {
        self.encode_with_room(data, out, bound)
    }

    /// [`encode`](Self::encode), giving each call `room(input left)` bytes of output room.
    fn encode_with_room(
        &mut self,
        mut data: &[u8],
        out: &mut BytesMut,
        room: impl Fn(usize) -> usize,
    ) -> Result<(), TransportError> {
        // With room for all of it (deflate grows data by at most a few bytes per block), one
        // call compresses and flushes everything. Short of room, the compressor keeps the rest
        // and hands it out over later calls, one of which may stop short of its room before
        // the flush is done, so "room left over" proves nothing then: the calls go on until one
        // gives nothing but another empty sync block.
        let mut overflowed = false;
        loop {
            let start = out.len();
            let room = room(data.len());
            out.resize(start + room, 0);
            let (in_before, out_before) = (self.deflate.total_in(), self.deflate.total_out());
            let status = self.deflate.compress(data, &mut out[start..], FlushCompress::Sync);
            let consumed = (self.deflate.total_in() - in_before) as usize;
            let produced = (self.deflate.total_out() - out_before) as usize;
            out.truncate(start + produced);
            data = &data[consumed..];
            status.map_err(|e| TransportError::Deflate(e.to_string()))?;
            if produced == room {
                overflowed = true;
            } else if data.is_empty() && (!overflowed || out[start..] == EMPTY_SYNC_BLOCK) {
                return Ok(());
            }
        }
    }
}

/// What a sync flush adds when there is nothing to flush: an empty stored block.
const EMPTY_SYNC_BLOCK: [u8; 5] = [0, 0, 0, 0xff, 0xff];

/// Room for `len` bytes deflated and sync-flushed: stored blocks add 5 bytes per 64 KiB,
/// fixed-code blocks at most 1 bit in 8, and the flush an empty block.
fn bound(len: usize) -> usize {
    len + len / 8 + 64
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn round_trips_with_flate2_streams_and_empty_flushes() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let mut out = BytesMut::new();
        let mut enc = Encoder::new(6);
        enc.encode(&data[..1000], &mut out).unwrap();
        enc.encode(&data[1000..], &mut out).unwrap();
        let mut back = Vec::new();
        let mut reader = flate2::read::DeflateDecoder::new(&out[..]);
        let mut buf = [0u8; 8192];
        while back.len() < data.len() {
            let n = reader.read(&mut buf).unwrap();
            assert!(n > 0);
            back.extend_from_slice(&buf[..n]);
        }
        assert_eq!(back, data);

        // nsqd's side: sync flushes, several empty ones in a row.
        let mut theirs = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
        theirs.write_all(&data).unwrap();
        theirs.flush().unwrap();
        theirs.flush().unwrap();
        theirs.flush().unwrap();
        let stream = theirs.get_ref().clone();
        let mut plain = BytesMut::new();
        let mut dec = Decoder::default();
        // Fed in small pieces, as reads arrive.
        for piece in stream.chunks(777) {
            let mut input = BytesMut::from(piece);
            dec.decode(&mut input, &mut plain, usize::MAX).unwrap();
            assert!(input.is_empty());
        }
        assert_eq!(&plain[..], &data[..]);
    }

    #[test]
    fn output_held_inside_the_inflater_comes_out_without_more_input() {
        // nsqd's stream: a 6-byte frame, then a 65 KB one that deflates to about 100 bytes,
        // each sync-flushed. The inflater takes the second burst whole while filling the first
        // step and keeps the rest of its output inside; nothing more arrives to push it out.
        let mut theirs = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
        theirs.write_all(b"\0\0\0\x06\0\0\0\0OK").unwrap();
        theirs.flush().unwrap();
        let first = theirs.get_ref().len();
        let mut frame = vec![0u8; 8 + 65026];
        frame[..8].copy_from_slice(b"\0\x00\xfe\x06\0\0\0\x02");
        theirs.write_all(&frame).unwrap();
        theirs.flush().unwrap();
        let stream = theirs.get_ref().clone();
        let mut dec = Decoder::default();
        let mut plain = BytesMut::new();
        assert!(!dec.decode(&mut BytesMut::from(&stream[..first]), &mut plain, usize::MAX).unwrap());
        assert_eq!(plain.len(), 10);
        let mut plain = BytesMut::new();
        let pending = dec.decode(&mut BytesMut::from(&stream[first..]), &mut plain, usize::MAX).unwrap();
        assert!(!pending);
        assert_eq!(plain.len(), frame.len(), "the end of the burst is stuck inside the inflater");
        // Under a limit, the decoder says output is pending until it has all come out.
        let mut dec = Decoder::default();
        let mut input = BytesMut::from(&stream[..]);
        let mut total = 0;
        let mut plain = BytesMut::new();
        while dec.decode(&mut input, &mut plain, 10_000).unwrap() {
            total += plain.len();
            plain.clear();
        }
        assert_eq!(total + plain.len(), 10 + frame.len());
    }

    #[test]
    fn output_held_at_the_window_edge_comes_out_without_more_input() {
        // 65545 bytes that deflate to about 80, cut before the sync flush's last 4 bytes, as a
        // read may end: the bytes at hand hold all of the plaintext. Under a limit, the
        // inflater stops at the edge of its 32 KiB window, short of the room it was given and
        // with all its input read, yet 9 bytes are still to come out.
        let data = vec![b'a'; 65_545];
        let mut theirs = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
        theirs.write_all(&data).unwrap();
        theirs.flush().unwrap();
        let stream = theirs.get_ref();
        let mut input = BytesMut::from(&stream[..stream.len() - 4]);
        let mut dec = Decoder::default();
        let mut plain = BytesMut::new();
        let mut total = 0;
        while dec.decode(&mut input, &mut plain, 40_000).unwrap() {
            total += plain.len();
            plain.clear();
        }
        assert_eq!(total + plain.len(), data.len());
    }

    #[test]
    fn every_write_comes_out_whole_whatever_its_size() {
        // Incompressible writes: with too little room, the compressor hands its output out
        // over several calls, and one of them stops short of its room before the flush is
        // done; the end of the write stayed inside until the next one (e.g. the last 255 of
        // 32000 bytes at level 6).
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..127_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        // Short of room on purpose too: the calls after an overflow.
        let rooms: [fn(usize) -> usize; 2] = [bound, |len| len / 2 + 64];
        for room in rooms {
            for level in [1, 6, 9] {
                for len in [1, 1000, 32_000, 59_000, 127_000] {
                    let data = &noise[..len];
                    let mut enc = Encoder::new(level);
                    let mut out = BytesMut::new();
                    enc.encode_with_room(data, &mut out, room).unwrap();
                    enc.encode_with_room(b"NOP\n", &mut out, room).unwrap();
                    let mut inflater = Decompress::new(false);
                    let mut back = Vec::with_capacity(len + 1024);
                    inflater.decompress_vec(&out, &mut back, FlushDecompress::Sync).unwrap();
                    assert_eq!(back.len(), len + 4, "level {level}");
                    assert!(back[..len] == data[..] && back.ends_with(b"NOP\n"));
                }
            }
        }
    }

    #[test]
    fn output_is_bounded_and_garbage_refused() {
        let mut out = BytesMut::new();
        Encoder::new(9).encode(&vec![0u8; 1 << 20], &mut out).unwrap();
        assert!(out.len() < 4096);
        let mut plain = BytesMut::new();
        let mut dec = Decoder::default();
        assert!(dec.decode(&mut out, &mut plain, 10_000).unwrap(), "stopped for the limit");
        assert!(plain.len() <= 10_000 + STEP);
        assert!(!out.is_empty());
        let mut garbage = BytesMut::from(&b"\xff\xff\xff\xff\xff\xff"[..]);
        assert!(Decoder::default().decode(&mut garbage, &mut BytesMut::new(), usize::MAX).is_err());
    }
}
