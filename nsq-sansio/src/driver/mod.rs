//! The async layer, written once for every runtime: [`Producer`], [`Consumer`], [`Message`],
//! [`Handler`], generic over a four-capability [`Runtime`].
//!
//! Enabled by the `driver` feature; it depends on no runtime. The runtime crates (`nsq-tokio`,
//! `nsq-async-std`, `nsq-smol`) implement [`Runtime`] and export these types under the same
//! names. Each producer or consumer runs one engine task that owns the sans-IO state machine
//! and polls its connections' reads and writes itself (a dial, and a closed connection's last
//! write and linger, run in tasks of their own); handles talk to the engine over channels. The
//! engine decides nothing itself: it carries out what the state machine says.
//!
//! To run on another executor, implement [`Runtime`]; if its TCP stream is a cloneable
//! futures-io stream, implement the smaller [`FuturesIoRuntime`] instead (connect, shutdown,
//! spawn, sleep) and reads and writes come with it.

mod batch;
mod consumer;
mod io;
mod message;
mod producer;
mod queue;
#[cfg(feature = "tools")]
pub mod tools;

use std::future::Future;
use std::io as stdio;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;

pub use consumer::{Consumer, Messages};
pub use message::{Handler, HandlerError, HandlerResult, Message};
pub use producer::Producer;

use crate::{
    CommandError, ConfigError, ConnectionError, ConsumerError, LookupdError, NameError, PoolError, PublishError,
};

/// What a runtime crate provides: TCP, a timer, a way to spawn. Everything else is shared.
pub trait Runtime: Send + Sync + 'static {
    /// The read half of a TCP connection.
    type Reader: Send + 'static;
    /// The write half of a TCP connection.
    type Writer: Send + 'static;

    /// Connects to `addr` (`host:port`) with TCP_NODELAY set, from `local_addr` when given
    /// (bind before connect: see [`connect_from`]). The driver applies the dial timeout
    /// around it.
    fn connect(
        addr: String,
        local_addr: Option<SocketAddr>,
    ) -> impl Future<Output = stdio::Result<(Self::Reader, Self::Writer)>> + Send;

    /// Reads what is available and appends it to `buf`; `Ok(0)` is end of file. The reader
    /// chooses the room it reads into: a runtime that reads into spare capacity makes it with
    /// [`reserve_read_room`].
    fn read(reader: &mut Self::Reader, buf: &mut BytesMut) -> impl Future<Output = stdio::Result<usize>> + Send;

    /// Writes all of `data`.
    fn write_all(writer: &mut Self::Writer, data: &[u8]) -> impl Future<Output = stdio::Result<()>> + Send;

    /// Shuts down the write direction (TCP FIN).
    fn shutdown(writer: &mut Self::Writer) -> impl Future<Output = stdio::Result<()>> + Send;

    /// Runs `future` to completion in the background.
    fn spawn<F: Future<Output = ()> + Send + 'static>(future: F);

    /// Completes at `deadline`.
    fn sleep_until(deadline: Instant) -> impl Future<Output = ()> + Send;

    /// The runtime's clock.
    fn now() -> Instant {
        Instant::now()
    }
}

/// What a runtime whose TCP stream is a cloneable futures-io stream (async-std, smol) provides;
/// every such runtime is a [`Runtime`] through this trait, with reads and writes written once.
pub trait FuturesIoRuntime: Send + Sync + 'static {
    /// The TCP stream; one clone reads while another writes.
    type Stream: futures_util::io::AsyncRead + futures_util::io::AsyncWrite + Clone + Unpin + Send + Sync + 'static;

    /// Connects to `addr` (`host:port`) with TCP_NODELAY set, from `local_addr` when given.
    fn connect(
        addr: String,
        local_addr: Option<SocketAddr>,
    ) -> impl Future<Output = stdio::Result<Self::Stream>> + Send;

    /// Shuts down the write direction (TCP FIN).
    fn shutdown(stream: &Self::Stream) -> stdio::Result<()>;

    /// Runs `future` to completion in the background.
    fn spawn<F: Future<Output = ()> + Send + 'static>(future: F);

    /// Completes at `deadline`.
    fn sleep_until(deadline: Instant) -> impl Future<Output = ()> + Send;
}

/// Bytes a read gets room for: enough to drain a busy socket in few syscalls.
const READ_CHUNK: usize = 64 * 1024;

/// Makes room in `buf` for a read into its spare capacity: reads go on in the same buffer
/// while half a chunk is left, since a new buffer per small read (a burst of OKs) would cost
/// an allocation each.
pub fn reserve_read_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
}

