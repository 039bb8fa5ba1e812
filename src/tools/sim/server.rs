//! The simulator's HTTP API: vLLM's OpenAI-compatible endpoints and its operational ones.
//!
//! Requests are tokenized here, checked against the model's limits, and handed to an engine
//! (the one named by `X-data-parallel-rank`, else the least loaded); tokens come back over a
//! channel and leave as one SSE event each, or as one JSON body. Dropping a response (the client
//! went away) drops the channel, which the engine treats as an abort. Every response carries
//! `x-inference-pod` and `x-inference-port`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::engine::{Command, EngineHandle, Event, FinishReason, Handoff, KvRole, Submission};
use super::faults::{FaultKind, Faults};
use super::metrics::SimMetrics;
use super::tokenizer::{self, ChatTurn};

/// Largest request body accepted (vLLM has no limit of its own; gateways send up to tens of MiB).
pub(crate) const MAX_BODY_BYTES: usize = 128 << 20;

/// A LoRA adapter the simulator serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoraModule {
    /// Name requests use in `model`.
    pub name: String,
    /// Path reported as `root` in `/v1/models`.
    pub path: String,
}

/// Settings and state shared by every port of one simulator process.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Served model names; the first is the `model_name` label.
    pub served: Vec<String>,
    /// `--enable-lora`.
    pub enable_lora: bool,
    /// Adapters, from `--lora-modules` or loaded at runtime.
    pub loras: RwLock<Vec<LoraModule>>,
    /// `--max-model-len`.
    pub max_model_len: usize,
    /// Tokens the whole KV cache of one engine holds.
    pub kv_capacity_tokens: usize,
    /// P/D role.
    pub kv_role: KvRole,
    /// Failure injection.
    pub faults: RwLock<Faults>,
    /// `x-inference-pod`.
    pub pod_name: String,
    /// For `/server_info`.
    pub info: Value,
    /// Random draws (faults, default lengths).
    pub rng: Mutex<fastrand::Rng>,
    /// Request counter for ids.
    pub next_id: AtomicU64,
    /// Process start (unix seconds), the `created` of models.
    pub created: u64,
}

/// One listening port: its engines and metrics.
#[derive(Debug)]
pub(crate) struct PortState {
    /// Process-wide settings.
    pub shared: Arc<Shared>,
    /// Engines behind this port (several in internal-LB data-parallel mode).
    pub engines: Vec<EngineHandle>,
    /// This port's metrics.
    pub metrics: SimMetrics,
    /// The port, for `x-inference-port`.
    pub port: u16,
    rr: AtomicUsize,
}

impl PortState {
    /// A port serving `engines`.
    pub(crate) fn new(shared: Arc<Shared>, engines: Vec<EngineHandle>, metrics: SimMetrics, port: u16) -> Self {
        Self { shared, engines, metrics, port, rr: AtomicUsize::new(0) }
    }
}

type St = State<Arc<PortState>>;

/// The router for one port.
pub(crate) fn app(state: Arc<PortState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions/render", post(render_completions))
        .route("/v1/chat/completions/render", post(render_chat))
        .route("/tokenize", post(tokenize_route))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/server_info", get(server_info))
        .route("/get_server_info", get(server_info))
        .route("/model_info", get(model_info))
        .route("/get_model_info", get(model_info))
        .route("/admin/faults", get(get_faults).post(set_faults))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), identity_headers))
        .with_state(state)
}

async fn identity_headers(State(st): St, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&st.shared.pod_name) {
        h.insert("x-inference-pod", v);
    }
    h.insert("x-inference-port", HeaderValue::from(st.port));
    resp
}

/// An error in vLLM's current shape: `{"error":{"message","type","param","code"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param: None }
    }
    fn status(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            _ => "InternalServerError",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status.as_u16()}});
        (self.status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::status(StatusCode::NOT_FOUND, "Not Found")
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the request body must be a JSON object"));
    }
    Ok(v)
}

