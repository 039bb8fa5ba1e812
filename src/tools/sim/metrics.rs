//! The simulator's Prometheus metrics, with vLLM's names, types, labels and buckets.
//!
//! Per-engine families carry `model_name` (the first served name) and `engine` (the DP rank as a
//! string). Counters are named with their `_total` suffix as vLLM's exposition shows them.
//! `--fake-metrics` pins the load families routing reads to fixed values ([`FakeMetrics`]).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::Deserialize;

/// The load families a router reads, with their help texts: what `--fake-metrics` replaces.
const RUNNING: (&str, &str) = ("vllm:num_requests_running", "Number of requests in model execution batches.");
const WAITING: (&str, &str) = ("vllm:num_requests_waiting", "Number of requests waiting to be processed.");
const KV_USAGE: (&str, &str) = ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.");
const LORA_INFO: (&str, &str) = ("vllm:lora_requests_info", "Running stats on lora requests.");
const LORA_LABELS: &[&str] = &["max_lora", "running_lora_adapters", "waiting_lora_adapters"];
const ENGINE_LABELS: &[&str] = &["engine", "model_name"];

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
    /// The rest of a vLLM server's exposition (request-size and phase-time histograms, the
    /// Python process and HTTP families), so a scrape costs what a real one does.
    pub detail: Detail,
    /// `kvgate_sim_kv_handoffs_total{engine,model_name,leg}` (simulator only): finished P/D legs,
    /// `prefill` (KV kept for a decode endpoint) or `decode` (KV loaded from a prefill endpoint).
    pub handoffs: IntCounterVec,
    /// With `--fake-metrics`: the pinned load families, shown instead of the engine's.
    pinned: Option<Registry>,
}

/// `--fake-metrics`: the load `/metrics` reports in place of the engine's, in the JSON shape of
/// llm-d-inference-sim's flag of that name (the part routing reads), so a scorer can be tested
/// against endpoints whose queue, KV usage and adapters are known. Absent numbers are 0.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct FakeMetrics {
    /// `vllm:num_requests_running`.
    #[serde(default)]
    pub(crate) running_requests: u32,
    /// `vllm:num_requests_waiting`.
    #[serde(default)]
    pub(crate) waiting_requests: u32,
    /// `vllm:kv_cache_usage_perc`, a fraction in [0, 1].
    #[serde(default)]
    pub(crate) kv_cache_usage: f64,
    /// One `vllm:lora_requests_info` series each.
    #[serde(default)]
    pub(crate) loras: Vec<FakeLoras>,
}

/// One pinned `vllm:lora_requests_info` series.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct FakeLoras {
    /// Adapters with running requests, comma-separated.
    #[serde(default)]
    pub(crate) running: String,
    /// Adapters with waiting requests, comma-separated.
    #[serde(default)]
    pub(crate) waiting: String,
    /// The series' value, unix seconds of its update: a reader takes the newest series.
    pub(crate) timestamp: f64,
}

impl FakeMetrics {
    /// Parses the flag's JSON and checks its values.
    pub(crate) fn parse(json: &str) -> Result<Self, String> {
        let f: Self = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if !(0.0..=1.0).contains(&f.kv_cache_usage) {
            return Err(format!("kv-cache-usage is a fraction from 0 to 1; got {}", f.kv_cache_usage));
        }
        if let Some(l) = f.loras.iter().find(|l| !(l.timestamp.is_finite() && l.timestamp >= 0.0)) {
            return Err(format!("a lora timestamp is unix seconds; got {}", l.timestamp));
        }
        Ok(f)
    }
}

const TOKEN_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];
const ITERATION_BUCKETS: &[f64] =
    &[1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];
const N_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];
const TPOT_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const HTTP_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 7.5, 10.0, 30.0, 60.0,
];
/// The API server's routes, as its HTTP instrumentation labels them.
const HANDLERS: &[&str] =
    &["/v1/chat/completions", "/v1/completions", "/metrics", "/health", "/v1/models", "/tokenize", "/version"];

