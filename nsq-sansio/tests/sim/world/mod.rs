//! The world: a virtual clock, an event queue (time order, ties in insertion order), the
//! parties (nsqd and lookupd models, producer and consumer clients with their applications),
//! the network between them, the fault schedule, and the invariant checks after every step.
//!
//! A run has three phases. Faults: clients start and stop, publishers publish, handlers answer,
//! faults strike. Healing: every fault is cleared, producers stop, and the run goes on until
//! every acknowledged publish was handled: finished by a handler, or given up after
//! `max_attempts` (or a bound passes: a failure). Stopping: every
//! consumer stops and must finish within a bound; then a quiet period checks that stopped
//! clients stay silent.

mod apps;
mod faults;
mod network;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::RangeInclusive;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nsq_sansio::ConnId;

use super::clients::{
    Answer, ConsumerNote, Delivered, DialFailure, Failure as PublishFailure, Io, ProducerNote, PublishOutcome,
    Settings, SimConsumer, SimProducer,
};
use super::invariants::{
    self as inv, name, Check, Firings, ListedDials, LookupdRates, ProducerRates, Redials, Violation,
};
use super::lookupd::{LookupdModel, Producer};
use super::net::{Dir, Link, Party, Peer, Round};
use super::nsqd::{HandshakeFault, NsqdModel, ServerConn};
use super::rng::SimRng;
use super::scenario::{FaultKind, Handler, Scenario, Target, CHANNEL, TOPIC};
use super::wire::Scanned;

/// The longest DPUB delay the publishers draw.
const LONGEST_DPUB: Duration = Duration::from_secs(3);
/// After every consumer stopped, the run goes on this long to see that they stay quiet.
const QUIET_PERIOD: Duration = Duration::from_secs(120);
/// An application whose `connect_to_nsqd` failed tries again after a delay in this range (the
/// client leaves that retry to it).
const APP_RECONNECT: (u64, u64) = (500, 5_000);
/// The mean handler time in the healing phase.
const HEALING_HANDLER_DELAY: Duration = Duration::from_millis(1);
/// How many events the failure report shows.
const TRACE_LEN: usize = 48;
/// A lookupd answers a request whose head has not ended within this many bytes (with 400, as
/// Go's server refuses an oversized head).
const LOOKUPD_MAX_REQUEST: usize = 16 * 1024;

/// Invariants reported as warnings instead of failures (`SIM_ALLOW`).
#[derive(Debug, Clone, Default)]
pub struct Allow(pub BTreeSet<String>);