/// Checks `model` and returns the LoRA adapter it names, if it is one.
fn resolve_model(shared: &Shared, v: &Value) -> Result<(String, Option<String>), ApiError> {
    let model = match v.get("model") {
        None | Some(Value::Null) => return Ok((shared.served[0].clone(), None)),
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(ApiError { param: Some("model"), ..ApiError::bad("`model` must be a string") }),
    };
    if shared.served.contains(&model) {
        return Ok((model, None));
    }
    if shared.loras.read().iter().any(|l| l.name == model) {
        return Ok((model.clone(), Some(model)));
    }
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("The model `{model}` does not exist."),
        param: Some("model"),
    })
}

/// Text and media of one message `content`.
fn content_of(content: Option<&Value>) -> Result<(String, Vec<String>), ApiError> {
    match content {
        None | Some(Value::Null) => Ok((String::new(), Vec::new())),
        Some(Value::String(s)) => Ok((s.clone(), Vec::new())),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            let mut media = Vec::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text" | "input_text") => text.push_str(
                        p.get("text")
                            .and_then(Value::as_str)
                            .ok_or_else(|| ApiError::bad("a text part needs a string `text`"))?,
                    ),
                    Some(_) => media.push(p.to_string()),
                    None => return Err(ApiError::bad("each content part needs a `type`")),
                }
            }
            Ok((text, media))
        }
        Some(_) => Err(ApiError::bad("`content` must be a string, null or an array of parts")),
    }
}

/// Token ids of a chat request's prompt (template applied).
fn chat_prompt(v: &Value) -> Result<Vec<u32>, ApiError> {
    let msgs = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError { param: Some("messages"), ..ApiError::bad("`messages` must be an array") })?;
    let mut owned = Vec::with_capacity(msgs.len());
    for m in msgs {
        let role =
            m.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::bad("each message needs a string `role`"))?;
        let (mut text, media) = content_of(m.get("content"))?;
        if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
            text.push_str(&calls.to_string());
        }
        owned.push((role.to_owned(), text, media));
    }
    let turns: Vec<ChatTurn<'_>> = owned.iter().map(|(role, text, media)| ChatTurn { role, text, media }).collect();
    let tools = v.get("tools").filter(|t| !t.is_null()).map(Value::to_string);
    let gen_prompt = v.get("add_generation_prompt").and_then(Value::as_bool).unwrap_or(true);
    Ok(tokenizer::chat_tokens(tools.as_deref(), &turns, gen_prompt))
}

/// Token ids of a completions `prompt` (one prompt: a string, or token ids, or a one-element list).
fn completion_prompt(v: &Value) -> Result<Vec<u32>, ApiError> {
    let bad = || ApiError {
        param: Some("prompt"),
        ..ApiError::bad("`prompt` must be a string, a list of token ids, or a list holding one of those")
    };
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(bad)).collect()
    };
    match v.get("prompt") {
        Some(Value::String(s)) => {
            let mut out = Vec::new();
            tokenizer::tokenize(s, &mut out);
            Ok(out)
        }
        Some(Value::Array(a)) if a.is_empty() => {
            Err(ApiError { param: Some("prompt"), ..ApiError::bad("`prompt` must not be empty") })
        }
        Some(Value::Array(a)) if a[0].is_number() => ids(a),
        Some(Value::Array(a)) if a.len() == 1 => completion_prompt(&json!({"prompt": a[0]})),
        Some(Value::Array(_)) => Err(ApiError::bad(
            "the simulator serves one prompt per request; send a list of prompts as separate requests",
        )),
        _ => Err(bad()),
    }
}

