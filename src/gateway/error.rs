//! Why a request is not routed ([`RouteError`]), mapped to an HTTP status and an OpenAI-shaped
//! body exactly once, for every front-end.

use serde_json::json;

use crate::routing::request::RequestError;
use crate::routing::schedule::NoDecision;

/// Why a request was not routed. [`RouteError::status`] is the one place these become HTTP
/// statuses, for both front-ends.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The body is not a routable OpenAI request.
    #[error(transparent)]
    BadRequest(#[from] RequestError),
    /// No pool serves the model.
    #[error("model `{model}` is not served here; served models: {}", served.join(", "))]
    UnknownModel {
        /// The requested model.
        model: String,
        /// Every model that is served.
        served: Vec<String>,
    },
    /// The pool has no endpoint that can take the request.
    #[error("{0}")]
    Unavailable(#[from] NoDecision),
    /// The pool is over its admission limits (or near them, for a sheddable request).
    #[error("pool `{pool}` is saturated: {reason}")]
    Saturated {
        /// The pool.
        pool: String,
        /// Which limit.
        reason: String,
        /// The request was sheddable (negative priority) and shed early.
        shed: bool,
    },
    /// The request bytes held in memory are at their bound; try again shortly.
    #[error("kvgate holds {held} bytes of request bodies, its limit is {limit}; try again shortly")]
    Overloaded {
        /// Bytes held.
        held: usize,
        /// `max_buffered_bytes`.
        limit: usize,
    },
    /// The client sent its body too slowly (or stopped sending it).
    #[error("{0}")]
    SlowBody(String),
}

impl RouteError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(e) => e.status(),
            Self::UnknownModel { .. } => 404,
            Self::Unavailable(_) | Self::Overloaded { .. } => 503,
            Self::Saturated { .. } => 429,
            Self::SlowBody(_) => 408,
        }
    }

    /// Short machine-readable reason (OpenAI `code`, and the `x-llm-d-request-dropped-reason`
    /// header of ext_proc).
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(e) => e.code(),
            Self::UnknownModel { .. } => "model_not_found",
            Self::Unavailable(NoDecision::SubsetUnmatched) => "subset_unmatched",
            Self::Unavailable(NoDecision::NoHealthyEndpoints) => "no_healthy_endpoints",
            Self::Unavailable(_) => "no_endpoints",
            Self::Saturated { shed: true, .. } => "shed",
            Self::Saturated { shed: false, .. } => "saturated",
            Self::Overloaded { .. } => "overloaded",
            Self::SlowBody(_) => "request_timeout",
        }
    }

    /// Whether the client should try again shortly (`Retry-After`).
    pub fn retry_soon(&self) -> bool {
        matches!(self, Self::Saturated { .. } | Self::Overloaded { .. })
    }

    /// OpenAI-shaped error body.
    pub fn to_json(&self) -> String {
        let param = match self {
            Self::BadRequest(e) => e.param().map(str::to_owned),
            Self::UnknownModel { .. } => Some("model".to_owned()),
            Self::Unavailable(_) | Self::Saturated { .. } | Self::Overloaded { .. } | Self::SlowBody(_) => None,
        };
        error_body(self.status(), &self.to_string(), self.code(), param.as_deref())
    }
}

/// The `error_code` label of a request whose endpoint answered `status` (empty below 400).
pub fn upstream_error_code(status: u16) -> &'static str {
    const NAMED: &[(u16, &str)] = &[
        (400, "bad_request"),
        (401, "unauthorized"),
        (403, "forbidden"),
        (404, "not_found"),
        (408, "request_timeout"),
        (409, "conflict"),
        (413, "payload_too_large"),
        (422, "unprocessable_entity"),
        (429, "rate_limited"),
        (500, "internal_error"),
        (502, "bad_gateway"),
        (503, "service_unavailable"),
        (504, "gateway_timeout"),
    ];
    match NAMED.iter().find(|(s, _)| *s == status) {
        Some((_, code)) => code,
        None if status < 400 => "",
        None if status < 500 => "client_error",
        None => "server_error",
    }
}

/// An OpenAI-shaped error body: `{"error":{"message","type","param","code"}}`.
pub fn error_body(status: u16, message: &str, code: &str, param: Option<&str>) -> String {
    let kind = match status {
        400 | 405 | 408 | 413 | 414 | 431 => "invalid_request_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "service_unavailable",
        _ => "server_error",
    };
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}}).to_string()
}

/// An error with its causes, `: `-separated (hyper's own message is only its outermost kind);
/// a cause whose text the message already holds is left out.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::request::{self, ApiKind};

    #[test]
    fn errors_map_to_statuses_and_openai_bodies() {
        let check = |e: RouteError, status: u16, code: &str| {
            assert_eq!((e.status(), e.code()), (status, code), "{e}");
            let v: serde_json::Value = serde_json::from_str(&e.to_json()).expect("error body is JSON");
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
}
