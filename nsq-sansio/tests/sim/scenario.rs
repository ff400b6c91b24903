//! What one seed draws: the cluster (nsqds, lookupds), the clients (producers on one nsqd or
//! pools over several, consumers) and their settings, the applications' behaviour and the
//! fault schedule. Everything random about a run comes from
//! here or from the world's own generator, both seeded by the run's seed.

use std::time::Duration;

use super::clients::{PoolSettings, PoolStrategy, Settings};
use super::lookupd::Garbage;
use super::nsqd::{AuthOptions, HandshakeFault, NsqdOptions};
use super::rng::SimRng;

/// The topic and channel every client uses.
pub const TOPIC: &str = "t";
pub const CHANNEL: &str = "c";
/// The secret nsqds with an auth server accept.
pub const SECRET: &str = "s3cret";

/// How long faults are injected before the healing phase, in seconds.
const FAULT_PHASE_SECS: (u64, u64) = (60, 240);
/// Seeds the generator of the draws added after the first ones (the pool), so that adding
/// them left what every seed drew before unchanged.
const POOL_DRAWS: u64 = 0x9001_5eed;
/// The share of seeds whose first producer is a pool.
const POOL_SHARE: f64 = 0.4;
/// The draws of the consumers' `max_in_flight` changes come from their own generator too.
const MAX_IN_FLIGHT_DRAWS: u64 = 0x3a5f_17e1;
/// The share of consumers whose application changes `max_in_flight` while they run.
const MAX_IN_FLIGHT_SHARE: f64 = 0.3;

#[derive(Debug)]
pub struct Scenario {
    pub nsqds: Vec<NsqdOptions>,
    pub lookupds: usize,
    pub producers: Vec<ProducerPlan>,
    pub consumers: Vec<ConsumerPlan>,
    pub faults: Vec<PlannedFault>,
    pub fault_phase: Duration,
    /// Base one-way latency of the network; each connection draws around it.
    pub latency: Duration,
}

#[derive(Debug)]
pub struct ProducerPlan {
    pub target: Target,
    pub settings: Settings,
    pub start: Duration,
    /// Graceful stop during the fault phase (else at the healing phase).
    pub stop: Option<Duration>,
    /// Mean time between two publishes.
    pub publish_every: Duration,
}

/// Where a producer publishes.
#[derive(Debug, Clone)]
pub enum Target {
    /// A `ProducerState` on this nsqd.
    One(usize),
    /// A `ProducerPoolState` over these nsqds, and maybe more from these lookupds' `/nodes`.
    Pool { nsqds: Vec<usize>, lookupds: Vec<usize>, settings: PoolSettings },
}

#[derive(Debug)]
pub struct ConsumerPlan {
    pub settings: Settings,
    /// Runs from the start to the end and reaches every nsqd: the delivery guarantee is about
    /// it.
    pub keeper: bool,
    pub direct: Vec<usize>,
    pub lookupds: Vec<usize>,
    pub start: Duration,
    /// Sources are added this long after the consumer is created.
    pub sources_after: Duration,
    pub stop: Option<Duration>,
    pub handler: Handler,
    /// When the application calls `change_max_in_flight`, and with what.
    pub max_in_flight_changes: Vec<(Duration, u32)>,
}

/// How a consumer's application answers messages.
#[derive(Debug, Clone, Copy)]
pub struct Handler {
    pub mean_delay: Duration,
    pub requeue: f64,
    pub touch: f64,
    /// Never answered: the message times out.
    pub ignore: f64,
}

#[derive(Debug, Clone)]
pub struct PlannedFault {
    pub at: Duration,
    pub kind: FaultKind,
}

