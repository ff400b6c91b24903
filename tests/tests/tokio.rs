//! The scenario suite on nsq-tokio.
#![allow(missing_docs, clippy::unwrap_used)]

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(future)
}

nsq_tests::scenario_tests!(nsq_tokio::Tokio, block_on);
