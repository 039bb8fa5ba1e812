//! The prefill → decode hand-off as I/O, shared by the proxy and the decode-side sidecar: send
//! the prefill leg ([`crate::routing::pd`] writes its body), check the answer, and return the
//! decode leg's body.
//!
//! Any failure of the prefill leg (refused, timed out, an error status, an answer without
//! usable parameters) is a [`Fallback`]: the caller sends the original request to the decode
//! endpoint, which prefills locally. Disaggregation never fails a request by itself.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use http_body_util::{BodyExt, Limited};

use crate::front::http::{UpstreamClient, new_request_id, strip_placement, upstream_request};
use crate::gateway::events::PrefillFailure;
use crate::routing::pd::{BodyError, decode_body, prefill_body, transfer_params};

/// Largest prefill-leg answer read (its `kv_transfer_params` list every block of the prompt).
const MAX_PREFILL_RESPONSE: usize = 16 << 20;

/// Why a prefill leg did not produce usable `kv_transfer_params`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Fallback {
    /// The prefill endpoint could not be reached.
    #[error("prefill endpoint unreachable: {0}")]
    Unreachable(String),
    /// It did not answer within the prefill timeout.
    #[error("prefill endpoint did not answer in time")]
    Timeout,
    /// It answered with an error status.
    #[error("prefill endpoint answered {0}")]
    Status(u16),
    /// Its answer had no usable `kv_transfer_params`.
    #[error("prefill answer unusable: {0}")]
    BadResponse(String),
    /// The request could not be turned into a prefill request (not a JSON object).
    #[error("request cannot be disaggregated: {0}")]
    BadRequest(String),
    /// The named prefill endpoint is not allowed (sidecar allow-list) or not an `ip:port`.
    #[error("prefill endpoint refused: {0}")]
    NotAllowed(String),
}

impl From<BodyError> for Fallback {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::Request(m) => Self::BadRequest(m),
            BodyError::Answer(m) => Self::BadResponse(m),
        }
    }
}

impl Fallback {
    /// The failure in the lifecycle's vocabulary (its reason label, what it says of the
    /// endpoint's health).
    pub(crate) fn kind(&self) -> PrefillFailure {
        match self {
            Self::Unreachable(_) => PrefillFailure::Unreachable,
            Self::Timeout => PrefillFailure::Timeout,
            Self::Status(s) => PrefillFailure::Status(*s),
            Self::BadResponse(_) => PrefillFailure::BadResponse,
            Self::BadRequest(_) => PrefillFailure::BadRequest,
            Self::NotAllowed(_) => PrefillFailure::NotAllowed,
        }
    }
}

/// One prefill leg: where, how, and the client's headers to carry.
#[derive(Debug)]
pub(crate) struct PrefillLeg<'a> {
    /// The prefill endpoint.
    pub address: SocketAddr,
    /// Its data-parallel rank to pin, when it shares its address with other ranks.
    pub header_rank: Option<u32>,
    /// Path and query of the original request.
    pub path: &'a str,
    /// End-to-end headers of the original request.
    pub headers: &'a HeaderMap,
    /// Bound on the whole leg.
    pub timeout: Duration,
}

/// Runs the prefill leg of `body`; returns the decode leg's body.
pub(crate) async fn handoff(client: &UpstreamClient, leg: PrefillLeg<'_>, body: &[u8]) -> Result<Vec<u8>, Fallback> {
    let prefill = prefill_body(body)?;
    let mut headers = leg.headers.clone();
    strip_placement(&mut headers);
    // Its own id, so the prefill and decode legs are distinct requests to vLLM.
    if let Ok(v) = HeaderValue::from_str(&format!("prefill-{}", new_request_id())) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let req = upstream_request(Method::POST, leg.address, leg.path, headers, leg.header_rank, Bytes::from(prefill))
        .map_err(|e| Fallback::BadRequest(e.to_string()))?;
    let run = async {
        let resp = client.request(req).await.map_err(|e| Fallback::Unreachable(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(Fallback::Status(status.as_u16()));
        }
        let answer = Limited::new(resp.into_body(), MAX_PREFILL_RESPONSE)
            .collect()
            .await
            .map_err(|e| Fallback::BadResponse(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok(transfer_params(&answer)?)
    };
    let params = tokio::time::timeout(leg.timeout, run).await.map_err(|_| Fallback::Timeout)??;
    Ok(decode_body(body, &params)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::pool::Outcome;

    #[test]
    fn fallback_reasons() {
        assert_eq!(Fallback::Timeout.kind().learned(), None);
        assert_eq!(Fallback::Unreachable(String::new()).kind().learned(), Some(Outcome::Unreachable));
        assert_eq!(Fallback::Status(503).kind().learned(), Some(Outcome::Answered(503)));
        assert_eq!(Fallback::BadResponse(String::new()).kind().learned(), None);
        assert_eq!(Fallback::NotAllowed(String::new()).kind().reason(), "not_allowed");
    }
}
