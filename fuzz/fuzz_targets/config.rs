//! Fuzz target: see `kvgate::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvgate::fuzzing::config(data));
