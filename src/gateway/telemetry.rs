//! kvgate's own Prometheus metrics, with the Gateway API Inference Extension's standard names
//! where one exists (`inference_objective_*`, `inference_pool_*`, `inference_extension_*`) and
//! `kvgate_*` for the rest. Per-endpoint and per-pool gauges are refreshed when scraped.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::routing::endpoint::{EndpointStatus, Health};
use crate::routing::schedule::DecisionKind;

/// How many names of unserved models label refusals before the rest count as `other`.
pub const UNKNOWN_MODEL_LABELS: usize = 100;

/// What the metrics page shows of one pool.
#[derive(Debug)]
pub struct PoolView<'a> {
    /// Pool name.
    pub name: &'a str,
    /// Blocks resident in its prefix index.
    pub prefix_blocks: usize,
    /// Its endpoints' state.
    pub endpoints: Vec<EndpointStatus>,
}

/// Token usage a response reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached: u64,
    /// The response reported `prompt_tokens_details.cached_tokens` (vLLM does only with
    /// `--enable-prompt-tokens-details`): without it, `cached` is 0 for want of knowing.
    pub cached_reported: bool,
}

/// `kvgate_kv_events_*`, per pool and endpoint.
#[derive(Debug, Clone)]
pub struct KvEventMetrics {
    /// `kvgate_kv_events_total{pool,endpoint,type}`: events applied, by type.
    pub events: IntCounterVec,
    /// `kvgate_kv_events_batches_total{pool,endpoint}`.
    pub batches: IntCounterVec,
    /// `kvgate_kv_events_gaps_total{pool,endpoint}`: lost batches detected (a sequence gap or a
    /// publisher restart that was missed).
    pub gaps: IntCounterVec,
    /// `kvgate_kv_events_replays_total{pool,endpoint,result}` (`ok`, `failed`).
    pub replays: IntCounterVec,
    /// `kvgate_kv_events_errors_total{pool,endpoint}`: messages that were not event batches.
    pub errors: IntCounterVec,
    /// `kvgate_kv_events_lag_seconds{pool,endpoint}`: arrival time minus the batch's own
    /// timestamp, for the last batch.
    pub lag: GaugeVec,
    /// `kvgate_kv_events_precise{pool,endpoint}`: 1 while matches on the endpoint are exact.
    pub precise: IntGaugeVec,
    /// `kvgate_kv_events_fallbacks_total{pool,endpoint,reason}`: times an endpoint fell back to
    /// the approximate index (`disconnected`, `stale`, `gap`, `overflow`).
    pub fallbacks: IntCounterVec,
    /// `kvgate_kv_events_blocks{pool,endpoint}`: blocks the precise index holds.
    pub blocks: IntGaugeVec,
}

