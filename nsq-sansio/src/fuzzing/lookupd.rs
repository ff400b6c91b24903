//! The lookupd response parser and address parser on arbitrary bytes.

/// Parses arbitrary bytes as a lookupd response and as an address; checks what they yield.
pub fn response(data: &[u8]) {
    if let Ok(lookup) = crate::parse_lookup_response(data) {
        for producer in &lookup.producers {
            let addr = producer.tcp_address();
            // host:port, with the announced port.
            let port = addr.rsplit_once(':').map(|(_, port)| port);
            assert_eq!(port, Some(producer.tcp_port.to_string().as_str()));
        }
    } else if data.len() > crate::MAX_LOOKUPD_RESPONSE {
        assert!(matches!(crate::parse_lookup_response(data), Err(crate::LookupdError::TooLarge)));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(addr) = crate::LookupdAddress::parse(text) {
            assert!(!addr.host_port().is_empty());
            assert_eq!(crate::LookupdAddress::parse(&addr.to_string()).as_ref(), Ok(&addr), "does not re-parse");
            if let Ok(topic) = crate::Topic::new("t") {
                if let Ok(request) = addr.request(&topic, text, Some(text)) {
                    assert!(request.ends_with(b"\r\n\r\n"));
                    // One request head: no line breaks smuggled in from the address, user agent
                    // or secret.
                    assert_eq!(request.windows(4).filter(|w| w == b"\r\n\r\n").count(), 1);
                }
            }
        }
    }
}
