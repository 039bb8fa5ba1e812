//! What a `kvgate bench` run measured: the JSON report (DESIGN.md's keys, then the keys a
//! `vllm bench serve` user reads, then kvgate's extras), its statistics, goodput, and the
//! summary table.

use std::collections::BTreeMap;

use anyhow::bail;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::BenchArgs;

/// Mean and percentiles of a set of samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Stats {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// The `q` quantile (`q` in [0, 1]) of sorted samples, interpolated linearly between the two
/// nearest ranks: numpy's default, which `vllm bench serve` uses, so a median is the 0.5 quantile
/// and kvgate's figures are vLLM's for the same samples. 0 for no samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else { return 0.0 };
    let h = q.clamp(0.0, 1.0) * last as f64;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(last);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// Mean and population standard deviation (numpy's defaults); 0 and 0 for no samples (an empty
/// float sum is -0.0, which a report must not show).
fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (mean, (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt())
}

/// A report figure as JSON: finite (JSON has no NaN or infinity) and never negative zero.
fn figure(x: f64) -> Value {
    json!(if x.is_finite() && x != 0.0 { x } else { 0.0 })
}

/// The finite samples, sorted.
fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

impl Stats {
    /// Statistics of `samples`.
    pub fn of(samples: &[f64]) -> Self {
        let v = sorted(samples);
        if v.is_empty() {
            return Self::default();
        }
        Self { mean: mean_std(&v).0, p50: percentile(&v, 0.5), p90: percentile(&v, 0.9), p99: percentile(&v, 0.99) }
    }
}

/// The latency metrics `--percentile-metrics` and `--goodput` name, as `vllm bench serve` does.
pub(crate) const METRICS: [&str; 4] = ["ttft", "tpot", "itl", "e2el"];

/// Per-request service-level objectives: a request is good when it meets every one (ms).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Goodput(pub BTreeMap<String, f64>);

impl Goodput {
    /// Parses `ttft:500 tpot:50` (metric:ms pairs, spaces or commas between them).
    pub(crate) fn parse(spec: &[String]) -> anyhow::Result<Self> {
        let mut slos = BTreeMap::new();
        for pair in spec.iter().flat_map(|s| s.split([' ', ','])).filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once(':') else { bail!("--goodput: `{pair}` is not METRIC:MS") };
            if !matches!(k, "ttft" | "tpot" | "e2el") {
                bail!("--goodput: `{k}` is not ttft, tpot or e2el");
            }
            match v.parse::<f64>() {
                Ok(ms) if ms.is_finite() && ms > 0.0 => slos.insert(k.to_owned(), ms),
                _ => bail!("--goodput: `{v}` is not a positive number of ms"),
            };
        }
        Ok(Self(slos))
    }

    /// Whether a request with these latencies (ms; tpot absent for one-token answers) is good.
    pub(crate) fn met(&self, ttft: f64, tpot: Option<f64>, e2el: f64) -> bool {
        self.0.iter().all(|(k, limit)| match k.as_str() {
            "ttft" => ttft <= *limit,
            "tpot" => tpot.unwrap_or(0.0) <= *limit,
            _ => e2el <= *limit,
        })
    }
}

/// Latency samples of a run (ms), for the report.
#[derive(Debug, Default)]
pub(crate) struct Samples {
    /// Per metric of [`METRICS`].
    pub by_metric: BTreeMap<&'static str, Vec<f64>>,
}

