//! A stopped endpoint (SIGSTOP: its kernel still accepts connections, nothing answers) in front
//! of kvgate with its default timings: out of rotation with no traffic needed to notice it, the
//! requests that waited for its answer served by another endpoint, its streams ended, and back in
//! rotation once it goes on; and an endpoint whose scrapes hang while it streams is not taken for
//! a stopped one. The stopped simulator is a process of its own, let go (and killed) when the
//! test ends, even on a panic.
#![allow(clippy::disallowed_methods, reason = "the test's own tasks (its clients) end with its runtime")]

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, SimProcess, chat, free_port, gateway};
use serde_json::Value;

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// The proxy's served-by response header.
const SERVED: &str = "x-gateway-destination-endpoint-served";

/// What `/debug/endpoints` shows of the endpoint at `addr` (null when it is not listed).
async fn endpoint(fleet: &Fleet, addr: &str) -> Value {
    let v = fleet.endpoints().await;
    let endpoints = v["pools"][0]["endpoints"].as_array().cloned().unwrap_or_default();
    endpoints.into_iter().find(|e| e["address"] == addr).unwrap_or(Value::Null)
}

/// The health `/debug/endpoints` shows for the endpoint at `addr` (empty when it is not listed).
async fn health(fleet: &Fleet, addr: &str) -> String {
    endpoint(fleet, addr).await["health"].as_str().unwrap_or("").to_owned()
}

