//! Filters: drop candidates that must not (or should not) serve a request.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use super::Ctx;
use crate::routing::endpoint::Health;

/// An allow-list of endpoints: `ip:port` entries match one endpoint, bare IPs every port of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subset {
    addrs: Vec<SocketAddr>,
    ips: Vec<IpAddr>,
}

impl Subset {
    /// Parses entries such as `10.0.0.1:8000`, `10.0.0.2`, `[fd00::1]:8000`, `fd00::2`.
    pub fn parse<'s>(entries: impl IntoIterator<Item = &'s str>) -> Result<Self, String> {
        let mut s = Self::default();
        for e in entries.into_iter().map(str::trim).filter(|e| !e.is_empty()) {
            if let Ok(a) = e.parse::<SocketAddr>() {
                s.addrs.push(a);
            } else if let Ok(ip) = e.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
                s.ips.push(ip);
            } else {
                return Err(format!("`{e}` is neither ip:port nor an IP address"));
            }
        }
        Ok(s)
    }

    /// Parses a comma-separated list.
    pub fn parse_list(list: &str) -> Result<Self, String> {
        Self::parse(list.split(','))
    }

    /// No entries: matches nothing.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty() && self.ips.is_empty()
    }

    /// Whether `addr` is allowed. Ports are compared exactly, so data-parallel ranks on one IP
    /// stay distinct.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.addrs.contains(&addr) || self.ips.contains(&addr.ip())
    }
}

/// Parameters of `utilization-filter`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct UtilizationParams {
    /// Waiting requests that count as fully saturated.
    pub queue_depth_threshold: f64,
    /// KV-cache usage that counts as fully saturated.
    pub kv_cache_util_threshold: f64,
    /// Saturation above which an endpoint is dropped.
    pub threshold: f64,
    /// Extra tolerance over `threshold`, as a fraction.
    pub headroom: f64,
}

impl Default for UtilizationParams {
    fn default() -> Self {
        Self { queue_depth_threshold: 5.0, kv_cache_util_threshold: 0.8, threshold: 1.0, headroom: 0.0 }
    }
}

/// Parameters of `prefix-cache-affinity-filter`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AffinityParams {
    /// Prefix match ratio at which an endpoint becomes sticky for a request.
    pub affinity_threshold: f64,
    /// A sticky endpoint whose in-flight requests exceed the other candidates' mean by more
    /// than this, and by more than `maxInFlightRatio` times that mean, is saturated and released.
    pub max_in_flight_imbalance: u64,
    /// See `maxInFlightImbalance`: the allowed excess grows with the pool's load.
    pub max_in_flight_ratio: f64,
    /// Accepted for compatibility and unused: each endpoint's prefill rate is learned (its
    /// TTFT model, `routing::ttft`), starting from this figure's default.
    pub peak_prefill_throughput: f64,
    /// A sticky endpoint whose predicted time to first token (its learned TTFT model) exceeds
    /// the best candidate's by more than this is saturated and released.
    #[serde(rename = "maxTTFTPenaltyMs")]
    pub max_ttft_penalty_ms: f64,
}

impl Default for AffinityParams {
    fn default() -> Self {
        Self {
            affinity_threshold: 0.5,
            max_in_flight_imbalance: 4,
            max_in_flight_ratio: 1.0,
            peak_prefill_throughput: 15928.0,
            max_ttft_penalty_ms: 2000.0,
        }
    }
}

/// A filter plugin.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// `model-serving-filter`: endpoints that serve the requested model or adapter.
    ServesModel,
    /// `health-filter`: endpoints in rotation.
    Healthy,
    /// `decode-filter`: decode or both (unlabeled counts as both).
    Decode,
    /// `prefill-filter`: prefill or both.
    Prefill,
    /// `subset-filter`: a static allow-list.
    Subset(Subset),
    /// `utilization-filter`: drops saturated endpoints, unless that would drop all.
    Utilization(UtilizationParams),
    /// `prefix-cache-affinity-filter`: keeps the endpoints that hold most of the prompt, until
    /// they are saturated.
    PrefixAffinity(AffinityParams),
}

