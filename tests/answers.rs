//! What kvgate answers itself is the same on every wire: one table of requests (its own
//! answers — model list, model info, health — refused paths and refused requests) goes through
//! the proxy, the Envoy picker (an `ImmediateResponse`) and the picker API (a `Refusal`), and
//! each gets the same status, headers and body from all three.

mod common;

use std::collections::BTreeMap;

use common::extproc_msg::{request_body, request_headers};
use common::{extproc_first_answer, start_kvgate, start_sim, wait_scraped};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use kvgate::front::picker::pb::{self, picker_client::PickerClient};
use serde_json::json;

/// The headers an answer is compared by (the rest belong to one wire's transport).
const COMPARED: [&str; 4] = ["content-type", "retry-after", "allow", "x-llm-d-request-dropped-reason"];

/// One answer as a client sees it.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

fn compared(pairs: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .filter(|(k, _)| COMPARED.contains(&k.as_str()))
        .collect()
}

async fn through_proxy(base: &str, method: &str, path: &str, body: &[u8]) -> Seen {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = common::client().request(method, format!("{base}{path}"));
    if !body.is_empty() {
        req = req.header("content-type", "application/json").body(body.to_vec());
    }
    let resp = req.send().await.expect("the proxy answers");
    let status = resp.status().as_u16();
    let headers = compared(
        resp.headers().iter().map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned())),
    );
    Seen { status, headers, body: resp.text().await.expect("a body") }
}

async fn through_extproc(addr: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> Seen {
    let pairs = [(":method", method), (":path", path), (":authority", "kvgate"), ("content-type", "application/json")];
    let mut messages = vec![request_headers(&pairs, body.is_empty())];
    if !body.is_empty() {
        messages.push(request_body(body, true));
    }
    let first = extproc_first_answer(addr, messages).await;
    let Some(Resp::ImmediateResponse(ir)) = first.response else {
        panic!("{method} {path}: expected an immediate response, got {first:?}");
    };
    let set = ir.headers.map(|h| h.set_headers).unwrap_or_default();
    let headers = compared(set.into_iter().filter_map(|h| h.header).map(|h| {
        let value = if h.raw_value.is_empty() { h.value } else { String::from_utf8_lossy(&h.raw_value).into_owned() };
        (h.key, value)
    }));
    let status = ir.status.map_or(0, |s| u16::try_from(s.code).unwrap_or(0));
    Seen { status, headers, body: String::from_utf8(ir.body).expect("UTF-8 body") }
}

async fn through_picker(addr: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> Seen {
    let mut c = PickerClient::connect(format!("http://{addr}")).await.expect("gRPC connects");
    let input = (!body.is_empty()).then(|| pb::pick_request::Input::Body(body.to_vec()));
    let req = pb::PickRequest { method: method.into(), path: path.into(), input, ..Default::default() };
    let result = c.pick(req).await.expect("pick answers").into_inner().result.expect("a result");
    let pb::pick_response::Result::Refusal(r) = result else {
        panic!("{method} {path}: expected kvgate's own answer, got {result:?}");
    };
    let mut headers = compared(r.headers.clone());
    if !r.body.is_empty() {
        headers.insert("content-type".into(), "application/json".into());
    }
    if !r.dropped_reason.is_empty() {
        headers.insert("x-llm-d-request-dropped-reason".into(), r.dropped_reason.clone());
    }
    // The code a refusal names is the one its body names.
    let code = serde_json::from_str::<serde_json::Value>(&r.body).map(|v| v["error"]["code"].clone()).ok();
    assert_eq!(code.as_ref().and_then(|c| c.as_str()).unwrap_or_default(), r.code, "{method} {path}: {r:?}");
    Seen { status: u16::try_from(r.status).expect("a status"), headers, body: r.body }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wire_gives_the_same_answer() {
    let sim = start_sim(&["--time-scale", "0", "--model", "m"]).await;
    let dir = std::env::temp_dir().join(format!("kvgate-answers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    let empty = dir.join("endpoints.yaml");
    std::fs::write(&empty, "endpoints: []\n").expect("an endpoints file");
    let kv = start_kvgate(&format!(
        "admin_addr: 127.0.0.1:0\nproxy_addr: 127.0.0.1:0\nmax_body_bytes: 4096\npools:\n\
         - {{name: p, models: [m], endpoints: [{{address: '{a}'}}]}}\n\
         - {{name: busy, models: [b], endpoints: [{{address: '{a}'}}], admission: {{max_in_flight: 100, sheddable_headroom: 1.0}}}}\n\
         - {{name: none, models: [e], endpoints_file: '{e}'}}\n",
        a = sim.addrs[0],
        e = empty.display()
    ))
    .await;
    wait_scraped(&kv, 1).await;
    let proxy = format!("http://{}", kv.proxy_addr.expect("a proxy"));
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(10_000)}]}).to_string();
    let cases: Vec<(&str, &str, String, u16)> = vec![
        ("GET", "/v1/models", String::new(), 200),
        ("GET", "/v1/models/m", String::new(), 200),
        ("GET", "/v1/models/nope", String::new(), 404),
        ("GET", "/health", String::new(), 200),
        ("GET", "/nowhere", String::new(), 404),
        ("GET", "/v1/chat/completions", String::new(), 405),
        ("POST", "/v1/chat/completions", "{".into(), 400),
        ("POST", "/v1/chat/completions", json!({"messages": []}).to_string(), 400),
        ("POST", "/v1/chat/completions", chat("gpt-x"), 404),
        ("POST", "/v1/chat/completions", chat("e"), 503),
        ("POST", "/v1/completions", json!({"model": "b", "prompt": "hi", "priority": -1}).to_string(), 429),
        ("POST", "/v1/chat/completions", big, 413),
    ];
    for (method, path, body, status) in &cases {
        let body = body.as_bytes();
        let http = through_proxy(&proxy, method, path, body).await;
        assert_eq!(http.status, *status, "{method} {path} through the proxy: {http:?}");
        let envoy = through_extproc(kv.grpc_addr, method, path, body).await;
        assert_eq!(envoy, http, "{method} {path}: the Envoy picker answers otherwise than the proxy");
        let api = through_picker(kv.grpc_addr, method, path, body).await;
        assert_eq!(api, http, "{method} {path}: the picker API answers otherwise than the proxy");
    }
    std::fs::remove_dir_all(&dir).ok();
}
