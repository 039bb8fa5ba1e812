//! The scheduler: candidates → profile (filters → weighted scorers → picker) → [`Decision`].
//!
//! Pure: the snapshot, the prefix matches, the time and the random number generator are all
//! arguments, so a decision can be replayed exactly in a test. Plugins are configured in the
//! EndpointPickerConfig shape (see [`config`]); a pool without a `scheduler` uses
//! [`DEFAULT_SCHEDULER_YAML`].
//!
//! Before any profile runs, the candidates are narrowed the way the reference picker "locates"
//! them: the request's subset hint, then the endpoints that serve its model, then the healthy
//! ones (falling back to half-open endpoints when none is healthy). Each step that leaves nothing
//! is a distinct [`NoDecision`] reason, so callers can answer with the right status.
//!
//! Part of the decision core: no I/O, no clock, no async.

pub mod config;
mod explain;
mod filter;
mod picker;
mod scorer;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

pub use config::{Ignored, SchedulerSpec, SpecError};
pub use explain::{EndpointExplanation, Explanation, ScoreTerm};
pub use filter::{AffinityParams, Filter, Subset, UtilizationParams};
pub use picker::{Picker, PickerParams};
pub use scorer::{
    ActiveRequestParams, LoadAwareParams, NoHitLruParams, PredictedTtftParams, PrefixParams, Scorer, TokenLoadParams,
};

use crate::routing::endpoint::{Endpoint, EndpointId, Health, Metrics};
use crate::routing::prefix::PrefixConfig;
use picker::Scored;

/// The scheduler used when a pool configures none (see ARCHITECTURE.md for the reasoning).
pub const DEFAULT_SCHEDULER_YAML: &str = include_str!("schedule/default.yaml");

/// What the scheduler knows about a request.
#[derive(Debug, Clone, Copy)]
pub struct SchedRequest<'a> {
    /// Requested model or adapter.
    pub model: &'a str,
    /// Estimated prompt tokens.
    pub prompt_tokens: u64,
    /// Hashed blocks of the prompt (the denominator of prefix ratios).
    pub total_blocks: usize,
    /// Estimated tokens per block.
    pub block_tokens: u64,
    /// Request priority; negative is sheddable.
    pub priority: i64,
    /// The gateway's subset hint: only these endpoints may be picked.
    pub subset: Option<&'a Subset>,
    /// Flow control's gate, by endpoint index: only the open ones may be picked (`None`: all).
    pub open: Option<&'a [bool]>,
    /// The request may be split into prefill and decode legs (the completions APIs).
    pub disaggregate: bool,
}

/// Everything one decision reads.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The request.
    pub request: SchedRequest<'a>,
    /// The pool's endpoint snapshot.
    pub endpoints: &'a [Endpoint],
    /// For each endpoint (same order), how many leading prompt blocks it holds.
    pub prefix_blocks: &'a [u32],
    /// Models the pool serves (for endpoints that list none themselves).
    pub pool_models: &'a [String],
    /// Now, in monotonic milliseconds.
    pub now_ms: u64,
    /// Scraped metrics older than this are unknown.
    pub stale_after_ms: u64,
}

/// What plugins see: the input plus helpers.
#[derive(Debug)]
pub(crate) struct Ctx<'a> {
    input: &'a Input<'a>,
}

impl Ctx<'_> {
    fn metrics(&self, i: usize) -> Option<&Metrics> {
        self.input.endpoints[i].fresh_metrics(self.input.now_ms, self.input.stale_after_ms)
    }

    /// The request's prompt tokens endpoint `i` does not hold.
    fn uncached_tokens(&self, i: usize) -> u64 {
        let req = &self.input.request;
        req.prompt_tokens.saturating_sub(u64::from(self.input.prefix_blocks[i]) * req.block_tokens)
    }

    /// Endpoint `i`'s predicted TTFT for the request: its model applied to kvgate's prefill
    /// tokens in flight there plus the request's uncached tokens, and its requests in decode.
    fn predicted_ttft_ms(&self, i: usize) -> f64 {
        let e = &self.input.endpoints[i];
        e.ttft.predict_ms(e.in_flight.tokens() + self.uncached_tokens(i), e.in_flight.decoding())
    }

    /// No candidate holds any block of the prompt.
    fn cold(&self, cands: &[usize]) -> bool {
        cands.iter().all(|&i| self.input.prefix_blocks[i] == 0)
    }
}

