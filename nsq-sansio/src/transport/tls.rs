//! TLS through rustls's own sans-IO API.

use std::path::PathBuf;
use std::sync::Arc;

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
    /// Ask nsqd for TLS (`tls_v1`).
    pub enabled: bool,
    /// PEM file with the CA certificates to trust instead of the webpki roots (`tls_root_ca_file`).
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
    pub client_config: Option<Arc<rustls::ClientConfig>>,
}

pub(crate) fn client_config(
    _opts: &TlsOptions,
) -> Result<Arc<rustls::ClientConfig>, super::TransportError> {
    Err(super::TransportError::TlsSetup("not built yet".into()))
}

pub(crate) fn server_name(
    _opts: &TlsOptions,
    host: &str,
) -> Result<rustls_pki_types::ServerName<'static>, super::TransportError> {
    rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| super::TransportError::TlsSetup(e.to_string()))
}
