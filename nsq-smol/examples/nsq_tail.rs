//! nsq's `nsq_tail`, on smol: see `nsq_sansio::driver::tools` for the flags.

fn main() -> std::process::ExitCode {
    smol::block_on(nsq_sansio::driver::tools::nsq_tail::<nsq_smol::Smol>())
}