/// A chosen endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Target {
    /// Index in the snapshot the decision was made on.
    #[serde(skip)]
    pub index: usize,
    /// The endpoint's id.
    pub id: EndpointId,
    /// The endpoint's address.
    pub address: SocketAddr,
    /// Its data-parallel rank, if it is one.
    pub rank: Option<u32>,
    /// The `X-data-parallel-rank` to pin, when the rank shares its address with others.
    pub header_rank: Option<u32>,
    /// Blocks of the prompt it holds.
    pub matched_blocks: u32,
}

/// Whether a decision splits prefill from decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionKind {
    /// One endpoint does the whole request.
    DecodeOnly,
    /// A prefill endpoint computes the KV cache and hands it to the decode endpoint.
    PrefillDecode,
}

impl DecisionKind {
    /// The metric label (and serialized name).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DecodeOnly => "decode-only",
            Self::PrefillDecode => "prefill-decode",
        }
    }
}

/// The outcome of scheduling one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decision {
    /// The profile that produced `targets`.
    pub profile: String,
    /// The target first, then fallbacks in order.
    pub targets: Vec<Target>,
    /// The prefill endpoint, when prefill is disaggregated.
    pub prefill: Option<Target>,
    /// Decode-only or prefill/decode.
    pub kind: DecisionKind,
    /// No candidate held any of the prompt.
    pub cold: bool,
}

impl Decision {
    /// The endpoint that serves the request.
    pub fn primary(&self) -> &Target {
        // `schedule` never returns a decision without a target.
        &self.targets[0]
    }
}

/// Why no endpoint was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoDecision {
    /// The pool has no endpoints at all.
    #[error("the pool has no endpoints")]
    NoEndpoints,
    /// Flow control found every candidate saturated.
    #[error("every endpoint that could take the request is saturated")]
    Saturated,
    /// The gateway's subset hint matched none of the pool's endpoints.
    #[error("no endpoint of the pool is in the gateway's subset hint")]
    SubsetUnmatched,
    /// No endpoint serves the model.
    #[error("no endpoint serves model `{0}`")]
    ModelNotServed(String),
    /// Every endpoint serving the model is out of rotation.
    #[error("every endpoint serving the model is unhealthy")]
    NoHealthyEndpoints,
    /// A profile filter left no candidate.
    #[error("filter `{0}` left no candidate endpoint")]
    Filtered(String),
}

/// A configured plugin instance with the name a profile refers to it by.
#[derive(Debug)]
pub struct Plugin<T> {
    /// Plugin name (its `name`, else its `type`).
    pub name: String,
    /// Plugin type.
    pub kind: &'static str,
    /// The instance (shared when several profiles refer to it).
    pub plugin: Arc<T>,
}

/// One scheduling profile.
#[derive(Debug)]
pub struct Profile {
    /// Profile name.
    pub name: String,
    /// Filters, applied in order.
    pub filters: Vec<Plugin<Filter>>,
    /// Scorers and their weights.
    pub scorers: Vec<(Plugin<Scorer>, f64)>,
    /// The picker.
    pub picker: Plugin<Picker>,
}

/// `prefix-based-pd-decider`: whether a request is worth a separate prefill endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PdDecider {
    /// Prompt tokens not cached on the chosen decode endpoint at which prefill moves to a
    /// prefill endpoint (0 disables disaggregation).
    pub non_cached_tokens: u64,
    /// Prompts shorter than this stay decode-only whatever their cache state (0: no minimum).
    pub prompt_tokens: u64,
}

impl PdDecider {
    /// Whether to disaggregate a prompt of `prompt_tokens` of which `cached_tokens` are cached on
    /// the decode endpoint.
    pub fn disaggregate(&self, prompt_tokens: u64, cached_tokens: u64) -> bool {
        self.non_cached_tokens > 0
            && prompt_tokens >= self.prompt_tokens
            && prompt_tokens.saturating_sub(cached_tokens) >= self.non_cached_tokens
    }
}

/// Decode-first disaggregation (`disagg-profile-handler`): the main profile picks the decode
/// endpoint, then `decider` says whether `profile` picks a prefill endpoint too.
#[derive(Debug)]
pub struct Disagg {
    /// The `prefill` profile.
    pub profile: Profile,
    /// The decider.
    pub decider: PdDecider,
}

