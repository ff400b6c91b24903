//! Runs the fake nsqd on a port until killed, for the `bench` tools:
//! `cargo run --release -p nsq-tests --example fake_nsqd -- 4150`.

use std::net::SocketAddr;

use nsq_tests::{FakeNsqd, FakeNsqdOptions};

fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(4150);
    let options = FakeNsqdOptions { addr: SocketAddr::from(([127, 0, 0, 1], port)), ..Default::default() };
    let nsqd = FakeNsqd::start(options).unwrap_or_else(|e| panic!("cannot listen on port {port}: {e}"));
    eprintln!("fake nsqd on {}", nsqd.addr());
    loop {
        std::thread::park();
    }
}
