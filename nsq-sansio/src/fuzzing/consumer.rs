//! A `ConsumerState` driven by arbitrary connection events, messages, answers and time.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};

use crate::{
    Action, Channel, Config, ConnId, ConsumerEvent, ConsumerState, Frame, Message, MessageId, Response, Topic,
};

/// One step of a fuzzed consumer.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// `connect_to_nsqd` to one of four addresses.
    Connect(u8),
    /// The socket of the n-th dialled connection connects and nsqd completes the handshake.
    Accept(u8),
    /// A message arrives on the n-th connection with these attempts.
    Deliver(u8, u16),
    /// Raw server bytes on the n-th connection.
    Input(u8, Vec<u8>),
    /// EOF on the n-th connection.
    Eof(u8),
    /// Connect failure of the n-th connection.
    ConnectFailed(u8),
    /// Answer the n-th unanswered message.
    Answer(u8, u8),
    /// `change_max_in_flight`.
    MaxInFlight(u8),
    /// Virtual time passes (ms).
    Advance(u32),
    /// The oldest lookupd query connects, reads these bytes, then EOF.
    Lookupd(Vec<u8>),
    /// `stop`.
    Stop,
}

/// Runs `ops`; panics only on a broken invariant.
pub fn consumer(max_in_flight: u8, ops: Vec<Op>) {
    let mut config = Config::new();
    config.max_in_flight = u32::from(max_in_flight);
    let t0 = Instant::now();
    let mut now = t0;
    let (Ok(topic), Ok(channel)) = (Topic::new("t"), Channel::new("c")) else {
        return;
    };
    let mut c = ConsumerState::new(topic, channel, Arc::new(config), now);
    let _ = c.connect_to_nsqlookupd("127.0.0.1:4161", now);
    let mut max = u64::from(max_in_flight);
    let mut dialled: Vec<ConnId> = Vec::new();
    // Lookupd query connections, oldest first.
    let mut queries: Vec<ConnId> = Vec::new();
    let mut pending: Vec<(ConnId, Message)> = Vec::new();
    let mut answered: HashSet<(ConnId, MessageId)> = HashSet::new();
    let mut next_id = 0u32;
    let pick = |v: &[ConnId], i: u8| v.get(usize::from(i) % v.len().max(1)).copied();
    for op in ops {
        match op {
            Op::Connect(i) => {
                let _ = c.connect_to_nsqd(&format!("127.0.0.{}:4150", i % 4), now);
            }
            Op::Accept(i) => {
                if let Some(conn) = pick(&dialled, i) {
                    c.handle_connected(conn, now);
                    let mut ok = BytesMut::new();
                    Frame::Response(Bytes::from_static(b"OK")).encode(&mut ok);
                    c.handle_input(conn, now, ok.clone());
                    c.handle_input(conn, now, ok);
                }
            }
            Op::Deliver(i, attempts) => {
                if let Some(conn) = pick(&dialled, i) {
                    next_id += 1;
                    let mut id = [b'0'; 16];
                    id[..4].copy_from_slice(&next_id.to_be_bytes());
                    let msg = Message { id: MessageId(id), timestamp: 0, attempts, body: Bytes::from_static(b"m") };
                    let mut b = BytesMut::new();
                    Frame::Message(msg).encode(&mut b);
                    c.handle_input(conn, now, b);
                }
            }
            Op::Input(i, bytes) => {
                if let Some(conn) = pick(&dialled, i) {
                    c.handle_input(conn, now, BytesMut::from(&bytes[..]));
                }
            }
            Op::Eof(i) => {
                if let Some(conn) = pick(&dialled, i) {
                    c.handle_eof(conn, now);
                }
            }
            Op::ConnectFailed(i) => {
                if let Some(conn) = pick(&dialled, i) {
                    c.handle_connect_failed(conn, std::io::Error::from(std::io::ErrorKind::ConnectionRefused), now);
                }
            }
            Op::Answer(i, kind) => {
                if !pending.is_empty() {
                    let (conn, m) = pending.swap_remove(usize::from(i) % pending.len());
                    let response = match kind % 4 {
                        0 => Response::Finish,
                        1 => Response::Requeue { delay: None, backoff: true },
                        2 => Response::Requeue { delay: Some(Duration::ZERO), backoff: false },
                        _ => Response::Touch,
                    };
                    let ok = c.respond(conn, &m.id, m.attempts, response, now).is_ok();
                    if ok && response != Response::Touch {
                        assert!(answered.insert((conn, m.id)), "answered twice");
                    }
                    if response == Response::Touch && ok {
                        pending.push((conn, m));
                    }
                }
            }
            Op::MaxInFlight(n) => {
                max = u64::from(n);
                c.change_max_in_flight(u32::from(n), now);
            }
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms % 600_000));
                c.handle_timeout(now);
            }
            Op::Lookupd(bytes) => {
                if let Some(&q) = queries.first() {
                    c.handle_connected(q, now);
                    c.handle_input(q, now, BytesMut::from(&bytes[..]));
                    c.handle_eof(q, now);
                }
            }
            Op::Stop => c.stop(now),
        }
        while let Some(action) = c.poll_action() {
            match action {
                Action::Connect { conn, addr, .. } if addr == "127.0.0.1:4161" => queries.push(conn),
                Action::Connect { conn, .. } => dialled.push(conn),
                Action::Close { conn } => {
                    pending.retain(|(p, _)| *p != conn);
                    queries.retain(|q| *q != conn);
                }
            }
        }
        while c.poll_transmit().is_some() {}
        while let Some(event) = c.poll_event() {
            if let ConsumerEvent::Message { conn, message } = event {
                pending.push((conn, message));
            }
        }
        // The test RDY of backoff is 1, which max_in_flight 0 does not allow for either.
        assert!(c.total_rdy() <= max.max(u64::from(c.in_backoff())), "RDY {} > {max}", c.total_rdy());
        assert!(c.poll_timeout().is_none_or(|t| t > t0 || now == t0));
    }
}
