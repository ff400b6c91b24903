//! The I/O half: a mio reactor that carries out what nsq-sansio state machines decide. It
//! dials, writes, reads and sleeps; every protocol decision (handshakes, RDY, heartbeats,
//! redials, lookupd polling and its HTTP) belongs to the state machines.
//!
//! One [`Reactor::turn`] is the crate docs' run loop, for several machines at once:
//!
//! 1. carry out each machine's actions (`poll_action`: connect, close), and hand every open
//!    socket that wrote everything it had what its machine queued since (`poll_transmit_for`);
//! 2. sleep in `Poll::poll` until a socket is ready or the earliest deadline: the machines'
//!    `poll_timeout`, and the reactor's own dial, write and linger deadlines;
//! 3. feed back what happened: `handle_connected` or `handle_connect_failed`, `handle_input`,
//!    `handle_eof`, `handle_io_error`, and `handle_timeout` once a machine's deadline passed.
//!
//! Between turns the application drains each machine's `poll_event` and calls its commands.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use nsq_sansio::{Action, ConnId, Machine};

/// The most one `read` call takes.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per socket per turn; a socket with more waits for the next turn, so one busy (or
/// flooding) peer cannot starve the other sockets and the timers.
const READS_PER_TURN: usize = 16;
/// Every socket is registered once for both, edge-triggered: an event comes when it becomes
/// readable or writable, so reads and writes go on until the socket would block.
const READ_WRITE: Interest = Interest::READABLE.add(Interest::WRITABLE);
/// How long a closed connection may take to write its last bytes and see the peer's end of
/// file before the socket is dropped anyway.
const LINGER: Duration = Duration::from_secs(5);

/// Sockets for the connections of several machines, on one mio `Poll`. Each turn takes the
/// machines as a slice, the same ones in the same order every time: a socket belongs to a
/// machine by its index (connection ids are per machine, so two machines both have a
/// `ConnId(0)`).
pub(crate) struct Reactor {
    poll: Poll,
    events: Events,
    sockets: HashMap<Token, Socket>,
    /// The socket of each (machine index, connection).
    tokens: HashMap<(usize, ConnId), Token>,
    next_token: usize,
    read_buf: BytesMut,
}

/// One connection's socket.
struct Socket {
    machine: usize,
    conn: ConnId,
    stream: TcpStream,
    phase: Phase,
    /// What is being written; a partial write keeps the rest here. The machine is asked for
    /// more only once it is empty, so what it queues meanwhile leaves as one write.
    out: Bytes,
    write_timeout: Duration,
    /// When the write of `out` must have finished.
    write_deadline: Option<Instant>,
    /// The last turn stopped reading at `READS_PER_TURN`: read again without waiting.
    more_to_read: bool,
}

enum Phase {
    /// Dialling `stream`'s address; if it fails, `next` are the other addresses the name
    /// resolved to, tried in turn, all before `deadline`.
    Connecting {
        next: Vec<SocketAddr>,
        local: Option<SocketAddr>,
        deadline: Option<Instant>,
        timeout: Duration,
        /// What the `connect` call itself said (usually "in progress").
        started: Option<io::Error>,
    },
    Open,
    /// The machine closed it: `out` is written, the write side shut down, and what the peer
    /// still sends is read and dropped until its end of file, or `until`.
    Closing {
        until: Instant,
        eof: bool,
    },
}

