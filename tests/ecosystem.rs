//! kvgate as the tools of the field see it: the official `openai` SDK against the proxy (a
//! vLLM server's paths and errors), `/health` following the pools, and kvgate's `/metrics`
//! with every Gateway API Inference Extension family, checked by `promtool`.
#![allow(clippy::disallowed_methods, reason = "the test's own tasks (blocking process runs) end with its runtime")]

mod common;

use std::process::Command;

use common::{SimProcess, client, eventually, gateway, metric, post, start_kvgate, start_sim};
use serde_json::json;

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const OPENAI: &str = "openai==3.57.0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_sees_a_vllm_server() {
    let sims = [start_sim(&["--time-scale", "0"]).await, start_sim(&["--time-scale", "0"]).await];
    let limited = start_sim(&["--time-scale", "1", "--served-model-name", "limited"]).await;
    let yaml = format!(
        "admin_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:0\npools:\n\
         - {{name: p, models: ['{MODEL}'], endpoints: [{{address: '{}'}}, {{address: '{}'}}]}}\n\
         - {{name: l, models: [limited], admission: {{max_in_flight: 1}}, endpoints: [{{address: '{}'}}]}}\n",
        sims[0].addrs[0], sims[1].addrs[0], limited.addrs[0]
    );
    let kv = start_kvgate(&yaml).await;
    let models = format!("http://{}/v1/models", kv.proxy_addr.expect("proxy"));
    // The model list carries max_model_len once the endpoints' lists are read.
    assert!(
        eventually(10, || async {
            common::get_json(&models).await["data"][0]["max_model_len"].as_u64().is_some_and(|n| n > 0)
        })
        .await,
        "{}",
        common::get_json(&models).await
    );
    let python = tokio::task::spawn_blocking(|| common::python_venv("openai-venv", &[OPENAI])).await.expect("venv");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/openai_probe.py");
    let root = format!("http://{}", kv.proxy_addr.expect("proxy"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python).arg(script).args([root.as_str(), MODEL, "limited"]).output()
    })
    .await
    .expect("join")
    .expect("python runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the SDK probe failed:\n{stdout}\n{stderr}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_pools_and_version_comes_from_an_endpoint() {
    let sim = SimProcess::start(&["--port", "0", "--time-scale", "0"]);
    let fleet = gateway(MODEL).address(sim.addr).proxy().config("health: {failure_threshold: 1}").start().await;
    let kv = &fleet.kv;
    let root = format!("http://{}", kv.proxy_addr.expect("proxy"));
    let r = client().get(format!("{root}/health")).send().await.expect("health");
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.expect("body").is_empty());
    let r = client().get(format!("{root}/version")).send().await.expect("version");
    assert_eq!(r.headers()["x-gateway-destination-endpoint-served"], sim.addr.to_string().as_str());
    let v: serde_json::Value = r.json().await.expect("json");
    assert!(v["version"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    let r = client().post(format!("{root}/health")).send().await.expect("health");
    assert_eq!(r.status(), 405);
    drop(sim);
    let health = format!("{root}/health");
    let down = eventually(10, || async { client().get(&health).send().await.is_ok_and(|r| r.status() == 503) }).await;
    assert!(down, "/health turns 503 once no endpoint is in rotation");
    let v: serde_json::Value = client().get(&health).send().await.expect("health").json().await.expect("json");
    assert_eq!(v["error"]["code"], "no_healthy_endpoints", "{v}");
    // With nothing to ask, /version is a 503 too, not a hang.
    let r = client().get(format!("{root}/version")).send().await.expect("version");
    assert!(r.status().is_server_error(), "{}", r.status());
}

/// promtool from Debian's prometheus package (`ci/promtool.sh` fetches it), or `KVGATE_PROMTOOL`.
fn promtool() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("KVGATE_PROMTOOL") {
        return p.into();
    }
    let out = common::ci_script("promtool.sh").stderr(std::process::Stdio::inherit()).output().expect("promtool.sh");
    assert!(out.status.success(), "ci/promtool.sh failed");
    String::from_utf8(out.stdout).expect("a path").trim().into()
}

