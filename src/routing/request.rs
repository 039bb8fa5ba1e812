//! OpenAI request bodies → the fields routing needs, and nothing more.
//!
//! The body is parsed once with `serde_json`, borrowing from the input: strings without escapes
//! are not copied, and the prompt itself is never decoded — its raw JSON text (escapes and all)
//! is what the prefix hasher sees. That keeps a 220 KB chat body to one scan and one small
//! allocation (the message list), and it is sound for prefix matching because a client serialises
//! the same conversation turn to the same bytes every time it resends it.
//!
//! Part of the decision core: no I/O, no clock, no async.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Default cap on a request body (32 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Separator bytes of the canonical prompt stream. JSON strings cannot contain raw control
/// characters, so these never collide with prompt text.
const RECORD: &[u8] = b"\x1e";
const UNIT: &[u8] = b"\x1f";

/// Which OpenAI API a request is for, chosen by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiKind {
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/responses`
    Responses,
    /// `POST /v1/embeddings`
    Embeddings,
}

impl ApiKind {
    /// Every API kvgate parses.
    pub const ALL: [Self; 4] = [Self::Completions, Self::ChatCompletions, Self::Responses, Self::Embeddings];

    /// Whether a request of this API can be split into a prefill and a decode leg (the
    /// completions APIs, whose `max_tokens` and `kv_transfer_params` the hand-off sets).
    pub fn disaggregates(self) -> bool {
        matches!(self, Self::Completions | Self::ChatCompletions)
    }

    /// The API a request path names (query string ignored), or `None` for other paths.
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let path = path.strip_suffix('/').unwrap_or(path);
        match path {
            "/v1/completions" => Some(Self::Completions),
            "/v1/chat/completions" => Some(Self::ChatCompletions),
            "/v1/responses" => Some(Self::Responses),
            "/v1/embeddings" => Some(Self::Embeddings),
            _ => None,
        }
    }

    /// The request path of this API.
    pub fn path(self) -> &'static str {
        match self {
            Self::Completions => "/v1/completions",
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Responses => "/v1/responses",
            Self::Embeddings => "/v1/embeddings",
        }
    }
}

/// Why a request body cannot be routed. Every variant is the client's fault: a 400.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The body is larger than the configured limit.
    #[error("request body is over the limit of {limit} bytes")]
    TooLarge {
        /// Body size in bytes (or a lower bound, when the body was cut off while streaming).
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The body is not UTF-8.
    #[error("request body is not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// The body is not JSON at all.
    #[error("request body is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The body is JSON but not an object.
    #[error("request body must be a JSON object")]
    NotAnObject,
    /// No `model` field (or `null`).
    #[error("request body has no `model` field")]
    MissingModel,
    /// The prompt field the API needs is absent.
    #[error("request body has no `{0}` field")]
    MissingPrompt(&'static str),
    /// A field has the wrong JSON type or shape.
    #[error("invalid field `{field}`: {detail}")]
    InvalidField {
        /// Dotted path of the field, e.g. `messages[2].content`.
        field: String,
        /// What was wrong.
        detail: String,
    },
}

impl RequestError {
    /// HTTP status for this error: 413 for a body over the limit, 400 for the rest (the
    /// request itself is wrong).
    pub fn status(&self) -> u16 {
        match self {
            Self::TooLarge { .. } => 413,
            Self::InvalidUtf8 { .. }
            | Self::NotJson(_)
            | Self::NotAnObject
            | Self::MissingModel
            | Self::MissingPrompt(_)
            | Self::InvalidField { .. } => 400,
        }
    }

    /// The OpenAI error `code` for this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "request_too_large",
            Self::InvalidUtf8 { .. } | Self::NotJson(_) | Self::NotAnObject => "invalid_json",
            Self::MissingModel => "missing_model",
            Self::MissingPrompt(_) | Self::InvalidField { .. } => "invalid_request",
        }
    }

    /// The body field the error is about, if any (OpenAI's `param`).
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::MissingModel => Some("model"),
            Self::MissingPrompt(f) => Some(f),
            Self::InvalidField { field, .. } => Some(field),
            _ => None,
        }
    }

    fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::InvalidField { field: field.into(), detail: detail.into() }
    }
}

/// The routing fields of an OpenAI request, borrowed from the body.
#[derive(Debug)]
pub struct ParsedRequest<'a> {
    /// Which API the body was parsed as.
    pub api: ApiKind,
    /// The `model` field: a base model or a LoRA adapter name.
    pub model: Cow<'a, str>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens` (`max_output_tokens` for responses).
    pub max_tokens: Option<u64>,
    /// vLLM's `cache_salt`: requests with different salts never share cached blocks.
    pub cache_salt: Option<Cow<'a, str>>,
    /// `kv_transfer_params`, kept as raw JSON (P/D hand-off).
    pub kv_transfer_params: Option<&'a RawValue>,
    /// `priority` (vLLM: lower runs first; kvgate sheds negative priorities first).
    pub priority: i64,
    prompt: Prompt<'a>,
    body: &'a str,
    /// The request's size in bytes: its body's, or its prompt's when given as fields.
    size: usize,
}

