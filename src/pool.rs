//! Pools: the endpoints of each pool, kept fresh — discovered from config, files and DNS,
//! scraped for load, judged for health — and published as an immutable snapshot.
//!
//! One task per endpoint scrapes its `/metrics` (and now and then `/v1/models`); discovery
//! replaces the endpoint set; front-ends report request outcomes. All of them update the pool's
//! member list under a short lock and wake the publisher, which rebuilds the snapshot at most
//! every few milliseconds. Readers take the current `Arc<Snapshot>` once per request. kvgate's
//! own in-flight counts are atomics shared by every snapshot, so they are always current.

pub mod discovery;
pub mod scrape;
pub mod scrape_parse;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::endpoint::{Endpoint, EndpointId, Health, InFlight, LoraState, Metrics, Role};
use crate::route::PoolRouter;
use crate::telemetry::Telemetry;
use scrape_parse::Scrape;

/// The HTTP client kvgate uses towards endpoints.
pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<Bytes>,
>;

/// A client with keep-alive connections and TCP_NODELAY.
pub fn http_client() -> HttpClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// Milliseconds on kvgate's monotonic clock (the time the scheduler is given).
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// How a pool scrapes and judges its endpoints.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Time between scrapes of one endpoint (jittered by ±20%).
    pub scrape_interval: Duration,
    /// Bound on one scrape.
    pub scrape_timeout: Duration,
    /// Scraped metrics older than this are unknown to the scheduler.
    pub stale_after: Duration,
    /// Largest `/metrics` body accepted.
    pub max_scrape_bytes: usize,
    /// Consecutive failures (scrapes or requests) that take an endpoint out of rotation.
    pub failure_threshold: u32,
    /// First time out of rotation; doubles with each failed probe.
    pub initial_backoff: Duration,
    /// Longest time out of rotation before the next probe.
    pub max_backoff: Duration,
    /// How often `/v1/models` is read (LoRA adapters).
    pub models_refresh: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            scrape_interval: Duration::from_millis(50),
            scrape_timeout: Duration::from_secs(1),
            stale_after: Duration::from_secs(2),
            max_scrape_bytes: 8 << 20,
            failure_threshold: 3,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            models_refresh: Duration::from_secs(10),
        }
    }
}

/// Where an endpoint is and what discovery says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Address requests and scrapes go to.
    pub addr: SocketAddr,
    /// Display name.
    pub name: String,
    /// Data-parallel rank (selects the `engine` series of its metrics).
    pub rank: Option<u32>,
    /// The rank shares its address with the others and is pinned by header.
    pub rank_header: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl Target {
    fn key(&self) -> (SocketAddr, Option<u32>) {
        (self.addr, self.rank)
    }
}

/// An endpoint's health bookkeeping.
#[derive(Debug, Clone)]
struct HealthState {
    failures: u32,
    /// Out of rotation until this time (ms); afterwards the next scrape is a probe.
    down_until: Option<u64>,
    backoff_ms: u64,
}

impl HealthState {
    fn new(settings: &PoolSettings) -> Self {
        Self { failures: 0, down_until: None, backoff_ms: settings.initial_backoff.as_millis() as u64 }
    }

    fn state(&self, now: u64) -> Health {
        match self.down_until {
            None => Health::Healthy,
            Some(t) if now < t => Health::Unhealthy,
            Some(_) => Health::Probing,
        }
    }

