//! `kvgate bench`: drives a seeded workload against any OpenAI-compatible server (kvgate, a
//! vLLM replica, another router) and measures what clients feel — time to first token, time per
//! output token, end-to-end latency, throughput, errors — and, from the endpoints' `/metrics`,
//! the prefix-cache hit rate. Writes a JSON report.

mod plot;
pub(crate) mod workload;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde_json::json;

use workload::Item;

/// `kvgate bench` flags (names after vLLM's and inference-perf's benchmarks).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct BenchArgs {
    /// Server root, e.g. `http://127.0.0.1:8080` (no `/v1`).
    #[arg(long)]
    pub base_url: String,
    /// Model name to send.
    #[arg(long)]
    pub model: String,
    /// `shared-prefix`, `multi-turn`, `random` or `trace`.
    #[arg(long, default_value = "shared-prefix")]
    pub workload: String,
    /// Trace to replay (JSONL: `timestamp` ms, `input_length`, `output_length`, `hash_ids`).
    #[arg(long)]
    pub trace: Option<std::path::PathBuf>,
    /// Tokens per trace `hash_ids` block.
    #[arg(long, default_value_t = 512)]
    pub block_size: usize,
    /// Trace time multiplier: 0.5 replays twice as fast.
    #[arg(long, default_value_t = 1.0)]
    pub trace_time_scale: f64,
    /// Requests to send (at most the workload's size).
    #[arg(long)]
    pub num_prompts: Option<usize>,
    /// Poisson arrivals at this rate (requests/s); absent: as fast as `--max-concurrency` allows.
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 16)]
    pub max_concurrency: usize,
    /// Shared-prefix: groups (multi-turn: sessions).
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
    #[arg(long, default_value_t = 64)]
    pub output_len: usize,
    /// Seed of the workload and of the arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// An endpoint's `/metrics` URL, scraped before and after (repeatable).
    #[arg(long)]
    pub metrics_url: Vec<String>,
    /// Where to write the JSON report.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
    /// Send non-streaming requests.
    #[arg(long)]
    pub no_stream: bool,
    /// Draw the TTFT distribution (CDF) as SVG to this file.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
}

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

impl Stats {
    /// Statistics of `samples`.
    pub fn of(samples: &[f64]) -> Self {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: percentile(&v, 0.5),
            p90: percentile(&v, 0.9),
            p99: percentile(&v, 0.99),
        }
    }
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
    /// What was run (flags and seed), to repeat it.
    pub config: BenchArgs,
    /// Every successful request's TTFT, sorted (for CDF plots and comparisons).
    pub ttft_samples_ms: Vec<f64>,
}

/// One request's outcome.
#[derive(Debug, Default)]
struct Outcome {
    ok: bool,
    error: Option<String>,
    ttft: Option<f64>,
    e2e: f64,
    tokens: usize,
    endpoint: Option<String>,
}

type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn send(client: &Client, url: &str, body: Bytes, stream: bool) -> Outcome {
    let start = Instant::now();
    let mut out = Outcome::default();
    let req = match hyper::Request::post(url).header("content-type", "application/json").body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!("request: {e}"));
            return out;
        }
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(_) => {
            out.error = Some("connect".into());
            return out;
        }
    };
    let status = resp.status();
    out.endpoint = resp
        .headers()
        .get("x-gateway-destination-endpoint-served")
        .or_else(|| resp.headers().get("x-inference-pod"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    let mut full = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            out.error = Some("stream_broken".into());
            return out;
        };
        let Ok(data) = frame.into_data() else { continue };
        if !stream {
            full.extend_from_slice(&data);
            continue;
        }
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            if token_event(&event) {
                out.tokens += 1;
                out.ttft.get_or_insert(start.elapsed().as_secs_f64());
            }
        }
    }
    out.e2e = start.elapsed().as_secs_f64();
    if !status.is_success() {
        out.error = Some(format!("http_{}", status.as_u16()));
        return out;
    }
    if !stream {
        out.ttft = Some(out.e2e);
        out.tokens = serde_json::from_slice::<serde_json::Value>(&full)
            .ok()
            .and_then(|v| v["usage"]["completion_tokens"].as_u64())
            .unwrap_or(0) as usize;
    }
    out.ok = true;
    out
}