impl Allow {
    fn allows(&self, invariant: &str) -> bool {
        self.0.contains(invariant) || self.0.contains("all")
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub events: u64,
    pub virtual_time: Duration,
    pub nsqds: usize,
    pub lookupds: usize,
    pub producers: usize,
    pub consumers: usize,
    pub faults: usize,
    pub published: usize,
    pub acked: usize,
    pub delivered: usize,
    /// Allowed invariants that broke: how often, and the first detail.
    pub warnings: BTreeMap<&'static str, (u64, String)>,
}

impl Report {
    /// One line about the run.
    pub fn summary(&self) -> String {
        format!(
            "{} nsqds, {} lookupds, {} producers, {} consumers, {} faults; {} events over {:.1}s; {} published, {} acknowledged, {} delivered",
            self.nsqds,
            self.lookupds,
            self.producers,
            self.consumers,
            self.faults,
            self.events,
            self.virtual_time.as_secs_f64(),
            self.published,
            self.acked,
            self.delivered
        )
    }
}

/// A broken invariant, with where it happened.
#[derive(Debug)]
pub struct Failure {
    pub invariant: &'static str,
    pub detail: String,
    pub at: Duration,
    pub trace: Vec<String>,
    pub report: Report,
}

/// Runs one seed.
pub fn run(seed: u64, allow: &Allow, verbose: bool) -> Result<Report, Box<Failure>> {
    let scenario = Scenario::generate(seed);
    let mut world = World::new(seed, scenario, allow.clone(), verbose);
    if verbose {
        println!("{:#?}", world.scenario);
    }
    world.plan();
    world.run()
}

#[derive(Debug)]
enum Ev {
    Arrive {
        link: usize,
        dir: Dir,
        seq: u64,
    },
    /// A client's write finished.
    Written {
        link: usize,
    },
    DialDone {
        link: usize,
        outcome: DialOutcome,
    },
    /// A slow lookupd sends its answer.
    LookupdRespond {
        link: usize,
        bytes: Vec<u8>,
    },
    ClientTimer {
        party: Party,
        at: Duration,
    },
    NsqdTimer {
        nsqd: usize,
        at: Duration,
    },
    StartProducer(usize),
    StopProducer(usize),
    StartConsumer(usize),
    AddSources(usize),
    /// The application connects to a direct nsqd again, after `connect_to_nsqd` failed.
    Reconnect {
        consumer: usize,
        addr: String,
    },
    StopConsumer(usize),
    /// The application calls `change_max_in_flight`.
    ChangeMaxInFlight {
        consumer: usize,
        to: u32,
    },
    Publish(usize),
    Respond {
        consumer: usize,
        msg: Delivered,
        answer: Answer,
    },
    Fault(FaultKind),
    /// A fault's time is up on this nsqd or lookupd (the node checks its own deadline).
    NsqdHeal(usize),
    Restart(usize),
    Unstall {
        link: usize,
    },
    LookupdHeal(usize),
    Reregister(usize),
    ResetFallback {
        link: usize,
    },
    /// A publish's bound, as [`Ev::StopDeadline`].
    PublishDeadline {
        producer: usize,
        tx: u64,
        due: Duration,
        jumped: Duration,
    },
    /// A stop's bound, due at `due` plus the clock jumps after `jumped` (the total then).
    StopDeadline {
        party: Party,
        due: Duration,
        jumped: Duration,
    },
    Heal,
    HealDeadline,
    End,
}

#[derive(Debug, Clone, Copy)]
enum DialOutcome {
    Accept,
    Fail(DialFailure),
}

/// A heap entry; the event waits in the world's slab, so the heap moves small values.
struct Scheduled {
    at: Duration,
    seq: u64,
    slot: usize,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Faults,
    Healing,
    Stopping,
    Quiet,
}

struct NsqdNode {
    addr: String,
    model: NsqdModel,
    /// False from a crash to the restart.
    up: bool,
    incarnation: u64,
    refuse_until: Duration,
    blackhole: bool,
    stall_until: Duration,
    handshake: Option<(HandshakeFault, Duration)>,
    timer: Option<Duration>,
    firings: Firings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LookupdMode {
    Up,
    Down,
    Slow(Duration),
    Hang,
}

struct LookupdNode {
    model: LookupdModel,
    mode: LookupdMode,
    until: Duration,
    lying_until: Duration,
    garbage_until: Duration,
}

struct ProducerNode {
    target: Target,
    /// The nsqd addresses it was given (one, or a pool's).
    addrs: Vec<String>,
    /// A pool's lookupds (`/nodes` discovery).
    lookupds: Vec<String>,
    settings: Settings,
    client: Option<SimProducer>,
    publish_every: Duration,
    stopping_since: Option<Duration>,
    stopped: bool,
    next_body: u64,
    /// Publishes issued and not resolved.
    txs: BTreeMap<u64, Tx>,
    /// A pool's publishes by their first body, to follow their attempts on the wire.
    by_body: HashMap<Bytes, u64, BuildHasherDefault<FxHasher>>,
    /// Publishes that failed because the client closed their connection, waiting for that
    /// connection's close.
    lost: Vec<u64>,
    timer: Option<Duration>,
    firings: Firings,
    rates: ProducerRates,
    redials: Redials,
    lookupd: LookupdRates,
}

/// A publish issued and not resolved.
struct Tx {
    bodies: Vec<Bytes>,
    issued: Duration,
    /// The clock jumps so far when it was issued.
    jumped: Duration,
    /// A pool's attempts: the link each went out on, and when.
    attempts: Vec<(usize, Duration)>,
}

struct ConsumerNode {
    /// Its settings; `max_in_flight` is the latest the application set.
    settings: Settings,
    /// The `max_in_flight` before a lowering, which bounds the RDY nsqds were given until the
    /// lowers are written and the total is within the new value.
    lowering_from: Option<u32>,
    direct: Vec<String>,
    lookupds: Vec<String>,
    handler: Handler,
    /// Messages the handler chose not to answer; answered once the cluster is healthy.
    ignored: Vec<Delivered>,
    sources_after: Duration,
    client: Option<SimConsumer>,
    stopping_since: Option<Duration>,
    stopped: bool,
    timer: Option<Duration>,
    firings: Firings,
    /// The addresses the client treats as direct: given to `connect_to_nsqd`, and not dropped
    /// after a failed first attempt.
    direct_live: BTreeSet<String>,
    lookupd: LookupdRates,
    redials: Redials,
    listed: ListedDials,
}

/// Where every published body stands.
#[derive(Default)]
struct Ledger {
    published: FastSet<Bytes>,
    acked: HashMap<Bytes, usize, BuildHasherDefault<FxHasher>>,
    delivered: FastSet<Bytes>,
    /// Finished by a handler (a FIN the client accepted), or given up after max_attempts.
    handled: FastSet<Bytes>,
    /// Lost by nsqd in a crash (in flight or deferred): exempt.
    lost: FastSet<Bytes>,
    /// Acknowledged, and neither handled nor lost yet.
    unhandled: BTreeSet<Bytes>,
}

#[derive(Clone, Copy)]
struct TraceEntry {
    at: Duration,
    what: &'static str,
    who: Who,
    conn: u64,
    n: u64,
}

#[derive(Clone, Copy, Debug)]
enum Who {
    World,
    Party(Party),
    Nsqd(usize),
    Lookupd(usize),
}

struct World {
    rng: SimRng,
    base: Instant,
    now: Duration,
    queue: BinaryHeap<Reverse<Scheduled>>,
    slab: Vec<Option<Ev>>,
    free: Vec<usize>,
    seq: u64,
    chunk_seq: u64,
    phase: Phase,
    /// The clock jumps so far, in total.
    jumped: Duration,
    scenario: Scenario,
    nsqds: Vec<NsqdNode>,
    lookupds: Vec<LookupdNode>,
    producers: Vec<ProducerNode>,
    consumers: Vec<ConsumerNode>,
    links: Vec<Link>,
    by_client: BTreeMap<(Party, ConnId), usize>,
    /// Each client's links it has not closed.
    live: BTreeMap<Party, BTreeSet<usize>>,
    by_server: BTreeMap<(usize, ServerConn), usize>,
    /// The lookupd link whose answer the client is reading in this step.
    answering: Option<usize>,
    /// The lookupd query a client just closed, if its round may go on: the lookupd query that
    /// follows at once is that round's next attempt.
    failover: Option<(Party, Round)>,
    ledger: Ledger,
    allow: Allow,
    verbose: bool,
    trace: VecDeque<TraceEntry>,
    report: Report,
    done: bool,
}

impl World {
    fn new(seed: u64, scenario: Scenario, allow: Allow, verbose: bool) -> Self {
        let base = Instant::now();
        let rng = SimRng::new(seed ^ 0x00c0_ffee);
        let nsqds = scenario
            .nsqds
            .iter()
            .enumerate()
            .map(|(i, opts)| NsqdNode {
                addr: format!("nsqd-{i}:4150"),
                model: NsqdModel::new(opts.clone(), base),
                up: true,
                incarnation: 0,
                refuse_until: Duration::ZERO,
                blackhole: false,
                stall_until: Duration::ZERO,
                handshake: None,
                timer: None,
                firings: Firings::default(),
            })
            .collect::<Vec<_>>();
        let mut lookupds: Vec<LookupdNode> = (0..scenario.lookupds)
            .map(|_| LookupdNode {
                model: LookupdModel::new(base),
                mode: LookupdMode::Up,
                until: Duration::ZERO,
                lying_until: Duration::ZERO,
                garbage_until: Duration::ZERO,
            })
            .collect();
        for (i, n) in nsqds.iter().enumerate() {
            for l in &mut lookupds {
                l.model.register_node(Producer::for_addr(&n.addr, 40_000 + i as u16));
            }
        }
        let producers = scenario
            .producers
            .iter()
            .map(|p| ProducerNode {
                target: p.target.clone(),
                addrs: match &p.target {
                    Target::One(n) => vec![format!("nsqd-{n}:4150")],
                    Target::Pool { nsqds, .. } => nsqds.iter().map(|n| format!("nsqd-{n}:4150")).collect(),
                },
                lookupds: match &p.target {
                    Target::One(_) => Vec::new(),
                    Target::Pool { lookupds, .. } => lookupds.iter().map(|i| format!("lookupd-{i}:4161")).collect(),
                },
                settings: p.settings.clone(),
                client: None,
                publish_every: p.publish_every,
                stopping_since: None,
                stopped: false,
                next_body: 0,
                txs: BTreeMap::new(),
                by_body: HashMap::default(),
                lost: Vec::new(),
                timer: None,
                firings: Firings::default(),
                rates: ProducerRates::default(),
                redials: Redials::new(match p.target {
                    Target::One(_) => inv::PRODUCER_REDIAL,
                    Target::Pool { .. } => inv::POOL_REDIAL,
                }),
                lookupd: LookupdRates::default(),
            })
            .collect();
        let consumers = scenario
            .consumers
            .iter()
            .map(|c| ConsumerNode {
                settings: c.settings.clone(),
                lowering_from: None,
                direct: c.direct.iter().map(|&i| format!("nsqd-{i}:4150")).collect(),
                lookupds: c.lookupds.iter().map(|&i| format!("lookupd-{i}:4161")).collect(),
                handler: c.handler,
                ignored: Vec::new(),
                sources_after: c.sources_after,
                client: None,
                stopping_since: None,
                stopped: false,
                timer: None,
                firings: Firings::default(),
                direct_live: BTreeSet::new(),
                lookupd: LookupdRates::default(),
                redials: Redials::new(inv::CONSUMER_REDIAL),
                listed: ListedDials::default(),
            })
            .collect();
        let report = Report {
            nsqds: scenario.nsqds.len(),
            lookupds: scenario.lookupds,
            producers: scenario.producers.len(),
            consumers: scenario.consumers.len(),
            faults: scenario.faults.len(),
            ..Report::default()
        };
        Self {
            rng,
            base,
            now: Duration::ZERO,
            queue: BinaryHeap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            seq: 0,
            chunk_seq: 0,
            phase: Phase::Faults,
            jumped: Duration::ZERO,
            scenario,
            nsqds,
            lookupds,
            producers,
            consumers,
            links: Vec::new(),
            by_client: BTreeMap::new(),
            live: BTreeMap::new(),
            by_server: BTreeMap::new(),
            answering: None,
            failover: None,
            ledger: Ledger::default(),
            allow,
            verbose,
            trace: VecDeque::with_capacity(TRACE_LEN),
            report,
            done: false,
        }
    }