/// The JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed (`vllm bench serve`'s `failed`).
    pub failed: usize,
    /// Each request's error, in the order they were sent, `""` for a success (`vllm bench
    /// serve`'s `errors`).
    pub errors: Vec<String>,
    /// Failures by kind (`http_503`, `connect`, `timeout`, …).
    pub errors_by_kind: BTreeMap<String, usize>,
    /// Wall time of the run.
    pub duration_s: f64,
    /// Successful requests per second.
    pub throughput_rps: f64,
    /// Output tokens per second.
    pub output_tokens_per_s: f64,
    /// Time to first token (streaming) or to the whole answer.
    pub ttft_ms: Stats,
    /// Time per output token after the first.
    pub tpot_ms: Stats,
    /// End-to-end latency.
    pub e2e_ms: Stats,
    /// Prefix-cache hits / queries over the run, from the endpoints' counters.
    pub prefix_cache_hit_rate: Option<f64>,
    /// Requests per serving endpoint.
    pub per_endpoint: BTreeMap<String, usize>,
    /// Most-loaded endpoint's requests over the mean.
    pub hot_spot_factor: Option<f64>,
    /// `vllm bench serve`'s other keys: the setup ([`setup_keys`]), `duration`, `completed`,
    /// `total_input_tokens`, `total_output_tokens`, `request_throughput`, `output_throughput`,
    /// `total_token_throughput`, `request_goodput` (with `--goodput`),
    /// `mean_/median_/std_/pNN_{ttft,tpot,itl,e2el}_ms`, `max_output_tokens_per_s` and
    /// `max_concurrent_requests` ([`peaks`]).
    #[serde(flatten)]
    pub vllm: Map<String, Value>,
    /// What was run (flags and seed), to repeat it.
    pub config: BenchArgs,
    /// Every successful request's TTFT, sorted (for CDF plots and comparisons).
    pub ttft_samples_ms: Vec<f64>,
}

/// A percentile's key part: `99`, `99.9`.
fn percentile_name(p: f64) -> String {
    if p.fract() == 0.0 { format!("{}", p as u64) } else { format!("{p}") }
}

/// The keys `vllm bench serve` writes for the run: counts, throughputs, and for every metric its
/// mean, median and standard deviation, with the `percentiles` of the metrics `selected` (p99 of
/// each always).
pub(crate) fn vllm_keys(
    counts: (usize, u64, u64),
    duration: f64,
    samples: &Samples,
    selected: &[&str],
    percentiles: &[f64],
    goodput: Option<usize>,
) -> Map<String, Value> {
    let (completed, input, output) = counts;
    let d = duration.max(1e-9);
    let mut m = Map::new();
    m.insert("duration".into(), figure(duration));
    m.insert("completed".into(), json!(completed));
    m.insert("total_input_tokens".into(), json!(input));
    m.insert("total_output_tokens".into(), json!(output));
    m.insert("request_throughput".into(), figure(completed as f64 / d));
    if let Some(good) = goodput {
        m.insert("request_goodput".into(), figure(good as f64 / d));
    }
    m.insert("output_throughput".into(), figure(output as f64 / d));
    m.insert("total_token_throughput".into(), figure((input + output) as f64 / d));
    for metric in METRICS {
        let v = sorted(samples.by_metric.get(metric).map_or(&[][..], Vec::as_slice));
        let (mean, std) = mean_std(&v);
        m.insert(format!("mean_{metric}_ms"), figure(mean));
        m.insert(format!("median_{metric}_ms"), figure(percentile(&v, 0.5)));
        m.insert(format!("std_{metric}_ms"), figure(std));
        let mut ps: Vec<f64> = if selected.contains(&metric) { percentiles.to_vec() } else { Vec::new() };
        if !ps.contains(&99.0) {
            ps.push(99.0);
        }
        for p in ps {
            m.insert(format!("p{}_{metric}_ms", percentile_name(p)), figure(percentile(&v, p / 100.0)));
        }
    }
    m
}

/// The name `vllm bench serve` gives the API `--endpoint` drives (its `--backend`).
fn backend(endpoint: &str) -> &'static str {
    if endpoint == "/v1/completions" { "openai" } else { "openai-chat" }
}

/// The tokenizer the workload's lengths are counted in: the simulator's (see `workload.rs`).
pub(crate) const TOKENIZER_ID: &str = "kvgate-sim";

