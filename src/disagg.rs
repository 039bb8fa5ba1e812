//! The prefill → decode hand-off, shared by the proxy and the decode-side sidecar.
//!
//! vLLM's NIXL protocol: the prefill endpoint gets the request with `max_tokens: 1`,
//! `stream: false` and `kv_transfer_params: {do_remote_decode: true, …}`; it computes the prompt's
//! KV cache, keeps the blocks for the decode side to pull and answers with `kv_transfer_params`
//! naming them. The decode endpoint then gets the original request plus those parameters, loads
//! the blocks instead of computing them, and streams the answer.
//!
//! Any failure of the prefill leg (refused, timed out, an error status, an answer without
//! usable parameters) is a [`Fallback`]: the caller sends the original request to the decode
//! endpoint, which prefills locally. Disaggregation never fails a request by itself.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// Request header naming the prefill endpoint (`ip:port`) for the decode side; on a proxy
/// response, the prefill endpoint that was used.
pub const PREFILLER_HEADER: &str = "x-prefiller-host-port";

/// Request header for the decode side: the data-parallel rank to pin on the prefill endpoint,
/// when that endpoint balances its ranks behind one port.
pub const PREFILLER_RANK_HEADER: &str = "x-prefiller-data-parallel-rank";

/// Request header pinning a request to one data-parallel rank of a vLLM server that balances
/// its ranks internally.
pub const DP_RANK_HEADER: &str = "x-data-parallel-rank";

/// The headers that say where a request is placed: kvgate's to set, never a client's.
const PLACEMENT_HEADERS: [&str; 3] = [PREFILLER_HEADER, PREFILLER_RANK_HEADER, DP_RANK_HEADER];

/// Removes any placement header from `headers`.
pub fn strip_placement(headers: &mut HeaderMap) {
    for h in PLACEMENT_HEADERS {
        headers.remove(h);
    }
}

/// Largest prefill-leg answer read (its `kv_transfer_params` list every block of the prompt).
const MAX_PREFILL_RESPONSE: usize = 16 << 20;

/// The HTTP client both front-ends use for upstream requests.
pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// Why a prefill leg did not produce usable `kv_transfer_params`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fallback {
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

impl Fallback {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "unreachable",
            Self::Timeout => "timeout",
            Self::Status(_) => "status",
            Self::BadResponse(_) => "bad_response",
            Self::BadRequest(_) => "bad_request",
            Self::NotAllowed(_) => "not_allowed",
        }
    }

    /// Whether the failure says something about the prefill endpoint's health (a timeout does
    /// not: a long prompt can be slow to prefill on a healthy endpoint).
    pub fn endpoint_failed(&self) -> bool {
        matches!(self, Self::Unreachable(_)) || matches!(self, Self::Status(s) if *s >= 500)
    }
}

/// A request body's fields, values kept as raw JSON text: rewriting a few fields of a long
/// prompt's body never decodes (or re-encodes) the prompt.
type Fields<'a> = BTreeMap<Cow<'a, str>, Cow<'a, RawValue>>;

fn object(body: &[u8]) -> Result<Fields<'_>, Fallback> {
    let m: BTreeMap<Cow<'_, str>, &RawValue> = serde_json::from_slice(body).map_err(|e| {
        Fallback::BadRequest(if e.is_data() { "the body is not a JSON object".into() } else { e.to_string() })
    })?;
    Ok(m.into_iter().map(|(k, v)| (k, Cow::Borrowed(v))).collect())
}

fn raw(v: &Value) -> Cow<'static, RawValue> {
    // Serializing a `Value` cannot fail.
    Cow::Owned(serde_json::value::to_raw_value(v).unwrap_or_else(|_| RawValue::NULL.to_owned()))
}

/// The prefill leg's body: the request computing only the prompt, keeping its KV for the decode
/// side. Fields that would make it generate more than one token or stream are dropped.
pub fn prefill_body(body: &[u8]) -> Result<Vec<u8>, Fallback> {
    let mut m = object(body)?;
    m.insert("stream".into(), raw(&Value::Bool(false)));
    m.insert("max_tokens".into(), raw(&json!(1)));
    if m.contains_key("max_completion_tokens") {
        m.insert("max_completion_tokens".into(), raw(&json!(1)));
    }
    for k in ["stream_options", "min_tokens", "min_completion_tokens"] {
        m.remove(k);
    }
    m.insert(
        "kv_transfer_params".into(),
        raw(&json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        })),
    );
    serde_json::to_vec(&m).map_err(|e| Fallback::BadRequest(e.to_string()))
}

/// The decode leg's body: the original request plus the prefill endpoint's `kv_transfer_params`.
pub fn decode_body(body: &[u8], params: &Value) -> Result<Vec<u8>, Fallback> {
    let mut m = object(body)?;
    m.insert("kv_transfer_params".into(), raw(params));
    serde_json::to_vec(&m).map_err(|e| Fallback::BadRequest(e.to_string()))
}

/// The body without a client's own `kv_transfer_params`, if it has them (`None`: nothing to
/// remove, or not a JSON object). Bodies that do not mention the field are not parsed.
pub fn without_transfer_params(body: &[u8]) -> Option<Vec<u8>> {
    memchr::memmem::find(body, b"kv_transfer_params")?;
    let mut m = object(body).ok()?;
    m.remove("kv_transfer_params")?;
    serde_json::to_vec(&m).ok()
}

