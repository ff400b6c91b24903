//! An in-process nsqd built to nsqd 1.3.0's behaviour and the captured bytes, on std threads.
//!
//! Strict like nsqd: it refuses what nsqd refuses, with nsqd's error texts, and closes the
//! connection after every fatal error. Its wire code is its own (no nsq-sansio codec), so it
//! catches the client's mistakes instead of sharing them.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Options of a [`FakeNsqd`].
#[derive(Debug, Clone)]
pub struct FakeNsqdOptions {
    /// Largest message body (`--max-msg-size`).
    pub max_msg_size: usize,
    /// Message timeout (`--msg-timeout`).
    pub msg_timeout: Duration,
    /// Secrets accepted by AUTH, mapped to identities; empty: AUTH disabled.
    pub auth_secrets: HashMap<String, String>,
    /// Bind to this address (port 0: any free port).
    pub addr: SocketAddr,
    /// TLS server configuration; offered to clients that ask (`tls_v1`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for FakeNsqdOptions {
    fn default() -> Self {
        Self {
            max_msg_size: 1024 * 1024,
            msg_timeout: Duration::from_secs(60),
            auth_secrets: HashMap::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
        }
    }
}

/// Counters of a [`FakeNsqd`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Messages published, per topic.
    pub published: HashMap<String, u64>,
    /// Bodies published, per topic, in the order they were stored.
    pub published_bodies: HashMap<String, Vec<Vec<u8>>>,
    /// FINs accepted.
    pub finished: u64,
    /// REQs accepted.
    pub requeued: u64,
    /// TOUCHes accepted.
    pub touched: u64,
    /// Messages sent to clients (redeliveries included).
    pub delivered: u64,
    /// Connections accepted in total.
    pub connections: u64,
    /// The client address of each connection accepted, in order.
    pub peers: Vec<SocketAddr>,
    /// NOPs read (heartbeat answers and pings).
    pub nops: u64,
    /// Bodies finished, in order.
    pub finished_bodies: Vec<Vec<u8>>,
}

/// A running fake nsqd. Dropping it stops it and closes every connection.
#[derive(Debug)]
pub struct FakeNsqd {
    addr: SocketAddr,
    shared: Arc<Shared>,
    options: FakeNsqdOptions,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    stopped: AtomicBool,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    topics: HashMap<String, Topic>,
    clients: HashMap<u64, ClientInfo>,
    stats: FakeStats,
    next_client: u64,
    /// Fault injection: bytes to send to every client instead of normal traffic.
    inject: Option<Vec<u8>>,
    silent: bool,
}

#[derive(Debug, Default)]
struct Topic {
    /// Messages waiting for a first channel.
    backlog: VecDeque<Msg>,
    channels: HashMap<String, ChannelQ>,
}

#[derive(Debug, Default)]
struct ChannelQ {
    ready: VecDeque<Msg>,
    deferred: Vec<(Instant, Msg)>,
    /// id -> (client, deadline, message)
    in_flight: HashMap<[u8; 16], (u64, Instant, Msg)>,
}

#[derive(Debug, Clone)]
struct Msg {
    id: [u8; 16],
    timestamp: u64,
    attempts: u16,
    body: Vec<u8>,
}

/// nsqd's default `--output-buffer-size`: messages gather in a buffer this large.
const OUTPUT_BUFFER: usize = 16 * 1024;

struct ClientInfo {
    sock: TcpStream,
    /// Every byte to the client goes through here: a buffer as large as nsqd's, then plain,
    /// TLS, and/or a compressor.
    out: Box<dyn Write + Send>,
    /// Messages were written to `out` and not flushed yet.
    unflushed: bool,
    sub: Option<(String, String)>,
    rdy: u64,
    in_flight: u64,
    closing: bool,
    heartbeat: Option<Duration>,
    last_heartbeat: Instant,
    msg_timeout: Duration,
}

