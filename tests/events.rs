//! A routed request's lifecycle takes its events in any order the wire produces them, and each
//! outcome is accounted once: every order of the same events, each repeated, leaves the same
//! counts (one request with its status, its tokens once, one response observed, nothing left in
//! flight), as the one order a well-behaved wire produces does.

mod common;

use common::{gateway, metric};
use kvgate::gateway::events::{Event, Failure, Served};
use kvgate::gateway::facade::{Input, RouteRequest, SubsetHint};
use kvgate::gateway::paths::Place;
use kvgate::gateway::telemetry::Usage;
use kvgate::routing::request::ApiKind;
use serde_json::json;

const MODEL: &str = "m";

/// What the gateway has accounted so far.
#[derive(Debug, PartialEq)]
struct Counts {
    requests_ok: f64,
    requests_failed: f64,
    prompt_tokens: f64,
    completion_tokens: f64,
    responses: f64,
    in_flight: f64,
}

fn counts(text: &str, endpoint: &str) -> Counts {
    let get = |name: &str, labels: &[(&str, &str)]| metric(text, name, labels).unwrap_or(0.0);
    Counts {
        requests_ok: get("kvgate_requests_total", &[("pool", "p"), ("status", "200")]),
        requests_failed: get("kvgate_requests_total", &[("pool", "p"), ("status", "502")]),
        prompt_tokens: get("kvgate_tokens_total", &[("pool", "p"), ("kind", "prompt")]),
        completion_tokens: get("kvgate_tokens_total", &[("pool", "p"), ("kind", "completion")]),
        responses: get("inference_objective_response_sizes_count", &[("model_name", MODEL)]),
        in_flight: get("kvgate_endpoint_in_flight_requests", &[("pool", "p"), ("endpoint", endpoint)]),
    }
}

/// A caller that reports the endpoint that served after the response's start: the request moves
/// there as one past its prefill, and a failure part-way keeps the status the client got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_served_by_moves_a_started_request_whole() {
    let fleet = gateway(MODEL).sims(2).start().await;
    let (sims, kv) = (&fleet.sims, &fleet.kv);
    let body = json!({"model": MODEL, "prompt": "x".repeat(4000), "max_tokens": 4}).to_string();
    let req = RouteRequest {
        place: Place::Prompt(ApiKind::Completions),
        input: Input::Body(body.as_bytes()),
        subset: SubsetHint::Any,
        places: 1,
        class: Default::default(),
    };
    let mut r = kv.gateway.route(req).await.expect("routed");
    let first = r.target().address;
    let other = sims.iter().map(|s| s.addrs[0]).find(|a| *a != first).expect("a second endpoint");
    r.on(Event::Started { status: 200, event_stream: true, streamed: true });
    r.on(Event::Body(b"data: {}\n\n"));
    r.on(Event::ServedBy(Served::At(other)));
    let text = kv.gateway.metrics_text();
    let at = |name: &str, a: std::net::SocketAddr| metric(&text, name, &[("pool", "p"), ("endpoint", &a.to_string())]);
    assert_eq!(at("kvgate_endpoint_in_flight_requests", other), Some(1.0));
    assert_eq!(at("kvgate_endpoint_in_flight_tokens", other), Some(0.0), "its prompt is computed already");
    assert_eq!(at("kvgate_endpoint_in_flight_requests", first), Some(0.0));
    let ok = |t: &str| metric(t, "kvgate_requests_total", &[("pool", "p"), ("status", "200")]).unwrap_or(0.0);
    let before = ok(&text);
    r.on(Event::Failed(Failure::Unreachable));
    drop(r);
    assert_eq!(ok(&kv.gateway.metrics_text()), before + 1.0, "counted with the status its client got");
}

