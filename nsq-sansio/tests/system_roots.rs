//! Without `tls_root_ca_file`, nsqd's certificate is verified against the system's trust store;
//! with one, the file replaces the store, as in go-nsq.
//!
//! The store is read once per process, and `SSL_CERT_FILE` stands in for it, so this binary
//! sets that variable before any TLS connection is made and holds a single test.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "common/tls.rs"]
mod tls_harness;

use nsq_sansio::Config;
use tls_harness::{delivered, server_config, tls_config, tls_failure, tls_session, Pki};

fn tls_without_ca_file() -> Config {
    let mut config = Config::new();
    config.set("tls_v1", "true").unwrap();
    config
}

#[test]
fn the_system_trust_store_verifies_nsqd_unless_a_ca_file_replaces_it() {
    let system = Pki::new("system-store");
    let stranger = Pki::new("not-in-system-store");
    std::env::set_var("SSL_CERT_FILE", system.path("ca.pem"));
    std::env::remove_var("SSL_CERT_DIR");

    // A CA the system trusts verifies nsqd with no CA file configured.
    let events = tls_session(tls_without_ca_file(), server_config(&system, None), None);
    assert!(delivered(&events), "{events:?}");

    // A CA the system does not trust is refused.
    let events = tls_session(tls_without_ca_file(), server_config(&stranger, None), None);
    assert!(tls_failure(&events), "{events:?}");
    assert!(!delivered(&events));

    // A CA file replaces the system store rather than adding to it.
    let events = tls_session(tls_config(&stranger), server_config(&system, None), None);
    assert!(tls_failure(&events), "{events:?}");
    let events = tls_session(tls_config(&stranger), server_config(&stranger, None), None);
    assert!(delivered(&events), "{events:?}");
}
