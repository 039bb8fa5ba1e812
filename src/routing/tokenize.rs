//! A model's own tokenizer, in-process: the Hugging Face `tokenizer.json`, and the chat template
//! rendered as vLLM renders it (Hugging Face's Jinja environment: `trim_blocks`, `lstrip_blocks`,
//! loop controls, `raise_exception`, Python's `tojson`), so kvgate's token ids are the server's.
//!
//! Completions prompts are encoded with the tokenizer's special tokens (its post-processor adds
//! BOS where the model has one), chat prompts without them (the template writes its own), as
//! vLLM does. Token-id prompts are used as given. Built from bytes: reading the folder is the
//! caller's I/O.
//!
//! Tokenization is the cost of a precise decision, and prompts repeat: system prompts, tools,
//! a conversation's earlier turns. `tokenizers` encodes the text between added tokens (the chat
//! markers) independently, so kvgate splits rendered text at them itself and keeps each long
//! segment's ids in a bounded cache; a segment seen before costs a hash. (Tokenizers whose added
//! tokens strip whitespace or are normalized are always encoded whole.)

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::routing::prefix::precise::BuildKeyHasher;

/// Why a tokenizer cannot be built, or a prompt not rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokenizeError(String);

fn fail(message: impl Into<String>) -> TokenizeError {
    TokenizeError(message.into())
}

/// Segments shorter than this are encoded every time.
const CACHED_SEGMENT_BYTES: usize = 256;
/// Token ids the segment cache holds at most (16 MiB); past it the cache starts over.
const CACHE_IDS: usize = 4 << 20;

type SegmentIds = hashbrown::HashMap<u64, Arc<[u32]>, BuildKeyHasher>;

/// The added tokens to split text at, with the ids a completions prompt gets around its text.
#[derive(Debug)]
struct Segmenter {
    matcher: aho_corasick::AhoCorasick,
    /// Pattern index → token id.
    ids: Vec<u32>,
    /// What the post-processor adds before and after a completions prompt, when that is fixed.
    around: Option<(Vec<u32>, Vec<u32>)>,
    /// Segment hash → its ids, and the ids held in all.
    cache: parking_lot::Mutex<(SegmentIds, usize)>,
}

