#![no_main]
use nsq_sansio::fuzzing::deflate::{frames, Input};

libfuzzer_sys::fuzz_target!(|input: Input| frames(input));
