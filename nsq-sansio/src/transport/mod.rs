//! The byte-stream layers between the socket and the NSQ framing:
//! socket ⇄ \[TLS\] ⇄ \[snappy | deflate\] ⇄ frames.
//!
//! Each layer is switched on in place when the handshake reaches its upgrade point. Bytes that
//! were already read past that point are handed to the new layer, so nothing is lost or decoded
//! twice, whatever the read chunking.

pub(crate) mod deflate;
pub(crate) mod snappy;
pub(crate) mod tls;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

pub use tls::{TlsOptions, TlsVersion};

/// A failure inside a transport layer. Always fatal for the connection.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// TLS failed: handshake, certificate verification, a bad record or an alert.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The TLS client configuration could not be built (CA file, certificate, key, name).
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    /// The snappy stream is corrupt (bad chunk, bad CRC, missing stream identifier).
    #[error("snappy: {0}")]
    Snappy(String),
    /// The deflate stream is corrupt.
    #[error("deflate: {0}")]
    Deflate(String),
}

#[derive(Debug, Default)]
enum Codec {
    #[default]
    None,
    Snappy(Box<(snappy::Decoder, snappy::Encoder)>),
    Deflate(Box<(deflate::Decoder, deflate::Encoder)>),
}

/// The layer stack of one connection.
#[derive(Debug, Default)]
pub(crate) struct Transport {
    tls: Option<tls::Tls>,
    codec: Codec,
    /// Bytes out of TLS (or off the socket) that the decompressor has not taken yet.
    mid: BytesMut,
    /// Compressed bytes on their way into TLS.
    scratch: BytesMut,
    /// Bytes to write to the socket.
    out: BytesMut,
    /// The decompressor stopped at the limit with input left, or output it may still hold.
    pending: bool,
}

impl Transport {
    /// A plain transport: bytes pass through untouched.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Whether bytes pass through untouched: no TLS, no compression.
    pub(crate) fn is_plain(&self) -> bool {
        self.tls.is_none() && matches!(self.codec, Codec::None)
    }

    /// Feeds bytes read from the socket; appends the plaintext NSQ bytes they yield to `plain`,
    /// decompressing at most until `plain` holds `limit` bytes (no decompression bomb). What is
    /// left waits inside; see [`has_pending`](Self::has_pending).
    pub(crate) fn recv(&mut self, wire: BytesMut, plain: &mut BytesMut, limit: usize) -> Result<(), TransportError> {
        match (&mut self.tls, &self.codec) {
            // The connection decodes plain reads itself (`frame::decode_joined`), copying less.
            (None, Codec::None) => {
                plain.unsplit(wire);
                return Ok(());
            }
            (Some(tls), _) => {
                tls.recv(&wire, &mut self.mid)?;
                // Handshake replies are written at the next poll_transmit.
                tls.flush(&mut self.out);
            }
            (None, _) => self.mid.extend_from_slice(&wire),
        }
        self.decompress(plain, limit)
    }

    /// Whether input or decompressor output is buffered that `recv(BytesMut::new(), plain,
    /// limit)` could still turn into plaintext once `plain` has room.
    pub(crate) fn has_pending(&self) -> bool {
        self.pending
    }

    /// Takes every byte out of `plain` (leaving it empty) and queues its wire form.
    pub(crate) fn send(&mut self, plain: &mut BytesMut) -> Result<(), TransportError> {
        if self.is_plain() {
            if self.out.is_empty() {
                self.out = plain.split();
            } else {
                self.out.unsplit(plain.split());
            }
            return Ok(());
        }
        let data = plain.split();
        let compressed = match &mut self.codec {
            Codec::None => data,
            Codec::Snappy(codec) => {
                let enc = &mut codec.1;
                enc.encode(&data, &mut self.scratch)?;
                self.scratch.split()
            }
            Codec::Deflate(codec) => {
                let enc = &mut codec.1;
                enc.encode(&data, &mut self.scratch)?;
                self.scratch.split()
            }
        };
        self.seal(&compressed)
    }

