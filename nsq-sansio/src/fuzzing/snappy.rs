//! The snappy framing decoder fed valid framed streams built from arbitrary chunks, a chosen
//! few of them damaged on purpose, so mutation reaches the decoder behind the stream
//! identifier and the CRCs.

use std::io::Read;

use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;

use super::input::{reads, seed_variant, Blob, Seed};
use crate::transport::snappy::{masked_crc, Decoder, MAX_BLOCK};

/// The most plaintext an input's chunks carry: four full blocks.
const MAX_PLAINTEXT: usize = 4 * MAX_BLOCK;

/// The longest chunk the decoder accepts (a compressed one).
fn max_chunk() -> usize {
    4 + 4 + snap::raw::max_compress_len(MAX_BLOCK)
}

/// A framed stream, cut into reads and decoded under a plaintext budget.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// How the stream starts: `0` without the identifier, `1` with a damaged one, else with it.
    pub start: u8,
    /// Bytes per read (`0`: one read).
    pub read: u16,
    /// The plaintext budget of each decode call (at least 1).
    pub limit: u16,
    /// The chunks after the identifier.
    pub chunks: Vec<Chunk>,
}

/// One framing chunk, from its payload.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// What the chunk is.
    pub kind: Kind,
    /// Its plaintext (or, for some kinds, its payload).
    pub data: Blob,
    /// Damage done to its bytes, if any.
    pub fault: Fault,
}

/// The chunk types of the framing format, and what is not a chunk.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Type 0: `data` compressed with the raw snappy codec.
    Compressed,
    /// Type 1: `data` as is.
    Uncompressed,
    /// Type 0xfe: padding, `data` as payload.
    Padding,
    /// Types 0x80..=0xfd: skippable, `data` as payload.
    Skippable(u8),
    /// Type 0xff: the stream identifier again (`data` unused).
    Identifier,
    /// Type 0: `data` taken as raw snappy bytes, with the CRC of what they decode to.
    RawCompressed,
    /// Types 0x02..=0x7f: reserved and unskippable, `data` as payload.
    Reserved(u8),
    /// `data` verbatim, not a chunk.
    Garbage,
    /// Type 0: `len + 1` copies of `byte` compressed (`data` unused): full-size blocks from a
    /// small input.
    Run {
        /// The byte.
        byte: u8,
        /// One less than the plaintext's length.
        len: u16,
    },
}

impl Kind {
    const VARIANTS: u32 = 9;
}

/// Damage to one chunk's bytes. About one chunk in thirteen is damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// None.
    None,
    /// XOR into the CRC field (or the payload's first bytes where there is no CRC).
    Crc(u32),
    /// XOR `xor` into the byte at `at` modulo the chunk length.
    Flip {
        /// Position.
        at: u16,
        /// Mask.
        xor: u8,
    },
    /// A different 24-bit length field.
    Length(u32),
    /// The stream ends after `n` modulo the chunk length bytes of this chunk.
    Truncate(u16),
}

impl<'a> Arbitrary<'a> for Fault {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u8::arbitrary(u)? {
            0..=7 => Self::Crc(u.arbitrary()?),
            8..=11 => Self::Flip { at: u.arbitrary()?, xor: u.arbitrary()? },
            12..=15 => Self::Length(u.arbitrary()?),
            16..=19 => Self::Truncate(u.arbitrary()?),
            _ => Self::None,
        })
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (1, Some(5))
    }
}

impl Seed for Fault {
    fn seed(&self, out: &mut Vec<u8>) {
        match *self {
            Self::None => out.push(255),
            Self::Crc(x) => {
                out.push(0);
                x.seed(out);
            }
            Self::Flip { at, xor } => {
                out.push(8);
                at.seed(out);
                xor.seed(out);
            }
            Self::Length(n) => {
                out.push(12);
                n.seed(out);
            }
            Self::Truncate(n) => {
                out.push(16);
                n.seed(out);
            }
        }
    }
}

impl Seed for Kind {
    fn seed(&self, out: &mut Vec<u8>) {
        let index = match self {
            Self::Compressed => 0,
            Self::Uncompressed => 1,
            Self::Padding => 2,
            Self::Skippable(_) => 3,
            Self::Identifier => 4,
            Self::RawCompressed => 5,
            Self::Reserved(_) => 6,
            Self::Garbage => 7,
            Self::Run { .. } => 8,
        };
        seed_variant(out, index, Self::VARIANTS);
        match self {
            Self::Skippable(b) | Self::Reserved(b) => b.seed(out),
            Self::Run { byte, len } => {
                byte.seed(out);
                len.seed(out);
            }
            _ => {}
        }
    }
}

