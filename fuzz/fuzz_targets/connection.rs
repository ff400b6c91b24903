#![no_main]
use nsq_sansio::fuzzing::connection::{connection, Input};

libfuzzer_sys::fuzz_target!(|input: Input| connection(input));
