//! The built `to_nsq` and `nsq_tail` examples against the fake nsqd.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nsq_tests::FakeNsqd;

/// `cargo test` builds every example next to the test binaries.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().join("examples").join(name);
    assert!(dir.exists(), "{} not built: run `cargo test --workspace` (it builds examples)", dir.display());
    dir
}

/// Runs a tool with `stdin`, killing it if it takes over 30 s.
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
        if start.elapsed() > Duration::from_secs(30) {
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

#[test]
fn to_nsq_fails_with_one_line_when_no_nsqd_listens() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let out = run("to_nsq", &["--topic", "t", "--nsqd-tcp-address", &addr], b"x\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("to_nsq: error: ") && err.contains(&addr), "{err}");
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
