//! The snappy and deflate decoders fed arbitrary bytes in arbitrary chunks.

use bytes::BytesMut;

use crate::transport::{deflate, snappy};

/// The output limit the fuzzed decoders must respect.
const LIMIT: usize = 4096;

fn chunks(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    // The first byte picks the chunk size, so the fuzzer explores read cuts too.
    let size = usize::from(data.first().copied().unwrap_or(1)).max(1);
    data.get(1..).unwrap_or(&[]).chunks(size)
}

/// snappy framing: never panics, never writes past the limit by more than one block.
pub fn snappy(data: &[u8]) {
    let mut dec = snappy::Decoder::default();
    let mut input = BytesMut::new();
    for chunk in chunks(data) {
        input.extend_from_slice(chunk);
        let mut plain = BytesMut::new();
        match dec.decode(&mut input, &mut plain, LIMIT) {
            Ok(_) => assert!(plain.len() <= LIMIT + snappy::MAX_BLOCK),
            Err(_) => return,
        }
    }
}

/// raw deflate: never panics, never writes past the limit.
pub fn deflate(data: &[u8]) {
    let mut dec = deflate::Decoder::default();
    let mut input = BytesMut::new();
    for chunk in chunks(data) {
        input.extend_from_slice(chunk);
        let mut plain = BytesMut::new();
        match dec.decode(&mut input, &mut plain, LIMIT) {
            Ok(_) => assert!(plain.len() <= LIMIT),
            Err(_) => return,
        }
    }
}