/// The registry and every family.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    /// `inference_objective_request_total{model_name,target_model_name}`.
    pub requests: IntCounterVec,
    /// `inference_objective_request_error_total{model_name,target_model_name,error_code}`.
    pub request_errors: IntCounterVec,
    /// `inference_objective_request_duration_seconds{model_name,target_model_name}`: from the
    /// decision to the response's last byte, for responses that completed.
    pub request_duration: HistogramVec,
    /// `inference_objective_request_sizes{model_name,target_model_name}`: request body bytes.
    pub request_sizes: HistogramVec,
    /// `inference_objective_response_sizes{model_name,target_model_name}`: response body bytes.
    pub response_sizes: HistogramVec,
    /// `inference_objective_input_tokens{model_name,target_model_name}`, from usage.
    pub input_tokens: HistogramVec,
    /// `inference_objective_output_tokens{model_name,target_model_name}`, from usage.
    pub output_tokens: HistogramVec,
    /// `inference_objective_prompt_cached_tokens{model_name,target_model_name}`, from usage (0
    /// when the response does not say).
    pub cached_tokens: HistogramVec,
    /// `inference_objective_normalized_time_per_output_token_seconds{model_name,target_model_name}`:
    /// duration over output tokens.
    pub ntpot: HistogramVec,
    /// `inference_objective_running_requests{model_name}`: requests routed and not yet over.
    pub running: IntGaugeVec,
    /// `kvgate_requests_total{pool,model,decision,status}`.
    pub outcomes: IntCounterVec,
    /// `inference_extension_scheduler_e2e_duration_seconds` (parse to decision).
    pub decision_seconds: HistogramVec,
    /// `kvgate_scrape_errors_total{pool,endpoint}`.
    pub scrape_errors: IntCounterVec,
    /// `kvgate_tokens_total{pool,kind}` (prompt, completion, cached), from responses' usage.
    pub tokens: IntCounterVec,
    /// `kvgate_disagg_decisions_total{pool,decision_type}` (decode-only, prefill-decode), for
    /// pools with a prefill/decode scheduler.
    pub disagg_decisions: IntCounterVec,
    /// `kvgate_proxy_retries_total{pool,outcome}`: retries the proxy sent (`sent`) or did not
    /// send because the retry budget was spent (`budget_exhausted`).
    pub retries: IntCounterVec,
    /// `kvgate_disagg_fallbacks_total{pool,reason}`: prefill hand-offs that failed, after which
    /// the decode endpoint prefilled locally.
    pub disagg_fallbacks: IntCounterVec,
    /// `kvgate_prefix_index_corrections_total{pool,direction}`: responses whose cached tokens
    /// showed the endpoint held less (`held_less`) or more (`held_more`) than the index believed.
    pub index_corrections: IntCounterVec,
    /// `kvgate_buffered_request_bytes`: request body bytes held in memory now.
    pub buffered_bytes: prometheus::IntGauge,
    /// `kvgate_picker_reports_total{result}`: reports by decision id (`accepted`, `unknown`,
    /// `ended`, `refused`).
    pub picker_reports: IntCounterVec,
    /// `kvgate_picker_decisions_expired_total{pool}`: decisions released with no final report.
    pub picker_expired: IntCounterVec,
    /// `kvgate_picker_decisions_pending`: decisions held for their reports now.
    pub picker_pending: prometheus::IntGauge,
    /// `kvgate_extproc_ignored_messages_total{kind}`: ext_proc messages that came after their
    /// phase was over and were ignored (`request_body_after_end`: a body chunk after the one
    /// marked end of stream, as Envoy repeats for large full-duplex bodies).
    pub extproc_ignored: IntCounterVec,
    /// `kvgate_served_unknown_total{pool}`: served endpoints the gateway reported that are not
    /// endpoints of the request's pool (ignored; the first is logged).
    pub served_unknown: IntCounterVec,
    /// The KV-event feeds' families.
    pub kv_events: KvEventMetrics,
    /// Model names of refused requests that no pool serves, kept as label values (bounded).
    unknown_models: parking_lot::Mutex<std::collections::HashSet<String>>,
    ready_pods: IntGaugeVec,
    avg_kv: GaugeVec,
    avg_queue: GaugeVec,
    per_pod_queue: GaugeVec,
    endpoint_in_flight: IntGaugeVec,
    endpoint_in_flight_tokens: IntGaugeVec,
    endpoint_healthy: IntGaugeVec,
    endpoint_running: GaugeVec,
    endpoint_kv: GaugeVec,
    prefix_size: IntGaugeVec,
}

