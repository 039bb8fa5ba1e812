//! kvgate: routes OpenAI-style requests to the vLLM endpoint that should serve them — where the
//! prompt's prefix is cached, the queue is short and the model is served.
//!
//! The decision core ([`request`], [`prefix`], [`endpoint`], [`schedule`]) is synchronous and
//! pure; [`route`] is the one decision path every front-end calls. See ARCHITECTURE.md.

pub mod admin;
pub mod bench;
pub mod cli;
pub mod config;
pub mod disagg;
pub mod endpoint;
pub mod extproc;
pub mod pool;
pub mod prefix;
pub mod proxy;
pub mod request;
pub mod route;
pub mod schedule;
pub mod serve;
pub mod sidecar;
pub mod sim;
pub mod telemetry;
