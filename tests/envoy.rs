//! kvgate as Envoy's endpoint picker, through a real Envoy 1.40 on loopback, with simulators
//! as the model servers.
#![allow(clippy::disallowed_methods, reason = "the test's own tasks (Envoy starts, a shutdown) end with its runtime")]

mod common;

use common::envoy::Envoy;
use common::{chat, client, eventually, gateway, get_json, post};
use serde_json::{Value, json};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

struct Setup {
    sims: Vec<common::Sim>,
    _kv: kvgate::tools::serve::Server,
    envoy: Envoy,
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.envoy.listener)
    }
}

async fn setup(n: usize, extra: &str) -> Setup {
    let common::Fleet { sims, kv, .. } = gateway(MODEL).sims(n).config(extra).start().await;
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
        let body = chat(MODEL).system(format!("{k} another persona ").repeat(40)).user("hi").max_tokens(2).json();
        let r = client().post(&url).body(body.to_string()).send().await.expect("send");
        assert_eq!(r.status(), 200);
        seen.insert(served_by(&r));
    }
    assert_eq!(seen.len(), 3, "cold requests spread over every endpoint");
    // Through ext_proc the Inference Extension's request families are kept as in the proxy:
    // 10 requests, each with its duration, sizes and usage tokens (2 and 3 per answer).
    let text = common::metrics(&format!("http://{}", s._kv.admin_addr)).await;
    let model = [("model_name", MODEL), ("target_model_name", MODEL)];
    let value = |name: &str| common::metric(&text, name, &model);
    assert_eq!(value("inference_objective_request_total"), Some(10.0), "{text}");
    assert_eq!(value("inference_objective_request_duration_seconds_count"), Some(10.0), "{text}");
    assert_eq!(value("inference_objective_output_tokens_sum"), Some(4.0 * 3.0 + 6.0 * 2.0), "{text}");
    assert!(value("inference_objective_input_tokens_sum").is_some_and(|n| n > 1000.0), "{text}");
    assert!(value("inference_objective_response_sizes_sum").is_some_and(|n| n > 1000.0), "{text}");
    assert_eq!(value("inference_objective_request_sizes_count"), Some(10.0), "{text}");
    assert_eq!(common::metric(&text, "inference_objective_running_requests", &[("model_name", MODEL)]), Some(0.0));
    drop(s.sims);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_bodies_and_errors_through_envoy() {
    let s = setup(1, "paths: {model: [/tokenize, /v1/load_lora_adapter]}").await;
    // The path policy decides through Envoy as in the proxy: a model server's admin surface is
    // refused with the proxy's status and body, and never reaches the endpoint.
    let faults = json!({"failure_rate": 1.0, "failure_types": ["500"]});
    for (method, path) in [("POST", "/admin/faults"), ("GET", "/metrics"), ("POST", "/reset_prefix_cache")] {
        let r = client()
            .request(method.parse().expect("method"), s.url(path))
            .body(faults.to_string())
            .send()
            .await
            .expect("send");
        assert!(!r.headers().contains_key("x-inference-port"), "{path} reached the endpoint");
        let status = r.status().as_u16();
        let v: Value = r.json().await.expect("an OpenAI body");
        assert_eq!((status, v["error"]["code"].as_str()), (404, Some("not_found")), "{path}: {v}");
    }
    let sim_faults = get_json(&format!("{}/admin/faults", s.sims[0].url(0))).await;
    assert_eq!(sim_faults["failure_rate"], 0.0, "the simulator was not reconfigured: {sim_faults}");
    let r = client().get(s.url("/v1/completions")).send().await.expect("send");
    assert_eq!((r.status().as_u16(), r.headers().get("allow").and_then(|v| v.to_str().ok())), (405, Some("POST")));
    let r = client().post(s.url("/v1/completions")).send().await.expect("send");
    let status = r.status().as_u16();
    let v: Value = r.json().await.expect("an OpenAI body");
    assert_eq!((status, v["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{v}");
    // Paths opened by model pass through to an endpoint of the model's pool.
    let (status, v) = post(&s.url("/tokenize"), &json!({"model": MODEL, "prompt": "hello world"})).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["tokens"].as_array().is_some_and(|t| !t.is_empty()), "{v}");
    let lora = json!({"model": MODEL, "lora_name": "sql", "lora_path": "/adapters/sql"});
    let r = client().post(s.url("/v1/load_lora_adapter")).body(lora.to_string()).send().await.expect("send");
    // It reached the simulator (which answers that LoRA is not enabled on it).
    assert_eq!(served_by(&r), s.sims[0].addrs[0].port());
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
    let fleet = gateway(MODEL).address(format!("127.0.0.1:{dead}")).start_without_waiting().await;
    let kv = &fleet.kv;
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

/// The `lb_endpoints` line of override-host.yaml for these addresses.
fn pool_members(addrs: &[String]) -> String {
    let eps: Vec<String> = addrs
        .iter()
        .map(|a| {
            let (ip, port) = a.rsplit_once(':').expect("ip:port");
            format!("{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}")
        })
        .collect();
    format!("      - lb_endpoints: [{}]", eps.join(", "))
}

fn with_members(text: String, addrs: &[String]) -> String {
    text.lines()
        .map(|l| if l.trim_start().starts_with("- lb_endpoints: [") { pool_members(addrs) } else { l.to_owned() })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_host_falls_back_to_the_next_entry() {
    let dead = format!("127.0.0.1:{}", common::free_port());
    // Two endpoints per pick; scrape rarely and rotate the first choice, so the dead endpoint
    // still looks healthy to kvgate and heads every other list.
    let fleet = gateway(MODEL)
        .address(&dead)
        .sims(1)
        .config("scrape: {interval_ms: 600000}\nextproc: {max_endpoints: 2}")
        .pool("scheduler: {plugins: [{type: round-robin-picker}]}")
        .start_without_waiting()
        .await;
    let (kv, live) = (&fleet.kv, &fleet.sims[0]);
    let members = vec![dead.clone(), live.addrs[0].to_string()];
    let grpc = kv.grpc_addr.port();
    let m = members.clone();
    let envoy =
        tokio::task::spawn_blocking(move || Envoy::start("override-host.yaml", grpc, move |t| with_members(t, &m)))
            .await
            .expect("envoy");
    let url = format!("http://{}/v1/completions", envoy.listener);
    for k in 0..6 {
        let r = client()
            .post(&url)
            .body(json!({"model": MODEL, "prompt": format!("{k}"), "max_tokens": 1}).to_string())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "request {k}");
        assert_eq!(served_by(&r), live.addrs[0].port());
    }
}

/// The upstream conformance suite's GatewayFollowingEPPRouting and its data-parallel variant:
/// with the test filter on, `test-epp-endpoint-selection` decides, down to the port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_following_epp_routing_with_ranks_on_one_ip() {
    let s = setup(3, "extproc: {conformance_test_filter: true}").await;
    let url = s.url("/v1/completions");
    let ports: Vec<u16> = s.sims.iter().map(|x| x.addrs[0].port()).collect();
    let send = |selection: String| {
        let url = url.clone();
        async move {
            let r = client()
                .post(&url)
                .header("test-epp-endpoint-selection", selection)
                .body(json!({"model": MODEL, "prompt": "x", "max_tokens": 1}).to_string())
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200);
            served_by(&r)
        }
    };
    // One endpoint per request: always that one (every endpoint shares the IP 127.0.0.1, as
    // data-parallel ranks do; only the port tells them apart).
    for &p in &ports {
        for _ in 0..3 {
            assert_eq!(send(format!("127.0.0.1:{p}")).await, p);
        }
    }
    // Several: one of them, never another.
    let allowed = format!("127.0.0.1:{},127.0.0.1:{}", ports[1], ports[2]);
    for _ in 0..6 {
        let got = send(allowed.clone()).await;
        assert!(got == ports[1] || got == ports[2], "{got} not in {allowed}");
    }
}

