#![no_main]
use nsq_sansio::fuzzing::consumer::{consumer, Op};

libfuzzer_sys::fuzz_target!(|input: (u8, Vec<Op>)| consumer(input.0, input.1));