impl FakeNsqd {
    /// Starts a fake nsqd on a free loopback port.
    pub fn start(options: FakeNsqdOptions) -> io::Result<Self> {
        let listener = TcpListener::bind(options.addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            stopped: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        });
        spawn_acceptor(listener, shared.clone(), options.clone());
        spawn_clock(shared.clone());
        Ok(Self { addr, shared, options })
    }

    /// Starts one with default options.
    pub fn start_default() -> io::Result<Self> {
        Self::start(FakeNsqdOptions::default())
    }

    /// The TCP address, `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Publishes directly, as nsqd's HTTP /pub would.
    pub fn publish(&self, topic: &str, body: &[u8]) {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&self.shared);
        put(&mut st, topic, new_msg(id, body.to_vec()), None);
        drop(st);
        self.shared.wake.notify_all();
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> FakeStats {
        lock(&self.shared).stats.clone()
    }

    /// Messages not yet finished in `topic`/`channel` (ready, deferred and in flight).
    pub fn depth(&self, topic: &str, channel: &str) -> usize {
        let st = lock(&self.shared);
        st.topics.get(topic).map_or(0, |t| {
            t.backlog.len()
                + t.channels.get(channel).map_or(0, |c| c.ready.len() + c.deferred.len() + c.in_flight.len())
        })
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        lock(&self.shared).clients.len()
    }

    /// Drops every client connection (the server keeps listening).
    pub fn kill_all(&self) {
        let mut st = lock(&self.shared);
        for (_, c) in st.clients.drain() {
            let _ = c.sock.shutdown(Shutdown::Both);
        }
        // Their in-flight messages go back to the queue, as when nsqd loses a client.
        for t in st.topics.values_mut() {
            for c in t.channels.values_mut() {
                for (_, (_, _, m)) in c.in_flight.drain() {
                    c.ready.push_back(m);
                }
            }
        }
    }

    /// Sends `bytes` to every client as they are, once.
    pub fn inject(&self, bytes: &[u8]) {
        lock(&self.shared).inject = Some(bytes.to_vec());
        self.shared.wake.notify_all();
    }

    /// Stops heartbeats and messages; sockets stay open.
    pub fn go_silent(&self) {
        lock(&self.shared).silent = true;
    }

    /// The options it was started with.
    pub fn options(&self) -> &FakeNsqdOptions {
        &self.options
    }
}

impl FakeNsqd {
    /// Stops at once, as `kill -9` would: stops listening, closes every connection, and
    /// returns the counters as they were when the last connection closed. Whatever a client
    /// saw acknowledged is in them: nsqd stores a message before it answers.
    pub fn crash(self) -> FakeStats {
        self.stop();
        self.stats()
    }

    fn stop(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        let mut st = lock(&self.shared);
        for (_, c) in st.clients.drain() {
            let _ = c.sock.shutdown(Shutdown::Both);
        }
        drop(st);
        self.shared.wake.notify_all();
    }
}

impl Drop for FakeNsqd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_msg(n: u64, body: Vec<u8>) -> Msg {
    let mut id = [0u8; 16];
    id.copy_from_slice(format!("{n:016x}").as_bytes());
    let timestamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    Msg { id, timestamp, attempts: 0, body }
}

/// Stores a message in a topic: copied to every channel, or kept until the first one exists.
fn put(st: &mut State, topic: &str, msg: Msg, defer: Option<Instant>) {
    *st.stats.published.entry(topic.to_owned()).or_default() += 1;
    st.stats.published_bodies.entry(topic.to_owned()).or_default().push(msg.body.clone());
    let t = st.topics.entry(topic.to_owned()).or_default();
    if t.channels.is_empty() {
        t.backlog.push_back(msg);
        return;
    }
    for c in t.channels.values_mut() {
        match defer {
            Some(at) => c.deferred.push((at, msg.clone())),
            None => c.ready.push_back(msg.clone()),
        }
    }
}

