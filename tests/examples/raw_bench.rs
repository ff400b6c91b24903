//! The raw-protocol baseline for the `bench` tools: no client library, one blocking
//! `std::net::TcpStream` speaking nsqd's protocol directly, the ceiling a client can reach on a
//! given server. It takes the `bench` flags it needs and prints the same `RESULT` line, with
//! `client=raw`, so `.ci/bench` reports each client as a ratio to it.
//!
//! - `--mode pub`: `--outstanding` W PUBs in flight; each `OK` read sends the next PUB (all the
//!   PUBs one read allows leave in one write).
//! - `--mode mpub`: MPUBs of `--batch` B messages, `--outstanding-batches` K in flight.
//! - `--mode sub`: SUB, RDY `--max-in-flight`, and a FIN for every message (the FINs of one
//!   read leave in one write); timed from the first message to the last.
//!
//! With `--poll` the socket is non-blocking and the loop waits in `epoll_wait` (through mio),
//! as an async runtime's reactor does, instead of sleeping in `read`: the same loop, with the
//! reactor's way of waking up and nothing else. It tells what any async client pays for that
//! from what a library adds.
//!
//! ```sh
//! cargo run --release -p nsq-tests --example raw_bench -- --mode mpub --batch 200 --outstanding-batches 1
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