/// What a model's tokenizer reads of a request's prompt.
#[derive(Debug)]
pub enum TokenSource<'a> {
    /// A completions prompt's text, unescaped.
    Text(String),
    /// Token ids given by the client, used as they are.
    Ids(&'a [u32]),
    /// A chat, rendered from the request body with the model's template.
    Chat(serde_json::Value),
    /// Nothing kvgate tokenizes: several prompts, embeddings inputs, `/v1/responses`.
    Unsupported,
}

#[derive(Debug)]
enum Prompt<'a> {
    /// Raw JSON string contents (between the quotes, escapes kept).
    Texts(Vec<Cow<'a, str>>),
    Tokens(Vec<Vec<u32>>),
    Chat {
        tools: Option<&'a RawValue>,
        messages: Vec<Message<'a>>,
    },
    /// `/v1/responses`: optional `instructions`, then `input` as text or a list of items.
    Responses {
        instructions: Option<&'a RawValue>,
        input: &'a RawValue,
    },
}

#[derive(Debug, Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(borrow, default)]
    cache_salt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    kv_transfer_params: Option<&'a RawValue>,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

/// Parses an OpenAI request body for `api`, enforcing `max_bytes`.
pub fn parse(api: ApiKind, body: &[u8], max_bytes: usize) -> Result<ParsedRequest<'_>, RequestError> {
    if body.len() > max_bytes {
        return Err(RequestError::TooLarge { size: body.len(), limit: max_bytes });
    }
    let text = std::str::from_utf8(body).map_err(|e| RequestError::InvalidUtf8 { offset: e.valid_up_to() })?;
    let first = text.trim_start().as_bytes().first().copied();
    if first != Some(b'{') {
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Err(e) => RequestError::NotJson(e),
            Ok(_) => RequestError::NotAnObject,
        });
    }
    let body: Body<'_> = serde_json::from_str(text).map_err(|e| classify(text, e))?;
    let model = match body.model.filter(|m| m.get() != "null") {
        None => return Err(RequestError::MissingModel),
        Some(m) => json_str(m).ok_or_else(|| RequestError::invalid("model", "must be a string"))?,
    };
    let cache_salt = match body.cache_salt.filter(|m| m.get() != "null") {
        None => None,
        Some(s) => Some(json_str(s).ok_or_else(|| RequestError::invalid("cache_salt", "must be a string"))?),
    };
    if model.is_empty() {
        return Err(RequestError::invalid("model", "must not be empty"));
    }
    let prompt = match api {
        ApiKind::Completions => prompt_of(body.prompt, "prompt")?,
        ApiKind::Embeddings => prompt_of(body.input, "input")?,
        ApiKind::ChatCompletions => {
            let messages = body.messages.ok_or(RequestError::MissingPrompt("messages"))?;
            for (i, m) in messages.iter().enumerate() {
                if m.name.is_some_and(|n| string_body(n).is_none() && n.get() != "null") {
                    return Err(RequestError::invalid(format!("messages[{i}].name"), "must be a string"));
                }
                if let Some(c) = m.content {
                    visit_content(c, &mut |_| {})
                        .map_err(|e| RequestError::invalid(format!("messages[{i}].content"), e))?;
                }
            }
            Prompt::Chat { tools: body.tools.filter(|t| t.get() != "null"), messages }
        }
        ApiKind::Responses => {
            let input = body.input.ok_or(RequestError::MissingPrompt("input"))?;
            match first_byte(input) {
                b'"' | b'[' => {}
                _ => {
                    return Err(RequestError::invalid("input", "must be a string or an array"));
                }
            }
            Prompt::Responses { instructions: body.instructions.filter(|t| t.get() != "null"), input }
        }
    };
    Ok(ParsedRequest {
        api,
        model,
        stream: body.stream.unwrap_or(false),
        include_usage: body.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        max_tokens: body.max_completion_tokens.or(body.max_tokens).or(body.max_output_tokens),
        cache_salt,
        kv_transfer_params: body.kv_transfer_params,
        priority: body.priority.unwrap_or(0),
        prompt,
        body: text,
        size: text.len(),
    })
}

