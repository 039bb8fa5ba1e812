//! Every family kvgate exports, as data: name, help text, labels and (for histograms) buckets,
//! with the names, labels and buckets of the Inference Extension's endpoint picker where it has
//! the family; and the [`Registrar`] that turns a [`Family`] into a registered collector.

use prometheus::core::Collector;
use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// One metric family: its name, help text and label names.
#[derive(Debug, Clone, Copy)]
pub(super) struct Family {
    pub(super) name: &'static str,
    pub(super) help: &'static str,
    pub(super) labels: &'static [&'static str],
}

/// Registers families in one registry and hands back their collectors.
#[derive(Debug)]
pub(super) struct Registrar(pub(super) Registry);

impl Registrar {
    fn add<C: Collector + Clone + 'static>(&self, c: C) -> C {
        self.0.register(Box::new(c.clone())).expect("metric names are unique");
        c
    }

    pub(super) fn counter(&self, f: &Family) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(f.name, f.help), f.labels).expect("valid metric"))
    }

    pub(super) fn gauge(&self, f: &Family) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(f.name, f.help), f.labels).expect("valid metric"))
    }

    pub(super) fn int_gauge(&self, f: &Family) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(f.name, f.help), f.labels).expect("valid metric"))
    }

    /// A gauge without labels (`f.labels` is empty).
    pub(super) fn single_gauge(&self, f: &Family) -> IntGauge {
        self.add(IntGauge::new(f.name, f.help).expect("valid metric"))
    }

    pub(super) fn histogram(&self, f: &Family, buckets: Vec<f64>) -> HistogramVec {
        let opts = HistogramOpts::new(f.name, f.help).buckets(buckets);
        self.add(HistogramVec::new(opts, f.labels).expect("valid histogram"))
    }
}

/// The Inference Extension's labels of per-objective families.
const OBJECTIVE: &[&str] = &["model_name", "target_model_name"];
/// Per-endpoint families.
const ENDPOINT: &[&str] = &["pool", "endpoint"];

// Histograms: names, labels and buckets as the Inference Extension's endpoint picker exports them.

pub(super) const REQUEST_DURATION: Family = Family {
    name: "inference_objective_request_duration_seconds",
    help: "Inference objective response latency distribution in seconds for each model and target model.",
    labels: OBJECTIVE,
};
pub(super) const REQUEST_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0,
    45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0,
];
pub(super) const REQUEST_SIZES: Family = Family {
    name: "inference_objective_request_sizes",
    help: "Inference objective requests size distribution in bytes for each model and target model.",
    labels: OBJECTIVE,
};
/// 64 bytes to 1 GiB, by powers of two.
pub(super) fn request_size_buckets() -> Vec<f64> {
    (6..=30).map(|k| f64::from(1u32 << k)).collect()
}
pub(super) const RESPONSE_SIZES: Family = Family {
    name: "inference_objective_response_sizes",
    help: "Inference objective responses size distribution in bytes for each model and target model.",
    labels: OBJECTIVE,
};
pub(super) const RESPONSE_SIZE_BUCKETS: &[f64] =
    &[1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32778.0, 65536.0];
