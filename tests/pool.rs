//! Pools against real simulators on loopback: file discovery, scraping, health, staleness,
//! routing by model, in-flight accounting, and bad metrics.
#![allow(clippy::disallowed_methods, reason = "the test's own tasks (stand-in servers) end with its runtime")]

mod common;

use std::time::Duration;

use axum::routing::get;
use common::{SimProcess, chat, eventually, free_port, gateway, get_json, start_kvgate, start_sim};
use kvgate::gateway::answer::Answer;
use kvgate::gateway::error::RouteError;
use kvgate::gateway::facade::{Gateway, Input, RouteRequest, SubsetHint};
use kvgate::gateway::outcome::Routed;
use kvgate::gateway::paths::Place;
use kvgate::routing::request::ApiKind;
use serde_json::{Value, json};

/// Routes a chat body as the proxy would, for one endpoint.
fn decide(gateway: &Gateway, body: &[u8]) -> Result<Routed, Answer> {
    let place = Place::Prompt(ApiKind::ChatCompletions);
    let route =
        RouteRequest { place, input: Input::Body(body), subset: SubsetHint::Any, places: 1, class: Default::default() };
    common::ready(gateway.route(route))
}

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn endpoints_of(v: &Value, pool: usize) -> Vec<Value> {
    v["pools"][pool]["endpoints"].as_array().cloned().unwrap_or_default()
}

/// The first pool's first endpoint (null until discovery has published the list).
fn first_endpoint(v: &Value) -> Value {
    endpoints_of(v, 0).into_iter().next().unwrap_or(Value::Null)
}

