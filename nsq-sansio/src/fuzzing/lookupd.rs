//! The lookupd response parser and address parser on arbitrary bytes.

/// Parses arbitrary bytes as a lookupd response and as an address; must never panic.
pub fn response(data: &[u8]) {
    if let Ok(lookup) = crate::parse_lookup_response(data) {
        for producer in &lookup.producers {
            let addr = producer.tcp_address();
            assert!(addr.ends_with(&producer.tcp_port.to_string()));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(addr) = crate::LookupdAddress::parse(text) {
            assert!(!addr.host_port().is_empty());
            if let Ok(topic) = crate::Topic::new("t") {
                if let Ok(request) = addr.request(&topic, text, Some(text)) {
                    assert!(request.ends_with(b"\r\n\r\n"));
                }
            }
        }
    }
}
