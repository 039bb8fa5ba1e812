//! kvgate's own gRPC API, `kvgate.v1.Picker` (`proto/kvgate/v1/picker.proto`): `Pick` decides
//! through the same path as the proxy and the Envoy picker and holds the decision for its
//! reports; `Report` applies a caller's (or a sidecar's) report through the one outcome API;
//! `Explain` is `/debug/explain` as a message; `WatchEndpoints` streams every pool's endpoints.
//! The messages are generated at build time ([`pb`]); [`convert`] maps them to and from the
//! gateway's types. [`access`] guards every call with the configured bearer token; what one
//! client (its peer IP) may hold is bounded per client as well as in all ([`Decisions`],
//! [`watches`]).
//!
//! [`Decisions`]: crate::gateway::decisions::Decisions

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

mod access;
pub(crate) mod cluster;
pub(crate) use access::Access;
pub use access::TokenFile;
mod convert;
mod watches;

use crate::front::http::{DESTINATION_HEADER, Placement, REQUEST_ID_HEADER, flow_header_names, new_request_id};
use crate::gateway::answer::Answer;
use crate::gateway::config::{ExtProcConfig, PickerApiConfig};
use crate::gateway::decisions::{Client, HoldError, ReportError};
use crate::gateway::facade::{Gateway, RouteRequest, SubsetHint};
use crate::gateway::paths::Place;
use crate::gateway::pool::flow::Class;
use crate::routing::request::ApiKind;
use crate::routing::schedule::Subset;
use cluster::Forwarder;

/// The messages and service of `proto/kvgate/v1`, generated at build time.
#[allow(missing_docs, missing_debug_implementations, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("kvgate.v1");

    /// The encoded descriptor set of `proto/kvgate/v1` (gRPC reflection serves it).
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kvgate_v1_descriptor.bin"));
}

use pb::picker_server::{Picker, PickerServer};
use tonic::service::interceptor::InterceptedService;
use watches::Watches;

/// The longest decision id a report may name (kvgate's are under 45 bytes).
const MAX_DECISION_ID: usize = 64;
/// Most endpoints a pick may ask for.
const MAX_PICK_ENDPOINTS: usize = 64;

/// The `kvgate.v1.Picker` service.
#[derive(Debug, Clone)]
pub(crate) struct PickerApi {
    gateway: Arc<Gateway>,
    /// `extproc.max_endpoints`: the server's cap on endpoints listed when a `Pick` does not say.
    max_endpoints: Option<usize>,
    /// Turns true when the server stops: watch streams end.
    stop: watch::Receiver<bool>,
    /// `WatchEndpoints` streams open (each builds every pool's state per interval).
    watches: Arc<Watches>,
    /// Spawns each watch's task.
    tasks: crate::gateway::tasks::Tasks,
    /// Reports for decisions peer replicas made go to them.
    forward: Option<Arc<Forwarder>>,
}

/// The service, with the ext_proc listener's message bounds, behind the picker API's access
/// check (a token file is read now: one that cannot be read is an error).
pub(crate) fn service(
    gateway: Arc<Gateway>,
    cfg: &ExtProcConfig,
    api: &PickerApiConfig,
    stop: watch::Receiver<bool>,
    tasks: crate::gateway::tasks::Tasks,
    forward: Option<Arc<Forwarder>>,
) -> anyhow::Result<InterceptedService<PickerServer<PickerApi>, Access>> {
    let max = cfg.max_message_bytes;
    let access = Access::new(api, &tasks, gateway.decisions().clone())?;
    let watches = Arc::new(Watches::new(api, gateway.decisions().clone()));
    let server =
        PickerServer::new(PickerApi { gateway, max_endpoints: cfg.max_endpoints, stop, watches, tasks, forward })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
    Ok(InterceptedService::new(server, access))
}

/// The encoded descriptor set of Envoy's `envoy.service.ext_proc.v3` and the files it imports,
/// compiled at build time from the protos `envoy-types` ships (`build.rs`).
const EXT_PROC_FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ext_proc_descriptor.bin"));

