//! Generation: a completions or chat request checked against the model's limits, submitted to
//! an engine (the one named by `X-data-parallel-rank`, else the least loaded), and its tokens
//! relayed as SSE events or one JSON body; a dropped response is an abort. The body's
//! parameters are read in [`params`], the answer is rendered by [`reply`] and sent by
//! [`relay`]; [`responses`] maps the Responses API onto a chat.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc;

mod params;
mod relay;
mod reply;
mod responses;

use super::prompt::{chat_prompt, completion_prompt, flag, parse_json, resolve_model};
use super::{ApiError, PortState, St};
use crate::tools::sim::engine::{Command, EngineHandle, Event, Handoff, StopWatch, Submission, TokenText};
use crate::tools::sim::faults::FaultKind;
use params::{choices_of, handoff_of, logprobs_of, max_tokens_of, stops_of};
use relay::{Merged, collect_response, stream_response};
use reply::{Choice, Reply};
use responses::responses_as_chat;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Api {
    Completions,
    Chat,
    /// `/v1/responses`: a chat underneath, answered in the Responses API's shape.
    Responses,
}

pub(super) async fn completions(State(st): St, headers: HeaderMap, body: Bytes) -> Response {
    generate(st, Api::Completions, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

pub(super) async fn chat_completions(State(st): St, headers: HeaderMap, body: Bytes) -> Response {
    generate(st, Api::Chat, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

pub(super) async fn responses(State(st): St, headers: HeaderMap, body: Bytes) -> Response {
    generate(st, Api::Responses, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Picks the engine: the rank the header names, else the least loaded (ties rotate).
pub(super) fn pick_engine<'a>(st: &'a PortState, headers: &HeaderMap) -> Result<&'a EngineHandle, ApiError> {
    let pinned =
        headers.get("x-data-parallel-rank").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<i64>().ok());
    if let Some(rank) = pinned {
        return st.engines.iter().find(|e| i64::from(e.rank) == rank).ok_or_else(|| {
            let ranks: Vec<String> = st.engines.iter().map(|e| e.rank.to_string()).collect();
            ApiError::bad(format!("X-data-parallel-rank {rank} is not served here (ranks: {})", ranks.join(", ")))
        });
    }
    let n = st.engines.len();
    let start = st.rr.fetch_add(1, Ordering::Relaxed);
    (0..n)
        .map(|k| &st.engines[(start + k) % n])
        .min_by_key(|e| e.load.in_flight.load(Ordering::Relaxed))
        .ok_or_else(|| ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "no engine"))
}

/// A fresh response id: the request's `X-Request-Id` when it has one (as vLLM does), else
/// random — so two simulator processes never hand out the same ids.
fn response_id(api: Api, headers: &HeaderMap) -> String {
    let prefix = match api {
        Api::Chat => "chatcmpl",
        Api::Completions => "cmpl",
        Api::Responses => "resp",
    };
    // The Responses API's ids are its own (`resp_…`), whatever the header says.
    if api == Api::Responses {
        return format!("resp_{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    }
    let given = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()));
    match given {
        Some(id) => format!("{prefix}-{id}"),
        None => format!("{prefix}-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
    }
}

pub(super) async fn generate(
    st: Arc<PortState>,
    api: Api,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    *st.shared.last_request_headers.lock() = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let shared = st.shared.clone();
    let faults = shared.faults.read().clone();
    if faults.paused {
        return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the server is not accepting requests"));
    }
    let mut v = parse_json(&body)?;
    let max_output_tokens = if api == Api::Responses {
        let asked = v.get("max_output_tokens").and_then(Value::as_u64).map(|m| m as usize);
        v = responses_as_chat(&v)?;
        asked
    } else {
        None
    };
    let (model, lora) = resolve_model(&shared, &v)?;
    let prompt = match api {
        Api::Chat | Api::Responses => chat_prompt(&shared, &v)?,
        Api::Completions => completion_prompt(&shared, &v)?,
    };
    let n = prompt.len();
    if n == 0 {
        return Err(ApiError::bad("the prompt is empty"));
    }
    let limit = shared.max_model_len.min(shared.kv_capacity_tokens);
    if n >= limit {
        return Err(ApiError {
            param: Some(if api == Api::Completions { "prompt" } else { "messages" }),
            ..ApiError::bad(format!(
                "This model's maximum context length is {limit} tokens. However, your request has {n} input tokens. Please reduce the length of the input messages."
            ))
        });
    }
    let (max_tokens, finish_at_max) = max_tokens_of(api, &v, n, limit, &shared.rng)?;
    let choices = choices_of(&v)?;
    let stops = stops_of(&v)?;
    let logprobs = logprobs_of(api, &v)?;
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let fault = shared.faults.write().draw(&mut shared.rng.lock());
    injected(fault, faults.slow_start_ms).await?;
    let handoff = handoff_of(&v, shared.kv_role)?;
    let (max_tokens, stream, choices) =
        if handoff == Handoff::Prefill { (1, false, 1) } else { (max_tokens, stream, choices) };
    let engine = pick_engine(&st, &headers)?;
    let id = response_id(api, &headers);
    let text_of: TokenText = match shared.tokenizer.clone() {
        Some(t) => Arc::new(move |token| t.decode(&[token])),
        None => Arc::new(|token| crate::tools::sim::tokenizer::token_text(token).to_owned()),
    };
    let cache_salt = v.get("cache_salt").and_then(Value::as_str).map(str::to_owned);
    let receivers = submit(engine, choices, |k, events| Submission {
        id: if choices == 1 { id.clone() } else { format!("{id}-{k}") },
        prompt: prompt.clone(),
        max_tokens,
        finish_at_max,
        lora: lora.clone(),
        cache_salt: cache_salt.clone(),
        handoff,
        events,
        arrival,
        stop: (!stops.is_empty()).then(|| StopWatch::new(stops.clone(), text_of.clone())),
    })?;
    let item_id = format!("msg_{:016x}", fastrand::u64(..));
    let reply = Reply {
        rng: fastrand::Rng::with_seed(xxhash_rust::xxh3::xxh3_64(id.as_bytes())),
        id,
        created: unix_now(),
        model,
        api,
        include_usage: stream && flag(&v, "stream_options", "include_usage") == Some(true),
        details: shared.prompt_tokens_details,
        text_of,
        logprobs,
        max_output_tokens,
        item_id,
        sequence: 0,
    };
    let state: Vec<Choice> = (0..choices).map(|_| Choice::new(&stops)).collect();
    let merged = Merged::new(receivers);
    let abort_after = (fault == Some(FaultKind::Abort)).then_some(max_tokens * choices / 2);
    if stream {
        let linger = Duration::from_millis(faults.linger_after_done_ms);
        Ok(stream_response(reply, state, merged, abort_after, linger))
    } else {
        collect_response(reply, state, merged, abort_after).await
    }
}

/// Submits one engine request per choice, made by `submission(k, events)`; their event
/// receivers, in order.
fn submit(
    engine: &EngineHandle,
    choices: usize,
    mut submission: impl FnMut(usize, mpsc::UnboundedSender<Event>) -> Submission,
) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ApiError> {
    let mut receivers = Vec::with_capacity(choices);
    for k in 0..choices {
        let (tx, rx) = mpsc::unbounded_channel();
        let sub = submission(k, tx);
        engine.load.in_flight.fetch_add(1, Ordering::Relaxed);
        if engine.tx.send(Command::Submit(Box::new(sub))).is_err() {
            engine.load.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped"));
        }
        receivers.push(rx);
    }
    Ok(receivers)
}

/// Plays the fault drawn for this request, if any: fails it, holds it, delays it, or drops its
/// connection (an abort is played while its answer is sent).
async fn injected(fault: Option<FaultKind>, slow_start_ms: u64) -> Result<(), ApiError> {
    match fault {
        Some(FaultKind::ServerError) => Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "injected failure")),
        Some(FaultKind::RateLimit) => {
            Err(ApiError::status(StatusCode::TOO_MANY_REQUESTS, "injected failure: rate limited"))
        }
        Some(FaultKind::Unavailable) => {
            Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "injected failure: unavailable"))
        }
        Some(FaultKind::Hang) => {
            // Hold the connection until the client gives up (the future is dropped then).
            tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
            Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "injected hang ended"))
        }
        Some(FaultKind::SlowStart) => {
            tokio::time::sleep(Duration::from_millis(slow_start_ms)).await;
            Ok(())
        }
        Some(FaultKind::Reset) => Err(ApiError::dropped()),
        Some(FaultKind::Abort) | None => Ok(()),
    }
}
