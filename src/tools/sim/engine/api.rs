//! What the engine is told and tells back: its configuration and step-time model, the requests
//! submitted to it (with their P/D role), the events and outcome a request streams, the
//! commands of its channel, and the load figures it publishes.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

/// Step-time model. Defaults approximate Llama-3.1-8B on one H100 (see `SimArgs`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Latency {
    /// Fixed cost of every step (weights read once per step, scheduling, sampling).
    pub step_overhead_ms: f64,
    /// Cost per prefilled (uncached) prompt token.
    pub prefill_ms_per_token: f64,
    /// Cost per request in the batch (attention over its KV, sampling).
    pub decode_ms_per_seq: f64,
    /// Cost per token whose KV arrives from a prefill endpoint.
    pub kv_transfer_ms_per_token: f64,
    /// Cost of swapping a LoRA adapter in.
    pub lora_load_ms: f64,
}

/// Which P/D hand-offs the engine takes part in (`kv_role` of `--kv-transfer-config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KvRole {
    /// Prefill for others and decode from others (vLLM's `kv_both`; also with no config).
    Both,
    /// Only prefill for others (`kv_producer`).
    Producer,
    /// Only decode from others (`kv_consumer`).
    Consumer,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub(crate) struct EngineConfig {
    /// Data-parallel rank (the `engine` label).
    pub rank: u32,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks.
    pub num_gpu_blocks: usize,
    /// Requests in the running batch at most.
    pub max_num_seqs: usize,
    /// Tokens scheduled per step at most.
    pub max_num_batched_tokens: usize,
    /// Wall-clock seconds per simulated second (0: never sleep).
    pub time_scale: f64,
    /// Step-time model.
    pub latency: Latency,
    /// LoRA adapters resident at once.
    pub max_loras: usize,
    /// Engine id reported to decode endpoints.
    pub engine_id: String,
    /// Host and port reported to decode endpoints as the KV side channel.
    pub side_channel: (String, u16),
    /// Seed for generated tokens.
    pub seed: u64,
    /// Served model name (the `model_name` label).
    pub model_name: String,
    /// Token ids are drawn below this (the tokenizer's vocabulary).
    pub vocab: u32,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinishReason {
    /// Reached its natural end.
    Stop,
    /// Reached `max_tokens`.
    Length,
    /// The client went away.
    Abort,
}

impl FinishReason {
    /// vLLM's spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// The P/D part a request plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handoff {
    /// An ordinary request.
    None,
    /// Prefill leg (`do_remote_decode`): stop after prefill and return `kv_transfer_params`.
    Prefill,
    /// Decode leg (`do_remote_prefill`): load the prompt's KV instead of computing it.
    Decode,
}

/// A request handed to the engine.
#[derive(Debug)]
pub(crate) struct Submission {
    /// Request id.
    pub id: String,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate.
    pub max_tokens: usize,
    /// Finish reason when `max_tokens` is reached (`length` if the client set it, else `stop`).
    pub finish_at_max: FinishReason,
    /// LoRA adapter, if any.
    pub lora: Option<String>,
    /// `cache_salt`.
    pub cache_salt: Option<String>,
    /// P/D role of this request.
    pub handoff: Handoff,
    /// Where tokens and the end go. Dropping the receiver aborts the request.
    pub events: mpsc::UnboundedSender<Event>,
    /// Arrival time.
    pub arrival: Instant,
    /// The request's `stop` strings: generation ends (`stop`) once its text holds one.
    pub stop: Option<StopWatch>,
}

/// The text of a token, in the vocabulary the server speaks.
pub(crate) type TokenText = std::sync::Arc<dyn Fn(u32) -> String + Send + Sync>;

/// Watches a request's generated text for its `stop` strings.
pub(crate) struct StopWatch {
    stops: Vec<String>,
    longest: usize,
    text: String,
    decode: TokenText,
}

impl std::fmt::Debug for StopWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopWatch").field("stops", &self.stops).finish_non_exhaustive()
    }
}

impl StopWatch {
    /// A watch for `stops` (none empty), reading tokens with `decode`.
    pub(crate) fn new(stops: Vec<String>, decode: TokenText) -> Self {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self { stops, longest, text: String::new(), decode }
    }

    /// Adds a generated token; whether the text now holds a stop string.
    pub(crate) fn hit(&mut self, token: u32) -> bool {
        let piece = (self.decode)(token);
        // Only a match that ends in this token's text is new.
        let mut from = self.text.len().saturating_sub(self.longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.text.push_str(&piece);
        let window = &self.text[from..];
        let hit = self.stops.iter().any(|s| window.contains(s.as_str()));
        // What a later match can still reach is kept; the rest is dropped.
        let mut keep = self.text.len().saturating_sub(self.longest);
        while !self.text.is_char_boundary(keep) {
            keep -= 1;
        }
        self.text.drain(..keep);
        hit
    }
}

/// What the engine reports about a request: a generated token, the end, or both at once (the
/// last token carries the end, so a stream can mark it with its finish reason).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    /// A generated token.
    pub token: Option<u32>,
    /// The request ended.
    pub done: Option<Done>,
}

/// The end of a request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Done {
    /// Why.
    pub reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache (or loaded from a prefill endpoint).
    pub cached_tokens: usize,
    /// For a prefill leg: what the decode endpoint needs.
    pub kv_transfer_params: Option<serde_json::Value>,
}

/// Commands to the engine task.
#[derive(Debug)]
pub(crate) enum Command {
    /// A new request.
    Submit(Box<Submission>),
    /// Forget every cached block; answers whether it was done.
    ResetPrefixCache(oneshot::Sender<bool>),
}

/// Load figures the front-end reads to balance over engines.
#[derive(Debug, Default)]
pub(crate) struct EngineLoad {
    /// Requests submitted and not yet finished.
    pub in_flight: AtomicUsize,
}

/// The front-end's handle on an engine task.
#[derive(Debug, Clone)]
pub(crate) struct EngineHandle {
    /// Data-parallel rank.
    pub rank: u32,
    /// Command channel.
    pub tx: mpsc::UnboundedSender<Command>,
    /// Load figures.
    pub load: Arc<EngineLoad>,
}
