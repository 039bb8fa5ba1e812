//! HTTP pieces every front-end shares: the header names of the gateway protocol, the upstream
//! client and request builder, request ids, hop-by-hop filtering, body reading, refusals as
//! OpenAI-shaped responses, and the relay of an endpoint's answer to the client.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio_util::sync::CancellationToken;

use crate::front::listen::SlowBody;
use crate::gateway::answer::Answer;
use crate::gateway::budget::Reservation;
use crate::gateway::error::RouteError;
use crate::gateway::events::Event;
use crate::gateway::outcome::Routed;
use crate::gateway::paths::PathRefusal;
use crate::gateway::pool::flow::Class;
use crate::routing::request::RequestError;
use crate::routing::schedule::Decision;

/// Request header (and `envoy.lb` metadata key) carrying the pick.
pub(crate) const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// The endpoint that served: a proxy response header, and the metadata key where a gateway
/// reports it to ext_proc.
pub(crate) const SERVED_HEADER: &str = "x-gateway-destination-endpoint-served";
/// Conformance-test header forcing the pick among the listed endpoints.
pub(crate) const TEST_SELECTION_HEADER: &str = "test-epp-endpoint-selection";
/// The request id header.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";

/// Request header naming the prefill endpoint (`ip:port`) for the decode side; on a proxy
/// response, the prefill endpoint that was used.
pub(crate) const PREFILLER_HEADER: &str = "x-prefiller-host-port";
/// Request header for the decode side: the data-parallel rank to pin on the prefill endpoint,
/// when that endpoint balances its ranks behind one port.
pub(crate) const PREFILLER_RANK_HEADER: &str = "x-prefiller-data-parallel-rank";
/// Request header pinning a request to one data-parallel rank of a vLLM server that balances
/// its ranks internally.
pub(crate) const DP_RANK_HEADER: &str = "x-data-parallel-rank";

/// Request header for the decode side's sidecar: the decision its prefill leg is reported under
/// (kvgate's picker API, `Report`).
pub(crate) const DECISION_HEADER: &str = "x-kvgate-decision-id";

/// The headers that say where a request is placed: kvgate's to set, never a client's.
const PLACEMENT_HEADERS: [&str; 4] = [PREFILLER_HEADER, PREFILLER_RANK_HEADER, DP_RANK_HEADER, DECISION_HEADER];

/// Where a decision places its request, as headers: the destination list and each placement
/// header, set for this decision or to be removed from what the client sent.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Placement {
    /// The `x-gateway-destination-endpoint` value: distinct addresses, target first.
    pub destination: String,
    /// Headers to set.
    pub set: Vec<(&'static str, String)>,
    /// Placement headers to remove.
    pub remove: Vec<&'static str>,
}

impl Placement {
    /// The placement of `d`, listing at most `limit` addresses. Ranks sharing one address
    /// appear once; a rank pin is for the target's server only, so a pinned request gets no
    /// fallbacks (another server would get the wrong rank, or one it does not have).
    /// `decision_id` names the decision for a sidecar's report of the prefill leg.
    pub(crate) fn of(d: &Decision, limit: usize, decision_id: Option<&str>) -> Self {
        let limit = if d.primary().header_rank.is_some() { 1 } else { limit.max(1) };
        let mut addrs: Vec<SocketAddr> = Vec::with_capacity(limit);
        for t in &d.targets {
            if addrs.len() < limit && !addrs.contains(&t.address) {
                addrs.push(t.address);
            }
        }
        let destination = addrs.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(",");
        let mut p = Self { destination, ..Self::default() };
        let mut put = |name: &'static str, value: Option<String>| match value {
            Some(v) => p.set.push((name, v)),
            None => p.remove.push(name),
        };
        put(DP_RANK_HEADER, d.primary().header_rank.map(|r| r.to_string()));
        put(PREFILLER_HEADER, d.prefill.map(|t| t.address.to_string()));
        put(PREFILLER_RANK_HEADER, d.prefill.and_then(|t| t.header_rank).map(|r| r.to_string()));
        put(DECISION_HEADER, d.prefill.and(decision_id).map(str::to_owned));
        p
    }
}

/// Removes any placement header from `headers`.
pub(crate) fn strip_placement(headers: &mut HeaderMap) {
    for h in PLACEMENT_HEADERS {
        headers.remove(h);
    }
}

/// Flow control's request headers, each with its legacy name: the objective (its priority), the
/// flow (tenant) and the TTFT objective (EDF's deadline).
pub(crate) const FLOW_HEADERS: [[&str; 2]; 3] = [
    ["x-llm-d-inference-objective", "x-gateway-inference-objective"],
    ["x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id"],
    ["x-llm-d-slo-ttft-ms", "x-slo-ttft-ms"],
];

/// Every name of flow control's request headers.
pub(crate) fn flow_header_names() -> impl Iterator<Item = &'static str> {
    FLOW_HEADERS.into_iter().flatten()
}

