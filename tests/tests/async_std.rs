//! The scenario suite on nsq-async-std.
#![allow(missing_docs)]

nsq_tests::scenario_tests!(nsq_async_std::AsyncStd, async_std::task::block_on);