/// EppUnAvailableFailOpen: with kvgate down and `failure_mode_allow: true`, what still gets
/// through. Envoy 1.40 fails open for buffered request bodies (the fallback policy picks), but
/// not for full-duplex ones: a POST whose body was being streamed to the picker gets a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_epp_unavailable_fail_open() {
    let sim = common::start_sim(&["--time-scale", "0"]).await;
    let members = vec![sim.addrs[0].to_string()];
    let nobody = common::free_port();
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 1}).to_string();
    for (mode, want) in [("BUFFERED", 200u16), ("FULL_DUPLEX_STREAMED", 500)] {
        let m = members.clone();
        let envoy = tokio::task::spawn_blocking(move || {
            Envoy::start("override-host.yaml", nobody, move |t| {
                let t = with_members(t, &m).replace("failure_mode_allow: false", "failure_mode_allow: true");
                if mode == "BUFFERED" {
                    t.replace("request_body_mode: FULL_DUPLEX_STREAMED", "request_body_mode: BUFFERED")
                        .replace("request_trailer_mode: SEND", "request_trailer_mode: SKIP")
                } else {
                    t
                }
            })
        })
        .await
        .expect("envoy");
        let r = client()
            .post(format!("http://{}/v1/completions", envoy.listener))
            .body(body.clone())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), want, "{mode}");
        // A request without a body fails open in either mode.
        let r = client().get(format!("http://{}/v1/models", envoy.listener)).send().await.expect("send");
        assert_eq!(r.status(), 200, "{mode}: GET");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_picker_finishes_the_streams_it_holds() {
    let fleet = gateway(MODEL).sim(&["--time-scale", "1"]).start().await;
    let kv = fleet.kv;
    let grpc = kv.grpc_addr.port();
    let envoy =
        tokio::task::spawn_blocking(move || Envoy::start("original-dst.yaml", grpc, |t| t)).await.expect("envoy");
    let r = client()
        .post(format!("http://{}/v1/completions", envoy.listener))
        .body(json!({"model": MODEL, "prompt": "a story", "max_tokens": 40, "stream": true}).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    use futures_util::StreamExt;
    let mut stream = r.bytes_stream();
    let mut got = stream.next().await.expect("first chunk").expect("ok").to_vec();
    let stopping = tokio::spawn(kv.shutdown(std::time::Duration::from_secs(20)));
    while let Some(c) = stream.next().await {
        got.extend_from_slice(&c.expect("the stream is not cut"));
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    stopping.await.expect("shutdown completes");
}

/// Envoy 1.40 announces its body modes in the first message (`protocol_config`): a picker left
/// on its full-duplex default follows an Envoy configured for buffered bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_announces_buffered_mode_and_kvgate_follows() {
    let fleet = gateway(MODEL).sims(1).start_without_waiting().await;
    let (kv, sim) = (&fleet.kv, &fleet.sims[0]);
    let grpc = kv.grpc_addr.port();
    let envoy = tokio::task::spawn_blocking(move || {
        Envoy::start("original-dst.yaml", grpc, |t| {
            t.replace("request_body_mode: FULL_DUPLEX_STREAMED", "request_body_mode: BUFFERED")
                .replace("request_trailer_mode: SEND", "request_trailer_mode: SKIP")
        })
    })
    .await
    .expect("envoy");
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    assert!(eventually(10, || async { get_json(&debug).await["pools"][0]["endpoints"][0]["stale"] == false }).await);
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(4),
        client()
            .post(format!("http://{}/v1/completions", envoy.listener))
            .body(json!({"model": MODEL, "prompt": "x", "max_tokens": 1}).to_string())
            .send(),
    )
    .await
    .expect("answered before Envoy's 5 s message timeout")
    .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(&r), sim.addrs[0].port());
}

