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
//! let producer = Producer::new("127.0.0.1:4150", Config::new());
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
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::io;
use std::net::Shutdown;
use std::time::Instant;

use async_std::net::TcpStream;
use bytes::BytesMut;
use futures_util::io::AsyncWriteExt;

pub use nsq_sansio::driver::{Error, Handler, HandlerError, HandlerResult, Message, Messages};
pub use nsq_sansio::{Config, ConsumerStats, MessageId};

/// A producer on async-std: see [`nsq_sansio::driver::Producer`].
pub type Producer = nsq_sansio::driver::Producer<AsyncStd>;
/// A consumer on async-std: see [`nsq_sansio::driver::Consumer`].
pub type Consumer = nsq_sansio::driver::Consumer<AsyncStd>;

/// async-std's TCP, timer and spawn, for the driver.
#[derive(Debug, Clone, Copy)]
pub struct AsyncStd;

impl nsq_sansio::driver::Runtime for AsyncStd {
    type Reader = TcpStream;
    type Writer = TcpStream;

    async fn connect(addr: String) -> io::Result<(TcpStream, TcpStream)> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok((stream.clone(), stream))
    }

    async fn read(reader: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
        nsq_sansio::driver::read_buf(reader, buf).await
    }

    async fn write_all(writer: &mut TcpStream, data: &[u8]) -> io::Result<()> {
        writer.write_all(data).await
    }

    async fn shutdown(writer: &mut TcpStream) -> io::Result<()> {
        writer.shutdown(Shutdown::Write)
    }

    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(future: F) {
        async_std::task::spawn(future);
    }

    async fn sleep_until(deadline: Instant) {
        async_std::task::sleep(deadline.saturating_duration_since(Instant::now())).await
    }
}
