//! The one decision path: request body → parse → pool by model → prefix hashes → prefix
//! matches → scheduler → decision; the prefix index learns the pick and the target's in-flight
//! count goes up until the request ends. Both front-ends (Envoy ext_proc and the proxy) call
//! [`Gateway::decide`]; neither has scheduling logic of its own.

use std::sync::Arc;

use serde_json::json;

use crate::endpoint::{Endpoint, EndpointId, InFlightGuard};
use crate::pool::{Pool, Snapshot, now_ms};
use crate::prefix::{BlockHasher, PrefixConfig, PrefixIndex, PromptHashes};
use crate::request::{self, ApiKind, ParsedRequest, RequestError};
use crate::schedule::{Decision, DecisionKind, Explanation, Input, NoDecision, SchedRequest, Scheduler, Subset};
use crate::telemetry::Telemetry;

/// Why a request was not routed. [`RouteError::status`] is the one place these become HTTP
/// statuses, for both front-ends.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The body is not a routable OpenAI request.
    #[error(transparent)]
    BadRequest(#[from] RequestError),
    /// No pool serves the model.
    #[error("model `{model}` is not served here; served models: {}", served.join(", "))]
    UnknownModel {
        /// The requested model.
        model: String,
        /// Every model that is served.
        served: Vec<String>,
    },
    /// The pool has no endpoint that can take the request.
    #[error("{0}")]
    Unavailable(#[from] NoDecision),
    /// The pool is over its admission limits (or near them, for a sheddable request).
    #[error("pool `{pool}` is saturated: {reason}")]
    Saturated {
        /// The pool.
        pool: String,
        /// Which limit.
        reason: String,
        /// The request was sheddable (negative priority) and shed early.
        shed: bool,
    },
}

impl RouteError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(e) => e.status(),
            Self::UnknownModel { .. } => 404,
            Self::Unavailable(_) => 503,
            Self::Saturated { .. } => 429,
        }
    }

    /// Short machine-readable reason (OpenAI `code`, and the `x-llm-d-request-dropped-reason`
    /// header of ext_proc).
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(e) => e.code(),
            Self::UnknownModel { .. } => "model_not_found",
            Self::Unavailable(NoDecision::SubsetUnmatched) => "subset_unmatched",
            Self::Unavailable(NoDecision::NoHealthyEndpoints) => "no_healthy_endpoints",
            Self::Unavailable(_) => "no_endpoints",
            Self::Saturated { shed: true, .. } => "shed",
            Self::Saturated { shed: false, .. } => "saturated",
        }
    }

    /// OpenAI-shaped error body.
    pub fn to_json(&self) -> String {
        let param = match self {
            Self::BadRequest(e) => e.param().map(str::to_owned),
            Self::UnknownModel { .. } => Some("model".to_owned()),
            Self::Unavailable(_) | Self::Saturated { .. } => None,
        };
        error_body(self.status(), &self.to_string(), self.code(), param.as_deref())
    }
}

/// An OpenAI-shaped error body: `{"error":{"message","type","param","code"}}`.
pub fn error_body(status: u16, message: &str, code: &str, param: Option<&str>) -> String {
    let kind = match status {
        400 | 413 => "invalid_request_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "service_unavailable",
        _ => "server_error",
    };
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}}).to_string()
}

/// The per-request options of a decision.
#[derive(Debug, Clone, Copy)]
pub struct RouteOptions<'a> {
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

/// A pool's admission limits: beyond them requests get 429 before any endpoint is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admission {
    /// kvgate's requests in flight to the pool at most.
    pub max_in_flight: Option<u64>,
    /// Requests waiting in the pool's endpoint queues (scraped) at most.
    pub max_queued: Option<u64>,
    /// Sheddable requests (negative `priority`) are refused this fraction below the limits
    /// (default 0.2), so they go first when the pool fills up.
    pub sheddable_headroom: Option<f64>,
}

impl Admission {
    /// Whether a request of `priority` may enter a pool in the state `snapshot` shows.
    fn admit(
        &self,
        pool: &str,
        snapshot: &[Endpoint],
        priority: i64,
        now: u64,
        stale_ms: u64,
    ) -> Result<(), RouteError> {
        let shed = priority < 0;
        let factor = if shed { 1.0 - self.sheddable_headroom.unwrap_or(0.2).clamp(0.0, 1.0) } else { 1.0 };
        let over = |value: u64, limit: u64| value as f64 >= limit as f64 * factor;
        if let Some(max) = self.max_in_flight {
            let n: u64 = snapshot.iter().map(|e| e.in_flight.requests()).sum();
            if over(n, max) {
                let reason = format!("{n} requests in flight, limit {max}");
                return Err(RouteError::Saturated { pool: pool.to_owned(), reason, shed });
            }
        }
        if let Some(max) = self.max_queued {
            let n: u64 =
                snapshot.iter().filter_map(|e| e.fresh_metrics(now, stale_ms)).map(|m| u64::from(m.waiting)).sum();
            if over(n, max) {
                let reason = format!("{n} requests queued at endpoints, limit {max}");
                return Err(RouteError::Saturated { pool: pool.to_owned(), reason, shed });
            }
        }
        Ok(())
    }
}