impl ParsedRequest<'_> {
    /// The request's size in bytes (its body's, or its prompt's when given as fields).
    pub fn body_len(&self) -> usize {
        self.size
    }

    /// Whether the body sets an option with which vLLM tokenizes otherwise than by default
    /// (`add_special_tokens`, `continue_final_message`, `truncate_prompt_tokens`, its own
    /// `chat_template`): kvgate then cannot tell its tokens.
    pub fn changes_tokenization(&self) -> bool {
        ["\"add_special_tokens\"", "\"continue_final_message\"", "\"truncate_prompt_tokens\"", "\"chat_template\""]
            .iter()
            .any(|k| memchr::memmem::find(self.body.as_bytes(), k.as_bytes()).is_some())
    }

    /// The prompt as a tokenizer reads it: one completions prompt (text or ids) or a chat.
    pub fn token_source(&self) -> TokenSource<'_> {
        match (&self.prompt, self.api) {
            (Prompt::Texts(t), ApiKind::Completions) if t.len() == 1 => {
                match serde_json::from_str::<String>(&format!("\"{}\"", t[0])) {
                    Ok(s) => TokenSource::Text(s),
                    Err(_) => TokenSource::Unsupported,
                }
            }
            (Prompt::Tokens(b), ApiKind::Completions) if b.len() == 1 => TokenSource::Ids(&b[0]),
            (Prompt::Chat { .. }, _) => match serde_json::from_str(self.body) {
                Ok(v) => TokenSource::Chat(v),
                Err(_) => TokenSource::Unsupported,
            },
            _ => TokenSource::Unsupported,
        }
    }

    /// Feeds the prompt's canonical byte stream to `sink`, in order.
    ///
    /// Text is fed as its raw JSON string contents; token ids as little-endian `u32`s (four bytes
    /// per token, the same ratio kvgate assumes for text). A chat is fed as the `tools` JSON, then
    /// per message: role, name, content (text parts in order, other parts as a placeholder that
    /// names the part's type and a hash of its bytes), tool calls — so turn N+1 of a conversation
    /// begins with exactly the bytes of turn N. Requests with several prompts feed the first one:
    /// routing places the whole request on one endpoint.
    pub fn feed_prompt(&self, sink: &mut dyn FnMut(&[u8])) {
        match &self.prompt {
            Prompt::Texts(texts) => {
                if let Some(t) = texts.first() {
                    sink(t.as_bytes());
                }
            }
            Prompt::Tokens(batches) => {
                if let Some(tokens) = batches.first() {
                    let mut buf = [0u8; 1024];
                    for chunk in tokens.chunks(buf.len() / 4) {
                        for (dst, t) in buf.chunks_exact_mut(4).zip(chunk) {
                            dst.copy_from_slice(&t.to_le_bytes());
                        }
                        sink(&buf[..chunk.len() * 4]);
                    }
                }
            }
            Prompt::Chat { tools, messages } => {
                if let Some(tools) = tools {
                    sink(b"\x1etools\x1f");
                    sink(tools.get().as_bytes());
                }
                for m in messages {
                    sink(RECORD);
                    sink(m.role.as_bytes());
                    sink(UNIT);
                    if let Some(name) = m.name.and_then(string_body) {
                        sink(name.as_bytes());
                        sink(UNIT);
                    }
                    if let Some(content) = m.content {
                        // Validated in `parse`, so this cannot fail part-way.
                        let _ = visit_content(content, sink);
                    }
                    if let Some(calls) = m.tool_calls {
                        sink(UNIT);
                        sink(calls.get().as_bytes());
                    }
                }
            }
            Prompt::Responses { instructions, input } => {
                if let Some(i) = instructions {
                    sink(RECORD);
                    sink(string_body(i).unwrap_or(i.get()).as_bytes());
                }
                match string_body(input) {
                    Some(text) => {
                        sink(RECORD);
                        sink(text.as_bytes());
                    }
                    None => {
                        // Items are resent verbatim turn after turn: their raw JSON is canonical.
                        let _ = for_each_element(input, &mut |item| {
                            sink(RECORD);
                            sink(item.get().as_bytes());
                            Ok(())
                        });
                    }
                }
            }
        }
    }
}

/// The `model` of any JSON body, reading nothing else (for paths kvgate does not parse).
pub fn model_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct OnlyModel {
        model: Option<String>,
    }
    serde_json::from_slice::<OnlyModel>(body).ok()?.model
}

/// Maps a serde error on a JSON object to the right `RequestError`, naming the field.
fn classify(text: &str, err: serde_json::Error) -> RequestError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => RequestError::NotJson(err),
        Category::Data => {
            // The error path is cold: parse again with path tracking to name the field.
            let mut de = serde_json::Deserializer::from_str(text);
            match serde_path_to_error::deserialize::<_, Body<'_>>(&mut de) {
                Err(e) => {
                    let field = e.path().to_string();
                    RequestError::invalid(field, strip_position(&e.into_inner().to_string()))
                }
                Ok(_) => RequestError::invalid("?", strip_position(&err.to_string())),
            }
        }
    }
}