    /// The bytes to write to the socket next, if any.
    pub(crate) fn poll_transmit(&mut self) -> Option<Bytes> {
        if let Some(tls) = &mut self.tls {
            tls.flush(&mut self.out);
        }
        // Take the buffer instead of splitting it: an empty view left behind would keep the
        // allocation shared, and the next write could not reclaim it once the caller drops this.
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out).freeze())
    }

    /// Starts TLS. `leftover` holds socket bytes already read past the IDENTIFY answer: they
    /// are the server's first TLS records.
    pub(crate) fn start_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
        leftover: BytesMut,
        plain: &mut BytesMut,
        limit: usize,
    ) -> Result<(), TransportError> {
        let mut tls = tls::Tls::new(config, name)?;
        tls.flush(&mut self.out);
        self.tls = Some(tls);
        if leftover.is_empty() {
            Ok(())
        } else {
            self.recv(leftover, plain, limit)
        }
    }

    /// Starts snappy. `leftover` holds bytes already decoded past the upgrade point (after the
    /// TLS `OK`, or the IDENTIFY answer): they are the start of nsqd's snappy stream.
    pub(crate) fn start_snappy(
        &mut self,
        leftover: BytesMut,
        plain: &mut BytesMut,
        limit: usize,
    ) -> Result<(), TransportError> {
        let mut encoder = snappy::Encoder::default();
        encoder.start(&mut self.scratch);
        let identifier = self.scratch.split();
        self.codec = Codec::Snappy(Box::new((snappy::Decoder::default(), encoder)));
        self.seal(&identifier)?;
        self.mid.unsplit(leftover);
        self.decompress(plain, limit)
    }

    /// Starts deflate at `level`; `leftover` as for [`start_snappy`](Self::start_snappy).
    pub(crate) fn start_deflate(
        &mut self,
        level: u32,
        leftover: BytesMut,
        plain: &mut BytesMut,
        limit: usize,
    ) -> Result<(), TransportError> {
        self.codec = Codec::Deflate(Box::new((deflate::Decoder::default(), deflate::Encoder::new(level))));
        self.mid.unsplit(leftover);
        self.decompress(plain, limit)
    }

    /// Compressed bytes waiting for the decompressor, and whether it stopped at the limit.
    #[cfg(feature = "__fuzzing")]
    pub(crate) fn buffered(&self) -> (usize, bool) {
        (self.mid.len(), self.pending)
    }

    /// Which decompressor is on: 0 none, 1 snappy, 2 deflate.
    #[cfg(feature = "__fuzzing")]
    pub(crate) fn codec(&self) -> u8 {
        match self.codec {
            Codec::None => 0,
            Codec::Snappy(_) => 1,
            Codec::Deflate(_) => 2,
        }
    }

    /// Queues TLS close_notify, if TLS is on.
    pub(crate) fn close(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.close();
            tls.flush(&mut self.out);
        }
    }

    /// Decompresses `mid` into `plain` (or moves it, with no compression).
    fn decompress(&mut self, plain: &mut BytesMut, limit: usize) -> Result<(), TransportError> {
        self.pending = match &mut self.codec {
            Codec::None => {
                plain.unsplit(self.mid.split());
                false
            }
            Codec::Snappy(codec) => codec.0.decode(&mut self.mid, plain, limit)?,
            Codec::Deflate(codec) => codec.0.decode(&mut self.mid, plain, limit)?,
        };
        Ok(())
    }

    /// Encrypts (or just queues) bytes for the socket.
    fn seal(&mut self, data: &[u8]) -> Result<(), TransportError> {
        match &mut self.tls {
            Some(tls) => {
                tls.send(data)?;
                tls.flush(&mut self.out);
            }
            None => self.out.extend_from_slice(data),
        }
        Ok(())
    }
}
