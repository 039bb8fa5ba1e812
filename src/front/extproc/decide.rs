//! A complete request routed: through flow control's queue when its pool says so (the stream
//! held meanwhile, Envoy asked once to wait longer, a stream whose other end left giving up its
//! place), then answered with its placement — destination, header and body mutations, the
//! `envoy.lb` metadata — or its refusal.

use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Resp;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest, ProcessingResponse,
    body_mutation::Mutation,
};
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use tokio::sync::mpsc;
use tonic::Status;

use super::StreamState;
use super::reply::{body_chunks, immediate, lb_metadata, set_header};
use crate::front::http::{
    CLIENT_ONLY_HEADERS, DESTINATION_HEADER, Placement, REQUEST_ID_HEADER, flow_class, flow_header_names,
};
use crate::gateway::answer::Answer;
use crate::gateway::config::BodyMode;
use crate::gateway::decisions::StreamTicket;
use crate::gateway::error::RouteError;
use crate::gateway::facade::{Input, RouteRequest};
use crate::gateway::outcome::Routed;
use crate::routing::request::RequestError;

/// How long a decision may take before Envoy is asked to wait longer for it (a request waiting
/// in flow control's queue); well within Envoy's default `message_timeout` of 200 ms.
const QUEUED_AFTER: Duration = Duration::from_millis(50);

impl StreamState {
    /// Routes the complete request, waiting in flow control's queue when its pool says so.
    async fn route(&self) -> Result<Routed, Answer> {
        let want = self.cfg.max_endpoints.unwrap_or(1);
        match self.place {
            Some(place) => {
                let input = Input::Body(&self.body);
                let values = [0, 1, 2].map(|i| self.flow[i].as_deref());
                let class = flow_class(&values);
                self.gateway.route(RouteRequest { place, input, subset: self.subset(), places: want, class }).await
            }
            // Bodies before headers: nothing is known of the request.
            None => Err(self.gateway.refuse(&RouteError::BadRequest(RequestError::MissingModel))),
        }
    }

    /// Handles a message, and routes the request when it is complete. A request that waits in
    /// flow control's queue holds the stream: after [`QUEUED_AFTER`] Envoy is asked once, on
    /// `tx`, to wait for the answer as long as the longest queue wait (`override_message_timeout`,
    /// honoured up to the filter's `max_message_timeout`). `None` when the stream's other end
    /// left while the request waited (its place in the queue is given up).
    pub(super) async fn handle_and_route(
        &mut self,
        msg: ProcessingRequest,
        tx: &mpsc::Sender<Result<ProcessingResponse, Status>>,
    ) -> Option<Vec<ProcessingResponse>> {
        let mut out = self.handle(msg);
        if let Some(with_body) = self.deciding.take() {
            let wait = self.gateway.longest_queue_wait();
            let routed = {
                let route = self.route();
                tokio::pin!(route);
                let mut asked = wait.is_none();
                loop {
                    tokio::select! {
                        r = &mut route => break r,
                        () = tx.closed() => return None,
                        () = tokio::time::sleep(QUEUED_AFTER), if !asked => {
                            asked = true;
                            let longer = wait.map(|w| ProtoDuration {
                                seconds: i64::try_from(w.as_secs() + 1).unwrap_or(i64::MAX),
                                nanos: 0,
                            });
                            let extend = ProcessingResponse { override_message_timeout: longer, ..Default::default() };
                            if tx.send(Ok(extend)).await.is_err() {
                                return None;
                            }
                        }
                    }
                }
            };
            out.extend(self.decided(routed, with_body));
        }
        Some(out)
    }

    /// Answers a routed request (its placement), or its refusal.
    fn decided(&mut self, routed: Result<Routed, Answer>, with_body: bool) -> Vec<ProcessingResponse> {
        let mut routed = match routed {
            Ok(r) => r,
            Err(a) => {
                self.done = true;
                return vec![immediate(&a)];
            }
        };
        let ticket = routed.decision().prefill.is_some().then(|| self.gateway.decisions().stream());
        let listed = routed.listed(self.cfg.max_endpoints);
        let placement = Placement::of(routed.decision(), listed, ticket.as_ref().map(StreamTicket::id));
        let dest = placement.destination;
        let mut set = vec![set_header(DESTINATION_HEADER, &dest)];
        // Placement headers are kvgate's: set them for this decision, drop any the client sent.
        set.extend(placement.set.iter().map(|(k, v)| set_header(k, v)));
        // And what a client sent under the gateway protocol's names never reaches the endpoint.
        let remove = placement
            .remove
            .iter()
            .copied()
            .chain(CLIENT_ONLY_HEADERS)
            .chain(flow_header_names())
            .map(str::to_owned)
            .collect();
        if self.generated_id
            && let Some(id) = &self.request_id
        {
            set.push(set_header(REQUEST_ID_HEADER, id));
        }
        // A client's own transfer parameters never reach a P/D endpoint: the body is rewritten.
        let mut rewritten = false;
        if let Some(b) = routed.take_body().filter(|_| with_body) {
            set.push(set_header("content-length", &b.len().to_string()));
            self.body = b;
            rewritten = true;
        }
        // The sidecar runs the hand-off and reports it under the ticket's id.
        self.prefill = ticket;
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
        // The body goes back to Envoy now: its bytes are no longer held here.
        self.reservation.release();
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
        // Envoy holds the body it buffered; the copy here is released with its reservation.
        self.body = Vec::new();
        out
    }
}
