//! Every listener's connections are bounded: a client that sends its headers too slowly, or
//! keeps a connection idle too long, is closed whatever it speaks; at the connection cap the
//! oldest idle connection makes room for a new one, and only when none is idle is the new one
//! closed — and the listener keeps serving everyone else.

mod common;

use std::time::Duration;

use common::{client, gateway, start_sim};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MODEL: &str = "m";

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind((std::net::Ipv4Addr::from(from), 0).into()).expect("bind to a loopback address");
    socket.connect(to).await.expect("connect")
}

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

    // Three idle connections fill a listener capped at three (with time enough to hold them):
    // the first, idle since its answer, then two that have sent nothing. A fourth closes the
    // one idle the longest and is served.
    let kv = start(sim.addrs[0], "{max_connections: 3, max_connections_per_client_percent: 100}").await;
    let proxy = kv.proxy_addr.expect("proxy");
    let mut first = TcpStream::connect(proxy).await.expect("connect");
    first.write_all(b"GET /v1/models HTTP/1.1\r\nHost: kvgate\r\n\r\n").await.expect("write");
    assert!(closed_within_or_answered(&mut first).await.starts_with(b"HTTP/1.1 200"), "the first is served");
    let mut held = vec![first];
    for _ in 0..2 {
        held.push(TcpStream::connect(proxy).await.expect("connect"));
    }
    let mut newcomer = TcpStream::connect(proxy).await.expect("connect");
    newcomer.write_all(b"GET /v1/models HTTP/1.1\r\nHost: kvgate\r\n\r\n").await.expect("write");
    let got = closed_within_or_answered(&mut newcomer).await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "the newcomer is served: {}", String::from_utf8_lossy(&got));
    assert!(closed_within(&mut held[0], 10).await.is_some(), "the oldest idle connection was closed");
    assert!(closed_within(&mut held[1], 1).await.is_none(), "the others are kept");
    drop((held, newcomer));

    // Connections with a request in flight (a body on its way) are never closed for a
    // newcomer: with three of them, a fourth is closed at once, without an answer.
    let mut busy = Vec::new();
    for _ in 0..3 {
        let mut conn = TcpStream::connect(proxy).await.expect("connect");
        let head = "POST /v1/completions HTTP/1.1\r\nHost: kvgate\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
        conn.write_all(head.as_bytes()).await.expect("a request and the start of its body");
        busy.push(conn);
    }
    // All three are in flight once the proxy holds their first body bytes.
    let admin = format!("http://{}", kv.admin_addr);
    let in_flight = common::eventually(10, || async {
        common::metric(&common::metrics(&admin).await, "kvgate_buffered_request_bytes", &[]) == Some(3.0)
    })
    .await;
    assert!(in_flight, "three requests in flight");
    let refused = common::eventually(10, || async {
        let Ok(mut surplus) = TcpStream::connect(proxy).await else { return false };
        let _ = surplus.write_all(b"GET /v1/models HTTP/1.1\r\nHost: kvgate\r\n\r\n").await;
        closed_within(&mut surplus, 2).await.is_some_and(|got| got.is_empty())
    })
    .await;
    assert!(refused, "a surplus connection is closed without an answer while none is idle");
    // Once they go, the listener serves again.
    drop(busy);
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

/// The HTTP/2 client preface and an empty SETTINGS frame: a connection that then says nothing.
const H2_PREFACE_AND_SETTINGS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// `n` HTTP/2 frames of `kind` on stream 0, each with `payload` bytes.
fn h2_frames(kind: u8, payload: usize, n: usize) -> Vec<u8> {
    let frame = [&[0, 0, payload as u8, kind, 0, 0, 0, 0, 0][..], &vec![7u8; payload]].concat();
    frame.repeat(n)
}

