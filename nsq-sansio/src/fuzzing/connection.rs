//! A `ConnectionState` after its handshake (plain, with negotiated features, snappy or deflate),
//! fed arbitrary frames through a valid server stream, raw bytes, application calls and time.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use super::deflate::compress;
use super::input::{reads, seed_variant, Blob, Seed, ServerFrame};
use crate::transport::snappy::{masked_crc, MAX_BLOCK};
use crate::{Channel, Command, Config, ConnectionState, Event, Frame, Message, Phase, Topic};

/// The most plaintext frames an input sends: [`ServerFrame::Run`] makes large ones cheap to
/// ask for, and compressing them is the harness's main cost.
const MAX_PLAINTEXT: usize = 128 * 1024;

/// A connection's handshake, then what happens on it.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// How IDENTIFY is answered.
    pub handshake: Handshake,
    /// What happens after it.
    pub ops: Vec<Op>,
}

/// nsqd's answer to IDENTIFY and what follows it up to the handshake's end.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The transport negotiated.
    pub mode: Mode,
    /// `max_rdy_count` in the JSON answer (0: left out).
    pub max_rdy_count: u16,
    /// `msg_timeout` (ms) in the JSON answer (0: left out).
    pub msg_timeout: u16,
    /// Bytes per read of the handshake (`0`: one read), so the compressed stream's start can
    /// arrive with the IDENTIFY answer.
    pub read: u16,
}

/// The transport IDENTIFY negotiates.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A plain `OK`: no negotiation.
    Ok,
    /// A JSON answer without compression.
    Json,
    /// Snappy: the server stream is a snappy framed stream from the upgrade `OK` on.
    Snappy,
    /// Deflate at this level (modulo 10): one raw deflate stream from the upgrade `OK` on.
    Deflate(u8),
}

/// One step.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Frames, through the negotiated compression as a valid stream.
    Frames {
        /// The frames.
        frames: Vec<ServerFrame>,
        /// Snappy: low bit 1 compresses the chunks, the rest is the chunk size (0: 64 KiB).
        shape: u16,
        /// Bytes per read (`0`: one read).
        read: u16,
    },
    /// Plaintext that need not be frames, through the negotiated compression.
    Plain(Blob),
    /// Socket bytes as they are (corrupting a compressed stream).
    Wire(Blob),
    /// Virtual time passes (ms), then timers fire.
    Advance(u16),
    /// The socket reaches end of file.
    Eof,
    /// RDY.
    Ready(u16),
    /// FIN of message id `n`.
    Finish(u8),
    /// REQ of message id `n` with a delay (ms).
    Requeue(u8, u16),
    /// TOUCH of message id `n`.
    Touch(u8),
    /// CLS.
    Close,
}

impl Seed for Mode {
    fn seed(&self, out: &mut Vec<u8>) {
        match self {
            Self::Ok => seed_variant(out, 0, 4),
            Self::Json => seed_variant(out, 1, 4),
            Self::Snappy => seed_variant(out, 2, 4),
            Self::Deflate(level) => {
                seed_variant(out, 3, 4);
                level.seed(out);
            }
        }
    }
}

impl Seed for Handshake {
    fn seed(&self, out: &mut Vec<u8>) {
        self.mode.seed(out);
        self.max_rdy_count.seed(out);
        self.msg_timeout.seed(out);
        self.read.seed(out);
    }
}

impl Seed for Op {
    fn seed(&self, out: &mut Vec<u8>) {
        const N: u32 = 10;
        match self {
            Self::Frames { frames, shape, read } => {
                seed_variant(out, 0, N);
                frames.seed(out);
                shape.seed(out);
                read.seed(out);
            }
            Self::Plain(b) => {
                seed_variant(out, 1, N);
                b.seed(out);
            }
            Self::Wire(b) => {
                seed_variant(out, 2, N);
                b.seed(out);
            }
            Self::Advance(ms) => {
                seed_variant(out, 3, N);
                ms.seed(out);
            }
            Self::Eof => seed_variant(out, 4, N),
            Self::Ready(n) => {
                seed_variant(out, 5, N);
                n.seed(out);
            }
            Self::Finish(i) => {
                seed_variant(out, 6, N);
                i.seed(out);
            }
            Self::Requeue(i, ms) => {
                seed_variant(out, 7, N);
                i.seed(out);
                ms.seed(out);
            }
            Self::Touch(i) => {
                seed_variant(out, 8, N);
                i.seed(out);
            }
            Self::Close => seed_variant(out, 9, N),
        }
    }
}

