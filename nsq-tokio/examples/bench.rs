//! Throughput benchmark on tokio: see `nsq_sansio::driver::tools` for the flags.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    nsq_sansio::driver::tools::bench::<nsq_tokio::Tokio>("nsq-tokio").await
}