/// gRPC reflection (v1 and v1alpha) for every service of the gRPC listener: kvgate's API,
/// Envoy's ext_proc and gRPC health.
pub(crate) fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
)> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(EXT_PROC_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// A picker-API report applied to a decision this replica holds.
pub(crate) fn apply_report(gateway: &Gateway, req: &pb::ReportRequest) -> Result<pb::ReportResponse, Status> {
    if req.decision_id.is_empty() {
        return Err(Status::invalid_argument("decision_id is required"));
    }
    // Ids kvgate issues are short; a longer one is unknown, and is not echoed back.
    if req.decision_id.len() > MAX_DECISION_ID {
        let message = format!("a decision_id of {} bytes is none kvgate issued", req.decision_id.len());
        return Err(Status::not_found(message));
    }
    let report = convert::report(req).map_err(Status::invalid_argument)?;
    if let Some(pb::report_request::End::Failed(f)) = &req.end {
        tracing::debug!(decision = %req.decision_id, kind = ?f.kind(), message = %f.message, "a picked request failed");
    }
    match gateway.decisions().report(&req.decision_id, report) {
        Ok(ended) => Ok(pb::ReportResponse { ended }),
        Err(e @ ReportError::Unknown(_)) => Err(Status::not_found(e.to_string())),
        Err(e @ (ReportError::Ended(..) | ReportError::NotHere(_))) => Err(Status::failed_precondition(e.to_string())),
        Err(e @ ReportError::Implausible(..)) => Err(Status::invalid_argument(e.to_string())),
    }
}

/// How a pick's request is placed, or kvgate's own answer to it (the same as the proxy's and
/// the Envoy picker's for that method and path).
fn placed(
    gateway: &Gateway,
    method: &str,
    path: &str,
    input: Option<&convert::Input>,
) -> Result<Result<Place, Answer>, Status> {
    let method = if method.is_empty() { "POST" } else { method };
    let from_prompt = matches!(input, Some(convert::Input::Prompt(_)));
    let path = if path.is_empty() && from_prompt { "/v1/completions" } else { path };
    if !path.starts_with('/') {
        return Err(Status::invalid_argument(format!("`path` must be an HTTP path starting with `/`, not `{path}`")));
    }
    Ok(gateway.place(method, path))
}

#[tonic::async_trait]
impl Picker for PickerApi {
    async fn pick(&self, req: Request<pb::PickRequest>) -> Result<Response<pb::PickResponse>, Status> {
        let client = Client::of(req.remote_addr());
        let deadline = grpc_timeout(req.metadata());
        let req = req.into_inner();
        let input = req.input.map(convert::Input::from);
        let place = match placed(&self.gateway, &req.method, &req.path, input.as_ref())? {
            Ok(p) => p,
            Err(a) => return Ok(Response::new(refused(&a))),
        };
        // An unreadable subset matches nothing, as Envoy's hint does for the ext_proc picker.
        let subset = match Subset::parse(req.subset.iter().map(String::as_str)) {
            _ if req.subset.is_empty() => SubsetHint::Any,
            Ok(s) => SubsetHint::Within(s),
            Err(_) => SubsetHint::Unreadable,
        };
        // A pick that could not be held must not be decided (deciding records the prompt).
        self.gateway.decisions().has_room(client).map_err(|e| Status::resource_exhausted(e.to_string()))?;
        // A caller's own count wins; else the pool's and the server's settings decide.
        let asked = match req.max_endpoints {
            0 => None,
            n => Some(usize::try_from(n).unwrap_or(MAX_PICK_ENDPOINTS).clamp(1, MAX_PICK_ENDPOINTS)),
        };
        let places = asked.unwrap_or(self.max_endpoints.unwrap_or(1));
        let none = convert::Input::Body(Vec::new());
        let input = input.as_ref().unwrap_or(&none);
        let class = Class {
            objective: Some(req.objective.as_str()).filter(|o| !o.is_empty()),
            flow: Some(req.fairness_id.as_str()).filter(|f| !f.is_empty()),
            slo_ttft_ms: Some(u64::from(req.slo_ttft_ms)).filter(|&ms| ms > 0),
        };
        let route = RouteRequest { place, input: input.route_input(), subset, places, class };
        // A Pick that waits in flow control's queue holds the call, up to its deadline.
        let routed = match deadline {
            Some(d) => tokio::time::timeout(d, self.gateway.route_to_hold(route)).await.map_err(|_| {
                Status::deadline_exceeded("the call's deadline passed while the request waited in flow control's queue")
            })?,
            None => self.gateway.route_to_hold(route).await,
        };
        let mut routed = match routed {
            Ok(r) => r,
            Err(a) => return Ok(Response::new(refused(&a))),
        };
        let mut decision = convert::decision(routed.decision(), routed.snapshot(), routed.pool_name(), routed.model());
        decision.body = routed.take_body();
        let first = decision.endpoints.first().map(|e| e.address.clone()).unwrap_or_default();
        let want = asked.unwrap_or_else(|| routed.listed(self.max_endpoints).min(MAX_PICK_ENDPOINTS));
        let ranked = routed.decision().clone();
        let id = match self.gateway.decisions().hold(routed, client) {
            Ok(id) => id,
            Err(HoldError::Share(e)) => return Ok(Response::new(refused(&self.gateway.refuse(&e)))),
            Err(e) => return Err(Status::resource_exhausted(e.to_string())),
        };
        let placement = Placement::of(&ranked, want, Some(&id));
        decision.headers.insert(DESTINATION_HEADER.to_owned(), placement.destination);
        decision.headers.extend(placement.set.into_iter().map(|(k, v)| (k.to_owned(), v)));
        decision.remove_headers = placement.remove.into_iter().chain(flow_header_names()).map(str::to_owned).collect();
        let request_id = if req.request_id.is_empty() { new_request_id() } else { req.request_id };
        decision.headers.insert(REQUEST_ID_HEADER.to_owned(), request_id);
        decision.decision_id = id;
        tracing::debug!(decision = %decision.decision_id, endpoint = %first, "picked");
        Ok(Response::new(pb::PickResponse { result: Some(pb::pick_response::Result::Decision(decision)) }))
    }

    async fn report(&self, req: Request<pb::ReportRequest>) -> Result<Response<pb::ReportResponse>, Status> {
        let req = req.into_inner();
        // A decision a peer replica made (its id says which): the peer applies the report.
        if let Some(f) = &self.forward
            && let Some(forwarded) = f.report(&req).await
        {
            return forwarded.map(Response::new);
        }
        apply_report(&self.gateway, &req).map(Response::new)
    }

    async fn explain(&self, req: Request<pb::ExplainRequest>) -> Result<Response<pb::ExplainResponse>, Status> {
        use pb::explain_response::Result as R;
        let req = req.into_inner();
        let input = req.input.map(convert::Input::from).unwrap_or(convert::Input::Body(Vec::new()));
        let path = req.path.split('?').next().unwrap_or_default();
        let api = match input {
            convert::Input::Prompt(_) => Some(ApiKind::Completions),
            convert::Input::Body(_) => ApiKind::from_path(path),
        };
        let Some(api) = api else {
            return Err(Status::invalid_argument(format!("`{path}` is not a prompt API path")));
        };
        let result = match self.gateway.explain(api, input.route_input()) {
            Ok((pool, model, decision, explanation)) => {
                let snapshot = self.gateway.pools().iter().find(|p| p.name() == pool).map(|p| p.snapshot());
                let decision = snapshot.map(|s| convert::decision(&decision, &s, &pool, &model));
                R::Explained(pb::Explained { pool, decision, explanation: Some(convert::explanation(&explanation)) })
            }
            Err(e) => R::Refusal(refusal(&Answer::from(&e))),
        };
        Ok(Response::new(pb::ExplainResponse { result: Some(result) }))
    }

    type WatchEndpointsStream = Pin<Box<dyn Stream<Item = Result<pb::EndpointsUpdate, Status>> + Send>>;

    async fn watch_endpoints(
        &self,
        req: Request<pb::WatchEndpointsRequest>,
    ) -> Result<Response<Self::WatchEndpointsStream>, Status> {
        let slot = self.watches.take(Client::of(req.remote_addr()))?;
        let req = req.into_inner();
        for name in &req.pools {
            if !self.gateway.pools().iter().any(|p| p.name() == name) {
                return Err(Status::not_found(format!("no pool `{name}` here")));
            }
        }
        let interval =
            Duration::from_millis(u64::from(if req.interval_ms == 0 { 1000 } else { req.interval_ms.max(100) }));
        let (tx, rx) = mpsc::channel(4);
        let gateway = self.gateway.clone();
        let mut stop = self.stop.clone();
        let task = self.tasks.spawn("endpoint watch", async move {
            let _slot = slot;
            let mut last: Option<pb::EndpointsUpdate> = None;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                    () = tx.closed() => return,
                }
                let update = convert::endpoints_update(&gateway, &req.pools);
                if last.as_ref() != Some(&update) {
                    if tx.send(Ok(update.clone())).await.is_err() {
                        return;
                    }
                    last = Some(update);
                }
            }
        });
        task.detach();
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The deadline a gRPC client set on its call (`grpc-timeout`: digits and a unit, H M S m u n).
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok().filter(|_| digits.len() <= 8)?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn refused(a: &Answer) -> pb::PickResponse {
    pb::PickResponse { result: Some(pb::pick_response::Result::Refusal(refusal(a))) }
}

/// One of kvgate's own answers as a `Refusal`: what to answer the client with instead of placing
/// the request.
fn refusal(a: &Answer) -> pb::Refusal {
    pb::Refusal {
        status: u32::from(a.status),
        code: a.code.to_owned(),
        message: a.message.clone(),
        body: a.body.clone(),
        dropped_reason: a.dropped.unwrap_or_default().to_owned(),
        headers: a.headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
    }
}
