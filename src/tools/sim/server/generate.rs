//! Generation: a completions or chat request checked against the model's limits, submitted to
//! an engine (the one named by `X-data-parallel-rank`, else the least loaded), and its tokens
//! relayed as SSE events or one JSON body; a dropped response is an abort.

use futures_util::StreamExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

mod responses;

use super::prompt::{chat_prompt, completion_prompt, flag, parse_json, resolve_model};
use super::{ApiError, PortState, St};
use crate::tools::sim::engine::{
    Command, Done, EngineHandle, Event, FinishReason, Handoff, KvRole, StopWatch, Submission, TokenText,
};
use crate::tools::sim::faults::FaultKind;
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

/// Logprobs asked for: how many alternatives per token.
#[derive(Debug, Clone, Copy)]
struct Logprobs {
    top: usize,
}

/// Everything a response needs to describe itself.
pub(super) struct Reply {
    id: String,
    created: u64,
    model: String,
    api: Api,
    include_usage: bool,
    /// Usage carries `prompt_tokens_details`.
    details: bool,
    text_of: TokenText,
    logprobs: Option<Logprobs>,
    /// Draws of the (shape-only) log probabilities.
    rng: fastrand::Rng,
    /// The Responses API's `max_output_tokens`, echoed.
    max_output_tokens: Option<usize>,
    /// The Responses API's output item id.
    item_id: String,
    /// The Responses API's events are numbered.
    sequence: u64,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply").field("id", &self.id).field("api", &self.api).finish_non_exhaustive()
    }
}

/// One choice's state while its tokens arrive.
#[derive(Debug)]
struct Choice {
    /// Text released so far (non-streaming: all of it).
    text: String,
    cutter: StopCutter,
    /// The end, once it came.
    done: Option<Done>,
    /// Per-token logprob entries not yet sent.
    logprobs: Vec<Value>,
    /// Characters sent before this chunk (completions' `text_offset`).
    offset: usize,
}

/// Cuts a choice's text before its first stop string, holding back what could still become
/// one so a stream never shows part of it.
#[derive(Debug, Default)]
struct StopCutter {
    stops: Vec<String>,
    hold: usize,
    pending: String,
    matched: Option<String>,
}

impl StopCutter {
    fn new(stops: &[String]) -> Self {
        let hold = stops.iter().map(String::len).max().unwrap_or(1).saturating_sub(1);
        Self { stops: stops.to_vec(), hold, ..Self::default() }
    }

