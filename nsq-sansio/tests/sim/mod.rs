//! A deterministic simulator of an NSQ cluster around the client state machines, on a virtual
//! clock, one thread per seed.
//!
//! - `scenario.rs`: what a seed draws: nsqds, lookupds, clients (producers on one nsqd or pools
//!   over several, consumers) and their settings, the applications' behaviour, the fault
//!   schedule;
//! - `world/`: the event loop and the phases of a run (`mod.rs`), the clients and their
//!   applications (`apps.rs`), the network side (`network.rs`: dials, byte streams, lookupds
//!   as HTTP/1.1 servers), the faults (`faults.rs`);
//! - `net.rs`: connections as ordered, chunked, delayed byte pipes;
//! - `nsqd.rs`, `lookupd.rs`: the server models, built to nsqd's and nsqlookupd's code and the
//!   captures; `wire.rs`: their wire code, shared with nothing in the client;
//! - `invariants.rs`: every invariant, its bound, and where the bound comes from;
//! - `clients.rs`: the only file that calls `ConsumerState`, `ProducerState`,
//!   `ProducerPoolState`, `ConnectionState` and `Config`;
//! - `rng.rs`: the simulation's own generator.

pub mod clients;
pub mod invariants;
pub mod lookupd;
pub mod net;
pub mod nsqd;
pub mod rng;
pub mod scenario;
pub mod wire;
pub mod world;
