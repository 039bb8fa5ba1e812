//! Per-pool planning: a parsed request and a pool's snapshot → prompt hashes → prefix matches →
//! scheduler → a [`Planned`] decision; the prefix index learns what was picked. Everything a
//! front-end's request needs decided, and nothing that talks to the outside world.

use crate::routing::endpoint::{Endpoint, EndpointId};
use crate::routing::prefix::precise::{PreciseIndex, ViewStatus, request_keys};
use crate::routing::prefix::{BlockHasher, BytesPerToken, PrefixConfig, PrefixIndex, PromptHashes};
use crate::routing::request::{ParsedRequest, TokenSource};
use crate::routing::schedule::{
    Decision, Explanation, Input, NoDecision, PrefixSource, SchedRequest, Scheduler, Subset, Target,
};
use crate::routing::tokenize::{ChatPrompt, PromptTokenizer};

/// The per-request options of a decision.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions<'a> {
    /// The gateway's subset hint.
    pub subset: Option<&'a Subset>,
    /// Ordered endpoints wanted (target + fallbacks).
    pub want: usize,
    /// Now, in monotonic milliseconds.
    pub now_ms: u64,
    /// The request may be split into prefill and decode legs (P/D pools).
    pub disaggregate: bool,
    /// The LoRA adapter the request names, when its `model` is one (precise keys include it).
    pub lora: Option<&'a str>,
    /// Flow control's gate, by endpoint index: only these may be picked (`None`: any).
    pub open: Option<&'a [bool]>,
}

/// A pool-level decision and what it was made from.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The decision.
    pub decision: Decision,
    /// The prompt's block hashes.
    pub prompt: PromptHashes,
    /// Estimated prompt tokens not cached on the target.
    pub uncached_tokens: u64,
    /// Estimated prompt tokens not cached on the prefill endpoint (P/D decisions).
    pub prefill_uncached_tokens: Option<u64>,
    /// The target's view is precise and the request will store at least one block there: its
    /// events should follow the answer.
    pub expects_events: bool,
    /// Estimated prompt tokens (exact in a precise pool when the prompt was tokenized).
    pub prompt_tokens: u64,
    /// Tokens per matched unit of `Target::matched_blocks` (1 where matches are in tokens).
    pub block_tokens: u64,
    /// Per target (same order as the decision's), whether its match came from its KV events.
    pub precise_targets: Vec<bool>,
}

impl Planned {
    /// Estimated prompt tokens the serving endpoint computes: none when a prefill endpoint
    /// computes them (the decode side of a hand-off loads the prompt's KV).
    pub fn target_tokens(&self) -> u64 {
        if self.decision.prefill.is_some() { 0 } else { self.uncached_tokens }
    }
}

/// Candidates to ask a decision for when `places` distinct servers are wanted (fallback list
/// entries, retry attempts): ranks that share a server take one place, so a few spares keep
/// them from crowding other servers out. One place needs no spares.
pub fn candidates_for(places: usize) -> usize {
    if places > 1 { places * 4 } else { 1 }
}

/// Endpoints a decision lists for Envoy (the destination header) and for a `Pick` that does
/// not say: the pool's picker's `maxNumOfEndpoints` (`pool`), capped by the server's
/// `extproc.max_endpoints` (`server`); either alone decides; 1 when neither is set.
pub fn endpoints_listed(pool: Option<usize>, server: Option<usize>) -> usize {
    match (pool, server) {
        (Some(p), Some(s)) => p.min(s),
        (Some(n), None) | (None, Some(n)) => n,
        (None, None) => 1,
    }
    .max(1)
}

/// Bodies longer than this are not tokenized (matched approximately).
pub const MAX_TOKENIZED_BYTES: usize = 1 << 20;

/// A pool's precise prefix state: its model's tokenizer, and the index the endpoints' KV
/// events feed.
#[derive(Debug)]
pub struct PrecisePrefix {
    tokenizer: PromptTokenizer,
    index: PreciseIndex,
    stale_after_ms: u64,
    block_size: u32,
}

impl PrecisePrefix {
    /// Precise prefix state with `tokenizer`; an endpoint whose answered requests have waited
    /// more than `stale_after_ms` for their events is matched approximately, and one whose
    /// events have not said its block size is taken to have `block_size`.
    pub fn new(tokenizer: PromptTokenizer, index: PreciseIndex, stale_after_ms: u64, block_size: u32) -> Self {
        Self { tokenizer, index, stale_after_ms, block_size: block_size.max(1) }
    }

