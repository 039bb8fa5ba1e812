//! Cache feedback: what an endpoint reported cached against what the approximate index
//! predicted for it, and the correction of the endpoint's index capacity that follows.

use super::Routed;
use crate::gateway::pool::cluster::{Lesson, endpoint_key};
use crate::gateway::telemetry::Usage;

impl Routed {
    /// Compares what the target reported cached with what the approximate index predicted
    /// for it; a difference beyond a block corrects the target's index capacity.
    pub(super) fn cache_feedback(&self, usage: Usage) {
        let Some(cached) = usage.cached_reported.then_some(usage.cached) else { return };
        let planned = &self.planned;
        if planned.decision.prefill.is_some() || planned.precise_targets.get(self.current) != Some(&false) {
            return;
        }
        let t = self.target();
        let cfg = self.pool.planner().prefix_config();
        // This request's own bytes per token: blocks of prompt bytes in its tokens.
        let bytes = planned.prompt.prompt_bytes.max(1) as f64;
        let block_tokens = cfg.block_bytes as f64 * usage.prompt as f64 / bytes;
        if block_tokens < 1.0 {
            return;
        }
        let predicted = f64::from(t.matched_blocks) * block_tokens;
        // Slack: one kvgate block (a turn's last bytes differ) and one engine block (vLLM caches
        // whole blocks of 16 and always computes the last token).
        let slack = block_tokens + 16.0;
        let cached = cached as f64;
        let index = self.pool.planner().index();
        let telemetry = self.pool.telemetry();
        if predicted > cached + slack {
            let missing = ((predicted - cached - 16.0) / block_tokens) as usize;
            index.held_less(t.id, missing);
            self.share_held(missing as u64, 0);
            telemetry.index_corrections.with_label_values(&[self.pool.name(), "held_less"]).inc();
        } else if cached > predicted + slack {
            let extra = ((cached - predicted - 16.0) / block_tokens) as usize;
            index.held_more(t.id, extra);
            self.share_held(0, extra as u64);
            telemetry.index_corrections.with_label_values(&[self.pool.name(), "held_more"]).inc();
        }
    }

    /// Cache feedback on the target, told to the peer replicas too.
    fn share_held(&self, less: u64, more: u64) {
        if let Some(c) = self.pool.cluster() {
            let endpoint = endpoint_key(&self.snapshot.endpoints[self.target().index]);
            c.learned(self.pool.name(), Lesson::Held { endpoint, less, more });
        }
    }
}
