#![no_main]
use nsq_sansio::fuzzing::snappy::{snappy, Input};

libfuzzer_sys::fuzz_target!(|input: Input| snappy(input));