impl Seed for Chunk {
    fn seed(&self, out: &mut Vec<u8>) {
        self.kind.seed(out);
        self.data.seed(out);
        self.fault.seed(out);
    }
}

impl Seed for Input {
    fn seed(&self, out: &mut Vec<u8>) {
        self.start.seed(out);
        self.read.seed(out);
        self.limit.seed(out);
        self.chunks.seed(out);
    }
}

/// What decoding the built stream must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Every chunk decodes; nothing is left over.
    Complete,
    /// The stream stops inside a chunk: no error, the partial chunk waits.
    Partial,
    /// The decoder refuses the stream.
    Error,
    /// Damage of unknown effect: only the plaintext before it is certain.
    Unknown,
}

/// The stream and what it must decode to.
struct Built {
    stream: Vec<u8>,
    /// The plaintext of the chunks before the first one that is not plain sailing.
    expected: Vec<u8>,
    outcome: Outcome,
}

fn chunk(kind: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes();
    let mut c = vec![kind, len[0], len[1], len[2]];
    c.extend_from_slice(payload);
    c
}

fn with_crc(kind: u8, plain: &[u8], data: &[u8]) -> Vec<u8> {
    let mut payload = masked_crc(plain).to_le_bytes().to_vec();
    payload.extend_from_slice(data);
    chunk(kind, &payload)
}

fn build(input: &Input) -> Built {
    let mut b = Built { stream: Vec::new(), expected: Vec::new(), outcome: Outcome::Complete };
    let mut seen_identifier = true;
    match input.start {
        0 => seen_identifier = false,
        1 => {
            b.stream.extend_from_slice(b"\xff\x06\x00\x00sNaPpX");
            b.outcome = Outcome::Error;
        }
        _ => b.stream.extend_from_slice(b"\xff\x06\x00\x00sNaPpY"),
    }
    let mut encoder = snap::raw::Encoder::new();
    let mut decoder = snap::raw::Decoder::new();
    let mut total = 0;
    for c in &input.chunks {
        let data = &c.data.0;
        total += match c.kind {
            Kind::Run { len, .. } => usize::from(len) + 1,
            _ => data.len(),
        };
        if total > MAX_PLAINTEXT {
            // Compressing and checking more would cost more than it finds.
            break;
        }
        // The bytes, the plaintext they carry when intact, whether they must be refused when
        // intact, and whether they have a CRC.
        let (mut bytes, plain, refused, crc) = match c.kind {
            Kind::Compressed => match encoder.compress_vec(data) {
                Ok(z) => (with_crc(0x00, data, &z), data.clone(), false, true),
                Err(_) => continue,
            },
            Kind::Uncompressed => (with_crc(0x01, data, data), data.clone(), false, true),
            Kind::Run { byte, len } => {
                let plain = vec![byte; usize::from(len) + 1];
                match encoder.compress_vec(&plain) {
                    Ok(z) => (with_crc(0x00, &plain, &z), plain, false, true),
                    Err(_) => continue,
                }
            }
            Kind::Padding => (chunk(0xfe, data), Vec::new(), false, false),
            Kind::Skippable(t) => (chunk(0x80 + t % 0x7e, data), Vec::new(), false, false),
            Kind::Identifier => (chunk(0xff, b"sNaPpY"), Vec::new(), false, false),
            Kind::RawCompressed => {
                let fits = snap::raw::decompress_len(data).is_ok_and(|n| n <= MAX_BLOCK);
                match fits.then(|| decoder.decompress_vec(data)) {
                    Some(Ok(plain)) => (with_crc(0x00, &plain, data), plain, false, true),
                    _ => (with_crc(0x00, &[], data), Vec::new(), true, true),
                }
            }
            Kind::Reserved(t) => (chunk(0x02 + t % 0x7e, data), Vec::new(), true, false),
            Kind::Garbage => {
                b.stream.extend_from_slice(data);
                if !data.is_empty() && b.outcome == Outcome::Complete {
                    b.outcome = Outcome::Unknown;
                }
                continue;
            }
        };
        let kind = bytes[0];
        // Refused from the header alone: a reserved type, or anything before the identifier.
        let header_refused = matches!(c.kind, Kind::Reserved(_)) || (!seen_identifier && kind != 0xff);
        let mut plain = plain;
        let mut effect = if refused || header_refused { Outcome::Error } else { Outcome::Complete };
        let mut stop = false;
        match c.fault {
            Fault::None => {}
            Fault::Crc(x) => {
                let x = if x == 0 { 1 } else { x };
                let field = 4..8.min(bytes.len());
                for (i, byte) in bytes[field].iter_mut().enumerate() {
                    *byte ^= x.to_le_bytes()[i];
                }
                // A CRC mismatch and a damaged identifier are refused; other payloads are
                // skipped unread.
                if crc || kind == 0xff {
                    effect = Outcome::Error;
                }
            }
            Fault::Flip { at, xor } => {
                let at = usize::from(at) % bytes.len();
                bytes[at] ^= xor;
                if xor != 0 {
                    effect = Outcome::Unknown;
                }
            }
            Fault::Length(n) => {
                let n = (n & 0x00ff_ffff).to_le_bytes();
                if bytes[1..4] != n[..3] {
                    bytes[1..4].copy_from_slice(&n[..3]);
                    effect = Outcome::Unknown;
                }
            }
            Fault::Truncate(n) => {
                let keep = usize::from(n) % bytes.len();
                bytes.truncate(keep);
                stop = true;
                plain.clear();
                effect = if keep == 0 {
                    Outcome::Complete
                } else if header_refused && keep >= 4 {
                    Outcome::Error
                } else {
                    Outcome::Partial
                };
            }
        }
        b.stream.extend_from_slice(&bytes);
        if b.outcome == Outcome::Complete {
            match effect {
                Outcome::Complete => b.expected.extend_from_slice(&plain),
                other => b.outcome = other,
            }
        }
        if kind == 0xff {
            seen_identifier = true;
        }
        if stop {
            break;
        }
    }
    b
}

