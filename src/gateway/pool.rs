//! Pools: the endpoints of each pool, kept fresh — discovered from config, files and DNS,
//! scraped for load, judged for health — and published as an immutable snapshot.
//!
//! One task per endpoint scrapes its `/metrics` (and now and then `/v1/models`); discovery
//! replaces the endpoint set; front-ends report request outcomes. All of them update the pool's
//! member list under a short lock and wake the publisher, which rebuilds the snapshot at most
//! every few milliseconds. Readers take the current `Arc<Snapshot>` once per request. kvgate's
//! own in-flight counts are atomics shared by every snapshot, so they are always current.

pub mod cluster;
pub(crate) mod discovery;
pub mod flow;
pub use discovery::SourceStatus;
mod health;
pub(crate) mod kubernetes;
pub(crate) mod kv_events;
mod launch;
pub use launch::{Launched, launch};
mod publish;
pub mod scrape;
pub(crate) mod scrape_parse;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::gateway::config::endpoints::ResolvedEndpoint;
use crate::gateway::config::{Admission, HealthConfig, KvEventsSpec, ScrapeConfig};
use crate::gateway::tasks::{Task, Tasks};
use crate::gateway::telemetry::Telemetry;
use crate::routing::endpoint::{Endpoint, EndpointId, Health, InFlight, Metrics};
use crate::routing::plan::Planner;
use crate::routing::ttft::TtftModel;
use cluster::Cluster;
use health::{Ejected, HealthState};

/// Milliseconds on kvgate's monotonic clock (the time the scheduler is given).
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// How a pool scrapes and judges its endpoints.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Time between scrapes of one endpoint whose scraped load kvgate's own counts explain
    /// (each round shifted by up to 20%).
    pub scrape_interval: Duration,
    /// Time between scrapes while they are not explained (or the last one failed).
    pub fast_scrape_interval: Duration,
    /// Bound on one scrape.
    pub scrape_timeout: Duration,
    /// Scraped metrics older than this are unknown to the scheduler.
    pub stale_after: Duration,
    /// Largest `/metrics` body accepted.
    pub max_scrape_bytes: usize,
    /// Consecutive failures to reach an endpoint (scrapes or requests) that take it out of
    /// rotation.
    pub failure_threshold: u32,
    /// Silence that takes an endpoint out of rotation at once: a scrape unanswered this long
    /// (asked again on a new connection after `scrape_timeout`), with no response byte from the
    /// endpoint meanwhile.
    pub unresponsive: Duration,
    /// Endpoints that may be out of rotation for their error rate, in percent of the pool.
    pub max_ejection_percent: u32,
    /// First time out of rotation; doubles with each ejection that follows soon after a
    /// recovery (flapping).
    pub initial_backoff: Duration,
    /// Longest time out of rotation before the next probe.
    pub max_backoff: Duration,
    /// How often `/v1/models` is read (LoRA adapters).
    pub models_refresh: Duration,
}

