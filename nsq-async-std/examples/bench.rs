//! Throughput benchmark on async-std: see `nsq_sansio::driver::tools` for the flags.

#[async_std::main]
async fn main() -> std::process::ExitCode {
    nsq_sansio::driver::tools::bench::<nsq_async_std::AsyncStd>("nsq-async-std").await
}
