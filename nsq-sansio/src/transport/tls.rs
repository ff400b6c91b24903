//! TLS through rustls's own sans-IO API: ciphertext in with `read_tls`, plaintext out of
//! `reader()`, plaintext in through `writer()`, ciphertext out with `write_tls`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, BytesMut};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tracing::{debug, warn};

use super::TransportError;

/// The lowest TLS version to accept (go-nsq's `tls_min_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsVersion {
    /// TLS 1.2 (the lowest rustls speaks).
    #[default]
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// TLS settings of a [`Config`](crate::Config).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Ask nsqd for TLS (`tls_v1`). A connection whose nsqd does not agree fails rather than
    /// going on in clear.
    pub enabled: bool,
    /// PEM file with the CA certificates to trust instead of the system's trust store
    /// (`tls_root_ca_file`). `None`: the system's store, as go-nsq does, read once per process
    /// (`SSL_CERT_FILE` and `SSL_CERT_DIR` override it); the bundled webpki roots when it holds
    /// no usable certificate.
    pub root_ca_file: Option<PathBuf>,
    /// PEM client certificate chain (`tls_cert`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate (`tls_key`).
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate (`tls_insecure_skip_verify`). Dangerous; off by default.
    pub danger_accept_invalid_certs: bool,
    /// The lowest TLS version to accept (`tls_min_version`).
    pub min_version: TlsVersion,
    /// The name to verify the server certificate against; defaults to the host dialled.
    pub server_name: Option<String>,
    /// A ready rustls configuration; when set, the file options above are ignored.
    pub client_config: Option<Arc<ClientConfig>>,
}

/// Builds the rustls configuration from the options: the CA file or the system's trust store,
/// the client certificate, the minimum version, and the insecure verifier only when asked for.
pub(crate) fn client_config(opts: &TlsOptions) -> Result<Arc<ClientConfig>, TransportError> {
    if let Some(config) = &opts.client_config {
        return Ok(config.clone());
    }
    let setup = |what: &str, e: &dyn std::fmt::Display| TransportError::TlsSetup(format!("{what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match opts.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| setup("protocol versions", &e))?;
    let builder = if opts.danger_accept_invalid_certs {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
    } else {
        let roots = match &opts.root_ca_file {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| setup(&format!("tls_root_ca_file {}", path.display()), &e))?;
                for cert in certs {
                    let cert = cert.map_err(|e| setup(&format!("tls_root_ca_file {}", path.display()), &e))?;
                    roots.add(cert).map_err(|e| setup(&format!("tls_root_ca_file {}", path.display()), &e))?;
                }
                if roots.is_empty() {
                    return Err(TransportError::TlsSetup(format!(
                        "tls_root_ca_file {}: no certificates",
                        path.display()
                    )));
                }
                Arc::new(roots)
            }
            None => system_roots(),
        };
        builder.with_root_certificates(roots)
    };
    let config = match (&opts.cert_file, &opts.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| setup(&format!("tls_cert {}", cert.display()), &e))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| setup(&format!("tls_key {}", key.display()), &e))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| setup("client certificate", &e))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(TransportError::TlsSetup("tls_cert and tls_key must be set together".into())),
    };
    Ok(Arc::new(config))
}

/// The system's trust store, read once per process (as Go reads its system pool once): the
/// platform's store, or the files named by `SSL_CERT_FILE` / `SSL_CERT_DIR` when set.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            for error in &loaded.errors {
                debug!(%error, "reading the system trust store");
            }
            Arc::new(trust_store(loaded.certs))
        })
        .clone()
}

/// The usable certificates among `system`, or the bundled webpki roots when there are none
/// (a minimal container without a CA bundle), so TLS still verifies against the public CAs.
fn trust_store(system: Vec<CertificateDer<'static>>) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(system);
    debug!(added, ignored, "system trust store");
    if added == 0 {
        warn!(
            ignored,
            "no usable certificate in the system trust store: verifying nsqd against the bundled webpki roots"
        );
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    roots
}

/// The name the server certificate must match: the configured one, else the host dialled.
pub(crate) fn server_name(opts: &TlsOptions, host: &str) -> Result<ServerName<'static>, TransportError> {
    let name = opts.server_name.as_deref().unwrap_or(host);
    ServerName::try_from(name.to_owned()).map_err(|e| TransportError::TlsSetup(format!("server name {name:?}: {e}")))
}

/// One TLS session over the byte stream.
#[derive(Debug)]
pub(crate) struct Tls {
    conn: ClientConnection,
}

impl Tls {
    pub(crate) fn new(config: Arc<ClientConfig>, name: ServerName<'static>) -> Result<Self, TransportError> {
        let mut conn = ClientConnection::new(config, name)?;
        // What is queued for sending is bounded by what the application queues (publishes
        // are size-checked); rustls's default 64 KiB cap would fail a large write instead.
        conn.set_buffer_limit(None);
        Ok(Self { conn })
    }

    /// Feeds ciphertext; appends the plaintext it yields to `plain`.
    pub(crate) fn recv(&mut self, mut wire: &[u8], plain: &mut BytesMut) -> Result<(), TransportError> {
        while !wire.is_empty() {
            let n = self.conn.read_tls(&mut wire).map_err(|e| TransportError::TlsSetup(format!("read_tls: {e}")))?;
            let state = self.conn.process_new_packets()?;
            let available = state.plaintext_bytes_to_read();
            if available > 0 {
                let start = plain.len();
                plain.resize(start + available, 0);
                self.conn
                    .reader()
                    .read_exact(&mut plain[start..])
                    .map_err(|e| TransportError::TlsSetup(format!("reading plaintext: {e}")))?;
            }
            if n == 0 && available == 0 {
                // rustls took nothing and gave nothing: never drop input silently.
                return Err(TransportError::TlsSetup("TLS input stalled".into()));
            }
        }
        Ok(())
    }

    /// Encrypts plaintext.
    pub(crate) fn send(&mut self, plain: &[u8]) -> Result<(), TransportError> {
        self.conn.writer().write_all(plain).map_err(|e| TransportError::TlsSetup(format!("encrypting: {e}")))
    }

    /// Moves pending ciphertext (handshake records, data, alerts) to `out`.
    pub(crate) fn flush(&mut self, out: &mut BytesMut) {
        while self.conn.wants_write() {
            let mut w = out.writer();
            if self.conn.write_tls(&mut w).is_err() {
                break;
            }
        }
    }

    pub(crate) fn close(&mut self) {
        self.conn.send_close_notify();
    }
}

/// The verifier behind `tls_insecure_skip_verify`: signatures are checked, identity is not.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ca() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_system_store_is_used_when_it_has_a_usable_certificate() {
        let roots = trust_store(vec![ca(), CertificateDer::from(b"not a certificate".to_vec())]);
        assert_eq!(roots.len(), 1, "only the usable certificate, and no webpki roots");
    }

    #[test]
    fn an_empty_or_unusable_system_store_falls_back_to_the_webpki_roots() {
        let webpki = webpki_roots::TLS_SERVER_ROOTS.len();
        assert!(webpki > 100);
        assert_eq!(trust_store(Vec::new()).len(), webpki);
        assert_eq!(trust_store(vec![CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])]).len(), webpki);
    }
}
