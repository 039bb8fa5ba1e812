//! kvgate: routes OpenAI-style requests to the vLLM endpoint that should serve them — where the
//! prompt's prefix is cached, the queue is short and the model is served.
//!
//! Four layers, each a folder, each importing only from the layers below it (checked by
//! `tests/layers.rs`); see ARCHITECTURE.md:
//! - [`routing`]: the decision core (synchronous, no I/O, no clock) — request parsing, prefix hashes and index, endpoints,
//!   the scheduler and its plugins, per-pool planning, P/D body rewriting;
//! - [`gateway`]: state that keeps decisions fed — config, pools (discovery, scraping,
//!   health), telemetry, and the `Gateway` facade with its outcome API;
//! - [`front`]: the front-ends that translate between the wire and the gateway — proxy,
//!   prefill hand-off, admin, Envoy ext_proc;
//! - [`tools`]: the subcommands — `serve` (and its demo), `check-config`, the P/D sidecar, the
//!   simulator, the load generator.

pub mod front;
pub mod gateway;
pub mod routing;
pub mod tools;

/// Entry points of the coverage-guided fuzz targets in `fuzz/`, one per parser of untrusted
/// bytes; built only with `--cfg fuzzing`, as `cargo fuzz` builds. Each must return, whatever
/// the bytes: a panic is a finding.
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing {
    /// A request body, parsed as each API kvgate parses (the first byte picks the size limit).
    pub fn request(data: &[u8]) {
        use crate::routing::request::{ApiKind, parse};
        let limit = if data.first().is_some_and(|b| b & 1 == 1) { 64 } else { 1 << 20 };
        for api in ApiKind::ALL {
            let _ = parse(api, data, limit);
        }
        let _ = crate::routing::request::model_of(data);
    }

    /// A response body fed to the usage reader in pieces (the first bytes pick SSE or JSON and
    /// where it is cut).
    pub fn usage(data: &[u8]) {
        crate::gateway::usage::fuzz(data);
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

    /// A KV-event batch payload: decoded, applied to a small precise index (twice: a second
    /// endpoint sees it as a continuation), and matched against keys of its own tokens.
    pub fn kv_events(data: &[u8]) {
        use crate::routing::endpoint::EndpointId;
        use crate::routing::kv_events::{KvEvent, decode_batch};
        use crate::routing::prefix::precise::{PreciseIndex, request_keys};
        let Ok(batch) = decode_batch(data) else { return };
        let index = PreciseIndex::new(64);
        for ep in [0, 1] {
            index.apply(EndpointId::new(ep), &batch, 0);
        }
        let mut out = Vec::new();
        for e in &batch.events {
            if let KvEvent::BlockStored(s) = e {
                let keys = request_keys(&s.token_ids, s.block_size, s.lora_name.as_deref(), None, 1 << 12);
                index.match_into(&[Some(EndpointId::new(0)), None, Some(EndpointId::new(1))], &keys, &mut out);
            }
        }
        let _ = index.stats();
    }

    /// A sequence of ext_proc messages (decoded from the fuzzer's bytes) on one stream.
    pub fn extproc(msgs: Vec<envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest>) {
        crate::front::extproc::fuzz(msgs);
    }
}

#[cfg(test)]
mod tests {
    /// The fuzz targets' entry points take seed inputs of every kind (so a change that breaks
    /// them shows here, not only in a fuzzing run).
    #[test]
    fn fuzz_entry_points_take_seed_inputs() {
        use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
        use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
        use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest};
        let chat = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        for seed in [&chat[..], b"", b"{", b"\xff\xfe", br#"{"model":"m","prompt":[1,2,3]}"#] {
            super::fuzzing::request(seed);
            super::fuzzing::usage(&[1, 3].iter().chain(seed).copied().collect::<Vec<u8>>());
            super::fuzzing::metrics(seed);
            super::fuzzing::config(seed);
            super::fuzzing::kv_events(seed);
        }
        // A map-encoded batch: [ts, [{type: BlockStored, block_hashes: [1], parent_block_hash: nil,
        // token_ids: [5, 6], block_size: 2}], 0].
        super::fuzzing::kv_events(
            b"\x93\xcb\x41\xd9\x00\x00\x00\x00\x00\x00\x91\x85\xa4type\xabBlockStored\xacblock_hashes\x91\x01\xb1parent_block_hash\xc0\xa9token_ids\x92\x05\x06\xaablock_size\x02\x00",
        );
        super::fuzzing::metrics(b"vllm:num_requests_running{model_name=\"m\"} 1\n");
        super::fuzzing::config(b"pools: [{name: p, models: [m], endpoints: [{address: '127.0.0.1:1'}]}]\n");
        let header =
            |k: &str, v: &str| HeaderValue { key: k.into(), raw_value: v.as_bytes().to_vec(), ..Default::default() };
        let headers = HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![header(":method", "POST"), header(":path", "/v1/chat/completions")],
            }),
            ..Default::default()
        };
        let body = HttpBody { body: chat.to_vec(), end_of_stream: true, ..Default::default() };
        let msg = |r: Request| ProcessingRequest { request: Some(r), ..Default::default() };
        super::fuzzing::extproc(vec![msg(Request::RequestHeaders(headers)), msg(Request::RequestBody(body))]);
    }
}