/// Runs `promtool check metrics` on `text`; its verdict and what it said.
fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool ends");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The families the Inference Extension's endpoint picker exports for its requests and pools.
pub const GIE_FAMILIES: &[&str] = &[
    "inference_objective_request_total",
    "inference_objective_request_error_total",
    "inference_objective_request_duration_seconds",
    "inference_objective_normalized_time_per_output_token_seconds",
    "inference_objective_request_sizes",
    "inference_objective_response_sizes",
    "inference_objective_input_tokens",
    "inference_objective_output_tokens",
    "inference_objective_running_requests",
    "inference_extension_info",
    "inference_pool_average_kv_cache_utilization",
    "inference_pool_average_queue_size",
    "inference_pool_per_pod_queue_size",
    "inference_pool_ready_pods",
    "inference_extension_scheduler_e2e_duration_seconds",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_every_inference_extension_family_and_pass_promtool() {
    // `ghost` is routed to the pool but the simulator does not serve it: an upstream 404.
    let fleet = gateway(MODEL).also_serving("ghost").sims(1).proxy().start().await;
    let kv = &fleet.kv;
    let proxy = format!("http://{}", kv.proxy_addr.expect("proxy"));
    let chat = |model: &str, stream: bool| {
        json!({"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 7,
               "stream": stream, "stream_options": {"include_usage": true}})
    };
    let (status, v) = post(&format!("{proxy}/v1/chat/completions"), &chat(MODEL, false)).await;
    assert_eq!(status, 200, "{v}");
    let text = common::post_text(&format!("{proxy}/v1/chat/completions"), &chat(MODEL, true)).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let (status, _) = post(&format!("{proxy}/v1/chat/completions"), &chat("gpt-17", false)).await;
    assert_eq!(status, 404);
    let (status, _) = post(&format!("{proxy}/v1/chat/completions"), &chat("ghost", false)).await;
    assert_eq!(status, 404);
    let text = common::metrics(&format!("http://{}", kv.admin_addr)).await;
    for family in GIE_FAMILIES {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family} missing:\n{text}");
    }
    let model = [("model_name", MODEL), ("target_model_name", MODEL)];
    assert_eq!(metric(&text, "inference_objective_request_total", &model), Some(2.0));
    assert_eq!(metric(&text, "inference_objective_request_duration_seconds_count", &model), Some(2.0));
    assert_eq!(metric(&text, "inference_objective_output_tokens_sum", &model), Some(14.0));
    assert!(metric(&text, "inference_objective_input_tokens_sum", &model).is_some_and(|n| n > 0.0));
    assert!(metric(&text, "inference_objective_response_sizes_sum", &model).is_some_and(|n| n > 100.0));
    assert!(metric(&text, "inference_objective_request_sizes_sum", &model).is_some_and(|n| n > 100.0));
    assert_eq!(metric(&text, "inference_objective_normalized_time_per_output_token_seconds_count", &model), Some(2.0));
    assert_eq!(metric(&text, "inference_objective_running_requests", &[("model_name", MODEL)]), Some(0.0));
    // Refusals are labelled with the model the client asked for, upstream errors with their kind.
    let unknown = [("model_name", "gpt-17"), ("error_code", "model_not_found")];
    assert_eq!(metric(&text, "inference_objective_request_error_total", &unknown), Some(1.0), "{text}");
    let upstream = [("model_name", "ghost"), ("error_code", "not_found")];
    assert_eq!(metric(&text, "inference_objective_request_error_total", &upstream), Some(1.0), "{text}");
    assert_eq!(metric(&text, "inference_extension_info", &[]), Some(1.0));
    // Names of unserved models are the client's to choose: past a bound they count as `other`.
    for k in 0..kvgate::gateway::telemetry::UNKNOWN_MODEL_LABELS + 5 {
        let (status, _) = post(&format!("{proxy}/v1/chat/completions"), &chat(&format!("made-up-{k}"), false)).await;
        assert_eq!(status, 404);
    }
    let text = common::metrics(&format!("http://{}", kv.admin_addr)).await;
    let other = [("model_name", "other"), ("error_code", "model_not_found")];
    assert_eq!(metric(&text, "inference_objective_request_error_total", &other), Some(6.0), "{text}");
    // `gpt-17` and 99 made-up names take the 100 places.
    assert!(text.contains("model_name=\"made-up-98\""), "{text}");
    assert!(!text.contains("model_name=\"made-up-99\""), "{text}");
    let (ok, said) = tokio::task::spawn_blocking(move || promtool_check(&text)).await.expect("join");
    assert!(ok, "promtool check metrics: {said}");
}
