//! A generation request's parameters read from its body, each checked as vLLM checks it: how
//! many tokens and choices, stop strings, logprobs, and the P/D hand-off its
//! `kv_transfer_params` ask for.

use parking_lot::Mutex;
use serde_json::Value;

use super::Api;
use super::reply::Logprobs;
use crate::tools::sim::engine::{FinishReason, Handoff, KvRole};
use crate::tools::sim::server::ApiError;

/// `stop` as a list of strings (a string, a list, or null), or why not.
pub(super) fn stops_of(v: &Value) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError { param: Some("stop"), ..ApiError::bad("`stop` must be a string or a list of strings") };
    let stops = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            a.iter().map(|x| x.as_str().map(str::to_owned).ok_or_else(bad)).collect::<Result<_, _>>()?
        }
        Some(_) => return Err(bad()),
    };
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

/// Logprobs asked for (chat: `logprobs: true` with `top_logprobs`; completions: `logprobs: k`).
pub(super) fn logprobs_of(api: Api, v: &Value) -> Result<Option<Logprobs>, ApiError> {
    const MAX: u64 = 20;
    let count = |field: &'static str| -> Result<Option<u64>, ApiError> {
        match v.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_u64().filter(|k| *k <= MAX).map(Some).ok_or_else(|| ApiError {
                param: Some(field),
                ..ApiError::bad(format!("`{field}` must be an integer from 0 to {MAX}"))
            }),
        }
    };
    match api {
        Api::Completions => Ok(count("logprobs")?.map(|k| Logprobs { top: k as usize })),
        Api::Chat => {
            let on = match v.get("logprobs") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError { param: Some("logprobs"), ..ApiError::bad("`logprobs` must be a boolean") });
                }
            };
            let top = count("top_logprobs")?;
            if !on && top.is_some_and(|k| k > 0) {
                return Err(ApiError {
                    param: Some("top_logprobs"),
                    ..ApiError::bad("when using `top_logprobs`, `logprobs` must be set to true")
                });
            }
            Ok(on.then(|| Logprobs { top: top.unwrap_or(0) as usize }))
        }
        Api::Responses => Ok(None),
    }
}

/// The most tokens to generate and how a choice that reaches them ends: the body's limit
/// (chat: `max_completion_tokens` when given, else `max_tokens`; completions have only the
/// latter) within the model's context `limit` after the prompt's `n` tokens, else a
/// natural-looking length drawn from `rng`, ending in `stop`.
pub(super) fn max_tokens_of(
    api: Api,
    v: &Value,
    n: usize,
    limit: usize,
    rng: &Mutex<fastrand::Rng>,
) -> Result<(usize, FinishReason), ApiError> {
    let given = |field: &'static str| v.get(field).filter(|m| !m.is_null()).map(|m| (field, m));
    let asked =
        if api == Api::Completions { None } else { given("max_completion_tokens") }.or_else(|| given("max_tokens"));
    match asked {
        Some((field, m)) => {
            let m = m
                .as_u64()
                .filter(|&m| m >= 1)
                .ok_or_else(|| ApiError::bad(format!("`{field}` must be a positive integer")))?
                as usize;
            if n + m > limit {
                return Err(ApiError::bad(format!(
                    "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({n} in the messages, {m} in the completion). Please reduce the length of the messages or completion.",
                    n + m
                )));
            }
            Ok((m, FinishReason::Length))
        }
        None => {
            // No limit given: a natural-looking answer length, ending in `stop`.
            let m = rng.lock().usize(16..=256).min(limit - n);
            Ok((m.max(1), FinishReason::Stop))
        }
    }
}

/// `n`: how many choices (1 to 128).
pub(super) fn choices_of(v: &Value) -> Result<usize, ApiError> {
    match v.get("n") {
        None | Some(Value::Null) => Ok(1),
        Some(x) => x
            .as_u64()
            .filter(|n| (1..=128).contains(n))
            .map(|n| n as usize)
            .ok_or_else(|| ApiError { param: Some("n"), ..ApiError::bad("`n` must be an integer from 1 to 128") }),
    }
}

/// The leg of a P/D hand-off that `kv_transfer_params` asks this endpoint to run, as its KV
/// role allows; a decode leg must say where to pull the blocks from.
pub(super) fn handoff_of(v: &Value, kv_role: KvRole) -> Result<Handoff, ApiError> {
    match v.get("kv_transfer_params") {
        Some(p) if p.get("do_remote_decode").and_then(Value::as_bool) == Some(true) && kv_role != KvRole::Consumer => {
            Ok(Handoff::Prefill)
        }
        Some(p) if p.get("do_remote_prefill").and_then(Value::as_bool) == Some(true) && kv_role != KvRole::Producer => {
            // What a decode endpoint needs to pull the blocks: which, from which engine, where.
            if !p.get("remote_block_ids").is_some_and(Value::is_array) {
                return Err(ApiError::bad("`kv_transfer_params.do_remote_prefill` needs a `remote_block_ids` list"));
            }
            for field in ["remote_engine_id", "remote_host"] {
                if !p.get(field).is_some_and(Value::is_string) {
                    return Err(ApiError::bad(format!("`kv_transfer_params.{field}` must be a string")));
                }
            }
            if !p.get("remote_port").is_some_and(Value::is_u64) {
                return Err(ApiError::bad("`kv_transfer_params.remote_port` must be a port number"));
            }
            Ok(Handoff::Decode)
        }
        _ => Ok(Handoff::None),
    }
}
