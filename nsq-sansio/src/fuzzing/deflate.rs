//! The deflate decoder: on arbitrary bytes, and on valid streams compressed from arbitrary
//! frames with the flushes nsqd and others use, a chosen few damaged on purpose.

use arbitrary::{Arbitrary, Unstructured};
use bytes::BytesMut;
use flate2::{Compress, Compression, FlushCompress};

use super::input::{check_frames, reads, seed_variant, Seed, ServerFrame};
use crate::transport::deflate::Decoder;

/// What one run of the decoder gave.
struct Decoded {
    out: Vec<u8>,
    failed: bool,
}

/// Feeds `stream` read by read to a fresh decoder with `limit` bytes of plaintext per call, and
/// checks the decoder's bounds on every call.
fn decode(stream: &[u8], read: u16, limit: usize) -> Decoded {
    let mut dec = Decoder::default();
    let mut buf = BytesMut::new();
    let mut plain = BytesMut::new();
    let mut d = Decoded { out: Vec::new(), failed: false };
    'reads: for piece in reads(stream, read) {
        buf.extend_from_slice(piece);
        loop {
            plain.clear();
            let result = dec.decode(&mut buf, &mut plain, limit);
            assert!(plain.len() <= limit, "{} bytes out of a {limit} budget", plain.len());
            d.out.extend_from_slice(&plain);
            match result {
                // Input may be left, or output inside the inflater.
                Ok(true) => assert!(plain.len() >= limit, "stopped below the budget"),
                Ok(false) => {
                    assert!(buf.is_empty(), "{} bytes left undecoded", buf.len());
                    break;
                }
                Err(_) => {
                    d.failed = true;
                    break 'reads;
                }
            }
        }
    }
    d
}

/// The budget per decode call: `1 + 16n`, but at least 1/256 of the plaintext, so a stream that
/// expands a thousandfold takes a bounded number of calls.
fn budget(n: usize, plaintext: usize) -> usize {
    (1 + 16 * n).max(plaintext / 256)
}

/// `data[0]`: read size (0: one read); `data[1]`: the budget per call (see `budget`); the
/// rest: the stream.
///
/// Decoding read by read under the budget gives what decoding the whole stream at once does.
pub fn raw(data: &[u8]) {
    let [read, limit, stream @ ..] = data else {
        return;
    };
    let whole = decode(stream, 0, usize::MAX);
    let cut = decode(stream, u16::from(*read), budget(usize::from(*limit), whole.out.len()));
    assert_eq!(cut.failed, whole.failed, "read cuts or the budget changed the outcome");
    if cut.failed {
        // The bytes produced before the error may differ by what one call had at hand.
        let n = cut.out.len().min(whole.out.len());
        assert_eq!(cut.out[..n], whole.out[..n]);
    } else {
        assert_eq!(cut.out, whole.out, "read cuts or the budget changed the plaintext");
    }
}

/// The most plaintext an input compresses: [`ServerFrame::Run`] makes large frames cheap to ask
/// for, and compressing them is the harness's main cost.
const MAX_PLAINTEXT: usize = 128 * 1024;

/// A deflate stream built from frames, cut into reads and decoded under a plaintext budget.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// Compression level, modulo 10 (0 stores).
    pub level: u8,
    /// Bytes per read (`0`: one read).
    pub read: u16,
    /// The plaintext budget of each decode call (see `budget`).
    pub limit: u16,
    /// What the server writes, one write after the other.
    pub writes: Vec<Write>,
}

/// One write: frames, compressed, then flushed.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The plaintext.
    pub frames: Vec<ServerFrame>,
    /// How the compressor is flushed after it.
    pub flush: Flush,
    /// Damage to this write's compressed bytes, if any.
    pub damage: Damage,
}

/// A compressor flush.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Sync flush, as nsqd does after every write: everything so far is decodable.
    Sync,
    /// Full flush: a sync flush that also resets the dictionary.
    Full,
    /// No flush: data may stay in the compressor.
    None,
    /// Finish: the stream ends (nsqd never does this; the decoder must refuse it).
    Finish,
}

impl Flush {
    const VARIANTS: u32 = 4;
}

/// Damage to a write's compressed bytes. About one write in sixteen is damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// None.
    None,
    /// XOR `xor` into the byte at `at` modulo the write's length.
    Flip {
        /// Position.
        at: u16,
        /// Mask.
        xor: u8,
    },
    /// The stream ends after `n` modulo the write's length bytes of this write.
    Truncate(u16),
}

impl<'a> Arbitrary<'a> for Damage {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u8::arbitrary(u)? {
            0..=7 => Self::Flip { at: u.arbitrary()?, xor: u.arbitrary()? },
            8..=15 => Self::Truncate(u.arbitrary()?),
            _ => Self::None,
        })
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (1, Some(4))
    }
}

impl Seed for Damage {
    fn seed(&self, out: &mut Vec<u8>) {
        match *self {
            Self::None => out.push(255),
            Self::Flip { at, xor } => {
                out.push(0);
                at.seed(out);
                xor.seed(out);
            }
            Self::Truncate(n) => {
                out.push(8);
                n.seed(out);
            }
        }
    }
}

