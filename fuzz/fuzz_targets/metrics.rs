//! Fuzz target: see `kvgate::fuzzing::metrics`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvgate::fuzzing::metrics(data));