    /// The index.
    pub fn index(&self) -> &PreciseIndex {
        &self.index
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    /// The stale time, ms.
    pub fn stale_after_ms(&self) -> u64 {
        self.stale_after_ms
    }

    /// The request's prompt in the model's tokens, when kvgate can tell them.
    pub fn tokens(&self, req: &ParsedRequest<'_>) -> Option<Vec<u32>> {
        // Tokenizing runs on the request's thread: a body past the bound (first sight costs
        // about 0.3 ms per KiB) is matched approximately instead of stalling other requests.
        if req.changes_tokenization() || req.body_len() > MAX_TOKENIZED_BYTES {
            return None;
        }
        match req.token_source() {
            TokenSource::Ids(ids) => Some(ids.to_vec()),
            TokenSource::Text(t) => self.tokenizer.encode_completion(&t).ok(),
            TokenSource::Chat(body) if self.tokenizer.has_chat_template() => {
                self.tokenizer.encode_chat(&ChatPrompt::of_request(&body)).ok()
            }
            TokenSource::Chat(_) | TokenSource::Unsupported => None,
        }
    }

    /// Whether `status` is exact at `now_ms`.
    pub fn is_precise(&self, status: Option<&ViewStatus>, now_ms: u64) -> bool {
        status.is_some_and(|s| s.precise(now_ms, self.stale_after_ms))
    }
}

/// Per endpoint, how many leading prompt tokens it holds, and by which index.
struct TokenMatch {
    tokens: Vec<u32>,
    sources: Vec<PrefixSource>,
    /// The block size of each precise endpoint (0 for approximate ones).
    block_sizes: Vec<u32>,
    /// Tokens the match looked at, per block size (a longer prompt's tail is not matched).
    window: Vec<u64>,
    /// The prompt's keys per block size.
    keys: Vec<(u32, Vec<u64>)>,
    prompt_tokens: u64,
}

/// One pool's decision state: its scheduler and prefix indexes.
#[derive(Debug)]
pub struct Planner {
    models: Vec<String>,
    scheduler: Scheduler,
    index: PrefixIndex,
    precise: Option<PrecisePrefix>,
    stale_after_ms: u64,
    bytes_per_token: BytesPerToken,
}

impl Planner {
    /// A planner for a pool serving `models`; scraped metrics older than `stale_after_ms` are
    /// unknown to its scheduler.
    pub fn new(models: Vec<String>, scheduler: Scheduler, stale_after_ms: u64) -> Self {
        let index = PrefixIndex::new(scheduler.prefix_config().index_capacity);
        Self { models, scheduler, index, precise: None, stale_after_ms, bytes_per_token: BytesPerToken::default() }
    }

    /// The pool's bytes of prompt per token, learned from responses.
    pub fn bytes_per_token(&self) -> &BytesPerToken {
        &self.bytes_per_token
    }

    /// The same planner, matching precisely where the endpoints' KV events allow.
    pub fn with_precise(mut self, precise: PrecisePrefix) -> Self {
        self.precise = Some(precise);
        self
    }

    /// The precise prefix state, for pools that follow KV events.
    pub fn precise(&self) -> Option<&PrecisePrefix> {
        self.precise.as_ref()
    }

    /// The models the pool serves.
    pub fn models(&self) -> &[String] {
        &self.models
    }

    /// The pool's prefix index.
    pub fn index(&self) -> &PrefixIndex {
        &self.index
    }

    /// The pool's scheduler.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Hashing parameters.
    pub fn prefix_config(&self) -> &PrefixConfig {
        self.scheduler.prefix_config()
    }

    /// Whether the pool splits requests into prefill and decode legs.
    pub fn disaggregates(&self) -> bool {
        self.scheduler.disagg().is_some()
    }

    /// Scraped metrics older than this are unknown.
    pub fn stale_after_ms(&self) -> u64 {
        self.stale_after_ms
    }