/// One pool's decision state: its scheduler, prefix index and admission limits.
#[derive(Debug)]
pub struct PoolRouter {
    /// Pool name.
    pub name: String,
    /// Models the pool serves.
    pub models: Vec<String>,
    scheduler: Scheduler,
    index: PrefixIndex,
    stale_after_ms: u64,
    admission: Admission,
}

impl PoolRouter {
    /// A router for a pool.
    pub fn new(name: String, models: Vec<String>, scheduler: Scheduler, stale_after_ms: u64) -> Self {
        let index = PrefixIndex::new(scheduler.prefix_config().index_capacity);
        Self { name, models, scheduler, index, stale_after_ms, admission: Admission::default() }
    }

    /// Sets the admission limits.
    pub fn with_admission(mut self, admission: Admission) -> Self {
        self.admission = admission;
        self
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

    /// Decides where a parsed request goes over `snapshot`, and records the prompt on the
    /// chosen (decode) endpoint. With `explain`, a dry run: nothing is recorded.
    pub fn plan(
        &self,
        req: &ParsedRequest<'_>,
        snapshot: &[Endpoint],
        opts: RouteOptions<'_>,
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
        let uncached = |t: &crate::schedule::Target| {
            tokens.saturating_sub(u64::from(t.matched_blocks) * cfg.block_tokens() as u64)
        };
        Ok(Planned {
            uncached_tokens: uncached(primary),
            prefill_uncached_tokens: decision.prefill.as_ref().map(uncached),
            decision,
            prompt,
        })
    }
}

/// A routed request: its decision, and its share of the target's in-flight counts, held until
/// this is dropped.
#[derive(Debug)]
pub struct Routed {
    /// The pool.
    pub pool: Pool,
    /// The snapshot the decision was made on (its indices are valid here).
    pub snapshot: Arc<Snapshot>,
    /// The decision, prompt hashes and uncached tokens.
    pub planned: Planned,
    /// The requested model.
    pub model: String,
    /// Streaming response requested.
    pub stream: bool,
    /// The in-flight count on the current target.
    pub guard: InFlightGuard,
    /// The in-flight count on the prefill endpoint, while its leg runs (P/D decisions).
    pub prefill_guard: Option<InFlightGuard>,

    /// Which of the decision's targets the request is on now.
    current: usize,
}

impl Routed {
    /// The decision.
    pub fn decision(&self) -> &Decision {
        &self.planned.decision
    }

    /// The body to send for this request: in a P/D pool, without a client's own
    /// `kv_transfer_params` (they name where an endpoint pulls KV from, which is kvgate's to
    /// decide); `None` when `body` can go as it is.
    pub fn sanitized(&self, body: &[u8]) -> Option<Vec<u8>> {
        self.pool.router().scheduler().disagg().and_then(|_| crate::disagg::without_transfer_params(body))
    }

    /// The prefill endpoint computed the prompt (or, behind a sidecar, was asked to): it now
    /// holds the prompt's blocks.
    pub fn prefilled(&self) {
        if let Some(p) = &self.planned.decision.prefill {
            self.pool.router().index().record(p.id, &self.planned.prompt.hashes);
        }
    }

    /// The prefill hand-off failed: the decode endpoint computes the prompt itself. Counts the
    /// fallback, makes the decision decode-only and moves the prefill work onto the decode
    /// endpoint's in-flight count.
    pub fn prefill_failed(&mut self, reason: &str, telemetry: &Telemetry) {
        telemetry.disagg_fallbacks.with_label_values(&[self.pool.name(), reason]).inc();
        self.prefill_guard = None;
        self.planned.decision.prefill = None;
        self.planned.decision.kind = DecisionKind::DecodeOnly;
        self.retarget(self.current);
    }

    /// Moves the in-flight count to target `k` of the decision.
    pub fn retarget(&mut self, k: usize) {
        if let Some(t) = self.planned.decision.targets.get(k) {
            let in_flight = self.snapshot.endpoints[t.index].in_flight.clone();
            self.guard = InFlightGuard::new(in_flight, self.planned.target_tokens());
            self.current = k;
        }
    }