    /// Schedules the scenario: client lifetimes, faults, the healing phase.
    fn plan(&mut self) {
        for i in 0..self.scenario.producers.len() {
            let (start, stop) = (self.scenario.producers[i].start, self.scenario.producers[i].stop);
            self.at(start, Ev::StartProducer(i));
            if let Some(stop) = stop {
                self.at(stop, Ev::StopProducer(i));
            }
        }
        for i in 0..self.scenario.consumers.len() {
            let (start, stop) = (self.scenario.consumers[i].start, self.scenario.consumers[i].stop);
            assert!(!self.scenario.consumers[i].keeper || stop.is_none(), "a keeper runs to the end");
            self.at(start, Ev::StartConsumer(i));
            if let Some(stop) = stop {
                self.at(stop, Ev::StopConsumer(i));
            }
            for &(at, to) in &self.scenario.consumers[i].max_in_flight_changes.clone() {
                self.at(at, Ev::ChangeMaxInFlight { consumer: i, to });
            }
        }
        for fault in self.scenario.faults.clone() {
            self.at(fault.at, Ev::Fault(fault.kind));
        }
        self.at(self.scenario.fault_phase, Ev::Heal);
    }

    fn run(mut self) -> Result<Report, Box<Failure>> {
        while let Some(Reverse(Scheduled { at, slot, .. })) = self.queue.pop() {
            let Some(ev) = self.slab[slot].take() else { continue };
            self.free.push(slot);
            self.now = self.now.max(at);
            self.report.events += 1;
            let step = catch_unwind(AssertUnwindSafe(|| {
                self.limits()?;
                self.handle(ev)
            }));
            match step {
                Ok(Ok(())) => {}
                Ok(Err(v)) => return Err(self.failure(v)),
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    return Err(self.failure(Violation { invariant: name::NO_PANIC, detail: msg }));
                }
            }
            if self.done {
                break;
            }
        }
        self.report.virtual_time = self.now;
        self.report.published = self.ledger.published.len();
        self.report.acked = self.ledger.acked.len();
        self.report.delivered = self.ledger.delivered.len();
        Ok(self.report)
    }