    /// Adds generated text; what may be shown now.
    fn push(&mut self, piece: &str) -> String {
        if self.matched.is_some() {
            return String::new();
        }
        self.pending.push_str(piece);
        let first = self.stops.iter().filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s))).min();
        if let Some((at, s)) = first {
            self.matched = Some(s.clone());
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return out;
        }
        let mut cut = self.pending.len().saturating_sub(self.hold);
        while !self.pending.is_char_boundary(cut) {
            cut -= 1;
        }
        self.pending.drain(..cut).collect()
    }

    /// The end: what was held back (nothing after a stop string).
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Chat, false) => "chat.completion",
            (Api::Completions, _) => "text_completion",
            (Api::Responses, _) => "response",
        }
    }

    /// Usage over every choice: the prompt once, completions summed.
    fn usage(&self, choices: &[Choice]) -> Value {
        let first = choices.iter().find_map(|c| c.done.as_ref());
        let prompt = first.map_or(0, |d| d.prompt_tokens);
        let cached = first.map_or(0, |d| d.cached_tokens);
        let completion: usize = choices.iter().filter_map(|c| c.done.as_ref()).map(|d| d.completion_tokens).sum();
        if self.api == Api::Responses {
            return json!({
                "input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            });
        }
        let mut u =
            json!({"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion});
        if self.details {
            u["prompt_tokens_details"] = json!({"cached_tokens": cached});
        }
        u
    }

    /// A logprob entry for `token` (shape only: the values are drawn, not computed).
    fn logprob_entry(&mut self, token: u32, text: &str, offset: usize) -> Option<Value> {
        let lp = self.logprobs?;
        let sampled = -self.rng.f64() * 2.0;
        let mut alternatives: Vec<(String, f64)> = vec![(text.to_owned(), sampled)];
        let mut worse = sampled;
        while alternatives.len() < lp.top {
            worse -= 0.1 + self.rng.f64() * 2.0;
            let other = (self.text_of)(token.wrapping_add(alternatives.len() as u32 * 7919));
            alternatives.push((other, worse));
        }
        alternatives.truncate(lp.top.max(usize::from(self.api == Api::Completions)));
        Some(match self.api {
            Api::Completions => {
                let top: serde_json::Map<String, Value> =
                    alternatives.iter().map(|(t, l)| (t.clone(), json!(l))).collect();
                json!({"token": text, "logprob": sampled, "top": top, "offset": offset})
            }
            _ => {
                let top: Vec<Value> = alternatives
                    .iter()
                    .map(|(t, l)| json!({"token": t, "logprob": l, "bytes": t.as_bytes()}))
                    .collect();
                json!({"token": text, "logprob": sampled, "bytes": text.as_bytes(), "top_logprobs": top})
            }
        })
    }

    /// A choice's `logprobs` value for these entries.
    fn logprobs_value(&self, entries: &[Value]) -> Value {
        if self.logprobs.is_none() {
            return Value::Null;
        }
        match self.api {
            Api::Completions => json!({
                "text_offset": entries.iter().map(|e| e["offset"].clone()).collect::<Vec<_>>(),
                "token_logprobs": entries.iter().map(|e| e["logprob"].clone()).collect::<Vec<_>>(),
                "tokens": entries.iter().map(|e| e["token"].clone()).collect::<Vec<_>>(),
                "top_logprobs": entries.iter().map(|e| e["top"].clone()).collect::<Vec<_>>(),
            }),
            _ => json!({"content": entries}),
        }
    }

    fn chunk_envelope(&self, choice: Value) -> Bytes {
        let mut v = json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]});
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        sse(&v)
    }

    /// The chat stream's opening event of choice `index`: the assistant role, empty content.
    fn role_chunk(&self, index: usize) -> Bytes {
        self.chunk_envelope(
            json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
        )
    }

    /// One SSE event of choice `index` carrying `text` (and its end on the last one).
    fn chunk(&self, index: usize, text: &str, logprobs: &[Value], end: Option<(&str, Value)>) -> Bytes {
        let (finish, stop_reason) = end.map_or((Value::Null, Value::Null), |(f, s)| (json!(f), s));
        let lp = self.logprobs_value(logprobs);
        let choice = match self.api {
            Api::Completions => {
                json!({"index": index, "text": text, "logprobs": lp, "finish_reason": finish, "stop_reason": stop_reason})
            }
            _ => {
                let mut c =
                    json!({"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": finish});
                if !finish.is_null() {
                    c["stop_reason"] = stop_reason;
                }
                c
            }
        };
        self.chunk_envelope(choice)
    }

    fn usage_chunk(&self, choices: &[Choice]) -> Bytes {
        sse(
            &json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [], "usage": self.usage(choices)}),
        )
    }

    /// The whole answer (non-streaming).
    fn full(&self, choices: &[Choice]) -> Value {
        if self.api == Api::Responses {
            return self.response_object(choices, "completed");
        }
        let list: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let (finish, stop_reason) = end_of(c);
                let lp = self.logprobs_value(&c.logprobs);
                match self.api {
                    Api::Completions => {
                        json!({"index": index, "text": c.text, "logprobs": lp, "finish_reason": finish, "stop_reason": stop_reason})
                    }
                    _ => {
                        json!({"index": index, "message": {"role": "assistant", "content": c.text, "tool_calls": []}, "logprobs": lp, "finish_reason": finish, "stop_reason": stop_reason})
                    }
                }
            })
            .collect();
        let kv = choices.first().and_then(|c| c.done.as_ref()).and_then(|d| d.kv_transfer_params.clone());
        json!({
            "id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
            "choices": list, "usage": self.usage(choices), "kv_transfer_params": kv,
        })
    }
}

/// A choice's `finish_reason` and `stop_reason`.
fn end_of(c: &Choice) -> (&'static str, Value) {
    match (&c.cutter.matched, &c.done) {
        (Some(s), _) => ("stop", json!(s)),
        (None, Some(d)) => (d.reason.as_str(), Value::Null),
        (None, None) => ("abort", Value::Null),
    }
}

pub(super) fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
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

