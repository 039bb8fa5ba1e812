//! `kvgate bench`: drives a seeded workload against any OpenAI-compatible server (kvgate, a
//! vLLM replica, another router) and measures what clients feel — time to first token, time per
//! output token, end-to-end latency, throughput, errors — and, from the endpoints' `/metrics`,
//! the prefix-cache hit rate. Writes a JSON report.

mod args;
mod compare;
mod plot;
mod report;
pub(crate) mod workload;

pub use args::BenchArgs;
pub use compare::compare;
use report::{Goodput, METRICS, Samples, Timeline};
pub use report::{Report, Stats, percentile, summary};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;

use workload::Item;

use crate::gateway::tasks::{Task, Tasks};

/// One request's outcome.
#[derive(Debug, Default)]
struct Outcome {
    ok: bool,
    /// When it was sent, seconds since the run started.
    start: f64,
    error: Option<String>,
    ttft: Option<f64>,
    e2e: f64,
    tokens: usize,
    /// Prompt tokens, from the usage the server reported.
    input_tokens: u64,
    /// Times between successive token events, seconds.
    itl: Vec<f64>,
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
    let mut last_token: Option<f64> = None;
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
            let (token, usage) = sse_event(&event);
            if token {
                let now = start.elapsed().as_secs_f64();
                if let Some(last) = last_token.replace(now) {
                    out.itl.push(now - last);
                }
                out.tokens += 1;
                out.ttft.get_or_insert(now);
            }
            if let Some(u) = usage {
                out.input_tokens = u;
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
        let v = serde_json::from_slice::<serde_json::Value>(&full).unwrap_or_default();
        out.tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
        out.input_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    }
    out.ok = true;
    out
}

/// The progress line after `n` of `total` requests and `secs` seconds.
fn progress_line(n: usize, total: usize, secs: f64) -> String {
    let filled = n.min(total) * 30 / total.max(1);
    format!("\r[{}{}] {n}/{total} requests, {secs:.1} s", "#".repeat(filled), " ".repeat(30 - filled))
}

/// A live progress line on the terminal (none when stderr is not one), a task of `tasks` that
/// ends when its handle is dropped.
fn progress_bar(
    tasks: &Tasks,
    total: usize,
    done: Arc<std::sync::atomic::AtomicUsize>,
    started: Instant,
) -> Option<Task> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || total == 0 {
        return None;
    }
    Some(tasks.spawn("bench progress", async move {
        loop {
            let n = done.load(std::sync::atomic::Ordering::Relaxed);
            #[allow(clippy::print_stderr)]
            {
                eprint!("{}", progress_line(n, total, started.elapsed().as_secs_f64()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }))
}

/// A Gamma(`shape`, `scale`) draw (Marsaglia and Tsang; below shape 1 by the boost
/// `Gamma(k) = Gamma(k + 1) · U^(1/k)`), from uniform draws of `rng`.
fn gamma(rng: &mut fastrand::Rng, shape: f64, scale: f64) -> f64 {
    if shape < 1.0 {
        let u = 1.0 - rng.f64();
        return gamma(rng, shape + 1.0, scale) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        // A standard normal draw (Box–Muller).
        let (u1, u2) = (1.0 - rng.f64(), rng.f64());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.f64();
        if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return d * v * scale;
        }
    }
}

/// What an SSE event says: it carries generated text (chat `delta.content` or completions
/// `text`); the prompt tokens of the usage it reports.
fn sse_event(event: &[u8]) -> (bool, Option<u64>) {
    let Some(data) = event.strip_prefix(b"data:") else { return (false, None) };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data.trim_ascii()) else { return (false, None) };
    let choice = &v["choices"][0];
    let token =
        [&choice["delta"]["content"], &choice["text"]].iter().any(|t| t.as_str().is_some_and(|s| !s.is_empty()));
    (token, v["usage"]["prompt_tokens"].as_u64())
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

/// The workload's requests, and their arrival times when it is a trace.
fn workload_items(args: &BenchArgs) -> anyhow::Result<(Vec<Item>, Option<Vec<f64>>)> {
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
            args.num_prompts.unwrap_or(args.groups * args.prompts_per_group),
            args.random_input_len.unwrap_or(args.system_prompt_len + args.question_len),
            args.output_len,
        ),
        other => bail!("unknown workload `{other}` (shared-prefix, multi-turn, random, trace)"),
    };
    if let Some(n) = args.num_prompts {
        items.truncate(n);
    }
    Ok((items, arrivals))
}

