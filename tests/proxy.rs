//! The reverse proxy with real simulators on loopback: byte-exact streaming, affinity and
//! spread, retries (and none after the first byte), aborts, errors, admission and the demo.
#![allow(clippy::disallowed_methods, reason = "the test's own tasks (clients, a shutdown) end with its runtime")]

mod common;

use std::time::Duration;

use common::{chat, client, eventually, free_port, gateway, get_json, metric, metrics, post, start_kvgate, start_sim};
use futures_util::StreamExt;
use serde_json::{Value, json};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const SERVED: &str = "x-gateway-destination-endpoint-served";

/// Replaces the per-request `id` and `created` values, which differ between two requests.
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("\"id\":\"") {
        out.push_str(&rest[..i + 6]);
        rest = &rest[i + 6..];
        let end = rest.find('"').unwrap_or(rest.len());
        out.push_str("ID");
        rest = &rest[end..];
    }
    out.push_str(rest);
    let mut norm = String::new();
    let mut rest = out.as_str();
    while let Some(i) = rest.find("\"created\":") {
        norm.push_str(&rest[..i + 10]);
        rest = &rest[i + 10..];
        let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        norm.push('0');
        rest = &rest[end..];
    }
    norm.push_str(rest);
    norm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_bytes_match_a_direct_request() {
    let fleet = gateway(MODEL).sims(1).proxy().start().await;
    let (sim, kv) = (&fleet.sims[0], &fleet.kv);
    let proxy = kv.proxy_addr.expect("proxy");
    let body = chat(MODEL).user("Count to ten.").max_tokens(12).stream_with_usage().json().to_string();
    let fetch = |base: String| {
        let body = body.clone();
        async move {
            let r = client()
                .post(format!("{base}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("send");
            let served = r.headers().get(SERVED).map(|v| v.to_str().unwrap_or("").to_owned());
            let ctype = r.headers()["content-type"].to_str().expect("ascii").to_owned();
            (served, ctype, r.text().await.expect("body"))
        }
    };
    let (_, direct_type, direct) = fetch(sim.url(0)).await;
    // Same starting state for the second request: an empty prefix cache.
    assert_eq!(client().post(format!("{}/reset_prefix_cache", sim.url(0))).send().await.expect("reset").status(), 200);
    let (served, proxied_type, proxied) = fetch(format!("http://{proxy}")).await;
    assert_eq!(served.as_deref(), Some(sim.addrs[0].to_string().as_str()));
    assert_eq!(direct_type, proxied_type);
    assert!(direct.ends_with("data: [DONE]\n\n") && direct.matches("data: ").count() == 15, "{direct}");
    assert_eq!(normalize(&direct), normalize(&proxied));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_stick_and_strangers_spread() {
    let fleet = gateway(MODEL).sims(4).proxy().start().await;
    let kv = &fleet.kv;
    let url = format!("http://{}/v1/chat/completions", kv.proxy_addr.expect("proxy"));
    let ask = |messages: Value| {
        let url = url.clone();
        async move {
            let r = client()
                .post(&url)
                .body(json!({"model": MODEL, "messages": messages, "max_tokens": 4}).to_string())
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200);
            let served = r.headers()[SERVED].to_str().expect("ascii").to_owned();
            let v: Value = r.json().await.expect("json");
            (served, v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0))
        }
    };
    let system = json!({"role": "system", "content": "You are a patient tutor. ".repeat(60)});
    let mut msgs = vec![system.clone()];
    let mut home = None;
    for turn in 0..5 {
        msgs.push(json!({"role": "user", "content": format!("question {turn}: why is the sky blue?")}));
        let (served, cached) = ask(Value::Array(msgs.clone())).await;
        assert_eq!(home.get_or_insert(served.clone()), &served, "turn {turn} moved");
        if turn > 0 {
            assert!(cached > 300, "turn {turn} hit only {cached} tokens");
        }
        msgs.push(json!({"role": "assistant", "content": "because of Rayleigh scattering"}));
    }
    let mut seen = std::collections::HashSet::new();
    for k in 0..8 {
        let (served, _) = ask(json!([{"role": "system", "content": format!("{k} a different persona ").repeat(40)}, {"role": "user", "content": "hi"}])).await;
        seen.insert(served);
    }
    assert_eq!(seen.len(), 4, "cold conversations spread over every endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_first_choices_are_retried_on_the_next() {
    let dead = format!("127.0.0.1:{}", free_port());
    // Scrape rarely, so only request failures can reveal the dead endpoint; rotate the first
    // choice, so the dead endpoint is the first choice of every other request.
    let fleet = gateway(MODEL)
        .address(&dead)
        .sims(1)
        .proxy()
        .config("scrape: {interval_ms: 600000}")
        .pool("scheduler: {plugins: [{type: round-robin-picker}]}")
        .start_without_waiting()
        .await;
    let (live, kv) = (&fleet.sims[0], &fleet.kv);
    let url = format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"));
    assert!(
        eventually(5, || async { post(&url, &json!({"model": MODEL, "prompt": "x", "max_tokens": 1})).await.0 == 200 })
            .await
    );
    for k in 0..6 {
        let r = client()
            .post(&url)
            .body(json!({"model": MODEL, "prompt": format!("{k} "), "max_tokens": 1}).to_string())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[SERVED].to_str().expect("ascii"), live.addrs[0].to_string());
    }
    let v = get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await;
    let d = v["pools"][0]["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["address"] == dead.as_str()))
        .cloned()
        .expect("dead listed");
    assert_eq!(d["health"], "unhealthy", "failed attempts were reported: {d}");
    assert_eq!(d["in_flight_requests"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_before_the_first_byte_are_retried_but_never_after() {
    let fleet = gateway(MODEL).sims(2).proxy().start().await;
    let (a, b, kv) = (&fleet.sims[0], &fleet.sims[1], &fleet.kv);
    let proxy = format!("http://{}", kv.proxy_addr.expect("proxy"));
    let faults = |base: String, f: Value| async move {
        assert_eq!(
            client().post(format!("{base}/admin/faults")).body(f.to_string()).send().await.expect("send").status(),
            200
        );
    };
    // A answers 503 to everything: every request ends on B.
    faults(a.url(0), json!({"failure_rate": 1.0, "failure_types": ["503"]})).await;
    for k in 0..6 {
        let r = client()
            .post(format!("{proxy}/v1/completions"))
            .body(json!({"model": MODEL, "prompt": format!("{k}"), "max_tokens": 2}).to_string())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[SERVED].to_str().expect("ascii"), b.addrs[0].to_string());
    }
    // Both cut streams off mid-way: the client sees the break, and nothing is sent twice.
    faults(a.url(0), json!({"failure_rate": 1.0, "failure_types": ["abort"]})).await;
    faults(b.url(0), json!({"failure_rate": 1.0, "failure_types": ["abort"]})).await;
    let done = |base: String| async move {
        let m = metrics(&base).await;
        ["stop", "length", "abort"]
            .iter()
            .filter_map(|r| metric(&m, "vllm:request_success_total", &[("finished_reason", r)]))
            .sum::<f64>()
    };
    let before = done(a.url(0)).await + done(b.url(0)).await;
    let r = client()
        .post(format!("{proxy}/v1/completions"))
        .body(json!({"model": MODEL, "prompt": "stream", "max_tokens": 40, "stream": true}).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut broke = false;
    while let Some(c) = body.next().await {
        if c.is_err() {
            broke = true;
            break;
        }
    }
    assert!(broke, "the client sees the cut");
    assert!(eventually(5, || async { done(a.url(0)).await + done(b.url(0)).await == before + 1.0 }).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(done(a.url(0)).await + done(b.url(0)).await, before + 1.0, "retried after the first byte");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_upstream() {
    let fleet = gateway(MODEL).sim(&["--time-scale", "1"]).proxy().start().await;
    let (sim, kv) = (&fleet.sims[0], &fleet.kv);
    let url = format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"));
    let r = client()
        .post(&url)
        .body(json!({"model": MODEL, "prompt": "a long story", "max_tokens": 5000, "stream": true}).to_string())
        .send()
        .await
        .expect("send");
    let mut stream = r.bytes_stream();
    stream.next().await.expect("a first chunk").expect("ok");
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    assert_eq!(get_json(&debug).await["pools"][0]["endpoints"][0]["in_flight_requests"], 1);
    drop(stream);
    let aborted = eventually(10, || async {
        metric(&metrics(&sim.url(0)).await, "vllm:request_success_total", &[("finished_reason", "abort")]) == Some(1.0)
    })
    .await;
    assert!(aborted, "the simulator saw the abort");
    assert!(
        eventually(5, || async { get_json(&debug).await["pools"][0]["endpoints"][0]["in_flight_requests"] == 0 }).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let paths = "paths: {model: [/v1/completions/render]}";
    let fleet = gateway(MODEL).sims(1).proxy().config("max_body_bytes: 4096").config(paths).start().await;
    let kv = &fleet.kv;
    let proxy = format!("http://{}", kv.proxy_addr.expect("proxy"));
    let check = |status: u16, body: &Value, want: u16, code: &str| {
        assert_eq!(status, want, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    };
    let r = client().post(format!("{proxy}/v1/chat/completions")).body("{\"model\": ").send().await.expect("send");
    check(r.status().as_u16(), &r.json().await.expect("json"), 400, "invalid_json");
    let (s, b) = post(&format!("{proxy}/v1/chat/completions"), &json!({"messages": []})).await;
    check(s, &b, 400, "missing_model");
    let (s, b) = post(&format!("{proxy}/v1/completions"), &json!({"model": MODEL, "prompt": "x".repeat(5000)})).await;
    check(s, &b, 413, "request_too_large");
    let r = client().get(format!("{proxy}/v1/chat/completions")).send().await.expect("send");
    assert_eq!(r.headers()["allow"], "POST");
    check(r.status().as_u16(), &r.json().await.expect("json"), 405, "method_not_allowed");
    let (s, b) = post(&format!("{proxy}/v1/completions"), &json!({"model": "gpt-17", "prompt": "x"})).await;
    check(s, &b, 404, "model_not_found");
    assert!(b["error"]["message"].as_str().is_some_and(|m| m.contains(MODEL)));
    let r = client().get(format!("{proxy}/nope")).send().await.expect("send");
    assert_eq!(r.status(), 404);
    let models = get_json(&format!("{proxy}/v1/models")).await;
    assert_eq!(models["data"][0]["id"], MODEL);
    // A model server's admin surface is refused, and so are paths the policy does not list
    // (listing `model` replaced its default list, `/tokenize` included).
    for path in ["/v1/load_lora_adapter", "/reset_prefix_cache", "/admin/faults", "/tokenize"] {
        let (s, b) =
            post(&format!("{proxy}{path}"), &json!({"model": MODEL, "lora_name": "a", "lora_path": "/a"})).await;
        check(s, &b, 404, "not_found");
    }
    let r = client().post(format!("{proxy}/v1/models")).send().await.expect("send");
    assert_eq!((r.status().as_u16(), r.headers()["allow"].to_str().ok()), (405, Some("GET, HEAD")));
    // A path opened by model goes to an endpoint of the model's pool.
    let r = client()
        .post(format!("{proxy}/v1/completions/render"))
        .body(json!({"model": MODEL, "prompt": "hello world"}).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key(SERVED));
    let v: Value = r.json().await.expect("json");
    assert_eq!(v[0]["token_ids"].as_array().map(Vec::len), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_limits_answer_429_and_shed_low_priority_first() {
    let fleet = gateway(MODEL)
        .sim(&["--time-scale", "1"])
        .proxy()
        .pool("admission: {max_in_flight: 2, sheddable_headroom: 0.5}")
        .start()
        .await;
    let kv = &fleet.kv;
    let url = format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"));
    let long = |priority: i64| {
        json!({"model": MODEL, "prompt": "go on", "max_tokens": 5000, "stream": true, "priority": priority}).to_string()
    };
    let first = client().post(&url).body(long(0)).send().await.expect("send");
    assert_eq!(first.status(), 200);
    // One in flight: a sheddable request is refused (limit 2 × (1 − 0.5) = 1), a normal one is not.
    let shed = client().post(&url).body(long(-1)).send().await.expect("send");
    assert_eq!(shed.status(), 429);
    assert!(shed.headers().contains_key("retry-after"));
    let v: Value = shed.json().await.expect("json");
    assert_eq!(v["error"]["code"], "shed");
    let second = client().post(&url).body(long(0)).send().await.expect("send");
    assert_eq!(second.status(), 200);
    let third = client().post(&url).body(long(0)).send().await.expect("send");
    assert_eq!(third.status(), 429);
    drop((first, second));
    assert!(
        eventually(5, || async {
            client().post(&url).body(long(0)).send().await.map(|r| r.status() == 200).unwrap_or(false)
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_by_model_through_the_proxy() {
    let (a, b) = (
        start_sim(&["--time-scale", "0"]).await,
        start_sim(&["--time-scale", "0", "--served-model-name", "small"]).await,
    );
    let yaml = format!(
        "admin_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:0\npools:\n  - {{name: big, models: ['{MODEL}'], endpoints: [{{address: '{}'}}]}}\n  - {{name: small, models: [small], endpoints: [{{address: '{}'}}]}}\n",
        a.addrs[0], b.addrs[0]
    );
    let kv = start_kvgate(&yaml).await;
    let proxy = format!("http://{}", kv.proxy_addr.expect("proxy"));
    for (model, want) in [(MODEL, a.addrs[0]), ("small", b.addrs[0])] {
        let ok = eventually(5, || async {
            let r = client()
                .post(format!("{proxy}/v1/completions"))
                .body(json!({"model": model, "prompt": "x", "max_tokens": 1}).to_string())
                .send()
                .await
                .expect("send");
            r.status() == 200 && r.headers()[SERVED].to_str().ok() == Some(want.to_string().as_str())
        })
        .await;
        assert!(ok, "{model} → {want}");
    }
    let ids: Vec<String> = get_json(&format!("{proxy}/v1/models")).await["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(ids, [MODEL, "small"]);
}

#[test]
fn the_demo_answers_a_chat_request() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["serve", "--proxy-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kvgate serve starts");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut banner = String::new();
    let mut proxy = None;
    for _ in 0..20 {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        banner.push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("proxy") {
            proxy = rest.trim().strip_prefix("http://").and_then(|r| r.split('/').next()).map(str::to_owned);
            break;
        }
    }
    let proxy = proxy.unwrap_or_else(|| panic!("no proxy line in the banner:\n{banner}"));
    assert!(banner.contains("demo"), "{banner}");
    let body = r#"{"model":"demo-model","messages":[{"role":"user","content":"Hello!"}],"max_tokens":4}"#;
    let mut answer = String::new();
    for _ in 0..50 {
        let mut conn = std::net::TcpStream::connect(&proxy).expect("connect");
        write!(conn, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).expect("write");
        answer.clear();
        conn.read_to_string(&mut answer).expect("read");
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("chat.completion") && answer.contains("demo-replica-"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_streams_in_flight() {
    let fleet = gateway(MODEL).sim(&["--time-scale", "1"]).proxy().start().await;
    let kv = fleet.kv;
    let proxy = kv.proxy_addr.expect("proxy");
    let r = client()
        .post(format!("http://{proxy}/v1/completions"))
        .body(json!({"model": MODEL, "prompt": "a story", "max_tokens": 40, "stream": true}).to_string())
        .send()
        .await
        .expect("send");
    let mut stream = r.bytes_stream();
    let mut got = stream.next().await.expect("first chunk").expect("ok").to_vec();
    let stopping = tokio::spawn(kv.shutdown(Duration::from_secs(20)));
    while let Some(c) = stream.next().await {
        got.extend_from_slice(&c.expect("the stream is not cut"));
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(text.matches("data: ").count(), 41);
    stopping.await.expect("shutdown completes");
    assert!(std::net::TcpStream::connect(proxy).is_err(), "no longer accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_headers_for_the_gateway_stay_behind_and_forwarding_is_recorded() {
    let fleet = gateway(MODEL).sim(&["--time-scale", "0", "--served-model-name", MODEL]).proxy().start().await;
    let (sim, kv) = (&fleet.sims[0], &fleet.kv);
    let proxy = kv.proxy_addr.expect("proxy");
    let r = client()
        .post(format!("http://{proxy}/v1/completions"))
        .header("content-type", "application/json")
        .header("x-gateway-destination-endpoint", "10.9.9.9:8000")
        .header("x-gateway-destination-endpoint-served", "10.9.9.9:8000")
        .header("test-epp-endpoint-selection", "10.9.9.9:8000")
        .header("x-prefiller-host-port", "10.9.9.9:8000")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("authorization", "Bearer for-the-endpoint")
        .header("x-forwarded-for", "203.0.113.7")
        .header("forwarded", "for=203.0.113.7")
        .body(json!({"model": MODEL, "prompt": "hi", "max_tokens": 1}).to_string())
        .send()
        .await
        .expect("proxied");
    assert_eq!(r.status(), 200);
    let seen = get_json(&format!("{}/admin/last_request_headers", sim.url(0))).await;
    for gone in [
        "x-gateway-destination-endpoint",
        "x-gateway-destination-endpoint-served",
        "test-epp-endpoint-selection",
        "x-prefiller-host-port",
        "proxy-authorization",
    ] {
        assert!(seen.get(gone).is_none(), "`{gone}` reached the endpoint: {seen}");
    }
    assert_eq!(seen["authorization"], json!(["Bearer for-the-endpoint"]));
    assert_eq!(seen["x-forwarded-for"], json!(["203.0.113.7, 127.0.0.1"]));
    assert_eq!(seen["forwarded"], json!(["for=203.0.113.7, for=127.0.0.1;proto=http"]));
}

/// Sends `total` non-streaming completions through `proxy`, `concurrency` at a time; returns
/// the statuses.
async fn load(proxy: &str, total: usize, concurrency: usize) -> Vec<u16> {
    let per_task = total / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let url = format!("{proxy}/v1/completions");
            tokio::spawn(async move {
                let mut statuses = Vec::with_capacity(per_task);
                for k in 0..per_task {
                    let body = json!({"model": MODEL, "prompt": format!("task {t} request {k}"), "max_tokens": 2});
                    let r = client().post(&url).body(body.to_string()).send().await.expect("send");
                    statuses.push(r.status().as_u16());
                }
                statuses
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all
}

/// Four endpoints failing alike (`kind` at `rate`), 300 requests 10 at a time through the proxy
/// (with `extra` config): three attempts each leave `rate`³ failing (6.4% at 0.4, 12.5% at 0.5),
/// and `max_failed` bounds that well above; the pool must not eject its way to 503s.
async fn fail_alike_on_every_endpoint(kind: &str, rate: f64, max_failed: usize, extra: &str) {
    let fleet = gateway(MODEL).sims(4).proxy().config(extra).start().await;
    let (sims, kv) = (&fleet.sims, &fleet.kv);
    for s in sims {
        let f = json!({"failure_rate": rate, "failure_types": [kind]});
        let r = client().post(format!("{}/admin/faults", s.url(0))).body(f.to_string()).send().await.expect("send");
        assert_eq!(r.status(), 200);
    }
    let proxy = format!("http://{}", kv.proxy_addr.expect("proxy"));
    let statuses = load(&proxy, 300, 10).await;
    let failed = statuses.iter().filter(|s| **s != 200).count();
    println!("{kind}: {failed} of 300 requests failed");
    assert!(
        failed <= max_failed,
        "{kind}: {failed} of 300 failed: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let m = metrics(&format!("http://{}", kv.admin_addr)).await;
    let refused = metric(&m, "kvgate_requests_total", &[("status", "503"), ("decision", "none")]).unwrap_or(0.0);
    assert_eq!(refused, 0.0, "{kind}: no request was refused for want of a healthy endpoint");
    let debug = get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await;
    let healthy =
        debug["pools"][0]["endpoints"].as_array().map_or(0, |e| e.iter().filter(|e| e["healthy"] == true).count());
    assert_eq!(healthy, 4, "{kind}: errors alike on every endpoint eject none: {debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_on_every_endpoint_do_not_empty_the_pool() {
    fail_alike_on_every_endpoint("503", 0.4, 45, "").await;
}

/// Requests an endpoint takes but never answers time out; that says it is slow, not gone, so
/// timeouts count towards its error rate and never eject the whole pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangs_on_every_endpoint_do_not_empty_the_pool() {
    fail_alike_on_every_endpoint("hang", 0.5, 75, "proxy: {first_byte_timeout_ms: 150}").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_far_more_than_the_pool_is_ejected() {
    let health = "health: {backoff_ms: 60000, max_backoff_ms: 60000}";
    let fleet = gateway(MODEL).sims(4).proxy().config(health).start().await;
    let (sims, kv) = (&fleet.sims, &fleet.kv);
    let addrs: Vec<String> = (0..4).map(|k| fleet.addr(k)).collect();
    let f = json!({"failure_rate": 1.0, "failure_types": ["500"]});
    let r = client().post(format!("{}/admin/faults", sims[0].url(0))).body(f.to_string()).send().await.expect("send");
    assert_eq!(r.status(), 200);
    let proxy = format!("http://{}", kv.proxy_addr.expect("proxy"));
    let statuses = load(&proxy, 120, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "retries cover the bad endpoint: {statuses:?}");
    let debug = get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await;
    let bad = debug["pools"][0]["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["address"] == addrs[0].as_str()))
        .cloned()
        .expect("listed");
    assert_eq!(bad["healthy"], false, "ejected for its error rate: {debug}");
    // It is sent nothing while out: no request needs a retry any more.
    let admin = format!("http://{}", kv.admin_addr);
    let retries = |m: String| metric(&m, "kvgate_proxy_retries_total", &[("outcome", "sent")]).unwrap_or(0.0);
    let before = retries(metrics(&admin).await);
    assert!(before > 0.0, "the bad endpoint's answers were retried before it was ejected");
    let statuses = load(&proxy, 40, 4).await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(retries(metrics(&admin).await), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_retry_budget_holds_retries_back() {
    let cfg = "proxy: {retry_budget_percent: 0, min_retry_concurrency: 0}";
    let fleet = gateway(MODEL).sims(2).proxy().config(cfg).start().await;
    let (a, kv) = (&fleet.sims[0], &fleet.kv);
    let f = json!({"failure_rate": 1.0, "failure_types": ["503"]});
    let r = client().post(format!("{}/admin/faults", a.url(0))).body(f.to_string()).send().await.expect("send");
    assert_eq!(r.status(), 200);
    let statuses = load(&format!("http://{}", kv.proxy_addr.expect("proxy")), 8, 1).await;
    // Cold requests rotate over both endpoints; those that start on A get A's 503.
    assert!(statuses.contains(&503) && statuses.contains(&200), "{statuses:?}");
    let m = metrics(&format!("http://{}", kv.admin_addr)).await;
    assert!(metric(&m, "kvgate_proxy_retries_total", &[("outcome", "budget_exhausted")]).is_some_and(|n| n >= 1.0));
    assert_eq!(metric(&m, "kvgate_proxy_retries_total", &[("outcome", "sent")]), None);
}

/// Reads an SSE stream until its `[DONE]` line; returns what was read.
async fn read_to_done(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
) -> String {
    let mut text = String::new();
    while !text.contains("data: [DONE]") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("a chunk in time");
        text.push_str(&String::from_utf8_lossy(&chunk.expect("more").expect("ok")));
    }
    text
}

/// The completion tokens a stream's usage chunk reported.
fn completion_tokens(sse: &str) -> f64 {
    sse.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_f64())
        .expect("a usage chunk")
}

/// A stream's usage is counted once it has passed through kvgate, however the client leaves:
/// right after `[DONE]` while the endpoint still holds the response open, or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_when_the_client_leaves_after_done() {
    let sim = start_sim(&["--time-scale", "0"]).await;
    // The endpoint keeps each stream open long after `[DONE]`.
    let (status, v) = post(&format!("{}/admin/faults", sim.url(0)), &json!({"linger_after_done_ms": 60_000})).await;
    assert_eq!(status, 200, "{v}");
    let fleet = gateway(MODEL).address(sim.addrs[0]).proxy().start().await;
    let kv = &fleet.kv;
    let url = format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"));
    let admin = format!("http://{}", kv.admin_addr);
    let counted = || async { metric(&metrics(&admin).await, "kvgate_tokens_total", &[("kind", "completion")]) };
    let body = json!({"model": MODEL, "prompt": "count me", "max_tokens": 4, "stream": true,
        "stream_options": {"include_usage": true}});
    let debug = format!("{admin}/debug/endpoints");
    let in_flight = || async { get_json(&debug).await["pools"][0]["endpoints"][0]["in_flight_requests"].clone() };
    let mut want = 0.0;
    for _ in 0..5 {
        let r = client().post(&url).body(body.to_string()).send().await.expect("send");
        let mut stream = r.bytes_stream();
        want += completion_tokens(&read_to_done(&mut stream).await);
        drop(stream);
        assert!(
            eventually(5, || async { counted().await == Some(want) }).await,
            "left after [DONE]: {:?}",
            counted().await
        );
        // The request is over once kvgate has seen the client leave.
        assert!(eventually(5, || async { in_flight().await == 0 }).await, "released");
    }
    // A client that stays while the endpoint lingers: counted before the response ends.
    let r = client().post(&url).body(body.to_string()).send().await.expect("send");
    let mut stream = r.bytes_stream();
    want += completion_tokens(&read_to_done(&mut stream).await);
    assert!(eventually(5, || async { counted().await == Some(want) }).await, "still open: {:?}", counted().await);
    assert_eq!(in_flight().await, 1, "the response is open");
    drop(stream);
    assert!(eventually(5, || async { in_flight().await == 0 }).await);
    assert_eq!(counted().await, Some(want), "counted once");
}
