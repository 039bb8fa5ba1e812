//! What kvgate learns from the responses it relays, with real simulators and the proxy on
//! loopback: prefill and decode counted apart and released on every path, each endpoint's TTFT
//! model and the pool's bytes per token, cache feedback on the index, and scrapes that slow
//! down while kvgate's own counts explain an endpoint's load.

mod common;

use std::time::Duration;

use common::{client, eventually, gateway, get_json, metric, metrics, post};
use futures_util::StreamExt;
use serde_json::{Value, json};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

async fn endpoint0(kv: &kvgate::tools::serve::Server) -> Value {
    get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await["pools"][0]["endpoints"][0].clone()
}

fn text(seed: u64, words: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..words)
        .map(|_| ["alpha", "bravo", "charlie", "delta", "echo", "fox"][rng.usize(..6)])
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_and_decode_are_counted_apart_and_released() {
    let fleet = gateway(MODEL).sim(&["--time-scale", "1"]).proxy().start().await;
    let (sim, kv) = (&fleet.sims[0], &fleet.kv);
    let url = format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"));
    let r = client()
        .post(&url)
        .body(json!({"model": MODEL, "prompt": text(1, 400), "max_tokens": 5000, "stream": true}).to_string())
        .send()
        .await
        .expect("send");
    let mut stream = r.bytes_stream();
    stream.next().await.expect("a first chunk").expect("ok");
    // Past its first token: in decode, its prompt tokens no longer wait.
    let e = endpoint0(kv).await;
    assert_eq!(
        (&e["in_flight_requests"], &e["in_prefill_requests"], &e["in_decode_requests"]),
        (&json!(1), &json!(0), &json!(1)),
        "{e}"
    );
    assert_eq!(e["in_flight_tokens"], 0, "{e}");
    // The client goes away mid-decode: everything is released once.
    drop(stream);
    let released = eventually(10, || async {
        let e = endpoint0(kv).await;
        e["in_flight_requests"] == 0 && e["in_decode_requests"] == 0 && e["in_prefill_requests"] == 0
    })
    .await;
    assert!(released, "{}", endpoint0(kv).await);

    // A request that fails before any byte (the endpoint answers 500) leaves nothing counted.
    let admin = format!("{}/admin/faults", sim.url(0));
    let r = client().post(&admin).body(json!({"fail_next": 1, "failure_types": ["500"]}).to_string()).send().await;
    assert_eq!(r.expect("faults").status(), 200);
    let (status, _) = post(&url, &json!({"model": MODEL, "prompt": text(2, 50), "max_tokens": 4})).await;
    assert_eq!(status, 500);
    let e = endpoint0(kv).await;
    assert_eq!(
        (&e["in_flight_requests"], &e["in_prefill_requests"], &e["in_flight_tokens"]),
        (&json!(0), &json!(0), &json!(0)),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttft_models_and_bytes_per_token_learn_from_responses() {
    let fleet = gateway(MODEL).sim(&["--time-scale", "0.5"]).proxy().start().await;
    let kv = &fleet.kv;
    let proxy = format!("http://{}", kv.proxy_addr.expect("proxy"));
    for k in 0..12u64 {
        let body = json!({"model": MODEL, "prompt": text(k, 100 + 150 * k as usize), "max_tokens": 2, "stream": true,
                          "stream_options": {"include_usage": true}});
        let r = client().post(format!("{proxy}/v1/completions")).body(body.to_string()).send().await.expect("send");
        assert_eq!(r.status(), 200);
        r.text().await.expect("stream");
    }
    // A non-streamed answer teaches bytes per token but is no TTFT sample.
    let (status, _) =
        post(&format!("{proxy}/v1/completions"), &json!({"model": MODEL, "prompt": text(99, 300), "max_tokens": 2}))
            .await;
    assert_eq!(status, 200);
    let learned = eventually(5, || async { endpoint0(kv).await["ttft_model"]["samples"] == 12 }).await;
    let e = endpoint0(kv).await;
    assert!(learned, "{e}");
    let m = &e["ttft_model"];
    assert_ne!(m["prefill_tokens_per_s"].as_f64(), Some(kvgate::routing::ttft::PRIOR_PREFILL_TOKENS_PER_S), "{m}");
    let pool = &get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await["pools"][0];
    assert_eq!(pool["bytes_per_token"]["samples"], 13, "{pool}");
    let bpt = pool["bytes_per_token"]["value"].as_f64().expect("bytes per token");
    assert!(bpt != 4.0 && (2.0..8.0).contains(&bpt), "{bpt}");
    // The explanation shows each endpoint's prediction and model.
    let explain = format!("http://{}/debug/explain?path=/v1/completions", kv.admin_addr);
    let r = client().post(explain).body(json!({"model": MODEL, "prompt": text(5, 20)}).to_string()).send().await;
    let x: Value = r.expect("explain").json().await.expect("JSON");
    let ep = &x["explanation"]["endpoints"][0];
    assert!(ep["predicted_ttft_ms"].as_f64().is_some_and(|t| t > 0.0), "{x}");
    assert_eq!(ep["ttft_model"]["samples"], 12, "{x}");
}

/// Fills a small simulator cache so that the first prompt is evicted there while kvgate's index,
/// sized by default (no `vllm:cache_config_info`), still holds it.
async fn evict_behind_the_index(proxy: &str, first: &str) {
    for k in 0..6 {
        let (s, _) = post(
            &format!("{proxy}/v1/completions"),
            &json!({"model": MODEL, "prompt": text(100 + k, 700), "max_tokens": 1}),
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, body) =
        post(&format!("{proxy}/v1/completions"), &json!({"model": MODEL, "prompt": first, "max_tokens": 1})).await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_feedback_corrects_an_index_that_believes_too_much() {
    let flags = ["--time-scale", "0", "--num-gpu-blocks-override", "200", "--no-cache-config-info"];
    let fleet = gateway(MODEL).sim(&flags).proxy().start().await;
    let kv = &fleet.kv;
    let proxy = format!("http://{}", kv.proxy_addr.expect("proxy"));
    let corrections = |direction: &'static str| {
        let admin = format!("http://{}/metrics", kv.admin_addr);
        async move {
            let text = client().get(admin).send().await.expect("metrics").text().await.expect("text");
            metric(&text, "kvgate_prefix_index_corrections_total", &[("direction", direction)]).unwrap_or(0.0)
        }
    };
    let first = text(1, 700);
    let (s, _) =
        post(&format!("{proxy}/v1/completions"), &json!({"model": MODEL, "prompt": first, "max_tokens": 1})).await;
    assert_eq!(s, 200);
    // Held where the index says: no correction.
    let (_, again) =
        post(&format!("{proxy}/v1/completions"), &json!({"model": MODEL, "prompt": first, "max_tokens": 1})).await;
    assert!(again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(0), "{again}");
    assert_eq!(corrections("held_less").await, 0.0);
    let before = endpoint0(kv).await["prefix_capacity"].as_u64().expect("capacity");
    evict_behind_the_index(&proxy, &first).await;
    assert_eq!(corrections("held_less").await, 1.0);
    let after = endpoint0(kv).await["prefix_capacity"].as_u64().expect("capacity");
    assert!(after < before, "capacity {before} → {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cached_tokens_nothing_is_corrected() {
    let flags = [
        "--time-scale",
        "0",
        "--num-gpu-blocks-override",
        "200",
        "--no-cache-config-info",
        "--no-prompt-tokens-details",
    ];
    let fleet = gateway(MODEL).sim(&flags).proxy().start().await;
    let kv = &fleet.kv;
    let proxy = format!("http://{}", kv.proxy_addr.expect("proxy"));
    let first = text(1, 700);
    let (s, body) =
        post(&format!("{proxy}/v1/completions"), &json!({"model": MODEL, "prompt": first, "max_tokens": 1})).await;
    assert_eq!(s, 200);
    assert!(body["usage"].get("prompt_tokens_details").is_none(), "{body}");
    let before = endpoint0(kv).await["prefix_capacity"].clone();
    evict_behind_the_index(&proxy, &first).await;
    let text = metrics(&format!("http://{}", kv.admin_addr)).await;
    assert_eq!(
        metric(&text, "kvgate_prefix_index_corrections_total", &[]),
        None,
        "no correction without cached_tokens"
    );
    assert_eq!(endpoint0(kv).await["prefix_capacity"], before);
}

/// `/metrics` scrapes the simulator has answered.
async fn scrapes(base: &str) -> f64 {
    metric(&metrics(base).await, "http_requests_total", &[("handler", "/metrics")]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_speed_up_only_while_the_load_is_unexplained() {
    let scrape = "scrape: {interval_ms: 1000, fast_interval_ms: 100}";
    let fleet = gateway(MODEL).sim(&["--time-scale", "1"]).proxy().config(scrape).start().await;
    let sim = &fleet.sims[0];
    // Idle and explained: about one scrape a second (each of ours adds one too).
    let a = scrapes(&sim.url(0)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = scrapes(&sim.url(0)).await - a - 1.0;
    assert!(idle <= 4.0, "{idle} scrapes in 2 s while explained");
    // Another client loads the endpoint behind kvgate's back: scraped faster.
    let direct = format!("{}/v1/completions", sim.url(0));
    let mut held = Vec::new();
    for k in 0..4 {
        let r = client()
            .post(&direct)
            .body(json!({"model": MODEL, "prompt": text(k, 30), "max_tokens": 5000, "stream": true}).to_string())
            .send()
            .await
            .expect("send");
        held.push(r.bytes_stream());
    }
    for s in &mut held {
        s.next().await.expect("a first chunk").expect("ok");
    }
    // kvgate sees the load at its next scrape and speeds up: wait until it scrapes faster than
    // its idle interval allows (two or more in 400 ms, besides our own).
    let sped_up = eventually(5, || async {
        let before = scrapes(&sim.url(0)).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        scrapes(&sim.url(0)).await - before - 1.0 >= 2.0
    })
    .await;
    assert!(sped_up, "scrapes speed up while the load is unexplained");
    let b = scrapes(&sim.url(0)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = scrapes(&sim.url(0)).await - b - 1.0;
    assert!(busy >= 8.0, "{busy} scrapes in 2 s while unexplained");
    drop(held);
}