fn spawn_acceptor(listener: TcpListener, shared: Arc<Shared>, options: FakeNsqdOptions) {
    thread::spawn(move || {
        for sock in listener.incoming() {
            if shared.stopped.load(Ordering::SeqCst) {
                return;
            }
            let Ok(sock) = sock else { continue };
            let _ = sock.set_nodelay(true);
            let shared = shared.clone();
            let options = options.clone();
            thread::spawn(move || {
                let _ = serve(sock, &shared, &options);
            });
        }
    });
}

/// Requeues timed-out and due deferred messages, delivers, sends heartbeats.
fn spawn_clock(shared: Arc<Shared>) {
    thread::spawn(move || {
        while !shared.stopped.load(Ordering::SeqCst) {
            {
                let mut st = lock(&shared);
                tick(&mut st, &shared);
                let _ = shared.wake.wait_timeout(st, Duration::from_millis(20));
            }
        }
    });
}

fn tick(st: &mut State, shared: &Shared) {
    let now = Instant::now();
    let mut freed: Vec<u64> = Vec::new();
    for t in st.topics.values_mut() {
        for c in t.channels.values_mut() {
            let expired: Vec<[u8; 16]> =
                c.in_flight.iter().filter(|(_, (_, at, _))| *at <= now).map(|(id, _)| *id).collect();
            for id in expired {
                if let Some((client, _, m)) = c.in_flight.remove(&id) {
                    freed.push(client);
                    c.ready.push_back(m);
                }
            }
            let (due, later): (Vec<_>, Vec<_>) = c.deferred.drain(..).partition(|(at, _)| *at <= now);
            c.deferred = later;
            c.ready.extend(due.into_iter().map(|(_, m)| m));
        }
    }
    for client in freed {
        if let Some(c) = st.clients.get_mut(&client) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }
    if let Some(bytes) = st.inject.take() {
        for c in st.clients.values_mut() {
            let _ = send(&mut c.out, &bytes);
        }
    }
    if st.silent {
        return;
    }
    // Heartbeats.
    for c in st.clients.values_mut() {
        if let Some(every) = c.heartbeat {
            if now.duration_since(c.last_heartbeat) >= every {
                c.last_heartbeat = now;
                let _ = send(&mut c.out, &frame(0, b"_heartbeat_"));
            }
        }
    }
    // Deliveries: round-robin over ready clients of each channel.
    let ids: Vec<u64> = st.clients.keys().copied().collect();
    let mut progress = true;
    while progress {
        progress = false;
        for &id in &ids {
            let Some(c) = st.clients.get(&id) else {
                continue;
            };
            if c.closing || c.rdy == 0 || c.in_flight >= c.rdy {
                continue;
            }
            let Some((topic, channel)) = c.sub.clone() else {
                continue;
            };
            let msg_timeout = c.msg_timeout;
            let Some(q) = st.topics.get_mut(&topic).and_then(|t| t.channels.get_mut(&channel)) else {
                continue;
            };
            let Some(mut m) = q.ready.pop_front() else {
                continue;
            };
            m.attempts += 1;
            q.in_flight.insert(m.id, (id, now + msg_timeout, m.clone()));
            st.stats.delivered += 1;
            if let Some(c) = st.clients.get_mut(&id) {
                c.in_flight += 1;
                // Buffered, as nsqd's output buffer does; flushed once the pass is done.
                let _ = c.out.write_all(&message_frame(m.timestamp, m.attempts, &m.id, &m.body));
                c.unflushed = true;
            }
            progress = true;
        }
    }
    for c in st.clients.values_mut().filter(|c| c.unflushed) {
        c.unflushed = false;
        let _ = c.out.flush();
    }
    let _ = shared;
}

impl std::fmt::Debug for ClientInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientInfo")
            .field("sub", &self.sub)
            .field("rdy", &self.rdy)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

fn send(out: &mut Box<dyn Write + Send>, bytes: &[u8]) -> io::Result<()> {
    out.write_all(bytes)?;
    // A compressor flushes a chunk (snappy) or a sync block (deflate), as nsqd does per write.
    out.flush()
}

