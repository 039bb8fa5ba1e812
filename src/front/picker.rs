//! kvgate's own gRPC API, `kvgate.v1.Picker` (`proto/kvgate/v1/picker.proto`): `Pick` decides
//! through the same path as the proxy and the Envoy picker and holds the decision for its
//! reports; `Report` applies a caller's (or a sidecar's) report through the one outcome API;
//! `Explain` is `/debug/explain` as a message; `WatchEndpoints` streams every pool's endpoints.
//! The messages are generated at build time ([`pb`]); [`convert`] maps them to and from the
//! gateway's types.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

mod convert;

use crate::front::http::{
    DESTINATION_HEADER, Placement, REQUEST_ID_HEADER, dropped_reason, new_request_id, refusal_headers,
};
use crate::gateway::config::ExtProcConfig;
use crate::gateway::decisions::ReportError;
use crate::gateway::error::RouteError;
use crate::gateway::facade::Gateway;
use crate::gateway::paths::{Ask, PathRefusal, Place};
use crate::routing::request::ApiKind;
use crate::routing::schedule::{NoDecision, Subset};

/// The messages and service of `proto/kvgate/v1`, generated at build time.
#[allow(missing_docs, missing_debug_implementations, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("kvgate.v1");

    /// The encoded descriptor set of `proto/kvgate/v1` (gRPC reflection serves it).
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kvgate_v1_descriptor.bin"));
}

use pb::picker_server::{Picker, PickerServer};

/// Most endpoints a pick may ask for.
const MAX_PICK_ENDPOINTS: usize = 64;
/// Most `WatchEndpoints` streams open at once (each builds every pool's state per interval).
const MAX_WATCHERS: usize = 256;

/// One open watch, counted while it lives.
#[derive(Debug)]
struct WatchSlot(Arc<AtomicUsize>);

impl WatchSlot {
    fn take(open: &Arc<AtomicUsize>) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_WATCHERS).then_some(n + 1)).ok()?;
        Some(Self(open.clone()))
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The `kvgate.v1.Picker` service.
#[derive(Debug, Clone)]
pub(crate) struct PickerApi {
    gateway: Arc<Gateway>,
    /// `extproc.max_endpoints`: the server's cap on endpoints listed when a `Pick` does not say.
    max_endpoints: Option<usize>,
    /// Turns true when the server stops: watch streams end.
    stop: watch::Receiver<bool>,
    /// `WatchEndpoints` streams open.
    watchers: Arc<AtomicUsize>,
    /// Spawns each watch's task.
    tasks: crate::gateway::tasks::Tasks,
}

/// The service, with the ext_proc listener's message bounds.
pub(crate) fn service(
    gateway: Arc<Gateway>,
    cfg: &ExtProcConfig,
    stop: watch::Receiver<bool>,
    tasks: crate::gateway::tasks::Tasks,
) -> PickerServer<PickerApi> {
    let max = cfg.max_message_bytes;
    let watchers = Arc::new(AtomicUsize::new(0));
    PickerServer::new(PickerApi { gateway, max_endpoints: cfg.max_endpoints, stop, watchers, tasks })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
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

/// A pick's request as the decision path takes it: how it is placed and its body.
fn placed(
    gateway: &Gateway,
    method: &str,
    path: &str,
    input: Option<convert::Input>,
) -> Result<Result<(Place, Vec<u8>), pb::Refusal>, Status> {
    let method = if method.is_empty() { "POST" } else { method };
    let from_prompt = matches!(input, Some(convert::Input::Prompt(_)));
    let path = if path.is_empty() && from_prompt { "/v1/completions" } else { path };
    // The query string does not place a request.
    let path = path.split('?').next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(Status::invalid_argument(format!("`path` must be an HTTP path starting with `/`, not `{path}`")));
    }
    let place = match gateway.ask(method, path) {
        Ask::Route(place) => place,
        Ask::NotFound => return Ok(Err(path_refusal(&PathRefusal::not_found(method, path)))),
        Ask::MethodNotAllowed(allow) => {
            return Ok(Err(path_refusal(&PathRefusal::method_not_allowed(method, path, Some(allow)))));
        }
        Ask::Models | Ask::ModelInfo | Ask::Health => {
            return Err(Status::invalid_argument(format!(
                "{method} {path} is answered by kvgate itself (through the proxy or Envoy), not placed on an endpoint"
            )));
        }
    };
    // A prompt given as fields is placed as a completions body with them.
    let place = match place {
        Place::Prompt(_) if from_prompt => Place::Prompt(ApiKind::Completions),
        p => p,
    };
    let body = input.map(convert::Input::into_body).unwrap_or_default();
    Ok(Ok((place, body)))
}

