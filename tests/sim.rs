//! `kvgate sim` over real HTTP on loopback: API bytes, prefix caching, eviction, data
//! parallelism, P/D hand-off, KV events, LoRA, faults and aborts.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{client, eventually, free_port, metric, metrics, post, post_text, start_sim};
use futures_util::StreamExt;
use serde_json::{Value, json};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// A prompt of exactly `n` token ids, distinct per `seed`.
fn ids(n: u32, seed: u32) -> Value {
    json!((0..n).map(|i| (seed * 7919 + i * 31) % 100_000).collect::<Vec<u32>>())
}

async fn complete(base: &str, prompt: Value, max_tokens: u32) -> Value {
    let (status, body) =
        post(&format!("{base}/v1/completions"), &json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}))
            .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn cached(body: &Value) -> u64 {
    body["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_prompt_hits_the_prefix_cache() {
    let sim = start_sim(&["--time-scale", "0"]).await;
    let base = sim.url(0);
    let first = complete(&base, ids(601, 1), 1).await;
    assert_eq!(cached(&first), 0);
    let before = metric(&metrics(&base).await, "vllm:prefix_cache_hits_total", &[("engine", "0")]).expect("hits");
    let second = complete(&base, ids(601, 1), 1).await;
    // floor((601 - 1) / 16) × 16: the last token is always computed.
    assert_eq!(cached(&second), 592);
    let m = metrics(&base).await;
    assert_eq!(metric(&m, "vllm:prefix_cache_hits_total", &[("engine", "0")]), Some(before + 592.0));
    assert_eq!(metric(&m, "vllm:prefix_cache_queries_total", &[("model_name", MODEL)]), Some(1202.0));
    assert_eq!(metric(&m, "vllm:kv_cache_usage_perc", &[("engine", "0")]), Some(0.0));
    // A prompt sharing only its first 320 tokens hits exactly those.
    let mut shared: Vec<Value> = ids(601, 1).as_array().expect("ids")[..320].to_vec();
    shared.extend(ids(100, 9).as_array().expect("ids").iter().cloned());
    assert_eq!(cached(&complete(&base, Value::Array(shared), 1).await), 320);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_cache_evicts_lru_tails_first() {
    // 64 blocks of 16 tokens. A takes 38 blocks (37 full + 1 partial), B then needs 38: the 26
    // never-used blocks, then A's 12 least recently freed ones — its partial block and its last 11
    // full blocks (a request's blocks are freed tail first). A keeps its first 26 blocks.
    let sim = start_sim(&["--time-scale", "0", "--num-gpu-blocks-override", "64"]).await;
    let base = sim.url(0);
    complete(&base, ids(601, 1), 1).await;
    complete(&base, ids(601, 2), 1).await;
    assert_eq!(cached(&complete(&base, ids(601, 1), 1).await), 26 * 16);
    // A prompt larger than the whole cache is refused at once instead of queueing forever.
    let (status, body) =
        post(&format!("{base}/v1/completions"), &json!({"prompt": ids(1100, 3), "max_tokens": 1})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("maximum context length is 1024")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_vllm_format() {
    let sim = start_sim(&["--time-scale", "0"]).await;
    let base = sim.url(0);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 7,
                      "stream": true, "stream_options": {"include_usage": true}});
    let r = client().post(format!("{base}/v1/chat/completions")).body(body.to_string()).send().await.expect("send");
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().expect("ascii").starts_with("text/event-stream"));
    assert_eq!(r.headers()["x-inference-port"].to_str().expect("ascii"), sim.addrs[0].port().to_string());
    assert!(r.headers().contains_key("x-inference-pod"));
    let text = r.text().await.expect("body");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ") && !e.contains('\n')), "{text}");
    // role chunk + one chunk per token + usage chunk + [DONE]
    assert_eq!(events.len(), 1 + 7 + 1 + 1, "{text}");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(&e[6..]).expect("json chunk")).collect();
    assert!(events[0].starts_with(r#"data: {"id":"chatcmpl-"#), "vLLM's key order: {}", events[0]);
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    for c in &chunks[..8] {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["usage"], Value::Null);
        assert!(c.as_object().expect("object").contains_key("usage"));
    }
    assert!(chunks[1..7].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[7]["choices"][0]["finish_reason"], "length");
    let usage = &chunks[8];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 7);
    let ids: Vec<&Value> = chunks.iter().map(|c| &c["id"]).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "one id per stream");

    // Completions stream, no usage: one event per token, then [DONE].
    let body = json!({"model": MODEL, "prompt": "once upon a time", "max_tokens": 4, "stream": true});
    let text = post_text(&format!("{base}/v1/completions"), &body).await;
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 5, "{text}");
    let last: Value = serde_json::from_str(&events[3][6..]).expect("json");
    assert_eq!(last["object"], "text_completion");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(last.get("usage").is_none());

    // Non-streaming chat body.
    let (status, full) = post(&format!("{base}/v1/chat/completions"), &json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 3})).await;
    assert_eq!(status, 200);
    let keys: Vec<&String> = full.as_object().expect("object").keys().collect();
    assert_eq!(keys[..5], ["id", "object", "created", "model", "choices"]);
    assert_eq!(full["choices"][0]["message"]["role"], "assistant");
    assert_eq!(full["usage"]["completion_tokens"], 3);
    assert_eq!(full["usage"]["total_tokens"], full["usage"]["prompt_tokens"].as_u64().expect("n") + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_use_vllms_nested_shape() {
    let sim = start_sim(&["--time-scale", "0", "--max-model-len", "100"]).await;
    let base = sim.url(0);
    let check = |status: u16, body: Value, want_status: u16, want_type: &str| {
        assert_eq!(status, want_status, "{body}");
        let e = &body["error"];
        assert_eq!(e["type"], want_type, "{body}");
        assert_eq!(e["code"], want_status, "{body}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(e.as_object().expect("object").contains_key("param"));
    };
    let (s, b) = post(&format!("{base}/v1/completions"), &json!({"model": "gpt-17", "prompt": "x"})).await;
    check(s, b.clone(), 404, "NotFoundError");
    assert_eq!(b["error"]["message"], "The model `gpt-17` does not exist.");
    let (s, b) = post(&format!("{base}/v1/completions"), &json!({"model": MODEL, "prompt": ids(150, 1)})).await;
    check(s, b, 400, "BadRequestError");
    let (s, b) =
        post(&format!("{base}/v1/completions"), &json!({"model": MODEL, "prompt": ids(50, 1), "max_tokens": 60})).await;
    check(s, b, 400, "BadRequestError");
    let (s, b) = post(&format!("{base}/v1/chat/completions"), &json!({"model": MODEL, "messages": "hello"})).await;
    check(s, b, 400, "BadRequestError");
    let r = client().post(format!("{base}/v1/completions")).body("{not json").send().await.expect("send");
    let s = r.status().as_u16();
    check(s, r.json().await.expect("json"), 400, "BadRequestError");
    let r = client().get(format!("{base}/no/such/path")).send().await.expect("send");
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_of_64_mib_are_read() {
    let sim = start_sim(&["--time-scale", "0"]).await;
    let base = sim.url(0);
    // 64 MiB of prompt sent with transfer-encoding: chunked, 1 MiB at a time.
    let head = format!(r#"{{"model":"{MODEL}","max_tokens":1,"prompt":""#);
    let mut parts: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from(head))];
    parts.extend((0..64).map(|_| Ok(Bytes::from(vec![b'a'; 1 << 20]))));
    parts.push(Ok(Bytes::from_static(b"\"}")));
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(parts));
    let r = client().post(format!("{base}/v1/completions")).body(body).send().await.expect("send");
    let status = r.status().as_u16();
    let v: Value = r.json().await.expect("json");
    // The whole body arrived and was parsed: the answer is about its length, not its size.
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("maximum context length")), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_ranks_are_independent() {
    // Internal load balancing: one port, two engines, the header pins a rank.
    let sim = start_sim(&["--time-scale", "0", "--data-parallel-size", "2"]).await;
    let base = sim.url(0);
    let send = |rank: &'static str| {
        let base = base.clone();
        async move {
            let r = client()
                .post(format!("{base}/v1/completions"))
                .header("X-data-parallel-rank", rank)
                .body(json!({"model": MODEL, "prompt": ids(301, 5), "max_tokens": 1}).to_string())
                .send()
                .await
                .expect("send");
            let v: Value = r.json().await.expect("json");
            cached(&v)
        }
    };
    assert_eq!(send("1").await, 0);
    assert_eq!(send("1").await, 288);
    assert_eq!(send("0").await, 0, "rank 0 has its own cache");
    let m = metrics(&base).await;
    assert_eq!(metric(&m, "vllm:prefix_cache_queries_total", &[("engine", "1")]), Some(602.0));
    assert_eq!(metric(&m, "vllm:prefix_cache_queries_total", &[("engine", "0")]), Some(301.0));
    assert_eq!(metric(&m, "vllm:prefix_cache_hits_total", &[("engine", "0")]), Some(0.0));
    assert!(metric(&m, "vllm:cache_config_info", &[("engine", "1"), ("num_gpu_blocks", "29067")]).is_some());
    let r = client()
        .post(format!("{base}/v1/completions"))
        .header("X-data-parallel-rank", "7")
        .body(json!({"prompt": "x"}).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);

    // Multi-port external load balancing: rank k on its own port with its own metrics.
    let sim =
        start_sim(&["--time-scale", "0", "--data-parallel-size", "2", "--data-parallel-multi-port-external-lb"]).await;
    assert_eq!(sim.addrs.len(), 2);
    complete(&sim.url(1), ids(301, 6), 1).await;
    assert_eq!(cached(&complete(&sim.url(1), ids(301, 6), 1).await), 288);
    assert_eq!(cached(&complete(&sim.url(0), ids(301, 6), 1).await), 0);
    let m1 = metrics(&sim.url(1)).await;
    assert_eq!(metric(&m1, "vllm:prefix_cache_hits_total", &[("engine", "1")]), Some(288.0));
    assert_eq!(metric(&m1, "vllm:prefix_cache_hits_total", &[("engine", "0")]), None);
    let r = client().get(format!("{}/health", sim.url(1))).send().await.expect("send");
    assert_eq!(r.headers()["x-inference-port"].to_str().expect("ascii"), sim.addrs[1].port().to_string());

    // A single rank of a larger deployment reports its own rank.
    let sim = start_sim(&["--time-scale", "0", "--data-parallel-size", "4", "--data-parallel-rank", "3"]).await;
    complete(&sim.url(0), ids(40, 1), 1).await;
    assert!(metric(&metrics(&sim.url(0)).await, "vllm:num_requests_running", &[("engine", "3")]).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_decode_handoff_round_trips() {
    let prefill = start_sim(&[
        "--time-scale",
        "0",
        "--kv-transfer-config",
        r#"{"kv_connector":"NixlConnector","kv_role":"kv_producer"}"#,
    ])
    .await;
    let decode = start_sim(&[
        "--time-scale",
        "0",
        "--kv-transfer-config",
        r#"{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}"#,
    ])
    .await;
    let messages =
        json!([{"role": "system", "content": "You are terse. ".repeat(200)}, {"role": "user", "content": "Why?"}]);
    // Prefill leg, as a P/D proxy sends it.
    let (status, p) = post(
        &format!("{}/v1/chat/completions", prefill.url(0)),
        &json!({"model": MODEL, "messages": messages, "max_tokens": 1, "stream": false,
                "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                                       "remote_block_ids": null, "remote_host": null, "remote_port": null}}),
    )
    .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["choices"][0]["finish_reason"], "length");
    assert_eq!(p["usage"]["completion_tokens"], 1);
    let ktp = p["kv_transfer_params"].clone();
    assert_eq!(ktp["do_remote_prefill"], true);
    assert_eq!(ktp["do_remote_decode"], false);
    let prompt_tokens = p["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    let blocks = ktp["remote_block_ids"].as_array().expect("block ids");
    assert!(blocks.iter().all(Value::is_u64) && blocks.len() as u64 >= prompt_tokens / 16, "{ktp}");
    for k in ["remote_engine_id", "remote_host", "remote_request_id"] {
        assert!(ktp[k].as_str().is_some_and(|s| !s.is_empty()), "{k}: {ktp}");
    }
    assert!(ktp["remote_port"].is_u64());
    // Decode leg: the original request plus those parameters, streamed.
    let body = json!({"model": MODEL, "messages": messages, "max_tokens": 5, "stream": true,
                      "stream_options": {"include_usage": true}, "kv_transfer_params": ktp});
    let text = post_text(&format!("{}/v1/chat/completions", decode.url(0)), &body).await;
    assert!(text.ends_with("data: [DONE]\n\n"));
    let usage: Value = text
        .split("\n\n")
        .filter(|e| e.contains("\"usage\":{"))
        .map(|e| serde_json::from_str(&e[6..]).expect("json"))
        .next()
        .expect("usage chunk");
    assert_eq!(usage["usage"]["prompt_tokens"].as_u64(), Some(prompt_tokens));
    assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(prompt_tokens - 1));
    // The transferred blocks are now cached on the decode side.
    let (_, again) = post(
        &format!("{}/v1/chat/completions", decode.url(0)),
        &json!({"model": MODEL, "messages": messages, "max_tokens": 1}),
    )
    .await;
    assert_eq!(cached(&again), (prompt_tokens - 1) / 16 * 16);
    // A decode leg without block ids is a client error.
    let (status, _) = post(
        &format!("{}/v1/completions", decode.url(0)),
        &json!({"prompt": "x", "kv_transfer_params": {"do_remote_prefill": true}}),
    )
    .await;
    assert_eq!(status, 400);
}

/// Decodes one event batch; returns (stored hashes, removed hashes, cleared).
fn decode_batch(payload: &[u8]) -> (Vec<u64>, Vec<u64>, bool) {
    let v = rmpv::decode::read_value(&mut &payload[..]).expect("msgpack batch");
    let batch = v.as_array().expect("EventBatch is an array");
    assert!(batch[0].as_f64().is_some_and(|ts| ts > 1.0e9), "timestamp first");
    let (mut stored, mut removed, mut cleared) = (Vec::new(), Vec::new(), false);
    for e in batch[1].as_array().expect("events") {
        // Tagged array or tagged map: read (type, block_hashes) either way.
        let (kind, hashes) = match e {
            rmpv::Value::Array(a) => (a[0].as_str().expect("tag").to_owned(), a.get(1).cloned()),
            rmpv::Value::Map(m) => {
                let get = |k: &str| m.iter().find(|(key, _)| key.as_str() == Some(k)).map(|(_, v)| v.clone());
                (get("type").and_then(|t| t.as_str().map(str::to_owned)).expect("type"), get("block_hashes"))
            }
            other => panic!("unexpected event {other}"),
        };
        let hashes: Vec<u64> = hashes
            .and_then(|h| h.as_array().map(|a| a.iter().filter_map(rmpv::Value::as_u64).collect()))
            .unwrap_or_default();
        match kind.as_str() {
            "BlockStored" => stored.extend(hashes),
            "BlockRemoved" => removed.extend(hashes),
            "AllBlocksCleared" => cleared = true,
            other => panic!("unknown event type {other}"),
        }
    }
    (stored, removed, cleared)
}

async fn kv_events_agree_with_metrics(encoding: &str) {
    // Free ports are only free until someone else binds them (other tests run alongside), and
    // the publisher binds after the simulator starts: a port lost to a race is retried on new ones.
    let mut started = None;
    for _ in 0..3 {
        let (pub_port, replay_port) = (free_port(), free_port());
        let cfg = json!({"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": format!("tcp://*:{pub_port}"),
                         "replay_endpoint": format!("tcp://*:{replay_port}"), "topic": "kv@test"})
        .to_string();
        let sim = start_sim(&[
            "--time-scale",
            "0",
            "--num-gpu-blocks-override",
            "64",
            "--kv-events-config",
            &cfg,
            "--kv-events-encoding",
            encoding,
        ])
        .await;
        let mut sub = SubSocket::new();
        let endpoint = format!("tcp://127.0.0.1:{pub_port}");
        if matches!(tokio::time::timeout(Duration::from_secs(5), sub.connect(&endpoint)).await, Ok(Ok(_))) {
            started = Some((sim, sub, replay_port));
            break;
        }
    }
    let (sim, mut sub, replay_port) = started.expect("connect SUB");
    let base = sim.url(0);
    sub.subscribe("kv@").await.expect("subscribe");
    // The live stream: send small requests until one batch arrives (a SUB misses what was
    // published before its subscription reached the publisher).
    let mut live = None;
    for k in 0..50 {
        complete(&base, ids(40, 100 + k), 1).await;
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await {
            live = Some(m);
            break;
        }
    }
    let live = live.expect("the subscriber receives live batches");
    assert_eq!(live.len(), 3, "topic, sequence, payload");
    assert_eq!(live.get(0).expect("topic").as_ref(), b"kv@test");
    assert_eq!(live.get(1).expect("seq").len(), 8);
    let warmup_hits = metric(&metrics(&base).await, "vllm:prefix_cache_hits_total", &[]).expect("hits");

    complete(&base, ids(601, 1), 1).await;
    complete(&base, ids(601, 2), 1).await;
    let third = complete(&base, ids(601, 1), 1).await;

    // Replay everything from sequence 0 and check it against what the metrics say.
    let mut dealer = DealerSocket::new();
    dealer.connect(&format!("tcp://127.0.0.1:{replay_port}")).await.expect("connect replay");
    let req = ZmqMessage::try_from(vec![Bytes::new(), Bytes::copy_from_slice(&0u64.to_be_bytes())]).expect("message");
    dealer.send(req).await.expect("replay request");
    let (mut stored, mut removed) = (Vec::new(), Vec::new());
    let mut seqs = Vec::new();
    loop {
        let m =
            tokio::time::timeout(Duration::from_secs(10), dealer.recv()).await.expect("replay answers").expect("frame");
        let frames = m.into_vec();
        let seq = i64::from_be_bytes(<[u8; 8]>::try_from(frames[frames.len() - 2].as_ref()).expect("8-byte seq"));
        if seq == -1 {
            break;
        }
        seqs.push(seq);
        let (s, r, _) = decode_batch(&frames[frames.len() - 1]);
        stored.extend(s);
        removed.extend(r);
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1) && seqs[0] == 0, "{seqs:?}");
    assert!(removed.iter().all(|h| stored.contains(h)), "every removed block was stored first");
    assert!(!removed.is_empty(), "the small cache evicted blocks");
    // The third request hit exactly the blocks of the first that were stored and not removed.
    let hits = metric(&metrics(&base).await, "vllm:prefix_cache_hits_total", &[]).expect("hits") - warmup_hits;
    assert_eq!(hits, cached(&third) as f64);
    assert_eq!(cached(&third), 26 * 16);
    // /reset_prefix_cache publishes AllBlocksCleared.
    let r = client().post(format!("{base}/reset_prefix_cache")).send().await.expect("reset");
    assert_eq!(r.status(), 200);
    let mut cleared = false;
    for _ in 0..200 {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await
            && decode_batch(m.get(2).expect("payload")).2
        {
            cleared = true;
            break;
        }
    }
    assert!(cleared, "AllBlocksCleared reaches the subscriber");
    assert_eq!(cached(&complete(&base, ids(601, 1), 1).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_map_encoding() {
    kv_events_agree_with_metrics("map").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_array_encoding() {
    kv_events_agree_with_metrics("array").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_connect_to_a_listening_subscriber() {
    // An endpoint without `*` connects: here the subscriber binds, as a central indexer does.
    let port = free_port();
    let mut sub = SubSocket::new();
    sub.bind(&format!("tcp://127.0.0.1:{port}")).await.expect("bind SUB");
    sub.subscribe("").await.expect("subscribe");
    let cfg = json!({"enable_kv_cache_events": true, "endpoint": format!("tcp://127.0.0.1:{port}")}).to_string();
    let sim = start_sim(&["--time-scale", "0", "--kv-events-config", &cfg]).await;
    let mut got = None;
    for k in 0..50 {
        complete(&sim.url(0), ids(64, k), 1).await;
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await {
            got = Some(m);
            break;
        }
    }
    let m = got.expect("events reach the listening subscriber");
    assert_eq!(m.get(0).expect("topic").len(), 0, "empty topic");
    let (stored, _, _) = decode_batch(m.get(2).expect("payload"));
    assert!(!stored.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_adapters() {
    let sim = start_sim(&[
        "--time-scale",
        "0",
        "--enable-lora",
        "--lora-modules",
        "sql-lora=/adapters/sql",
        "--max-loras",
        "1",
    ])
    .await;
    let base = sim.url(0);
    let models: Value =
        client().get(format!("{base}/v1/models")).send().await.expect("send").json().await.expect("json");
    let data = models["data"].as_array().expect("data");
    let sql = data.iter().find(|m| m["id"] == "sql-lora").expect("adapter listed");
    assert_eq!(sql["parent"], MODEL);
    assert_eq!(sql["root"], "/adapters/sql");
    let (s, b) =
        post(&format!("{base}/v1/completions"), &json!({"model": "sql-lora", "prompt": "select", "max_tokens": 2}))
            .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["model"], "sql-lora");
    let (s, _) = post(&format!("{base}/v1/completions"), &json!({"model": "chat-lora", "prompt": "hi"})).await;
    assert_eq!(s, 404);
    let r = client()
        .post(format!("{base}/v1/load_lora_adapter"))
        .body(json!({"lora_name": "chat-lora", "lora_path": "/a/chat"}).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let (s, _) =
        post(&format!("{base}/v1/completions"), &json!({"model": "chat-lora", "prompt": "hi", "max_tokens": 1})).await;
    assert_eq!(s, 200);
    // The adapter sets of lora_requests_info changed, so there is a series with max_lora="1".
    let m = metrics(&base).await;
    let ts = metric(&m, "vllm:lora_requests_info", &[("max_lora", "1")]).expect("lora_requests_info");
    assert!(ts > 1.0e9, "value is a unix time");
    let r = client()
        .post(format!("{base}/v1/unload_lora_adapter"))
        .body(json!({"lora_name": "chat-lora"}).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let (s, _) = post(&format!("{base}/v1/completions"), &json!({"model": "chat-lora", "prompt": "hi"})).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_on_demand() {
    let sim = start_sim(&["--time-scale", "0"]).await;
    let base = sim.url(0);
    let set = |f: Value| {
        let base = base.clone();
        async move {
            let r = client().post(format!("{base}/admin/faults")).body(f.to_string()).send().await.expect("send");
            assert_eq!(r.status(), 200);
        }
    };
    let req = json!({"model": MODEL, "prompt": "hello", "max_tokens": 8, "stream": true});
    set(json!({"failure_rate": 1.0, "failure_types": ["429"]})).await;
    let (s, b) = post(&format!("{base}/v1/completions"), &req).await;
    assert_eq!((s, b["error"]["code"].as_u64()), (429, Some(429)));
    set(json!({"failure_rate": 1.0, "failure_types": ["abort"]})).await;
    let r = client().post(format!("{base}/v1/completions")).body(req.to_string()).send().await.expect("send");
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut got = Vec::new();
    let mut broke = false;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => got.extend_from_slice(&c),
            Err(_) => {
                broke = true;
                break;
            }
        }
    }
    assert!(broke, "the stream is cut off");
    assert!(!String::from_utf8_lossy(&got).contains("[DONE]"));
    set(json!({"paused": true})).await;
    let (s, _) = post(&format!("{base}/v1/completions"), &req).await;
    assert_eq!(s, 503);
    assert_eq!(client().get(format!("{base}/health")).send().await.expect("send").status(), 503);
    set(json!({})).await;
    assert_eq!(client().get(format!("{base}/health")).send().await.expect("send").status(), 200);
    let r = client().post(format!("{base}/admin/faults")).body(r#"{"failure_rate": 3}"#).send().await.expect("send");
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_aborts_the_request() {
    let sim = start_sim(&["--time-scale", "1"]).await;
    let base = sim.url(0);
    let req = json!({"model": MODEL, "prompt": "tell me a long story", "max_tokens": 5000, "stream": true});
    let r = client().post(format!("{base}/v1/completions")).body(req.to_string()).send().await.expect("send");
    let mut stream = r.bytes_stream();
    stream.next().await.expect("a first chunk").expect("ok");
    drop(stream);
    let aborted = eventually(10, || async {
        metric(&metrics(&base).await, "vllm:request_success_total", &[("finished_reason", "abort")]) == Some(1.0)
    })
    .await;
    assert!(aborted, "the engine saw the abort");
    let m = metrics(&base).await;
    assert_eq!(metric(&m, "vllm:num_requests_running", &[]), Some(0.0));
    assert_eq!(metric(&m, "vllm:kv_cache_usage_perc", &[]), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_probes_and_tokenizer_endpoints() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", "a", "b"]).await;
    let base = sim.url(0);
    for path in ["/server_info", "/get_server_info", "/model_info", "/get_model_info", "/version"] {
        let r = client().get(format!("{base}{path}")).send().await.expect("send");
        assert_eq!(r.status(), 200, "{path}");
        let _: Value = r.json().await.expect("JSON");
    }
    let (s, t) = post(&format!("{base}/tokenize"), &json!({"model": "b", "prompt": "hello world"})).await;
    assert_eq!(s, 200);
    assert_eq!(t["count"], 4);
    let msgs = json!([{"role": "user", "content": "hello world"}]);
    let (_, chat) = post(&format!("{base}/v1/chat/completions/render"), &json!({"model": "a", "messages": msgs})).await;
    let (_, tok) = post(&format!("{base}/tokenize"), &json!({"model": "a", "messages": msgs})).await;
    assert_eq!(chat["token_ids"], tok["tokens"]);
    let (_, comp) =
        post(&format!("{base}/v1/completions/render"), &json!({"model": "a", "prompt": "hello world"})).await;
    assert_eq!(comp[0]["token_ids"], t["tokens"]);
    // Generation with a chat prompt reports the same prompt length as the renderer.
    let (_, gen_) =
        post(&format!("{base}/v1/chat/completions"), &json!({"model": "a", "messages": msgs, "max_tokens": 1})).await;
    assert_eq!(gen_["usage"]["prompt_tokens"].as_u64(), chat["token_ids"].as_array().map(|a| a.len() as u64));
    let m = metrics(&base).await;
    assert!(
        metric(&m, "vllm:num_requests_waiting", &[("model_name", "a")]).is_some(),
        "model_name is the first served name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_as_large_as_a_real_servers_and_filters_are_ignored() {
    let sim = start_sim(&["--time-scale", "0"]).await;
    let base = sim.url(0);
    for k in 0..3 {
        complete(&base, ids(100, k), 4).await;
    }
    let whole = metrics(&base).await;
    // vLLM 0.32 answers about 52 KB, mostly histograms.
    assert!(whole.len() > 30_000, "{} bytes", whole.len());
    let buckets = whole.lines().filter(|l| l.contains("_bucket{")).count();
    assert!(buckets * 2 > whole.lines().filter(|l| !l.starts_with('#')).count(), "mostly histogram buckets");
    assert!(metric(&whole, "vllm:request_prompt_tokens_count", &[("engine", "0")]) == Some(3.0));
    // `name[]` is ignored, as vLLM 0.32 ignores it …
    let filtered = client()
        .get(format!("{base}/metrics?name%5B%5D=vllm%3Anum_requests_running"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(filtered.len() > 30_000 && filtered.contains("vllm:cache_config_info"));
    // … unless asked to behave like older servers; and a backend may hide its cache config.
    let old = start_sim(&["--time-scale", "0", "--metrics-name-filter", "--no-cache-config-info"]).await;
    let url =
        format!("{}/metrics?name%5B%5D=vllm%3Anum_requests_running&name%5B%5D=vllm%3Acache_config_info", old.url(0));
    let small = client().get(url).send().await.expect("metrics").text().await.expect("text");
    assert!(small.contains("vllm:num_requests_running") && !small.contains("cache_config_info"), "{small}");
    assert!(small.len() < 1000);
}

/// `--fake-metrics` (llm-d-inference-sim's flag): the load families show the pinned values,
/// for every rank, whatever the engine is doing; the other families stay live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_metrics_pin_the_load_families() {
    let fake = r#"{"running-requests":10,"waiting-requests":30,"kv-cache-usage":0.4,
        "loras":[{"running":"lora4,lora2","waiting":"lora3","timestamp":1257894567},
                 {"running":"lora4,lora3","waiting":"","timestamp":1257894569}]}"#;
    let sim =
        start_sim(&["--time-scale", "0", "--data-parallel-size", "2", "--max-loras", "4", "--fake-metrics", fake])
            .await;
    let base = sim.url(0);
    let check = |m: &str| {
        for engine in ["0", "1"] {
            let l = [("engine", engine), ("model_name", MODEL)];
            assert_eq!(metric(m, "vllm:num_requests_running", &l), Some(10.0), "engine {engine}");
            assert_eq!(metric(m, "vllm:num_requests_waiting", &l), Some(30.0), "engine {engine}");
            assert_eq!(metric(m, "vllm:kv_cache_usage_perc", &l), Some(0.4), "engine {engine}");
        }
        let lora = |running: &str, waiting: &str| {
            let l = [("max_lora", "4"), ("running_lora_adapters", running), ("waiting_lora_adapters", waiting)];
            metric(m, "vllm:lora_requests_info", &l)
        };
        assert_eq!(lora("lora4,lora2", "lora3"), Some(1_257_894_567.0));
        assert_eq!(lora("lora4,lora3", ""), Some(1_257_894_569.0));
        assert_eq!(m.matches("# TYPE vllm:num_requests_waiting gauge").count(), 1, "one family, the pinned one");
    };
    check(&metrics(&base).await);
    // Work on the engine moves its counters, not the pinned gauges.
    complete(&base, ids(100, 1), 4).await;
    let m = metrics(&base).await;
    check(&m);
    let queried: f64 =
        ["0", "1"].iter().filter_map(|e| metric(&m, "vllm:prefix_cache_queries_total", &[("engine", e)])).sum();
    assert_eq!(queried, 100.0, "the engine's own families stay live");

    // Values a vLLM server could not report, and fields kvgate does not pin, are refused.
    for bad in [r#"{"kv-cache-usage":1.5}"#, r#"{"waiting-requests":-1}"#, r#"{"ttft-buckets-values":[1,2]}"#] {
        let flags = ["--port", "0", "--fake-metrics", bad];
        let args = kvgate::tools::cli::parse_flags::<kvgate::tools::sim::SimArgs, _, _>("sim", &flags).expect("flags");
        let err = kvgate::tools::sim::start(args).await.expect_err(bad);
        assert!(format!("{err:#}").contains("--fake-metrics"), "{bad}: {err:#}");
    }
}
