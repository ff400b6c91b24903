//! The frame decoder, and a `ConnectionState` consuming message frames and answering with FIN,
//! allocate nothing per message in the steady state, and a frame split across two reads costs
//! allocations and bytes bounded by the frame, not by the reads. Counted with a global allocator, not by eye;
//! the count is per thread so tests running in parallel do not see each other.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Instant;

use bytes::BytesMut;
mod common;

use common::load::{frames, subscribed};
use nsq_sansio::{decode, ConnectionState, Event, Frame};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
}

fn allocs() -> usize {
    ALLOCS.with(Cell::get)
}

/// Bytes asked for by allocations and reallocations (a reallocation counts its new size).
fn bytes() -> usize {
    BYTES.with(Cell::get)
}

fn count(size: usize) {
    // `try_with`: the allocator also runs while thread-locals are being torn down.
    let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
    let _ = BYTES.try_with(|n| n.set(n.get() + size));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Feeds one buffer, FINs every message, writes (drops) the output; returns allocations made.
fn round(conn: &mut ConnectionState, now: Instant, input: BytesMut) -> usize {
    let before = allocs();
    conn.handle_input(now, input);
    while let Some(event) = conn.poll_event() {
        if let Event::Message(msg) = event {
            conn.finish(&msg.id).unwrap();
        }
    }
    while let Some(out) = conn.poll_transmit() {
        drop(out);
    }
    allocs() - before
}

/// A subscribed connection at max_in_flight 2500 that consumed and finished three rounds of
/// 2000 messages: its buffers and tables grew to their working size.
fn warmed_up(now: Instant) -> ConnectionState {
    let mut conn = subscribed(now, 2500);
    for r in 0..3 {
        round(&mut conn, now, frames(2000, r, 200));
    }
    conn
}

#[test]
fn no_allocation_per_message_when_consuming_and_finishing() {
    let now = Instant::now();
    let mut conn = warmed_up(now);
    let small = round(&mut conn, now, frames(500, 10, 200));
    let large = round(&mut conn, now, frames(2000, 11, 200));
    assert_eq!(conn.in_flight(), 0);
    assert_eq!(conn.stats().messages_finished, 3 * 2000 + 500 + 2000);
    // One allocation per read buffer (bytes shares it on the first split), none per message.
    assert!(large <= 1, "{large} allocations for 2000 messages");
    assert_eq!(small, large, "allocations grow with the message count");
}

#[test]
fn the_decoder_allocates_nothing_per_frame() {
    let mut total = 0;
    let mut decode_all = |n: usize, round: usize| {
        let built = allocs();
        let mut rx = frames(n, round, 200);
        assert!(allocs() > built, "the counter sees this thread's allocations");
        let before = allocs();
        let mut bodies = 0;
        while let Some(frame) = decode(&mut rx, 1 << 20).unwrap() {
            let Frame::Message(msg) = frame else { panic!("not a message") };
            bodies += msg.body.len();
        }
        let made = allocs() - before;
        total += bodies;
        assert!(rx.is_empty());
        made
    };
    let small = decode_all(500, 0);
    let large = decode_all(5000, 1);
    assert_eq!(total, 5500 * 200);
    // The first split_to shares the buffer (one small allocation for its shared header); the
    // frames themselves cost nothing.
    assert!(large <= 1, "{large} allocations for 5000 frames");
    assert_eq!(small, large, "allocations grow with the frame count");
}

#[test]
fn a_frame_split_across_reads_costs_what_the_frame_does() {
    let now = Instant::now();
    let mut conn = warmed_up(now);
    // Two reads in separate allocations, the first ending inside a frame's body.
    let mut split = |n: usize, r: usize| {
        let buf = frames(n, r, 200);
        let cut = buf.len() / 2 + 100;
        let (first, second) = (BytesMut::from(&buf[..cut]), BytesMut::from(&buf[cut..]));
        let before = bytes();
        let made = round(&mut conn, now, first) + round(&mut conn, now, second);
        (made, bytes() - before)
    };
    let (small, small_bytes) = split(600, 10);
    let (large, large_bytes) = split(2000, 11);
    assert_eq!(conn.in_flight(), 0);
    assert_eq!(conn.stats().messages_finished, 3 * 2000 + 600 + 2000);
    // A shared header per read buffer, and the split frame's buffer (bytes sizes it like the
    // first read's, at most 64 KiB) with its shared header. Copying the second read after the
    // partial frame would grow with that read.
    assert!(large <= 4, "{large} allocations");
    assert_eq!(small, large, "allocations grow with the read size");
    assert!(large_bytes <= 80 * 1024, "{large_bytes} bytes allocated for a 234-byte frame");
    assert_eq!(small_bytes, large_bytes, "bytes allocated grow with the read size");
}