    fn failure(&mut self, now: u64, s: &PoolSettings) {
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

    fn success(&mut self, now: u64, s: &PoolSettings) {
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

/// Cancels a task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
struct Member {
    target: Target,
    id: EndpointId,
    serial: u64,
    in_flight: Arc<InFlight>,
    metrics: Option<Metrics>,
    /// Adapters learned from `/v1/models`.
    adapters: Vec<String>,
    kv_capacity: Option<usize>,
    health: HealthState,
    scrape_errors: u64,
    last_error: Option<String>,
    _scraper: Option<AbortOnDrop>,
}

#[derive(Debug, Default)]
struct State {
    members: Vec<Member>,
    free_ids: Vec<u32>,
    next_id: u32,
    generation: u64,
}

/// A pool's published view.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The endpoints, in discovery order.
    pub endpoints: Vec<Endpoint>,
    /// LoRA adapters some endpoint serves.
    pub adapters: Vec<String>,
    /// Increases with every publish.
    pub generation: u64,
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
    /// kvgate's in-flight uncached prompt tokens.
    pub in_flight_tokens: u64,
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
}

#[derive(Debug)]
struct Inner {
    name: String,
    models: Vec<String>,
    router: PoolRouter,
    settings: PoolSettings,
    telemetry: Arc<Telemetry>,
    snapshot: RwLock<Arc<Snapshot>>,
    state: Mutex<State>,
    dirty: Arc<Notify>,
    discovered: AtomicBool,
    serials: AtomicU64,
    tasks: Mutex<Vec<AbortOnDrop>>,
}

/// One pool. Cheap to clone; the last clone dropped stops its tasks.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    /// A pool with no endpoints yet; its publisher runs until the pool is dropped.
    pub fn new(router: PoolRouter, settings: PoolSettings, telemetry: Arc<Telemetry>) -> Self {
        let inner = Arc::new(Inner {
            name: router.name.clone(),
            models: router.models.clone(),
            router,
            settings,
            telemetry,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            state: Mutex::new(State::default()),
            dirty: Arc::new(Notify::new()),
            discovered: AtomicBool::new(false),
            serials: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&inner);
        let dirty = inner.dirty.clone();
        let publisher = tokio::spawn(async move {
            loop {
                dirty.notified().await;
                // Coalesce bursts of updates into one publish.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.publish();
            }
        });
        inner.tasks.lock().push(AbortOnDrop(publisher));
        Self { inner }
    }

    /// Pool name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Models configured for the pool.
    pub fn models(&self) -> &[String] {
        &self.inner.models
    }

    /// The pool's decision state.
    pub fn router(&self) -> &PoolRouter {
        &self.inner.router
    }

    /// Staleness bound for scraped metrics.
    pub fn settings(&self) -> &PoolSettings {
        &self.inner.settings
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.read().clone()
    }

    /// Whether the first discovery has completed.
    pub fn ready(&self) -> bool {
        self.inner.discovered.load(Ordering::Acquire)
    }

    /// Replaces the endpoint set. Endpoints that stay keep their id, in-flight counts, metrics
    /// and prefix-index entries; new ones start being scraped; removed ones stop being scraped
    /// and leave the index (requests already sent to them finish normally).
    pub fn set_targets(&self, targets: Vec<Target>) {
        let inner = &self.inner;
        {
            let mut st = inner.state.lock();
            let mut old: Vec<Member> = std::mem::take(&mut st.members);
            let mut members = Vec::with_capacity(targets.len());
            for t in targets {
                if members.iter().any(|m: &Member| m.target.key() == t.key()) {
                    continue;
                }
                if let Some(pos) = old.iter().position(|m| m.target.key() == t.key()) {
                    let mut m = old.swap_remove(pos);
                    m.target = t;
                    members.push(m);
                    continue;
                }
                let id = match st.free_ids.pop() {
                    Some(id) => id,
                    None => {
                        st.next_id += 1;
                        st.next_id - 1
                    }
                };
                let serial = inner.serials.fetch_add(1, Ordering::Relaxed);
                members.push(Member {
                    target: t,
                    id: EndpointId::new(id),
                    serial,
                    in_flight: Arc::new(InFlight::default()),
                    metrics: None,
                    adapters: Vec::new(),
                    kv_capacity: None,
                    health: HealthState::new(&inner.settings),
                    scrape_errors: 0,
                    last_error: None,
                    _scraper: None,
                });
            }
            // One scraper per address: ranks behind one port share their server's /metrics.
            for k in 0..members.len() {
                let t = &members[k].target;
                let scraped_by_earlier =
                    t.rank_header && members[..k].iter().any(|m| m.target.rank_header && m.target.addr == t.addr);
                if scraped_by_earlier {
                    members[k]._scraper = None;
                } else if members[k]._scraper.is_none() {
                    let (serial, addr) = (members[k].serial, members[k].target.addr);
                    let task = tokio::spawn(scrape::run(Arc::downgrade(inner), serial, addr));
                    members[k]._scraper = Some(AbortOnDrop(task));
                }
            }
            for gone in old {
                inner.router.index().remove(gone.id);
                st.free_ids.push(gone.id.index() as u32);
            }
            st.members = members;
        }
        inner.publish();
        inner.discovered.store(true, Ordering::Release);
    }

    /// Records the outcome of a request sent to `id` (connection failures and 5xx count as
    /// failures).
    pub fn report(&self, id: EndpointId, ok: bool) {
        let inner = &self.inner;
        let now = now_ms();
        let mut st = inner.state.lock();
        if let Some(m) = st.members.iter_mut().find(|m| m.id == id) {
            let before = m.health.state(now);
            if ok {
                m.health.success(now, &inner.settings);
            } else {
                m.health.failure(now, &inner.settings);
            }
            if m.health.state(now) != before {
                drop(st);
                inner.dirty.notify_one();
            }
        }
    }

    /// Status of every endpoint, for `/debug/endpoints` and metrics.
    pub fn status(&self) -> Vec<EndpointStatus> {
        let inner = &self.inner;
        let now = now_ms();
        let stale_ms = inner.settings.stale_after.as_millis() as u64;
        let st = inner.state.lock();
        st.members
            .iter()
            .map(|m| {
                let fresh = m.metrics.as_ref().filter(|x| now.saturating_sub(x.scraped_at_ms) <= stale_ms);
                let health = m.health.state(now);
                EndpointStatus {
                    address: m.target.addr.to_string(),
                    name: m.target.name.clone(),
                    role: Role::of_labels(&m.target.labels),
                    rank: m.target.rank,
                    labels: m.target.labels.clone(),
                    healthy: health == Health::Healthy,
                    health,
                    stale: fresh.is_none(),
                    running: fresh.map(|x| x.running),
                    waiting: fresh.map(|x| x.waiting),
                    kv_cache_usage: fresh.map(|x| x.kv_usage),
                    in_flight_requests: m.in_flight.requests(),
                    in_flight_tokens: m.in_flight.tokens(),
                    prefix_blocks: inner.router.index().endpoint_blocks(m.id),
                    prefix_capacity: m.kv_capacity.unwrap_or(inner.router.prefix_config().index_capacity),
                    adapters: m.adapters.clone(),
                    scrape_errors: m.scrape_errors,
                    last_error: m.last_error.clone(),
                }
            })
            .collect()
    }
}

impl Inner {
    /// Rebuilds and swaps the snapshot.
    fn publish(&self) {
        let now = now_ms();
        let mut st = self.state.lock();
        st.generation += 1;
        let mut adapters: Vec<String> = Vec::new();
        let endpoints = st
            .members
            .iter()
            .map(|m| {
                let mut models = m.adapters.clone();
                if let Some(l) = m.metrics.as_ref().and_then(|x| x.lora.as_ref()) {
                    models.extend(l.running.iter().chain(&l.waiting).cloned());
                }
                models.sort_unstable();
                models.dedup();
                adapters.extend(models.iter().cloned());
                Endpoint {
                    id: m.id,
                    address: m.target.addr,
                    name: m.target.name.clone(),
                    role: Role::of_labels(&m.target.labels),
                    rank: m.target.rank,
                    rank_header: m.target.rank_header,
                    labels: m.target.labels.clone(),
                    models,
                    metrics: m.metrics.clone(),
                    health: m.health.state(now),
                    in_flight: m.in_flight.clone(),
                }
            })
            .collect();
        adapters.sort_unstable();
        adapters.dedup();
        let snap = Arc::new(Snapshot { endpoints, adapters, generation: st.generation });
        drop(st);
        *self.snapshot.write() = snap;
    }

    /// Applies a scrape result to the endpoint that scraped it and to the other ranks behind
    /// the same port; returns how long the scraper waits before the next one.
    fn on_scrape(&self, serial: u64, result: Result<Scrape, String>, adapters: Option<Vec<String>>) -> Duration {
        let now = now_ms();
        let s = &self.settings;
        let mut st = self.state.lock();
        let Some(scraper) = st.members.iter().find(|m| m.serial == serial) else { return s.scrape_interval };
        let (addr, shared) = (scraper.target.addr, scraper.target.rank_header);
        // The next scrape comes as soon as any endpoint it serves needs one.
        let mut wait: Option<Duration> = None;
        for m in st
            .members
            .iter_mut()
            .filter(|m| m.serial == serial || (shared && m.target.rank_header && m.target.addr == addr))
        {
            let engine = match &result {
                Err(e) => Err(e.clone()),
                // A rank pinned by header must be reported by its own `engine` series.
                Ok(scrape) if m.target.rank_header => {
                    let rank = m.target.rank.unwrap_or(0).to_string();
                    scrape.engines.get(&rank).cloned().ok_or_else(|| format!("the metrics show no engine \"{rank}\""))
                }
                Ok(scrape) => Ok(scrape.engine(m.target.rank).cloned().unwrap_or_default()),
            };
            match engine {
                Ok(engine) => {
                    let lora = result.as_ref().ok().and_then(|x| x.lora.clone());
                    m.metrics = Some(Metrics {
                        running: engine.running.unwrap_or(0.0) as u32,
                        waiting: engine.waiting.unwrap_or(0.0) as u32,
                        kv_usage: engine.kv_usage.unwrap_or(0.0),
                        lora: lora.map(|l| LoraState {
                            running: l.running,
                            waiting: l.waiting,
                            max_loras: l.max_loras,
                        }),
                        scraped_at_ms: now,
                    });
                    if let (Some(bs), Some(blocks)) = (engine.block_size, engine.num_gpu_blocks) {
                        let cap = self.router.prefix_config().capacity_for_kv(blocks, bs);
                        if m.kv_capacity != Some(cap) {
                            m.kv_capacity = Some(cap);
                            self.router.index().set_capacity(m.id, cap);
                        }
                    }
                    if let Some(a) = &adapters {
                        m.adapters = a.clone();
                    }
                    m.last_error = None;
                    m.health.success(now, s);
                }
                Err(e) => {
                    m.scrape_errors += 1;
                    self.telemetry
                        .scrape_errors
                        .with_label_values(&[self.name.as_str(), &m.target.addr.to_string()])
                        .inc();
                    m.last_error = Some(e);
                    m.health.failure(now, s);
                }
            }
            let mine = match (m.health.state(now), m.health.down_until) {
                (Health::Unhealthy, Some(until)) => Duration::from_millis(until.saturating_sub(now)),
                _ => next_round(s.scrape_interval, now),
            };
            wait = Some(wait.map_or(mine, |w| w.min(mine)));
        }
        drop(st);
        self.dirty.notify_one();
        wait.unwrap_or(s.scrape_interval)
    }
}

/// Time until the next scrape round. Every endpoint's scraper wakes on the same rounds, so a
/// hundred scrapes cost one wake-up of the runtime rather than a hundred; each round is shifted
/// by up to 20% of the interval, by an amount that differs per round and per kvgate process, so
/// replicas of kvgate do not scrape in lockstep.
fn next_round(interval: Duration, now: u64) -> Duration {
    static SEED: OnceLock<u64> = OnceLock::new();
    let seed = *SEED.get_or_init(|| fastrand::u64(..));
    let step = (interval.as_millis() as u64).max(1);
    let round = now / step + 1;
    let jitter = xxhash_rust::xxh3::xxh3_64_with_seed(&round.to_le_bytes(), seed) % (step / 5).max(1);
    Duration::from_millis(round * step + jitter - now)
}

/// A pool that is only reachable weakly (scrapers hold this so they end with the pool).
type WeakPool = Weak<Inner>;

#[cfg(test)]
mod tests {
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
