//! The proxy's connections are bounded: a client that sends its headers too slowly, or keeps a
//! connection idle too long, is closed; past the connection cap, new connections are closed at
//! once — and the listener keeps serving everyone else.

mod common;

use std::time::Duration;

use common::{client, gateway, start_sim};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MODEL: &str = "m";

/// Reads until the server closes the connection (returns what it sent), or `None` if it was
/// still open after `secs`.
async fn closed_within(conn: &mut TcpStream, secs: u64) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), read).await.ok().map(|()| got)
}

/// kvgate's proxy over one endpoint, with `connections` as its connection bounds.
async fn start(endpoint: std::net::SocketAddr, connections: &str) -> kvgate::tools::serve::Server {
    let connections = format!("connections: {connections}");
    let common::Fleet { kv, .. } = gateway(MODEL).address(endpoint).proxy().config(&connections).start().await;
    kv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_surplus_connections_are_closed() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", MODEL]).await;
    let kv = start(sim.addrs[0], "{header_read_timeout_ms: 300}").await;
    let proxy = kv.proxy_addr.expect("proxy");

    // Slowloris: half a request's headers, then silence.
    let mut slow = TcpStream::connect(proxy).await.expect("connect");
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: kvgate\r\nContent-Type: applic").await.expect("write");
    assert!(closed_within(&mut slow, 10).await.is_some(), "a connection stuck in its headers is closed");

    // A kept-alive connection left idle after its answer is closed too.
    let mut idle = TcpStream::connect(proxy).await.expect("connect");
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nHost: kvgate\r\n\r\n").await.expect("write");
    let answer = closed_within(&mut idle, 10).await.expect("closed once idle");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));

    // Three connections fill a listener capped at three (with time enough to hold them); a
    // fourth is closed at once, without an answer.
    let kv = start(sim.addrs[0], "{max_connections: 3}").await;
    let proxy = kv.proxy_addr.expect("proxy");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(proxy).await.expect("connect"));
    }
    let mut surplus = TcpStream::connect(proxy).await.expect("the kernel accepts it");
    surplus.write_all(b"GET /v1/models HTTP/1.1\r\nHost: kvgate\r\n\r\n").await.ok();
    let got = closed_within(&mut surplus, 10).await.expect("closed");
    assert!(got.is_empty(), "the surplus connection got an answer: {}", String::from_utf8_lossy(&got));
    // Once they go, the listener serves again.
    drop(held);
    let ok = common::eventually(10, || async {
        client().get(format!("http://{proxy}/v1/models")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ok, "served again after the held connections closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_at_once_are_bounded() {
    // One client may hold the whole budget here (its share is tests/bodies.rs's subject).
    let config = "max_buffered_bytes: 1000000\nconnections: {max_body_share_percent: 100}";
    let fleet = gateway(MODEL).sims(1).proxy().config(config).start().await;
    let kv = &fleet.kv;
    let proxy = kv.proxy_addr.expect("proxy");
    // A slow uploader: 800 kB of a 900 kB body, then a pause.
    let body = format!("{{\"model\":\"{MODEL}\",\"max_tokens\":1,\"prompt\":\"{}\"}}", "x".repeat(900_000));
    let mut slow = TcpStream::connect(proxy).await.expect("connect");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: kvgate\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.expect("head");
    slow.write_all(&body.as_bytes()[..800_000]).await.expect("most of the body");
    let admin = format!("http://{}", kv.admin_addr);
    let held = || async {
        common::metric(&common::metrics(&admin).await, "kvgate_buffered_request_bytes", &[]).unwrap_or(0.0)
    };
    assert!(common::eventually(10, || async { held().await >= 800_000.0 }).await, "the slow body is held");
    // Another 300 kB request would take more than the bound: refused, told to come back.
    let other = serde_json::json!({"model": MODEL, "max_tokens": 1, "prompt": "y".repeat(300_000)});
    let refused = common::eventually(10, || async {
        let r = client().post(format!("http://{proxy}/v1/completions")).json(&other).send().await;
        r.is_ok_and(|r| r.status() == 503 && r.headers().get("retry-after").is_some())
    })
    .await;
    assert!(refused, "a body past the bound is refused with 503 and Retry-After");
    let r = client().post(format!("http://{proxy}/v1/completions")).json(&other).send().await.expect("send");
    let v: serde_json::Value = r.json().await.expect("an OpenAI body");
    assert_eq!(v["error"]["code"], "overloaded");
    // The uploader finishes and its request reaches the endpoint (which finds the prompt too
    // long for its context, and says so); then there is room again.
    slow.write_all(&body.as_bytes()[800_000..]).await.expect("rest of the body");
    let answer = String::from_utf8_lossy(&closed_within_or_answered(&mut slow).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 ") && answer.contains("x-inference-pod"), "{answer}");
    let r = client().post(format!("http://{proxy}/v1/completions")).json(&other).send().await.expect("send");
    assert!(r.headers().contains_key("x-inference-pod"), "forwarded once there is room: {}", r.status());
}

/// Reads a response's first bytes (its status line and headers) from `conn`.
async fn closed_within_or_answered(conn: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_breaks_before_its_answer_is_resent_on_a_new_one() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", MODEL, "--timeout-keep-alive", "0.3"]).await;
    // The simulator closes an idle kept-alive connection after its keep-alive timeout, as vLLM.
    let mut idle = TcpStream::connect(sim.addrs[0]).await.expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: sim\r\n\r\n").await.expect("write");
    let answer = closed_within(&mut idle, 10).await.expect("closed once idle");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));

    let kv = start(sim.addrs[0], "{}").await;
    let url = format!("http://{}/v1/completions", kv.proxy_addr.expect("proxy"));
    let body = serde_json::json!({"model": MODEL, "prompt": "hello", "max_tokens": 2});
    // Connections the endpoint closed while idle are not reused.
    assert_eq!(common::post(&url, &body).await.0, 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(common::post(&url, &body).await.0, 200);
    let admin = format!("{}/admin/faults", sim.url(0));
    let faults = |n: u32| {
        let f = serde_json::json!({"fail_next": n, "failure_types": ["reset"]});
        let admin = admin.clone();
        async move {
            let r = client().post(admin).body(f.to_string()).send().await.expect("send");
            assert_eq!(r.status(), 200);
        }
    };
    // The endpoint closes the connection as the request arrives, answering nothing: the
    // request goes again on a new connection, and the endpoint is none the worse for it.
    faults(1).await;
    let (status, v) = common::post(&url, &body).await;
    assert_eq!(status, 200, "{v}");
    let debug = common::get_json(&format!("http://{}/debug/endpoints", kv.admin_addr)).await;
    assert_eq!(debug["pools"][0]["endpoints"][0]["health"], "healthy", "{debug}");
    // Twice in a row is the endpoint's doing: with no other endpoint to try, a 502.
    faults(2).await;
    let (status, v) = common::post(&url, &body).await;
    assert_eq!((status, v["error"]["code"].as_str()), (502, Some("upstream_unreachable")), "{v}");
}

/// The status and JSON body of a raw answer.
fn answer_of(raw: &[u8]) -> (u16, serde_json::Value) {
    let text = String::from_utf8_lossy(raw);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_stalled_and_endless_bodies_are_answered_408() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", MODEL]).await;
    let kv = start(sim.addrs[0], "{body_read_timeout_ms: 300, min_body_bytes_per_s: 1000}").await;
    let proxy = kv.proxy_addr.expect("proxy");
    let head = |len: &str| {
        format!("POST /v1/completions HTTP/1.1\r\nHost: kvgate\r\nContent-Type: application/json\r\n{len}\r\n\r\n")
    };
    // A body that stops half-way.
    let mut stalled = TcpStream::connect(proxy).await.expect("connect");
    stalled.write_all(head("Content-Length: 100").as_bytes()).await.expect("head");
    stalled.write_all(b"{\"model\": \"m\", \"prompt\": \"").await.expect("half a body");
    // A chunk announced as 2^63 bytes long, of which a few arrive.
    let mut endless = TcpStream::connect(proxy).await.expect("connect");
    endless.write_all(head("Transfer-Encoding: chunked").as_bytes()).await.expect("head");
    endless.write_all(b"8000000000000000\r\nabc").await.expect("a chunk's start");
    for (what, conn) in [("stalled", &mut stalled), ("endless", &mut endless)] {
        let raw = closed_within(conn, 10).await.unwrap_or_else(|| panic!("{what}: still open"));
        let (status, v) = answer_of(&raw);
        assert_eq!((status, v["error"]["code"].as_str()), (408, Some("request_timeout")), "{what}: {v}");
    }
    // A trickle: a byte every 100 ms keeps clear of the stall timeout, but 10 bytes/s is under
    // the least rate, so it is cut once the 5 s grace is over.
    let mut trickle = TcpStream::connect(proxy).await.expect("connect");
    trickle.write_all(head("Content-Length: 10000").as_bytes()).await.expect("head");
    let feed = async {
        for _ in 0..150 {
            if trickle.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(7), feed).await;
    let raw = closed_within(&mut trickle, 10).await.expect("closed");
    let (status, v) = answer_of(&raw);
    assert_eq!((status, v["error"]["code"].as_str()), (408, Some("request_timeout")), "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("too slowly")), "{v}");
    // Nobody else was held up.
    assert_eq!(
        common::post(
            &format!("http://{proxy}/v1/completions"),
            &serde_json::json!({"model": MODEL, "prompt": "hi", "max_tokens": 1})
        )
        .await
        .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_http_get_openai_errors() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", MODEL]).await;
    let kv = start(sim.addrs[0], "{}").await;
    let many: String = (0..120).map(|i| format!("X-{i}: y\r\n")).collect();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "invalid_http"),
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(),
            400,
            "invalid_http",
        ),
        (b"POST /v1/completions HTTP/1.1\r\nHo st: x\r\n\r\n".to_vec(), 400, "invalid_http"),
        (format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\n{many}\r\n").into_bytes(), 431, "headers_too_large"),
        (
            format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "a".repeat(500_000)).into_bytes(),
            431,
            "headers_too_large",
        ),
    ];
    // The admin API's own unknown paths and wrong methods too.
    let admin = format!("http://{}", kv.admin_addr);
    let r = client().get(format!("{admin}/nope")).send().await.expect("send");
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<serde_json::Value>().await.expect("JSON")["error"]["code"], "not_found");
    let r = client().post(format!("{admin}/metrics")).send().await.expect("send");
    assert_eq!(r.status(), 405);
    assert_eq!(r.json::<serde_json::Value>().await.expect("JSON")["error"]["code"], "method_not_allowed");
    for addr in [kv.proxy_addr.expect("proxy"), kv.admin_addr] {
        for (raw, want, code) in &cases {
            let mut conn = TcpStream::connect(addr).await.expect("connect");
            let _ = conn.write_all(raw).await;
            let got = closed_within(&mut conn, 10).await.unwrap_or_else(|| {
                panic!("{addr}: `{}…` answered and closed", String::from_utf8_lossy(&raw[..raw.len().min(40)]))
            });
            let (status, v) = answer_of(&got);
            assert_eq!(
                (status, v["error"]["code"].as_str()),
                (*want, Some(*code)),
                "{}",
                String::from_utf8_lossy(&got)
            );
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
}
