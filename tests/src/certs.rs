//! Certificates made at test time: a CA, a server certificate for localhost and 127.0.0.1
//! signed by it, and the CA as a PEM file for clients' `tls_root_ca_file`.

use std::path::PathBuf;
use std::sync::Arc;

/// A CA and a server configuration whose certificate it signed.
#[derive(Debug)]
pub struct TestPki {
    /// The CA certificate as a PEM file.
    pub ca_file: PathBuf,
    /// A rustls server configuration presenting the signed certificate.
    pub server: Arc<rustls::ServerConfig>,
    /// The same server certificate, and clients must present a certificate the CA signed
    /// (nsqd's `--tls-client-auth-policy=require-verify`).
    pub server_requiring_client_cert: Arc<rustls::ServerConfig>,
}

impl TestPki {
    /// Makes a new CA and server certificate; `tag` names the temporary directory.
    pub fn new(tag: &str) -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("fake nsqd CA {tag}"));
        let ca = params.self_signed(&ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("server key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        params.subject_alt_names.push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server certificate");
        let dir = std::env::temp_dir().join(format!("nsq-fake-pki-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = vec![cert.der().clone()];
        let private = || rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain.clone(), private())
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).expect("CA root");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .expect("client verifier");
        let strict = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, private())
            .expect("server config");
        Self { ca_file, server: Arc::new(server), server_requiring_client_cert: Arc::new(strict) }
    }
}