/// Pattern 5's pieces: a producer and a consumer simulator, and a sidecar beside the consumer
/// that reports each hand-off to `report_to`; with the pool's config line for them.
struct PdFleet {
    _sims: (common::Sim, common::Sim),
    /// The prefill simulator's and the decode simulator's addresses.
    pa: String,
    da: String,
    sc: kvgate::tools::sidecar::Running,
}

impl PdFleet {
    async fn start(report_to: &str) -> Self {
        let role = |r: &str| format!(r#"{{"kv_connector":"NixlConnector","kv_role":"{r}"}}"#);
        let (producer, consumer) = (role("kv_producer"), role("kv_consumer"));
        let p = common::start_sim(&["--time-scale", "0", "--kv-transfer-config", &producer]).await;
        let d = common::start_sim(&["--time-scale", "0", "--kv-transfer-config", &consumer]).await;
        let (pa, da) = (p.addrs[0].to_string(), d.addrs[0].to_string());
        let flags = ["--listen", "127.0.0.1:0", "--decode", &da, "--admin-addr", "127.0.0.1:0", "--allow-prefill", &pa];
        let args: kvgate::tools::sidecar::SidecarArgs =
            kvgate::tools::cli::parse_flags("sidecar", flags.iter().copied().chain(["--report-to", report_to]))
                .expect("flags");
        let sc = kvgate::tools::sidecar::start(args).await.expect("sidecar");
        Self { _sims: (p, d), pa, da, sc }
    }

    /// The pool `pd`: the prefill simulator and the sidecar (as the decode endpoint), with the
    /// reference P/D scheduler.
    fn pool(&self) -> String {
        format!(
            "pools: [{{name: pd, models: ['{MODEL}'], endpoints: [\
             {{address: '{}', labels: {{llm-d.ai/role: prefill}}}}, {{address: '{}', labels: {{llm-d.ai/role: decode}}}}], \
             scheduler: {{plugins: [{{type: prefill-filter}}, {{type: decode-filter}}, {{type: prefix-cache-scorer}}, \
             {{type: disagg-profile-handler}}, {{type: prefix-based-pd-decider, parameters: {{nonCachedTokens: 256}}}}], \
             schedulingProfiles: [{{name: prefill, plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: prefix-cache-scorer}}]}}, \
             {{name: decode, plugins: [{{pluginRef: decode-filter}}, {{pluginRef: prefix-cache-scorer}}]}}]}}}}]\n",
            self.pa, self.sc.addr
        )
    }
}

/// Pattern 5 behind Envoy with kvgate alone: Envoy asks kvgate's picker, which chooses the decode
/// endpoint (its sidecar's address) and, for a long uncached prompt, a prefill endpoint named in
/// `x-prefiller-host-port`; the sidecar runs the hand-off and the decode simulator answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_decode_through_envoy_and_the_sidecar() {
    // The sidecar reports each hand-off to kvgate's picker API.
    let grpc_addr = format!("127.0.0.1:{}", common::free_port());
    let fleet = PdFleet::start(&format!("http://{grpc_addr}")).await;
    let (pa, da, sc) = (fleet.pa.clone(), fleet.da.clone(), &fleet.sc);
    let kv = common::start_kvgate(&format!("grpc_addr: {grpc_addr}\nadmin_addr: 127.0.0.1:0\n{}", fleet.pool())).await;
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    // The decode endpoint is scraped through its sidecar.
    let ok = eventually(10, || async {
        get_json(&debug).await["pools"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().all(|e| e["stale"] == false))
    })
    .await;
    assert!(ok, "endpoints scraped");
    let grpc = kv.grpc_addr.port();
    let envoy =
        tokio::task::spawn_blocking(move || Envoy::start("original-dst.yaml", grpc, |t| t)).await.expect("envoy");
    let url = format!("http://{}/v1/chat/completions", envoy.listener);
    let leg = |base: String, leg: &'static str| async move {
        common::metric(&common::metrics(&base).await, "kvgate_sim_kv_handoffs_total", &[("leg", leg)]).unwrap_or(0.0)
    };
    let sidecar = |kind: &'static str| {
        let base = format!("http://{}", sc.admin_addr.expect("admin"));
        async move {
            common::metric(&common::metrics(&base).await, "kvgate_sidecar_requests_total", &[("kind", kind)])
                .unwrap_or(0.0)
        }
    };
    let system = "Clause of the service agreement. ".repeat(200);
    let ask = |q: &str| chat(MODEL).system(system.clone()).user(q).max_tokens(5).stream().json().to_string();
    let r = client().post(&url).body(ask("First?")).send().await.expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(&r).to_string(), da.rsplit(':').next().unwrap_or_default(), "the decode simulator answered");
    assert!(r.text().await.expect("body").ends_with("data: [DONE]\n\n"));
    assert_eq!((leg(format!("http://{pa}"), "prefill").await, leg(format!("http://{da}"), "decode").await), (1.0, 1.0));
    assert_eq!(sidecar("prefill-decode").await, 1.0);
    // Next turn, cached on the decode side: no prefill endpoint named, the sidecar decodes locally.
    let r = client().post(&url).body(ask("Second?")).send().await.expect("send");
    assert_eq!(r.status(), 200);
    let _ = r.text().await;
    assert_eq!((sidecar("prefill-decode").await, sidecar("decode-only").await), (1.0, 1.0));
    // A client cannot name a prefill endpoint itself: the picker removes the header.
    let r = client()
        .post(format!("http://{}/v1/completions", envoy.listener))
        .header("x-prefiller-host-port", format!("127.0.0.1:{}", common::free_port()))
        .body(json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!((sidecar("decode-only").await, sidecar("fallback").await), (2.0, 0.0));
    // Nor its own transfer parameters: the picker rewrites the body without them (had they
    // reached the decode simulator, it would have loaded KV instead of prefilling).
    let forged = json!({"model": MODEL, "prompt": "hello", "max_tokens": 2, "kv_transfer_params": {
        "do_remote_prefill": true, "do_remote_decode": false, "remote_block_ids": [1], "remote_engine_id": "x",
        "remote_host": "10.9.9.9", "remote_port": 5600}});
    let r = client()
        .post(format!("http://{}/v1/completions", envoy.listener))
        .body(forged.to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.expect("body").contains("\"choices\""));
    assert_eq!(leg(format!("http://{da}"), "decode").await, 1.0);
    // The prefill endpoint fails: the sidecar prefills locally and the client never knows.
    let faults = json!({"failure_rate": 1.0, "failure_types": ["500"]}).to_string();
    let r = client().post(format!("http://{pa}/admin/faults")).body(faults).send().await.expect("faults");
    assert_eq!(r.status(), 200);
    let system = "Entirely different terms of service. ".repeat(200);
    let body = chat(MODEL).system(system).user("Q?").max_tokens(5).stream().json();
    let r = client().post(&url).body(body.to_string()).send().await.expect("send");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.expect("body").ends_with("data: [DONE]\n\n"));
    assert_eq!((sidecar("prefill-decode").await, sidecar("fallback").await), (1.0, 1.0));
    // kvgate learned both hand-offs from the sidecar's reports, as its proxy learns its own: the
    // fallback is counted with its reason, the prefill endpoint holds the prompt it computed and
    // not the one it failed (the decode endpoint computed that one), and nothing stays in flight.
    let reports = |result: &'static str| {
        let base = format!("http://{}", sc.admin_addr.expect("admin"));
        async move {
            common::metric(&common::metrics(&base).await, "kvgate_sidecar_reports_total", &[("result", result)])
                .unwrap_or(0.0)
        }
    };
    assert_eq!((reports("ok").await, reports("failed").await), (2.0, 0.0));
    let admin = format!("http://{}", kv.admin_addr);
    let m = common::metrics(&admin).await;
    let fallbacks = common::metric(&m, "kvgate_disagg_fallbacks_total", &[("pool", "pd"), ("reason", "status")]);
    assert_eq!(fallbacks, Some(1.0));
    let held = |body: Value| {
        let url = format!("{admin}/debug/explain?path=/v1/chat/completions");
        let (pa, decode) = (pa.clone(), sc.addr.to_string());
        async move {
            let x = client().post(url).body(body.to_string()).send().await.expect("explain").json::<Value>().await;
            let x = x.expect("JSON");
            let blocks = |addr: &str| {
                x["explanation"]["endpoints"]
                    .as_array()
                    .and_then(|e| e.iter().find(|e| e["address"] == addr))
                    .and_then(|e| e["matched_blocks"].as_u64())
                    .unwrap_or(0)
            };
            (blocks(&pa), blocks(&decode))
        }
    };
    let (on_prefill, on_decode) = held(body).await;
    assert_eq!(on_prefill, 0, "the failed prefill endpoint is not taken to hold the prompt");
    assert!(on_decode > 0, "the decode endpoint computed it");
    let first = chat(MODEL).system("Clause of the service agreement. ".repeat(200)).user("First?").json();
    assert!(held(first).await.0 > 0, "the prefill endpoint holds what it computed");
    let v = get_json(&format!("{admin}/debug/endpoints")).await;
    let in_flight: u64 = v["pools"][0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["in_flight_requests"].as_u64())
        .sum();
    assert_eq!(in_flight, 0);
    let pending = common::metric(&common::metrics(&admin).await, "kvgate_picker_decisions_pending", &[]);
    assert_eq!(pending, Some(0.0), "every P/D stream's decision id is let go");
}

