//! Throughput benchmark on async-std: see `nsq_sansio::driver::tools` for the flags.
//!
//! One client on one thread, as the tokio and smol benches: async-std's executor gets one
//! thread (unless `ASYNC_STD_THREAD_COUNT` says otherwise) and the benchmark runs as a task on
//! it, so the engine, its dial tasks and the handlers wake each other without crossing
//! threads (BENCHMARKS.md has the difference).

fn main() -> std::process::ExitCode {
    // Read once, when the executor starts: before anything is spawned.
    if std::env::var_os("ASYNC_STD_THREAD_COUNT").is_none() {
        std::env::set_var("ASYNC_STD_THREAD_COUNT", "1");
    }
    async_std::task::block_on(async_std::task::spawn(nsq_sansio::driver::tools::bench::<nsq_async_std::AsyncStd>(
        "nsq-async-std",
    )))
}
