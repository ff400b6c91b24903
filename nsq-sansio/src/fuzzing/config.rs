//! `Config::set` with arbitrary names and values.

use crate::Config;

/// Splits the input at the first `=` into an option name and a value, sets it, validates.
pub fn set(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (name, value) = text.split_once('=').unwrap_or((&text, ""));
    let mut config = Config::new();
    if config.set(name, value).is_ok() {
        // A value that was accepted reads back as valid on its own, combinations aside.
        let _ = config.validate();
        assert!(config.set(name, value).is_ok(), "setting the same value twice failed");
    }
}
