//! Pickers: turn scored candidates into an ordered list, best first (the first is the target,
//! the rest are fallbacks).

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Deserialize;

use crate::routing::endpoint::EndpointId;

/// Parameters every picker takes.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PickerParams {
    /// Endpoints a decision lists: the target plus fallbacks, in order (default 1). Unset, the
    /// server's `extproc.max_endpoints` decides what Envoy is sent (see
    /// `routing::plan::endpoints_listed`).
    pub max_num_of_endpoints: Option<usize>,
}

/// A picker plugin.
#[derive(Debug)]
pub enum Picker {
    /// `max-score-picker`: highest total first; ties broken uniformly at random.
    MaxScore(PickerParams),
    /// `weighted-random-picker`: random, with probability growing with the score (A-Res).
    WeightedRandom(PickerParams),
    /// `random-picker`: uniform random order.
    Random(PickerParams),
    /// `round-robin-picker`: rotates over the candidates in id order, ignoring scores (a
    /// baseline for benchmarks).
    RoundRobin(PickerParams, AtomicUsize),
}

/// One scored candidate.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scored {
    /// Index into the snapshot.
    pub(super) index: usize,
    pub(super) id: EndpointId,
    pub(super) total: f64,
}

impl Picker {
    /// How many endpoints the picker returns.
    pub fn max_endpoints(&self) -> usize {
        self.max_endpoints_set().unwrap_or(1)
    }

    /// `maxNumOfEndpoints`, when the config sets it.
    pub fn max_endpoints_set(&self) -> Option<usize> {
        match self {
            Self::MaxScore(p) | Self::WeightedRandom(p) | Self::Random(p) | Self::RoundRobin(p, _) => {
                p.max_num_of_endpoints.map(|n| n.max(1))
            }
        }
    }

    /// Puts the best `k` of `cands` first, in order (the order of the rest is unspecified).
    pub(super) fn order(&self, cands: &mut [Scored], rng: &mut fastrand::Rng, k: usize) {
        let k = k.min(cands.len());
        if k == 0 {
            return;
        }
        let desc = |a: &Scored, b: &Scored| b.total.total_cmp(&a.total);
        match self {
            Self::MaxScore(_) => {
                // Shuffle first: comparisons then see tied candidates in a uniformly random
                // order, so ties are broken at random. Then select the top k and sort only them.
                rng.shuffle(cands);
                if k < cands.len() {
                    cands.select_nth_unstable_by(k - 1, desc);
                }
                cands[..k].sort_by(desc);
            }
            Self::Random(_) => rng.shuffle(cands),
            Self::WeightedRandom(_) => {
                if cands.iter().all(|c| c.total <= 0.0) {
                    rng.shuffle(cands);
                    return;
                }
                // Efraimidis–Spirakis: key = u^(1/w), largest first; w <= 0 sorts last. The key
                // replaces the total, which the caller has already recorded.
                for c in cands.iter_mut() {
                    c.total = if c.total > 0.0 { rng.f64().powf(1.0 / c.total) } else { -1.0 };
                }
                rng.shuffle(cands);
                cands.sort_by(desc);
            }
            Self::RoundRobin(_, next) => {
                cands.sort_by_key(|c| c.id);
                let start = next.fetch_add(1, Ordering::Relaxed) % cands.len();
                cands.rotate_left(start);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(totals: &[f64]) -> Vec<Scored> {
        totals.iter().enumerate().map(|(i, &total)| Scored { index: i, id: EndpointId::new(i as u32), total }).collect()
    }

    fn order(p: &Picker, totals: &[f64], seed: u64) -> Vec<usize> {
        let mut c = scored(totals);
        p.order(&mut c, &mut fastrand::Rng::with_seed(seed), totals.len());
        c.iter().map(|c| c.index).collect()
    }

    #[test]
    fn max_score_orders_and_breaks_ties_at_random() {
        let p = Picker::MaxScore(PickerParams::default());
        assert_eq!(order(&p, &[0.1, 0.9, 0.5], 1), [1, 2, 0]);
        let firsts: std::collections::HashSet<usize> =
            (0..64).map(|s| order(&p, &[1.0, 1.0, 1.0, 0.0], s)[0]).collect();
        assert_eq!(firsts.len(), 3, "ties must be broken among all tied candidates");
        assert!(!firsts.contains(&3));
        // Top-k selection agrees with a full sort.
        let totals = [0.3, 0.9, 0.1, 0.7, 0.5, 0.8];
        let mut c = scored(&totals);
        p.order(&mut c, &mut fastrand::Rng::with_seed(9), 3);
        assert_eq!(c[..3].iter().map(|c| c.index).collect::<Vec<_>>(), [1, 5, 3]);
    }

    #[test]
    fn round_robin_rotates() {
        let p = Picker::RoundRobin(PickerParams::default(), AtomicUsize::new(0));
        let firsts: Vec<usize> = (0..6).map(|_| order(&p, &[0.0, 5.0, 1.0], 0)[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weighted_random_follows_weights() {
        let p = Picker::WeightedRandom(PickerParams::default());
        let mut rng = fastrand::Rng::with_seed(7);
        let mut wins = [0u32; 3];
        for _ in 0..3000 {
            let mut c = scored(&[1.0, 3.0, 0.0]);
            p.order(&mut c, &mut rng, 1);
            wins[c[0].index] += 1;
        }
        assert_eq!(wins[2], 0, "zero weight never wins");
        // P(key_b > key_a) = w_b / (w_a + w_b) = 0.75.
        assert!((2000..2500).contains(&wins[1]), "{wins:?}");
    }
}