/// Headers of the gateway protocol, and a client's credentials for a proxy: what a client sends
/// under these names (or flow control's) is for kvgate (or nobody), never for an endpoint.
const GATEWAY_HEADERS: [&str; 4] = [DESTINATION_HEADER, SERVED_HEADER, TEST_SELECTION_HEADER, "proxy-authorization"];

/// Of those, the ones Envoy must drop from a request it sends on (it sets the destination
/// itself, from kvgate's answer); flow control's go too.
pub(crate) const CLIENT_ONLY_HEADERS: [&str; 3] = [SERVED_HEADER, TEST_SELECTION_HEADER, "proxy-authorization"];

/// A request's flow-control headers, as `(objective, flow, TTFT objective)`: each under its
/// name, else its legacy one (`header` looks a lowercase name up).
pub(crate) fn flow_headers<'h>(header: impl Fn(&str) -> Option<&'h str>) -> [Option<&'h str>; 3] {
    FLOW_HEADERS.map(|[name, legacy]| header(name).or_else(|| header(legacy)).map(str::trim).filter(|v| !v.is_empty()))
}

/// Flow control's view of a request from its headers' values ([`flow_headers`]).
pub(crate) fn flow_class<'h>(values: &[Option<&'h str>; 3]) -> Class<'h> {
    Class { objective: values[0], flow: values[1], slo_ttft_ms: values[2].and_then(|v| v.parse().ok()) }
}

/// Removes the gateway's own headers (and `Proxy-Authorization`) a client sent.
pub(crate) fn strip_gateway_headers(headers: &mut HeaderMap) {
    for h in GATEWAY_HEADERS.into_iter().chain(flow_header_names()) {
        headers.remove(h);
    }
}