/// What idle connections send before falling silent: nothing, an HTTP/2 preface and SETTINGS
/// (then a flood of SETTINGS or PINGs, whose answers they never read), half an HTTP/1
/// request's headers.
fn idle_kinds() -> [(&'static str, Vec<u8>); 5] {
    let preface = H2_PREFACE_AND_SETTINGS.to_vec();
    [
        ("nothing", Vec::new()),
        ("an HTTP/2 preface", preface.clone()),
        ("a SETTINGS flood", [preface.clone(), h2_frames(4, 0, 200)].concat()),
        ("a PING flood", [preface, h2_frames(6, 8, 200)].concat()),
        ("half a request", b"POST /v1/completions HTTP/1.1\r\nHost: kvgate\r\nContent-Ty".to_vec()),
    ]
}

/// A connection to `addr` that sends `first` and then nothing (`None` if it could not connect).
async fn idle_connection(addr: std::net::SocketAddr, first: &[u8]) -> Option<TcpStream> {
    let mut conn = TcpStream::connect(addr).await.ok()?;
    conn.write_all(first).await.ok()?;
    Some(conn)
}

/// Whether kvgate's gRPC health on `addr`, on a new connection, answers SERVING within 1 s.
async fn grpc_health_within_a_second(addr: std::net::SocketAddr) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
        let answer = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.ok()?;
        Some(answer.into_inner().status == ServingStatus::Serving as i32)
    };
    tokio::time::timeout(Duration::from_secs(1), check).await.ok().flatten() == Some(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_floods_past_the_cap_leave_every_listener_serving() {
    let fleet = gateway(MODEL)
        .sims(1)
        .proxy()
        .config("connections: {max_connections: 64, header_read_timeout_ms: 2000}")
        .start()
        .await;
    let kv = &fleet.kv;
    let listeners = [("proxy", kv.proxy_addr.expect("proxy")), ("admin", kv.admin_addr), ("gRPC", kv.grpc_addr)];
    // A flood: idle connections of every kind to every listener, three times the cap of each
    // held at once, new ones opened all along (for 6 s, three header timeouts).
    let flood = async {
        let kinds = idle_kinds();
        let mut held = std::collections::VecDeque::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(6);
        while tokio::time::Instant::now() < until {
            for (_, addr) in listeners {
                for (_, first) in &kinds {
                    held.extend(idle_connection(addr, first).await);
                }
            }
            while held.len() > 3 * 64 * listeners.len() {
                held.pop_front();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        held.len()
    };
    // Meanwhile a client on a new connection each time is answered within a second, on every
    // listener.
    let clients = async {
        let one_shot = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(1))
            .build()
            .expect("client");
        let body = common::chat(MODEL).user("hi").max_tokens(2).json();
        let proxy = format!("http://{}/v1/chat/completions", listeners[0].1);
        let healthz = format!("http://{}/healthz", kv.admin_addr);
        let mut rounds = 0;
        // Past the flood's first header timeout.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..8 {
            let chat = one_shot.post(&proxy).json(&body).send().await;
            assert!(chat.as_ref().is_ok_and(|r| r.status() == 200), "a chat request through the proxy: {chat:?}");
            let health = one_shot.get(&healthz).send().await;
            assert!(health.as_ref().is_ok_and(|r| r.status() == 200), "/healthz: {health:?}");
            assert!(grpc_health_within_a_second(kv.grpc_addr).await, "gRPC health");
            rounds += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        rounds
    };
    let (held, rounds) = tokio::join!(flood, clients);
    assert_eq!(held, 3 * 64 * listeners.len(), "the flood reached its full size");
    assert_eq!(rounds, 8);
    // Left alone, an idle connection of every kind is closed after the header timeout (plus a
    // second's grace for a GOAWAY), on every listener.
    let mut idle = Vec::new();
    for (name, addr) in listeners {
        for (kind, first) in idle_kinds() {
            idle.push((name, kind, idle_connection(addr, &first).await.expect("connect")));
        }
    }
    for (name, kind, mut conn) in idle {
        assert!(closed_within(&mut conn, 10).await.is_some(), "{name}: a connection that sent {kind} is closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_outlive_the_header_timeout() {
    use common::extproc_msg::{post_headers, request_body};
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use kvgate::front::picker::pb::{WatchEndpointsRequest, picker_client::PickerClient};

    let fleet = gateway(MODEL).sims(1).config("connections: {header_read_timeout_ms: 500}").start().await;
    let grpc = format!("http://{}", fleet.kv.grpc_addr);
    // An ext_proc stream waiting for its request's body, and a watch with nothing new to say.
    let mut ext = ExternalProcessorClient::connect(grpc.clone()).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers =
        ext.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("a stream").into_inner();
    tx.send(post_headers("/v1/completions")).await.expect("headers");
    let mut picker = PickerClient::connect(grpc).await.expect("connect");
    let watch = WatchEndpointsRequest { pools: vec![], interval_ms: 60_000 };
    let mut updates = picker.watch_endpoints(watch).await.expect("a watch").into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), updates.message()).await.expect("in time");
    assert!(first.is_ok_and(|m| m.is_some()), "the watch's first state");
    // Six header timeouts later, both streams are still open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet = tokio::time::timeout(Duration::from_millis(200), updates.message()).await;
    assert!(quiet.is_err(), "the watch is still open, with nothing to say: {quiet:?}");
    let body = serde_json::json!({"model": MODEL, "prompt": "hi"}).to_string();
    tx.send(request_body(body, true)).await.expect("the body, late");
    let answer = tokio::time::timeout(Duration::from_secs(10), answers.message()).await.expect("in time");
    assert!(answer.as_ref().is_ok_and(|m| m.is_some()), "the ext_proc stream is answered: {answer:?}");
}

/// A certificate authority made for a test: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("a key");
        let pem = params.self_signed(&key).expect("the CA's certificate").pem();
        Self { pem, issuer: rcgen::Issuer::new(params, key) }
    }

    /// A certificate for `name` with this usage, and its key (PEM).
    fn sign(&self, name: &str, usage: rcgen::ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("parameters");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_picker_api_can_require_a_client_certificate() {
    use kvgate::front::picker::pb::{WatchEndpointsRequest, picker_client::PickerClient};
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    let (server_ca, client_ca, other_ca) = (Ca::new("server CA"), Ca::new("client CA"), Ca::new("other CA"));
    let (cert, key) = server_ca.sign("localhost", ServerAuth);
    let dir = std::env::temp_dir().join(format!("kvgate-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a folder");
    for (file, pem) in [("cert.pem", &cert), ("key.pem", &key), ("ca.pem", &client_ca.pem)] {
        std::fs::write(dir.join(file), pem).expect("write");
    }
    let path = |f: &str| dir.join(f).display().to_string();
    let tls = format!(
        "extproc: {{tls: {{cert_path: '{}', key_path: '{}', client_ca_path: '{}'}}}}\npicker_api: {{require_client_cert: true}}\nconnections: {{header_read_timeout_ms: 1000}}",
        path("cert.pem"),
        path("key.pem"),
        path("ca.pem")
    );
    let fleet = gateway(MODEL).sims(1).config(&tls).start().await;
    let grpc = fleet.kv.grpc_addr;
    // Connections that never finish a handshake: silent, or a TLS record's first bytes.
    let mut stalled = Vec::new();
    for first in [&b""[..], b"\x16\x03\x01\x02\x00\x01"] {
        stalled.push(idle_connection(grpc, first).await.expect("connect"));
    }
    let server_pem = server_ca.pem.clone();
    let channel = |identity: Option<(String, String)>| {
        let server_pem = server_pem.clone();
        async move {
            let mut tls =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(server_pem)).domain_name("localhost");
            if let Some((cert, key)) = identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            let endpoint = Endpoint::from_shared(format!("https://{grpc}")).expect("uri").tls_config(tls).expect("tls");
            endpoint.connect().await
        }
    };
    let watch = |channel: tonic::transport::Channel| async move {
        let mut picker = PickerClient::new(channel);
        let updates = picker.watch_endpoints(WatchEndpointsRequest { pools: vec![], interval_ms: 1000 }).await;
        updates.map(|_| ()).map_err(|s| s.code())
    };
    // A client certificate the client CA signed: served.
    let signed = channel(Some(client_ca.sign("picker-client", ClientAuth))).await.expect("a TLS connection");
    assert_eq!(watch(signed).await, Ok(()));
    // No certificate: the TLS connection is made (Envoy's ext_proc has none), ext_proc and
    // health are served, the picker API refuses.
    let anonymous = channel(None).await.expect("a TLS connection without a client certificate");
    assert_eq!(watch(anonymous.clone()).await, Err(tonic::Code::Unauthenticated));
    assert!(common::grpc_serving(anonymous, "").await, "gRPC health without a client certificate");
    // A certificate another CA signed fails the handshake, or the first call.
    let stranger = match channel(Some(other_ca.sign("stranger", ClientAuth))).await {
        Ok(channel) => watch(channel).await,
        Err(_) => Err(tonic::Code::Unavailable),
    };
    assert!(stranger.is_err(), "a certificate from another CA is refused");
    // The stalled handshakes were closed after the header timeout.
    for mut conn in stalled {
        assert!(closed_within(&mut conn, 10).await.is_some(), "a stalled TLS handshake is closed");
    }
    std::fs::remove_dir_all(&dir).ok();

    // A requirement no CA can meet is refused by check-config.
    let yaml = "admin_addr: 127.0.0.1:0\npicker_api: {require_client_cert: true}\npools: [{name: p, models: [m], endpoints: [{address: '127.0.0.1:9'}]}]\n";
    let path = std::path::Path::new("t.yaml");
    let cfg = kvgate::gateway::config::Config::from_yaml(yaml, path).expect("parses");
    let refused = cfg.resolve(path).map(|_| ()).expect_err("refused");
    assert!(refused.to_string().contains("extproc.tls.client_ca_path"), "{refused}");
}

/// A client whose connections are all busy — requests it never finishes — holds at most its
/// share of the cap: its next connection is closed, and another client still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_with_busy_connections_leaves_the_rest_to_others() {
    let sim = start_sim(&["--time-scale", "0", "--served-model-name", MODEL]).await;
    // Four connections, two per client (50%).
    let kv = start(sim.addrs[0], "{max_connections: 4}").await;
    let proxy = kv.proxy_addr.expect("proxy");
    let head = b"POST /v1/completions HTTP/1.1\r\nHost: kvgate\r\nContent-Length: 100000\r\n\r\n{\"model\":";
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut c = connect_from([127, 0, 0, 2], proxy).await;
        c.write_all(head).await.expect("write");
        busy.push(c);
    }
    // Their requests are in flight once kvgate has read their headers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut third = connect_from([127, 0, 0, 2], proxy).await;
    let _ = third.write_all(b"GET /v1/models HTTP/1.1\r\nHost: kvgate\r\n\r\n").await;
    let got = closed_within_or_answered(&mut third).await;
    assert!(got.is_empty(), "the busy client's third connection is closed: {}", String::from_utf8_lossy(&got));
    let mut others = Vec::new();
    for _ in 0..2 {
        let mut c = connect_from([127, 0, 0, 1], proxy).await;
        c.write_all(b"GET /v1/models HTTP/1.1\r\nHost: kvgate\r\n\r\n").await.expect("write");
        let got = closed_within_or_answered(&mut c).await;
        assert!(got.starts_with(b"HTTP/1.1 200"), "another client is served: {}", String::from_utf8_lossy(&got));
        others.push(c);
    }
    for c in &mut busy {
        assert!(closed_within(c, 1).await.is_none(), "the busy connections are kept");
    }
}
