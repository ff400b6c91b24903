//! [NSQ](https://nsq.io) producer and consumer for the [async-std](https://async.rs) runtime.
//!
//! Every protocol decision is made by the sans-IO core, `nsq-sansio`; this crate only gives it
//! async-std's TCP, timer and spawn. `nsq-tokio` and `nsq-smol` export the same names with the
//! same signatures.
//!
//! ```no_run
//! use nsq_async_std::{Config, Consumer, Message, Producer};
//!
//! # async fn run() -> Result<(), nsq_async_std::Error> {
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
//! use nsq_async_std::{Config, PoolOptions, Producer, Strategy};
//!
//! # async fn run() -> Result<(), nsq_async_std::Error> {
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
    runtime: AsyncStd ("async-std"),
    stream: async_std::net::TcpStream,
    async_io: async_io::Async<std::net::TcpStream>,
    resolve: |addr| async_std::net::ToSocketAddrs::to_socket_addrs(&addr),
    from_std: |socket| std::io::Result::Ok(async_std::net::TcpStream::from(socket)),
    spawn: |future| async_std::task::spawn(future),
    sleep_until: |deadline| async_std::task::sleep(deadline.saturating_duration_since(std::time::Instant::now())),
}
