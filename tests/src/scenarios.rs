//! The scenario suite, written once, generic over the runtime. Each adapter's test file runs
//! every scenario through [`scenario_tests!`](crate::scenario_tests) with its own runtime.
//!
//! Scenarios assert on outcomes and their order, never on durations; waits are bounded only to
//! turn a hang into a failure.

use std::future::Future;
use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nsq_sansio::driver::{Consumer, Error, Message, Producer, Runtime};
use nsq_sansio::{Config, ConnectionError, ErrorCode, PoolOptions, PublishError, Strategy};

use crate::{FakeLookupd, FakeLookupdOptions, FakeNsqd, FakeNsqdOptions};

/// How long any one wait may take before the scenario fails.
const PATIENCE: Duration = Duration::from_secs(20);

/// Runs a scenario on a fresh thread and fails it if it takes longer than a minute.
pub fn run_guarded<F: FnOnce() + Send + 'static>(name: &str, body: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            body();
            let _ = tx.send(());
        })
        .expect("spawn scenario thread");
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => {
            let _ = handle.join();
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("scenario {name} hung"),
    }
}

/// Instantiates every scenario as a `#[test]` for one runtime: `$rt` implements
/// [`Runtime`], `$block_on` runs a future to completion on it.
#[macro_export]
macro_rules! scenario_tests {
    ($rt:ty, $block_on:path) => {
        $crate::scenario_tests!(@each $rt, $block_on,
            publish_and_consume,
            multi_and_deferred_publish,
            lookupd_discovers_nsqds,
            nsqd_restart_loses_nothing,
            outstanding_publishes_fail_when_the_server_dies,
            handler_errors_requeue_and_back_off,
            max_attempts_gives_up,
            touch_keeps_a_message,
            dropped_message_is_requeued,
            garbage_from_the_server_is_a_clean_error,
            producer_survives_a_huge_frame_length,
            graceful_stop_waits_for_in_flight_messages,
            slow_handler_holds_at_most_max_in_flight,
            auth_good_and_bad,
            stream_consumer,
            compression_and_tls_round_trips,
            tls_with_a_wrong_ca_is_refused,
            a_listed_nsqd_that_refuses_causes_no_query_storm,
            connecting_where_nothing_listens_fails_at_once,
            a_required_client_certificate_fails_the_first_connect,
            a_crash_mid_stream_then_stop_waits_for_nothing,
            a_pool_loses_an_nsqd_mid_stream,
            messages_of_a_lost_connection_are_not_handed_out,
            local_addr_is_bound_before_connecting,
            https_lookupd_demands_the_bearer_token,
            a_failed_first_lookupd_then_a_good_second,
            a_discovery_filter_chooses_the_nsqds,
            ping_writes_a_nop_or_says_why_it_cannot,
            a_blocked_handler_starves_the_consumer,
            a_flooding_nsqd_does_not_monopolize_the_consumer,
            an_nsqd_that_stops_reading_times_the_writes_out,
            a_silent_nsqd_is_read_timed_out_and_redialled,
        );
    };
    (@each $rt:ty, $block_on:path, $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::scenarios::run_guarded(stringify!($name), || {
                    $block_on($crate::scenarios::$name::<$rt>())
                });
            }
        )*
    };
}

/// Waits until `check` holds, polling on the runtime's timer.
pub async fn wait_for<R: Runtime>(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        R::sleep_until(R::now() + Duration::from_millis(10)).await;
    }
}

async fn sleep<R: Runtime>(d: Duration) {
    R::sleep_until(R::now() + d).await;
}

/// A consumer of `topic`/`ch` with the given max_in_flight and every other option default.
fn consumer<R: Runtime>(topic: &str, max_in_flight: u32) -> Consumer<R> {
    Consumer::new(
        topic,
        "ch",
        config(|c| {
            c.max_in_flight(max_in_flight);
        }),
    )
    .unwrap()
}

fn config(f: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::new();
    f(&mut c);
    c
}

/// Bodies a handler saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Vec<u8>>>>);

impl Seen {
    fn push(&self, body: &[u8]) {
        self.0.lock().unwrap().push(body.to_vec());
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn sorted(&self) -> Vec<Vec<u8>> {
        let mut v = self.0.lock().unwrap().clone();
        v.sort();
        v
    }
}

fn recording_handler(seen: &Seen) -> impl Fn(Message) -> std::future::Ready<Result<(), std::io::Error>> {
    let seen = seen.clone();
    move |m: Message| {
        seen.push(m.body());
        std::future::ready(Ok(()))
    }
}

/// PUB round trip: every message published is consumed and finished exactly once.
pub async fn publish_and_consume<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let producer = Producer::<R>::new(nsqd.addr(), Config::new()).unwrap();
    for i in 0..20 {
        producer.publish("scen", format!("m{i:02}")).await.unwrap();
    }
    let consumer = consumer::<R>("scen", 5);
    let seen = Seen::default();
    consumer.add_concurrent_handlers(recording_handler(&seen), 3);
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    wait_for::<R>("20 finished", || nsqd.stats().finished == 20).await;
    let expected: Vec<Vec<u8>> = (0..20).map(|i| format!("m{i:02}").into_bytes()).collect();
    assert_eq!(seen.sorted(), expected);
    consumer.stop().await;
    producer.stop().await;
    assert_eq!(nsqd.stats().published["scen"], 20);
}

/// MPUB and DPUB round trip.
pub async fn multi_and_deferred_publish<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let producer = Producer::<R>::new(nsqd.addr(), Config::new()).unwrap();
    producer.multi_publish("batch", ["a", "b", "c"]).await.unwrap();
    producer.deferred_publish("batch", Duration::from_millis(300), "later").await.unwrap();
    let consumer = consumer::<R>("batch", 10);
    let seen = Seen::default();
    consumer.add_handler(recording_handler(&seen));
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    wait_for::<R>("4 finished", || nsqd.stats().finished == 4).await;
    assert_eq!(seen.sorted(), [b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), b"later".to_vec()]);
    // Local refusals come back as errors and send nothing.
    assert!(matches!(producer.multi_publish("batch", Vec::<Vec<u8>>::new()).await, Err(Error::Command(_))));
    assert!(matches!(producer.publish("bad!topic", "x").await, Err(Error::Name(_))));
    consumer.stop().await;
}