impl Seed for Input {
    fn seed(&self, out: &mut Vec<u8>) {
        self.handshake.seed(out);
        self.ops.seed(out);
    }
}

/// nsqd's side of the stream: plaintext in, socket bytes out.
enum Server {
    Plain,
    Snappy { raw: Box<snap::raw::Encoder>, started: bool },
    Deflate(Box<Compress>),
}

impl Server {
    /// Appends `plain` as nsqd would send it; `shape` as in [`Op::Frames`].
    fn write(&mut self, plain: &[u8], shape: u16, out: &mut Vec<u8>) {
        match self {
            Self::Plain => out.extend_from_slice(plain),
            Self::Snappy { raw, started } => {
                if !std::mem::replace(started, true) {
                    out.extend_from_slice(b"\xff\x06\x00\x00sNaPpY");
                }
                let size = match usize::from(shape >> 1) {
                    0 => MAX_BLOCK,
                    n => n,
                };
                for block in plain.chunks(size) {
                    let crc = masked_crc(block).to_le_bytes();
                    let compressed = if shape & 1 == 1 { raw.compress_vec(block).ok() } else { None };
                    let (kind, payload) = match &compressed {
                        Some(z) => (0x00, &z[..]),
                        None => (0x01, block),
                    };
                    let len = u32::try_from(4 + payload.len()).unwrap_or(u32::MAX).to_le_bytes();
                    out.extend_from_slice(&[kind, len[0], len[1], len[2]]);
                    out.extend_from_slice(&crc);
                    out.extend_from_slice(payload);
                }
            }
            Self::Deflate(z) => {
                assert!(compress(z, plain, plain.len(), FlushCompress::Sync, out), "the test compressor failed");
            }
        }
    }
}

/// The client's stream after the handshake, decompressed with reference decoders.
fn client_plaintext(mode: Mode, wire: &[u8]) -> Vec<u8> {
    match mode {
        Mode::Ok | Mode::Json => wire.to_vec(),
        Mode::Snappy => {
            let mut plain = Vec::new();
            let read = snap::read::FrameDecoder::new(wire).read_to_end(&mut plain);
            assert!(read.is_ok(), "the client's snappy stream is corrupt: {read:?}");
            plain
        }
        Mode::Deflate(_) => {
            let mut z = Decompress::new(false);
            let mut plain = Vec::with_capacity(wire.len() * 4 + 64);
            let mut input = wire;
            loop {
                let before = z.total_in();
                let status = z.decompress_vec(input, &mut plain, FlushDecompress::Sync);
                assert!(status.is_ok(), "the client's deflate stream is corrupt: {status:?}");
                input = &input[(z.total_in() - before) as usize..];
                // Sync-flushed after every write: everything comes out without more input.
                if input.is_empty() && plain.len() < plain.capacity() {
                    return plain;
                }
                plain.reserve(plain.capacity());
            }
        }
    }
}

