//! Predicted time to first token, learned online per endpoint.
//!
//! The model: a request sent to an endpoint waits for the prefill work queued before it and
//! then computes its own uncached tokens, while the endpoint's running decodes share each step:
//!
//! ```text
//! TTFT ≈ fixed + (tokens ahead + own uncached tokens) / prefill rate + decodes × per-decode cost
//! ```
//!
//! `fixed` covers the network, the API server and scheduling; `tokens ahead` are kvgate's own
//! in-flight prefill tokens on the endpoint (current, not scraped). The three coefficients are
//! fitted by recursive least squares over the samples kvgate measures (each streamed
//! request's work at send time and its time to first byte), with
//! - **forgetting** (λ = 0.97 per sample, and more when samples are far apart), so old
//!   samples fade and a changed endpoint is relearned within tens of requests;
//! - **clipped residuals** (Huber): an error beyond three times the running mean error counts as
//!   three, so a stalled request or a GC pause moves the fit only a little;
//! - **priors** that the fit starts from and its uncertainty never exceeds: 25 ms fixed,
//!   15,928 prefill tokens/s (an 8B model on one H100), no decode interference.
//!
//! Part of the decision core: no I/O, no clock. Predictions read three atomics; a sample takes a
//! short lock.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Prior fixed cost, ms.
pub const PRIOR_FIXED_MS: f64 = 25.0;
/// Prior prefill rate, tokens per second.
pub const PRIOR_PREFILL_TOKENS_PER_S: f64 = 15_928.0;
/// Per-sample forgetting factor.
const LAMBDA: f64 = 0.97;
/// Samples further apart than this forget more (one extra λ per such interval, up to 20).
const FORGET_EVERY_MS: u64 = 10_000;
/// Residuals beyond this many running mean errors are clipped.
const CLIP: f64 = 3.0;
/// Samples above this are not learned from (a stuck request says nothing about prefill).
const MAX_SAMPLE_MS: f64 = 120_000.0;

/// Feature scaling: work in thousands of tokens keeps the fit well conditioned.
const KTOK: f64 = 1000.0;

fn prior() -> [f64; 3] {
    [PRIOR_FIXED_MS, KTOK * 1000.0 / PRIOR_PREFILL_TOKENS_PER_S, 0.0]
}

/// Prior variances: how far each coefficient may plausibly be from its prior
/// (50 ms, 60 ms per thousand tokens, 5 ms per decode).
const PRIOR_VAR: [f64; 3] = [2500.0, 3600.0, 25.0];
/// Bounds that keep a fit physical: fixed in [0, 30 s], 0.01–10,000 ms per thousand tokens
/// (100M to 100 tokens/s), decode cost in [0, 1 s].
const LO: [f64; 3] = [0.0, 0.01, 0.0];
const HI: [f64; 3] = [30_000.0, 10_000.0, 1000.0];

/// One measured request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TtftSample {
    /// Prefill tokens ahead of it when it was sent, plus its own uncached tokens.
    pub work_tokens: u64,
    /// Requests in decode on the endpoint when it was sent.
    pub decodes: u64,
    /// Its measured time to first byte, ms.
    pub ttft_ms: f64,
    /// When it was sent (monotonic ms).
    pub at_ms: u64,
}

/// The fitted coefficients, for `/debug/endpoints` and `/debug/explain`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TtftParams {
    /// Fixed cost per request, ms.
    pub fixed_ms: f64,
    /// Prefill rate, tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Extra ms per request in decode.
    pub decode_ms: f64,
    /// Samples learned from.
    pub samples: u64,
    /// Running mean absolute error of predictions, ms.
    pub mean_error_ms: f64,
}

#[derive(Debug)]
struct Fit {
    theta: [f64; 3],
    p: [[f64; 3]; 3],
    samples: u64,
    mean_error: f64,
    last_ms: Option<u64>,
}

/// One endpoint's TTFT model.
#[derive(Debug)]
pub struct TtftModel {
    /// The coefficients as f64 bits, read without the lock.
    theta: [AtomicU64; 3],
    fit: Mutex<Fit>,
}

impl Default for TtftModel {
    fn default() -> Self {
        let theta = prior();
        let mut p = [[0.0; 3]; 3];
        for (i, row) in p.iter_mut().enumerate() {
            row[i] = PRIOR_VAR[i];
        }
        Self {
            theta: theta.map(|t| AtomicU64::new(t.to_bits())),
            fit: Mutex::new(Fit { theta, p, samples: 0, mean_error: 20.0, last_ms: None }),
        }
    }
}