    /// The target the request is on now (the decision's primary until retargeted).
    pub fn target(&self) -> &crate::schedule::Target {
        &self.planned.decision.targets[self.current]
    }
}

/// Candidates to ask a decision for when `places` distinct servers are wanted (fallback list
/// entries, retry attempts): ranks that share a server take one place, so a few spares keep
/// them from crowding other servers out. One place needs no spares.
pub fn candidates_for(places: usize) -> usize {
    if places > 1 { places * 4 } else { 1 }
}

/// Every pool, and the choice among them by `model` (body-based routing).
#[derive(Debug)]
pub struct Gateway {
    pools: Vec<Pool>,
    max_body_bytes: usize,
    telemetry: Arc<Telemetry>,
}

impl Gateway {
    /// A gateway over `pools`.
    pub fn new(pools: Vec<Pool>, max_body_bytes: usize, telemetry: Arc<Telemetry>) -> Self {
        Self { pools, max_body_bytes, telemetry }
    }

    /// The pools.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// Telemetry.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Largest body accepted.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// Every servable model: configured models, then adapters the endpoints report.
    pub fn served_models(&self) -> Vec<String> {
        let mut out: Vec<String> = self.pools.iter().flat_map(|p| p.models().iter().cloned()).collect();
        for p in &self.pools {
            for a in &p.snapshot().adapters {
                if !out.contains(a) {
                    out.push(a.clone());
                }
            }
        }
        out
    }

    /// The pool serving `model`: the one configured with it, else one whose endpoints serve it
    /// as an adapter (routing an adapter to the pool of its base model).
    pub fn pool_for(&self, model: &str) -> Result<&Pool, RouteError> {
        self.pools
            .iter()
            .find(|p| p.models().iter().any(|m| m == model))
            .or_else(|| self.pools.iter().find(|p| p.snapshot().adapters.iter().any(|a| a == model)))
            .ok_or_else(|| RouteError::UnknownModel { model: model.to_owned(), served: self.served_models() })
    }

    /// Parses, picks the pool, decides, and counts the request in flight on its target.
    pub fn decide(
        &self,
        api: ApiKind,
        body: &[u8],
        subset: Option<&Subset>,
        want: usize,
    ) -> Result<Routed, RouteError> {
        let started = std::time::Instant::now();
        let req = request::parse(api, body, self.max_body_bytes)?;
        let pool = self.pool_for(&req.model)?;
        let snapshot = pool.snapshot();
        let now = now_ms();
        let router = pool.router();
        router.admission.admit(pool.name(), &snapshot.endpoints, req.priority, now, router.stale_after_ms)?;
        let opts = RouteOptions { subset, want, now_ms: now, disaggregate: api.disaggregates() };
        let planned = router.plan(&req, &snapshot.endpoints, opts, &mut fastrand::Rng::new(), None)?;
        self.telemetry.decision_seconds.with_label_values(&[pool.name()]).observe(started.elapsed().as_secs_f64());
        let target = planned.decision.primary().index;
        let guard = InFlightGuard::new(snapshot.endpoints[target].in_flight.clone(), planned.target_tokens());
        let prefill_guard = planned.prefill_uncached_tokens.and_then(|tokens| {
            let p = planned.decision.prefill?;
            Some(InFlightGuard::new(snapshot.endpoints[p.index].in_flight.clone(), tokens))
        });
        if router.scheduler.disagg().is_some() && opts.disaggregate {
            self.telemetry.disagg_decisions.with_label_values(&[pool.name(), planned.decision.kind.as_str()]).inc();
        }
        Ok(Routed {
            pool: pool.clone(),
            model: req.model.into_owned(),
            stream: req.stream,
            snapshot,
            planned,
            guard,
            prefill_guard,
            current: 0,
        })
    }

    /// Places a request kvgate does not parse (no body, or another API) on an endpoint of
    /// `model`'s pool, by load alone — there is no prompt to match.
    pub fn decide_by_model(&self, model: &str, subset: Option<&Subset>, want: usize) -> Result<Routed, RouteError> {
        let empty_prompt = json!({"model": model, "prompt": ""}).to_string();
        self.decide(ApiKind::Completions, empty_prompt.as_bytes(), subset, want)
    }

    /// The decision kvgate would make for a body, with every endpoint's scores; sends nothing
    /// and records nothing.
    pub fn explain(&self, api: ApiKind, body: &[u8]) -> Result<(String, Decision, Explanation), RouteError> {
        let req = request::parse(api, body, self.max_body_bytes)?;
        let pool = self.pool_for(&req.model)?;
        let snapshot = pool.snapshot();
        let opts = RouteOptions { subset: None, want: 1, now_ms: now_ms(), disaggregate: api.disaggregates() };
        let mut x = Explanation::default();
        let planned = pool.router().plan(&req, &snapshot.endpoints, opts, &mut fastrand::Rng::new(), Some(&mut x))?;
        Ok((pool.name().to_owned(), planned.decision, x))
    }

