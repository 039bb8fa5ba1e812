//! The ext_proc server over real gRPC on loopback, with a test client sending the messages
//! Envoy sends (full duplex and buffered modes), against a real simulator.

mod common;
#[path = "extproc/reference.rs"]
mod reference;

use std::time::Duration;

use common::extproc_msg::{
    lb_metadata, post_headers, request_body, request_body_chunks, request_headers, response_body, response_headers,
    sse_response_headers, subset_hint, with_metadata,
};
use common::{chat, eventually, gateway, get_json, metric};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    ProcessingRequest, ProcessingResponse, ProtocolConfiguration, body_mutation::Mutation,
};
use envoy_types::pb::google::protobuf::value::Kind;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// One ext_proc stream, as Envoy drives it.
struct Stream {
    tx: mpsc::Sender<ProcessingRequest>,
    rx: tonic::Streaming<ProcessingResponse>,
}

impl Stream {
    async fn open(addr: std::net::SocketAddr) -> Self {
        let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
            .await
            .expect("connect")
            .max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(64);
        let resp = client.process(ReceiverStream::new(rx)).await.expect("process");
        Self { tx, rx: resp.into_inner() }
    }
    async fn send(&self, m: ProcessingRequest) {
        self.tx.send(m).await.expect("send");
    }
    async fn recv(&mut self) -> ProcessingResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("answer in time")
            .expect("ok")
            .expect("a message")
    }
}

/// The destination header set by a headers (or buffered body) response.
fn destination(r: &ProcessingResponse) -> Option<String> {
    let common = match &r.response {
        Some(Resp::RequestHeaders(h)) => h.response.as_ref(),
        Some(Resp::RequestBody(b)) => b.response.as_ref(),
        _ => None,
    }?;
    common.header_mutation.as_ref()?.set_headers.iter().find_map(|h| {
        let h = h.header.as_ref()?;
        (h.key == "x-gateway-destination-endpoint").then(|| String::from_utf8_lossy(&h.raw_value).into_owned())
    })
}

fn metadata_destination(r: &ProcessingResponse) -> Option<String> {
    let lb = r.dynamic_metadata.as_ref()?.fields.get("envoy.lb")?;
    let Some(Kind::StructValue(s)) = &lb.kind else { return None };
    match &s.fields.get("x-gateway-destination-endpoint")?.kind {
        Some(Kind::StringValue(v)) => Some(v.clone()),
        _ => None,
    }
}

