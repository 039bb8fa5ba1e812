//! Flow control through the front-ends other than the proxy: raw ext_proc streams on loopback
//! (held while they wait, served by band, leaving the queue when their other end goes), a real
//! Envoy in front of kvgate's picker (sheddable requests refused at once, the others waiting),
//! and kvgate's own picker API (a `Pick` waits for a reported end, or up to its deadline).
//!
//! One simulator in real time and `max_requests_per_endpoint: 1`: one request in flight (the
//! *blocker*) saturates the pool, and whatever comes next waits until it ends.
#![allow(clippy::disallowed_methods, reason = "the test's own tasks (Envoy starts, its requests) end with its runtime")]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::envoy::Envoy;
use common::extproc_msg::{request_body, request_headers, response_body, sse_response_headers};
use common::{Fleet, chat, client, eventually, gateway, get_json, metric, start_kvgate, start_sim};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    ImmediateResponse, ProcessingRequest, ProcessingResponse, body_mutation::Mutation,
};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kvgate::front::picker::pb::{self, picker_client::PickerClient};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
/// `premium` goes first, `batch` is sheddable.
const OBJECTIVES: &str = "objectives: [{name: premium, priority: 10}, {name: batch, priority: -1}]";
const OBJECTIVE: &str = "x-llm-d-inference-objective";
const FAIRNESS: &str = "x-llm-d-inference-fairness-id";
const DROPPED: &str = "x-llm-d-request-dropped-reason";

/// The pool's `flow_control:` section: on, one request per endpoint, and `more` keys.
fn flow_control(more: &str) -> String {
    format!("flow_control: {{enabled: true, max_requests_per_endpoint: 1{more}}}")
}

/// One simulator in real time behind a pool with flow control and the objectives above.
async fn saturable() -> Fleet {
    let pool = format!("{}\n{OBJECTIVES}", flow_control(""));
    gateway(MODEL).sim(&["--time-scale", "1"]).pool(&pool).start().await
}

/// `(priority, requests)` of each band of pool `p` with requests waiting, highest first.
async fn bands(admin: &str) -> Vec<(i64, u64)> {
    queue(admin).await["bands"]
        .as_array()
        .expect("bands")
        .iter()
        .map(|b| (b["priority"].as_i64().expect("priority"), b["requests"].as_u64().expect("requests")))
        .collect()
}

/// Pool `p`'s `flow_control` in `/debug/endpoints`.
async fn queue(admin: &str) -> Value {
    get_json(&format!("{admin}/debug/endpoints")).await["pools"][0]["flow_control"].clone()
}

/// Waits (10 s at most) until pool `p`'s bands are `want`.
async fn wait_bands(admin: &str, want: &[(i64, u64)]) {
    let ok = eventually(10, || async { bands(admin).await == want }).await;
    assert!(ok, "bands {want:?} expected: {}", queue(admin).await);
}

/// Requests of `priority` let go from the queue after waiting, in kvgate's metrics text `m`:
/// those dispatched, less those let through at once (the histogram's `le="0"` bucket).
fn dispatched(m: &str, priority: &str) -> Option<f64> {
    let name = "inference_extension_flow_control_request_queue_duration_seconds";
    let labels = [("pool", "p"), ("priority", priority), ("outcome", "dispatched")];
    let all = metric(m, &format!("{name}_count"), &labels)?;
    let at_once = metric(m, &format!("{name}_bucket"), &[labels[0], labels[1], labels[2], ("le", "0")]).unwrap_or(0.0);
    Some(all - at_once).filter(|n| *n > 0.0)
}

/// kvgate's in-flight requests on each endpoint of pool `p`.
async fn in_flight(admin: &str) -> Vec<u64> {
    let v = get_json(&format!("{admin}/debug/endpoints")).await;
    let endpoints = v["pools"][0]["endpoints"].as_array().cloned().unwrap_or_default();
    endpoints.iter().map(|e| e["in_flight_requests"].as_u64().expect("a count")).collect()
}