/// The families of a vLLM server's exposition that routing does not read.
#[derive(Debug, Clone)]
pub(crate) struct Detail {
    /// `vllm:request_prompt_tokens`.
    pub prompt_tokens: HistogramVec,
    /// `vllm:request_generation_tokens`.
    pub generation_tokens: HistogramVec,
    /// `vllm:request_params_max_tokens`.
    pub max_tokens: HistogramVec,
    /// `vllm:request_max_num_generation_tokens`.
    pub max_generation_tokens: HistogramVec,
    /// `vllm:request_params_n`.
    pub n: HistogramVec,
    /// `vllm:iteration_tokens_total`.
    pub iteration_tokens: HistogramVec,
    /// `vllm:request_inference_time_seconds`.
    pub inference_time: HistogramVec,
    /// `vllm:request_prefill_time_seconds`.
    pub prefill_time: HistogramVec,
    /// `vllm:request_decode_time_seconds`.
    pub decode_time: HistogramVec,
    /// `vllm:request_time_per_output_token_seconds`.
    pub tpot: HistogramVec,
    /// `http_requests_total{handler,method,status}`.
    pub http_requests: IntCounterVec,
    /// `http_request_duration_seconds{handler,method}`.
    pub http_duration: HistogramVec,
    /// `http_request_duration_highr_seconds`.
    pub http_duration_highr: HistogramVec,
}

impl Detail {
    /// One finished request: its prompt and output lengths, `max_tokens`, and phase times.
    pub(crate) fn finished(&self, l: &[&str; 2], prompt: usize, output: usize, max_tokens: usize, t: [f64; 3]) {
        let [prefill, decode, total] = t;
        self.prompt_tokens.with_label_values(l).observe(prompt as f64);
        self.generation_tokens.with_label_values(l).observe(output as f64);
        self.max_tokens.with_label_values(l).observe(max_tokens as f64);
        self.max_generation_tokens.with_label_values(l).observe(max_tokens as f64);
        self.n.with_label_values(l).observe(1.0);
        self.inference_time.with_label_values(l).observe(total);
        self.prefill_time.with_label_values(l).observe(prefill);
        self.decode_time.with_label_values(l).observe(decode);
        if output > 1 {
            self.tpot.with_label_values(l).observe(decode / (output - 1) as f64);
        }
    }

