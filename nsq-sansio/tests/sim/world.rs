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

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::RangeInclusive;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nsq_sansio::{ConnId, QueryId};

use super::clients::{
    Answer, ConsumerNote, Delivered, DialFailure, Io, ProducerNote, PublishOutcome, Settings, SimConsumer, SimProducer,
    LOOKUPD_QUERY_TIMEOUT,
};
use super::invariants::{self as inv, name, Check, ConsumerRates, Firings, ProducerRates, Violation};
use super::lookupd::{LookupdModel, Producer};
use super::net::{Dir, Link, Party};
use super::nsqd::{HandshakeFault, NsqdModel, ServerConn};
use super::rng::SimRng;
use super::scenario::{FaultKind, Handler, Scenario, CHANNEL, TOPIC};
use super::wire::Scanned;

/// The longest DPUB delay the publishers draw.
const LONGEST_DPUB: Duration = Duration::from_secs(3);
/// After every consumer stopped, the run goes on this long to see that they stay quiet.
const QUIET_PERIOD: Duration = Duration::from_secs(120);
/// The mean handler time in the healing phase.
const HEALING_HANDLER_DELAY: Duration = Duration::from_millis(1);
/// How many events the failure report shows.
const TRACE_LEN: usize = 48;

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
    LookupdAnswer {
        consumer: usize,
        query: QueryId,
        addr: String,
        answer: Result<Vec<u8>, DialFailure>,
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
    StopConsumer(usize),
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
    nsqd: usize,
    settings: Settings,
    client: Option<SimProducer>,
    publish_every: Duration,
    stopping_since: Option<Duration>,
    stopped: bool,
    next_body: u64,
    /// Publishes issued and not resolved, with their bodies.
    txs: BTreeMap<u64, Vec<Bytes>>,
    /// Publishes that ended "connection lost", waiting for their connection's Disconnected.
    lost: Vec<u64>,
    timer: Option<Duration>,
    firings: Firings,
    rates: ProducerRates,
}

