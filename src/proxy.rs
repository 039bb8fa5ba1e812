//! The OpenAI reverse proxy: takes a request, asks the one decision path where it goes, and
//! forwards it there — the body byte for byte, the answer chunk by chunk as it arrives.
//!
//! Failures before an endpoint's response starts (refused, reset, timed out, 5xx, 429) move the
//! request to the decision's next candidate, up to `proxy.attempts` endpoints; once the client
//! has received a byte, nothing is retried. The request's in-flight count moves with it and is
//! released when the response ends, fails, or the client goes away (dropping the response drops
//! the upstream request too, which is how vLLM learns of the abort).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

use crate::config::ProxyConfig;
use crate::disagg::{self, DP_RANK_HEADER, PREFILLER_HEADER, PrefillLeg, UpstreamClient};
use crate::endpoint::InFlightGuard;
use crate::request::{ApiKind, RequestError};
use crate::route::{Gateway, RouteError, Routed, error_body};

/// The response header naming the endpoint that served the request.
pub const SERVED_HEADER: &str = "x-gateway-destination-endpoint-served";

/// What the proxy needs.
#[derive(Debug)]
pub struct ProxyState {
    gateway: Arc<Gateway>,
    client: UpstreamClient,
    cfg: ProxyConfig,
}

impl ProxyState {
    /// A proxy over `gateway`.
    pub fn new(gateway: Arc<Gateway>, cfg: ProxyConfig) -> Self {
        Self { gateway, client: upstream_client(cfg.connect_timeout_ms), cfg }
    }
}

/// An HTTP/1 client for endpoints: keep-alive, no Nagle delay, bounded connects.
pub(crate) fn upstream_client(connect_timeout_ms: u64) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_millis(connect_timeout_ms)));
    Client::builder(hyper_util::rt::TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector)
}

/// The proxy router.
pub fn app(state: Arc<ProxyState>) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are for one connection only; never forwarded.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"];

/// Copies end-to-end headers (dropping hop-by-hop ones and any the `Connection` header names).
pub(crate) fn end_to_end(from: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    let mut out = HeaderMap::with_capacity(from.len());
    for (k, v) in from {
        let n = k.as_str();
        if !HOP_BY_HOP.contains(&n) && !named.iter().any(|c| c == n) && k != header::CONTENT_LENGTH {
            out.append(k.clone(), v.clone());
        }
    }
    out
}

