//! nsq's `to_nsq`, on tokio: see `nsq_sansio::driver::tools` for the flags.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    nsq_sansio::driver::tools::to_nsq::<nsq_tokio::Tokio>().await
}
