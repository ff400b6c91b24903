//! An engine's sockets. The engine polls each connection's read and write itself, so bytes go
//! from the state machine to the socket and back without crossing tasks; a write the socket
//! takes at once is done before `pump` returns. A dial runs in a task of its own, and so does
//! a closed connection's last write and linger. They move bytes and report; they decide
//! nothing.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io as stdio;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_channel::mpsc;
use futures_util::task::{ArcWake, AtomicWaker};
use futures_util::StreamExt;
use tracing::{debug, trace, Instrument};

use super::{with_timeout, Runtime};
use crate::{Action, ConnId, Machine, SocketError};

/// How long a closed connection waits for nsqd's EOF after half-closing.
const LINGER: Duration = Duration::from_secs(5);
/// Reads an engine takes one after another before it yields to the runtime. async-io's
/// sockets (async-std, smol) have no cooperative budget and read as long as there are bytes:
/// a peer that never stops sending would otherwise keep the engine from writing, and every
/// task on its thread from running.
const READS_PER_TURN: u32 = 16;

/// What the sockets report to the engine.
#[derive(Debug)]
pub(crate) enum IoEvent {
    Connected(ConnId),
    ConnectFailed(ConnId, SocketError),
    Read(ConnId, BytesMut),
    Eof(ConnId),
    /// Reading or writing failed.
    Failed(ConnId, SocketError),
    /// Every write handed to the connection so far is with the kernel.
    Written(ConnId),
}

/// What the dial and close tasks report.
enum Report<R: Runtime> {
    Dialled(ConnId, R::Reader, R::Writer),
    DialFailed(ConnId, SocketError),
    /// A closed connection's last bytes are written and its socket shut down, or a write
    /// failed.
    Flushed(ConnId, stdio::Result<()>),
}

type Reading<R> = Pin<Box<dyn Future<Output = (<R as Runtime>::Reader, BytesMut, stdio::Result<usize>)> + Send>>;
type Writing<R> = Pin<Box<dyn Future<Output = (<R as Runtime>::Writer, stdio::Result<()>)> + Send>>;

enum ReadHalf<R: Runtime> {
    Idle(R::Reader, BytesMut),
    Reading(Reading<R>),
    /// EOF, or a read failed.
    Ended,
}

enum WriteHalf<R: Runtime> {
    Idle(R::Writer),
    Writing(Writing<R>),
    /// A write failed; the error until it is reported.
    Failed(Option<SocketError>),
}

/// Marks one socket future as ready to be polled again and wakes the engine.
struct Wake {
    ready: AtomicBool,
    engine: Arc<AtomicWaker>,
}

impl ArcWake for Wake {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.ready.store(true, Ordering::Release);
        arc_self.engine.wake();
    }
}

/// A socket future's waker, and whether it fired since the future was last polled.
struct Signal {
    wake: Arc<Wake>,
    waker: Waker,
}

impl Signal {
    fn new(engine: &Arc<AtomicWaker>, ready: bool) -> Self {
        let wake = Arc::new(Wake { ready: AtomicBool::new(ready), engine: engine.clone() });
        let waker = futures_util::task::waker(wake.clone());
        Self { wake, waker }
    }

    fn take(&self) -> bool {
        self.wake.ready.swap(false, Ordering::AcqRel)
    }

    fn set(&self) {
        self.wake.ready.store(true, Ordering::Release);
    }
}

/// A connected socket, polled by the engine.
struct Conn<R: Runtime> {
    id: ConnId,
    read: ReadHalf<R>,
    write: WriteHalf<R>,
    write_timeout: Duration,
    reads: Signal,
    writes: Signal,
    /// A write ended that the engine has not been told of.
    written: bool,
    span: tracing::Span,
}

impl<R: Runtime> Conn<R> {
    /// Whether the connection can take bytes to write now (a failed one takes and drops them).
    fn idle(&self) -> bool {
        !matches!(self.write, WriteHalf::Writing(_))
    }

