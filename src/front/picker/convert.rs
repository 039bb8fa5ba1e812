//! The picker API's messages to and from the gateway's types.

use std::net::SocketAddr;

use serde_json::{Map, Value, json};

use super::pb;
use crate::gateway::decisions::{End, Failure, FirstToken, PrefillReport, Report};
use crate::gateway::facade::Gateway;
use crate::gateway::pool::{Outcome, Snapshot};
use crate::gateway::telemetry::Usage;
use crate::routing::endpoint::EndpointStatus;
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
    /// The body the decision path parses: the given one, or a completions body with the
    /// prompt's fields (no `model` when it is empty, so it is refused as one without).
    pub(super) fn into_body(self) -> Vec<u8> {
        let p = match self {
            Self::Body(b) => return b,
            Self::Prompt(p) => p,
        };
        let mut o = Map::new();
        if !p.model.is_empty() {
            o.insert("model".into(), json!(p.model));
        }
        let prompt = match p.text {
            Some(pb::prompt::Text::Prompt(s)) => json!(s),
            Some(pb::prompt::Text::TokenIds(t)) => json!(t.ids),
            None => json!(""),
        };
        o.insert("prompt".into(), prompt);
        if p.priority != 0 {
            o.insert("priority".into(), json!(p.priority));
        }
        if !p.cache_salt.is_empty() {
            o.insert("cache_salt".into(), json!(p.cache_salt));
        }
        Value::Object(o).to_string().into_bytes()
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
        .map(|p| {
            let mut models = p.served_models();
            for a in &p.snapshot().adapters {
                if !models.contains(a) {
                    models.push(a.clone());
                }
            }
            pb::PoolState {
                name: p.name().to_owned(),
                models,
                source: name_of(&p.source().kind),
                endpoints: p.status().into_iter().map(endpoint_state).collect(),
            }
        })
        .collect();
    pb::EndpointsUpdate { pools }
}

fn status(s: u32, what: &str) -> Result<u16, String> {
    u16::try_from(s).ok().filter(|s| (100..600).contains(s)).ok_or_else(|| format!("{what}: {s} is not an HTTP status"))
}

/// A report's parts, checked.
pub(super) fn report(r: &pb::ReportRequest) -> Result<Report, String> {
    let prefill = r.prefill.as_ref().map(prefill_report).transpose()?;
    let served_by = match r.served_by.as_str() {
        "" => None,
        s => Some(s.parse::<SocketAddr>().map_err(|_| format!("served_by: `{s}` is not ip:port"))?),
    };
    let first_token = match &r.first_token {
        Some(t) => Some(FirstToken { status: status(t.status, "first_token.status")?, streaming: t.streaming }),
        None => None,
    };
    let end = match &r.end {
        None => None,
        Some(pb::report_request::End::Finished(f)) => Some(End::Finished {
            usage: match &f.usage {
                Some(u) if u.cached_tokens.is_some_and(|c| c > u.prompt_tokens) => {
                    return Err("finished.usage: cached_tokens exceeds prompt_tokens".into());
                }
                u => u.as_ref().map(|u| Usage {
                    prompt: u.prompt_tokens,
                    completion: u.completion_tokens,
                    cached: u.cached_tokens.unwrap_or(0),
                    cached_reported: u.cached_tokens.is_some(),
                }),
            },
            status: status(f.status, "finished.status")?,
            response_bytes: f.response_bytes,
        }),
        Some(pb::report_request::End::Failed(f)) => Some(End::Failed(match f.kind() {
            pb::FailureKind::Unreachable => Failure::Unreachable,
            pb::FailureKind::TimedOut => Failure::TimedOut,
            pb::FailureKind::Cancelled => Failure::Cancelled,
            pb::FailureKind::Unspecified => return Err("failed.kind is required".into()),
        })),
    };
    Ok(Report { prefill, served_by, first_token, end })
}

fn prefill_report(p: &pb::PrefillOutcome) -> Result<PrefillReport, String> {
    use pb::FallbackReason as F;
    if p.succeeded {
        return Ok(PrefillReport { succeeded: true, reason: "", learned: None });
    }
    let (reason, learned) = match p.reason() {
        F::Unreachable => ("unreachable", Some(Outcome::Unreachable)),
        F::Timeout => ("timeout", None),
        F::Status => ("status", Some(Outcome::Answered(status(p.status, "prefill.status")?))),
        F::BadResponse => ("bad_response", None),
        F::BadRequest => ("bad_request", None),
        F::NotAllowed => ("not_allowed", None),
        F::Unspecified => return Err("prefill.reason is required when the leg did not succeed".into()),
    };
    Ok(PrefillReport { succeeded: false, reason, learned })
}
