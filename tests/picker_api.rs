//! kvgate's own gRPC API (`kvgate.v1.Picker`) through a real gRPC client on loopback: picks and
//! reports (missing, duplicate, unknown, refused), the same decision as the proxy's, `Explain`,
//! `WatchEndpoints`, server reflection and gRPC health of every service on the listener, and the
//! Python client example.
#![allow(clippy::disallowed_methods, reason = "the test's own tasks (blocking process runs) end with its runtime")]

mod common;

use std::collections::HashMap;

use common::{chat, client, eventually, gateway, get_json, metric, start_kvgate, start_sim};
use kvgate::front::picker::pb::{self, picker_client::PickerClient};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

async fn picker(kv: &kvgate::tools::serve::Server) -> PickerClient<Channel> {
    PickerClient::connect(format!("http://{}", kv.grpc_addr)).await.expect("gRPC connects")
}

/// A streamed chat request with a system prompt.
fn ask(system: &str, question: &str) -> Value {
    chat(MODEL).system(system).user(question).max_tokens(3).stream().json()
}

fn pick_body(body: &Value) -> pb::PickRequest {
    pb::PickRequest {
        path: "/v1/chat/completions".into(),
        input: Some(pb::pick_request::Input::Body(body.to_string().into_bytes())),
        ..Default::default()
    }
}

async fn pick(c: &mut PickerClient<Channel>, req: pb::PickRequest) -> pb::pick_response::Result {
    c.pick(req).await.expect("pick answers").into_inner().result.expect("a result")
}

async fn decided(c: &mut PickerClient<Channel>, req: pb::PickRequest) -> pb::Decision {
    match pick(c, req).await {
        pb::pick_response::Result::Decision(d) => d,
        pb::pick_response::Result::Refusal(r) => panic!("refused: {r:?}"),
    }
}

async fn refused(c: &mut PickerClient<Channel>, req: pb::PickRequest) -> pb::Refusal {
    match pick(c, req).await {
        pb::pick_response::Result::Refusal(r) => r,
        pb::pick_response::Result::Decision(d) => panic!("decided: {d:?}"),
    }
}

/// kvgate's in-flight requests per endpoint address.
async fn in_flight(kv: &kvgate::tools::serve::Server) -> HashMap<String, u64> {
    let v = get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await;
    v["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .flat_map(|p| p["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| (e["address"].as_str().unwrap_or("").to_owned(), e["in_flight_requests"].as_u64().unwrap_or(0)))
        .collect()
}

