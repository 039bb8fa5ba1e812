//! Why a request is not routed ([`RouteError`]), mapped to an HTTP status and a code exactly
//! once for every front-end (the gateway's `answer` module builds what a client is told).

use serde_json::json;

use crate::routing::request::RequestError;
use crate::routing::schedule::NoDecision;

/// Why a request was not routed. [`RouteError::status`] is the one place these become HTTP
/// statuses, for every front-end.
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
    /// The client holds its share of the request bytes held in memory; try again shortly.
    #[error("this client holds {held} bytes of request bodies, its share is {share}; try again shortly")]
    OverShare {
        /// Bytes the client holds.
        held: usize,
        /// The most one client may hold (`connections.max_body_share_percent` of
        /// `max_buffered_bytes`).
        share: usize,
    },
    /// The client sent its body too slowly (or stopped sending it).
    #[error("{0}")]
    SlowBody(String),
    /// Flow control refused the request (the pool's endpoints were saturated).
    #[error("pool `{pool}`: {why}")]
    Queue {
        /// The pool.
        pool: String,
        /// Why.
        why: QueueRefusal,
    },
}

/// Why flow control refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueRefusal {
    /// Sheddable (negative priority), and every endpoint that could take it is saturated.
    #[error("every endpoint that could take the request is saturated, and it is sheddable")]
    Shed,
    /// Its priority band, or the whole queue, is full.
    #[error("the flow-control queue is full")]
    Full,
    /// It waited in the queue for its whole TTL.
    #[error("the request waited its flow-control TTL and no endpoint had room")]
    Expired,
    /// It waited its whole TTL and the pool still had no endpoint for it.
    #[error("the request waited its flow-control TTL and the pool has no endpoint for it")]
    ExpiredEmpty,
}

impl RouteError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(e) => e.status(),
            Self::UnknownModel { .. } => 404,
            Self::Unavailable(_) | Self::Overloaded { .. } | Self::OverShare { .. } => 503,
            Self::Saturated { .. } => 429,
            Self::SlowBody(_) => 408,
            Self::Queue { why: QueueRefusal::ExpiredEmpty, .. } => 503,
            Self::Queue { .. } => 429,
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
            Self::Overloaded { .. } | Self::OverShare { .. } => "overloaded",
            Self::SlowBody(_) => "request_timeout",
            Self::Queue { why: QueueRefusal::Shed, .. } => "shed",
            Self::Queue { why: QueueRefusal::Full, .. } => "queue_full",
            Self::Queue { why: QueueRefusal::Expired, .. } => "queue_timeout",
            Self::Queue { why: QueueRefusal::ExpiredEmpty, .. } => "no_endpoints",
        }
    }

    /// Whether the client should try again shortly (`Retry-After`).
    pub fn retry_soon(&self) -> bool {
        matches!(self, Self::Saturated { .. } | Self::Overloaded { .. } | Self::OverShare { .. } | Self::Queue { .. })
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
