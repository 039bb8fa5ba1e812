//! Per-pool planning: a parsed request and a pool's snapshot → prompt hashes → prefix matches →
//! scheduler → a [`Planned`] decision; the prefix index learns what was picked. Everything a
//! front-end's request needs decided, and nothing that talks to the outside world.

use crate::routing::endpoint::{Endpoint, EndpointId};
use crate::routing::prefix::{BlockHasher, PrefixConfig, PrefixIndex, PromptHashes};
use crate::routing::request::ParsedRequest;
use crate::routing::schedule::{Decision, Explanation, Input, NoDecision, SchedRequest, Scheduler, Subset, Target};

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

/// One pool's decision state: its scheduler and prefix index.
#[derive(Debug)]
pub struct Planner {
    models: Vec<String>,
    scheduler: Scheduler,
    index: PrefixIndex,
    stale_after_ms: u64,
}

impl Planner {
    /// A planner for a pool serving `models`; scraped metrics older than `stale_after_ms` are
    /// unknown to its scheduler.
    pub fn new(models: Vec<String>, scheduler: Scheduler, stale_after_ms: u64) -> Self {
        let index = PrefixIndex::new(scheduler.prefix_config().index_capacity);
        Self { models, scheduler, index, stale_after_ms }
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
        let input = Input {
            request: SchedRequest {
                model: &req.model,
                prompt_tokens: prompt.prompt_tokens() as u64,
                total_blocks: prompt.hashes.len(),
                block_tokens: cfg.block_tokens() as u64,
                priority: req.priority,
                subset: opts.subset,
                disaggregate: opts.disaggregate,
            },
            endpoints: snapshot,
            prefix_blocks: &blocks,
            pool_models: &self.models,
            now_ms: opts.now_ms,
            stale_after_ms: self.stale_after_ms,
        };
        let dry_run = explain.is_some();
        let decision = self.scheduler.schedule(&input, rng, opts.want, explain)?;
        let primary = decision.primary();
        if !dry_run {
            // The prefill side learns the prompt when its leg succeeds: `Routed::prefilled`.
            self.index.record(primary.id, &prompt.hashes);
        }
        let tokens = prompt.prompt_tokens() as u64;
        let uncached = |t: &Target| tokens.saturating_sub(u64::from(t.matched_blocks) * cfg.block_tokens() as u64);
        Ok(Planned {
            uncached_tokens: uncached(primary),
            prefill_uncached_tokens: decision.prefill.as_ref().map(uncached),
            decision,
            prompt,
        })
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
        PlanOptions { subset: None, want: 1, now_ms: 0, disaggregate: true }
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
