//! kvgate's own Prometheus metrics, with the Gateway API Inference Extension's standard names
//! where one exists (`inference_objective_*`, `inference_pool_*`, `inference_extension_*`) and
//! `kvgate_*` for the rest. Per-endpoint and per-pool gauges are refreshed when scraped.

use prometheus::{Encoder, GaugeVec, HistogramVec, IntCounterVec, IntGaugeVec, Registry, TextEncoder};

mod families;

use families::*;

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
    /// `kvgate_buffered_request_clients`: client addresses holding request body bytes now.
    pub buffered_clients: prometheus::IntGauge,
    /// `kvgate_picker_reports_total{result}`: reports by decision id (`accepted`, `unknown`,
    /// `ended`, `refused`).
    pub picker_reports: IntCounterVec,
    /// `kvgate_picker_refused_total{reason}`: picker API calls refused by a check or a limit
    /// (`unauthenticated`, `max_pending`, `max_pending_per_client`, `admission_share`,
    /// `max_watches`, `max_watches_per_client`).
    pub picker_refused: IntCounterVec,
    /// `kvgate_picker_decisions_expired_total{pool}`: decisions released with no final report.
    pub picker_expired: IntCounterVec,
    /// `kvgate_picker_decisions_pending`: decisions held for their reports now.
    pub picker_pending: prometheus::IntGauge,
    /// `kvgate_cluster_peers`: peers heard within their lease.
    pub cluster_peers: prometheus::IntGauge,
    /// `kvgate_cluster_deltas_sent_total{kind}`.
    pub cluster_sent: IntCounterVec,
    /// `kvgate_cluster_deltas_applied_total{kind}`.
    pub cluster_applied: IntCounterVec,
    /// `kvgate_cluster_sync_lag_seconds`.
    pub cluster_lag: prometheus::Histogram,
    /// `kvgate_cluster_snapshot_duration_seconds`.
    pub cluster_snapshot: prometheus::Histogram,
    /// `kvgate_cluster_dropped_total{reason}`.
    pub cluster_dropped: IntCounterVec,
    /// `kvgate_cluster_sent_bytes_total`: bytes of snapshots and batches sent to followers.
    pub cluster_bytes: prometheus::IntCounter,
    /// `kvgate_extproc_ignored_messages_total{kind}`: ext_proc messages that came after their
    /// phase was over and were ignored (`request_body_after_end`: a body chunk after the one
    /// marked end of stream, as Envoy repeats for large full-duplex bodies).
    pub extproc_ignored: IntCounterVec,
    /// `kvgate_served_unknown_total{pool}`: served endpoints the gateway reported that are not
    /// endpoints of the request's pool (ignored; the first is logged).
    pub served_unknown: IntCounterVec,
    /// `inference_extension_flow_control_request_queue_duration_seconds{pool,priority,outcome}`.
    pub flow_queue_duration: HistogramVec,
    /// `inference_extension_flow_control_queue_size{pool,priority,fairness_id}`.
    pub flow_queue_size: IntGaugeVec,
    /// `inference_extension_flow_control_queue_bytes{pool,priority,fairness_id}`.
    pub flow_queue_bytes: IntGaugeVec,
    /// `inference_extension_flow_control_pool_saturation{pool}`, set as the page is rendered.
    pub flow_saturation: GaugeVec,
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
    /// Registers every family (the table is in [`families`]).
    pub fn new() -> Self {
        let r = Registrar(Registry::new());
        let info = r.int_gauge(&INFO);
        info.with_label_values(&[
            option_env!("KVGATE_COMMIT").unwrap_or("unknown"),
            concat!("kvgate-", env!("CARGO_PKG_VERSION")),
        ])
        .set(1);
        Self {
            unknown_models: parking_lot::Mutex::default(),
            kv_events: KvEventMetrics {
                events: r.counter(&KV_EVENTS),
                batches: r.counter(&KV_BATCHES),
                gaps: r.counter(&KV_GAPS),
                replays: r.counter(&KV_REPLAYS),
                errors: r.counter(&KV_ERRORS),
                lag: r.gauge(&KV_LAG),
                precise: r.int_gauge(&KV_PRECISE),
                fallbacks: r.counter(&KV_FALLBACKS),
                blocks: r.int_gauge(&KV_BLOCKS),
            },
            request_duration: r.histogram(&REQUEST_DURATION, REQUEST_DURATION_BUCKETS.to_vec()),
            request_sizes: r.histogram(&REQUEST_SIZES, request_size_buckets()),
            response_sizes: r.histogram(&RESPONSE_SIZES, RESPONSE_SIZE_BUCKETS.to_vec()),
            input_tokens: r.histogram(&INPUT_TOKENS, token_buckets(20)),
            cached_tokens: r.histogram(&CACHED_TOKENS, token_buckets(20)),
            output_tokens: r.histogram(&OUTPUT_TOKENS, token_buckets(13)),
            ntpot: r.histogram(&NTPOT, NTPOT_BUCKETS.to_vec()),
            decision_seconds: r.histogram(&DECISION_SECONDS, DECISION_BUCKETS.to_vec()),
            flow_queue_duration: r.histogram(&FLOW_QUEUE_DURATION, FLOW_QUEUE_BUCKETS.to_vec()),
            flow_queue_size: r.int_gauge(&FLOW_QUEUE_SIZE),
            flow_queue_bytes: r.int_gauge(&FLOW_QUEUE_BYTES),
            flow_saturation: r.gauge(&FLOW_SATURATION),
            buffered_bytes: r.single_gauge(&BUFFERED_BYTES),
            buffered_clients: r.single_gauge(&BUFFERED_CLIENTS),
            picker_pending: r.single_gauge(&PICKER_PENDING),
            cluster_peers: r.single_gauge(&CLUSTER_PEERS),
            cluster_sent: r.counter(&CLUSTER_SENT),
            cluster_applied: r.counter(&CLUSTER_APPLIED),
            cluster_lag: r.histogram(&CLUSTER_LAG, CLUSTER_LAG_BUCKETS.to_vec()).with_label_values(&[] as &[&str]),
            cluster_snapshot: r
                .histogram(&CLUSTER_SNAPSHOT, CLUSTER_SNAPSHOT_BUCKETS.to_vec())
                .with_label_values(&[] as &[&str]),
            cluster_dropped: r.counter(&CLUSTER_DROPPED),
            cluster_bytes: r.counter(&CLUSTER_BYTES).with_label_values(&[] as &[&str]),
            running: r.int_gauge(&RUNNING),
            requests: r.counter(&REQUESTS),
            request_errors: r.counter(&REQUEST_ERRORS),
            disagg_decisions: r.counter(&DISAGG_DECISIONS),
            disagg_fallbacks: r.counter(&DISAGG_FALLBACKS),
            index_corrections: r.counter(&INDEX_CORRECTIONS),
            retries: r.counter(&RETRIES),
            outcomes: r.counter(&OUTCOMES),
            scrape_errors: r.counter(&SCRAPE_ERRORS),
            tokens: r.counter(&TOKENS),
            picker_reports: r.counter(&PICKER_REPORTS),
            picker_refused: r.counter(&PICKER_REFUSED),
            extproc_ignored: r.counter(&EXTPROC_IGNORED),
            served_unknown: r.counter(&SERVED_UNKNOWN),
            picker_expired: r.counter(&PICKER_EXPIRED),
            ready_pods: r.int_gauge(&READY_PODS),
            avg_kv: r.gauge(&AVG_KV),
            avg_queue: r.gauge(&AVG_QUEUE),
            per_pod_queue: r.gauge(&PER_POD_QUEUE),
            endpoint_in_flight: r.int_gauge(&ENDPOINT_IN_FLIGHT),
            endpoint_in_flight_tokens: r.int_gauge(&ENDPOINT_IN_FLIGHT_TOKENS),
            endpoint_healthy: r.int_gauge(&ENDPOINT_HEALTHY),
            endpoint_running: r.gauge(&ENDPOINT_RUNNING),
            endpoint_kv: r.gauge(&ENDPOINT_KV),
            prefix_size: r.int_gauge(&PREFIX_SIZE),
            registry: r.0,
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
