//! go-nsq's option list walked through `Config::set`, and options reaching the wire:
//! `max_msg_size` bounding what is published and what is read, and the topology in IDENTIFY.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nsq_sansio::{
    Channel, CommandError, Config, ConfigError, ConnectionError, ConnectionState, Event, Frame, FrameError,
    IdentifyResponse, Message, MessageId, ProducerState, Topic,
};
use serde_json::Value;

/// go-nsq 1.1.0's options: name, go-nsq's default, how ours compares.
const GO_NSQ_OPTIONS: &str = include_str!("data/go-nsq-options.txt");

fn go_nsq_options() -> Vec<(&'static str, &'static str, &'static str)> {
    GO_NSQ_OPTIONS
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| match line.split_whitespace().collect::<Vec<_>>()[..] {
            [name, default, relation] => (name, if default == "\"\"" { "" } else { default }, relation),
            _ => panic!("bad line {line:?}"),
        })
        .collect()
}

/// Whether setting `name` to `value` leaves a configuration as it was.
fn unchanged_by(base: &Config, name: &str, value: &str) -> Result<bool, ConfigError> {
    let mut config = base.clone();
    config.set(name, value)?;
    Ok(format!("{config:?}") == format!("{base:?}"))
}

#[test]
fn every_go_nsq_option_is_accepted_with_go_nsqs_default_unless_documented() {
    let options = go_nsq_options();
    assert_eq!(options.len(), 40);
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/options.md")).unwrap();
    let base = Config::new();
    for (name, default, relation) in options {
        let context = format!("{name} = {default:?} ({relation})");
        match relation {
            "same" => assert!(unchanged_by(&base, name, default).unwrap(), "{context}: our default differs"),
            "host" => {
                assert!(unchanged_by(&base, name, "").unwrap(), "{context}: not empty by default");
                assert!(!unchanged_by(&base, name, "worker-1").unwrap(), "{context}: not set");
            }
            "path" => assert!(!unchanged_by(&base, name, default).unwrap(), "{context}: not set"),
            "differs" => match unchanged_by(&base, name, default) {
                Ok(unchanged) => assert!(!unchanged, "{context}: the same after all"),
                Err(e) => {
                    assert!(matches!(e, ConfigError::OutOfRange { option, .. } if option == name), "{context}: {e}")
                }
            },
            "typed" => {
                let err = base.clone().set(name, default).unwrap_err();
                assert!(matches!(err, ConfigError::InvalidValue { option, .. } if option == name), "{context}: {err}");
            }
            other => panic!("{context}: unknown relation {other}"),
        }
        // go-nsq takes dashes for underscores; so does set().
        let dashed = base.clone().set(&name.replace('_', "-"), default).map(drop);
        assert!(!matches!(dashed, Err(ConfigError::UnknownOption(_))), "{context}: {dashed:?}");
        assert!(docs.contains(&format!("| `{name}` |")), "{name} has no row in docs/options.md");
    }
}

fn drain(conn: &mut ConnectionState) -> (Vec<u8>, Vec<Event>) {
    let mut out = Vec::new();
    while let Some(b) = conn.poll_transmit() {
        out.extend_from_slice(&b);
    }
    let mut events = Vec::new();
    while let Some(e) = conn.poll_event() {
        events.push(e);
    }
    (out, events)
}

fn ok_frame() -> BytesMut {
    let mut b = BytesMut::new();
    Frame::Response(Bytes::from_static(b"OK")).encode(&mut b);
    b
}

fn msg_frame(body_len: usize) -> BytesMut {
    let mut b = BytesMut::new();
    let body = Bytes::from(vec![b'x'; body_len]);
    Frame::Message(Message { id: MessageId(*b"0123456789abcdef"), timestamp: 1, attempts: 1, body }).encode(&mut b);
    b
}

fn config(options: &[(&str, &str)]) -> Arc<Config> {
    let mut config = Config::new();
    for (name, value) in options {
        config.set(name, value).unwrap();
    }
    config.validate().unwrap();
    Arc::new(config)
}

/// A connection past IDENTIFY (plain `OK`), subscribed, with RDY 1.
fn subscribed(config: Arc<Config>, now: Instant) -> ConnectionState {
    let mut conn = ConnectionState::new(config, "127.0.0.1", now);
    let _ = drain(&mut conn);
    conn.handle_input(now, ok_frame());
    conn.subscribe(&Topic::new("t").unwrap(), &Channel::new("c").unwrap()).unwrap();
    conn.handle_input(now, ok_frame());
    conn.ready(1).unwrap();
    let (_, events) = drain(&mut conn);
    assert!(matches!(events[..], [Event::Ready(None), Event::Subscribed]), "{events:?}");
    conn
}

/// What a subscribed connection makes of one message of `body_len` bytes, given only the
/// frame's first 8 bytes and then the rest.
fn read_message(config: Arc<Config>, body_len: usize) -> Vec<Event> {
    let now = Instant::now();
    let mut conn = subscribed(config, now);
    let mut frame = msg_frame(body_len);
    let rest = frame.split_off(8);
    conn.handle_input(now, frame);
    let (_, mut events) = drain(&mut conn);
    if !conn.is_closed() {
        conn.handle_input(now, rest);
        events.extend(drain(&mut conn).1);
    }
    events
}

fn delivered(events: &[Event], body_len: usize) -> bool {
    matches!(events, [Event::Message(m)] if m.body.len() == body_len)
}

fn too_large(events: &[Event]) -> Option<(u32, u32)> {
    match events {
        [Event::Closed(ConnectionError::Frame(FrameError::TooLarge { size, max }))] => Some((*size, *max)),
        _ => None,
    }
}

