//! The OpenAI reverse proxy: takes a request, asks the one decision path where it goes, and
//! forwards it there — the body byte for byte, the answer chunk by chunk as it arrives.
//!
//! Failures before an endpoint's response starts (refused, reset, timed out, 5xx, 429, or the
//! endpoint found stopped — ejected as silent — while the request waited) move the request to
//! the decision's next candidate, up to `proxy.attempts` endpoints; once the client has received
//! a byte, nothing is retried, and a response from an endpoint found stopped is cut. The
//! request's in-flight count moves with it and is released when the response ends, fails, or the
//! client goes away (dropping the response drops the upstream request too, which is how vLLM
//! learns of the abort).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;

use crate::front::handoff::{self, Fallback, PrefillLeg};
use crate::front::http::{
    PREFILLER_HEADER, UpstreamClient, answer, append_forwarded, end_to_end, ensure_request_id, flow_class,
    flow_headers, fresh_connection_client, json_error, read_body, relay, strip_gateway_headers, strip_placement,
    unless_stopped, upstream_client, upstream_request,
};
use crate::gateway::answer::Answer;
use crate::gateway::budget::Client;
use crate::gateway::config::ProxyConfig;
use crate::gateway::error::{RouteError, error_chain};
use crate::gateway::events::{Event, Failure, Prefill};
use crate::gateway::facade::{Gateway, Input, RouteRequest, SubsetHint};
use crate::gateway::outcome::Routed;
use crate::gateway::paths::Place;
use crate::routing::request::RequestError;
use crate::routing::schedule::Target;

/// What the proxy needs.
#[derive(Debug)]
pub(crate) struct ProxyState {
    gateway: Arc<Gateway>,
    client: UpstreamClient,
    /// For the one resend of a request whose pooled connection broke before its answer.
    fresh: UpstreamClient,
    cfg: ProxyConfig,
    /// Requests waiting for an endpoint's answer.
    waiting: AtomicUsize,
    /// Of those, the ones on their second or later attempt.
    retrying: AtomicUsize,
}

impl ProxyState {
    /// A proxy over `gateway`.
    pub(crate) fn new(gateway: Arc<Gateway>, cfg: ProxyConfig) -> Self {
        let client = upstream_client(cfg.connect_timeout_ms);
        let fresh = fresh_connection_client(cfg.connect_timeout_ms);
        Self { gateway, client, fresh, cfg, waiting: AtomicUsize::new(0), retrying: AtomicUsize::new(0) }
    }

    /// Whether a request may retry: it holds one place in the budget (`permit`) from its first
    /// retry until it has its answer, taken here if one is left.
    fn hold_retry<'a>(&'a self, permit: &mut Option<Counted<'a>>) -> bool {
        if permit.is_none() {
            *permit = self.retry_permit();
        }
        permit.is_some()
    }

    /// Takes a place in the retry budget, if one is left.
    fn retry_permit(&self) -> Option<Counted<'_>> {
        let waiting = self.waiting.load(Ordering::Relaxed);
        let budget =
            (waiting * self.cfg.retry_budget_percent as usize / 100).max(self.cfg.min_retry_concurrency as usize);
        let permit = Counted::new(&self.retrying);
        (permit.value <= budget).then_some(permit)
    }
}

/// One unit of a counter, given back when dropped.
struct Counted<'a> {
    counter: &'a AtomicUsize,
    /// The counter with this unit.
    value: usize,
}

impl<'a> Counted<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        Self { value: counter.fetch_add(1, Ordering::Relaxed) + 1, counter }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The proxy router.
pub(crate) fn app(state: Arc<ProxyState>) -> Router {
    Router::new().fallback(handle).with_state(state)
}

async fn handle(State(st): State<Arc<ProxyState>>, req: Request) -> Response {
    match st.gateway.place(req.method().as_str(), req.uri().path()) {
        Ok(place) => forward(&st, place, req).await,
        Err(a) => answer(&a),
    }
}