    /// Decides where a parsed request goes over `snapshot`, and records the prompt on the
    /// chosen (decode) endpoint. With `explain`, a dry run: nothing is recorded.
    pub fn plan(
        &self,
        req: &ParsedRequest<'_>,
        snapshot: &[Endpoint],
        opts: PlanOptions<'_>,
        rng: &mut fastrand::Rng,
        explain: Option<&mut Explanation>,
    ) -> Result<Planned, NoDecision> {
        let cfg = self.prefix_config();
        let mut hasher = BlockHasher::new(cfg, &req.model, req.cache_salt.as_deref());
        req.feed_prompt(&mut |b| hasher.update(b));
        let prompt = hasher.finish();

        let ids: Vec<EndpointId> = snapshot.iter().map(|e| e.id).collect();
        let mut blocks = Vec::with_capacity(ids.len());
        self.index.match_into(&ids, &prompt.hashes, &mut blocks);
        let exact = self.precise.as_ref().and_then(|p| self.match_precisely(p, req, &ids, &blocks, &prompt, opts));
        // Precise pools count in tokens (blocks of one token); the approximate index in its blocks.
        let (prompt_tokens, total_blocks, block_tokens) = match &exact {
            Some(m) => (m.prompt_tokens, m.prompt_tokens as usize, 1),
            None => {
                let bpt = self.bytes_per_token.get();
                (prompt.prompt_tokens_at(bpt), prompt.hashes.len(), cfg.block_tokens_at(bpt))
            }
        };
        let input = Input {
            request: SchedRequest {
                model: &req.model,
                prompt_tokens,
                total_blocks,
                block_tokens,
                priority: req.priority,
                subset: opts.subset,
                open: opts.open,
                disaggregate: opts.disaggregate,
            },
            endpoints: snapshot,
            prefix_blocks: exact.as_ref().map_or(&blocks, |m| &m.tokens),
            pool_models: &self.models,
            now_ms: opts.now_ms,
            stale_after_ms: self.stale_after_ms,
        };
        let dry_run = explain.is_some();
        let mut explain = explain;
        let decision = self.scheduler.schedule(&input, rng, opts.want, explain.as_deref_mut())?;
        if let (Some(x), Some(m)) = (explain, &exact) {
            x.set_sources(&m.sources);
        }
        let primary = decision.primary();
        if !dry_run {
            // The prefill side learns the prompt when its leg succeeds: `Routed::prefilled`.
            self.index.record(primary.id, &prompt.hashes);
            // A precise target holds the prompt as soon as it is computed; until its events
            // can say so, what was sent counts (the next request of a burst finds it).
            if let (Some(p), Some(m)) = (&self.precise, &exact)
                && m.sources[primary.index] == PrefixSource::Precise
                && let Some((_, keys)) = m.keys.iter().find(|(bs, _)| *bs == m.block_sizes[primary.index])
            {
                p.index.record_pending(primary.id, keys, opts.now_ms, p.stale_after_ms);
            }
        }
        let uncached = |t: &Target| prompt_tokens.saturating_sub(u64::from(t.matched_blocks) * block_tokens);
        let expects_events = exact.as_ref().is_some_and(|m| {
            let bs = u64::from(m.block_sizes[primary.index]);
            m.sources[primary.index] == PrefixSource::Precise
                && bs > 0
                && uncached(primary) >= bs
                && u64::from(primary.matched_blocks) < m.window[primary.index]
        }) && decision.prefill.is_none();
        let precise_targets = decision
            .targets
            .iter()
            .map(|t| exact.as_ref().is_some_and(|m| m.sources[t.index] == PrefixSource::Precise))
            .collect();
        Ok(Planned {
            uncached_tokens: uncached(primary),
            prefill_uncached_tokens: decision.prefill.as_ref().map(uncached),
            expects_events,
            prompt_tokens,
            block_tokens,
            precise_targets,
            decision,
            prompt,
        })
    }