/// Appends the client kvgate saw to `X-Forwarded-For` and `Forwarded` (RFC 7239). Entries a
/// client sent stay in front, as earlier hops claim them; the last entry is kvgate's own word.
pub(crate) fn append_forwarded(headers: &mut HeaderMap, client: IpAddr) {
    let node = match client {
        IpAddr::V4(ip) => format!("for={ip};proto=http"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto=http"),
    };
    for (name, entry) in [(X_FORWARDED_FOR, client.to_string()), (header::FORWARDED, node)] {
        let earlier: Vec<&str> = headers
            .get_all(&name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let value = if earlier.is_empty() { entry } else { format!("{}, {entry}", earlier.join(", ")) };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

/// `X-Forwarded-For`.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The HTTP client the front-ends use for upstream requests.
pub(crate) type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// How long an idle upstream connection is kept for reuse: under the 5 s after which vLLM's
/// HTTP server (uvicorn's `--timeout-keep-alive`) closes one, so kvgate does not send a request
/// on a connection the endpoint is closing at that moment.
pub(crate) const UPSTREAM_IDLE: Duration = Duration::from_secs(4);

/// An HTTP/1 client for endpoints: keep-alive, no Nagle delay, bounded connects.
pub(crate) fn upstream_client(connect_timeout_ms: u64) -> UpstreamClient {
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(UPSTREAM_IDLE)
        .build(upstream_connector(connect_timeout_ms))
}

/// A client that keeps no connection: each request goes on a new one (the retry of a request
/// whose pooled connection broke under it).
pub(crate) fn fresh_connection_client(connect_timeout_ms: u64) -> UpstreamClient {
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(upstream_connector(connect_timeout_ms))
}

fn upstream_connector(connect_timeout_ms: u64) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_millis(connect_timeout_ms)));
    connector
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
pub(crate) fn new_request_id() -> String {
    let v = fastrand::u128(..) & !(0xf000 << 64) | (0x4000 << 64);
    let v = v & !(0xc000 << 48) | (0x8000 << 48);
    let h = format!("{v:032x}");
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Gives the request an `x-request-id` if it has none.
pub(crate) fn ensure_request_id(headers: &mut HeaderMap) {
    if !headers.contains_key(REQUEST_ID_HEADER)
        && let Ok(v) = HeaderValue::from_str(&new_request_id())
    {
        headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
    }
}

/// Reads a whole request body of at most `limit` bytes, reserving each chunk in `budget` as it
/// arrives (the reservation holds the body's bytes until the caller drops it).
pub(crate) async fn read_body(body: Body, limit: usize, budget: &mut Reservation) -> Result<Bytes, RouteError> {
    let mut body = body;
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match e.into_inner().downcast::<SlowBody>() {
            Ok(slow) => RouteError::SlowBody(slow.to_string()),
            Err(e) => RequestError::InvalidField {
                field: "body".into(),
                detail: format!("the request body could not be read: {e}"),
            }
            .into(),
        })?;
        let Ok(data) = frame.into_data() else { continue };
        if out.len() + data.len() > limit {
            return Err(RequestError::TooLarge { size: out.len() + data.len(), limit }.into());
        }
        budget.grow(data.len())?;
        out.extend_from_slice(&data);
    }
    Ok(out.freeze())
}

/// A request to an endpoint: `headers` plus its `Host` and, for a rank that shares its port with
/// others, the rank pin.
pub(crate) fn upstream_request(
    method: Method,
    address: SocketAddr,
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

/// One of kvgate's own answers as an HTTP response: its status, its JSON body (none for an
/// empty answer) and its headers.
pub(crate) fn answer(a: &Answer) -> Response {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = if a.body.is_empty() {
        status.into_response()
    } else {
        (status, [(header::CONTENT_TYPE, "application/json")], a.body.clone()).into_response()
    };
    for (k, v) in a.all_headers() {
        r.headers_mut().insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    if a.close {
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The 404 of a listener's unknown paths.
pub(crate) async fn no_route(method: Method, uri: axum::http::Uri) -> Response {
    answer(&Answer::from(&PathRefusal::not_found(method.as_str(), uri.path())))
}

/// The 405 of a known path asked with a method it does not take.
pub(crate) async fn wrong_method(method: Method, uri: axum::http::Uri) -> Response {
    answer(&Answer::from(&PathRefusal::method_not_allowed(method.as_str(), uri.path(), None)))
}

/// An OpenAI-shaped error response.
pub(crate) fn json_error(status: u16, message: &str, code: &'static str) -> Response {
    answer(&Answer::error(status, message, code, None))
}

/// Whether a response is a server-sent event stream.
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The client's response: the endpoint's status and end-to-end headers, the served-by header
/// (when given), and its body relayed frame by frame (bounded by `idle_ms` between frames, and
/// cut when `stopped` is cancelled: the endpoint answers nothing any more). A broken body ends
/// the client's response with an error (the connection closes without the body's end).
/// A routed request lives as long as the body and is told each part as it passes.
pub(crate) fn relay(
    resp: hyper::Response<hyper::body::Incoming>,
    served: Option<SocketAddr>,
    routed: Option<Routed>,
    idle_ms: u64,
    stopped: Option<CancellationToken>,
) -> Response {
    let (parts, body) = resp.into_parts();
    struct S {
        body: hyper::body::Incoming,
        routed: Option<Routed>,
        idle: Duration,
        stopped: Option<CancellationToken>,
    }
    let event_stream = is_event_stream(&parts.headers);
    let routed = routed.map(|mut r| {
        r.on(Event::Started { status: parts.status.as_u16(), event_stream, streamed: true });
        r
    });
    let s = S { body, routed, idle: Duration::from_millis(idle_ms), stopped };
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            let Some(next) = unless_stopped(s.stopped.as_ref(), tokio::time::timeout(s.idle, s.body.frame())).await
            else {
                return Some((Err(std::io::Error::other("the endpoint stopped answering")), s));
            };
            match next {
                Err(_) => return Some((Err(std::io::Error::other("the endpoint went silent")), s)),
                Ok(None) => {
                    if let Some(mut r) = s.routed.take() {
                        r.on(Event::Finished { status: None, usage: None, body_bytes: None });
                    }
                    return None;
                }
                Ok(Some(Err(e))) => return Some((Err(std::io::Error::other(e)), s)),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if let Some(r) = s.routed.as_mut() {
                            r.on(Event::Body(&data));
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

/// `work`'s output, unless `stopped` is cancelled first (`None`).
pub(crate) async fn unless_stopped<T>(
    stopped: Option<&CancellationToken>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    match stopped {
        Some(token) => tokio::select! {
            biased;
            out = work => Some(out),
            () = token.cancelled() => None,
        },
        None => Some(work.await),
    }
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

    #[test]
    fn forwarded_headers_are_appended_and_gateway_headers_dropped() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.append("x-forwarded-for", HeaderValue::from_static("5.6.7.8"));
        h.insert("x-gateway-destination-endpoint", HeaderValue::from_static("10.0.0.9:8000"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("authorization", HeaderValue::from_static("Bearer t"));
        strip_gateway_headers(&mut h);
        append_forwarded(&mut h, "127.0.0.1".parse().expect("ip"));
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 127.0.0.1");
        assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http");
        assert!(!h.contains_key("x-gateway-destination-endpoint") && !h.contains_key("proxy-authorization"));
        assert_eq!(h["authorization"], "Bearer t");
        let mut v6 = HeaderMap::new();
        v6.insert("forwarded", HeaderValue::from_static("for=192.0.2.60;proto=https"));
        append_forwarded(&mut v6, "::1".parse().expect("ip"));
        assert_eq!(v6["forwarded"], "for=192.0.2.60;proto=https, for=\"[::1]\";proto=http");
        assert_eq!(v6["x-forwarded-for"], "::1");
    }
}
