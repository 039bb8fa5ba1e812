//! The simulator's HTTP API: the router, its state and errors in vLLM's shape, and the
//! operational endpoints (models, health, metrics, render/tokenize, LoRA, cache reset, faults).
//! A body becomes prompt tokens in [`prompt`]; [`generate`] hands the request to an engine and
//! relays its tokens. Every response carries `x-inference-pod` and `x-inference-port`.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::engine::{Command, EngineHandle, KvRole};
use super::faults::Faults;
use super::metrics::SimMetrics;
use crate::front::listen::DropConnection;

mod generate;
mod prompt;

use generate::{Api, chat_completions, completions, responses, unix_now};
use prompt::{chat_prompt, completion_prompt, parse_json, resolve_model};

use crate::routing::tokenize::PromptTokenizer;

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
    /// The headers of the last completions or chat request, for tests of what a gateway
    /// forwards (`GET /admin/last_request_headers`).
    pub last_request_headers: Mutex<Vec<(String, String)>>,
    /// `x-inference-pod`.
    pub pod_name: String,
    /// For `/server_info`.
    pub info: Value,
    /// Random draws (faults, default lengths).
    pub rng: Mutex<fastrand::Rng>,
    /// Process start (unix seconds), the `created` of models.
    pub created: u64,
    /// The model's tokenizer (`--tokenizer`), else the simulator's own.
    pub tokenizer: Option<PromptTokenizer>,
    /// `--metrics-name-filter`.
    pub metrics_name_filter: bool,
    /// Usage reports `prompt_tokens_details` (not `--no-prompt-tokens-details`).
    pub prompt_tokens_details: bool,
    /// `/metrics` shows `vllm:cache_config_info` (not `--no-cache-config-info`).
    pub cache_config_info: bool,
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
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/tokenize", post(tokenize_route))
        .route("/detokenize", post(detokenize_route))
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
        .route("/admin/last_request_headers", get(last_request_headers))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), identity_headers))
        .with_state(state)
}

async fn identity_headers(State(st): St, req: Request, next: Next) -> Response {
    let (path, method, started) = (req.uri().path().to_owned(), req.method().clone(), std::time::Instant::now());
    let mut resp = next.run(req).await;
    st.metrics.detail.http(&path, method.as_str(), resp.status().as_u16(), started.elapsed().as_secs_f64());
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
    /// No answer at all: the connection is closed instead.
    dropped: bool,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self::status(StatusCode::BAD_REQUEST, message)
    }
    fn status(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, dropped: false }
    }
    /// The connection closed without an answer (the `reset` fault).
    fn dropped() -> Self {
        Self { dropped: true, ..Self::status(StatusCode::SERVICE_UNAVAILABLE, "injected reset") }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.dropped {
            let mut r = Response::new(axum::body::Body::empty());
            r.extensions_mut().insert(DropConnection);
            return r;
        }
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

fn prompt_for_render(shared: &Shared, api: Api, v: &Value) -> Result<Vec<u32>, ApiError> {
    match api {
        Api::Chat | Api::Responses => chat_prompt(shared, v),
        Api::Completions => completion_prompt(shared, v),
    }
}

async fn render_completions(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    let (model, _) = resolve_model(&st.shared, &v)?;
    let ids = prompt_for_render(&st.shared, Api::Completions, &v)?;
    Ok(axum::Json(json!([{"request_id": format!("render-{}", unix_now()), "model": model, "token_ids": ids}]))
        .into_response())
}

async fn render_chat(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    let (model, _) = resolve_model(&st.shared, &v)?;
    let ids = prompt_for_render(&st.shared, Api::Chat, &v)?;
    Ok(axum::Json(json!({"request_id": format!("render-{}", unix_now()), "model": model, "token_ids": ids}))
        .into_response())
}

async fn tokenize_route(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    resolve_model(&st.shared, &v)?;
    let ids =
        if v.get("messages").is_some() { chat_prompt(&st.shared, &v)? } else { completion_prompt(&st.shared, &v)? };
    Ok(axum::Json(
        json!({"count": ids.len(), "max_model_len": st.shared.max_model_len, "tokens": ids, "token_strs": null}),
    )
    .into_response())
}

async fn detokenize_route(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    resolve_model(&st.shared, &v)?;
    let bad = || ApiError { param: Some("tokens"), ..ApiError::bad("`tokens` must be a list of token ids") };
    let ids: Vec<u32> = v
        .get("tokens")
        .and_then(Value::as_array)
        .ok_or_else(bad)?
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(bad))
        .collect::<Result<_, _>>()?;
    // The simulator's own vocabulary hashes text into ids: its text of an id is a stand-in
    // (with `--tokenizer`, the model's tokenizer decodes exactly).
    let prompt = match &st.shared.tokenizer {
        Some(t) => t.decode(&ids),
        None => ids.iter().map(|&t| crate::tools::sim::tokenizer::token_text(t)).collect(),
    };
    Ok(axum::Json(json!({"prompt": prompt})).into_response())
}

