//! What can happen to a routed request, as any front-end sees it: the one vocabulary the proxy,
//! the Envoy picker and the picker API's `Report` translate their wire into. A routed request
//! (`outcome::Routed`) takes these [`Event`]s in whatever order the wire produces them and turns
//! them into exactly one accounting.

use std::net::SocketAddr;

use crate::gateway::pool::Outcome;
use crate::gateway::telemetry::Usage;

/// One thing that happened to a routed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// The prefill leg of a P/D decision ran. Ignored for a decision without one, and after the
    /// first report of the leg (a response that starts with no report takes the leg as run: a
    /// sidecar that does not report has handed off all the same).
    Prefill(Prefill),
    /// The request went again, to the decision's target `k` (a retry of the front-end's own):
    /// its in-flight count and time to first token start over there. Ignored once a response
    /// has started.
    Resent(usize),
    /// The endpoint that served, as the gateway in front reports it (after retries of its own,
    /// or by a choice of its own): the request is accounted there from now on.
    ServedBy(Served),
    /// The current attempt failed without a response the client will see. Reports the
    /// endpoint's health once per attempt; the request is over unless it is [`Event::Resent`].
    Failed(Failure),
    /// The response started.
    Started {
        /// Its status.
        status: u16,
        /// It is a server-sent event stream (`text/event-stream`).
        event_stream: bool,
        /// Its body reaches this front-end frame by frame as the endpoint sends it, so the
        /// first frame of an event stream times the first token.
        streamed: bool,
    },
    /// A chunk of the response body passed (usage is read from it as it passes).
    Body(&'a [u8]),
    /// The response ended: its last byte passed, or a caller reported its end.
    Finished {
        /// Its status, when the front-end did not report its start.
        status: Option<u16>,
        /// Its usage, when the front-end read it itself (else what passed in [`Event::Body`]).
        usage: Option<Usage>,
        /// The body's size, when its bytes did not pass in [`Event::Body`].
        body_bytes: Option<u64>,
    },
}

/// How the prefill leg went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefill {
    /// The prefill endpoint computed the prompt.
    Succeeded,
    /// It did not; the decode endpoint computes the prompt itself.
    Failed(PrefillFailure),
}

/// Why a prefill leg failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillFailure {
    /// The prefill endpoint could not be reached.
    Unreachable,
    /// It did not answer in time.
    Timeout,
    /// It answered with this non-2xx status.
    Status(u16),
    /// Its answer could not be used.
    BadResponse,
    /// The request could not be made into a prefill request.
    BadRequest,
    /// The prefill endpoint named is not allowed.
    NotAllowed,
}

impl PrefillFailure {
    /// The `reason` label of `kvgate_disagg_fallbacks_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::Status(_) => "status",
            Self::BadResponse => "bad_response",
            Self::BadRequest => "bad_request",
            Self::NotAllowed => "not_allowed",
        }
    }

    /// What the failure says of the prefill endpoint's health: an unreachable one, or the status
    /// it answered; nothing for a timeout (a long prompt can be slow to prefill on a healthy
    /// endpoint) or for a failure of the request or the answer's contents.
    pub fn learned(self) -> Option<Outcome> {
        match self {
            Self::Unreachable => Some(Outcome::Unreachable),
            Self::Status(s) => Some(Outcome::Answered(s)),
            _ => None,
        }
    }
}

/// The endpoint a gateway reported as the one that served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// An `ip:port`.
    At(SocketAddr),
    /// Something that is not an address (counted as an endpoint outside the pool).
    Unknown(String),
}

impl Served {
    /// What a gateway reported: an address, or the text as it came.
    pub fn parse(reported: &str) -> Self {
        reported.parse().map_or_else(|_| Self::Unknown(reported.to_owned()), Self::At)
    }
}

/// Why an attempt got no response the client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The endpoint could not be reached (counted as a 502).
    Unreachable,
    /// It sent no answer in time (a 504).
    TimedOut,
    /// It answered with this error status, and the front-end gave the client that answer, or
    /// tried elsewhere.
    Status(u16),
    /// The client gave up before a response (not counted as a request with a status).
    Cancelled,
}

impl Failure {
    /// The status the client got, if it got one.
    pub fn status(self) -> Option<u16> {
        match self {
            Self::Unreachable => Some(502),
            Self::TimedOut => Some(504),
            Self::Status(s) => Some(s),
            Self::Cancelled => None,
        }
    }

    /// What it says of the endpoint's health.
    pub fn learned(self) -> Option<Outcome> {
        match self {
            Self::Unreachable => Some(Outcome::Unreachable),
            Self::TimedOut => Some(Outcome::TimedOut),
            Self::Status(s) => Some(Outcome::Answered(s)),
            Self::Cancelled => None,
        }
    }
}
