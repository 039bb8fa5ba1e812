//! Protocol edges a client can push on, each answered cleanly: HEAD on kvgate's own answers, a
//! declared body over the limit refused before any of it is read (no `100 Continue`), a transfer
//! coding kvgate does not decode, the admin explain's limit answered as JSON, and the gateway
//! protocol's own headers kept from the model server behind Envoy.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::extproc_msg::{request_body, request_headers};
use common::{chat, client, extproc_first_answer, gateway};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;

const MODEL: &str = "m";

/// Sends `head` (a request's head, nothing more) on a new connection and returns what comes back
/// within two seconds.
async fn raw(addr: SocketAddr, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connects");
    s.write_all(head.as_bytes()).await.expect("sends");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_edges_are_answered_cleanly() {
    let fleet = gateway(MODEL).sims(1).proxy().config("max_body_bytes: 4096").start().await;
    let proxy = fleet.proxy();
    let addr = fleet.kv.proxy_addr.expect("a proxy");

    // HEAD on kvgate's own answers: the GET's status and headers, no body.
    for path in ["/v1/models", "/health"] {
        let r = client().head(format!("{proxy}{path}")).send().await.expect("HEAD answered");
        assert_eq!(r.status().as_u16(), 200, "HEAD {path}");
        assert!(r.bytes().await.expect("a body").is_empty(), "HEAD {path} has no body");
    }
    let r = client().post(format!("{proxy}/v1/models")).send().await.expect("answered");
    assert_eq!((r.status().as_u16(), r.headers()["allow"].to_str().ok()), (405, Some("GET, HEAD")));

    // A declared length over the limit: 413 at once, and never `100 Continue`.
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                content-length: 1073741824\r\nexpect: 100-continue\r\n\r\n";
    let answer = raw(addr, head).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(answer.contains("request_too_large"), "{answer}");

    // A transfer coding kvgate does not decode: 501, not a body read as chunked.
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                transfer-encoding: gzip, chunked\r\n\r\n";
    let answer = raw(addr, head).await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert!(answer.contains("not_implemented"), "{answer}");

    // The admin explain reads a body as the proxy does: over the limit is a JSON 413.
    let big = chat(MODEL).user("x".repeat(8000)).json();
    let r = client()
        .post(format!("{}/debug/explain?path=/v1/chat/completions", fleet.admin()))
        .json(&big)
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status().as_u16(), 413);
    let v: serde_json::Value = r.json().await.expect("a JSON body");
    assert_eq!(v["error"]["code"], "request_too_large");

    // Behind Envoy, what a client sent under the gateway protocol's names is removed before the
    // request goes to the model server.
    let headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("x-gateway-destination-endpoint-served", "10.0.0.1:8000"),
        ("test-epp-endpoint-selection", "10.0.0.1:8000"),
        ("proxy-authorization", "Basic c2VjcmV0"),
    ];
    let messages = vec![request_headers(&headers, false), request_body(chat(MODEL).user("hi").bytes(), true)];
    let first = extproc_first_answer(fleet.kv.grpc_addr, messages).await;
    let Some(Resp::RequestHeaders(h)) = first.response else { panic!("a headers answer, got {first:?}") };
    let removed = h.response.and_then(|c| c.header_mutation).map(|m| m.remove_headers).unwrap_or_default();
    for name in ["x-gateway-destination-endpoint-served", "test-epp-endpoint-selection", "proxy-authorization"] {
        assert!(removed.iter().any(|r| r == name), "{name} is removed: {removed:?}");
    }
}