/// One ext_proc stream, as Envoy drives it (full duplex, the picker's default).
struct Stream {
    tx: mpsc::Sender<ProcessingRequest>,
    rx: tonic::Streaming<ProcessingResponse>,
    /// The longer wait kvgate asked Envoy for while the request was queued, in seconds.
    extended: Option<i64>,
}

impl Stream {
    async fn open(addr: SocketAddr) -> Self {
        let mut client = ExternalProcessorClient::connect(format!("http://{addr}")).await.expect("gRPC connects");
        let (tx, rx) = mpsc::channel(64);
        let answers = client.process(ReceiverStream::new(rx)).await.expect("a stream").into_inner();
        Self { tx, rx: answers, extended: None }
    }

    async fn send(&self, m: ProcessingRequest) {
        self.tx.send(m).await.expect("send");
    }

    /// Sends a chat request of `body` with `headers` besides the method and path.
    async fn ask_with(&self, headers: &[(&str, &str)], body: Vec<u8>) {
        let mut all =
            vec![(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json")];
        all.extend_from_slice(headers);
        self.send(request_headers(&all, false)).await;
        self.send(request_body(body, true)).await;
    }

    /// Sends a short chat request with `headers`.
    async fn ask(&self, headers: &[(&str, &str)]) {
        self.ask_with(headers, chat(MODEL).user("hi").bytes()).await;
    }

    /// The next answer (within 10 s); a request to wait longer (`override_message_timeout`
    /// alone) is noted, not an answer.
    async fn recv(&mut self) -> ProcessingResponse {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
                .await
                .expect("an answer in time")
                .expect("no stream error")
                .expect("a message");
            if !self.extension(&m) {
                return m;
            }
        }
    }

    /// Notes a request to wait longer; whether `m` is one.
    fn extension(&mut self, m: &ProcessingResponse) -> bool {
        match (&m.response, &m.override_message_timeout) {
            (None, Some(d)) => {
                self.extended = Some(d.seconds);
                true
            }
            _ => false,
        }
    }

    /// Whether no answer comes for `wait` (the stream is held).
    async fn silent(&mut self, wait: Duration) -> bool {
        let until = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(until, self.rx.message()).await {
                Err(_) => return true,
                Ok(Ok(Some(m))) if self.extension(&m) => {}
                Ok(_) => return false,
            }
        }
    }

    /// The headers answer of a routed request: its destination and the headers it removes (the
    /// echoed body chunks that follow are read too).
    async fn routed(&mut self) -> (String, Vec<String>) {
        let first = self.recv().await;
        let Some(Resp::RequestHeaders(h)) = &first.response else { panic!("a headers answer first: {first:?}") };
        let mutation = h.response.as_ref().and_then(|c| c.header_mutation.clone()).expect("a header mutation");
        let dest = mutation
            .set_headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == "x-gateway-destination-endpoint")
            .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned())
            .expect("a destination");
        loop {
            let Some(Resp::RequestBody(b)) = self.recv().await.response else { panic!("the body echoed") };
            let mutation = b.response.and_then(|c| c.body_mutation).and_then(|m| m.mutation);
            if let Some(Mutation::StreamedResponse(s)) = mutation
                && s.end_of_stream
            {
                break;
            }
        }
        (dest, mutation.remove_headers)
    }

    /// The response phase of a routed request, to its end: its in-flight count is released.
    async fn respond(&mut self) {
        self.send(sse_response_headers()).await;
        assert!(matches!(self.recv().await.response, Some(Resp::ResponseHeaders(_))));
        self.send(response_body(&b"data: [DONE]\n\n"[..], true)).await;
        assert!(matches!(self.recv().await.response, Some(Resp::ResponseBody(_))));
    }

    /// kvgate's own answer (a refusal).
    async fn immediate(&mut self) -> ImmediateResponse {
        match self.recv().await.response {
            Some(Resp::ImmediateResponse(ir)) => ir,
            other => panic!("an immediate response expected, got {other:?}"),
        }
    }
}