    fn write(&mut self, bytes: Bytes) {
        let mut writer = match std::mem::replace(&mut self.write, WriteHalf::Failed(None)) {
            WriteHalf::Idle(writer) => writer,
            // A failed connection drops what it is given, and keeps its error until it is
            // reported.
            other => {
                self.write = other;
                return;
            }
        };
        trace!(conn = %self.id, len = bytes.len(), "write");
        let timeout = self.write_timeout;
        self.write = WriteHalf::Writing(Box::pin(async move {
            let result = with_timeout::<R, _>(timeout, R::write_all(&mut writer, &bytes)).await;
            (writer, result)
        }));
        self.poll_write();
    }

    fn poll_write(&mut self) {
        let WriteHalf::Writing(future) = &mut self.write else { return };
        match future.as_mut().poll(&mut Context::from_waker(&self.writes.waker)) {
            Poll::Pending => {}
            Poll::Ready((writer, Ok(()))) => {
                self.write = WriteHalf::Idle(writer);
                self.written = true;
            }
            Poll::Ready((_, Err(e))) => {
                debug!(conn = %self.id, %e, "write failed");
                self.write = WriteHalf::Failed(Some(e.into()));
            }
        }
    }

    /// What the connection's socket has for the engine, polling what was woken.
    fn poll_event(&mut self) -> Option<IoEvent> {
        if self.writes.take() {
            self.poll_write();
        }
        if let WriteHalf::Failed(error @ Some(_)) = &mut self.write {
            return error.take().map(|e| IoEvent::Failed(self.id, e));
        }
        if std::mem::take(&mut self.written) {
            return Some(IoEvent::Written(self.id));
        }
        if !self.reads.take() {
            return None;
        }
        let mut future = match std::mem::replace(&mut self.read, ReadHalf::Ended) {
            ReadHalf::Idle(mut reader, mut buf) => Box::pin(async move {
                let result = R::read(&mut reader, &mut buf).await;
                (reader, buf, result)
            }),
            ReadHalf::Reading(future) => future,
            ReadHalf::Ended => return None,
        };
        match future.as_mut().poll(&mut Context::from_waker(&self.reads.waker)) {
            Poll::Pending => {
                self.read = ReadHalf::Reading(future);
                None
            }
            Poll::Ready((_, _, Ok(0))) => Some(IoEvent::Eof(self.id)),
            Poll::Ready((reader, mut buf, Ok(_))) => {
                let bytes = buf.split();
                self.read = ReadHalf::Idle(reader, buf);
                // The next read starts when the engine asks for the next event, after it
                // took this one: a flood from the network waits in the socket.
                self.reads.set();
                Some(IoEvent::Read(self.id, bytes))
            }
            Poll::Ready((_, _, Err(e))) => {
                debug!(conn = %self.id, %e, "read failed");
                Some(IoEvent::Failed(self.id, e.into()))
            }
        }
    }

    /// Writes `last`, half-closes and reads on until nsqd's EOF, in a task of its own; reports
    /// `Flushed` once the writes are done unless a write already failed. Returns whether it
    /// will report.
    fn close(self, last: Option<Bytes>, reports: mpsc::UnboundedSender<Report<R>>) -> bool {
        let Self { id, read, write, write_timeout, span, .. } = self;
        let report = !matches!(write, WriteHalf::Failed(_));
        let task = async move {
            let mut writer = None;
            let written = match write {
                WriteHalf::Idle(w) => Ok(w),
                WriteHalf::Writing(future) => match future.await {
                    (w, Ok(())) => Ok(w),
                    (_, Err(e)) => Err(e),
                },
                WriteHalf::Failed(_) => Err(stdio::ErrorKind::BrokenPipe.into()),
            };
            let result = match written {
                Ok(mut w) => {
                    let result = match last {
                        Some(bytes) => with_timeout::<R, _>(write_timeout, R::write_all(&mut w, &bytes)).await,
                        None => Ok(()),
                    };
                    if result.is_ok() {
                        let _ = R::shutdown(&mut w).await;
                    }
                    writer = Some(w);
                    result
                }
                Err(e) => Err(e),
            };
            if let Err(e) = &result {
                debug!(%e, "write failed");
            }
            if report {
                let _ = reports.unbounded_send(Report::Flushed(id, result));
            }
            // Read on until nsqd's EOF, so the socket is not torn down (RST) with data unread,
            // which would make the kernel discard our last writes.
            let drain = async {
                let (mut reader, mut buf) = match read {
                    ReadHalf::Idle(reader, buf) => (reader, buf),
                    ReadHalf::Reading(future) => match future.await {
                        (reader, buf, Ok(n)) if n > 0 => (reader, buf),
                        _ => return Ok(()),
                    },
                    ReadHalf::Ended => return Ok(()),
                };
                loop {
                    buf.clear();
                    if R::read(&mut reader, &mut buf).await? == 0 {
                        return Ok(());
                    }
                }
            };
            let _ = with_timeout::<R, ()>(LINGER, drain).await;
            drop(writer);
        };
        R::spawn(task.instrument(span));
        report
    }
}

