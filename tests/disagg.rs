//! Prefill/decode disaggregation and data-parallel ranks through the proxy and the sidecar, with
//! simulators in prefill and decode roles and with DP ranks, all on loopback.

mod common;

use common::{
    SimProcess, client, eventually, free_port, gateway, get_json, metric, metrics, start_kvgate, start_sim,
    wait_scraped,
};
use serde_json::{Value, json};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const SERVED: &str = "x-gateway-destination-endpoint-served";
const PREFILLER: &str = "x-prefiller-host-port";
const PRODUCER: &[&str] =
    &["--time-scale", "0", "--kv-transfer-config", r#"{"kv_connector":"NixlConnector","kv_role":"kv_producer"}"#];
const CONSUMER: &[&str] =
    &["--time-scale", "0", "--kv-transfer-config", r#"{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}"#];

/// The decode-first P/D scheduler: a separate prefill when 256 or more prompt tokens are not
/// cached on the chosen decode endpoint.
const PD_SCHEDULER: &str = "{plugins: [{type: prefix-cache-scorer}, {type: active-request-scorer}, \
    {type: prefill-filter}, {type: decode-filter}, {type: max-score-picker}, {type: disagg-profile-handler}, \
    {type: prefix-based-pd-decider, parameters: {nonCachedTokens: 256}}], schedulingProfiles: [\
    {name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: active-request-scorer}, {pluginRef: max-score-picker}]}, \
    {name: decode, plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: active-request-scorer}, {pluginRef: max-score-picker}]}]}";

/// kvgate's proxy over `prefill` and `decode` endpoints (by role label) with [`PD_SCHEDULER`],
/// and `extra` config.
fn pd_config(prefill: &[String], decode: &[String], extra: &str) -> String {
    let mut config = gateway(MODEL).proxy().config(extra).pool(&format!("scheduler: {PD_SCHEDULER}"));
    let roles = prefill.iter().map(|a| (a, "prefill")).chain(decode.iter().map(|a| (a, "decode")));
    for (a, role) in roles {
        config = config.endpoint(format!("{{address: '{a}', labels: {{llm-d.ai/role: {role}}}}}"));
    }
    config.yaml(&[])
}

/// A chat request with a system prompt of about `tokens` estimated tokens.
fn chat(system_seed: &str, tokens: usize, question: &str) -> Value {
    let unit = format!("{system_seed} policy clause. ");
    let system = unit.repeat(tokens * 4 / unit.len() + 1);
    common::chat(MODEL).system(system).user(question).max_tokens(6).stream_with_usage().json()
}

struct Answer {
    status: u16,
    served: Option<String>,
    prefiller: Option<String>,
    text: String,
}

async fn send(url: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let mut r = client().post(url).header("content-type", "application/json").body(body.to_string());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.expect("send");
    let h = |k: &str| r.headers().get(k).map(|v| v.to_str().expect("ascii").to_owned());
    let (status, served, prefiller) = (r.status().as_u16(), h(SERVED), h(PREFILLER));
    Answer { status, served, prefiller, text: r.text().await.expect("body") }
}

/// A simulator's finished P/D legs of one kind (`prefill` or `decode`).
async fn handoffs(base: &str, leg: &str) -> f64 {
    metric(&metrics(base).await, "kvgate_sim_kv_handoffs_total", &[("leg", leg)]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_disaggregates_long_uncached_prompts_only() {
    let (p0, p1) = (start_sim(PRODUCER).await, start_sim(PRODUCER).await);
    let (d0, d1) = (start_sim(CONSUMER).await, start_sim(CONSUMER).await);
    let prefill = [p0.addrs[0].to_string(), p1.addrs[0].to_string()];
    let decode = [d0.addrs[0].to_string(), d1.addrs[0].to_string()];
    let kv = start_kvgate(&pd_config(&prefill, &decode, "")).await;
    wait_scraped(&kv, 4).await;
    let url = format!("http://{}/v1/chat/completions", kv.proxy_addr.expect("proxy"));

    // Long and cold: prefill on a prefill endpoint, decode on a decode endpoint.
    let a = send(&url, &chat("Alpha", 1500, "First question?"), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.text.ends_with("data: [DONE]\n\n"), "{}", a.text);
    let p = a.prefiller.clone().expect("a prefill endpoint was used");
    let d = a.served.clone().expect("served header");
    assert!(prefill.contains(&p) && decode.contains(&d), "prefill {p}, decode {d}");
    // The prefill endpoint kept the KV for the decode side, which loaded it (a decode leg with
    // malformed `kv_transfer_params` would have been refused with 400).
    let (pn, dn) =
        (handoffs(&format!("http://{p}"), "prefill").await, handoffs(&format!("http://{d}"), "decode").await);
    assert_eq!((pn, dn), (1.0, 1.0));
    assert!(a.text.contains("\"cached_tokens\":"), "usage reported");

    // Same conversation, next turn: cached on that decode endpoint, so it decodes alone.
    let b = send(&url, &chat("Alpha", 1500, "Second question?"), &[]).await;
    assert_eq!(b.status, 200);
    assert_eq!((b.prefiller.as_deref(), b.served.as_deref()), (None, Some(d.as_str())));
    let hits = metric(&metrics(&format!("http://{d}")).await, "vllm:prefix_cache_hits_total", &[]).unwrap_or(0.0);
    assert!(hits > 1000.0, "the transferred blocks served the second turn: {hits} tokens hit");

    // Short: decode only. A client's own placement headers are not forwarded (a rank pin of 7
    // would get a 400 from a one-rank server), nor its own transfer parameters (with them, the
    // decode simulator would load KV instead of prefilling: a second decode leg).
    let mut short = chat("Beta", 20, "Hi?");
    short["kv_transfer_params"] = json!({"do_remote_prefill": true, "do_remote_decode": false,
        "remote_block_ids": [1, 2], "remote_engine_id": "elsewhere", "remote_host": "10.9.9.9", "remote_port": 5600});
    let c = send(&url, &short, &[(PREFILLER, "127.0.0.1:1"), ("x-data-parallel-rank", "7")]).await;
    assert_eq!((c.status, c.prefiller), (200, None), "{}", c.text);
    let legs = handoffs(&format!("http://{}", decode[0]), "decode").await
        + handoffs(&format!("http://{}", decode[1]), "decode").await;
    assert_eq!(legs, 1.0, "only kvgate's own hand-off reached a decode endpoint");

    let m = metrics(&format!("http://{}", kv.admin_addr)).await;
    let decisions = |t: &str| metric(&m, "kvgate_disagg_decisions_total", &[("decision_type", t)]).unwrap_or(0.0);
    assert_eq!((decisions("prefill-decode"), decisions("decode-only")), (1.0, 2.0));
    assert_eq!(metric(&m, "kvgate_disagg_fallbacks_total", &[]), None, "no fallback");
    // Both sides learned the prompt: the prefill endpoint and the decode endpoint hold its blocks.
    let eps = get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await;
    let blocks = |addr: &str| {
        eps["pools"][0]["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|e| e["address"] == addr)
            .expect("listed")["prefix_blocks"]
            .as_u64()
            .expect("blocks")
    };
    assert!(blocks(&p) > 0 && blocks(&d) > 0, "{eps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_dead_prefill_endpoint_degrades_to_decode_only() {
    let p = start_sim(PRODUCER).await;
    let d = start_sim(CONSUMER).await;
    let dead = SimProcess::start(&["--port", "0", "--time-scale", "0"]);
    let (pa, da) = (p.addrs[0].to_string(), d.addrs[0].to_string());
    let kv = start_kvgate(&pd_config(
        std::slice::from_ref(&pa),
        std::slice::from_ref(&da),
        "proxy: {prefill_timeout_ms: 300}",
    ))
    .await;
    wait_scraped(&kv, 2).await;
    let url = format!("http://{}/v1/chat/completions", kv.proxy_addr.expect("proxy"));
    let admin = format!("http://{}", kv.admin_addr);
    let fallbacks = |reason: &'static str| {
        let admin = admin.clone();
        async move { metric(&metrics(&admin).await, "kvgate_disagg_fallbacks_total", &[("reason", reason)]).unwrap_or(0.0) }
    };
    let faults = |f: Value| {
        let base = format!("http://{pa}/admin/faults");
        async move { assert_eq!(client().post(base).body(f.to_string()).send().await.expect("send").status(), 200) }
    };

    // The prefill endpoint answers 500: the decode endpoint prefills, the client sees nothing.
    faults(json!({"failure_rate": 1.0, "failure_types": ["500"]})).await;
    let a = send(&url, &chat("Gamma", 1500, "Q?"), &[]).await;
    assert_eq!((a.status, a.prefiller.as_deref(), a.served.as_deref()), (200, None, Some(da.as_str())), "{}", a.text);
    assert!(a.text.ends_with("data: [DONE]\n\n"));
    assert_eq!(fallbacks("status").await, 1.0);
    assert_eq!(handoffs(&format!("http://{da}"), "decode").await, 0.0);

    // It hangs: after the prefill timeout, the same.
    faults(json!({"failure_rate": 1.0, "failure_types": ["hang"]})).await;
    let b = send(&url, &chat("Delta", 1500, "Q?"), &[]).await;
    assert_eq!((b.status, b.prefiller.as_deref()), (200, None), "{}", b.text);
    assert_eq!(fallbacks("timeout").await, 1.0);
    faults(json!({})).await;

    // A prefill endpoint that died (before kvgate's health checks noticed: scrapes are slow here).
    let dead_addr = dead.addr.to_string();
    let kv2 = start_kvgate(&pd_config(
        &[dead_addr],
        std::slice::from_ref(&da),
        "scrape: {interval_ms: 60000, stale_after_ms: 120000}",
    ))
    .await;
    wait_scraped(&kv2, 2).await;
    drop(dead);
    let url2 = format!("http://{}/v1/chat/completions", kv2.proxy_addr.expect("proxy"));
    let c = send(&url2, &chat("Epsilon", 1500, "Q?"), &[]).await;
    assert_eq!((c.status, c.prefiller.as_deref(), c.served.as_deref()), (200, None, Some(da.as_str())), "{}", c.text);
    let m = metrics(&format!("http://{}", kv2.admin_addr)).await;
    assert_eq!(metric(&m, "kvgate_disagg_fallbacks_total", &[("reason", "unreachable")]), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_hands_off_to_the_named_prefill_endpoint() {
    let p = start_sim(PRODUCER).await;
    let d = start_sim(CONSUMER).await;
    let (pa, da) = (p.addrs[0].to_string(), d.addrs[0].to_string());
    let args: kvgate::tools::sidecar::SidecarArgs = kvgate::tools::cli::parse_flags(
        "sidecar",
        [
            "--listen",
            "127.0.0.1:0",
            "--decode",
            da.as_str(),
            "--admin-addr",
            "127.0.0.1:0",
            "--prefill-timeout-ms",
            "500",
            "--allow-prefill",
            "127.0.0.1",
        ],
    )
    .expect("flags");
    let sc = kvgate::tools::sidecar::start(args).await.expect("sidecar starts");
    let url = format!("http://{}/v1/chat/completions", sc.addr);
    let counters = || async {
        let m = metrics(&format!("http://{}", sc.admin_addr.expect("admin"))).await;
        let n = |k: &str| metric(&m, "kvgate_sidecar_requests_total", &[("kind", k)]).unwrap_or(0.0);
        (n("prefill-decode"), n("decode-only"), n("fallback"))
    };

    let a = send(&url, &chat("Zeta", 800, "Q?"), &[(PREFILLER, &pa)]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.text.ends_with("data: [DONE]\n\n"));
    assert_eq!(
        (handoffs(&format!("http://{pa}"), "prefill").await, handoffs(&format!("http://{da}"), "decode").await),
        (1.0, 1.0)
    );
    assert_eq!(counters().await, (1.0, 0.0, 0.0));
    // The sidecar's admin listener answers unknown paths and methods in OpenAI's shape.
    let sc_admin = format!("http://{}", sc.admin_addr.expect("admin"));
    let r = client().get(format!("{sc_admin}/nope")).send().await.expect("send");
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<serde_json::Value>().await.expect("JSON")["error"]["code"], "not_found");
    let r = client().post(format!("{sc_admin}/metrics")).send().await.expect("send");
    assert_eq!(r.status(), 405);
    assert_eq!(r.json::<serde_json::Value>().await.expect("JSON")["error"]["code"], "method_not_allowed");

    // No header: straight to the local endpoint.
    let b = send(&url, &chat("Eta", 800, "Q?"), &[]).await;
    assert_eq!(b.status, 200);
    assert_eq!(counters().await, (1.0, 1.0, 0.0));

    // A named prefill endpoint that is not there: local prefill, no client error.
    let gone = format!("127.0.0.1:{}", free_port());
    let c = send(&url, &chat("Theta", 800, "Q?"), &[(PREFILLER, &gone)]).await;
    assert_eq!(c.status, 200, "{}", c.text);
    assert_eq!(counters().await, (1.0, 1.0, 1.0));
    assert_eq!(handoffs(&format!("http://{da}"), "decode").await, 1.0);
    // Counted under the sidecar's own name: the gateway's family of that meaning has a pool label.
    let m = metrics(&format!("http://{}", sc.admin_addr.expect("admin"))).await;
    assert_eq!(metric(&m, "kvgate_sidecar_fallbacks_total", &[("reason", "unreachable")]), Some(1.0));
    assert!(!m.contains("kvgate_disagg_"), "{m}");

    // Through kvgate's proxy, with the sidecar as the decode endpoint: a client's prefiller
    // header does not reach the sidecar (it would hand off to the named endpoint).
    let fleet = gateway(MODEL).address(sc.addr).proxy().start().await;
    let kv = &fleet.kv;
    let via = format!("http://{}/v1/chat/completions", kv.proxy_addr.expect("proxy"));
    let d = send(&via, &chat("Iota", 800, "Q?"), &[(PREFILLER, &pa)]).await;
    assert_eq!(d.status, 200, "{}", d.text);
    assert_eq!(counters().await, (1.0, 2.0, 1.0));

    // A client that reaches the sidecar directly cannot supply its own transfer parameters:
    // the local endpoint prefills (no decode leg is added to the simulator's count).
    let mut forged = chat("Kappa", 100, "Q?");
    forged["kv_transfer_params"] = json!({"do_remote_prefill": true, "do_remote_decode": false,
        "remote_block_ids": [1], "remote_engine_id": "x", "remote_host": "10.9.9.9", "remote_port": 5600});
    let e = send(&url, &forged, &[]).await;
    assert_eq!(e.status, 200, "{}", e.text);
    assert_eq!(handoffs(&format!("http://{da}"), "decode").await, 1.0);

    // A sidecar must be told which prefill endpoints it may use.
    let bare: kvgate::tools::sidecar::SidecarArgs =
        kvgate::tools::cli::parse_flags("sidecar", ["--listen", "127.0.0.1:0", "--decode", da.as_str()])
            .expect("flags");
    let err = kvgate::tools::sidecar::start(bare).await.expect_err("refused");
    assert!(err.to_string().contains("--allow-prefill"), "{err}");

    // Everything else passes through: the sidecar's address stands for the decode endpoint.
    let m = metrics(&format!("http://{}", sc.addr)).await;
    assert!(m.contains("vllm:num_requests_running"), "decode endpoint's metrics through the sidecar");
    let models = get_json(&format!("http://{}/v1/models", sc.addr)).await;
    assert_eq!(models["data"][0]["id"], MODEL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_ranks_on_one_ip_are_scored_and_pinned_independently() {
    // Multi-port: one port per rank, one endpoint per ip:port.
    let sim =
        start_sim(&["--time-scale", "0", "--data-parallel-size", "2", "--data-parallel-multi-port-external-lb"]).await;
    let ports: Vec<u16> = sim.addrs.iter().map(|a| a.port()).collect();
    assert_eq!(ports.len(), 2);
    let moe = format!("{{name: moe, address: 127.0.0.1, ports: [{}, {}]}}", ports[0], ports[1]);
    let fleet = gateway(MODEL).endpoint(moe).proxy().start_without_waiting().await;
    let kv = &fleet.kv;
    wait_scraped(kv, 2).await;
    let url = format!("http://{}/v1/chat/completions", kv.proxy_addr.expect("proxy"));
    let a = send(&url, &chat("Iota", 600, "Q1?"), &[]).await;
    let home = a.served.clone().expect("served");
    for q in ["Q2?", "Q3?"] {
        assert_eq!(send(&url, &chat("Iota", 600, q), &[]).await.served, Some(home.clone()), "same rank for the prefix");
    }
    let b = send(&url, &chat("Kappa", 600, "Q1?"), &[]).await;
    assert_ne!(b.served, Some(home.clone()), "a new prefix goes to the idle rank");
    let eps = get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await;
    let eps = eps["pools"][0]["endpoints"].as_array().expect("endpoints").clone();
    assert_eq!(eps.iter().map(|e| e["rank"].as_u64()).collect::<Vec<_>>(), [Some(0), Some(1)]);
    assert!(eps.iter().all(|e| e["prefix_blocks"].as_u64().is_some_and(|b| b > 0)), "each rank its own index entries");

    // Single port: vLLM balances internally; kvgate scores each rank and pins it by header.
    let sim = start_sim(&["--time-scale", "0", "--data-parallel-size", "2"]).await;
    assert_eq!(sim.addrs.len(), 1);
    let base = sim.url(0);
    let ranks = format!("{{address: '{}', data_parallel_size: 2}}", sim.addrs[0]);
    let fleet = gateway(MODEL).endpoint(ranks).proxy().start_without_waiting().await;
    let kv = &fleet.kv;
    wait_scraped(kv, 2).await;
    let url = format!("http://{}/v1/chat/completions", kv.proxy_addr.expect("proxy"));
    let moved = |before: &[f64], after: &[f64]| -> usize {
        let changed: Vec<usize> = (0..before.len()).filter(|&r| after[r] > before[r]).collect();
        assert_eq!(changed.len(), 1, "exactly one rank served: {before:?} → {after:?}");
        changed[0]
    };
    let q0 = common::per_engine(&base, "vllm:prefix_cache_queries_total", 2).await;
    // A client's own rank header is not trusted.
    assert_eq!(send(&url, &chat("Lambda", 600, "Q1?"), &[("x-data-parallel-rank", "7")]).await.status, 200);
    let q1 = common::per_engine(&base, "vllm:prefix_cache_queries_total", 2).await;
    let home = moved(&q0, &q1);
    // Without the pin, the simulator's own balancing would alternate ranks; with it, the prefix
    // stays on its rank.
    for q in ["Q2?", "Q3?", "Q4?"] {
        let before = common::per_engine(&base, "vllm:prefix_cache_queries_total", 2).await;
        assert_eq!(send(&url, &chat("Lambda", 600, q), &[]).await.status, 200);
        assert_eq!(moved(&before, &common::per_engine(&base, "vllm:prefix_cache_queries_total", 2).await), home);
    }
    let before = common::per_engine(&base, "vllm:prefix_cache_queries_total", 2).await;
    assert_eq!(send(&url, &chat("Mu", 600, "Q1?"), &[]).await.status, 200);
    assert_ne!(
        moved(&before, &common::per_engine(&base, "vllm:prefix_cache_queries_total", 2).await),
        home,
        "a new prefix goes to the other rank"
    );
    let eps = get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await;
    let eps = eps["pools"][0]["endpoints"].as_array().expect("endpoints").clone();
    assert!(eps.iter().all(|e| e["address"] == sim.addrs[0].to_string()), "one address, two ranks");
    assert_eq!(eps.iter().map(|e| e["rank"].as_u64()).collect::<Vec<_>>(), [Some(0), Some(1)]);
    let hits = common::per_engine(&base, "vllm:prefix_cache_hits_total", 2).await;
    assert!(hits[home] > 1500.0, "the pinned rank reused the prefix: {hits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_the_server_does_not_report_is_taken_out() {
    let fleet = gateway(MODEL)
        .sim(&["--time-scale", "0", "--data-parallel-size", "2"])
        .sim_keys("data_parallel_size: 3")
        .proxy()
        .start_without_waiting()
        .await;
    let kv = &fleet.kv;
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    let ok = eventually(10, || async {
        let v = get_json(&debug).await;
        let eps = v["pools"][0]["endpoints"].as_array().cloned().unwrap_or_default();
        eps.len() == 3
            && eps[..2].iter().all(|e| e["stale"] == false && e["healthy"] == true)
            && eps[2]["healthy"] == false
            && eps[2]["last_error"].as_str().is_some_and(|e| e.contains("no engine \"2\""))
    })
    .await;
    assert!(ok, "{}", get_json(&debug).await);
    // Requests still go to the two real ranks.
    let url = format!("http://{}/v1/chat/completions", kv.proxy_addr.expect("proxy"));
    for q in ["a", "b", "c", "d"] {
        assert_eq!(send(&url, &chat("Omicron", 100, q), &[]).await.status, 200);
    }
}

/// With kvgate's picker API behind a token, a sidecar given the token file reports (kvgate
/// takes its report and answers for the id), and one without it is refused before kvgate looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecars_reports_carry_the_picker_api_token() {
    let p = start_sim(PRODUCER).await;
    let d = start_sim(CONSUMER).await;
    let (pa, da) = (p.addrs[0].to_string(), d.addrs[0].to_string());
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sidecar-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let token = dir.join("token");
    std::fs::write(&token, "sidecar-token\n").expect("token written");
    let fleet =
        gateway(MODEL).sims(1).config(&format!("picker_api: {{token_file: '{}'}}", token.display())).start().await;
    let report_to = format!("http://{}", fleet.kv.grpc_addr);
    let sidecar = |with_token: bool| {
        let mut flags = vec!["--listen", "127.0.0.1:0", "--decode", &da, "--admin-addr", "127.0.0.1:0"];
        flags.extend(["--allow-prefill", "127.0.0.1", "--report-to", &report_to]);
        let token = token.to_str().expect("UTF-8 path");
        if with_token {
            flags.extend(["--report-token-file", token]);
        }
        let args: kvgate::tools::sidecar::SidecarArgs =
            kvgate::tools::cli::parse_flags("sidecar", flags).expect("flags");
        kvgate::tools::sidecar::start(args)
    };
    // Reports kvgate looked at: this id is none it issued.
    let unknown = || async {
        metric(&metrics(&fleet.admin()).await, "kvgate_picker_reports_total", &[("result", "unknown")]).unwrap_or(0.0)
    };
    let headers = [(PREFILLER, pa.as_str()), ("x-kvgate-decision-id", "00000000-1-0")];
    for (with_token, seen) in [(false, 0.0), (true, 1.0)] {
        let sc = sidecar(with_token).await.expect("sidecar starts");
        let a = send(&format!("http://{}/v1/chat/completions", sc.addr), &chat("Mu", 800, "Q?"), &headers).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(unknown().await, seen, "with the token: {with_token}");
    }
    let missing = sidecar(true);
    std::fs::remove_file(&token).expect("token removed");
    let e = missing.await.expect_err("no token file");
    assert!(e.to_string().contains("--report-token-file"), "{e:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A prefill endpoint that stops (SIGSTOP) while a prefill leg waits for it: once it is found
/// silent the decode endpoint prefills locally, long before the prefill timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods, reason = "the test's client task ends with its runtime")]
async fn a_prefill_endpoint_that_stops_falls_back_to_the_decode_endpoint_at_once() {
    let port = free_port().to_string();
    let producer = r#"{"kv_connector":"NixlConnector","kv_role":"kv_producer"}"#;
    // Every engine step takes a second: the prefill leg waits.
    let flags = ["--port", &port, "--step-overhead-ms", "1000", "--kv-transfer-config", producer];
    let prefill = SimProcess::start(&flags);
    let decode = start_sim(CONSUMER).await;
    let (p, d) = (prefill.addr.to_string(), decode.addrs[0].to_string());
    let config = pd_config(std::slice::from_ref(&p), std::slice::from_ref(&d), "proxy: {prefill_timeout_ms: 60000}");
    let kv = start_kvgate(&config).await;
    wait_scraped(&kv, 2).await;
    let url = format!("http://{}/v1/chat/completions", kv.proxy_addr.expect("proxy"));
    let admin = format!("http://{}", kv.admin_addr);

    let request = tokio::spawn(async move { send(&url, &chat("Stopped", 1500, "Still there?"), &[]).await });
    let debug = format!("{admin}/debug/endpoints");
    let leg_waits = eventually(10, || async {
        let v = get_json(&debug).await;
        let e = v["pools"][0]["endpoints"].as_array().cloned().unwrap_or_default();
        e.iter().any(|e| e["address"] == p.as_str() && e["in_flight_requests"] == 1)
    })
    .await;
    assert!(leg_waits, "the prefill leg on {p}: {}", get_json(&debug).await);
    let stopped_at = std::time::Instant::now();
    prefill.stop();
    let a = tokio::time::timeout(std::time::Duration::from_secs(30), request)
        .await
        .expect("an answer within 30 s, half the prefill timeout")
        .expect("the client task");
    println!("answered {} ms after SIGSTOP", stopped_at.elapsed().as_millis());
    assert_eq!((a.status, a.served.as_deref()), (200, Some(d.as_str())), "{}", a.text);
    let fallbacks = metric(&metrics(&admin).await, "kvgate_disagg_fallbacks_total", &[("reason", "unreachable")]);
    assert_eq!(fallbacks, Some(1.0));
}
