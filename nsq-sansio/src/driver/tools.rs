//! The command-line tools every runtime crate ships as examples (`to_nsq`, `nsq_tail`,
//! `bench`), defined once. Each runtime's example is a `main` that starts its runtime and calls
//! one of these with its [`Runtime`]. Flag names follow nsq's own tools.
//!
//! The tools log to stderr through `tracing-subscriber`, at the level `RUST_LOG` names (default
//! `info`): connections made and lost, lookupd queries and their failures, backoff, errors. They
//! exit 1 at once, with the cause, when the first connection to an nsqd given on the command
//! line fails. SIGINT and SIGTERM stop them cleanly, as nsq's tools: `nsq_tail` gives back
//! what it has not printed and closes its connections, `to_nsq` stops reading and waits for
//! what it sent; both then exit 0.

use std::io::BufRead;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures_channel::mpsc;
use futures_util::StreamExt;

use super::{Consumer, Error, Message, Producer, Runtime};
use crate::{Config, PoolOptions, Strategy};

/// Publishes each line of stdin to a topic on the given nsqds (nsq's `to_nsq`).
#[derive(Debug, Parser)]
#[command(name = "to_nsq", about = "Publish each line of stdin to an NSQ topic")]
pub struct ToNsqArgs {
    /// Topic to publish to.
    #[arg(long)]
    pub topic: String,
    /// nsqd TCP address (repeatable).
    #[arg(long = "nsqd-tcp-address", required_unless_present = "lookupd_http_address")]
    pub nsqd_tcp_address: Vec<String>,
    /// nsqlookupd HTTP address (repeatable): publish to every nsqd it knows (its `/nodes`).
    #[arg(long = "lookupd-http-address")]
    pub lookupd_http_address: Vec<String>,
    /// How lines go to several nsqds: all (each line to every nsqd, as nsq's to_nsq does),
    /// round-robin or failover.
    #[arg(long, default_value = "all")]
    pub strategy: Strategy,
    /// go-nsq option as KEY,VALUE (repeatable), e.g. snappy,true or tls_v1,true.
    #[arg(long = "producer-opt")]
    pub producer_opt: Vec<String>,
    /// Messages per second (0: as fast as acknowledged).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Message delimiter (one character).
    #[arg(long, default_value = "\n")]
    pub delimiter: String,
}

/// Prints the messages of a topic (nsq's `nsq_tail`).
#[derive(Debug, Parser)]
#[command(name = "nsq_tail", about = "Print the messages of an NSQ topic")]
pub struct NsqTailArgs {
    /// Topic to read.
    #[arg(long)]
    pub topic: String,
    /// Channel to read from (default: an ephemeral one).
    #[arg(long, default_value = "tail#ephemeral")]
    pub channel: String,
    /// nsqd TCP address (repeatable).
    #[arg(long = "nsqd-tcp-address")]
    pub nsqd_tcp_address: Vec<String>,
    /// nsqlookupd HTTP address (repeatable).
    #[arg(long = "lookupd-http-address")]
    pub lookupd_http_address: Vec<String>,
    /// Exit after this many messages (0: never).
    #[arg(short = 'n', long = "total-messages", default_value_t = 0)]
    pub total_messages: u64,
    /// Messages in flight.
    #[arg(long = "max-in-flight", default_value_t = 200)]
    pub max_in_flight: u32,
    /// go-nsq option as KEY,VALUE (repeatable).
    #[arg(long = "consumer-opt")]
    pub consumer_opt: Vec<String>,
}