/// An engine's sockets: dials, connections, and the reports of the tasks that dial and close.
pub(crate) struct Sockets<R: Runtime> {
    report: mpsc::UnboundedSender<Report<R>>,
    reports: mpsc::UnboundedReceiver<Report<R>>,
    conns: Vec<Conn<R>>,
    /// Where the next poll of the connections starts, so a busy one does not starve the rest.
    next_conn: usize,
    /// Reads handed to the engine since it last found nothing to read or yielded.
    reads_in_a_row: u32,
    /// The engine's waker, woken by every socket future.
    engine: Arc<AtomicWaker>,
    /// Each connection dialled and not yet closed.
    dialled: HashMap<ConnId, Dialled>,
    /// Connections the core closed whose last bytes are still being written.
    flushing: HashSet<ConnId>,
}

/// A connection dialled and not yet closed.
struct Dialled {
    addr: Arc<str>,
    write_timeout: Duration,
    span: tracing::Span,
}

impl<R: Runtime> Sockets<R> {
    pub(crate) fn new() -> Self {
        let (report, reports) = mpsc::unbounded();
        Self {
            report,
            reports,
            conns: Vec::new(),
            next_conn: 0,
            reads_in_a_row: 0,
            engine: Arc::default(),
            dialled: HashMap::new(),
            flushing: HashSet::new(),
        }
    }

