//! The admin HTTP surface: kvgate's `/metrics`, `/healthz`, `/readyz`, and the debug views
//! `/debug/endpoints` (every endpoint's state) and `/debug/explain` (the decision a body would
//! get, with every scorer's score, without sending anything).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::front::http::{answer, no_route, read_body, wrong_method};
use crate::gateway::answer::Answer;
use crate::gateway::facade::Gateway;
use crate::gateway::facade::Input;
use crate::routing::request::ApiKind;

/// The admin router.
pub(crate) fn app(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/debug/endpoints", get(endpoints))
        .route("/debug/explain", post(explain))
        .route("/debug/cluster", get(cluster))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(gateway)
}

type St = State<Arc<Gateway>>;

async fn metrics(State(g): St) -> Response {
    let text = g.metrics_text();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn readyz(State(g): St) -> (StatusCode, &'static str) {
    if g.ready() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "discovering endpoints") }
}

async fn endpoints(State(g): St) -> Response {
    let pools: Vec<_> = g
        .pools()
        .iter()
        .map(|p| {
            let models = p.served_names();
            let source = p.source();
            let bpt = p.planner().bytes_per_token();
            json!({
                "name": p.name(), "models": models, "source": source.kind, "discovery": source,
                "bytes_per_token": {"value": bpt.get(), "samples": bpt.samples()},
                "endpoints": p.status(),
                "flow_control": p.flow().status(),
            })
        })
        .collect();
    axum::Json(json!({"pools": pools})).into_response()
}

/// This replica and its peers: who they are, how fresh, what they hold in flight.
async fn cluster(State(g): St) -> Response {
    let Some(c) = g.cluster() else {
        let id = g.decisions().replica_id();
        return axum::Json(json!({"enabled": false, "replica": id, "ready": g.ready(), "peers": []})).into_response();
    };
    let s = c.settings();
    axum::Json(json!({
        "enabled": true,
        "replica": c.id(),
        "ready": c.ready(),
        "discovery": {"peers": s.peers, "dns": s.dns},
        "sync_interval_ms": s.sync_interval_ms,
        "lease_ms": s.lease_ms,
        "peers": c.peers(),
    }))
    .into_response()
}

#[derive(Debug, serde::Deserialize)]
struct ExplainQuery {
    path: Option<String>,
}

async fn explain(State(g): St, Query(q): Query<ExplainQuery>, request: axum::extract::Request) -> Response {
    // Read as the proxy reads a body: bounded, under the budget and its client's share, refused
    // as JSON.
    let peer = request.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0);
    let mut held = match peer {
        Some(peer) => g.body_budget().reservation_for(crate::gateway::budget::Client::of(peer.ip())),
        None => g.body_budget().reservation(),
    };
    let body = match read_body(request.into_body(), g.max_body_bytes(), &mut held).await {
        Ok(b) => b,
        Err(e) => return answer(&Answer::from(&e)),
    };
    let path = q.path.as_deref().unwrap_or("/v1/chat/completions");
    let Some(api) = ApiKind::from_path(path) else {
        return answer(&Answer::error(400, format!("`{path}` is not a routed API path"), "invalid_path", Some("path")));
    };
    match g.explain(api, Input::Body(&body)) {
        Ok((pool, _, decision, explanation)) => {
            axum::Json(json!({"pool": pool, "decision": decision, "explanation": explanation})).into_response()
        }
        Err(e) => answer(&Answer::from(&e)),
    }
}