/// Data-parallel ranks behind one port, through Envoy: the picker pins its rank with a header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_rank_pinned_by_header_through_envoy() {
    let fleet =
        gateway(MODEL).sim(&["--time-scale", "0", "--data-parallel-size", "2"]).sim_keys("data_parallel_size: 2");
    let fleet = fleet.start_without_waiting().await;
    let (kv, sim) = (&fleet.kv, &fleet.sims[0]);
    common::wait_scraped(kv, 2).await;
    let grpc = kv.grpc_addr.port();
    let envoy =
        tokio::task::spawn_blocking(move || Envoy::start("original-dst.yaml", grpc, |t| t)).await.expect("envoy");
    let url = format!("http://{}/v1/chat/completions", envoy.listener);
    let base = sim.url(0);
    let queries = || common::per_engine(&base, "vllm:prefix_cache_queries_total", 2);
    let mut ranks = Vec::new();
    for (system, q) in [("Nu", "a"), ("Nu", "b"), ("Nu", "c"), ("Xi", "a"), ("Xi", "b")] {
        let before = queries().await;
        let body = chat(MODEL).system(format!("{system} rules. ").repeat(300)).user(q).max_tokens(2).json();
        let r = client().post(&url).body(body.to_string()).send().await.expect("send");
        assert_eq!(r.status(), 200);
        let after = queries().await;
        let moved: Vec<usize> = (0..2).filter(|&k| after[k] > before[k]).collect();
        assert_eq!(moved.len(), 1);
        ranks.push(moved[0]);
    }
    assert!(ranks[..3].iter().all(|&r| r == ranks[0]), "one prefix, one rank: {ranks:?}");
    assert!(ranks[3..].iter().all(|&r| r != ranks[0]), "the other prefix on the other rank: {ranks:?}");
}

