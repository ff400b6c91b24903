//! The tasks that touch sockets: one reader and one writer per connection (to an nsqd, or a
//! consumer's lookupd query). They move bytes and report; they decide nothing.

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_channel::{mpsc, oneshot};
use futures_util::future::{select, Either};
use futures_util::{SinkExt, StreamExt};
use tracing::{debug, trace, Instrument};

use super::{with_timeout, Runtime};
use crate::{Action, ConnId, Machine, SocketError};

/// Read buffer growth per read: large enough to drain a busy socket in few syscalls.
const READ_CHUNK: usize = 64 * 1024;
/// How long a closed connection waits for nsqd's EOF after half-closing.
const LINGER: Duration = Duration::from_secs(5);

/// What the socket tasks report to the engine.
#[derive(Debug)]
pub(crate) enum IoEvent {
    Connected(ConnId, Writer),
    ConnectFailed(ConnId, SocketError),
    Read(ConnId, BytesMut),
    Eof(ConnId),
    /// Reading or writing failed.
    Failed(ConnId, SocketError),
    Written(ConnId),
    /// The writer task ended: it wrote everything it was given and shut the socket down, or a
    /// write failed.
    WriterDone(ConnId),
}

/// The engine's end of a connection: bytes to write go in; dropping it closes the socket
/// after the queued writes and stops the reader.
#[derive(Debug)]
pub(crate) struct Writer {
    bytes: mpsc::UnboundedSender<Bytes>,
    _stop_reader: oneshot::Sender<()>,
    /// A write is under way; the engine polls the core again once it is done.
    pub(crate) busy: bool,
    /// The writer task has ended (a write failed): nothing more will be written or flushed.
    done: bool,
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
    local_addr: Option<SocketAddr>,
    dial_timeout: Duration,
    write_timeout: Duration,
    reports: Reports,
    span: tracing::Span,
) {
    let task = async move {
        let (mut reader, mut writer) =
            match with_timeout::<R, _>(dial_timeout, R::connect(addr.clone(), local_addr)).await {
                Ok(halves) => halves,
                Err(e) => {
                    debug!(%e, "connect failed");
                    let _ = reports.control.unbounded_send(IoEvent::ConnectFailed(conn, e.into()));
                    return;
                }
            };
        debug!("connected");
        let (bytes_tx, mut bytes_rx) = mpsc::unbounded::<Bytes>();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let writer_handle = Writer { bytes: bytes_tx, _stop_reader: stop_tx, busy: false, done: false };
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
                        let _ = control.unbounded_send(IoEvent::Failed(conn, e.into()));
                        let _ = control.unbounded_send(IoEvent::WriterDone(conn));
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
                    IoEvent::Failed(conn, e.into())
                }
            };
            let eof = matches!(event, IoEvent::Eof(_) | IoEvent::Failed(..));
            if reads.send(event).await.is_err() || eof {
                return;
            }
        }
    };
    R::spawn(task.instrument(span));
}

/// An engine's sockets: dials, writers, and the reports coming back from their tasks.
pub(crate) struct Sockets<R: Runtime> {
    reports: Reports,
    events: futures_util::stream::Select<mpsc::UnboundedReceiver<IoEvent>, mpsc::Receiver<IoEvent>>,
    writers: HashMap<ConnId, Writer>,
    /// The nsqd address of each connection dialled and not yet closed.
    addrs: HashMap<ConnId, std::sync::Arc<str>>,
    /// Connections the core closed whose writer is still flushing their last bytes.
    flushing: HashSet<ConnId>,
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> Sockets<R> {
    pub(crate) fn new() -> Self {
        let (control, control_rx) = mpsc::unbounded();
        let (reads, reads_rx) = mpsc::channel(16);
        Self {
            reports: Reports { control, reads },
            events: futures_util::stream::select(control_rx, reads_rx),
            writers: HashMap::new(),
            addrs: HashMap::new(),
            flushing: HashSet::new(),
            _runtime: PhantomData,
        }
    }

    /// The next report from a socket task.
    pub(crate) async fn next(&mut self) -> Option<IoEvent> {
        self.events.next().await
    }

    /// A report that is ready now, if any.
    pub(crate) fn try_next(&mut self) -> Option<IoEvent> {
        use futures_util::FutureExt;
        self.events.next().now_or_never().flatten()
    }

    /// The nsqd address of a live connection.
    pub(crate) fn addr(&self, conn: ConnId) -> std::sync::Arc<str> {
        self.addrs.get(&conn).cloned().unwrap_or_else(|| "".into())
    }

    /// Whether every closed connection's last bytes are written.
    pub(crate) fn flushed(&self) -> bool {
        self.flushing.is_empty()
    }

    /// Hands a report to the state machine, keeping the writers' books.
    pub(crate) fn apply(&mut self, event: IoEvent, machine: &mut impl Machine, now: Instant) {
        match event {
            IoEvent::Connected(conn, writer) => {
                // A connection the core closed while it was being dialled is dropped here,
                // which closes the socket and ends its reader.
                if self.addrs.contains_key(&conn) {
                    self.writers.insert(conn, writer);
                    machine.handle_connected(conn, now);
                }
            }
            IoEvent::ConnectFailed(conn, error) => machine.handle_connect_failed(conn, error, now),
            IoEvent::Read(conn, bytes) => machine.handle_input(conn, now, bytes),
            IoEvent::Eof(conn) => machine.handle_eof(conn, now),
            IoEvent::Failed(conn, error) => machine.handle_io_error(conn, error, now),
            IoEvent::Written(conn) => {
                if let Some(w) = self.writers.get_mut(&conn) {
                    w.busy = false;
                }
            }
            IoEvent::WriterDone(conn) => {
                // Ended before the core closed the connection (a write failed): its close
                // then has nothing to wait for.
                if let Some(w) = self.writers.get_mut(&conn) {
                    w.done = true;
                }
                self.flushing.remove(&conn);
            }
        }
    }

    /// Carries out the machine's actions and writes what it has for idle connections.
    /// Returns whether anything happened.
    pub(crate) fn pump(&mut self, machine: &mut impl Machine) -> bool {
        let mut progress = false;
        while let Some(action) = machine.poll_action() {
            progress = true;
            match action {
                Action::Connect { conn, addr, local_addr, timeout, write_timeout } => {
                    self.addrs.insert(conn, addr.as_str().into());
                    let span = tracing::debug_span!("socket", %addr, %conn);
                    spawn_connection::<R>(conn, addr, local_addr, timeout, write_timeout, self.reports.clone(), span);
                }
                Action::Close { conn } => {
                    self.addrs.remove(&conn);
                    // The connection's last bytes go out before the writer closes.
                    if let Some(mut writer) = self.writers.remove(&conn) {
                        let last = machine.poll_transmit_for(conn);
                        if !writer.done {
                            self.flushing.insert(conn);
                            if let Some(bytes) = last {
                                writer.send(bytes);
                            }
                        }
                    }
                }
            }
        }
        // Only connections whose previous write finished: what queues meanwhile leaves as one.
        for (&conn, writer) in self.writers.iter_mut().filter(|(_, w)| !w.busy) {
            if let Some(bytes) = machine.poll_transmit_for(conn) {
                progress = true;
                writer.send(bytes);
            }
        }
        progress
    }
}
