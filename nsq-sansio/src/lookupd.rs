//! The nsqlookupd HTTP API: `GET /lookup?topic=...` request bytes and response parsing.