    /// Token-level matches for a precise pool: exact for endpoints whose view is precise, the
    /// approximate index's blocks turned into tokens for the rest. `None` when the prompt
    /// cannot be tokenized (the pool then matches approximately throughout).
    fn match_precisely(
        &self,
        p: &PrecisePrefix,
        req: &ParsedRequest<'_>,
        ids: &[EndpointId],
        approx_blocks: &[u32],
        prompt: &PromptHashes,
        opts: PlanOptions<'_>,
    ) -> Option<TokenMatch> {
        let tokens = p.tokens(req)?;
        let n = tokens.len() as u64;
        let cfg = self.prefix_config();
        let statuses = p.index.statuses(ids);
        let precise: Vec<bool> = statuses.iter().map(|s| p.is_precise(s.as_ref(), opts.now_ms)).collect();
        let size_of = |s: &Option<ViewStatus>| s.and_then(|s| s.block_size).unwrap_or(p.block_size);
        let mut sizes: Vec<u32> = statuses.iter().zip(&precise).filter(|(_, p)| **p).map(|(s, _)| size_of(s)).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let mut m = TokenMatch {
            tokens: vec![0; ids.len()],
            sources: vec![PrefixSource::Approximate; ids.len()],
            block_sizes: vec![0; ids.len()],
            window: vec![0; ids.len()],
            keys: Vec::new(),
            prompt_tokens: n,
        };
        // The approximate index's bytes, in this prompt's tokens per byte.
        let bytes = prompt.prompt_bytes.max(1) as u64;
        for (i, &b) in approx_blocks.iter().enumerate() {
            m.tokens[i] = (u64::from(b) * cfg.block_bytes as u64 * n / bytes).min(n) as u32;
        }
        let max_tokens = cfg.max_blocks.saturating_mul(cfg.block_tokens());
        let mut out = Vec::new();
        for bs in sizes {
            let keys = request_keys(&tokens, bs, opts.lora, req.cache_salt.as_deref(), max_tokens / bs.max(1) as usize);
            let these: Vec<Option<EndpointId>> = ids
                .iter()
                .zip(&statuses)
                .zip(&precise)
                .map(|((id, s), &p)| (p && size_of(s) == bs).then_some(*id))
                .collect();
            p.index.match_into(&these, &keys, &mut out);
            for (i, id) in these.iter().enumerate() {
                if id.is_some() {
                    m.tokens[i] = out[i] * bs;
                    m.sources[i] = PrefixSource::Precise;
                    m.block_sizes[i] = bs;
                    m.window[i] = keys.len() as u64 * u64::from(bs);
                }
            }
            m.keys.push((bs, keys));
        }
        Some(m)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::routing::request::{self, ApiKind};

    fn pool() -> (Planner, Vec<Endpoint>) {
        let planner = Planner::new(vec!["m".into()], Scheduler::default_config(), 2000);
        let eps = (0..4)
            .map(|i| {
                let addr = format!("127.0.0.1:{}", 8000 + i).parse().expect("addr");
                Endpoint::new(EndpointId::new(i), addr, BTreeMap::new())
            })
            .collect();
        (planner, eps)
    }

    fn chat(system: &str, turns: &[&str]) -> String {
        let mut msgs = vec![json!({"role": "system", "content": system})];
        for (i, t) in turns.iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            msgs.push(json!({"role": role, "content": t}));
        }
        json!({"model": "m", "messages": msgs}).to_string()
    }

    fn opts() -> PlanOptions<'static> {
        PlanOptions { subset: None, want: 1, now_ms: 0, disaggregate: true, lora: None, open: None }
    }

    fn plan(
        planner: &Planner,
        eps: &[Endpoint],
        body: &str,
        rng: &mut fastrand::Rng,
        explain: Option<&mut Explanation>,
    ) -> Planned {
        let req = request::parse(ApiKind::ChatCompletions, body.as_bytes(), 1 << 20).expect("parses");
        planner.plan(&req, eps, opts(), rng, explain).expect("planned")
    }

    #[test]
    fn endpoints_listed_takes_the_smaller_setting() {
        let check = |pool, server, want| assert_eq!(endpoints_listed(pool, server), want, "{pool:?} {server:?}");
        check(None, None, 1);
        check(Some(3), None, 3);
        check(None, Some(2), 2);
        check(Some(3), Some(2), 2);
        check(Some(2), Some(4), 2);
    }

    #[test]
    fn conversations_stick_and_strangers_spread() {
        let (planner, eps) = pool();
        let mut rng = fastrand::Rng::with_seed(5);
        let long = "You are a careful assistant. ".repeat(100);
        let mut first = None;
        let mut turns = vec![];
        for i in 0..6 {
            turns.push(format!("question number {i} with some padding to make it longer"));
            let body = chat(&long, &turns.iter().map(String::as_str).collect::<Vec<_>>());
            let d = plan(&planner, &eps, &body, &mut rng, None).decision;
            let target = d.primary().id;
            assert_eq!(*first.get_or_insert(target), target, "turn {i} moved");
            if i > 0 {
                assert!(d.primary().matched_blocks > 0, "turn {i} matched nothing");
            }
            turns.push("an answer".to_owned());
        }
        // Unrelated prompts rotate over all four endpoints.
        let mut seen = std::collections::HashSet::new();
        for i in 0..4 {
            let body = chat(&format!("{i} unrelated system prompt ").repeat(50), &["hi"]);
            let d = plan(&planner, &eps, &body, &mut rng, None).decision;
            assert!(d.cold);
            seen.insert(d.primary().id);
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn explain_is_a_dry_run() {
        let (planner, eps) = pool();
        let mut rng = fastrand::Rng::with_seed(1);
        let body = chat(&"shared ".repeat(200), &["q"]);
        let mut x = Explanation::default();
        plan(&planner, &eps, &body, &mut rng, Some(&mut x));
        assert_eq!(x.endpoints.len(), 4);
        assert_eq!(planner.index().stats().resident_blocks, 0, "explain recorded blocks");
        let p = plan(&planner, &eps, &body, &mut rng, None);
        assert_eq!(planner.index().stats().resident_blocks, p.prompt.hashes.len());
    }

    #[test]
    fn candidates_leave_room_for_ranks() {
        assert_eq!(candidates_for(1), 1);
        assert_eq!(candidates_for(3), 12);
    }
}
