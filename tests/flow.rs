//! Flow control through the proxy: requests wait in kvgate (not in the engine) while the
//! endpoints that could take them are saturated, leave the queue by priority band and, within
//! a band, by flow in turn; sheddable requests are refused at once; a TTL bounds the wait (503
//! for a pool with no endpoint); a client that leaves takes its place with it. The simulators run
//! in real time (a request of `max_tokens: n` takes about n engine steps of 10 ms).
#![allow(clippy::disallowed_methods)] // the test's own clients run as plain tokio tasks

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, client, eventually, gateway, get_json, metric, metrics};
use serde_json::{Value, json};

const MODEL: &str = "flow-model";

/// The objectives of the tests' pools.
const OBJECTIVES: &str =
    "objectives: [{name: critical, priority: 10}, {name: bulk, priority: 0}, {name: batch, priority: -1}]";

fn body(max_tokens: u32) -> Value {
    json!({"model": MODEL, "prompt": "tell me a story", "max_tokens": max_tokens})
}

/// A completion through the proxy with `headers`: status, when it ended, its response headers.
async fn send(fleet: &Fleet, max_tokens: u32, headers: &[(&str, &str)]) -> (u16, Instant, reqwest::header::HeaderMap) {
    let mut req = client().post(format!("{}/v1/completions", fleet.proxy())).json(&body(max_tokens));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("an answer");
    let (status, h) = (r.status().as_u16(), r.headers().clone());
    let _ = r.bytes().await;
    (status, Instant::now(), h)
}

