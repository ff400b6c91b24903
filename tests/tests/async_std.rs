//! The scenario suite on nsq-async-std.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

nsq_tests::scenario_tests!(nsq_async_std::AsyncStd, async_std::task::block_on);