impl Segmenter {
    fn of(t: &tokenizers::Tokenizer) -> Option<Self> {
        let added = t.get_added_tokens_decoder();
        // Whole-text encoding splits at added tokens too, but strips around some, normalizes
        // others in a second pass, and a Metaspace pre-tokenizer marks only the text's first
        // piece: those tokenizers are encoded whole.
        if added.values().any(|a| a.lstrip || a.rstrip || a.single_word || a.normalized) {
            return None;
        }
        let pre = serde_json::to_value(t.get_pre_tokenizer()).unwrap_or(Value::Null);
        if first_only_prefix(&pre) {
            return None;
        }
        let mut tokens: Vec<(u32, String)> = added.into_iter().map(|(id, a)| (id, a.content)).collect();
        tokens.sort_unstable();
        let matcher = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(_, c)| c.as_str()))
            .ok()?;
        let ids = tokens.iter().map(|(id, _)| *id).collect();
        // The post-processor's additions, read off a probe: `P ++ ids("a") ++ S`.
        let bare = t.encode_fast("a", false).ok()?.get_ids().to_vec();
        let full = t.encode_fast("a", true).ok()?.get_ids().to_vec();
        let around = (0..=full.len().saturating_sub(bare.len()))
            .find(|&k| full[k..].starts_with(&bare))
            .map(|k| (full[..k].to_vec(), full[k + bare.len()..].to_vec()));
        let s = Self { matcher, ids, around, cache: parking_lot::Mutex::new((hashbrown::HashMap::default(), 0)) };
        // A probe of every added token between words, long enough to be cached, must encode as
        // the whole text does.
        let filler = "Hello world, a probe of segments. ".repeat(8);
        let mut probe = String::new();
        for (_, content) in tokens.iter().take(64) {
            probe.push_str(&filler);
            probe.push_str(content);
            probe.push_str("x y");
            probe.push_str(content);
        }
        probe.push_str(&filler);
        let whole = t.encode_fast(probe.as_str(), false).ok()?.get_ids().to_vec();
        let mut split = Vec::new();
        s.encode(t, &probe, &mut split).ok()?;
        s.cache.lock().0.clear();
        s.cache.lock().1 = 0;
        (split == whole).then_some(s)
    }

    /// `text`'s ids without special tokens added: added tokens as their ids, the text between
    /// them encoded (from the cache when seen before).
    fn encode(&self, t: &tokenizers::Tokenizer, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizeError> {
        let mut at = 0;
        for m in self.matcher.find_iter(text) {
            self.segment(t, &text[at..m.start()], out)?;
            out.push(self.ids[m.pattern().as_usize()]);
            at = m.end();
        }
        self.segment(t, &text[at..], out)
    }

    fn segment(&self, t: &tokenizers::Tokenizer, piece: &str, out: &mut Vec<u32>) -> Result<(), TokenizeError> {
        if piece.is_empty() {
            return Ok(());
        }
        let encode = |p: &str| {
            t.encode_fast(p, false).map(|e| e.get_ids().to_vec()).map_err(|e| fail(format!("tokenizing: {e}")))
        };
        if piece.len() < CACHED_SEGMENT_BYTES {
            out.extend(encode(piece)?);
            return Ok(());
        }
        // Keyed by a hash of the text and its length; entries count as their ids plus one, so
        // segments of no tokens are bounded too.
        let key = xxhash_rust::xxh3::xxh3_64_with_seed(piece.as_bytes(), piece.len() as u64);
        if let Some(ids) = self.cache.lock().0.get(&key).cloned() {
            out.extend_from_slice(&ids);
            return Ok(());
        }
        let ids: Arc<[u32]> = encode(piece)?.into();
        out.extend_from_slice(&ids);
        let mut cache = self.cache.lock();
        if cache.1 + ids.len() + 1 > CACHE_IDS {
            cache.0.clear();
            cache.1 = 0;
        }
        cache.1 += ids.len() + 1;
        cache.0.insert(key, ids);
        Ok(())
    }
}

/// Whether a pre-tokenizer (as JSON) holds a Metaspace that prefixes only the text's first piece.
fn first_only_prefix(v: &Value) -> bool {
    match v {
        Value::Object(o) => {
            let first = o.get("type").and_then(Value::as_str) == Some("Metaspace")
                && o.get("prepend_scheme").and_then(Value::as_str).is_some_and(|p| p.eq_ignore_ascii_case("first"));
            first || o.values().any(first_only_prefix)
        }
        Value::Array(a) => a.iter().any(first_only_prefix),
        _ => false,
    }
}

/// A model's tokenizer and chat template.
#[derive(Clone)]
pub struct PromptTokenizer {
    tokenizer: Arc<tokenizers::Tokenizer>,
    /// Splitting at added tokens, with the segment cache (when the tokenizer allows it).
    segmenter: Option<Arc<Segmenter>>,
    /// The compiled chat template (`chat` in its environment), if the model has one.
    template: Option<Arc<minijinja::Environment<'static>>>,
    /// Special tokens the template may use (`bos_token`, `eos_token`, `unk_token`, `pad_token`).
    special: BTreeMap<String, String>,
}

impl fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.template.is_some())
            .field("segment_cache", &self.segmenter.is_some())
            .field("special", &self.special)
            .finish()
    }
}

/// The name of the chat template in its environment.
const CHAT: &str = "chat";

