#![no_main]
use nsq_sansio::fuzzing::connection::{connection, Negotiated, Op};

libfuzzer_sys::fuzz_target!(|input: (Negotiated, Vec<Op>)| connection(input.0, input.1));