/// A compiled scheduler for one pool.
#[derive(Debug)]
pub struct Scheduler {
    /// The profile that picks the endpoint serving the request (`decode` under P/D).
    profile: Profile,
    /// Prefill disaggregation, when configured.
    disagg: Option<Disagg>,
    prefix: PrefixConfig,
    /// `precise-prefix-cache-producer`'s block size, when the scheduler names it.
    precise: Option<u32>,
}

pub use crate::routing::endpoint::PrefixSource;

impl Scheduler {
    /// The default scheduler.
    pub fn default_config() -> Self {
        config::default_scheduler()
    }

    /// The default scheduler of a pool that follows KV events: the default profile fed by
    /// `precise-prefix-cache-producer`.
    pub fn default_precise() -> Self {
        Self { precise: Some(crate::routing::prefix::precise::DEFAULT_BLOCK_SIZE), ..config::default_scheduler() }
    }

    /// The main profile's picker's `maxNumOfEndpoints`, when the config sets it.
    pub fn max_endpoints(&self) -> Option<usize> {
        self.profile.picker.plugin.max_endpoints_set()
    }

    /// The block size `precise-prefix-cache-producer` starts from, when the scheduler names it.
    pub fn precise_producer(&self) -> Option<u32> {
        self.precise
    }

    /// Prompt hashing and index sizing for this pool.
    pub fn prefix_config(&self) -> &PrefixConfig {
        &self.prefix
    }

    /// Prefill disaggregation, when configured.
    pub fn disagg(&self) -> Option<&Disagg> {
        self.disagg.as_ref()
    }

    /// Decides where `input.request` goes. Returns at least one and at most
    /// `max(want, picker's maxNumOfEndpoints)` targets, best first, and under P/D possibly a
    /// prefill endpoint. With `explain`, the call is a dry run that fills in every endpoint's
    /// scores and changes no plugin state.
    pub fn schedule(
        &self,
        input: &Input<'_>,
        rng: &mut fastrand::Rng,
        want: usize,
        mut explain: Option<&mut Explanation>,
    ) -> Result<Decision, NoDecision> {
        let ctx = Ctx { input };
        let eps = input.endpoints;
        debug_assert_eq!(eps.len(), input.prefix_blocks.len(), "one prefix match per endpoint");
        if let Some(x) = explain.as_deref_mut() {
            *x = Explanation::new(&self.profile.name, input);
        }
        if eps.is_empty() {
            return Err(NoDecision::NoEndpoints);
        }
        let mut cands: Vec<usize> = (0..eps.len()).collect();
        if let Some(s) = input.request.subset {
            stage(explain.as_deref_mut(), "subset", &mut cands, &|c| c.retain(|&i| s.contains(eps[i].address)));
            if cands.is_empty() {
                return Err(NoDecision::SubsetUnmatched);
            }
        }
        locate(&ctx, &mut cands, explain.as_deref_mut())?;
        if let Some(open) = input.request.open {
            stage(explain.as_deref_mut(), "flow-control", &mut cands, &|c| {
                c.retain(|&i| open.get(i).copied().unwrap_or(false));
            });
            if cands.is_empty() {
                return Err(NoDecision::Saturated);
            }
        }
        let (targets, cold) = self.run_profile(&self.profile, &ctx, cands, rng, want, explain.as_deref_mut())?;
        let mut decision = Decision {
            profile: self.profile.name.clone(),
            cold,
            targets,
            prefill: None,
            kind: DecisionKind::DecodeOnly,
        };
        let req = &input.request;
        let Some(d) = self.disagg.as_ref().filter(|_| req.disaggregate) else { return Ok(decision) };
        let cached = u64::from(decision.primary().matched_blocks) * req.block_tokens;
        if !d.decider.disaggregate(req.prompt_tokens, cached) {
            return Ok(decision);
        }
        // Prefill endpoints are reached by the decode side, not by the gateway: the subset hint
        // (which names where the gateway may send the request) does not narrow them.
        let mut px = explain.is_some().then(|| Explanation::new(&d.profile.name, input));
        // The decode endpoint cannot hand off to itself (a `both` endpoint may prefill for others).
        let decode = decision.primary().index;
        let mut cands: Vec<usize> = (0..eps.len()).collect();
        stage(px.as_mut(), "decode-endpoint", &mut cands, &|c| c.retain(|&i| i != decode));
        let picked = locate(&ctx, &mut cands, px.as_mut())
            .and_then(|()| self.run_profile(&d.profile, &ctx, cands, rng, 1, px.as_mut()));
        if let (Some(x), Some(px)) = (explain, px) {
            x.prefill = Some(Box::new(px));
        }
        // No prefill endpoint available: prefill locally.
        if let Ok((p, _)) = picked
            && let Some(p) = p.first()
        {
            decision.prefill = Some(*p);
            decision.kind = DecisionKind::PrefillDecode;
            // Nor is the prefill endpoint a fallback for the decode leg.
            decision.targets.retain(|t| t.id != p.id);
        }
        Ok(decision)
    }