impl TtftModel {
    fn coefficients(&self) -> [f64; 3] {
        [0, 1, 2].map(|i| f64::from_bits(self.theta[i].load(Ordering::Relaxed)))
    }

    /// The learned prefill rate, tokens per second.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        let ms_per_ktok = self.coefficients()[1];
        if ms_per_ktok > 0.0 { KTOK * 1000.0 / ms_per_ktok } else { f64::INFINITY }
    }

    /// Expected TTFT in ms for a request whose prefill work (tokens ahead + its own uncached
    /// tokens) is `work_tokens`, with `decodes` requests in decode.
    pub fn predict_ms(&self, work_tokens: u64, decodes: u64) -> f64 {
        let t = self.coefficients();
        (t[0] + t[1] * work_tokens as f64 / KTOK + t[2] * decodes as f64).max(0.0)
    }

    /// Learns from one measured request.
    // Index loops read as the matrix algebra they are.
    #[allow(clippy::needless_range_loop)]
    pub fn observe(&self, s: TtftSample) {
        if !s.ttft_ms.is_finite() || s.ttft_ms < 0.0 || s.ttft_ms > MAX_SAMPLE_MS {
            return;
        }
        let x = [1.0, s.work_tokens as f64 / KTOK, s.decodes as f64];
        let mut f = self.fit.lock();
        // Far-apart samples forget more: what the endpoint did a minute ago says less.
        let gap = f.last_ms.map_or(0, |l| s.at_ms.saturating_sub(l));
        f.last_ms = Some(f.last_ms.map_or(s.at_ms, |l| l.max(s.at_ms)));
        let lambda = LAMBDA.powi(1 + (gap / FORGET_EVERY_MS).min(20) as i32);
        let predicted: f64 = (0..3).map(|i| f.theta[i] * x[i]).sum();
        let err = s.ttft_ms - predicted;
        let bound = CLIP * f.mean_error.max(2.0);
        f.mean_error = (0.9 * f.mean_error + 0.1 * err.abs().min(bound)).min(MAX_SAMPLE_MS);
        // k = P x / (λ + xᵀ P x); θ += k e; P = (P − k xᵀ P) / λ — over the coefficients that
        // stay within their bounds: one that would leave them is held at its bound and the
        // update is made again without it (clamping after the fact lets confounded
        // coefficients drift apart without end).
        let mut pinned: [Option<f64>; 3] = [None; 3];
        let (theta, px, denom) = loop {
            let mut theta = f.theta;
            for i in 0..3 {
                if let Some(v) = pinned[i] {
                    theta[i] = v;
                }
            }
            let fixed = pinned.map(|p| p.is_some());
            let xf: [f64; 3] = [0, 1, 2].map(|i| if fixed[i] { 0.0 } else { x[i] });
            let e = s.ttft_ms - (0..3).map(|i| theta[i] * x[i]).sum::<f64>();
            let e = e.clamp(-bound, bound);
            let px: [f64; 3] = [0, 1, 2].map(|i| (0..3).map(|j| f.p[i][j] * xf[j]).sum());
            let denom = lambda + (0..3).map(|i| xf[i] * px[i]).sum::<f64>();
            let k: [f64; 3] = [0, 1, 2].map(|i| if fixed[i] { 0.0 } else { px[i] / denom });
            let mut out = false;
            for i in 0..3 {
                theta[i] += k[i] * e;
                if !fixed[i] && !(LO[i]..=HI[i]).contains(&theta[i]) {
                    // Held where it crossed its bound.
                    pinned[i] = Some(theta[i].clamp(LO[i], HI[i]));
                    out = true;
                }
            }
            if !out || pinned.iter().all(Option::is_some) {
                break (theta, px, denom);
            }
        };
        for i in 0..3 {
            f.theta[i] = theta[i].clamp(LO[i], HI[i]);
        }
        let mut p = f.p;
        for i in 0..3 {
            for j in 0..3 {
                p[i][j] = (f.p[i][j] - px[i] * px[j] / denom) / lambda;
            }
        }
        // Forgetting inflates the directions samples do not excite (no decodes, say) without
        // bound; cap each variance at its prior (a congruence scaling, so P stays positive).
        for i in 0..3 {
            if p[i][i] > PRIOR_VAR[i] {
                let s = (PRIOR_VAR[i] / p[i][i]).sqrt();
                for j in 0..3 {
                    p[i][j] *= s;
                    p[j][i] *= s;
                }
            }
        }
        f.p = p;
        f.samples += 1;
        for i in 0..3 {
            self.theta[i].store(f.theta[i].to_bits(), Ordering::Relaxed);
        }
    }

    /// The fitted coefficients.
    pub fn params(&self) -> TtftParams {
        let f = self.fit.lock();
        TtftParams {
            fixed_ms: f.theta[0],
            prefill_tokens_per_s: KTOK * 1000.0 / f.theta[1],
            decode_ms: f.theta[2],
            samples: f.samples,
            mean_error_ms: f.mean_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(m: &TtftModel, rng: &mut fastrand::Rng, n: usize, truth: impl Fn(u64, u64) -> f64, noise: f64) {
        for k in 0..n {
            let work = rng.u64(0..8000);
            let decodes = rng.u64(0..32);
            let ttft = truth(work, decodes) + (rng.f64() - 0.5) * 2.0 * noise;
            m.observe(TtftSample { work_tokens: work, decodes, ttft_ms: ttft, at_ms: k as u64 * 10 });
        }
    }

    #[test]
    fn starts_at_the_priors() {
        let m = TtftModel::default();
        let p = m.params();
        assert_eq!((p.fixed_ms, p.samples), (PRIOR_FIXED_MS, 0));
        assert!((p.prefill_tokens_per_s - PRIOR_PREFILL_TOKENS_PER_S).abs() < 1e-6);
        assert!((m.predict_ms(15_928, 0) - (PRIOR_FIXED_MS + 1000.0)).abs() < 1e-6);
    }

    #[test]
    fn learns_an_endpoint_and_follows_a_change() {
        let m = TtftModel::default();
        let mut rng = fastrand::Rng::with_seed(7);
        // 40 ms fixed, 5,000 tokens/s, 3 ms per decode.
        feed(&m, &mut rng, 300, |w, d| 40.0 + w as f64 / 5.0 + 3.0 * d as f64, 5.0);
        let p = m.params();
        assert!((p.fixed_ms - 40.0).abs() < 8.0, "{p:?}");
        assert!((p.prefill_tokens_per_s - 5000.0).abs() < 250.0, "{p:?}");
        assert!((p.decode_ms - 3.0).abs() < 0.5, "{p:?}");
        // The endpoint gets twice as fast (another GPU behind the same address).
        feed(&m, &mut rng, 200, |w, d| 40.0 + w as f64 / 10.0 + 3.0 * d as f64, 5.0);
        let p = m.params();
        assert!((p.prefill_tokens_per_s - 10_000.0).abs() < 800.0, "{p:?}");
    }

    #[test]
    fn outliers_move_it_little() {
        let m = TtftModel::default();
        let mut rng = fastrand::Rng::with_seed(3);
        let truth = |w: u64, _| 30.0 + w as f64 / 8.0;
        feed(&m, &mut rng, 200, truth, 2.0);
        let before = m.predict_ms(4000, 0);
        // One request in twenty stalls for ten seconds.
        for k in 0..100u64 {
            let work = rng.u64(0..8000);
            let ttft = if k % 20 == 0 { 10_000.0 } else { truth(work, 0) };
            m.observe(TtftSample { work_tokens: work, decodes: 0, ttft_ms: ttft, at_ms: 10_000 + k });
        }
        let after = m.predict_ms(4000, 0);
        assert!((after - before).abs() < 0.1 * before, "{before} → {after}");
        // Garbage is ignored.
        m.observe(TtftSample { work_tokens: 1, decodes: 0, ttft_ms: f64::NAN, at_ms: 0 });
        m.observe(TtftSample { work_tokens: 1, decodes: 0, ttft_ms: 1e9, at_ms: 0 });
        assert!(m.predict_ms(4000, 0).is_finite());
    }

    #[test]
    fn stays_physical_on_degenerate_samples() {
        let m = TtftModel::default();
        // Always the same work: only the sum is identifiable; neither term may go negative.
        for k in 0..500u64 {
            m.observe(TtftSample { work_tokens: 100, decodes: 0, ttft_ms: 1.0, at_ms: k });
        }
        let p = m.params();
        assert!(p.fixed_ms >= 0.0 && p.prefill_tokens_per_s > 0.0 && p.decode_ms >= 0.0, "{p:?}");
        assert!(m.predict_ms(100, 0) < 10.0, "{p:?}");
    }
}
