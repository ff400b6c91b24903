#![no_main]
use nsq_sansio::fuzzing::consumer::{consumer, Input};

libfuzzer_sys::fuzz_target!(|input: Input| consumer(input));