    /// Counts the usage a response reported.
    pub fn count_tokens(&self, pool: &str, prompt: u64, completion: u64, cached: u64) {
        let t = &self.telemetry.tokens;
        t.with_label_values(&[pool, "prompt"]).inc_by(prompt);
        t.with_label_values(&[pool, "completion"]).inc_by(completion);
        t.with_label_values(&[pool, "cached"]).inc_by(cached);
    }

    /// Counts a finished request: `status` is the HTTP status the client got.
    pub fn count(&self, pool: &str, model: &str, decision: Option<DecisionKind>, status: u16, code: &str) {
        let kind = decision.map_or("none", DecisionKind::as_str);
        let t = &self.telemetry;
        t.requests.with_label_values(&[model, model]).inc();
        t.outcomes.with_label_values(&[pool, model, kind, &status.to_string()]).inc();
        if status >= 400 {
            t.request_errors.with_label_values(&[model, model, code]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pool() -> (PoolRouter, Vec<Endpoint>) {
        let router = PoolRouter::new("p".into(), vec!["m".into()], Scheduler::default_config(), 2000);
        let eps = (0..4)
            .map(|i| {
                let addr = format!("127.0.0.1:{}", 8000 + i).parse().expect("addr");
                Endpoint::new(EndpointId::new(i), addr, BTreeMap::new())
            })
            .collect();
        (router, eps)
    }

    fn chat(system: &str, turns: &[&str]) -> String {
        let mut msgs = vec![json!({"role": "system", "content": system})];
        for (i, t) in turns.iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            msgs.push(json!({"role": role, "content": t}));
        }
        json!({"model": "m", "messages": msgs}).to_string()
    }

    fn opts() -> RouteOptions<'static> {
        RouteOptions { subset: None, want: 1, now_ms: 0, disaggregate: true }
    }

    fn plan(
        router: &PoolRouter,
        eps: &[Endpoint],
        body: &str,
        rng: &mut fastrand::Rng,
        explain: Option<&mut Explanation>,
    ) -> Planned {
        let req = request::parse(ApiKind::ChatCompletions, body.as_bytes(), 1 << 20).expect("parses");
        router.plan(&req, eps, opts(), rng, explain).expect("planned")
    }

    #[test]
    fn conversations_stick_and_strangers_spread() {
        let (router, eps) = pool();
        let mut rng = fastrand::Rng::with_seed(5);
        let long = "You are a careful assistant. ".repeat(100);
        let mut first = None;
        let mut turns = vec![];
        for i in 0..6 {
            turns.push(format!("question number {i} with some padding to make it longer"));
            let body = chat(&long, &turns.iter().map(String::as_str).collect::<Vec<_>>());
            let d = plan(&router, &eps, &body, &mut rng, None).decision;
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
            let d = plan(&router, &eps, &body, &mut rng, None).decision;
            assert!(d.cold);
            seen.insert(d.primary().id);
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn errors_map_to_statuses_and_openai_bodies() {
        let check = |e: RouteError, status: u16, code: &str| {
            assert_eq!((e.status(), e.code()), (status, code), "{e}");
            let v: serde_json::Value = serde_json::from_str(&e.to_json()).expect("error body is JSON");
            assert_eq!(v["error"]["code"], code);
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        };
        let parse =
            |b: &str| request::parse(ApiKind::Completions, b.as_bytes(), 1 << 20).map(|_| ()).map_err(RouteError::from);
        check(parse("{").expect_err("bad json"), 400, "invalid_json");
        check(parse(r#"{"prompt":"x"}"#).expect_err("no model"), 400, "missing_model");
        check(RouteError::UnknownModel { model: "x".into(), served: vec!["m".into()] }, 404, "model_not_found");
        check(RouteError::Unavailable(NoDecision::NoEndpoints), 503, "no_endpoints");
        check(RouteError::Unavailable(NoDecision::NoHealthyEndpoints), 503, "no_healthy_endpoints");
    }

    #[test]
    fn explain_is_a_dry_run() {
        let (router, eps) = pool();
        let mut rng = fastrand::Rng::with_seed(1);
        let body = chat(&"shared ".repeat(200), &["q"]);
        let mut x = Explanation::default();
        plan(&router, &eps, &body, &mut rng, Some(&mut x));
        assert_eq!(x.endpoints.len(), 4);
        assert_eq!(router.index().stats().resident_blocks, 0, "explain recorded blocks");
        let p = plan(&router, &eps, &body, &mut rng, None);
        assert_eq!(router.index().stats().resident_blocks, p.prompt.hashes.len());
    }
}