fn flag(v: &Value, a: &str, b: &str) -> Option<bool> {
    v.get(a).and_then(|o| o.get(b)).and_then(Value::as_bool)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

async fn completions(State(st): St, headers: HeaderMap, body: Bytes) -> Response {
    generate(st, Api::Completions, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(State(st): St, headers: HeaderMap, body: Bytes) -> Response {
    generate(st, Api::Chat, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// Everything a response needs to describe itself.
#[derive(Debug)]
struct Reply {
    id: String,
    created: u64,
    model: String,
    api: Api,
    include_usage: bool,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Chat, false) => "chat.completion",
            (Api::Completions, _) => "text_completion",
        }
    }

    fn usage(done: &super::engine::Done) -> Value {
        json!({
            "prompt_tokens": done.prompt_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "completion_tokens": done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
        })
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

    fn usage_chunk(&self, done: &super::engine::Done) -> Bytes {
        sse(
            &json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [], "usage": Self::usage(done)}),
        )
    }

    fn full(&self, text: &str, done: &super::engine::Done) -> Value {
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
            "choices": [choice], "usage": Self::usage(done), "kv_transfer_params": done.kv_transfer_params,
        })
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Picks the engine: the rank the header names, else the least loaded (ties rotate).
fn pick_engine<'a>(st: &'a PortState, headers: &HeaderMap) -> Result<&'a EngineHandle, ApiError> {
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

async fn generate(st: Arc<PortState>, api: Api, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let shared = st.shared.clone();
    let faults = shared.faults.read().clone();
    if faults.paused {
        return Err(ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the server is not accepting requests"));
    }
    let v = parse_json(&body)?;
    let (model, lora) = resolve_model(&shared, &v)?;
    let prompt = match api {
        Api::Chat => chat_prompt(&v)?,
        Api::Completions => completion_prompt(&v)?,
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
    let fault = faults.draw(&mut shared.rng.lock());
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
    };
    let abort_after = (fault == Some(FaultKind::Abort)).then_some(max_tokens / 2);
    if stream { Ok(stream_response(reply, rx, abort_after)) } else { collect_response(reply, rx, abort_after).await }
}

/// The SSE response: one event per token, the usage chunk if asked for, then `[DONE]`.
fn stream_response(reply: Reply, rx: mpsc::UnboundedReceiver<Event>, abort_after: Option<usize>) -> Response {
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
            return Some((Err(std::io::Error::other("injected abort")), s));
        }
        match s.rx.recv().await {
            None => {
                s.finished = true;
                Some((Err(std::io::Error::other("engine dropped the request")), s))
            }
            Some(Event { token, done }) => {
                let text = token.map_or("", tokenizer::token_text);
                let first = s.sent == 0;
                s.sent += 1;
                let chunk = s.reply.chunk(text, done.as_ref().map(|d| d.reason));
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

async fn collect_response(
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
                    text.push_str(tokenizer::token_text(t));
                }
                if let Some(d) = done {
                    let body = reply.full(&text, &d).to_string();
                    if abort_after.is_some() {
                        // Send half the body, then break the connection.
                        let body = Bytes::from(body.into_bytes());
                        let half = body.slice(..body.len() / 2);
                        let parts: Vec<Result<Bytes, std::io::Error>> =
                            vec![Ok(half), Err(std::io::Error::other("injected abort"))];
                        return Ok(Response::builder()
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(Body::from_stream(futures_util::stream::iter(parts)))
                            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()));
                    }
                    return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
                }
            }
        }
    }
}

fn prompt_for_render(api: Api, v: &Value) -> Result<Vec<u32>, ApiError> {
    match api {
        Api::Chat => chat_prompt(v),
        Api::Completions => completion_prompt(v),
    }
}

async fn render_completions(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    let (model, _) = resolve_model(&st.shared, &v)?;
    let ids = prompt_for_render(Api::Completions, &v)?;
    Ok(axum::Json(json!([{"request_id": format!("render-{}", unix_now()), "model": model, "token_ids": ids}]))
        .into_response())
}

async fn render_chat(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    let (model, _) = resolve_model(&st.shared, &v)?;
    let ids = prompt_for_render(Api::Chat, &v)?;
    Ok(axum::Json(json!({"request_id": format!("render-{}", unix_now()), "model": model, "token_ids": ids}))
        .into_response())
}