    /// One HTTP request the API server answered.
    pub(crate) fn http(&self, handler: &str, method: &str, status: u16, seconds: f64) {
        let handler = HANDLERS.iter().find(|h| **h == handler).copied().unwrap_or("none");
        let status = format!("{}xx", status / 100);
        self.http_requests.with_label_values(&[handler, method, &status]).inc();
        self.http_duration.with_label_values(&[handler, method]).observe(seconds);
        self.http_duration_highr.with_label_values(&[] as &[&str]).observe(seconds);
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

/// Registers `c` in `registry` and returns it.
fn registered<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry.register(Box::new(c.clone())).expect("metric names are valid and unique");
    c
}

impl Detail {
    /// Registers the per-request detail families (vLLM's request histograms and the HTTP ones).
    fn new(registry: &Registry) -> Self {
        let l = ENGINE_LABELS;
        let hist = |n: &str, h: &str, buckets: &[f64], labels: &[&str]| {
            let opts = HistogramOpts::new(n, h).buckets(buckets.to_vec());
            registered(registry, HistogramVec::new(opts, labels).expect("valid histogram"))
        };
        Self {
            prompt_tokens: hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS, l),
            generation_tokens: hist(
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                TOKEN_BUCKETS,
                l,
            ),
            max_tokens: hist(
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter.",
                TOKEN_BUCKETS,
                l,
            ),
            max_generation_tokens: hist(
                "vllm:request_max_num_generation_tokens",
                "Histogram of maximum number of requested generation tokens.",
                TOKEN_BUCKETS,
                l,
            ),
            n: hist("vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS, l),
            iteration_tokens: hist(
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                ITERATION_BUCKETS,
                l,
            ),
            inference_time: hist(
                "vllm:request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request.",
                REQUEST_BUCKETS,
                l,
            ),
            prefill_time: hist(
                "vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.",
                REQUEST_BUCKETS,
                l,
            ),
            decode_time: hist(
                "vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.",
                REQUEST_BUCKETS,
                l,
            ),
            tpot: hist(
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                TPOT_BUCKETS,
                l,
            ),
            http_requests: registered(
                registry,
                IntCounterVec::new(
                    opts("http_requests_total", "Total number of requests by method, status and handler."),
                    &["handler", "method", "status"],
                )
                .expect("valid counter"),
            ),
            http_duration: hist(
                "http_request_duration_seconds",
                "Latency with only few buckets by handler.",
                &[0.1, 0.5, 1.0],
                &["handler", "method"],
            ),
            http_duration_highr: hist(
                "http_request_duration_highr_seconds",
                "Latency with many buckets but no API specific labels.",
                HTTP_BUCKETS,
                &[],
            ),
        }
    }
}

impl SimMetrics {
    /// Registers every family in a fresh registry.
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let l = ENGINE_LABELS;
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
        let kv_usage = GaugeVec::new(opts(KV_USAGE.0, KV_USAGE.1), l).expect("valid gauge");
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
        let detail = Detail::new(&registry);
        let lora_info = GaugeVec::new(opts(LORA_INFO.0, LORA_INFO.1), LORA_LABELS).expect("valid gauge");
        reg(Box::new(lora_info.clone()));
        Self {
            running: gauge(RUNNING.0, RUNNING.1),
            waiting: gauge(WAITING.0, WAITING.1),
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
            detail,
            registry,
            pinned: None,
        }
    }

    /// These metrics with `fake`'s load shown for every one of `engines` in place of what the
    /// engines report (`max_loras`: the `max_lora` label of the LoRA series).
    pub(crate) fn with_fake(mut self, fake: &FakeMetrics, engines: &[u32], model: &str, max_loras: usize) -> Self {
        let registry = Registry::new();
        let gauge = |(name, help): (&str, &str), labels: &[&str]| {
            let g = GaugeVec::new(opts(name, help), labels).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("metric names are valid and unique");
            g
        };
        let (running, waiting, kv_usage) =
            (gauge(RUNNING, ENGINE_LABELS), gauge(WAITING, ENGINE_LABELS), gauge(KV_USAGE, ENGINE_LABELS));
        for engine in engines {
            let l = [engine.to_string(), model.to_owned()];
            running.with_label_values(&l).set(f64::from(fake.running_requests));
            waiting.with_label_values(&l).set(f64::from(fake.waiting_requests));
            kv_usage.with_label_values(&l).set(fake.kv_cache_usage);
        }
        if !fake.loras.is_empty() {
            let lora_info = gauge(LORA_INFO, LORA_LABELS);
            let max = max_loras.to_string();
            for s in &fake.loras {
                lora_info.with_label_values(&[max.as_str(), s.running.as_str(), s.waiting.as_str()]).set(s.timestamp);
            }
        }
        self.pinned = Some(registry);
        self
    }

    /// The Prometheus text exposition without the `hide` families; with `names`, only those
    /// families (as prometheus_client does for `?name[]=…`; counters are named without
    /// `_total` there).
    pub(crate) fn render(&self, names: &[String], hide: &[&str]) -> String {
        let mut families = self.registry.gather();
        if let Some(pinned) = &self.pinned {
            // Pinned and engine values are never shown together, as with llm-d-inference-sim.
            let load = [RUNNING.0, WAITING.0, KV_USAGE.0, LORA_INFO.0];
            families.retain(|f| !load.contains(&f.name()));
            families.extend(pinned.gather());
            families.sort_by(|a, b| a.name().cmp(b.name()));
        }
        families.retain(|f| !hide.contains(&f.name()));
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
