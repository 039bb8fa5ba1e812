//! `kvgate bench` as a user runs it, the binary against a simulator on loopback: what it
//! refuses, what it accepts, and the result file a `vllm bench serve` user reads.
#![allow(clippy::disallowed_methods, reason = "the test's own tasks (blocking process runs) end with its runtime")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::start_sim;
use serde_json::Value;

/// Runs the `kvgate` binary with `args`, off the runtime's worker threads (the simulator runs on
/// them).
async fn kvgate(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || Command::new(env!("CARGO_BIN_EXE_kvgate")).args(&args).output().expect("runs"))
        .await
        .expect("joined")
}

/// `kvgate bench` with `flags`.
fn bench(flags: &[&str]) -> Vec<String> {
    std::iter::once("bench").chain(flags.iter().copied()).map(str::to_owned).collect()
}

/// A fresh folder for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvgate-bench-cli-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).expect("JSON")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every number in `v`, with the key it is under.
fn numbers<'a>(key: &'a str, v: &'a Value, out: &mut Vec<(String, f64)>) {
    match v {
        Value::Number(n) => out.push((key.to_owned(), n.as_f64().expect("a JSON number is an f64"))),
        Value::Array(a) => a.iter().for_each(|x| numbers(key, x, out)),
        Value::Object(m) => m.iter().for_each(|(k, x)| numbers(k, x, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_result_dir_is_created() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", "m"]).await;
    let dir = scratch("result-dir");
    let nested = dir.join("runs").join("today");
    let base = sim.url(0);
    let out = kvgate(bench(&[
        "--base-url",
        &base,
        "--model",
        "m",
        "--num-prompts",
        "2",
        "--save-result",
        "--result-dir",
        path(&nested),
        "--result-filename",
        "r.json",
    ]))
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read_json(&nested.join("r.json"))["completed"], 2);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_refuses_what_is_not_a_bench_result() {
    let dir = scratch("compare");
    for (name, text) in [("empty", "{}"), ("other", r#"{"name": "x", "version": 3}"#), ("list", "[1, 2]")] {
        let f = dir.join(format!("{name}.json"));
        std::fs::write(&f, text).expect("write");
        let out = kvgate(bench(&["compare", path(&f)])).await;
        assert!(!out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stdout));
        assert!(stderr(&out).contains("not a kvgate or vLLM bench result"), "{name}: {}", stderr(&out));
    }
    // A `vllm bench serve` result compares, with its own keys' figures.
    let vllm = dir.join("vllm.json");
    let result = serde_json::json!({
        "date": "20261207-120000", "backend": "openai-chat", "num_prompts": 10, "completed": 9, "failed": 1,
        "request_throughput": 2.5, "output_throughput": 321.0, "median_ttft_ms": 12.5, "p99_ttft_ms": 40.0,
        "ttfts": [0.01, 0.02], "errors": ["", ""],
    });
    std::fs::write(&vllm, result.to_string()).expect("write");
    let out = kvgate(bench(&["compare", path(&vllm)])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    let row: Vec<&str> = table.lines().nth(1).expect("a row").split_whitespace().collect();
    assert_eq!(row[..8], ["vllm", "10", "1", "2.5", "321", "12.5", "-", "40.0"], "{table}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The result file carries `vllm bench serve`'s keys with vLLM's meaning; with no
/// `--max-concurrency` every request is in flight at once, as in vLLM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_result_file_speaks_vllm() {
    // Real-time latencies (16 tokens at 10 ms a step): 24 requests sent at once overlap.
    let sim = start_sim(&["--time-scale", "1", "--served-model-name", "org/m"]).await;
    let dir = scratch("keys");
    let file = dir.join("r.json");
    let base = sim.url(0);
    let flags = [
        "--base-url",
        &base,
        "--model",
        "org/m",
        "--dataset-name",
        "random",
        "--num-prompts",
        "24",
        "--random-input-len",
        "32",
        "--output-len",
        "16",
        "--metric-percentiles",
        "50,99",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--output",
        path(&file),
    ];
    let out = kvgate(bench(&flags)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let r = read_json(&file);
    let date = r["date"].as_str().expect("date");
    assert!(
        date.len() == 15 && date.char_indices().all(|(i, c)| if i == 8 { c == '-' } else { c.is_ascii_digit() }),
        "YYYYmmdd-HHMMSS: {date}"
    );
    assert_eq!(r["backend"], "openai-chat");
    assert_eq!(r["endpoint_type"], "openai-chat");
    assert_eq!(r["model_id"], "org/m");
    assert!(r["tokenizer_id"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(r["num_prompts"], 24);
    assert_eq!(r["request_rate"], "inf");
    assert_eq!(r["burstiness"], 1.0);
    assert_eq!(r["max_concurrency"], Value::Null, "no limit unless asked");
    assert_eq!((&r["completed"], &r["failed"]), (&Value::from(24), &Value::from(0)));
    assert_eq!(r["errors"], Value::Array(vec![Value::from(""); 24]), "one per request, empty for successes");
    let peak = r["max_output_tokens_per_s"].as_f64().expect("max_output_tokens_per_s");
    assert!((1.0..=24.0 * 16.0).contains(&peak), "{peak}");
    assert_eq!(r["max_concurrent_requests"], 24, "all sent at once, none waiting on a limit");
    for metric in ["ttft", "tpot", "itl", "e2el"] {
        let (median, p50) = (&r[format!("median_{metric}_ms")], &r[format!("p50_{metric}_ms")]);
        assert!(median.as_f64().is_some() && median == p50, "{metric}: median {median}, p50 {p50}");
    }
    assert_eq!(r["ttft_ms"]["p50"], r["median_ttft_ms"], "DESIGN's p50 is the same statistic");

    // With a rate and a limit, the keys say so.
    let limited =
        [&flags[..], &["--request-rate", "500", "--max-concurrency", "3", "--endpoint", "/v1/completions"]].concat();
    let out = kvgate(bench(&limited)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let r = read_json(&file);
    assert_eq!((&r["request_rate"], &r["max_concurrency"]), (&Value::from(500.0), &Value::from(3)));
    assert_eq!(r["backend"], "openai");
    assert!(
        r["max_concurrent_requests"].as_u64().is_some_and(|n| (1..=3).contains(&n)),
        "{}",
        r["max_concurrent_requests"]
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_all_failed_run_has_no_negative_zeros() {
    let dir = scratch("failed");
    let file = dir.join("r.json");
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let out =
        kvgate(bench(&["--base-url", &dead, "--model", "m", "--num-prompts", "3", "--output", path(&file)])).await;
    assert!(!out.status.success());
    let text = std::fs::read_to_string(&file).expect("written");
    assert!(!text.contains("-0.0"), "{text}");
    let r: Value = serde_json::from_str(&text).expect("JSON");
    // Non-finite numbers would be written as null.
    for k in ["duration", "request_throughput", "output_throughput", "mean_ttft_ms", "std_ttft_ms", "median_itl_ms"] {
        assert!(r[k].is_number(), "{k}: {}", r[k]);
    }
    let mut all = Vec::new();
    numbers("", &r, &mut all);
    for (k, x) in &all {
        assert!(x.is_finite() && x.is_sign_positive(), "{k}: {x}");
    }
    assert_eq!((&r["completed"], &r["failed"]), (&Value::from(0), &Value::from(3)));
    assert_eq!(r["errors"], serde_json::json!(["connect", "connect", "connect"]));
    assert_eq!(r["errors_by_kind"]["connect"], 3);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_prompts_or_zero_concurrency_are_refused() {
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    for (flag, hint) in [("--num-prompts", "at least 1"), ("--max-concurrency", "leave it out")] {
        let out = kvgate(bench(&["--base-url", &dead, "--model", "m", flag, "0", "--max-error-rate", "1"])).await;
        assert!(!out.status.success(), "{flag} 0 accepted");
        assert!(stderr(&out).contains(flag) && stderr(&out).contains(hint), "{}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_url_ending_in_v1_is_the_server_root() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", "m"]).await;
    let dir = scratch("v1");
    for suffix in ["/v1", "/v1/"] {
        let file = dir.join("r.json");
        let base = format!("{}{suffix}", sim.url(0));
        let out =
            kvgate(bench(&["--base-url", &base, "--model", "m", "--num-prompts", "2", "--output", path(&file)])).await;
        assert!(out.status.success(), "{suffix}: {}", stderr(&out));
        assert_eq!(read_json(&file)["completed"], 2);
        assert!(stderr(&out).contains("--base-url") && stderr(&out).contains("/v1"), "a note: {}", stderr(&out));
    }
    std::fs::remove_dir_all(&dir).ok();
}
