//! The one decision path: request body → parse → prefix hashes → prefix matches → scheduler →
//! decision, and the prefix index learns the pick. Both front-ends (Envoy ext_proc and the
//! proxy) call [`PoolRouter::decide`]; neither has scheduling logic of its own.
//!
//! Synchronous: the caller passes the snapshot, the time and the random number generator.

use serde_json::json;

use crate::endpoint::{Endpoint, EndpointId};
use crate::prefix::{BlockHasher, PrefixConfig, PrefixIndex, PromptHashes};
use crate::request::{self, ApiKind, RequestError};
use crate::schedule::{Decision, Explanation, Input, NoDecision, SchedRequest, Scheduler, Subset};

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
}

impl RouteError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(e) => e.status(),
            Self::UnknownModel { .. } => 404,
            Self::Unavailable(_) => 503,
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
        }
    }

    /// OpenAI-shaped error body.
    pub fn to_json(&self) -> String {
        let param = match self {
            Self::BadRequest(e) => e.param().map(str::to_owned),
            Self::UnknownModel { .. } => Some("model".to_owned()),
            Self::Unavailable(_) => None,
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

/// What a routed request needs downstream of the decision.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The decision.
    pub decision: Decision,
    /// The requested model.
    pub model: String,
    /// Streaming response requested.
    pub stream: bool,
    /// The prompt's block hashes.
    pub prompt: PromptHashes,
    /// Estimated prompt tokens not cached on the target (for in-flight accounting).
    pub uncached_tokens: u64,
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
}

/// One pool's decision state: its scheduler and prefix index.
#[derive(Debug)]
pub struct PoolRouter {
    /// Pool name.
    pub name: String,
    /// Models the pool serves.
    pub models: Vec<String>,
    scheduler: Scheduler,
    index: PrefixIndex,
    max_body_bytes: usize,
    stale_after_ms: u64,
}

impl PoolRouter {
    /// A router for a pool.
    pub fn new(
        name: String,
        models: Vec<String>,
        scheduler: Scheduler,
        max_body_bytes: usize,
        stale_after_ms: u64,
    ) -> Self {
        let index = PrefixIndex::new(scheduler.prefix_config().index_capacity);
        Self { name, models, scheduler, index, max_body_bytes, stale_after_ms }
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

    /// Routes one request over `snapshot`. With `explain`, a dry run: nothing is recorded.
    pub fn decide(
        &self,
        api: ApiKind,
        body: &[u8],
        snapshot: &[Endpoint],
        opts: RouteOptions<'_>,
        rng: &mut fastrand::Rng,
        explain: Option<&mut Explanation>,
    ) -> Result<Routed, RouteError> {
        let req = request::parse(api, body, self.max_body_bytes)?;
        let model = req.model.as_ref();
        if !self.models.iter().any(|m| m == model) && !snapshot.iter().any(|e| e.models.iter().any(|m| m == model)) {
            return Err(RouteError::UnknownModel { model: model.to_owned(), served: self.models.clone() });
        }
        let cfg = self.prefix_config();
        let mut hasher = BlockHasher::new(cfg, model, req.cache_salt.as_deref());
        req.feed_prompt(&mut |b| hasher.update(b));
        let prompt = hasher.finish();

        let ids: Vec<EndpointId> = snapshot.iter().map(|e| e.id).collect();
        let mut blocks = Vec::with_capacity(ids.len());
        self.index.match_into(&ids, &prompt.hashes, &mut blocks);
        let input = Input {
            request: SchedRequest {
                model,
                prompt_tokens: prompt.prompt_tokens() as u64,
                total_blocks: prompt.hashes.len(),
                block_tokens: cfg.block_tokens() as u64,
                priority: req.priority,
                subset: opts.subset,
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
            self.index.record(primary.id, &prompt.hashes);
            if let Some(p) = &decision.prefill {
                self.index.record(p.id, &prompt.hashes);
            }
        }
        let cached = u64::from(primary.matched_blocks) * cfg.block_tokens() as u64;
        Ok(Routed {
            uncached_tokens: (prompt.prompt_tokens() as u64).saturating_sub(cached),
            model: model.to_owned(),
            stream: req.stream,
            decision,
            prompt,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pool() -> (PoolRouter, Vec<Endpoint>) {
        let router = PoolRouter::new("p".into(), vec!["m".into()], Scheduler::default_config(), 1 << 20, 2000);
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
        RouteOptions { subset: None, want: 1, now_ms: 0 }
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
            let r =
                router.decide(ApiKind::ChatCompletions, body.as_bytes(), &eps, opts(), &mut rng, None).expect("routed");
            let target = r.decision.primary().id;
            assert_eq!(*first.get_or_insert(target), target, "turn {i} moved");
            if i > 0 {
                assert!(r.decision.primary().matched_blocks > 0, "turn {i} matched nothing");
            }
            turns.push("an answer".to_owned());
        }
        // Unrelated prompts rotate over all four endpoints.
        let mut seen = std::collections::HashSet::new();
        for i in 0..4 {
            let body = chat(&format!("{i} unrelated system prompt ").repeat(50), &["hi"]);
            let r =
                router.decide(ApiKind::ChatCompletions, body.as_bytes(), &eps, opts(), &mut rng, None).expect("routed");
            assert!(r.decision.cold);
            seen.insert(r.decision.primary().id);
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn errors_map_to_statuses() {
        let (router, eps) = pool();
        let mut rng = fastrand::Rng::with_seed(1);
        let mut check = |body: &str, snapshot: &[Endpoint], status: u16, code: &str| {
            let e =
                router.decide(ApiKind::Completions, body.as_bytes(), snapshot, opts(), &mut rng, None).expect_err(body);
            assert_eq!((e.status(), e.code()), (status, code), "{body}: {e}");
            let v: serde_json::Value = serde_json::from_str(&e.to_json()).expect("error body is JSON");
            assert_eq!(v["error"]["code"], code);
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        };
        check("{", &eps, 400, "invalid_json");
        check(r#"{"prompt":"x"}"#, &eps, 400, "missing_model");
        check(r#"{"model":"nope","prompt":"x"}"#, &eps, 404, "model_not_found");
        check(r#"{"model":"m","prompt":"x"}"#, &[], 503, "no_endpoints");
    }

    #[test]
    fn explain_is_a_dry_run() {
        let (router, eps) = pool();
        let mut rng = fastrand::Rng::with_seed(1);
        let body = chat(&"shared ".repeat(200), &["q"]);
        let mut x = Explanation::default();
        let r = router
            .decide(ApiKind::ChatCompletions, body.as_bytes(), &eps, opts(), &mut rng, Some(&mut x))
            .expect("routed");
        assert_eq!(x.endpoints.len(), 4);
        assert_eq!(router.index().stats().resident_blocks, 0, "explain recorded blocks");
        router.decide(ApiKind::ChatCompletions, body.as_bytes(), &eps, opts(), &mut rng, None).expect("routed");
        assert_eq!(router.index().stats().resident_blocks, r.prompt.hashes.len());
    }
}
