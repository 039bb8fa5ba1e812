//! Nobody can hold the request-body budget: bodies sent fast and then trickled, bodies left
//! half-sent on ext_proc streams, and bodies that keep coming at the least rate are cut (408),
//! and one client address holds at most its share of the budget (503 past it) — while a normal
//! request from another address is answered 200 throughout, and a real upload at a steady modest
//! rate is not cut. Attackers come from 127.0.0.2 (Linux routes all of 127/8 to `lo`).
#![allow(clippy::disallowed_methods, reason = "the test's own tasks (clients, watchers) end with its runtime")]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::extproc_msg::{post_headers, request_body, request_headers};
use common::{chat, client, eventually, gateway, metric};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MODEL: &str = "m";
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The budget of every test here: 1 MB, of which one client may hold a quarter.
const BUDGET: &str = "max_buffered_bytes: 1000000";
const SHARE: f64 = 250_000.0;

/// A TCP connection to `to` from `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind to a loopback address");
    socket.connect(to).await.expect("connect")
}

/// The request line and headers of a completion whose body is `len` bytes long.
fn head(len: usize) -> String {
    format!(
        "POST /v1/completions HTTP/1.1\r\nHost: kvgate\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
}

/// The status and OpenAI error code of a raw HTTP answer.
fn answer_of(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    (status, v["error"]["code"].as_str().unwrap_or_default().to_owned())
}

/// What a raw upload did: the answer's status and code, and how long it took.
#[derive(Debug)]
struct Outcome {
    status: u16,
    code: String,
    took: Duration,
}

/// Sends `fast` bytes of a body declared `len` long at once, then `piece` bytes every `every`
/// (at most `pieces` times, the last completing the body if the pieces add up to it), reading
/// the answer as it comes; the answer, or status 0 if none came within 30 s.
async fn upload(
    conn: &mut TcpStream,
    len: usize,
    fast: usize,
    piece: usize,
    every: Duration,
    pieces: usize,
) -> Outcome {
    let started = tokio::time::Instant::now();
    let (mut rd, mut wr) = conn.split();
    let send = async {
        let _ = wr.write_all(head(len).as_bytes()).await;
        let _ = wr.write_all(&vec![b' '; fast]).await;
        for _ in 0..pieces {
            tokio::time::sleep(every).await;
            if wr.write_all(&vec![b' '; piece]).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    let read = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") || answer_of(&got).1.is_empty() && got.len() < 65_536 {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    };
    let raw = tokio::select! {
        () = send => unreachable!("the sender never ends"),
        raw = tokio::time::timeout(Duration::from_secs(30), read) => raw.unwrap_or_default(),
    };
    let (status, code) = answer_of(&raw);
    Outcome { status, code, took: started.elapsed() }
}

/// Sends a normal chat request through the proxy (from 127.0.0.1) every 100 ms until `stop`
/// (at most 600 times); the statuses it got.
async fn keep_chatting(proxy: String, stop: Arc<AtomicBool>) -> Vec<u16> {
    let url = format!("{proxy}/v1/chat/completions");
    let body = chat(MODEL).user("hello").max_tokens(2).json();
    let mut statuses = Vec::new();
    for _ in 0..600 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let r = client().post(&url).json(&body).send().await;
        statuses.push(r.map_or(0, |r| r.status().as_u16()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    statuses
}

/// kvgate's body gauges: bytes held, and clients holding them.
async fn held(admin: &str) -> (f64, f64) {
    let m = common::metrics(admin).await;
    let get = |name| metric(&m, name, &[]).unwrap_or(-1.0);
    (get("kvgate_buffered_request_bytes"), get("kvgate_buffered_request_clients"))
}

/// Refusals counted with `code`.
async fn refusals(admin: &str, code: &str) -> f64 {
    let m = common::metrics(admin).await;
    metric(&m, "inference_objective_request_error_total", &[("error_code", code)]).unwrap_or(0.0)
}

/// Samples the bytes held every 20 ms until `stop`; the most seen.
async fn watch_held(admin: String, stop: Arc<AtomicBool>) -> f64 {
    let mut most: f64 = 0.0;
    for _ in 0..3000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        most = most.max(held(&admin).await.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    most
}

/// The end of an attack: every byte is given back and no client is left in the accounting, the
/// attacker never held more than its share, and the other client was answered throughout.
async fn after_the_attack(
    admin: &str,
    stop: &AtomicBool,
    most: tokio::task::JoinHandle<f64>,
    chats: tokio::task::JoinHandle<Vec<u16>>,
) {
    assert!(eventually(10, || async { held(admin).await == (0.0, 0.0) }).await, "{:?}", held(admin).await);
    stop.store(true, Ordering::Relaxed);
    let most = most.await.expect("the watcher");
    assert!(most <= SHARE + 20_000.0, "127.0.0.2 held {most} bytes, past its share");
    let chats = chats.await.expect("the chatting client");
    assert!(chats.len() >= 10 && chats.iter().all(|s| *s == 200), "the other client was answered: {chats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_sent_fast_then_trickled_are_cut_and_one_client_holds_only_its_share() {
    let connections = "connections: {max_body_share_percent: 25, min_body_bytes_per_s: 1000, body_rate_window_ms: 3000, body_timeout_ms: 8000}";
    let fleet = gateway(MODEL).sims(1).proxy().config(BUDGET).config(connections).start().await;
    let proxy_addr = fleet.kv.proxy_addr.expect("proxy");
    let (admin, stop) = (fleet.admin(), Arc::new(AtomicBool::new(false)));
    let chats = tokio::spawn(keep_chatting(fleet.proxy(), stop.clone()));
    let most = tokio::spawn(watch_held(admin.clone(), stop.clone()));

    // The first attacker sends 240 kB of a 500 kB body fast, then a byte every 1.5 s: a byte
    // now and then keeps clear of the stall timeout, and the early bytes buy only one window.
    let trickle = Duration::from_millis(1500);
    let mut first = connect_from(ATTACKER, proxy_addr).await;
    let first = tokio::spawn(async move { upload(&mut first, 500_000, 240_000, 1, trickle, 20).await });
    assert!(eventually(10, || async { held(&admin).await.0 >= 240_000.0 }).await, "the first body is held");
    // Three more from the same address, with the rest of the budget between them: past the
    // address's share, each is refused at once.
    let mut more = Vec::new();
    for _ in 0..3 {
        let mut conn = connect_from(ATTACKER, proxy_addr).await;
        more.push(tokio::spawn(async move { upload(&mut conn, 500_000, 240_000, 1, trickle, 20).await }));
    }
    // And one at a steady rate above the least: only the overall deadline cuts it.
    let mut steady = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), proxy_addr).await;
    let steady =
        tokio::spawn(async move { upload(&mut steady, 500_000, 0, 400, Duration::from_millis(100), 200).await });

    let first = first.await.expect("the first attacker");
    assert_eq!((first.status, first.code.as_str()), (408, "request_timeout"), "{first:?}");
    assert!(first.took < Duration::from_secs(8), "cut by the rate rule, before the deadline: {first:?}");
    for o in more {
        let o = o.await.expect("an attacker");
        assert_eq!((o.status, o.code.as_str()), (503, "overloaded"), "{o:?}");
    }
    let steady = steady.await.expect("the steady uploader");
    assert_eq!((steady.status, steady.code.as_str()), (408, "request_timeout"), "{steady:?}");
    assert!(steady.took >= Duration::from_secs(7), "cut at the deadline: {steady:?}");

    after_the_attack(&admin, &stop, most, chats).await;
    assert!(refusals(&fleet.admin(), "overloaded").await >= 3.0);
}

/// One ext_proc stream, as Envoy drives it, from a given local address.
struct Stream {
    tx: mpsc::Sender<ProcessingRequest>,
    rx: tonic::Streaming<ProcessingResponse>,
}

impl Stream {
    async fn open(from: IpAddr, addr: SocketAddr) -> Self {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("an endpoint")
            .local_address(Some(from))
            .connect()
            .await
            .expect("connect");
        let (tx, rx) = mpsc::channel(64);
        let mut client = ExternalProcessorClient::new(channel);
        let resp = client.process(ReceiverStream::new(rx)).await.expect("process");
        Self { tx, rx: resp.into_inner() }
    }

    async fn send(&self, m: ProcessingRequest) {
        // A stream kvgate has answered may be closed already: what it answered is read next.
        let _ = self.tx.send(m).await;
    }

    /// The next answer within `secs`, with the time it took.
    async fn recv(&mut self, secs: u64) -> (Option<ProcessingResponse>, Duration) {
        let t = tokio::time::Instant::now();
        let m = tokio::time::timeout(Duration::from_secs(secs), self.rx.message()).await;
        (m.ok().and_then(Result::ok).flatten(), t.elapsed())
    }
}

/// The status and code of an immediate response.
fn refusal(m: &Option<ProcessingResponse>) -> Option<(i32, String)> {
    match m.as_ref()?.response.as_ref()? {
        Resp::ImmediateResponse(ir) => {
            let v: serde_json::Value = serde_json::from_slice(&ir.body).unwrap_or_default();
            Some((ir.status.as_ref()?.code, v["error"]["code"].as_str().unwrap_or_default().to_owned()))
        }
        _ => None,
    }
}

/// The message of an immediate response's OpenAI error.
fn message(m: &Option<ProcessingResponse>) -> String {
    match m.as_ref().and_then(|m| m.response.as_ref()) {
        Some(Resp::ImmediateResponse(ir)) => {
            let v: serde_json::Value = serde_json::from_slice(&ir.body).unwrap_or_default();
            v["error"]["message"].as_str().unwrap_or_default().to_owned()
        }
        _ => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_extproc_bodies_are_cut_and_one_client_holds_only_its_share() {
    let connections = "connections: {max_body_share_percent: 25, min_body_bytes_per_s: 1000, body_rate_window_ms: 2500, body_timeout_ms: 5000}";
    let fleet = gateway(MODEL).sims(1).proxy().config(BUDGET).config(connections).start().await;
    let grpc = fleet.kv.grpc_addr;
    let (admin, stop) = (fleet.admin(), Arc::new(AtomicBool::new(false)));
    let chats = tokio::spawn(keep_chatting(fleet.proxy(), stop.clone()));
    let most = tokio::spawn(watch_held(admin.clone(), stop.clone()));

    // From 127.0.0.2 (the gRPC peer, no x-forwarded-for): headers and 200 kB of a body, then
    // nothing.
    let mut silent = Stream::open(ATTACKER, grpc).await;
    let silent_since = tokio::time::Instant::now();
    silent.send(post_headers("/v1/completions")).await;
    silent.send(request_body(vec![b' '; 200_000], false)).await;
    assert!(eventually(10, || async { held(&admin).await.0 >= 200_000.0 }).await, "the silent body is held");
    // More of the same address, named by Envoy's last x-forwarded-for entry this time (the
    // gRPC peer is 127.0.0.1): past its share, refused at once.
    let mut more = Vec::new();
    for _ in 0..4 {
        let s = Stream::open(IpAddr::V4(Ipv4Addr::LOCALHOST), grpc).await;
        let headers = [(":method", "POST"), (":path", "/v1/completions"), ("x-forwarded-for", "10.9.9.9, 127.0.0.2")];
        s.send(request_headers(&headers, false)).await;
        s.send(request_body(vec![b' '; 200_000], false)).await;
        more.push(s);
    }
    // Another stream of the address keeps trickling small chunks above the least rate (within
    // the address's share): only the deadline cuts it.
    let mut trickling = Stream::open(ATTACKER, grpc).await;
    let trickling_since = tokio::time::Instant::now();
    trickling.send(post_headers("/v1/completions")).await;
    let feeder = {
        let tx = trickling.tx.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                if tx.send(request_body(vec![b' '; 1000], false)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    for mut s in more {
        let (m, _) = s.recv(10).await;
        assert_eq!(refusal(&m), Some((503, "overloaded".to_owned())), "{m:?}");
    }
    let (m, _) = silent.recv(10).await;
    let took = silent_since.elapsed();
    assert_eq!(refusal(&m), Some((408, "request_timeout".to_owned())), "{m:?}");
    assert!(took < Duration::from_secs(5), "the silent body is cut by the rate rule: {took:?}");
    assert!(message(&m).contains("too slowly"), "{}", message(&m));
    let (m, _) = trickling.recv(10).await;
    let took = trickling_since.elapsed();
    assert_eq!(refusal(&m), Some((408, "request_timeout".to_owned())), "{m:?}");
    assert!(took >= Duration::from_secs(5), "the trickling body is cut at its deadline: {took:?}");
    assert!(message(&m).contains("took too long"), "{}", message(&m));
    feeder.abort();

    after_the_attack(&admin, &stop, most, chats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_uploads_at_a_steady_modest_rate_are_not_cut() {
    // 5 kB/s for 4 s: five times the least rate, well past its window and grace.
    let connections = "connections: {min_body_bytes_per_s: 1000, body_rate_window_ms: 1000, body_timeout_ms: 20000}";
    let fleet = gateway(MODEL).sims(1).proxy().config(BUDGET).config(connections).start().await;
    let prompt = "word ".repeat(4_000);
    let body = serde_json::json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}).to_string().into_bytes();
    let pieces: Vec<&[u8]> = body.chunks(500).collect();

    // Through the proxy.
    let mut conn = TcpStream::connect(fleet.kv.proxy_addr.expect("proxy")).await.expect("connect");
    conn.write_all(head(body.len()).as_bytes()).await.expect("head");
    for p in &pieces {
        conn.write_all(p).await.expect("a piece");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));

    // Over ext_proc.
    let mut s = Stream::open(IpAddr::V4(Ipv4Addr::LOCALHOST), fleet.kv.grpc_addr).await;
    s.send(post_headers("/v1/completions")).await;
    for (i, p) in pieces.iter().enumerate() {
        s.send(request_body(p.to_vec(), i + 1 == pieces.len())).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (m, _) = s.recv(10).await;
    let routed = matches!(m.as_ref().and_then(|m| m.response.as_ref()), Some(Resp::RequestHeaders(_)));
    assert!(routed, "the request was routed: {m:?}");
}
