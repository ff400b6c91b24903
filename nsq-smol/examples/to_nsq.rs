//! nsq's `to_nsq`, on smol: see `nsq_sansio::driver::tools` for the flags.

fn main() -> std::process::ExitCode {
    smol::block_on(nsq_sansio::driver::tools::to_nsq::<nsq_smol::Smol>())
}