/// `stop` as a list of strings (a string, a list, or null), or why not.
fn stops_of(v: &Value) -> Result<Vec<String>, ApiError> {
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
fn logprobs_of(api: Api, v: &Value) -> Result<Option<Logprobs>, ApiError> {
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
    // Chat: `max_completion_tokens` when given, else `max_tokens` (completions have only the latter).
    let given = |field: &'static str| v.get(field).filter(|m| !m.is_null()).map(|m| (field, m));
    let asked =
        if api == Api::Completions { None } else { given("max_completion_tokens") }.or_else(|| given("max_tokens"));
    let (max_tokens, finish_at_max) = match asked {
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
            (m, FinishReason::Length)
        }
        None => {
            // No limit given: a natural-looking answer length, ending in `stop`.
            let m = shared.rng.lock().usize(16..=256).min(limit - n);
            (m.max(1), FinishReason::Stop)
        }
    };
    let choices = match v.get("n") {
        None | Some(Value::Null) => 1,
        Some(x) => x
            .as_u64()
            .filter(|n| (1..=128).contains(n))
            .ok_or_else(|| ApiError { param: Some("n"), ..ApiError::bad("`n` must be an integer from 1 to 128") })?
            as usize,
    };
    let stops = stops_of(&v)?;
    let logprobs = logprobs_of(api, &v)?;
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let fault = shared.faults.write().draw(&mut shared.rng.lock());
    match fault {
        Some(FaultKind::ServerError) => {
            return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "injected failure"));
        }
        Some(FaultKind::RateLimit) => {
            return Err(ApiError::status(StatusCode::TOO_MANY_REQUESTS, "injected failure: rate limited"));
        }
        Some(FaultKind::Unavailable) => {
            return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "injected failure: unavailable"));
        }
        Some(FaultKind::Hang) => {
            // Hold the connection until the client gives up (the future is dropped then).
            tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
            return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "injected hang ended"));
        }
        Some(FaultKind::SlowStart) => tokio::time::sleep(Duration::from_millis(faults.slow_start_ms)).await,
        Some(FaultKind::Reset) => return Err(ApiError::dropped()),
        Some(FaultKind::Abort) | None => {}
    }
    let ktp = v.get("kv_transfer_params");
    let handoff = match ktp {
        Some(p)
            if p.get("do_remote_decode").and_then(Value::as_bool) == Some(true)
                && shared.kv_role != KvRole::Consumer =>
        {
            Handoff::Prefill
        }
        Some(p)
            if p.get("do_remote_prefill").and_then(Value::as_bool) == Some(true)
                && shared.kv_role != KvRole::Producer =>
        {
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
            Handoff::Decode
        }
        _ => Handoff::None,
    };
    let (max_tokens, stream, choices) =
        if handoff == Handoff::Prefill { (1, false, 1) } else { (max_tokens, stream, choices) };
    let engine = pick_engine(&st, &headers)?;
    let id = response_id(api, &headers);
    let text_of: TokenText = match shared.tokenizer.clone() {
        Some(t) => Arc::new(move |token| t.decode(&[token])),
        None => Arc::new(|token| crate::tools::sim::tokenizer::token_text(token).to_owned()),
    };
    let mut receivers = Vec::with_capacity(choices);
    for k in 0..choices {
        let (tx, rx) = mpsc::unbounded_channel();
        let sub = Submission {
            id: if choices == 1 { id.clone() } else { format!("{id}-{k}") },
            prompt: prompt.clone(),
            max_tokens,
            finish_at_max,
            lora: lora.clone(),
            cache_salt: v.get("cache_salt").and_then(Value::as_str).map(str::to_owned),
            handoff,
            events: tx,
            arrival,
            stop: (!stops.is_empty()).then(|| StopWatch::new(stops.clone(), text_of.clone())),
        };
        engine.load.in_flight.fetch_add(1, Ordering::Relaxed);
        if engine.tx.send(Command::Submit(Box::new(sub))).is_err() {
            engine.load.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped"));
        }
        receivers.push(Some(rx));
    }
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
    let state: Vec<Choice> = (0..choices)
        .map(|_| Choice {
            text: String::new(),
            cutter: StopCutter::new(&stops),
            done: None,
            logprobs: Vec::new(),
            offset: 0,
        })
        .collect();
    let merged = Merged { receivers };
    let abort_after = (fault == Some(FaultKind::Abort)).then_some(max_tokens * choices / 2);
    if stream {
        Ok(stream_response(reply, state, merged, abort_after))
    } else {
        collect_response(reply, state, merged, abort_after).await
    }
}

/// The events of every choice's engine request, as they come.
struct Merged {
    receivers: Vec<Option<mpsc::UnboundedReceiver<Event>>>,
}

impl Merged {
    /// The next event of some choice (`None` in it: that request was dropped by its engine);
    /// `None` once every choice has ended.
    async fn recv(&mut self) -> Option<(usize, Option<Event>)> {
        std::future::poll_fn(|cx| {
            let mut open = false;
            for (k, slot) in self.receivers.iter_mut().enumerate() {
                let Some(rx) = slot else { continue };
                open = true;
                match rx.poll_recv(cx) {
                    std::task::Poll::Ready(Some(e)) => {
                        if e.done.is_some() {
                            *slot = None;
                        }
                        return std::task::Poll::Ready(Some((k, Some(e))));
                    }
                    std::task::Poll::Ready(None) => {
                        *slot = None;
                        return std::task::Poll::Ready(Some((k, None)));
                    }
                    std::task::Poll::Pending => {}
                }
            }
            if open { std::task::Poll::Pending } else { std::task::Poll::Ready(None) }
        })
        .await
    }
}