/// A live progress line on the terminal (none when stderr is not one).
fn progress_bar(
    total: usize,
    done: Arc<std::sync::atomic::AtomicUsize>,
    started: Instant,
) -> Option<tokio::task::JoinHandle<()>> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || total == 0 {
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            let n = done.load(std::sync::atomic::Ordering::Relaxed);
            let filled = n * 30 / total;
            #[allow(clippy::print_stderr)]
            {
                eprint!(
                    "\r[{}{}] {n}/{total} requests, {:.1} s",
                    "#".repeat(filled),
                    " ".repeat(30 - filled),
                    started.elapsed().as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }))
}

/// Whether an SSE event carries generated text (chat `delta.content` or completions `text`).
fn token_event(event: &[u8]) -> bool {
    let Some(data) = event.strip_prefix(b"data:") else { return false };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data.trim_ascii()) else { return false };
    let choice = &v["choices"][0];
    [&choice["delta"]["content"], &choice["text"]].iter().any(|t| t.as_str().is_some_and(|s| !s.is_empty()))
}

/// Sums every series of `name` in a Prometheus text exposition.
fn sum_series(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' ')))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

async fn counters(urls: &[String]) -> Option<(f64, f64)> {
    if urls.is_empty() {
        return None;
    }
    let client: Client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let (mut hits, mut queries) = (0.0, 0.0);
    for u in urls {
        let req = hyper::Request::get(u.as_str()).body(Full::new(Bytes::new())).ok()?;
        let resp = client.request(req).await.ok()?;
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        let text = String::from_utf8_lossy(&body);
        hits += sum_series(&text, "vllm:prefix_cache_hits_total");
        queries += sum_series(&text, "vllm:prefix_cache_queries_total");
    }
    Some((hits, queries))
}

