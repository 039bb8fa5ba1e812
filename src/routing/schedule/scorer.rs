//! Scorers: rate each candidate in [0, 1]; a profile adds them up with weights.

use parking_lot::Mutex;
use serde::Deserialize;

use super::Ctx;
use crate::routing::endpoint::EndpointId;

/// Parameters of `prefix-cache-scorer`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PrefixParams {
    /// Share of the score given to the absolute matched length rather than the ratio.
    pub match_length_weight: f64,
    /// Matched tokens at which the length term reaches 1.
    pub match_length_scale_tokens: f64,
}

impl Default for PrefixParams {
    fn default() -> Self {
        Self { match_length_weight: 0.3, match_length_scale_tokens: 2048.0 }
    }
}

/// Parameters of `active-request-scorer`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ActiveRequestParams {
    /// In-flight requests at or below which an endpoint counts as idle (score 1).
    pub idle_threshold: u64,
    /// The best score a busy endpoint can get; the busiest candidate gets 0.
    pub max_busy_score: f64,
}

impl Default for ActiveRequestParams {
    fn default() -> Self {
        Self { idle_threshold: 0, max_busy_score: 1.0 }
    }
}

/// Parameters of `token-load-scorer`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TokenLoadParams {
    /// In-flight uncached prompt tokens at which the score reaches 0.
    pub queue_threshold_tokens: u64,
}

impl Default for TokenLoadParams {
    fn default() -> Self {
        Self { queue_threshold_tokens: 4_194_304 }
    }
}

/// Parameters of `predicted-ttft-scorer`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PredictedTtftParams {
    /// Predicted TTFT above the best candidate's at which the score halves.
    pub scale_ms: f64,
}

impl Default for PredictedTtftParams {
    fn default() -> Self {
        Self { scale_ms: 100.0 }
    }
}

/// Parameters of `load-aware-scorer`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LoadAwareParams {
    /// Waiting requests at which the score reaches 0.
    pub threshold: u64,
}

impl Default for LoadAwareParams {
    fn default() -> Self {
        Self { threshold: 128 }
    }
}

/// Parameters of `no-hit-lru-scorer`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct NoHitLruParams {
    /// Endpoints remembered. Accepted for compatibility: kvgate keeps one `u64` per endpoint of
    /// the pool, so it never forgets one early.
    pub lru_size: usize,
}

impl Default for NoHitLruParams {
    fn default() -> Self {
        Self { lru_size: 1024 }
    }
}

/// Which endpoints got cold requests (no prefix hit anywhere), and in what order: the sequence
/// number of each endpoint's last cold request, indexed by endpoint id (0 = never).
#[derive(Debug, Default)]
pub struct ColdAssignments {
    seq: u64,
    last: Vec<u64>,
}

impl ColdAssignments {
    fn last(&self, id: EndpointId) -> u64 {
        self.last.get(id.index()).copied().unwrap_or(0)
    }
}

/// A scorer plugin.
#[derive(Debug)]
pub enum Scorer {
    /// `prefix-cache-scorer`: how much of the prompt the endpoint holds.
    PrefixCache(PrefixParams),
    /// `queue-scorer`: scraped waiting requests, min–max normalised over candidates.
    Queue,
    /// `kv-cache-utilization-scorer`: `1 − KV-cache usage`.
    KvCacheUtilization,
    /// `active-request-scorer`: kvgate's own in-flight request count (current, not scraped).
    ActiveRequest(ActiveRequestParams),
    /// `token-load-scorer`: kvgate's in-flight uncached prompt tokens.
    TokenLoad(TokenLoadParams),
    /// `predicted-ttft-scorer`: each endpoint's learned TTFT model applied to the prefill work
    /// ahead of the request and its own uncached tokens there; `1 / (1 + excess / scaleMs)` of
    /// the excess over the best candidate.
    PredictedTtft(PredictedTtftParams),
    /// `load-aware-scorer`: scraped waiting requests against a fixed threshold.
    LoadAware(LoadAwareParams),
    /// `lora-affinity-scorer`: prefers endpoints with the adapter resident, then room for it.
    LoraAffinity,
    /// `no-hit-lru-scorer`: spreads cold requests over the least recently cold-assigned
    /// endpoints, deterministically.
    NoHitLru(NoHitLruParams, Mutex<ColdAssignments>),
}

