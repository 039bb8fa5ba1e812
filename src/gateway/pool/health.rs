//! Whether an endpoint is in rotation: consecutive failures take it out for a backoff that
//! doubles with each failed probe; a success while probing brings it back.

use super::PoolSettings;
use crate::routing::endpoint::Health;

/// An endpoint's health bookkeeping.
#[derive(Debug, Clone)]
pub(super) struct HealthState {
    failures: u32,
    /// Out of rotation until this time (ms); afterwards the next scrape is a probe.
    pub(super) down_until: Option<u64>,
    backoff_ms: u64,
}

impl HealthState {
    pub(super) fn new(settings: &PoolSettings) -> Self {
        Self { failures: 0, down_until: None, backoff_ms: settings.initial_backoff.as_millis() as u64 }
    }

    pub(super) fn state(&self, now: u64) -> Health {
        match self.down_until {
            None => Health::Healthy,
            Some(t) if now < t => Health::Unhealthy,
            Some(_) => Health::Probing,
        }
    }

    pub(super) fn failure(&mut self, now: u64, s: &PoolSettings) {
        self.failures += 1;
        match self.state(now) {
            Health::Healthy if self.failures >= s.failure_threshold => self.down_until = Some(now + self.backoff_ms),
            Health::Probing => {
                self.backoff_ms = (self.backoff_ms * 2).min(s.max_backoff.as_millis() as u64);
                self.down_until = Some(now + self.backoff_ms);
            }
            _ => {}
        }
    }

    pub(super) fn success(&mut self, now: u64, s: &PoolSettings) {
        match self.state(now) {
            Health::Unhealthy => {}
            Health::Healthy | Health::Probing => {
                self.failures = 0;
                self.down_until = None;
                self.backoff_ms = s.initial_backoff.as_millis() as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn health_backs_off_and_probes() {
        let s = PoolSettings {
            failure_threshold: 2,
            initial_backoff: Duration::from_millis(100),
            ..PoolSettings::default()
        };
        let mut h = HealthState::new(&s);
        h.failure(0, &s);
        assert_eq!(h.state(0), Health::Healthy, "one failure is not enough");
        h.failure(10, &s);
        assert_eq!(h.state(10), Health::Unhealthy);
        assert_eq!(h.state(109), Health::Unhealthy);
        assert_eq!(h.state(110), Health::Probing);
        h.success(50, &s);
        assert_eq!(h.state(50), Health::Unhealthy, "success while down does not cut the backoff short");
        h.failure(120, &s); // failed probe: 200 ms now
        assert_eq!(h.state(319), Health::Unhealthy);
        assert_eq!(h.state(320), Health::Probing);
        h.success(330, &s);
        assert_eq!(h.state(330), Health::Healthy);
        h.failure(400, &s);
        h.failure(401, &s);
        assert_eq!(h.state(401 + 99), Health::Unhealthy, "backoff reset after recovery");
        assert_eq!(h.state(401 + 100), Health::Probing);
    }
}
