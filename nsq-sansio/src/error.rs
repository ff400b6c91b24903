//! Error types: what arrives as an event, and what a call returns.
