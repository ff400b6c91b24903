//! The built `to_nsq` and `nsq_tail` examples against the fake nsqd.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nsq_tests::{FakeNsqd, FakeNsqdOptions, TestPki};

/// `cargo test` builds every example next to the test binaries.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().join("examples").join(name);
    assert!(dir.exists(), "{} not built: run `cargo test --workspace` (it builds examples)", dir.display());
    dir
}

/// Runs a tool with `stdin`, killing it if it takes over 60 s.
fn run(name: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(example(name))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("{name} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn to_nsq_then_nsq_tail_round_trip() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let addr = nsqd.addr();
    let out = run("to_nsq", &["--topic", "tools", "--nsqd-tcp-address", &addr], b"one\ntwo\nthree\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(nsqd.stats().published["tools"], 3);

    let out = run("nsq_tail", &["--topic", "tools", "--channel", "c", "--nsqd-tcp-address", &addr, "-n", "3"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\nthree\n");
}

/// The last line a tool printed on stderr: its error, after its log lines.
fn error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines().last().unwrap_or_default().to_owned()
}

#[test]
fn to_nsq_fails_with_the_dial_error_when_no_nsqd_listens() {
    let addr = nsq_tests::scenarios::dead_addr();
    let out = run("to_nsq", &["--topic", "t", "--nsqd-tcp-address", &addr], b"x\n");
    assert_eq!(out.status.code(), Some(1));
    let err = error_line(&out);
    assert!(err.starts_with("to_nsq: error: ") && err.contains(&addr), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    // It logged what it tried.
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting to nsqd"));
}

#[test]
fn nsq_tail_exits_at_once_with_the_dial_error_when_no_nsqd_listens() {
    let addr = nsq_tests::scenarios::dead_addr();
    let start = Instant::now();
    let out = run("nsq_tail", &["--topic", "t", "--nsqd-tcp-address", &addr], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    let err = error_line(&out);
    assert!(err.starts_with("nsq_tail: error: ") && err.contains(&addr), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
}

#[test]
fn nsq_tail_exits_at_once_when_nsqd_requires_a_client_certificate() {
    let pki = TestPki::new("tail-client-auth");
    let options = FakeNsqdOptions { tls: Some(pki.server_requiring_client_cert.clone()), ..Default::default() };
    let nsqd = FakeNsqd::start(options).unwrap();
    let ca = format!("tls_root_ca_file,{}", pki.ca_file.display());
    let args =
        ["--topic", "t", "--nsqd-tcp-address", &nsqd.addr(), "--consumer-opt", "tls_v1,true", "--consumer-opt", &ca];
    let out = run("nsq_tail", &args, b"");
    assert_eq!(out.status.code(), Some(1));
    let err = error_line(&out);
    assert!(err.starts_with("nsq_tail: error: ") && err.contains("TLS"), "{err}");
    assert_eq!(nsqd.stats().connections, 1, "no retries");
}

#[test]
fn nsq_tail_reaches_its_count_through_a_crash_and_exits_without_waiting() {
    let nsqd = FakeNsqd::start_default().unwrap();
    for i in 0..2000 {
        nsqd.publish("crash", format!("m{i}").as_bytes());
    }
    let addr = nsqd.addr();
    let tail = std::thread::spawn(move || {
        run("nsq_tail", &["--topic", "crash", "--channel", "c", "--nsqd-tcp-address", &addr, "-n", "2000"], b"")
    });
    let start = Instant::now();
    while nsqd.stats().finished < 500 {
        assert!(start.elapsed() < Duration::from_secs(30), "no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Connections dropped, in-flight messages requeued: some come twice.
    nsqd.kill_all();
    let out = tail.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2000);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("stop timeout"), "the stop waited for messages nobody would answer:\n{err}");
}

#[test]
fn to_nsq_publishes_to_several_nsqds_by_strategy() {
    let (a, b) = (FakeNsqd::start_default().unwrap(), FakeNsqd::start_default().unwrap());
    let (addr_a, addr_b) = (a.addr(), b.addr());
    let lines = b"1\n2\n3\n4\n";
    let count = |n: &FakeNsqd, topic: &str| n.stats().published.get(topic).copied().unwrap_or(0);
    // Default: every line to every nsqd, as nsq's to_nsq does.
    let out = run("to_nsq", &["--topic", "all", "--nsqd-tcp-address", &addr_a, "--nsqd-tcp-address", &addr_b], lines);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!((count(&a, "all"), count(&b, "all")), (4, 4));
    let args =
        ["--topic", "rr", "--nsqd-tcp-address", &addr_a, "--nsqd-tcp-address", &addr_b, "--strategy", "round-robin"];
    let out = run("to_nsq", &args, lines);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(count(&a, "rr") + count(&b, "rr"), 4);
    assert!(count(&a, "rr") > 0 && count(&b, "rr") > 0);
    // Failover past a dead first nsqd; with all, the dead one fails the run at once.
    let dead = nsq_tests::scenarios::dead_addr();
    let args = ["--topic", "fo", "--nsqd-tcp-address", &dead, "--nsqd-tcp-address", &addr_b, "--strategy", "failover"];
    let out = run("to_nsq", &args, lines);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(count(&b, "fo"), 4);
    let out = run("to_nsq", &["--topic", "x", "--nsqd-tcp-address", &dead, "--nsqd-tcp-address", &addr_b], lines);
    assert_eq!(out.status.code(), Some(1));
    let err = error_line(&out);
    assert!(err.contains(&dead) && err.to_lowercase().contains("refused"), "{err}");
    let out = run("to_nsq", &["--topic", "x", "--nsqd-tcp-address", &addr_a, "--strategy", "sideways"], lines);
    assert!(!out.status.success());
}

#[test]
fn to_nsq_finds_its_nsqds_through_lookupd_nodes() {
    let (a, b) = (FakeNsqd::start_default().unwrap(), FakeNsqd::start_default().unwrap());
    let lookupd = nsq_tests::FakeLookupd::start().unwrap();
    // Registered under other topics: /nodes lists every nsqd whatever its topics.
    lookupd.register("elsewhere", &a.addr());
    lookupd.register("other", &b.addr());
    let out = run("to_nsq", &["--topic", "found", "--lookupd-http-address", &lookupd.addr()], b"x\ny\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let count = |n: &FakeNsqd| n.stats().published.get("found").copied().unwrap_or(0);
    assert_eq!((count(&a), count(&b)), (2, 2), "every line to every nsqd lookupd knows");
}

#[test]
fn nsq_tail_stops_cleanly_on_sigint_and_sigterm() {
    for signal in ["-INT", "-TERM"] {
        let nsqd = FakeNsqd::start_default().unwrap();
        for i in 0..5 {
            nsqd.publish("sig", format!("{i}").as_bytes());
        }
        let mut child = Command::new(example("nsq_tail"))
            .args(["--topic", "sig", "--channel", "c", "--nsqd-tcp-address", &nsqd.addr()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while nsqd.stats().finished < 5 {
            assert!(start.elapsed() < Duration::from_secs(30), "no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        while child.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < Duration::from_secs(30), "{signal} did not stop nsq_tail");
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{signal}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 5);
        // It closed its connection (CLS, then the socket) rather than vanishing.
        while nsqd.clients() > 0 {
            assert!(start.elapsed() < Duration::from_secs(30), "the connection stayed open");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn to_nsq_refuses_bad_options_and_bad_topics() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let addr = nsqd.addr();
    let out = run("to_nsq", &["--topic", "t", "--nsqd-tcp-address", &addr, "--producer-opt", "nope,1"], b"x\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option"));
    let out = run("to_nsq", &["--topic", "bad!topic", "--nsqd-tcp-address", &addr], b"x\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad!topic"));
}

#[test]
fn the_blocking_std_net_example_publishes_and_consumes() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let addr = nsqd.addr();
    let out = run("blocking", &[&addr, "blocking_topic", "3"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "published 3 messages\nmessage 0\nmessage 1\nmessage 2\n");
    assert_eq!(nsqd.stats().finished, 3);
}

#[test]
fn the_blocking_example_fails_clearly_without_nsqd() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = run("blocking", &[&format!("127.0.0.1:{port}")], b"");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to nsqd"));
}

/// The `key=value` fields of the `RESULT` line a bench tool printed.
fn result_fields(out: &Output) -> std::collections::HashMap<String, String> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("RESULT ")).expect("a RESULT line");
    line.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

const LATENCIES: [&str; 4] = ["lat_p50_us", "lat_p99_us", "lat_p999_us", "lat_max_us"];

/// Latency percentiles that are numbers, in order.
fn assert_latencies(fields: &std::collections::HashMap<String, String>) {
    let values: Vec<f64> = LATENCIES.iter().map(|k| fields[*k].parse().unwrap()).collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
    assert!(values[0] > 0.0, "{values:?}");
}

#[test]
fn bench_at_a_rate_publishes_every_message_and_reports_latencies() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let addr = nsqd.addr();
    let args = ["--mode", "pub", "--topic", "lat", "--nsqd-tcp-address", &addr, "--n", "300", "--rate", "3000"];
    let fields = result_fields(&run("bench", &args, b""));
    assert_eq!(fields["client"], "nsq-tokio");
    assert_eq!(fields["rate"], "3000");
    assert_latencies(&fields);
    assert_eq!(nsqd.stats().published["lat"], 300);

    // Without a rate, pub reports no latency: its publishes are not scheduled.
    let args = ["--mode", "pub", "--topic", "fast", "--nsqd-tcp-address", &addr, "--n", "300"];
    let fields = result_fields(&run("bench", &args, b""));
    assert!(LATENCIES.iter().all(|k| !fields.contains_key(*k)), "{fields:?}");
    assert_eq!(nsqd.stats().published["fast"], 300);
}

#[test]
fn bench_sub_at_a_rate_publishes_what_it_consumes_and_reports_end_to_end_latencies() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let addr = nsqd.addr();
    let args = ["--mode", "sub", "--topic", "e2e", "--nsqd-tcp-address", &addr, "--n", "300", "--rate", "3000"];
    let fields = result_fields(&run("bench", &args, b""));
    assert_eq!(fields["msgs"], "300");
    assert_latencies(&fields);
    let stats = nsqd.stats();
    assert_eq!(stats.published["e2e"], 300);
    assert_eq!(stats.finished, 300);
}

#[test]
fn bench_refuses_a_rate_for_mpub() {
    let nsqd = FakeNsqd::start_default().unwrap();
    let out = run("bench", &["--mode", "mpub", "--nsqd-tcp-address", &nsqd.addr(), "--rate", "10"], b"");
    assert!(!out.status.success());
    assert!(error_line(&out).contains("--rate applies to pub and sub"), "{}", error_line(&out));
}

#[test]
fn raw_bench_publishes_and_consumes_every_message() {
    for (poll, client) in [(&[][..], "raw"), (&["--poll"][..], "raw-poll")] {
        let nsqd = FakeNsqd::start_default().unwrap();
        let addr = nsqd.addr();
        let base = [&["--nsqd-tcp-address", addr.as_str(), "--topic", "raw"][..], poll].concat();
        let pub_args = [&base[..], &["--mode", "pub", "--n", "500", "--outstanding", "7"]].concat();
        let fields = result_fields(&run("raw_bench", &pub_args, b""));
        assert_eq!((fields["client"].as_str(), fields["mode"].as_str()), (client, "pub"));
        let mpub_args =
            [&base[..], &["--mode", "mpub", "--n", "500", "--batch", "50", "--outstanding-batches", "3"]].concat();
        result_fields(&run("raw_bench", &mpub_args, b""));
        assert_eq!(nsqd.stats().published["raw"], 1000);

        let sub_args =
            [&base[..], &["--mode", "sub", "--channel", "c", "--n", "1000", "--max-in-flight", "64"]].concat();
        let fields = result_fields(&run("raw_bench", &sub_args, b""));
        assert_eq!(fields["msgs"], "1000");
        assert_eq!(nsqd.stats().finished, 1000, "{client}");
    }
}