/// The read half of a [`FuturesIoRuntime`]'s stream, with the room its reads fill.
///
/// A futures-io read takes initialized bytes. The room is zeroed once per chunk, and each
/// read hands over the front of it that it filled, so no byte is zeroed twice. Zeroing the
/// buffer's spare capacity at every read instead (up to 96 KiB for a 10-byte OK) was a fifth
/// of the instructions nsq-smol spent publishing with 200 callers.
pub struct FuturesIoReader<S> {
    stream: S,
    /// Zeroed bytes that no read has filled yet.
    room: BytesMut,
}

impl<S: futures_util::io::AsyncRead + Unpin> FuturesIoReader<S> {
    fn new(stream: S) -> Self {
        Self { stream, room: BytesMut::new() }
    }

    async fn read(&mut self, buf: &mut BytesMut) -> stdio::Result<usize> {
        use futures_util::io::AsyncReadExt;
        if self.room.len() < READ_CHUNK / 2 {
            self.room = BytesMut::zeroed(READ_CHUNK);
        }
        let n = self.stream.read(&mut self.room).await?;
        // Takes the filled bytes without a copy when `buf` is empty, as the engine's is.
        buf.unsplit(self.room.split_to(n));
        Ok(n)
    }
}

impl<S> std::fmt::Debug for FuturesIoReader<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuturesIoReader").field("room", &self.room.len()).finish_non_exhaustive()
    }
}

impl<T: FuturesIoRuntime> Runtime for T {
    type Reader = FuturesIoReader<T::Stream>;
    type Writer = T::Stream;

    async fn connect(addr: String, local_addr: Option<SocketAddr>) -> stdio::Result<(Self::Reader, T::Stream)> {
        let stream = <T as FuturesIoRuntime>::connect(addr, local_addr).await?;
        Ok((FuturesIoReader::new(stream.clone()), stream))
    }

    async fn read(reader: &mut Self::Reader, buf: &mut BytesMut) -> stdio::Result<usize> {
        reader.read(buf).await
    }

    async fn write_all(writer: &mut T::Stream, data: &[u8]) -> stdio::Result<()> {
        futures_util::io::AsyncWriteExt::write_all(writer, data).await
    }

    async fn shutdown(writer: &mut T::Stream) -> stdio::Result<()> {
        <T as FuturesIoRuntime>::shutdown(writer)
    }

    fn spawn<F: Future<Output = ()> + Send + 'static>(future: F) {
        <T as FuturesIoRuntime>::spawn(future);
    }

    fn sleep_until(deadline: Instant) -> impl Future<Output = ()> + Send {
        <T as FuturesIoRuntime>::sleep_until(deadline)
    }
}

/// Defines a runtime crate's public types for a futures-io runtime on `async-io` whose
/// `TcpStream` has the inherent `connect`, `set_nodelay` and `shutdown` of async-std's and
/// smol's: the unit struct implementing [`FuturesIoRuntime`], and the `Producer` and `Consumer`
/// aliases on it. `nsq-async-std` and `nsq-smol` are this macro plus their name resolution,
/// socket conversion, spawn and timer.
///
/// `resolve` turns `host:port` into a future of the addresses (anything iterable); `from_std`
/// makes the runtime's stream of a connected `std::net::TcpStream` (an `io::Result`); `Async`
/// is `async-io`'s `Async` (used to wait for a socket bound to `local_addr` to connect).
#[doc(hidden)]
#[macro_export]
macro_rules! __futures_io_runtime {
    (
        runtime: $name:ident ($label:literal),
        stream: $stream:ty,
        async_io: $async_io:ty,
        resolve: |$host:ident| $resolve:expr,
        from_std: |$std:ident| $from_std:expr,
        spawn: |$future:ident| $spawn:expr,
        sleep_until: |$deadline:ident| $sleep:expr $(,)?
    ) => {
        #[doc = concat!($label, "'s TCP, timer and spawn, for the driver.")]
        #[derive(Debug, Clone, Copy)]
        pub struct $name;

        impl $crate::driver::FuturesIoRuntime for $name {
            type Stream = $stream;

            async fn connect(addr: String, local_addr: Option<std::net::SocketAddr>) -> std::io::Result<$stream> {
                let stream = match local_addr {
                    None => <$stream>::connect(addr).await?,
                    Some(local) => {
                        let $host = addr;
                        let remotes: Vec<std::net::SocketAddr> = $resolve.await?.into_iter().collect();
                        $crate::driver::connect_from(local, remotes, |remote| async move {
                            let $std = $crate::driver::connect_bound(local, remote, |socket| async move {
                                let socket = <$async_io>::new(socket)?;
                                socket.writable().await?;
                                socket.into_inner()
                            })
                            .await?;
                            $from_std
                        })
                        .await?
                    }
                };
                stream.set_nodelay(true)?;
                Ok(stream)
            }

            fn shutdown(stream: &$stream) -> std::io::Result<()> {
                stream.shutdown(std::net::Shutdown::Write)
            }

            fn spawn<F: std::future::Future<Output = ()> + Send + 'static>($future: F) {
                $spawn;
            }

            async fn sleep_until($deadline: std::time::Instant) {
                $sleep.await;
            }
        }

        #[doc = concat!("A producer on ", $label, ": see [`nsq_sansio::driver::Producer`].")]
        pub type Producer = $crate::driver::Producer<$name>;
        #[doc = concat!("A consumer on ", $label, ": see [`nsq_sansio::driver::Consumer`].")]
        pub type Consumer = $crate::driver::Consumer<$name>;
    };
}