/// An nsqd frame: size, type, data.
pub fn frame(kind: u32, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + data.len());
    f.extend_from_slice(&(data.len() as u32 + 4).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    f.extend_from_slice(data);
    f
}

/// A message frame: timestamp, attempts, id, body.
pub fn message_frame(timestamp: u64, attempts: u16, id: &[u8; 16], body: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(26 + body.len());
    data.extend_from_slice(&timestamp.to_be_bytes());
    data.extend_from_slice(&attempts.to_be_bytes());
    data.extend_from_slice(id);
    data.extend_from_slice(body);
    frame(2, &data)
}

/// A fatal error: nsqd sends the frame, then closes.
struct Fatal(String);

fn valid_name(name: &str) -> bool {
    let stem = name.strip_suffix("#ephemeral").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 64
        && !stem.is_empty()
        && stem.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn serve(sock: TcpStream, shared: &Arc<Shared>, options: &FakeNsqdOptions) -> io::Result<()> {
    let mut reader: Box<dyn BufRead + Send> = Box::new(BufReader::new(sock.try_clone()?));
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic)?;
    if &magic != b"  V2" {
        (&sock).write_all(&frame(1, b"E_BAD_PROTOCOL"))?;
        return sock.shutdown(Shutdown::Both);
    }
    let client = {
        let mut st = lock(shared);
        st.next_client += 1;
        st.stats.connections += 1;
        if let Ok(peer) = sock.peer_addr() {
            st.stats.peers.push(peer);
        }
        let id = st.next_client;
        st.clients.insert(
            id,
            ClientInfo {
                sock: sock.try_clone()?,
                out: Box::new(BufWriter::with_capacity(OUTPUT_BUFFER, sock.try_clone()?)),
                unflushed: false,
                sub: None,
                rdy: 0,
                in_flight: 0,
                closing: false,
                heartbeat: Some(Duration::from_secs(30)),
                last_heartbeat: Instant::now(),
                msg_timeout: options.msg_timeout,
            },
        );
        id
    };
    let mut authed = options.auth_secrets.is_empty();
    let mut upgrade: Option<Upgrade> = None;
    let mut identified = false;
    let result = (|| -> Result<(), Fatal> {
        loop {
            let mut line = Vec::new();
            let n = reader.read_until(b'\n', &mut line).map_err(|e| Fatal(e.to_string()))?;
            if n == 0 {
                return Ok(());
            }
            if line.last() != Some(&b'\n') {
                return Ok(());
            }
            line.pop();
            let text = String::from_utf8_lossy(&line).into_owned();
            let params: Vec<&str> = text.split(' ').collect();
            let cmd = params[0];
            let mut body = || -> Result<Vec<u8>, Fatal> {
                let mut len = [0u8; 4];
                reader.read_exact(&mut len).map_err(|_| Fatal(format!("E_BAD_BODY {cmd} failed to read body size")))?;
                let len = u32::from_be_bytes(len) as usize;
                if len > 5 * 1024 * 1024 {
                    return Err(Fatal(format!("E_BAD_BODY {cmd} body too big {len}")));
                }
                let mut b = vec![0u8; len];
                reader.read_exact(&mut b).map_err(|e| Fatal(format!("E_BAD_BODY {cmd} failed to read body ({e})")))?;
                Ok(b)
            };
            let needs_auth = !matches!(cmd, "IDENTIFY" | "AUTH" | "NOP");
            if needs_auth && !authed {
                // Read the body first so the error is about the command, as nsqd does.
                if matches!(cmd, "PUB" | "MPUB" | "DPUB") {
                    body()?;
                }
                return Err(Fatal(format!("E_AUTH_FIRST AUTH required before {cmd}")));
            }
            let reply: Option<Vec<u8>> = match cmd {
                "NOP" => {
                    lock(shared).stats.nops += 1;
                    None
                }
                "IDENTIFY" => {
                    let b = body()?;
                    let v: serde_json::Value = serde_json::from_slice(&b)
                        .map_err(|_| Fatal("E_BAD_BODY IDENTIFY failed to decode JSON body".into()))?;
                    let hb = v.get("heartbeat_interval").and_then(|h| h.as_i64()).unwrap_or(30_000);
                    let heartbeat = match hb {
                        -1 => None,
                        0 => Some(Duration::from_secs(30)),
                        ms if (1000..=60_000).contains(&ms) => Some(Duration::from_millis(ms as u64)),
                        ms => return Err(Fatal(format!("E_BAD_BODY IDENTIFY heartbeat interval ({ms}) is invalid"))),
                    };
                    let flag = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
                    if flag("snappy") && flag("deflate") {
                        return Err(Fatal(
                            "E_IDENTIFY_FAILED cannot enable both deflate and snappy compression".into(),
                        ));
                    }
                    let msg_timeout = match v.get("msg_timeout").and_then(|m| m.as_u64()).unwrap_or(0) {
                        0 => options.msg_timeout,
                        ms => Duration::from_millis(ms),
                    };
                    {
                        let mut st = lock(shared);
                        if let Some(c) = st.clients.get_mut(&client) {
                            c.heartbeat = heartbeat;
                            c.last_heartbeat = Instant::now();
                            c.msg_timeout = msg_timeout;
                        }
                    }
                    identified = true;
                    let tls = flag("tls_v1") && options.tls.is_some();
                    let snappy = flag("snappy");
                    let deflate = flag("deflate");
                    let level = v.get("deflate_level").and_then(|l| l.as_u64()).unwrap_or(6).clamp(1, 6) as u32;
                    if flag("feature_negotiation") && (tls || snappy || deflate) {
                        upgrade = Some(Upgrade {
                            tls: if tls { options.tls.clone() } else { None },
                            snappy,
                            deflate: deflate.then_some(level),
                        });
                    }
                    if flag("feature_negotiation") {
                        let json = serde_json::json!({
                            "max_rdy_count": 2500, "version": "1.3.0", "max_msg_timeout": 900000,
                            "msg_timeout": msg_timeout.as_millis() as u64, "tls_v1": tls, "deflate": deflate,
                            "deflate_level": level, "max_deflate_level": 6, "snappy": snappy, "sample_rate": 0,
                            "auth_required": !options.auth_secrets.is_empty(), "output_buffer_size": 16384,
                            "output_buffer_timeout": 250
                        });
                        Some(frame(0, json.to_string().as_bytes()))
                    } else {
                        Some(frame(0, b"OK"))
                    }
                }
                "AUTH" => {
                    let b = body()?;
                    if options.auth_secrets.is_empty() {
                        return Err(Fatal("E_AUTH_DISABLED AUTH disabled".into()));
                    }
                    if !identified {
                        return Err(Fatal("E_AUTH_FAILED AUTH failed".into()));
                    }
                    if authed {
                        return Err(Fatal("E_INVALID AUTH already set".into()));
                    }
                    let secret = String::from_utf8_lossy(&b).into_owned();
                    match options.auth_secrets.get(&secret) {
                        Some(identity) => {
                            authed = true;
                            let json =
                                serde_json::json!({"identity": identity, "identity_url": "", "permission_count": 1});
                            Some(frame(0, json.to_string().as_bytes()))
                        }
                        None => return Err(Fatal("E_AUTH_FAILED AUTH failed".into())),
                    }
                }
                "SUB" => {
                    if params.len() < 3 {
                        return Err(Fatal("E_INVALID SUB insufficient number of parameters".into()));
                    }
                    let (topic, channel) = (params[1], params[2]);
                    if !valid_name(topic) {
                        return Err(Fatal(format!("E_BAD_TOPIC SUB topic name \"{topic}\" is not valid")));
                    }
                    if !valid_name(channel) {
                        return Err(Fatal(format!("E_BAD_CHANNEL SUB channel name \"{channel}\" is not valid")));
                    }
                    let mut st = lock(shared);
                    if st.clients.get(&client).is_some_and(|c| c.sub.is_some()) {
                        return Err(Fatal("E_INVALID cannot SUB in current state".into()));
                    }
                    if st.clients.get(&client).is_some_and(|c| c.heartbeat.is_none()) {
                        return Err(Fatal("E_INVALID cannot SUB with heartbeats disabled".into()));
                    }
                    let t = st.topics.entry(topic.to_owned()).or_default();
                    let backlog: Vec<Msg> = t.backlog.drain(..).collect();
                    let q = t.channels.entry(channel.to_owned()).or_default();
                    q.ready.extend(backlog);
                    if let Some(c) = st.clients.get_mut(&client) {
                        c.sub = Some((topic.to_owned(), channel.to_owned()));
                    }
                    Some(frame(0, b"OK"))
                }
                "RDY" => {
                    let mut st = lock(shared);
                    let Some(c) = st.clients.get_mut(&client) else {
                        return Ok(());
                    };
                    if c.sub.is_none() {
                        return Err(Fatal("E_INVALID cannot RDY in current state".into()));
                    }
                    let n: i64 = params.get(1).and_then(|n| n.parse().ok()).ok_or_else(|| {
                        Fatal(format!("E_INVALID RDY could not parse count {}", params.get(1).unwrap_or(&"")))
                    })?;
                    if !(0..=2500).contains(&n) {
                        return Err(Fatal(format!("E_INVALID RDY count {n} out of range 0-2500")));
                    }
                    if !c.closing {
                        c.rdy = n as u64;
                    }
                    drop(st);
                    shared.wake.notify_all();
                    None
                }
                "FIN" | "REQ" | "TOUCH" => {
                    let mut st = lock(shared);
                    let Some(sub) = st.clients.get(&client).and_then(|c| c.sub.clone()) else {
                        return Err(Fatal(format!("E_INVALID cannot {cmd} in current state")));
                    };
                    let id = params.get(1).copied().unwrap_or("");
                    if id.len() != 16 {
                        return Err(Fatal("E_INVALID invalid message ID".into()));
                    }
                    let mut key = [0u8; 16];
                    key.copy_from_slice(id.as_bytes());
                    let delay = if cmd == "REQ" {
                        let ms: i64 = params.get(2).and_then(|n| n.parse().ok()).ok_or_else(|| {
                            Fatal(format!("E_INVALID REQ could not parse timeout {}", params.get(2).unwrap_or(&"")))
                        })?;
                        Duration::from_millis(ms.clamp(0, 3_600_000) as u64)
                    } else {
                        Duration::ZERO
                    };
                    let msg_timeout = st.clients.get(&client).map_or(options.msg_timeout, |c| c.msg_timeout);
                    let q = st.topics.get_mut(&sub.0).and_then(|t| t.channels.get_mut(&sub.1));
                    let entry = q.and_then(|q| match q.in_flight.get(&key) {
                        Some((owner, _, _)) if *owner == client => Some(q),
                        _ => None,
                    });
                    let Some(q) = entry else {
                        let text = format!("E_{cmd}_FAILED {cmd} {id} failed ID not in flight");
                        if let Some(c) = st.clients.get_mut(&client) {
                            send(&mut c.out, &frame(1, text.as_bytes())).map_err(|e| Fatal(e.to_string()))?;
                        }
                        drop(st);
                        continue;
                    };
                    match cmd {
                        "TOUCH" => {
                            if let Some(e) = q.in_flight.get_mut(&key) {
                                e.1 = Instant::now() + msg_timeout;
                            }
                            st.stats.touched += 1;
                        }
                        _ => {
                            if let Some((_, _, m)) = q.in_flight.remove(&key) {
                                if cmd == "FIN" {
                                    st.stats.finished += 1;
                                    st.stats.finished_bodies.push(m.body);
                                } else {
                                    if delay.is_zero() {
                                        q.ready.push_back(m);
                                    } else {
                                        q.deferred.push((Instant::now() + delay, m));
                                    }
                                    st.stats.requeued += 1;
                                }
                            }
                            if let Some(c) = st.clients.get_mut(&client) {
                                c.in_flight = c.in_flight.saturating_sub(1);
                            }
                        }
                    }
                    drop(st);
                    shared.wake.notify_all();
                    None
                }
                "CLS" => {
                    let mut st = lock(shared);
                    let Some(c) = st.clients.get_mut(&client) else {
                        return Ok(());
                    };
                    if c.sub.is_none() || c.closing {
                        return Err(Fatal("E_INVALID cannot CLS in current state".into()));
                    }
                    c.closing = true;
                    c.rdy = 0;
                    Some(frame(0, b"CLOSE_WAIT"))
                }
                "PUB" | "DPUB" => {
                    let topic = params.get(1).copied().unwrap_or("");
                    if !valid_name(topic) {
                        body()?;
                        return Err(Fatal(format!("E_BAD_TOPIC {cmd} topic name \"{topic}\" is not valid")));
                    }
                    let defer = if cmd == "DPUB" {
                        let raw = params.get(2).copied().unwrap_or("");
                        let ms: i64 =
                            raw.parse().map_err(|_| Fatal(format!("E_INVALID DPUB could not parse timeout {raw}")))?;
                        if !(0..=3_600_000).contains(&ms) {
                            return Err(Fatal(format!("E_INVALID DPUB timeout {ms} out of range 0-3600000")));
                        }
                        Some(Instant::now() + Duration::from_millis(ms as u64))
                    } else {
                        None
                    };
                    let b = body()?;
                    if b.is_empty() {
                        return Err(Fatal(format!("E_BAD_MESSAGE {cmd} invalid message body size 0")));
                    }
                    if b.len() > options.max_msg_size {
                        return Err(Fatal(format!(
                            "E_BAD_MESSAGE {cmd} message too big {} > {}",
                            b.len(),
                            options.max_msg_size
                        )));
                    }
                    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                    put(&mut lock(shared), topic, new_msg(id, b), defer);
                    shared.wake.notify_all();
                    Some(frame(0, b"OK"))
                }
                "MPUB" => {
                    let topic = params.get(1).copied().unwrap_or("");
                    let b = body()?;
                    if !valid_name(topic) {
                        return Err(Fatal(format!("E_BAD_TOPIC E_BAD_TOPIC MPUB topic name \"{topic}\" is not valid")));
                    }
                    if b.len() < 4 {
                        return Err(Fatal("E_BAD_BODY MPUB failed to read message count".into()));
                    }
                    let count = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
                    if count == 0 {
                        return Err(Fatal("E_BAD_BODY MPUB invalid message count 0".into()));
                    }
                    let mut rest = &b[4..];
                    let mut bodies = Vec::with_capacity(count.min(1024));
                    for i in 0..count {
                        if rest.len() < 4 {
                            return Err(Fatal("E_BAD_MESSAGE MPUB failed to read message body size".into()));
                        }
                        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                        if n == 0 {
                            return Err(Fatal(format!("E_BAD_MESSAGE MPUB invalid message({i}) body size 0")));
                        }
                        if n > options.max_msg_size {
                            return Err(Fatal(format!(
                                "E_BAD_MESSAGE MPUB message too big {n} > {}",
                                options.max_msg_size
                            )));
                        }
                        if rest.len() < 4 + n {
                            return Err(Fatal("E_BAD_MESSAGE MPUB failed to read message body".into()));
                        }
                        bodies.push(rest[4..4 + n].to_vec());
                        rest = &rest[4 + n..];
                    }
                    let mut st = lock(shared);
                    for body in bodies {
                        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                        put(&mut st, topic, new_msg(id, body), None);
                    }
                    drop(st);
                    shared.wake.notify_all();
                    Some(frame(0, b"OK"))
                }
                other => return Err(Fatal(format!("E_INVALID invalid command {other}"))),
            };
            if let Some(reply) = reply {
                reply_to(shared, client, &reply).map_err(|e| Fatal(e.to_string()))?;
            }
            if let Some(upgrade) = upgrade.take() {
                reader = upgrade_client(shared, client, &sock, reader, upgrade)
                    .map_err(|e| Fatal(format!("E_IDENTIFY_FAILED {e}")))?;
            }
        }
    })();
    // The client is gone: its in-flight messages go back to the queue.
    let mut st = lock(shared);
    if let Some(mut c) = st.clients.remove(&client) {
        if let Err(Fatal(text)) = &result {
            let _ = send(&mut c.out, &frame(1, text.as_bytes()));
        }
        if let Some((topic, channel)) = c.sub {
            if let Some(q) = st.topics.get_mut(&topic).and_then(|t| t.channels.get_mut(&channel)) {
                let mine: Vec<[u8; 16]> =
                    q.in_flight.iter().filter(|(_, (owner, _, _))| *owner == client).map(|(id, _)| *id).collect();
                for id in mine {
                    if let Some((_, _, m)) = q.in_flight.remove(&id) {
                        q.ready.push_back(m);
                    }
                }
            }
        }
    }
    drop(st);
    shared.wake.notify_all();
    sock.shutdown(Shutdown::Both)
}

