//! The Responses API (`/v1/responses`) in vLLM's shape: its request as the chat it is
//! underneath, its response object, and its numbered event stream.

use axum::body::Bytes;
use serde_json::{Value, json};

use super::reply::{Choice, Reply};
use crate::tools::sim::engine::FinishReason;
use crate::tools::sim::server::ApiError;

/// The Responses API's request as the chat request it is underneath: `instructions` as the
/// system message, `input` (a string or a list of messages) as the conversation,
/// `max_output_tokens` as `max_tokens`.
pub(super) fn responses_as_chat(v: &Value) -> Result<Value, ApiError> {
    let mut messages = Vec::new();
    if let Some(i) = v.get("instructions").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": i}));
    }
    match v.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for item in items {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                messages.push(json!({"role": role, "content": item.get("content").cloned().unwrap_or(Value::Null)}));
            }
        }
        _ => {
            return Err(ApiError {
                param: Some("input"),
                ..ApiError::bad("`input` must be a string or a list of messages")
            });
        }
    }
    let mut chat = json!({"messages": messages, "stream": v.get("stream").cloned().unwrap_or(json!(false))});
    for (from, to) in [("model", "model"), ("max_output_tokens", "max_tokens"), ("cache_salt", "cache_salt")] {
        if let Some(x) = v.get(from) {
            chat[to] = x.clone();
        }
    }
    Ok(chat)
}

impl Reply {
    /// The Responses API's response object; `status` `in_progress` while streaming, else it
    /// follows the finish (`incomplete` at `max_output_tokens`).
    pub(super) fn response_object(&self, choices: &[Choice], status: &str) -> Value {
        let c = &choices[0];
        let ended = status != "in_progress";
        let length = c.done.as_ref().is_some_and(|d| d.reason == FinishReason::Length);
        let status = if ended && length { "incomplete" } else { status };
        let output = if ended {
            json!([{"id": self.item_id, "type": "message", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": c.text, "annotations": [], "logprobs": null}]}])
        } else {
            json!([])
        };
        json!({
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model,
            "status": status, "output": output, "error": null,
            "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": null, "metadata": null, "parallel_tool_calls": true, "temperature": 1.0,
            "tool_choice": "auto", "tools": [], "top_p": 1.0, "background": false,
            "max_output_tokens": self.max_output_tokens, "previous_response_id": null, "reasoning": null,
            "service_tier": "auto", "text": null, "top_logprobs": null, "truncation": "disabled", "user": null,
            "usage": if ended { self.usage(choices) } else { Value::Null },
        })
    }

    /// One Responses API stream event (`event:` and `data:` lines, numbered).
    fn event(&mut self, kind: &str, mut data: Value) -> Bytes {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
    }

    /// The Responses stream's opening events, up to the text part.
    pub(super) fn response_opening(&mut self, choices: &[Choice]) -> Vec<Bytes> {
        let r = self.response_object(choices, "in_progress");
        let item =
            json!({"id": self.item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []});
        let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
        let id = self.item_id.clone();
        vec![
            self.event("response.created", json!({"response": r})),
            self.event("response.in_progress", json!({"response": r})),
            self.event("response.output_item.added", json!({"output_index": 0, "item": item})),
            self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": 0, "content_index": 0, "part": part}),
            ),
        ]
    }

    /// A Responses text delta.
    pub(super) fn response_delta(&mut self, text: &str) -> Bytes {
        let id = self.item_id.clone();
        self.event(
            "response.output_text.delta",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "delta": text, "logprobs": []}),
        )
    }

    /// The Responses stream's closing events.
    pub(super) fn response_closing(&mut self, choices: &[Choice]) -> Vec<Bytes> {
        let text = choices[0].text.clone();
        let id = self.item_id.clone();
        let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
        let item = json!({"id": id, "type": "message", "role": "assistant", "status": "completed", "content": [part]});
        let done = self.response_object(choices, "completed");
        vec![
            self.event(
                "response.output_text.done",
                json!({"item_id": id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
            ),
            self.event(
                "response.content_part.done",
                json!({"item_id": id, "output_index": 0, "content_index": 0, "part": part}),
            ),
            self.event("response.output_item.done", json!({"output_index": 0, "item": item})),
            self.event("response.completed", json!({"response": done})),
        ]
    }
}
