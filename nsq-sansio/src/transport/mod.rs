//! The byte-stream layers between the socket and the NSQ framing:
//! socket ⇄ \[TLS\] ⇄ \[snappy | deflate\] ⇄ frames.
//!
//! Each layer is switched on in place when the handshake reaches its upgrade point. Bytes that were
//! already read past that point are handed to the new layer, so nothing is lost or decoded twice.

pub(crate) mod deflate;
pub(crate) mod snappy;
pub(crate) mod tls;

use bytes::{Bytes, BytesMut};

pub use tls::{TlsOptions, TlsVersion};

/// A failure inside a transport layer. Always fatal for the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// TLS failed: handshake, certificate verification, a bad record or an alert.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The TLS client configuration could not be built (CA file, certificate, key).
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    /// The snappy stream is corrupt (bad chunk, bad CRC, missing stream identifier).
    #[error("snappy: {0}")]
    Snappy(String),
    /// The deflate stream is corrupt.
    #[error("deflate: {0}")]
    Deflate(String),
    /// Decompression would produce more than the buffer limit allows.
    #[error("decompressed data exceeds the limit of {0} bytes")]
    Overflow(usize),
}

/// The layer stack of one connection.
#[derive(Debug, Default)]
pub(crate) struct Transport {
    /// Plaintext queued by the framing layer, not yet handed out.
    out: BytesMut,
}

impl Transport {
    /// A plain transport: bytes pass through untouched.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes read from the socket; appends the plaintext NSQ bytes they yield to `plain`.
    pub(crate) fn recv(
        &mut self,
        wire: BytesMut,
        plain: &mut BytesMut,
        _limit: usize,
    ) -> Result<(), TransportError> {
        if plain.is_empty() {
            *plain = wire;
        } else {
            plain.unsplit(wire);
        }
        Ok(())
    }

    /// Queues plaintext NSQ bytes for sending.
    pub(crate) fn send(&mut self, plain: &mut BytesMut) -> Result<(), TransportError> {
        self.out.unsplit(plain.split());
        Ok(())
    }

    pub(crate) fn has_pending(&self) -> bool {
        false
    }

    pub(crate) fn start_tls(
        &mut self,
        _config: std::sync::Arc<rustls::ClientConfig>,
        _name: rustls_pki_types::ServerName<'static>,
        _leftover: BytesMut,
        _plain: &mut BytesMut,
        _limit: usize,
    ) -> Result<(), TransportError> {
        Err(TransportError::TlsSetup("not built yet".into()))
    }

    pub(crate) fn start_snappy(
        &mut self,
        _l: BytesMut,
        _p: &mut BytesMut,
        _limit: usize,
    ) -> Result<(), TransportError> {
        Err(TransportError::Snappy("not built yet".into()))
    }

    pub(crate) fn start_deflate(
        &mut self,
        _lvl: u32,
        _l: BytesMut,
        _p: &mut BytesMut,
        _limit: usize,
    ) -> Result<(), TransportError> {
        Err(TransportError::Deflate("not built yet".into()))
    }

    pub(crate) fn close(&mut self) {}

    /// The bytes to write to the socket next, if any.
    pub(crate) fn poll_transmit(&mut self) -> Option<Bytes> {
        // Take the buffer instead of splitting it: an empty view left behind would keep the
        // allocation shared, and the next write could not reclaim it once the caller drops this.
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out).freeze())
    }
}
