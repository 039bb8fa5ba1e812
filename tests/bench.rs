//! `kvgate bench` against a simulator: a short run gives sane numbers.
#![allow(clippy::disallowed_methods, reason = "the test's own tasks (blocking process runs) end with its runtime")]

mod common;

use common::start_sim;
use kvgate::tools::bench::{BenchArgs, run_bench};

/// Bench flags as a user would type them, aimed at `sim` with model `m`.
fn bench_args(sim: &common::Sim, flags: &[&str]) -> BenchArgs {
    let base = sim.url(0);
    let all = ["--base-url", base.as_str(), "--model", "m"].into_iter().chain(flags.iter().copied());
    kvgate::tools::cli::parse_flags::<BenchArgs, _, _>("bench", all).expect("valid bench flags")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_against_a_simulator() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", "m", "--pod-name", "sim-a"]).await;
    let metrics = format!("{}/metrics", sim.url(0));
    let args = bench_args(
        &sim,
        &[
            "--max-concurrency",
            "4",
            "--groups",
            "3",
            "--prompts-per-group",
            "4",
            "--system-prompt-len",
            "500",
            "--question-len",
            "20",
            "--output-len",
            "8",
            "--seed",
            "1",
            "--metrics-url",
            &metrics,
        ],
    );
    let r = run_bench(args.clone()).await.expect("runs");
    assert_eq!((r.requests, r.failed), (12, 0));
    assert_eq!(r.per_endpoint.get("sim-a"), Some(&12));
    assert!((r.output_tokens_per_s * r.duration_s - 96.0).abs() < 1e-6, "8 tokens × 12 requests");
    assert!(r.ttft_ms.p50 > 0.0 && r.ttft_ms.p50 <= r.e2e_ms.p50);
    // 3 system prompts shared 4 ways: most prompt tokens after the first of each group are hits.
    let hit = r.prefix_cache_hit_rate.expect("hit rate from /metrics");
    assert!((0.5..0.8).contains(&hit), "{hit}");
    // Non-streaming too; and the report is JSON with the contract's fields.
    let r = run_bench(BenchArgs { no_stream: true, ..args }).await.expect("runs");
    assert_eq!(r.failed, 0);
    let v = serde_json::to_value(&r).expect("json");
    for k in [
        "requests",
        "errors",
        "errors_by_kind",
        "duration_s",
        "throughput_rps",
        "output_tokens_per_s",
        "ttft_ms",
        "tpot_ms",
        "e2e_ms",
        "prefix_cache_hit_rate",
        "per_endpoint",
    ] {
        assert!(v.get(k).is_some(), "{k}");
    }
    assert!(v["ttft_ms"].get("p99").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_replays_with_its_prefix_sharing() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", "m"]).await;
    let dir = std::env::temp_dir().join(format!("kvgate-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let file = dir.join("trace.jsonl");
    let lines: Vec<String> = (0..6)
        .map(|i| {
            format!(
                r#"{{"timestamp": {}, "input_length": 300, "output_length": 4, "hash_ids": [7, 8, {}]}}"#,
                i * 20,
                100 + i
            )
        })
        .collect();
    std::fs::write(&file, lines.join("\n")).expect("write trace");
    let metrics = format!("{}/metrics", sim.url(0));
    let trace = file.to_str().expect("utf-8 path");
    let args = bench_args(
        &sim,
        &[
            "--workload",
            "trace",
            "--trace",
            trace,
            "--block-size",
            "100",
            "--max-concurrency",
            "8",
            "--metrics-url",
            &metrics,
        ],
    );
    let r = run_bench(args).await.expect("runs");
    assert_eq!((r.requests, r.failed), (6, 0));
    assert!(r.duration_s >= 0.1, "arrivals follow the timestamps (last at 100 ms)");
    // Two shared 100-token blocks of 300: after the first request, about two thirds hit.
    let hit = r.prefix_cache_hit_rate.expect("hit rate");
    assert!((0.45..0.7).contains(&hit), "{hit}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_round_trip_through_compare() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", "m"]).await;
    let dir = std::env::temp_dir().join(format!("kvgate-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let mut files = Vec::new();
    for (name, groups) in [("one-group", 1), ("four-groups", 4)] {
        let groups = groups.to_string();
        let args = bench_args(
            &sim,
            &[
                "--max-concurrency",
                "2",
                "--groups",
                &groups,
                "--prompts-per-group",
                "3",
                "--system-prompt-len",
                "200",
                "--question-len",
                "10",
                "--output-len",
                "2",
                "--seed",
                "5",
            ],
        );
        let r = run_bench(args).await.expect("runs");
        assert_eq!(r.ttft_samples_ms.len(), r.requests - r.failed);
        let f = dir.join(format!("{name}.json"));
        std::fs::write(&f, serde_json::to_string(&r).expect("json")).expect("write");
        files.push(f);
    }
    let svg = dir.join("ttft.svg");
    let table = kvgate::tools::bench::compare(&files, Some(&svg)).expect("compares");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[1].starts_with("one-group") && lines[2].starts_with("four-groups"), "{table}");
    assert!(lines[2].split_whitespace().nth(1) == Some("12"), "{table}");
    let svg = std::fs::read_to_string(svg).expect("plot written");
    assert_eq!(svg.matches("<polyline").count(), 2);
    let png = dir.join("ttft.png");
    kvgate::tools::bench::compare(&files, Some(&png)).expect("compares to PNG");
    assert!(std::fs::read(&png).expect("png written").starts_with(b"\x89PNG"));
    assert!(kvgate::tools::bench::compare(&files, Some(&dir.join("ttft.gif"))).is_err());
    assert!(kvgate::tools::bench::compare(&[dir.join("missing.json")], None).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_bench_serve_names_and_keys() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", "m"]).await;
    let metrics = format!("{}/metrics", sim.url(0));
    let flags = [
        "--dataset-name",
        "random",
        "--groups",
        "2",
        "--prompts-per-group",
        "3",
        "--random-input-len",
        "64",
        "--random-output-len",
        "5",
        "--endpoint",
        "/v1/completions",
        "--percentile-metrics",
        "ttft,e2el",
        "--metric-percentiles",
        "50,99.9",
        "--goodput",
        "ttft:60000",
        "tpot:60000",
        "--num-warmups",
        "2",
        "--request-rate",
        "400",
        "--burstiness",
        "0.5",
        "--ignore-eos",
        "--metrics-url",
        &metrics,
    ];
    let r = run_bench(bench_args(&sim, &flags)).await.expect("runs");
    // `--workload random` makes groups × prompts-per-group prompts; warm-ups are not counted.
    assert_eq!((r.requests, r.failed), (6, 0));
    let v = serde_json::to_value(&r).expect("json");
    assert_eq!(v["completed"], 6);
    assert_eq!(v["total_output_tokens"], 30, "5 tokens each, through /v1/completions");
    assert!(v["total_input_tokens"].as_u64().is_some_and(|n| n >= 6 * 60), "{}", v["total_input_tokens"]);
    assert_eq!(v["request_goodput"].as_f64(), v["request_throughput"].as_f64(), "every request met the SLOs");
    for k in [
        "duration",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "std_ttft_ms",
        "p50_ttft_ms",
        "p99.9_ttft_ms",
        "p99_ttft_ms",
        "p50_e2el_ms",
        "mean_tpot_ms",
        "p99_tpot_ms",
        "mean_itl_ms",
        "median_itl_ms",
        "p99_itl_ms",
        "mean_e2el_ms",
        // DESIGN.md's keys beside them.
        "throughput_rps",
        "ttft_ms",
        "e2e_ms",
        "per_endpoint",
        "hot_spot_factor",
        "prefix_cache_hit_rate",
    ] {
        assert!(v.get(k).is_some_and(|x| !x.is_null()), "{k} in {v}");
    }
    assert!(v.get("p50_tpot_ms").is_none(), "tpot was not among --percentile-metrics");
    // Four gaps between five tokens per request.
    assert!(v["mean_itl_ms"].as_f64().is_some_and(|x| x >= 0.0));
    let strict = bench_args(&sim, &["--num-prompts", "3", "--goodput", "ttft:0.000001"]);
    let v = serde_json::to_value(run_bench(strict).await.expect("runs")).expect("json");
    assert_eq!(v["request_goodput"], 0.0, "no request meets a 1 ns TTFT");
    for bad in [&["--goodput", "latency:5"][..], &["--endpoint", "/v1/embeddings"], &["--percentile-metrics", "x"]] {
        assert!(run_bench(bench_args(&sim, bad)).await.is_err(), "{bad:?}");
    }
}

/// `kvgate bench` as a user runs it: every request failing is a non-zero exit with the report
/// still written; a closed stdout (`| head -1`) is neither a panic nor a lost report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_and_a_closed_stdout() {
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(format!("kvgate-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let failed = dir.join("failed.json");
    let out = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["bench", "--base-url", &dead, "--model", "m", "--num-prompts", "3", "--output"])
        .arg(&failed)
        .output()
        .expect("runs");
    assert!(!out.status.success(), "all requests failed, yet exit 0");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("failed: connect × 3") && stdout.contains("no request succeeded"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 of 3 requests failed"));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&failed).expect("written")).expect("JSON");
    assert_eq!(report["failed"], 3);
    // Allowed by --max-error-rate: exit 0.
    let out = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["bench", "--base-url", &dead, "--model", "m", "--num-prompts", "2", "--max-error-rate", "1"])
        .output()
        .expect("runs");
    assert!(out.status.success());

    let sim = start_sim(&["--time-scale", "0", "--served-model-name", "org/m"]).await;
    let saved = dir.join("saved");
    std::fs::create_dir_all(&saved).expect("dir");
    let piped = dir.join("piped.json");
    let base = sim.url(0);
    let report_file = piped.clone();
    let status = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["bench", "--base-url", &base, "--model", "org/m", "--num-prompts", "4", "--save-result"])
            .arg("--result-dir")
            .arg(&saved)
            .arg("--output")
            .arg(&report_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runs");
        // The reader goes away before anything is printed.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("waits");
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned(), saved)
    })
    .await
    .expect("joined");
    let (status, stderr, saved) = status;
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&piped).expect("written")).expect("JSON");
    assert_eq!(report["completed"], 4);
    let names: Vec<String> =
        std::fs::read_dir(&saved).expect("dir").filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    assert!(
        names.len() == 1 && names[0].starts_with("kvgate-infqps-m-") && names[0].ends_with(".json"),
        "vLLM's name pattern: {names:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
