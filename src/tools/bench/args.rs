//! `kvgate bench`'s flags: kvgate's names, and `vllm bench serve`'s for what the two share.

use serde::Serialize;

/// `kvgate bench` flags (names after vLLM's and inference-perf's benchmarks).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct BenchArgs {
    /// Server root, e.g. `http://127.0.0.1:8080` (a trailing `/v1` is dropped, with a note:
    /// `--endpoint` already starts with it).
    #[arg(long)]
    pub base_url: String,
    /// Model name to send.
    #[arg(long)]
    pub model: String,
    /// `shared-prefix`, `multi-turn`, `random` or `trace`.
    #[arg(long, visible_alias = "dataset-name", default_value = "shared-prefix")]
    pub workload: String,
    /// The API to drive: `/v1/chat/completions` or `/v1/completions` (the messages' text as the
    /// prompt).
    #[arg(long, default_value = "/v1/chat/completions")]
    pub endpoint: String,
    /// Trace to replay (JSONL: `timestamp` ms, `input_length`, `output_length`, `hash_ids`).
    #[arg(long)]
    pub trace: Option<std::path::PathBuf>,
    /// Tokens per trace `hash_ids` block.
    #[arg(long, default_value_t = 512)]
    pub block_size: usize,
    /// Trace time multiplier: 0.5 replays twice as fast.
    #[arg(long, default_value_t = 1.0)]
    pub trace_time_scale: f64,
    /// Requests to send (at most the workload's size; at least 1).
    #[arg(long, value_parser = at_least_one)]
    pub num_prompts: Option<usize>,
    /// Arrivals at this rate (requests/s; Poisson unless `--burstiness`); absent or `inf`: as
    /// fast as `--max-concurrency` allows.
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Burstiness of arrivals: inter-arrival times are Gamma-distributed with this shape (1:
    /// Poisson; below 1 burstier, above 1 more even). Needs `--request-rate`.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Requests sent first, not measured (the workload's first ones).
    #[arg(long, default_value_t = 0)]
    pub num_warmups: usize,
    /// Requests in flight at most (default: no limit, as in `vllm bench serve`: without
    /// `--request-rate` every request is sent at once).
    #[arg(long, value_parser = a_limit)]
    pub max_concurrency: Option<usize>,
    /// Shared-prefix: groups (multi-turn: sessions; random: with `--prompts-per-group`, the
    /// number of prompts unless `--num-prompts`).
    #[arg(long, default_value_t = 10)]
    pub groups: usize,
    /// Shared-prefix: requests per group (multi-turn: turns per session).
    #[arg(long, default_value_t = 5)]
    pub prompts_per_group: usize,
    /// System prompt length, tokens.
    #[arg(long, default_value_t = 1000)]
    pub system_prompt_len: usize,
    /// Question length, tokens.
    #[arg(long, default_value_t = 100)]
    pub question_len: usize,
    /// Output length, tokens.
    #[arg(long, visible_alias = "random-output-len", default_value_t = 64)]
    pub output_len: usize,
    /// Random workload: prompt length, tokens (default: system prompt plus question length).
    #[arg(long)]
    pub random_input_len: Option<usize>,
    /// Answers run to their length in tokens whatever the model would stop at (the default;
    /// vLLM's flag, accepted).
    #[arg(long, overrides_with = "no_ignore_eos")]
    pub ignore_eos: bool,
    /// Let answers stop where the model ends them.
    #[arg(long)]
    pub no_ignore_eos: bool,
    /// Seed of the workload and of the arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// An endpoint's `/metrics` URL, scraped before and after (repeatable).
    #[arg(long)]
    pub metrics_url: Vec<String>,
    /// Where to write the JSON report.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
    /// Also write the report into `--result-dir` as `--result-filename` (default
    /// `kvgate-{rate}qps-{model}-{YYYYMMDD-HHMMSS}.json`), as `vllm bench serve` does.
    #[arg(long)]
    pub save_result: bool,
    /// Folder of `--save-result`.
    #[arg(long)]
    pub result_dir: Option<std::path::PathBuf>,
    /// File name of `--save-result`.
    #[arg(long)]
    pub result_filename: Option<String>,
    /// Metrics whose `--metric-percentiles` the report gives: `ttft`, `tpot`, `itl`, `e2el`
    /// (comma-separated; every metric has its mean, median, std and p99 regardless).
    #[arg(long, default_value = "ttft,tpot,itl")]
    pub percentile_metrics: String,
    /// Percentiles for `--percentile-metrics`, comma-separated (e.g. `50,90,99,99.9`).
    #[arg(long, default_value = "99")]
    pub metric_percentiles: String,
    /// Service-level objectives as `METRIC:MS` pairs (`ttft:500 tpot:50`, metrics ttft, tpot,
    /// e2el): the report's `request_goodput` is the rate of requests meeting all of them.
    #[arg(long, num_args = 1..)]
    pub goodput: Vec<String>,
    /// Exit non-zero when more than this fraction of requests fail (default 0: any failure).
    #[arg(long, default_value_t = 0.0)]
    pub max_error_rate: f64,
    /// Send non-streaming requests.
    #[arg(long)]
    pub no_stream: bool,
    /// Draw the TTFT distribution (CDF) to this file: SVG or PNG, by its extension.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
}

impl BenchArgs {
    /// Requests/s when arrivals are paced by `--request-rate`; none: as fast as
    /// `--max-concurrency` allows (`inf`, 0 or absent).
    pub(crate) fn arrival_rate(&self) -> Option<f64> {
        self.request_rate.filter(|r| r.is_finite() && *r > 0.0)
    }

    /// The server root requests go to, and whether `--base-url` named the `/v1` under it (which
    /// `--endpoint` already starts with).
    pub(crate) fn server_root(&self) -> (&str, bool) {
        let url = self.base_url.trim_end_matches('/');
        match url.strip_suffix("/v1") {
            Some(root) => (root, true),
            None => (url, false),
        }
    }
}

/// A count that must be positive.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// `--max-concurrency`: positive; no limit is the flag left out.
fn a_limit(s: &str) -> Result<usize, String> {
    at_least_one(s).map_err(|e| format!("{e} (leave it out for no limit)"))
}
