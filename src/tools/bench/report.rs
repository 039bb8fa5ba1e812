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

/// Nearest-rank percentile of sorted samples (`q` in (0, 1]).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
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
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: percentile(&v, 0.5),
            p90: percentile(&v, 0.9),
            p99: percentile(&v, 0.99),
        }
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
    /// Requests that failed.
    pub errors: usize,
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
    /// `vllm bench serve`'s keys: `duration`, `completed`, `total_input_tokens`,
    /// `total_output_tokens`, `request_throughput`, `output_throughput`, `total_token_throughput`,
    /// `request_goodput` (with `--goodput`), and `mean_/median_/std_/pNN_{ttft,tpot,itl,e2el}_ms`.
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
    m.insert("duration".into(), json!(duration));
    m.insert("completed".into(), json!(completed));
    m.insert("total_input_tokens".into(), json!(input));
    m.insert("total_output_tokens".into(), json!(output));
    m.insert("request_throughput".into(), json!(completed as f64 / d));
    if let Some(good) = goodput {
        m.insert("request_goodput".into(), json!(good as f64 / d));
    }
    m.insert("output_throughput".into(), json!(output as f64 / d));
    m.insert("total_token_throughput".into(), json!((input + output) as f64 / d));
    for metric in METRICS {
        let v = sorted(samples.by_metric.get(metric).map_or(&[][..], Vec::as_slice));
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        m.insert(format!("mean_{metric}_ms"), json!(mean));
        m.insert(format!("median_{metric}_ms"), json!(median(&v)));
        m.insert(format!("std_{metric}_ms"), json!(std));
        let mut ps: Vec<f64> = if selected.contains(&metric) { percentiles.to_vec() } else { Vec::new() };
        if !ps.contains(&99.0) {
            ps.push(99.0);
        }
        for p in ps {
            m.insert(format!("p{}_{metric}_ms", percentile_name(p)), json!(percentile(&v, p / 100.0)));
        }
    }
    m
}

/// The median of sorted samples (the mean of the middle two for an even count), 0 when empty.
fn median(v: &[f64]) -> f64 {
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The report as a short table, with the failures by kind when there were any.
pub fn summary(r: &Report) -> String {
    let hit = r.prefix_cache_hit_rate.map_or("-".to_owned(), |h| format!("{:.1}%", h * 100.0));
    let mut out = format!(
        "requests {} (errors {}) in {:.1} s: {:.1} req/s, {:.0} output tok/s, prefix-cache hit rate {hit}, hot-spot factor {}\n",
        r.requests,
        r.errors,
        r.duration_s,
        r.throughput_rps,
        r.output_tokens_per_s,
        r.hot_spot_factor.map_or("-".to_owned(), |h| format!("{h:.2}")),
    );
    if !r.errors_by_kind.is_empty() {
        let kinds: Vec<String> = r.errors_by_kind.iter().map(|(k, n)| format!("{k} × {n}")).collect();
        out.push_str(&format!("failed: {}\n", kinds.join(", ")));
    }
    if r.requests > 0 && r.errors == r.requests {
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
        assert_eq!((s.p50, s.p90, s.p99), (50.0, 90.0, 99.0));
        assert!((s.mean - 50.5).abs() < 1e-9);
        assert_eq!(Stats::of(&[7.0]).p99, 7.0);
        assert_eq!(Stats::of(&[]), Stats::default());
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
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
        assert_eq!(m["p50_ttft_ms"], json!(50.0));
        assert_eq!(m["p99.9_ttft_ms"], json!(100.0));
        assert_eq!(m["p99_ttft_ms"], json!(99.0));
        assert_eq!(m["median_e2el_ms"], json!(15.0));
        assert_eq!(m["std_e2el_ms"], json!(5.0));
        assert!(m.contains_key("p99_itl_ms") && !m.contains_key("p50_e2el_ms"));
    }
}
