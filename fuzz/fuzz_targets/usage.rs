//! Fuzz target: see `kvgate::fuzzing::usage`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvgate::fuzzing::usage(data));