/// Lookupd finds two nsqds, then a third that appears later.
pub async fn lookupd_discovers_nsqds<R: Runtime>() {
    let nsqds: Vec<FakeNsqd> = (0..3).map(|_| FakeNsqd::start_default().unwrap()).collect();
    let lookupd = FakeLookupd::start().unwrap();
    for n in &nsqds[..2] {
        lookupd.register("disc", &n.addr());
        n.publish("disc", n.addr().as_bytes());
    }
    let consumer = Consumer::<R>::new(
        "disc",
        "ch",
        config(|c| {
            c.max_in_flight(10).lookupd_poll_interval(Duration::from_millis(200)).unwrap();
        }),
    )
    .unwrap();
    let seen = Seen::default();
    consumer.add_handler(recording_handler(&seen));
    consumer.connect_to_nsqlookupd(lookupd.addr()).await.unwrap();
    wait_for::<R>("both first nsqds", || seen.len() == 2).await;
    lookupd.register("disc", &nsqds[2].addr());
    nsqds[2].publish("disc", nsqds[2].addr().as_bytes());
    wait_for::<R>("the later nsqd", || seen.len() == 3).await;
    let mut expected: Vec<Vec<u8>> = nsqds.iter().map(|n| n.addr().into_bytes()).collect();
    expected.sort();
    assert_eq!(seen.sorted(), expected);
    assert_eq!(consumer.stats().await.connections, 3);
    consumer.stop().await;
}

/// nsqd drops every connection mid-stream: the consumer reconnects; nothing is lost
/// (duplicates allowed).
pub async fn nsqd_restart_loses_nothing<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    for i in 0..30 {
        nsqd.publish("restart", format!("{i}").as_bytes());
    }
    let consumer = consumer::<R>("restart", 2);
    let seen = Seen::default();
    let slow = seen.clone();
    consumer.add_handler(move |m: Message| {
        slow.push(m.body());
        async move {
            sleep::<R>(Duration::from_millis(5)).await;
            Ok::<_, std::io::Error>(())
        }
    });
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    wait_for::<R>("some progress", || nsqd.stats().finished >= 5).await;
    nsqd.kill_all();
    wait_for::<R>("a reconnect", || nsqd.stats().connections >= 2).await;
    wait_for::<R>("every message finished", || nsqd.depth("restart", "ch") == 0).await;
    let mut distinct = seen.sorted();
    distinct.dedup();
    assert_eq!(distinct.len(), 30);
    consumer.stop().await;
}

/// A server that accepts, reads and never answers, then dies: every outstanding publish
/// resolves with an error.
pub async fn outstanding_publishes_fail_when_the_server_dies<R: Runtime>() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let got = Arc::new(AtomicUsize::new(0));
    let got2 = got.clone();
    std::thread::spawn(move || {
        if let Ok((mut sock, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            while let Ok(n) = sock.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got2.fetch_add(n, Ordering::Relaxed);
            }
        }
    });
    let producer = Producer::<R>::new(addr, Config::new()).unwrap();
    let publishes: Vec<_> = (0..5)
        .map(|i| {
            let p = producer.clone();
            async move { p.publish("dead", format!("{i}")).await }
        })
        .collect();
    let results = futures_util::future::join_all(publishes).await;
    assert!(got.load(Ordering::Relaxed) > 0, "the client wrote its handshake");
    for r in results {
        assert!(r.is_err(), "{r:?}");
    }
    // Nothing listens any more: a new publish fails fast with a connection error.
    assert!(producer.publish("dead", "x").await.is_err());
}

/// A failing handler requeues with backoff; the message comes back and succeeds.
pub async fn handler_errors_requeue_and_back_off<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    nsqd.publish("backoff", b"flaky");
    let consumer = Consumer::<R>::new(
        "backoff",
        "ch",
        config(|c| {
            c.default_requeue_delay(Duration::ZERO).unwrap();
            c.backoff_multiplier(Duration::from_millis(50)).unwrap();
        }),
    )
    .unwrap();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let a = attempts.clone();
    consumer.add_handler(move |m: Message| {
        a.lock().unwrap().push(m.attempts());
        let fail = m.attempts() < 3;
        async move {
            if fail {
                Err(std::io::Error::other("not yet"))
            } else {
                Ok(())
            }
        }
    });
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    wait_for::<R>("finished", || nsqd.stats().finished == 1).await;
    assert_eq!(*attempts.lock().unwrap(), [1, 2, 3]);
    assert_eq!(nsqd.stats().requeued, 2);
    consumer.stop().await;
}

/// Past max_attempts a message is finished without the handler and given to the hook.
pub async fn max_attempts_gives_up<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    nsqd.publish("attempts", b"poison");
    let consumer = Consumer::<R>::new(
        "attempts",
        "ch",
        config(|c| {
            c.max_attempts(2);
            c.default_requeue_delay(Duration::ZERO).unwrap();
            c.backoff_multiplier(Duration::from_millis(10)).unwrap();
        }),
    )
    .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (h, f) = (handled.clone(), failed.clone());
    consumer.set_failed_message_hook(move |m| {
        assert_eq!(&m.body[..], b"poison");
        f.fetch_add(1, Ordering::SeqCst);
    });
    consumer.add_handler(move |_m: Message| {
        h.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err::<(), _>(std::io::Error::other("always")))
    });
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    wait_for::<R>("the hook", || failed.load(Ordering::SeqCst) == 1).await;
    wait_for::<R>("the FIN", || nsqd.stats().finished == 1).await;
    assert_eq!(handled.load(Ordering::SeqCst), 2);
    consumer.stop().await;
}

/// TOUCH keeps a slow message in flight past its timeout.
pub async fn touch_keeps_a_message<R: Runtime>() {
    let nsqd =
        FakeNsqd::start(FakeNsqdOptions { msg_timeout: Duration::from_millis(400), ..Default::default() }).unwrap();
    nsqd.publish("touch", b"slow");
    let consumer = Consumer::<R>::new("touch", "ch", Config::new()).unwrap();
    consumer.add_handler(|m: Message| async move {
        for _ in 0..4 {
            sleep::<R>(Duration::from_millis(200)).await;
            m.touch();
        }
        Ok::<_, std::io::Error>(())
    });
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    wait_for::<R>("finished", || nsqd.stats().finished == 1).await;
    let stats = nsqd.stats();
    assert!(stats.touched >= 3, "{stats:?}");
    assert_eq!(stats.delivered, 1, "never timed out and redelivered");
    consumer.stop().await;
}