/// Checks a prefill answer's `kv_transfer_params` enough for the decode side to use them.
fn transfer_params(answer: &[u8]) -> Result<Value, Fallback> {
    let v: Value = serde_json::from_slice(answer).map_err(|e| Fallback::BadResponse(e.to_string()))?;
    let p = v.get("kv_transfer_params").filter(|p| p.is_object()).cloned();
    let Some(p) = p else { return Err(Fallback::BadResponse("no `kv_transfer_params` in the answer".into())) };
    if p.get("do_remote_prefill").and_then(Value::as_bool) != Some(true) {
        return Err(Fallback::BadResponse("`kv_transfer_params.do_remote_prefill` is not true".into()));
    }
    if !p.get("remote_block_ids").is_some_and(Value::is_array) {
        return Err(Fallback::BadResponse("`kv_transfer_params.remote_block_ids` is not a list".into()));
    }
    Ok(p)
}

/// One prefill leg: where, how, and the client's headers to carry.
#[derive(Debug)]
pub struct PrefillLeg<'a> {
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
pub async fn handoff(client: &UpstreamClient, leg: PrefillLeg<'_>, body: &[u8]) -> Result<Vec<u8>, Fallback> {
    let prefill = prefill_body(body)?;
    let mut headers = leg.headers.clone();
    strip_placement(&mut headers);
    // Its own id, so the prefill and decode legs are distinct requests to vLLM.
    if let Ok(v) = HeaderValue::from_str(&format!("prefill-{}", crate::proxy::new_request_id())) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let req = crate::proxy::upstream_request(
        Method::POST,
        leg.address,
        leg.path,
        headers,
        leg.header_rank,
        Bytes::from(prefill),
    )
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
        transfer_params(&answer)
    };
    let params = tokio::time::timeout(leg.timeout, run).await.map_err(|_| Fallback::Timeout)??;
    decode_body(body, &params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_body_computes_one_token_and_keeps_the_rest() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,
            "stream_options":{"include_usage":true},"max_tokens":300,"max_completion_tokens":300,"min_tokens":5,
            "temperature":0.2}"#;
        let v: Value = serde_json::from_slice(&prefill_body(body).expect("object")).expect("json");
        assert_eq!(v["stream"], false);
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(v["max_completion_tokens"], 1);
        assert!(v.get("stream_options").is_none() && v.get("min_tokens").is_none());
        assert_eq!(v["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(v["kv_transfer_params"]["do_remote_prefill"], false);
        assert_eq!(v["temperature"], 0.2);
        assert_eq!(v["messages"][0]["content"], "hi");
        // Without max_completion_tokens, none is added.
        let v: Value =
            serde_json::from_slice(&prefill_body(br#"{"model":"m","prompt":"x"}"#).expect("object")).expect("json");
        assert!(v.get("max_completion_tokens").is_none());
        assert!(matches!(prefill_body(b"[1]"), Err(Fallback::BadRequest(_))));
        assert!(matches!(prefill_body(b"{"), Err(Fallback::BadRequest(_))));
    }

    #[test]
    fn decode_body_carries_the_answer_params_verbatim() {
        let answer =
            br#"{"id":"x","choices":[],"kv_transfer_params":{"do_remote_prefill":true,"do_remote_decode":false,
            "remote_block_ids":[1,2,3],"remote_engine_id":"e","remote_host":"10.0.0.1","remote_port":5600}}"#;
        let p = transfer_params(answer).expect("usable");
        let body = decode_body(br#"{"model":"m","stream":true,"max_tokens":9}"#, &p).expect("object");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!((v["stream"].clone(), v["max_tokens"].clone()), (json!(true), json!(9)));
        assert_eq!(v["kv_transfer_params"]["remote_block_ids"], json!([1, 2, 3]));
        assert_eq!(v["kv_transfer_params"]["remote_port"], 5600);
        for bad in [
            &br#"{"choices":[]}"#[..],
            br#"{"kv_transfer_params":null}"#,
            br#"{"kv_transfer_params":{"do_remote_prefill":false,"remote_block_ids":[1]}}"#,
            br#"{"kv_transfer_params":{"do_remote_prefill":true,"remote_block_ids":null}}"#,
            b"not json",
        ] {
            assert!(matches!(transfer_params(bad), Err(Fallback::BadResponse(_))), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn client_transfer_params_are_removed() {
        let body = br#"{"model":"m","kv_transfer_params":{"do_remote_prefill":true},"prompt":"x"}"#;
        let v: Value = serde_json::from_slice(&without_transfer_params(body).expect("object")).expect("json");
        assert_eq!(v, json!({"model": "m", "prompt": "x"}));
        assert_eq!(without_transfer_params(b"[]"), None);
        assert_eq!(without_transfer_params(br#"{"prompt":"kv_transfer_params"}"#), None, "only the field");
        assert_eq!(without_transfer_params(br#"{"prompt":"x"}"#), None);
    }

    #[test]
    fn fallback_reasons() {
        assert!(!Fallback::Timeout.endpoint_failed());
        assert!(Fallback::Unreachable(String::new()).endpoint_failed());
        assert!(Fallback::Status(503).endpoint_failed());
        assert!(!Fallback::Status(400).endpoint_failed());
        assert!(!Fallback::BadResponse(String::new()).endpoint_failed());
        assert_eq!(Fallback::NotAllowed(String::new()).reason(), "not_allowed");
    }
}