impl Telemetry {
    /// Registers every family.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c).expect("metric names are unique");
        macro_rules! family {
            ($t:ty, $name:expr, $help:expr, $labels:expr) => {{
                let f = <$t>::new(Opts::new($name, $help), $labels).expect("valid metric");
                reg(Box::new(f.clone()));
                f
            }};
        }
        let objective = ["model_name", "target_model_name"];
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &objective)
                .expect("valid histogram");
            reg(Box::new(h.clone()));
            h
        };
        // Names, labels and buckets as the Inference Extension's endpoint picker exports them.
        let request_duration = histogram(
            "inference_objective_request_duration_seconds",
            "Inference objective response latency distribution in seconds for each model and target model.",
            vec![
                0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0,
                20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0,
                3600.0,
            ],
        );
        let request_sizes = histogram(
            "inference_objective_request_sizes",
            "Inference objective requests size distribution in bytes for each model and target model.",
            (6..=30).map(|k| f64::from(1u32 << k)).collect(),
        );
        let response_sizes = histogram(
            "inference_objective_response_sizes",
            "Inference objective responses size distribution in bytes for each model and target model.",
            vec![
                1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32778.0,
                65536.0,
            ],
        );
        let token_buckets = |top: u32| {
            let mut b = vec![1.0];
            b.extend((3..=top).map(|k| if k == 15 { 32778.0 } else { f64::from(1u32 << k) }));
            b
        };
        let input_tokens = histogram(
            "inference_objective_input_tokens",
            "Inference objective input token count distribution for requests in each model.",
            token_buckets(20),
        );
        let cached_tokens = histogram(
            "inference_objective_prompt_cached_tokens",
            "Inference objective prompt cached token count distribution for requests in each model.",
            token_buckets(20),
        );
        let output_tokens = histogram(
            "inference_objective_output_tokens",
            "Inference objective output token count distribution for requests in each model.",
            token_buckets(13),
        );
        let ntpot = histogram(
            "inference_objective_normalized_time_per_output_token_seconds",
            "Inference objective latency divided by number of output tokens in seconds for each model and target model.",
            vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0],
        );
        let info = IntGaugeVec::new(
            Opts::new("inference_extension_info", "General information of the current build of the endpoint picker."),
            &["commit", "build_ref"],
        )
        .expect("valid metric");
        reg(Box::new(info.clone()));
        info.with_label_values(&[
            option_env!("KVGATE_COMMIT").unwrap_or("unknown"),
            concat!("kvgate-", env!("CARGO_PKG_VERSION")),
        ])
        .set(1);
        let decision_seconds = HistogramVec::new(
            HistogramOpts::new(
                "inference_extension_scheduler_e2e_duration_seconds",
                "Time from a complete request body to a decision (parse, hash, match, schedule).",
            )
            .buckets(vec![
                // The Inference Extension's buckets (from 100 µs), with finer ones below them: a
                // decision here takes microseconds.
                1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
            ]),
            &["pool"],
        )
        .expect("valid histogram");
        reg(Box::new(decision_seconds.clone()));
        let ep = &["pool", "endpoint"];
        let kv_events = KvEventMetrics {
            events: family!(
                IntCounterVec,
                "kvgate_kv_events_total",
                "KV events applied, by type.",
                &["pool", "endpoint", "type"]
            ),
            batches: family!(IntCounterVec, "kvgate_kv_events_batches_total", "KV-event batches received.", ep),
            gaps: family!(IntCounterVec, "kvgate_kv_events_gaps_total", "KV-event batches found missing.", ep),
            replays: family!(
                IntCounterVec,
                "kvgate_kv_events_replays_total",
                "Replays of lost KV-event batches, by result.",
                &["pool", "endpoint", "result"]
            ),
            errors: family!(
                IntCounterVec,
                "kvgate_kv_events_errors_total",
                "KV-event messages that did not decode.",
                ep
            ),
            lag: family!(
                GaugeVec,
                "kvgate_kv_events_lag_seconds",
                "Arrival minus publication time of the last KV-event batch.",
                ep
            ),
            precise: family!(
                IntGaugeVec,
                "kvgate_kv_events_precise",
                "1 while prefix matches on the endpoint come from its KV events.",
                ep
            ),
            fallbacks: family!(
                IntCounterVec,
                "kvgate_kv_events_fallbacks_total",
                "Times an endpoint fell back to the approximate prefix index, by reason.",
                &["pool", "endpoint", "reason"]
            ),
            blocks: family!(
                IntGaugeVec,
                "kvgate_kv_events_blocks",
                "Blocks the precise prefix index holds for the endpoint.",
                ep
            ),
        };
        Self {
            unknown_models: parking_lot::Mutex::default(),
            kv_events,
            request_duration,
            request_sizes,
            response_sizes,
            input_tokens,
            output_tokens,
            cached_tokens,
            ntpot,
            running: family!(
                IntGaugeVec,
                "inference_objective_running_requests",
                "Inference objective number of running requests in each model.",
                &["model_name"]
            ),
            requests: family!(
                IntCounterVec,
                "inference_objective_request_total",
                "Requests routed, by model.",
                &["model_name", "target_model_name"]
            ),
            request_errors: family!(
                IntCounterVec,
                "inference_objective_request_error_total",
                "Requests that failed, by model and error code.",
                &["model_name", "target_model_name", "error_code"]
            ),
            disagg_decisions: family!(
                IntCounterVec,
                "kvgate_disagg_decisions_total",
                "Prefill/decode decisions by kind (decode-only, prefill-decode).",
                &["pool", "decision_type"]
            ),
            disagg_fallbacks: family!(
                IntCounterVec,
                "kvgate_disagg_fallbacks_total",
                "Prefill hand-offs that failed and fell back to prefill on the decode endpoint, by reason.",
                &["pool", "reason"]
            ),
            index_corrections: family!(
                IntCounterVec,
                "kvgate_prefix_index_corrections_total",
                "Responses whose reported cached tokens corrected the prefix index, by direction (held_less, held_more).",
                &["pool", "direction"]
            ),
            retries: family!(
                IntCounterVec,
                "kvgate_proxy_retries_total",
                "Retries the proxy sent, or held back because the retry budget was spent.",
                &["pool", "outcome"]
            ),
            outcomes: family!(
                IntCounterVec,
                "kvgate_requests_total",
                "Requests by pool, model, decision kind and status.",
                &["pool", "model", "decision", "status"]
            ),
            decision_seconds,
            scrape_errors: family!(
                IntCounterVec,
                "kvgate_scrape_errors_total",
                "Failed metric scrapes.",
                &["pool", "endpoint"]
            ),
            tokens: family!(
                IntCounterVec,
                "kvgate_tokens_total",
                "Tokens in responses' usage, by kind.",
                &["pool", "kind"]
            ),
            buffered_bytes: {
                let g = prometheus::IntGauge::new(
                    "kvgate_buffered_request_bytes",
                    "Request body bytes held in memory now, over every request (bounded by max_buffered_bytes).",
                )
                .expect("valid metric");
                reg(Box::new(g.clone()));
                g
            },
            picker_reports: family!(
                IntCounterVec,
                "kvgate_picker_reports_total",
                "Reports to the picker API by result (accepted, unknown, ended, refused).",
                &["result"]
            ),
            extproc_ignored: family!(
                IntCounterVec,
                "kvgate_extproc_ignored_messages_total",
                "ext_proc messages ignored because their phase was over, by kind.",
                &["kind"]
            ),
            served_unknown: family!(
                IntCounterVec,
                "kvgate_served_unknown_total",
                "Served endpoints reported by the gateway that are not endpoints of the pool.",
                &["pool"]
            ),
            picker_expired: family!(
                IntCounterVec,
                "kvgate_picker_decisions_expired_total",
                "Picked decisions released after the report timeout with no final report.",
                &["pool"]
            ),
            picker_pending: {
                let g = prometheus::IntGauge::new(
                    "kvgate_picker_decisions_pending",
                    "Picked decisions held for their reports now.",
                )
                .expect("valid metric");
                reg(Box::new(g.clone()));
                g
            },
            ready_pods: family!(IntGaugeVec, "inference_pool_ready_pods", "Endpoints in rotation.", &["name"]),
            avg_kv: family!(
                GaugeVec,
                "inference_pool_average_kv_cache_utilization",
                "Mean KV-cache usage of fresh endpoints.",
                &["name"]
            ),
            avg_queue: family!(
                GaugeVec,
                "inference_pool_average_queue_size",
                "Mean waiting requests of fresh endpoints.",
                &["name"]
            ),
            per_pod_queue: family!(
                GaugeVec,
                "inference_pool_per_pod_queue_size",
                "Waiting requests per endpoint.",
                &["name", "model_server_pod"]
            ),
            endpoint_in_flight: family!(
                IntGaugeVec,
                "kvgate_endpoint_in_flight_requests",
                "kvgate's requests in flight.",
                &["pool", "endpoint"]
            ),
            endpoint_in_flight_tokens: family!(
                IntGaugeVec,
                "kvgate_endpoint_in_flight_tokens",
                "kvgate's uncached prompt tokens in flight.",
                &["pool", "endpoint"]
            ),
            endpoint_healthy: family!(
                IntGaugeVec,
                "kvgate_endpoint_healthy",
                "1 when the endpoint is in rotation.",
                &["pool", "endpoint"]
            ),
            endpoint_running: family!(
                GaugeVec,
                "kvgate_endpoint_running_requests",
                "Scraped running requests.",
                &["pool", "endpoint"]
            ),
            endpoint_kv: family!(
                GaugeVec,
                "kvgate_endpoint_kv_cache_usage",
                "Scraped KV-cache usage.",
                &["pool", "endpoint"]
            ),
            prefix_size: family!(
                IntGaugeVec,
                "inference_extension_prefix_indexer_size",
                "Resident prefix-index blocks.",
                &["pool"]
            ),
            registry,
        }
    }

    /// The `model_name` label of a request for `model`, which no pool serves: the name itself
    /// for the first [`UNKNOWN_MODEL_LABELS`] such names, `other` beyond (clients choose these
    /// names; the label values must stay bounded).
    pub fn unknown_model_label<'a>(&self, model: &'a str) -> &'a str {
        let mut seen = self.unknown_models.lock();
        if seen.contains(model) {
            return model;
        }
        if seen.len() < UNKNOWN_MODEL_LABELS {
            seen.insert(model.to_owned());
            return model;
        }
        "other"
    }

    /// Counts a routed request in `inference_objective_request_total`, when it is decided (as
    /// the reference picker does: a request that never completes is counted all the same).
    pub fn count_routed(&self, model: &str) {
        self.requests.with_label_values(&[model, model]).inc();
    }

    /// Counts a finished (or refused) request: `status` is the HTTP status the client got. A
    /// refusal (`decision` is `None`) is counted in `inference_objective_request_total` here; a
    /// routed request was counted there when it was decided.
    pub fn count_request(&self, pool: &str, model: &str, decision: Option<DecisionKind>, status: u16, code: &str) {
        let kind = decision.map_or("none", DecisionKind::as_str);
        if decision.is_none() {
            self.requests.with_label_values(&[model, model]).inc();
        }
        self.outcomes.with_label_values(&[pool, model, kind, &status.to_string()]).inc();
        if status >= 400 {
            self.request_errors.with_label_values(&[model, model, code]).inc();
        }
    }

    /// Observes a completed response of `model`: its duration, size and usage.
    pub fn observe_response(&self, model: &str, seconds: f64, bytes: u64, usage: Option<Usage>) {
        let l = [model, model];
        self.request_duration.with_label_values(&l).observe(seconds);
        self.response_sizes.with_label_values(&l).observe(bytes as f64);
        if let Some(u) = usage {
            if u.prompt > 0 {
                self.input_tokens.with_label_values(&l).observe(u.prompt as f64);
            }
            if u.completion > 0 {
                self.output_tokens.with_label_values(&l).observe(u.completion as f64);
            }
            self.cached_tokens.with_label_values(&l).observe(u.cached as f64);
            if u.completion > 0 {
                self.ntpot.with_label_values(&l).observe(seconds / u.completion as f64);
            }
        }
    }

    /// Counts the usage a response reported.
    pub fn count_tokens(&self, pool: &str, usage: Usage) {
        self.tokens.with_label_values(&[pool, "prompt"]).inc_by(usage.prompt);
        self.tokens.with_label_values(&[pool, "completion"]).inc_by(usage.completion);
        self.tokens.with_label_values(&[pool, "cached"]).inc_by(usage.cached);
    }

    /// The exposition, with pool and endpoint gauges refreshed from `pools`.
    pub fn render(&self, pools: &[PoolView<'_>]) -> String {
        for g in [&self.per_pod_queue, &self.endpoint_running, &self.endpoint_kv] {
            g.reset();
        }
        for g in [&self.endpoint_in_flight, &self.endpoint_in_flight_tokens, &self.endpoint_healthy] {
            g.reset();
        }
        for pool in pools {
            let name = pool.name;
            let status = &pool.endpoints;
            let fresh: Vec<_> = status.iter().filter(|e| !e.stale).collect();
            self.ready_pods
                .with_label_values(&[name])
                .set(status.iter().filter(|e| e.health == Health::Healthy).count() as i64);
            let mean = |f: &dyn Fn(&&EndpointStatus) -> f64| {
                if fresh.is_empty() { 0.0 } else { fresh.iter().map(f).sum::<f64>() / fresh.len() as f64 }
            };
            self.avg_kv.with_label_values(&[name]).set(mean(&|e| e.kv_cache_usage.unwrap_or(0.0)));
            self.avg_queue.with_label_values(&[name]).set(mean(&|e| f64::from(e.waiting.unwrap_or(0))));
            self.prefix_size.with_label_values(&[name]).set(pool.prefix_blocks as i64);
            for e in status {
                let l = [name, e.address.as_str()];
                self.endpoint_in_flight.with_label_values(&l).set(e.in_flight_requests as i64);
                self.endpoint_in_flight_tokens.with_label_values(&l).set(e.in_flight_tokens as i64);
                self.endpoint_healthy.with_label_values(&l).set(i64::from(e.healthy));
                if let (Some(w), Some(r), Some(kv)) = (e.waiting, e.running, e.kv_cache_usage) {
                    self.per_pod_queue.with_label_values(&l).set(f64::from(w));
                    self.endpoint_running.with_label_values(&l).set(f64::from(r));
                    self.endpoint_kv.with_label_values(&l).set(kv);
                }
            }
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}