/// A message dropped without an answer is requeued at once.
pub async fn dropped_message_is_requeued<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    nsqd.publish("drop", b"x");
    let consumer = Consumer::<R>::new(
        "drop",
        "ch",
        config(|c| {
            c.default_requeue_delay(Duration::ZERO).unwrap();
        }),
    )
    .unwrap();
    let mut messages = consumer.messages();
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    let first = messages.next().await.unwrap();
    assert_eq!(first.attempts(), 1);
    drop(first);
    let again = messages.next().await.unwrap();
    assert_eq!(again.attempts(), 2);
    assert!(again.finish());
    wait_for::<R>("finished", || nsqd.stats().finished == 1).await;
    assert_eq!(nsqd.stats().requeued, 1);
    consumer.stop().await;
}

/// Garbage, a huge frame length and a truncated frame end the connection with an error, not a
/// panic or a hang; a direct nsqd is redialled.
pub async fn garbage_from_the_server_is_a_clean_error<R: Runtime>() {
    for bytes in [
        &b"\x00\x00\x00\x06\x00\x00\x00\x09garbage"[..],
        b"\x7f\xff\xff\xff\x00\x00\x00\x02",
        b"\x00\x00\x00\x40\x00\x00\x00\x02trunc",
    ] {
        let nsqd = FakeNsqd::start_default().unwrap();
        let consumer = Consumer::<R>::new("garbage", "ch", Config::new()).unwrap();
        let seen = Seen::default();
        consumer.add_handler(recording_handler(&seen));
        consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
        wait_for::<R>("subscribed", || nsqd.clients() == 1).await;
        nsqd.inject(bytes);
        if bytes.len() < 20 && bytes[3] != 0x06 {
            // A truncated frame needs the socket closed to show.
            sleep::<R>(Duration::from_millis(100)).await;
            nsqd.kill_all();
        }
        wait_for::<R>("a reconnect", || nsqd.stats().connections >= 2).await;
        nsqd.publish("garbage", b"after");
        wait_for::<R>("delivery after reconnect", || seen.len() == 1).await;
        consumer.stop().await;
    }
}

/// A huge frame length from nsqd fails the producer's publish cleanly; the next one reconnects.
pub async fn producer_survives_a_huge_frame_length<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let producer = Producer::<R>::new(nsqd.addr(), Config::new()).unwrap();
    producer.connect().await.unwrap();
    nsqd.inject(b"\x7f\xff\xff\xff\x00\x00\x00\x00");
    wait_for::<R>("the connection to drop", || nsqd.clients() == 0).await;
    // The failed connection is noticed; the next publishes reconnect.
    let mut ok = false;
    for _ in 0..5 {
        if producer.publish("huge", "x").await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok);
    assert_eq!(nsqd.stats().published["huge"], 1);
}

/// stop() waits for messages being handled, then closes.
pub async fn graceful_stop_waits_for_in_flight_messages<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    for i in 0..3 {
        nsqd.publish("stop", format!("{i}").as_bytes());
    }
    let consumer = consumer::<R>("stop", 3);
    let started = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (s, d) = (started.clone(), done.clone());
    consumer.add_concurrent_handlers(
        move |_m: Message| {
            s.fetch_add(1, Ordering::SeqCst);
            let d = d.clone();
            async move {
                sleep::<R>(Duration::from_millis(300)).await;
                d.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            }
        },
        3,
    );
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    wait_for::<R>("3 handlers running", || started.load(Ordering::SeqCst) == 3).await;
    consumer.stop().await;
    assert_eq!(done.load(Ordering::SeqCst), 3, "stop waited for the handlers");
    // FIN has no reply: the fake counts them as it reads them.
    wait_for::<R>("3 FINs", || nsqd.stats().finished == 3).await;
    assert_eq!(nsqd.stats().requeued, 0);
    wait_for::<R>("the connection closed", || nsqd.clients() == 0).await;
    assert!(matches!(consumer.connect_to_nsqd(nsqd.addr()).await, Err(Error::Consumer(_) | Error::Stopped)));
}

/// A handler slower than delivery never makes the client hold more than max_in_flight
/// messages: what nsqd has delivered and not seen answered stays within it.
pub async fn slow_handler_holds_at_most_max_in_flight<R: Runtime>() {
    const MAX_IN_FLIGHT: u64 = 4;
    let nsqd = Arc::new(FakeNsqd::start_default().unwrap());
    for i in 0..24 {
        nsqd.publish("slow", format!("{i}").as_bytes());
    }
    let consumer = consumer::<R>("slow", MAX_IN_FLIGHT as u32);
    let most = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (n, m) = (nsqd.clone(), most.clone());
    consumer.add_handler(move |_m: Message| {
        let stats = n.stats();
        let outstanding = stats.delivered - stats.finished - stats.requeued;
        m.fetch_max(outstanding, Ordering::SeqCst);
        async move {
            sleep::<R>(Duration::from_millis(15)).await;
            Ok::<_, std::io::Error>(())
        }
    });
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    wait_for::<R>("24 FINs", || nsqd.stats().finished == 24).await;
    consumer.stop().await;
    let most = most.load(Ordering::SeqCst);
    assert!(most <= MAX_IN_FLIGHT, "{most} messages outstanding with max_in_flight {MAX_IN_FLIGHT}");
    assert!(most >= 2, "the handler was slow enough for messages to queue up ({most})");
}