/// Dials, with `dial`, each of `remotes` in the address family of `local` (the address
/// `local_addr` binds to) until one connects; returns the last failure, or
/// [`AddrNotAvailable`](stdio::ErrorKind::AddrNotAvailable) when no address is of that family.
///
/// The runtime crates resolve `host:port` themselves and call this with a `dial` that binds a
/// socket to `local` before connecting it (tokio's `TcpSocket`, or [`connect_bound`]).
pub async fn connect_from<S, F, Fut>(
    local: SocketAddr,
    remotes: impl IntoIterator<Item = SocketAddr>,
    mut dial: F,
) -> stdio::Result<S>
where
    F: FnMut(SocketAddr) -> Fut,
    Fut: Future<Output = stdio::Result<S>>,
{
    let mut last = None;
    for remote in remotes.into_iter().filter(|r| r.is_ipv4() == local.is_ipv4()) {
        match dial(remote).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        stdio::Error::new(stdio::ErrorKind::AddrNotAvailable, format!("no address of local_addr {local}'s family"))
    }))
}

/// Connects a TCP socket bound to `local` to `remote` without blocking, for runtimes that
/// have no bound connect of their own: the socket is made non-blocking, bound and its connect
/// started; `writable` hands it to the runtime's reactor, waits until it is writable and hands
/// it back; then the outcome of the connect is read from the socket.
pub async fn connect_bound<F, Fut>(
    local: SocketAddr,
    remote: SocketAddr,
    writable: F,
) -> stdio::Result<std::net::TcpStream>
where
    F: FnOnce(std::net::TcpStream) -> Fut,
    Fut: Future<Output = stdio::Result<std::net::TcpStream>>,
{
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(remote), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.bind(&local.into())?;
    // Non-blocking: "in progress" is the usual answer; any other failure shows below too, as
    // the socket's error or as no peer.
    let started = socket.connect(&remote.into()).err();
    let stream = writable(socket.into()).await?;
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(stream),
        Err(e) => Err(started.unwrap_or(e)),
    }
}

/// An error from the async API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A topic or channel name is not valid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The configuration is not valid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The command was refused before anything was sent.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// nsqd refused a publish, or the connection was lost before it answered.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A pool could not publish: what each nsqd it tried said.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A lookupd address cannot be used.
    #[error(transparent)]
    Lookupd(#[from] LookupdError),
    /// The consumer refused the call.
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// The producer or consumer has stopped.
    #[error("stopped")]
    Stopped,
    /// A consumer was asked to connect before it had a handler or its message stream was
    /// taken: nothing would receive the messages.
    #[error("no handler: add a handler or take the message stream before connecting")]
    NoHandlers,
}

impl From<Error> for stdio::Error {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::Name(_) | Error::Config(_) | Error::Command(_) | Error::NoHandlers | Error::Lookupd(_) => {
                stdio::ErrorKind::InvalidInput
            }
            Error::Publish(PublishError::ConnectionLost(_) | PublishError::NotConnected(_)) | Error::Connection(_) => {
                stdio::ErrorKind::ConnectionAborted
            }
            _ => stdio::ErrorKind::Other,
        };
        Self::new(kind, e)
    }
}