/// A request body for `item` on the API `args.endpoint` names.
fn request_body(args: &BenchArgs, item: &Item, stream: bool) -> anyhow::Result<Bytes> {
    let mut body = match args.endpoint.as_str() {
        "/v1/chat/completions" => {
            let messages: Vec<serde_json::Value> =
                item.messages.iter().map(|(r, c)| json!({"role": r, "content": c})).collect();
            json!({"model": args.model, "messages": messages})
        }
        "/v1/completions" => {
            let prompt: Vec<&str> = item.messages.iter().map(|(_, c)| c.as_str()).collect();
            json!({"model": args.model, "prompt": prompt.join("\n")})
        }
        other => bail!("--endpoint `{other}`: kvgate bench drives /v1/chat/completions or /v1/completions"),
    };
    body["max_tokens"] = json!(item.output_len);
    body["ignore_eos"] = json!(!args.no_ignore_eos);
    body["stream"] = json!(stream);
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    Ok(Bytes::from(body.to_string()))
}

/// The percentiles `--metric-percentiles` asks for, and the metrics `--percentile-metrics` names.
fn percentile_flags(args: &BenchArgs) -> anyhow::Result<(Vec<&str>, Vec<f64>)> {
    let metrics: Vec<&str> = args.percentile_metrics.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
    if let Some(m) = metrics.iter().find(|m| !METRICS.contains(m)) {
        bail!("--percentile-metrics: `{m}` is not one of {}", METRICS.join(", "));
    }
    let mut ps = Vec::new();
    for p in args.metric_percentiles.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.parse::<f64>() {
            Ok(v) if v > 0.0 && v <= 100.0 => ps.push(v),
            _ => bail!("--metric-percentiles: `{p}` is not a percentile in (0, 100]"),
        }
    }
    Ok((metrics, ps))
}