impl Reactor {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            poll: Poll::new()?,
            events: Events::with_capacity(256),
            sockets: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 0,
            read_buf: BytesMut::new(),
        })
    }

    /// Whether every socket is gone: all connections closed, their last bytes written.
    pub(crate) fn is_idle(&self) -> bool {
        self.sockets.is_empty()
    }

    /// One round of the loop (see the module docs). Drain the machines' events after it.
    /// Returns without sleeping when there is nothing to wait for: no socket and no deadline
    /// (after the last close, or before the first connect).
    pub(crate) fn turn(&mut self, machines: &mut [&mut dyn Machine]) -> io::Result<()> {
        // 1. Carry out what the machines decided.
        self.carry_out(machines, Instant::now());

        // 2. Sleep until a socket is ready or the earliest deadline.
        let timeout = if self.sockets.values().any(|s| s.more_to_read) {
            Some(Duration::ZERO)
        } else {
            let machines_next = machines.iter().filter_map(|m| m.poll_timeout());
            let next = machines_next.chain(self.sockets.values().filter_map(Socket::deadline)).min();
            if next.is_none() && self.sockets.is_empty() {
                return Ok(());
            }
            next.map(|at| at.saturating_duration_since(Instant::now()))
        };
        if let Err(e) = self.poll.poll(&mut self.events, timeout) {
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }

        // 3. Feed back what happened, then what time did.
        let now = Instant::now();
        let mut ready: Vec<(Token, bool)> =
            self.events.iter().map(|e| (e.token(), e.is_error() || e.is_write_closed())).collect();
        ready.extend(self.sockets.iter().filter(|(_, s)| s.more_to_read).map(|(&t, _)| (t, false)));
        for (token, hung_up) in ready {
            self.ready(token, hung_up, machines, now);
        }
        self.expire(machines, now);
        for machine in machines.iter_mut() {
            if machine.poll_timeout().is_some_and(|at| at <= now) {
                machine.handle_timeout(now);
            }
        }
        Ok(())
    }

    /// The machines' actions, then their bytes for every open socket that wrote all it had;
    /// again until nothing new comes, since writing or closing can make a machine decide more.
    fn carry_out(&mut self, machines: &mut [&mut dyn Machine], now: Instant) {
        loop {
            let mut progress = false;
            for (index, machine) in machines.iter_mut().enumerate() {
                let machine = &mut **machine;
                while let Some(action) = machine.poll_action() {
                    progress = true;
                    match action {
                        Action::Connect { conn, addr, local_addr, timeout, write_timeout } => {
                            let dial = Dial { conn, local: local_addr, timeout, write_timeout };
                            self.connect(index, &addr, dial, machine, now);
                        }
                        Action::Close { conn } => self.close(index, conn, machine, now),
                        // `Action` is non-exhaustive; these two are all there is.
                        _ => {}
                    }
                }
            }
            for sock in self.sockets.values_mut() {
                if !matches!(sock.phase, Phase::Open) || !sock.out.is_empty() {
                    continue;
                }
                let machine = &mut *machines[sock.machine];
                let Some(bytes) = machine.poll_transmit_for(sock.conn) else { continue };
                progress = true;
                sock.out = bytes;
                sock.write_deadline = now.checked_add(sock.write_timeout);
                if let Err(e) = sock.flush() {
                    machine.handle_io_error(sock.conn, e.into(), now);
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// `Action::Connect`: resolve, then start a non-blocking connect.
    fn connect(&mut self, index: usize, addr: &str, dial: Dial, machine: &mut dyn Machine, now: Instant) {
        // Resolving blocks this thread for as long as DNS takes; a loop that must never block
        // resolves on a helper thread and dials when the answer comes.
        let mut addrs: Vec<SocketAddr> = match addr.to_socket_addrs() {
            // Bound to a local address, only the addresses of its family can be reached.
            Ok(addrs) => addrs.filter(|a| dial.local.is_none_or(|l| l.is_ipv4() == a.is_ipv4())).collect(),
            Err(e) => return machine.handle_connect_failed(dial.conn, e.into(), now),
        };
        let (stream, started) = match start_dial(&mut addrs, dial.local) {
            Ok(dialled) => dialled,
            Err(e) => return machine.handle_connect_failed(dial.conn, e.into(), now),
        };
        let token = Token(self.next_token);
        self.next_token += 1;
        let mut sock = Socket {
            machine: index,
            conn: dial.conn,
            stream,
            phase: Phase::Connecting {
                next: addrs,
                local: dial.local,
                deadline: now.checked_add(dial.timeout),
                timeout: dial.timeout,
                started,
            },
            out: Bytes::new(),
            write_timeout: dial.write_timeout,
            write_deadline: None,
            more_to_read: false,
        };
        if let Err(e) = self.poll.registry().register(&mut sock.stream, token, READ_WRITE) {
            return machine.handle_connect_failed(dial.conn, e.into(), now);
        }
        self.sockets.insert(token, sock);
        self.tokens.insert((index, dial.conn), token);
    }

    /// `Action::Close`: the connection's last bytes (final FINs, CLS, TLS close_notify) go out
    /// after what is still being written, then the socket closes.
    fn close(&mut self, index: usize, conn: ConnId, machine: &mut dyn Machine, now: Instant) {
        let Some(&token) = self.tokens.get(&(index, conn)) else { return };
        let Some(sock) = self.sockets.get_mut(&token) else { return };
        if !matches!(sock.phase, Phase::Open) {
            // Still dialling: nothing was said on it.
            return self.remove(token);
        }
        if let Some(last) = machine.poll_transmit_for(conn) {
            sock.out = if sock.out.is_empty() { last } else { [&sock.out[..], &last[..]].concat().into() };
        }
        sock.phase = Phase::Closing { until: now + LINGER, eof: false };
        if sock.linger(&mut self.read_buf) {
            self.remove(token);
        }
    }

    /// A socket is ready (or has more to read).
    fn ready(&mut self, token: Token, hung_up: bool, machines: &mut [&mut dyn Machine], now: Instant) {
        let Some(sock) = self.sockets.get_mut(&token) else { return };
        let machine = &mut *machines[sock.machine];
        let conn = sock.conn;
        if let Phase::Connecting { .. } = sock.phase {
            match sock.connected(hung_up) {
                Ok(false) => return, // not yet: a spurious wake-up
                Ok(true) => {
                    sock.phase = Phase::Open;
                    machine.handle_connected(conn, now);
                    // On to reading: this event's edge may already carry data.
                }
                Err(e) => return self.redial(token, e, machine, now),
            }
        }
        match sock.phase {
            Phase::Connecting { .. } => {}
            Phase::Open => {
                if let Err(e) = sock.flush() {
                    return machine.handle_io_error(conn, e.into(), now);
                }
                sock.read(&mut self.read_buf, |read| match read {
                    Ok(Some(data)) => machine.handle_input(conn, now, data),
                    Ok(None) => machine.handle_eof(conn, now),
                    Err(e) => machine.handle_io_error(conn, e.into(), now),
                });
            }
            Phase::Closing { .. } => {
                if sock.linger(&mut self.read_buf) {
                    self.remove(token);
                }
            }
        }
    }

    /// A dial failed: the next address the name resolved to, or the failure for the machine.
    fn redial(&mut self, token: Token, error: io::Error, machine: &mut dyn Machine, now: Instant) {
        let Some(sock) = self.sockets.get_mut(&token) else { return };
        let conn = sock.conn;
        let Phase::Connecting { next, local, started, .. } = &mut sock.phase else { return };
        let error = if next.is_empty() {
            error
        } else {
            match start_dial(next, *local) {
                Ok((mut stream, now_started)) => {
                    let registry = self.poll.registry();
                    let _ = registry.deregister(&mut sock.stream);
                    match registry.register(&mut stream, token, READ_WRITE) {
                        Ok(()) => {
                            sock.stream = stream;
                            *started = now_started;
                            return;
                        }
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            }
        };
        self.remove(token);
        machine.handle_connect_failed(conn, error.into(), now);
    }

    /// The reactor's own deadlines: dial timeouts, write timeouts, lingering closes.
    fn expire(&mut self, machines: &mut [&mut dyn Machine], now: Instant) {
        let due: Vec<Token> =
            self.sockets.iter().filter(|(_, s)| s.deadline().is_some_and(|at| at <= now)).map(|(&t, _)| t).collect();
        for token in due {
            let Some(sock) = self.sockets.get_mut(&token) else { continue };
            let machine = &mut *machines[sock.machine];
            let conn = sock.conn;
            match sock.phase {
                Phase::Connecting { timeout, .. } => {
                    self.remove(token);
                    let error = io::Error::new(ErrorKind::TimedOut, format!("timed out after {timeout:?}"));
                    machine.handle_connect_failed(conn, error.into(), now);
                }
                Phase::Open => {
                    sock.write_deadline = None;
                    let message = format!("write timed out after {:?}", sock.write_timeout);
                    machine.handle_io_error(conn, io::Error::new(ErrorKind::TimedOut, message).into(), now);
                }
                Phase::Closing { .. } => self.remove(token),
            }
        }
    }

    fn remove(&mut self, token: Token) {
        if let Some(mut sock) = self.sockets.remove(&token) {
            let _ = self.poll.registry().deregister(&mut sock.stream);
            self.tokens.remove(&(sock.machine, sock.conn));
        }
    }
}

/// What `Action::Connect` asked for besides the address.
struct Dial {
    conn: ConnId,
    local: Option<SocketAddr>,
    timeout: Duration,
    write_timeout: Duration,
}

impl Socket {
    fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Connecting { deadline, .. } => deadline,
            Phase::Open => self.write_deadline,
            Phase::Closing { until, .. } => Some(until),
        }
    }

    /// Whether the dial finished: `Ok(true)` connected, `Ok(false)` not yet. This is mio's
    /// recipe: the socket's error if it has one, else connected once it has a peer.
    fn connected(&mut self, hung_up: bool) -> io::Result<bool> {
        if let Some(e) = self.stream.take_error()? {
            return Err(e);
        }
        match self.stream.peer_addr() {
            Ok(_) => {
                self.stream.set_nodelay(true)?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::NotConnected && !hung_up => Ok(false),
            // A connect that failed at once leaves no error on the socket: its own is the cause.
            Err(e) => match &mut self.phase {
                Phase::Connecting { started, .. } => Err(started.take().unwrap_or(e)),
                _ => Err(e),
            },
        }
    }

    /// Writes `out` until it is empty or the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.out.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.write_deadline = None;
        Ok(())
    }

    /// Reads what the socket has, up to `READS_PER_TURN` chunks, handing `on_read` each chunk,
    /// then `Ok(None)` at end of file or the error if reading failed.
    fn read(&mut self, buf: &mut BytesMut, mut on_read: impl FnMut(io::Result<Option<BytesMut>>)) {
        self.more_to_read = false;
        for _ in 0..READS_PER_TURN {
            buf.resize(READ_CHUNK, 0);
            match self.stream.read(&mut buf[..]) {
                Ok(0) => {
                    buf.clear();
                    return on_read(Ok(None));
                }
                Ok(n) => {
                    buf.truncate(n);
                    on_read(Ok(Some(buf.split())));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    buf.clear();
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    buf.clear();
                    return on_read(Err(e));
                }
            }
        }
        buf.clear();
        self.more_to_read = true;
    }

    /// A closing socket: writes the rest, shuts the write side down once it is written, and
    /// drops what the peer still sends. Returns whether the socket is done with.
    fn linger(&mut self, buf: &mut BytesMut) -> bool {
        if self.flush().is_err() {
            return true;
        }
        if self.out.is_empty() {
            // Half-close: the peer reads our last bytes, then its end of file comes back. A
            // socket dropped with data unread would be reset, and the kernel would discard
            // what we wrote last.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        let mut gone = false;
        self.read(buf, |read| gone |= !matches!(read, Ok(Some(_))));
        let Phase::Closing { eof, .. } = &mut self.phase else { return true };
        *eof |= gone;
        *eof && self.out.is_empty()
    }
}

/// Starts a non-blocking connect to the first of `addrs` that takes one (removing those
/// tried), bound to `local` when set. Also returns what the `connect` call said.
fn start_dial(addrs: &mut Vec<SocketAddr>, local: Option<SocketAddr>) -> io::Result<(TcpStream, Option<io::Error>)> {
    let mut last = io::Error::new(ErrorKind::AddrNotAvailable, "no address to dial (of the local address's family)");
    while !addrs.is_empty() {
        match dial(addrs.remove(0), local) {
            Ok(dialled) => return Ok(dialled),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn dial(addr: SocketAddr, local: Option<SocketAddr>) -> io::Result<(TcpStream, Option<io::Error>)> {
    let Some(local) = local else {
        return Ok((TcpStream::connect(addr)?, None));
    };
    // mio has no bind-before-connect: socket2 binds and starts the connect, mio takes over.
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.bind(&local.into())?;
    let started = socket.connect(&addr.into()).err();
    Ok((TcpStream::from_std(socket.into()), started))
}
