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

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Req;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders, ProcessingRequest,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation::Mutation,
};
use envoy_types::pb::google::protobuf::{Value, value::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

mod body;
mod decide;
pub(crate) mod health;
mod reply;

use crate::front::http::{FLOW_HEADERS, REQUEST_ID_HEADER, SERVED_HEADER, TEST_SELECTION_HEADER, new_request_id};
use crate::front::listen::{Pace, Pacer};
use crate::gateway::budget::Reservation;
use crate::gateway::config::{BodyMode, ExtProcConfig};
use crate::gateway::decisions::StreamTicket;
use crate::gateway::events::{Event, Prefill, Served};
use crate::gateway::facade::{Gateway, SubsetHint};
use crate::gateway::outcome::Routed;
use crate::gateway::paths::Place;
use crate::routing::schedule::Subset;
use reply::{immediate, response, set_header};

/// Dynamic metadata namespace of the pick.
pub(crate) const LB_NAMESPACE: &str = "envoy.lb";
/// Metadata namespace of the subset hint.
pub(crate) const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Metadata key of the subset hint.
pub(crate) const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Response header that echoes the served endpoint for the Inference Extension's conformance
/// suite (with `conformance_test_filter` on).
pub(crate) const CONFORMANCE_SERVED_HEADER: &str = "x-conformance-test-served-endpoint";
/// Largest body chunk sent back to Envoy.
pub(crate) const CHUNK: usize = 62_000;

/// The ext_proc service.
#[derive(Debug, Clone)]
pub(crate) struct Picker {
    gateway: Arc<Gateway>,
    cfg: Arc<ExtProcConfig>,
    /// Spawns each stream's task (a shutdown ends those still open).
    tasks: crate::gateway::tasks::Tasks,
    /// How request bodies must keep arriving.
    pace: Pace,
}

impl Picker {
    /// A picker deciding through `gateway`, its streams' tasks spawned through `tasks`.
    pub(crate) fn new(gateway: Arc<Gateway>, cfg: ExtProcConfig, tasks: crate::gateway::tasks::Tasks) -> Self {
        Self { gateway, cfg: Arc::new(cfg), tasks, pace: Pace::default() }
    }

    /// The picker holding request bodies to `pace`.
    #[must_use]
    pub(crate) fn with_pace(mut self, pace: Pace) -> Self {
        self.pace = pace;
        self
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Picker {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        req: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let peer = req.remote_addr();
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let mut stream = StreamState::new(self.gateway.clone(), self.cfg.clone());
        stream.peer = peer;
        stream.pace = self.pace;
        stream.attribute(None);
        let task = self.tasks.spawn("ext_proc stream", async move {
            loop {
                let body_due = stream.body_due();
                let next = tokio::select! {
                    // A sidecar's report of the prefill leg comes before the decode leg's
                    // answer reaches Envoy, so it is taken first.
                    biased;
                    report = prefill_report(&mut stream.prefill) => {
                        stream.prefill_reported(report);
                        continue;
                    }
                    m = inbound.message() => m,
                    // A request body that stopped coming, or comes too slowly, is refused.
                    () = due(body_due) => {
                        for out in stream.body_late() {
                            let _ = tx.send(Ok(out)).await;
                        }
                        return;
                    }
                };
                let msg = match next {
                    Ok(Some(m)) => m,
                    // End of stream or a reset: dropping the state releases any in-flight count.
                    Ok(None) => return,
                    Err(e) => {
                        // A message that does not decode is the peer's error, and says so; a
                        // stream that broke has nobody left to tell.
                        if e.code() == tonic::Code::Internal {
                            let bad = Status::invalid_argument(format!("unreadable ext_proc message: {}", e.message()));
                            let _ = tx.send(Err(bad)).await;
                        }
                        return;
                    }
                };
                // While the request waits in flow control's queue the stream is held; one whose
                // other end left (Envoy reset it) leaves the queue.
                let Some(out) = stream.handle_and_route(msg, &tx).await else { return };
                for out in out {
                    if tx.send(Ok(out)).await.is_err() {
                        return;
                    }
                }
                if stream.done {
                    return;
                }
            }
        });
        task.detach();
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Resolves at `at`; never without it.
async fn due(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A string list or comma string from a metadata value: items split at commas, trimmed, empty
/// ones skipped.
fn metadata_strings(v: &Value) -> Vec<String> {
    match &v.kind {
        Some(Kind::StringValue(s)) => s.split(',').map(|x| x.trim().to_owned()).filter(|x| !x.is_empty()).collect(),
        // Each item of a list may itself be a comma list, as the reference picker reads it.
        Some(Kind::ListValue(l)) => l
            .values
            .iter()
            .filter_map(|x| match &x.kind {
                Some(Kind::StringValue(s)) => Some(s),
                _ => None,
            })
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// Looks up `namespace` / `key` in a message's metadata context.
fn metadata<'a>(msg: &'a ProcessingRequest, namespace: &str, key: &str) -> Option<&'a Value> {
    msg.metadata_context.as_ref()?.filter_metadata.get(namespace)?.fields.get(key)
}

/// One HTTP request's ext_proc exchange.
struct StreamState {
    gateway: Arc<Gateway>,
    cfg: Arc<ExtProcConfig>,
    request_mode: BodyMode,
    response_mode: BodyMode,
    method: String,
    path: String,
    /// How the path policy places this request (set with its headers).
    place: Option<Place>,
    request_id: Option<String>,
    generated_id: bool,
    test_selection: Option<String>,
    body: Vec<u8>,
    /// The body's share of the gateway's buffered-bytes bound, while it is held (as its
    /// client's).
    reservation: Reservation,
    /// The gRPC peer: the client when the request names none.
    peer: Option<std::net::SocketAddr>,
    /// How the request body must keep arriving, and its progress while it is awaited.
    pace: Pace,
    pacer: Option<Pacer>,
    subset: Option<Option<Subset>>,
    routed: Option<Routed>,
    /// The P/D decision's id while its sidecar may report the prefill leg.
    prefill: Option<StreamTicket>,
    /// The request body's end was seen: later body chunks are ignored (Envoy may repeat the
    /// last one of a large full-duplex body).
    body_ended: bool,
    /// Its flow-control headers' values (objective, flow, TTFT objective).
    flow: [Option<String>; 3],
    /// The request is complete and is to be routed (`true`: with its body to send back).
    deciding: Option<bool>,
    done: bool,
}

impl StreamState {
    fn new(gateway: Arc<Gateway>, cfg: Arc<ExtProcConfig>) -> Self {
        let reservation = gateway.body_budget().reservation();
        Self {
            request_mode: cfg.request_body_mode,
            response_mode: cfg.response_body_mode,
            gateway,
            cfg,
            method: String::new(),
            path: String::new(),
            place: None,
            request_id: None,
            generated_id: false,
            test_selection: None,
            body: Vec::new(),
            reservation,
            peer: None,
            pace: Pace::default(),
            pacer: None,
            subset: None,
            routed: None,
            prefill: None,
            body_ended: false,
            flow: [None, None, None],
            deciding: None,
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
        let served = ServedReport::of(&msg);
        if !matches!(msg.request, Some(Req::RequestHeaders(_) | Req::RequestBody(_)) | None) {
            self.body_over();
        }
        match msg.request {
            Some(Req::RequestHeaders(h)) => self.request_headers(h),
            Some(Req::RequestBody(_)) if self.body_ended => {
                // Decided already: a repeated end of stream is neither parsed nor answered.
                self.gateway.ignored_message("request_body_after_end");
                Vec::new()
            }
            Some(Req::RequestBody(b)) => self.request_body(b),
            Some(Req::RequestTrailers(_)) => vec![response(Resp::RequestTrailers(TrailersResponse::default()))],
            Some(Req::ResponseHeaders(h)) => self.response_headers(&served, h),
            Some(Req::ResponseBody(b)) => {
                if let Some(r) = self.routed.as_mut() {
                    r.on(Event::Body(&b.body));
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
        let now = tokio::time::Instant::now();
        let mut forwarded = None;
        for hv in h.headers.map(|m| m.headers).unwrap_or_default() {
            let value =
                if hv.raw_value.is_empty() { hv.value } else { String::from_utf8_lossy(&hv.raw_value).into_owned() };
            match hv.key.to_ascii_lowercase().as_str() {
                ":method" => self.method = value,
                ":path" => self.path = value,
                REQUEST_ID_HEADER => self.request_id = Some(value),
                TEST_SELECTION_HEADER => self.test_selection = Some(value),
                body::FORWARDED_FOR => forwarded = Some(value),
                key => {
                    // Flow control's headers; a current name wins over its legacy one.
                    if let Some(i) = FLOW_HEADERS.iter().position(|names| names.contains(&key)) {
                        let value = value.trim();
                        if !value.is_empty() && (key == FLOW_HEADERS[i][0] || self.flow[i].is_none()) {
                            self.flow[i] = Some(value.to_owned());
                        }
                    }
                }
            }
        }
        self.attribute(forwarded.as_deref());
        if self.request_id.is_none() {
            self.request_id = Some(new_request_id());
            self.generated_id = true;
        }
        // The gateway's own answers (and 404s) are given at once, as the proxy gives them.
        match self.gateway.place(&self.method, &self.path) {
            Ok(place) => self.place = Some(place),
            Err(a) => {
                self.done = true;
                return vec![immediate(&a)];
            }
        }
        if h.end_of_stream {
            self.body_ended = true;
            return self.decide(false);
        }
        self.expect_body(now);
        match self.request_mode {
            BodyMode::FullDuplexStreamed => Vec::new(),
            _ => vec![response(Resp::RequestHeaders(HeadersResponse::default()))],
        }
    }

    /// The subset the request may be placed in: the gateway's hint, narrowed by the
    /// conformance header when that filter is on.
    fn subset(&self) -> SubsetHint {
        let hint = match &self.subset {
            None => SubsetHint::Any,
            Some(Some(s)) if !s.is_empty() => SubsetHint::Within(s.clone()),
            Some(_) => return SubsetHint::Unreadable,
        };
        if self.cfg.conformance_test_filter
            && let Some(sel) = &self.test_selection
            && let Ok(s) = Subset::parse_list(sel)
            && !s.is_empty()
        {
            return SubsetHint::Within(s);
        }
        hint
    }

    /// The request is complete: it is routed next (by [`StreamState::route`], which may wait
    /// in flow control's queue); `with_body`: the body has been received (and must be sent back
    /// in full duplex mode).
    fn decide(&mut self, with_body: bool) -> Vec<ProcessingResponse> {
        self.deciding = Some(with_body);
        Vec::new()
    }

    fn response_headers(&mut self, served: &ServedReport, h: HttpHeaders) -> Vec<ProcessingResponse> {
        let (mut status, mut event_stream) = (0, false);
        for hv in h.headers.map(|m| m.headers).unwrap_or_default() {
            let value =
                if hv.raw_value.is_empty() { hv.value } else { String::from_utf8_lossy(&hv.raw_value).into_owned() };
            match hv.key.as_str() {
                ":status" => status = value.parse().unwrap_or(0),
                "content-type" => event_stream = value.starts_with("text/event-stream"),
                _ => {}
            }
        }
        // The decode side answers only after the prefill leg, if any, is over: a report of it
        // can no longer come.
        self.prefill = None;
        if let Some(r) = self.routed.as_mut() {
            if let ServedReport::Endpoint(served) = served {
                r.on(Event::ServedBy(Served::parse(served)));
            }
            // Its first body message is its first token only when Envoy streams the body here.
            let streamed = matches!(self.response_mode, BodyMode::Streamed | BodyMode::FullDuplexStreamed);
            r.on(Event::Started { status, event_stream, streamed });
        }
        if h.end_of_stream {
            self.finish();
        }
        let mut answer = HeadersResponse::default();
        if self.cfg.conformance_test_filter {
            // The conformance suite reads what the gateway reported as served from the response.
            let set = vec![set_header(CONFORMANCE_SERVED_HEADER, served.conformance_value())];
            let mutation = HeaderMutation { set_headers: set, ..Default::default() };
            answer.response = Some(CommonResponse { header_mutation: Some(mutation), ..Default::default() });
        }
        vec![response(Resp::ResponseHeaders(answer))]
    }

    /// The sidecar reported the prefill leg.
    fn prefill_reported(&mut self, p: Prefill) {
        self.prefill = None;
        if let Some(r) = self.routed.as_mut() {
            r.on(Event::Prefill(p));
        }
    }

    /// The response is complete: it is accounted, and its in-flight count released.
    fn finish(&mut self) {
        self.prefill = None;
        if let Some(mut r) = self.routed.take() {
            r.on(Event::Finished { status: None, usage: None, body_bytes: None });
        }
    }
}

/// The sidecar's report of the prefill leg, when the stream holds a P/D decision; pending
/// otherwise.
async fn prefill_report(ticket: &mut Option<StreamTicket>) -> Prefill {
    match ticket {
        Some(t) => match (&mut t.report).await {
            Ok(r) => r,
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// What a message's `envoy.lb` metadata says of the endpoint that served the request.
#[derive(Debug, PartialEq)]
enum ServedReport {
    /// No `envoy.lb` metadata at all.
    NoLbMetadata,
    /// `envoy.lb` without a served endpoint.
    NotReported,
    /// The first served endpoint named.
    Endpoint(String),
}

impl ServedReport {
    fn of(msg: &ProcessingRequest) -> Self {
        let Some(lb) = msg.metadata_context.as_ref().and_then(|m| m.filter_metadata.get(LB_NAMESPACE)) else {
            return Self::NoLbMetadata;
        };
        match lb.fields.get(SERVED_HEADER).map(metadata_strings).and_then(|v| v.into_iter().next()) {
            Some(e) => Self::Endpoint(e),
            None => Self::NotReported,
        }
    }

    /// The value of [`CONFORMANCE_SERVED_HEADER`]: the endpoint, or which part was missing.
    fn conformance_value(&self) -> &str {
        match self {
            Self::NoLbMetadata => "fail: missing envoy lb metadata",
            Self::NotReported => "fail: missing destination endpoint served metadata",
            Self::Endpoint(e) => e,
        }
    }
}

#[cfg(any(fuzzing, test))]
mod fuzz;
#[cfg(test)]
use fuzz::endpointless_gateway;
#[cfg(any(fuzzing, test))]
pub(crate) use fuzz::fuzz;

#[cfg(test)]
mod tests;
