//! [NSQ](https://nsq.io) producer and consumer for the [tokio](https://tokio.rs) runtime.
//!
//! Every protocol decision is made by the sans-IO core, `nsq-sansio`; this crate only gives it
//! tokio's TCP, timer and spawn. `nsq-async-std` and `nsq-smol` export the same names with the
//! same signatures.
//!
//! Create producers and consumers inside a tokio runtime: they spawn their tasks on it.
//!
//! ```no_run
//! use nsq_tokio::{Config, Consumer, Message, Producer};
//!
//! # async fn run() -> Result<(), nsq_tokio::Error> {
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
//! use nsq_tokio::{Config, PoolOptions, Producer, Strategy};
//!
//! # async fn run() -> Result<(), nsq_tokio::Error> {
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

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

pub use nsq_sansio::driver::{Error, Handler, HandlerError, HandlerResult, Message, Messages};
pub use nsq_sansio::{
    AuthResponse, Config, ConsumerStats, Health, MessageId, NsqdStats, PoolError, PoolOptions, Strategy,
};

/// A producer on tokio: see [`nsq_sansio::driver::Producer`].
pub type Producer = nsq_sansio::driver::Producer<Tokio>;
/// A consumer on tokio: see [`nsq_sansio::driver::Consumer`].
pub type Consumer = nsq_sansio::driver::Consumer<Tokio>;

/// tokio's TCP, timer and spawn, for the driver.
#[derive(Debug, Clone, Copy)]
pub struct Tokio;

impl nsq_sansio::driver::Runtime for Tokio {
    type Reader = OwnedReadHalf;
    type Writer = OwnedWriteHalf;

    async fn connect(addr: String, local_addr: Option<SocketAddr>) -> io::Result<(OwnedReadHalf, OwnedWriteHalf)> {
        let stream = match local_addr {
            None => TcpStream::connect(addr).await?,
            Some(local) => {
                let remotes = tokio::net::lookup_host(addr).await?;
                nsq_sansio::driver::connect_from(local, remotes, |remote| async move {
                    let socket = if remote.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                    socket.bind(local)?;
                    socket.connect(remote).await
                })
                .await?
            }
        };
        stream.set_nodelay(true)?;
        Ok(stream.into_split())
    }

    async fn read(reader: &mut OwnedReadHalf, buf: &mut BytesMut) -> io::Result<usize> {
        nsq_sansio::driver::reserve_read_room(buf);
        reader.read_buf(buf).await
    }

    async fn write_all(writer: &mut OwnedWriteHalf, data: &[u8]) -> io::Result<()> {
        writer.write_all(data).await
    }

    async fn shutdown(writer: &mut OwnedWriteHalf) -> io::Result<()> {
        writer.shutdown().await
    }

    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(future: F) {
        tokio::spawn(future);
    }

    async fn sleep_until(deadline: Instant) {
        tokio::time::sleep_until(deadline.into()).await
    }

    fn now() -> Instant {
        tokio::time::Instant::now().into_std()
    }
}