impl PoolSettings {
    /// The settings the config's `scrape` and `health` sections describe.
    pub fn new(scrape: &ScrapeConfig, health: &HealthConfig) -> Self {
        Self {
            scrape_interval: Duration::from_millis(scrape.interval_ms),
            fast_scrape_interval: Duration::from_millis(scrape.fast_interval_ms.clamp(1, scrape.interval_ms.max(1))),
            scrape_timeout: Duration::from_millis(scrape.timeout_ms),
            stale_after: Duration::from_millis(scrape.stale_after_ms()),
            max_scrape_bytes: scrape.max_bytes,
            failure_threshold: health.failure_threshold,
            unresponsive: Duration::from_millis(health.unresponsive_ms),
            max_ejection_percent: health.max_ejection_percent,
            initial_backoff: Duration::from_millis(health.backoff_ms),
            max_backoff: Duration::from_millis(health.max_backoff_ms),
            ..Self::default()
        }
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            scrape_interval: Duration::from_millis(2000),
            fast_scrape_interval: Duration::from_millis(750),
            scrape_timeout: Duration::from_secs(1),
            stale_after: Duration::from_secs(5),
            max_scrape_bytes: 8 << 20,
            failure_threshold: 3,
            unresponsive: Duration::from_secs(2),
            max_ejection_percent: 50,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            models_refresh: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
struct Member {
    /// The entry discovery gave (its host an IP).
    entry: ResolvedEndpoint,
    /// Where requests and scrapes go: the entry's IP and port.
    addr: SocketAddr,
    id: EndpointId,
    serial: u64,
    in_flight: Arc<InFlight>,
    ttft: Arc<TtftModel>,
    metrics: Option<Metrics>,
    /// Adapters learned from `/v1/models`.
    adapters: Vec<String>,
    /// Base models learned from `/v1/models`.
    bases: Vec<String>,
    /// The context lengths its `/v1/models` reported.
    max_model_len: Vec<(String, u64)>,
    kv_capacity: Option<usize>,
    health: HealthState,
    /// Cancelled (and replaced) when the endpoint is found silent: requests waiting for its
    /// answer give up on it.
    stopped: CancellationToken,
    scrape_errors: u64,
    last_error: Option<String>,
    _scraper: Option<Task>,
    /// `block_size` of its `vllm:cache_config_info`.
    engine_block_size: Option<u64>,
    /// Its KV-event feed's state, and the task following its publisher (connect mode).
    feed: Arc<kv_events::FeedStatus>,
    _kv_events: Option<Task>,
    /// The block-size disagreement was logged.
    block_size_warned: bool,
}

impl Member {
    /// What identifies an endpoint across discovery rounds.
    fn key(&self) -> (SocketAddr, Option<u32>) {
        (self.addr, self.entry.rank)
    }
}

#[derive(Debug, Default)]
struct State {
    members: Vec<Member>,
    free_ids: Vec<u32>,
    next_id: u32,
}

/// A pool's published view.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The endpoints, in discovery order.
    pub endpoints: Vec<Endpoint>,
    /// LoRA adapters some endpoint serves.
    pub adapters: Vec<String>,
    /// Base models some endpoint lists on `/v1/models` (what a pool configured without
    /// `models` serves).
    pub models: Vec<String>,
    /// The context length endpoints report for a model or adapter (the least, when they differ).
    pub max_model_len: BTreeMap<String, u64>,
}

impl Snapshot {
    /// `model` when it names a LoRA adapter (and no base model).
    pub fn lora<'m>(&self, model: &'m str) -> Option<&'m str> {
        let is = |list: &[String]| list.iter().any(|m| m == model);
        (is(&self.adapters) && !is(&self.models)).then_some(model)
    }
}

#[derive(Debug)]
struct Inner {
    name: String,
    planner: Planner,
    admission: Admission,
    settings: PoolSettings,
    telemetry: Arc<Telemetry>,
    snapshot: RwLock<Arc<Snapshot>>,
    state: Mutex<State>,
    dirty: Arc<Notify>,
    discovered: AtomicBool,
    source: Mutex<SourceStatus>,
    serials: AtomicU64,
    /// Spawns the pool's tasks (and stops them when kvgate shuts down).
    owner: Tasks,
    /// The publisher and the KV-event listener: they end with the pool.
    tasks: Mutex<Vec<Task>>,
    /// How the pool meets its endpoints' KV-event publishers, when it follows them.
    kv_events: Mutex<Option<KvEventsSpec>>,
    /// A served endpoint outside the pool was logged (once per pool).
    served_elsewhere_logged: AtomicBool,
    /// The pool's flow control (its queue, off unless configured).
    flow: Arc<flow::FlowControl>,
    /// What it learns goes to peer replicas through this, when there are any.
    cluster: OnceLock<Weak<Cluster>>,
}

