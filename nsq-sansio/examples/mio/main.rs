//! The whole client in your own event loop: one thread, one mio `Poll`, a `ConsumerState`
//! that finds its nsqds through nsqlookupd and `ProducerState`s side by side.
//!
//! ```text
//! cargo run -p nsq-sansio --example mio -- 127.0.0.1:4161 mio_example 10 127.0.0.1:4150
//! ```
//!
//! Arguments: the lookupd HTTP address, the topic, how many messages, and one or more nsqd TCP
//! addresses. Publishes the messages round robin over the nsqds, then consumes the topic on
//! the channel `mio_example` from every nsqd lookupd lists, printing each message, and stops
//! once that many arrived. It exits 0 once every connection closed, or 1 with the cause.
//!
//! `reactor.rs` is the I/O (dial with a timeout, partial writes, reads, closing, sleeping until
//! the next deadline); `round_trip.rs` is the application. The core does the rest: the
//! handshake, RDY across nsqds, heartbeats, redials, and lookupd's HTTP and JSON.

mod reactor;
mod round_trip;

use std::process::ExitCode;

use round_trip::RoundTrip;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count = args.get(2).and_then(|n| n.parse().ok());
    let (Some(lookupd), Some(topic), Some(count), nsqds) = (args.first(), args.get(1), count, args.get(3..)) else {
        eprintln!("usage: mio LOOKUPD_HTTP_ADDRESS TOPIC COUNT NSQD_TCP_ADDRESS...");
        return ExitCode::FAILURE;
    };
    let round_trip = RoundTrip {
        lookupd: lookupd.clone(),
        nsqds: nsqds.unwrap_or_default().to_vec(),
        topic: topic.clone(),
        channel: "mio_example".to_owned(),
        count,
    };
    let result = round_trip::config()
        .and_then(|config| round_trip.run(config, |message| println!("{}", String::from_utf8_lossy(&message.body))));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
