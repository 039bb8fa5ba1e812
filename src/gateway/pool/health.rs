//! Whether an endpoint is in rotation — outlier detection after Envoy's model, not a trip-wire.
//!
//! Three things take an endpoint out ("eject" it): silence — a scrape unanswered, asked again
//! on a new connection, and still unanswered `unresponsive` after it was first sent, with no
//! byte of any response from the endpoint meanwhile (a stopped process, whose kernel still
//! accepts connections, looks exactly so); `failure_threshold` consecutive failures to reach it
//! (refused or broken connects, failed scrapes); or an error rate well above its pool's,
//! counting 5xx and requests it took but did not answer in time (the pool decides that, since
//! it needs the other endpoints' rates and the ejection cap). Errors an endpoint's own load explains (429, 503 with a queue) are load, not failure, and never eject.
//!
//! An ejected endpoint stays out for the base backoff, doubled for each ejection that follows
//! soon after the last recovery (a flapping endpoint is held out longer and longer), then is
//! probed by its scraper: an answer brings it back at once, a failed probe keeps it out for the
//! same time again. So an endpoint that comes back is in rotation within one backoff of
//! answering, whatever happened before.

use super::PoolSettings;
use crate::routing::endpoint::Health;

/// Request outcomes kept per endpoint for its error rate.
const WINDOW: u32 = 64;

/// Why an endpoint is out of rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ejected {
    /// It could not be reached.
    Unreachable,
    /// It is silent: it takes questions and answers none (stopped, or wedged).
    Unresponsive,
    /// It answers, with an error rate well above its pool's.
    Outlier,
}

/// An endpoint's health bookkeeping.
#[derive(Debug, Clone)]
pub(super) struct HealthState {
    /// Consecutive failures to reach it.
    unreachable: u32,
    /// Out of rotation until this time (ms), and why; afterwards the next scrape is a probe.
    pub(super) down_until: Option<u64>,
    pub(super) reason: Option<Ejected>,
    /// Ejections in a row (each one soon after the last recovery).
    ejections: u32,
    /// When it last came back (ms).
    recovered_at: Option<u64>,
    /// The last `WINDOW` request outcomes, newest in bit 0: 1 for an error.
    outcomes: u64,
    /// How many of them are recorded.
    recorded: u32,
}

impl HealthState {
    pub(super) fn new() -> Self {
        Self {
            unreachable: 0,
            down_until: None,
            reason: None,
            ejections: 0,
            recovered_at: None,
            outcomes: 0,
            recorded: 0,
        }
    }

    pub(super) fn state(&self, now: u64) -> Health {
        match self.down_until {
            None => Health::Healthy,
            Some(t) if now < t => Health::Unhealthy,
            Some(_) => Health::Probing,
        }
    }

    /// Out of rotation, for whatever reason.
    pub(super) fn is_down(&self) -> bool {
        self.down_until.is_some()
    }

    /// The endpoint took a request but did not answer it in time: an error for its error rate;
    /// while it is being probed, a failed probe (out again for as long as before).
    pub(super) fn timed_out(&mut self, now: u64, s: &PoolSettings) {
        self.record(true);
        if self.state(now) == Health::Probing {
            self.probe_failed(now, s);
        }
    }

    /// A failed probe: out again for as long as before, not longer — it is not flapping, it is
    /// still down.
    fn probe_failed(&mut self, now: u64, s: &PoolSettings) {
        self.down_until = Some(now + self.ejection_ms(s));
    }

    /// The endpoint could not be reached.
    pub(super) fn unreachable(&mut self, now: u64, s: &PoolSettings) {
        self.unreachable += 1;
        match self.state(now) {
            Health::Healthy if self.unreachable >= s.failure_threshold => self.eject(Ejected::Unreachable, now, s),
            Health::Probing => self.probe_failed(now, s),
            _ => {}
        }
    }

    /// The endpoint is silent (see the module's doc). Returns whether what it was sent should
    /// be given up: it is ejected now, or a probe found it still silent (requests sent to it
    /// since, by a snapshot that had not caught up, are as lost as the first ones).
    pub(super) fn unresponsive(&mut self, now: u64, s: &PoolSettings) -> bool {
        self.unreachable += 1;
        match self.state(now) {
            Health::Healthy => {
                self.eject(Ejected::Unresponsive, now, s);
                true
            }
            Health::Probing => {
                self.reason = Some(Ejected::Unresponsive);
                self.probe_failed(now, s);
                true
            }
            Health::Unhealthy => false,
        }
    }

    /// The endpoint answered (a scrape, or a response of any status).
    pub(super) fn answered(&mut self, now: u64) {
        self.unreachable = 0;
        if self.state(now) == Health::Probing {
            self.down_until = None;
            self.reason = None;
            self.recovered_at = Some(now);
            // It must show a high error rate anew before it is ejected again.
            self.outcomes = 0;
            self.recorded = 0;
        }
    }

