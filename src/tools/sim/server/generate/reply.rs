//! A response as the client sees it: the reply's identity and options ([`Reply`]), each
//! choice's text as it arrives ([`Choice`], cut before a stop string by [`StopCutter`]), and
//! their rendering as completions or chat chunks, usage, logprobs and whole bodies.

use axum::body::Bytes;
use serde_json::{Value, json};

use super::Api;
use crate::tools::sim::engine::{Done, TokenText};

/// Logprobs asked for: how many alternatives per token.
#[derive(Debug, Clone, Copy)]
pub(super) struct Logprobs {
    pub(super) top: usize,
}

/// Everything a response needs to describe itself.
pub(super) struct Reply {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) api: Api,
    pub(super) include_usage: bool,
    /// Usage carries `prompt_tokens_details`.
    pub(super) details: bool,
    pub(super) text_of: TokenText,
    pub(super) logprobs: Option<Logprobs>,
    /// Draws of the (shape-only) log probabilities.
    pub(super) rng: fastrand::Rng,
    /// The Responses API's `max_output_tokens`, echoed.
    pub(super) max_output_tokens: Option<usize>,
    /// The Responses API's output item id.
    pub(super) item_id: String,
    /// The Responses API's events are numbered.
    pub(super) sequence: u64,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply").field("id", &self.id).field("api", &self.api).finish_non_exhaustive()
    }
}

/// One choice's state while its tokens arrive.
#[derive(Debug)]
pub(super) struct Choice {
    /// Text released so far (non-streaming: all of it).
    pub(super) text: String,
    pub(super) cutter: StopCutter,
    /// The end, once it came.
    pub(super) done: Option<Done>,
    /// Per-token logprob entries not yet sent.
    pub(super) logprobs: Vec<Value>,
    /// Characters sent before this chunk (completions' `text_offset`).
    pub(super) offset: usize,
}

impl Choice {
    /// A choice with nothing generated yet, cut at `stops`.
    pub(super) fn new(stops: &[String]) -> Self {
        Self { text: String::new(), cutter: StopCutter::new(stops), done: None, logprobs: Vec::new(), offset: 0 }
    }
}

/// Cuts a choice's text before its first stop string, holding back what could still become
/// one so a stream never shows part of it.
#[derive(Debug, Default)]
pub(super) struct StopCutter {
    stops: Vec<String>,
    hold: usize,
    pending: String,
    /// The stop string met, once one was.
    pub(super) matched: Option<String>,
}

impl StopCutter {
    fn new(stops: &[String]) -> Self {
        let hold = stops.iter().map(String::len).max().unwrap_or(1).saturating_sub(1);
        Self { stops: stops.to_vec(), hold, ..Self::default() }
    }

    /// Adds generated text; what may be shown now.
    pub(super) fn push(&mut self, piece: &str) -> String {
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
    pub(super) fn finish(&mut self) -> String {
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
    pub(super) fn usage(&self, choices: &[Choice]) -> Value {
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
    pub(super) fn logprob_entry(&mut self, token: u32, text: &str, offset: usize) -> Option<Value> {
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
    pub(super) fn role_chunk(&self, index: usize) -> Bytes {
        self.chunk_envelope(
            json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
        )
    }

    /// One SSE event of choice `index` carrying `text` (and its end on the last one).
    pub(super) fn chunk(&self, index: usize, text: &str, logprobs: &[Value], end: Option<(&str, Value)>) -> Bytes {
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

    pub(super) fn usage_chunk(&self, choices: &[Choice]) -> Bytes {
        sse(
            &json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [], "usage": self.usage(choices)}),
        )
    }

    /// The whole answer (non-streaming).
    pub(super) fn full(&self, choices: &[Choice]) -> Value {
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
pub(super) fn end_of(c: &Choice) -> (&'static str, Value) {
    match (&c.cutter.matched, &c.done) {
        (Some(s), _) => ("stop", json!(s)),
        (None, Some(d)) => (d.reason.as_str(), Value::Null),
        (None, None) => ("abort", Value::Null),
    }
}

pub(super) fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}