/// Applies an engine event to its choice: the text it may show now, and whether it ended.
fn apply(reply: &mut Reply, c: &mut Choice, event: Event) -> (String, Vec<Value>, bool) {
    let mut shown = String::new();
    let mut entries = Vec::new();
    if let Some(t) = event.token {
        let piece = (reply.text_of)(t);
        if c.cutter.matched.is_none() {
            if let Some(e) = reply.logprob_entry(t, &piece, c.offset + shown.len()) {
                entries.push(e);
            }
            shown.push_str(&c.cutter.push(&piece));
        }
    }
    let ended = event.done.is_some();
    if let Some(d) = event.done {
        shown.push_str(&c.cutter.finish());
        c.done = Some(d);
    }
    c.offset += shown.len();
    (shown, entries, ended)
}

/// The SSE response: one event per token (each naming its choice), the usage chunk if asked
/// for, then `[DONE]` — or, for the Responses API, its own event sequence.
fn stream_response(reply: Reply, choices: Vec<Choice>, merged: Merged, abort_after: Option<usize>) -> Response {
    struct S {
        reply: Reply,
        choices: Vec<Choice>,
        merged: Merged,
        sent: usize,
        finished: bool,
        abort_after: Option<usize>,
        /// Events to send before reading more, in order.
        queue: std::collections::VecDeque<Bytes>,
        opened: bool,
    }
    let s = S {
        reply,
        choices,
        merged,
        sent: 0,
        finished: false,
        abort_after,
        queue: std::collections::VecDeque::new(),
        opened: false,
    };
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(b) = s.queue.pop_front() {
                return Some((Ok::<Bytes, std::io::Error>(b), s));
            }
            if s.finished {
                return None;
            }
            if s.abort_after.is_some_and(|n| s.sent >= n.max(1)) {
                s.finished = true;
                // A pause first, so what was sent is flushed to the client before the connection
                // breaks: the client sees a response cut part-way, not a connection closed unanswered.
                tokio::time::sleep(Duration::from_millis(2)).await;
                return Some((Err(std::io::Error::other("injected abort")), s));
            }
            let Some((k, event)) = s.merged.recv().await else {
                // Every choice has ended.
                s.finished = true;
                match s.reply.api {
                    Api::Responses => {
                        let closing = s.reply.response_closing(&s.choices);
                        s.queue.extend(closing);
                    }
                    _ => {
                        if s.reply.include_usage {
                            s.queue.push_back(s.reply.usage_chunk(&s.choices));
                        }
                        s.queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    }
                }
                continue;
            };
            let Some(event) = event else {
                s.finished = true;
                return Some((Err(std::io::Error::other("engine dropped the request")), s));
            };
            if !s.opened {
                s.opened = true;
                match s.reply.api {
                    Api::Chat => {
                        for i in 0..s.choices.len() {
                            s.queue.push_back(s.reply.role_chunk(i));
                        }
                    }
                    Api::Responses => {
                        let opening = s.reply.response_opening(&s.choices);
                        s.queue.extend(opening);
                    }
                    Api::Completions => {}
                }
            }
            s.sent += 1;
            let (shown, entries, ended) = apply(&mut s.reply, &mut s.choices[k], event);
            if s.reply.api == Api::Responses {
                s.choices[k].text.push_str(&shown);
                if !shown.is_empty() {
                    let delta = s.reply.response_delta(&shown);
                    s.queue.push_back(delta);
                }
                continue;
            }
            let end = ended.then(|| end_of(&s.choices[k]));
            s.queue.push_back(s.reply.chunk(k, &shown, &entries, end));
        }
    });
    let content_type = "text/event-stream; charset=utf-8";
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn collect_response(
    mut reply: Reply,
    mut choices: Vec<Choice>,
    mut merged: Merged,
    abort_after: Option<usize>,
) -> Result<Response, ApiError> {
    while let Some((k, event)) = merged.recv().await {
        let Some(event) = event else {
            return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "the engine dropped the request"));
        };
        let (shown, entries, _) = apply(&mut reply, &mut choices[k], event);
        choices[k].text.push_str(&shown);
        choices[k].logprobs.extend(entries);
    }
    let body = reply.full(&choices).to_string();
    if abort_after.is_some() {
        // Send the head and half the body (flushed, with a pause before the break), then break
        // the connection.
        let body = Bytes::from(body.into_bytes());
        let half = body.slice(..body.len() / 2);
        let broken = async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Err(std::io::Error::other("injected abort"))
        };
        let parts =
            futures_util::stream::iter([Ok::<_, std::io::Error>(half)]).chain(futures_util::stream::once(broken));
        return Ok(Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(parts))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()));
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}