/// One pool. Cheap to clone; the last clone dropped stops its tasks.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    /// A pool with no endpoints yet; its publisher runs until the pool is dropped. Its tasks are
    /// spawned through `owner`.
    pub fn new(
        name: String,
        planner: Planner,
        admission: Admission,
        settings: PoolSettings,
        telemetry: Arc<Telemetry>,
        owner: &Tasks,
    ) -> Self {
        let stale_ms = settings.stale_after.as_millis() as u64;
        let flow = Arc::new(flow::FlowControl::new(&name, planner.models(), stale_ms, telemetry.clone()));
        let inner = Arc::new(Inner {
            flow,
            cluster: OnceLock::new(),
            name,
            planner,
            admission,
            settings,
            telemetry,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            state: Mutex::new(State::default()),
            dirty: Arc::new(Notify::new()),
            discovered: AtomicBool::new(false),
            source: Mutex::new(SourceStatus::default()),
            serials: AtomicU64::new(0),
            owner: owner.clone(),
            tasks: Mutex::new(Vec::new()),
            kv_events: Mutex::new(None),
            served_elsewhere_logged: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&inner);
        let dirty = inner.dirty.clone();
        let publisher = inner.owner.spawn("pool publisher", async move {
            loop {
                dirty.notified().await;
                // Coalesce bursts of updates into one publish.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.publish();
            }
        });
        inner.tasks.lock().push(publisher);
        Self { inner }
    }

    /// Pool name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Models configured for the pool.
    pub fn models(&self) -> &[String] {
        self.inner.planner.models()
    }

    /// The models the pool serves: the configured ones, or, when none are configured, those
    /// its endpoints list on `/v1/models` (LoRA adapters aside).
    pub fn served_models(&self) -> Vec<String> {
        match self.models() {
            [] => self.snapshot().models.clone(),
            configured => configured.to_vec(),
        }
    }

    /// Every name a request may ask this pool for: its models, then the adapters its endpoints
    /// serve.
    pub fn served_names(&self) -> Vec<String> {
        let mut names = self.served_models();
        for a in &self.snapshot().adapters {
            if !names.contains(a) {
                names.push(a.clone());
            }
        }
        names
    }

    /// Where the endpoints come from.
    pub fn source(&self) -> SourceStatus {
        self.inner.source.lock().clone()
    }

    /// Sets where the endpoints come from (discovery keeps it current).
    pub fn set_source(&self, source: SourceStatus) {
        *self.inner.source.lock() = source;
    }

    /// Updates the source's status in place.
    pub(crate) fn update_source(&self, f: impl FnOnce(&mut SourceStatus)) {
        f(&mut self.inner.source.lock());
    }

    /// The pool's decision state.
    pub fn planner(&self) -> &Planner {
        &self.inner.planner
    }

    /// The pool's flow control.
    pub fn flow(&self) -> &Arc<flow::FlowControl> {
        &self.inner.flow
    }

    /// Shares what the pool learns with `cluster`'s peers (once; later calls do nothing).
    pub fn share_with(&self, cluster: &Arc<Cluster>) {
        let _ = self.inner.cluster.set(Arc::downgrade(cluster));
    }

    /// The cluster the pool shares with, if any.
    pub fn cluster(&self) -> Option<Arc<Cluster>> {
        self.inner.cluster.get().and_then(Weak::upgrade)
    }

    /// The pool's admission limits.
    pub fn admission(&self) -> &Admission {
        &self.inner.admission
    }

    /// Where the pool's counters go.
    pub(crate) fn telemetry(&self) -> &Telemetry {
        &self.inner.telemetry
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
    /// and leave the index (requests already sent to them finish normally). Entries must name
    /// an IP (discovery resolves host names); the first entry for an address and rank counts.
    pub fn set_endpoints(&self, entries: Vec<ResolvedEndpoint>) {
        self.set_endpoints_synced(entries, true);
    }

    /// [`Pool::set_endpoints`], saying whether the source is in sync. A pool is ready from its
    /// first synced set on (a source that loses its sync later — an InferencePool deleted —
    /// empties the pool, whose requests then get 503s, rather than making all of kvgate unready).
    pub fn set_endpoints_synced(&self, entries: Vec<ResolvedEndpoint>, synced: bool) {
        let inner = &self.inner;
        {
            let mut st = inner.state.lock();
            let mut old: Vec<Member> = std::mem::take(&mut st.members);
            let mut members = Vec::with_capacity(entries.len());
            for entry in entries {
                let Some(addr) = entry.socket_addr() else {
                    tracing::warn!(pool = inner.name.as_str(), endpoint = %entry, "endpoint host not resolved; skipping it");
                    continue;
                };
                let key = (addr, entry.rank);
                if members.iter().any(|m: &Member| m.key() == key) {
                    continue;
                }
                // An address that now names another endpoint (a pod IP given to a new pod) starts
                // afresh: nothing of the old one's load, health or cache carries over.
                if let Some(pos) = old.iter().position(|m| m.key() == key && m.entry.name == entry.name) {
                    let mut m = old.swap_remove(pos);
                    m.entry = entry;
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
                // A reused id starts with nothing of its last holder's (a feed aborted late
                // may have written to its view).
                if let Some(p) = inner.planner.precise() {
                    p.index().remove(EndpointId::new(id));
                }
                members.push(Member {
                    entry,
                    addr,
                    id: EndpointId::new(id),
                    serial,
                    in_flight: Arc::new(InFlight::default()),
                    ttft: Arc::new(TtftModel::default()),
                    metrics: None,
                    adapters: Vec::new(),
                    bases: Vec::new(),
                    max_model_len: Vec::new(),
                    kv_capacity: None,
                    health: HealthState::new(),
                    stopped: CancellationToken::new(),
                    scrape_errors: 0,
                    last_error: None,
                    _scraper: None,
                    engine_block_size: None,
                    feed: Arc::default(),
                    _kv_events: None,
                    block_size_warned: false,
                });
            }
            // One scraper per address: ranks behind one port share their server's /metrics.
            for k in 0..members.len() {
                let m = &members[k];
                let scraped_by_earlier =
                    m.entry.rank_header && members[..k].iter().any(|e| e.entry.rank_header && e.addr == m.addr);
                if scraped_by_earlier {
                    members[k]._scraper = None;
                } else if members[k]._scraper.is_none() {
                    let (serial, addr) = (members[k].serial, members[k].addr);
                    let scraper = scrape::run(Arc::downgrade(inner), serial, addr, inner.owner.clone());
                    members[k]._scraper = Some(inner.owner.spawn("scraper", scraper));
                }
            }
            // One KV-event subscription per endpoint, when kvgate connects to the publishers.
            let spec = inner.kv_events.lock().clone().filter(|s| s.port.is_some());
            if let Some(spec) = spec {
                for m in members.iter_mut().filter(|m| m._kv_events.is_none()) {
                    let target = kv_events::feed_target(m);
                    let feed = kv_events::follow(Arc::downgrade(inner), target, spec.clone());
                    m._kv_events = Some(inner.owner.spawn("kv-event feed", feed));
                }
            }
            for gone in old {
                inner.planner.index().remove(gone.id);
                if let Some(p) = inner.planner.precise() {
                    p.index().remove(gone.id);
                }
                st.free_ids.push(gone.id.index() as u32);
            }
            st.members = members;
        }
        inner.publish();
        if synced {
            inner.discovered.store(true, Ordering::Release);
        }
    }

    /// The gateway reported that `addr`, which is not an endpoint of this pool, served one of
    /// its requests: counted, and logged the first time.
    pub fn served_elsewhere(&self, addr: impl std::fmt::Display) {
        let inner = &self.inner;
        inner.telemetry.served_unknown.with_label_values(&[inner.name.as_str()]).inc();
        if !inner.served_elsewhere_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                pool = inner.name.as_str(),
                served = %addr,
                "the gateway reports a served endpoint that is not in the pool; ignored (kvgate_served_unknown_total counts them)"
            );
        }
    }

    /// Records what a request learned about endpoint `id`. A 5xx is an error unless the
    /// endpoint's own load explains it (a 503 while it has a queue); 429 is load. An error rate
    /// well above the pool's ejects the endpoint, while no more than `max_ejection_percent` of
    /// the pool is out.
    pub fn report(&self, id: EndpointId, outcome: Outcome) {
        let inner = &self.inner;
        let s = &inner.settings;
        let now = now_ms();
        let mut st = inner.state.lock();
        let Some(k) = st.members.iter().position(|m| m.id == id) else { return };
        let before = st.members[k].health.state(now);
        let m = &mut st.members[k];
        let error = match outcome {
            Outcome::Unreachable => {
                m.health.unreachable(now, s);
                false
            }
            Outcome::Answered(status) => {
                m.health.answered(now);
                let queued = m.metrics.as_ref().is_some_and(|x| x.waiting > 0);
                let error = status >= 500 && !(status == 503 && queued);
                m.health.record(error);
                error
            }
            Outcome::TimedOut => {
                m.health.timed_out(now, s);
                true
            }
        };
        // An error rate well above the pool's ejects a healthy endpoint.
        if error && m.health.state(now) == Health::Healthy && is_outlier(&st.members, k, s.max_ejection_percent) {
            st.members[k].health.eject(Ejected::Outlier, now, s);
            tracing::warn!(pool = inner.name.as_str(), endpoint = %st.members[k].addr, "endpoint ejected: its error rate is well above the pool's");
        }
        if st.members[k].health.state(now) != before {
            drop(st);
            inner.dirty.notify_one();
        }
    }

    /// A token cancelled when endpoint `id` is found silent (ejected as unresponsive, or a probe
    /// of it still silent): requests sent to it and not yet answered give up on it. Cancelled
    /// already while it is out for its silence (a request decided on a snapshot from before the
    /// ejection goes elsewhere at once). `None` for an endpoint no longer in the pool.
    pub fn stopped(&self, id: EndpointId) -> Option<CancellationToken> {
        let st = self.inner.state.lock();
        let m = st.members.iter().find(|m| m.id == id)?;
        let silent = m.health.reason == Some(Ejected::Unresponsive) && m.health.state(now_ms()) == Health::Unhealthy;
        if silent {
            let gone = CancellationToken::new();
            gone.cancel();
            return Some(gone);
        }
        Some(m.stopped.clone())
    }

    /// Follows the endpoints' KV-event publishers as `spec` says (before discovery starts):
    /// kvgate connects to each endpoint's, or binds one socket the engines connect to.
    pub fn follow_kv_events(&self, spec: KvEventsSpec) {
        if spec.bind.is_some() {
            let listen = kv_events::listen(Arc::downgrade(&self.inner), spec.clone());
            let task = self.inner.owner.spawn("kv-event listener", listen);
            self.inner.tasks.lock().push(task);
        }
        *self.inner.kv_events.lock() = Some(spec);
    }

    /// A request that should have stored blocks on `id` (a precise view) was answered.
    pub fn answered_precise(&self, id: EndpointId) {
        if let Some(p) = self.inner.planner.precise() {
            p.index().answered(id, now_ms());
        }
    }
}

