//! kvgate as Envoy's endpoint picker, through a real Envoy 1.40 on loopback, with simulators
//! as the model servers.

mod common;

use common::envoy::Envoy;
use common::{client, eventually, get_json, post, start_kvgate, start_sim};
use serde_json::{Value, json};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

struct Setup {
    sims: Vec<common::Sim>,
    _kv: kvgate::serve::Server,
    envoy: Envoy,
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.envoy.listener)
    }
}

async fn setup(n: usize, extra: &str) -> Setup {
    let mut sims = Vec::new();
    for _ in 0..n {
        sims.push(start_sim(&["--time-scale", "0"]).await);
    }
    let eps: Vec<String> = sims.iter().map(|s| format!("{{address: '{}'}}", s.addrs[0])).collect();
    let kv = start_kvgate(&format!(
        "admin_addr: 127.0.0.1:0\n{extra}\npools: [{{name: p, models: ['{MODEL}'], endpoints: [{}]}}]\n",
        eps.join(", ")
    ))
    .await;
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    let ok = eventually(10, || async {
        get_json(&debug).await["pools"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == n && e.iter().all(|e| e["stale"] == false))
    })
    .await;
    assert!(ok, "endpoints scraped");
    let grpc = kv.grpc_addr.port();
    let envoy =
        tokio::task::spawn_blocking(move || Envoy::start("original-dst.yaml", grpc, |t| t)).await.expect("envoy");
    Setup { sims, _kv: kv, envoy }
}

/// Which simulator served a response (by its `x-inference-port`).
fn served_by(r: &reqwest::Response) -> u16 {
    r.headers()["x-inference-port"].to_str().expect("ascii").parse().expect("port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_affinity_and_spread_through_envoy() {
    let s = setup(3, "").await;
    let url = s.url("/v1/chat/completions");
    let system = json!({"role": "system", "content": "You are a careful translator. ".repeat(60)});
    let mut msgs = vec![system];
    let mut home = None;
    for turn in 0..4 {
        msgs.push(json!({"role": "user", "content": format!("translate sentence {turn}")}));
        let r = client()
            .post(&url)
            .body(json!({"model": MODEL, "messages": msgs, "max_tokens": 3}).to_string())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        let port = served_by(&r);
        assert_eq!(*home.get_or_insert(port), port, "turn {turn} moved");
        let v: Value = r.json().await.expect("json");
        if turn > 0 {
            assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0) > 300, "{v}");
        }
        msgs.push(json!({"role": "assistant", "content": "done"}));
    }
    let mut seen = std::collections::HashSet::new();
    for k in 0..6 {
        let body = json!({"model": MODEL, "messages": [{"role": "system", "content": format!("{k} another persona ").repeat(40)}, {"role": "user", "content": "hi"}], "max_tokens": 2});
        let r = client().post(&url).body(body.to_string()).send().await.expect("send");
        assert_eq!(r.status(), 200);
        seen.insert(served_by(&r));
    }
    assert_eq!(seen.len(), 3, "cold requests spread over every endpoint");
    drop(s.sims);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_bodies_and_errors_through_envoy() {
    let s = setup(1, "").await;
    // A stream arrives whole, one event per token.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 9, "stream": true,
                      "stream_options": {"include_usage": true}});
    let text = common::post_text(&s.url("/v1/chat/completions"), &body).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(text.matches("data: ").count(), 1 + 9 + 1 + 1, "{text}");
    // An 8 MB body passes (and is refused by the simulator for its length, not its size).
    let big = json!({"model": MODEL, "prompt": "lorem ipsum ".repeat(700_000), "max_tokens": 1});
    let (status, v) = post(&s.url("/v1/completions"), &big).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("maximum context length")), "{v}");
    // kvgate's own refusals come back as OpenAI errors.
    let (status, v) = post(&s.url("/v1/completions"), &json!({"model": "gpt-17", "prompt": "x"})).await;
    assert_eq!((status, v["error"]["code"].as_str()), (404, Some("model_not_found")));
    let r = client().post(s.url("/v1/chat/completions")).body("{oops").send().await.expect("send");
    assert_eq!(r.status(), 400);
    assert!(r.headers().contains_key("x-llm-d-request-dropped-reason"));
    // A forged destination header is stripped before kvgate decides.
    let r = client()
        .post(s.url("/v1/completions"))
        .header("x-gateway-destination-endpoint", "127.0.0.1:1")
        .body(json!({"model": MODEL, "prompt": "hello", "max_tokens": 1}).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(&r), s.sims[0].addrs[0].port());
    // Every endpoint down: 503 with a reason.
    drop(s);
    let dead = common::free_port();
    let kv = start_kvgate(&format!("admin_addr: 127.0.0.1:0\npools: [{{name: p, models: ['{MODEL}'], endpoints: [{{address: '127.0.0.1:{dead}'}}]}}]\n")).await;
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    assert!(
        eventually(10, || async { get_json(&debug).await["pools"][0]["endpoints"][0]["health"] == "unhealthy" }).await
    );
    let grpc = kv.grpc_addr.port();
    let envoy =
        tokio::task::spawn_blocking(move || Envoy::start("original-dst.yaml", grpc, |t| t)).await.expect("envoy");
    let r = client()
        .post(format!("http://{}/v1/completions", envoy.listener))
        .body(json!({"model": MODEL, "prompt": "x"}).to_string())
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    assert_eq!(
        r.headers().get("x-llm-d-request-dropped-reason").map(|v| v.to_str().unwrap_or("")),
        Some("rejected-no-endpoints")
    );
    let v: Value = r.json().await.expect("json");
    assert_eq!(status, 503, "{v}");
}