/// Writes a reply under the state lock, so deliveries from the clock thread cannot interleave.
fn reply_to(shared: &Shared, client: u64, bytes: &[u8]) -> io::Result<()> {
    let mut st = lock(shared);
    match st.clients.get_mut(&client) {
        Some(c) => send(&mut c.out, bytes),
        None => Ok(()),
    }
}

/// What IDENTIFY negotiated: the upgrades to carry out after its answer, in nsqd's order.
struct Upgrade {
    tls: Option<Arc<rustls::ServerConfig>>,
    snappy: bool,
    deflate: Option<u32>,
}

/// Carries out the upgrades as nsqd does: TLS handshake then `OK` through TLS; then the
/// compressor and `OK` through it. Returns the new reader.
fn upgrade_client(
    shared: &Shared,
    client: u64,
    sock: &TcpStream,
    reader: Box<dyn BufRead + Send>,
    upgrade: Upgrade,
) -> io::Result<Box<dyn BufRead + Send>> {
    // nsqd's client cannot pipeline past IDENTIFY when upgrading: it must wait for the answer.
    drop(reader);
    let (mut read, mut write): (Box<dyn Read + Send>, Box<dyn Write + Send>) =
        (Box::new(sock.try_clone()?), Box::new(sock.try_clone()?));
    if let Some(config) = upgrade.tls {
        let tls = crate::tls_stream::TlsShared::handshake(config, sock.try_clone()?)?;
        read = Box::new(crate::tls_stream::TlsRead(tls.clone()));
        write = Box::new(crate::tls_stream::TlsWrite(tls));
        write.write_all(&frame(0, b"OK"))?;
        write.flush()?;
    }
    if upgrade.snappy {
        read = Box::new(snap::read::FrameDecoder::new(read));
        write = Box::new(snap::write::FrameEncoder::new(write));
    } else if let Some(level) = upgrade.deflate {
        read = Box::new(flate2::read::DeflateDecoder::new(read));
        write = Box::new(flate2::write::DeflateEncoder::new(write, flate2::Compression::new(level)));
    }
    if upgrade.snappy || upgrade.deflate.is_some() {
        write.write_all(&frame(0, b"OK"))?;
        write.flush()?;
    }
    let mut st = lock(shared);
    if let Some(c) = st.clients.get_mut(&client) {
        c.out = Box::new(BufWriter::with_capacity(OUTPUT_BUFFER, write));
    }
    Ok(Box::new(BufReader::new(read)))
}
