//! Failure injection, for tests that need an endpoint to fail, stall or degrade on demand.
//!
//! Set at start with `--failure-rate` / `--failure-types` / `--slow-start-ms`, and at runtime with
//! `POST /admin/faults` (`GET` shows the current settings), which can also pause the simulator:
//! while paused it refuses new work with 503 and `/health` answers 503.

use serde::{Deserialize, Serialize};

/// One kind of injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// HTTP 500.
    #[value(name = "500")]
    #[serde(rename = "500")]
    ServerError,
    /// HTTP 429.
    #[value(name = "429")]
    #[serde(rename = "429")]
    RateLimit,
    /// HTTP 503.
    #[value(name = "503")]
    #[serde(rename = "503")]
    Unavailable,
    /// Never answer (until the client gives up).
    Hang,
    /// Cut the response off part-way (mid-stream for streams).
    Abort,
    /// Delay the start of processing by `slow_start_ms`.
    SlowStart,
    /// Close the connection without an answer, once the request is read — as a server closes
    /// a kept-alive connection it has timed out just as a request arrives on it.
    Reset,
}

/// Current failure settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Faults {
    /// Probability in [0, 1] that a request fails.
    pub failure_rate: f64,
    /// Kinds to choose from (uniformly) when a request fails.
    pub failure_types: Vec<FaultKind>,
    /// Delay for `slow-start`.
    pub slow_start_ms: u64,
    /// Refuse all new work (503) and fail `/health`.
    pub paused: bool,
    /// The next this many requests fail for sure, with the first of `failure_types` (then
    /// `failure_rate` applies again).
    pub fail_next: u32,
    /// The next this many KV-event batches are lost on the way (their sequence numbers are
    /// used and replay still has them), as a PUB socket past its high-water mark drops them.
    pub kv_events_drop_next: u32,
    /// KV-event batches are held back (not lost) while set, and sent in order once cleared.
    pub kv_events_stalled: bool,
    /// Streams stay open this long after their last event (`[DONE]`) before they end, as a
    /// server slow to close its responses.
    pub linger_after_done_ms: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            failure_rate: 0.0,
            failure_types: vec![FaultKind::ServerError, FaultKind::RateLimit, FaultKind::Unavailable],
            slow_start_ms: 2000,
            paused: false,
            fail_next: 0,
            kv_events_drop_next: 0,
            kv_events_stalled: false,
            linger_after_done_ms: 0,
        }
    }
}

impl Faults {
    /// Rejects settings that make no sense.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(format!("failure_rate must be in [0, 1], got {}", self.failure_rate));
        }
        if (self.failure_rate > 0.0 || self.fail_next > 0) && self.failure_types.is_empty() {
            return Err("failure_types must name at least one kind when failure_rate or fail_next is set".into());
        }
        Ok(())
    }

    /// Draws the fault (if any) for one request, counting down `fail_next`.
    pub(crate) fn draw(&mut self, rng: &mut fastrand::Rng) -> Option<FaultKind> {
        if self.fail_next > 0
            && let Some(&kind) = self.failure_types.first()
        {
            self.fail_next -= 1;
            return Some(kind);
        }
        if self.failure_rate <= 0.0 || self.failure_types.is_empty() || rng.f64() >= self.failure_rate {
            return None;
        }
        Some(self.failure_types[rng.usize(..self.failure_types.len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_rate() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut f = Faults { failure_rate: 0.25, failure_types: vec![FaultKind::Hang], ..Faults::default() };
        let hits = (0..4000).filter(|_| f.draw(&mut rng).is_some()).count();
        assert!((800..1200).contains(&hits), "{hits}");
        assert_eq!(Faults::default().draw(&mut rng), None);
        assert!(Faults { failure_rate: 2.0, ..Faults::default() }.validate().is_err());
        let parsed: Faults =
            serde_json::from_str(r#"{"failure_rate":1,"failure_types":["429","hang","slow-start"]}"#).expect("parses");
        assert_eq!(parsed.failure_types, [FaultKind::RateLimit, FaultKind::Hang, FaultKind::SlowStart]);
        // `fail_next` fails exactly that many, then the rate (none here) rules again.
        let mut f: Faults = serde_json::from_str(r#"{"fail_next":2,"failure_types":["reset","500"]}"#).expect("parses");
        let draws: Vec<_> = (0..4).map(|_| f.draw(&mut rng)).collect();
        assert_eq!(draws, [Some(FaultKind::Reset), Some(FaultKind::Reset), None, None]);
    }
}