#[derive(Debug, Clone)]
pub enum FaultKind {
    /// New connections are refused (or, blackholed, time out) for a while.
    NsqdDown {
        nsqd: usize,
        blackhole: bool,
        duration: Duration,
    },
    /// `kill -9`, restarted after `downtime`.
    Crash {
        nsqd: usize,
        downtime: Duration,
    },
    /// Nothing leaves one connection (or the whole nsqd) for a while.
    Stall {
        nsqd: usize,
        whole: bool,
        duration: Duration,
    },
    /// A connection to this nsqd is reset in the middle of the next bytes nsqd sends.
    Reset {
        nsqd: usize,
    },
    /// New connections meet a fatal error in their handshake.
    Handshake {
        nsqd: usize,
        fault: HandshakeFault,
        duration: Duration,
    },
    LookupdDown {
        lookupd: usize,
        duration: Duration,
    },
    LookupdSlow {
        lookupd: usize,
        delay: Duration,
        duration: Duration,
    },
    /// Accepts the query and never answers (the adapter gives up after its timeout).
    LookupdHang {
        lookupd: usize,
        duration: Duration,
    },
    /// Lists nsqds that are not there.
    LookupdLying {
        lookupd: usize,
        duration: Duration,
    },
    LookupdGarbage {
        lookupd: usize,
        garbage: Garbage,
        duration: Duration,
    },
    /// The clock of every party leaps forward (a suspended VM, a laptop lid).
    ClockJump {
        by: Duration,
    },
}