impl Seed for Flush {
    fn seed(&self, out: &mut Vec<u8>) {
        let index = match self {
            Self::Sync => 0,
            Self::Full => 1,
            Self::None => 2,
            Self::Finish => 3,
        };
        seed_variant(out, index, Self::VARIANTS);
    }
}

impl Seed for Write {
    fn seed(&self, out: &mut Vec<u8>) {
        self.frames.seed(out);
        self.flush.seed(out);
        self.damage.seed(out);
    }
}

impl Seed for Input {
    fn seed(&self, out: &mut Vec<u8>) {
        self.level.seed(out);
        self.read.seed(out);
        self.limit.seed(out);
        self.writes.seed(out);
    }
}

/// Compresses `plain` into `out` with `flush`; false if the compressor refused. `held` is the
/// plaintext given since the last flush, this call's included.
///
/// One call, with room for everything the compressor may hold: short of room it hands its
/// output out over several calls, one of which may stop short of its room before a flush is
/// done (the encoder under test copes with that; this reference need not). The room is sized
/// from `held`, not fixed: flate2 zeroes all of it on every call.
pub(crate) fn compress(z: &mut Compress, plain: &[u8], held: usize, flush: FlushCompress, out: &mut Vec<u8>) -> bool {
    // Deflate expands incompressible input by a few bytes per block; headers and the flush
    // marker take at most a few hundred.
    let room = 2 * held + 4096;
    out.reserve(room);
    let before = z.total_in();
    if z.compress_vec(plain, out, flush).is_err() {
        return false;
    }
    assert_eq!(z.total_in() - before, plain.len() as u64, "the compressor left input");
    assert!(out.len() < out.capacity(), "the compressor ran out of room");
    true
}

/// Compresses the writes, decodes the stream read by read under the budget, and checks the
/// plaintext against what was flushed, the outcome, the bounds, and that the frames decoded from
/// it re-encode to their bytes.
pub fn frames(input: Input) {
    let mut z = Compress::new(Compression::new(u32::from(input.level % 10)), false);
    let mut stream = Vec::new();
    let mut plain = BytesMut::new();
    // How much plaintext the decoder must produce in full (it was flushed, before any damage),
    // and whether the stream ends with the end-of-stream block, with damage, or cut short.
    let mut flushed = 0;
    let (mut finished, mut damaged, mut cut) = (false, false, false);
    let mut buf = Vec::new();
    for w in &input.writes {
        let sent = plain.len();
        for f in &w.frames {
            f.encode(&mut plain);
        }
        if plain.len() > MAX_PLAINTEXT {
            // Compressing more would cost more than it finds.
            plain.truncate(sent);
            break;
        }
        let flush = match w.flush {
            Flush::Sync => FlushCompress::Sync,
            Flush::Full => FlushCompress::Full,
            Flush::None => FlushCompress::None,
            Flush::Finish => FlushCompress::Finish,
        };
        buf.clear();
        if !compress(&mut z, &plain[sent..], plain.len() - flushed, flush, &mut buf) {
            plain.truncate(sent);
            break;
        }
        match w.damage {
            Damage::None => {}
            Damage::Flip { at, xor } => {
                let at = usize::from(at) % buf.len().max(1);
                if let Some(byte) = buf.get_mut(at) {
                    *byte ^= xor;
                    damaged = xor != 0;
                }
            }
            Damage::Truncate(n) => {
                // The stream just stops: no error, and what was flushed before comes out.
                let keep = usize::from(n) % buf.len().max(1);
                cut = keep < buf.len();
                buf.truncate(keep);
            }
        }
        stream.extend_from_slice(&buf);
        if damaged || cut {
            break;
        }
        if w.flush != Flush::None {
            flushed = plain.len();
        }
        if w.flush == Flush::Finish {
            finished = true;
            break;
        }
    }
    let d = decode(&stream, input.read, budget(usize::from(input.limit), plain.len()));
    if damaged {
        // Only what was flushed before the damage is certain.
        let n = d.out.len().min(flushed);
        assert_eq!(d.out[..n], plain[..n], "the plaintext before the damage changed");
        assert!(d.failed || d.out.len() >= flushed, "plaintext flushed before the damage is missing");
        return;
    }
    assert_eq!(d.failed, finished, "refused a valid stream, or accepted its end");
    assert!(d.out.len() <= plain.len(), "more plaintext than was compressed");
    assert_eq!(d.out[..], plain[..d.out.len()], "the plaintext differs from what was compressed");
    assert!(d.out.len() >= flushed, "flushed plaintext is missing: {} < {flushed}", d.out.len());
    let (_, used) = check_frames(&d.out, 1 << 20);
    let raw = input.writes.iter().any(|w| w.frames.iter().any(|f| matches!(f, ServerFrame::Raw(_))));
    if d.out.len() == plain.len() && !raw {
        assert_eq!(used, d.out.len(), "whole frames did not decode whole");
    }
}