impl Scorer {
    /// Writes the raw score of each candidate to `out` (same order as `cands`).
    pub(super) fn score(&self, ctx: &Ctx<'_>, cands: &[usize], out: &mut [f64]) {
        let req = &ctx.input.request;
        let ep = |i: usize| &ctx.input.endpoints[i];
        match self {
            Self::PrefixCache(p) => {
                for (o, &i) in out.iter_mut().zip(cands) {
                    let matched = f64::from(ctx.input.prefix_blocks[i]);
                    *o = if req.total_blocks == 0 {
                        0.0
                    } else {
                        let ratio = matched / req.total_blocks as f64;
                        let length =
                            (matched * req.block_tokens as f64 / p.match_length_scale_tokens.max(1.0)).min(1.0);
                        (1.0 - p.match_length_weight) * ratio + p.match_length_weight * length
                    };
                }
            }
            Self::Queue => {
                let q = |i: usize| ctx.metrics(i).map(|m| f64::from(m.waiting));
                let (lo, hi) = cands
                    .iter()
                    .filter_map(|&i| q(i))
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
                for (o, &i) in out.iter_mut().zip(cands) {
                    *o = match q(i) {
                        None => 0.0,
                        Some(_) if hi <= lo => 1.0,
                        Some(v) => (hi - v) / (hi - lo),
                    };
                }
            }
            Self::KvCacheUtilization => {
                for (o, &i) in out.iter_mut().zip(cands) {
                    *o = ctx.metrics(i).map_or(0.0, |m| 1.0 - m.kv_usage);
                }
            }
            Self::ActiveRequest(p) => {
                let busy = |i: usize| ep(i).in_flight.requests().saturating_sub(p.idle_threshold);
                let max = cands.iter().map(|&i| busy(i)).max().unwrap_or(0);
                for (o, &i) in out.iter_mut().zip(cands) {
                    let b = busy(i);
                    *o = if b == 0 { 1.0 } else { p.max_busy_score * (max - b.min(max)) as f64 / max as f64 };
                }
            }
            Self::TokenLoad(p) => {
                for (o, &i) in out.iter_mut().zip(cands) {
                    let t = ep(i).in_flight.tokens() as f64;
                    *o = 1.0 - (t / p.queue_threshold_tokens.max(1) as f64).min(1.0);
                }
            }
            Self::PredictedTtft(p) => {
                let predicted: Vec<f64> = cands.iter().map(|&i| ctx.predicted_ttft_ms(i)).collect();
                let best = predicted.iter().copied().fold(f64::INFINITY, f64::min);
                for (o, t) in out.iter_mut().zip(predicted) {
                    *o = 1.0 / (1.0 + (t - best).max(0.0) / p.scale_ms.max(1e-3));
                }
            }
            Self::LoadAware(p) => {
                for (o, &i) in out.iter_mut().zip(cands) {
                    *o = match ctx.metrics(i).map(|m| u64::from(m.waiting)) {
                        None => 0.0,
                        Some(0) => 0.5,
                        Some(q) => 0.5 * (1.0 - q.min(p.threshold) as f64 / p.threshold.max(1) as f64),
                    };
                }
            }
            Self::LoraAffinity => {
                let adapter = !ctx.input.pool_models.iter().any(|m| m == req.model);
                for (o, &i) in out.iter_mut().zip(cands) {
                    *o = if !adapter {
                        1.0
                    } else {
                        match ctx.metrics(i).and_then(|m| m.lora.as_ref()) {
                            None => 0.0,
                            Some(l) if l.running.iter().any(|a| a == req.model) => 1.0,
                            Some(l) if ((l.running.len() + l.waiting.len()) as u64) < u64::from(l.max_loras) => 0.8,
                            Some(l) if l.waiting.iter().any(|a| a == req.model) => 0.6,
                            Some(_) => 0.0,
                        }
                    };
                }
            }
            Self::NoHitLru(_, state) => {
                if !ctx.cold(cands) {
                    out.fill(0.5);
                    return;
                }
                // Rank by last cold assignment, never-assigned first, then by id: a total order,
                // so cold requests rotate over idle endpoints instead of colliding at random.
                let state = state.lock();
                let mut order: Vec<(u64, EndpointId, usize)> =
                    cands.iter().enumerate().map(|(pos, &i)| (state.last(ep(i).id), ep(i).id, pos)).collect();
                drop(state);
                order.sort_unstable();
                let n = order.len();
                for (rank, &(_, _, pos)) in order.iter().enumerate() {
                    out[pos] = if n == 1 { 1.0 } else { 1.0 - rank as f64 / (n - 1) as f64 };
                }
            }
        }
    }

    /// Lets a stateful scorer learn the outcome of a decision.
    pub(super) fn on_pick(&self, ctx: &Ctx<'_>, cands: &[usize], picked: usize) {
        if let Self::NoHitLru(_, state) = self {
            if !ctx.cold(cands) {
                return;
            }
            let mut s = state.lock();
            s.seq += 1;
            let (seq, i) = (s.seq, ctx.input.endpoints[picked].id.index());
            if s.last.len() <= i {
                s.last.resize(i + 1, 0);
            }
            s.last[i] = seq;
        }
    }
}