/// Runs a benchmark and returns its report.
pub async fn run_bench(args: BenchArgs) -> anyhow::Result<Report> {
    let mut arrivals: Option<Vec<f64>> = None;
    let mut items: Vec<Item> = match args.workload.as_str() {
        "trace" => {
            let path = args.trace.as_ref().context("--workload trace needs --trace FILE")?;
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let timed = workload::trace(&text, args.block_size.max(1))
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            arrivals = Some(timed.iter().map(|(t, _)| t * args.trace_time_scale.max(0.0)).collect());
            timed.into_iter().map(|(_, item)| item).collect()
        }
        w @ ("shared-prefix" | "multi-turn") => {
            let make = if w == "shared-prefix" { workload::shared_prefix } else { workload::multi_turn };
            make(
                args.seed,
                args.groups,
                args.prompts_per_group,
                args.system_prompt_len,
                args.question_len,
                args.output_len,
            )
        }
        "random" => workload::random(
            args.seed,
            args.num_prompts.unwrap_or(50),
            args.system_prompt_len + args.question_len,
            args.output_len,
        ),
        other => bail!("unknown workload `{other}` (shared-prefix, multi-turn, random, trace)"),
    };
    if let Some(n) = args.num_prompts {
        items.truncate(n);
    }
    let stream = !args.no_stream;
    let url = format!("{}/v1/chat/completions", args.base_url.trim_end_matches('/'));
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    let before = counters(&args.metrics_url).await;
    let limit = Arc::new(tokio::sync::Semaphore::new(args.max_concurrency.max(1)));
    let mut rng = fastrand::Rng::with_seed(args.seed ^ 0xa11);
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = progress_bar(items.len(), done.clone(), started);
    let mut next_at = Duration::ZERO;
    let mut tasks = Vec::with_capacity(items.len());
    for (k, item) in items.iter().enumerate() {
        if let Some(at) = arrivals.as_ref().and_then(|a| a.get(k)) {
            tokio::time::sleep_until((started + Duration::from_secs_f64(*at)).into()).await;
        } else if let Some(rate) = args.request_rate.filter(|r| *r > 0.0) {
            next_at += Duration::from_secs_f64(-(1.0 - rng.f64()).ln() / rate);
            tokio::time::sleep_until((started + next_at).into()).await;
        }
        let permit = limit.clone().acquire_owned().await.context("semaphore")?;
        let messages: Vec<serde_json::Value> =
            item.messages.iter().map(|(r, c)| json!({"role": r, "content": c})).collect();
        let mut body = json!({"model": args.model, "messages": messages, "max_tokens": item.output_len, "ignore_eos": true, "stream": stream});
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        let (client, url, done) = (client.clone(), url.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let out = send(&client, &url, Bytes::from(body.to_string()), stream).await;
            drop(permit);
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            out
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.context("request task")?);
    }
    let duration = started.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
        #[allow(clippy::print_stderr)]
        {
            eprintln!();
        }
    }
    let after = counters(&args.metrics_url).await;
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let mut errors_by_kind = BTreeMap::new();
    for o in outcomes.iter().filter(|o| !o.ok) {
        *errors_by_kind.entry(o.error.clone().unwrap_or_else(|| "unknown".into())).or_insert(0) += 1;
    }
    let mut per_endpoint = BTreeMap::new();
    for o in &ok {
        *per_endpoint.entry(o.endpoint.clone().unwrap_or_else(|| "unknown".into())).or_insert(0usize) += 1;
    }
    let hot_spot_factor = (!per_endpoint.is_empty()).then(|| {
        let max = per_endpoint.values().copied().max().unwrap_or(0) as f64;
        max / (ok.len() as f64 / per_endpoint.len() as f64)
    });
    let tokens: usize = ok.iter().map(|o| o.tokens).sum();
    let mut ttft_samples_ms: Vec<f64> = ok.iter().filter_map(|o| o.ttft).map(|t| t * 1000.0).collect();
    ttft_samples_ms.sort_by(f64::total_cmp);
    let ms = |f: &dyn Fn(&Outcome) -> Option<f64>| {
        Stats::of(&ok.iter().filter_map(|o| f(o)).map(|s| s * 1000.0).collect::<Vec<_>>())
    };
    Ok(Report {
        requests: outcomes.len(),
        errors: outcomes.len() - ok.len(),
        errors_by_kind,
        duration_s: duration,
        throughput_rps: ok.len() as f64 / duration,
        output_tokens_per_s: tokens as f64 / duration,
        ttft_ms: ms(&|o| o.ttft),
        tpot_ms: ms(&|o| o.ttft.filter(|_| o.tokens > 1).map(|t| (o.e2e - t) / (o.tokens - 1) as f64)),
        e2e_ms: ms(&|o| Some(o.e2e)),
        prefix_cache_hit_rate: match (before, after) {
            (Some((h0, q0)), Some((h1, q1))) if q1 > q0 => Some(((h1 - h0) / (q1 - q0)).clamp(0.0, 1.0)),
            _ => None,
        },
        per_endpoint,
        hot_spot_factor,
        config: args,
        ttft_samples_ms,
    })
}