/// A chat body with this system prompt, as a client sends it.
fn body(system: &str) -> Vec<u8> {
    chat(MODEL).system(system).user("go").bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_file_edits_apply_and_broken_edits_are_ignored() {
    let (a, b) = (start_sim(&["--time-scale", "0"]).await, start_sim(&["--time-scale", "0"]).await);
    let dir = std::env::temp_dir().join(format!("kvgate-pool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let file = dir.join("endpoints.yaml");
    let write = |text: String| std::fs::write(&file, text).expect("write endpoints file");
    write(format!("endpoints: [{{address: '{}'}}]\n", a.addrs[0]));
    let fleet = gateway(MODEL).pool(&format!("endpoints_file: '{}'", file.display())).start_without_waiting().await;
    let kv = &fleet.kv;
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    let addrs = |v: &Value| {
        endpoints_of(v, 0).iter().map(|e| e["address"].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>()
    };
    assert!(eventually(5, || async { addrs(&get_json(&debug).await) == [a.addrs[0].to_string()] }).await);

    // A request in flight on `a` while `a` is removed keeps its count until it ends.
    let routed = decide(&kv.gateway, &body("x")).expect("routed");
    let in_flight = routed.snapshot().endpoints[routed.decision().primary().index].in_flight.clone();
    assert_eq!(in_flight.requests(), 1);

    // Add b with a label, remove a: applied within a second.
    write(format!("endpoints: [{{address: '{}', labels: {{llm-d.ai/role: decode}}}}]\n", b.addrs[0]));
    let started = std::time::Instant::now();
    assert!(eventually(5, || async { addrs(&get_json(&debug).await) == [b.addrs[0].to_string()] }).await);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(first_endpoint(&get_json(&debug).await)["role"], "decode");
    assert_eq!(in_flight.requests(), 1, "the removed endpoint's request is still counted");
    drop(routed);
    assert_eq!(in_flight.requests(), 0);

    // A broken edit is rejected; the last good set stays.
    write("endpoints: [{address: 'not an address at all'}]\n".into());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(addrs(&get_json(&debug).await), [b.addrs[0].to_string()]);
    write("endpoints: [ {address: \n".into());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(addrs(&get_json(&debug).await), [b.addrs[0].to_string()]);
    // An edit that would empty the pool is taken for a mistake: the last set stays.
    write("endpoints: []\n".into());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(addrs(&get_json(&debug).await), [b.addrs[0].to_string()]);
    // And a good edit after it applies.
    write(format!("endpoints: [{{address: '{}'}}, {{address: '{}'}}]\n", a.addrs[0], b.addrs[0]));
    assert!(eventually(5, || async { addrs(&get_json(&debug).await).len() == 2 }).await);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_numbers_match_the_simulator() {
    let flags = ["--time-scale", "1", "--max-num-seqs", "2", "--num-gpu-blocks-override", "1000"];
    let fleet = gateway(MODEL).sim(&flags).start_without_waiting().await;
    let (sim, kv) = (&fleet.sims[0], &fleet.kv);
    // Three long streams: two run, one waits.
    let mut streams = Vec::new();
    for i in 0..3 {
        let body =
            json!({"model": MODEL, "prompt": format!("{i} tell me everything "), "max_tokens": 5000, "stream": true});
        let r = common::client()
            .post(format!("{}/v1/completions", sim.url(0)))
            .body(body.to_string())
            .send()
            .await
            .expect("send");
        streams.push(r);
    }
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    let matched = eventually(10, || async {
        let e = &first_endpoint(&get_json(&debug).await);
        e["running"] == 2 && e["waiting"] == 1 && e["kv_cache_usage"].as_f64().is_some_and(|k| k > 0.0)
    })
    .await;
    assert!(matched, "{}", get_json(&debug).await);
    let e = &first_endpoint(&get_json(&debug).await);
    // cache_config_info sized the index: 1000 blocks × 16 tokens / 64 tokens per index block.
    assert_eq!(e["prefix_capacity"], 250);
    assert_eq!(e["stale"], false);
    drop(streams);
    assert!(eventually(10, || async { first_endpoint(&get_json(&debug).await)["running"] == 0 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_leaves_rotation_and_comes_back() {
    let port = free_port();
    let sim = SimProcess::start(&["--port", &port.to_string(), "--time-scale", "0"]);
    let health = "health: {backoff_ms: 200, max_backoff_ms: 400}";
    let fleet = gateway(MODEL).address(sim.addr).sims(1).config(health).start_without_waiting().await;
    let (other, kv) = (&fleet.sims[0], &fleet.kv);
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    // (The list is empty until discovery has published it.)
    let health = |v: &Value| endpoints_of(v, 0).first().and_then(|e| e["health"].as_str()).unwrap_or("").to_owned();
    assert!(eventually(5, || async { health(&get_json(&debug).await) == "healthy" }).await);
    drop(sim);
    assert!(eventually(10, || async { health(&get_json(&debug).await) == "unhealthy" }).await, "marked unhealthy");
    // While it is out (once the snapshot shows it), every decision goes to the other endpoint.
    let only_other = || async {
        decide(&kv.gateway, &body("probe")).expect("routed").decision().primary().address == other.addrs[0]
    };
    assert!(eventually(5, only_other).await);
    for i in 0..20 {
        let r = decide(&kv.gateway, &body(&format!("{i}"))).expect("routed");
        assert_eq!(r.decision().primary().address, other.addrs[0]);
    }
    let e = &first_endpoint(&get_json(&debug).await);
    assert!(e["scrape_errors"].as_u64().is_some_and(|n| n >= 3));
    assert!(e["last_error"].is_string());
    let _back = SimProcess::start(&["--port", &port.to_string(), "--time-scale", "0"]);
    assert!(eventually(10, || async { health(&get_json(&debug).await) == "healthy" }).await, "recovered");
}

/// With the default health settings: an endpoint down for a while is back within a couple of
/// seconds of answering again; one that keeps failing soon after each return is held out
/// longer each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_endpoint_returns_at_once_and_a_flapping_one_is_held_out() {
    let port = free_port();
    let flags = ["--port", &port.to_string(), "--time-scale", "0"];
    let mut sim = Some(SimProcess::start(&flags));
    let fleet = gateway(MODEL).address(format!("127.0.0.1:{port}")).sims(1).start_without_waiting().await;
    let kv = &fleet.kv;
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    let health = || async { first_endpoint(&get_json(&debug).await)["health"].as_str().unwrap_or("").to_owned() };
    assert!(eventually(5, || async { health().await == "healthy" }).await);
    // Down for 3 s: its probes fail all along, which does not lengthen its time out.
    drop(sim.take());
    assert!(eventually(10, || async { health().await == "unhealthy" }).await, "ejected");
    tokio::time::sleep(Duration::from_secs(3)).await;
    sim = Some(SimProcess::start(&flags));
    assert!(eventually(3, || async { health().await == "healthy" }).await, "back within a couple of seconds");
    // Now it fails again as soon as it is back, three times: 1 s, 2 s, then 4 s out.
    for round in 0..3 {
        drop(sim.take());
        assert!(eventually(10, || async { health().await != "healthy" }).await, "ejected in round {round}");
        sim = Some(SimProcess::start(&flags));
        if round < 2 {
            assert!(eventually(10, || async { health().await == "healthy" }).await, "back in round {round}");
        }
    }
    // It answers, but it is held out for its flapping.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_ne!(health().await, "healthy", "a flapping endpoint is held out");
    assert!(eventually(10, || async { health().await == "healthy" }).await, "and comes back after its time out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_down_is_a_503_with_a_reason() {
    let port = free_port();
    let fleet = gateway(MODEL).address(format!("127.0.0.1:{port}")).start_without_waiting().await;
    let kv = &fleet.kv;
    // Before the first discovery there are no endpoints; then the only one fails its scrapes.
    let unhealthy = eventually(10, || async {
        matches!(decide(&kv.gateway, &body("x")), Err(a) if a.code == "no_healthy_endpoints")
    })
    .await;
    assert!(unhealthy);
    let e = RouteError::Unavailable(kvgate::routing::schedule::NoDecision::NoHealthyEndpoints);
    assert_eq!(e.status(), 503);
    let body = Answer::from(&e).body;
    assert!(body.contains("unhealthy"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_metrics_count_as_unknown_not_idle() {
    let sim = start_sim(&["--time-scale", "0"]).await;
    let config = |stale_ms: u64| {
        let scrape = format!("scrape: {{interval_ms: 600000, stale_after_ms: {stale_ms}}}");
        gateway(MODEL).address(sim.addrs[0]).config(&scrape).yaml(&[])
    };
    let queue_score = |explained: &Value| {
        explained["explanation"]["endpoints"][0]["scores"]
            .as_array()
            .and_then(|s| s.iter().find(|t| t["scorer"] == "queue-scorer"))
            .map(|t| t["raw"].as_f64().unwrap_or(-1.0))
            .expect("queue-scorer term")
    };
    let explain = |kv: &kvgate::tools::serve::Server| {
        let url = format!("http://{}/debug/explain", kv.admin_addr);
        async move { common::post(&url, &serde_json::from_slice(&body("s")).expect("json")).await.1 }
    };
    // Fresh: an idle endpoint scores 1 on the queue scorer.
    let fresh = start_kvgate(&config(600_000)).await;
    let debug = format!("http://{}/debug/endpoints", fresh.admin_addr);
    assert!(eventually(5, || async { first_endpoint(&get_json(&debug).await)["stale"] == false }).await);
    // (The snapshot the scheduler reads is published a few milliseconds after the scrape.)
    assert!(eventually(5, || async { queue_score(&explain(&fresh).await) == 1.0 }).await);
    // Stale (one scrape, then none for 10 minutes): the same idle numbers are not trusted.
    let stale = start_kvgate(&config(100)).await;
    let debug = format!("http://{}/debug/endpoints", stale.admin_addr);
    assert!(eventually(5, || async { first_endpoint(&get_json(&debug).await)["running"] == 0 }).await, "first scrape");
    assert!(eventually(5, || async { first_endpoint(&get_json(&debug).await)["stale"] == true }).await);
    assert_eq!(queue_score(&explain(&stale).await), 0.0);
    assert!(first_endpoint(&get_json(&debug).await)["running"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_route_by_model_and_adapters_find_their_base() {
    let llama = start_sim(&["--time-scale", "0", "--enable-lora", "--lora-modules", "sql-lora=/a/sql"]).await;
    let qwen = start_sim(&["--time-scale", "0", "--served-model-name", "Qwen/Qwen3-32B"]).await;
    let kv = start_kvgate(&format!(
        "admin_addr: 127.0.0.1:0\npools:\n  - {{name: llama, models: ['{MODEL}'], endpoints: [{{address: '{}'}}]}}\n  - {{name: qwen, models: ['Qwen/Qwen3-32B'], endpoints: [{{address: '{}'}}]}}\n",
        llama.addrs[0], qwen.addrs[0]
    ))
    .await;
    let url = format!("http://{}/debug/explain", kv.admin_addr);
    let pool_of = |model: &str| {
        let url = url.clone();
        let body = chat(model).user("hi").json();
        async move { common::post(&url, &body).await }
    };
    assert!(eventually(5, || async { pool_of(MODEL).await.1["pool"] == "llama" }).await);
    assert_eq!(pool_of("Qwen/Qwen3-32B").await.1["pool"], "qwen");
    // The adapter is learned from the llama endpoint's /v1/models.
    assert!(eventually(5, || async { pool_of("sql-lora").await.1["pool"] == "llama" }).await);
    let (status, body) = pool_of("gpt-17").await;
    assert_eq!(status, 404);
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(msg.contains(MODEL) && msg.contains("Qwen/Qwen3-32B") && msg.contains("sql-lora"), "{msg}");
    let (status, _) = common::post(&format!("{url}?path=/v1/nope"), &json!({})).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_identical_prefixes_is_spread() {
    let fleet = gateway(MODEL).sims(3).start().await;
    let kv = &fleet.kv;
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    let body = body(&"The same long system prompt for everyone. ".repeat(50));
    // Twelve requests at once, none finished: kvgate's own in-flight counts must spread them.
    let held: Vec<_> = (0..12).map(|_| decide(&kv.gateway, &body).expect("routed")).collect();
    let mut per: std::collections::BTreeMap<String, usize> = Default::default();
    for r in &held {
        *per.entry(r.decision().primary().address.to_string()).or_default() += 1;
    }
    assert!(per.len() >= 2, "all on one endpoint: {per:?}");
    assert!(per.values().all(|&n| n <= 8), "{per:?}");
    let counted: u64 =
        endpoints_of(&get_json(&debug).await, 0).iter().map(|e| e["in_flight_requests"].as_u64().unwrap_or(0)).sum();
    assert_eq!(counted, 12);
    drop(held);
    let counted: u64 =
        endpoints_of(&get_json(&debug).await, 0).iter().map(|e| e["in_flight_requests"].as_u64().unwrap_or(0)).sum();
    assert_eq!(counted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_enormous_metrics_are_errors_that_hurt_no_one_else() {
    let garbage = axum::Router::new()
        .route("/metrics", get(|| async { "<html>definitely not prometheus</html>" }))
        .route("/v1/models", get(|| async { "{}" }));
    let huge = axum::Router::new().route("/metrics", get(|| async { "vllm:num_requests_running 1\n".repeat(1 << 17) }));
    let mut addrs = Vec::new();
    for app in [garbage, huge] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        addrs.push(l.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(l, app).await.ok() });
    }
    let fleet = gateway(MODEL)
        .address(addrs[0])
        .address(addrs[1])
        .sims(1)
        .config("scrape: {max_bytes: 1000000}")
        .start_without_waiting()
        .await;
    let (good, kv) = (&fleet.sims[0], &fleet.kv);
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    let settled = eventually(10, || async {
        let e = endpoints_of(&get_json(&debug).await, 0);
        e.len() == 3
            && e[0]["health"] == "unhealthy"
            && e[1]["health"] == "unhealthy"
            && e[2]["health"] == "healthy"
            && e[2]["stale"] == false
    })
    .await;
    let v = get_json(&debug).await;
    assert!(settled, "{v}");
    let e = endpoints_of(&v, 0);
    assert!(e[0]["last_error"].as_str().is_some_and(|m| m.contains("no vllm:num_requests_running")), "{}", e[0]);
    assert!(e[1]["last_error"].as_str().is_some_and(|m| m.contains("body")), "{}", e[1]);
    let metrics = common::client()
        .get(format!("http://{}/metrics", kv.admin_addr))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert!(
        common::metric(&metrics, "kvgate_scrape_errors_total", &[("endpoint", &addrs[0].to_string())])
            .is_some_and(|n| n >= 3.0)
    );
    assert_eq!(common::metric(&metrics, "inference_pool_ready_pods", &[("name", "p")]), Some(1.0));
    let r = decide(&kv.gateway, &body("x")).expect("routed");
    assert_eq!(r.decision().primary().address, good.addrs[0]);
}

/// Makes something at a path.
type Make<'a> = dyn Fn(&std::path::Path) + 'a;

/// An endpoints file is read only while it is a regular file within `endpoints_file_max_bytes`:
/// a symlink to `/dev/zero`, a FIFO and a file over the limit are each refused, the refusal is
/// shown in `/debug/endpoints` and the last good set keeps serving; a good file is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_files_that_are_not_regular_files_or_too_large_are_refused() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", MODEL]).await;
    let dir = std::env::temp_dir().join(format!("kvgate-pool-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let (file, next) = (dir.join("endpoints.yaml"), dir.join("next.yaml"));
    // Each change is made beside the file, then renamed over it: discovery sees one or the other.
    let replace = |make: &Make<'_>| {
        std::fs::remove_file(&next).ok();
        make(&next);
        std::fs::rename(&next, &file).expect("rename over the endpoints file");
    };
    let good = |name: &str| {
        let text = format!("endpoints: [{{name: {name}, address: '{}'}}]\n", sim.addrs[0]);
        move |p: &std::path::Path| std::fs::write(p, &text).expect("write endpoints file")
    };
    replace(&good("first"));
    let fleet = gateway(MODEL)
        .proxy()
        .pool(&format!("endpoints_file: '{}'\nendpoints_file_max_bytes: 4096", file.display()))
        .start_without_waiting()
        .await;
    let debug = format!("{}/debug/endpoints", fleet.admin());
    let named = |name: &'static str| {
        let debug = debug.clone();
        async move { first_endpoint(&get_json(&debug).await)["name"] == name }
    };
    assert!(eventually(10, || named("first")).await, "{}", get_json(&debug).await);
    let last_error = |v: &Value| v["pools"][0]["discovery"]["last_error"].as_str().unwrap_or("").to_owned();
    let chat_url = format!("{}/v1/chat/completions", fleet.proxy());

    let refusals: [(&str, &Make<'_>, &str); 3] = [
        (
            "a symlink to /dev/zero",
            &|p| std::os::unix::fs::symlink("/dev/zero", p).expect("symlink"),
            "is a character device, not a regular file",
        ),
        (
            "a FIFO",
            &|p| {
                let made = std::process::Command::new("mkfifo").arg(p).status().expect("mkfifo runs");
                assert!(made.success(), "mkfifo {}", p.display());
            },
            "is a FIFO (named pipe), not a regular file",
        ),
        (
            "a file over the limit",
            &|p| {
                let padding = format!("# {}\n", "x".repeat(5000));
                std::fs::write(p, format!("{padding}endpoints: [{{address: '{}'}}]\n", sim.addrs[0])).expect("write");
            },
            "bytes, over the limit of 4096 bytes (`endpoints_file_max_bytes`)",
        ),
    ];
    for (k, (what, make, why)) in refusals.into_iter().enumerate() {
        replace(make);
        let refused = eventually(10, || async { last_error(&get_json(&debug).await).contains(why) }).await;
        let v = get_json(&debug).await;
        assert!(refused, "{what}: {v}");
        let error = last_error(&v);
        assert!(error.contains(&file.display().to_string()) && error.contains("last good endpoint set"), "{error}");
        // The last good set stays, and serves.
        assert_eq!(endpoints_of(&v, 0).len(), 1, "{what}: {v}");
        let (status, answer) = common::post(&chat_url, &chat(MODEL).user("still there?").json()).await;
        assert_eq!(status, 200, "{what}: {answer}");
        // A regular file within the limit is read again, and clears the error.
        let name = ["second", "third", "fourth"][k];
        replace(&good(name));
        assert!(eventually(10, || named(name)).await, "{what}, then a good file: {}", get_json(&debug).await);
        assert_eq!(last_error(&get_json(&debug).await), "", "{what}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