/// Runs a benchmark and returns its report.
pub async fn run_bench(args: BenchArgs) -> anyhow::Result<Report> {
    let (items, arrivals) = workload_items(&args)?;
    let (selected, percentiles) = percentile_flags(&args)?;
    let goodput = Goodput::parse(&args.goodput)?;
    if !(args.burstiness.is_finite() && args.burstiness > 0.0) {
        bail!("--burstiness must be a positive number");
    }
    let stream = !args.no_stream;
    let url = format!("{}{}", args.server_root().0, args.endpoint);
    let bodies = items.iter().map(|item| request_body(&args, item, stream)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    // No `--max-concurrency`: no limit, as in vLLM.
    let most = tokio::sync::Semaphore::MAX_PERMITS;
    let limit = Arc::new(tokio::sync::Semaphore::new(args.max_concurrency.map_or(most, |n| n.clamp(1, most))));
    // The run's tasks: requests, warm-ups and the progress line.
    let owner = Tasks::new();
    warm_up(&owner, &client, &url, &bodies, args.num_warmups, stream, &limit).await?;
    let before = counters(&args.metrics_url).await;
    let mut rng = fastrand::Rng::with_seed(args.seed ^ 0xa11);
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = progress_bar(&owner, items.len(), done.clone(), started);
    let mut next_at = Duration::ZERO;
    let mut tasks = Vec::with_capacity(items.len());
    for (k, body) in bodies.into_iter().enumerate() {
        if let Some(at) = arrivals.as_ref().and_then(|a| a.get(k)) {
            tokio::time::sleep_until((started + Duration::from_secs_f64(*at)).into()).await;
        } else if let Some(rate) = args.arrival_rate() {
            let gap = gamma(&mut rng, args.burstiness, 1.0 / (rate * args.burstiness));
            next_at += Duration::from_secs_f64(gap.min(3600.0));
            tokio::time::sleep_until((started + next_at).into()).await;
        }
        let permit = limit.clone().acquire_owned().await.context("semaphore")?;
        let (client, url, done) = (client.clone(), url.clone(), done.clone());
        tasks.push(owner.spawn("bench request", async move {
            let start = started.elapsed().as_secs_f64();
            let out = Outcome { start, ..send(&client, &url, body, stream).await };
            drop(permit);
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            out
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.context("a request task did not finish")?);
    }
    let duration = started.elapsed().as_secs_f64();
    if let Some(p) = progress {
        drop(p);
        // The last frame: every request is done.
        #[allow(clippy::print_stderr)]
        {
            eprintln!("{}", progress_line(done.load(std::sync::atomic::Ordering::Relaxed), items.len(), duration));
        }
    }
    let after = counters(&args.metrics_url).await;
    let date = timestamp(std::time::SystemTime::now());
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let mut errors_by_kind = BTreeMap::new();
    for o in outcomes.iter().filter(|o| !o.ok) {
        *errors_by_kind.entry(error_kind(o)).or_insert(0) += 1;
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
    let tpot = |o: &Outcome| o.ttft.filter(|_| o.tokens > 1).map(|t| (o.e2e - t) / (o.tokens - 1) as f64);
    let ms = |f: &dyn Fn(&Outcome) -> Option<f64>| ok.iter().filter_map(|o| f(o)).map(|s| s * 1000.0).collect();
    let mut samples = Samples::default();
    samples.by_metric.insert("ttft", ms(&|o| o.ttft));
    samples.by_metric.insert("tpot", ms(&tpot));
    samples.by_metric.insert("itl", ok.iter().flat_map(|o| o.itl.iter().map(|s| s * 1000.0)).collect());
    samples.by_metric.insert("e2el", ms(&|o| Some(o.e2e)));
    let good = (!goodput.0.is_empty()).then(|| {
        ok.iter()
            .filter(|o| goodput.met(o.ttft.unwrap_or(o.e2e) * 1000.0, tpot(o).map(|t| t * 1000.0), o.e2e * 1000.0))
            .count()
    });
    let input: u64 = ok.iter().map(|o| o.input_tokens).sum();
    let mut vllm = report::setup_keys(&args, outcomes.len(), &date);
    vllm.extend(report::vllm_keys((ok.len(), input, tokens as u64), duration, &samples, &selected, &percentiles, good));
    vllm.extend(report::peaks(&ok.iter().map(|o| timeline(o)).collect::<Vec<_>>()));
    let per_s = duration.max(1e-9);
    Ok(Report {
        requests: outcomes.len(),
        failed: outcomes.len() - ok.len(),
        errors: outcomes.iter().map(|o| if o.ok { String::new() } else { error_kind(o) }).collect(),
        errors_by_kind,
        duration_s: duration,
        throughput_rps: ok.len() as f64 / per_s,
        output_tokens_per_s: tokens as f64 / per_s,
        ttft_ms: Stats::of(&samples.by_metric["ttft"]),
        tpot_ms: Stats::of(&samples.by_metric["tpot"]),
        e2e_ms: Stats::of(&samples.by_metric["e2el"]),
        prefix_cache_hit_rate: match (before, after) {
            (Some((h0, q0)), Some((h1, q1))) if q1 > q0 => Some(((h1 - h0) / (q1 - q0)).clamp(0.0, 1.0)),
            _ => None,
        },
        per_endpoint,
        hot_spot_factor,
        vllm,
        config: args,
        ttft_samples_ms,
    })
}

/// Warm-ups: the workload's first `count` requests (cycling), sent (as tasks of `owner`) and
/// waited for, not measured.
async fn warm_up(
    owner: &Tasks,
    client: &Client,
    url: &str,
    bodies: &[Bytes],
    count: usize,
    stream: bool,
    limit: &Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<()> {
    let mut warm = Vec::new();
    for body in bodies.iter().cycle().take(if bodies.is_empty() { 0 } else { count }) {
        let (client, url, body, limit) = (client.clone(), url.to_owned(), body.clone(), limit.clone());
        warm.push(owner.spawn("bench warm-up", async move {
            let _permit = limit.acquire_owned().await;
            send(&client, &url, body, stream).await
        }));
    }
    for w in warm {
        w.await.context("a warm-up task did not finish")?;
    }
    Ok(())
}

/// A failed request's kind of error.
fn error_kind(o: &Outcome) -> String {
    o.error.clone().unwrap_or_else(|| "unknown".into())
}

/// A successful request's timeline: the first token event brings what the others do not (all of
/// a non-streamed answer), each later one a token.
fn timeline(o: &Outcome) -> Timeline {
    let mut tokens = Vec::with_capacity(o.itl.len() + 1);
    if let Some(ttft) = o.ttft {
        let mut t = o.start + ttft;
        tokens.push((t, o.tokens.saturating_sub(o.itl.len())));
        for gap in &o.itl {
            t += gap;
            tokens.push((t, 1));
        }
    }
    Timeline { start: o.start, end: o.start + o.e2e, tokens }
}

/// `--save-result`'s file: `--result-filename` in `--result-dir`, or vLLM's pattern of name with
/// the run's `date`.
fn result_path(args: &BenchArgs, date: &str) -> std::path::PathBuf {
    let name = args.result_filename.clone().unwrap_or_else(|| {
        let rate = args.arrival_rate().map_or("inf".to_owned(), |r| r.to_string());
        let model = args.model.rsplit('/').next().unwrap_or(&args.model);
        format!("kvgate-{rate}qps-{model}-{date}.json")
    });
    args.result_dir.clone().unwrap_or_default().join(name)
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn timestamp(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Runs `kvgate bench`: the run, the report files, the plot, then the summary (a closed
/// stdout is not an error: the files are written first). The report's folders are made before
/// the run, so a finished run is not lost to a missing one. Fails when more requests failed than
/// `--max-error-rate` allows.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (output, plot) = (args.output.clone(), args.plot.clone());
    let title = format!("{} workload, {}", args.workload, args.endpoint);
    let max_error_rate = args.max_error_rate;
    let result_dir = args.save_result.then(|| args.result_dir.clone().unwrap_or_default());
    let output_dir = output.as_deref().and_then(std::path::Path::parent);
    for dir in result_dir.iter().map(std::path::PathBuf::as_path).chain(output_dir) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if let (root, true) = args.server_root() {
        #[allow(clippy::print_stderr)]
        {
            eprintln!(
                "note: --base-url {} names /v1, which --endpoint starts with: sending to {root}{}",
                args.base_url, args.endpoint
            );
        }
    }
    let report = run_bench(args).await?;
    let date = report.vllm.get("date").and_then(serde_json::Value::as_str).unwrap_or_default();
    let saved = report.config.save_result.then(|| result_path(&report.config, date));
    let json = serde_json::to_string_pretty(&report)?;
    for path in output.iter().chain(saved.iter()) {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = plot {
        plot::write_plot(&path, &title, &[("run".to_owned(), report.ttft_samples_ms.clone())])?;
    }
    print_out(&summary(&report))?;
    let rate = if report.requests == 0 { 0.0 } else { report.failed as f64 / report.requests as f64 };
    if rate > max_error_rate {
        bail!(
            "{} of {} requests failed ({:.1}%), more than --max-error-rate {max_error_rate} allows",
            report.failed,
            report.requests,
            rate * 100.0
        );
    }
    Ok(())
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_progress_frame_is_every_request() {
        assert!(progress_line(80, 80, 1.0).contains("80/80 requests"));
        assert!(progress_line(80, 80, 1.0).contains(&"#".repeat(30)));
        assert!(progress_line(0, 0, 0.0).contains("0/0"));
    }

    #[test]
    fn gamma_draws_have_the_asked_mean() {
        let mut rng = fastrand::Rng::with_seed(7);
        for shape in [0.5, 1.0, 4.0] {
            let n = 20_000;
            let mean = (0..n).map(|_| gamma(&mut rng, shape, 0.25 / shape)).sum::<f64>() / f64::from(n);
            assert!((mean - 0.25).abs() < 0.01, "shape {shape}: mean {mean}");
        }
    }

    #[test]
    fn timestamps_are_utc_civil_time() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_796_296_547);
        assert_eq!(timestamp(t), "20261203-111547");
        assert_eq!(timestamp(std::time::UNIX_EPOCH), "19700101-000000");
    }

    #[test]
    fn plots_are_svg_with_one_line_per_series() {
        let svg = plot::ttft_cdf_svg(
            "shared-prefix workload",
            &[("a".into(), vec![1.0, 2.0, 30.0]), ("b<".into(), vec![5.0, 500.0, 500.0])],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("b&lt;"));
        // A title naming the workload, labelled axes, 0 and 1 on the fraction axis, each
        // series' percentiles written in (interpolated between ranks: a's p99 is 98% of the way
        // from 2 to 30), and a time axis fitted to the data (0.8 to 625 ms).
        assert!(svg.contains("Time to first token: shared-prefix workload (6 requests)"));
        assert!(svg.contains("time to first token (ms, log scale)") && svg.contains("fraction of requests"));
        assert!(svg.contains(">0</text>") && svg.contains(">1</text>"));
        assert!(svg.contains("p50 2.00 ms") && svg.contains("p99 29.4 ms") && svg.contains("p90 500 ms"));
        assert!(!svg.contains(">1000</text>") && !svg.contains(">0.10</text>"), "no empty decades");
        let png = plot::svg_to_png(&svg).expect("rasterizes");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        // 1440 x 840: the chart at twice its size (IHDR width and height, big-endian).
        assert_eq!(&png[16..24], &[0, 0, 5, 160, 0, 0, 3, 72]);
    }

    #[test]
    fn token_events() {
        let token_event = |e: &[u8]| sse_event(e).0;
        assert!(token_event(br#"data: {"choices":[{"delta":{"content":" hi"}}]}"#));
        assert!(token_event(br#"data: {"choices":[{"text":" hi"}]}"#));
        assert!(!token_event(br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#));
        assert!(!token_event(br#"data: {"choices":[],"usage":{}}"#));
        assert!(!token_event(b"data: [DONE]"));
        assert_eq!(sse_event(br#"data: {"choices":[],"usage":{"prompt_tokens":12}}"#), (false, Some(12)));
    }

    #[test]
    fn series_are_summed_by_exact_name() {
        let text = "vllm:prefix_cache_hits_total{engine=\"0\"} 10\nvllm:prefix_cache_hits_total{engine=\"1\"} 5\n\
                    vllm:prefix_cache_hits_total_created 99\n# HELP vllm:prefix_cache_hits_total x\n";
        assert_eq!(sum_series(text, "vllm:prefix_cache_hits_total"), 15.0);
    }
}
