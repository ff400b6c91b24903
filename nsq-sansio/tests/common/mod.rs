//! A test-side parser of client commands, the inverse of [`Command::encode`], so encoded
//! commands can be checked field by field and captured commands re-encoded.
#![allow(dead_code)]

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nsq_sansio::{Channel, Command, MessageId, Topic, MAGIC_V2};

/// A client command with owned fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owned {
    Magic,
    Identify(Vec<u8>),
    Auth(Vec<u8>),
    Sub(Topic, Channel),
    Pub(Topic, Vec<u8>),
    Mpub(Topic, Vec<Bytes>),
    Dpub(Topic, Duration, Vec<u8>),
    Rdy(u32),
    Fin(MessageId),
    Req(MessageId, Duration),
    Touch(MessageId),
    Cls,
    Nop,
}

impl Owned {
    pub(crate) fn command(&self) -> Command<'_> {
        match self {
            Self::Magic => Command::Magic,
            Self::Identify(b) => Command::Identify(b),
            Self::Auth(b) => Command::Auth(b),
            Self::Sub(t, c) => Command::Sub(t, c),
            Self::Pub(t, b) => Command::Pub(t, b),
            Self::Mpub(t, bodies) => Command::Mpub(t, bodies),
            Self::Dpub(t, d, b) => Command::Dpub(t, *d, b),
            Self::Rdy(n) => Command::Rdy(*n),
            Self::Fin(id) => Command::Fin(id),
            Self::Req(id, d) => Command::Req(id, *d),
            Self::Touch(id) => Command::Touch(id),
            Self::Cls => Command::Cls,
            Self::Nop => Command::Nop,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::new();
        self.command().encode(&mut out);
        out.to_vec()
    }
}

fn sized(wire: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let size = u32::from_be_bytes(wire.get(at..at + 4)?.try_into().ok()?) as usize;
    Some((wire.get(at + 4..at + 4 + size)?, at + 4 + size))
}

/// Parses one command off the front of `wire`: the command and the number of bytes it took.
/// `None` for anything that is not a well-formed command.
pub(crate) fn parse(wire: &[u8]) -> Option<(Owned, usize)> {
    if wire.starts_with(MAGIC_V2) {
        return Some((Owned::Magic, 4));
    }
    let nl = wire.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&wire[..nl]).ok()?;
    let mut words = line.split(' ');
    let name = words.next()?;
    let params: Vec<&str> = words.collect();
    let topic = || Topic::new(params[0]).ok();
    let id = |s: &str| -> Option<MessageId> { Some(MessageId(s.as_bytes().try_into().ok()?)) };
    let ms = |s: &str| -> Option<Duration> { Some(Duration::from_millis(s.parse().ok()?)) };
    let line_only = |cmd: Owned| Some((cmd, nl + 1));
    match (name, params.len()) {
        ("IDENTIFY", 0) => sized(wire, nl + 1).map(|(b, end)| (Owned::Identify(b.to_vec()), end)),
        ("AUTH", 0) => sized(wire, nl + 1).map(|(b, end)| (Owned::Auth(b.to_vec()), end)),
        ("SUB", 2) => line_only(Owned::Sub(topic()?, Channel::new(params[1]).ok()?)),
        ("PUB", 1) => {
            let (b, end) = sized(wire, nl + 1)?;
            Some((Owned::Pub(topic()?, b.to_vec()), end))
        }
        ("DPUB", 2) => {
            let (b, end) = sized(wire, nl + 1)?;
            Some((Owned::Dpub(topic()?, ms(params[1])?, b.to_vec()), end))
        }
        ("MPUB", 1) => {
            let (data, end) = sized(wire, nl + 1)?;
            let count = u32::from_be_bytes(data.get(..4)?.try_into().ok()?);
            let (mut bodies, mut at) = (Vec::new(), 4);
            for _ in 0..count {
                let (b, next) = sized(data, at)?;
                bodies.push(Bytes::copy_from_slice(b));
                at = next;
            }
            if at != data.len() {
                return None;
            }
            Some((Owned::Mpub(topic()?, bodies), end))
        }
        ("RDY", 1) => line_only(Owned::Rdy(params[0].parse().ok()?)),
        ("FIN", 1) => line_only(Owned::Fin(id(params[0])?)),
        ("TOUCH", 1) => line_only(Owned::Touch(id(params[0])?)),
        ("REQ", 2) => line_only(Owned::Req(id(params[0])?, ms(params[1])?)),
        ("NOP", 0) => line_only(Owned::Nop),
        ("CLS", 0) => line_only(Owned::Cls),
        _ => None,
    }
}
pub(crate) mod load;
