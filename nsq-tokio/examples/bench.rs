//! Throughput benchmark on tokio: see `nsq_sansio::driver::tools` for the flags.
//!
//! One client on one thread: the engine, its dial tasks and the handlers wake each other
//! without crossing threads, which halves the CPU per message against the multi-threaded
//! scheduler (BENCHMARKS.md has both).

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    nsq_sansio::driver::tools::bench::<nsq_tokio::Tokio>("nsq-tokio").await
}