    /// Runs one profile's filters, scorers and picker over located candidates: the ordered
    /// targets, and whether the request was cold for them.
    fn run_profile(
        &self,
        profile: &Profile,
        ctx: &Ctx<'_>,
        mut cands: Vec<usize>,
        rng: &mut fastrand::Rng,
        want: usize,
        mut explain: Option<&mut Explanation>,
    ) -> Result<(Vec<Target>, bool), NoDecision> {
        let input = ctx.input;
        let eps = input.endpoints;
        // Endpoints set aside by soft filters (preferences, not rules): fallbacks of last resort.
        let mut set_aside = Vec::new();
        for f in &profile.filters {
            let before = f.plugin.is_soft().then(|| cands.clone());
            stage(explain.as_deref_mut(), &f.name, &mut cands, &|c| f.plugin.apply(ctx, c));
            if cands.is_empty() {
                return Err(NoDecision::Filtered(f.name.clone()));
            }
            if let Some(before) = before {
                set_aside.extend(before.into_iter().filter(|i| !cands.contains(i)));
            }
        }

        let k = want.max(profile.picker.plugin.max_endpoints());
        let mut totals = Vec::with_capacity(cands.len());
        let mut scored = score_and_order(profile, ctx, &cands, rng, k, &mut totals, explain.as_deref_mut());
        scored.truncate(k);
        if scored.len() < k && !set_aside.is_empty() {
            set_aside.retain(|i| !cands.contains(i));
            set_aside.sort_unstable();
            set_aside.dedup();
            let mut ignored = Vec::new();
            let more = k - scored.len();
            let mut rest = score_and_order(profile, ctx, &set_aside, rng, more, &mut ignored, None);
            rest.truncate(more);
            scored.extend(rest);
        }
        let targets: Vec<Target> = scored
            .iter()
            .map(|s| Target {
                index: s.index,
                id: s.id,
                address: eps[s.index].address,
                rank: eps[s.index].rank,
                header_rank: eps[s.index].header_rank(),
                matched_blocks: input.prefix_blocks[s.index],
            })
            .collect();
        if explain.is_none() {
            for (s, _) in &profile.scorers {
                s.plugin.on_pick(ctx, &cands, targets[0].index);
            }
        }
        if let Some(x) = explain {
            for (j, &i) in cands.iter().enumerate() {
                x.endpoints[i].total = totals[j];
            }
            for (rank, t) in targets.iter().enumerate() {
                x.endpoints[t.index].rank = Some(rank);
            }
        }
        Ok((targets, ctx.cold(&cands)))
    }
}

/// Applies one narrowing step, noting in `explain` which endpoints it removed.
fn stage(explain: Option<&mut Explanation>, name: &str, cands: &mut Vec<usize>, keep: &dyn Fn(&mut Vec<usize>)) {
    let before = explain.is_some().then(|| cands.clone());
    keep(cands);
    if let (Some(x), Some(before)) = (explain, before) {
        for i in before.into_iter().filter(|i| !cands.contains(i)) {
            x.endpoints[i].filtered_by = Some(name.to_owned());
        }
    }
}

/// Narrows candidates to the endpoints that serve the model, then to the healthy ones (or the
/// half-open ones when none is healthy).
/// Below this share of healthy endpoints a pool routes over every endpoint that answers
/// (Envoy's default panic threshold).
const PANIC_THRESHOLD: f64 = 0.5;

