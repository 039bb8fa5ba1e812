//! Endpoints as the scheduler sees them: identity, role, data-parallel rank, scraped load,
//! health, and kvgate's own in-flight counts.
//!
//! A pool publishes its endpoints as part of an immutable `gateway::pool::Snapshot` (a
//! `Vec<Endpoint>` with the pool's models, behind an `Arc`) and swaps it whole; the in-flight
//! counters are shared atomics (`Arc<InFlight>`), so counts survive a
//! republish and are always current, unlike scraped metrics.
//!
//! Part of the decision core: no I/O, no clock, no async. Times are milliseconds on a monotonic
//! clock that the caller reads and passes in.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::routing::ttft::{TtftModel, TtftParams};

/// The label that carries an endpoint's P/D role.
pub const ROLE_LABEL: &str = "llm-d.ai/role";

/// A dense endpoint number, unique within a pool while the endpoint exists (it indexes the
/// prefix index and per-endpoint scheduler state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct EndpointId(u32);

impl EndpointId {
    /// The id with number `n`.
    pub const fn new(n: u32) -> Self {
        Self(n)
    }

    /// The id as an index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Prefill/decode role, from the `llm-d.ai/role` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Only prefills (hands KV over to a decode endpoint).
    Prefill,
    /// Only decodes (receives KV from a prefill endpoint, or prefills locally as a fallback).
    Decode,
    /// Both: an ordinary endpoint. Unlabeled endpoints are `Both`.
    Both,
}

impl Role {
    /// Parses a role label value (llm-d's spellings), `None` if unknown.
    pub fn from_label(value: &str) -> Option<Self> {
        match value {
            "prefill" | "encode-prefill" => Some(Self::Prefill),
            "decode" => Some(Self::Decode),
            "both" | "prefill-decode" | "encode-prefill-decode" => Some(Self::Both),
            _ => None,
        }
    }

    /// The role named by `labels` (unlabeled = both; unknown values are rejected by config).
    pub fn of_labels(labels: &BTreeMap<String, String>) -> Self {
        labels.get(ROLE_LABEL).and_then(|v| Self::from_label(v)).unwrap_or(Self::Both)
    }

    /// Can serve as the decode side (or do a whole request).
    pub fn decodes(self) -> bool {
        matches!(self, Self::Decode | Self::Both)
    }

    /// Can serve as the prefill side.
    pub fn prefills(self) -> bool {
        matches!(self, Self::Prefill | Self::Both)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Prefill => "prefill",
            Self::Decode => "decode",
            Self::Both => "both",
        })
    }
}

/// Health as kvgate judges it from scrapes and request outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// In rotation.
    Healthy,
    /// Out of rotation.
    Unhealthy,
    /// Out of rotation, but one probe request may be let through (half-open).
    Probing,
}

/// LoRA adapters an endpoint has resident, from `vllm:lora_requests_info`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraState {
    /// Adapters with running requests.
    pub running: Vec<String>,
    /// Adapters with waiting requests.
    pub waiting: Vec<String>,
    /// `max_lora`: adapters that fit at once.
    pub max_loras: u32,
}

/// Load scraped from the endpoint's `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// `vllm:num_requests_running`.
    pub running: u32,
    /// `vllm:num_requests_waiting`.
    pub waiting: u32,
    /// `vllm:kv_cache_usage_perc`, a fraction in [0, 1].
    pub kv_usage: f64,
    /// LoRA state, when the endpoint serves adapters.
    pub lora: Option<LoraState>,
    /// When these numbers were scraped (monotonic milliseconds).
    pub scraped_at_ms: u64,
}

/// kvgate's own count of work sent to an endpoint and not yet finished: requests, the ones of
/// them still waiting for or in prefill (no response byte yet), and their uncached prompt tokens;
/// and when a response of its last passed a byte (what says an endpoint is alive between scrapes).
/// With peer replicas, what they last said they hold is added to every count read.
#[derive(Debug, Default)]
pub struct InFlight {
    requests: AtomicU64,
    prefilling: AtomicU64,
    tokens: AtomicU64,
    /// Of `tokens`, those of requests whose first response byte ends their prefill (streamed
    /// ones): what flow control's token bound counts. A non-streamed answer's first byte comes
    /// with its last, so its tokens would hold the bound for its whole decode.
    gated: AtomicU64,
    /// When a response from the endpoint last passed a byte (the caller's milliseconds; 0: never).
    heard_ms: AtomicU64,
    /// What peer replicas have in flight here, as they last said (set whole, never counted up).
    peers: [AtomicU64; 4],
}

