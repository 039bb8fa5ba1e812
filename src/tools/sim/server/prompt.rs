//! Request body → prompt tokens, as vLLM's frontend does it: the `model` checked (a base model
//! or a loaded LoRA adapter), a chat rendered with the chat template, a completions prompt as
//! text or token ids, in the simulator's vocabulary.

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, Shared};
use crate::routing::tokenize::ChatPrompt;
use crate::tools::sim::tokenizer::{self, ChatTurn};

pub(super) fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the request body must be a JSON object"));
    }
    Ok(v)
}

/// Checks `model` and returns the LoRA adapter it names, if it is one.
pub(super) fn resolve_model(shared: &Shared, v: &Value) -> Result<(String, Option<String>), ApiError> {
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
        param: Some("model"),
        ..ApiError::status(StatusCode::NOT_FOUND, format!("The model `{model}` does not exist."))
    })
}

/// Text and media of one message `content`.
pub(super) fn content_of(content: Option<&Value>) -> Result<(String, Vec<String>), ApiError> {
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

/// Token ids of a chat request's prompt (template applied): the model's own tokenizer and
/// template with `--tokenizer`, else the simulator's.
pub(super) fn chat_prompt(shared: &Shared, v: &Value) -> Result<Vec<u32>, ApiError> {
    if let Some(t) = &shared.tokenizer {
        if !v.get("messages").is_some_and(Value::is_array) {
            return Err(ApiError { param: Some("messages"), ..ApiError::bad("`messages` must be an array") });
        }
        return t.encode_chat(&ChatPrompt::of_request(v)).map_err(|e| ApiError::bad(e.to_string()));
    }
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
pub(super) fn completion_prompt(shared: &Shared, v: &Value) -> Result<Vec<u32>, ApiError> {
    let bad = || ApiError {
        param: Some("prompt"),
        ..ApiError::bad("`prompt` must be a string, a list of token ids, or a list holding one of those")
    };
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(bad)).collect()
    };
    match v.get("prompt") {
        Some(Value::String(s)) => match &shared.tokenizer {
            Some(t) => t.encode_completion(s).map_err(|e| ApiError::bad(e.to_string())),
            None => {
                let mut out = Vec::new();
                tokenizer::tokenize(s, &mut out);
                Ok(out)
            }
        },
        Some(Value::Array(a)) if a.is_empty() => {
            Err(ApiError { param: Some("prompt"), ..ApiError::bad("`prompt` must not be empty") })
        }
        Some(Value::Array(a)) if a[0].is_number() => ids(a),
        Some(Value::Array(a)) if a.len() == 1 => completion_prompt(shared, &json!({"prompt": a[0]})),
        Some(Value::Array(_)) => Err(ApiError::bad(
            "the simulator serves one prompt per request; send a list of prompts as separate requests",
        )),
        _ => Err(bad()),
    }
}

pub(super) fn flag(v: &Value, a: &str, b: &str) -> Option<bool> {
    v.get(a).and_then(|o| o.get(b)).and_then(Value::as_bool)
}