/// Every ordering of `0..n`.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for at in 0..=p.len() {
            let mut q = p.clone();
            q.insert(at, n - 1);
            out.push(q);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_order_of_the_same_events_is_accounted_once() {
    let fleet = gateway(MODEL).sims(1).start().await;
    let (sims, kv) = (&fleet.sims, &fleet.kv);
    let endpoint = sims[0].addrs[0];
    let body = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}).to_string();
    let route = || {
        let req = RouteRequest {
            place: Place::Prompt(ApiKind::Completions),
            input: Input::Body(body.as_bytes()),
            subset: SubsetHint::Any,
            places: 1,
            class: Default::default(),
        };
        common::ready(kv.gateway.route(req)).expect("routed")
    };
    let json_body = br#"{"choices":[{"text":"abc"}],"usage":{"prompt_tokens":5,"completion_tokens":4}}"#;
    let usage = Usage { prompt: 5, completion: 4, cached: 0, cached_reported: false };
    let served = Event::ServedBy(Served::At(endpoint));
    let started = Event::Started { status: 200, event_stream: false, streamed: true };

    // A successful response, its events in every order, each given twice (but its body: a chunk
    // given twice is two chunks).
    let success: Vec<Event<'_>> = vec![
        served.clone(),
        started.clone(),
        Event::Body(json_body),
        Event::Finished { status: None, usage: None, body_bytes: None },
    ];
    let mut before = counts(&kv.gateway.metrics_text(), &endpoint.to_string());
    for order in permutations(success.len()) {
        let mut r = route();
        for &i in &order {
            r.on(success[i].clone());
            if !matches!(success[i], Event::Body(_)) {
                r.on(success[i].clone());
            }
        }
        drop(r);
        let after = counts(&kv.gateway.metrics_text(), &endpoint.to_string());
        let tokens = (usage.prompt as f64, usage.completion as f64);
        let want = Counts {
            requests_ok: before.requests_ok + 1.0,
            requests_failed: before.requests_failed,
            prompt_tokens: before.prompt_tokens + tokens.0,
            completion_tokens: before.completion_tokens + tokens.1,
            responses: before.responses + 1.0,
            in_flight: 0.0,
        };
        assert_eq!(after, want, "events in the order {order:?}");
        before = after;
    }

    // A caller's report: its end with the usage it read, before or after its start.
    let report: Vec<Event<'_>> =
        vec![started.clone(), Event::Finished { status: Some(200), usage: Some(usage), body_bytes: Some(80) }];
    for order in permutations(report.len()) {
        let mut r = route();
        for &i in &order {
            r.on(report[i].clone());
            r.on(report[i].clone());
        }
        drop(r);
        let after = counts(&kv.gateway.metrics_text(), &endpoint.to_string());
        assert_eq!(after.requests_ok, before.requests_ok + 1.0, "{order:?}");
        assert_eq!(after.prompt_tokens, before.prompt_tokens + 5.0, "usage counted once, {order:?}");
        assert_eq!(after.responses, before.responses + 1.0, "{order:?}");
        before = after;
    }

    // A failure and a retry: counted once, with the last attempt's failure, when the request
    // goes; a response after the client's retry replaces it.
    let mut r = route();
    r.on(Event::Failed(Failure::Unreachable));
    r.on(Event::Failed(Failure::Unreachable));
    drop(r);
    let after = counts(&kv.gateway.metrics_text(), &endpoint.to_string());
    assert_eq!((after.requests_failed, after.requests_ok), (before.requests_failed + 1.0, before.requests_ok));
    before = after;
    let mut r = route();
    r.on(Event::Failed(Failure::Status(503)));
    r.on(Event::Resent(0));
    r.on(started.clone());
    r.on(Event::Finished { status: None, usage: None, body_bytes: None });
    drop(r);
    let after = counts(&kv.gateway.metrics_text(), &endpoint.to_string());
    assert_eq!((after.requests_failed, after.requests_ok), (before.requests_failed, before.requests_ok + 1.0));
    before = after;

    // A client that leaves before any answer is not counted with a status; one that leaves
    // mid-response is counted with the response's.
    let mut r = route();
    r.on(Event::Failed(Failure::Cancelled));
    drop(r);
    let mut r = route();
    r.on(started.clone());
    r.on(Event::Body(b"{\"choi"));
    drop(r);
    let after = counts(&kv.gateway.metrics_text(), &endpoint.to_string());
    assert_eq!(after.requests_ok, before.requests_ok + 1.0);
    assert_eq!(after.requests_failed, before.requests_failed);
    assert_eq!(after.responses, before.responses, "a response that did not end is not observed");
    assert_eq!(after.in_flight, 0.0);
}