impl PromptTokenizer {
    /// A tokenizer from the files of a Hugging Face tokenizer folder: `tokenizer.json`, and
    /// optionally `tokenizer_config.json` (special tokens, and a `chat_template` when there is
    /// no `chat_template.jinja`) and `chat_template.jinja`.
    pub fn from_parts(
        tokenizer_json: &[u8],
        tokenizer_config_json: Option<&[u8]>,
        chat_template_jinja: Option<&str>,
    ) -> Result<Self, TokenizeError> {
        let mut tokenizer =
            tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        // vLLM's prompts are neither truncated nor padded by the tokenizer file's settings.
        tokenizer.with_truncation(None).map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        tokenizer.with_padding(None);
        let config: Value = match tokenizer_config_json {
            Some(bytes) => serde_json::from_slice(bytes).map_err(|e| fail(format!("tokenizer_config.json: {e}")))?,
            None => Value::Null,
        };
        let mut special = BTreeMap::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            // A special token is a string, or an object with its `content` (older configs).
            let token = match &config[key] {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            };
            if let Some(t) = token {
                special.insert(key.to_owned(), t);
            }
        }
        let source = match chat_template_jinja {
            Some(t) => Some(t.to_owned()),
            None => match &config["chat_template"] {
                Value::String(s) => Some(s.clone()),
                // A list of named templates: the `default` one.
                Value::Array(list) => {
                    list.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(str::to_owned)
                }
                _ => None,
            },
        };
        let template = source.map(|s| chat_environment(s).map(Arc::new)).transpose()?;
        let segmenter = Segmenter::of(&tokenizer).map(Arc::new);
        Ok(Self { tokenizer: Arc::new(tokenizer), segmenter, template, special })
    }

    /// The vocabulary size (special tokens included).
    pub fn vocab_size(&self) -> u32 {
        self.tokenizer.get_vocab_size(true) as u32
    }

    /// The text of token ids (special tokens left out).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The token ids of a completions prompt (with the tokenizer's special tokens).
    pub fn encode_completion(&self, prompt: &str) -> Result<Vec<u32>, TokenizeError> {
        self.encode(prompt, true)
    }

    /// The token ids of text the chat template rendered (its special tokens are in the text).
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        self.encode(text, false)
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, TokenizeError> {
        if let Some(s) = &self.segmenter {
            let around = if special { s.around.as_ref() } else { Some(&(Vec::new(), Vec::new())) };
            if let Some((before, after)) = around {
                let mut out = before.clone();
                s.encode(&self.tokenizer, text, &mut out)?;
                out.extend_from_slice(after);
                return Ok(out);
            }
        }
        self.encode_whole(text, special)
    }

    /// `text` encoded in one piece by the tokenizer itself (what the segment cache must equal).
    pub fn encode_whole(&self, text: &str, special: bool) -> Result<Vec<u32>, TokenizeError> {
        let enc = self.tokenizer.encode_fast(text, special).map_err(|e| fail(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Renders a chat request's prompt.
    pub fn render_chat(&self, chat: &ChatPrompt<'_>) -> Result<String, TokenizeError> {
        let env = self.template.as_ref().ok_or_else(|| fail("the model has no chat template"))?;
        let mut ctx = serde_json::Map::new();
        for (k, v) in &self.special {
            ctx.insert(k.clone(), Value::String(v.clone()));
        }
        ctx.insert("messages".into(), string_contents(chat.messages));
        if let Some(t) = chat.tools.filter(|t| !t.is_null()) {
            ctx.insert("tools".into(), t.clone());
        }
        ctx.insert("add_generation_prompt".into(), Value::Bool(chat.add_generation_prompt));
        if let Some(Value::Object(extra)) = chat.kwargs {
            for (k, v) in extra {
                ctx.insert(k.clone(), v.clone());
            }
        }
        let tmpl = env.get_template(CHAT).map_err(|e| fail(format!("chat template: {e}")))?;
        tmpl.render(minijinja::Value::from(minijinja::value::Serde(Value::Object(ctx))))
            .map_err(|e| fail(format!("rendering the chat template: {e:#}")))
    }

    /// The token ids of a chat request's prompt ([`PromptTokenizer::render_chat`], encoded
    /// without added special tokens).
    pub fn encode_chat(&self, chat: &ChatPrompt<'_>) -> Result<Vec<u32>, TokenizeError> {
        let text = self.render_chat(chat)?;
        self.encode_rendered(&text)
    }
}

/// What a chat template renders: a request's `messages` (OpenAI messages), its `tools`, whether
/// to add the generation prompt (vLLM: yes, unless the request says otherwise), and the
/// request's `chat_template_kwargs` (an object, set on top).
#[derive(Debug, Clone, Copy)]
pub struct ChatPrompt<'a> {
    /// The messages.
    pub messages: &'a Value,
    /// The tools, if any.
    pub tools: Option<&'a Value>,
    /// Whether the prompt ends with the assistant's turn opened.
    pub add_generation_prompt: bool,
    /// More template variables.
    pub kwargs: Option<&'a Value>,
}

impl<'a> ChatPrompt<'a> {
    /// The prompt of a chat request body (a JSON object), as vLLM reads it.
    pub fn of_request(body: &'a Value) -> Self {
        Self {
            messages: &body["messages"],
            tools: body.get("tools"),
            add_generation_prompt: body["add_generation_prompt"].as_bool().unwrap_or(true),
            kwargs: body.get("chat_template_kwargs"),
        }
    }
}

/// Messages whose `content` is a list of parts get their text parts joined by newlines, as vLLM
/// gives them to templates written for string contents.
fn string_contents(messages: &Value) -> Value {
    let Value::Array(list) = messages else { return messages.clone() };
    Value::Array(
        list.iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some(Value::Array(parts)) = m.get("content") {
                    let text: Vec<&str> =
                        parts.iter().filter(|p| p["type"] == "text").filter_map(|p| p["text"].as_str()).collect();
                    m["content"] = Value::String(text.join("\n"));
                }
                m
            })
            .collect(),
    )
}

