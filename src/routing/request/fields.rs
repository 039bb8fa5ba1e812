//! A completions request given as fields instead of a body (kvgate's picker API), and one that
//! names only its model: both become the [`ParsedRequest`] the same body would, with no JSON
//! built to be parsed again.

use std::borrow::Cow;

use super::{ApiKind, ParsedRequest, Prompt, RequestError};

/// A completions request given as fields instead of a body (kvgate's picker API): routed
/// exactly as the body with the same fields would be.
#[derive(Debug, Clone, Copy)]
pub struct PromptFields<'a> {
    /// The model (empty: none given).
    pub model: &'a str,
    /// The prompt, if any.
    pub text: Option<PromptText<'a>>,
    /// vLLM's `priority`.
    pub priority: i64,
    /// vLLM's `cache_salt`.
    pub cache_salt: Option<&'a str>,
}

/// A prompt given as a field.
#[derive(Debug, Clone, Copy)]
pub enum PromptText<'a> {
    /// Text.
    Text(&'a str),
    /// Token ids.
    Ids(&'a [u32]),
}

impl<'a> ParsedRequest<'a> {
    /// A completions request given as fields, holding at most `max_bytes` of prompt.
    pub fn from_fields(f: PromptFields<'a>, max_bytes: usize) -> Result<Self, RequestError> {
        if f.model.is_empty() {
            return Err(RequestError::MissingModel);
        }
        let (prompt, size) = match f.text {
            None => (Prompt::Texts(vec![Cow::Borrowed("")]), 0),
            Some(PromptText::Ids([])) => return Err(RequestError::invalid("prompt", "must not be empty")),
            Some(PromptText::Ids(ids)) => (Prompt::Tokens(vec![ids.to_vec()]), ids.len() * 4),
            Some(PromptText::Text(t)) => {
                // Held as a body holds it: the JSON string's contents, escapes and all.
                let quoted = serde_json::Value::from(t).to_string();
                let raw = quoted.get(1..quoted.len() - 1).unwrap_or_default().to_owned();
                let size = raw.len();
                (Prompt::Texts(vec![Cow::Owned(raw)]), size)
            }
        };
        if size > max_bytes {
            return Err(RequestError::TooLarge { size, limit: max_bytes });
        }
        Ok(Self {
            priority: f.priority,
            cache_salt: f.cache_salt.map(Cow::Borrowed),
            prompt,
            size,
            ..Self::model_only(f.model)
        })
    }

    /// A request that names only its model: placed by load alone, there is no prompt to match.
    pub fn model_only(model: &'a str) -> Self {
        Self {
            api: ApiKind::Completions,
            model: Cow::Borrowed(model),
            stream: false,
            include_usage: false,
            max_tokens: None,
            cache_salt: None,
            kv_transfer_params: None,
            priority: 0,
            prompt: Prompt::Texts(vec![Cow::Borrowed("")]),
            body: "",
            size: 0,
        }
    }
}
