//! The picker API's messages to and from the gateway's types.

use std::net::SocketAddr;

use serde_json::Value;

use super::pb;
use crate::gateway::decisions::Report;
use crate::gateway::events::{Event, Failure, Prefill, PrefillFailure, Served};
use crate::gateway::facade::{Gateway, Input as RouteInput};
use crate::gateway::pool::Snapshot;
use crate::gateway::telemetry::Usage;
use crate::routing::endpoint::EndpointStatus;
use crate::routing::request::{PromptFields, PromptText};
use crate::routing::schedule::{Decision, EndpointExplanation, Explanation, Target};

/// A request's input: its body, or a prompt as fields.
#[derive(Debug)]
pub(super) enum Input {
    Body(Vec<u8>),
    Prompt(pb::Prompt),
}

impl From<pb::pick_request::Input> for Input {
    fn from(i: pb::pick_request::Input) -> Self {
        match i {
            pb::pick_request::Input::Body(b) => Self::Body(b),
            pb::pick_request::Input::Prompt(p) => Self::Prompt(p),
        }
    }
}

impl From<pb::explain_request::Input> for Input {
    fn from(i: pb::explain_request::Input) -> Self {
        match i {
            pb::explain_request::Input::Body(b) => Self::Body(b),
            pb::explain_request::Input::Prompt(p) => Self::Prompt(p),
        }
    }
}

impl Input {
    /// The input as the decision path takes it: the body, or the prompt's fields.
    pub(super) fn route_input(&self) -> RouteInput<'_> {
        match self {
            Self::Body(b) => RouteInput::Body(b),
            Self::Prompt(p) => RouteInput::Prompt(PromptFields {
                model: &p.model,
                text: match &p.text {
                    Some(pb::prompt::Text::Prompt(s)) => Some(PromptText::Text(s)),
                    Some(pb::prompt::Text::TokenIds(t)) => Some(PromptText::Ids(&t.ids)),
                    None => None,
                },
                priority: p.priority,
                cache_salt: Some(p.cache_salt.as_str()).filter(|s| !s.is_empty()),
            }),
        }
    }
}

/// A serde-named value's name (`healthy`, `decode`, `kubernetes`).
fn name_of<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

fn endpoint(t: &Target, snapshot: &Snapshot) -> pb::Endpoint {
    pb::Endpoint {
        address: t.address.to_string(),
        name: snapshot.endpoints.get(t.index).map(|e| e.name.clone()).unwrap_or_default(),
        rank: t.rank,
        header_rank: t.header_rank,
        matched_blocks: t.matched_blocks,
    }
}

/// A decision made over `snapshot` (no id, headers or body yet).
pub(super) fn decision(d: &Decision, snapshot: &Snapshot, pool: &str, model: &str) -> pb::Decision {
    pb::Decision {
        pool: pool.to_owned(),
        model: model.to_owned(),
        profile: d.profile.clone(),
        endpoints: d.targets.iter().map(|t| endpoint(t, snapshot)).collect(),
        prefill: d.prefill.as_ref().map(|t| endpoint(t, snapshot)),
        kind: d.kind.as_str().to_owned(),
        cold: d.cold,
        ..Default::default()
    }
}

fn endpoint_explanation(e: &EndpointExplanation) -> pb::EndpointExplanation {
    pb::EndpointExplanation {
        address: e.address.to_string(),
        matched_blocks: e.matched_blocks,
        matched_tokens: e.matched_tokens,
        prefix_source: e.prefix_source.as_ref().map(name_of).unwrap_or_default(),
        predicted_ttft_ms: e.predicted_ttft_ms,
        ttft_model: Some(pb::TtftModel {
            fixed_ms: e.ttft_model.fixed_ms,
            prefill_tokens_per_s: e.ttft_model.prefill_tokens_per_s,
            decode_ms: e.ttft_model.decode_ms,
            samples: e.ttft_model.samples,
            mean_error_ms: e.ttft_model.mean_error_ms,
        }),
        filtered_by: e.filtered_by.clone().unwrap_or_default(),
        scores: e
            .scores
            .iter()
            .map(|s| pb::ScoreTerm { scorer: s.scorer.clone(), raw: s.raw, weight: s.weight, weighted: s.weighted })
            .collect(),
        total: e.total,
        rank: e.rank.map(|r| u32::try_from(r).unwrap_or(u32::MAX)),
    }
}

/// A dry run's explanation.
pub(super) fn explanation(x: &Explanation) -> pb::Explanation {
    pb::Explanation {
        profile: x.profile.clone(),
        endpoints: x.endpoints.iter().map(endpoint_explanation).collect(),
        prefill: x.prefill.as_deref().map(|p| Box::new(explanation(p))),
    }
}

