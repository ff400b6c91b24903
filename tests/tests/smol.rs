//! The scenario suite on nsq-smol.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

nsq_tests::scenario_tests!(nsq_smol::Smol, smol::block_on);
