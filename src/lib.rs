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

/// Entry points of the coverage-guided fuzz targets in `fuzz/`, one per parser of untrusted
/// bytes; built only with `--cfg fuzzing`, as `cargo fuzz` builds. Each must return, whatever
/// the bytes: a panic is a finding.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    /// A request body, parsed as each API kvgate parses (the first byte picks the size limit).
    pub fn request(data: &[u8]) {
        use crate::routing::request::{ApiKind, parse};
        let limit = if data.first().is_some_and(|b| b & 1 == 1) { 64 } else { 1 << 20 };
        for api in [ApiKind::Completions, ApiKind::ChatCompletions, ApiKind::Responses, ApiKind::Embeddings] {
            let _ = parse(api, data, limit);
        }
        let _ = crate::routing::request::model_of(data);
    }

    /// A response body fed to the usage reader in pieces (the first bytes pick SSE or JSON and
    /// where it is cut).
    pub fn usage(data: &[u8]) {
        crate::front::usage::fuzz(data);
    }

    /// A `/metrics` exposition.
    pub fn metrics(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = crate::gateway::pool::scrape_parse::parse(text);
        }
    }

    /// A config file: parsed, then checked and compiled as `check-config` does.
    pub fn config(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else { return };
        let path = std::path::Path::new("/nonexistent/fuzz.yaml");
        if let Ok(cfg) = crate::gateway::config::Config::from_yaml(text, path) {
            let _ = cfg.resolve(path);
        }
    }

    /// A sequence of ext_proc messages (decoded from the fuzzer's bytes) on one stream.
    pub fn extproc(msgs: Vec<envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest>) {
        crate::front::extproc::fuzz(msgs);
    }
}