/// The Jinja environment Hugging Face renders chat templates in.
fn chat_environment(source: String) -> Result<minijinja::Environment<'static>, TokenizeError> {
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| fail(format!("template syntax: {e}")))?;
    env.set_syntax(syntax);
    // Python's string and dict methods (`.strip()`, `.startswith()`, `.items()`, …).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<minijinja::Value, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
    });
    env.add_filter("tojson", py_tojson);
    env.add_template_owned(CHAT, source).map_err(|e| fail(format!("chat template: {e:#}")))?;
    Ok(env)
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as Hugging Face's `tojson`:
/// `", "` and `": "` separators on one line; with `indent`, one item a line and `","`.
fn py_tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<minijinja::Value> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&mut out, &json, indent, 0);
    Ok(minijinja::Value::from_safe_string(out))
}

fn write_py_json(out: &mut String, v: &Value, indent: Option<usize>, level: usize) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_py_json(out, item, indent, level + 1);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(out, item, indent, level + 1);
            }
            newline(out, level);
            out.push('}');
        }
        // Scalars and empty containers print as serde_json prints them, which for strings is
        // Python's `ensure_ascii=False` form (only `"`, `\` and control characters escaped).
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tojson_is_pythons() {
        let v = json!({"name": "get_weather", "parameters": {"type": "object", "required": ["city", "ünit"]}, "n": [1, 2.5, null, true], "e": {}});
        let mut out = String::new();
        write_py_json(&mut out, &v, None, 0);
        assert_eq!(
            out,
            r#"{"name": "get_weather", "parameters": {"type": "object", "required": ["city", "ünit"]}, "n": [1, 2.5, null, true], "e": {}}"#
        );
        let mut out = String::new();
        write_py_json(&mut out, &json!({"a": [1, {"b": "c"}], "d": []}), Some(2), 0);
        assert_eq!(out, "{\n  \"a\": [\n    1,\n    {\n      \"b\": \"c\"\n    }\n  ],\n  \"d\": []\n}");
    }

    #[test]
    fn part_lists_become_text() {
        let m = json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]}]);
        assert_eq!(string_contents(&m)[0]["content"], "a\nb");
    }
}