/// The setup keys of a `vllm bench serve` result: `date` (when the run ended, UTC,
/// `YYYYmmdd-HHMMSS`), `backend` and `endpoint_type` (vLLM's name of the API driven),
/// `model_id`, `tokenizer_id`, `num_prompts` (requests sent), `request_rate` (`"inf"` when
/// arrivals are not paced), `burstiness` and `max_concurrency` (null: no limit).
pub(crate) fn setup_keys(args: &BenchArgs, num_prompts: usize, date: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("date".into(), json!(date));
    m.insert("endpoint_type".into(), json!(backend(&args.endpoint)));
    m.insert("backend".into(), json!(backend(&args.endpoint)));
    m.insert("model_id".into(), json!(args.model));
    m.insert("tokenizer_id".into(), json!(TOKENIZER_ID));
    m.insert("num_prompts".into(), json!(num_prompts));
    m.insert("request_rate".into(), args.arrival_rate().map_or(json!("inf"), figure));
    m.insert("burstiness".into(), figure(args.burstiness));
    m.insert("max_concurrency".into(), json!(args.max_concurrency));
    m
}

/// A successful request on the run's clock (seconds since it started): sent, done, and when its
/// output tokens arrived (time, tokens then).
#[derive(Debug, Default)]
pub(crate) struct Timeline {
    pub start: f64,
    pub end: f64,
    pub tokens: Vec<(f64, usize)>,
}

/// `vllm bench serve`'s peaks over the successful requests: `max_output_tokens_per_s`, the most
/// output tokens that arrived within one second (one-second buckets from the first request's
/// start), and `max_concurrent_requests`, the most requests in flight at one instant.
pub(crate) fn peaks(runs: &[Timeline]) -> Map<String, Value> {
    let t0 = runs.iter().map(|r| r.start).min_by(f64::total_cmp).unwrap_or(0.0);
    let mut per_second = BTreeMap::<u64, usize>::new();
    for (t, n) in runs.iter().flat_map(|r| &r.tokens) {
        *per_second.entry((t - t0).max(0.0) as u64).or_default() += n;
    }
    let mut events: Vec<(f64, isize)> = runs.iter().flat_map(|r| [(r.start, 1), (r.end, -1)]).collect();
    // At equal times the end counts first: a request done as another starts is not beside it.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut peak) = (0, 0);
    for (_, d) in events {
        now += d;
        peak = peak.max(now);
    }
    let mut m = Map::new();
    m.insert("max_output_tokens_per_s".into(), figure(per_second.values().max().copied().unwrap_or(0) as f64));
    m.insert("max_concurrent_requests".into(), json!(peak));
    m
}