fn finished(id: &str, status: u32, usage: Option<pb::Usage>) -> pb::ReportRequest {
    pb::ReportRequest {
        decision_id: id.into(),
        end: Some(pb::report_request::End::Finished(pb::Finished { status, usage, response_bytes: 100 })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picks_and_reports_round_trip() {
    let sims = [start_sim(&["--time-scale", "0"]).await, start_sim(&["--time-scale", "0"]).await];
    let limited = start_sim(&["--time-scale", "0", "--served-model-name", "limited"]).await;
    let kv = start_kvgate(&format!(
        "admin_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:0\npools:\n\
         - {{name: p, models: ['{MODEL}'], endpoints: [{{address: '{}'}}, {{address: '{}'}}]}}\n\
         - {{name: l, models: [limited], admission: {{max_in_flight: 2}}, endpoints: [{{address: '{}'}}]}}\n",
        sims[0].addrs[0], sims[1].addrs[0], limited.addrs[0]
    ))
    .await;
    let mut c = picker(&kv).await;
    let body = ask(&"Terms of the agreement. ".repeat(100), "Summarize.");
    let d = decided(&mut c, pick_body(&body)).await;
    assert_eq!((d.pool.as_str(), d.model.as_str(), d.kind.as_str()), ("p", MODEL, "decode-only"));
    assert_eq!(d.endpoints.len(), 1, "the server's extproc.max_endpoints by default");
    let target = d.endpoints[0].address.clone();
    assert_eq!(d.headers["x-gateway-destination-endpoint"], target);
    assert!(!d.headers["x-request-id"].is_empty());
    assert!(d.body.is_none(), "the body goes as it is");
    // Decode-only: a client's placement headers (the sidecar's decision id among them) are to go.
    assert!(!d.headers.contains_key("x-kvgate-decision-id"));
    // And flow control's headers are kvgate's, under either name.
    for h in [
        "x-kvgate-decision-id",
        "x-prefiller-host-port",
        "x-data-parallel-rank",
        "x-llm-d-inference-objective",
        "x-gateway-inference-fairness-id",
        "x-llm-d-slo-ttft-ms",
    ] {
        assert!(d.remove_headers.iter().any(|r| r == h), "{h} in {:?}", d.remove_headers);
    }
    // An id is not guessable from another: the next sequence number with this id's tag is unknown.
    let (head, tag) = d.decision_id.rsplit_once('-').expect("tagged");
    let (nonce, seq) = head.split_once('-').expect("sequenced");
    let next = format!("{nonce}-{:x}-{tag}", u64::from_str_radix(seq, 16).expect("hex") + 1);
    assert_eq!(in_flight(&kv).await[&target], 1, "a picked request is in flight until reported");

    // The caller sends it itself, then reports its start and its end.
    let r = client().post(format!("http://{target}/v1/chat/completions")).body(body.to_string()).send().await;
    let text = r.expect("endpoint answers").text().await.expect("body");
    assert!(text.ends_with("data: [DONE]\n\n"));
    let start = pb::ReportRequest {
        decision_id: d.decision_id.clone(),
        first_token: Some(pb::FirstToken { status: 200, streaming: true }),
        ..Default::default()
    };
    assert!(!c.report(start).await.expect("first token").into_inner().ended);
    let usage = pb::Usage { prompt_tokens: 600, completion_tokens: 3, cached_tokens: Some(0) };
    let end = c.report(finished(&d.decision_id, 200, Some(usage))).await.expect("finished");
    assert!(end.into_inner().ended);
    assert_eq!(in_flight(&kv).await[&target], 0, "released by the final report");
    let m = common::metrics(&format!("http://{}", kv.admin_addr)).await;
    assert_eq!(metric(&m, "kvgate_requests_total", &[("pool", "p"), ("status", "200")]), Some(1.0));
    assert_eq!(metric(&m, "kvgate_tokens_total", &[("pool", "p"), ("kind", "prompt")]), Some(600.0));

    // A second final report, an unknown id, a malformed one, a report without an id.
    let again = c.report(finished(&d.decision_id, 200, None)).await.expect_err("duplicate");
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert!(again.message().contains("already finished"), "{}", again.message());
    let upper = d.decision_id.to_uppercase();
    for id in ["00000000-1", "nonsense", &format!("{}0", d.decision_id), &next, &upper] {
        let e = c.report(finished(id, 200, None)).await.expect_err("unknown");
        assert_eq!(e.code(), Code::NotFound, "{id}: {}", e.message());
    }
    assert_eq!(c.report(finished("", 200, None)).await.expect_err("no id").code(), Code::InvalidArgument);
    assert_eq!(c.report(finished(&d.decision_id, 42, None)).await.expect_err("status").code(), Code::InvalidArgument);
    let impossible = pb::Usage { prompt_tokens: 10, completion_tokens: 1, cached_tokens: Some(11) };
    let e = c.report(finished(&d.decision_id, 200, Some(impossible))).await.expect_err("usage");
    assert_eq!(e.code(), Code::InvalidArgument);
    let m = common::metrics(&format!("http://{}", kv.admin_addr)).await;
    assert_eq!(metric(&m, "kvgate_picker_reports_total", &[("result", "accepted")]), Some(2.0));
    assert_eq!(metric(&m, "kvgate_picker_reports_total", &[("result", "ended")]), Some(1.0));
    assert_eq!(metric(&m, "kvgate_picker_reports_total", &[("result", "unknown")]), Some(5.0));

    // Refusals carry what the proxy answers: status, code, OpenAI body, drop reason, headers.
    let proxy = format!("http://{}", kv.proxy_addr.expect("proxy"));
    let unknown = json!({"model": "nope", "prompt": "hi"});
    let r = refused(&mut c, pb::PickRequest { path: "/v1/completions".into(), ..pick_body(&unknown) }).await;
    assert_eq!((r.status, r.code.as_str(), r.dropped_reason.as_str()), (404, "model_not_found", "model_not_found"));
    let via_proxy = client().post(format!("{proxy}/v1/completions")).body(unknown.to_string()).send().await;
    assert_eq!(r.body, via_proxy.expect("proxy").text().await.expect("body"), "the proxy's own body");
    let bad = pb::PickRequest { input: Some(pb::pick_request::Input::Body(b"{not json".to_vec())), ..pick_body(&body) };
    let r = refused(&mut c, bad).await;
    assert_eq!(r.status, 400);
    assert!(serde_json::from_str::<Value>(&r.body).expect("JSON body")["error"]["message"].is_string());
    let r = refused(&mut c, pb::PickRequest { path: "/v1/nothing-here".into(), ..pick_body(&body) }).await;
    assert_eq!((r.status, r.code.as_str()), (404, "not_found"));
    let get = pb::PickRequest { method: "GET".into(), ..pick_body(&body) };
    let r = refused(&mut c, get).await;
    assert_eq!((r.status, r.headers.get("allow").map(String::as_str)), (405, Some("POST")));
    // What kvgate answers itself is answered here too, as the proxy answers it.
    let own = pb::PickRequest { method: "GET".into(), path: "/v1/models".into(), ..Default::default() };
    let r = refused(&mut c, own).await;
    assert_eq!((r.status, r.code.as_str()), (200, ""));
    assert_eq!(serde_json::from_str::<Value>(&r.body).expect("JSON body")["data"][0]["id"], MODEL);

    // A prompt given as fields, held unreported: it is the endpoint's load, and it takes the
    // picker API's share of the limited pool's admission (half of max_in_flight 2), so the next
    // pick is refused as a saturated pool is until the report comes; the proxy keeps the rest.
    let fields = |model: &str| pb::PickRequest {
        input: Some(pb::pick_request::Input::Prompt(pb::Prompt {
            model: model.into(),
            text: Some(pb::prompt::Text::TokenIds(pb::TokenIds { ids: (0..300).collect() })),
            ..Default::default()
        })),
        ..Default::default()
    };
    let held = decided(&mut c, fields("limited")).await;
    assert_eq!(held.endpoints[0].address, limited.addrs[0].to_string());
    assert_eq!(in_flight(&kv).await[&limited.addrs[0].to_string()], 1);
    let r = refused(&mut c, fields("limited")).await;
    assert_eq!((r.status, r.dropped_reason.as_str()), (429, "rejected-saturated"));
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
    assert!(r.message.contains("picker_api.admission_share"), "{}", r.message);
    let via_proxy = client()
        .post(format!("{proxy}/v1/completions"))
        .body(json!({"model": "limited", "prompt": "hi"}).to_string())
        .send()
        .await
        .expect("proxy");
    assert_eq!(via_proxy.status(), 200, "the proxy keeps its part of the admission");
    let failed = pb::ReportRequest {
        decision_id: held.decision_id.clone(),
        end: Some(pb::report_request::End::Failed(pb::Failed {
            kind: pb::FailureKind::Cancelled as i32,
            message: "client left".into(),
        })),
        ..Default::default()
    };
    assert!(c.report(failed).await.expect("failed").into_inner().ended);
    assert!(matches!(pick(&mut c, fields("limited")).await, pb::pick_response::Result::Decision(_)));
    let e = c.report(finished(&held.decision_id, 200, None)).await.expect_err("over");
    assert!(e.message().contains("already failed"), "{}", e.message());
    let no_model = refused(&mut c, fields("")).await;
    assert_eq!((no_model.status, no_model.code.as_str()), (400, "missing_model"));
}

/// A report cannot inflate kvgate's counts, and an error never echoes an unbounded id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_bounded() {
    let fleet = gateway(MODEL).sims(1).start().await;
    let kv = &fleet.kv;
    let mut c = picker(kv).await;
    let body = json!({"model": MODEL, "prompt": "hello there"});
    let d = decided(&mut c, pb::PickRequest { path: "/v1/completions".into(), ..pick_body(&body) }).await;
    let tokens = |m: &str| metric(m, "kvgate_tokens_total", &[("pool", "p"), ("kind", "prompt")]).unwrap_or(0.0);
    let before = tokens(&common::metrics(&fleet.admin()).await);
    // More tokens than the model's context (the simulator's max_model_len) holds.
    let inflated = pb::Usage { prompt_tokens: 1 << 63, completion_tokens: 1, cached_tokens: None };
    let e = c.report(finished(&d.decision_id, 200, Some(inflated))).await.expect_err("implausible");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("more than a request"), "{}", e.message());
    assert_eq!(tokens(&common::metrics(&fleet.admin()).await), before, "nothing counted");
    // The decision is still there for a plausible report.
    let usage = pb::Usage { prompt_tokens: 3, completion_tokens: 1, cached_tokens: None };
    assert!(c.report(finished(&d.decision_id, 200, Some(usage))).await.expect("accepted").into_inner().ended);
    assert_eq!(tokens(&common::metrics(&fleet.admin()).await), before + 3.0);
    // A 100,000-character id is unknown, said in a short message.
    let long = "x".repeat(100_000);
    let e = c.report(finished(&long, 200, None)).await.expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert!(e.message().len() < 200, "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_never_reported_is_released_and_counted() {
    let picker_api = "picker_api: {start_timeout_ms: 200, report_timeout_ms: 400, max_pending: 1}";
    let fleet = gateway(MODEL).sims(1).config(picker_api).start().await;
    let (sim, kv) = (&fleet.sims[0], &fleet.kv);
    let mut c = picker(kv).await;
    let body = json!({"model": MODEL, "prompt": "hello there"});
    let req = || pb::PickRequest { path: "/v1/completions".into(), ..pick_body(&body) };
    let d = decided(&mut c, req()).await;
    let addr = sim.addrs[0].to_string();
    assert_eq!(in_flight(kv).await[&addr], 1);
    // At most `max_pending` decisions wait for reports.
    let full = c.pick(req()).await.expect_err("full");
    assert_eq!(full.code(), Code::ResourceExhausted, "{}", full.message());
    assert_eq!(in_flight(kv).await[&addr], 1, "the refused pick holds nothing");
    let first_token = pb::ReportRequest {
        decision_id: d.decision_id.clone(),
        first_token: Some(pb::FirstToken { status: 200, streaming: false }),
        ..Default::default()
    };
    assert!(!c.report(first_token).await.expect("started").into_inner().ended);
    // No final report: released after the timeout, and counted.
    assert!(eventually(5, || async { in_flight(kv).await[&addr] == 0 }).await, "released");
    let m = common::metrics(&format!("http://{}", kv.admin_addr)).await;
    assert_eq!(metric(&m, "kvgate_picker_decisions_expired_total", &[("pool", "p")]), Some(1.0));
    assert_eq!(metric(&m, "kvgate_picker_decisions_pending", &[]), Some(0.0));
    let late = c.report(finished(&d.decision_id, 200, None)).await.expect_err("late");
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert!(late.message().contains("expired"), "{}", late.message());
    // One never reported at all goes after the (shorter) start timeout.
    let quiet = decided(&mut c, req()).await;
    assert!(eventually(5, || async { in_flight(kv).await[&addr] == 0 }).await, "released");
    let m = common::metrics(&format!("http://{}", kv.admin_addr)).await;
    assert_eq!(metric(&m, "kvgate_picker_decisions_expired_total", &[("pool", "p")]), Some(2.0));
    let late = c.report(finished(&quiet.decision_id, 200, None)).await.expect_err("late");
    assert!(late.message().contains("expired"), "{}", late.message());
    // The index holds nothing of the pick refused for want of room: a refused pick records nothing.
    let x = c
        .explain(pb::ExplainRequest {
            path: "/v1/completions".into(),
            input: Some(pb::explain_request::Input::Body(body.to_string().into_bytes())),
        })
        .await
        .expect("explain");
    assert!(matches!(x.into_inner().result, Some(pb::explain_response::Result::Explained(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pick_and_the_proxy_decide_alike() {
    let fleet = gateway(MODEL).sims(3).proxy().start().await;
    let kv = &fleet.kv;
    let proxy = format!("http://{}/v1/chat/completions", kv.proxy_addr.expect("proxy"));
    let mut c = picker(kv).await;
    let served = |r: &reqwest::Response| {
        r.headers()["x-gateway-destination-endpoint-served"].to_str().expect("ascii").to_owned()
    };
    let mut places = Vec::new();
    for g in 0..6 {
        let system = format!("Group {g} has its own long instructions. ").repeat(60);
        // Warm: the proxy places the group's first request somewhere.
        let r = client().post(&proxy).body(ask(&system, "first").to_string()).send().await.expect("proxy");
        let warm = served(&r);
        let _ = r.text().await;
        // Pick a follow-up, report it, then send another through the proxy: one place.
        let d = decided(&mut c, pick_body(&ask(&system, "second"))).await;
        c.report(finished(&d.decision_id, 200, None)).await.expect("report");
        let r = client().post(&proxy).body(ask(&system, "third").to_string()).send().await.expect("proxy");
        let third = served(&r);
        let _ = r.text().await;
        assert_eq!((&d.endpoints[0].address, &third), (&warm, &warm), "group {g}");
        places.push(warm);
    }
    places.sort();
    places.dedup();
    assert!(places.len() > 1, "the groups were spread, so the equality says something: {places:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_watch_and_reflection() {
    let fleet = gateway(MODEL).sims(2).start().await;
    let kv = &fleet.kv;
    let mut c = picker(kv).await;
    let body = ask(&"Rules of the house. ".repeat(50), "Why?");
    // Explain is /debug/explain as a message, and holds nothing.
    let req = pb::ExplainRequest {
        path: "/v1/chat/completions".into(),
        input: Some(pb::explain_request::Input::Body(body.to_string().into_bytes())),
    };
    let x = match c.explain(req).await.expect("explain").into_inner().result.expect("result") {
        pb::explain_response::Result::Explained(x) => x,
        pb::explain_response::Result::Refusal(r) => panic!("refused: {r:?}"),
    };
    let http = client()
        .post(format!("http://{}/debug/explain?path=/v1/chat/completions", kv.admin_addr))
        .body(body.to_string())
        .send()
        .await
        .expect("explain")
        .json::<Value>()
        .await
        .expect("JSON");
    let e = x.explanation.expect("explanation");
    assert_eq!(e.endpoints.len(), 2);
    assert_eq!(e.profile, http["explanation"]["profile"]);
    for (m, h) in e.endpoints.iter().zip(http["explanation"]["endpoints"].as_array().expect("endpoints")) {
        assert_eq!(m.address, h["address"]);
        let scorers: Vec<&str> = m.scores.iter().map(|s| s.scorer.as_str()).collect();
        let http_scorers: Vec<&str> =
            h["scores"].as_array().expect("scores").iter().filter_map(|s| s["scorer"].as_str()).collect();
        assert_eq!(scorers, http_scorers);
    }
    let d = x.decision.expect("decision");
    assert!(d.decision_id.is_empty());
    let ranked_first = e.endpoints.iter().find(|p| p.rank == Some(0)).expect("a target");
    assert_eq!(d.endpoints[0].address, ranked_first.address);
    assert_eq!(in_flight(kv).await.values().sum::<u64>(), 0, "explain holds nothing");
    let unknown = pb::ExplainRequest {
        path: "/v1/completions".into(),
        input: Some(pb::explain_request::Input::Body(json!({"model": "x", "prompt": "y"}).to_string().into_bytes())),
    };
    let r = c.explain(unknown).await.expect("explain").into_inner().result;
    assert!(matches!(r, Some(pb::explain_response::Result::Refusal(r)) if r.status == 404));

    // WatchEndpoints: the state at once, then each change.
    let watch = pb::WatchEndpointsRequest { pools: vec![], interval_ms: 100 };
    let mut updates = c.watch_endpoints(watch).await.expect("watch").into_inner();
    let first = updates.message().await.expect("stream").expect("an update");
    assert_eq!(first.pools.len(), 1);
    assert_eq!((first.pools[0].name.as_str(), first.pools[0].source.as_str()), ("p", "static"));
    assert_eq!(first.pools[0].endpoints.len(), 2);
    assert!(first.pools[0].endpoints.iter().all(|e| e.health == "healthy" && e.in_flight_requests == 0));
    let mut other = picker(kv).await;
    let picked = decided(&mut other, pick_body(&body)).await;
    let seen = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let u = updates.message().await.expect("stream").expect("an update");
            let e = u.pools[0].endpoints.iter().find(|e| e.address == picked.endpoints[0].address).cloned();
            if e.is_some_and(|e| e.in_flight_requests == 1) {
                return;
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "the pick shows in the watch");
    let missing = pb::WatchEndpointsRequest { pools: vec!["nope".into()], interval_ms: 0 };
    assert_eq!(c.watch_endpoints(missing).await.expect_err("unknown pool").code(), Code::NotFound);

    // Reflection (v1 and v1alpha) lists the service and serves its file.
    use tonic_reflection::pb::{v1, v1alpha};
    let channel = Channel::from_shared(format!("http://{}", kv.grpc_addr)).expect("uri").connect().await.expect("c");
    let mut v1c = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let ask = |m| v1::ServerReflectionRequest { host: String::new(), message_request: Some(m) };
    let list = v1::server_reflection_request::MessageRequest::ListServices(String::new());
    let mut answers = v1c.server_reflection_info(tokio_stream::iter([ask(list)])).await.expect("v1").into_inner();
    let answer = answers.message().await.expect("stream").expect("answer");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(services)) = answer.message_response
    else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<&str> = services.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"kvgate.v1.Picker") && names.contains(&"grpc.health.v1.Health"), "{names:?}");
    let file = v1::server_reflection_request::MessageRequest::FileContainingSymbol("kvgate.v1.Picker".into());
    let mut answers = v1c.server_reflection_info(tokio_stream::iter([ask(file)])).await.expect("v1").into_inner();
    let answer = answers.message().await.expect("stream").expect("answer");
    assert!(matches!(
        answer.message_response,
        Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(f)) if !f.file_descriptor_proto.is_empty()
    ));
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let list = v1alpha::server_reflection_request::MessageRequest::ListServices(String::new());
    let req = v1alpha::ServerReflectionRequest { host: String::new(), message_request: Some(list) };
    let mut answers = alpha.server_reflection_info(tokio_stream::iter([req])).await.expect("v1alpha").into_inner();
    let answer = answers.message().await.expect("stream").expect("answer");
    assert!(matches!(
        answer.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(s))
            if s.service.iter().any(|s| s.name == "kvgate.v1.Picker")
    ));
}

/// The head of a `FileDescriptorProto`: its name, imports and services.
#[derive(Clone, PartialEq, prost::Message)]
struct FileHead {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, repeated, tag = "3")]
    dependency: Vec<String>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceHead>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ServiceHead {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

/// Every service of the gRPC listener can be described by reflection down to the last file it
/// imports (what a client such as grpcurl needs), and gRPC health reports each one as serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_and_health_cover_every_grpc_service() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{self, server_reflection_request::MessageRequest};
    use v1::server_reflection_response::MessageResponse;
    const EXT_PROC: &str = "envoy.service.ext_proc.v3.ExternalProcessor";
    let fleet = gateway(MODEL).sims(1).start().await;
    let kv = &fleet.kv;
    let channel = Channel::from_shared(format!("http://{}", kv.grpc_addr)).expect("uri").connect().await.expect("c");
    let mut reflection = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut ask = async |m: MessageRequest| -> MessageResponse {
        let req = v1::ServerReflectionRequest { host: String::new(), message_request: Some(m) };
        let mut answers = reflection.server_reflection_info(tokio_stream::iter([req])).await.expect("v1").into_inner();
        answers.message().await.expect("stream").expect("an answer").message_response.expect("a response")
    };
    let MessageResponse::ListServicesResponse(list) = ask(MessageRequest::ListServices(String::new())).await else {
        panic!("not a service list");
    };
    let services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in [EXT_PROC, "kvgate.v1.Picker", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == name), "{name} not in {services:?}");
    }
    // Each service's file, then every file it imports, transitively.
    let mut pending: Vec<MessageRequest> =
        [EXT_PROC, "kvgate.v1.Picker", "envoy.service.ext_proc.v3.ProcessingRequest"]
            .map(|s| MessageRequest::FileContainingSymbol(s.to_owned()))
            .to_vec();
    let mut seen: Vec<String> = Vec::new();
    let mut described: Vec<String> = Vec::new();
    while let Some(request) = pending.pop() {
        let asked = format!("{request:?}");
        let MessageResponse::FileDescriptorResponse(files) = ask(request).await else {
            panic!("{asked}: no file");
        };
        for raw in files.file_descriptor_proto {
            let file = <FileHead as prost::Message>::decode(raw.as_slice()).expect("a file descriptor");
            described.extend(file.service.iter().filter_map(|s| s.name.clone()));
            for dep in file.dependency {
                if !seen.contains(&dep) {
                    seen.push(dep.clone());
                    pending.push(MessageRequest::FileByFilename(dep));
                }
            }
        }
    }
    assert!(seen.iter().any(|f| f == "envoy/config/core/v3/base.proto"), "{seen:?}");
    assert!(described.iter().any(|s| s == "ExternalProcessor") && described.iter().any(|s| s == "Picker"));

    for service in ["", "liveness", "readiness", EXT_PROC, "kvgate.v1.Picker"] {
        assert!(common::grpc_serving(channel.clone(), service).await, "{service}");
    }
    let mut health = HealthClient::new(channel);
    let unknown = health.check(HealthCheckRequest { service: "kvgate.v1.Nope".into() }).await;
    assert_eq!(unknown.expect_err("not a service").code(), Code::NotFound);
}