/// How long until `addr`'s health is (`want`) or is not (`!want`) `healthy`, polled every 10 ms
/// for at most `bound`; `None` if it never was.
async fn until_healthy(fleet: &Fleet, addr: &str, want: bool, bound: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < bound {
        if (health(fleet, addr).await == "healthy") == want {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Sends `body` through the proxy: its status and the endpoint that served it.
async fn send(proxy: &str, body: &Value) -> (u16, String) {
    let r = common::client()
        .post(format!("{proxy}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the proxy answers");
    let served = r.headers().get(SERVED).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    (status, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_endpoint_leaves_rotation_unasked_and_comes_back() {
    let port = free_port();
    let stoppable = SimProcess::start(&["--port", &port.to_string(), "--time-scale", "0"]);
    let fleet = gateway(MODEL).address(stoppable.addr).sims(1).proxy().start().await;
    let (addr, other, proxy) = (stoppable.addr.to_string(), fleet.addr(0), fleet.proxy());

    // No request at all: the scrapes alone notice.
    let errors = |e: &Value| e["scrape_errors"].as_u64().unwrap_or(0);
    let before = errors(&endpoint(&fleet, &addr).await);
    stoppable.stop();
    let Some(out) = until_healthy(&fleet, &addr, false, Duration::from_secs(8)).await else {
        panic!("still in rotation 8 s after SIGSTOP: {}", fleet.endpoints().await);
    };
    println!("out of rotation {} ms after SIGSTOP", out.as_millis());
    // Ejected for its silence, at its first unanswered scrape: not after `failure_threshold` of them.
    let e = endpoint(&fleet, &addr).await;
    assert_eq!(errors(&e) - before, 1, "one failed scrape: {e}");
    assert!(e["last_error"].as_str().is_some_and(|m| m.contains("no answer")), "{e}");

    for i in 0..20 {
        let (status, served) = send(&proxy, &chat(MODEL).user(format!("after {i}")).max_tokens(4).json()).await;
        assert_eq!((status, served.as_str()), (200, other.as_str()), "request {i}");
    }

    stoppable.resume();
    let Some(back) = until_healthy(&fleet, &addr, true, Duration::from_secs(10)).await else {
        panic!("not back 10 s after SIGCONT: {}", fleet.endpoints().await);
    };
    println!("back in rotation {} ms after SIGCONT", back.as_millis());
    // Cold requests rotate over the endpoints: it takes its share again.
    let mut served_there = 0;
    for i in 0..20 {
        let (status, served) = send(&proxy, &chat(MODEL).user(format!("again {i}")).max_tokens(4).json()).await;
        assert_eq!(status, 200, "request {i}");
        served_there += usize::from(served == addr);
    }
    assert!(served_there > 0, "the endpoint that came back served none of 20 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_waited_on_a_stopped_endpoint_is_served_elsewhere_and_its_stream_ends() {
    let port = free_port();
    // Every engine step takes a second: answers are tens of seconds away.
    let stoppable = SimProcess::start(&["--port", &port.to_string(), "--step-overhead-ms", "1000"]);
    // The other endpoint reports a long queue, so the queue scorer sends every request to the
    // slow one first, with the other as its fallback.
    let queued = r#"{"waiting-requests": 50}"#;
    // Scraped load stays known for a minute: on a loaded machine a late scrape would otherwise
    // make both queues unknown (scored alike), and send requests to the other endpoint.
    let fleet = gateway(MODEL)
        .address(stoppable.addr)
        .sim(&["--time-scale", "0", "--fake-metrics", queued])
        .config("scrape: {stale_after_ms: 60000}")
        .pool("scheduler: {plugins: [{type: queue-scorer}]}")
        .proxy()
        .start()
        .await;
    let (addr, other, proxy) = (stoppable.addr.to_string(), fleet.addr(0), fleet.proxy());

    let waiting: Vec<_> = (0..3)
        .map(|i| {
            let (proxy, body) = (proxy.clone(), chat(MODEL).user(format!("waits {i}")).max_tokens(50).json());
            tokio::spawn(async move { send(&proxy, &body).await })
        })
        .collect();
    let body = chat(MODEL).user("streams").max_tokens(100).stream().json();
    let mut stream = common::client()
        .post(format!("{proxy}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the stream starts");
    assert_eq!(stream.headers().get(SERVED).and_then(|v| v.to_str().ok()), Some(addr.as_str()));
    let first = tokio::time::timeout(Duration::from_secs(10), stream.chunk()).await;
    assert!(matches!(first, Ok(Ok(Some(_)))), "the stream's first chunk: {first:?}");
    let all_there = common::eventually(10, || async {
        let v = fleet.endpoints().await;
        let endpoints = v["pools"][0]["endpoints"].as_array().cloned().unwrap_or_default();
        endpoints.iter().any(|e| e["address"] == addr.as_str() && e["in_flight_requests"] == 4)
    })
    .await;
    assert!(all_there, "four requests on the slow endpoint: {}", fleet.endpoints().await);
    assert!(waiting.iter().all(|t| !t.is_finished()), "the three wait for its answer");

    let stopped_at = Instant::now();
    stoppable.stop();
    for (i, task) in waiting.into_iter().enumerate() {
        let answer = tokio::time::timeout(Duration::from_secs(30), task).await;
        let (status, served) = answer.expect("an answer within 30 s").expect("the client task");
        assert_eq!((status, served.as_str()), (200, other.as_str()), "waiting request {i}");
    }
    println!("the waiting requests were answered {} ms after SIGSTOP", stopped_at.elapsed().as_millis());

    // The stream ends with an error (no end of stream, no `[DONE]`), not silence.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.chunk().await {
                Ok(Some(chunk)) => rest.extend_from_slice(&chunk),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the stream ends within 30 s of SIGSTOP");
    assert!(ended.is_err(), "the stream ended cleanly: {}", String::from_utf8_lossy(&rest));
    assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"));
    println!("the stream was cut {} ms after SIGSTOP", stopped_at.elapsed().as_millis());

    // New requests go to the other endpoint while it is stopped.
    let (status, served) = send(&proxy, &chat(MODEL).user("later").max_tokens(4).json()).await;
    assert_eq!((status, served.as_str()), (200, other.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_while_it_is_noticed_are_answered_by_the_other() {
    let port = free_port();
    let stoppable = SimProcess::start(&["--port", &port.to_string(), "--time-scale", "0"]);
    let fleet = gateway(MODEL).address(stoppable.addr).sims(1).proxy().start().await;
    let (addr, other, proxy) = (stoppable.addr.to_string(), fleet.addr(0), fleet.proxy());

    stoppable.stop();
    // Cold requests rotate over both endpoints until the stopped one is out: those it gets wait
    // until it is found silent, then go to the other.
    let mut sent = Vec::new();
    for i in 0..10 {
        let (proxy, body) = (proxy.clone(), chat(MODEL).user(format!("during {i}")).max_tokens(4).json());
        sent.push(tokio::spawn(async move { send(&proxy, &body).await }));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, task) in sent.into_iter().enumerate() {
        let answer = tokio::time::timeout(Duration::from_secs(30), task).await;
        let (status, served) = answer.expect("an answer within 30 s").expect("the client task");
        assert_eq!((status, served.as_str()), (200, other.as_str()), "request {i}");
    }
    assert_ne!(health(&fleet, &addr).await, "healthy", "{}", fleet.endpoints().await);
    // Some went to the stopped endpoint first (the test would prove nothing otherwise).
    let metrics = common::metrics(&fleet.admin()).await;
    let retried = common::metric(&metrics, "kvgate_proxy_retries_total", &[("outcome", "sent")]);
    assert!(retried.is_some_and(|n| n >= 1.0), "retries: {retried:?}");
}

/// A server whose `/metrics` answers once and then hangs, and whose chat completions stream a
/// chunk every 100 ms for 8 s: alive, only its metrics are slow.
fn slow_metrics_server() -> axum::Router {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let scrapes = std::sync::Arc::new(AtomicUsize::new(0));
    let metrics = move || {
        let scrapes = scrapes.clone();
        async move {
            if scrapes.fetch_add(1, Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
        }
    };
    let models = move || async move { format!(r#"{{"object":"list","data":[{{"id":"{MODEL}"}}]}}"#) };
    let chat = || async {
        let chunks = futures_util::stream::unfold(0, |n| async move {
            if n > 80 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let event = if n == 80 { "data: [DONE]\n\n".to_owned() } else { format!("data: {{\"n\":{n}}}\n\n") };
            Some((Ok::<_, std::io::Error>(event), n + 1))
        });
        ([("content-type", "text/event-stream")], axum::body::Body::from_stream(chunks))
    };
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/v1/models", axum::routing::get(models))
        .route("/v1/chat/completions", axum::routing::post(chat))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_streams_while_its_metrics_hang_is_not_cut() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, slow_metrics_server()).await.ok() });
    let fleet = gateway(MODEL).address(addr).proxy().start().await;

    let body = chat(MODEL).user("streams on").stream().json();
    let text = tokio::time::timeout(
        Duration::from_secs(30),
        common::post_text(&format!("{}/v1/chat/completions", fleet.proxy()), &body),
    )
    .await
    .expect("the stream ends within 30 s");
    assert!(text.ends_with("data: [DONE]\n\n") && text.matches("data: ").count() == 81, "{text}");
    // Its scrapes went unanswered meanwhile: silence, but for the bytes it streamed.
    let e = endpoint(&fleet, &addr.to_string()).await;
    assert!(e["last_error"].as_str().is_some_and(|m| m.contains("no answer")), "{e}");
}
