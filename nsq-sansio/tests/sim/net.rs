//! The network between the clients and the servers (nsqds, lookupds): one [`Link`] per TCP
//! connection. Each direction is a [`Pipe`] that delivers bytes in order, cut at random
//! boundaries, each piece after a latency; then, when its writer closes, end of file. A reset
//! cuts what is in transit short and ends both directions.

use std::collections::VecDeque;
use std::time::Duration;

use nsq_sansio::{ConnId, MAX_UNANSWERED_WRITES};

use super::nsqd::ServerConn;
use super::rng::SimRng;
use super::wire::CommandScanner;

/// A client of the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Party {
    Producer(usize),
    Consumer(usize),
}

impl std::fmt::Display for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Producer(i) => write!(f, "producer-{i}"),
            Self::Consumer(i) => write!(f, "consumer-{i}"),
        }
    }
}

/// One direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ToServer,
    ToClient,
}

/// Bytes on their way; `eof` marks the writer's close.
#[derive(Debug)]
pub struct Chunk {
    pub seq: u64,
    pub bytes: Vec<u8>,
    pub eof: bool,
}

/// One direction of a TCP connection.
#[derive(Debug, Default)]
pub struct Pipe {
    chunks: VecDeque<Chunk>,
    last_at: Duration,
    pub in_transit: usize,
    /// End of file is queued: nothing more is accepted.
    pub shut: bool,
}

impl Pipe {
    /// Queues `bytes` in random pieces; returns each piece's `(seq, arrival)` to schedule.
    pub fn send(
        &mut self,
        bytes: &[u8],
        now: Duration,
        latency: Duration,
        rng: &mut SimRng,
        seq: &mut u64,
    ) -> Vec<(u64, Duration)> {
        if self.shut || bytes.is_empty() {
            return Vec::new();
        }
        let mut cuts: Vec<usize> = Vec::new();
        if bytes.len() > 1 && rng.chance(0.5) {
            for _ in 0..rng.range(1, 3) {
                cuts.push(rng.range(1, bytes.len() as u64 - 1) as usize);
            }
            cuts.sort_unstable();
            cuts.dedup();
        }
        cuts.push(bytes.len());
        let mut start = 0;
        let mut scheduled = Vec::with_capacity(cuts.len());
        for end in cuts {
            let at = self.arrival(now, latency, rng);
            *seq += 1;
            self.chunks.push_back(Chunk { seq: *seq, bytes: bytes[start..end].to_vec(), eof: false });
            self.in_transit += end - start;
            scheduled.push((*seq, at));
            start = end;
        }
        scheduled
    }

    /// Queues end of file after what is in transit.
    pub fn shutdown(
        &mut self,
        now: Duration,
        latency: Duration,
        rng: &mut SimRng,
        seq: &mut u64,
    ) -> Option<(u64, Duration)> {
        if self.shut {
            return None;
        }
        self.shut = true;
        let at = self.arrival(now, latency, rng);
        *seq += 1;
        self.chunks.push_back(Chunk { seq: *seq, bytes: Vec::new(), eof: true });
        Some((*seq, at))
    }

    /// The piece scheduled as `seq`, if it is the next one (a reset may have dropped it).
    pub fn take(&mut self, seq: u64) -> Option<Chunk> {
        if self.chunks.front()?.seq != seq {
            return None;
        }
        let chunk = self.chunks.pop_front()?;
        self.in_transit -= chunk.bytes.len();
        Some(chunk)
    }

    /// Keeps only the first `keep` bytes in transit and drops the rest, end of file included
    /// (queue it again with [`shutdown`](Self::shutdown)). Returns how many bytes were dropped.
    pub fn cut(&mut self, keep: usize) -> usize {
        self.shut = false;
        let mut left = keep;
        let mut kept = VecDeque::new();
        while let Some(mut chunk) = self.chunks.pop_front() {
            if chunk.eof || left == 0 {
                break;
            }
            chunk.bytes.truncate(left);
            left -= chunk.bytes.len();
            kept.push_back(chunk);
        }
        let dropped = self.in_transit - (keep - left);
        self.in_transit = keep - left;
        self.chunks = kept;
        dropped
    }

    /// The arrival of one more piece: after the latency, never before the previous piece.
    fn arrival(&mut self, now: Duration, latency: Duration, rng: &mut SimRng) -> Duration {
        let jitter = rng.duration(Duration::ZERO, latency / 2);
        self.last_at = self.last_at.max(now + latency + jitter);
        self.last_at
    }
}

/// The server end of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Nsqd(usize),
    Lookupd(usize),
    /// An address nobody listens on (a lying lookupd's ghost).
    Nobody,
}

/// The lookupd query a link carries: which poll round it belongs to (a failed query's
/// successor on the next lookupd belongs to the same round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    pub id: u64,
    /// When the round's first query was made.
    pub start: Duration,
    /// 0 for the round's first query, 1 for the next lookupd after it failed, ...
    pub attempt: usize,
}

