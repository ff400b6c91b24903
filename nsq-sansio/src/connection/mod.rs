//! ConnectionState: one nsqd TCP connection as a pure state machine.