/// AUTH with a good secret works and its answer is readable from the producer and the
/// consumer; a wrong secret is a typed fatal error.
pub async fn auth_good_and_bad<R: Runtime>() {
    let options = FakeNsqdOptions {
        auth_secrets: [("good-secret".to_owned(), "fixture-user".to_owned())].into(),
        ..Default::default()
    };
    let nsqd = FakeNsqd::start(options).unwrap();
    let good = Producer::<R>::new(
        nsqd.addr(),
        config(|c| {
            c.auth_secret("good-secret");
        }),
    )
    .unwrap();
    good.publish("authed", "x").await.unwrap();
    let auth = good.auth().unwrap();
    assert_eq!((auth.identity.as_str(), auth.permission_count), ("fixture-user", 1));
    let bad = Producer::<R>::new(
        nsqd.addr(),
        config(|c| {
            c.auth_secret("wrong");
        }),
    )
    .unwrap();
    // The publish was never sent, and says why.
    match bad.publish("authed", "x").await {
        Err(Error::Publish(PublishError::NotConnected(ConnectionError::Server(e)))) => {
            assert_eq!(e.code, ErrorCode::AuthFailed)
        }
        other => panic!("{other:?}"),
    }
    match bad.connect().await {
        Err(Error::Connection(ConnectionError::Server(e))) => {
            assert_eq!(e.code, ErrorCode::AuthFailed)
        }
        other => panic!("{other:?}"),
    }
    let none = Producer::<R>::new(nsqd.addr(), Config::new()).unwrap();
    assert!(matches!(none.connect().await, Err(Error::Connection(ConnectionError::AuthRequired))));
    assert_eq!(none.auth(), None);
    assert_eq!(nsqd.stats().published["authed"], 1);

    let consumer = Consumer::<R>::new(
        "authed",
        "ch",
        config(|c| {
            c.auth_secret("good-secret");
        }),
    )
    .unwrap();
    let seen = Seen::default();
    consumer.add_handler(recording_handler(&seen));
    assert!(consumer.auth().is_empty());
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    let answers = consumer.auth();
    assert_eq!(answers.keys().collect::<Vec<_>>(), [&nsqd.addr()]);
    assert_eq!(answers[&nsqd.addr()].identity, "fixture-user");
    wait_for::<R>("the message", || seen.len() == 1).await;
    consumer.stop().await;
}

/// The Stream way of consuming, with explicit answers.
pub async fn stream_consumer<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    for i in 0..5 {
        nsqd.publish("stream", format!("{i}").as_bytes());
    }
    let consumer = consumer::<R>("stream", 2);
    let messages = consumer.messages();
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    let bodies: Vec<Vec<u8>> = messages
        .take(5)
        .map(|m| {
            assert!(m.finish());
            m.body().to_vec()
        })
        .collect()
        .await;
    assert_eq!(bodies.len(), 5);
    wait_for::<R>("finished", || nsqd.stats().finished == 5).await;
    consumer.stop().await;
}

/// Publish and consume through snappy, deflate, TLS, and TLS with snappy.
pub async fn compression_and_tls_round_trips<R: Runtime>() {
    let pki = crate::TestPki::new("round-trips");
    let nsqd = FakeNsqd::start(FakeNsqdOptions { tls: Some(pki.server.clone()), ..Default::default() }).unwrap();
    let ca = pki.ca_file.display().to_string();
    let variants: [&[(&str, &str)]; 5] = [
        &[("snappy", "true")],
        &[("deflate", "true"), ("deflate_level", "3")],
        &[("tls_v1", "true"), ("tls_root_ca_file", &ca)],
        &[("tls_v1", "true"), ("tls_root_ca_file", &ca), ("snappy", "true")],
        &[("tls_v1", "true"), ("tls_root_ca_file", &ca), ("deflate", "true")],
    ];
    for (i, options) in variants.iter().enumerate() {
        let mut config = Config::new();
        for (k, v) in options.iter() {
            config.set(k, v).unwrap();
        }
        config.max_in_flight(10);
        let topic = format!("variant{i}");
        let producer = Producer::<R>::new(nsqd.addr(), config.clone()).unwrap();
        producer.multi_publish(&topic, ["a", "b"]).await.unwrap_or_else(|e| panic!("{options:?}: {e}"));
        if let Err(e) = producer.publish(&topic, "c".repeat(100_000)).await {
            panic!("{options:?}: {e}; reconnect says {:?}", producer.connect().await);
        }
        let consumer = Consumer::<R>::new(&topic, "ch", config).unwrap();
        let seen = Seen::default();
        consumer.add_handler(recording_handler(&seen));
        consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
        wait_for::<R>("3 messages", || seen.len() == 3).await;
        let bodies = seen.sorted();
        assert_eq!(bodies[0], b"a");
        assert_eq!(bodies[2].len(), 100_000, "{options:?}");
        consumer.stop().await;
        producer.stop().await;
    }
}