/// Fills `client_id` and `hostname` from the machine's host name when unset, as go-nsq does
/// (the core itself reads nothing from the OS).
pub(crate) fn with_identity(mut config: crate::Config) -> crate::Config {
    if config.hostname.is_empty() {
        let name = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        config.hostname = name;
    }
    if config.client_id.is_empty() {
        config.client_id = config.hostname.split('.').next().unwrap_or_default().to_owned();
    }
    config
}

/// Runs `future` unless `timeout` passes first. A future that is ready at once (most writes
/// are) arms no timer.
async fn with_timeout<R: Runtime, T>(
    timeout: Duration,
    future: impl Future<Output = stdio::Result<T>>,
) -> stdio::Result<T> {
    use futures_util::future::{select, Either};
    let mut future = std::pin::pin!(future);
    if let std::task::Poll::Ready(result) = futures_util::poll!(future.as_mut()) {
        return result;
    }
    let deadline = crate::connection::deadline(R::now(), timeout);
    let sleep = std::pin::pin!(R::sleep_until(deadline));
    match select(future, sleep).await {
        Either::Left((result, _)) => result,
        Either::Right(((), _)) => {
            Err(stdio::Error::new(stdio::ErrorKind::TimedOut, format!("timed out after {timeout:?}")))
        }
    }
}

/// An engine's timer: one sleep kept across the turns of its loop, instead of a new one each
/// turn (registering a timer costs a lock, and on async-io a wake of the reactor). The state
/// machine's deadline mostly moves later (every read pushes the read timeout back): the armed
/// sleep is kept then, fires early, and the early `handle_timeout` is a no-op for the state
/// machines; only a deadline earlier than the armed one replaces it.
struct EngineTimer {
    armed: Option<(Instant, Sleep)>,
}

/// A runtime's sleep, boxed once per deadline.
type Sleep = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl EngineTimer {
    fn new() -> Self {
        Self { armed: None }
    }

    /// Makes sure the timer fires at `deadline` or before.
    fn arm<R: Runtime>(&mut self, deadline: Option<Instant>) {
        match (deadline, &self.armed) {
            (None, _) => self.armed = None,
            (Some(deadline), Some((at, _))) if *at <= deadline => {}
            (Some(deadline), _) => self.armed = Some((deadline, Box::pin(R::sleep_until(deadline)))),
        }
    }

    /// Completes when the armed sleep does (never if none is), and disarms it.
    fn fired(&mut self) -> impl Future<Output = ()> + '_ {
        futures_util::future::poll_fn(move |cx| match &mut self.armed {
            Some((_, sleep)) => {
                std::task::ready!(sleep.as_mut().poll(cx));
                self.armed = None;
                std::task::Poll::Ready(())
            }
            None => std::task::Poll::Pending,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures_util::FutureExt;

    use super::*;

    /// Hands out `data` in reads of the given sizes, then EOF.
    struct Chunked {
        data: Vec<u8>,
        sizes: Vec<usize>,
    }

    impl futures_util::io::AsyncRead for Chunked {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<stdio::Result<usize>> {
            let want = if self.sizes.is_empty() { usize::MAX } else { self.sizes.remove(0) };
            let n = want.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data.drain(..n);
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn futures_io_reads_come_out_whole_and_small_ones_share_one_room() {
        let data: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
        let mut sizes = vec![10; 1000];
        sizes.extend([READ_CHUNK, 5, READ_CHUNK / 2 + 1, 40_000, 1]);
        let mut reader = FuturesIoReader::new(Chunked { data: data.clone(), sizes });
        let mut got = Vec::new();
        let mut small_reads_at = Vec::new();
        loop {
            let mut buf = BytesMut::new();
            let n = reader.read(&mut buf).now_or_never().unwrap().unwrap();
            assert_eq!(buf.len(), n);
            if n == 0 {
                break;
            }
            if small_reads_at.len() < 1000 {
                small_reads_at.push(buf.as_ptr() as usize);
            }
            got.extend_from_slice(&buf);
        }
        assert_eq!(got, data);
        // Each small read took the bytes right after the previous one's: one zeroed room for
        // all of them, none zeroed again.
        assert!(small_reads_at.windows(2).all(|w| w[1] == w[0] + 10));
    }

    #[test]
    fn a_futures_io_read_appends_to_what_the_buffer_holds() {
        let mut reader = FuturesIoReader::new(Chunked { data: b"hello world".to_vec(), sizes: vec![5, 6] });
        let mut buf = BytesMut::new();
        reader.read(&mut buf).now_or_never().unwrap().unwrap();
        reader.read(&mut buf).now_or_never().unwrap().unwrap();
        assert_eq!(&buf[..], b"hello world");
    }
}