pub(super) const INPUT_TOKENS: Family = Family {
    name: "inference_objective_input_tokens",
    help: "Inference objective input token count distribution for requests in each model.",
    labels: OBJECTIVE,
};
pub(super) const CACHED_TOKENS: Family = Family {
    name: "inference_objective_prompt_cached_tokens",
    help: "Inference objective prompt cached token count distribution for requests in each model.",
    labels: OBJECTIVE,
};
pub(super) const OUTPUT_TOKENS: Family = Family {
    name: "inference_objective_output_tokens",
    help: "Inference objective output token count distribution for requests in each model.",
    labels: OBJECTIVE,
};
/// 1, then 8 to `2^top` by powers of two (32,778 for 2^15, as the Inference Extension has it).
pub(super) fn token_buckets(top: u32) -> Vec<f64> {
    let mut b = vec![1.0];
    b.extend((3..=top).map(|k| if k == 15 { 32778.0 } else { f64::from(1u32 << k) }));
    b
}
pub(super) const NTPOT: Family = Family {
    name: "inference_objective_normalized_time_per_output_token_seconds",
    help: "Inference objective latency divided by number of output tokens in seconds for each model and target model.",
    labels: OBJECTIVE,
};
pub(super) const NTPOT_BUCKETS: &[f64] = &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];
pub(super) const DECISION_SECONDS: Family = Family {
    name: "inference_extension_scheduler_e2e_duration_seconds",
    help: "Time from a complete request body to a decision (parse, hash, match, schedule).",
    labels: &["pool"],
};
/// The Inference Extension's buckets (from 100 µs), with finer ones below them: a decision here
/// takes microseconds.
pub(super) const DECISION_BUCKETS: &[f64] =
    &[1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1];

