//! The precise prefix index against real simulators on loopback: each simulator tokenizes with
//! the model's tokenizer folder and publishes vLLM's KV events over ZMQ; kvgate follows them.
//! Simulators sit on different loopback addresses (127.0.0.1, .2, .3) so they can all publish
//! on the same port, as pods do; kvgate connects to `<ip>:<port + rank>` (or binds one socket).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::{
    SimProcess, client, eventually, free_port, gateway, get_json, metric, metrics, post, start_kvgate, start_sim,
};
use kvgate::routing::tokenize::{ChatPrompt, PromptTokenizer};
use serde_json::{Value, json};

const MODEL: &str = "tiny-llama";

fn tokenizer_dir() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny-llama-tokenizer")
}

/// A prompt of `n` words of the tokenizer's training text, different for each `seed` from its
/// first word on.
fn words(seed: u64, n: usize) -> String {
    const W: [&str; 11] =
        ["router", "batch", "system", "prefix", "server", "stream", "gateway", "cache", "the", "latency", "token"];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = format!("request {seed}:");
    for _ in 0..n {
        out.push(' ');
        out.push_str(W[rng.usize(..W.len())]);
    }
    out
}

/// A port `p` with `p + 1` free too (for a publisher per data-parallel rank).
fn free_port_pair() -> u16 {
    loop {
        let p = free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

fn events_config(port: u16, replay: Option<u16>, extra: Value) -> String {
    let mut c = json!({"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": format!("tcp://*:{port}")});
    if let Some(r) = replay {
        c["replay_endpoint"] = json!(format!("tcp://*:{r}"));
    }
    if let (Value::Object(c), Value::Object(e)) = (&mut c, extra) {
        c.extend(e);
    }
    c.to_string()
}

/// A simulator on `ip` with the model's tokenizer, publishing KV events on `port` (+ rank).
async fn sim_on(ip: &str, events: &str, flags: &[&str]) -> common::Sim {
    let dir = tokenizer_dir();
    let mut all = vec![
        "--host",
        ip,
        "--model",
        MODEL,
        "--tokenizer",
        dir.to_str().expect("UTF-8 path"),
        "--time-scale",
        "0",
        "--kv-events-config",
        events,
    ];
    all.extend_from_slice(flags);
    start_sim(&all).await
}

/// kvgate's proxy over `endpoints`; with `kv_events`, the pool follows their KV events (and
/// tokenizes with the test tokenizer).
fn pool_yaml(endpoints: &[String], kv_events: &str) -> String {
    let mut config = gateway(MODEL).proxy();
    for e in endpoints {
        config = config.address(e);
    }
    if !kv_events.is_empty() {
        config = config.pool(&precise(kv_events));
    }
    config.yaml(&[])
}

/// The pool keys of precise prefix tracking: the test tokenizer and `kv_events`.
fn precise(kv_events: &str) -> String {
    format!("tokenizer: '{}'\nkv_events: {kv_events}", tokenizer_dir().display())
}

async fn debug(kv: &kvgate::tools::serve::Server) -> Value {
    get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await
}

/// `/debug/explain` of a completions body.
async fn explain(kv: &kvgate::tools::serve::Server, body: &Value) -> Value {
    let url = format!("http://{}/debug/explain?path=/v1/completions", kv.admin_addr);
    let r = client().post(url).body(body.to_string()).send().await.expect("explain");
    r.json().await.expect("JSON")
}

/// Tokens the endpoint at `addr` holds of `body`'s prompt, as kvgate explains it.
async fn matched(kv: &kvgate::tools::serve::Server, body: &Value, addr: SocketAddr) -> (u64, Option<String>) {
    let x = explain(kv, body).await;
    // No explanation (no healthy endpoint yet, say) matches nothing.
    let Some(e) = x["explanation"]["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["address"] == addr.to_string()).cloned())
    else {
        return (0, None);
    };
    (e["matched_tokens"].as_u64().expect("matched_tokens"), e["prefix_source"].as_str().map(str::to_owned))
}

fn completion(prompt: &str) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": 1})
}

/// Sends a completion straight to a simulator; returns its usage.
async fn direct(base: &str, body: &Value) -> Value {
    let (status, v) = post(&format!("{base}/v1/completions"), body).await;
    assert_eq!(status, 200, "{v}");
    v["usage"].clone()
}

/// Waits until every endpoint of the first pool has received a batch (a SUB socket misses what
/// is published before its subscription reaches the publisher, so each simulator is sent small
/// requests until kvgate has seen one of its batches).
async fn wait_following(kv: &kvgate::tools::serve::Server, sims: &[String]) {
    let n = std::sync::atomic::AtomicU64::new(0);
    for (k, base) in sims.iter().enumerate() {
        let ok = eventually(15, || async {
            // A new prompt each time: a cached one stores no blocks, and publishes nothing.
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            direct(base, &completion(&words(90_000 + 1000 * k as u64 + i, 40))).await;
            let d = debug(kv).await;
            d["pools"][0]["endpoints"][k]["kv_events"]["last_seq"].is_u64()
        })
        .await;
        assert!(ok, "kvgate follows {base}'s events: {}", debug(kv).await);
    }
}

async fn endpoint_status(kv: &kvgate::tools::serve::Server, k: usize) -> Value {
    debug(kv).await["pools"][0]["endpoints"][k].clone()
}

/// The served endpoint's port (`x-inference-port`) and usage, through kvgate's proxy.
async fn via_proxy(kv: &kvgate::tools::serve::Server, body: &Value) -> (u16, Value) {
    let url = format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"));
    let r = client().post(url).body(body.to_string()).send().await.expect("send");
    assert_eq!(r.status(), 200);
    let port = r.headers()["x-inference-port"].to_str().expect("ascii").parse().expect("port");
    let v: Value = r.json().await.expect("JSON");
    (port, v["usage"].clone())
}

async fn precise_routing_after_evictions(encoding: &str) {
    let port = free_port();
    let events = events_config(port, None, json!({}));
    let flags = ["--num-gpu-blocks-override", "64", "--kv-events-encoding", encoding];
    let x = sim_on("127.0.0.1", &events, &flags).await;
    let y = sim_on("127.0.0.2", &events, &flags).await;
    let eps = [x.addrs[0].to_string(), y.addrs[0].to_string()];
    let precise = start_kvgate(&pool_yaml(&eps, &format!("{{port: {port}}}"))).await;
    let approx = start_kvgate(&pool_yaml(&eps, "")).await;
    wait_following(&precise, &[x.url(0), y.url(0)]).await;
    assert_eq!(endpoint_status(&precise, 0).await["prefix_source"], "precise");

    // A goes through the approximate kvgate; it lands on one endpoint, which both kvgates
    // now believe holds it (the precise one because its events say so).
    let a = completion(&words(1, 400));
    let (first, usage) = via_proxy(&approx, &a).await;
    let a_tokens = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
    assert!(a_tokens > 300, "{a_tokens} tokens");
    let full = (a_tokens - 1) / 16 * 16;
    let (held, other) = if first == x.addrs[0].port() { (&x, &y) } else { (&y, &x) };
    let ok = eventually(5, || async { matched(&precise, &a, held.addrs[0]).await.0 == full }).await;
    assert!(ok, "events show A on {}: {:?}", held.addrs[0], matched(&precise, &a, held.addrs[0]).await);

    // Behind kvgate's back: other prompts evict A where it was, and A is computed elsewhere.
    for k in 0..5 {
        direct(&held.url(0), &completion(&words(100 + k, 400))).await;
    }
    direct(&other.url(0), &a).await;
    let ok = eventually(5, || async {
        matched(&precise, &a, held.addrs[0]).await.0 == 0 && matched(&precise, &a, other.addrs[0]).await.0 == full
    })
    .await;
    assert!(ok, "precise view follows the evictions: {}", explain(&precise, &a).await);
    let (m, source) = matched(&precise, &a, other.addrs[0]).await;
    assert_eq!((m, source.as_deref()), (full, Some("precise")));

    // The approximate index is wrong, the precise one right.
    let ax = explain(&approx, &a).await;
    assert_eq!(ax["decision"]["targets"][0]["address"], held.addrs[0].to_string(), "approximate: {ax}");
    let px = explain(&precise, &a).await;
    assert_eq!(px["decision"]["targets"][0]["address"], other.addrs[0].to_string(), "precise: {px}");
    let (port, usage) = via_proxy(&precise, &a).await;
    assert_eq!(port, other.addrs[0].port());
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(full), "{usage}");
    // Where the approximate index would have sent it, nothing of A is left.
    let usage = direct(&held.url(0), &a).await;
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(0), "{usage}");

    let m = metrics(&format!("http://{}", precise.admin_addr)).await;
    let label = held.addrs[0].to_string();
    let stored = metric(&m, "kvgate_kv_events_total", &[("endpoint", &label), ("type", "BlockStored")]);
    let removed = metric(&m, "kvgate_kv_events_total", &[("endpoint", &label), ("type", "BlockRemoved")]);
    assert!(stored.is_some_and(|s| s > 0.0) && removed.is_some_and(|r| r > 0.0), "{m}");
    assert!(metric(&m, "kvgate_kv_events_precise", &[("endpoint", &label)]) == Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precise_routing_follows_evictions_map_encoding() {
    precise_routing_after_evictions("map").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precise_routing_follows_evictions_array_encoding() {
    precise_routing_after_evictions("array").await;
}

/// Sets the simulator's faults.
async fn faults(base: &str, f: Value) {
    let (status, v) = post(&format!("{base}/admin/faults"), &f).await;
    assert_eq!(status, 200, "{v}");
}

async fn gap(replay: bool) {
    let (port, replay_port) = (free_port(), free_port());
    let events = events_config(port, replay.then_some(replay_port), json!({}));
    let sim = sim_on("127.0.0.3", &events, &[]).await;
    let spec =
        if replay { format!("{{port: {port}, replay_port: {replay_port}}}") } else { format!("{{port: {port}}}") };
    let kv = start_kvgate(&pool_yaml(&[sim.addrs[0].to_string()], &spec)).await;
    wait_following(&kv, &[sim.url(0)]).await;
    let replays = endpoint_status(&kv, 0).await["kv_events"]["replays"].as_u64().expect("replays");
    // The next batch is lost on the way; the one after shows the gap.
    faults(&sim.url(0), json!({"kv_events_drop_next": 1})).await;
    let lost = completion(&words(7, 200));
    direct(&sim.url(0), &lost).await;
    let after = completion(&words(8, 200));
    direct(&sim.url(0), &after).await;
    // Seen, and dealt with (the replay, if any, is over once the batch after it is applied).
    let ok = eventually(5, || async {
        let e = endpoint_status(&kv, 0).await;
        e["kv_events"]["gaps"] == 1
            && (e["kv_events"]["replays"].as_u64() > Some(replays) || e["kv_events"]["rebuilding"] == "gap")
    })
    .await;
    assert!(ok, "the gap is seen: {}", endpoint_status(&kv, 0).await);
    let e = endpoint_status(&kv, 0).await;
    if replay {
        assert_eq!(e["kv_events"]["replays"].as_u64(), Some(replays + 1), "{e}");
        assert_eq!(e["prefix_source"], "precise", "{e}");
        assert!(matched(&kv, &lost, sim.addrs[0]).await.0 > 0, "the lost batch came back by replay");
    } else {
        assert_eq!(e["kv_events"]["replays"].as_u64(), Some(replays), "{e}");
        assert_eq!(e["kv_events"]["rebuilding"], "gap", "{e}");
        assert_eq!(e["prefix_source"], "approximate", "{e}");
        assert_eq!(matched(&kv, &lost, sim.addrs[0]).await.1.as_deref(), Some("approximate"));
        let ok = eventually(5, || async {
            let m = metrics(&format!("http://{}", kv.admin_addr)).await;
            metric(&m, "kvgate_kv_events_fallbacks_total", &[("reason", "gap")]) == Some(1.0)
        })
        .await;
        assert!(ok, "the fallback is counted");
    }
    let m = metrics(&format!("http://{}", kv.admin_addr)).await;
    assert_eq!(metric(&m, "kvgate_kv_events_gaps_total", &[]), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_is_replayed_from_the_replay_socket() {
    gap(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_without_replay_falls_back_until_rebuilt() {
    gap(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_publisher_starts_an_empty_view() {
    restarted_publisher(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_without_replay_rebuilds_the_view() {
    restarted_publisher(false).await;
}

async fn restarted_publisher(with_replay: bool) {
    let (http, port, replay) = (free_port(), free_port(), free_port());
    let events = events_config(port, with_replay.then_some(replay), json!({}));
    let dir = tokenizer_dir();
    let flags = |http: &str| {
        vec![
            "--host".to_owned(),
            "127.0.0.1".into(),
            "--port".into(),
            http.to_owned(),
            "--model".into(),
            MODEL.into(),
            "--tokenizer".into(),
            dir.display().to_string(),
            "--time-scale".into(),
            "0".into(),
            "--kv-events-config".into(),
            events.clone(),
        ]
    };
    let argv = flags(&http.to_string());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let sim = SimProcess::start(&argv);
    let base = format!("http://{}", sim.addr);
    let spec =
        if with_replay { format!("{{port: {port}, replay_port: {replay}}}") } else { format!("{{port: {port}}}") };
    let kv = start_kvgate(&pool_yaml(&[sim.addr.to_string()], &spec)).await;
    wait_following(&kv, std::slice::from_ref(&base)).await;
    let before = completion(&words(21, 200));
    direct(&base, &before).await;
    assert!(eventually(5, || async { matched(&kv, &before, sim.addr).await.0 > 0 }).await);
    let seq_before = endpoint_status(&kv, 0).await["kv_events"]["last_seq"].as_u64().expect("seq");
    assert!(seq_before >= 1);
    drop(sim);
    let sim = SimProcess::start(&argv);
    if !with_replay {
        // Never silently wrong: either kvgate saw the new stream from its start (an empty
        // view) or it cannot know what it missed (approximate until rebuilt).
        let n = std::sync::atomic::AtomicU64::new(0);
        let ok = eventually(20, || async {
            let after = completion(&words(23_000 + n.fetch_add(1, std::sync::atomic::Ordering::Relaxed), 200));
            direct(&base, &after).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let e = endpoint_status(&kv, 0).await;
            let rebuilding = e["kv_events"]["rebuilding"] == "gap" && e["prefix_source"] == "approximate";
            let from_start = e["kv_events"]["gaps"] == 0 && e["prefix_source"] == "precise";
            rebuilding || (from_start && matched(&kv, &after, sim.addr).await.0 > 0)
        })
        .await;
        assert!(ok, "after the reconnect: {}", endpoint_status(&kv, 0).await);
        let (m, source) = matched(&kv, &before, sim.addr).await;
        assert!(m == 0 || source.as_deref() == Some("approximate"), "the old engine's blocks: {m} {source:?}");
        return;
    }
    // The new engine's cache is empty: kvgate drops the old view when the new stream does not
    // go on where the old one stopped, and replays what the new engine published before
    // kvgate was subscribed again. (A new prompt each time: a cached one publishes nothing.)
    let n = std::sync::atomic::AtomicU64::new(0);
    let ok = eventually(20, || async {
        let after = completion(&words(22_000 + n.fetch_add(1, std::sync::atomic::Ordering::Relaxed), 200));
        direct(&base, &after).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        matched(&kv, &after, sim.addr).await.0 > 0
    })
    .await;
    assert!(ok, "kvgate follows the restarted publisher: {}", endpoint_status(&kv, 0).await);
    assert_eq!(matched(&kv, &before, sim.addr).await.0, 0, "the old engine's blocks are gone");
    let e = endpoint_status(&kv, 0).await;
    assert_eq!((e["prefix_source"].as_str(), e["kv_events"]["rebuilding"].as_str()), (Some("precise"), None), "{e}");
    // Everything the new engine stored is known (what it published before kvgate was back was
    // replayed): the first prompt sent to it is matched too.
    let first_after = completion(&words(22_000, 200));
    assert!(matched(&kv, &first_after, sim.addr).await.0 > 0, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_ranks_publish_on_offset_ports() {
    let port = free_port_pair();
    let events = events_config(port, None, json!({}));
    let sim = sim_on("127.0.0.1", &events, &["--data-parallel-size", "2"]).await;
    let yaml = gateway(MODEL)
        .endpoint(format!("{{address: '{}', data_parallel_size: 2}}", sim.addrs[0]))
        .proxy()
        .pool(&precise(&format!("{{port: {port}}}")))
        .yaml(&[]);
    let kv = start_kvgate(&yaml).await;
    let url = format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"));
    // Through kvgate, each request is pinned to a rank; both ranks' publishers are followed.
    let n = std::sync::atomic::AtomicU64::new(0);
    let ok = eventually(15, || async {
        for _ in 0..4 {
            let k = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            post(&url, &completion(&words(300 + k, 60))).await;
        }
        let d = debug(&kv).await;
        let eps = d["pools"][0]["endpoints"].as_array().cloned().unwrap_or_default();
        eps.len() == 2 && eps.iter().all(|e| e["kv_events"]["blocks"].as_u64().unwrap_or(0) > 0)
    })
    .await;
    assert!(ok, "both ranks' events arrive: {}", debug(&kv).await);
    // A prompt is held by the rank that computed it, and only there.
    let p = completion(&words(400, 120));
    post(&url, &p).await;
    let ok = eventually(5, || async {
        let x = explain(&kv, &p).await;
        let m: Vec<u64> = x["explanation"]["endpoints"]
            .as_array()
            .map(|a| a.iter().map(|e| e["matched_tokens"].as_u64().unwrap_or(0)).collect())
            .unwrap_or_default();
        m.len() == 2 && m.iter().filter(|&&t| t > 0).count() == 1
    })
    .await;
    assert!(ok, "one rank holds it: {}", explain(&kv, &p).await);
    let x = explain(&kv, &p).await;
    let holder = x["explanation"]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .position(|e| e["matched_tokens"].as_u64().unwrap_or(0) > 0)
        .expect("a holder");
    assert_eq!(x["decision"]["targets"][0]["rank"], holder, "{x}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_and_cache_salt_match_only_their_own_blocks() {
    let port = free_port();
    let events = events_config(port, None, json!({}));
    let sim = sim_on("127.0.0.1", &events, &["--enable-lora", "--lora-modules", "sql=/adapters/sql"]).await;
    let kv = start_kvgate(&pool_yaml(&[sim.addrs[0].to_string()], &format!("{{port: {port}}}"))).await;
    wait_following(&kv, &[sim.url(0)]).await;
    // kvgate knows `sql` is an adapter once it has read /v1/models.
    let ok = eventually(10, || async {
        debug(&kv).await["pools"][0]["endpoints"][0]["adapters"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert!(ok, "adapters scraped");
    let text = words(31, 200);
    let lora = json!({"model": "sql", "prompt": text, "max_tokens": 1});
    let salted = json!({"model": MODEL, "prompt": text, "max_tokens": 1, "cache_salt": "tenant-a"});
    let plain = completion(&text);
    direct(&sim.url(0), &lora).await;
    direct(&sim.url(0), &salted).await;
    let ok = eventually(5, || async {
        matched(&kv, &lora, sim.addrs[0]).await.0 > 0 && matched(&kv, &salted, sim.addrs[0]).await.0 > 0
    })
    .await;
    assert!(ok, "the adapter's and the salted blocks are indexed");
    assert_eq!(matched(&kv, &plain, sim.addrs[0]).await.0, 0, "the base model shares no block with them");
    let other_salt = json!({"model": MODEL, "prompt": text, "max_tokens": 1, "cache_salt": "tenant-b"});
    assert_eq!(matched(&kv, &other_salt, sim.addrs[0]).await.0, 0);
    let salted_lora = json!({"model": "sql", "prompt": text, "max_tokens": 1, "cache_salt": "tenant-a"});
    assert_eq!(matched(&kv, &salted_lora, sim.addrs[0]).await.0, 0);
    // What kvgate predicts is what the engine serves from cache.
    let predicted = matched(&kv, &salted, sim.addrs[0]).await.0;
    let usage = direct(&sim.url(0), &salted).await;
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(predicted));
    let usage = direct(&sim.url(0), &plain).await;
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvgate_tokenizes_as_the_simulator_does() {
    let sim = sim_on("127.0.0.1", &json!({"enable_kv_cache_events": false}).to_string(), &[]).await;
    let dir = tokenizer_dir();
    let read = |f: &str| std::fs::read(dir.join(f)).expect("tokenizer file");
    let template = String::from_utf8(read("chat_template.jinja")).expect("UTF-8");
    let t = PromptTokenizer::from_parts(&read("tokenizer.json"), Some(&read("tokenizer_config.json")), Some(&template))
        .expect("loads");
    let tools = json!([{"type": "function", "function": {"name": "lookup", "description": "find a route",
                        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]);
    let bodies = [
        json!({"model": MODEL, "prompt": words(1, 50)}),
        json!({"model": MODEL, "messages": [
            {"role": "system", "content": "You route requests."},
            {"role": "user", "content": words(2, 20)},
            {"role": "assistant", "content": "the cache"},
            {"role": "user", "content": [{"type": "text", "text": "and the batch?"}]}]}),
        json!({"model": MODEL, "messages": [{"role": "user", "content": "which server?"}], "tools": tools}),
    ];
    for body in bodies {
        let (status, v) = post(&format!("{}/tokenize", sim.url(0)), &body).await;
        assert_eq!(status, 200, "{v}");
        let theirs: Vec<u32> =
            v["tokens"].as_array().expect("tokens").iter().map(|t| t.as_u64().expect("id") as u32).collect();
        let ours = match body["prompt"].as_str() {
            Some(p) => t.encode_completion(p).expect("completion"),
            None => t.encode_chat(&ChatPrompt::of_request(&body)).expect("chat"),
        };
        assert_eq!(ours, theirs, "{body}");
        assert!(!ours.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_degrades_to_approximate_and_comes_back() {
    let port = free_port();
    let events = events_config(port, None, json!({}));
    let sim = sim_on("127.0.0.1", &events, &[]).await;
    let kv =
        start_kvgate(&pool_yaml(&[sim.addrs[0].to_string()], &format!("{{port: {port}, stale_after_ms: 300}}"))).await;
    wait_following(&kv, &[sim.url(0)]).await;
    faults(&sim.url(0), json!({"kv_events_stalled": true})).await;
    // Requests through kvgate are answered, but no event follows.
    let url = format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"));
    let body = completion(&words(50, 200));
    assert_eq!(post(&url, &body).await.0, 200);
    let ok = eventually(5, || async { endpoint_status(&kv, 0).await["prefix_source"] == "approximate" }).await;
    assert!(ok, "stale: {}", endpoint_status(&kv, 0).await);
    assert_eq!(matched(&kv, &body, sim.addrs[0]).await.1.as_deref(), Some("approximate"));
    let ok = eventually(5, || async {
        let m = metrics(&format!("http://{}", kv.admin_addr)).await;
        metric(&m, "kvgate_kv_events_fallbacks_total", &[("reason", "stale")]) == Some(1.0)
            && metric(&m, "kvgate_kv_events_precise", &[]) == Some(0.0)
    })
    .await;
    assert!(ok, "the fallback is counted");
    // The held batches arrive in order: precise again, and they hold the prompt.
    faults(&sim.url(0), json!({"kv_events_stalled": false})).await;
    let ok = eventually(5, || async { endpoint_status(&kv, 0).await["prefix_source"] == "precise" }).await;
    assert!(ok, "back: {}", endpoint_status(&kv, 0).await);
    let (m, source) = matched(&kv, &body, sim.addrs[0]).await;
    assert!(m > 0 && source.as_deref() == Some("precise"), "{m} {source:?}");
    assert_eq!(endpoint_status(&kv, 0).await["kv_events"]["gaps"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_connect_to_a_bound_socket() {
    let (bind, http) = (free_port(), free_port());
    let topic = format!("kv@127.0.0.1:{http}@{MODEL}");
    let events = json!({"enable_kv_cache_events": true, "publisher": "zmq",
                        "endpoint": format!("tcp://127.0.0.1:{bind}"), "topic": topic})
    .to_string();
    let yaml = pool_yaml(&[format!("127.0.0.1:{http}")], &format!("{{bind: 'tcp://127.0.0.1:{bind}', topic: 'kv@'}}"));
    let kv = start_kvgate(&yaml).await;
    // The engine connects once kvgate's socket is bound.
    let bound = eventually(5, || async { tokio::net::TcpStream::connect(("127.0.0.1", bind)).await.is_ok() }).await;
    assert!(bound, "kvgate binds tcp://127.0.0.1:{bind}");
    let sim = sim_on("127.0.0.1", &events, &["--port", &http.to_string()]).await;
    wait_following(&kv, &[sim.url(0)]).await;
    let body = completion(&words(60, 150));
    direct(&sim.url(0), &body).await;
    assert!(eventually(5, || async { matched(&kv, &body, sim.addrs[0]).await.0 > 0 }).await);
    let e = endpoint_status(&kv, 0).await;
    assert_eq!((e["prefix_source"].as_str(), e["kv_events"]["connected"].as_bool()), (Some("precise"), Some(true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_warns_about_tokenizers_and_block_sizes() {
    let port = free_port();
    let sim = sim_on("127.0.0.1", &events_config(port, None, json!({})), &["--block-size", "32"]).await;
    let dir = std::env::temp_dir().join(format!("kvgate-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let check = |yaml: String| {
        let path = dir.join("kvgate.yaml");
        std::fs::write(&path, yaml).expect("write config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["check-config", path.to_str().expect("UTF-8")])
            .output()
            .expect("kvgate runs");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The endpoint says 32 tokens per block; the producer starts from 16.
    let (ok, out) = check(pool_yaml(&[sim.addrs[0].to_string()], &format!("{{port: {port}}}")));
    assert!(ok, "{out}");
    assert!(out.contains("KV events: connects to each endpoint's publisher"), "{out}");
    assert!(out.contains("precise-prefix-cache-producer"), "{out}");
    assert!(out.contains("warning:") && out.contains("block_size 32") && out.contains("blockSize: 32"), "{out}");
    // A tokenizer folder that is not one: the pool still runs, approximately, and says so.
    let yaml = pool_yaml(&[sim.addrs[0].to_string()], &format!("{{port: {port}}}"))
        .replace(&tokenizer_dir().display().to_string(), &dir.display().to_string());
    let (ok, out) = check(yaml);
    assert!(ok, "{out}");
    assert!(out.contains("warning:") && out.contains("the tokenizer cannot be loaded"), "{out}");
    // kv_events without a tokenizer is an error.
    let (ok, _) = check(format!(
        "pools: [{{name: p, models: [m], endpoints: [{{address: '{}'}}], kv_events: {{port: {port}}}}}]\n",
        sim.addrs[0]
    ));
    assert!(!ok);
    let _ = std::fs::remove_dir_all(&dir);
}