/// A server certificate signed by another CA is refused: nothing is published.
pub async fn tls_with_a_wrong_ca_is_refused<R: Runtime>() {
    let (pki, other) = (crate::TestPki::new("server"), crate::TestPki::new("other"));
    let nsqd = FakeNsqd::start(FakeNsqdOptions { tls: Some(pki.server.clone()), ..Default::default() }).unwrap();
    let mut config = Config::new();
    config.set("tls_v1", "true").unwrap().set("tls_root_ca_file", &other.ca_file.display().to_string()).unwrap();
    let producer = Producer::<R>::new(nsqd.addr(), config).unwrap();
    match producer.connect().await {
        Err(Error::Connection(ConnectionError::Transport(e))) => {
            assert!(e.to_string().contains("TLS"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(producer.publish("tls", "x").await.is_err());
    assert!(!nsqd.stats().published.contains_key("tls"));
}

/// An address on which nothing listens: connecting to it is refused.
pub fn dead_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// lookupd lists a live nsqd and one whose port refuses connections, and is polled every
/// second: the refused dials never trigger lookupd queries (go-nsq's tools make 4 queries in
/// 3.3 s), and the live nsqd is consumed.
pub async fn a_listed_nsqd_that_refuses_causes_no_query_storm<R: Runtime>() {
    let start = Instant::now();
    let nsqd = FakeNsqd::start_default().unwrap();
    let lookupd = FakeLookupd::start().unwrap();
    lookupd.register("storm", &nsqd.addr());
    lookupd.register("storm", &dead_addr());
    nsqd.publish("storm", b"from the live one");
    let consumer = Consumer::<R>::new(
        "storm",
        "ch",
        config(|c| {
            c.lookupd_poll_interval(Duration::from_secs(1)).unwrap();
        }),
    )
    .unwrap();
    let seen = Seen::default();
    consumer.add_handler(recording_handler(&seen));
    consumer.connect_to_nsqlookupd(lookupd.addr()).await.unwrap();
    wait_for::<R>("the live nsqd's message", || seen.len() == 1).await;
    sleep::<R>(Duration::from_millis(3300).saturating_sub(start.elapsed())).await;
    let queries = lookupd.queries();
    // One at once, then one a second after the first jittered interval.
    assert!((2..=5).contains(&queries), "{queries} lookupd queries in {:?}", start.elapsed());
    assert_eq!(consumer.stats().await.connections, 1);
    consumer.stop().await;
}

/// Nothing listens: `connect_to_nsqd`, `connect` and `publish` fail at once with the dial's
/// cause. Connecting without handlers and an invalid configuration are refused up front.
pub async fn connecting_where_nothing_listens_fails_at_once<R: Runtime>() {
    let dead = dead_addr();
    let refused = |e: &Error| match e {
        Error::Connection(ConnectionError::Dial { addr, error })
        | Error::Publish(PublishError::NotConnected(ConnectionError::Dial { addr, error })) => {
            *addr == dead && error.kind() == std::io::ErrorKind::ConnectionRefused
        }
        _ => false,
    };
    let bare = consumer::<R>("t", 1);
    assert!(matches!(bare.connect_to_nsqd(dead.clone()).await, Err(Error::NoHandlers)));
    assert!(matches!(bare.connect_to_nsqlookupd("127.0.0.1:1").await, Err(Error::NoHandlers)));
    let consumer = consumer::<R>("t", 1);
    consumer.add_handler(recording_handler(&Seen::default()));
    let err = consumer.connect_to_nsqd(dead.clone()).await.unwrap_err();
    assert!(refused(&err), "{err:?}");
    assert!(err.to_string().contains(&dead), "{err}");
    // Not retried: the consumer holds no address and can be pointed at it again.
    assert!(refused(&consumer.connect_to_nsqd(dead.clone()).await.unwrap_err()));
    consumer.stop().await;

    let producer = Producer::<R>::new(dead.clone(), Config::new()).unwrap();
    let err = producer.connect().await.unwrap_err();
    assert!(refused(&err), "{err:?}");
    let err = producer.publish("t", "x").await.unwrap_err();
    assert!(refused(&err), "{err:?}");
    let both = config(|c| {
        c.set("snappy", "true").unwrap().set("deflate", "true").unwrap();
    });
    assert!(matches!(Producer::<R>::new(dead, both), Err(Error::Config(_))));
}

/// An nsqd that requires a client certificate, and a client with none: the first connect fails
/// at once with the TLS cause, and nothing retries it.
pub async fn a_required_client_certificate_fails_the_first_connect<R: Runtime>() {
    let pki = crate::TestPki::new("client-auth");
    let options = FakeNsqdOptions { tls: Some(pki.server_requiring_client_cert.clone()), ..Default::default() };
    let nsqd = FakeNsqd::start(options).unwrap();
    let tls = config(|c| {
        c.set("tls_v1", "true").unwrap().set("tls_root_ca_file", &pki.ca_file.display().to_string()).unwrap();
    });
    let consumer = Consumer::<R>::new("t", "ch", tls.clone()).unwrap();
    consumer.add_handler(recording_handler(&Seen::default()));
    match consumer.connect_to_nsqd(nsqd.addr()).await {
        Err(Error::Connection(ConnectionError::Transport(e))) => assert!(e.to_string().contains("TLS"), "{e}"),
        other => panic!("{other:?}"),
    }
    let producer = Producer::<R>::new(nsqd.addr(), tls).unwrap();
    match producer.publish("t", "x").await {
        Err(Error::Publish(PublishError::NotConnected(ConnectionError::Transport(e)))) => {
            assert!(e.to_string().contains("TLS"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    sleep::<R>(Duration::from_millis(1500)).await;
    assert_eq!(nsqd.stats().connections, 2, "one attempt each, no retries");
    consumer.stop().await;
}

/// nsqd drops every connection mid-stream and requeues what was in flight; the application
/// takes a fixed number of messages from the stream, drops the stream and stops: the stop has
/// nothing to wait for (the messages it never took go back to nsqd).
pub async fn a_crash_mid_stream_then_stop_waits_for_nothing<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    for i in 0..400 {
        nsqd.publish("crash", format!("{i}").as_bytes());
    }
    let consumer = consumer::<R>("crash", 50);
    let mut messages = consumer.messages();
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    let mut taken = 0;
    while let Some(m) = messages.next().await {
        m.finish();
        taken += 1;
        if taken == 100 {
            nsqd.kill_all();
        }
        if taken == 400 {
            break;
        }
    }
    drop(messages);
    // The stop completes long before its 30 s bound for handlers that never answer.
    let started = Instant::now();
    let stopped = std::pin::pin!(consumer.stop());
    let bound = std::pin::pin!(sleep::<R>(Duration::from_secs(10)));
    let done = futures_util::future::select(stopped, bound).await;
    assert!(matches!(done, futures_util::future::Either::Left(_)), "stop still waiting after {:?}", started.elapsed());
    let finished = nsqd.stats().finished_bodies;
    let mut distinct: Vec<_> = finished.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 300, "{} distinct finished", distinct.len());
}

/// A producer pool over two nsqds; the first one dies (crashes: it stops listening, what it
/// held is gone) in the middle of a stream of publishes, for each strategy. Every publish
/// resolves; each acknowledged one is held by an nsqd that acknowledged it; a body reaches
/// both nsqds only when the strategy says so (`All`) or when it was sent again after a lost
/// connection (at most the publishes in flight when the nsqd died); failures name the nsqd.
pub async fn a_pool_loses_an_nsqd_mid_stream<R: Runtime>() {
    use futures_util::stream::FuturesUnordered;
    use std::collections::HashSet;
    const N: usize = 100;
    const KILL_AT: usize = 40;
    const CONCURRENCY: usize = 10;
    for strategy in [Strategy::Failover, Strategy::RoundRobin, Strategy::All] {
        let first = FakeNsqd::start_default().unwrap();
        let second = FakeNsqd::start_default().unwrap();
        let (addr1, addr2) = (first.addr(), second.addr());
        let options = PoolOptions::new(strategy).wait(Duration::from_millis(500));
        let pool = Producer::<R>::pool([addr1.clone(), addr2.clone()], options, Config::new()).unwrap();
        pool.connect().await.unwrap();
        let mut first = Some(first);
        let mut held_by_first = HashSet::new();
        let mut results = Vec::new();
        let mut pending = FuturesUnordered::new();
        let mut next = 0;
        while results.len() < N {
            while next < N && pending.len() < CONCURRENCY {
                let (pool, body) = (pool.clone(), format!("p{next:03}"));
                pending.push(async move {
                    let result = pool.publish("pool", body.clone()).await;
                    (body, result)
                });
                next += 1;
            }
            let Some(done) = pending.next().await else { break };
            results.push(done);
            if results.len() == KILL_AT {
                if let Some(dying) = first.take() {
                    held_by_first =
                        dying.crash().published_bodies.remove("pool").unwrap_or_default().into_iter().collect();
                }
            }
        }
        assert_eq!(results.len(), N, "{strategy:?}: every publish resolved");
        let held_by_second: Vec<Vec<u8>> = second.stats().published_bodies.remove("pool").unwrap_or_default();
        let second_set: HashSet<Vec<u8>> = held_by_second.iter().cloned().collect();
        assert_eq!(second_set.len(), held_by_second.len(), "{strategy:?}: nothing twice on one nsqd");
        let mut oks = 0;
        for (body, result) in &results {
            let body = body.as_bytes().to_vec();
            match result {
                Ok(()) => {
                    oks += 1;
                    match strategy {
                        Strategy::All => assert!(second_set.contains(&body), "{strategy:?}: {body:?} acknowledged"),
                        _ => assert!(
                            second_set.contains(&body) || held_by_first.contains(&body),
                            "{strategy:?}: {body:?} acknowledged but held nowhere"
                        ),
                    }
                }
                Err(Error::Pool(e)) => {
                    assert!(!e.attempts.is_empty(), "{strategy:?}: {e}");
                    assert!(e.attempts.iter().all(|(a, _)| *a == addr1 || *a == addr2), "{strategy:?}: {e}");
                    if strategy == Strategy::All {
                        assert!(
                            e.attempts.iter().all(|(a, _)| *a == addr1),
                            "{strategy:?}: only the dead one fails: {e}"
                        );
                    }
                }
                Err(other) => panic!("{strategy:?}: {other:?}"),
            }
        }
        let on_both = held_by_first.intersection(&second_set).count();
        match strategy {
            Strategy::All => {
                assert!(oks >= KILL_AT - CONCURRENCY, "{strategy:?}: {oks} acknowledged");
                assert!(oks < N, "{strategy:?}: publishes after the death cannot reach every nsqd");
            }
            _ => {
                assert!(oks >= N - CONCURRENCY, "{strategy:?}: the survivor takes over, {oks} acknowledged");
                assert!(on_both <= CONCURRENCY, "{strategy:?}: {on_both} duplicates, more than were in flight");
            }
        }
        let stats = pool.stats().await;
        assert_eq!(stats.len(), 2);
        assert!(matches!(stats[0].health, nsq_sansio::Health::Down { .. } | nsq_sansio::Health::Connecting));
        assert_eq!(stats[1].health, nsq_sansio::Health::Connected);
        pool.stop().await;
    }
}

/// Messages delivered but not yet taken when their connection is lost are not handed to the
/// application: nsqd requeued them and delivers them again, so the old copies would only be
/// duplicates that cannot be finished.
pub async fn messages_of_a_lost_connection_are_not_handed_out<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    for i in 0..20 {
        nsqd.publish("stale", format!("{i}").as_bytes());
    }
    let consumer = consumer::<R>("stale", 20);
    let mut messages = consumer.messages();
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    let start = Instant::now();
    while consumer.stats().await.messages_received < 20 {
        assert!(start.elapsed() < PATIENCE, "never received");
        sleep::<R>(Duration::from_millis(5)).await;
    }
    // All 20 wait in the stream, unread; the connection dies and the consumer reconnects.
    nsqd.kill_all();
    wait_for::<R>("a reconnect", || nsqd.stats().connections >= 2).await;
    for _ in 0..20 {
        let m = messages.next().await.unwrap();
        assert!(m.attempts() >= 2, "a copy from the lost connection: {m:?}");
        assert!(m.finish());
    }
    wait_for::<R>("all finished", || nsqd.stats().finished == 20).await;
    drop(messages);
    consumer.stop().await;
}

/// A loopback address with a port nothing uses right now.
fn free_local_addr() -> std::net::SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// `local_addr` set: the producer's and the consumer's sockets come from that address (nsqd
/// sees the port); a local address of the other IP family is refused with the dial's cause.
pub async fn local_addr_is_bound_before_connecting<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let from = free_local_addr();
    let producer = Producer::<R>::new(
        nsqd.addr(),
        config(|c| {
            c.local_addr(Some(from));
        }),
    )
    .unwrap();
    producer.publish("bound", "x").await.unwrap();
    assert_eq!(nsqd.stats().peers, [from]);

    let from = free_local_addr();
    let consumer = Consumer::<R>::new(
        "bound",
        "ch",
        config(|c| {
            c.local_addr(Some(from));
        }),
    )
    .unwrap();
    let seen = Seen::default();
    consumer.add_handler(recording_handler(&seen));
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    wait_for::<R>("the message", || seen.len() == 1).await;
    assert_eq!(nsqd.stats().peers.last(), Some(&from));
    consumer.stop().await;
    producer.stop().await;

    let v6 = Producer::<R>::new(
        nsqd.addr(),
        config(|c| {
            c.set("local_addr", "[::1]:0").unwrap();
        }),
    )
    .unwrap();
    match v6.connect().await {
        Err(Error::Connection(ConnectionError::Dial { error, .. })) => {
            assert_eq!(error.kind(), std::io::ErrorKind::AddrNotAvailable, "{error}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(nsqd.stats().connections, 2);
}

/// An https lookupd that answers only with `Authorization: Bearer <secret>`: a consumer with
/// the CA and the secret finds the nsqd; without the secret, or with the header switched off
/// (`skip_lookupd_authorization=false`), lookupd refuses it and nothing is dialled.
pub async fn https_lookupd_demands_the_bearer_token<R: Runtime>() {
    let pki = crate::TestPki::new("lookupd-bearer");
    let options =
        FakeLookupdOptions { tls: Some(pki.server.clone()), bearer: Some("s3cret".into()), ..Default::default() };
    let lookupd = FakeLookupd::start_with(options).unwrap();
    let nsqd = FakeNsqd::start_default().unwrap();
    lookupd.register("secured", &nsqd.addr());
    nsqd.publish("secured", b"found over https");
    let url = format!("https://{}", lookupd.addr());
    let ca = pki.ca_file.display().to_string();
    let with = |secret: Option<&str>, header: bool| {
        let mut c = Config::new();
        // The CA verifies lookupd; nsqd is plain.
        c.set("tls_root_ca_file", &ca).unwrap().set("tls_v1", "false").unwrap();
        c.set("lookupd_poll_interval", "200ms").unwrap();
        c.set("skip_lookupd_authorization", if header { "true" } else { "false" }).unwrap();
        if let Some(secret) = secret {
            c.auth_secret(secret);
        }
        c
    };

    let consumer = Consumer::<R>::new("secured", "ch", with(Some("s3cret"), true)).unwrap();
    let seen = Seen::default();
    consumer.add_handler(recording_handler(&seen));
    consumer.connect_to_nsqlookupd(url.clone()).await.unwrap();
    wait_for::<R>("the message", || seen.len() == 1).await;
    assert_eq!(seen.sorted(), [b"found over https".to_vec()]);
    assert_eq!(lookupd.refused(), 0);
    consumer.stop().await;
    let connections = nsqd.stats().connections;

    for (secret, header) in [(None, true), (Some("s3cret"), false), (Some("wrong"), true)] {
        let refused = lookupd.refused();
        let consumer = Consumer::<R>::new("secured", "ch", with(secret, header)).unwrap();
        consumer.add_handler(recording_handler(&Seen::default()));
        consumer.connect_to_nsqlookupd(url.clone()).await.unwrap();
        wait_for::<R>("two refused queries", || lookupd.refused() >= refused + 2).await;
        assert_eq!(nsqd.stats().connections, connections, "{secret:?} {header}: nothing dialled");
        consumer.stop().await;
    }
}

/// The first lookupd fails (500, after a moment); the next one is asked at once, long before
/// the next poll, and its nsqd is consumed.
pub async fn a_failed_first_lookupd_then_a_good_second<R: Runtime>() {
    // The delay lets the second lookupd be added before the first query fails.
    let failing = FakeLookupdOptions { fail: Some(500), delay: Duration::from_millis(500), ..Default::default() };
    let bad = FakeLookupd::start_with(failing).unwrap();
    let good = FakeLookupd::start().unwrap();
    let nsqd = FakeNsqd::start_default().unwrap();
    good.register("retry", &nsqd.addr());
    nsqd.publish("retry", b"from the second lookupd");
    // The default 60 s poll interval: only the retry can find the nsqd within the wait.
    let consumer = consumer::<R>("retry", 1);
    let seen = Seen::default();
    consumer.add_handler(recording_handler(&seen));
    consumer.connect_to_nsqlookupds([bad.addr(), good.addr()]).await.unwrap();
    wait_for::<R>("the message", || seen.len() == 1).await;
    assert_eq!((bad.queries(), good.queries()), (1, 1));
    consumer.stop().await;
}

/// A discovery filter sees every nsqd lookupd lists and keeps one: only that one is dialled,
/// poll after poll.
pub async fn a_discovery_filter_chooses_the_nsqds<R: Runtime>() {
    let lookupd = FakeLookupd::start().unwrap();
    let nsqds: Vec<FakeNsqd> = (0..2).map(|_| FakeNsqd::start_default().unwrap()).collect();
    for n in &nsqds {
        lookupd.register("filtered", &n.addr());
        n.publish("filtered", n.addr().as_bytes());
    }
    let consumer = Consumer::<R>::new(
        "filtered",
        "ch",
        config(|c| {
            c.lookupd_poll_interval(Duration::from_millis(100)).unwrap();
        }),
    )
    .unwrap();
    let given: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let (record, keep) = (given.clone(), nsqds[1].addr());
    consumer.set_discovery_filter(move |addrs| {
        record.lock().unwrap().push(addrs.clone());
        addrs.into_iter().filter(|a| *a == keep).collect()
    });
    let seen = Seen::default();
    consumer.add_handler(recording_handler(&seen));
    consumer.connect_to_nsqlookupd(lookupd.addr()).await.unwrap();
    wait_for::<R>("the kept nsqd's message", || seen.len() == 1).await;
    wait_for::<R>("more polls", || lookupd.queries() >= 4).await;
    assert_eq!(seen.sorted(), [nsqds[1].addr().into_bytes()]);
    assert_eq!(nsqds[0].stats().connections, 0, "the filtered-out nsqd is never dialled");
    assert_eq!(nsqds[1].stats().connections, 1);
    let mut listed = vec![nsqds[0].addr(), nsqds[1].addr()];
    listed.sort();
    for mut seen_by_filter in given.lock().unwrap().clone() {
        seen_by_filter.sort();
        assert_eq!(seen_by_filter, listed);
    }
    consumer.stop().await;
}

/// `ping` connects, writes a NOP (nsqd reads it and does not answer), and fails with the cause
/// when the connection cannot be made.
pub async fn ping_writes_a_nop_or_says_why_it_cannot<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let producer = Producer::<R>::new(nsqd.addr(), Config::new()).unwrap();
    producer.ping().await.unwrap();
    wait_for::<R>("the first NOP", || nsqd.stats().nops == 1).await;
    producer.ping().await.unwrap();
    wait_for::<R>("the second NOP", || nsqd.stats().nops == 2).await;
    assert_eq!(nsqd.stats().connections, 1);
    producer.publish("pinged", "x").await.unwrap();
    producer.stop().await;
    assert!(matches!(producer.ping().await, Err(Error::Command(_) | Error::Stopped)));

    let dead = dead_addr();
    match Producer::<R>::new(dead, Config::new()).unwrap().ping().await {
        Err(Error::Connection(ConnectionError::Dial { error, .. })) => {
            assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused)
        }
        other => panic!("{other:?}"),
    }
    let options = FakeNsqdOptions { auth_secrets: [("k".to_owned(), "id".to_owned())].into(), ..Default::default() };
    let secured = FakeNsqd::start(options).unwrap();
    let no_secret = Producer::<R>::new(secured.addr(), Config::new()).unwrap();
    assert!(matches!(no_secret.ping().await, Err(Error::Connection(ConnectionError::AuthRequired))));
    assert_eq!(secured.stats().nops, 0);
}

/// A handler that holds its messages makes the consumer starved (go-nsq's `IsStarved`); once it
/// lets them go, it is not.
pub async fn a_blocked_handler_starves_the_consumer<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    for i in 0..2 {
        nsqd.publish("starve", format!("{i}").as_bytes());
    }
    let consumer = consumer::<R>("starve", 2);
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = release.clone();
    consumer.add_concurrent_handlers(
        move |_m: Message| {
            let gate = gate.clone();
            async move {
                while !gate.load(Ordering::SeqCst) {
                    sleep::<R>(Duration::from_millis(5)).await;
                }
                Ok::<_, std::io::Error>(())
            }
        },
        2,
    );
    assert!(!consumer.is_starved().await);
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    let start = Instant::now();
    while !consumer.is_starved().await {
        assert!(start.elapsed() < PATIENCE, "never starved");
        sleep::<R>(Duration::from_millis(10)).await;
    }
    release.store(true, Ordering::SeqCst);
    wait_for::<R>("both finished", || nsqd.stats().finished == 2).await;
    while consumer.is_starved().await {
        assert!(start.elapsed() < PATIENCE, "still starved");
        sleep::<R>(Duration::from_millis(10)).await;
    }
    consumer.stop().await;
}

/// A peer that never stops sending (one message, then nsqd heartbeats as fast as loopback
/// carries them) does not keep the consumer's engine from yielding: the handler task on the
/// same runtime still gets the message and finishes it, and the consumer stops.
pub async fn a_flooding_nsqd_does_not_monopolize_the_consumer<R: Runtime>() {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fins = Arc::new(AtomicUsize::new(0));
    let addr = flooding_nsqd(stop.clone(), fins.clone());
    let consumer = consumer::<R>("flood", 10);
    let seen = Seen::default();
    consumer.add_handler(recording_handler(&seen));
    consumer.connect_to_nsqd(addr).await.unwrap();
    wait_for::<R>("the message handled", || seen.len() == 1).await;
    wait_for::<R>("its FIN written", || fins.load(Ordering::SeqCst) == 1).await;
    stop.store(true, Ordering::SeqCst);
    consumer.stop().await;
}

/// A peer that takes the handshake and then never reads again: the producer's writes back up
/// in the socket until the write timeout ends the connection, and every publish under way
/// fails with that cause instead of waiting.
pub async fn an_nsqd_that_stops_reading_times_the_writes_out<R: Runtime>() {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = {
        let stop = stop.clone();
        hand_made_nsqd(move |_, _| {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let producer = Producer::<R>::new(
        addr,
        config(|c| {
            c.write_timeout(Duration::from_millis(200)).unwrap();
        }),
    )
    .unwrap();
    producer.connect().await.unwrap();
    // More than loopback's socket buffers on both ends hold.
    let body = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
    let publishes = (0..400).map(|_| producer.publish("stalled", body.clone()));
    let results = futures_util::future::join_all(publishes).await;
    stop.store(true, Ordering::SeqCst);
    for result in &results {
        let error = result.as_ref().expect_err("nsqd read nothing, so acknowledged nothing");
        assert!(matches!(error, Error::Publish(PublishError::ConnectionLost(ConnectionError::Io(_)))), "{error:?}");
        assert!(error.to_string().contains("timed out"), "{error}");
    }
}

/// An nsqd whose socket stays open but that sends nothing, heartbeats included: the consumer's
/// read timeout ends the connection, and it dials the nsqd again.
pub async fn a_silent_nsqd_is_read_timed_out_and_redialled<R: Runtime>() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let consumer = Consumer::<R>::new(
        "silent",
        "ch",
        config(|c| {
            c.heartbeat_interval(Some(Duration::from_secs(1)));
            c.read_timeout(Duration::from_millis(1500)).unwrap();
        }),
    )
    .unwrap();
    let seen = Seen::default();
    consumer.add_handler(recording_handler(&seen));
    consumer.connect_to_nsqd(nsqd.addr()).await.unwrap();
    wait_for::<R>("a heartbeat answered", || nsqd.stats().nops >= 1).await;
    nsqd.go_silent();
    wait_for::<R>("a second connection", || nsqd.stats().connections >= 2).await;
    consumer.stop().await;
}

/// Speaks just enough of nsqd to subscribe one consumer (an `OK` to IDENTIFY: no feature
/// negotiation), then sends one message and heartbeats until `stop`, and closes. Counts the
/// FINs it reads.
fn flooding_nsqd(stop: Arc<std::sync::atomic::AtomicBool>, fins: Arc<AtomicUsize>) -> String {
    hand_made_nsqd(move |input, out| flood(input, out, &stop, fins))
}

/// A one-connection nsqd of a test's own: answers the magic and IDENTIFY with `OK` (no feature
/// negotiation), then hands the connection's reader and writer to `then` on its thread.
fn hand_made_nsqd(
    then: impl FnOnce(std::io::BufReader<std::net::TcpStream>, std::net::TcpStream) + Send + 'static,
) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let Ok((mut out, _)) = listener.accept() else { return };
        let mut input = BufReader::new(out.try_clone().unwrap());
        let mut magic = [0u8; 4];
        input.read_exact(&mut magic).unwrap();
        let mut line = String::new();
        input.read_line(&mut line).unwrap();
        assert_eq!(line, "IDENTIFY\n");
        let mut size = [0u8; 4];
        input.read_exact(&mut size).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(size) as usize];
        input.read_exact(&mut body).unwrap();
        out.write_all(&crate::frame(0, b"OK")).unwrap();
        then(input, out);
    });
    addr
}

/// The flooding peer's part after IDENTIFY: `OK` to SUB, FINs counted on a thread of their
/// own, one message, then heartbeats until `stop`.
fn flood(
    mut input: std::io::BufReader<std::net::TcpStream>,
    mut out: std::net::TcpStream,
    stop: &std::sync::atomic::AtomicBool,
    fins: Arc<AtomicUsize>,
) {
    use std::io::{BufRead, Write};
    let mut line = String::new();
    input.read_line(&mut line).unwrap();
    assert!(line.starts_with("SUB "), "{line}");
    out.write_all(&crate::frame(0, b"OK")).unwrap();
    std::thread::spawn(move || {
        let mut line = String::new();
        while input.read_line(&mut line).is_ok_and(|n| n > 0) {
            if line.starts_with("FIN ") {
                fins.fetch_add(1, Ordering::SeqCst);
            }
            line.clear();
        }
    });
    let _ = out.write_all(&crate::message_frame(0, 1, b"0123456789abcdef", b"flood"));
    let heartbeats = crate::frame(0, b"_heartbeat_").repeat(4096);
    while !stop.load(Ordering::SeqCst) {
        if out.write_all(&heartbeats).is_err() {
            break;
        }
    }
    let _ = out.shutdown(std::net::Shutdown::Both);
}

/// Keeps `Future` in scope for the macro's users.
#[doc(hidden)]
pub fn _assert_future<F: Future>(_: &F) {}
