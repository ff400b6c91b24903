//! Fuzz target bodies, reached through the hidden `__fuzzing` feature. Not a public API.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod config;
pub mod connection;
pub mod consumer;
pub mod identify;
pub mod lookupd;
pub mod transport;
