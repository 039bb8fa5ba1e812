//! The Envoy ext_proc endpoint picker: the Gateway API Inference Extension's endpoint-picker
//! protocol (v1.0.0) over Envoy's `ExternalProcessor` gRPC stream, one stream per HTTP request.
//!
//! Request phase. In `FULL_DUPLEX_STREAMED` mode Envoy sends the headers and then the body
//! without waiting; kvgate holds its answer to the headers until the body's last chunk, decides
//! through the one decision path, and then sends the headers answer (destination header and the
//! same value in `envoy.lb` dynamic metadata, route cache cleared) followed by the whole body
//! again in chunks of at most 62,000 bytes. In `BUFFERED` mode the headers are answered at once
//! and the destination rides on the body answer. A request without a body is decided at its
//! headers. A refusal is an `ImmediateResponse` with an OpenAI-shaped body and
//! `x-llm-d-request-dropped-reason`.
//!
//! Response phase. Chunks are echoed back at once (full duplex) or let through (streamed);
//! usage is read from the JSON body or the SSE `data:` lines (a line may span chunks); the
//! served endpoint, when the gateway reports it, moves the in-flight count to the right
//! endpoint; the count is released when the response ends or the stream goes away.

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders, ImmediateResponse,
    ProcessingRequest, ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation::Mutation,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::disagg::{DP_RANK_HEADER, PREFILLER_HEADER, PREFILLER_RANK_HEADER};
use crate::proxy::new_request_id;
use crate::request::ApiKind;
use crate::route::{Gateway, RouteError, Routed};
use crate::schedule::Subset;

/// Header (and `envoy.lb` metadata key) carrying the pick.
pub const DEST: &str = "x-gateway-destination-endpoint";
/// Metadata key where the gateway reports the endpoint that served.
pub const SERVED: &str = "x-gateway-destination-endpoint-served";
/// Dynamic metadata namespace of the pick.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Metadata namespace of the subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Metadata key of the subset hint.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Header naming why a request was refused.
pub const DROPPED: &str = "x-llm-d-request-dropped-reason";
/// Conformance-test header forcing the pick among the listed endpoints.
pub const TEST_SELECTION: &str = "test-epp-endpoint-selection";
/// Largest body chunk sent back to Envoy.
pub const CHUNK: usize = 62_000;

/// Which body mode to assume when Envoy does not announce it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BodyMode {
    /// `FULL_DUPLEX_STREAMED`.
    FullDuplexStreamed,
    /// `BUFFERED`.
    Buffered,
    /// `STREAMED` (responses only).
    Streamed,
    /// `NONE` (responses only).
    None,
}

/// ext_proc settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtProcConfig {
    /// Endpoints written to the destination (1: one `ip:port`, which ORIGINAL_DST clusters need;
    /// more: an ordered fallback list for `override_host`).
    pub max_endpoints: usize,
    /// Request body mode assumed when Envoy's first message does not say.
    pub request_body_mode: BodyMode,
    /// Response body mode assumed when Envoy's first message does not say.
    pub response_body_mode: BodyMode,
    /// Largest gRPC message accepted or sent (default 64 MiB).
    pub max_message_bytes: usize,
    /// Obey `test-epp-endpoint-selection` (for the upstream conformance suite only).
    pub conformance_test_filter: bool,
    /// Serve gRPC over TLS with this certificate and key (PEM files).
    pub tls: Option<TlsFiles>,
}

/// A PEM certificate (chain) and its private key.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert_path: std::path::PathBuf,
    /// Private key (PEM).
    pub key_path: std::path::PathBuf,
}

impl Default for ExtProcConfig {
    fn default() -> Self {
        Self {
            max_endpoints: 1,
            request_body_mode: BodyMode::FullDuplexStreamed,
            response_body_mode: BodyMode::FullDuplexStreamed,
            max_message_bytes: 64 << 20,
            conformance_test_filter: false,
            tls: None,
        }
    }
}

/// The ext_proc service.
#[derive(Debug, Clone)]
pub struct Picker {
    gateway: Arc<Gateway>,
    cfg: Arc<ExtProcConfig>,
}