/// Routes a request through the gateway, placed as the path policy says, and sends it.
async fn forward(st: &ProxyState, place: Place, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let Some(refused) = refuse_before_reading(&st.gateway, &parts.headers) {
        return refused;
    }
    let client = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    // Held until the request has its answer (retries resend the body), as the client's: the
    // TCP peer's share of the budget bounds what it holds over all its connections.
    let budget = st.gateway.body_budget();
    let mut held = client.map_or_else(|| budget.reservation(), |ip| budget.reservation_for(Client::of(ip)));
    let body = match read_body(body, st.gateway.max_body_bytes(), &mut held).await {
        Ok(b) => b,
        Err(e) => return answer(&st.gateway.refuse(&e)),
    };
    let flow = flow_headers(|name| parts.headers.get(name).and_then(|v| v.to_str().ok()));
    let class = flow_class(&flow);
    let places = st.cfg.attempts.max(1);
    let route = RouteRequest { place, input: Input::Body(&body), subset: SubsetHint::Any, places, class };
    // While it waits in flow control's queue the client holds its connection; one that leaves
    // drops this future, and with it its place.
    match st.gateway.route(route).await {
        Ok(routed) => send(st, routed, parts.method, parts.uri, parts.headers, client, body).await,
        Err(a) => answer(&a),
    }
}

/// The answer to a request whose headers alone refuse it, before a byte of its body is read (so
/// an `Expect: 100-continue` client is never told to send it): a declared length over the
/// limit (413), or a transfer coding other than `chunked` (501; kvgate does not decode one).
fn refuse_before_reading(gateway: &Gateway, headers: &HeaderMap) -> Option<Response> {
    let limit = gateway.max_body_bytes();
    let declared = headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse().ok());
    if let Some(size) = declared.filter(|&n: &usize| n > limit) {
        let e = RouteError::BadRequest(RequestError::TooLarge { size, limit });
        return Some(answer(&gateway.refuse(&e)));
    }
    let codings = headers.get_all(axum::http::header::TRANSFER_ENCODING).iter();
    let other = codings
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case("chunked"))?;
    let message = format!("Transfer-Encoding `{other}` is not supported; send the body plain or chunked");
    Some(answer(&Answer { close: true, ..Answer::error(501, message, "not_implemented", None) }))
}

/// Whether an upstream error is a connection that closed or reset before any answer — not a
/// refused connect, and not an answer that could not be parsed.
fn connection_broke(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return true;
            }
            if h.is_parse() || h.is_user() {
                return false;
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        cause = c.source();
    }
    false
}

/// Why an attempt failed before the response started.
enum Attempt {
    Connect(String),
    Timeout,
    Status(Response),
}

impl Attempt {
    /// The client's answer when this was the last attempt.
    fn answer(self, pool: &str) -> Response {
        match self {
            Attempt::Status(r) => r,
            Attempt::Timeout => json_error(504, "the endpoint did not answer in time", "upstream_timeout"),
            Attempt::Connect(e) => {
                tracing::warn!(error = %e, pool, "no endpoint could be reached");
                json_error(502, "no endpoint could be reached", "upstream_unreachable")
            }
        }
    }
}

/// The headers an endpoint gets: the client's end-to-end ones, less placement and gateway
/// headers, with the client appended to the forwarding headers and a request id.
fn forwarded_headers(headers: &HeaderMap, client: Option<IpAddr>) -> HeaderMap {
    let mut fwd = end_to_end(headers);
    strip_placement(&mut fwd);
    strip_gateway_headers(&mut fwd);
    if let Some(ip) = client {
        append_forwarded(&mut fwd, ip);
    }
    ensure_request_id(&mut fwd);
    fwd
}