fn endpoint_state(s: EndpointStatus) -> pb::EndpointState {
    pb::EndpointState {
        role: name_of(&s.role),
        health: name_of(&s.health),
        prefix_source: s.prefix_source.as_ref().map(name_of).unwrap_or_default(),
        address: s.address,
        name: s.name,
        rank: s.rank,
        labels: s.labels.into_iter().collect(),
        stale: s.stale,
        running: s.running,
        waiting: s.waiting,
        kv_cache_usage: s.kv_cache_usage,
        in_flight_requests: s.in_flight_requests,
        in_flight_tokens: s.in_flight_tokens,
        in_prefill_requests: s.in_prefill_requests,
        in_decode_requests: s.in_decode_requests,
        prefix_blocks: s.prefix_blocks as u64,
        prefix_capacity: s.prefix_capacity as u64,
        adapters: s.adapters,
        last_error: s.last_error.unwrap_or_default(),
    }
}

/// Every pool's endpoints (those named in `only`, when it names any).
pub(super) fn endpoints_update(gateway: &Gateway, only: &[String]) -> pb::EndpointsUpdate {
    let pools = gateway
        .pools()
        .iter()
        .filter(|p| only.is_empty() || only.iter().any(|n| n == p.name()))
        .map(|p| pb::PoolState {
            name: p.name().to_owned(),
            models: p.served_names(),
            source: name_of(&p.source().kind),
            endpoints: p.status().into_iter().map(endpoint_state).collect(),
        })
        .collect();
    pb::EndpointsUpdate { pools }
}

fn status(s: u32, what: &str) -> Result<u16, String> {
    u16::try_from(s).ok().filter(|s| (100..600).contains(s)).ok_or_else(|| format!("{what}: {s} is not an HTTP status"))
}

/// A report's events, checked, in the order the lifecycle takes them: the prefill leg, the
/// endpoint that served, the response's start, its end.
pub(super) fn report(r: &pb::ReportRequest) -> Result<Report, String> {
    let mut events = Vec::new();
    if let Some(p) = &r.prefill {
        events.push(Event::Prefill(prefill(p)?));
    }
    match r.served_by.as_str() {
        "" => {}
        s => events.push(Event::ServedBy(Served::At(
            s.parse::<SocketAddr>().map_err(|_| format!("served_by: `{s}` is not ip:port"))?,
        ))),
    }
    if let Some(t) = &r.first_token {
        let status = status(t.status, "first_token.status")?;
        events.push(Event::Started { status, event_stream: t.streaming, streamed: true });
        // The first token came: the body started.
        events.push(Event::Body(&[]));
    }
    match &r.end {
        None => {}
        Some(pb::report_request::End::Finished(f)) => {
            let usage = match &f.usage {
                Some(u) if u.cached_tokens.is_some_and(|c| c > u.prompt_tokens) => {
                    return Err("finished.usage: cached_tokens exceeds prompt_tokens".into());
                }
                u => u.as_ref().map(|u| Usage {
                    prompt: u.prompt_tokens,
                    completion: u.completion_tokens,
                    cached: u.cached_tokens.unwrap_or(0),
                    cached_reported: u.cached_tokens.is_some(),
                }),
            };
            let status = Some(status(f.status, "finished.status")?);
            events.push(Event::Finished { status, usage, body_bytes: Some(f.response_bytes) });
        }
        Some(pb::report_request::End::Failed(f)) => events.push(Event::Failed(match f.kind() {
            pb::FailureKind::Unreachable => Failure::Unreachable,
            pb::FailureKind::TimedOut => Failure::TimedOut,
            pb::FailureKind::Cancelled => Failure::Cancelled,
            pb::FailureKind::Unspecified => return Err("failed.kind is required".into()),
        })),
    }
    Ok(events)
}

fn prefill(p: &pb::PrefillOutcome) -> Result<Prefill, String> {
    use pb::FallbackReason as F;
    if p.succeeded {
        return Ok(Prefill::Succeeded);
    }
    Ok(Prefill::Failed(match p.reason() {
        F::Unreachable => PrefillFailure::Unreachable,
        F::Timeout => PrefillFailure::Timeout,
        F::Status => PrefillFailure::Status(status(p.status, "prefill.status")?),
        F::BadResponse => PrefillFailure::BadResponse,
        F::BadRequest => PrefillFailure::BadRequest,
        F::NotAllowed => PrefillFailure::NotAllowed,
        F::Unspecified => return Err("prefill.reason is required when the leg did not succeed".into()),
    }))
}

impl From<Prefill> for pb::PrefillOutcome {
    /// A prefill leg's outcome as a sidecar reports it.
    fn from(p: Prefill) -> Self {
        use pb::FallbackReason as F;
        let f = match p {
            Prefill::Succeeded => return Self { succeeded: true, ..Self::default() },
            Prefill::Failed(f) => f,
        };
        let (reason, status) = match f {
            PrefillFailure::Unreachable => (F::Unreachable, 0),
            PrefillFailure::Timeout => (F::Timeout, 0),
            PrefillFailure::Status(s) => (F::Status, u32::from(s)),
            PrefillFailure::BadResponse => (F::BadResponse, 0),
            PrefillFailure::BadRequest => (F::BadRequest, 0),
            PrefillFailure::NotAllowed => (F::NotAllowed, 0),
        };
        Self { succeeded: false, reason: reason as i32, status }
    }
}