    /// The next event from the sockets.
    pub(crate) async fn next(&mut self) -> Option<IoEvent> {
        futures_util::future::poll_fn(|cx| {
            self.engine.register(cx.waker());
            match self.poll_event(Some(cx)) {
                Some(event) => Poll::Ready(Some(event)),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// An event that is ready now, if any.
    pub(crate) fn try_next(&mut self) -> Option<IoEvent> {
        self.poll_event(None)
    }

    fn poll_event(&mut self, mut cx: Option<&mut Context<'_>>) -> Option<IoEvent> {
        loop {
            let report = match cx.as_deref_mut() {
                Some(cx) => match self.reports.poll_next_unpin(cx) {
                    Poll::Ready(report) => report,
                    Poll::Pending => None,
                },
                None => self.reports.try_recv().ok(),
            };
            let Some(report) = report else { break };
            if let Some(event) = self.take_report(report) {
                return Some(event);
            }
        }
        if self.reads_in_a_row >= READS_PER_TURN {
            if let Some(cx) = cx {
                // Yields: the engine is polled again after the tasks queued before it.
                self.reads_in_a_row = 0;
                cx.waker().wake_by_ref();
            }
            return None;
        }
        let n = self.conns.len();
        for i in 0..n {
            let at = (self.next_conn + i) % n;
            if let Some(event) = self.conns[at].poll_event() {
                self.next_conn = at + 1;
                if matches!(event, IoEvent::Read(..)) {
                    self.reads_in_a_row += 1;
                }
                return Some(event);
            }
        }
        self.reads_in_a_row = 0;
        None
    }

    fn take_report(&mut self, report: Report<R>) -> Option<IoEvent> {
        match report {
            Report::Dialled(id, reader, writer) => {
                let dialled = self.dialled.get(&id);
                let conn = Conn {
                    id,
                    read: ReadHalf::Idle(reader, BytesMut::new()),
                    write: WriteHalf::Idle(writer),
                    write_timeout: dialled.map_or(Duration::ZERO, |d| d.write_timeout),
                    reads: Signal::new(&self.engine, true),
                    writes: Signal::new(&self.engine, false),
                    written: false,
                    span: dialled.map_or_else(tracing::Span::none, |d| d.span.clone()),
                };
                if dialled.is_some() {
                    self.conns.push(conn);
                    Some(IoEvent::Connected(id))
                } else {
                    // The core closed the connection while it was being dialled.
                    let _ = conn.close(None, self.report.clone());
                    None
                }
            }
            Report::DialFailed(id, error) => Some(IoEvent::ConnectFailed(id, error)),
            Report::Flushed(id, result) => {
                self.flushing.remove(&id);
                Some(match result {
                    Ok(()) => IoEvent::Written(id),
                    Err(e) => IoEvent::Failed(id, e.into()),
                })
            }
        }
    }

    /// The nsqd address of a live connection.
    pub(crate) fn addr(&self, conn: ConnId) -> Arc<str> {
        self.dialled.get(&conn).map_or_else(|| "".into(), |d| d.addr.clone())
    }

    /// Whether every closed connection's last bytes are written.
    pub(crate) fn flushed(&self) -> bool {
        self.flushing.is_empty()
    }

    /// Hands an event to the state machine.
    pub(crate) fn apply(&mut self, event: IoEvent, machine: &mut impl Machine, now: Instant) {
        match event {
            IoEvent::Connected(conn) => machine.handle_connected(conn, now),
            IoEvent::ConnectFailed(conn, error) => machine.handle_connect_failed(conn, error, now),
            IoEvent::Read(conn, bytes) => machine.handle_input(conn, now, bytes),
            IoEvent::Eof(conn) => machine.handle_eof(conn, now),
            IoEvent::Failed(conn, error) => machine.handle_io_error(conn, error, now),
            IoEvent::Written(_) => {}
        }
    }

    /// Carries out the machine's actions and writes what it has for connections with no
    /// write under way. Returns whether anything happened.
    pub(crate) fn pump(&mut self, machine: &mut impl Machine) -> bool {
        let mut progress = false;
        while let Some(action) = machine.poll_action() {
            progress = true;
            match action {
                Action::Connect { conn, addr, local_addr, timeout, write_timeout } => {
                    let span = tracing::debug_span!("socket", %addr, %conn);
                    let dialled = Dialled { addr: addr.as_str().into(), write_timeout, span: span.clone() };
                    self.dialled.insert(conn, dialled);
                    dial::<R>(conn, addr, local_addr, timeout, self.report.clone(), span);
                }
                Action::Close { conn } => {
                    self.dialled.remove(&conn);
                    if let Some(at) = self.conns.iter().position(|c| c.id == conn) {
                        let socket = self.conns.swap_remove(at);
                        // The connection's last bytes go out before it half-closes.
                        let last = machine.poll_transmit_for(conn);
                        if socket.close(last, self.report.clone()) {
                            self.flushing.insert(conn);
                        }
                    }
                }
            }
        }
        // Only connections whose previous write finished: what queues meanwhile leaves as one.
        for conn in self.conns.iter_mut().filter(|c| c.idle()) {
            if let Some(bytes) = machine.poll_transmit_for(conn.id) {
                progress = true;
                conn.write(bytes);
            }
        }
        progress
    }
}

/// Dials `addr` in a task of its own and reports the connection's halves.
fn dial<R: Runtime>(
    conn: ConnId,
    addr: String,
    local_addr: Option<SocketAddr>,
    dial_timeout: Duration,
    reports: mpsc::UnboundedSender<Report<R>>,
    span: tracing::Span,
) {
    let task = async move {
        let report = match with_timeout::<R, _>(dial_timeout, R::connect(addr, local_addr)).await {
            Ok((reader, writer)) => {
                debug!("connected");
                Report::Dialled(conn, reader, writer)
            }
            Err(e) => {
                debug!(%e, "connect failed");
                Report::DialFailed(conn, e.into())
            }
        };
        let _ = reports.unbounded_send(report);
    };
    R::spawn(task.instrument(span));
}