fn locate(ctx: &Ctx<'_>, cands: &mut Vec<usize>, mut explain: Option<&mut Explanation>) -> Result<(), NoDecision> {
    let eps = ctx.input.endpoints;
    stage(explain.as_deref_mut(), "model", cands, &|c| Filter::ServesModel.apply(ctx, c));
    if cands.is_empty() {
        return Err(NoDecision::ModelNotServed(ctx.input.request.model.to_owned()));
    }
    stage(explain, "health", cands, &|c| {
        let healthy = c.iter().filter(|&&i| eps[i].health == Health::Healthy).count();
        let answering = |i: usize| eps[i].health == Health::Healthy || eps[i].ejected;
        if healthy as f64 >= PANIC_THRESHOLD * c.len() as f64 {
            c.retain(|&i| eps[i].health == Health::Healthy);
        } else if c.iter().any(|&i| answering(i)) {
            // Panic: too few healthy endpoints to carry the pool, so every endpoint that
            // answers takes requests, ejected ones included. Unreachable ones stay out: a
            // request sent there would only fail later.
            c.retain(|&i| answering(i));
        } else {
            c.retain(|&i| eps[i].health == Health::Probing);
        }
    });
    if cands.is_empty() {
        return Err(NoDecision::NoHealthyEndpoints);
    }
    Ok(())
}

/// Scores `cands` with `profile`'s scorers and has its picker put the best `k` first. Totals go
/// to `totals` (same order as `cands`), and each term to `explain` when given.
fn score_and_order(
    profile: &Profile,
    ctx: &Ctx<'_>,
    cands: &[usize],
    rng: &mut fastrand::Rng,
    k: usize,
    totals: &mut Vec<f64>,
    mut explain: Option<&mut Explanation>,
) -> Vec<Scored> {
    let n = cands.len();
    totals.clear();
    totals.resize(n, 0.0);
    let mut raw = vec![0.0; n];
    for (s, weight) in &profile.scorers {
        raw.fill(0.0);
        s.plugin.score(ctx, cands, &mut raw);
        for (j, &r) in raw.iter().enumerate() {
            let r = if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
            totals[j] += r * weight;
            if let Some(x) = explain.as_deref_mut() {
                x.endpoints[cands[j]].scores.push(ScoreTerm {
                    scorer: s.name.clone(),
                    raw: r,
                    weight: *weight,
                    weighted: r * weight,
                });
            }
        }
    }
    let eps = ctx.input.endpoints;
    let mut scored: Vec<Scored> =
        cands.iter().zip(totals.iter()).map(|(&index, &total)| Scored { index, id: eps[index].id, total }).collect();
    profile.picker.plugin.order(&mut scored, rng, k);
    scored
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.prefix;
        writeln!(
            f,
            "prefix: blocks of {} B (~{} tokens), at most {} blocks per prompt, index {} blocks per endpoint",
            p.block_bytes,
            p.block_tokens(),
            p.max_blocks,
            p.index_capacity
        )?;
        if let Some(bs) = self.precise {
            writeln!(
                f,
                "precise-prefix-cache-producer: exact matches from KV events (blocks of {bs} tokens until events say), the above where an endpoint's view is not precise"
            )?;
        }
        match &self.disagg {
            None => {
                writeln!(f, "profile `{}` (single-profile-handler):", self.profile.name)?;
                write_profile(f, &self.profile)
            }
            Some(d) => {
                writeln!(
                    f,
                    "disagg-profile-handler: decode first; prefill elsewhere when at least {} prompt tokens are \
                     not cached on the decode endpoint{}",
                    d.decider.non_cached_tokens,
                    if d.decider.prompt_tokens > 0 {
                        format!(" and the prompt has at least {} tokens", d.decider.prompt_tokens)
                    } else {
                        String::new()
                    }
                )?;
                writeln!(f, "profile `{}`:", self.profile.name)?;
                write_profile(f, &self.profile)?;
                writeln!(f)?;
                writeln!(f, "profile `{}`:", d.profile.name)?;
                write_profile(f, &d.profile)
            }
        }
    }
}

fn write_profile(f: &mut fmt::Formatter<'_>, prof: &Profile) -> fmt::Result {
    let filters: Vec<String> = prof.filters.iter().map(|x| config::describe(&x.name, x.kind)).collect();
    writeln!(
        f,
        "  filters: subset-hint, model, health{}{}",
        if filters.is_empty() { "" } else { ", " },
        filters.join(", ")
    )?;
    for (s, w) in &prof.scorers {
        writeln!(f, "  scorer:  {:<40} weight {w}", config::describe(&s.name, s.kind))?;
    }
    write!(
        f,
        "  picker:  {} (maxNumOfEndpoints {})",
        config::describe(&prof.picker.name, prof.picker.kind),
        prof.picker.plugin.max_endpoints()
    )
}

#[cfg(test)]
mod tests;
