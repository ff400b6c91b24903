//! The cluster simulation: whole NSQ clusters (modelled nsqds and nsqlookupds, producers and
//! consumers built on `ProducerState` and `ConsumerState`) run on a virtual clock through a
//! seeded schedule of faults, with the invariants in `sim/invariants.rs` checked after every
//! step. See `sim/world/mod.rs` for a run's phases and `sim/scenario.rs` for what a seed draws.
//!
//! - `SIM_SEEDS=N` runs seeds `SIM_FIRST..SIM_FIRST+N` (default [`DEFAULT_SEEDS`] from 0) on
//!   every core (`SIM_THREADS` to choose);
//! - `SIM_SEED=S` runs one seed and prints its report, `SIM_TRACE=1` every event too;
//! - `SIM_ALLOW=name,name` reports those invariants as warnings instead of failures (`all`
//!   for every one), to explore past a known failure;
//! - `SIM_MAX_FAILURES=N` stops after N failing seeds (default [`MAX_FAILURES`]).
//!
//! A failing seed prints the command that replays it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, unreachable_pub)]

mod sim;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use sim::invariants::name;
use sim::world::{self, Allow, Failure};

/// Seeds of a plain `cargo test` run: a few seconds in a debug build.
const DEFAULT_SEEDS: u64 = 300;
/// How many of the slowest seeds the summary names.
const SLOWEST_SHOWN: usize = 5;
/// A run stops after this many failing seeds (`SIM_MAX_FAILURES` to change).
const MAX_FAILURES: usize = 10;

fn env<T: std::str::FromStr>(key: &str) -> Option<T> {
    let value = std::env::var(key).ok()?;
    Some(value.trim().parse().unwrap_or_else(|_| panic!("{key}={value:?} is not valid")))
}

fn allow() -> Allow {
    let names: BTreeSet<String> = std::env::var("SIM_ALLOW")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    for n in &names {
        assert!(
            n == "all" || name::ALL.contains(&n.as_str()),
            "SIM_ALLOW: unknown invariant {n:?}; known: {:?}",
            name::ALL
        );
    }
    Allow(names)
}

fn replay_line(seed: u64, allow: &Allow) -> String {
    let allowed = if allow.0.is_empty() {
        String::new()
    } else {
        format!("SIM_ALLOW={} ", allow.0.iter().cloned().collect::<Vec<_>>().join(","))
    };
    format!("{allowed}SIM_SEED={seed} cargo test --release -p nsq-sansio --test simulation -- --nocapture")
}

fn describe(seed: u64, f: &Failure, allow: &Allow, trace: bool) -> String {
    let mut out = format!("seed {seed} broke `{}` at {:.3}s: {}\n", f.invariant, f.at.as_secs_f64(), f.detail);
    if trace {
        out.push_str("  last events:\n");
        for line in &f.trace {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out.push_str(&format!("  replay: {}\n", replay_line(seed, allow)));
    out
}

#[test]
fn simulation() {
    let allow = allow();
    if let Some(seed) = env::<u64>("SIM_SEED") {
        let verbose = env::<u8>("SIM_TRACE").unwrap_or(0) > 0;
        match world::run(seed, &allow, verbose) {
            Ok(report) => {
                println!("seed {seed}: {}", report.summary());
                for (invariant, (n, detail)) in &report.warnings {
                    println!("warning: `{invariant}` broke {n} times, first {detail}");
                }
            }
            Err(f) => {
                println!("seed {seed}: {}", f.report.summary());
                panic!("{}", describe(seed, &f, &allow, true));
            }
        }
        return;
    }
    let first = env::<u64>("SIM_FIRST").unwrap_or(0);
    let count = env::<u64>("SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let threads = env::<usize>("SIM_THREADS")
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let max_failures = env::<usize>("SIM_MAX_FAILURES").unwrap_or(MAX_FAILURES);
    let next = AtomicU64::new(first);
    let failed = AtomicUsize::new(0);
    let failures: Mutex<Vec<(u64, Box<Failure>)>> = Mutex::new(Vec::new());
    let warnings: Mutex<BTreeMap<&'static str, (u64, u64, String)>> = Mutex::new(BTreeMap::new());
    let events = AtomicU64::new(0);
    let slowest: Mutex<Vec<(std::time::Duration, u64, u64)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) >= max_failures {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= first + count {
                    return;
                }
                let t = Instant::now();
                let result = world::run(seed, &allow, false);
                let took = t.elapsed();
                {
                    let mut slow = slowest.lock().unwrap();
                    let n = result.as_ref().map_or(0, |r| r.events);
                    slow.push((took, seed, n));
                    slow.sort_by(|a, b| b.cmp(a));
                    slow.truncate(SLOWEST_SHOWN);
                }
                match result {
                    Ok(report) => {
                        events.fetch_add(report.events, Ordering::Relaxed);
                        let mut w = warnings.lock().unwrap();
                        for (invariant, (n, first_detail)) in report.warnings {
                            let entry = w.entry(invariant).or_insert((0, seed, first_detail));
                            entry.0 += n.min(1);
                            if seed < entry.1 {
                                entry.1 = seed;
                            }
                        }
                    }
                    Err(f) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.lock().unwrap().push((seed, f));
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let ran = next.load(Ordering::Relaxed).min(first + count) - first;
    println!(
        "simulation: {ran} seeds from {first} in {:.2}s ({:.0} seeds/s, {} events) on {threads} threads",
        elapsed.as_secs_f64(),
        ran as f64 / elapsed.as_secs_f64(),
        events.load(Ordering::Relaxed)
    );
    let slowest: Vec<String> = slowest
        .into_inner()
        .unwrap()
        .iter()
        .map(|(took, seed, n)| format!("seed {seed} {:.1}ms ({n} events)", took.as_secs_f64() * 1e3))
        .collect();
    println!("slowest: {}", slowest.join(", "));
    for (invariant, (seeds, seed, detail)) in warnings.into_inner().unwrap() {
        println!(
            "warning: `{invariant}` broke in {seeds} seeds; e.g. seed {seed} {detail}\n  replay: {}",
            replay_line(seed, &allow)
        );
    }
    let mut failures = failures.into_inner().unwrap();
    if failures.is_empty() {
        return;
    }
    failures.sort_by_key(|(seed, _)| *seed);
    let mut message = format!("{} seeds failed:\n", failures.len());
    for (i, (seed, f)) in failures.iter().enumerate() {
        message.push_str(&describe(*seed, f, &allow, i == 0));
    }
    panic!("{message}");
}

/// A seed is a run: the same seed gives the same run, event for event.
#[test]
fn a_seed_replays_exactly() {
    let allow = Allow(name::ALL.iter().map(|n| (*n).to_owned()).collect());
    for seed in [1, 7] {
        let first = world::run(seed, &allow, false).unwrap();
        let again = world::run(seed, &allow, false).unwrap();
        assert_eq!(first.summary(), again.summary());
        assert!(first.events > 100 && first.acked > 0, "{}", first.summary());
    }
}
