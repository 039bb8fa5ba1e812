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
mod filter;
mod picker;
mod scorer;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

pub use config::{SchedulerSpec, SpecError};
pub use filter::{AffinityParams, Filter, Subset, UtilizationParams};
pub use picker::{Picker, PickerParams};
pub use scorer::{ActiveRequestParams, LoadAwareParams, NoHitLruParams, PrefixParams, Scorer, TokenLoadParams};

use crate::endpoint::{Endpoint, EndpointId, Health, Metrics};
use crate::prefix::PrefixConfig;
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

/// A compiled scheduler for one pool.
#[derive(Debug)]
pub struct Scheduler {
    profile: Profile,
    prefix: PrefixConfig,
}

/// Why each endpoint scored what it did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Explanation {
    /// Profile that ran.
    pub profile: String,
    /// Every endpoint of the snapshot, in snapshot order.
    pub endpoints: Vec<EndpointExplanation>,
}

/// One endpoint's part of an [`Explanation`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EndpointExplanation {
    /// Endpoint address.
    pub address: SocketAddr,
    /// Prompt blocks it holds.
    pub matched_blocks: u32,
    /// The stage that removed it (`subset`, `model`, `health`, or a filter name).
    pub filtered_by: Option<String>,
    /// Each scorer's raw score, weight and weighted score.
    pub scores: Vec<ScoreTerm>,
    /// Sum of weighted scores.
    pub total: f64,
    /// Position in the picker's order (0 = target), if it was ranked and returned.
    pub rank: Option<usize>,
}

/// One scorer's contribution.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScoreTerm {
    /// Scorer name.
    pub scorer: String,
    /// Score in [0, 1].
    pub raw: f64,
    /// Weight.
    pub weight: f64,
    /// `raw × weight`.
    pub weighted: f64,
}

impl Scheduler {
    /// The default scheduler.
    pub fn default_config() -> Self {
        config::default_scheduler()
    }

    /// Prompt hashing and index sizing for this pool.
    pub fn prefix_config(&self) -> &PrefixConfig {
        &self.prefix
    }

    /// The profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// How many ordered endpoints a decision carries by default (the picker's setting).
    pub fn max_endpoints(&self) -> usize {
        self.profile.picker.plugin.max_endpoints()
    }

    /// Decides where `input.request` goes. Returns at least one and at most
    /// `max(want, picker's maxNumOfEndpoints)` targets, best first. With `explain`, the call is a
    /// dry run that fills in every endpoint's scores and changes no plugin state.
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
            *x = Explanation {
                profile: self.profile.name.clone(),
                endpoints: eps
                    .iter()
                    .zip(input.prefix_blocks)
                    .map(|(e, &m)| EndpointExplanation {
                        address: e.address,
                        matched_blocks: m,
                        filtered_by: None,
                        scores: Vec::new(),
                        total: 0.0,
                        rank: None,
                    })
                    .collect(),
            };
        }
        if eps.is_empty() {
            return Err(NoDecision::NoEndpoints);
        }
        let mut cands: Vec<usize> = (0..eps.len()).collect();
        let mut stage = |name: &str, cands: &mut Vec<usize>, keep: &dyn Fn(&mut Vec<usize>)| {
            let before = explain.is_some().then(|| cands.clone());
            keep(cands);
            if let (Some(x), Some(before)) = (explain.as_deref_mut(), before) {
                for i in before.into_iter().filter(|i| !cands.contains(i)) {
                    x.endpoints[i].filtered_by = Some(name.to_owned());
                }
            }
        };
        if let Some(s) = input.request.subset {
            stage("subset", &mut cands, &|c| c.retain(|&i| s.contains(eps[i].address)));
            if cands.is_empty() {
                return Err(NoDecision::SubsetUnmatched);
            }
        }
        stage("model", &mut cands, &|c| Filter::ServesModel.apply(&ctx, c));
        if cands.is_empty() {
            return Err(NoDecision::ModelNotServed(input.request.model.to_owned()));
        }
        stage("health", &mut cands, &|c| {
            if c.iter().any(|&i| eps[i].health == Health::Healthy) {
                c.retain(|&i| eps[i].health == Health::Healthy);
            } else {
                c.retain(|&i| eps[i].health == Health::Probing);
            }
        });
        if cands.is_empty() {
            return Err(NoDecision::NoHealthyEndpoints);
        }
        let profile = &self.profile;
        // Endpoints set aside by soft filters (preferences, not rules): fallbacks of last resort.
        let mut set_aside = Vec::new();
        for f in &profile.filters {
            let before = f.plugin.is_soft().then(|| cands.clone());
            stage(&f.name, &mut cands, &|c| f.plugin.apply(&ctx, c));
            if cands.is_empty() {
                return Err(NoDecision::Filtered(f.name.clone()));
            }
            if let Some(before) = before {
                set_aside.extend(before.into_iter().filter(|i| !cands.contains(i)));
            }
        }

        let k = want.max(profile.picker.plugin.max_endpoints());
        let mut totals = Vec::with_capacity(cands.len());
        let mut scored = self.score_and_order(&ctx, &cands, rng, k, &mut totals, explain.as_deref_mut());
        scored.truncate(k);
        if scored.len() < k && !set_aside.is_empty() {
            set_aside.retain(|i| !cands.contains(i));
            set_aside.sort_unstable();
            set_aside.dedup();
            let mut ignored = Vec::new();
            let more = k - scored.len();
            let mut rest = self.score_and_order(&ctx, &set_aside, rng, more, &mut ignored, None);
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
                matched_blocks: input.prefix_blocks[s.index],
            })
            .collect();
        if explain.is_none() {
            for (s, _) in &profile.scorers {
                s.plugin.on_pick(&ctx, &cands, targets[0].index);
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
        Ok(Decision {
            profile: profile.name.clone(),
            cold: ctx.cold(&cands),
            targets,
            prefill: None,
            kind: DecisionKind::DecodeOnly,
        })
    }
}

impl Scheduler {
    /// Scores `cands` with the profile's scorers and has its picker put the best `k` first.
    /// Totals go to `totals` (same order as `cands`), and each term to `explain` when given.
    fn score_and_order(
        &self,
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
        for (s, weight) in &self.profile.scorers {
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
        let mut scored: Vec<Scored> = cands
            .iter()
            .zip(totals.iter())
            .map(|(&index, &total)| Scored { index, id: eps[index].id, total })
            .collect();
        self.profile.picker.plugin.order(&mut scored, rng, k);
        scored
    }
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
        let prof = &self.profile;
        writeln!(f, "profile `{}` (single-profile-handler):", prof.name)?;
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
}

#[cfg(test)]
mod tests;