struct ConsumerNode {
    settings: Settings,
    direct: Vec<String>,
    lookupds: Vec<String>,
    handler: Handler,
    sources_after: Duration,
    client: Option<SimConsumer>,
    stopping_since: Option<Duration>,
    stopped: bool,
    timer: Option<Duration>,
    firings: Firings,
    rates: ConsumerRates,
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
                nsqd: p.nsqd,
                settings: p.settings.clone(),
                client: None,
                publish_every: p.publish_every,
                stopping_since: None,
                stopped: false,
                next_body: 0,
                txs: BTreeMap::new(),
                lost: Vec::new(),
                timer: None,
                firings: Firings::default(),
                rates: ProducerRates::default(),
            })
            .collect();
        let consumers = scenario
            .consumers
            .iter()
            .map(|c| ConsumerNode {
                settings: c.settings.clone(),
                direct: c.direct.iter().map(|&i| format!("nsqd-{i}:4150")).collect(),
                lookupds: c.lookupds.iter().map(|&i| format!("lookupd-{i}:4161")).collect(),
                handler: c.handler,
                sources_after: c.sources_after,
                client: None,
                stopping_since: None,
                stopped: false,
                timer: None,
                firings: Firings::default(),
                rates: ConsumerRates::default(),
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
            Ev::LookupdAnswer { consumer, query, addr, answer } => {
                self.note("lookupd answer", Who::Party(Party::Consumer(consumer)), query.0, u64::from(answer.is_ok()));
                let now = self.instant();
                if let Some(c) = self.consumers[consumer].client.as_mut() {
                    c.lookupd_answer(query, &addr, answer, now);
                }
                self.drain(Party::Consumer(consumer))?;
            }
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
            Ev::StopConsumer(i) => self.stop_consumer(i)?,
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

    // ---- clients -----------------------------------------------------------------------------

    fn start_producer(&mut self, i: usize) -> Result<(), Violation> {
        if self.phase != Phase::Faults {
            self.producers[i].stopped = true;
            return Ok(());
        }
        let p = &mut self.producers[i];
        let addr = format!("nsqd-{}:4150", p.nsqd);
        p.client = Some(SimProducer::new(&addr, &p.settings, self.base + self.now));
        self.note("producer start", Who::Party(Party::Producer(i)), 0, 0);
        let first = self.rng.exponential(self.producers[i].publish_every);
        self.after(first, Ev::Publish(i));
        self.drain(Party::Producer(i))
    }

    fn stop_producer(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.instant();
        let p = &mut self.producers[i];
        let Some(client) = p.client.as_mut() else {
            p.stopped = true;
            return Ok(());
        };
        if p.stopping_since.is_some() {
            return Ok(());
        }
        p.stopping_since = Some(self.now);
        client.stop(now);
        let bound = inv::producer_stop_bound(p.settings.read_timeout, p.settings.dial_timeout);
        self.note("producer stop", Who::Party(Party::Producer(i)), 0, 0);
        let (due, jumped) = (self.now + bound, self.jumped);
        self.at(due, Ev::StopDeadline { party: Party::Producer(i), due, jumped });
        self.drain(Party::Producer(i))
    }

    fn start_consumer(&mut self, i: usize) -> Result<(), Violation> {
        if self.phase != Phase::Faults {
            self.consumers[i].stopped = true;
            return Ok(());
        }
        let c = &mut self.consumers[i];
        c.client = Some(SimConsumer::new(TOPIC, CHANNEL, &c.settings, self.base + self.now));
        let after = c.sources_after;
        self.note("consumer start", Who::Party(Party::Consumer(i)), 0, 0);
        self.after(after, Ev::AddSources(i));
        self.drain(Party::Consumer(i))
    }

    fn add_sources(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.instant();
        let c = &mut self.consumers[i];
        let Some(client) = c.client.as_mut() else { return Ok(()) };
        if c.stopping_since.is_some() {
            return Ok(());
        }
        for addr in &c.direct {
            client.connect_to_nsqd(addr, now).map_err(|e| Violation { invariant: name::CLIENT_PROTOCOL, detail: e })?;
        }
        for addr in &c.lookupds {
            client
                .connect_to_lookupd(addr, now)
                .map_err(|e| Violation { invariant: name::CLIENT_PROTOCOL, detail: e })?;
        }
        self.drain(Party::Consumer(i))
    }

    fn stop_consumer(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.instant();
        let c = &mut self.consumers[i];
        let Some(client) = c.client.as_mut() else {
            c.stopped = true;
            return Ok(());
        };
        if c.stopping_since.is_some() {
            return Ok(());
        }
        c.stopping_since = Some(self.now);
        client.stop(now);
        self.note("consumer stop", Who::Party(Party::Consumer(i)), 0, 0);
        let (due, jumped) = (self.now + inv::consumer_stop_bound(), self.jumped);
        self.at(due, Ev::StopDeadline { party: Party::Consumer(i), due, jumped });
        self.drain(Party::Consumer(i))
    }

    fn stop_deadline(&mut self, party: Party, due: Duration, jumped: Duration) -> Result<(), Violation> {
        // Time the clock leaped over does not count against the client.
        let due = due + (self.jumped - jumped);
        if due > self.now {
            let jumped = self.jumped;
            self.at(due, Ev::StopDeadline { party, due, jumped });
            return Ok(());
        }
        let (stopped, since) = match party {
            Party::Producer(i) => (self.producers[i].stopped, self.producers[i].stopping_since),
            Party::Consumer(i) => (self.consumers[i].stopped, self.consumers[i].stopping_since),
        };
        if stopped {
            return Ok(());
        }
        let detail =
            format!("{party} stopped at {:?} and has not finished at {:?}", since.unwrap_or_default(), self.now);
        self.check(inv::violated(name::STOP_COMPLETES, detail))
    }

    fn publish_deadline(&mut self, i: usize, tx: u64, due: Duration, jumped: Duration) -> Result<(), Violation> {
        let due = due + (self.jumped - jumped);
        if due > self.now {
            let jumped = self.jumped;
            self.at(due, Ev::PublishDeadline { producer: i, tx, due, jumped });
            return Ok(());
        }
        if !self.producers[i].txs.contains_key(&tx) {
            return Ok(());
        }
        let s = &self.producers[i].settings;
        let bound = inv::publish_bound(s.dial_timeout, s.read_timeout);
        let c = inv::violated(
            name::PUBLISH_RESOLVES_IN_TIME,
            format!("producer-{i}: tx {tx} unresolved {bound:?} after it was issued (auto_batch {})", s.auto_batch),
        );
        self.check(c)
    }

    fn publish(&mut self, i: usize) -> Result<(), Violation> {
        let now = self.instant();
        if self.phase != Phase::Faults || self.producers[i].stopping_since.is_some() {
            return Ok(());
        }
        let kind = self.rng.below(100);
        let count = if kind < 15 { self.rng.range(2, 5) } else { 1 };
        let pad = if self.rng.chance(0.02) { 4000 } else { self.rng.range(0, 200) as usize };
        let p = &mut self.producers[i];
        let bodies: Vec<Bytes> = (0..count)
            .map(|_| {
                p.next_body += 1;
                Bytes::from(format!("p{i}-{}{}", p.next_body, ".".repeat(pad)))
            })
            .collect();
        let Some(client) = p.client.as_mut() else { return Ok(()) };
        p.rates.called(self.now);
        let result = if count > 1 {
            client.multi_publish(TOPIC, bodies.clone(), now)
        } else if kind < 30 {
            let delay = Duration::from_millis(self.rng.below(LONGEST_DPUB.as_millis() as u64 + 1));
            client.deferred_publish(TOPIC, delay, bodies[0].clone(), now)
        } else {
            client.publish(TOPIC, bodies[0].clone(), now)
        };
        match result {
            Ok(tx) => {
                self.ledger.published.extend(bodies.iter().cloned());
                let p = &mut self.producers[i];
                let first = p.txs.insert(tx, bodies).is_none();
                if !first {
                    let c =
                        inv::violated(name::PUBLISH_RESOLVES_ONCE, format!("producer-{i}: tx {tx} handed out twice"));
                    self.check(c)?;
                }
                self.note("publish", Who::Party(Party::Producer(i)), 0, tx);
                let s = &self.producers[i].settings;
                let (due, jumped) = (self.now + inv::publish_bound(s.dial_timeout, s.read_timeout), self.jumped);
                self.at(due, Ev::PublishDeadline { producer: i, tx, due, jumped });
            }
            Err(e) => {
                let c = inv::violated(name::CLIENT_PROTOCOL, format!("producer-{i}: a valid publish was refused: {e}"));
                self.check(c)?;
            }
        }
        let next = self.rng.exponential(self.producers[i].publish_every);
        self.after(next, Ev::Publish(i));
        self.drain(Party::Producer(i))
    }

    fn respond(&mut self, consumer: usize, msg: Delivered, answer: Answer) -> Result<(), Violation> {
        let now = self.instant();
        let Some(client) = self.consumers[consumer].client.as_mut() else { return Ok(()) };
        // Refusals (the message timed out, its connection closed) are the application's lot:
        // nsqd delivers the message again.
        let accepted = client.respond(&msg, answer, now).is_ok();
        if accepted && answer == Answer::Finish {
            self.handled(&msg.body);
        }
        self.note("respond", Who::Party(Party::Consumer(consumer)), msg.conn.0, 0);
        if answer == Answer::Touch {
            let later = self.rng.exponential(self.consumers[consumer].handler.mean_delay);
            self.after(later, Ev::Respond { consumer, msg, answer: Answer::Finish });
        }
        self.drain(Party::Consumer(consumer))
    }

    fn handled(&mut self, body: &Bytes) {
        self.ledger.unhandled.remove(body);
        self.ledger.handled.insert(body.clone());
    }

    /// The application's handler: decides how and when to answer a message.
    fn handle_message(&mut self, consumer: usize, msg: Delivered) {
        let h = self.consumers[consumer].handler;
        let healing = self.phase != Phase::Faults;
        let roll = self.rng.unit();
        // Healing measures the client, not a slow application: handlers answer promptly.
        let delay = self.rng.exponential(if healing { HEALING_HANDLER_DELAY } else { h.mean_delay });
        let answer = if healing || roll >= h.requeue + h.touch + h.ignore {
            Answer::Finish
        } else if roll < h.requeue {
            let delay = self.rng.chance(0.5).then(|| self.rng.millis(0, 2_000));
            Answer::Requeue { delay, backoff: self.rng.chance(0.5) }
        } else if roll < h.requeue + h.touch {
            Answer::Touch
        } else {
            return;
        };
        self.after(delay, Ev::Respond { consumer, msg, answer });
    }

    fn client_timer(&mut self, party: Party, at: Duration) -> Result<(), Violation> {
        let now = self.now;
        let instant = self.instant();
        let (timer, firings) = match party {
            Party::Producer(i) => {
                let p = &mut self.producers[i];
                (&mut p.timer, &mut p.firings)
            }
            Party::Consumer(i) => {
                let c = &mut self.consumers[i];
                (&mut c.timer, &mut c.firings)
            }
        };
        if *timer != Some(at) {
            return Ok(());
        }
        *timer = None;
        let fired = firings.fired(now, format_args!("{party}"));
        self.check(fired)?;
        self.note("timer", Who::Party(party), 0, 0);
        match party {
            Party::Producer(i) => {
                if let Some(c) = self.producers[i].client.as_mut() {
                    c.timeout(instant);
                }
            }
            Party::Consumer(i) => {
                if let Some(c) = self.consumers[i].client.as_mut() {
                    c.timeout(instant);
                }
            }
        }
        self.drain(party)
    }

    /// Takes everything a client has to say, until it is quiet; then re-arms its timer and
    /// checks its invariants.
    fn drain(&mut self, party: Party) -> Result<(), Violation> {
        loop {
            let mut progress = false;
            // As the driver does: a connection is asked for bytes only when its previous write
            // finished, so what queues meanwhile leaves as one write.
            let idle: Vec<usize> = self
                .live
                .get(&party)
                .into_iter()
                .flatten()
                .copied()
                .filter(|&l| self.links[l].writable() && !self.links[l].writing)
                .collect();
            for l in idle {
                let conn = self.links[l].conn;
                if let Some(bytes) = self.poll_transmit_for(party, conn) {
                    progress = true;
                    self.client_write(party, conn, &bytes)?;
                    self.links[l].writing = true;
                    let took = self.rng.duration(Duration::from_micros(1), self.links[l].latency);
                    self.after(took, Ev::Written { link: l });
                }
            }
            match party {
                Party::Producer(i) => {
                    while let Some(note) = self.producers[i].client.as_mut().and_then(SimProducer::poll_note) {
                        progress = true;
                        self.producer_note(i, note)?;
                    }
                }
                Party::Consumer(i) => {
                    while let Some(note) = self.consumers[i].client.as_mut().and_then(SimConsumer::poll_note) {
                        progress = true;
                        self.consumer_note(i, note)?;
                    }
                }
            }
            // After the events, so a close is on the books before the re-query it causes.
            while let Some(io) = self.poll_io(party) {
                progress = true;
                self.client_io(party, io)?;
            }
            if !progress {
                break;
            }
        }
        let deadline = match party {
            Party::Producer(i) => self.producers[i].client.as_ref().and_then(SimProducer::poll_timeout),
            Party::Consumer(i) => self.consumers[i].client.as_ref().and_then(SimConsumer::poll_timeout),
        };
        let deadline = deadline.map(|t| self.since_base(t).max(self.now));
        let timer = match party {
            Party::Producer(i) => &mut self.producers[i].timer,
            Party::Consumer(i) => &mut self.consumers[i].timer,
        };
        if deadline.is_some() && deadline != *timer {
            *timer = deadline;
            if let Some(at) = deadline {
                self.at(at, Ev::ClientTimer { party, at });
            }
        } else if deadline.is_none() {
            *timer = None;
        }
        self.check_party(party)
    }

    fn poll_transmit_for(&mut self, party: Party, conn: ConnId) -> Option<Bytes> {
        match party {
            Party::Producer(i) => self.producers[i].client.as_mut()?.poll_transmit_for(conn),
            Party::Consumer(i) => self.consumers[i].client.as_mut()?.poll_transmit_for(conn),
        }
    }

    fn poll_io(&mut self, party: Party) -> Option<Io> {
        match party {
            Party::Producer(i) => self.producers[i].client.as_mut()?.poll_io(),
            Party::Consumer(i) => self.consumers[i].client.as_mut()?.poll_io(),
        }
    }

    /// The per-client invariants that hold between any two steps.
    fn check_party(&mut self, party: Party) -> Result<(), Violation> {
        match party {
            Party::Producer(i) => {
                let p = &self.producers[i];
                if let Some(client) = &p.client {
                    let c = inv::outstanding_matches(format_args!("producer-{i}"), client.outstanding(), p.txs.len());
                    self.check(c)?;
                }
            }
            Party::Consumer(i) => {
                let client = self.consumers[i].client.as_ref();
                let conns: Vec<inv::ConnRdy> = self
                    .live
                    .get(&party)
                    .into_iter()
                    .flatten()
                    .map(|&l| &self.links[l])
                    .filter(|link| link.writable())
                    .map(|link| inv::ConnRdy {
                        conn: link.conn.0,
                        written: link.rdy,
                        held: client.and_then(|c| c.rdy(link.conn)),
                        writing: link.writing,
                    })
                    .collect();
                let max = self.consumers[i].settings.max_in_flight;
                let c = inv::rdy_within_max_in_flight(format_args!("consumer-{i}"), &conns, max);
                self.check(c)?;
            }
        }
        Ok(())
    }

    fn client_io(&mut self, party: Party, io: Io) -> Result<(), Violation> {
        let stopped = match party {
            Party::Producer(i) => self.producers[i].stopped,
            Party::Consumer(i) => self.consumers[i].stopped,
        };
        match io {
            Io::Connect { conn, addr } => {
                if stopped {
                    let c = inv::violated(
                        name::STOPPED_IS_QUIET,
                        format!("{party} asks to dial {addr} after (or with) its Stopped"),
                    );
                    self.check(c)?;
                }
                self.dial(party, conn, addr)
            }
            Io::Close { conn } => self.client_close(party, conn),
            Io::QueryLookupd { query, addr, request } => {
                let Party::Consumer(i) = party else {
                    return self.check(inv::violated(name::CLIENT_PROTOCOL, "a producer queried lookupd"));
                };
                if stopped {
                    let c = inv::violated(name::STOPPED_IS_QUIET, format!("{party} queries {addr} after Stopped"));
                    self.check(c)?;
                }
                let interval = self.consumers[i].settings.lookupd_poll_interval;
                let c = self.consumers[i].rates.queried(self.now, interval);
                self.check(c)?;
                self.query_lookupd(i, query, addr, &request);
                Ok(())
            }
        }
    }

    fn producer_note(&mut self, i: usize, note: ProducerNote) -> Result<(), Violation> {
        match note {
            ProducerNote::Published { tx, outcome } => {
                self.note("published", Who::Party(Party::Producer(i)), 0, tx);
                let Some(bodies) = self.producers[i].txs.remove(&tx) else {
                    let c = inv::violated(
                        name::PUBLISH_RESOLVES_ONCE,
                        format!("producer-{i}: tx {tx} resolved twice or never issued"),
                    );
                    return self.check(c);
                };
                match outcome {
                    PublishOutcome::Acked => {
                        let nsqd = self.producers[i].nsqd;
                        for body in bodies {
                            let held = self.nsqds[nsqd].model.holds(&body);
                            let delivered = self.ledger.delivered.contains(&body);
                            let lost = self.ledger.lost.contains(&body);
                            let c = inv::acked_publish_held(&body, held, delivered, lost);
                            self.check(c)?;
                            if !lost && !self.ledger.handled.contains(&body) {
                                self.ledger.unhandled.insert(body.clone());
                            }
                            self.ledger.acked.insert(body, nsqd);
                        }
                    }
                    PublishOutcome::Lost(_) => self.producers[i].lost.push(tx),
                    PublishOutcome::Refused(_) | PublishOutcome::Rejected(_) => {}
                }
            }
            ProducerNote::Connected(conn) => {
                self.note("producer connected", Who::Party(Party::Producer(i)), conn.0, 0);
                if let Some(&l) = self.by_client.get(&(Party::Producer(i), conn)) {
                    self.links[l].up = true;
                }
            }
            ProducerNote::Disconnected { conn, cause, local } => {
                self.note("producer disconnected", Who::Party(Party::Producer(i)), conn.0, u64::from(local));
                self.detail(|| cause.clone());
                let lost = std::mem::take(&mut self.producers[i].lost);
                let link = self.by_client.get(&(Party::Producer(i), conn)).map(|&l| &self.links[l]);
                let faulted = link.is_some_and(|l| l.faulted);
                if local && !faulted && !lost.is_empty() {
                    let when = if link.is_some_and(|l| l.up) { "after its handshake" } else { "during its handshake" };
                    let c = inv::violated(
                        name::PUBLISH_FAILS_ONLY_WITH_CAUSE,
                        format!("producer-{i}: {} publishes (txs {lost:?}) failed with \"connection lost\" on conn {} that no fault touched, closed locally {when} ({cause})", lost.len(), conn.0),
                    );
                    self.check(c)?;
                }
            }
            ProducerNote::Stopped => {
                self.note("producer stopped", Who::Party(Party::Producer(i)), 0, 0);
                self.producers[i].stopped = true;
                if self.producers[i].stopping_since.is_none() {
                    let c = inv::violated(name::STOP_COMPLETES, format!("producer-{i}: Stopped without a stop"));
                    self.check(c)?;
                }
            }
        }
        Ok(())
    }

    fn consumer_note(&mut self, i: usize, note: ConsumerNote) -> Result<(), Violation> {
        let party = Party::Consumer(i);
        match note {
            ConsumerNote::Message(msg) | ConsumerNote::GaveUp(msg) => {
                let gave_up = msg.attempts > self.consumers[i].settings.max_attempts
                    && self.consumers[i].settings.max_attempts > 0;
                self.note("message", Who::Party(party), msg.conn.0, u64::from(msg.attempts));
                if !self.ledger.published.contains(&msg.body) || msg.attempts == 0 {
                    let c = inv::violated(
                        name::MESSAGE_INTEGRITY,
                        format!(
                            "consumer-{i}: a message never published ({:?}, attempts {})",
                            String::from_utf8_lossy(&msg.body[..msg.body.len().min(24)]),
                            msg.attempts
                        ),
                    );
                    self.check(c)?;
                }
                self.ledger.delivered.insert(msg.body.clone());
                if gave_up {
                    self.handled(&msg.body);
                } else {
                    self.handle_message(i, msg);
                }
            }
            ConsumerNote::Connected { conn, addr } => {
                self.note("consumer connected", Who::Party(party), conn.0, 0);
                match self.by_client.get(&(party, conn)) {
                    Some(&l) if self.links[l].addr == addr => self.links[l].up = true,
                    _ => {
                        let c = inv::violated(
                            name::CLIENT_PROTOCOL,
                            format!("consumer-{i}: Connected for unknown conn {} ({addr})", conn.0),
                        );
                        self.check(c)?;
                    }
                }
            }
            ConsumerNote::Closed { conn, addr, cause } => {
                let up = self.by_client.get(&(party, conn)).is_some_and(|&l| self.links[l].up);
                self.note("consumer closed", Who::Party(party), conn.0, u64::from(up));
                self.detail(|| format!("{addr}: {cause}"));
                if up {
                    self.consumers[i].rates.up_closed(self.now);
                } else {
                    self.consumers[i].rates.down_closed(self.now);
                }
            }
            ConsumerNote::LookupdFailed { addr, error } => {
                self.note("lookupd failed", Who::Party(party), 0, 0);
                self.detail(|| format!("{addr}: {error}"));
            }
            ConsumerNote::Stopped => {
                self.note("consumer stopped", Who::Party(party), 0, 0);
                self.consumers[i].stopped = true;
                if self.consumers[i].stopping_since.is_none() {
                    let c = inv::violated(name::STOP_COMPLETES, format!("consumer-{i}: Stopped without a stop"));
                    self.check(c)?;
                }
            }
        }
        Ok(())
    }

    // ---- the network -------------------------------------------------------------------------

    fn nsqd_of(addr: &str) -> Option<usize> {
        addr.strip_prefix("nsqd-")?.strip_suffix(":4150")?.parse().ok()
    }

    fn dial(&mut self, party: Party, conn: ConnId, addr: String) -> Result<(), Violation> {
        self.note("dial", Who::Party(party), conn.0, 0);
        let rate = match party {
            Party::Producer(i) => self.producers[i].rates.dialled(&addr, self.now),
            Party::Consumer(i) => {
                let c = &mut self.consumers[i];
                let interval = c.settings.lookupd_poll_interval;
                let direct = c.direct.contains(&addr);
                c.rates.dialled(&addr, self.now, interval, direct, !c.lookupds.is_empty())
            }
        };
        self.check(rate)?;
        let latency = self.scenario.latency.mul_f64(0.5 + self.rng.unit());
        let nsqd = Self::nsqd_of(&addr);
        let link = self.links.len();
        self.links.push(Link::new(party, conn, nsqd.unwrap_or(usize::MAX), addr, latency));
        self.live.entry(party).or_default().insert(link);
        if self.by_client.insert((party, conn), link).is_some() {
            let c = inv::violated(name::CLIENT_PROTOCOL, format!("{party} reused conn id {}", conn.0));
            self.check(c)?;
        }
        let dial_timeout = match party {
            Party::Producer(i) => self.producers[i].settings.dial_timeout,
            Party::Consumer(i) => self.consumers[i].settings.dial_timeout,
        };
        let (delay, outcome) = match nsqd.map(|n| &self.nsqds[n]) {
            Some(node) if node.up && node.refuse_until <= self.now => (2 * latency, DialOutcome::Accept),
            Some(node) if node.up && node.blackhole => (dial_timeout, DialOutcome::Fail(DialFailure::TimedOut)),
            // An address nobody listens on (a ghost) times out or is refused, by its name.
            None if link % 2 == 0 => (dial_timeout, DialOutcome::Fail(DialFailure::TimedOut)),
            _ => (2 * latency, DialOutcome::Fail(DialFailure::Refused)),
        };
        self.after(delay, Ev::DialDone { link, outcome });
        Ok(())
    }

    fn dial_done(&mut self, link: usize, outcome: DialOutcome) -> Result<(), Violation> {
        let (party, conn, nsqd) = (self.links[link].party, self.links[link].conn, self.links[link].nsqd);
        let now = self.instant();
        if !self.links[link].client_open {
            // The client gave up on the dial (closed it, or stopped) before it resolved.
            self.links[link].server_open = false;
            return Ok(());
        }
        // The nsqd may have gone down meanwhile.
        let outcome = match outcome {
            DialOutcome::Accept if !self.nsqds.get(nsqd).is_some_and(|n| n.up) => {
                DialOutcome::Fail(DialFailure::Refused)
            }
            other => other,
        };
        match outcome {
            DialOutcome::Fail(why) => {
                self.note("dial failed", Who::Party(party), conn.0, 0);
                let l = &mut self.links[link];
                l.faulted = true;
                l.server_open = false;
                let addr = l.addr.clone();
                match party {
                    Party::Producer(i) => {
                        if let Some(c) = self.producers[i].client.as_mut() {
                            c.connect_failed(conn, &addr, why, now);
                        }
                    }
                    Party::Consumer(i) => {
                        if let Some(c) = self.consumers[i].client.as_mut() {
                            c.connect_failed(conn, &addr, why, now);
                        }
                    }
                }
                // The client knows: no Close is needed for a socket that never opened.
                self.links[link].client_open = false;
                self.live.entry(party).or_default().remove(&link);
            }
            DialOutcome::Accept => {
                self.note("accepted", Who::Party(party), conn.0, 0);
                let node = &mut self.nsqds[nsqd];
                let fault = node.handshake.as_ref().filter(|(_, until)| *until > self.now).map(|(f, _)| f.clone());
                let faulted = fault.is_some() || node.stall_until > self.now;
                let server = node.model.accept_with(fault, now);
                let incarnation = node.incarnation;
                self.links[link].server = Some((server, incarnation));
                self.links[link].faulted |= faulted;
                self.by_server.insert((nsqd, server), link);
                match party {
                    Party::Producer(i) => {
                        if let Some(c) = self.producers[i].client.as_mut() {
                            c.connected(conn, now);
                        }
                    }
                    Party::Consumer(i) => {
                        if let Some(c) = self.consumers[i].client.as_mut() {
                            c.connected(conn, now);
                        }
                    }
                }
                self.drain_nsqd(nsqd)?;
            }
        }
        self.drain(party)
    }

    /// Bytes a client wrote.
    fn client_write(&mut self, party: Party, conn: ConnId, bytes: &[u8]) -> Result<(), Violation> {
        let Some(&l) = self.by_client.get(&(party, conn)) else {
            return self.check(inv::violated(
                name::CLIENT_PROTOCOL,
                format!("{party} wrote to conn {} it never dialled", conn.0),
            ));
        };
        if !self.links[l].writable() {
            let c = inv::violated(
                name::CLIENT_PROTOCOL,
                format!("{party} wrote to conn {} that is not connected (or already closed)", conn.0),
            );
            return self.check(c);
        }
        self.note("client write", Who::Party(party), conn.0, bytes.len() as u64);
        let link = &mut self.links[l];
        let mut scanned = Vec::new();
        link.scanner.feed(bytes, &mut scanned);
        for s in scanned {
            match s {
                Scanned::Rdy(n) => link.rdy = n,
                Scanned::Cls => {}
            }
        }
        if !link.server_open {
            return Ok(());
        }
        let latency = link.latency;
        let scheduled = link.to_server.send(bytes, self.now, latency, &mut self.rng, &mut self.chunk_seq);
        let in_transit = link.to_server.in_transit;
        for (seq, at) in scheduled {
            self.at(at, Ev::Arrive { link: l, dir: Dir::ToServer, seq });
        }
        self.check(inv::in_transit_bounded(format_args!("{party} conn {} to nsqd", conn.0), in_transit))
    }

    fn client_close(&mut self, party: Party, conn: ConnId) -> Result<(), Violation> {
        let Some(&l) = self.by_client.get(&(party, conn)) else {
            return self.check(inv::violated(
                name::CLIENT_PROTOCOL,
                format!("{party} closed conn {} it never dialled", conn.0),
            ));
        };
        self.note("client close", Who::Party(party), conn.0, 0);
        if !self.links[l].client_open {
            return Ok(());
        }
        // The connection's last bytes (final FINs, CLS) go out before the socket closes.
        while let Some(bytes) = self.poll_transmit_for(party, conn) {
            self.client_write(party, conn, &bytes)?;
        }
        self.live.entry(party).or_default().remove(&l);
        let link = &mut self.links[l];
        link.client_open = false;
        let latency = link.latency;
        if link.server.is_some() {
            if let Some((seq, at)) = link.to_server.shutdown(self.now, latency, &mut self.rng, &mut self.chunk_seq) {
                self.at(at, Ev::Arrive { link: l, dir: Dir::ToServer, seq });
            }
        }
        Ok(())
    }

    fn arrive(&mut self, l: usize, dir: Dir, seq: u64) -> Result<(), Violation> {
        let Some(chunk) = self.links[l].pipe(dir).take(seq) else { return Ok(()) };
        let now = self.instant();
        let link = &self.links[l];
        let (party, conn, nsqd) = (link.party, link.conn, link.nsqd);
        match dir {
            Dir::ToServer => {
                let Some((server, incarnation)) = link.server else { return Ok(()) };
                if !link.server_open || incarnation != self.nsqds[nsqd].incarnation || !self.nsqds[nsqd].up {
                    return Ok(());
                }
                if chunk.eof {
                    self.note("nsqd sees close", Who::Nsqd(nsqd), server.0, 0);
                    self.nsqds[nsqd].model.client_closed(server, now);
                    self.links[l].server_open = false;
                    self.by_server.remove(&(nsqd, server));
                } else {
                    self.note("nsqd reads", Who::Nsqd(nsqd), server.0, chunk.bytes.len() as u64);
                    self.nsqds[nsqd].model.recv(server, &chunk.bytes, now);
                }
                self.drain_nsqd(nsqd)
            }
            Dir::ToClient => {
                if !link.client_open {
                    return Ok(());
                }
                if chunk.eof {
                    self.note("client sees close", Who::Party(party), conn.0, 0);
                } else {
                    self.note("client reads", Who::Party(party), conn.0, chunk.bytes.len() as u64);
                }
                match party {
                    Party::Producer(i) => {
                        if let Some(c) = self.producers[i].client.as_mut() {
                            if chunk.eof {
                                c.eof(conn, now);
                            } else {
                                c.input(conn, &chunk.bytes, now);
                            }
                        }
                    }
                    Party::Consumer(i) => {
                        if let Some(c) = self.consumers[i].client.as_mut() {
                            if chunk.eof {
                                c.eof(conn, now);
                            } else {
                                c.input(conn, &chunk.bytes, now);
                            }
                        }
                    }
                }
                self.drain(party)
            }
        }
    }

    /// Takes everything an nsqd has to say, then re-arms its timer.
    fn drain_nsqd(&mut self, n: usize) -> Result<(), Violation> {
        loop {
            let mut progress = false;
            while let Some((server, bytes)) = self.nsqds[n].model.poll_transmit_any() {
                progress = true;
                self.server_write(n, server, bytes)?;
            }
            while let Some(reg) = self.nsqds[n].model.poll_registration() {
                progress = true;
                let addr = self.nsqds[n].addr.clone();
                for l in self.lookupds.iter_mut().filter(|l| l.mode != LookupdMode::Down) {
                    l.model.register(&addr, &reg.topic, reg.channel.as_deref());
                }
            }
            while let Some(err) = self.nsqds[n].model.poll_error() {
                progress = true;
                self.note("nsqd error", Who::Nsqd(n), err.conn.0, u64::from(err.fatal));
                self.detail(|| err.text.clone());
                if err.fatal && !err.injected {
                    let who = self
                        .by_server
                        .get(&(n, err.conn))
                        .map(|&l| format!("{} conn {}", self.links[l].party, self.links[l].conn.0));
                    let c = inv::violated(
                        name::CLIENT_PROTOCOL,
                        format!("nsqd-{n} answered {} with the fatal error {:?}", who.unwrap_or_default(), err.text),
                    );
                    self.check(c)?;
                }
            }
            // After the errors, which name the connection, and after its last bytes.
            while let Some(server) = self.nsqds[n].model.poll_closed() {
                progress = true;
                self.server_close(n, server);
            }
            if !progress {
                break;
            }
        }
        for (&(_, server), &l) in self.by_server.range(server_range(n)) {
            if let Some(flow) = self.nsqds[n].model.flow(server) {
                if flow.in_flight > flow.max_rdy_granted {
                    let party = self.links[l].party;
                    let what = format_args!("nsqd-{n} conn {} ({party})", server.0);
                    let c = inv::in_flight_within_rdy(what, flow.in_flight, flow.max_rdy_granted);
                    return self.check(c);
                }
            }
        }
        let deadline = self.nsqds[n].model.poll_timeout().map(|t| self.since_base(t).max(self.now));
        if deadline.is_some() && deadline != self.nsqds[n].timer {
            self.nsqds[n].timer = deadline;
            if let Some(at) = deadline {
                self.at(at, Ev::NsqdTimer { nsqd: n, at });
            }
        }
        Ok(())
    }

    fn server_write(&mut self, n: usize, server: ServerConn, mut bytes: Vec<u8>) -> Result<(), Violation> {
        let Some(&l) = self.by_server.get(&(n, server)) else { return Ok(()) };
        self.note("nsqd write", Who::Nsqd(n), server.0, bytes.len() as u64);
        let reset = self.links[l].reset_armed;
        if reset {
            // Reset mid-frame: part of these bytes arrive, then the connection is gone.
            let keep = self.rng.below(bytes.len() as u64) as usize;
            bytes.truncate(keep);
        }
        let link = &mut self.links[l];
        if link.client_open {
            let latency = link.latency;
            let scheduled = link.to_client.send(&bytes, self.now, latency, &mut self.rng, &mut self.chunk_seq);
            for (seq, at) in scheduled {
                self.at(at, Ev::Arrive { link: l, dir: Dir::ToClient, seq });
            }
            let in_transit = self.links[l].to_client.in_transit;
            self.check(inv::in_transit_bounded(format_args!("nsqd-{n} conn {} to client", server.0), in_transit))?;
        }
        if reset {
            self.reset(l)?;
        }
        Ok(())
    }

    /// nsqd closed a connection: the client reads what is in transit, then end of file.
    fn server_close(&mut self, n: usize, server: ServerConn) {
        let Some(l) = self.by_server.remove(&(n, server)) else { return };
        self.note("nsqd closes", Who::Nsqd(n), server.0, 0);
        let link = &mut self.links[l];
        link.server_open = false;
        link.faulted = true;
        let latency = link.latency;
        if let Some((seq, at)) = link.to_client.shutdown(self.now, latency, &mut self.rng, &mut self.chunk_seq) {
            self.at(at, Ev::Arrive { link: l, dir: Dir::ToClient, seq });
        }
    }

    /// A reset: what is in transit to the client is cut short (some of it may still arrive),
    /// what is in transit to nsqd is lost, and both sides see the connection end.
    fn reset(&mut self, l: usize) -> Result<(), Violation> {
        let now = self.instant();
        let link = &mut self.links[l];
        link.reset_armed = false;
        link.faulted = true;
        let keep = self.rng.below(link.to_client.in_transit as u64 + 1) as usize;
        link.to_client.cut(keep);
        link.to_server.cut(0);
        link.to_server.shut = true;
        let latency = link.latency;
        let (party, conn) = (link.party, link.conn);
        if let Some((seq, at)) = link.to_client.shutdown(self.now, latency, &mut self.rng, &mut self.chunk_seq) {
            self.at(at, Ev::Arrive { link: l, dir: Dir::ToClient, seq });
        }
        self.note("reset", Who::Party(party), conn.0, keep as u64);
        let link = &mut self.links[l];
        if let (Some((server, incarnation)), true) = (link.server, link.server_open) {
            link.server_open = false;
            let n = link.nsqd;
            self.by_server.remove(&(n, server));
            if self.nsqds[n].incarnation == incarnation && self.nsqds[n].up {
                self.nsqds[n].model.client_closed(server, now);
                self.drain_nsqd(n)?;
            }
        }
        Ok(())
    }

    fn query_lookupd(&mut self, consumer: usize, query: QueryId, addr: String, request: &[u8]) {
        self.note("lookupd query", Who::Party(Party::Consumer(consumer)), query.0, 0);
        let rtt = self.scenario.latency.mul_f64(1.0 + self.rng.unit()) * 2;
        let index =
            addr.strip_prefix("lookupd-").and_then(|a| a.strip_suffix(":4161")).and_then(|i| i.parse::<usize>().ok());
        let now = self.instant();
        let (delay, answer) = match index.and_then(|i| self.lookupds.get_mut(i)) {
            None => (rtt, Err(DialFailure::Refused)),
            Some(l) => match l.mode {
                LookupdMode::Down => (rtt, Err(DialFailure::Refused)),
                LookupdMode::Hang => (LOOKUPD_QUERY_TIMEOUT, Err(DialFailure::TimedOut)),
                LookupdMode::Slow(d) => (rtt + d, Ok(l.model.handle(request, now))),
                LookupdMode::Up => (rtt, Ok(l.model.handle(request, now))),
            },
        };
        self.after(delay, Ev::LookupdAnswer { consumer, query, addr, answer });
    }

    // ---- faults ------------------------------------------------------------------------------

    fn fault(&mut self, kind: FaultKind) -> Result<(), Violation> {
        if self.phase != Phase::Faults {
            return Ok(());
        }
        match kind {
            FaultKind::NsqdDown { nsqd, blackhole, duration } => {
                self.note("fault: nsqd down", Who::Nsqd(nsqd), 0, u64::from(blackhole));
                let node = &mut self.nsqds[nsqd];
                node.refuse_until = node.refuse_until.max(self.now + duration);
                node.blackhole = blackhole;
                self.after(duration, Ev::NsqdHeal(nsqd));
            }
            FaultKind::Crash { nsqd, downtime } => self.crash(nsqd, downtime)?,
            FaultKind::Stall { nsqd, whole, duration } => {
                let now = self.instant();
                if whole {
                    self.note("fault: nsqd stalls", Who::Nsqd(nsqd), 0, 0);
                    let node = &mut self.nsqds[nsqd];
                    node.stall_until = node.stall_until.max(self.now + duration);
                    node.model.set_stalled_all(true, now);
                    for &l in self.by_server.range(server_range(nsqd)).map(|(_, l)| l) {
                        self.links[l].faulted = true;
                    }
                    self.after(duration, Ev::NsqdHeal(nsqd));
                } else if let Some(l) = self.random_link(nsqd) {
                    self.note("fault: conn stalls", Who::Nsqd(nsqd), self.links[l].conn.0, 0);
                    self.links[l].faulted = true;
                    if let Some((server, _)) = self.links[l].server {
                        self.nsqds[nsqd].model.set_stalled(server, true, now);
                    }
                    self.after(duration, Ev::Unstall { link: l });
                }
            }
            FaultKind::Reset { nsqd } => {
                if let Some(l) = self.random_link(nsqd) {
                    self.note("fault: reset armed", Who::Nsqd(nsqd), self.links[l].conn.0, 0);
                    self.links[l].reset_armed = true;
                    let fallback = self.rng.millis(1, 10_000);
                    self.after(fallback, Ev::ResetFallback { link: l });
                }
            }
            FaultKind::Handshake { nsqd, fault, duration } => {
                self.note("fault: handshake", Who::Nsqd(nsqd), 0, 0);
                self.nsqds[nsqd].handshake = Some((fault, self.now + duration));
            }
            FaultKind::LookupdDown { lookupd, duration } => {
                self.note("fault: lookupd down", Who::Lookupd(lookupd), 0, 0);
                let l = &mut self.lookupds[lookupd];
                l.mode = LookupdMode::Down;
                // The process is gone: its registrations with it.
                l.model.forget_everything();
                l.until = l.until.max(self.now + duration);
                self.after(duration, Ev::LookupdHeal(lookupd));
            }
            FaultKind::LookupdSlow { lookupd, delay, duration } => {
                self.lookupd_mode(lookupd, LookupdMode::Slow(delay), duration)
            }
            FaultKind::LookupdHang { lookupd, duration } => self.lookupd_mode(lookupd, LookupdMode::Hang, duration),
            FaultKind::LookupdLying { lookupd, duration } => {
                self.note("fault: lookupd lies", Who::Lookupd(lookupd), 0, 0);
                let mut ghosts = vec![Producer::for_addr("ghost-0:4150", 1), Producer::for_addr("ghost-1:4150", 2)];
                ghosts.extend(
                    self.nsqds
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| !n.up)
                        .map(|(i, n)| Producer::for_addr(&n.addr, 40_000 + i as u16)),
                );
                let l = &mut self.lookupds[lookupd];
                l.model.set_lying(ghosts);
                l.lying_until = l.lying_until.max(self.now + duration);
                self.after(duration, Ev::LookupdHeal(lookupd));
            }
            FaultKind::LookupdGarbage { lookupd, garbage, duration } => {
                self.note("fault: lookupd garbage", Who::Lookupd(lookupd), 0, 0);
                let l = &mut self.lookupds[lookupd];
                l.model.set_garbage(Some(garbage));
                l.garbage_until = l.garbage_until.max(self.now + duration);
                self.after(duration, Ev::LookupdHeal(lookupd));
            }
            FaultKind::ClockJump { by } => {
                self.note("fault: clock jump", Who::World, 0, by.as_secs());
                self.now += by;
                self.jumped += by;
                // Every deadline of every open connection may pass at once.
                for link in self.by_server.values().chain(self.by_client.values()) {
                    self.links[*link].faulted = true;
                }
            }
        }
        Ok(())
    }

    fn lookupd_mode(&mut self, lookupd: usize, mode: LookupdMode, duration: Duration) {
        self.note("fault: lookupd slow", Who::Lookupd(lookupd), 0, 0);
        let l = &mut self.lookupds[lookupd];
        if l.mode != LookupdMode::Down {
            l.mode = mode;
        }
        l.until = l.until.max(self.now + duration);
        self.after(duration, Ev::LookupdHeal(lookupd));
    }

    /// A link to `nsqd` that is up on both sides, at random.
    fn random_link(&mut self, nsqd: usize) -> Option<usize> {
        let mut candidates: Vec<usize> = self.by_server.range(server_range(nsqd)).map(|(_, &l)| l).collect();
        candidates.retain(|&l| self.links[l].client_open);
        (!candidates.is_empty()).then(|| candidates[self.rng.index(candidates.len())])
    }

    fn crash(&mut self, n: usize, downtime: Duration) -> Result<(), Violation> {
        if !self.nsqds[n].up {
            return Ok(());
        }
        self.note("fault: crash", Who::Nsqd(n), 0, 0);
        let node = &mut self.nsqds[n];
        node.up = false;
        node.incarnation += 1;
        node.timer = None;
        for body in node.model.crash() {
            let body = Bytes::copy_from_slice(&body);
            self.ledger.unhandled.remove(&body);
            self.ledger.lost.insert(body);
        }
        let addr = node.addr.clone();
        for l in &mut self.lookupds {
            l.model.unregister_node(&addr);
        }
        // The kernel resets every connection: what is already on the wire still arrives.
        let links: Vec<usize> = self.by_server.range(server_range(n)).map(|(_, &l)| l).collect();
        for l in links {
            let link = &mut self.links[l];
            link.faulted = true;
            link.server_open = false;
            link.to_server.cut(0);
            link.to_server.shut = true;
            let latency = link.latency;
            if let Some((seq, at)) = link.to_client.shutdown(self.now, latency, &mut self.rng, &mut self.chunk_seq) {
                self.at(at, Ev::Arrive { link: l, dir: Dir::ToClient, seq });
            }
        }
        self.by_server.retain(|(node, _), _| *node != n);
        self.after(downtime, Ev::Restart(n));
        Ok(())
    }

    fn restart(&mut self, n: usize) -> Result<(), Violation> {
        if self.nsqds[n].up {
            return Ok(());
        }
        self.note("restart", Who::Nsqd(n), 0, 0);
        let now = self.instant();
        let node = &mut self.nsqds[n];
        node.up = true;
        node.model.restart(now);
        let (addr, regs) = (node.addr.clone(), node.model.registrations());
        for l in self.lookupds.iter_mut().filter(|l| l.mode != LookupdMode::Down) {
            l.model.register_node(Producer::for_addr(&addr, 40_000 + n as u16));
            for reg in &regs {
                l.model.register(&addr, &reg.topic, reg.channel.as_deref());
            }
        }
        self.drain_nsqd(n)
    }

    /// An nsqd fault's time may be up: lifts whatever has expired.
    fn nsqd_heal(&mut self, n: usize) -> Result<(), Violation> {
        let now = self.instant();
        let node = &mut self.nsqds[n];
        if node.stall_until <= self.now && node.up {
            node.model.set_stalled_all(false, now);
        }
        self.drain_nsqd(n)
    }

    fn unstall(&mut self, l: usize) -> Result<(), Violation> {
        let now = self.instant();
        let link = &self.links[l];
        let n = link.nsqd;
        if let (Some((server, incarnation)), true) = (link.server, link.server_open) {
            if incarnation == self.nsqds[n].incarnation && self.nsqds[n].up && self.nsqds[n].stall_until <= self.now {
                self.nsqds[n].model.set_stalled(server, false, now);
                return self.drain_nsqd(n);
            }
        }
        Ok(())
    }

    fn lookupd_heal(&mut self, i: usize) {
        let now = self.now;
        let l = &mut self.lookupds[i];
        if l.until <= now && l.mode != LookupdMode::Up {
            let was_down = l.mode == LookupdMode::Down;
            l.mode = LookupdMode::Up;
            if was_down {
                // The nsqds find it again at their next lookupd tick.
                self.after(inv::NSQD_LOOKUPD_RECONNECT, Ev::Reregister(i));
            }
        }
        let l = &mut self.lookupds[i];
        if l.lying_until <= now {
            l.model.set_lying(Vec::new());
        }
        if l.garbage_until <= now {
            l.model.set_garbage(None);
        }
    }

    fn reregister(&mut self, i: usize) {
        if self.lookupds[i].mode == LookupdMode::Down {
            return;
        }
        for (n, node) in self.nsqds.iter().enumerate().filter(|(_, node)| node.up) {
            let l = &mut self.lookupds[i];
            l.model.register_node(Producer::for_addr(&node.addr, 40_000 + n as u16));
            for reg in node.model.registrations() {
                l.model.register(&node.addr, &reg.topic, reg.channel.as_deref());
            }
        }
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
