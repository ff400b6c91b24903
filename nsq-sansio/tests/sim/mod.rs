//! A deterministic simulator of an NSQ cluster around the client state machines: modelled
//! nsqds and nsqlookupds, a network, a seeded fault schedule and the invariants, on a virtual
//! clock, in one thread per seed.

pub mod clients;
pub mod invariants;
pub mod lookupd;
pub mod net;
pub mod nsqd;
pub mod rng;
pub mod scenario;
pub mod wire;
pub mod world;
