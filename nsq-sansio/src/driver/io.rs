//! The tasks that touch sockets: one reader and one writer per nsqd connection, one task per
//! lookupd query. They move bytes and report; they decide nothing.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_channel::{mpsc, oneshot};
use futures_util::future::{select, Either};
use futures_util::{SinkExt, StreamExt};
use tracing::{debug, trace, Instrument};

use super::{with_timeout, Runtime};
use crate::{ConnId, QueryId};

/// Read buffer growth per read: large enough to drain a busy socket in few syscalls.
const READ_CHUNK: usize = 64 * 1024;
/// The largest lookupd response read.
const MAX_LOOKUPD_RESPONSE: usize = 4 * 1024 * 1024;
/// How long a closed connection waits for nsqd's EOF after half-closing.
const LINGER: Duration = Duration::from_secs(5);
/// How long one lookupd query may take, connect to last byte.
const LOOKUPD_TIMEOUT: Duration = Duration::from_secs(60);

/// What the socket tasks report to the engine.
#[derive(Debug)]
pub(crate) enum IoEvent {
    Connected(ConnId, Writer),
    ConnectFailed(ConnId, String),
    Read(ConnId, BytesMut),
    Eof(ConnId),
    Written(ConnId),
    /// The writer wrote everything it was given and shut the socket down.
    WriterDone(ConnId),
    Lookupd(QueryId, Result<Bytes, String>),
}

/// The engine's end of a connection: bytes to write go in; dropping it closes the socket
/// after the queued writes and stops the reader.
#[derive(Debug)]
pub(crate) struct Writer {
    bytes: mpsc::UnboundedSender<Bytes>,
    _stop_reader: oneshot::Sender<()>,
    /// A write is under way; the engine polls the core again once it is done.
    pub(crate) busy: bool,
}

impl Writer {
    pub(crate) fn send(&mut self, bytes: Bytes) {
        self.busy = self.bytes.unbounded_send(bytes).is_ok();
    }
}

/// Channels from the socket tasks to the engine: reads are bounded, so a flood from the
/// network waits in the socket instead of memory.
#[derive(Debug, Clone)]
pub(crate) struct Reports {
    pub(crate) control: mpsc::UnboundedSender<IoEvent>,
    pub(crate) reads: mpsc::Sender<IoEvent>,
}

/// Dials `addr` and runs the connection's reader and writer tasks.
pub(crate) fn spawn_connection<R: Runtime>(
    conn: ConnId,
    addr: String,
    dial_timeout: Duration,
    write_timeout: Duration,
    reports: Reports,
    span: tracing::Span,
) {
    let task = async move {
        let (mut reader, mut writer) = match with_timeout::<R, _>(dial_timeout, R::connect(addr.clone())).await {
            Ok(halves) => halves,
            Err(e) => {
                debug!(%e, "connect failed");
                let _ = reports.control.unbounded_send(IoEvent::ConnectFailed(conn, format!("{addr}: {e}")));
                return;
            }
        };
        debug!("connected");
        let (bytes_tx, mut bytes_rx) = mpsc::unbounded::<Bytes>();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let writer_handle = Writer { bytes: bytes_tx, _stop_reader: stop_tx, busy: false };
        if reports.control.unbounded_send(IoEvent::Connected(conn, writer_handle)).is_err() {
            return;
        }
        let control = reports.control.clone();
        R::spawn(
            async move {
                while let Some(bytes) = bytes_rx.next().await {
                    trace!(len = bytes.len(), "write");
                    if let Err(e) = with_timeout::<R, _>(write_timeout, R::write_all(&mut writer, &bytes)).await {
                        debug!(%e, "write failed");
                        let _ = control.unbounded_send(IoEvent::Eof(conn));
                        return;
                    }
                    if control.unbounded_send(IoEvent::Written(conn)).is_err() {
                        break;
                    }
                }
                let _ = R::shutdown(&mut writer).await;
                let _ = control.unbounded_send(IoEvent::WriterDone(conn));
            }
            .instrument(tracing::Span::current()),
        );
        let mut reads = reports.reads;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            let n = {
                let read = std::pin::pin!(R::read(&mut reader, &mut buf));
                match select(read, &mut stop_rx).await {
                    Either::Left((result, _)) => Some(result),
                    Either::Right(_) => None,
                }
            };
            let Some(n) = n else {
                // The core closed the connection and the writer half-closes it: read on until
                // nsqd's EOF, so the socket is not torn down (RST) with data unread, which
                // would make the kernel discard our last writes.
                let drain = async {
                    loop {
                        buf.clear();
                        buf.reserve(READ_CHUNK);
                        if R::read(&mut reader, &mut buf).await? == 0 {
                            return Ok(());
                        }
                    }
                };
                let _ = with_timeout::<R, ()>(LINGER, drain).await;
                return;
            };
            let event = match n {
                Ok(0) => IoEvent::Eof(conn),
                Ok(_) => IoEvent::Read(conn, buf.split()),
                Err(e) => {
                    debug!(%e, "read failed");
                    IoEvent::Eof(conn)
                }
            };
            let eof = matches!(event, IoEvent::Eof(_));
            if reads.send(event).await.is_err() || eof {
                return;
            }
        }
    };
    R::spawn(task.instrument(span));
}

/// Sends one lookupd request and reports the whole response.
pub(crate) fn spawn_lookupd<R: Runtime>(
    query: QueryId,
    addr: String,
    request: Bytes,
    control: mpsc::UnboundedSender<IoEvent>,
) {
    R::spawn(async move {
        let exchange = async {
            let (mut reader, mut writer) = R::connect(addr.clone()).await?;
            R::write_all(&mut writer, &request).await?;
            let mut buf = BytesMut::with_capacity(8 * 1024);
            loop {
                if buf.len() > MAX_LOOKUPD_RESPONSE {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "lookupd response too large"));
                }
                buf.reserve(8 * 1024);
                if R::read(&mut reader, &mut buf).await? == 0 {
                    return Ok(buf.freeze());
                }
            }
        };
        let result = with_timeout::<R, _>(LOOKUPD_TIMEOUT, exchange).await.map_err(|e| format!("{addr}: {e}"));
        let _ = control.unbounded_send(IoEvent::Lookupd(query, result));
    });
}
