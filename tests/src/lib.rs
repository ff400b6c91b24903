//! Fake nsqd and nsqlookupd servers, and the scenario suite every runtime adapter runs.
//!
//! The fakes run on plain std threads, so they serve any async runtime; they are built to
//! nsqd 1.3.0's behaviour and the captured bytes in `nsq-sansio/tests/fixtures/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod certs;
pub mod fake_lookupd;
pub mod fake_nsqd;
pub mod scenarios;
pub mod tls_stream;

pub use certs::TestPki;
pub use fake_lookupd::{FakeLookupd, FakeLookupdOptions};
pub use fake_nsqd::{frame, message_frame, FakeNsqd, FakeNsqdOptions, FakeStats};
