//! Raw deflate (RFC 1951, no zlib header) over `flate2::{Compress, Decompress}`: each direction
//! is one stream that never finishes, sync-flushed after every write.

use bytes::{Buf, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::TransportError;

/// Output produced per inflate step.
const STEP: usize = 32 * 1024;

/// Inflates nsqd's stream continuously from its first byte.
pub(crate) struct Decoder {
    inflate: Decompress,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deflate::Decoder")
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self { inflate: Decompress::new(false) }
    }
}

impl Decoder {
    /// Inflates from `input` into `plain` while `plain` is below `limit`. Returns whether it
    /// stopped for the limit with input left.
    pub(crate) fn decode(
        &mut self,
        input: &mut BytesMut,
        plain: &mut BytesMut,
        limit: usize,
    ) -> Result<bool, TransportError> {
        while !input.is_empty() {
            if plain.len() >= limit {
                return Ok(true);
            }
            let start = plain.len();
            let room = STEP.min(limit - start).max(1);
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
            if consumed == 0 && produced == 0 {
                // Needs more input (a partial block).
                return Ok(false);
            }
        }
        Ok(false)
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
    pub(crate) fn encode(&mut self, mut data: &[u8], out: &mut BytesMut) -> Result<(), TransportError> {
        loop {
            let start = out.len();
            let room = data.len() / 2 + 64;
            out.resize(start + room, 0);
            let (in_before, out_before) = (self.deflate.total_in(), self.deflate.total_out());
            let status = self.deflate.compress(data, &mut out[start..], FlushCompress::Sync);
            let consumed = (self.deflate.total_in() - in_before) as usize;
            let produced = (self.deflate.total_out() - out_before) as usize;
            out.truncate(start + produced);
            data = &data[consumed..];
            status.map_err(|e| TransportError::Deflate(e.to_string()))?;
            // Done once all input is in and the flush did not fill the space it was given.
            if data.is_empty() && produced < room {
                return Ok(());
            }
        }
    }
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
