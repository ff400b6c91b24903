//! Throughput benchmark on smol: see `nsq_sansio::driver::tools` for the flags.
//!
//! The benchmark itself runs as a task on smol's executor, next to the client's tasks, instead
//! of on the `block_on` thread: nothing then wakes across threads.

fn main() -> std::process::ExitCode {
    smol::block_on(smol::spawn(nsq_sansio::driver::tools::bench::<nsq_smol::Smol>("nsq-smol")))
}
