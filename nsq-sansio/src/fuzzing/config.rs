//! `Config::set` with arbitrary names and values.

use crate::protocol::identify::IdentifyRequest;
use crate::Config;

/// Splits the input at the first `=` into an option name and a value and sets it; an accepted
/// value can be set again, and the IDENTIFY body and lookupd request built from the result are
/// well-formed.
pub fn set(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (name, value) = text.split_once('=').unwrap_or((&text, ""));
    let mut config = Config::new();
    if config.set(name, value).is_ok() {
        let _ = config.validate();
        assert!(config.set(name, value).is_ok(), "setting the same value twice failed");
        let body = IdentifyRequest::new(&config).to_json();
        assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok(), "IDENTIFY body is not JSON");
        if let (Ok(addr), Ok(topic)) = (crate::LookupdAddress::parse("127.0.0.1:4161"), crate::Topic::new("t")) {
            let request = addr.request(&topic, &config.user_agent, None);
            assert!(request.is_ok(), "no request without a secret: {request:?}");
            if let Ok(request) = request {
                assert_eq!(request.windows(4).filter(|w| w == b"\r\n\r\n").count(), 1, "{request:?}");
            }
        }
    }
}
