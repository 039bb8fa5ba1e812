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

use super::prompt::{chat_prompt, completion_prompt, flag, parse_json, resolve_model};
use super::{ApiError, PortState, St};
use crate::tools::sim::engine::{Command, EngineHandle, Event, FinishReason, Handoff, KvRole, Submission};
use crate::tools::sim::faults::FaultKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Api {
    Completions,
    Chat,
}

pub(super) async fn completions(State(st): St, headers: HeaderMap, body: Bytes) -> Response {
    generate(st, Api::Completions, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

pub(super) async fn chat_completions(State(st): St, headers: HeaderMap, body: Bytes) -> Response {
    generate(st, Api::Chat, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// Everything a response needs to describe itself.
#[derive(Debug)]
pub(super) struct Reply {
    id: String,
    created: u64,
    model: String,
    api: Api,
    include_usage: bool,
    /// Usage carries `prompt_tokens_details`.
    details: bool,
    tokenizer: Option<crate::routing::tokenize::PromptTokenizer>,
}

impl Reply {
    /// The text of one generated token.
    fn text_of(&self, token: u32) -> std::borrow::Cow<'static, str> {
        match &self.tokenizer {
            Some(t) => t.decode(&[token]).into(),
            None => crate::tools::sim::tokenizer::token_text(token).into(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Chat, false) => "chat.completion",
            (Api::Completions, _) => "text_completion",
        }
    }

    fn usage(&self, done: &crate::tools::sim::engine::Done) -> Value {
        let mut u = json!({
            "prompt_tokens": done.prompt_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "completion_tokens": done.completion_tokens,
        });
        if self.details {
            u["prompt_tokens_details"] = json!({"cached_tokens": done.cached_tokens});
        }
        u
    }

    /// The chat stream's opening event: the assistant role with empty content.
    fn role_chunk(&self) -> Bytes {
        let choice =
            json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
        let mut v = json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]});
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        sse(&v)
    }

    /// One SSE event carrying `text` (and the finish reason on the last one).
    fn chunk(&self, text: &str, finish: Option<FinishReason>) -> Bytes {
        let finish = finish.map(FinishReason::as_str);
        let choice = match self.api {
            Api::Chat => json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": finish}),
            Api::Completions => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null})
            }
        };
        let mut v = json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]});
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        sse(&v)
    }

    fn usage_chunk(&self, done: &crate::tools::sim::engine::Done) -> Bytes {
        sse(
            &json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [], "usage": self.usage(done)}),
        )
    }

    fn full(&self, text: &str, done: &crate::tools::sim::engine::Done) -> Value {
        let choice = match self.api {
            Api::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []}, "logprobs": null, "finish_reason": done.reason.as_str(), "stop_reason": null})
            }
            Api::Completions => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": done.reason.as_str(), "stop_reason": null})
            }
        };
        json!({
            "id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
            "choices": [choice], "usage": self.usage(done), "kv_transfer_params": done.kv_transfer_params,
        })
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
    let v = parse_json(&body)?;
    let (model, lora) = resolve_model(&shared, &v)?;
    let prompt = match api {
        Api::Chat => chat_prompt(&shared, &v)?,
        Api::Completions => completion_prompt(&shared, &v)?,
    };
    let n = prompt.len();
    if n == 0 {
        return Err(ApiError::bad("the prompt is empty"));
    }
    let limit = shared.max_model_len.min(shared.kv_capacity_tokens);
    if n >= limit {
        return Err(ApiError {
            param: Some(if api == Api::Chat { "messages" } else { "prompt" }),
            ..ApiError::bad(format!(
                "This model's maximum context length is {limit} tokens. However, your request has {n} input tokens. Please reduce the length of the input messages."
            ))
        });
    }
    let asked = v.get("max_completion_tokens").or_else(|| v.get("max_tokens")).filter(|m| !m.is_null());
    let (max_tokens, finish_at_max) = match asked {
        Some(m) => {
            let m = m
                .as_u64()
                .filter(|&m| m >= 1)
                .ok_or_else(|| ApiError::bad("`max_tokens` must be a positive integer"))? as usize;
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
    let (max_tokens, stream) = if handoff == Handoff::Prefill { (1, false) } else { (max_tokens, stream) };
    let engine = pick_engine(&st, &headers)?;
    let seq = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let id =
        format!("{}-{:08x}{:016x}", if api == Api::Chat { "chatcmpl" } else { "cmpl" }, seq, shared.rng.lock().u64(..));
    let (tx, rx) = mpsc::unbounded_channel();
    let sub = Submission {
        id: id.clone(),
        prompt,
        max_tokens,
        finish_at_max,
        lora,
        cache_salt: v.get("cache_salt").and_then(Value::as_str).map(str::to_owned),
        handoff,
        events: tx,
        arrival,
    };
    engine.load.in_flight.fetch_add(1, Ordering::Relaxed);
    if engine.tx.send(Command::Submit(Box::new(sub))).is_err() {
        engine.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped"));
    }
    let reply = Reply {
        id,
        created: unix_now(),
        model,
        api,
        include_usage: stream && flag(&v, "stream_options", "include_usage") == Some(true),
        details: shared.prompt_tokens_details,
        tokenizer: shared.tokenizer.clone(),
    };
    let abort_after = (fault == Some(FaultKind::Abort)).then_some(max_tokens / 2);
    if stream { Ok(stream_response(reply, rx, abort_after)) } else { collect_response(reply, rx, abort_after).await }
}

/// The SSE response: one event per token, the usage chunk if asked for, then `[DONE]`.
pub(super) fn stream_response(
    reply: Reply,
    rx: mpsc::UnboundedReceiver<Event>,
    abort_after: Option<usize>,
) -> Response {
    struct S {
        reply: Reply,
        rx: mpsc::UnboundedReceiver<Event>,
        sent: usize,
        finished: bool,
        abort_after: Option<usize>,
        tail: Vec<Bytes>,
    }
    let s = S { reply, rx, sent: 0, finished: false, abort_after, tail: Vec::new() };
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        if let Some(b) = s.tail.pop() {
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
        match s.rx.recv().await {
            None => {
                s.finished = true;
                Some((Err(std::io::Error::other("engine dropped the request")), s))
            }
            Some(Event { token, done }) => {
                let text = token.map(|t| s.reply.text_of(t)).unwrap_or_default();
                let first = s.sent == 0;
                s.sent += 1;
                let chunk = s.reply.chunk(&text, done.as_ref().map(|d| d.reason));
                // `tail` is a stack: push what goes out last first.
                if let Some(d) = done {
                    s.finished = true;
                    s.tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    if s.reply.include_usage {
                        s.tail.push(s.reply.usage_chunk(&d));
                    }
                }
                if first && s.reply.api == Api::Chat {
                    s.tail.push(chunk);
                    return Some((Ok(s.reply.role_chunk()), s));
                }
                Some((Ok(chunk), s))
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

pub(super) async fn collect_response(
    reply: Reply,
    mut rx: mpsc::UnboundedReceiver<Event>,
    abort_after: Option<usize>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            None => return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "the engine dropped the request")),
            Some(Event { token, done }) => {
                if let Some(t) = token {
                    text.push_str(&reply.text_of(t));
                }
                if let Some(d) = done {
                    let body = reply.full(&text, &d).to_string();
                    if abort_after.is_some() {
                        // Send the head and half the body (flushed, with a pause before the
                        // break), then break the connection.
                        let body = Bytes::from(body.into_bytes());
                        let half = body.slice(..body.len() / 2);
                        let broken = async {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            Err(std::io::Error::other("injected abort"))
                        };
                        let parts = futures_util::stream::iter([Ok::<_, std::io::Error>(half)])
                            .chain(futures_util::stream::once(broken));
                        return Ok(Response::builder()
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(Body::from_stream(parts))
                            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()));
                    }
                    return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
                }
            }
        }
    }
}