/// Pattern 5 behind Envoy with two kvgate replicas: Envoy asks replica a, the sidecar reports
/// each hand-off to replica b (as to a Service in front of both), and b forwards the report to
/// a, which accounts the hand-off exactly as if the report had come to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecars_report_to_another_replica_reaches_the_deciding_one() {
    let (ga, gb) = (common::free_port(), common::free_port());
    let fleet = PdFleet::start(&format!("http://127.0.0.1:{gb}")).await;
    let (pa, sc) = (fleet.pa.clone(), &fleet.sc);
    let replica = |grpc: u16, peer: u16| {
        format!(
            "grpc_addr: 127.0.0.1:{grpc}\nadmin_addr: 127.0.0.1:0\ncluster: {{peers: ['127.0.0.1:{peer}'], token: t0ken}}\n{}",
            fleet.pool()
        )
    };
    let a = common::start_kvgate(&replica(ga, gb)).await;
    let b = common::start_kvgate(&replica(gb, ga)).await;
    let (admin_a, admin_b) = (format!("http://{}", a.admin_addr), format!("http://{}", b.admin_addr));
    let joined = eventually(10, || async {
        let peers = |admin: String| async move {
            get_json(&format!("{admin}/debug/cluster")).await["peers"].as_array().map_or(0, Vec::len)
        };
        peers(admin_a.clone()).await == 1 && peers(admin_b.clone()).await == 1
    })
    .await;
    assert!(joined, "the replicas follow each other");
    let debug = format!("{admin_a}/debug/endpoints");
    let scraped = eventually(10, || async {
        get_json(&debug).await["pools"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().all(|e| e["stale"] == false))
    })
    .await;
    assert!(scraped, "endpoints scraped");
    let envoy = tokio::task::spawn_blocking(move || Envoy::start("original-dst.yaml", ga, |t| t)).await.expect("envoy");
    let url = format!("http://{}/v1/chat/completions", envoy.listener);
    let body = chat(MODEL)
        .system("Clause of the service agreement. ".repeat(200))
        .user("First?")
        .max_tokens(5)
        .stream()
        .json();
    let r = client().post(&url).body(body.to_string()).send().await.expect("send");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.expect("body").ends_with("data: [DONE]\n\n"));
    let m = |base: String, name: &'static str, labels: &'static [(&'static str, &'static str)]| async move {
        common::metric(&common::metrics(&base).await, name, labels).unwrap_or(0.0)
    };
    let sidecar_admin = format!("http://{}", sc.admin_addr.expect("admin"));
    assert_eq!(m(sidecar_admin.clone(), "kvgate_sidecar_requests_total", &[("kind", "prefill-decode")]).await, 1.0);
    assert_eq!(m(sidecar_admin, "kvgate_sidecar_reports_total", &[("result", "ok")]).await, 1.0, "b took the report");
    // b sent it on, a applied it: the prefill endpoint holds the prompt it computed, no
    // fallback is counted, and nothing stays in flight on a.
    assert_eq!(m(admin_b.clone(), "kvgate_cluster_deltas_sent_total", &[("kind", "reports")]).await, 1.0);
    assert_eq!(m(admin_a.clone(), "kvgate_cluster_deltas_applied_total", &[("kind", "reports")]).await, 1.0);
    let fallbacks = common::metric(
        &common::metrics(&admin_a).await,
        "kvgate_disagg_fallbacks_total",
        &[("pool", "pd"), ("reason", "status")],
    );
    assert_eq!(fallbacks.unwrap_or(0.0), 0.0);
    let url = format!("{admin_a}/debug/explain?path=/v1/chat/completions");
    let x: Value = client().post(url).body(body.to_string()).send().await.expect("explain").json().await.expect("JSON");
    let on_prefill = x["explanation"]["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["address"] == pa.as_str()))
        .and_then(|e| e["matched_blocks"].as_u64())
        .unwrap_or(0);
    assert!(on_prefill > 0, "a learned from the forwarded report that the prefill endpoint holds the prompt: {x}");
    let in_flight = get_json(&debug).await["pools"][0]["endpoints"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["in_flight_requests"].as_u64()).sum::<u64>());
    assert_eq!(in_flight, Some(0));
}