/// The Python client example's interpreter (its virtualenv made once, whichever test asks first).
fn example_python() -> std::path::PathBuf {
    static PYTHON: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| common::python_venv("grpc-venv", &["grpcio==1.85.1", "grpcio-tools==1.85.1"])).clone()
}

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/picker_client.py");

/// Runs the Python client example with `args`, off the runtime's threads.
async fn run_example(args: Vec<String>) -> std::process::Output {
    let python = example_python();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(python).arg(EXAMPLE).args(args).output().expect("the example runs")
    })
    .await
    .expect("joined")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_example_picks_sends_and_reports() {
    let fleet = gateway(MODEL).sims(2).start().await;
    let (sims, kv) = (&fleet.sims, &fleet.kv);
    let grpc = kv.grpc_addr.to_string();
    let run = |model: &str| {
        let args = ["--picker", &grpc, "--model", model, "--max-tokens", "4"]
            .into_iter()
            .chain(["--prompt", "One?", "--prompt", "Two?", "--prompt", "Three?"])
            .map(str::to_owned)
            .collect();
        run_example(args)
    };
    let out = run(MODEL).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let addrs: Vec<String> = sims.iter().map(|s| s.addrs[0].to_string()).collect();
    for l in &lines {
        assert_eq!((l["status"].as_u64(), l["ended"].as_bool()), (Some(200), Some(true)), "{l}");
        assert!(addrs.iter().any(|a| l["endpoint"] == a.as_str()), "{l}");
        assert!(l["usage"]["completion_tokens"].as_u64().is_some_and(|n| n > 0), "{l}");
    }
    // kvgate saw the three requests end, with their usage and first tokens, and holds none.
    let m = common::metrics(&format!("http://{}", kv.admin_addr)).await;
    assert_eq!(metric(&m, "kvgate_requests_total", &[("pool", "p"), ("status", "200")]), Some(3.0));
    assert!(metric(&m, "kvgate_tokens_total", &[("pool", "p"), ("kind", "completion")]).is_some_and(|n| n >= 3.0));
    assert_eq!(metric(&m, "kvgate_picker_reports_total", &[("result", "accepted")]), Some(6.0));
    assert_eq!(in_flight(kv).await.values().sum::<u64>(), 0);
    // A refused pick is printed as such.
    let out = run("no-such-model").await;
    let first = String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_owned).unwrap_or_default();
    let refusal: Value = serde_json::from_str(&first).expect("a JSON line");
    assert_eq!((refusal["refused"].as_u64(), refusal["code"].as_str()), (Some(404), Some("model_not_found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_example_sends_completions_as_prompts() {
    let fleet = gateway(MODEL).sims(1).start().await;
    let kv = &fleet.kv;
    let args = ["--picker", &kv.grpc_addr.to_string(), "--model", MODEL, "--max-tokens", "4"]
        .into_iter()
        .chain(["--path", "/v1/completions", "--prompt", "Once upon", "--prompt", "a time"])
        .map(str::to_owned)
        .collect();
    let out = run_example(args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for l in &lines {
        assert_eq!((l["status"].as_u64(), l["ended"].as_bool()), (Some(200), Some(true)), "{l}");
        assert!(l["text"].as_str().is_some_and(|t| !t.is_empty()), "{l}");
        assert!(l["usage"]["completion_tokens"].as_u64().is_some_and(|n| n > 0), "{l}");
    }
    let m = common::metrics(&format!("http://{}", kv.admin_addr)).await;
    assert_eq!(metric(&m, "kvgate_requests_total", &[("pool", "p"), ("status", "200")]), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_example_says_when_the_picker_is_down() {
    let nobody = format!("127.0.0.1:{}", common::free_port());
    let args = ["--picker", nobody.as_str(), "--model", MODEL, "--prompt", "Hello"].map(str::to_owned).to_vec();
    let out = run_example(args).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit {:?}", out.status);
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!stderr.contains("Traceback"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: cannot reach kvgate's picker at ") && stderr.contains(&nobody), "{stderr}");
}

/// `message` as a request carrying `authorization: Bearer <token>`.
fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ASCII token"));
    req
}

/// Writes `token` to `path` as the kubelet updates a mounted Secret: a new file renamed over
/// the old one.
fn write_token(path: &std::path::Path, token: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, format!("{token}\n")).expect("token written");
    std::fs::rename(&next, path).expect("token in place");
}

/// With a token file, every `kvgate.v1.Picker` call needs the token, a rotated file takes
/// effect while kvgate runs, and ext_proc and gRPC health on the same listener need none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_picker_api_and_rotates() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("picker-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("token");
    write_token(&file, "first-token");
    let fleet =
        gateway(MODEL).sims(1).config(&format!("picker_api: {{token_file: '{}'}}", file.display())).start().await;
    let kv = &fleet.kv;
    let mut c = picker(kv).await;
    let body = json!({"model": MODEL, "prompt": "hello there"});
    let req = || pb::PickRequest { path: "/v1/completions".into(), ..pick_body(&body) };
    let refusal = |r: Result<tonic::Response<pb::PickResponse>, tonic::Status>| {
        let e = r.expect_err("refused");
        assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
        assert!(!e.message().contains("token-"), "the token is not echoed: {}", e.message());
    };
    refusal(c.pick(req()).await);
    refusal(c.pick(bearer(req(), "wrong-token")).await);
    refusal(c.pick(bearer(req(), "first-token-and-more")).await);
    for e in [
        c.report(finished("00000000-1-0", 200, None)).await.expect_err("report"),
        c.watch_endpoints(pb::WatchEndpointsRequest::default()).await.expect_err("watch"),
    ] {
        assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    }
    let refusals = |m: &str| metric(m, "kvgate_picker_refused_total", &[("reason", "unauthenticated")]);
    assert_eq!(refusals(&common::metrics(&fleet.admin()).await), Some(5.0), "each refusal counted");
    let d = c.pick(bearer(req(), "first-token")).await.expect("the right token").into_inner();
    let Some(pb::pick_response::Result::Decision(d)) = d.result else { panic!("decided: {d:?}") };
    let end = c.report(bearer(finished(&d.decision_id, 200, None), "first-token")).await.expect("report");
    assert!(end.into_inner().ended);

    // The Secret is rotated: the new token is taken, the old one refused, without a restart.
    write_token(&file, "second-token");
    let rotated = eventually(15, || {
        let mut c = c.clone();
        async move { c.pick(bearer(req(), "second-token")).await.is_ok() }
    })
    .await;
    assert!(rotated, "the rotated token is taken");
    refusal(c.pick(bearer(req(), "first-token")).await);
    // A file that cannot be read keeps the last good token.
    std::fs::remove_file(&file).expect("token removed");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(c.pick(bearer(req(), "second-token")).await.is_ok(), "the last good token stays");

    // Envoy's ext_proc and gRPC health need no token.
    assert!(common::grpc_serving(grpc_channel(kv).await, "").await, "health answers");
    use common::extproc_msg::{post_headers, request_body};
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    let mut ext = ExternalProcessorClient::connect(format!("http://{}", kv.grpc_addr)).await.expect("connect");
    let chat_body = chat(MODEL).user("hi").max_tokens(1).bytes();
    let messages = vec![post_headers("/v1/chat/completions"), request_body(chat_body, true)];
    let mut answers = ext.process(tokio_stream::iter(messages)).await.expect("ext_proc answers").into_inner();
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), answers.message()).await;
    let first = first.expect("in time").expect("no error").expect("a message");
    assert!(format!("{first:?}").contains(&fleet.addr(0)), "a destination: {first:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

async fn grpc_channel(kv: &kvgate::tools::serve::Server) -> Channel {
    Channel::from_shared(format!("http://{}", kv.grpc_addr)).expect("uri").connect().await.expect("gRPC connects")
}

/// Picks nobody reports take at most the picker API's share of a pool's admission: the proxy's
/// requests still get 200 while a client picks and never reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreported_picks_never_push_the_proxy_into_429() {
    let fleet = gateway(MODEL).sims(2).proxy().pool("admission: {max_in_flight: 4}").start().await;
    let kv = &fleet.kv;
    let mut c = picker(kv).await;
    let body = json!({"model": MODEL, "prompt": "hello there"});
    let req = || pb::PickRequest { path: "/v1/completions".into(), ..pick_body(&body) };
    let proxy = format!("{}/v1/completions", fleet.proxy());
    let (mut decided_n, mut refused_n) = (0, 0);
    for _ in 0..50 {
        match pick(&mut c, req()).await {
            pb::pick_response::Result::Decision(_) => decided_n += 1,
            pb::pick_response::Result::Refusal(r) => {
                assert_eq!((r.status, r.code.as_str()), (429, "saturated"), "{r:?}");
                refused_n += 1;
            }
        }
        let r = client().post(&proxy).body(body.to_string()).send().await.expect("proxy answers");
        assert_eq!(r.status(), 200, "the proxy is not saturated by held picks");
    }
    assert_eq!((decided_n, refused_n), (2, 48), "half of max_in_flight 4 for the picker API");
    let m = common::metrics(&fleet.admin()).await;
    assert_eq!(metric(&m, "kvgate_picker_refused_total", &[("reason", "admission_share")]), Some(48.0));
    // The held picks are still the endpoints' load.
    assert_eq!(in_flight(kv).await.values().sum::<u64>(), 2);
    // Two proxy requests at once still fit beside them.
    let send = || client().post(&proxy).body(body.to_string()).send();
    let (a, b) = tokio::join!(send(), send());
    assert_eq!((a.expect("a").status().as_u16(), b.expect("b").status().as_u16()), (200, 200));
}

/// A client bound to `local` (any 127/8 address reaches kvgate on loopback).
async fn picker_from(kv: &kvgate::tools::serve::Server, local: &str) -> PickerClient<Channel> {
    let local: std::net::IpAddr = local.parse().expect("an IP");
    let target = kv.grpc_addr;
    let connector = tower::service_fn(move |_: tonic::transport::Uri| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::new(local, 0))?;
        let stream = socket.connect(target).await?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .expect("uri")
        .connect_with_connector(connector)
        .await
        .expect("gRPC connects");
    PickerClient::new(channel)
}

/// One client (one peer IP) fills its own quota of pending decisions and of endpoint watches,
/// and another client still picks and watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_every_slot() {
    let limits = "picker_api: {max_pending: 16, max_pending_per_client: 3, max_watches: 8, max_watches_per_client: 2}";
    let fleet = gateway(MODEL).sims(1).config(limits).start().await;
    let kv = &fleet.kv;
    let mut greedy = picker_from(kv, "127.0.0.2").await;
    let mut other = picker_from(kv, "127.0.0.1").await;
    let body = json!({"model": MODEL, "prompt": "hello there"});
    let req = || pb::PickRequest { path: "/v1/completions".into(), ..pick_body(&body) };
    for _ in 0..3 {
        decided(&mut greedy, req()).await;
    }
    for _ in 0..3 {
        let e = greedy.pick(req()).await.expect_err("past its quota");
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
        assert!(e.message().contains("picker_api.max_pending_per_client"), "{}", e.message());
    }
    let mine = decided(&mut other, req()).await;
    assert!(other.report(finished(&mine.decision_id, 200, None)).await.expect("report").into_inner().ended);

    let watch = || pb::WatchEndpointsRequest { interval_ms: 100, ..Default::default() };
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = greedy.watch_endpoints(watch()).await.expect("a watch").into_inner();
        assert!(stream.message().await.expect("an update").is_some());
        open.push(stream);
    }
    let e = greedy.watch_endpoints(watch()).await.expect_err("past its quota");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("picker_api.max_watches_per_client"), "{}", e.message());
    let mut theirs = other.watch_endpoints(watch()).await.expect("another client's watch").into_inner();
    assert!(theirs.message().await.expect("an update").is_some());
    // A closed watch gives its slot back.
    drop(open.pop());
    let back = eventually(10, || {
        let mut g = greedy.clone();
        async move { g.watch_endpoints(watch()).await.is_ok() }
    })
    .await;
    assert!(back, "the slot is given back");
    let m = common::metrics(&fleet.admin()).await;
    let refused = |reason: &str| metric(&m, "kvgate_picker_refused_total", &[("reason", reason)]);
    assert_eq!((refused("max_pending_per_client"), refused("max_watches_per_client")), (Some(3.0), Some(1.0)));
    assert_eq!(refused("max_pending"), None, "the total was never reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_example_sends_the_token() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("python-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("token");
    write_token(&file, "python-token");
    let fleet =
        gateway(MODEL).sims(1).config(&format!("picker_api: {{token_file: '{}'}}", file.display())).start().await;
    let grpc = fleet.kv.grpc_addr.to_string();
    let args = |token: bool| {
        let mut args = vec!["--picker", grpc.as_str(), "--model", MODEL, "--max-tokens", "2", "--prompt", "Hi"];
        if token {
            args.extend(["--token-file", file.to_str().expect("UTF-8 path")]);
        }
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let out = run_example(args(false)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("UNAUTHENTICATED"), "{stderr}");
    let out = run_example(args(true)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line: Value = serde_json::from_str(stdout.trim()).expect("a JSON line");
    assert_eq!((line["status"].as_u64(), line["ended"].as_bool()), (Some(200), Some(true)), "{line}");
    let _ = std::fs::remove_dir_all(&dir);
}
