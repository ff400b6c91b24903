//! nsq's `nsq_tail`, on async-std: see `nsq_sansio::driver::tools` for the flags.

#[async_std::main]
async fn main() -> std::process::ExitCode {
    nsq_sansio::driver::tools::nsq_tail::<nsq_async_std::AsyncStd>().await
}
