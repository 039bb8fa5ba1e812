//! One simulated vLLM engine (one data-parallel rank): a step loop with continuous batching.
//!
//! Each step the scheduler, as vLLM V1's does, first gives running requests their next tokens
//! (one per decoding request, a chunk per prefilling one) and then admits waiting requests in
//! arrival order, all within `max_num_batched_tokens` and `max_num_seqs`. A request is admitted
//! with whatever prefix of its prompt is already cached (capped at `floor((n-1)/block)×block`
//! tokens, since the last token is always computed). When a request needs a block and none is
//! free, the most recently admitted running request is preempted: its blocks are released (and
//! stay cached) and it goes back to the front of the queue.
//!
//! The step then takes `overhead + prefill tokens × per-token cost + scheduled requests ×
//! per-request cost (+ KV transfer and LoRA load costs)`, scaled by `time_scale`, so time to first
//! token grows with uncached prompt tokens and with queueing, as on a GPU. At the end of a step,
//! filled blocks are committed to the cache (hittable at once) and each request whose tokens are
//! all computed samples one token.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;

use super::kv::{BlockPool, KvEvent, block_hash};
use super::metrics::SimMetrics;

mod api;
pub(crate) use api::*;

#[derive(Debug)]
struct Seq {
    sub: Submission,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    output: usize,
    /// Tokens whose KV is computed.
    computed: usize,
    blocks: Vec<u32>,
    /// Hashes of the full blocks of `tokens` computed so far (a prefix of them).
    hashes: Vec<u64>,
    /// Blocks committed to the cache.
    committed: usize,
    cached_tokens: usize,
    admitted: bool,
    scheduled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    rng: fastrand::Rng,
}

impl Seq {
    fn wants_tokens(&self) -> usize {
        self.tokens.len() - self.computed
    }
}

/// One step's work for one request.
#[derive(Debug, Clone, Copy)]
struct Work {
    tokens: usize,
    transfer: bool,
}

/// The engine task's state.
#[derive(Debug)]
pub(crate) struct Engine {
    cfg: EngineConfig,
    pool: BlockPool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    lora_active: Vec<String>,
    lora_labels: (String, String),
    metrics: SimMetrics,
    load: Arc<EngineLoad>,
    kv_events: Option<mpsc::UnboundedSender<Vec<KvEvent>>>,
    rank_label: String,
}

impl Engine {
    /// Starts an engine task of `tasks`; returns its handle (the task ends when every handle
    /// is dropped, or when `tasks` shuts down).
    pub(crate) fn spawn(
        cfg: EngineConfig,
        metrics: SimMetrics,
        kv_events: Option<mpsc::UnboundedSender<Vec<KvEvent>>>,
        tasks: &crate::gateway::tasks::Tasks,
    ) -> EngineHandle {
        let (engine, handle, rx) = Self::new(cfg, metrics, kv_events);
        tasks.spawn("engine", engine.run(rx)).detach();
        handle
    }