/// The report as a short table.
pub fn summary(r: &Report) -> String {
    let hit = r.prefix_cache_hit_rate.map_or("-".to_owned(), |h| format!("{:.1}%", h * 100.0));
    format!(
        "requests {} (errors {}) in {:.1} s: {:.1} req/s, {:.0} output tok/s, prefix-cache hit rate {hit}, hot-spot factor {}\n\
         {:<6} {:>9} {:>9} {:>9} {:>9}\n{}",
        r.requests,
        r.errors,
        r.duration_s,
        r.throughput_rps,
        r.output_tokens_per_s,
        r.hot_spot_factor.map_or("-".to_owned(), |h| format!("{h:.2}")),
        "ms",
        "mean",
        "p50",
        "p90",
        "p99",
        [("ttft", r.ttft_ms), ("tpot", r.tpot_ms), ("e2e", r.e2e_ms)]
            .iter()
            .map(|(n, s)| format!("{n:<6} {:>9.1} {:>9.1} {:>9.1} {:>9.1}", s.mean, s.p50, s.p90, s.p99))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// Runs `kvgate bench`: the run, the summary, the report file, the plot.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (output, plot) = (args.output.clone(), args.plot.clone());
    let report = run_bench(args).await?;
    println!("{}", summary(&report));
    if let Some(path) = output {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = plot {
        plot::write_plot(&path, &[("run".to_owned(), report.ttft_samples_ms.clone())])?;
    }
    Ok(())
}

/// `kvgate bench compare`: reports side by side, and their TTFT CDFs overlaid.
pub fn compare(files: &[std::path::PathBuf], plot: Option<&std::path::Path>) -> anyhow::Result<String> {
    let mut rows = vec![format!(
        "{:<24} {:>8} {:>7} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "report", "requests", "errors", "req/s", "out tok/s", "ttft p50", "ttft p90", "ttft p99", "hit", "hotspot"
    )];
    let mut series = Vec::new();
    for f in files {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)
                .with_context(|| format!("{} is not a report", f.display()))?;
        let name = f.file_stem().and_then(|s| s.to_str()).unwrap_or("?").to_owned();
        let num = |p: &str| v.pointer(p).and_then(serde_json::Value::as_f64);
        let opt = |x: Option<f64>, f: &dyn Fn(f64) -> String| x.map_or("-".to_owned(), f);
        rows.push(format!(
            "{:<24} {:>8} {:>7} {:>9.1} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>8}",
            name,
            num("/requests").unwrap_or(0.0),
            num("/errors").unwrap_or(0.0),
            num("/throughput_rps").unwrap_or(0.0),
            num("/output_tokens_per_s").unwrap_or(0.0),
            num("/ttft_ms/p50").unwrap_or(0.0),
            num("/ttft_ms/p90").unwrap_or(0.0),
            num("/ttft_ms/p99").unwrap_or(0.0),
            opt(num("/prefix_cache_hit_rate"), &|h| format!("{:.1}%", h * 100.0)),
            opt(num("/hot_spot_factor"), &|h| format!("{h:.2}")),
        ));
        let samples: Vec<f64> = v["ttft_samples_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default();
        series.push((name, samples));
    }
    if let Some(p) = plot {
        plot::write_plot(p, &series)?;
    }
    Ok(rows.join("\n"))
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
    }

    #[test]
    fn plots_are_svg_with_one_line_per_series() {
        let svg = plot::ttft_cdf_svg(&[("a".into(), vec![1.0, 2.0, 30.0]), ("b<".into(), vec![5.0, 500.0])]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("b&lt;"));
        let png = plot::svg_to_png(&svg).expect("rasterizes");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        // 1440 x 840: the chart at twice its size (IHDR width and height, big-endian).
        assert_eq!(&png[16..24], &[0, 0, 5, 160, 0, 0, 3, 72]);
    }

    #[test]
    fn token_events() {
        assert!(token_event(br#"data: {"choices":[{"delta":{"content":" hi"}}]}"#));
        assert!(token_event(br#"data: {"choices":[{"text":" hi"}]}"#));
        assert!(!token_event(br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#));
        assert!(!token_event(br#"data: {"choices":[],"usage":{}}"#));
        assert!(!token_event(b"data: [DONE]"));
    }

    #[test]
    fn series_are_summed_by_exact_name() {
        let text = "vllm:prefix_cache_hits_total{engine=\"0\"} 10\nvllm:prefix_cache_hits_total{engine=\"1\"} 5\n\
                    vllm:prefix_cache_hits_total_created 99\n# HELP vllm:prefix_cache_hits_total x\n";
        assert_eq!(sum_series(text, "vllm:prefix_cache_hits_total"), 15.0);
    }
}