/// serde_json appends " at line L column C"; for a field error the path says more.
fn strip_position(msg: &str) -> String {
    msg.split(" at line ").next().unwrap_or(msg).to_owned()
}

fn first_byte(raw: &RawValue) -> u8 {
    raw.get().as_bytes().first().copied().unwrap_or(b' ')
}

/// A JSON string's value, borrowed unless it has escapes.
fn json_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let body = string_body(raw)?;
    if body.contains('\\') {
        serde_json::from_str::<String>(raw.get()).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(body))
    }
}

/// The raw contents of a JSON string (between the quotes), or `None` if `raw` is not a string.
fn string_body(raw: &RawValue) -> Option<&str> {
    raw.get().strip_prefix('"')?.strip_suffix('"')
}

/// A completions `prompt` or embeddings `input`: a string, strings, token ids, or lists of ids.
fn prompt_of<'a>(raw: Option<&'a RawValue>, field: &'static str) -> Result<Prompt<'a>, RequestError> {
    let raw = raw.ok_or(RequestError::MissingPrompt(field))?;
    let bad = |detail: &str| RequestError::invalid(field, detail);
    let shape = "must be a string, an array of strings, an array of token ids or an array of arrays of token ids";
    match first_byte(raw) {
        b'"' => Ok(Prompt::Texts(vec![Cow::Borrowed(string_body(raw).ok_or_else(|| bad(shape))?)])),
        b'[' => {
            let items: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(|_| bad(shape))?;
            let Some(head) = items.first() else {
                return Err(bad("must not be empty"));
            };
            match first_byte(head) {
                b'"' => items
                    .iter()
                    .map(|i| string_body(i).map(Cow::Borrowed).ok_or_else(|| bad(shape)))
                    .collect::<Result<_, _>>()
                    .map(Prompt::Texts),
                b'[' => serde_json::from_str::<Vec<Vec<u32>>>(raw.get()).map_err(|_| bad(shape)).map(Prompt::Tokens),
                _ => {
                    serde_json::from_str::<Vec<u32>>(raw.get()).map_err(|_| bad(shape)).map(|t| Prompt::Tokens(vec![t]))
                }
            }
        }
        _ => Err(bad(shape)),
    }
}

/// Calls `f` on each element of a JSON array without collecting them.
fn for_each_element<'a>(
    raw: &'a RawValue,
    f: &mut dyn FnMut(&'a RawValue) -> Result<(), String>,
) -> Result<(), String> {
    struct Each<'f, 'a>(&'f mut dyn FnMut(&'a RawValue) -> Result<(), String>);
    impl<'de, 'f> Visitor<'de> for Each<'f, 'de> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
            while let Some(item) = seq.next_element::<&'de RawValue>()? {
                (self.0)(item).map_err(serde::de::Error::custom)?;
            }
            Ok(())
        }
    }
    impl<'de, 'f> DeserializeSeed<'de> for Each<'f, 'de> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Each(f).deserialize(&mut de).map_err(|e| strip_position(&e.to_string()))
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
}

/// Feeds a message `content` (a string, `null`, or an array of content parts) to `sink`.
fn visit_content(content: &RawValue, sink: &mut dyn FnMut(&[u8])) -> Result<(), String> {
    if let Some(text) = string_body(content) {
        sink(text.as_bytes());
        return Ok(());
    }
    match first_byte(content) {
        b'n' if content.get() == "null" => Ok(()),
        b'[' => for_each_element(content, &mut |raw| {
            let part: Part<'_> = serde_json::from_str(raw.get())
                .map_err(|_| "content parts must be objects with a string `type`".to_owned())?;
            match (part.kind.as_ref(), part.text) {
                ("text" | "input_text" | "output_text", Some(t)) => {
                    let t = string_body(t).ok_or("a text part's `text` must be a string")?;
                    sink(t.as_bytes());
                }
                ("text" | "input_text" | "output_text", None) => {
                    return Err("a text part needs `text`".to_owned());
                }
                (kind, _) => {
                    // Images, audio, files: a stable stand-in, equal for equal parts.
                    let h = xxhash_rust::xxh3::xxh3_64(raw.get().as_bytes());
                    sink(UNIT);
                    sink(kind.as_bytes());
                    sink(&h.to_le_bytes());
                    sink(UNIT);
                }
            }
            Ok(())
        }),
        _ => Err("must be a string, null or an array of content parts".to_owned()),
    }
}

mod fields;
pub use fields::{PromptFields, PromptText};

#[cfg(test)]
mod tests;
