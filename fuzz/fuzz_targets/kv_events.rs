//! Fuzz target: see `kvgate::fuzzing::kv_events`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvgate::fuzzing::kv_events(data));
