//! The pure half of the prefill → decode hand-off: the bodies of its two legs and the check of
//! the prefill endpoint's answer. vLLM's NIXL protocol: the prefill endpoint gets the request
//! with `max_tokens: 1`, `stream: false` and `kv_transfer_params: {do_remote_decode: true, …}`
//! and answers with `kv_transfer_params` naming the blocks it keeps; the decode endpoint gets
//! the original request plus those parameters. Bodies are rewritten on raw JSON fields, so a
//! long prompt is never decoded or re-encoded.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::{Value, json};

/// Why a body could not be rewritten, or an answer not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The request cannot be turned into a prefill request (not a JSON object).
    #[error("request cannot be disaggregated: {0}")]
    Request(String),
    /// The prefill answer has no usable `kv_transfer_params`.
    #[error("prefill answer unusable: {0}")]
    Answer(String),
}

/// A request body's fields, values kept as raw JSON text: rewriting a few fields of a long
/// prompt's body never decodes (or re-encodes) the prompt.
type Fields<'a> = BTreeMap<Cow<'a, str>, Cow<'a, RawValue>>;

fn object(body: &[u8]) -> Result<Fields<'_>, BodyError> {
    let m: BTreeMap<Cow<'_, str>, &RawValue> = serde_json::from_slice(body).map_err(|e| {
        BodyError::Request(if e.is_data() { "the body is not a JSON object".into() } else { e.to_string() })
    })?;
    Ok(m.into_iter().map(|(k, v)| (k, Cow::Borrowed(v))).collect())
}

fn raw(v: &Value) -> Cow<'static, RawValue> {
    // Serializing a `Value` cannot fail.
    Cow::Owned(serde_json::value::to_raw_value(v).unwrap_or_else(|_| RawValue::NULL.to_owned()))
}

/// The prefill leg's body: the request computing only the prompt, keeping its KV for the decode
/// side. Fields that would make it generate more than one token or stream are dropped.
pub fn prefill_body(body: &[u8]) -> Result<Vec<u8>, BodyError> {
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
    serde_json::to_vec(&m).map_err(|e| BodyError::Request(e.to_string()))
}

/// The decode leg's body: the original request plus the prefill endpoint's `kv_transfer_params`.
pub fn decode_body(body: &[u8], params: &Value) -> Result<Vec<u8>, BodyError> {
    let mut m = object(body)?;
    m.insert("kv_transfer_params".into(), raw(params));
    serde_json::to_vec(&m).map_err(|e| BodyError::Request(e.to_string()))
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
pub fn transfer_params(answer: &[u8]) -> Result<Value, BodyError> {
    let v: Value = serde_json::from_slice(answer).map_err(|e| BodyError::Answer(e.to_string()))?;
    let p = v.get("kv_transfer_params").filter(|p| p.is_object()).cloned();
    let Some(p) = p else { return Err(BodyError::Answer("no `kv_transfer_params` in the answer".into())) };
    if p.get("do_remote_prefill").and_then(Value::as_bool) != Some(true) {
        return Err(BodyError::Answer("`kv_transfer_params.do_remote_prefill` is not true".into()));
    }
    if !p.get("remote_block_ids").is_some_and(Value::is_array) {
        return Err(BodyError::Answer("`kv_transfer_params.remote_block_ids` is not a list".into()));
    }
    Ok(p)
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
        assert!(matches!(prefill_body(b"[1]"), Err(BodyError::Request(_))));
        assert!(matches!(prefill_body(b"{"), Err(BodyError::Request(_))));
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
            assert!(matches!(transfer_params(bad), Err(BodyError::Answer(_))), "{}", String::from_utf8_lossy(bad));
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
}
