//! The snappy framing format nsqd speaks, over `snap::raw` (block) codecs.
//!
//! A stream starts with the identifier chunk `ff 06 00 00 sNaPpY`; then each chunk is
//! `[type][3-byte LE length][4-byte LE masked CRC32C of the uncompressed data][data]`, type 0
//! compressed, 1 uncompressed, 0x80..=0xfe skippable. Chunk boundaries are not frame
//! boundaries.

use bytes::{Buf, BufMut, BytesMut};

use super::TransportError;

/// The largest uncompressed payload of one chunk, per the framing format.
pub(crate) const MAX_BLOCK: usize = 65536;
const STREAM_IDENTIFIER: &[u8] = b"\xff\x06\x00\x00sNaPpY";
const COMPRESSED: u8 = 0x00;
const UNCOMPRESSED: u8 = 0x01;
const IDENTIFIER: u8 = 0xff;

/// Decodes the framing format incrementally.
#[derive(Default)]
pub(crate) struct Decoder {
    raw: snap::raw::Decoder,
    seen_identifier: bool,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("snappy::Decoder").field("seen_identifier", &self.seen_identifier).finish()
    }
}

impl Decoder {
    /// Decodes whole chunks from `input` into `plain` while `plain` is below `limit`. Returns
    /// whether it stopped for the limit with a complete chunk still waiting.
    pub(crate) fn decode(
        &mut self,
        input: &mut BytesMut,
        plain: &mut BytesMut,
        limit: usize,
    ) -> Result<bool, TransportError> {
        loop {
            let Some(header) = input.get(..4) else {
                return Ok(false);
            };
            let kind = header[0];
            let len = usize::from(header[1]) | usize::from(header[2]) << 8 | usize::from(header[3]) << 16;
            if !self.seen_identifier && kind != IDENTIFIER {
                return Err(TransportError::Snappy("stream does not start with the stream identifier".into()));
            }
            let max_len = match kind {
                COMPRESSED => 4 + snap::raw::max_compress_len(MAX_BLOCK),
                UNCOMPRESSED => 4 + MAX_BLOCK,
                IDENTIFIER => 6,
                0x02..=0x7f => {
                    return Err(TransportError::Snappy(format!("reserved unskippable chunk type {kind:#04x}")))
                }
                _ => 4 + snap::raw::max_compress_len(MAX_BLOCK),
            };
            if len > max_len {
                return Err(TransportError::Snappy(format!("chunk of {len} bytes exceeds {max_len}")));
            }
            if input.len() < 4 + len {
                input.reserve(4 + len - input.len());
                return Ok(false);
            }
            if plain.len() >= limit && matches!(kind, COMPRESSED | UNCOMPRESSED) {
                return Ok(true);
            }
            input.advance(4);
            let chunk = input.split_to(len);
            match kind {
                IDENTIFIER => {
                    if &chunk[..] != b"sNaPpY" {
                        return Err(TransportError::Snappy("bad stream identifier".into()));
                    }
                    self.seen_identifier = true;
                }
                COMPRESSED | UNCOMPRESSED => {
                    if chunk.len() < 4 {
                        return Err(TransportError::Snappy("chunk shorter than its checksum".into()));
                    }
                    let expected = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    let data = &chunk[4..];
                    let start = plain.len();
                    if kind == COMPRESSED {
                        let n = snap::raw::decompress_len(data).map_err(|e| TransportError::Snappy(e.to_string()))?;
                        if n > MAX_BLOCK {
                            return Err(TransportError::Snappy(format!(
                                "chunk decompresses to {n} > {MAX_BLOCK} bytes"
                            )));
                        }
                        plain.resize(start + n, 0);
                        let written = self
                            .raw
                            .decompress(data, &mut plain[start..])
                            .map_err(|e| TransportError::Snappy(e.to_string()));
                        match written {
                            Ok(w) => plain.truncate(start + w),
                            Err(e) => {
                                plain.truncate(start);
                                return Err(e);
                            }
                        }
                    } else {
                        plain.extend_from_slice(data);
                    }
                    if masked_crc(&plain[start..]) != expected {
                        plain.truncate(start);
                        return Err(TransportError::Snappy("checksum mismatch".into()));
                    }
                }
                // Padding and reserved skippable chunks.
                _ => {}
            }
        }
    }
}

