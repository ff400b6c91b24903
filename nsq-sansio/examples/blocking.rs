//! Publish and consume with nothing but `std::net::TcpStream` and the sans-IO core.
//!
//! ```text
//! cargo run -p nsq-sansio --example blocking -- 127.0.0.1:4150 my_topic 3
//! ```
//!
//! Publishes three messages to `my_topic`, then subscribes to `my_topic/blocking` and prints
//! messages until three arrived. The same loop works with TLS, snappy, deflate and AUTH: set them
//! in the `Config`; the core does the rest.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nsq_sansio::{Channel, Config, ConnectionState, Event, Topic};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).map_or("127.0.0.1:4150", String::as_str);
    let topic = args.get(2).map_or("blocking_example", String::as_str);
    let count: usize = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(3);
    match run(addr, topic, count) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(addr: &str, topic: &str, count: usize) -> Result<(), String> {
    let topic = Topic::new(topic).map_err(|e| e.to_string())?;
    let config = Arc::new(Config::new());

    // 1. Publish: one connection, `count` PUBs pipelined, then a graceful close.
    let mut driver = Driver::connect(addr, config.clone())?;
    for i in 0..count {
        let body = format!("message {i}").into_bytes().into();
        driver.conn.publish(&topic, body).map_err(|e| e.to_string())?;
    }
    let mut acked = 0;
    driver.run(|conn, event| match event {
        Event::Published { result: Ok(()), .. } => {
            acked += 1;
            if acked == count {
                conn.close(Instant::now());
            }
            Ok(())
        }
        Event::Published { result: Err(e), .. } => Err(format!("publish failed: {e}")),
        _ => Ok(()),
    })?;
    println!("published {acked} messages");

    // 2. Consume: SUB, RDY, print and FIN each message, CLS after `count`.
    let mut driver = Driver::connect(addr, config)?;
    let channel = Channel::new("blocking").map_err(|e| e.to_string())?;
    driver.conn.subscribe(&topic, &channel).map_err(|e| e.to_string())?;
    let mut received = 0;
    driver.run(|conn, event| {
        match event {
            Event::Subscribed => {
                conn.ready(10).map_err(|e| e.to_string())?;
            }
            Event::Message(msg) => {
                println!("{}", String::from_utf8_lossy(&msg.body));
                conn.finish(&msg.id).map_err(|e| e.to_string())?;
                received += 1;
                if received == count {
                    conn.close(Instant::now());
                }
            }
            _ => {}
        }
        Ok(())
    })
}

/// The whole I/O layer: a blocking socket with a read timeout standing in for a timer.
struct Driver {
    sock: TcpStream,
    conn: ConnectionState,
}

impl Driver {
    fn connect(addr: &str, config: Arc<Config>) -> Result<Self, String> {
        let sock = TcpStream::connect(addr).map_err(|e| format!("cannot connect to nsqd at {addr}: {e}"))?;
        sock.set_nodelay(true).map_err(|e| e.to_string())?;
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        Ok(Self { sock, conn: ConnectionState::new(config, host, Instant::now()) })
    }

    /// Runs the connection until it closes, handing each event to `on_event`.
    fn run(
        &mut self,
        mut on_event: impl FnMut(&mut ConnectionState, Event) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            // 2. Write everything the core queued (handshake, commands, NOPs) as one buffer.
            while let Some(bytes) = self.conn.poll_transmit() {
                self.sock.write_all(&bytes).map_err(|e| e.to_string())?;
            }
            // 3. Hand every event to the application; it may queue commands in turn, so go
            //    round again before blocking.
            let mut handled = false;
            while let Some(event) = self.conn.poll_event() {
                if let Event::Closed(reason) = event {
                    return if reason.is_local_close() { Ok(()) } else { Err(reason.to_string()) };
                }
                on_event(&mut self.conn, event)?;
                handled = true;
            }
            if handled {
                continue;
            }
            // 4. Block on the socket until data arrives or the core's next deadline.
            let wait = self.conn.poll_timeout().map(|t| t.saturating_duration_since(Instant::now()));
            let wait = wait.unwrap_or(Duration::from_secs(1)).max(Duration::from_millis(1));
            self.sock.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
            buf.reserve(16 * 1024);
            let start = buf.len();
            buf.resize(buf.capacity(), 0);
            // 1. Feed what arrived (or the passing of time) to the core.
            match self.sock.read(&mut buf[start..]) {
                Ok(0) => self.conn.handle_eof(Instant::now()),
                Ok(n) => {
                    buf.truncate(start + n);
                    self.conn.handle_input(Instant::now(), buf.split());
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    buf.truncate(start);
                    self.conn.handle_timeout(Instant::now());
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}
