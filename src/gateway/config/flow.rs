//! `flow_control:` (global, and per pool over it) and `objectives:`: how requests wait in
//! kvgate when the endpoints that could take them are saturated, and the priority each
//! objective gives (`gateway::flow` applies both).

use std::time::Duration;

use serde::Deserialize;

/// `flow_control:` as written; every key is optional, and a pool's keys override the global
/// section's one by one.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowControlConfig {
    /// Turns flow control on (off by default).
    pub enabled: Option<bool>,
    /// How long a request may wait in kvgate's queue (default 60000); past it, 429 (503 while
    /// the pool has no endpoint: the wait for a pool scaling from zero).
    pub ttl_ms: Option<u64>,
    /// Requests waiting in the whole pool's queue at most (default 10000).
    pub max_requests: Option<u64>,
    /// Request bytes waiting in the whole pool's queue at most (default 1 GiB, at most half of
    /// `max_buffered_bytes`, which queued bodies count against).
    pub max_bytes: Option<u64>,
    /// Requests waiting in one priority band at most (default 5000).
    pub max_requests_per_band: Option<u64>,
    /// Request bytes waiting in one priority band at most (default as `max_bytes`).
    pub max_bytes_per_band: Option<u64>,
    /// Order within a flow: `fcfs` (default) or `edf`, by the deadline of
    /// `x-llm-d-slo-ttft-ms` (arrival + TTL without it).
    pub ordering: Option<Ordering>,
    /// What decides that an endpoint is saturated: `accounting` (default: what kvgate has in
    /// flight there, scraped queues adding to it) or `scrape` (the scraped queue and KV usage
    /// alone, as a gate that only scrapes would see).
    pub gate: Option<GateKind>,
    /// Requests in flight an endpoint takes (default: learned from its scrapes — the most
    /// running requests of its last three scrapes that found it queueing; from 4, doubling,
    /// before it ever queued).
    pub max_requests_per_endpoint: Option<u64>,
    /// Uncached prompt tokens in prefill an endpoint takes (default: what its learned prefill
    /// rate computes in `prefill_window_ms`, at most its KV cache's tokens from
    /// `vllm:cache_config_info`).
    pub max_prefill_tokens_per_endpoint: Option<u64>,
    /// The prefill time the default token bound stands for (default 1000).
    pub prefill_window_ms: Option<u64>,
    /// Requests waiting in an endpoint's own queue (scraped) from which it counts as saturated
    /// (default 5).
    pub max_waiting_per_endpoint: Option<u64>,
    /// KV-cache usage from which an endpoint counts as saturated with `gate: scrape` (default
    /// 0.8).
    pub max_kv_usage: Option<f64>,
    /// Share of each endpoint's bounds, and of the endpoints kept with nothing in prefill, that
    /// a lower band leaves free while a higher band has had requests in the last 10 s, so that
    /// the higher band finds room at once (default 25).
    pub headroom_percent: Option<u32>,
}

/// Order within a flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// First come, first served.
    #[default]
    Fcfs,
    /// Earliest deadline first.
    Edf,
}

/// What decides saturation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GateKind {
    /// kvgate's own in-flight accounting (scraped queues can only add saturation).
    #[default]
    Accounting,
    /// Scraped metrics alone.
    Scrape,
}

/// One `objectives:` entry: the priority of requests naming `name` in
/// `x-llm-d-inference-objective`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectiveSpec {
    /// The objective's name.
    pub name: String,
    /// Its priority: higher is served first, negative is sheddable (default 0).
    #[serde(default)]
    pub priority: i64,
}

/// A pool's flow control, every value resolved.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FlowSettings {
    /// On or off.
    pub enabled: bool,
    /// Longest wait.
    #[serde(serialize_with = "millis")]
    pub ttl: Duration,
    /// Whole-queue bound, requests.
    pub max_requests: u64,
    /// Whole-queue bound, bytes.
    pub max_bytes: u64,
    /// Per-band bound, requests.
    pub max_requests_per_band: u64,
    /// Per-band bound, bytes.
    pub max_bytes_per_band: u64,
    /// Order within a flow.
    pub ordering: Ordering,
    /// What decides saturation.
    pub gate: GateKind,
    /// Fixed per-endpoint request bound, if set.
    pub max_requests_per_endpoint: Option<u64>,
    /// Fixed per-endpoint prefill-token bound, if set.
    pub max_prefill_tokens_per_endpoint: Option<u64>,
    /// The prefill time the learned token bound stands for.
    #[serde(serialize_with = "millis")]
    pub prefill_window: Duration,
    /// Scraped waiting requests from which an endpoint is saturated.
    pub max_waiting_per_endpoint: u64,
    /// Scraped KV usage from which an endpoint is saturated (`gate: scrape`).
    pub max_kv_usage: f64,
    /// Share of the bounds held back for a busy higher band, percent.
    pub headroom_percent: u32,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl Default for FlowSettings {
    fn default() -> Self {
        Self::resolve(None, None)
    }
}