/// In-flight counts as one replica holds them on one endpoint.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Requests in flight.
    pub requests: u64,
    /// Of them, those without their first token.
    pub prefilling: u64,
    /// Their uncached prompt tokens waiting for or in prefill.
    pub tokens: u64,
    /// Of those, the tokens of requests whose first response byte ends their prefill.
    pub gated: u64,
}

impl Load {
    /// Both loads added (saturating).
    #[must_use]
    pub fn plus(self, o: Self) -> Self {
        Self {
            requests: self.requests.saturating_add(o.requests),
            prefilling: self.prefilling.saturating_add(o.prefilling),
            tokens: self.tokens.saturating_add(o.tokens),
            gated: self.gated.saturating_add(o.gated),
        }
    }
}

fn release(counter: &AtomicU64, n: u64) {
    // Saturating: a release must never wrap a counter, whatever the caller did.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n)));
}

impl InFlight {
    /// Counts a request of `tokens` uncached prompt tokens as sent (in prefill).
    pub fn start(&self, tokens: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.prefilling.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// A request counted by [`InFlight::start`] with `tokens` has its first token: it is in
    /// decode now.
    pub fn prefilled(&self, tokens: u64) {
        release(&self.prefilling, 1);
        release(&self.tokens, tokens);
    }

    /// Releases a request counted by [`InFlight::start`]; `prefilling` with its `tokens` when it
    /// ends before its first token.
    pub fn finish(&self, prefilling: Option<u64>) {
        release(&self.requests, 1);
        if let Some(tokens) = prefilling {
            self.prefilled(tokens);
        }
    }

    /// Requests in flight (this replica's and its peers').
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed).saturating_add(self.peers[0].load(Ordering::Relaxed))
    }

    /// Requests in flight that have not had their first token.
    pub fn prefilling(&self) -> u64 {
        self.prefilling.load(Ordering::Relaxed).saturating_add(self.peers[1].load(Ordering::Relaxed))
    }

    /// This replica's own counts, without its peers'.
    pub fn own(&self) -> Load {
        Load {
            requests: self.requests.load(Ordering::Relaxed),
            prefilling: self.prefilling.load(Ordering::Relaxed),
            tokens: self.tokens.load(Ordering::Relaxed),
            gated: self.gated.load(Ordering::Relaxed),
        }
    }

    /// What peer replicas have in flight here, all of them together.
    pub fn peers(&self) -> Load {
        let [r, p, t, g] = &self.peers;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Load { requests: get(r), prefilling: get(p), tokens: get(t), gated: get(g) }
    }

    /// Sets what peer replicas have in flight here, all of them together.
    pub fn set_peers(&self, l: Load) {
        for (a, v) in self.peers.iter().zip([l.requests, l.prefilling, l.tokens, l.gated]) {
            a.store(v, Ordering::Relaxed);
        }
    }

    /// Requests in flight past their first token.
    pub fn decoding(&self) -> u64 {
        self.requests().saturating_sub(self.prefilling())
    }

    /// Uncached prompt tokens waiting for or in prefill.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed).saturating_add(self.peers[2].load(Ordering::Relaxed))
    }

    /// Uncached prompt tokens in prefill of requests whose first byte will say it ended.
    pub fn gated_tokens(&self) -> u64 {
        self.gated.load(Ordering::Relaxed).saturating_add(self.peers[3].load(Ordering::Relaxed))
    }

    /// A response from the endpoint passed a byte at `now_ms`.
    pub fn heard(&self, now_ms: u64) {
        self.heard_ms.fetch_max(now_ms, Ordering::Relaxed);
    }

    /// When a response from the endpoint last passed a byte (0: never).
    pub fn heard_ms(&self) -> u64 {
        self.heard_ms.load(Ordering::Relaxed)
    }
}

/// Holds one request's share of an endpoint's [`InFlight`] counts; dropping it releases them,
/// so every path out of a request (end, error, client gone) releases exactly once.
#[derive(Debug)]
pub struct InFlightGuard {
    in_flight: Arc<InFlight>,
    /// `Some(tokens)` until the first token.
    prefilling: Option<u64>,
    /// Its tokens counted in [`InFlight::gated_tokens`] until the first token (0: none).
    gated: u64,
}

impl InFlightGuard {
    /// Counts a request of `tokens` uncached prompt tokens on `in_flight`.
    pub fn new(in_flight: Arc<InFlight>, tokens: u64) -> Self {
        Self::with_gate(in_flight, tokens, true)
    }

    /// [`InFlightGuard::new`]; its tokens count in the gated tokens too when `gated` (its first
    /// response byte will end its prefill).
    pub fn with_gate(in_flight: Arc<InFlight>, tokens: u64, gated: bool) -> Self {
        in_flight.start(tokens);
        let gated = if gated { tokens } else { 0 };
        in_flight.gated.fetch_add(gated, Ordering::Relaxed);
        Self { in_flight, prefilling: Some(tokens), gated }
    }