impl Picker {
    /// A picker deciding through `gateway`.
    pub fn new(gateway: Arc<Gateway>, cfg: ExtProcConfig) -> Self {
        Self { gateway, cfg: Arc::new(cfg) }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Picker {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        req: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let mut stream = StreamState::new(self.gateway.clone(), self.cfg.clone());
        tokio::spawn(async move {
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    // End of stream or a reset: dropping the state releases any in-flight count.
                    Ok(None) | Err(_) => return,
                };
                for out in stream.handle(msg) {
                    if tx.send(Ok(out)).await.is_err() {
                        return;
                    }
                }
                if stream.done {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.into(), raw_value: value.as_bytes().to_vec(), ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": dest}}`.
fn lb_metadata(dest: &str) -> Struct {
    let inner = Struct { fields: [(DEST.to_owned(), string_value(dest))].into_iter().collect() };
    Struct { fields: [(LB_NAMESPACE.to_owned(), Value { kind: Some(Kind::StructValue(inner)) })].into_iter().collect() }
}

fn response(r: Resp) -> ProcessingResponse {
    ProcessingResponse { response: Some(r), ..Default::default() }
}

/// A string list or comma string from a metadata value.
fn metadata_strings(v: &Value) -> Vec<String> {
    match &v.kind {
        Some(Kind::StringValue(s)) => s.split(',').map(|x| x.trim().to_owned()).filter(|x| !x.is_empty()).collect(),
        Some(Kind::ListValue(l)) => l
            .values
            .iter()
            .filter_map(|x| match &x.kind {
                Some(Kind::StringValue(s)) => Some(s.trim().to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Looks up `namespace` / `key` in a message's metadata context.
fn metadata<'a>(msg: &'a ProcessingRequest, namespace: &str, key: &str) -> Option<&'a Value> {
    msg.metadata_context.as_ref()?.filter_metadata.get(namespace)?.fields.get(key)
}

/// Reads usage from a response body as it streams (JSON, or SSE with lines split anywhere).
#[derive(Debug, Default)]
pub struct UsageReader {
    sse: Option<bool>,
    pending: Vec<u8>,
    /// Prompt tokens, completion tokens, cached prompt tokens.
    pub usage: Option<(u64, u64, u64)>,
}

/// Bound on a non-streaming body kept for its usage.
const MAX_USAGE_BODY: usize = 4 << 20;

impl UsageReader {
    /// A reader; `sse` when the response is `text/event-stream`.
    pub fn new(sse: bool) -> Self {
        Self { sse: Some(sse), ..Self::default() }
    }

    /// Prompt, completion and cached tokens from a response object (or a Responses API event).
    fn usage_of(v: &serde_json::Value) -> Option<(u64, u64, u64)> {
        let u = v.get("usage").or_else(|| v.get("response").and_then(|r| r.get("usage")))?;
        if !u.is_object() {
            return None;
        }
        let n = |k: &str| u.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let cached = u
            .get("prompt_tokens_details")
            .or_else(|| u.get("input_tokens_details"))
            .and_then(|d| d.get("cached_tokens"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        Some((n("prompt_tokens").max(n("input_tokens")), n("completion_tokens").max(n("output_tokens")), cached))
    }

    /// Feeds the next chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.sse == Some(true) {
            self.pending.extend_from_slice(chunk);
            // Complete lines are read in place and dropped at once; a partial one waits.
            let mut start = 0;
            while let Some(nl) = memchr::memchr(b'\n', &self.pending[start..]) {
                let line = &self.pending[start..start + nl];
                start += nl + 1;
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if let Some(data) = line.strip_prefix(b"data:").map(<[u8]>::trim_ascii)
                    && memchr::memmem::find(data, b"\"usage\"").is_some()
                    && let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
                    && let Some(u) = Self::usage_of(&v)
                {
                    self.usage = Some(u);
                }
            }
            self.pending.drain(..start);
            if self.pending.len() > MAX_USAGE_BODY {
                self.pending.clear();
            }
        } else if self.pending.len() + chunk.len() <= MAX_USAGE_BODY {
            self.pending.extend_from_slice(chunk);
        }
    }

    /// The body is complete.
    pub fn finish(&mut self) {
        if self.sse != Some(true)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.pending)
            && let Some(u) = Self::usage_of(&v)
        {
            self.usage = Some(u);
        }
        self.pending.clear();
    }
}

/// One HTTP request's ext_proc exchange.
struct StreamState {
    gateway: Arc<Gateway>,
    cfg: Arc<ExtProcConfig>,
    request_mode: BodyMode,
    response_mode: BodyMode,
    path: String,
    request_id: Option<String>,
    generated_id: bool,
    test_selection: Option<String>,
    body: Vec<u8>,
    subset: Option<Option<Subset>>,
    routed: Option<Routed>,
    usage: UsageReader,
    status: u16,
    done: bool,
}

impl StreamState {
    fn new(gateway: Arc<Gateway>, cfg: Arc<ExtProcConfig>) -> Self {
        Self {
            request_mode: cfg.request_body_mode,
            response_mode: cfg.response_body_mode,
            gateway,
            cfg,
            path: String::new(),
            request_id: None,
            generated_id: false,
            test_selection: None,
            body: Vec::new(),
            subset: None,
            routed: None,
            usage: UsageReader::default(),
            status: 0,
            done: false,
        }
    }

    fn handle(&mut self, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        if let Some(pc) = &msg.protocol_config {
            let mode = |m: i32| match BodySendMode::try_from(m) {
                Ok(BodySendMode::FullDuplexStreamed) => Some(BodyMode::FullDuplexStreamed),
                Ok(BodySendMode::Buffered | BodySendMode::BufferedPartial) => Some(BodyMode::Buffered),
                Ok(BodySendMode::Streamed) => Some(BodyMode::Streamed),
                Ok(BodySendMode::None) => Some(BodyMode::None),
                _ => None,
            };
            if let Some(m) = mode(pc.request_body_mode) {
                self.request_mode = m;
            }
            if let Some(m) = mode(pc.response_body_mode) {
                self.response_mode = m;
            }
        }
        if let Some(v) = metadata(&msg, SUBSET_NAMESPACE, SUBSET_KEY) {
            let entries = metadata_strings(v);
            self.subset = Some(Subset::parse(entries.iter().map(String::as_str)).ok());
        }
        let served = msg_served(&msg);
        match msg.request {
            Some(Req::RequestHeaders(h)) => self.request_headers(h),
            Some(Req::RequestBody(b)) => {
                let limit = self.gateway.max_body_bytes();
                if self.body.len() + b.body.len() > limit {
                    // Refuse as soon as the body is too large, rather than holding all of it.
                    let e = RouteError::BadRequest(crate::request::RequestError::TooLarge {
                        size: self.body.len() + b.body.len(),
                        limit,
                    });
                    self.body = Vec::new();
                    self.done = true;
                    self.gateway.count("unknown", "unknown", None, e.status(), e.code());
                    return vec![immediate(&e)];
                }
                self.body.extend_from_slice(&b.body);
                if b.end_of_stream { self.decide(true) } else { Vec::new() }
            }
            Some(Req::RequestTrailers(_)) => vec![response(Resp::RequestTrailers(TrailersResponse::default()))],
            Some(Req::ResponseHeaders(h)) => self.response_headers(&served, h),
            Some(Req::ResponseBody(b)) => {
                self.usage.feed(&b.body);
                if let Some(r) = self.routed.as_mut() {
                    r.guard.prefill_done();
                }
                if b.end_of_stream {
                    self.finish();
                }
                let common = if self.response_mode == BodyMode::FullDuplexStreamed {
                    CommonResponse {
                        body_mutation: Some(BodyMutation {
                            mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                                body: b.body,
                                end_of_stream: b.end_of_stream,
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    }
                } else {
                    CommonResponse::default()
                };
                vec![response(Resp::ResponseBody(BodyResponse { response: Some(common) }))]
            }
            Some(Req::ResponseTrailers(_)) => {
                self.finish();
                vec![response(Resp::ResponseTrailers(TrailersResponse::default()))]
            }
            None => Vec::new(),
        }
    }

    fn request_headers(&mut self, h: HttpHeaders) -> Vec<ProcessingResponse> {
        for hv in h.headers.map(|m| m.headers).unwrap_or_default() {
            let value =
                if hv.raw_value.is_empty() { hv.value } else { String::from_utf8_lossy(&hv.raw_value).into_owned() };
            match hv.key.to_ascii_lowercase().as_str() {
                ":path" => self.path = value,
                "x-request-id" => self.request_id = Some(value),
                TEST_SELECTION => self.test_selection = Some(value),
                _ => {}
            }
        }
        if self.request_id.is_none() {
            self.request_id = Some(new_request_id());
            self.generated_id = true;
        }
        if h.end_of_stream {
            return self.decide(false);
        }
        match self.request_mode {
            BodyMode::FullDuplexStreamed => Vec::new(),
            _ => vec![response(Resp::RequestHeaders(HeadersResponse::default()))],
        }
    }

    /// The subset the request may be placed in: the gateway's hint, narrowed by the
    /// conformance header when that filter is on.
    fn subset(&self) -> Result<Option<Subset>, RouteError> {
        let hint = match &self.subset {
            None => None,
            Some(Some(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => return Err(RouteError::Unavailable(crate::schedule::NoDecision::SubsetUnmatched)),
        };
        if self.cfg.conformance_test_filter
            && let Some(sel) = &self.test_selection
            && let Ok(s) = Subset::parse_list(sel)
            && !s.is_empty()
        {
            return Ok(Some(s));
        }
        Ok(hint)
    }

    /// Decides where the request goes; `with_body`: the body has been received (and must be
    /// sent back in full duplex mode).
    fn decide(&mut self, with_body: bool) -> Vec<ProcessingResponse> {
        let want = self.cfg.max_endpoints.max(1);
        let candidates = crate::route::candidates_for(want);
        let routed = self.subset().and_then(|subset| match ApiKind::from_path(&self.path) {
            Some(api) if with_body => self.gateway.decide(api, &self.body, subset.as_ref(), candidates),
            _ => {
                // No body, or a path kvgate does not parse: place it by its model (or the only
                // pool's), without prompt affinity.
                let model = crate::request::model_of(&self.body).or_else(|| match self.gateway.pools() {
                    [only] => only.models().first().cloned(),
                    _ => None,
                });
                match model {
                    Some(m) => self.gateway.decide_by_model(&m, subset.as_ref(), candidates),
                    None => Err(RouteError::BadRequest(crate::request::RequestError::MissingModel)),
                }
            }
        });
        let routed = match routed {
            Ok(r) => r,
            Err(e) => {
                self.done = true;
                self.gateway.count("unknown", "unknown", None, e.status(), e.code());
                return vec![immediate(&e)];
            }
        };
        // Ranks sharing one address (pinned by header) appear once in the fallback list. A rank
        // pin is for the primary's server only, so a pinned request gets no fallbacks: another
        // server would get the wrong rank (or one it does not have).
        let limit = if routed.decision().primary().header_rank.is_some() { 1 } else { want };
        let mut addrs: Vec<SocketAddr> = Vec::with_capacity(limit);
        for t in routed.decision().targets.iter() {
            if addrs.len() < limit && !addrs.contains(&t.address) {
                addrs.push(t.address);
            }
        }
        let dest = addrs.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(",");
        let mut set = vec![set_header(DEST, &dest)];
        // Placement headers are kvgate's: set them for this decision, drop any the client sent.
        let mut remove = Vec::new();
        let d = routed.decision();
        match d.primary().header_rank {
            Some(r) => set.push(set_header(DP_RANK_HEADER, &r.to_string())),
            None => remove.push(DP_RANK_HEADER.to_owned()),
        }
        match d.prefill {
            Some(p) => set.push(set_header(PREFILLER_HEADER, &p.address.to_string())),
            None => remove.push(PREFILLER_HEADER.to_owned()),
        }
        match d.prefill.and_then(|p| p.header_rank) {
            Some(r) => set.push(set_header(PREFILLER_RANK_HEADER, &r.to_string())),
            None => remove.push(PREFILLER_RANK_HEADER.to_owned()),
        }
        if self.generated_id
            && let Some(id) = &self.request_id
        {
            set.push(set_header("x-request-id", id));
        }
        // A client's own transfer parameters never reach a P/D endpoint: the body is rewritten.
        let mut rewritten = false;
        if with_body && let Some(b) = routed.sanitized(&self.body) {
            set.push(set_header("content-length", &b.len().to_string()));
            self.body = b;
            rewritten = true;
        }
        // The sidecar runs the hand-off; kvgate does not see its outcome.
        routed.prefilled();
        self.routed = Some(routed);
        let mut common = CommonResponse {
            header_mutation: Some(HeaderMutation { set_headers: set, remove_headers: remove }),
            clear_route_cache: true,
            ..Default::default()
        };
        if rewritten && self.request_mode == BodyMode::Buffered {
            common.body_mutation =
                Some(BodyMutation { mutation: Some(Mutation::Body(std::mem::take(&mut self.body))) });
        }
        let mut out = Vec::new();
        match (self.request_mode, with_body) {
            (BodyMode::Buffered, true) => out.push(ProcessingResponse {
                response: Some(Resp::RequestBody(BodyResponse { response: Some(common) })),
                dynamic_metadata: Some(lb_metadata(&dest)),
                ..Default::default()
            }),
            _ => {
                out.push(ProcessingResponse {
                    response: Some(Resp::RequestHeaders(HeadersResponse { response: Some(common) })),
                    dynamic_metadata: Some(lb_metadata(&dest)),
                    ..Default::default()
                });
                if with_body {
                    out.extend(body_chunks(std::mem::take(&mut self.body)));
                }
            }
        }
        out
    }

    fn response_headers(&mut self, served: &Option<String>, h: HttpHeaders) -> Vec<ProcessingResponse> {
        let mut sse = false;
        for hv in h.headers.map(|m| m.headers).unwrap_or_default() {
            let value =
                if hv.raw_value.is_empty() { hv.value } else { String::from_utf8_lossy(&hv.raw_value).into_owned() };
            match hv.key.as_str() {
                ":status" => self.status = value.parse().unwrap_or(0),
                "content-type" => sse = value.starts_with("text/event-stream"),
                _ => {}
            }
        }
        self.usage = UsageReader::new(sse);
        if let (Some(served), Some(r)) = (served, self.routed.as_mut()) {
            // The gateway reports who served (after its own retries): count it there.
            let first = served.split(',').next().unwrap_or("").trim();
            if let Ok(addr) = first.parse::<SocketAddr>()
                && let Some(k) = r.decision().targets.iter().position(|t| t.address == addr)
                && k > 0
            {
                r.retarget(k);
            }
        }
        if let Some(r) = self.routed.as_mut() {
            r.pool.report(r.target().id, self.status < 500);
            // The decode side answers only after the prefill leg, if any, is over.
            r.prefill_guard = None;
        }
        if h.end_of_stream {
            self.finish();
        }
        vec![response(Resp::ResponseHeaders(HeadersResponse::default()))]
    }

    /// The response is complete: count it and release the in-flight count.
    fn finish(&mut self) {
        self.usage.finish();
        if let Some(r) = self.routed.take() {
            self.gateway.count(r.pool.name(), &r.model, Some(r.decision().kind), self.status, "");
            if let Some((prompt, completion, cached)) = self.usage.usage {
                self.gateway.count_tokens(r.pool.name(), prompt, completion, cached);
            }
        }
    }
}

/// The served endpoint the gateway reported in the message's metadata, if any.
fn msg_served(msg: &ProcessingRequest) -> Option<String> {
    metadata(msg, LB_NAMESPACE, SERVED).map(metadata_strings).and_then(|v| v.into_iter().next())
}

/// The body sent back in streamed chunks of at most [`CHUNK`] bytes, the last marked.
fn body_chunks(body: Vec<u8>) -> Vec<ProcessingResponse> {
    let chunk = |bytes: Vec<u8>, last: bool| {
        response(Resp::RequestBody(BodyResponse {
            response: Some(CommonResponse {
                body_mutation: Some(BodyMutation {
                    mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                        body: bytes,
                        end_of_stream: last,
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
        }))
    };
    if body.is_empty() {
        return vec![chunk(Vec::new(), true)];
    }
    let n = body.len().div_ceil(CHUNK);
    body.chunks(CHUNK).enumerate().map(|(i, c)| chunk(c.to_vec(), i + 1 == n)).collect()
}

/// A refusal as an `ImmediateResponse`.
fn immediate(e: &RouteError) -> ProcessingResponse {
    let reason = match e.status() {
        429 => "rejected-saturated",
        503 => "rejected-no-endpoints",
        _ => e.code(),
    };
    let mut set = vec![set_header("content-type", "application/json"), set_header(DROPPED, reason)];
    if e.status() == 429 {
        set.push(set_header("retry-after", "1"));
    }
    response(Resp::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus { code: i32::from(e.status()) }),
        headers: Some(HeaderMutation { set_headers: set, ..Default::default() }),
        body: e.to_json().into_bytes(),
        details: e.code().to_owned(),
        ..Default::default()
    }))
}

/// The gRPC health service: `""`, `liveness` and the ext_proc service are serving while the
/// process runs; `readiness` follows `/readyz`.
pub async fn health_service(
    gateway: Arc<Gateway>,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    use tonic_health::ServingStatus;
    let (reporter, service) = tonic_health::server::health_reporter();
    for name in ["", "liveness"] {
        reporter.set_service_status(name, ServingStatus::Serving).await;
    }
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let ready = crate::admin::ready(&gateway);
            if last != Some(ready) {
                let s = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
                reporter.set_service_status("readiness", s).await;
                reporter.set_service_status("envoy.service.ext_proc.v3.ExternalProcessor", s).await;
                last = Some(ready);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    service
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Metadata fields as a map.
    fn struct_fields(s: &Struct) -> BTreeMap<String, String> {
        s.fields
            .iter()
            .map(|(k, v)| {
                let text = match &v.kind {
                    Some(Kind::StringValue(x)) => x.clone(),
                    Some(Kind::StructValue(inner)) => format!("{:?}", struct_fields(inner)),
                    other => format!("{other:?}"),
                };
                (k.clone(), text)
            })
            .collect()
    }

    #[test]
    fn usage_from_sse_split_anywhere_and_from_json() {
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\ndata: [DONE]\n\n";
        for cut in [1, 7, 40, 90, sse.len() - 3] {
            let mut r = UsageReader::new(true);
            r.feed(&sse[..cut]);
            r.feed(&sse[cut..]);
            r.finish();
            assert_eq!(r.usage, Some((12, 3, 8)), "cut at {cut}");
        }
        let mut r = UsageReader::new(false);
        r.feed(br#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens":"#);
        r.feed(br#"2}}"#);
        assert_eq!(r.usage, None, "not before the end");
        r.finish();
        assert_eq!(r.usage, Some((5, 2, 0)));
    }

    #[test]
    fn bodies_go_back_in_bounded_chunks() {
        let chunks = body_chunks(vec![7u8; 2 * CHUNK + 5]);
        let sizes: Vec<(usize, bool)> = chunks
            .iter()
            .map(|c| match &c.response {
                Some(Resp::RequestBody(BodyResponse {
                    response: Some(CommonResponse { body_mutation: Some(m), .. }),
                })) => match &m.mutation {
                    Some(Mutation::StreamedResponse(s)) => (s.body.len(), s.end_of_stream),
                    _ => (0, false),
                },
                _ => (0, false),
            })
            .collect();
        assert_eq!(sizes, [(CHUNK, false), (CHUNK, false), (5, true)]);
        assert_eq!(body_chunks(Vec::new()).len(), 1);
    }

    #[test]
    fn metadata_lists_and_comma_strings() {
        let list = Value {
            kind: Some(Kind::ListValue(envoy_types::pb::google::protobuf::ListValue {
                values: vec![string_value("10.0.0.1:8000"), string_value("10.0.0.2")],
            })),
        };
        assert_eq!(metadata_strings(&list), ["10.0.0.1:8000", "10.0.0.2"]);
        assert_eq!(metadata_strings(&string_value("a:1, b:2")), ["a:1", "b:2"]);
        let m = lb_metadata("10.0.0.1:8000");
        assert!(struct_fields(&m)["envoy.lb"].contains("10.0.0.1:8000"));
    }
}