#[test]
fn the_default_read_limit_is_a_message_of_nsqds_default_max_msg_size() {
    const MIB: usize = 1024 * 1024;
    assert!(delivered(&read_message(config(&[]), MIB), MIB));
    // Refused from the size prefix alone, before the body is buffered.
    assert_eq!(too_large(&read_message(config(&[]), MIB + 1)), Some((MIB as u32 + 31, MIB as u32 + 30)));
}

#[test]
fn max_msg_size_bounds_the_frames_read() {
    let small = config(&[("max_msg_size", "1000")]);
    assert!(delivered(&read_message(small.clone(), 1000), 1000));
    assert_eq!(too_large(&read_message(small, 1001)), Some((1031, 1030)));
    // Raising it reads more than the old fixed 16 MiB would have allowed.
    let big = config(&[("max_msg_size", "20000000")]);
    assert!(delivered(&read_message(big, 17 * 1024 * 1024), 17 * 1024 * 1024));
}

#[test]
fn max_frame_size_raises_the_read_limit_alone() {
    let options = config(&[("max_msg_size", "1000"), ("max_frame_size", "4096")]);
    assert!(delivered(&read_message(options.clone(), 4066), 4066));
    assert_eq!(too_large(&read_message(options.clone(), 4067)), Some((4097, 4096)));
    // What is published is still bounded by max_msg_size.
    let now = Instant::now();
    let mut conn = ConnectionState::new(options, "127.0.0.1", now);
    let err = conn.publish(&Topic::new("t").unwrap(), Bytes::from(vec![b'x'; 1001])).unwrap_err();
    assert_eq!(err, CommandError::BodyTooLarge { size: 1001, max: 1000 });
}

#[test]
fn max_msg_size_bounds_every_kind_of_publish() {
    let t = Topic::new("t").unwrap();
    let body = |n: usize| Bytes::from(vec![b'x'; n]);
    let too_large = Err(CommandError::BodyTooLarge { size: 101, max: 100 });
    let now = Instant::now();

    let mut conn = ConnectionState::new(config(&[("max_msg_size", "100")]), "127.0.0.1", now);
    let _ = drain(&mut conn);
    assert_eq!(conn.publish(&t, body(101)).map(drop), too_large);
    assert_eq!(conn.multi_publish(&t, &[body(1), body(101)]).map(drop), too_large);
    assert_eq!(conn.deferred_publish(&t, Duration::from_secs(1), body(101)).map(drop), too_large);
    assert_eq!(drain(&mut conn).0, b"", "nothing queued");
    conn.publish(&t, body(100)).unwrap();
    conn.multi_publish(&t, &[body(100), body(100)]).unwrap();
    conn.deferred_publish(&t, Duration::from_secs(1), body(100)).unwrap();

    let mut producer = ProducerState::new("127.0.0.1:4150", config(&[("max_msg_size", "100")]), now);
    assert_eq!(producer.publish(&t, body(101), now).map(drop), too_large);
    assert_eq!(producer.multi_publish(&t, vec![body(101)], now).map(drop), too_large);
    assert_eq!(producer.deferred_publish(&t, Duration::from_secs(1), body(101), now).map(drop), too_large);
    assert!(producer.poll_action().is_none(), "a refused publish does not even dial");
    producer.publish(&t, body(100), now).unwrap();

    // The default is nsqd's: 1 MiB.
    let mut conn = ConnectionState::new(config(&[]), "127.0.0.1", now);
    conn.publish(&t, body(1024 * 1024)).unwrap();
    let err = conn.publish(&t, body(1024 * 1024 + 1)).unwrap_err();
    assert_eq!(err, CommandError::BodyTooLarge { size: 1024 * 1024 + 1, max: 1024 * 1024 });
}

/// The JSON body of the IDENTIFY a new connection sends.
fn identify(config: Arc<Config>) -> Value {
    let mut conn = ConnectionState::new(config, "127.0.0.1", Instant::now());
    let (out, _) = drain(&mut conn);
    let sized = out.strip_prefix(b"  V2IDENTIFY\n").unwrap();
    let (len, body) = sized.split_at(4);
    assert_eq!(u32::from_be_bytes(len.try_into().unwrap()) as usize, body.len());
    serde_json::from_slice(body).unwrap()
}

#[test]
fn identify_carries_the_topology_when_set() {
    let json = identify(config(&[("topology_region", "eu-west"), ("topology_zone", "eu-west-1a")]));
    assert_eq!((&json["topology_region"], &json["topology_zone"]), (&"eu-west".into(), &"eu-west-1a".into()));
    let json = identify(config(&[("topology_zone", "eu-west-1a")]));
    assert_eq!(json["topology_zone"], "eu-west-1a");
    assert!(json.get("topology_region").is_none(), "{json}");
    // Unset, the keys are left out: nsqd reads a missing key as empty, as go-nsq's empty
    // strings are read.
    let json = identify(config(&[]));
    assert!(json.get("topology_region").is_none() && json.get("topology_zone").is_none(), "{json}");
    assert_eq!(json["client_id"], "", "the rest of IDENTIFY is still there");
}

#[test]
fn nsqds_own_topology_is_read_from_its_identify_answer() {
    let answer = br#"{"max_rdy_count":2500,"topology_region":"eu-west","topology_zone":"eu-west-1a"}"#;
    let parsed = IdentifyResponse::parse(answer).unwrap();
    assert_eq!((&*parsed.topology_region, &*parsed.topology_zone), ("eu-west", "eu-west-1a"));
    assert_eq!(IdentifyResponse::parse(br#"{"max_rdy_count":2500}"#).unwrap().topology_zone, "");
}