/// What a request learned about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status.
    Answered(u16),
    /// It could not be reached (or its connection broke before an answer).
    Unreachable,
    /// It took the request but did not answer in time: an error for its error rate — the
    /// endpoint is there, and a slow one is no reason to eject a pool's worth of endpoints.
    TimedOut,
}

/// Outcomes an endpoint needs in its window before its error rate counts.
const OUTLIER_MIN_REQUESTS: u32 = 20;

/// Whether member `k` is an error-rate outlier that may be ejected: at least half of its last
/// (up to 64, at least 20) requests failed, a rate at least 30 points above the pool's, and
/// ejecting it keeps the endpoints out of rotation within `max_percent` of the pool. (Simulated
/// on four endpoints failing 40% alike, these thresholds eject one in about 0.5% of runs of 1,500
/// requests; one endpoint failing every request among healthy ones is ejected within 150.) When every endpoint fails alike
/// (a bad model version, a shared dependency down) none is an outlier: ejecting would only take
/// capacity away.
fn is_outlier(members: &[Member], k: usize, max_percent: u32) -> bool {
    let (errors, n) = members[k].health.error_counts();
    if n < OUTLIER_MIN_REQUESTS {
        return false;
    }
    let rate = f64::from(errors) / f64::from(n);
    let (all_errors, all_n) =
        members.iter().map(|m| m.health.error_counts()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let pool_rate = f64::from(all_errors) / f64::from(all_n.max(1));
    let down = members.iter().filter(|m| m.health.is_down()).count();
    let cap = members.len() * max_percent as usize / 100;
    rate >= 0.5 && rate >= pool_rate + 0.3 && down < cap
}

/// A pool that is only reachable weakly (scrapers hold this so they end with the pool).
type WeakPool = Weak<Inner>;
