//! kvgate: routes OpenAI-style requests to the vLLM endpoint that should serve them — where the
//! prompt's prefix is cached, the queue is short and the model is served.
//!
//! Four layers, each a folder, each importing only from the layers below it (checked by
//! `tests/layers.rs`); see ARCHITECTURE.md:
//! - [`routing`]: the pure decision core — request parsing, prefix hashes and index, endpoints,
//!   the scheduler and its plugins, per-pool planning, P/D body rewriting;
//! - [`gateway`]: state that keeps decisions fed — config, pools (discovery, scraping,
//!   health), telemetry, and the `Gateway` facade with its outcome API;
//! - [`front`]: the front-ends that translate between the wire and the gateway — proxy,
//!   prefill hand-off, sidecar, admin, Envoy ext_proc;
//! - [`tools`]: the subcommands — `serve` (and its demo), the simulator, the load generator.

pub mod front;
pub mod gateway;
pub mod routing;
pub mod tools;