/// The pool's queue as `/debug/endpoints` shows it: `(priority, requests)` per band.
async fn bands(fleet: &Fleet) -> Vec<(i64, u64)> {
    let v = fleet.endpoints().await;
    v["pools"][0]["flow_control"]["bands"]
        .as_array()
        .map(|b| b.iter().map(|x| (x["priority"].as_i64().unwrap_or(0), x["requests"].as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

/// The sum of every series of `name`.
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn in_flight(fleet: &Fleet) -> u64 {
    let v = fleet.endpoints().await;
    v["pools"][0]["endpoints"].as_array().into_iter().flatten().filter_map(|e| e["in_flight_requests"].as_u64()).sum()
}

/// Waits until the queue shows exactly `want`.
async fn queued(fleet: &Fleet, want: &[(i64, u64)]) {
    let ok = eventually(10, || async { bands(fleet).await == want }).await;
    assert!(ok, "the queue is {:?}, not {want:?}", bands(fleet).await);
}

/// A request that holds the one endpoint for about `max_tokens` × 10 ms, once it is in flight.
async fn blocker(fleet: &'static Fleet, max_tokens: u32) -> tokio::task::JoinHandle<(u16, Instant)> {
    let h = tokio::spawn(async move {
        let (s, t, _) = send(fleet, max_tokens, &[]).await;
        (s, t)
    });
    assert!(eventually(10, || async { in_flight(fleet).await == 1 }).await, "the blocker is in flight");
    h
}

/// A flow-controlled pool whose one endpoint takes one request at a time (`more`: further
/// `flow_control` keys), kept for the whole test.
async fn one_at_a_time(more: &str) -> &'static Fleet {
    let flow = format!("flow_control: {{enabled: true, max_requests_per_endpoint: 1{more}}}");
    let fleet = gateway(MODEL).sim(&["--max-num-seqs", "8"]).proxy().pool(&flow).pool(OBJECTIVES).start().await;
    Box::leak(Box::new(fleet))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_queues_in_kvgate_and_serves_the_higher_band_first() {
    let fleet = one_at_a_time("").await;
    let sim = fleet.sims[0].url(0);
    let first = blocker(fleet, 60).await;
    // Priority 0 first (an objective nobody configured is 0), then priority 10.
    let low = tokio::spawn(send(
        fleet,
        2,
        &[("x-llm-d-inference-objective", "unknown-objective"), ("x-llm-d-inference-fairness-id", "tenant-a")],
    ));
    queued(fleet, &[(0, 1)]).await;
    let high = tokio::spawn(send(fleet, 2, &[("x-gateway-inference-objective", "critical")]));
    queued(fleet, &[(10, 1), (0, 1)]).await;
    // They wait in kvgate: the engine queues none of them.
    let engine = metrics(&sim).await;
    assert_eq!(sum(&engine, "vllm:num_requests_waiting"), 0.0, "nothing waits in the engine");
    let kv = metrics(&fleet.admin()).await;
    let size = |p: &str, f: &str| {
        metric(&kv, "inference_extension_flow_control_queue_size", &[("priority", p), ("fairness_id", f)])
    };
    assert_eq!((size("10", "default-flow"), size("0", "tenant-a")), (Some(1.0), Some(1.0)));
    // A sheddable request is refused at once, not queued.
    let t = Instant::now();
    let (status, _, h) = send(fleet, 2, &[("x-llm-d-inference-objective", "batch")]).await;
    assert_eq!(status, 429);
    assert!(t.elapsed() < Duration::from_secs(2), "refused at once, took {:?}", t.elapsed());
    assert_eq!(h["x-llm-d-request-dropped-reason"], "rejected-saturated");
    assert!(h.contains_key("retry-after"));
    let (s0, t0) = first.await.expect("blocker");
    let (sh, th, _) = high.await.expect("high");
    let (sl, tl, _) = low.await.expect("low");
    assert_eq!((s0, sh, sl), (200, 200, 200));
    assert!(t0 <= th && th < tl, "the blocker, then priority 10, then priority 0");
    assert_eq!(bands(fleet).await, vec![]);
    // Flow control's headers are kvgate's: the endpoint never sees them.
    let seen = get_json(&format!("{sim}/admin/last_request_headers")).await;
    for h in ["x-llm-d-inference-objective", "x-llm-d-inference-fairness-id", "x-gateway-inference-objective"] {
        assert!(seen.get(h).is_none(), "`{h}` reached the endpoint: {seen}");
    }
    let kv = metrics(&fleet.admin()).await;
    let waited = |p: &str, outcome: &str| {
        metric(
            &kv,
            "inference_extension_flow_control_request_queue_duration_seconds_count",
            &[("priority", p), ("outcome", outcome)],
        )
    };
    // Every request of a flow-controlled pool is counted: the blocker and priority 0's, one at
    // once and one after waiting.
    let at_once = metric(
        &kv,
        "inference_extension_flow_control_request_queue_duration_seconds_bucket",
        &[("priority", "0"), ("outcome", "dispatched"), ("le", "0")],
    );
    assert_eq!(at_once, Some(1.0));
    assert_eq!(
        (waited("10", "dispatched"), waited("0", "dispatched"), waited("-1", "shed")),
        (Some(1.0), Some(2.0), Some(1.0))
    );
    assert_eq!(in_flight(fleet).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_of_one_band_take_turns() {
    let fleet = one_at_a_time("").await;
    let first = blocker(fleet, 40).await;
    let mut big = Vec::new();
    for i in 0..3 {
        big.push(tokio::spawn(send(fleet, 2, &[("x-llm-d-inference-fairness-id", "big")])));
        queued(fleet, &[(0, i + 1)]).await;
    }
    let small = tokio::spawn(send(fleet, 2, &[("x-llm-d-inference-fairness-id", "small")]));
    queued(fleet, &[(0, 4)]).await;
    let v = fleet.endpoints().await;
    assert_eq!(v["pools"][0]["flow_control"]["bands"][0]["flows"], json!({"big": 3, "small": 1}));
    first.await.expect("blocker");
    let mut ends = Vec::new();
    for h in big {
        ends.push(h.await.expect("big").1);
    }
    let (status, small_end, _) = small.await.expect("small");
    assert_eq!(status, 200);
    // In turn: big's first, then small's only one, before big's second and third.
    assert!(
        ends[0] < small_end && small_end < ends[1] && ends[1] < ends[2],
        "order: big {ends:?}, small {small_end:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_bounded_and_a_wait_by_its_ttl() {
    let fleet = one_at_a_time(", ttl_ms: 400, max_requests_per_band: 1").await;
    let first = blocker(fleet, 150).await;
    let waiting = tokio::spawn(send(fleet, 2, &[]));
    queued(fleet, &[(0, 1)]).await;
    // The band holds one request: the next is refused.
    let (status, _, h) = send(fleet, 2, &[]).await;
    assert_eq!(status, 429);
    assert_eq!(h["x-llm-d-request-dropped-reason"], "rejected-saturated");
    // The waiting one gives up after its TTL, while the endpoint is still busy.
    let (status, _, h) = waiting.await.expect("answered");
    assert_eq!(status, 429);
    assert_eq!(h["x-llm-d-request-dropped-reason"], "rejected-ttl-expired");
    assert!(!first.is_finished(), "the blocker still runs");
    assert_eq!(bands(fleet).await, vec![]);
    assert_eq!(first.await.expect("blocker").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_queued_leaves_nothing_behind() {
    let fleet = one_at_a_time("").await;
    let sim = fleet.sims[0].url(0);
    let first = blocker(fleet, 80).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().expect("client");
    let gone = impatient.post(format!("{}/v1/completions", fleet.proxy())).json(&body(2)).send().await;
    assert!(gone.is_err(), "the client gave up");
    assert!(eventually(5, || async { bands(fleet).await.is_empty() }).await, "its place is given up");
    let kv = metrics(&fleet.admin()).await;
    assert_eq!(metric(&kv, "inference_extension_flow_control_queue_size", &[("priority", "0")]), Some(0.0));
    assert_eq!(metric(&kv, "inference_extension_flow_control_queue_bytes", &[("priority", "0")]), Some(0.0));
    assert_eq!(first.await.expect("blocker").0, 200);
    assert!(eventually(5, || async { in_flight(fleet).await == 0 }).await);
    // Nothing of it is held (the blocker's body went with its answer), and the engine only ever
    // saw the blocker.
    let kv = metrics(&fleet.admin()).await;
    assert_eq!(metric(&kv, "kvgate_buffered_request_bytes", &[]), Some(0.0));
    let engine = metrics(&sim).await;
    assert_eq!(sum(&engine, "vllm:request_success_total"), 1.0, "one request reached the engine:\n{engine}");
}

/// A pool that scales from zero: its requests wait for an endpoint (503 past the TTL), and go
/// as soon as one is discovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_pool_holds_requests_until_an_endpoint_comes() {
    let sim = common::start_sim(&["--served-model-name", MODEL, "--time-scale", "0"]).await;
    let dir = std::env::temp_dir().join(format!("kvgate-flow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("endpoints.yaml");
    std::fs::write(&file, "endpoints: []\n").expect("write");
    let yaml = format!(
        "admin_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:0\npools:\n  - name: p\n    models: ['{MODEL}']\n    \
         endpoints_file: '{}'\n    flow_control: {{enabled: true, ttl_ms: 500}}\n",
        file.display()
    );
    let kv = common::start_kvgate(&yaml).await;
    let url = format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"));
    let t = Instant::now();
    let r = client().post(&url).json(&body(2)).send().await.expect("answered");
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["x-llm-d-request-dropped-reason"], "rejected-ttl-expired");
    assert!(t.elapsed() >= Duration::from_millis(400), "it waited its TTL: {:?}", t.elapsed());
    drop(kv);
    // With a longer TTL, the request is served once the endpoint is discovered.
    let yaml = yaml.replace("ttl_ms: 500", "ttl_ms: 20000");
    let kv = common::start_kvgate(&yaml).await;
    let url = format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"));
    let waiting =
        tokio::spawn(async move { client().post(&url).json(&body(2)).send().await.map(|r| r.status().as_u16()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the request waits for an endpoint");
    std::fs::write(&file, format!("endpoints: [{{address: '{}'}}]\n", sim.addrs[0])).expect("write");
    let status = tokio::time::timeout(Duration::from_secs(15), waiting).await.expect("in time").expect("joined");
    assert_eq!(status.expect("answered"), 200);
}

/// With no bound set, the request bound is learned from the endpoint's scrapes: the running
/// requests it had when it queued some. From then on kvgate holds the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bound_is_learned_from_the_engine() {
    let fleet = gateway(MODEL)
        .sim(&["--max-num-seqs", "2"])
        .proxy()
        .config("scrape: {interval_ms: 200, fast_interval_ms: 100}")
        .pool("flow_control: {enabled: true}")
        .start()
        .await;
    let fleet: &'static Fleet = Box::leak(Box::new(fleet));
    let wave = |n: usize| (0..n).map(|_| tokio::spawn(send(fleet, 30, &[]))).collect::<Vec<_>>();
    for h in wave(6) {
        assert_eq!(h.await.expect("joined").0, 200);
    }
    let learned = fleet.endpoints().await["pools"][0]["flow_control"]["learned_requests"].clone();
    let bound = learned.as_object().and_then(|m| m.values().next()).and_then(Value::as_u64);
    assert!(matches!(bound, Some(2 | 3)), "the engine's batch of 2 is learned: {learned}");
    // A second wave waits in kvgate.
    let sim = fleet.sims[0].url(0);
    let handles = wave(8);
    let mut most = 0.0f64;
    while !handles.iter().all(tokio::task::JoinHandle::is_finished) {
        let engine = metrics(&sim).await;
        most = most.max(metric(&engine, "vllm:num_requests_waiting", &[]).unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for h in handles {
        assert_eq!(h.await.expect("joined").0, 200);
    }
    // Without the bound the engine would queue 6 of the 8; with it, only what a probe for more
    // room sends (one, rarely two when a queueing scrape missed the first probe).
    assert!(most <= 2.0, "the engine queued {most} of kvgate's requests");
}

/// With `ordering: edf`, a flow's requests leave by deadline: arrival plus their TTFT objective.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edf_serves_the_earliest_deadline_first() {
    let fleet = one_at_a_time(", ordering: edf").await;
    let first = blocker(fleet, 40).await;
    let relaxed = tokio::spawn(send(fleet, 2, &[("x-llm-d-slo-ttft-ms", "30000")]));
    queued(fleet, &[(0, 1)]).await;
    let urgent = tokio::spawn(send(fleet, 2, &[("x-slo-ttft-ms", "2000")]));
    queued(fleet, &[(0, 2)]).await;
    first.await.expect("blocker");
    let (s1, t_relaxed, _) = relaxed.await.expect("relaxed");
    let (s2, t_urgent, _) = urgent.await.expect("urgent");
    assert_eq!((s1, s2), (200, 200));
    assert!(t_urgent < t_relaxed, "the earlier deadline went first");
}

/// kvgate's requests in flight on each endpoint of the pool, in its order.
async fn per_endpoint(fleet: &Fleet) -> Vec<u64> {
    let v = fleet.endpoints().await;
    v["pools"][0]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["in_flight_requests"].as_u64().unwrap_or(0))
        .collect()
}

/// While a higher band is busy, a lower one keeps an endpoint with nothing in prefill, and the
/// higher band's next request goes there rather than beside a prefill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_band_leaves_an_endpoint_free_of_prefill_for_a_busy_higher_band() {
    // A prompt of a few hundred tokens takes seconds to prefill on these engines.
    let slow = ["--max-num-seqs", "8", "--prefill-ms-per-token", "10"];
    let fleet = gateway(MODEL)
        .sim(&slow)
        .sim(&slow)
        .proxy()
        .pool("flow_control: {enabled: true, max_requests_per_endpoint: 8}")
        .pool(OBJECTIVES)
        .start()
        .await;
    let fleet: &'static Fleet = Box::leak(Box::new(fleet));
    // Each its own prompt, so no prefix pulls one request to another's endpoint.
    let long = |objective: &'static str, n: u32| {
        tokio::spawn(async move {
            let prompt = format!("{n} {}", "many words ".repeat(150));
            let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": true});
            let r = client()
                .post(format!("{}/v1/completions", fleet.proxy()))
                .header("x-llm-d-inference-objective", objective)
                .json(&body)
                .send()
                .await
                .expect("an answer");
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            status
        })
    };
    // The critical band has a request (a short one), so it is busy for the next 10 s.
    assert_eq!(send(fleet, 1, &[("x-llm-d-inference-objective", "critical")]).await.0, 200);
    let first = long("bulk", 1);
    assert!(eventually(10, || async { per_endpoint(fleet).await.iter().sum::<u64>() == 1 }).await);
    // The second bulk request goes beside the first's prefill, not to the idle endpoint.
    let second = long("bulk", 2);
    let ok = eventually(10, || async {
        let mut n = per_endpoint(fleet).await;
        n.sort_unstable();
        n == [0, 2]
    })
    .await;
    assert!(ok, "bulk kept one endpoint idle: {:?}", per_endpoint(fleet).await);
    // The critical request takes the idle one.
    let critical = long("critical", 3);
    let ok = eventually(10, || async {
        let mut n = per_endpoint(fleet).await;
        n.sort_unstable();
        n == [1, 2]
    })
    .await;
    assert!(ok, "critical went to the idle endpoint: {:?}", per_endpoint(fleet).await);
    for h in [first, second, critical] {
        assert_eq!(h.await.expect("joined"), 200);
    }
}
