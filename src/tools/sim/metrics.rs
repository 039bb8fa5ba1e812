//! The simulator's Prometheus metrics, with vLLM's names, types, labels and buckets.
//!
//! Per-engine families carry `model_name` (the first served name) and `engine` (the DP rank as a
//! string). Counters are named with their `_total` suffix as vLLM's exposition shows them.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];

/// Every metric family one simulator port serves.
#[derive(Debug, Clone)]
pub(crate) struct SimMetrics {
    registry: Registry,
    /// `vllm:num_requests_running`.
    pub running: IntGaugeVec,
    /// `vllm:num_requests_waiting`.
    pub waiting: IntGaugeVec,
    /// `vllm:kv_cache_usage_perc`.
    pub kv_usage: GaugeVec,
    /// `vllm:prefix_cache_queries_total` (tokens).
    pub prefix_queries: IntCounterVec,
    /// `vllm:prefix_cache_hits_total` (tokens).
    pub prefix_hits: IntCounterVec,
    /// `vllm:prompt_tokens_total`.
    pub prompt_tokens: IntCounterVec,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: IntCounterVec,
    /// `vllm:num_preemptions_total`.
    pub preemptions: IntCounterVec,
    /// `vllm:request_success_total{finished_reason}`.
    pub request_success: IntCounterVec,
    /// `vllm:time_to_first_token_seconds`.
    pub ttft: HistogramVec,
    /// `vllm:inter_token_latency_seconds`.
    pub itl: HistogramVec,
    /// `vllm:e2e_request_latency_seconds`.
    pub e2e: HistogramVec,
    /// `vllm:request_queue_time_seconds`.
    pub queue_time: HistogramVec,
    /// `vllm:cache_config_info`.
    pub cache_config: GaugeVec,
    /// `vllm:lora_requests_info` (value: unix time of the last change).
    pub lora_info: GaugeVec,
    /// `kvgate_sim_kv_handoffs_total{engine,model_name,leg}` (simulator only): finished P/D legs,
    /// `prefill` (KV kept for a decode endpoint) or `decode` (KV loaded from a prefill endpoint).
    pub handoffs: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl SimMetrics {
    /// Registers every family in a fresh registry.
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let l = &["engine", "model_name"];
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("metric names are valid and unique");
        };
        let gauge = |n: &str, h: &str| {
            let g = IntGaugeVec::new(opts(n, h), l).expect("valid gauge");
            reg(Box::new(g.clone()));
            g
        };
        let counter = |n: &str, h: &str, labels: &[&str]| {
            let c = IntCounterVec::new(opts(n, h), labels).expect("valid counter");
            reg(Box::new(c.clone()));
            c
        };
        let histogram = |n: &str, h: &str, buckets: &[f64]| {
            let v = HistogramVec::new(HistogramOpts::new(n, h).buckets(buckets.to_vec()), l).expect("valid histogram");
            reg(Box::new(v.clone()));
            v
        };
        let kv_usage = GaugeVec::new(opts("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."), l)
            .expect("valid gauge");
        reg(Box::new(kv_usage.clone()));
        let cache_config = GaugeVec::new(
            opts("vllm:cache_config_info", "Information of the LLMEngine CacheConfig"),
            &[
                "block_size",
                "cache_dtype",
                "enable_prefix_caching",
                "engine",
                "gpu_memory_utilization",
                "num_cpu_blocks",
                "num_gpu_blocks",
                "prefix_caching_hash_algo",
            ],
        )
        .expect("valid gauge");
        reg(Box::new(cache_config.clone()));
        let lora_info = GaugeVec::new(
            opts("vllm:lora_requests_info", "Running stats on lora requests."),
            &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        .expect("valid gauge");
        reg(Box::new(lora_info.clone()));
        Self {
            running: gauge("vllm:num_requests_running", "Number of requests in model execution batches."),
            waiting: gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
            kv_usage,
            prefix_queries: counter(
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                l,
            ),
            prefix_hits: counter(
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                l,
            ),
            prompt_tokens: counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", l),
            generation_tokens: counter("vllm:generation_tokens_total", "Number of generation tokens processed.", l),
            preemptions: counter("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", l),
            request_success: counter(
                "vllm:request_success_total",
                "Count of successfully processed requests.",
                &["engine", "finished_reason", "model_name"],
            ),
            ttft: histogram(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT_BUCKETS,
            ),
            itl: histogram(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                ITL_BUCKETS,
            ),
            e2e: histogram(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                REQUEST_BUCKETS,
            ),
            queue_time: histogram(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                REQUEST_BUCKETS,
            ),
            handoffs: counter(
                "kvgate_sim_kv_handoffs_total",
                "Finished prefill/decode legs: prefill (KV kept for a decode endpoint) or decode (KV loaded).",
                &["engine", "model_name", "leg"],
            ),
            cache_config,
            lora_info,
            registry,
        }
    }

    /// The Prometheus text exposition; with `names`, only those families (as prometheus_client
    /// does for `?name[]=…`; counters are named without `_total` there).
    pub(crate) fn render(&self, names: &[String]) -> String {
        let mut families = self.registry.gather();
        if !names.is_empty() {
            families.retain(|f| {
                let n = f.name();
                names.iter().any(|w| w == n || n.strip_suffix("_total") == Some(w.as_str()))
            });
        }
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&families, &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for SimMetrics {
    fn default() -> Self {
        Self::new()
    }
}