/// Flow control's queue wait, from arrival to dispatch (or refusal): 1 ms to 60 s and beyond.
pub(super) const FLOW_QUEUE_BUCKETS: &[f64] =
    &[0.0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

pub(super) const FLOW_QUEUE_DURATION: Family = Family {
    name: "inference_extension_flow_control_request_queue_duration_seconds",
    help: "Time requests spent in kvgate's flow-control queue, by outcome (dispatched, expired, rejected, shed).",
    labels: &["pool", "priority", "outcome"],
};

// Gauges and counters.

pub(super) const FLOW_QUEUE_SIZE: Family = Family {
    name: "inference_extension_flow_control_queue_size",
    help: "Requests waiting in kvgate's flow-control queue, by priority band and flow (64 flows by name per pool, then other).",
    labels: &["pool", "priority", "fairness_id"],
};
pub(super) const FLOW_QUEUE_BYTES: Family = Family {
    name: "inference_extension_flow_control_queue_bytes",
    help: "Request bytes waiting in kvgate's flow-control queue, by priority band and flow.",
    labels: &["pool", "priority", "fairness_id"],
};
pub(super) const FLOW_SATURATION: Family = Family {
    name: "inference_extension_flow_control_pool_saturation",
    help: "Share of the pool's endpoints in rotation that are saturated for a request of priority 0 (1 with none in rotation).",
    labels: &["pool"],
};

pub(super) const INFO: Family = Family {
    name: "inference_extension_info",
    help: "General information of the current build of the endpoint picker.",
    labels: &["commit", "build_ref"],
};
pub(super) const BUFFERED_BYTES: Family = Family {
    name: "kvgate_buffered_request_bytes",
    help: "Request body bytes held in memory now, over every request (bounded by max_buffered_bytes).",
    labels: &[],
};
pub(super) const BUFFERED_CLIENTS: Family = Family {
    name: "kvgate_buffered_request_clients",
    help: "Client addresses holding request body bytes now (each bounded by connections.max_body_share_percent).",
    labels: &[],
};
pub(super) const PICKER_PENDING: Family = Family {
    name: "kvgate_picker_decisions_pending",
    help: "Picked decisions held for their reports now.",
    labels: &[],
};
pub(super) const KV_EVENTS: Family = Family {
    name: "kvgate_kv_events_total",
    help: "KV events applied, by type.",
    labels: &["pool", "endpoint", "type"],
};
pub(super) const KV_BATCHES: Family =
    Family { name: "kvgate_kv_events_batches_total", help: "KV-event batches received.", labels: ENDPOINT };
pub(super) const KV_GAPS: Family =
    Family { name: "kvgate_kv_events_gaps_total", help: "KV-event batches found missing.", labels: ENDPOINT };
pub(super) const KV_REPLAYS: Family = Family {
    name: "kvgate_kv_events_replays_total",
    help: "Replays of lost KV-event batches, by result.",
    labels: &["pool", "endpoint", "result"],
};
pub(super) const KV_ERRORS: Family =
    Family { name: "kvgate_kv_events_errors_total", help: "KV-event messages that did not decode.", labels: ENDPOINT };
pub(super) const KV_LAG: Family = Family {
    name: "kvgate_kv_events_lag_seconds",
    help: "Arrival minus publication time of the last KV-event batch.",
    labels: ENDPOINT,
};
pub(super) const KV_PRECISE: Family = Family {
    name: "kvgate_kv_events_precise",
    help: "1 while prefix matches on the endpoint come from its KV events.",
    labels: ENDPOINT,
};
pub(super) const KV_FALLBACKS: Family = Family {
    name: "kvgate_kv_events_fallbacks_total",
    help: "Times an endpoint fell back to the approximate prefix index, by reason.",
    labels: &["pool", "endpoint", "reason"],
};
pub(super) const KV_BLOCKS: Family = Family {
    name: "kvgate_kv_events_blocks",
    help: "Blocks the precise prefix index holds for the endpoint.",
    labels: ENDPOINT,
};
pub(super) const RUNNING: Family = Family {
    name: "inference_objective_running_requests",
    help: "Inference objective number of running requests in each model.",
    labels: &["model_name"],
};
pub(super) const REQUESTS: Family = Family {
    name: "inference_objective_request_total",
    help: "Requests routed, by model.",
    labels: &["model_name", "target_model_name"],
};
pub(super) const REQUEST_ERRORS: Family = Family {
    name: "inference_objective_request_error_total",
    help: "Requests that failed, by model and error code.",
    labels: &["model_name", "target_model_name", "error_code"],
};
pub(super) const DISAGG_DECISIONS: Family = Family {
    name: "kvgate_disagg_decisions_total",
    help: "Prefill/decode decisions by kind (decode-only, prefill-decode).",
    labels: &["pool", "decision_type"],
};
pub(super) const DISAGG_FALLBACKS: Family = Family {
    name: "kvgate_disagg_fallbacks_total",
    help: "Prefill hand-offs that failed and fell back to prefill on the decode endpoint, by reason.",
    labels: &["pool", "reason"],
};
pub(super) const INDEX_CORRECTIONS: Family = Family {
    name: "kvgate_prefix_index_corrections_total",
    help: "Responses whose reported cached tokens corrected the prefix index, by direction (held_less, held_more).",
    labels: &["pool", "direction"],
};
pub(super) const RETRIES: Family = Family {
    name: "kvgate_proxy_retries_total",
    help: "Retries the proxy sent, or held back because the retry budget was spent.",
    labels: &["pool", "outcome"],
};
pub(super) const OUTCOMES: Family = Family {
    name: "kvgate_requests_total",
    help: "Requests by pool, model, decision kind and status.",
    labels: &["pool", "model", "decision", "status"],
};
pub(super) const SCRAPE_ERRORS: Family =
    Family { name: "kvgate_scrape_errors_total", help: "Failed metric scrapes.", labels: &["pool", "endpoint"] };
pub(super) const TOKENS: Family =
    Family { name: "kvgate_tokens_total", help: "Tokens in responses' usage, by kind.", labels: &["pool", "kind"] };
pub(super) const PICKER_REPORTS: Family = Family {
    name: "kvgate_picker_reports_total",
    help: "Reports to the picker API by result (accepted, unknown, ended, refused).",
    labels: &["result"],
};
pub(super) const PICKER_REFUSED: Family = Family {
    name: "kvgate_picker_refused_total",
    help: "Picker API calls refused before any work, by the limit or check that refused them.",
    labels: &["reason"],
};
pub(super) const EXTPROC_IGNORED: Family = Family {
    name: "kvgate_extproc_ignored_messages_total",
    help: "ext_proc messages ignored because their phase was over, by kind.",
    labels: &["kind"],
};
pub(super) const SERVED_UNKNOWN: Family = Family {
    name: "kvgate_served_unknown_total",
    help: "Served endpoints reported by the gateway that are not endpoints of the pool.",
    labels: &["pool"],
};
pub(super) const PICKER_EXPIRED: Family = Family {
    name: "kvgate_picker_decisions_expired_total",
    help: "Picked decisions released after the report timeout with no final report.",
    labels: &["pool"],
};
pub(super) const READY_PODS: Family =
    Family { name: "inference_pool_ready_pods", help: "Endpoints in rotation.", labels: &["name"] };
pub(super) const AVG_KV: Family = Family {
    name: "inference_pool_average_kv_cache_utilization",
    help: "Mean KV-cache usage of fresh endpoints.",
    labels: &["name"],
};
pub(super) const AVG_QUEUE: Family = Family {
    name: "inference_pool_average_queue_size",
    help: "Mean waiting requests of fresh endpoints.",
    labels: &["name"],
};
pub(super) const PER_POD_QUEUE: Family = Family {
    name: "inference_pool_per_pod_queue_size",
    help: "Waiting requests per endpoint.",
    labels: &["name", "model_server_pod"],
};
pub(super) const ENDPOINT_IN_FLIGHT: Family = Family {
    name: "kvgate_endpoint_in_flight_requests",
    help: "kvgate's requests in flight.",
    labels: &["pool", "endpoint"],
};
pub(super) const ENDPOINT_IN_FLIGHT_TOKENS: Family = Family {
    name: "kvgate_endpoint_in_flight_tokens",
    help: "kvgate's uncached prompt tokens in flight.",
    labels: &["pool", "endpoint"],
};
pub(super) const ENDPOINT_HEALTHY: Family = Family {
    name: "kvgate_endpoint_healthy",
    help: "1 when the endpoint is in rotation.",
    labels: &["pool", "endpoint"],
};
pub(super) const ENDPOINT_RUNNING: Family = Family {
    name: "kvgate_endpoint_running_requests",
    help: "Scraped running requests.",
    labels: &["pool", "endpoint"],
};
pub(super) const ENDPOINT_KV: Family =
    Family { name: "kvgate_endpoint_kv_cache_usage", help: "Scraped KV-cache usage.", labels: &["pool", "endpoint"] };
pub(super) const PREFIX_SIZE: Family = Family {
    name: "inference_extension_prefix_indexer_size",
    help: "Resident prefix-index blocks.",
    labels: &["pool"],
};

pub(super) const CLUSTER_PEERS: Family =
    Family { name: "kvgate_cluster_peers", help: "Peer replicas heard within their lease.", labels: &[] };
pub(super) const CLUSTER_SENT: Family = Family {
    name: "kvgate_cluster_deltas_sent_total",
    help: "Placements and endpoint counts sent to followers, by kind (a batch counted once, whatever its followers).",
    labels: &["kind"],
};
pub(super) const CLUSTER_APPLIED: Family = Family {
    name: "kvgate_cluster_deltas_applied_total",
    help: "Placements and endpoint counts from peers applied, by kind.",
    labels: &["kind"],
};
pub(super) const CLUSTER_LAG: Family = Family {
    name: "kvgate_cluster_sync_lag_seconds",
    help: "From a peer sending a batch to its application here (within the two hosts' clock skew).",
    labels: &[],
};
pub(super) const CLUSTER_SNAPSHOT: Family = Family {
    name: "kvgate_cluster_snapshot_duration_seconds",
    help: "Taking a peer's snapshot: from the call to its last part applied.",
    labels: &[],
};
pub(super) const CLUSTER_DROPPED: Family = Family {
    name: "kvgate_cluster_dropped_total",
    help: "What was not shared: placements and lessons past a full outbox, followers cut off for falling behind, reports whose deciding replica did not answer.",
    labels: &["reason"],
};
pub(super) const CLUSTER_LAG_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
pub(super) const CLUSTER_SNAPSHOT_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
pub(super) const CLUSTER_BYTES: Family = Family {
    name: "kvgate_cluster_sent_bytes_total",
    help: "Bytes of snapshots and batches sent to followers, over every follower (encoded messages).",
    labels: &[],
};