/// Sends the request to the decision's targets in order until one answers.
async fn send(
    st: &ProxyState,
    mut routed: Routed,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    client: Option<IpAddr>,
    body: Bytes,
) -> Response {
    let fwd = forwarded_headers(&headers, client);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let attempts = st.cfg.attempts.max(1);
    let mut body = body;
    if let Some(b) = routed.take_body() {
        body = Bytes::from(b);
    }
    if let Some(p) = routed.decision().prefill {
        body = prefill_first(st, &mut routed, p, &path, &fwd, body).await;
    }
    let _waiting = Counted::new(&st.waiting);
    let mut retry_permit = None;
    let mut last = Attempt::Connect("no endpoint was tried".into());
    // Servers that could not be reached: their other ranks are not worth an attempt.
    let mut unreachable: Vec<SocketAddr> = Vec::new();
    let mut tried = 0;
    for k in 0..routed.decision().targets.len() {
        let target = routed.decision().targets[k];
        if tried == attempts {
            break;
        }
        if unreachable.contains(&target.address) {
            continue;
        }
        if tried > 0 {
            let allowed = st.hold_retry(&mut retry_permit);
            routed.count_retry(allowed);
            if !allowed {
                break;
            }
        }
        tried += 1;
        if k > 0 {
            routed.on(Event::Resent(k));
        }
        let request =
            || upstream_request(method.clone(), target.address, &path, fwd.clone(), target.header_rank, body.clone());
        let Ok(req) = request() else {
            return json_error(500, "could not build the upstream request", "internal_error");
        };
        let first_byte = Duration::from_millis(st.cfg.first_byte_timeout_ms);
        let sent = std::time::Instant::now();
        // Cancelled if the endpoint is found stopped (ejected as silent) before it answers.
        let stopped = routed.stopped(target.id);
        let mut attempt =
            unless_stopped(stopped.as_ref(), tokio::time::timeout(first_byte, st.client.request(req))).await;
        // A connection closed or reset under the request before any answer (a kept-alive one
        // the endpoint closed as the request went out, say) says nothing of the endpoint: the
        // request goes again, once, on a new connection, within the same first-byte time and as
        // a retry under the budget. (A request that never left a reused connection is resent by
        // the client itself; a malformed answer is not resent.)
        if let Some(Ok(Err(e))) = &attempt
            && connection_broke(e)
            && st.hold_retry(&mut retry_permit)
            && let Ok(req) = request()
        {
            tracing::debug!(endpoint = %target.address, error = %error_chain(e), "connection broke before an answer; resending on a new one");
            routed.count_retry(true);
            let left = first_byte.saturating_sub(sent.elapsed());
            attempt = unless_stopped(stopped.as_ref(), tokio::time::timeout(left, st.fresh.request(req))).await;
        }
        let resp = match attempt {
            // Nothing of the answer reached the client, and the endpoint will send none: the
            // request goes to the next candidate, as for a connect that failed (work it may
            // have begun is abandoned with the connection, and it answers nothing meanwhile).
            None => {
                tracing::debug!(endpoint = %target.address, "the endpoint stopped answering; trying the next one");
                routed.on(Event::Failed(Failure::Unreachable));
                unreachable.push(target.address);
                last = Attempt::Connect("the endpoint stopped answering".into());
                continue;
            }
            Some(Err(_)) => {
                routed.on(Event::Failed(Failure::TimedOut));
                last = Attempt::Timeout;
                continue;
            }
            Some(Ok(Err(e))) => {
                routed.on(Event::Failed(Failure::Unreachable));
                unreachable.push(target.address);
                last = Attempt::Connect(error_chain(&e));
                continue;
            }
            Some(Ok(Ok(r))) => r,
        };
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            // The client gets this answer if no other endpoint gives a better one.
            routed.on(Event::Failed(Failure::Status(status.as_u16())));
            last = Attempt::Status(relay(resp, Some(target.address), None, st.cfg.idle_timeout_ms, None));
            continue;
        }
        let prefiller = routed.decision().prefill.map(|p| p.address);
        let mut out = relay(resp, Some(target.address), Some(routed), st.cfg.idle_timeout_ms, stopped);
        if let Some(p) = prefiller
            && let Ok(v) = HeaderValue::from_str(&p.to_string())
        {
            out.headers_mut().insert(HeaderName::from_static(PREFILLER_HEADER), v);
        }
        return out;
    }
    // The request is counted with its last attempt's failure as `routed` goes.
    last.answer(routed.pool_name())
}

/// Runs the prefill leg of a P/D decision and returns the decode leg's body; when the leg fails,
/// the decode endpoint prefills the original body itself.
async fn prefill_first(
    st: &ProxyState,
    routed: &mut Routed,
    p: Target,
    path: &str,
    fwd: &HeaderMap,
    body: Bytes,
) -> Bytes {
    let leg = PrefillLeg {
        address: p.address,
        header_rank: p.header_rank,
        path,
        headers: fwd,
        timeout: Duration::from_millis(st.cfg.prefill_timeout_ms),
    };
    // An endpoint found stopped meanwhile answers no prefill either: fall back at once.
    let stopped = routed.stopped(p.id);
    let leg = unless_stopped(stopped.as_ref(), handoff::handoff(&st.client, leg, &body)).await;
    let leg = leg.unwrap_or_else(|| Err(Fallback::Unreachable("it stopped answering".into())));
    match leg {
        Ok(decode) => {
            routed.on(Event::Prefill(Prefill::Succeeded));
            Bytes::from(decode)
        }
        Err(f) => {
            tracing::warn!(pool = routed.pool_name(), prefill = %p.address, reason = %f, "prefill hand-off failed; decode endpoint prefills");
            routed.on(Event::Prefill(Prefill::Failed(f.kind())));
            body
        }
    }
}
