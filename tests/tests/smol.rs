//! The scenario suite on nsq-smol.
#![allow(missing_docs)]

nsq_tests::scenario_tests!(nsq_smol::Smol, smol::block_on);