impl Filter {
    /// A soft filter states a preference (it already fails open); endpoints it sets aside may
    /// still serve as fallbacks after every preferred one.
    pub fn is_soft(&self) -> bool {
        matches!(self, Self::Utilization(_) | Self::PrefixAffinity(_))
    }

    /// Keeps the candidates (indices into `ctx.endpoints`) that pass.
    pub(super) fn apply(&self, ctx: &Ctx<'_>, cands: &mut Vec<usize>) {
        let e = |i: usize| &ctx.input.endpoints[i];
        match self {
            Self::ServesModel => cands.retain(|&i| e(i).serves(ctx.input.request.model, ctx.input.pool_models)),
            Self::Healthy => cands.retain(|&i| e(i).health == Health::Healthy),
            Self::Decode => cands.retain(|&i| e(i).role.decodes()),
            Self::Prefill => cands.retain(|&i| e(i).role.prefills()),
            Self::Subset(s) => cands.retain(|&i| s.contains(e(i).address)),
            Self::Utilization(p) => {
                let limit = p.threshold * (1.0 + p.headroom);
                let saturation = |i: usize| match ctx.metrics(i) {
                    // Unknown load counts as saturated, as in the reference detector.
                    None => 1.0,
                    Some(m) => {
                        (f64::from(m.waiting) / p.queue_depth_threshold).max(m.kv_usage / p.kv_cache_util_threshold)
                    }
                };
                if cands.iter().any(|&i| saturation(i) <= limit) {
                    cands.retain(|&i| saturation(i) <= limit);
                }
            }
            Self::PrefixAffinity(p) => affinity(p, ctx, cands),
        }
    }
}

/// Sticky-until-saturated: see [`Filter::PrefixAffinity`].
fn affinity(p: &AffinityParams, ctx: &Ctx<'_>, cands: &mut Vec<usize>) {
    let req = &ctx.input.request;
    if req.total_blocks == 0 || cands.len() < 2 {
        return;
    }
    let ratio = |i: usize| f64::from(ctx.input.prefix_blocks[i]) / req.total_blocks as f64;
    if !cands.iter().any(|&i| ratio(i) >= p.affinity_threshold) {
        return;
    }
    let in_flight = |i: usize| &ctx.input.endpoints[i].in_flight;
    let est_ms = |i: usize| ctx.predicted_ttft_ms(i);
    let total: u64 = cands.iter().map(|&i| in_flight(i).requests()).sum();
    let others = cands.len() as f64 - 1.0;
    let min_est = cands.iter().map(|&i| est_ms(i)).fold(f64::INFINITY, f64::min);
    let saturated = |i: usize| {
        // Against the others' mean, not the least loaded: in a burst every endpoint ramps up at
        // once, and one that has not been reached yet says little about the rest.
        let r = in_flight(i).requests();
        let others_mean = total.saturating_sub(r) as f64 / others;
        let excess = r as f64 - others_mean;
        excess > p.max_in_flight_imbalance as f64 && excess > p.max_in_flight_ratio * others_mean
            || est_ms(i) > min_est + p.max_ttft_penalty_ms
    };
    let sticky = |i: usize| ratio(i) >= p.affinity_threshold;
    if cands.iter().any(|&i| sticky(i) && !saturated(i)) {
        cands.retain(|&i| sticky(i) && !saturated(i));
    } else if cands.iter().any(|&i| !sticky(i)) {
        // Every holder of the prefix is saturated: spill to the others.
        cands.retain(|&i| !sticky(i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_parsing_and_matching() {
        let s = Subset::parse_list("10.0.0.1:8000, 10.0.0.2,[fd00::1]:9000,fd00::2").expect("parses");
        let check = |addr: &str, want: bool| {
            assert_eq!(s.contains(addr.parse().expect("addr")), want, "{addr}");
        };
        check("10.0.0.1:8000", true);
        check("10.0.0.1:8001", false);
        check("10.0.0.2:1", true);
        check("[fd00::1]:9000", true);
        check("[fd00::2]:7", true);
        check("10.0.0.3:8000", false);
        assert!(Subset::parse_list("").expect("empty").is_empty());
        assert!(Subset::parse_list("nope:x").is_err());
    }
}