/// One client connection to an nsqd or a lookupd, from the dial to both sides' close.
#[derive(Debug)]
pub struct Link {
    pub party: Party,
    pub conn: ConnId,
    pub peer: Peer,
    /// The nsqd's index (`usize::MAX` for any other peer).
    pub nsqd: usize,
    pub addr: String,
    pub latency: Duration,
    /// The connect's timeout, as the client's action gave it.
    pub dial_timeout: Duration,
    /// The dial succeeded: the socket is connected.
    pub accepted: bool,
    /// The nsqd's connection, once accepted; with the nsqd's incarnation (a crash ends it).
    pub server: Option<(ServerConn, u64)>,
    /// The client has not closed its socket.
    pub client_open: bool,
    /// When the client closed it or saw it end.
    pub closed_at: Option<Duration>,
    /// The server has not closed its socket (nor vanished).
    pub server_open: bool,
    pub to_server: Pipe,
    pub to_client: Pipe,
    /// A fault hit this connection (refused, reset, stalled, crashed, handshake error).
    pub faulted: bool,
    /// The client reported it subscribed (consumer) or finished its handshake (producer).
    pub up: bool,
    /// When it came up.
    pub up_at: Option<Duration>,
    /// The client's commands as written, for the RDY it granted.
    pub scanner: CommandScanner,
    pub rdy: u64,
    /// Reset in the middle of the next bytes nsqd sends.
    pub reset_armed: bool,
    /// The client's last write is still under way: the driver asks for more only after it.
    pub writing: bool,
    /// A lookupd link: the request so far, and whether lookupd has answered it.
    pub request: Vec<u8>,
    pub answered: bool,
    /// A lookupd link: the response lookupd sent.
    pub response: Vec<u8>,
    /// A lookupd link: the poll round of the query.
    pub round: Option<Round>,
    /// A pool's writes of publishes on this link whose publishes are not all resolved: when
    /// each was written and how many are left.
    pub publish_writes: VecDeque<(Duration, usize)>,
    /// When the link had `MAX_UNANSWERED_WRITES` such writes, so that the client may hold
    /// publishes queued on it: from, and until (`None`: still).
    pub full: Vec<(Duration, Option<Duration>)>,
}

impl Link {
    pub fn new(
        party: Party,
        conn: ConnId,
        peer: Peer,
        addr: String,
        latency: Duration,
        dial_timeout: Duration,
    ) -> Self {
        Self {
            party,
            conn,
            peer,
            nsqd: match peer {
                Peer::Nsqd(n) => n,
                _ => usize::MAX,
            },
            addr,
            latency,
            dial_timeout,
            accepted: false,
            server: None,
            client_open: true,
            closed_at: None,
            server_open: true,
            to_server: Pipe::default(),
            to_client: Pipe::default(),
            faulted: false,
            up: false,
            up_at: None,
            scanner: CommandScanner::default(),
            rdy: 0,
            reset_armed: false,
            writing: false,
            request: Vec::new(),
            answered: false,
            response: Vec::new(),
            round: None,
            publish_writes: VecDeque::new(),
            full: Vec::new(),
        }
    }

    /// The client wrote `count` publishes of a pool in one write.
    pub fn publish_written(&mut self, now: Duration, count: usize) {
        if count > 0 {
            self.publish_writes.push_back((now, count));
            self.update_full(now);
        }
    }

    /// A publish written at `written` resolved.
    pub fn publish_resolved(&mut self, written: Duration, now: Duration) {
        if let Some(i) = self.publish_writes.iter().position(|&(at, _)| at == written) {
            self.publish_writes[i].1 -= 1;
            if self.publish_writes[i].1 == 0 {
                self.publish_writes.remove(i);
            }
            self.update_full(now);
        }
    }

    fn update_full(&mut self, now: Duration) {
        let full = self.publish_writes.len() >= MAX_UNANSWERED_WRITES;
        match self.full.last_mut() {
            Some((_, until @ None)) if !full => *until = Some(now),
            Some((_, None)) => {}
            _ if full => self.full.push((now, None)),
            _ => {}
        }
    }

    /// How long within `from..now` the link was open and full.
    pub fn full_within(&self, from: Duration, now: Duration) -> Duration {
        let end = self.closed_at.unwrap_or(now).min(now);
        self.full.iter().map(|&(start, until)| until.unwrap_or(end).min(end).saturating_sub(start.max(from))).sum()
    }

    /// Whether the link is open and full now.
    pub fn is_full(&self) -> bool {
        self.closed_at.is_none() && matches!(self.full.last(), Some((_, None)))
    }

    pub fn pipe(&mut self, dir: Dir) -> &mut Pipe {
        match dir {
            Dir::ToServer => &mut self.to_server,
            Dir::ToClient => &mut self.to_client,
        }
    }

    /// Established and not yet closed by the client: the client may write to it.
    pub fn writable(&self) -> bool {
        self.client_open && self.accepted
    }

    pub fn is_lookupd(&self) -> bool {
        matches!(self.peer, Peer::Lookupd(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_keep_order_and_cut_resets() {
        let mut rng = SimRng::new(3);
        let mut seq = 0;
        let mut pipe = Pipe::default();
        let ms = Duration::from_millis(1);
        let mut scheduled = pipe.send(b"hello world", Duration::ZERO, ms, &mut rng, &mut seq);
        scheduled.extend(pipe.send(b"!", ms, ms, &mut rng, &mut seq));
        scheduled.extend(pipe.shutdown(ms, ms, &mut rng, &mut seq));
        assert!(scheduled.windows(2).all(|w| w[0].1 <= w[1].1));
        let mut got = Vec::new();
        for (s, _) in scheduled {
            let chunk = pipe.take(s).unwrap();
            got.extend(chunk.bytes);
            if chunk.eof {
                break;
            }
        }
        assert_eq!(got, b"hello world!");
        assert!(pipe.send(b"late", ms, ms, &mut rng, &mut seq).is_empty());

        let mut pipe = Pipe::default();
        pipe.send(b"0123456789", Duration::ZERO, ms, &mut rng, &mut seq);
        assert_eq!(pipe.cut(4), 6);
        assert_eq!(pipe.in_transit, 4);
    }
}