/// Encodes into the framing format; the stream identifier goes first.
pub(crate) struct Encoder {
    raw: snap::raw::Encoder,
    scratch: Vec<u8>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self { raw: snap::raw::Encoder::new(), scratch: Vec::new() }
    }
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("snappy::Encoder")
    }
}

impl Encoder {
    /// Appends the stream identifier; call once, before any data.
    pub(crate) fn start(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(STREAM_IDENTIFIER);
    }

    /// Appends `data` as chunks of at most 64 KiB, compressed when that saves at least 12.5%
    /// (as golang/snappy, which nsqd uses, decides).
    pub(crate) fn encode(&mut self, data: &[u8], out: &mut BytesMut) -> Result<(), TransportError> {
        for block in data.chunks(MAX_BLOCK) {
            let crc = masked_crc(block);
            self.scratch.resize(snap::raw::max_compress_len(block.len()), 0);
            let n = self.raw.compress(block, &mut self.scratch).map_err(|e| TransportError::Snappy(e.to_string()))?;
            let (kind, payload) = if n < block.len() - block.len() / 8 {
                (COMPRESSED, &self.scratch[..n])
            } else {
                (UNCOMPRESSED, block)
            };
            let len = 4 + payload.len();
            out.reserve(4 + len);
            out.put_u8(kind);
            out.put_slice(&(len as u32).to_le_bytes()[..3]);
            out.put_u32_le(crc);
            out.put_slice(payload);
        }
        Ok(())
    }
}

/// CRC32C of `data`, masked as the framing format requires.
pub(crate) fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_snap_frame_codecs() {
        use std::io::{Read, Write};
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = BytesMut::new();
        let mut enc = Encoder::default();
        enc.start(&mut out);
        enc.encode(&data, &mut out).unwrap();
        let mut back = Vec::new();
        snap::read::FrameDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);

        let mut theirs = Vec::new();
        snap::write::FrameEncoder::new(&mut theirs).write_all(&data).unwrap();
        let mut input = BytesMut::from(&theirs[..]);
        let mut plain = BytesMut::new();
        let mut dec = Decoder::default();
        assert!(!dec.decode(&mut input, &mut plain, usize::MAX).unwrap());
        assert_eq!(&plain[..], &data[..]);
    }

    #[test]
    fn refuses_bad_streams() {
        let mut good = BytesMut::new();
        let mut enc = Encoder::default();
        enc.start(&mut good);
        enc.encode(b"hello hello hello hello", &mut good).unwrap();
        // Missing identifier.
        let mut input = BytesMut::from(&good[10..]);
        assert!(Decoder::default().decode(&mut input, &mut BytesMut::new(), usize::MAX).is_err());
        // Bad CRC.
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let mut input = bad;
        assert!(Decoder::default().decode(&mut input, &mut BytesMut::new(), usize::MAX).is_err());
        // Reserved unskippable chunk.
        let mut input = BytesMut::from(&b"\xff\x06\x00\x00sNaPpY\x02\x01\x00\x00x"[..]);
        assert!(Decoder::default().decode(&mut input, &mut BytesMut::new(), usize::MAX).is_err());
        // Oversized chunk length, refused before buffering.
        let mut input = BytesMut::from(&b"\xff\x06\x00\x00sNaPpY\x00\xff\xff\xff"[..]);
        assert!(Decoder::default().decode(&mut input, &mut BytesMut::new(), usize::MAX).is_err());
        // Padding is skipped.
        let mut input = BytesMut::from(&b"\xff\x06\x00\x00sNaPpY\xfe\x02\x00\x00\x00\x00"[..]);
        assert!(!Decoder::default().decode(&mut input, &mut BytesMut::new(), usize::MAX).unwrap());
    }

    #[test]
    fn output_is_bounded_by_the_limit() {
        let mut stream = BytesMut::new();
        let mut enc = Encoder::default();
        enc.start(&mut stream);
        enc.encode(&vec![0u8; 10 * MAX_BLOCK], &mut stream).unwrap();
        assert!(stream.len() < MAX_BLOCK, "zeros compress well: {}", stream.len());
        let mut plain = BytesMut::new();
        let mut dec = Decoder::default();
        assert!(dec.decode(&mut stream, &mut plain, 1000).unwrap(), "stopped for the limit");
        assert_eq!(plain.len(), MAX_BLOCK, "one chunk past the limit at most");
        plain.clear();
        assert!(dec.decode(&mut stream, &mut plain, usize::MAX).is_ok());
        assert_eq!(plain.len(), 9 * MAX_BLOCK);
    }
}
