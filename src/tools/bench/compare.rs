//! `kvgate bench compare`: result files side by side — kvgate's reports or `vllm bench serve`'s
//! results, read by kvgate's keys or else vLLM's — and their TTFT distributions overlaid.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

/// The first of these JSON pointers that holds a number.
fn first_of(v: &Value, pointers: &[&str]) -> Option<f64> {
    pointers.iter().find_map(|p| v.pointer(p).and_then(Value::as_f64))
}

/// What the table shows of one result.
#[derive(Debug)]
struct Row {
    /// Requests, failed, req/s, output tok/s, TTFT p50 and p99 (ms): every result has them.
    figures: [f64; 6],
    ttft_p90: Option<f64>,
    hit_rate: Option<f64>,
    hot_spot: Option<f64>,
    /// Successful requests' TTFTs (ms), sorted.
    ttft_ms: Vec<f64>,
}

/// Reads a result's figures; `Err` names what a bench result would have and this one lacks.
fn row(v: &Value) -> Result<Row, String> {
    let requests = first_of(v, &["/requests"])
        .or_else(|| Some(first_of(v, &["/completed"])? + first_of(v, &["/failed"])?))
        .or_else(|| first_of(v, &["/num_prompts"]));
    // Reports before `errors` became vLLM's list kept the count there.
    let failed = first_of(v, &["/failed", "/errors"]);
    let required = [
        ("`requests` (vLLM: `completed` and `failed`)", requests),
        ("`failed`", failed),
        ("`throughput_rps` or `request_throughput`", first_of(v, &["/throughput_rps", "/request_throughput"])),
        ("`output_tokens_per_s` or `output_throughput`", first_of(v, &["/output_tokens_per_s", "/output_throughput"])),
        ("`ttft_ms.p50` or `median_ttft_ms`", first_of(v, &["/ttft_ms/p50", "/median_ttft_ms"])),
        ("`ttft_ms.p99` or `p99_ttft_ms`", first_of(v, &["/ttft_ms/p99", "/p99_ttft_ms"])),
    ];
    let missing: Vec<&str> = required.iter().filter(|(_, x)| x.is_none()).map(|(what, _)| *what).collect();
    if !missing.is_empty() {
        return Err(format!("no {}", missing.join(", no ")));
    }
    Ok(Row {
        figures: required.map(|(_, x)| x.unwrap_or_default()),
        ttft_p90: first_of(v, &["/ttft_ms/p90", "/p90_ttft_ms"]),
        hit_rate: first_of(v, &["/prefix_cache_hit_rate"]),
        hot_spot: first_of(v, &["/hot_spot_factor"]),
        ttft_ms: ttft_samples(v),
    })
}

/// kvgate's `ttft_samples_ms`, else vLLM's per-request `ttfts` (seconds) of the requests whose
/// `errors` entry is empty.
fn ttft_samples(v: &Value) -> Vec<f64> {
    let numbers = |a: &Vec<Value>| a.iter().filter_map(Value::as_f64).collect::<Vec<f64>>();
    let mut ms = match (v["ttft_samples_ms"].as_array(), v["ttfts"].as_array()) {
        (Some(a), _) => numbers(a),
        (None, Some(ttfts)) => {
            let errors = v["errors"].as_array();
            ttfts
                .iter()
                .enumerate()
                .filter(|(i, _)| errors.and_then(|e| e.get(*i)).is_none_or(|e| e.as_str() == Some("")))
                .filter_map(|(_, t)| t.as_f64())
                .map(|s| s * 1000.0)
                .collect()
        }
        (None, None) => Vec::new(),
    };
    ms.sort_by(f64::total_cmp);
    ms
}

/// `kvgate bench compare`: results side by side, and their TTFT CDFs overlaid. Refuses a file
/// that is not a bench result rather than showing zeros for it.
pub fn compare(files: &[PathBuf], plot: Option<&Path>) -> anyhow::Result<String> {
    let mut rows = vec![format!(
        "{:<24} {:>8} {:>7} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "report", "requests", "failed", "req/s", "out tok/s", "ttft p50", "ttft p90", "ttft p99", "hit", "hotspot"
    )];
    let mut series = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", f.display()))?;
        let r = match row(&v) {
            Ok(r) => r,
            Err(why) => bail!("{}: not a kvgate or vLLM bench result ({why})", f.display()),
        };
        let name = f.file_stem().and_then(|s| s.to_str()).unwrap_or("?").to_owned();
        let opt = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map_or("-".to_owned(), f);
        let [requests, failed, rps, tokens, p50, p99] = r.figures;
        rows.push(format!(
            "{name:<24} {requests:>8} {failed:>7} {rps:>9.1} {tokens:>10.0} {p50:>9.1} {:>9} {p99:>9.1} {:>8} {:>8}",
            opt(r.ttft_p90, &|x| format!("{x:.1}")),
            opt(r.hit_rate, &|h| format!("{:.1}%", h * 100.0)),
            opt(r.hot_spot, &|h| format!("{h:.2}")),
        ));
        series.push((name, r.ttft_ms));
    }
    if let Some(p) = plot {
        let names: Vec<&str> = series.iter().map(|(n, _)| n.as_str()).collect();
        super::plot::write_plot(p, &format!("compare: {}", names.join(", ")), &series)?;
    }
    Ok(rows.join("\n"))
}