    /// Records a request's outcome for the error rate.
    pub(super) fn record(&mut self, error: bool) {
        // A 64-bit window: the shift drops the oldest outcome.
        self.outcomes = self.outcomes << 1 | u64::from(error);
        self.recorded = (self.recorded + 1).min(WINDOW);
    }

    /// `(errors, outcomes)` in the window.
    pub(super) fn error_counts(&self) -> (u32, u32) {
        (self.outcomes.count_ones(), self.recorded)
    }

    /// Takes the endpoint out of rotation.
    pub(super) fn eject(&mut self, reason: Ejected, now: u64, s: &PoolSettings) {
        // An ejection soon after the last recovery is flapping: it doubles the time out.
        let soon = self.recovered_at.is_some_and(|t| now.saturating_sub(t) < s.max_backoff.as_millis() as u64);
        self.ejections = if soon { self.ejections + 1 } else { 1 };
        self.reason = Some(reason);
        self.down_until = Some(now + self.ejection_ms(s));
    }

    fn ejection_ms(&self, s: &PoolSettings) -> u64 {
        let base = s.initial_backoff.as_millis() as u64;
        let doubled = base.saturating_mul(1 << self.ejections.saturating_sub(1).min(20));
        doubled.min(s.max_backoff.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings() -> PoolSettings {
        PoolSettings {
            failure_threshold: 2,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..PoolSettings::default()
        }
    }

    #[test]
    fn unreachable_endpoints_are_ejected_and_come_back_at_the_first_answer() {
        let s = settings();
        let mut h = HealthState::new();
        h.unreachable(0, &s);
        assert_eq!(h.state(0), Health::Healthy, "one failure is not enough");
        h.unreachable(10, &s);
        assert_eq!((h.state(10), h.reason), (Health::Unhealthy, Some(Ejected::Unreachable)));
        assert_eq!(h.state(109), Health::Unhealthy);
        assert_eq!(h.state(110), Health::Probing);
        h.answered(50);
        assert_eq!(h.state(50), Health::Unhealthy, "an answer while out does not cut the time short");
        // Failed probes keep it out for the same time, however many: a restarted endpoint is
        // back within one backoff of answering.
        for t in [120, 220, 320, 420] {
            h.unreachable(t, &s);
            assert_eq!(h.state(t + 99), Health::Unhealthy);
            assert_eq!(h.state(t + 100), Health::Probing, "probe at {t}");
        }
        // A request that times out while it is being probed is a failed probe too.
        h.timed_out(525, &s);
        assert_eq!(h.state(525), Health::Unhealthy, "a probe that timed out");
        assert_eq!(h.state(625), Health::Probing);
        h.answered(630);
        assert_eq!((h.state(630), h.reason), (Health::Healthy, None));
        // Healthy, a timeout is one error for the error rate, not a step towards ejection.
        for t in 0..5 {
            h.timed_out(700 + t, &s);
        }
        assert_eq!((h.state(710), h.error_counts()), (Health::Healthy, (5, 5)));
    }

    #[test]
    fn a_silent_endpoint_is_ejected_at_once_and_stays_out_while_silent() {
        let s = settings();
        let mut h = HealthState::new();
        assert!(h.unresponsive(0, &s), "one silence ejects: it was asked, and waited for");
        assert_eq!((h.state(0), h.reason), (Health::Unhealthy, Some(Ejected::Unresponsive)));
        assert!(!h.unresponsive(50, &s), "already out: nothing new to give up");
        assert_eq!(h.state(100), Health::Probing);
        assert!(h.unresponsive(100, &s), "a silent probe: out again, and its requests given up");
        assert_eq!((h.state(199), h.state(200)), (Health::Unhealthy, Health::Probing));
        h.answered(200);
        assert_eq!((h.state(200), h.reason), (Health::Healthy, None));
    }

    #[test]
    fn a_flapping_endpoint_is_held_out_longer_each_time() {
        let s = settings();
        let mut h = HealthState::new();
        let mut now = 0;
        let mut out_for = Vec::new();
        for _ in 0..5 {
            h.unreachable(now, &s);
            h.unreachable(now, &s);
            let until = h.down_until.expect("ejected");
            out_for.push(until - now);
            now = until;
            h.answered(now);
            now += 10; // fails again soon after coming back
        }
        assert_eq!(out_for, [100, 200, 400, 800, 1000], "doubling up to max_backoff");
        // Stable for max_backoff: the next ejection is a first one again.
        now += 1000;
        h.unreachable(now, &s);
        h.unreachable(now, &s);
        assert_eq!(h.down_until.map(|t| t - now), Some(100));
    }

    #[test]
    fn the_error_window_keeps_the_last_outcomes() {
        let mut h = HealthState::new();
        for k in 0..100 {
            h.record(k % 3 == 0);
        }
        // The last 64 of 100: k = 36..99, of which 36, 39, …, 99 (22) are errors.
        assert_eq!(h.error_counts(), (22, 64));
        let s = settings();
        h.eject(Ejected::Outlier, 0, &s);
        h.answered(100);
        assert_eq!(h.error_counts(), (0, 0), "a recovered endpoint starts a new window");
    }
}