impl FlowSettings {
    /// The pool's keys over the global ones over the defaults.
    pub fn resolve(global: Option<&FlowControlConfig>, pool: Option<&FlowControlConfig>) -> Self {
        macro_rules! pick {
            ($key:ident, $default:expr) => {
                pool.and_then(|p| p.$key.clone()).or_else(|| global.and_then(|g| g.$key.clone())).unwrap_or($default)
            };
        }
        macro_rules! maybe {
            ($key:ident) => {
                pool.and_then(|p| p.$key).or_else(|| global.and_then(|g| g.$key))
            };
        }
        Self {
            enabled: pick!(enabled, false),
            ttl: Duration::from_millis(pick!(ttl_ms, 60_000)),
            max_requests: pick!(max_requests, 10_000),
            max_bytes: pick!(max_bytes, 1 << 30),
            max_requests_per_band: pick!(max_requests_per_band, 5_000),
            max_bytes_per_band: pick!(max_bytes_per_band, 1 << 30),
            ordering: pick!(ordering, Ordering::Fcfs),
            gate: pick!(gate, GateKind::Accounting),
            max_requests_per_endpoint: maybe!(max_requests_per_endpoint),
            max_prefill_tokens_per_endpoint: maybe!(max_prefill_tokens_per_endpoint),
            prefill_window: Duration::from_millis(pick!(prefill_window_ms, 1_000)),
            max_waiting_per_endpoint: pick!(max_waiting_per_endpoint, 5),
            max_kv_usage: pick!(max_kv_usage, 0.8),
            headroom_percent: pick!(headroom_percent, 25),
        }
    }
}

impl FlowSettings {
    /// [`FlowSettings::resolve`], with the queue's byte bounds, where neither section sets them,
    /// at most half of `budget` (`max_buffered_bytes`, which queued bodies count against): the
    /// other half stays for requests that are not waiting, those of other pools among them.
    pub fn resolve_within(global: Option<&FlowControlConfig>, pool: Option<&FlowControlConfig>, budget: u64) -> Self {
        let mut s = Self::resolve(global, pool);
        let set =
            |key: fn(&FlowControlConfig) -> Option<u64>| pool.and_then(key).or_else(|| global.and_then(key)).is_some();
        let half = (budget / 2).max(1);
        if !set(|c| c.max_bytes) {
            s.max_bytes = s.max_bytes.min(half);
        }
        if !set(|c| c.max_bytes_per_band) {
            s.max_bytes_per_band = s.max_bytes_per_band.min(half);
        }
        s
    }
}

impl FlowControlConfig {
    /// What is wrong with these keys, if anything, as `(key, message)`.
    pub(crate) fn problem(&self) -> Option<(&'static str, String)> {
        let ms = |key: &'static str, v: Option<u64>| {
            v.filter(|v| !(1..=86_400_000).contains(v)).map(|v| (key, format!("must be 1 ms to 24 h; got {v}")))
        };
        let count =
            |key: &'static str, v: Option<u64>| v.filter(|v| *v == 0).map(|_| (key, "must be at least 1".into()));
        ms("ttl_ms", self.ttl_ms)
            .or_else(|| ms("prefill_window_ms", self.prefill_window_ms))
            .or_else(|| count("max_requests", self.max_requests))
            .or_else(|| count("max_bytes", self.max_bytes))
            .or_else(|| count("max_requests_per_band", self.max_requests_per_band))
            .or_else(|| count("max_bytes_per_band", self.max_bytes_per_band))
            .or_else(|| count("max_requests_per_endpoint", self.max_requests_per_endpoint))
            .or_else(|| count("max_prefill_tokens_per_endpoint", self.max_prefill_tokens_per_endpoint))
            .or_else(|| count("max_waiting_per_endpoint", self.max_waiting_per_endpoint))
            .or_else(|| {
                self.max_kv_usage
                    .filter(|v| !(*v > 0.0 && *v <= 1.0))
                    .map(|v| ("max_kv_usage", format!("must be a fraction, more than 0 and at most 1; got {v}")))
            })
            .or_else(|| {
                self.headroom_percent
                    .filter(|v| *v > 90)
                    .map(|v| ("headroom_percent", format!("must be 0 to 90; got {v}")))
            })
    }
}

/// What is wrong with an `objectives:` list, if anything: an empty or repeated name.
pub(crate) fn objectives_problem(list: &[ObjectiveSpec]) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    for o in list {
        if o.name.is_empty() {
            return Some("an objective needs a name".into());
        }
        if !seen.insert(o.name.as_str()) {
            return Some(format!("objective `{}` is listed twice", o.name));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pools_keys_override_the_global_ones_one_by_one() {
        let global = FlowControlConfig { enabled: Some(true), ttl_ms: Some(5000), ..Default::default() };
        let pool = FlowControlConfig { ttl_ms: Some(100), gate: Some(GateKind::Scrape), ..Default::default() };
        let s = FlowSettings::resolve(Some(&global), Some(&pool));
        assert!(s.enabled);
        assert_eq!((s.ttl, s.gate), (Duration::from_millis(100), GateKind::Scrape));
        assert_eq!(s.max_requests_per_band, 5000);
        let off = FlowSettings::default();
        assert!(!off.enabled);
        assert_eq!(off.ttl, Duration::from_secs(60));
        assert_eq!(FlowControlConfig { ttl_ms: Some(0), ..Default::default() }.problem().map(|p| p.0), Some("ttl_ms"));
        assert_eq!(
            FlowControlConfig { headroom_percent: Some(95), ..Default::default() }.problem().map(|p| p.0),
            Some("headroom_percent")
        );
    }
}