/// A random (version 4) UUID.
pub fn new_request_id() -> String {
    let v = fastrand::u128(..) & !(0xf000 << 64) | (0x4000 << 64);
    let v = v & !(0xc000 << 48) | (0x8000 << 48);
    let h = format!("{v:032x}");
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

pub(crate) fn json_error(status: u16, message: &str, code: &str) -> Response {
    let s = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    (s, [(header::CONTENT_TYPE, "application/json")], error_body(status, message, code, None)).into_response()
}

fn route_error(e: &RouteError) -> Response {
    let mut r = crate::admin::error_response(e);
    if e.status() == 429 {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

async fn handle(State(st): State<Arc<ProxyState>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    match (req.method(), ApiKind::from_path(&path)) {
        (&Method::POST, Some(api)) => forward(&st, api, req).await,
        (&Method::GET, None) if path == "/v1/models" => models(&st),
        (_, None) if path.starts_with("/v1/") => passthrough(&st, req).await,
        _ => json_error(404, &format!("no route for {} {path}", req.method()), "not_found"),
    }
}

/// `GET /v1/models`: every pool's models and the adapters their endpoints serve.
fn models(st: &ProxyState) -> Response {
    let mut data = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for pool in st.gateway.pools() {
        for m in pool.models() {
            if seen.insert(m.clone()) {
                data.push(json!({"id": m, "object": "model", "owned_by": "kvgate", "root": m, "parent": null}));
            }
        }
        let parent = pool.models().first();
        for a in &pool.snapshot().adapters {
            if seen.insert(a.clone()) {
                data.push(json!({"id": a, "object": "model", "owned_by": "kvgate", "root": a, "parent": parent}));
            }
        }
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Reads a whole request body of at most `limit` bytes.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, RequestError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(RequestError::TooLarge { size: limit + 1, limit })
        }
        Err(_) => Err(RequestError::InvalidField {
            field: "body".into(),
            detail: "the request body could not be read".into(),
        }),
    }
}

/// Gives the request an `x-request-id` if it has none.
pub(crate) fn ensure_request_id(headers: &mut HeaderMap) {
    if !headers.contains_key("x-request-id")
        && let Ok(v) = HeaderValue::from_str(&new_request_id())
    {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
}

/// A request to an endpoint: `headers` plus its `Host` and, for a rank that shares its port with
/// others, the rank pin.
pub(crate) fn upstream_request(
    method: Method,
    address: std::net::SocketAddr,
    path: &str,
    mut headers: HeaderMap,
    rank: Option<u32>,
    body: Bytes,
) -> Result<hyper::Request<Full<Bytes>>, axum::http::Error> {
    if let Ok(v) = HeaderValue::from_str(&address.to_string()) {
        headers.insert(header::HOST, v);
    }
    if let Some(r) = rank {
        headers.insert(HeaderName::from_static(DP_RANK_HEADER), HeaderValue::from(r));
    }
    let mut req =
        hyper::Request::builder().method(method).uri(format!("http://{address}{path}")).body(Full::new(body))?;
    *req.headers_mut() = headers;
    Ok(req)
}

/// Other `/v1/*` requests: to an endpoint of the pool named by the body's `model`.
async fn passthrough(st: &ProxyState, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match read_body(body, st.gateway.max_body_bytes()).await {
        Ok(b) => b,
        Err(e) => return route_error(&e.into()),
    };
    let Some(model) = crate::request::model_of(&body) else {
        return json_error(
            404,
            &format!("no route for {} {}: no `model` to choose a pool by", parts.method, parts.uri.path()),
            "not_found",
        );
    };
    match st.gateway.decide_by_model(&model, None, crate::route::candidates_for(st.cfg.attempts.max(1))) {
        Ok(routed) => send(st, routed, parts.method, parts.uri, parts.headers, body).await,
        Err(e) => route_error(&e),
    }
}

async fn forward(st: &ProxyState, api: ApiKind, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match read_body(body, st.gateway.max_body_bytes()).await {
        Ok(b) => b,
        Err(e) => {
            st.gateway.count("unknown", "unknown", None, e.status(), e.code());
            return route_error(&e.into());
        }
    };
    match st.gateway.decide(api, &body, None, crate::route::candidates_for(st.cfg.attempts.max(1))) {
        Ok(routed) => send(st, routed, parts.method, parts.uri, parts.headers, body).await,
        Err(e) => {
            st.gateway.count("unknown", "unknown", None, e.status(), e.code());
            route_error(&e)
        }
    }
}

/// Why an attempt failed before the response started.
enum Failure {
    Connect(String),
    Timeout,
    Status(Response),
}

/// Sends the request to the decision's targets in order until one answers.
async fn send(
    st: &ProxyState,
    mut routed: Routed,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut fwd = end_to_end(&headers);
    disagg::strip_placement(&mut fwd);
    ensure_request_id(&mut fwd);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let attempts = st.cfg.attempts.max(1);
    let pool = routed.pool.clone();
    let mut body = body;
    if let Some(b) = routed.sanitized(&body) {
        body = Bytes::from(b);
    }
    if let Some(p) = routed.decision().prefill {
        let leg = PrefillLeg {
            address: p.address,
            header_rank: p.header_rank,
            path: &path,
            headers: &fwd,
            timeout: Duration::from_millis(st.cfg.prefill_timeout_ms),
        };
        match disagg::handoff(&st.client, leg, &body).await {
            Ok(decode) => {
                pool.report(p.id, true);
                routed.prefilled();
                body = Bytes::from(decode);
            }
            Err(f) => {
                if f.endpoint_failed() {
                    pool.report(p.id, false);
                }
                tracing::warn!(pool = pool.name(), prefill = %p.address, reason = %f, "prefill hand-off failed; decode endpoint prefills");
                routed.prefill_failed(f.reason(), st.gateway.telemetry());
            }
        }
        // The prefill endpoint's part is over either way.
        routed.prefill_guard = None;
    }
    let mut last = Failure::Connect("no endpoint was tried".into());
    // Servers that could not be reached: their other ranks are not worth an attempt.
    let mut unreachable: Vec<std::net::SocketAddr> = Vec::new();
    let mut tried = 0;
    for k in 0..routed.decision().targets.len() {
        let target = routed.decision().targets[k];
        if tried == attempts {
            break;
        }
        if unreachable.contains(&target.address) {
            continue;
        }
        tried += 1;
        if k > 0 {
            routed.retarget(k);
        }
        let req =
            upstream_request(method.clone(), target.address, &path, fwd.clone(), target.header_rank, body.clone());
        let Ok(req) = req else {
            return json_error(500, "could not build the upstream request", "internal_error");
        };
        let attempt =
            tokio::time::timeout(Duration::from_millis(st.cfg.first_byte_timeout_ms), st.client.request(req)).await;
        let resp = match attempt {
            Err(_) => {
                pool.report(target.id, false);
                last = Failure::Timeout;
                continue;
            }
            Ok(Err(e)) => {
                pool.report(target.id, false);
                unreachable.push(target.address);
                last = Failure::Connect(e.to_string());
                continue;
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            pool.report(target.id, status == StatusCode::TOO_MANY_REQUESTS);
            last = Failure::Status(relay(resp, Some(target.address), None, st.cfg.idle_timeout_ms));
            continue;
        }
        pool.report(target.id, true);
        st.gateway.count(pool.name(), &routed.model, Some(routed.decision().kind), status.as_u16(), "");
        let prefiller = routed.decision().prefill.map(|p| p.address);
        let Routed { guard, .. } = routed;
        let mut out = relay(resp, Some(target.address), Some(guard), st.cfg.idle_timeout_ms);
        if let Some(p) = prefiller
            && let Ok(v) = HeaderValue::from_str(&p.to_string())
        {
            out.headers_mut().insert(HeaderName::from_static(PREFILLER_HEADER), v);
        }
        return out;
    }
    let resp = match last {
        Failure::Status(r) => r,
        Failure::Timeout => json_error(504, "the endpoint did not answer in time", "upstream_timeout"),
        Failure::Connect(e) => {
            tracing::warn!(error = %e, pool = pool.name(), "no endpoint could be reached");
            json_error(502, "no endpoint could be reached", "upstream_unreachable")
        }
    };
    st.gateway.count(
        pool.name(),
        &routed.model,
        Some(routed.decision().kind),
        resp.status().as_u16(),
        "upstream_error",
    );
    resp
}

/// The client's response: the endpoint's status and end-to-end headers, the served-by header
/// (when given),
/// and its body relayed frame by frame (bounded by `idle_ms` between frames). The in-flight
/// guard lives as long as the body.
pub(crate) fn relay(
    resp: hyper::Response<hyper::body::Incoming>,
    served: Option<std::net::SocketAddr>,
    guard: Option<InFlightGuard>,
    idle_ms: u64,
) -> Response {
    let (parts, body) = resp.into_parts();
    struct S {
        body: hyper::body::Incoming,
        guard: Option<InFlightGuard>,
        idle: Duration,
    }
    let s = S { body, guard, idle: Duration::from_millis(idle_ms) };
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            match tokio::time::timeout(s.idle, s.body.frame()).await {
                Err(_) => return Some((Err(std::io::Error::other("the endpoint went silent")), s)),
                Ok(None) => return None,
                Ok(Some(Err(e))) => return Some((Err(std::io::Error::other(e)), s)),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if let Some(g) = s.guard.as_mut() {
                            g.prefill_done();
                        }
                        return Some((Ok::<Bytes, std::io::Error>(data), s));
                    }
                    // Trailers: not relayed.
                }
            }
        }
    });
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = parts.status;
    *out.headers_mut() = end_to_end(&parts.headers);
    if let Some(served) = served
        && let Ok(v) = HeaderValue::from_str(&served.to_string())
    {
        out.headers_mut().insert(HeaderName::from_static(SERVED_HEADER), v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("host", HeaderValue::from_static("client"));
        h.insert("authorization", HeaderValue::from_static("Bearer t"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        let out = end_to_end(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["authorization", "x-request-id"]);
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(id, new_request_id());
    }
}