/// The report as a short table, with the failures by kind when there were any.
pub fn summary(r: &Report) -> String {
    let hit = r.prefix_cache_hit_rate.map_or("-".to_owned(), |h| format!("{:.1}%", h * 100.0));
    let mut out = format!(
        "requests {} (failed {}) in {:.1} s: {:.1} req/s, {:.0} output tok/s, prefix-cache hit rate {hit}, hot-spot factor {}\n",
        r.requests,
        r.failed,
        r.duration_s,
        r.throughput_rps,
        r.output_tokens_per_s,
        r.hot_spot_factor.map_or("-".to_owned(), |h| format!("{h:.2}")),
    );
    if !r.errors_by_kind.is_empty() {
        let kinds: Vec<String> = r.errors_by_kind.iter().map(|(k, n)| format!("{k} × {n}")).collect();
        out.push_str(&format!("failed: {}\n", kinds.join(", ")));
    }
    if r.requests > 0 && r.failed == r.requests {
        out.push_str("no request succeeded: no latencies\n");
        return out;
    }
    out.push_str(&format!("{:<6} {:>9} {:>9} {:>9} {:>9}\n", "ms", "mean", "p50", "p90", "p99"));
    for (n, s) in [("ttft", r.ttft_ms), ("tpot", r.tpot_ms), ("e2e", r.e2e_ms)] {
        out.push_str(&format!("{n:<6} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n", s.mean, s.p50, s.p90, s.p99));
    }
    if let Some(g) = r.vllm.get("request_goodput").and_then(Value::as_f64) {
        out.push_str(&format!("goodput {g:.2} req/s\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_on_known_data() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stats::of(&v);
        // Linear between ranks, as numpy: rank q × (n - 1) counted from 0.
        for (got, want) in [(s.p50, 50.5), (s.p90, 90.1), (s.p99, 99.01), (s.mean, 50.5)] {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        assert_eq!(Stats::of(&[7.0]).p99, 7.0);
        assert_eq!(Stats::of(&[]), Stats::default());
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 1.0), 4.0);
        assert_eq!(percentile(&[1.0, 3.0], 0.25), 1.5);
    }

    #[test]
    fn the_median_is_p50() {
        let mut s = Samples::default();
        s.by_metric.insert("ttft", vec![10.0, 20.0, 40.0, 80.0]);
        s.by_metric.insert("e2el", vec![3.0]);
        let m = vllm_keys((4, 0, 0), 1.0, &s, &["ttft", "e2el"], &[50.0], None);
        assert_eq!(m["median_ttft_ms"], json!(30.0));
        assert_eq!(m["p50_ttft_ms"], m["median_ttft_ms"]);
        assert_eq!(m["p50_e2el_ms"], m["median_e2el_ms"]);
        assert_eq!(Stats::of(&[10.0, 20.0, 40.0, 80.0]).p50, 30.0);
    }

    #[test]
    fn no_samples_no_negative_zeros() {
        let m = vllm_keys((0, 0, 0), 0.5, &Samples::default(), &METRICS, &[50.0, 90.0], None);
        for (k, v) in &m {
            let x = v.as_f64().unwrap_or_else(|| panic!("{k} is a number: {v}"));
            assert!(x.is_sign_positive() && (x == 0.0 || k == "duration"), "{k}: {x}");
        }
    }

    #[test]
    fn peaks_of_tokens_and_requests_in_flight() {
        let run = |start, end, tokens: &[(f64, usize)]| Timeline { start, end, tokens: tokens.to_vec() };
        let check = |runs: &[Timeline], tokens: f64, in_flight: usize| {
            let m = peaks(runs);
            assert_eq!(
                (m["max_output_tokens_per_s"].as_f64(), m["max_concurrent_requests"].as_u64()),
                (Some(tokens), Some(in_flight as u64))
            );
        };
        check(&[], 0.0, 0);
        // Streamed tokens one by one, then a whole answer of 5 at its end: seconds 0, 1, 2 from
        // the first start get 2, 1 and 5 tokens.
        let a = run(0.5, 2.0, &[(0.7, 1), (0.9, 1), (1.6, 1)]);
        let b = run(1.5, 3.0, &[(2.9, 5)]);
        check(&[a, b], 5.0, 2);
        // One ends as the next starts: never two at once.
        check(&[run(0.0, 1.0, &[]), run(1.0, 2.0, &[]), run(2.0, 3.0, &[])], 0.0, 1);
    }

    #[test]
    fn goodput_specs() {
        let g = Goodput::parse(&["ttft:500 tpot:50".into(), "e2el:2000".into()]).expect("parses");
        assert_eq!(g.0.len(), 3);
        assert!(g.met(400.0, Some(40.0), 1000.0));
        assert!(!g.met(501.0, Some(40.0), 1000.0));
        assert!(!g.met(400.0, Some(51.0), 1000.0));
        assert!(g.met(400.0, None, 1000.0), "a one-token answer has no tpot to miss");
        for bad in ["ttft", "ttft:abc", "ttft:-1", "latency:5"] {
            assert!(Goodput::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn vllm_keys_for_the_selected_percentiles() {
        let mut s = Samples::default();
        s.by_metric.insert("ttft", (1..=100).map(f64::from).collect());
        s.by_metric.insert("e2el", vec![10.0, 20.0]);
        let m = vllm_keys((2, 300, 40), 2.0, &s, &["ttft"], &[50.0, 99.9], Some(1));
        assert_eq!(m["request_throughput"], json!(1.0));
        assert_eq!(m["output_throughput"], json!(20.0));
        assert_eq!(m["total_token_throughput"], json!(170.0));
        assert_eq!(m["request_goodput"], json!(0.5));
        let near = |k: &str, want: f64| (m[k].as_f64().expect(k) - want).abs() < 1e-9;
        assert!(near("p50_ttft_ms", 50.5) && near("p99.9_ttft_ms", 99.901) && near("p99_ttft_ms", 99.01));
        assert_eq!(m["median_e2el_ms"], json!(15.0));
        assert_eq!(m["std_e2el_ms"], json!(5.0));
        assert!(m.contains_key("p99_itl_ms") && !m.contains_key("p50_e2el_ms"));
    }
}