async fn tokenize_route(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    resolve_model(&st.shared, &v)?;
    let ids = if v.get("messages").is_some() { chat_prompt(&v)? } else { completion_prompt(&v)? };
    Ok(axum::Json(
        json!({"count": ids.len(), "max_model_len": st.shared.max_model_len, "tokens": ids, "token_strs": null}),
    )
    .into_response())
}

async fn models(State(st): St) -> Response {
    let s = &st.shared;
    let base = &s.served[0];
    let mut data: Vec<Value> = s
        .served
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": s.created, "owned_by": "vllm", "root": m, "parent": null, "max_model_len": s.max_model_len}))
        .collect();
    data.extend(s.loras.read().iter().map(|l| {
        json!({"id": l.name, "object": "model", "created": s.created, "owned_by": "vllm", "root": l.path, "parent": base, "max_model_len": s.max_model_len})
    }));
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn health(State(st): St) -> StatusCode {
    if st.shared.faults.read().paused { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }
}

async fn metrics(State(st): St, uri: axum::http::Uri) -> Response {
    // `?name[]=a&name[]=b` restricts the output, as prometheus_client's exposition does.
    let names: Vec<String> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "name[]" || *k == "name%5B%5D")
        .map(|(_, v)| v.replace("%3A", ":").replace("%3a", ":"))
        .collect();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.metrics.render(&names)).into_response()
}

async fn version() -> Response {
    axum::Json(json!({"version": concat!("kvgate-sim-", env!("CARGO_PKG_VERSION"))})).into_response()
}

async fn load_lora(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    if !st.shared.enable_lora {
        return Err(ApiError::bad("LoRA is not enabled; start with --enable-lora"));
    }
    let name = v.get("lora_name").and_then(Value::as_str).ok_or_else(|| ApiError::bad("`lora_name` is required"))?;
    let path = v.get("lora_path").and_then(Value::as_str).ok_or_else(|| ApiError::bad("`lora_path` is required"))?;
    let mut loras = st.shared.loras.write();
    if loras.iter().any(|l| l.name == name) || st.shared.served.iter().any(|m| m == name) {
        return Err(ApiError::bad(format!("The lora adapter '{name}' has already been loaded.")));
    }
    loras.push(LoraModule { name: name.to_owned(), path: path.to_owned() });
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

async fn unload_lora(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    let name = v.get("lora_name").and_then(Value::as_str).ok_or_else(|| ApiError::bad("`lora_name` is required"))?;
    let mut loras = st.shared.loras.write();
    let before = loras.len();
    loras.retain(|l| l.name != name);
    if loras.len() == before {
        return Err(ApiError::status(StatusCode::NOT_FOUND, format!("The lora adapter '{name}' cannot be found.")));
    }
    Ok(format!("Success: LoRA adapter '{name}' removed successfully.").into_response())
}

async fn reset_prefix_cache(State(st): St) -> Result<StatusCode, ApiError> {
    for e in &st.engines {
        let (tx, rx) = oneshot::channel();
        if e.tx.send(Command::ResetPrefixCache(tx)).is_err() || rx.await != Ok(true) {
            return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "failed to reset the prefix cache"));
        }
    }
    Ok(StatusCode::OK)
}

async fn server_info(State(st): St) -> Response {
    axum::Json(st.shared.info.clone()).into_response()
}

async fn model_info(State(st): St) -> Response {
    let s = &st.shared;
    axum::Json(json!({
        "model_path": s.served[0], "tokenizer_path": s.served[0], "served_model_names": s.served,
        "is_generation": true, "max_model_len": s.max_model_len, "max_context_length": s.max_model_len,
    }))
    .into_response()
}

async fn get_faults(State(st): St) -> Response {
    axum::Json(st.shared.faults.read().clone()).into_response()
}

async fn set_faults(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let f: Faults = serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("invalid fault settings: {e}")))?;
    f.validate().map_err(ApiError::bad)?;
    *st.shared.faults.write() = f.clone();
    Ok(axum::Json(f).into_response())
}
