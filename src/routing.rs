//! The decision core: synchronous and deterministic — no I/O, no clock, no async, no global
//! randomness (time and a seeded RNG are arguments). It is not stateless: the prefix indices,
//! in-flight counts and TTFT models it keeps are shared between requests behind short
//! `parking_lot` locks and atomics, never held across a call out. `tests/core_purity.rs` scans
//! this folder.
//!
//! A body is parsed ([`request`]), its prompt cut into chained block hashes ([`prefix`]),
//! matched against what each endpoint ([`endpoint`]) is believed to hold, and scheduled
//! ([`schedule`]); [`plan`] strings this together for one pool. [`pd`] rewrites bodies for
//! the prefill/decode hand-off.

pub mod endpoint;
pub mod kv_events;
pub mod pd;
pub mod plan;
pub mod prefix;
pub mod request;
pub mod schedule;
pub mod tokenize;
pub mod ttft;