    fn limits(&mut self) -> Result<(), Violation> {
        if self.report.events > inv::MAX_EVENTS {
            return Err(Violation {
                invariant: name::PROGRESS,
                detail: format!("more than {} events", inv::MAX_EVENTS),
            });
        }
        if self.now > inv::MAX_VIRTUAL_TIME {
            return Err(Violation {
                invariant: name::PROGRESS,
                detail: format!("virtual time past {:?}", inv::MAX_VIRTUAL_TIME),
            });
        }
        Ok(())
    }

    fn failure(&mut self, v: Violation) -> Box<Failure> {
        let trace = self.trace.iter().map(|e| self.describe(e)).collect();
        self.report.virtual_time = self.now;
        self.report.published = self.ledger.published.len();
        self.report.acked = self.ledger.acked.len();
        self.report.delivered = self.ledger.delivered.len();
        Box::new(Failure {
            invariant: v.invariant,
            detail: v.detail,
            at: self.now,
            trace,
            report: std::mem::take(&mut self.report),
        })
    }

    /// A check's outcome: a failure, or a warning if the invariant is allowed.
    fn check(&mut self, check: Check) -> Result<(), Violation> {
        match check {
            Ok(()) => Ok(()),
            Err(v) if self.allow.allows(v.invariant) => {
                let entry = self.report.warnings.entry(v.invariant).or_insert((0, String::new()));
                if entry.0 == 0 {
                    entry.1 = format!("at {:?}: {}", self.now, v.detail);
                }
                entry.0 += 1;
                Ok(())
            }
            Err(v) => Err(v),
        }
    }