    /// The prompt has been computed (first token seen): the request is in decode, its tokens no
    /// longer wait for prefill. Later calls do nothing.
    pub fn prefill_done(&mut self) {
        if let Some(tokens) = self.prefilling.take() {
            self.in_flight.prefilled(tokens);
            release(&self.in_flight.gated, std::mem::take(&mut self.gated));
        }
    }

    /// Whether the request has not had its first token.
    pub fn in_prefill(&self) -> bool {
        self.prefilling.is_some()
    }

    /// The counts this request holds a share of.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.in_flight.finish(self.prefilling.take());
        release(&self.in_flight.gated, self.gated);
    }
}

/// One endpoint (one `ip:port`, i.e. one data-parallel rank) as of a snapshot.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Dense id within the pool.
    pub id: EndpointId,
    /// Where requests go.
    pub address: SocketAddr,
    /// Display name (config `name`, else the address).
    pub name: String,
    /// P/D role.
    pub role: Role,
    /// Data-parallel rank, when the endpoint is one rank of a DP deployment.
    pub rank: Option<u32>,
    /// The rank shares its address with the deployment's other ranks (vLLM balancing
    /// internally); requests for it carry `X-data-parallel-rank`.
    pub rank_header: bool,
    /// Labels from discovery.
    pub labels: BTreeMap<String, String>,
    /// LoRA adapters (and models beyond the pool's) the endpoint is known to serve.
    pub models: Vec<String>,
    /// Latest scraped load, `None` until the first successful scrape.
    pub metrics: Option<Metrics>,
    /// Health.
    pub health: Health,
    /// Out of rotation for its error rate, though it answers (outlier ejection). A pool with too
    /// few healthy endpoints routes over these too rather than refuse.
    pub ejected: bool,
    /// kvgate's in-flight counts (shared across snapshots).
    pub in_flight: Arc<InFlight>,
    /// Its predicted-TTFT model, learned from its responses (shared across snapshots).
    pub ttft: Arc<TtftModel>,
}

impl Endpoint {
    /// A healthy endpoint with no metrics yet, role from `labels`.
    pub fn new(id: EndpointId, address: SocketAddr, labels: BTreeMap<String, String>) -> Self {
        Self {
            id,
            address,
            name: address.to_string(),
            role: Role::of_labels(&labels),
            rank: None,
            rank_header: false,
            labels,
            models: Vec::new(),
            metrics: None,
            health: Health::Healthy,
            ejected: false,
            in_flight: Arc::new(InFlight::default()),
            ttft: Arc::new(TtftModel::default()),
        }
    }

    /// The `X-data-parallel-rank` value requests for this endpoint carry, if any.
    pub fn header_rank(&self) -> Option<u32> {
        self.rank.filter(|_| self.rank_header)
    }

    /// Scraped metrics, if younger than `stale_after_ms` at `now_ms`; stale data is unknown.
    pub fn fresh_metrics(&self, now_ms: u64, stale_after_ms: u64) -> Option<&Metrics> {
        self.metrics.as_ref().filter(|m| now_ms.saturating_sub(m.scraped_at_ms) <= stale_after_ms)
    }

    /// Whether the endpoint serves `model`: one of the pool's models (every endpoint of a pool
    /// serves those), or an adapter it lists or has running or waiting.
    pub fn serves(&self, model: &str, pool_models: &[String]) -> bool {
        pool_models.iter().chain(&self.models).any(|m| m == model)
            || self
                .metrics
                .as_ref()
                .and_then(|m| m.lora.as_ref())
                .is_some_and(|l| l.running.iter().chain(&l.waiting).any(|a| a == model))
    }
}

/// What `/debug/endpoints` shows beyond the snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointStatus {
    /// `ip:port`.
    pub address: String,
    /// Display name.
    pub name: String,
    /// P/D role.
    pub role: Role,
    /// DP rank.
    pub rank: Option<u32>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// In rotation.
    pub healthy: bool,
    /// `healthy`, `unhealthy` or `probing`.
    pub health: Health,
    /// No fresh scrape.
    pub stale: bool,
    /// Scraped running requests.
    pub running: Option<u32>,
    /// Scraped waiting requests.
    pub waiting: Option<u32>,
    /// Scraped KV-cache usage.
    pub kv_cache_usage: Option<f64>,
    /// kvgate's in-flight requests.
    pub in_flight_requests: u64,
    /// kvgate's in-flight uncached prompt tokens (requests waiting for or in prefill).
    pub in_flight_tokens: u64,
    /// kvgate's in-flight requests that have not had their first token.
    pub in_prefill_requests: u64,
    /// kvgate's in-flight requests past their first token.
    pub in_decode_requests: u64,
    /// Its learned TTFT model.
    pub ttft_model: TtftParams,
    /// Blocks in the prefix index.
    pub prefix_blocks: usize,
    /// Prefix-index capacity (from `cache_config_info` when scraped).
    pub prefix_capacity: usize,
    /// LoRA adapters it serves.
    pub adapters: Vec<String>,
    /// Failed scrapes so far.
    pub scrape_errors: u64,
    /// The last scrape error, if the last scrape failed.
    pub last_error: Option<String>,
    /// In a pool that follows KV events: `precise` while matches come from the endpoint's
    /// events, `approximate` when they cannot (stream down, unrepaired gap, stale).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_source: Option<PrefixSource>,
    /// In a pool that follows KV events: its feed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_events: Option<KvEventsStatus>,
}