impl Scenario {
    pub fn generate(seed: u64) -> Self {
        let mut rng = SimRng::new(seed);
        let fault_phase = Duration::from_secs(rng.range(FAULT_PHASE_SECS.0, FAULT_PHASE_SECS.1));
        let nsqd_count = rng.range(2, 4) as usize;
        let lookupds = rng.range(0, 2) as usize;
        let auth = rng.chance(0.2);
        let nsqds = (0..nsqd_count)
            .map(|i| NsqdOptions {
                msg_timeout: if rng.chance(0.5) { Duration::from_secs(60) } else { rng.millis(2_000, 60_000) },
                max_rdy_count: if rng.chance(0.7) { 2500 } else { rng.range(1, 40) },
                // The model speaks neither: `--snappy=false --deflate=false`.
                snappy: false,
                deflate: false,
                auth: (auth && rng.chance(0.7)).then(|| AuthOptions {
                    secret: SECRET.into(),
                    identity: "sim".into(),
                    identity_url: String::new(),
                }),
                node: i as u64,
                seed: rng.next_u64(),
                ..NsqdOptions::default()
            })
            .collect();
        let secret = auth.then(|| SECRET.to_owned());

        let mut producers: Vec<ProducerPlan> = (0..rng.range(1, 3))
            .map(|_| ProducerPlan {
                target: Target::One(rng.index(nsqd_count)),
                settings: producer_settings(&mut rng, secret.clone()),
                start: rng.duration(Duration::ZERO, fault_phase / 3),
                stop: rng.chance(0.3).then(|| rng.duration(fault_phase / 3, fault_phase)),
                publish_every: rng.millis(300, 5_000),
            })
            .collect();

        let consumer_count = rng.range(1, 3) as usize;
        let mut consumers = Vec::with_capacity(consumer_count);
        for i in 0..consumer_count {
            let keeper = i == 0 || rng.chance(0.3);
            let all: Vec<usize> = (0..nsqd_count).collect();
            let (direct, lookupd_list) = if keeper {
                // Reaches every nsqd: through every lookupd, directly, or both.
                match (lookupds > 0, rng.below(3)) {
                    (true, 0) => (Vec::new(), (0..lookupds).collect()),
                    (true, 1) => (all.clone(), (0..lookupds).collect()),
                    _ => (all.clone(), Vec::new()),
                }
            } else {
                let direct: Vec<usize> = all.iter().copied().filter(|_| rng.chance(0.5)).collect();
                let via: Vec<usize> = (0..lookupds).filter(|_| rng.chance(0.7)).collect();
                if direct.is_empty() && via.is_empty() {
                    (vec![rng.index(nsqd_count)], via)
                } else {
                    (direct, via)
                }
            };
            let start = if keeper { rng.millis(0, 2_000) } else { rng.duration(Duration::ZERO, fault_phase / 2) };
            consumers.push(ConsumerPlan {
                settings: consumer_settings(&mut rng, secret.clone()),
                keeper,
                direct,
                lookupds: lookupd_list,
                start,
                sources_after: if rng.chance(0.5) { Duration::ZERO } else { rng.millis(1, 6_000) },
                stop: (!keeper && rng.chance(0.5)).then(|| start + rng.duration(Duration::ZERO, fault_phase)),
                handler: Handler {
                    mean_delay: *rng.pick(&[
                        Duration::from_millis(1),
                        Duration::from_millis(50),
                        Duration::from_millis(500),
                    ]),
                    requeue: *rng.pick(&[0.0, 0.05, 0.2]),
                    touch: *rng.pick(&[0.0, 0.05]),
                    ignore: *rng.pick(&[0.0, 0.0, 0.01]),
                },
                max_in_flight_changes: Vec::new(),
            });
        }

        let fault_count = rng.range(0, 12);
        let faults = (0..fault_count)
            .map(|_| PlannedFault {
                at: rng.duration(Duration::ZERO, fault_phase),
                kind: fault(&mut rng, nsqd_count, lookupds, auth),
            })
            .collect();

        let latency = Duration::from_micros(rng.range(50, 5_000));

        let mut more = SimRng::new(seed ^ POOL_DRAWS);
        if more.chance(POOL_SHARE) {
            let mut members: Vec<usize> = (0..nsqd_count).collect();
            for i in (1..members.len()).rev() {
                members.swap(i, more.index(i + 1));
            }
            members.truncate(more.range(2, nsqd_count.min(3) as u64) as usize);
            let strategy = *more.pick(&[PoolStrategy::Failover, PoolStrategy::RoundRobin, PoolStrategy::All]);
            let settings = PoolSettings {
                strategy,
                max_retries: more.range(0, 3) as u32,
                wait: *more.pick(&[Duration::from_millis(500), Duration::from_secs(2), Duration::from_secs(10)]),
            };
            let lookupds = if lookupds > 0 && more.chance(0.5) { (0..lookupds).collect() } else { Vec::new() };
            if !lookupds.is_empty() {
                let plan = &mut producers[0].settings;
                plan.lookupd_poll_interval = Duration::from_secs(*more.pick(&[1, 2, 5, 10, 15, 30, 60]));
                plan.lookupd_poll_jitter = *more.pick(&[0.0, 0.3, 1.0]);
            }
            producers[0].target = Target::Pool { nsqds: members, lookupds, settings };
            producers[0].settings.auto_batch = 0;
        }

        let mut more = SimRng::new(seed ^ MAX_IN_FLIGHT_DRAWS);
        for c in &mut consumers {
            if more.chance(MAX_IN_FLIGHT_SHARE) {
                let changes = more.range(1, 3);
                c.max_in_flight_changes = (0..changes)
                    .map(|_| {
                        let at = c.start + more.duration(Duration::ZERO, fault_phase);
                        let to = if more.chance(0.3) { more.range(1, 3) } else { more.range(1, 50) };
                        (at, to as u32)
                    })
                    .collect();
            }
        }

        Self { nsqds, lookupds, producers, consumers, faults, fault_phase, latency }
    }
}

