//! Fuzz target: see `kvgate::fuzzing::request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvgate::fuzzing::request(data));
