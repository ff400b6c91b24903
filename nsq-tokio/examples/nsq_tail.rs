//! nsq's `nsq_tail`, on tokio: see `nsq_sansio::driver::tools` for the flags.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    nsq_sansio::driver::tools::nsq_tail::<nsq_tokio::Tokio>().await
}