/// The `bench` flags the raw loops use.
#[derive(Debug, Parser)]
#[command(name = "raw_bench", about = "Raw-protocol PUB, MPUB and SUB loops: the baseline for bench")]
struct Args {
    /// pub, mpub or sub.
    #[arg(long, default_value = "pub")]
    mode: String,
    /// nsqd TCP address.
    #[arg(long = "nsqd-tcp-address", default_value = "127.0.0.1:4150")]
    nsqd_tcp_address: String,
    /// Topic.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Channel (sub).
    #[arg(long, default_value = "bench")]
    channel: String,
    /// Messages.
    #[arg(long, default_value_t = 100_000)]
    n: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Un-acknowledged PUBs at most (pub).
    #[arg(long, default_value_t = 200)]
    outstanding: u64,
    /// Messages per MPUB (mpub).
    #[arg(long, default_value_t = 200)]
    batch: u64,
    /// Un-acknowledged MPUBs at most (mpub).
    #[arg(long = "outstanding-batches", default_value_t = 1)]
    outstanding_batches: u64,
    /// RDY count (sub).
    #[arg(long = "max-in-flight", default_value_t = 2500)]
    max_in_flight: u32,
    /// Wait for the socket in epoll_wait (non-blocking, through mio) instead of in read.
    #[arg(long)]
    poll: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    match run(&args) {
        Ok((secs, startup)) => {
            let secs = secs.as_secs_f64().max(1e-9);
            println!(
                "RESULT client={} mode={} msgs={} bytes={} secs={secs:.3} msgs_per_sec={:.0} startup_secs={:.3} \
                 total_secs={:.3}",
                if args.poll { "raw-poll" } else { "raw" },
                args.mode,
                args.n,
                args.size,
                args.n as f64 / secs,
                startup.as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
            if let Some(kib) = peak_rss_kib() {
                eprintln!("raw_bench: peak_rss_kib={kib}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("raw_bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the mode; returns the measured time and the time to get there.
fn run(args: &Args) -> Result<(Duration, Duration), String> {
    let started = Instant::now();
    let stream = TcpStream::connect(&args.nsqd_tcp_address).map_err(|e| format!("{}: {e}", args.nsqd_tcp_address))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let stream = if args.poll { Socket::polled(stream).map_err(|e| e.to_string())? } else { Socket::Blocking(stream) };
    let mut nsqd = Nsqd { stream, rx: vec![0; READ_CHUNK], start: 0, end: 0 };
    nsqd.write(b"  V2")?;
    let body = vec![b'a'; args.size.max(1)];
    match args.mode.as_str() {
        "pub" => {
            let mut command = format!("PUB {}\n", args.topic).into_bytes();
            command.extend_from_slice(&(body.len() as u32).to_be_bytes());
            command.extend_from_slice(&body);
            let startup = started.elapsed();
            let clock = Instant::now();
            nsqd.publish_loop(&command, args.n, args.outstanding.max(1))?;
            Ok((clock.elapsed(), startup))
        }
        "mpub" => {
            let batch = args.batch.max(1);
            let mut command = format!("MPUB {}\n", args.topic).into_bytes();
            let size = 4 + batch as usize * (4 + body.len());
            command.extend_from_slice(&(size as u32).to_be_bytes());
            command.extend_from_slice(&(batch as u32).to_be_bytes());
            for _ in 0..batch {
                command.extend_from_slice(&(body.len() as u32).to_be_bytes());
                command.extend_from_slice(&body);
            }
            let startup = started.elapsed();
            let clock = Instant::now();
            nsqd.publish_loop(&command, args.n.div_ceil(batch), args.outstanding_batches.max(1))?;
            Ok((clock.elapsed(), startup))
        }
        "sub" => {
            nsqd.write(format!("SUB {} {}\n", args.topic, args.channel).as_bytes())?;
            nsqd.expect_ok()?;
            nsqd.write(format!("RDY {}\n", args.max_in_flight).as_bytes())?;
            let (first, last) = nsqd.consume_loop(args.n)?;
            Ok((last.saturating_duration_since(first), first.saturating_duration_since(started)))
        }
        other => Err(format!("unknown --mode {other:?} (pub, mpub or sub)")),
    }
}

const READ_CHUNK: usize = 64 * 1024;
/// Frame types.
const RESPONSE: u32 = 0;
const ERROR: u32 = 1;
const MESSAGE: u32 = 2;

/// How the loop waits for its socket.
enum Socket {
    /// Blocking: the thread sleeps in `read` (and `write`).
    Blocking(TcpStream),
    /// Non-blocking: the thread sleeps in `epoll_wait` until the socket is ready.
    Polled { stream: mio::net::TcpStream, poll: mio::Poll, events: mio::Events, timeout: Option<Duration> },
}

impl Socket {
    fn polled(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        let mut stream = mio::net::TcpStream::from_std(stream);
        let poll = mio::Poll::new()?;
        let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
        poll.registry().register(&mut stream, mio::Token(0), interest)?;
        Ok(Self::Polled { stream, poll, events: mio::Events::with_capacity(4), timeout: None })
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Blocking(stream) => stream.read(buf),
            Self::Polled { stream, poll, events, timeout } => loop {
                match stream.read(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        poll.poll(events, *timeout)?;
                        if events.is_empty() {
                            return Err(std::io::ErrorKind::TimedOut.into());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    other => return other,
                }
            },
        }
    }

    fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Blocking(stream) => stream.write_all(bytes),
            Self::Polled { stream, poll, events, .. } => {
                while !bytes.is_empty() {
                    match stream.write(bytes) {
                        Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                        Ok(n) => bytes = &bytes[n..],
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => poll.poll(events, None)?,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
        }
    }

    fn set_read_timeout(&mut self, limit: Duration) {
        match self {
            Self::Blocking(stream) => {
                let _ = stream.set_read_timeout(Some(limit));
            }
            Self::Polled { timeout, .. } => *timeout = Some(limit),
        }
    }
}

/// One connection: a socket and the bytes read but not yet taken as frames.
struct Nsqd {
    stream: Socket,
    /// `rx[start..end]` is read and not yet taken.
    rx: Vec<u8>,
    start: usize,
    end: usize,
}

impl Nsqd {
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream.write_all(bytes).map_err(|e| format!("write: {e}"))
    }

    /// Reads what the socket has (at least one byte), keeping an incomplete frame.
    fn fill(&mut self) -> Result<(), String> {
        self.rx.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.end == self.rx.len() {
            // A frame larger than the buffer.
            self.rx.resize(self.rx.len() * 2, 0);
        }
        let n = self.stream.read(&mut self.rx[self.end..]).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("nsqd closed the connection".into());
        }
        self.end += n;
        Ok(())
    }

    /// The next complete frame already read: its type and data.
    fn frame(&mut self) -> Result<Option<(u32, std::ops::Range<usize>)>, String> {
        let buf = &self.rx[self.start..self.end];
        if buf.len() < 8 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if size < 4 {
            return Err(format!("bad frame size {size}"));
        }
        if buf.len() < 4 + size {
            return Ok(None);
        }
        let kind = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let data = self.start + 8..self.start + 4 + size;
        self.start += 4 + size;
        if kind == ERROR {
            return Err(format!("nsqd: {}", String::from_utf8_lossy(&self.rx[data])));
        }
        Ok(Some((kind, data)))
    }

    /// Whether a response frame is nsqd's heartbeat (answered with a NOP).
    fn is_heartbeat(&self, data: &std::ops::Range<usize>) -> bool {
        &self.rx[data.clone()] == b"_heartbeat_"
    }

    fn expect_ok(&mut self) -> Result<(), String> {
        loop {
            while let Some((kind, data)) = self.frame()? {
                if kind == RESPONSE && self.is_heartbeat(&data) {
                    self.write(b"NOP\n")?;
                } else if kind == RESPONSE && &self.rx[data.clone()] == b"OK" {
                    return Ok(());
                } else {
                    return Err(format!("unexpected frame type {kind}"));
                }
            }
            self.fill()?;
        }
    }

    /// Sends `command` `count` times with at most `window` unanswered; each `OK` lets one more
    /// go, and all that one read lets go leave in one write.
    fn publish_loop(&mut self, command: &[u8], count: u64, window: u64) -> Result<(), String> {
        let mut tx = Vec::with_capacity(command.len() * window as usize);
        let mut sent = window.min(count);
        let mut acked = 0;
        for _ in 0..sent {
            tx.extend_from_slice(command);
        }
        self.write(&tx)?;
        while acked < count {
            self.fill()?;
            tx.clear();
            while let Some((kind, data)) = self.frame()? {
                match kind {
                    RESPONSE if self.is_heartbeat(&data) => tx.extend_from_slice(b"NOP\n"),
                    RESPONSE => {
                        acked += 1;
                        if sent < count {
                            sent += 1;
                            tx.extend_from_slice(command);
                        }
                    }
                    other => return Err(format!("unexpected frame type {other}")),
                }
            }
            if !tx.is_empty() {
                self.write(&tx)?;
            }
        }
        Ok(())
    }

    /// Takes `count` messages, FIN each; returns when the first and the last arrived.
    fn consume_loop(&mut self, count: u64) -> Result<(Instant, Instant), String> {
        let mut tx = Vec::with_capacity(READ_CHUNK);
        let mut received = 0;
        let mut first = None;
        while received < count {
            self.fill()?;
            tx.clear();
            while let Some((kind, data)) = self.frame()? {
                match kind {
                    MESSAGE if data.len() >= 26 => {
                        first.get_or_insert_with(Instant::now);
                        received += 1;
                        // timestamp (8), attempts (2), id (16), body.
                        tx.extend_from_slice(b"FIN ");
                        tx.extend_from_slice(&self.rx[data.start + 10..data.start + 26]);
                        tx.push(b'\n');
                    }
                    RESPONSE if self.is_heartbeat(&data) => tx.extend_from_slice(b"NOP\n"),
                    other => return Err(format!("unexpected frame type {other}")),
                }
            }
            if !tx.is_empty() {
                self.write(&tx)?;
            }
        }
        let last = Instant::now();
        self.close();
        Ok((first.unwrap_or(last), last))
    }

    /// Ends the subscription as a client must: RDY 0 and CLS, then reads on until nsqd's
    /// `CLOSE_WAIT`. nsqd takes a connection's commands in order, so by then it has taken every
    /// FIN sent before; exiting at once could leave the last ones unread in its socket.
    fn close(&mut self) {
        if self.write(b"RDY 0\nCLS\n").is_err() {
            return;
        }
        // An nsqd that never answers does not hold the exit up for long.
        self.stream.set_read_timeout(Duration::from_secs(5));
        loop {
            loop {
                match self.frame() {
                    Ok(Some((RESPONSE, data))) if &self.rx[data.clone()] == b"CLOSE_WAIT" => return,
                    // A heartbeat, or a message sent before RDY 0 arrived: nsqd requeues it.
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            if self.fill().is_err() {
                return;
            }
        }
    }
}

/// The process's peak resident set size (`VmHWM`), where /proc says it (Linux).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