    /// An engine not yet running, its handle, and the command queue `run` reads.
    fn new(
        cfg: EngineConfig,
        metrics: SimMetrics,
        kv_events: Option<mpsc::UnboundedSender<Vec<KvEvent>>>,
    ) -> (Self, EngineHandle, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let load = Arc::new(EngineLoad::default());
        let rank_label = cfg.rank.to_string();
        metrics
            .cache_config
            .with_label_values(&[
                &cfg.block_size.to_string(),
                "auto",
                "True",
                &rank_label,
                "0.9",
                "0",
                &cfg.num_gpu_blocks.to_string(),
                "xxhash",
            ])
            .set(1.0);
        let mut engine = Self {
            pool: BlockPool::new(cfg.num_gpu_blocks, cfg.block_size, kv_events.is_some()),
            waiting: VecDeque::new(),
            running: Vec::new(),
            lora_active: Vec::new(),
            lora_labels: (String::from("-"), String::from("-")),
            metrics,
            load: load.clone(),
            kv_events,
            rank_label,
            cfg,
        };
        let rank = engine.cfg.rank;
        engine.publish_gauges();
        (engine, EngineHandle { rank, tx, load }, rx)
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut clock = Instant::now();
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv().await {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                }
                clock = Instant::now();
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            self.drop_abandoned();
            let (work, lora_loads) = self.schedule();
            if work.iter().all(|w| w.tokens == 0) {
                // Nothing can run now (e.g. every adapter slot is busy): wait for news.
                self.publish_gauges();
                match tokio::time::timeout(Duration::from_millis(5), rx.recv()).await {
                    Ok(Some(cmd)) => self.handle(cmd),
                    Ok(None) => return,
                    Err(_) => {}
                }
                continue;
            }
            let ms = self.step_ms(&work, lora_loads);
            if self.cfg.time_scale > 0.0 {
                clock += Duration::from_secs_f64(ms * self.cfg.time_scale / 1000.0);
                let now = Instant::now();
                if clock > now {
                    tokio::time::sleep_until(clock.into()).await;
                } else {
                    clock = now;
                    tokio::task::yield_now().await;
                }
            } else {
                tokio::task::yield_now().await;
            }
            self.apply(&work);
            self.publish_gauges();
            self.flush_events();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(sub) => {
                let mut tokens = Vec::with_capacity(sub.prompt.len() + sub.max_tokens);
                tokens.extend_from_slice(&sub.prompt);
                // Same seed and prompt, same answer (as with greedy sampling).
                let prompt_bytes: Vec<u8> = sub.prompt.iter().flat_map(|t| t.to_le_bytes()).collect();
                let seed = self.cfg.seed ^ xxhash_rust::xxh3::xxh3_64(&prompt_bytes);
                self.waiting.push_back(Seq {
                    prompt_len: tokens.len(),
                    tokens,
                    sub: *sub,
                    output: 0,
                    computed: 0,
                    blocks: Vec::new(),
                    hashes: Vec::new(),
                    committed: 0,
                    cached_tokens: 0,
                    admitted: false,
                    scheduled_at: None,
                    first_token_at: None,
                    last_token_at: None,
                    rng: fastrand::Rng::with_seed(seed),
                });
            }
            Command::ResetPrefixCache(reply) => {
                self.pool.clear();
                self.flush_events();
                let _ = reply.send(true);
            }
        }
    }

    /// Aborts requests whose client has gone away.
    fn drop_abandoned(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].sub.events.is_closed() {
                let seq = self.running.remove(i);
                self.finish(seq, FinishReason::Abort, None);
            } else {
                i += 1;
            }
        }
        let mut j = 0;
        while j < self.waiting.len() {
            if self.waiting[j].sub.events.is_closed() {
                if let Some(seq) = self.waiting.remove(j) {
                    self.finish(seq, FinishReason::Abort, None);
                }
            } else {
                j += 1;
            }
        }
    }

    fn lora_of(seq: &Seq) -> Option<&str> {
        seq.sub.lora.as_deref()
    }

    /// Decides this step's work: one entry per running request (after admissions), and how
    /// many LoRA adapters had to be loaded.
    fn schedule(&mut self) -> (Vec<Work>, usize) {
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut work: Vec<Work> = Vec::with_capacity(self.running.len() + 4);
        // 1. Running requests, oldest first.
        let mut i = 0;
        while i < self.running.len() {
            let want = self.running[i].wants_tokens().min(budget);
            if want == 0 {
                work.push(Work { tokens: 0, transfer: false });
                i += 1;
                continue;
            }
            let need = (self.running[i].computed + want).div_ceil(bs).saturating_sub(self.running[i].blocks.len());
            if !self.make_room(need, i, &mut work) {
                // `i` itself was preempted: the request now at `i` (if any) is the next one.
                continue;
            }
            for _ in 0..need {
                let b = self.pool.allocate().expect("make_room freed enough blocks");
                self.running[i].blocks.push(b);
            }
            budget -= want;
            work.push(Work { tokens: want, transfer: false });
            i += 1;
        }
        // 2. Waiting requests, in order, while there is room.
        let mut lora_loads = 0;
        let mut skipped = VecDeque::new();
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            if let Some(adapter) = Self::lora_of(&seq).map(str::to_owned) {
                match self.lora_slot(&adapter) {
                    Some(loaded) => lora_loads += usize::from(loaded),
                    None => {
                        skipped.push_back(seq);
                        continue;
                    }
                }
            }
            let transfer = seq.sub.handoff == Handoff::Decode;
            let fresh = seq.blocks.is_empty() && seq.computed == 0;
            if fresh {
                extend_hashes(bs, &mut seq);
                let max_hit = (seq.tokens.len().saturating_sub(1)) / bs;
                let hits = self.pool.lookup(&seq.hashes[..seq.hashes.len().min(max_hit)]);
                for &b in &hits {
                    self.pool.acquire(b);
                }
                seq.computed = hits.len() * bs;
                seq.committed = hits.len();
                seq.blocks = hits;
            }
            let want = if transfer {
                // Loaded KV does not compete for the compute budget; only the last token is computed.
                seq.wants_tokens()
            } else {
                seq.wants_tokens().min(budget)
            };
            let need = (seq.computed + want).div_ceil(bs).saturating_sub(seq.blocks.len());
            if self.pool.num_free() < need {
                // Not enough memory now: undo the cache pins and wait for blocks to free up.
                self.pool.release(&seq.blocks);
                seq.blocks.clear();
                seq.computed = 0;
                seq.committed = 0;
                self.waiting.push_front(seq);
                break;
            }
            for _ in 0..need {
                let b = self.pool.allocate().expect("checked free blocks");
                seq.blocks.push(b);
            }
            if !seq.admitted {
                seq.admitted = true;
                seq.cached_tokens = seq.computed;
                seq.scheduled_at = Some(Instant::now());
                let l = [self.rank_label.as_str(), self.cfg.model_name.as_str()];
                self.metrics.prefix_queries.with_label_values(&l).inc_by(seq.tokens.len() as u64);
                self.metrics.prefix_hits.with_label_values(&l).inc_by(seq.computed as u64);
                let queued = seq.scheduled_at.unwrap_or(seq.sub.arrival) - seq.sub.arrival;
                self.metrics.queue_time.with_label_values(&l).observe(queued.as_secs_f64());
            }
            if !transfer {
                budget -= want;
            }
            work.push(Work { tokens: want, transfer });
            self.running.push(seq);
        }
        while let Some(s) = skipped.pop_back() {
            self.waiting.push_front(s);
        }
        (work, lora_loads)
    }

    /// Frees `need` blocks for running request `me`, preempting from the back of the batch.
    /// Returns false if `me` itself had to be preempted.
    fn make_room(&mut self, need: usize, me: usize, work: &mut Vec<Work>) -> bool {
        while self.pool.num_free() < need {
            let Some(victim) = self.running.pop() else { return false };
            let victim_index = self.running.len();
            if victim_index < work.len() {
                work.truncate(victim_index);
            }
            self.preempt(victim);
            if victim_index == me {
                return false;
            }
        }
        true
    }

    fn preempt(&mut self, mut seq: Seq) {
        self.pool.release(&seq.blocks);
        seq.blocks.clear();
        seq.computed = 0;
        seq.committed = 0;
        let l = [self.rank_label.as_str(), self.cfg.model_name.as_str()];
        self.metrics.preemptions.with_label_values(&l).inc();
        self.waiting.push_front(seq);
    }

    /// A resident slot for `adapter`: `Some(true)` if it had to be loaded now, `None` if every
    /// slot holds an adapter that running requests use.
    fn lora_slot(&mut self, adapter: &str) -> Option<bool> {
        if let Some(pos) = self.lora_active.iter().position(|a| a == adapter) {
            let a = self.lora_active.remove(pos);
            self.lora_active.push(a);
            return Some(false);
        }
        if self.lora_active.len() < self.cfg.max_loras.max(1) {
            self.lora_active.push(adapter.to_owned());
            return Some(true);
        }
        let in_use = |a: &String| self.running.iter().any(|s| s.sub.lora.as_ref() == Some(a));
        let pos = self.lora_active.iter().position(|a| !in_use(a))?;
        self.lora_active.remove(pos);
        self.lora_active.push(adapter.to_owned());
        Some(true)
    }

    fn step_ms(&self, work: &[Work], lora_loads: usize) -> f64 {
        let l = &self.cfg.latency;
        let mut ms = l.step_overhead_ms + lora_loads as f64 * l.lora_load_ms;
        for w in work.iter().filter(|w| w.tokens > 0) {
            ms += l.decode_ms_per_seq;
            ms += w.tokens as f64 * if w.transfer { l.kv_transfer_ms_per_token } else { l.prefill_ms_per_token };
        }
        ms
    }

    /// Applies a step: KV computed, blocks committed, tokens sampled, requests finished.
    fn apply(&mut self, work: &[Work]) {
        let bs = self.cfg.block_size;
        let now = Instant::now();
        let l = [self.rank_label.clone(), self.cfg.model_name.clone()];
        let step_tokens: usize = work.iter().map(|w| w.tokens).sum();
        if step_tokens > 0 {
            self.metrics.detail.iteration_tokens.with_label_values(&l).observe(step_tokens as f64);
        }
        let mut finished = Vec::new();
        for (i, w) in work.iter().enumerate() {
            if w.tokens == 0 || i >= self.running.len() {
                continue;
            }
            let seq = &mut self.running[i];
            seq.computed += w.tokens;
            if w.transfer {
                // The loaded prompt counts as cached, as vLLM reports it on the decode side.
                seq.cached_tokens = seq.cached_tokens.max(seq.prompt_len.saturating_sub(1));
            }
            // Commit blocks that are now full.
            extend_hashes(bs, seq);
            let full = (seq.computed / bs).min(seq.hashes.len());
            while seq.committed < full {
                let j = seq.committed;
                let parent = j.checked_sub(1).map(|p| seq.hashes[p]);
                let tokens = &seq.tokens[j * bs..(j + 1) * bs];
                let salt = if j == 0 { seq.sub.cache_salt.as_deref() } else { None };
                self.pool.commit(seq.blocks[j], seq.hashes[j], parent, tokens, seq.sub.lora.as_deref(), salt);
                seq.committed += 1;
            }
            if seq.computed == seq.tokens.len() {
                // Sample the next token.
                let token = seq.rng.u32(..self.cfg.vocab.max(1));
                if seq.output == 0 {
                    seq.first_token_at = Some(now);
                    self.metrics.ttft.with_label_values(&l).observe((now - seq.sub.arrival).as_secs_f64());
                    self.metrics.prompt_tokens.with_label_values(&l).inc_by(seq.prompt_len as u64);
                } else if let Some(prev) = seq.last_token_at {
                    self.metrics.itl.with_label_values(&l).observe((now - prev).as_secs_f64());
                }
                seq.last_token_at = Some(now);
                seq.tokens.push(token);
                seq.output += 1;
                self.metrics.generation_tokens.with_label_values(&l).inc();
                let prefill_leg = seq.sub.handoff == Handoff::Prefill;
                let stopped = seq.sub.stop.as_mut().is_some_and(|w| w.hit(token));
                if stopped {
                    finished.push((i, token, FinishReason::Stop));
                } else if seq.output >= seq.sub.max_tokens || prefill_leg {
                    let reason = if prefill_leg { FinishReason::Length } else { seq.sub.finish_at_max };
                    finished.push((i, token, reason));
                } else {
                    let _ = seq.sub.events.send(Event { token: Some(token), done: None });
                }
            }
        }
        for &(i, token, reason) in finished.iter().rev() {
            let seq = self.running.remove(i);
            self.finish(seq, reason, Some(token));
        }
    }

    fn finish(&mut self, seq: Seq, reason: FinishReason, last_token: Option<u32>) {
        let l = [self.rank_label.as_str(), self.cfg.model_name.as_str()];
        self.metrics.request_success.with_label_values(&[l[0], reason.as_str(), l[1]]).inc();
        let leg = match seq.sub.handoff {
            Handoff::Prefill => Some("prefill"),
            Handoff::Decode => Some("decode"),
            Handoff::None => None,
        };
        if let Some(leg) = leg.filter(|_| reason != FinishReason::Abort) {
            self.metrics.handoffs.with_label_values(&[l[0], l[1], leg]).inc();
        }
        if reason != FinishReason::Abort {
            self.metrics.e2e.with_label_values(&l).observe(seq.sub.arrival.elapsed().as_secs_f64());
            let started = seq.scheduled_at.unwrap_or(seq.sub.arrival);
            let first = seq.first_token_at.unwrap_or(started);
            let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
            let now = Instant::now();
            let times = [secs(started, first), secs(first, now), secs(started, now)];
            self.metrics.detail.finished(&l, seq.prompt_len, seq.output, seq.sub.max_tokens, times);
        }
        let kv_transfer_params = (seq.sub.handoff == Handoff::Prefill && reason != FinishReason::Abort).then(|| {
            json!({
                "do_remote_prefill": true,
                "do_remote_decode": false,
                "remote_block_ids": seq.blocks,
                "remote_engine_id": self.cfg.engine_id,
                "remote_request_id": seq.sub.id,
                "remote_host": self.cfg.side_channel.0,
                "remote_port": self.cfg.side_channel.1,
                "tp_size": 1,
            })
        });
        self.pool.release(&seq.blocks);
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        let done = Done {
            reason,
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.output,
            cached_tokens: seq.cached_tokens,
            kv_transfer_params,
        };
        let _ = seq.sub.events.send(Event { token: last_token, done: Some(done) });
    }

    fn publish_gauges(&mut self) {
        let l = [self.rank_label.as_str(), self.cfg.model_name.as_str()];
        self.metrics.running.with_label_values(&l).set(self.running.len() as i64);
        self.metrics.waiting.with_label_values(&l).set(self.waiting.len() as i64);
        self.metrics.kv_usage.with_label_values(&l).set(self.pool.usage());
        self.publish_lora();
    }

    /// `vllm:lora_requests_info`: a new series (value = now) whenever the adapter sets change.
    fn publish_lora(&mut self) {
        if self.cfg.max_loras == 0 {
            return;
        }
        let names = |seqs: &mut dyn Iterator<Item = &Seq>| {
            let mut v: Vec<&str> = seqs.filter_map(Self::lora_of).collect();
            v.sort_unstable();
            v.dedup();
            v.join(",")
        };
        let running = names(&mut self.running.iter());
        let waiting = names(&mut self.waiting.iter());
        if (running.as_str(), waiting.as_str()) == (self.lora_labels.0.as_str(), self.lora_labels.1.as_str()) {
            return;
        }
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.metrics.lora_info.with_label_values(&[&self.cfg.max_loras.to_string(), &running, &waiting]).set(ts);
        self.lora_labels = (running, waiting);
    }

    fn flush_events(&mut self) {
        let events = self.pool.take_events();
        if let (Some(tx), false) = (&self.kv_events, events.is_empty()) {
            let _ = tx.send(events);
        }
    }
}

/// Extends `seq.hashes` over every full block of its tokens.
fn extend_hashes(bs: usize, seq: &mut Seq) {
    while (seq.hashes.len() + 1) * bs <= seq.tokens.len() {
        let j = seq.hashes.len();
        let salt = if j == 0 { seq.sub.cache_salt.as_deref() } else { None };
        let h =
            block_hash(seq.hashes.last().copied(), &seq.tokens[j * bs..(j + 1) * bs], seq.sub.lora.as_deref(), salt);
        seq.hashes.push(h);
    }
}

#[cfg(test)]
mod tests;