fn streamed_body(r: &ProcessingResponse) -> Option<(Vec<u8>, bool)> {
    let common = match &r.response {
        Some(Resp::RequestBody(b)) | Some(Resp::ResponseBody(b)) => b.response.as_ref()?,
        _ => return None,
    };
    match common.body_mutation.as_ref()?.mutation.as_ref()? {
        Mutation::StreamedResponse(s) => Some((s.body.clone(), s.end_of_stream)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_duplex_request_and_response() {
    let fleet = gateway(MODEL).sims(1).start().await;
    let debug = format!("{}/debug/endpoints", fleet.admin());
    let body = chat(MODEL).user("x".repeat(150_000)).stream().bytes();
    let mut s = Stream::open(fleet.kv.grpc_addr).await;
    s.send(request_headers(
        &[(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json")],
        false,
    ))
    .await;
    // Three body chunks; nothing comes back before the last.
    for chunk in request_body_chunks(&body, 60_000) {
        s.send(chunk).await;
    }
    let first = s.recv().await;
    let dest = destination(&first).expect("destination header");
    assert_eq!(dest, fleet.addr(0));
    assert_eq!(metadata_destination(&first).as_deref(), Some(dest.as_str()), "header and metadata agree");
    match &first.response {
        Some(Resp::RequestHeaders(h)) => assert!(h.response.as_ref().is_some_and(|c| c.clear_route_cache)),
        other => panic!("expected a headers response first, got {other:?}"),
    }
    let mut echoed = Vec::new();
    loop {
        let (chunk, eos) = streamed_body(&s.recv().await).expect("a body chunk");
        assert!(chunk.len() <= 62_000);
        echoed.extend(chunk);
        if eos {
            break;
        }
    }
    assert_eq!(echoed, body, "the body comes back byte for byte");
    assert_eq!(get_json(&debug).await["pools"][0]["endpoints"][0]["in_flight_requests"], 1);

    // Response phase: headers, then SSE chunks with the usage line split across two chunks.
    s.send(sse_response_headers()).await;
    assert!(matches!(s.recv().await.response, Some(Resp::ResponseHeaders(_))));
    let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":40000,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":16}}}\n\ndata: [DONE]\n\n";
    let cut = 80;
    for (part, eos) in [(&sse[..cut], false), (&sse[cut..], true)] {
        s.send(response_body(part, eos)).await;
        let (back, back_eos) = streamed_body(&s.recv().await).expect("echoed chunk");
        assert_eq!((back.as_slice(), back_eos), (part, eos), "response chunks are echoed at once");
    }
    assert!(
        eventually(5, || async { get_json(&debug).await["pools"][0]["endpoints"][0]["in_flight_requests"] == 0 }).await
    );
    let m = admin_metrics(&fleet.kv).await;
    assert_eq!(metric(&m, "kvgate_tokens_total", &[("kind", "prompt")]), Some(40000.0));
    assert_eq!(metric(&m, "kvgate_tokens_total", &[("kind", "cached")]), Some(16.0));
    assert_eq!(metric(&m, "kvgate_requests_total", &[("status", "200"), ("decision", "decode-only")]), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_buffered_mode_bodyless_requests_and_resets() {
    let fleet = gateway(MODEL).sims(2).start().await;
    let (kv, b) = (&fleet.kv, fleet.addr(1));
    let debug = format!("{}/debug/endpoints", fleet.admin());
    let hi = |model: &str| chat(model).user("hi").bytes();
    let post = [(":method", "POST"), (":path", "/v1/chat/completions")];

    // Unknown model: an ImmediateResponse 404 with an OpenAI body and the drop reason.
    let mut s = Stream::open(kv.grpc_addr).await;
    s.send(request_headers(&post, false)).await;
    s.send(request_body(hi("gpt-17"), true)).await;
    match s.recv().await.response {
        Some(Resp::ImmediateResponse(ir)) => {
            assert_eq!(ir.status.map(|s| s.code), Some(404));
            let v: serde_json::Value = serde_json::from_slice(&ir.body).expect("JSON body");
            assert_eq!(v["error"]["code"], "model_not_found");
            let hs = ir.headers.expect("headers").set_headers;
            assert!(hs.iter().any(|h| h.header.as_ref().is_some_and(|h| h.key == "x-llm-d-request-dropped-reason")));
        }
        other => panic!("expected an immediate response, got {other:?}"),
    }
    drop(s);

    // The subset hint restricts the pick (ip:port exact), and an unmatched hint is a 503.
    for (hint, want) in [(vec![b.clone()], Some(b.clone())), (vec!["10.9.9.9:1".to_owned()], None), (vec![], None)] {
        let mut s = Stream::open(kv.grpc_addr).await;
        let hint_refs: Vec<&str> = hint.iter().map(String::as_str).collect();
        s.send(with_metadata(request_headers(&post, false), subset_hint(&hint_refs))).await;
        s.send(request_body(hi(MODEL), true)).await;
        let r = s.recv().await;
        match want {
            Some(w) => assert_eq!(destination(&r), Some(w)),
            None => assert!(
                matches!(r.response, Some(Resp::ImmediateResponse(ref ir)) if ir.status.as_ref().map(|s| s.code) == Some(503)),
                "{hint:?}: {r:?}"
            ),
        }
    }

    // Buffered mode, announced by Envoy: the headers are answered at once; the pick rides on
    // the body answer.
    let mut s = Stream::open(kv.grpc_addr).await;
    let pc = ProtocolConfiguration {
        request_body_mode: BodySendMode::Buffered as i32,
        response_body_mode: BodySendMode::None as i32,
        ..Default::default()
    };
    s.send(ProcessingRequest { protocol_config: Some(pc), ..request_headers(&post, false) }).await;
    let r = s.recv().await;
    assert!(matches!(r.response, Some(Resp::RequestHeaders(_))) && destination(&r).is_none());
    s.send(request_body(hi(MODEL), true)).await;
    let r = s.recv().await;
    assert!(matches!(r.response, Some(Resp::RequestBody(_))));
    let dest = destination(&r).expect("destination on the body answer");
    assert_eq!(metadata_destination(&r), Some(dest));
    drop(s);

    // A request without a body is answered at its headers, as the proxy answers it: the model
    // list by the gateway itself; an API request without a body (so without a `model`) is a
    // 400, and so is one whose body names no model.
    let immediate = |r: ProcessingResponse| match r.response {
        Some(Resp::ImmediateResponse(ir)) => {
            let v: serde_json::Value = serde_json::from_slice(&ir.body).expect("JSON body");
            (ir.status.map(|s| s.code), v)
        }
        other => panic!("expected an immediate response, got {other:?}"),
    };
    let mut s = Stream::open(kv.grpc_addr).await;
    s.send(request_headers(&[(":method", "GET"), (":path", "/v1/models")], true)).await;
    let (status, v) = immediate(s.recv().await);
    assert_eq!(status, Some(200));
    assert_eq!(v["data"][0]["id"], MODEL);
    drop(s);
    let mut s = Stream::open(kv.grpc_addr).await;
    s.send(request_headers(&post, true)).await;
    assert_eq!(immediate(s.recv().await).0, Some(400));
    drop(s);
    // A wrong method on an API path is a 405, as from the proxy.
    let mut s = Stream::open(kv.grpc_addr).await;
    s.send(request_headers(&[(":method", "GET"), (":path", "/v1/chat/completions")], true)).await;
    let (status, v) = immediate(s.recv().await);
    assert_eq!((status, v["error"]["code"].as_str()), (Some(405), Some("method_not_allowed")));
    drop(s);
    let mut s = Stream::open(kv.grpc_addr).await;
    s.send(request_headers(&post, false)).await;
    let no_model = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string().into_bytes();
    s.send(request_body(no_model, true)).await;
    let (status, v) = immediate(s.recv().await);
    assert_eq!((status, v["error"]["code"].as_str()), (Some(400), Some("missing_model")));
    drop(s);

    // A stream reset mid-request releases the in-flight count.
    let total = || async {
        get_json(&debug).await["pools"][0]["endpoints"]
            .as_array()
            .map(|e| e.iter().map(|x| x["in_flight_requests"].as_u64().unwrap_or(0)).sum::<u64>())
            .unwrap_or(99)
    };
    assert!(eventually(5, || async { total().await == 0 }).await, "earlier streams released");
    let mut s = Stream::open(kv.grpc_addr).await;
    s.send(request_headers(&post, false)).await;
    s.send(request_body(hi(MODEL), true)).await;
    let _ = s.recv().await;
    assert!(eventually(5, || async { total().await == 1 }).await);
    drop(s);
    assert!(eventually(5, || async { total().await == 0 }).await, "released on reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_services() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let health_port = common::free_port();
    let fleet = gateway(MODEL).sims(1).config(&format!("health_addr: 127.0.0.1:{health_port}")).start().await;
    for addr in [fleet.kv.grpc_addr.to_string(), format!("127.0.0.1:{health_port}")] {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        for service in ["", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"] {
            assert!(common::grpc_serving(channel.clone(), service).await, "{service} on {addr}");
        }
        let mut client = HealthClient::new(channel);
        let unknown = client.check(HealthCheckRequest { service: "nope".into() }).await;
        assert!(unknown.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_over_tls() {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let dir = std::env::temp_dir().join(format!("kvgate-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    std::fs::write(dir.join("cert.pem"), key.cert.pem()).expect("cert");
    std::fs::write(dir.join("key.pem"), key.signing_key.serialize_pem()).expect("key");
    let (cert, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    let tls = format!("extproc: {{tls: {{cert_path: '{}', key_path: '{}'}}}}", cert.display(), key_path.display());
    let fleet = gateway(MODEL).sims(1).config(&tls).start().await;
    let kv = &fleet.kv;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(key.cert.pem()))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", kv.grpc_addr))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("a TLS connection");
    let mut client = ExternalProcessorClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let mut resp = client.process(ReceiverStream::new(rx)).await.expect("process").into_inner();
    tx.send(post_headers("/v1/completions")).await.expect("send");
    let body = json!({"model": MODEL, "prompt": "hi"}).to_string().into_bytes();
    tx.send(request_body(body, true)).await.expect("send");
    let r = tokio::time::timeout(Duration::from_secs(10), resp.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("message");
    assert_eq!(destination(&r), Some(fleet.addr(0)));
    // A plaintext client gets nowhere.
    let plain = ExternalProcessorClient::connect(format!("http://{}", kv.grpc_addr)).await;
    if let Ok(mut c) = plain {
        let (_tx, rx) = mpsc::channel::<ProcessingRequest>(1);
        assert!(c.process(ReceiverStream::new(rx)).await.is_err());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `self_signed_tls` (the reference picker's `--secure-serving` without a certificate): the
/// gRPC port speaks TLS only — a TLS client gets as far as an unknown certificate, a plaintext
/// one nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_over_self_signed_tls() {
    let fleet = gateway(MODEL).sims(1).config("extproc: {self_signed_tls: true}").start().await;
    let kv = &fleet.kv;
    let other = rcgen::generate_simple_self_signed(vec!["kvgate".to_owned()]).expect("certificate");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(other.cert.pem()))
        .domain_name("kvgate");
    let refused = tonic::transport::Endpoint::from_shared(format!("https://{}", kv.grpc_addr))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect_err("a certificate no CA signed");
    let chain = format!("{refused:?}");
    assert!(chain.contains("certificate") || chain.contains("Certificate"), "a TLS handshake: {chain}");
    let plain = ExternalProcessorClient::connect(format!("http://{}", kv.grpc_addr)).await;
    if let Ok(mut c) = plain {
        let (_tx, rx) = mpsc::channel::<ProcessingRequest>(1);
        assert!(c.process(ReceiverStream::new(rx)).await.is_err());
    }
}

/// When the gateway reports (in `envoy.lb` metadata) that a fallback served the request, the
/// in-flight count moves there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_endpoint_reported_by_the_gateway_gets_the_count() {
    let fleet = gateway(MODEL).sims(2).config("extproc: {max_endpoints: 2}").start().await;
    let debug = format!("{}/debug/endpoints", fleet.admin());
    let mut s = Stream::open(fleet.kv.grpc_addr).await;
    s.send(post_headers("/v1/completions")).await;
    s.send(request_body(json!({"model": MODEL, "prompt": "x"}).to_string(), true)).await;
    let list = destination(&s.recv().await).expect("destination");
    let entries: Vec<&str> = list.split(',').collect();
    assert_eq!(entries.len(), 2, "an ordered fallback list: {list}");
    let _ = s.recv().await; // the body
    let in_flight = |addr: String| {
        let debug = debug.clone();
        async move {
            get_json(&debug).await["pools"][0]["endpoints"]
                .as_array()
                .and_then(|e| {
                    e.iter()
                        .find(|x| x["address"] == addr.as_str())
                        .map(|x| x["in_flight_requests"].as_u64().unwrap_or(9))
                })
                .unwrap_or(9)
        }
    };
    assert_eq!(in_flight(entries[0].to_owned()).await, 1);
    // The gateway says the second entry served.
    let meta = lb_metadata(&[("x-gateway-destination-endpoint-served", entries[1])]);
    s.send(with_metadata(response_headers(&[(":status", "200")], false), meta)).await;
    let _ = s.recv().await;
    assert_eq!(in_flight(entries[0].to_owned()).await, 0);
    assert_eq!(in_flight(entries[1].to_owned()).await, 1);
    drop(s);
    assert!(eventually(5, || async { in_flight(entries[1].to_owned()).await == 0 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_as_they_arrive() {
    let fleet = gateway(MODEL).sims(1).config("max_body_bytes: 100000").start().await;
    let mut s = Stream::open(fleet.kv.grpc_addr).await;
    s.send(post_headers("/v1/completions")).await;
    s.send(request_body(vec![b' '; 60_000], false)).await;
    s.send(request_body(vec![b' '; 60_000], false)).await;
    // Refused at the second chunk, before any end of stream.
    match s.recv().await.response {
        Some(Resp::ImmediateResponse(ir)) => {
            assert_eq!(ir.status.map(|s| s.code), Some(413));
            let v: serde_json::Value = serde_json::from_slice(&ir.body).expect("JSON");
            assert_eq!(v["error"]["code"], "request_too_large");
        }
        other => panic!("expected an immediate response, got {other:?}"),
    }
}

fn header_mutation(r: &ProcessingResponse) -> (Vec<(String, String)>, Vec<String>) {
    let common = match &r.response {
        Some(Resp::RequestHeaders(h)) => h.response.as_ref(),
        Some(Resp::RequestBody(b)) => b.response.as_ref(),
        _ => None,
    };
    let m = common.and_then(|c| c.header_mutation.clone()).unwrap_or_default();
    let set = m
        .set_headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), String::from_utf8_lossy(&h.raw_value).into_owned()))
        .collect();
    (set, m.remove_headers)
}

/// Sends one request through a fresh stream (full duplex); returns the stream (which holds the
/// request open) and the headers answer.
async fn decide(
    addr: std::net::SocketAddr,
    body: &serde_json::Value,
    extra: &[(&str, &str)],
) -> (Stream, ProcessingResponse) {
    let mut s = Stream::open(addr).await;
    let mut hs = vec![(":method", "POST"), (":path", "/v1/chat/completions")];
    hs.extend_from_slice(extra);
    s.send(request_headers(&hs, false)).await;
    s.send(request_body(body.to_string(), true)).await;
    let r = s.recv().await;
    (s, r)
}

/// The P/D and data-parallel placement headers the picker sets (and the client's it removes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_headers_for_prefill_and_ranks() {
    let p = common::start_sim(&["--time-scale", "0"]).await;
    let d = common::start_sim(&["--time-scale", "0"]).await;
    let dp = common::start_sim(&["--time-scale", "0", "--data-parallel-size", "2", "--served-model-name", "moe"]).await;
    let other = common::start_sim(&["--time-scale", "0", "--served-model-name", "moe"]).await;
    let kv = common::start_kvgate(&format!(
        "admin_addr: 127.0.0.1:0\nextproc: {{max_endpoints: 4}}\npools:\n\
         - {{name: pd, models: ['{MODEL}'], endpoints: [{{address: '{}', labels: {{llm-d.ai/role: prefill}}}}, {{address: '{}', labels: {{llm-d.ai/role: decode}}}}],\n\
            scheduler: {{plugins: [{{type: prefill-filter}}, {{type: decode-filter}}, {{type: disagg-profile-handler}}, {{type: prefix-based-pd-decider, parameters: {{nonCachedTokens: 256}}}}],\n\
            schedulingProfiles: [{{name: prefill, plugins: [{{pluginRef: prefill-filter}}]}}, {{name: decode, plugins: [{{pluginRef: decode-filter}}]}}]}}}}\n\
         - {{name: moe, models: [moe], endpoints: [{{address: '{}', data_parallel_size: 2}}, {{address: '{}'}}]}}\n",
        p.addrs[0], d.addrs[0], dp.addrs[0], other.addrs[0]
    ))
    .await;
    let debug = format!("http://{}/debug/endpoints", kv.admin_addr);
    let scraped = || async {
        let v = get_json(&debug).await;
        v["pools"].as_array().is_some_and(|ps| {
            ps.iter().all(|p| p["endpoints"].as_array().is_some_and(|e| e.iter().all(|e| e["stale"] == false)))
        })
    };
    assert!(eventually(10, scraped).await);
    let long = chat(MODEL).user("Terms and conditions. ".repeat(200)).json();
    let (mut open, first) = decide(kv.grpc_addr, &long, &[("x-data-parallel-rank", "5")]).await;
    let (set, remove) = header_mutation(&first);
    let get = |k: &str| set.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("x-gateway-destination-endpoint"), Some(d.addrs[0].to_string()));
    assert_eq!(get("x-prefiller-host-port"), Some(p.addrs[0].to_string()));
    assert!(remove.contains(&"x-data-parallel-rank".to_owned()), "a client's rank pin is removed: {remove:?}");
    assert!(remove.contains(&"x-prefiller-data-parallel-rank".to_owned()));
    // The prefill endpoint counts the request until the response starts.
    let in_flight = |addr: String| {
        let debug = debug.clone();
        async move {
            let v = get_json(&debug).await;
            v["pools"][0]["endpoints"]
                .as_array()
                .expect("endpoints")
                .iter()
                .find(|e| e["address"] == addr.as_str())
                .expect("listed")["in_flight_requests"]
                .as_u64()
        }
    };
    assert_eq!(in_flight(p.addrs[0].to_string()).await, Some(1));
    assert!(streamed_body(&open.recv().await).is_some_and(|(_, eos)| eos), "the body comes back");
    open.send(response_headers(&[(":status", "200")], false)).await;
    assert!(matches!(open.recv().await.response, Some(Resp::ResponseHeaders(_))));
    assert_eq!(in_flight(p.addrs[0].to_string()).await, Some(0), "released when the decode side answers");
    assert_eq!(in_flight(d.addrs[0].to_string()).await, Some(1), "the decode side still counts it");
    drop(open);

    // Short: decode only, and a client's own prefiller header is removed.
    let short = chat(MODEL).user("hi").json();
    let (set, remove) =
        header_mutation(&decide(kv.grpc_addr, &short, &[("x-prefiller-host-port", "10.9.9.9:1")]).await.1);
    assert!(set.iter().all(|(k, _)| k != "x-prefiller-host-port"));
    assert!(remove.contains(&"x-prefiller-host-port".to_owned()), "{remove:?}");

    // Ranks behind one port. Cold prompts rotate over the three endpoints (two ranks and
    // `other`), so six distinct ones reach each twice. A pinned rank gets no fallback (another
    // server would get the wrong rank); `other` gets the DP server as its fallback, listed once.
    let (mut pinned, mut unpinned) = (std::collections::BTreeMap::new(), 0);
    for k in 0..6 {
        let moe = chat("moe").user(format!("Topic {k}. ").repeat(100)).json();
        let (set, _) = header_mutation(&decide(kv.grpc_addr, &moe, &[]).await.1);
        let get = |k: &str| set.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let dest = get("x-gateway-destination-endpoint").expect("destination");
        if dest == dp.addrs[0].to_string() {
            *pinned.entry(get("x-data-parallel-rank").expect("rank pinned")).or_insert(0) += 1;
        } else {
            assert_eq!(dest, format!("{},{}", other.addrs[0], dp.addrs[0]), "the DP server once, as the fallback");
            assert_eq!(get("x-data-parallel-rank"), None);
            unpinned += 1;
        }
    }
    assert_eq!(pinned, [("0".to_owned(), 2), ("1".to_owned(), 2)].into_iter().collect(), "each rank in turn");
    assert_eq!(unpinned, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_does_not_decode_is_invalid_argument() {
    use envoy_types::pb::google::protobuf::Duration as NotARequest;
    let fleet = gateway(MODEL).sims(1).start().await;
    let kv = &fleet.kv;
    // Field 2 of a ProcessingRequest is `request_headers`, a message; this sends it as a varint.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", kv.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<NotARequest, ProcessingResponse>::default();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/envoy.service.ext_proc.v3.ExternalProcessor/Process");
    let garbage = tokio_stream::StreamExt::chain(
        tokio_stream::iter([NotARequest { seconds: 0, nanos: 5 }]),
        tokio_stream::pending(),
    );
    let mut resp = grpc.streaming(tonic::Request::new(garbage), path, codec).await.expect("stream opens").into_inner();
    let end = tokio::time::timeout(Duration::from_secs(10), resp.message()).await.expect("an answer in time");
    let status = end.expect_err("the stream ends with an error");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_across_streams_are_bounded() {
    // One client may hold the whole budget here (its share is tests/bodies.rs's subject).
    let config = "max_buffered_bytes: 100000\nconnections: {max_body_share_percent: 100}";
    let fleet = gateway(MODEL).sims(1).config(config).start().await;
    let kv = &fleet.kv;
    // One stream holds 60 kB of an unfinished body...
    let a = Stream::open(kv.grpc_addr).await;
    a.send(post_headers("/v1/completions")).await;
    a.send(request_body(vec![b' '; 60_000], false)).await;
    let admin = fleet.admin();
    let held = || async { metric(&common::metrics(&admin).await, "kvgate_buffered_request_bytes", &[]).unwrap_or(0.0) };
    assert!(eventually(10, || async { held().await >= 60_000.0 }).await, "the first body is held");
    // ...so another's 60 kB is past the bound: refused at once, and told to come back.
    let mut b = Stream::open(kv.grpc_addr).await;
    b.send(post_headers("/v1/completions")).await;
    b.send(request_body(vec![b' '; 60_000], false)).await;
    match b.recv().await.response {
        Some(Resp::ImmediateResponse(ir)) => {
            let v: serde_json::Value = serde_json::from_slice(&ir.body).expect("JSON body");
            assert_eq!((ir.status.map(|s| s.code), v["error"]["code"].as_str()), (Some(503), Some("overloaded")));
            let hs = ir.headers.expect("headers").set_headers;
            assert!(hs.iter().any(|h| h.header.as_ref().is_some_and(|h| h.key == "retry-after")));
        }
        other => panic!("expected an immediate response, got {other:?}"),
    }
    drop(b);
    // When the first stream goes, its bytes are given back.
    drop(a);
    let room = eventually(10, || async {
        let mut b = Stream::open(kv.grpc_addr).await;
        b.send(post_headers("/v1/completions")).await;
        let body = json!({"model": MODEL, "prompt": "z".repeat(60_000)}).to_string().into_bytes();
        b.send(request_body(body, true)).await;
        destination(&b.recv().await).is_some()
    })
    .await;
    assert!(room, "routed again once the held body was released");
}

/// kvgate's ext_proc server over `n` simulators (all scraped), with `extproc` as its ext_proc
/// section's fields.
async fn picker_over(n: usize, extproc: &str) -> (Vec<common::Sim>, kvgate::tools::serve::Server) {
    let common::Fleet { sims, kv, .. } =
        gateway(MODEL).sims(n).config(&format!("extproc: {{{extproc}}}")).start().await;
    (sims, kv)
}

/// kvgate's own `/metrics`.
async fn admin_metrics(kv: &kvgate::tools::serve::Server) -> String {
    common::metrics(&format!("http://{}", kv.admin_addr)).await
}

/// One endpoint's entry in `/debug/endpoints`.
async fn endpoint_status(kv: &kvgate::tools::serve::Server, addr: &str) -> serde_json::Value {
    let v = get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await;
    let found = v["pools"][0]["endpoints"].as_array().and_then(|e| e.iter().find(|x| x["address"] == addr).cloned());
    found.unwrap_or_else(|| panic!("{addr} is listed: {v}"))
}

/// Sends a request's headers and `body` in chunks of 60,000 bytes (the last marked), and reads
/// the headers answer and the body sent back; returns the destination.
async fn route_streamed(s: &mut Stream, body: &[u8]) -> String {
    s.send(post_headers("/v1/chat/completions")).await;
    for chunk in request_body_chunks(body, 60_000) {
        s.send(chunk).await;
    }
    let first = s.recv().await;
    let dest = destination(&first).unwrap_or_else(|| panic!("routed, got {first:?}"));
    let mut echoed = 0;
    loop {
        let (chunk, eos) = streamed_body(&s.recv().await).expect("a body chunk");
        echoed += chunk.len();
        if eos {
            break;
        }
    }
    assert_eq!(echoed, body.len(), "the body comes back whole");
    dest
}

/// Envoy repeats the last body chunk of a large full-duplex body (the same bytes, or none):
/// the request stays routed, the repeat is counted and never parsed, the response goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_end_of_stream_is_ignored() {
    let (_sims, kv) = picker_over(1, "").await;
    let mut cases = 0.0;
    for size in [2_000, 5 << 20] {
        let body = chat(MODEL).user("y".repeat(size)).stream().bytes();
        let last_chunk = body.chunks(60_000).last().expect("a chunk").to_vec();
        for repeat in [last_chunk, Vec::new()] {
            let mut s = Stream::open(kv.grpc_addr).await;
            route_streamed(&mut s, &body).await;
            s.send(request_body(repeat.clone(), true)).await;
            cases += 1.0;
            s.send(sse_response_headers()).await;
            match s.recv().await.response {
                Some(Resp::ResponseHeaders(_)) => {}
                other => panic!(
                    "{size} bytes, repeat of {} bytes: expected the response to go on, got {other:?}",
                    repeat.len()
                ),
            }
        }
    }
    let m = admin_metrics(&kv).await;
    let ignored = [("kind", "request_body_after_end")];
    assert_eq!(metric(&m, "kvgate_extproc_ignored_messages_total", &ignored), Some(cases));
    assert_eq!(metric(&m, "inference_objective_request_error_total", &[]), None, "nothing refused");
}

/// A request is counted in `inference_objective_request_total` when it is routed, before (and
/// whether or not) its response comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_when_routed() {
    let (_sims, kv) = picker_over(1, "").await;
    let mut s = Stream::open(kv.grpc_addr).await;
    route_streamed(&mut s, &chat(MODEL).user("hi").bytes()).await;
    let m = admin_metrics(&kv).await;
    assert_eq!(metric(&m, "inference_objective_request_total", &[("model_name", MODEL)]), Some(1.0));
    assert_eq!(metric(&m, "kvgate_requests_total", &[]), None, "the outcome waits for the response");
    drop(s);
    let m = admin_metrics(&kv).await;
    assert_eq!(metric(&m, "inference_objective_request_total", &[("model_name", MODEL)]), Some(1.0), "counted once");
}

/// The gateway may send the request to an endpoint kvgate did not list (a retry policy of its
/// own): the served endpoint carries the request's in-flight count, learns its prompt and its
/// usage is counted; an address outside the pool is ignored and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_endpoint_outside_the_list_gets_the_request() {
    let (sims, kv) = picker_over(3, "max_endpoints: 1").await;
    let body = chat(MODEL).user("z".repeat(4_000)).stream().bytes();
    let mut s = Stream::open(kv.grpc_addr).await;
    let picked = route_streamed(&mut s, &body).await;
    let other = sims.iter().map(|x| x.addrs[0].to_string()).find(|a| *a != picked).expect("another endpoint");
    assert_eq!(endpoint_status(&kv, &other).await["prefix_blocks"], 0);
    s.send(with_metadata(sse_response_headers(), lb_metadata(&[("x-gateway-destination-endpoint-served", &other)])))
        .await;
    assert!(matches!(s.recv().await.response, Some(Resp::ResponseHeaders(_))));
    assert_eq!(endpoint_status(&kv, &other).await["in_flight_requests"], 1, "the served endpoint holds it");
    assert_eq!(endpoint_status(&kv, &picked).await["in_flight_requests"], 0, "the picked one no longer does");
    assert!(
        endpoint_status(&kv, &other).await["prefix_blocks"].as_u64() > Some(0),
        "the served endpoint learnt the prompt"
    );
    let sse = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":900,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n";
    s.send(response_body(sse.to_vec(), true)).await;
    let _ = s.recv().await;
    assert!(eventually(5, || async { endpoint_status(&kv, &other).await["in_flight_requests"] == 0 }).await);
    let m = admin_metrics(&kv).await;
    assert_eq!(metric(&m, "kvgate_tokens_total", &[("kind", "completion")]), Some(7.0));

    // Not an endpoint of the pool: the count stays where kvgate put it.
    let mut s = Stream::open(kv.grpc_addr).await;
    let picked = route_streamed(&mut s, &body).await;
    for served in ["10.255.0.1:8000", "not an address"] {
        s.send(with_metadata(
            sse_response_headers(),
            lb_metadata(&[("x-gateway-destination-endpoint-served", served)]),
        ))
        .await;
        let _ = s.recv().await;
    }
    assert_eq!(endpoint_status(&kv, &picked).await["in_flight_requests"], 1);
    let m = admin_metrics(&kv).await;
    assert_eq!(metric(&m, "kvgate_served_unknown_total", &[("pool", "p")]), Some(2.0));
}

/// The response header value the picker set, if any.
fn response_header(r: &ProcessingResponse, name: &str) -> Option<String> {
    let Some(Resp::ResponseHeaders(h)) = &r.response else { panic!("expected a response headers answer, got {r:?}") };
    h.response.as_ref()?.header_mutation.as_ref()?.set_headers.iter().find_map(|o| {
        let h = o.header.as_ref()?;
        (h.key == name).then(|| String::from_utf8_lossy(&h.raw_value).into_owned())
    })
}

/// With `conformance_test_filter`, the served endpoint the gateway reported is echoed in
/// `x-conformance-test-served-endpoint` (or which part of the report was missing), as the
/// Inference Extension's conformance suite reads it; without it, nothing is added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_endpoint_is_echoed_for_conformance() {
    const ECHO: &str = "x-conformance-test-served-endpoint";
    let (sims, kv) = picker_over(1, "conformance_test_filter: true").await;
    let addr = sims[0].addrs[0].to_string();
    let served = [("x-gateway-destination-endpoint-served", addr.as_str())];
    let other = [("x-gateway-destination-endpoint", addr.as_str())];
    let cases = [
        (None, "fail: missing envoy lb metadata"),
        (Some(lb_metadata(&other)), "fail: missing destination endpoint served metadata"),
        (Some(lb_metadata(&served)), addr.as_str()),
    ];
    let body = chat(MODEL).user("hi").bytes();
    for (metadata, want) in cases {
        let mut s = Stream::open(kv.grpc_addr).await;
        route_streamed(&mut s, &body).await;
        s.send(ProcessingRequest { metadata_context: metadata, ..sse_response_headers() }).await;
        assert_eq!(response_header(&s.recv().await, ECHO).as_deref(), Some(want));
    }
    let (sims, kv) = picker_over(1, "").await;
    let mut s = Stream::open(kv.grpc_addr).await;
    route_streamed(&mut s, &body).await;
    let served = sims[0].addrs[0].to_string();
    s.send(with_metadata(sse_response_headers(), lb_metadata(&[("x-gateway-destination-endpoint-served", &served)])))
        .await;
    assert_eq!(response_header(&s.recv().await, ECHO), None, "off by default");
}

/// Envoy's destination lists the pool picker's `maxNumOfEndpoints`; `extproc.max_endpoints`,
/// when set, caps it (docs/scheduling.md, "How many endpoints a decision lists").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_picker_sets_the_endpoints_listed_and_extproc_caps_them() {
    // The same simulators; a kvgate over them per case.
    let mut sims = Vec::new();
    for _ in 0..4 {
        sims.push(common::start_sim(&["--time-scale", "0"]).await);
    }
    let addrs: Vec<String> = sims.iter().map(|s| s.addrs[0].to_string()).collect();
    let config = |extproc: &str, picker: &str| {
        let scheduler = format!("scheduler: {{plugins: [{{type: queue-scorer}}, {{type: max-score-picker{picker}}}]}}");
        gateway(MODEL).sims(4).config(extproc).pool(&scheduler).yaml(&addrs)
    };
    let three = ", parameters: {maxNumOfEndpoints: 3}";
    for (extproc, picker, want) in [
        ("", "", 1),
        ("", three, 3),
        ("extproc: {max_endpoints: 2}", three, 2),
        ("extproc: {max_endpoints: 4}", three, 3),
        ("extproc: {max_endpoints: 2}", "", 2),
    ] {
        let kv = common::start_kvgate(&config(extproc, picker)).await;
        common::wait_scraped(&kv, 4).await;
        let (_s, r) = decide(kv.grpc_addr, &chat(MODEL).user("Hello.").json(), &[]).await;
        let list = destination(&r).unwrap_or_else(|| panic!("routed, got {r:?}"));
        assert_eq!(list.split(',').count(), want, "`{extproc}` `{picker}`: {list}");
    }
}