/// Which index an endpoint's prefix match came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefixSource {
    /// Its KV events: exact, in the model's tokens.
    Precise,
    /// What kvgate sent it (blocks of prompt bytes).
    Approximate,
}

/// Why a precise view is rebuilding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unknown {
    /// Batches were lost and could not be replayed.
    Gap,
    /// The view outgrew the engine's capacity: removals were lost.
    Overflow,
}

/// An endpoint's KV-event feed, for `/debug/endpoints`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KvEventsStatus {
    /// Its subscription is in place.
    pub connected: bool,
    /// The last sequence number applied.
    pub last_seq: Option<u64>,
    /// Time since its last event arrived.
    pub last_event_age_ms: Option<u64>,
    /// Lost batches found.
    pub gaps: u64,
    /// Successful replays.
    pub replays: u64,
    /// Blocks the precise index holds for it.
    pub blocks: usize,
    /// Tokens per block, from its events.
    pub block_size: Option<u32>,
    /// `block_size` of its `vllm:cache_config_info`.
    pub engine_block_size: Option<u64>,
    /// Why its view is being rebuilt, if it is (`gap`, `overflow`).
    pub rebuilding: Option<Unknown>,
    /// Stored blocks whose parent the view did not know (cached before kvgate followed the
    /// engine): their keys cannot be computed, so such prefixes are not matched.
    pub orphans: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_labels() {
        let check = |value: Option<&str>, want: Role| {
            let mut labels = BTreeMap::new();
            if let Some(v) = value {
                labels.insert(ROLE_LABEL.to_owned(), v.to_owned());
            }
            assert_eq!(Role::of_labels(&labels), want, "label {value:?}");
        };
        check(None, Role::Both);
        check(Some("prefill"), Role::Prefill);
        check(Some("decode"), Role::Decode);
        check(Some("both"), Role::Both);
        check(Some("prefill-decode"), Role::Both);
    }

    #[test]
    fn in_flight_never_wraps() {
        let f = InFlight::default();
        f.start(100);
        f.start(50);
        f.finish(Some(100));
        assert_eq!((f.requests(), f.prefilling(), f.tokens()), (1, 1, 50));
        f.finish(Some(50));
        f.finish(Some(50));
        assert_eq!((f.requests(), f.prefilling(), f.tokens()), (0, 0, 0));
    }

    #[test]
    fn staleness_and_models() {
        let mut e = Endpoint::new(EndpointId::new(0), "127.0.0.1:1".parse().expect("addr"), BTreeMap::new());
        e.metrics = Some(Metrics { scraped_at_ms: 1000, ..Metrics::default() });
        assert!(e.fresh_metrics(1500, 500).is_some());
        assert!(e.fresh_metrics(1501, 500).is_none());
        let pool = vec!["base".to_owned()];
        assert!(e.serves("base", &pool));
        assert!(!e.serves("other", &pool));
        e.models = vec!["adapter-a".to_owned()];
        assert!(e.serves("adapter-a", &pool));
        assert!(e.serves("base", &pool));
        assert!(!e.serves("adapter-b", &pool));
    }

    #[test]
    fn guards_release_exactly_once() {
        let f = Arc::new(InFlight::default());
        let mut g = InFlightGuard::new(f.clone(), 300);
        let h = InFlightGuard::new(f.clone(), 100);
        assert_eq!((f.requests(), f.prefilling(), f.tokens()), (2, 2, 400));
        g.prefill_done();
        g.prefill_done();
        assert_eq!((f.requests(), f.prefilling(), f.decoding(), f.tokens()), (2, 1, 1, 100));
        assert!(!g.in_prefill() && h.in_prefill());
        drop(g);
        assert_eq!((f.requests(), f.prefilling(), f.tokens()), (1, 1, 100));
        drop(h);
        assert_eq!((f.requests(), f.prefilling(), f.tokens()), (0, 0, 0));
    }
}