/// The handshake's bytes: the IDENTIFY answer, then for compression the upgrade `OK` through
/// the new stream.
fn handshake_bytes(h: &Handshake, server: &mut Server) -> Vec<u8> {
    let mut out = BytesMut::new();
    if h.mode == Mode::Ok {
        Frame::Response(Bytes::from_static(b"OK")).encode(&mut out);
        return out.to_vec();
    }
    let (snappy, deflate, level) = match h.mode {
        Mode::Snappy => (true, false, 0),
        Mode::Deflate(level) => (false, true, level % 10),
        _ => (false, false, 0),
    };
    let mut json = format!(r#"{{"snappy":{snappy},"deflate":{deflate},"deflate_level":{level}"#);
    if h.max_rdy_count > 0 {
        json.push_str(&format!(r#","max_rdy_count":{}"#, h.max_rdy_count));
    }
    if h.msg_timeout > 0 {
        json.push_str(&format!(r#","msg_timeout":{}"#, h.msg_timeout));
    }
    json.push('}');
    Frame::Response(Bytes::from(json)).encode(&mut out);
    let mut wire = out.to_vec();
    if snappy || deflate {
        let mut ok = BytesMut::new();
        Frame::Response(Bytes::from_static(b"OK")).encode(&mut ok);
        server.write(&ok, 0, &mut wire);
    }
    wire
}

/// The connection under test and what the harness knows it must have done.
struct Harness {
    conn: ConnectionState,
    now: Instant,
    /// Every byte the client wrote after the handshake.
    client: Vec<u8>,
    /// The plaintext commands the client must have written after the handshake.
    commands: BytesMut,
    /// Messages sent in valid frames and not delivered yet, while the stream is known to be in
    /// frame sync.
    messages: VecDeque<Message>,
    in_sync: bool,
    closed: bool,
    /// Plaintext frames sent so far.
    sent: usize,
}

impl Harness {
    /// Feeds socket bytes read by read.
    fn input(&mut self, wire: &[u8], read: u16) {
        for piece in reads(wire, read) {
            self.conn.handle_input(self.now, BytesMut::from(piece));
        }
    }

    /// Bytes that need not be frames are coming: the frames that follow are not known.
    fn lose_sync(&mut self) {
        self.in_sync = false;
        self.messages.clear();
    }

    /// Drains outputs after a step that queued `queued`, and checks the invariants.
    fn after(&mut self, mut queued: BytesMut) {
        while let Some(bytes) = self.conn.poll_transmit() {
            self.client.extend_from_slice(&bytes);
        }
        while let Some(event) = self.conn.poll_event() {
            assert!(!self.closed, "an event after Closed: {event:?}");
            match event {
                Event::Message(m) => {
                    if self.in_sync {
                        assert_eq!(self.messages.pop_front().as_ref(), Some(&m), "not the message sent");
                    }
                    assert!(
                        self.conn.is_in_flight(&m.id) || self.conn.is_closed(),
                        "a delivered message is not in flight"
                    );
                }
                Event::MessageTimedOut(id) => assert!(!self.conn.is_in_flight(&id), "timed out yet in flight"),
                Event::ServerError(e) => assert!(!e.is_fatal(), "a fatal error left the connection open"),
                Event::Closed(reason) => {
                    self.closed = true;
                    if !reason.is_local_close() {
                        // A broken stream is not written to: what this step queued is dropped.
                        queued.clear();
                    }
                }
                _ => {}
            }
        }
        self.commands.unsplit(queued);
        let conn = &self.conn;
        assert_eq!(self.closed, conn.is_closed());
        if self.closed {
            assert_eq!(conn.in_flight(), 0);
            assert!(conn.poll_timeout().is_none(), "a timer armed on a closed connection");
            self.messages.clear();
            return;
        }
        assert!(
            self.messages.is_empty(),
            "{} messages sent but not delivered: {:?}",
            self.messages.len(),
            self.conn.buffered()
        );
        // The read timer is always armed, and never already expired.
        assert!(conn.poll_timeout().is_some_and(|t| t > self.now), "no timer, or an expired one left armed");
        assert!(conn.rdy_remaining() <= conn.rdy() && conn.rdy() <= conn.max_rdy_count());
        let b = conn.buffered();
        assert_eq!((b.tx, b.held), (0, 0), "commands left unsent");
        assert!(!b.pending, "the decompressor stopped with plaintext left");
        // Only part of one frame waits, never a whole one.
        if let Some(size) = b.rx_head {
            assert!(size <= b.max_frame_size && b.rx < 4 + size as usize, "{b:?}");
        }
        match b.codec {
            0 => assert_eq!(b.compressed, 0),
            1 => assert!(b.compressed < 8 + snap::raw::max_compress_len(MAX_BLOCK), "{b:?}"),
            _ => assert_eq!(b.compressed, 0, "deflate input left undecoded"),
        }
    }
}

/// Runs the handshake and the ops, checking the invariants after each step and, at the end,
/// that the client wrote exactly the commands the successful calls and heartbeats call for,
/// as a stream reference decoders accept.
pub fn connection(input: Input) {
    let now = Instant::now();
    let (Ok(topic), Ok(channel)) = (Topic::new("t"), Channel::new("c")) else {
        return;
    };
    let h = &input.handshake;
    let mut config = Config::new();
    config.snappy = h.mode == Mode::Snappy;
    config.deflate = matches!(h.mode, Mode::Deflate(_));
    let mut conn = ConnectionState::new(Arc::new(config), "127.0.0.1", now);
    let _ = conn.subscribe(&topic, &channel);
    while conn.poll_transmit().is_some() {}
    let mut server = match h.mode {
        Mode::Ok | Mode::Json => Server::Plain,
        Mode::Snappy => Server::Snappy { raw: Box::new(snap::raw::Encoder::new()), started: false },
        Mode::Deflate(level) => {
            Server::Deflate(Box::new(Compress::new(Compression::new(u32::from(level % 10)), false)))
        }
    };
    let wire = handshake_bytes(h, &mut server);
    let mut t = Harness {
        conn,
        now,
        client: Vec::new(),
        commands: BytesMut::new(),
        messages: VecDeque::new(),
        in_sync: true,
        closed: false,
        sent: 0,
    };
    t.input(&wire, h.read);
    assert_eq!(t.conn.phase(), Phase::Ready, "the handshake did not complete");
    let max_rdy = if h.max_rdy_count > 0 && h.mode != Mode::Ok { u32::from(h.max_rdy_count) } else { 2500 };
    assert_eq!(t.conn.max_rdy_count(), max_rdy);
    let timeout = if h.msg_timeout > 0 && h.mode != Mode::Ok { u64::from(h.msg_timeout) } else { 60_000 };
    assert_eq!(t.conn.msg_timeout(), Duration::from_millis(timeout));
    let mut queued = BytesMut::new();
    Command::Sub(&topic, &channel).encode(&mut queued);
    t.after(queued);

    let mut wire = Vec::new();
    for op in input.ops {
        let mut queued = BytesMut::new();
        let heartbeats = t.conn.stats().heartbeats;
        match op {
            Op::Frames { frames, shape, read } => {
                if frames.iter().any(|f| matches!(f, ServerFrame::Raw(_))) {
                    t.lose_sync();
                }
                let mut plain = BytesMut::new();
                for f in &frames {
                    let before = plain.len();
                    f.encode(&mut plain);
                    if t.sent + plain.len() > MAX_PLAINTEXT {
                        // Compressing more would cost more than it finds.
                        plain.truncate(before);
                        break;
                    }
                    if let (true, Some(Frame::Message(m))) = (t.in_sync, f.to_frame()) {
                        t.messages.push_back(m);
                    }
                }
                t.sent += plain.len();
                wire.clear();
                server.write(&plain, shape, &mut wire);
                t.input(&wire, read);
            }
            Op::Plain(bytes) => {
                t.lose_sync();
                wire.clear();
                server.write(&bytes.0, 0, &mut wire);
                t.input(&wire, 0);
            }
            Op::Wire(bytes) => {
                t.lose_sync();
                t.input(&bytes.0, 0);
            }
            Op::Advance(ms) => {
                t.now += Duration::from_millis(u64::from(ms));
                t.conn.handle_timeout(t.now);
            }
            Op::Eof => t.conn.handle_eof(t.now),
            Op::Ready(n) => {
                if let Ok(sent) = t.conn.ready(u32::from(n)) {
                    assert_eq!(sent, u32::from(n).min(t.conn.max_rdy_count()));
                    Command::Rdy(sent).encode(&mut queued);
                }
            }
            Op::Finish(i) => {
                let id = ServerFrame::message_id(i);
                if answer(&mut t.conn, &id, |c| c.finish(&id)) {
                    Command::Fin(&id).encode(&mut queued);
                }
            }
            Op::Requeue(i, ms) => {
                let id = ServerFrame::message_id(i);
                let delay = Duration::from_millis(u64::from(ms));
                if answer(&mut t.conn, &id, |c| c.requeue(&id, delay)) {
                    Command::Req(&id, delay).encode(&mut queued);
                }
            }
            Op::Touch(i) => {
                let id = ServerFrame::message_id(i);
                let before = t.conn.in_flight();
                let now = t.now;
                if answer(&mut t.conn, &id, |c| c.touch(&id, now)) {
                    Command::Touch(&id).encode(&mut queued);
                }
                assert_eq!(t.conn.in_flight(), before, "TOUCH changed what is in flight");
            }
            Op::Close => {
                if t.conn.phase() == Phase::Ready {
                    Command::Cls.encode(&mut queued);
                }
                t.conn.close(t.now);
            }
        }
        for _ in heartbeats..t.conn.stats().heartbeats {
            Command::Nop.encode(&mut queued);
        }
        t.after(queued);
    }
    let sent = client_plaintext(h.mode, &t.client);
    assert_eq!(Bytes::from(sent), t.commands.freeze(), "the client wrote other commands than it was asked to");
}

/// Calls `f`, an answer to message `id`, and checks it succeeds exactly when `id` is in flight
/// and leaves in-flight alone when refused. Returns whether it succeeded.
fn answer(
    conn: &mut ConnectionState,
    id: &crate::MessageId,
    f: impl FnOnce(&mut ConnectionState) -> Result<(), crate::CommandError>,
) -> bool {
    let was = conn.is_in_flight(id);
    let before = conn.in_flight();
    let ok = f(conn).is_ok();
    assert_eq!(ok, was, "answerable exactly when in flight");
    if !ok {
        assert_eq!(conn.in_flight(), before, "a refused call changed in-flight");
    }
    ok
}