/// Whether `input` starts with a whole chunk (by its length field).
fn whole_chunk(input: &[u8]) -> bool {
    match input {
        [_, a, b, c, rest @ ..] => rest.len() >= (usize::from(*a) | usize::from(*b) << 8 | usize::from(*c) << 16),
        _ => false,
    }
}

/// Builds the stream, decodes it read by read under the budget, and checks the plaintext, the
/// outcome, the decoder's bounds, and agreement with `snap`'s own frame decoder.
pub fn snappy(input: Input) {
    let built = build(&input);
    let limit = usize::from(input.limit).max(1);
    let mut dec = Decoder::default();
    let mut buf = BytesMut::new();
    let mut plain = BytesMut::new();
    let mut out = Vec::new();
    let mut failed = false;
    'reads: for piece in reads(&built.stream, input.read) {
        buf.extend_from_slice(piece);
        loop {
            plain.clear();
            let result = dec.decode(&mut buf, &mut plain, limit);
            // A chunk is decoded only while the plaintext is below the budget.
            assert!(plain.len() < limit + MAX_BLOCK, "{} bytes out of a {limit} budget", plain.len());
            out.extend_from_slice(&plain);
            match result {
                Ok(true) => {
                    assert!(plain.len() >= limit, "stopped below the budget");
                    assert!(whole_chunk(&buf), "stopped for the budget with no chunk waiting");
                }
                Ok(false) => {
                    assert!(!whole_chunk(&buf), "a whole chunk left undecoded");
                    assert!(buf.len() < max_chunk(), "{} bytes buffered", buf.len());
                    break;
                }
                Err(_) => {
                    failed = true;
                    break 'reads;
                }
            }
        }
    }
    match built.outcome {
        Outcome::Complete => {
            assert!(!failed, "a valid stream was refused");
            assert_eq!(out, built.expected);
            assert!(buf.is_empty());
        }
        Outcome::Partial => {
            assert!(!failed, "a valid partial stream was refused");
            assert_eq!(out, built.expected);
            assert!(!buf.is_empty());
        }
        Outcome::Error => {
            assert!(failed, "a bad stream was accepted");
            assert_eq!(out, built.expected);
        }
        Outcome::Unknown => assert!(out.starts_with(&built.expected), "the plaintext before the damage changed"),
    }
    if !failed && buf.is_empty() {
        // A stream accepted whole is one snap's reference decoder accepts, with the same bytes.
        let mut theirs = Vec::new();
        let read = snap::read::FrameDecoder::new(&built.stream[..]).read_to_end(&mut theirs);
        assert!(read.is_ok(), "snap refuses a stream we accept: {read:?}");
        assert_eq!(theirs, out, "snap decodes the stream differently");
    }
}
