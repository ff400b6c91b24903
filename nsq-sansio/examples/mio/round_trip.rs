//! The application half: publish `count` messages round robin over the nsqds, each with its
//! own `ProducerState`; once nsqd acknowledged them all, find the nsqds through lookupd with a
//! `ConsumerState` and consume until `count` messages arrived; then stop everything. One
//! thread, one reactor, every state machine side by side.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nsq_sansio::{
    Channel, Config, ConsumerEvent, ConsumerState, Message, ProducerEvent, ProducerState, Response, Topic,
};

use nsq_sansio::Machine;

use crate::reactor::Reactor;

/// What to do.
pub(crate) struct RoundTrip {
    /// The lookupd to find the topic's nsqds through (`host:port` or `http://host:port`).
    pub(crate) lookupd: String,
    /// The nsqds to publish to (`host:port`), in turn.
    pub(crate) nsqds: Vec<String>,
    pub(crate) topic: String,
    pub(crate) channel: String,
    /// Messages to publish, and to consume (finish) before stopping.
    pub(crate) count: usize,
}

/// The configuration the example runs with.
pub(crate) fn config() -> Result<Config, Box<dyn Error + Send + Sync>> {
    let mut config = Config::new();
    // Room for several messages on each nsqd at once (go-nsq's default is 1).
    config.max_in_flight(32);
    // Ask lookupd again soon if it did not know the topic yet.
    config.lookupd_poll_interval(Duration::from_secs(5))?;
    Ok(config)
}

impl RoundTrip {
    /// Runs until `count` messages were published and consumed and every connection closed;
    /// `on_message` sees each message consumed. Fails on the first publish or lookupd failure.
    pub(crate) fn run(
        &self,
        config: Config,
        mut on_message: impl FnMut(&Message),
    ) -> Result<(), Box<dyn Error + Send + Sync>> {
        let topic = Topic::new(&self.topic)?;
        let config = Arc::new(config);
        let now = Instant::now();
        let mut reactor = Reactor::new()?;
        let mut consumer = ConsumerState::new(topic.clone(), Channel::new(&self.channel)?, config.clone(), now);
        let mut producers: Vec<ProducerState> =
            self.nsqds.iter().map(|addr| ProducerState::new(addr.as_str(), config.clone(), now)).collect();
        if producers.is_empty() {
            return Err("no nsqd to publish to".into());
        }
        // Queued now, sent once each producer's connection is up: publishing dials.
        let n = producers.len();
        for i in 0..self.count {
            producers[i % n].publish(&topic, format!("message {i}").into(), now)?;
        }
        let (mut acknowledged, mut consumed, mut stopping) = (0, 0, false);
        loop {
            // What the machines have to say after the last turn; answering may queue commands,
            // which the next turn writes.
            let now = Instant::now();
            for producer in &mut producers {
                while let Some(event) = producer.poll_event() {
                    match event {
                        ProducerEvent::Published { result: Ok(()), .. } => {
                            acknowledged += 1;
                            if acknowledged == self.count {
                                consumer.connect_to_nsqlookupd(&self.lookupd, now)?;
                            }
                        }
                        ProducerEvent::Published { result: Err(e), .. } => return Err(e.into()),
                        _ => {}
                    }
                }
            }
            while let Some(event) = consumer.poll_event() {
                match event {
                    ConsumerEvent::Message { conn, message } => {
                        on_message(&message);
                        match consumer.respond(conn, &message.id, message.attempts, Response::Finish, now) {
                            Ok(()) => consumed += 1,
                            // Its connection is gone (the event queued before it closed): nsqd
                            // delivers the message again.
                            Err(e) => eprintln!("message {}: {e}", message.id),
                        }
                    }
                    // A long-running consumer would log this and let the core ask again at the
                    // next poll; the example gives up. A failed nsqd is retried at the next poll.
                    ConsumerEvent::LookupdFailed { addr, error } => {
                        return Err(format!("lookupd {addr}: {error}").into())
                    }
                    ConsumerEvent::ConnectFailed { addr, error, .. } => eprintln!("nsqd {addr}: {error}"),
                    _ => {}
                }
            }
            if consumed >= self.count && !stopping {
                // Graceful: RDY 0 and CLS on every connection, unanswered publishes answered.
                stopping = true;
                consumer.stop(now);
                producers.iter_mut().for_each(|p| p.stop(now));
            }
            if consumer.is_stopped() && producers.iter().all(ProducerState::is_stopped) && reactor.is_idle() {
                return Ok(());
            }
            let mut machines: Vec<&mut dyn Machine> = vec![&mut consumer];
            machines.extend(producers.iter_mut().map(|p| p as &mut dyn Machine));
            reactor.turn(&mut machines)?;
        }
    }
}
