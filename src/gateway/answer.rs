//! What kvgate answers itself instead of placing a request — its model list and model info,
//! its health, a refused path, a refused request — as one value, [`Answer`], built here and
//! rendered by one function per wire (an HTTP response, an ext_proc `ImmediateResponse`, a
//! picker API `Refusal`), so the same request gets the same status, code and body on all three.

use serde_json::Value;

use crate::gateway::error::{QueueRefusal, RouteError, error_body};
use crate::gateway::paths::PathRefusal;

/// One of kvgate's own answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The error's code (OpenAI `code`); empty for an answer that is not an error.
    pub code: &'static str,
    /// What went wrong, for a person; empty for an answer that is not an error.
    pub message: String,
    /// The JSON body; empty for an empty answer (a healthy `/health`).
    pub body: String,
    /// Headers besides the content type (`retry-after`, `allow`).
    pub headers: Vec<(&'static str, &'static str)>,
    /// The `x-llm-d-request-dropped-reason` of a refused request.
    pub dropped: Option<&'static str>,
    /// The connection is not worth keeping (the rest of a body that came too slowly).
    pub close: bool,
}

impl Answer {
    /// A 2xx (or other) answer with a JSON body, or an empty one.
    pub fn json(status: u16, body: String) -> Self {
        Self { status, code: "", message: String::new(), body, headers: Vec::new(), dropped: None, close: false }
    }

    /// A JSON value as a 200.
    pub fn ok(value: &Value) -> Self {
        Self::json(200, value.to_string())
    }

    /// An OpenAI-shaped error.
    pub fn error(status: u16, message: impl Into<String>, code: &'static str, param: Option<&str>) -> Self {
        let message = message.into();
        let body = error_body(status, &message, code, param);
        Self { status, code, message, body, headers: Vec::new(), dropped: None, close: false }
    }

    /// The answer's headers with the dropped reason among them, as a wire that carries it sends
    /// them.
    pub fn all_headers(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.dropped.map(|d| (DROPPED_HEADER, d)).into_iter().chain(self.headers.iter().copied())
    }
}

/// Header naming why a request was refused.
pub const DROPPED_HEADER: &str = "x-llm-d-request-dropped-reason";

impl From<&RouteError> for Answer {
    fn from(e: &RouteError) -> Self {
        let param = match e {
            RouteError::BadRequest(r) => r.param().map(str::to_owned),
            RouteError::UnknownModel { .. } => Some("model".to_owned()),
            _ => None,
        };
        let mut a = Self::error(e.status(), e.to_string(), e.code(), param.as_deref());
        if e.retry_soon() {
            a.headers.push(("retry-after", "1"));
        }
        a.dropped = Some(match e {
            RouteError::Saturated { .. } => "rejected-saturated",
            RouteError::Queue { why: QueueRefusal::Shed | QueueRefusal::Full, .. } => "rejected-saturated",
            RouteError::Queue { why: QueueRefusal::Expired | QueueRefusal::ExpiredEmpty, .. } => "rejected-ttl-expired",
            RouteError::Unavailable(_) => "rejected-no-endpoints",
            _ => e.code(),
        });
        a.close = matches!(e, RouteError::SlowBody(_));
        a
    }
}

impl From<&PathRefusal> for Answer {
    fn from(r: &PathRefusal) -> Self {
        let mut a = Self::error(r.status, r.message.clone(), r.code, None);
        a.headers.extend(r.allow.map(|allow| ("allow", allow)));
        a.dropped = Some(r.code);
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::request::{self, ApiKind};
    use crate::routing::schedule::NoDecision;

    #[test]
    fn errors_map_to_statuses_and_openai_bodies() {
        let check = |e: RouteError, status: u16, code: &str| {
            assert_eq!((e.status(), e.code()), (status, code), "{e}");
            let v: serde_json::Value = serde_json::from_str(&Answer::from(&e).body).expect("error body is JSON");
            assert_eq!(v["error"]["code"], code);
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        };
        let parse =
            |b: &str| request::parse(ApiKind::Completions, b.as_bytes(), 1 << 20).map(|_| ()).map_err(RouteError::from);
        check(parse("{").expect_err("bad json"), 400, "invalid_json");
        check(parse(r#"{"prompt":"x"}"#).expect_err("no model"), 400, "missing_model");
        check(RouteError::UnknownModel { model: "x".into(), served: vec!["m".into()] }, 404, "model_not_found");
        check(RouteError::Unavailable(NoDecision::NoEndpoints), 503, "no_endpoints");
        check(RouteError::Unavailable(NoDecision::NoHealthyEndpoints), 503, "no_healthy_endpoints");
    }

    #[test]
    fn refusals_carry_their_drop_reason_and_headers() {
        let shed = Answer::from(&RouteError::Saturated { pool: "p".into(), reason: "r".into(), shed: true });
        assert_eq!((shed.status, shed.code, shed.dropped), (429, "shed", Some("rejected-saturated")));
        assert_eq!(shed.headers, [("retry-after", "1")]);
        let none = Answer::from(&RouteError::Unavailable(NoDecision::NoEndpoints));
        assert_eq!(none.dropped, Some("rejected-no-endpoints"));
        assert!(Answer::from(&RouteError::SlowBody("slow".into())).close);
        let wrong = Answer::from(&PathRefusal::method_not_allowed("GET", "/v1/completions", Some("POST")));
        assert_eq!((wrong.status, wrong.code), (405, "method_not_allowed"));
        let headers: Vec<_> = wrong.all_headers().collect();
        assert_eq!(headers, [(DROPPED_HEADER, "method_not_allowed"), ("allow", "POST")]);
        assert_eq!(Answer::json(200, String::new()).all_headers().count(), 0);
    }
}