    // ---- the event queue -------------------------------------------------------------------

    fn at(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slab[slot] = Some(ev);
                slot
            }
            None => {
                self.slab.push(Some(ev));
                self.slab.len() - 1
            }
        };
        self.queue.push(Reverse(Scheduled { at: at.max(self.now), seq: self.seq, slot }));
    }

    fn after(&mut self, delay: Duration, ev: Ev) {
        self.at(self.now + delay, ev);
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn since_base(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.base)
    }

    fn note(&mut self, what: &'static str, who: Who, conn: u64, n: u64) {
        let entry = TraceEntry { at: self.now, what, who, conn, n };
        if self.verbose {
            println!("{}", self.describe(&entry));
        }
        if self.trace.len() == TRACE_LEN {
            self.trace.pop_front();
        }
        self.trace.push_back(entry);
    }

    /// Prints a detail of the last event when tracing every event.
    fn detail(&self, detail: impl FnOnce() -> String) {
        if self.verbose {
            println!("{:>14}{}", "", detail());
        }
    }

    fn describe(&self, e: &TraceEntry) -> String {
        let who = match e.who {
            Who::World => "world".to_owned(),
            Who::Party(party) => party.to_string(),
            Who::Nsqd(i) => format!("nsqd-{i}"),
            Who::Lookupd(i) => format!("lookupd-{i}"),
        };
        format!("{:>12.6}s {who:<11} {:<22} conn {:<4} {}", e.at.as_secs_f64(), e.what, e.conn, e.n)
    }

    // ---- dispatch ----------------------------------------------------------------------------

    fn handle(&mut self, ev: Ev) -> Result<(), Violation> {
        match ev {
            Ev::Arrive { link, dir, seq } => self.arrive(link, dir, seq)?,
            Ev::Written { link } => {
                self.links[link].writing = false;
                let party = self.links[link].party;
                self.drain(party)?;
            }
            Ev::DialDone { link, outcome } => self.dial_done(link, outcome)?,
            Ev::LookupdRespond { link, bytes } => self.lookupd_respond(link, bytes)?,
            Ev::ClientTimer { party, at } => self.client_timer(party, at)?,
            Ev::NsqdTimer { nsqd, at } => {
                if self.nsqds[nsqd].timer == Some(at) && self.nsqds[nsqd].up {
                    self.nsqds[nsqd].timer = None;
                    let now = self.now;
                    let fired = self.nsqds[nsqd].firings.fired(now, format_args!("nsqd-{nsqd}"));
                    self.check(fired)?;
                    let instant = self.instant();
                    self.nsqds[nsqd].model.handle_timeout(instant);
                    self.drain_nsqd(nsqd)?;
                }
            }
            Ev::StartProducer(i) => self.start_producer(i)?,
            Ev::StopProducer(i) => self.stop_producer(i)?,
            Ev::StartConsumer(i) => self.start_consumer(i)?,
            Ev::AddSources(i) => self.add_sources(i)?,
            Ev::Reconnect { consumer, addr } => self.reconnect(consumer, addr)?,
            Ev::StopConsumer(i) => self.stop_consumer(i)?,
            Ev::ChangeMaxInFlight { consumer, to } => self.change_max_in_flight(consumer, to)?,
            Ev::Publish(i) => self.publish(i)?,
            Ev::Respond { consumer, msg, answer } => self.respond(consumer, msg, answer)?,
            Ev::Fault(kind) => self.fault(kind)?,
            Ev::NsqdHeal(i) => self.nsqd_heal(i)?,
            Ev::Restart(i) => self.restart(i)?,
            Ev::Unstall { link } => self.unstall(link)?,
            Ev::LookupdHeal(i) => self.lookupd_heal(i),
            Ev::Reregister(i) => self.reregister(i),
            Ev::ResetFallback { link } => {
                if self.links[link].reset_armed {
                    self.reset(link)?;
                }
            }
            Ev::StopDeadline { party, due, jumped } => self.stop_deadline(party, due, jumped)?,
            Ev::PublishDeadline { producer, tx, due, jumped } => self.publish_deadline(producer, tx, due, jumped)?,
            Ev::Heal => self.heal()?,
            Ev::HealDeadline => self.heal_deadline()?,
            Ev::End => self.done = true,
        }
        self.advance_phase()
    }

    // ---- phases ------------------------------------------------------------------------------

    /// The end of the fault phase: every fault is lifted, producers stop.
    fn heal(&mut self) -> Result<(), Violation> {
        self.note("heal", Who::World, 0, 0);
        self.phase = Phase::Healing;
        let now = self.instant();
        for n in 0..self.nsqds.len() {
            let node = &mut self.nsqds[n];
            node.refuse_until = Duration::ZERO;
            node.handshake = None;
            node.stall_until = Duration::ZERO;
            if node.up {
                node.model.set_stalled_all(false, now);
                self.drain_nsqd(n)?;
            } else {
                self.restart(n)?;
            }
        }
        let links: Vec<usize> = self.by_server.values().copied().collect();
        for l in links {
            self.links[l].reset_armed = false;
            self.unstall(l)?;
        }
        for i in 0..self.lookupds.len() {
            self.lookupds[i].until = Duration::ZERO;
            self.lookupds[i].lying_until = Duration::ZERO;
            self.lookupds[i].garbage_until = Duration::ZERO;
            self.lookupd_heal(i);
        }
        for i in 0..self.producers.len() {
            self.stop_producer(i)?;
        }
        // Healthy applications too: what the handlers held back is answered (if it has not
        // timed out meanwhile).
        for consumer in 0..self.consumers.len() {
            for msg in std::mem::take(&mut self.consumers[consumer].ignored) {
                self.after(HEALING_HANDLER_DELAY, Ev::Respond { consumer, msg, answer: Answer::Finish });
            }
        }
        let inputs: Vec<inv::DeliveryInputs> = self
            .consumers
            .iter()
            .map(|c| inv::DeliveryInputs {
                lookupd_poll_interval: c.settings.lookupd_poll_interval,
                lookupd_poll_jitter: c.settings.lookupd_poll_jitter,
                dial_timeout: c.settings.dial_timeout,
                read_timeout: c.settings.read_timeout,
                msg_timeout: c.settings.msg_timeout.unwrap_or(Duration::from_secs(60)),
                max_requeue_delay: c.settings.max_requeue_delay,
                max_backoff_duration: c.settings.max_backoff_duration,
            })
            .collect();
        let producer_stops = self
            .producers
            .iter()
            .map(|p| inv::producer_stop_bound(p.settings.read_timeout, p.settings.dial_timeout))
            .max()
            .unwrap_or_default();
        self.after(producer_stops + inv::delivery_bound(&inputs, LONGEST_DPUB), Ev::HealDeadline);
        Ok(())
    }

    fn heal_deadline(&mut self) -> Result<(), Violation> {
        if self.phase != Phase::Healing {
            return Ok(());
        }
        let missing: Vec<String> = self
            .ledger
            .unhandled
            .iter()
            .take(5)
            .map(|body| {
                let nsqd = self.ledger.acked.get(body).copied().unwrap_or(usize::MAX);
                let held = self.nsqds.get(nsqd).is_some_and(|n| n.model.holds(body));
                let delivered = self.ledger.delivered.contains(body);
                format!(
                    "{} (nsqd-{nsqd}, held: {held}, delivered: {delivered})",
                    String::from_utf8_lossy(&body[..body.len().min(16)])
                )
            })
            .collect();
        let producers_left = self.producers.iter().filter(|p| !p.stopped).count();
        let detail = format!(
            "{} acknowledged publishes not handled {:?} after healing ({producers_left} producers not stopped): {}",
            self.ledger.unhandled.len(),
            self.now.saturating_sub(self.scenario.fault_phase),
            missing.join(", ")
        );
        self.check(inv::violated(name::ACKED_PUBLISH_DELIVERED, detail))?;
        self.begin_stopping()
    }

    fn begin_stopping(&mut self) -> Result<(), Violation> {
        self.note("stopping", Who::World, 0, 0);
        self.phase = Phase::Stopping;
        for i in 0..self.consumers.len() {
            self.stop_consumer(i)?;
        }
        Ok(())
    }

    /// Moves on when a phase's work is done.
    fn advance_phase(&mut self) -> Result<(), Violation> {
        match self.phase {
            Phase::Healing => {
                if self.ledger.unhandled.is_empty() && self.producers.iter().all(|p| p.stopped) {
                    self.begin_stopping()?;
                }
            }
            Phase::Stopping => {
                if self.consumers.iter().all(|c| c.stopped) && self.producers.iter().all(|p| p.stopped) {
                    self.phase = Phase::Quiet;
                    self.after(QUIET_PERIOD, Ev::End);
                }
            }
            Phase::Faults | Phase::Quiet => {}
        }
        Ok(())
    }
}

/// The `by_server` keys of one nsqd.
fn server_range(nsqd: usize) -> RangeInclusive<(usize, ServerConn)> {
    (nsqd, ServerConn(0))..=(nsqd, ServerConn(u64::MAX))
}

type FastSet<T> = HashSet<T, BuildHasherDefault<FxHasher>>;

/// A fast, deterministic hash for the ledger's short bodies (rustc's Fx).
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