#[tonic::async_trait]
impl Picker for PickerApi {
    async fn pick(&self, req: Request<pb::PickRequest>) -> Result<Response<pb::PickResponse>, Status> {
        let req = req.into_inner();
        let (place, body) = match placed(&self.gateway, &req.method, &req.path, req.input.map(Into::into))? {
            Ok(p) => p,
            Err(refusal) => return Ok(Response::new(refused(refusal))),
        };
        // An unreadable subset matches nothing, as Envoy's hint does for the ext_proc picker.
        let subset = match Subset::parse(req.subset.iter().map(String::as_str)) {
            _ if req.subset.is_empty() => None,
            Ok(s) if !s.is_empty() => Some(s),
            _ => {
                let e = RouteError::Unavailable(NoDecision::SubsetUnmatched);
                self.gateway.refused(&e);
                return Ok(Response::new(refused(route_refusal(&e))));
            }
        };
        // A pick that could not be held must not be decided (deciding records the prompt).
        self.gateway.decisions().has_room().map_err(|e| Status::resource_exhausted(e.to_string()))?;
        // A caller's own count wins; else the pool's and the server's settings decide.
        let asked = match req.max_endpoints {
            0 => None,
            n => Some(usize::try_from(n).unwrap_or(MAX_PICK_ENDPOINTS).clamp(1, MAX_PICK_ENDPOINTS)),
        };
        let places = asked.unwrap_or(self.max_endpoints.unwrap_or(1));
        let routed = match self.gateway.route(place, &body, subset.as_ref(), places) {
            Ok(r) => r,
            Err(e) => return Ok(Response::new(refused(route_refusal(&e)))),
        };
        let mut decision = convert::decision(routed.decision(), routed.snapshot(), routed.pool_name(), routed.model());
        decision.body = routed.sanitized(&body);
        let first = decision.endpoints.first().map(|e| e.address.clone()).unwrap_or_default();
        let want = asked.unwrap_or_else(|| routed.listed(self.max_endpoints).min(MAX_PICK_ENDPOINTS));
        let ranked = routed.decision().clone();
        let id = self.gateway.decisions().hold(routed).map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let placement = Placement::of(&ranked, want, Some(&id));
        decision.headers.insert(DESTINATION_HEADER.to_owned(), placement.destination);
        decision.headers.extend(placement.set.into_iter().map(|(k, v)| (k.to_owned(), v)));
        decision.remove_headers = placement.remove.into_iter().map(str::to_owned).collect();
        let request_id = if req.request_id.is_empty() { new_request_id() } else { req.request_id };
        decision.headers.insert(REQUEST_ID_HEADER.to_owned(), request_id);
        decision.decision_id = id;
        tracing::debug!(decision = %decision.decision_id, endpoint = %first, "picked");
        Ok(Response::new(pb::PickResponse { result: Some(pb::pick_response::Result::Decision(decision)) }))
    }

    async fn report(&self, req: Request<pb::ReportRequest>) -> Result<Response<pb::ReportResponse>, Status> {
        let req = req.into_inner();
        if req.decision_id.is_empty() {
            return Err(Status::invalid_argument("decision_id is required"));
        }
        let report = convert::report(&req).map_err(Status::invalid_argument)?;
        if let Some(pb::report_request::End::Failed(f)) = &req.end {
            tracing::debug!(decision = %req.decision_id, kind = ?f.kind(), message = %f.message, "a picked request failed");
        }
        match self.gateway.decisions().report(&req.decision_id, report) {
            Ok(ended) => Ok(Response::new(pb::ReportResponse { ended })),
            Err(e @ ReportError::Unknown(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ (ReportError::Ended(..) | ReportError::NotHere(_))) => {
                Err(Status::failed_precondition(e.to_string()))
            }
        }
    }

    async fn explain(&self, req: Request<pb::ExplainRequest>) -> Result<Response<pb::ExplainResponse>, Status> {
        use pb::explain_response::Result as R;
        let req = req.into_inner();
        let input = req.input.map(convert::Input::from);
        let path = req.path.split('?').next().unwrap_or_default();
        let api = match input {
            Some(convert::Input::Prompt(_)) => Some(ApiKind::Completions),
            _ => ApiKind::from_path(path),
        };
        let Some(api) = api else {
            return Err(Status::invalid_argument(format!("`{path}` is not a prompt API path")));
        };
        let body = input.map(convert::Input::into_body).unwrap_or_default();
        let result = match self.gateway.explain(api, &body) {
            Ok((pool, decision, explanation)) => {
                let snapshot = self.gateway.pools().iter().find(|p| p.name() == pool).map(|p| p.snapshot());
                let model = crate::routing::request::model_of(&body).unwrap_or_default();
                let decision = snapshot.map(|s| convert::decision(&decision, &s, &pool, &model));
                R::Explained(pb::Explained { pool, decision, explanation: Some(convert::explanation(&explanation)) })
            }
            Err(e) => R::Refusal(route_refusal(&e)),
        };
        Ok(Response::new(pb::ExplainResponse { result: Some(result) }))
    }

    type WatchEndpointsStream = Pin<Box<dyn Stream<Item = Result<pb::EndpointsUpdate, Status>> + Send>>;

    async fn watch_endpoints(
        &self,
        req: Request<pb::WatchEndpointsRequest>,
    ) -> Result<Response<Self::WatchEndpointsStream>, Status> {
        let req = req.into_inner();
        let Some(slot) = WatchSlot::take(&self.watchers) else {
            return Err(Status::resource_exhausted(format!(
                "{MAX_WATCHERS} endpoint watches are open, the most served"
            )));
        };
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

fn refused(refusal: pb::Refusal) -> pb::PickResponse {
    pb::PickResponse { result: Some(pb::pick_response::Result::Refusal(refusal)) }
}

/// A refusal of the decision path, as the proxy and the Envoy picker answer it.
fn route_refusal(e: &RouteError) -> pb::Refusal {
    pb::Refusal {
        status: u32::from(e.status()),
        code: e.code().to_owned(),
        message: e.to_string(),
        body: e.to_json(),
        dropped_reason: dropped_reason(e).to_owned(),
        headers: refusal_headers(e).into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
    }
}

/// A path the policy refuses, as the proxy answers it.
fn path_refusal(r: &PathRefusal) -> pb::Refusal {
    pb::Refusal {
        status: u32::from(r.status),
        code: r.code.to_owned(),
        message: r.message.clone(),
        body: r.body(),
        dropped_reason: r.code.to_owned(),
        headers: r.allow.map(|a| ("allow".to_owned(), a.to_owned())).into_iter().collect(),
    }
}