/// Dimensions of the simulator's embeddings unless `dimensions` asks for fewer.
const EMBEDDING_DIMS: usize = 384;

/// `/v1/embeddings`: one unit vector per input, derived from its tokens (equal inputs, equal
/// vectors), in vLLM's shape; `encoding_format: base64` packs little-endian float32s.
async fn embeddings(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_json(&body)?;
    let (model, _) = resolve_model(&st.shared, &v)?;
    let bad = || ApiError {
        param: Some("input"),
        ..ApiError::bad("`input` must be a string, a list of strings, a list of token ids or a list of those lists")
    };
    let one = |x: &Value| completion_prompt(&st.shared, &json!({"prompt": x})).map_err(|_| bad());
    let inputs: Vec<Vec<u32>> = match v.get("input") {
        Some(s @ Value::String(_)) => vec![one(s)?],
        Some(Value::Array(a)) if a.is_empty() => return Err(bad()),
        Some(Value::Array(a)) if a[0].is_number() => vec![one(&Value::Array(a.clone()))?],
        Some(Value::Array(a)) => a.iter().map(one).collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    let dims = match v.get("dimensions") {
        None | Some(Value::Null) => EMBEDDING_DIMS,
        Some(d) => d.as_u64().filter(|d| (1..=EMBEDDING_DIMS as u64).contains(d)).ok_or_else(|| ApiError {
            param: Some("dimensions"),
            ..ApiError::bad(format!("`dimensions` must be an integer from 1 to {EMBEDDING_DIMS}"))
        })? as usize,
    };
    let base64 = match v.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::bad(format!("unknown encoding_format `{other}` (float, base64)"))),
    };
    let limit = st.shared.max_model_len;
    let mut prompt_tokens = 0;
    let mut data = Vec::with_capacity(inputs.len());
    for (index, ids) in inputs.iter().enumerate() {
        if ids.is_empty() || ids.len() > limit {
            return Err(ApiError::bad(format!(
                "input {index} has {} tokens; it must have from 1 to {limit}",
                ids.len()
            )));
        }
        prompt_tokens += ids.len();
        let vector = embedding_of(ids, dims);
        let embedding = if base64 {
            let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
            json!(base64_of(&bytes))
        } else {
            json!(vector)
        };
        data.push(json!({"index": index, "object": "embedding", "embedding": embedding}));
    }
    Ok(axum::Json(json!({
        "id": format!("embd-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
        "object": "list", "created": unix_now(), "model": model, "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0, "prompt_tokens_details": null},
    }))
    .into_response())
}

/// A unit vector of `dims` from the token ids: the sum of each token's pseudo-random vector.
fn embedding_of(ids: &[u32], dims: usize) -> Vec<f32> {
    let mut v = vec![0f32; dims];
    for &t in ids {
        let mut rng = fastrand::Rng::with_seed(u64::from(t));
        for x in &mut v {
            *x += rng.f32() - 0.5;
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// Standard base64 with padding.
fn base64_of(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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
    // With `--metrics-name-filter`, `?name[]=a&name[]=b` restricts the output, as
    // prometheus_client's exposition did before vLLM 0.32.
    let names: Vec<String> = if st.shared.metrics_name_filter {
        uri.query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| *k == "name[]" || *k == "name%5B%5D")
            .map(|(_, v)| v.replace("%3A", ":").replace("%3a", ":"))
            .collect()
    } else {
        Vec::new()
    };
    let hide: &[&str] = if st.shared.cache_config_info { &[] } else { &["vllm:cache_config_info"] };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.metrics.render(&names, hide))
        .into_response()
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

/// `{"name": ["value", …]}` of the last completions or chat request (names lower-case).
async fn last_request_headers(State(st): St) -> Response {
    let mut out: serde_json::Map<String, Value> = serde_json::Map::new();
    for (k, v) in st.shared.last_request_headers.lock().iter() {
        if let Value::Array(values) = out.entry(k.clone()).or_insert_with(|| Value::Array(Vec::new())) {
            values.push(Value::String(v.clone()));
        }
    }
    axum::Json(Value::Object(out)).into_response()
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