/// Measures publish or consume throughput, and latency, against nsqd.
///
/// The `RESULT` line gives `msgs_per_sec`; with `--rate` it gives latency percentiles too
/// (`lat_p50_us`, `lat_p99_us`, `lat_p999_us`, `lat_max_us`). A pub latency runs from the time
/// the publish was due on the schedule, not from when it was issued, so a stalled client is
/// charged for every publish it held up (no coordinated omission). A sub latency runs from the
/// message's nsqd timestamp (when nsqd received the publish) to the handler: end to end. (Sub
/// without `--rate` drains a backlog, whose age is no latency: it reads no clock per message.)
#[derive(Debug, Parser)]
#[command(name = "bench", about = "Measure NSQ publish or consume throughput and latency")]
pub struct BenchArgs {
    /// pub, mpub or sub.
    #[arg(long, default_value = "pub")]
    pub mode: String,
    /// nsqd TCP address (repeatable for pub and mpub: a producer pool).
    #[arg(long = "nsqd-tcp-address", default_value = "127.0.0.1:4150")]
    pub nsqd_tcp_address: Vec<String>,
    /// How a pool spreads publishes over several nsqds: all, round-robin or failover.
    #[arg(long, default_value = "round-robin")]
    pub strategy: Strategy,
    /// Topic.
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Channel (sub).
    #[arg(long, default_value = "bench")]
    pub channel: String,
    /// Messages.
    #[arg(long, default_value_t = 100_000)]
    pub n: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Concurrent publishing tasks, hence un-acknowledged PUBs at most (pub).
    #[arg(long, default_value_t = 200)]
    pub outstanding: usize,
    /// Messages per MPUB (mpub).
    #[arg(long, default_value_t = 200)]
    pub batch: usize,
    /// Un-acknowledged MPUBs at most (mpub).
    #[arg(long = "outstanding-batches", default_value_t = 1)]
    pub outstanding_batches: usize,
    /// max_in_flight (sub).
    #[arg(long = "max-in-flight", default_value_t = 2500)]
    pub max_in_flight: u32,
    /// Concurrent handlers (sub).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Merge queued PUBs into MPUBs of at most this many (pub; 0: off).
    #[arg(long = "auto-batch", default_value_t = 0)]
    pub auto_batch: usize,
    /// Publish open-loop at this many messages per second and report latencies (0: as fast as
    /// acknowledged). pub: each publish's latency from its scheduled send time to its
    /// acknowledgement. sub: the bench publishes at this rate itself while it consumes, and
    /// reports each message's latency from its nsqd timestamp to the handler.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

/// Runs `to_nsq` with the process arguments; exits 0 only once every line is acknowledged.
pub async fn to_nsq<R: Runtime>() -> ExitCode {
    let args = ToNsqArgs::parse();
    init_logging();
    report("to_nsq", run_to_nsq::<R>(args).await)
}

/// Runs `nsq_tail` with the process arguments.
pub async fn nsq_tail<R: Runtime>() -> ExitCode {
    let args = NsqTailArgs::parse();
    init_logging();
    report("nsq_tail", run_nsq_tail::<R>(args).await)
}

/// Runs `bench` with the process arguments; prints one `RESULT client=<client> ...` line.
pub async fn bench<R: Runtime>(client: &str) -> ExitCode {
    let args = BenchArgs::parse();
    init_logging();
    match run_bench::<R>(args).await {
        Ok(result) => {
            println!("RESULT client={client} {result}");
            if let Some(kib) = peak_rss_kib() {
                eprintln!("bench: peak_rss_kib={kib}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => report("bench", Err(e)),
    }
}

/// Completes at the first SIGINT or SIGTERM (Ctrl-C on Windows).
fn termination() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    let (tx, mut rx) = mpsc::unbounded::<()>();
    match ctrlc::set_handler(move || {
        let _ = tx.unbounded_send(());
    }) {
        Ok(()) => Box::pin(async move {
            rx.next().await;
        }),
        Err(e) => {
            tracing::warn!(%e, "cannot handle SIGINT/SIGTERM");
            Box::pin(futures_util::future::pending())
        }
    }
}

/// Logs to stderr at the level `RUST_LOG` names, `info` by default.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// The process's peak resident set size (`VmHWM`), where /proc says it (Linux).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn report(tool: &str, result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Applies `KEY,VALUE` options by their go-nsq names.
pub fn config_from_opts(opts: &[String]) -> Result<Config, String> {
    let mut config = Config::new();
    for opt in opts {
        let (key, value) = opt.split_once(',').ok_or_else(|| format!("option {opt:?} is not KEY,VALUE"))?;
        config.set(key, value).map_err(|e| e.to_string())?;
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// Reads stdin on a thread of its own (stdin is blocking everywhere) and hands records over.
fn stdin_records(delimiter: u8) -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (mut tx, rx) = mpsc::channel(1024);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut lock = stdin.lock();
        loop {
            let mut record = Vec::new();
            match lock.read_until(delimiter, &mut record) {
                Ok(0) => return,
                Ok(_) => {
                    if record.last() == Some(&delimiter) {
                        record.pop();
                    }
                    if !send_blocking(&mut tx, Ok(record)) {
                        return;
                    }
                }
                Err(e) => {
                    send_blocking(&mut tx, Err(e));
                    return;
                }
            }
        }
    });
    rx
}

/// Sends from a plain thread, waiting while the channel is full; false once the receiver is
/// gone.
fn send_blocking<T>(tx: &mut mpsc::Sender<T>, mut item: T) -> bool {
    loop {
        match tx.try_send(item) {
            Ok(()) => return true,
            Err(e) if e.is_full() => {
                item = e.into_inner();
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return false,
        }
    }
}

async fn run_to_nsq<R: Runtime>(args: ToNsqArgs) -> Result<(), String> {
    let config = config_from_opts(&args.producer_opt)?;
    let delimiter = match args.delimiter.as_bytes() {
        [d] => *d,
        _ => return Err("--delimiter must be one byte".into()),
    };
    let topic = crate::Topic::new(&args.topic).map_err(|e| e.to_string())?;
    let producer = if args.lookupd_http_address.is_empty() {
        producer::<R>(&args.nsqd_tcp_address, args.strategy, config)?
    } else {
        let options = PoolOptions::new(args.strategy);
        let pool = Producer::pool(args.nsqd_tcp_address.iter().cloned(), options, config).map_err(|e| e.to_string())?;
        for addr in &args.lookupd_http_address {
            pool.connect_to_nsqlookupd(addr.clone()).await.map_err(|e| e.to_string())?;
        }
        pool
    };
    // Fail fast, with the nsqds' own words, when the strategy cannot be served.
    if let Err(e) = producer.connect().await {
        producer.stop().await;
        return Err(e.to_string());
    }
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let mut next = R::now();
    let mut records = stdin_records(delimiter);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut signal = termination();
    loop {
        let record = match futures_util::future::select(records.next(), &mut signal).await {
            futures_util::future::Either::Left((Some(record), _)) => record,
            futures_util::future::Either::Left((None, _)) => break,
            futures_util::future::Either::Right(_) => {
                tracing::info!("stopping: no more lines are read; waiting for what was sent");
                break;
            }
        };
        let record = Bytes::from(record.map_err(|e| format!("stdin: {e}"))?);
        if record.is_empty() {
            continue;
        }
        if let Some(interval) = interval {
            R::sleep_until(next).await;
            next += interval;
        }
        let (producer, topic) = (producer.clone(), topic.clone());
        pending.push(async move { producer.publish(topic.as_str(), record).await.map_err(|e| e.to_string()) });
        // Keep a bounded number of publishes in flight.
        while pending.len() >= 1024 {
            if let Some(result) = pending.next().await {
                result?;
            }
        }
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    producer.stop().await;
    Ok(())
}

/// One nsqd: a plain producer (its errors name the nsqd); several: a pool by `strategy`.
fn producer<R: Runtime>(addrs: &[String], strategy: Strategy, config: Config) -> Result<Producer<R>, String> {
    match addrs {
        [one] => Producer::new(one.clone(), config),
        many => Producer::pool(many.iter().cloned(), PoolOptions::new(strategy), config),
    }
    .map_err(|e| e.to_string())
}

async fn run_nsq_tail<R: Runtime>(args: NsqTailArgs) -> Result<(), String> {
    use std::io::Write;
    if args.nsqd_tcp_address.is_empty() && args.lookupd_http_address.is_empty() {
        return Err("--nsqd-tcp-address or --lookupd-http-address required".into());
    }
    let mut config = config_from_opts(&args.consumer_opt)?;
    // No more in flight than it will print, as nsq's nsq_tail: nsqd then sends what there is
    // at once instead of holding it for its output buffer.
    let max_in_flight = match u32::try_from(args.total_messages) {
        Ok(n) if n > 0 => args.max_in_flight.min(n),
        _ => args.max_in_flight,
    };
    config.max_in_flight(max_in_flight);
    let consumer = Consumer::<R>::new(&args.topic, &args.channel, config).map_err(|e| e.to_string())?;
    let mut messages = consumer.messages();
    let connected = async {
        consumer.connect_to_nsqds(args.nsqd_tcp_address.iter().cloned()).await?;
        consumer.connect_to_nsqlookupds(args.lookupd_http_address.iter().cloned()).await
    };
    if let Err(e) = connected.await {
        consumer.stop().await;
        return Err(e.to_string());
    }
    let stdout = std::io::stdout();
    let mut count = 0;
    let mut signal = termination();
    loop {
        let message = match futures_util::future::select(messages.next(), &mut signal).await {
            futures_util::future::Either::Left((Some(message), _)) => message,
            futures_util::future::Either::Left((None, _)) => break,
            futures_util::future::Either::Right(_) => {
                tracing::info!("stopping");
                break;
            }
        };
        {
            let mut out = stdout.lock();
            out.write_all(message.body()).and_then(|()| out.write_all(b"\n")).map_err(|e| e.to_string())?;
        }
        message.finish();
        count += 1;
        if args.total_messages > 0 && count >= args.total_messages {
            break;
        }
    }
    let _ = stdout.lock().flush();
    // Messages delivered but not printed go back to nsqd now, for another reader at once, so
    // the stop below has nothing to wait for.
    while let Some(Some(message)) = futures_util::FutureExt::now_or_never(messages.next()) {
        message.requeue_without_backoff(Some(Duration::ZERO));
    }
    drop(messages);
    consumer.stop().await;
    Ok(())
}

/// What one bench run measured.
struct Measured {
    /// From the first publish (or message) to the last acknowledgement (or message).
    secs: Duration,
    /// From start to the first publish (or message).
    startup: Duration,
    latencies: Option<Latencies>,
}

async fn run_bench<R: Runtime>(args: BenchArgs) -> Result<String, String> {
    let started = Instant::now();
    // One body for every message, static so that handing it out costs no reference count:
    // the bench times the client, not its own copies (an MPUB of 200 would otherwise pay 400
    // atomic operations per batch that the raw loop does not).
    let body = Bytes::from_static(Box::leak(vec![b'a'; args.size.max(1)].into_boxed_slice()));
    let measured = match (args.mode.as_str(), args.rate) {
        ("pub", 0) => bench_pub::<R>(&args, body).await?,
        ("pub", rate) => bench_pub_at_rate::<R>(&args, body, rate).await?,
        ("mpub", 0) => bench_mpub::<R>(&args, body).await?,
        ("mpub", _) => return Err("--rate applies to pub and sub".into()),
        ("sub", _) => bench_sub::<R>(&args, body).await?,
        (other, _) => return Err(format!("unknown --mode {other:?} (pub, mpub or sub)")),
    };
    let secs = measured.secs.as_secs_f64().max(1e-9);
    let mut line = format!(
        "mode={} msgs={} bytes={} secs={secs:.3} msgs_per_sec={:.0} startup_secs={:.3} total_secs={:.3}",
        args.mode,
        args.n,
        args.size,
        args.n as f64 / secs,
        measured.startup.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if args.rate > 0 {
        line += &format!(" rate={}", args.rate);
    }
    if let Some(latencies) = measured.latencies {
        line += &format!(" {latencies}");
    }
    Ok(line)
}

/// `--outstanding` tasks, each publishing its share one message at a time: that many
/// un-acknowledged PUBs.
async fn bench_pub<R: Runtime>(args: &BenchArgs, body: Bytes) -> Result<Measured, String> {
    let started = Instant::now();
    let config = Config::new();
    let producer = match &args.nsqd_tcp_address[..] {
        [one] => Producer::<R>::with_auto_batch(one.clone(), config, args.auto_batch).map_err(|e| e.to_string())?,
        many => producer::<R>(many, args.strategy, config)?,
    };
    producer.connect().await.map_err(|e| e.to_string())?;
    let startup = started.elapsed();
    let clock = Instant::now();
    let n = args.n;
    let tasks = (args.outstanding.max(1) as u64).min(n.max(1));
    let (done_tx, mut done_rx) = mpsc::unbounded::<Result<(), Error>>();
    for task in 0..tasks {
        let share = n / tasks + u64::from(task < n % tasks);
        let (p, b, t, done) = (producer.clone(), body.clone(), args.topic.clone(), done_tx.clone());
        R::spawn(async move {
            let mut result = Ok(());
            for _ in 0..share {
                result = p.publish(&t, b.clone()).await;
                if result.is_err() {
                    break;
                }
            }
            let _ = done.unbounded_send(result);
        });
    }
    drop(done_tx);
    while let Some(r) = done_rx.next().await {
        r.map_err(|e| e.to_string())?;
    }
    let secs = clock.elapsed();
    producer.stop().await;
    Ok(Measured { secs, startup, latencies: None })
}

/// Publishes open-loop at `rate`; the latencies run from each publish's scheduled time.
async fn bench_pub_at_rate<R: Runtime>(args: &BenchArgs, body: Bytes, rate: u64) -> Result<Measured, String> {
    let started = Instant::now();
    let producer = match &args.nsqd_tcp_address[..] {
        [one] => Producer::<R>::with_auto_batch(one.clone(), Config::new(), args.auto_batch),
        many => Producer::pool(many.iter().cloned(), PoolOptions::new(args.strategy), Config::new()),
    }
    .map_err(|e| e.to_string())?;
    producer.connect().await.map_err(|e| e.to_string())?;
    let startup = started.elapsed();
    let clock = Instant::now();
    let latencies = publish_at_rate(&producer, &args.topic, &body, args.n, rate).await?;
    let secs = clock.elapsed();
    producer.stop().await;
    Ok(Measured { secs, startup, latencies: Some(latencies) })
}

/// MPUBs of `--batch` messages, `--outstanding-batches` of them un-acknowledged.
async fn bench_mpub<R: Runtime>(args: &BenchArgs, body: Bytes) -> Result<Measured, String> {
    let started = Instant::now();
    let producer = producer::<R>(&args.nsqd_tcp_address, args.strategy, Config::new())?;
    producer.connect().await.map_err(|e| e.to_string())?;
    let startup = started.elapsed();
    let batch: Vec<Bytes> = vec![body; args.batch.max(1)];
    let batches = args.n.div_ceil(args.batch.max(1) as u64);
    let clock = Instant::now();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for _ in 0..batches {
        if pending.len() >= args.outstanding_batches.max(1) {
            if let Some(r) = pending.next().await {
                let r: Result<(), Error> = r;
                r.map_err(|e| e.to_string())?;
            }
        }
        let (p, b, t) = (producer.clone(), batch.clone(), args.topic.clone());
        pending.push(async move { p.multi_publish(t, b).await });
    }
    while let Some(r) = pending.next().await {
        r.map_err(|e| e.to_string())?;
    }
    let secs = clock.elapsed();
    producer.stop().await;
    Ok(Measured { secs, startup, latencies: None })
}

/// Consumes `--n` messages with `--concurrency` handlers, each message finished at once. With
/// `--rate`, publishes them at that rate meanwhile (to the first nsqd), so they are consumed
/// as they arrive, and records each one's latency from its nsqd timestamp.
async fn bench_sub<R: Runtime>(args: &BenchArgs, body: Bytes) -> Result<Measured, String> {
    use std::sync::{Arc, Mutex};
    let started = Instant::now();
    let n = args.n;
    let mut config = Config::new();
    config.max_in_flight(args.max_in_flight);
    let consumer = Consumer::<R>::new(&args.topic, &args.channel, config).map_err(|e| e.to_string())?;
    let (done_tx, mut done_rx) = mpsc::unbounded::<Instant>();
    let first = Arc::new(std::sync::OnceLock::<Instant>::new());
    let latencies = Arc::new(Mutex::new(Latencies::new()?));
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (f, l, h, timed) = (first.clone(), latencies.clone(), handled.clone(), args.rate > 0);
    consumer.add_concurrent_handlers(
        move |m: Message| {
            if timed {
                if let Ok(mut latencies) = l.lock() {
                    latencies.record(since_unix_nanos(m.timestamp()));
                }
            }
            f.get_or_init(Instant::now);
            if h.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == n {
                let _ = done_tx.unbounded_send(Instant::now());
            }
            std::future::ready(Ok::<(), std::io::Error>(()))
        },
        args.concurrency.max(1),
    );
    consumer.connect_to_nsqds(args.nsqd_tcp_address.iter().cloned()).await.map_err(|e| e.to_string())?;
    let end = if args.rate > 0 {
        let nsqd = args.nsqd_tcp_address.first().ok_or("--nsqd-tcp-address required")?;
        let producer = Producer::<R>::new(nsqd.clone(), Config::new()).map_err(|e| e.to_string())?;
        producer.connect().await.map_err(|e| e.to_string())?;
        let publishing = publish_at_rate(&producer, &args.topic, &body, n, args.rate);
        let (published, end) = futures_util::future::join(publishing, done_rx.next()).await;
        published?;
        producer.stop().await;
        end
    } else {
        done_rx.next().await
    };
    let end = end.ok_or("consumer ended early")?;
    let start = first.get().copied().unwrap_or(end);
    consumer.stop().await;
    let latencies = latencies.lock().map_err(|_| "a handler panicked")?.clone();
    Ok(Measured {
        secs: end.saturating_duration_since(start),
        startup: start.saturating_duration_since(started),
        latencies: (args.rate > 0).then_some(latencies),
    })
}

/// Publishes `n` messages open-loop, the i-th due at i / `rate` seconds from now, whatever
/// the acknowledgements do: every publish that is due leaves, however many are unanswered.
/// Returns each one's latency from the time it was due to its acknowledgement.
async fn publish_at_rate<R: Runtime>(
    producer: &Producer<R>,
    topic: &str,
    body: &Bytes,
    n: u64,
    rate: u64,
) -> Result<Latencies, String> {
    let mut schedule = schedule(n, rate).fuse();
    let mut latencies = Latencies::new()?;
    let mut pending = futures_util::stream::FuturesUnordered::new();
    loop {
        futures_util::select! {
            due = schedule.select_next_some() => {
                let (p, b, t) = (producer.clone(), body.clone(), topic.to_owned());
                pending.push(async move { p.publish(t, b).await.map(|()| due) });
            }
            acked = pending.select_next_some() => {
                let due: Instant = acked.map_err(|e| e.to_string())?;
                latencies.record(due.elapsed());
            }
            complete => return Ok(latencies),
        }
    }
}

/// The schedule of an open-loop run: a thread that hands over the due time of each of `n`
/// publishes, the i-th at i / `rate` seconds from now, as it falls due. A plain thread sleeps
/// to within tens of microseconds; a runtime's timer may round up to the next millisecond
/// (tokio's does), which would show as latency of the client.
fn schedule(n: u64, rate: u64) -> mpsc::UnboundedReceiver<Instant> {
    let (tx, rx) = mpsc::unbounded();
    std::thread::spawn(move || {
        let start = Instant::now();
        for i in 0..n {
            let due = start + Duration::from_nanos((u128::from(i) * 1_000_000_000 / u128::from(rate.max(1))) as u64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if tx.unbounded_send(due).is_err() {
                return;
            }
        }
    });
    rx
}

/// The time since `nanos` after the Unix epoch by the system clock (zero if that is ahead).
fn since_unix_nanos(nanos: u64) -> Duration {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    now.saturating_sub(Duration::from_nanos(nanos))
}

/// A latency distribution: an HDR histogram of nanoseconds, 3 significant digits, from 1 ns to
/// an hour, in constant memory however many values it takes.
#[derive(Clone)]
struct Latencies(hdrhistogram::Histogram<u64>);

impl Latencies {
    fn new() -> Result<Self, String> {
        hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000_000, 3).map(Self).map_err(|e| e.to_string())
    }

    fn record(&mut self, latency: Duration) {
        self.0.saturating_record(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }
}

impl std::fmt::Display for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = |nanos: u64| nanos as f64 / 1000.0;
        let h = &self.0;
        write!(
            f,
            "lat_p50_us={:.1} lat_p99_us={:.1} lat_p999_us={:.1} lat_max_us={:.1}",
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.99)),
            us(h.value_at_quantile(0.999)),
            us(h.max())
        )
    }
}
