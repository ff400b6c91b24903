//! [NSQ](https://nsq.io) producer and consumer for the [smol](https://github.com/smol-rs/smol)
//! runtime.
//!
//! Every protocol decision is made by the sans-IO core, `nsq-sansio`; this crate only gives it
//! smol's TCP, timer and spawn. `nsq-tokio` and `nsq-async-std` export the same names with the
//! same signatures. Tasks run on smol's global executor.
//!
//! ```no_run
//! use nsq_smol::{Config, Consumer, Message, Producer};
//!
//! # async fn run() -> Result<(), nsq_smol::Error> {
//! let producer = Producer::new("127.0.0.1:4150", Config::new())?;
//! producer.publish("events", "hello").await?;
//!
//! let consumer = Consumer::new("events", "archive", Config::new())?;
//! consumer.add_handler(|message: Message| async move {
//!     println!("{}", String::from_utf8_lossy(message.body()));
//!     Ok::<_, std::io::Error>(())
//! });
//! consumer.connect_to_nsqlookupd("127.0.0.1:4161").await?;
//! consumer.stopped().await;
//! # Ok(())
//! # }
//! ```
//!
//! Publishing to several nsqds, the first one preferred while it is up:
//!
//! ```no_run
//! use nsq_smol::{Config, PoolOptions, Producer, Strategy};
//!
//! # async fn run() -> Result<(), nsq_smol::Error> {
//! let nsqds = ["10.0.0.1:4150", "10.0.0.2:4150"];
//! let producer = Producer::pool(nsqds, PoolOptions::new(Strategy::Failover), Config::new())?;
//! producer.publish("events", "hello").await?;
//! # Ok(())
//! # }
//! ```
//!
//! Failures come back with their cause: see "When things fail" in the README and the
//! `Producer` and `Consumer` docs.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use nsq_sansio::driver::{Error, Handler, HandlerError, HandlerResult, Message, Messages};
pub use nsq_sansio::{
    AuthResponse, Config, ConsumerStats, Health, MessageId, NsqdStats, PoolError, PoolOptions, Strategy,
};

nsq_sansio::__futures_io_runtime! {
    runtime: Smol ("smol"),
    stream: smol::net::TcpStream,
    async_io: smol::Async<std::net::TcpStream>,
    resolve: |addr| smol::net::resolve(addr),
    from_std: |socket| smol::net::TcpStream::try_from(socket),
    spawn: |future| smol::spawn(future).detach(),
    sleep_until: |deadline| smol::Timer::at(deadline),
}
