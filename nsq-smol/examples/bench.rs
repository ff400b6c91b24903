//! Throughput benchmark on smol: see `nsq_sansio::driver::tools` for the flags.

fn main() -> std::process::ExitCode {
    smol::block_on(nsq_sansio::driver::tools::bench::<nsq_smol::Smol>("nsq-smol"))
}