fn fault(rng: &mut SimRng, nsqds: usize, lookupds: usize, auth: bool) -> FaultKind {
    let nsqd = rng.index(nsqds);
    let short = |rng: &mut SimRng| rng.millis(100, 30_000);
    let kinds = if lookupds > 0 { 11 } else { 6 };
    match rng.below(kinds) {
        0 => FaultKind::NsqdDown { nsqd, blackhole: rng.chance(0.3), duration: short(rng) },
        1 => FaultKind::Crash { nsqd, downtime: rng.millis(10, 60_000) },
        2 => FaultKind::Stall { nsqd, whole: rng.chance(0.3), duration: rng.millis(100, 120_000) },
        3 => FaultKind::Reset { nsqd },
        4 => {
            let fault = match rng.below(if auth { 4 } else { 3 }) {
                0 => {
                    HandshakeFault::Identify { code: "E_BAD_BODY", text: "IDENTIFY failed to decode JSON body".into() }
                }
                1 => HandshakeFault::Sub,
                2 => HandshakeFault::Publish,
                _ => HandshakeFault::Auth,
            };
            FaultKind::Handshake { nsqd, fault, duration: short(rng) }
        }
        5 => FaultKind::ClockJump {
            by: *rng.pick(&[Duration::from_secs(10), Duration::from_secs(90), Duration::from_secs(600)]),
        },
        k => {
            let lookupd = rng.index(lookupds);
            let duration = rng.millis(1_000, 90_000);
            match k {
                6 => FaultKind::LookupdDown { lookupd, duration },
                7 => FaultKind::LookupdSlow { lookupd, delay: rng.millis(100, 10_000), duration },
                8 => FaultKind::LookupdHang { lookupd, duration },
                9 => FaultKind::LookupdLying { lookupd, duration },
                _ => {
                    let garbage =
                        *rng.pick(&[Garbage::NotHttp, Garbage::BadJson, Garbage::ServerError, Garbage::Truncated]);
                    FaultKind::LookupdGarbage { lookupd, garbage, duration }
                }
            }
        }
    }
}

/// Heartbeat and read timeout, consistent (`heartbeat_interval` ≤ `read_timeout`, as
/// `Config::validate` wants) and within nsqd's range (1 s to 60 s).
fn timeouts(rng: &mut SimRng) -> (Duration, Duration) {
    let heartbeat = rng.millis(1_000, 20_000);
    let read_timeout = heartbeat.mul_f64(1.0 + rng.unit() * 3.0).min(Duration::from_secs(300));
    (heartbeat, read_timeout)
}

fn output_buffer(rng: &mut SimRng) -> Option<(u64, Duration)> {
    match rng.below(10) {
        0 => None,
        1..=2 => Some((rng.range(64, 64 * 1024), rng.millis(25, 1_000))),
        _ => Some((16 * 1024, Duration::from_millis(250))),
    }
}

fn producer_settings(rng: &mut SimRng, auth_secret: Option<String>) -> Settings {
    let (heartbeat, read_timeout) = timeouts(rng);
    Settings {
        rng_seed: rng.next_u64(),
        dial_timeout: rng.millis(200, 3_000),
        read_timeout,
        heartbeat: rng.chance(0.8).then_some(heartbeat),
        output_buffer: output_buffer(rng),
        auth_secret,
        auto_batch: if rng.chance(0.3) { rng.range(2, 10) as usize } else { 0 },
        ..Settings::default()
    }
}

fn consumer_settings(rng: &mut SimRng, auth_secret: Option<String>) -> Settings {
    let (heartbeat, read_timeout) = timeouts(rng);
    Settings {
        rng_seed: rng.next_u64(),
        dial_timeout: rng.millis(200, 3_000),
        read_timeout,
        heartbeat: Some(heartbeat),
        output_buffer: output_buffer(rng),
        msg_timeout: rng.chance(0.5).then(|| rng.millis(2_000, 60_000)),
        auth_secret,
        max_in_flight: if rng.chance(0.3) { rng.range(1, 3) as u32 } else { rng.range(1, 50) as u32 },
        max_attempts: if rng.chance(0.3) { 0 } else { rng.range(2, 8) as u16 },
        lookupd_poll_interval: Duration::from_secs(*rng.pick(&[1, 2, 5, 10, 15, 30, 60])),
        lookupd_poll_jitter: *rng.pick(&[0.0, 0.3, 1.0]),
        default_requeue_delay: rng.millis(0, 3_000),
        max_requeue_delay: rng.millis(1_000, 30_000),
        backoff_multiplier: rng.millis(50, 1_000),
        max_backoff_duration: rng.millis(1_000, 10_000),
        full_jitter: rng.chance(0.5),
        low_rdy_idle_timeout: rng.millis(1_000, 10_000),
        low_rdy_timeout: rng.millis(1_000, 30_000),
        rdy_redistribute_interval: rng.millis(100, 5_000),
        auto_batch: 0,
    }
}