/// The value of header `name` an immediate response sets.
fn immediate_header(ir: &ImmediateResponse, name: &str) -> Option<String> {
    ir.headers.as_ref()?.set_headers.iter().filter_map(|h| h.header.as_ref()).find(|h| h.key == name).map(|h| {
        if h.raw_value.is_empty() { h.value.clone() } else { String::from_utf8_lossy(&h.raw_value).into_owned() }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_streams_are_held_and_served_by_band() {
    let fleet = saturable().await;
    let (grpc, admin, sim) = (fleet.kv.grpc_addr, fleet.admin(), fleet.addr(0));
    let mut blocker = Stream::open(grpc).await;
    blocker.ask(&[]).await;
    assert_eq!(blocker.routed().await.0, sim);
    // The endpoint is saturated: a priority-0 stream (its flow under the legacy header name) and
    // then a priority-10 one wait, each in its band and flow.
    let mut low = Stream::open(grpc).await;
    low.ask(&[("x-gateway-inference-fairness-id", "tenant-a")]).await;
    wait_bands(&admin, &[(0, 1)]).await;
    let mut high = Stream::open(grpc).await;
    high.ask(&[(OBJECTIVE, "premium"), (FAIRNESS, "tenant-b")]).await;
    wait_bands(&admin, &[(10, 1), (0, 1)]).await;
    let q = queue(&admin).await;
    assert_eq!(
        (&q["bands"][0]["flows"]["tenant-b"], &q["bands"][1]["flows"]["tenant-a"]),
        (&json!(1), &json!(1)),
        "{q}"
    );
    assert!(low.silent(Duration::from_millis(300)).await && high.silent(Duration::from_millis(300)).await);
    // Each asked Envoy to wait for it as long as the TTL (60 s), and a second more.
    assert_eq!((low.extended, high.extended), (Some(61), Some(61)));

    // The blocker ends: the higher band goes first, and holds the endpoint in turn.
    blocker.respond().await;
    let (dest, removed) = high.routed().await;
    assert_eq!(dest, sim);
    for h in [OBJECTIVE, FAIRNESS, "x-gateway-inference-objective", "x-gateway-inference-fairness-id"] {
        assert!(removed.iter().any(|r| r == h), "{h} is not for the endpoint: {removed:?}");
    }
    assert!(low.silent(Duration::from_millis(500)).await, "the priority-0 stream waits while priority 10 is in flight");
    assert_eq!(bands(&admin).await, [(0, 1)]);
    high.respond().await;
    assert_eq!(low.routed().await.0, sim);
    assert!(bands(&admin).await.is_empty());
    low.respond().await;
    assert!(eventually(5, || async { in_flight(&admin).await == [0] }).await, "{:?}", in_flight(&admin).await);
    let m = common::metrics(&admin).await;
    let size = |p: &str, f: &str| {
        metric(&m, "inference_extension_flow_control_queue_size", &[("priority", p), ("fairness_id", f)])
    };
    assert_eq!((size("10", "tenant-b"), size("0", "tenant-a")), (Some(0.0), Some(0.0)), "{m}");
    assert_eq!((dispatched(&m, "10"), dispatched(&m, "0")), (Some(1.0), Some(1.0)), "{m}");
}

/// Through ext_proc as through the proxy: flows of one band take turns, a full band refuses, and
/// a wait ends at the TTL while the endpoint is still busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_proc_flows_take_turns_within_the_bounds_and_the_ttl() {
    let pool = flow_control(", max_requests_per_band: 3, ttl_ms: 3000");
    let fleet = gateway(MODEL).sim(&["--time-scale", "1"]).pool(&pool).start().await;
    let (grpc, admin) = (fleet.kv.grpc_addr, fleet.admin());
    let mut blocker = Stream::open(grpc).await;
    blocker.ask(&[]).await;
    blocker.routed().await;
    // Two of flow `big`, then one of `small`: the band is full at three.
    let mut waiting = Vec::new();
    for (i, flow) in ["big", "big", "small"].into_iter().enumerate() {
        let s = Stream::open(grpc).await;
        s.ask(&[(FAIRNESS, flow)]).await;
        wait_bands(&admin, &[(0, i as u64 + 1)]).await;
        waiting.push(s);
    }
    let mut refused = Stream::open(grpc).await;
    refused.ask(&[(FAIRNESS, "small")]).await;
    let ir = refused.immediate().await;
    assert_eq!(ir.status.map(|s| s.code), Some(429));
    assert_eq!(immediate_header(&ir, DROPPED).as_deref(), Some("rejected-saturated"));
    // In turn: `big`'s first, then `small`, then `big`'s second.
    blocker.respond().await;
    waiting[0].routed().await;
    assert!(waiting[2].silent(Duration::from_millis(200)).await);
    waiting[0].respond().await;
    waiting[2].routed().await;
    assert!(waiting[1].silent(Duration::from_millis(200)).await, "`big`'s second waits for its turn");
    // `big`'s second waits past its TTL while `small` holds the endpoint.
    let ir = waiting[1].immediate().await;
    assert_eq!(ir.status.map(|s| s.code), Some(429));
    assert_eq!(immediate_header(&ir, DROPPED).as_deref(), Some("rejected-ttl-expired"));
    waiting[2].respond().await;
    assert!(bands(&admin).await.is_empty());
    assert!(eventually(5, || async { in_flight(&admin).await == [0] }).await, "{:?}", in_flight(&admin).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ext_proc_stream_whose_client_goes_leaves_the_queue() {
    let fleet = saturable().await;
    let (grpc, admin) = (fleet.kv.grpc_addr, fleet.admin());
    let buffered = || async { metric(&common::metrics(&admin).await, "kvgate_buffered_request_bytes", &[]) };
    let mut blocker = Stream::open(grpc).await;
    blocker.ask(&[]).await;
    blocker.routed().await;
    // A waiting request holds its body in kvgate.
    let mut gone = Stream::open(grpc).await;
    gone.ask_with(&[(FAIRNESS, "leaving")], chat(MODEL).user("x".repeat(50_000)).bytes()).await;
    wait_bands(&admin, &[(0, 1)]).await;
    assert!(buffered().await.is_some_and(|b| b > 50_000.0), "the waiting body is held");
    assert!(gone.silent(Duration::from_millis(200)).await);
    drop(gone);
    wait_bands(&admin, &[]).await;
    assert!(eventually(5, || async { buffered().await == Some(0.0) }).await, "released: {:?}", buffered().await);
    // The blocker ends, and nobody is let go in the place of the one that left.
    blocker.respond().await;
    assert!(eventually(5, || async { in_flight(&admin).await == [0] }).await, "{:?}", in_flight(&admin).await);
    let m = common::metrics(&admin).await;
    assert_eq!(dispatched(&m, "0"), None, "a departed waiter is never let go: {m}");
    // And the next request is let through at once.
    let mut next = Stream::open(grpc).await;
    next.ask(&[]).await;
    assert_eq!(next.routed().await.0, fleet.addr(0));
    assert_eq!(in_flight(&admin).await, [1]);
}

/// A pool `p` of endpoints from `file`, with `flow` as its `flow_control:` keys.
async fn file_pool(file: &std::path::Path, flow: &str) -> kvgate::tools::serve::Server {
    start_kvgate(&format!(
        "admin_addr: 127.0.0.1:0\npools:\n  - name: p\n    models: ['{MODEL}']\n    endpoints_file: '{}'\n    {}\n",
        file.display(),
        flow_control(flow)
    ))
    .await
}

/// A folder of its own for test `name`, empty.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kvgate-flow-gateways-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_pool_holds_ext_proc_streams_to_their_ttl_or_its_first_endpoint() {
    let dir = scratch("empty");
    let file = dir.join("endpoints.yaml");
    std::fs::write(&file, "endpoints: []\n").expect("an endpoints file");

    // Nobody comes within the TTL: 503, dropped as expired.
    let kv = file_pool(&file, ", ttl_ms: 500").await;
    let mut s = Stream::open(kv.grpc_addr).await;
    let asked = Instant::now();
    s.ask(&[]).await;
    let ir = s.immediate().await;
    let waited = asked.elapsed();
    assert_eq!(ir.status.map(|s| s.code), Some(503), "{ir:?}");
    assert_eq!(immediate_header(&ir, DROPPED).as_deref(), Some("rejected-ttl-expired"), "{ir:?}");
    let v: Value = serde_json::from_slice(&ir.body).expect("an OpenAI body");
    assert_eq!(v["error"]["code"], "no_endpoints", "{v}");
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(5), "waited {waited:?}");
    wait_bands(&format!("http://{}", kv.admin_addr), &[]).await;
    drop(kv);

    // Scale from zero: the endpoint written into the file takes the held request.
    let sim = start_sim(&["--time-scale", "1", "--served-model-name", MODEL]).await;
    let kv = file_pool(&file, ", ttl_ms: 10000").await;
    let admin = format!("http://{}", kv.admin_addr);
    let mut s = Stream::open(kv.grpc_addr).await;
    s.ask(&[]).await;
    wait_bands(&admin, &[(0, 1)]).await;
    assert!(s.silent(Duration::from_millis(200)).await);
    std::fs::write(&file, format!("endpoints: [{{address: '{}'}}]\n", sim.addrs[0])).expect("an endpoint");
    assert_eq!(s.routed().await.0, sim.addrs[0].to_string(), "the first endpoint takes the held request");
    assert!(bands(&admin).await.is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

/// Sends `body` through Envoy at `url` with `headers`; its status, headers and body, and when it
/// was answered.
async fn through(
    url: String,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, reqwest::header::HeaderMap, Value, Instant) {
    let mut req = client().post(url).header("content-type", "application/json").body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("an answer");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let v = r.json().await.unwrap_or(Value::Null);
    (status, headers, v, Instant::now())
}

/// Envoy in front of `fleet`'s picker, its deploy config edited by `edit`, and the URL of
/// completions through it.
async fn envoy(fleet: &Fleet, edit: fn(String) -> String) -> (Envoy, String) {
    let grpc = fleet.kv.grpc_addr.port();
    let envoy =
        tokio::task::spawn_blocking(move || Envoy::start("original-dst.yaml", grpc, edit)).await.expect("envoy");
    let url = format!("http://{}/v1/completions", envoy.listener);
    (envoy, url)
}

/// A completion of `tokens` tokens (about 10 ms each at the simulator's real pace).
fn completion(tokens: u64) -> Value {
    json!({"model": MODEL, "prompt": "a story", "max_tokens": tokens})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_sheddable_requests_are_refused_and_others_wait() {
    let fleet = saturable().await;
    let admin = fleet.admin();
    // Envoy's ext_proc message timeout (5 s in the deploy config) bounds a held stream in the
    // buffered body modes (full duplex starts no such timer); 30 s keeps it out of the way
    // should the mode change.
    let (_envoy, url) = envoy(&fleet, |t| {
        assert!(t.contains("message_timeout: 5s"), "the deploy config's message timeout moved");
        t.replace("message_timeout: 5s", "message_timeout: 30s")
    })
    .await;
    let blocker = tokio::spawn(through(url.clone(), &[], completion(300)));
    assert!(eventually(10, || async { in_flight(&admin).await == [1] }).await, "the blocker is in flight");

    let (status, headers, v, _) = through(url.clone(), &[(OBJECTIVE, "batch")], completion(1)).await;
    assert_eq!((status, v["error"]["code"].as_str()), (429, Some("shed")), "{v}");
    assert_eq!(headers.get(DROPPED).and_then(|h| h.to_str().ok()), Some("rejected-saturated"));
    assert!(!blocker.is_finished(), "refused at once, while the blocker is in flight");

    let waiting = tokio::spawn(through(url.clone(), &[(FAIRNESS, "tenant-a")], completion(1)));
    wait_bands(&admin, &[(0, 1)]).await;
    assert!(!waiting.is_finished() && !blocker.is_finished());
    let (status, _, v, blocker_done) = blocker.await.expect("the blocker");
    assert_eq!(status, 200, "{v}");
    let (status, headers, v, waiter_done) = waiting.await.expect("the waiting request");
    assert_eq!(status, 200, "{v}");
    assert!(headers.get(DROPPED).is_none());
    assert!(waiter_done >= blocker_done, "the waiting request is answered after the blocker");
    assert!(bands(&admin).await.is_empty());
}

/// Envoy in a buffered body mode with a 1 s message timeout: (`buffered`) the config as given.
fn buffered(t: &str) -> String {
    t.replace("message_timeout: 5s", "message_timeout: 1s")
        .replace("request_body_mode: FULL_DUPLEX_STREAMED", "request_body_mode: BUFFERED")
        .replace("request_trailer_mode: SEND", "request_trailer_mode: SKIP")
}

/// A queued request asks Envoy to wait longer than its message timeout (up to the filter's
/// `max_message_timeout`), and is answered once the endpoint has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_waits_past_its_message_timeout_for_a_queued_request() {
    let fleet = saturable().await;
    let admin = fleet.admin();
    let (_envoy, url) = envoy(&fleet, |t| {
        assert!(t.contains("max_message_timeout: 90s"), "the deploy config lets kvgate ask for more time");
        buffered(&t)
    })
    .await;
    let blocker = tokio::spawn(through(url.clone(), &[], completion(250)));
    assert!(eventually(10, || async { in_flight(&admin).await == [1] }).await, "the blocker is in flight");
    let waiting = tokio::spawn(through(url.clone(), &[], completion(1)));
    wait_bands(&admin, &[(0, 1)]).await;
    let (status, _, v, blocker_done) = blocker.await.expect("the blocker");
    assert_eq!(status, 200, "{v}");
    let (status, _, v, waiter_done) = waiting.await.expect("the waiting request");
    assert_eq!(status, 200, "answered after more than its 1 s message timeout: {v}");
    assert!(waiter_done >= blocker_done);
}

/// Envoy in a buffered body mode, without `max_message_timeout`, gives up on a held stream at
/// its message timeout: its client gets Envoy's 504, and the request leaves kvgate's queue
/// without ever being counted in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_envoy_gives_up_on_leaves_the_queue() {
    let fleet = saturable().await;
    let admin = fleet.admin();
    let (_envoy, url) = envoy(&fleet, |t| {
        let strict: Vec<&str> = t.lines().filter(|l| !l.contains("max_message_timeout")).collect();
        buffered(&strict.join("\n"))
    })
    .await;
    let blocker = tokio::spawn(through(url.clone(), &[], completion(500)));
    assert!(eventually(10, || async { in_flight(&admin).await == [1] }).await, "the blocker is in flight");
    let waiting = tokio::spawn(through(url.clone(), &[], completion(1)));
    wait_bands(&admin, &[(0, 1)]).await;
    let (status, ..) = waiting.await.expect("the waiting request");
    assert_eq!(status, 504, "Envoy's message timeout");
    wait_bands(&admin, &[]).await;
    assert!(!blocker.is_finished(), "left while the blocker is in flight");
    let (status, ..) = blocker.await.expect("the blocker");
    assert_eq!(status, 200);
    assert!(eventually(5, || async { in_flight(&admin).await == [0] }).await, "{:?}", in_flight(&admin).await);
    let m = common::metrics(&admin).await;
    assert_eq!(dispatched(&m, "0"), None, "the request Envoy gave up on is never let go: {m}");
}

async fn picker(kv: &kvgate::tools::serve::Server) -> PickerClient<tonic::transport::Channel> {
    PickerClient::connect(format!("http://{}", kv.grpc_addr)).await.expect("gRPC connects")
}

/// A picker client that sends a call's `grpc-timeout` without keeping it itself (tonic's
/// channel cancels a call at its deadline): what kvgate does at the deadline shows.
fn picker_without_own_deadline(
    kv: &kvgate::tools::serve::Server,
) -> PickerClient<hyper_util::client::legacy::Client<HttpConnector, tonic::body::Body>> {
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    PickerClient::with_origin(http, format!("http://{}", kv.grpc_addr).parse().expect("a URI"))
}

/// A pick with a 1 s deadline.
fn hasty_pick() -> tonic::Request<pb::PickRequest> {
    let mut req = tonic::Request::new(pick_request("", "short"));
    req.set_timeout(Duration::from_secs(1));
    req
}

/// Waits for `pick` (a [`hasty_pick`] while the pool is saturated): it waits in the queue,
/// fails, and has left the queue; returns its status.
async fn until_deadline(
    pick: impl Future<Output = Result<tonic::Response<pb::PickResponse>, tonic::Status>>,
    admin: &str,
) -> tonic::Status {
    let pick = tokio::time::timeout(Duration::from_secs(10), pick);
    let ((), answer) = tokio::join!(wait_bands(admin, &[(0, 1)]), pick);
    let e = answer.expect("answered within 10 s").expect_err("the deadline passes while the pick waits");
    wait_bands(admin, &[]).await;
    e
}

fn pick_request(objective: &str, fairness_id: &str) -> pb::PickRequest {
    pb::PickRequest {
        path: "/v1/chat/completions".into(),
        input: Some(pb::pick_request::Input::Body(chat(MODEL).user("hi").bytes())),
        objective: objective.into(),
        fairness_id: fairness_id.into(),
        ..Default::default()
    }
}

fn decision(r: Result<tonic::Response<pb::PickResponse>, tonic::Status>) -> pb::Decision {
    match r.expect("pick answers").into_inner().result {
        Some(pb::pick_response::Result::Decision(d)) => d,
        other => panic!("a decision expected, got {other:?}"),
    }
}

fn finished(id: &str) -> pb::ReportRequest {
    pb::ReportRequest {
        decision_id: id.into(),
        end: Some(pb::report_request::End::Finished(pb::Finished { status: 200, usage: None, response_bytes: 10 })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pick_waits_for_a_reported_end_or_its_deadline() {
    let fleet = saturable().await;
    let admin = fleet.admin();
    let mut c = picker(&fleet.kv).await;
    let blocker = decision(c.pick(pick_request("", "")).await);
    assert_eq!(in_flight(&admin).await, [1]);

    // A pick with an objective and a flow waits while the blocker's decision is held.
    let mut waiter = c.clone();
    let waiting = waiter.pick(pick_request("premium", "tenant-a"));
    tokio::pin!(waiting);
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut waiting).await.is_err(), "the pick waits");
    wait_bands(&admin, &[(10, 1)]).await;
    assert_eq!(queue(&admin).await["bands"][0]["flows"]["tenant-a"], 1);
    assert!(c.report(finished(&blocker.decision_id)).await.expect("report").into_inner().ended);
    let held = decision(tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("decided in time"));
    assert_eq!(held.endpoints[0].address, fleet.addr(0));

    // Its decision holds the endpoint: a pick with a deadline waits until it passes, then leaves
    // the queue, whether the client gives up at its deadline (tonic's channel cancels the call)
    // or kvgate answers at it.
    let e = until_deadline(c.clone().pick(hasty_pick()), &admin).await;
    let own_deadline = e.code() == tonic::Code::Cancelled && e.message().contains("Timeout expired");
    assert!(e.code() == tonic::Code::DeadlineExceeded || own_deadline, "{e:?}");
    let e = until_deadline(picker_without_own_deadline(&fleet.kv).pick(hasty_pick()), &admin).await;
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "kvgate answers at the call's deadline: {e:?}");
    assert_eq!(in_flight(&admin).await, [1], "the one that left is not in flight");
    assert!(c.report(finished(&held.decision_id)).await.expect("report").into_inner().ended);
    assert_eq!(in_flight(&admin).await, [0]);
}
