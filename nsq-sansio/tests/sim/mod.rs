//! A deterministic simulator of an NSQ cluster around the client state machines: modelled
//! nsqds and nsqlookupds, a network, a fault schedule and the invariants, on a virtual clock.

pub mod nsqd;
pub mod rng;
pub mod wire;
