//! Flow control: a pool's bounded queue in front of dispatch, gated by what kvgate itself has
//! in flight on each endpoint.
//!
//! An endpoint is *open* to a request while kvgate's requests in flight there are below its
//! request bound (set, or learned from its scrapes: the most running requests of its last three
//! scrapes that found it queueing; a slow start from 4, doubling, before it ever queued), its
//! uncached prompt tokens in prefill below its token bound (set, or what its learned prefill
//! rate computes in `prefill_window_ms`, at most its KV cache), and its scraped
//! queue below `max_waiting_per_endpoint`: scrapes can add saturation, never hide what kvgate
//! sent. A request finds the pool saturated when none of its candidates is open; it then waits
//! here in its priority band (higher first, strictly), in its flow's line (round robin between
//! flows, FCFS or EDF within one), until a capacity event — a request's end or first byte, a
//! published snapshot (scrape, discovery, health) — lets it go ([`FlowControl::pump`]), its TTL
//! passes, or its client leaves. One waiter is let go at a time: it plans and is counted in
//! flight holding its [`Turn`], and only when the turn is dropped is the next one looked at, so
//! a burst of wakes cannot overshoot. Sheddable requests (negative priority) are never queued.
//! A lower band leaves `headroom_percent` of each bound free while a higher band has had
//! requests in the last 10 s, so a higher band finds room at once rather than behind it, and
//! keeps as large a share of the endpoints with nothing in prefill, where the higher band's
//! requests go so that their prompts are not computed beside another's.

pub mod objectives;
mod queue;
mod status;

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use super::{Snapshot, now_ms};
use crate::gateway::config::flow::{FlowSettings, GateKind};
use crate::gateway::error::QueueRefusal as Refusal;
use crate::gateway::telemetry::Telemetry;
use crate::routing::endpoint::{Endpoint, Health, Metrics};
use crate::routing::schedule::Subset;

pub use objectives::Objectives;
pub use status::{BandStatus, FlowStatus};

/// How long a band counts as busy after its last request, for the headroom lower bands leave.
const BUSY_BAND: Duration = Duration::from_secs(10);
/// Flows looked at per capacity event at most (the head of each).
const SCAN: usize = 256;
/// Distinct flow labels per pool in metrics; the rest are `other`.
const FLOW_LABELS: usize = 64;
/// The flow of a request that names none.
const DEFAULT_FLOW: &str = "default-flow";

/// What a request says of itself to flow control, from its headers (or the picker API's
/// fields).
#[derive(Debug, Clone, Copy, Default)]
pub struct Class<'a> {
    /// `x-llm-d-inference-objective`.
    pub objective: Option<&'a str>,
    /// `x-llm-d-inference-fairness-id`.
    pub flow: Option<&'a str>,
    /// `x-llm-d-slo-ttft-ms`: the deadline EDF orders by.
    pub slo_ttft_ms: Option<u64>,
}

/// The request bound of an endpoint that has never been seen queueing: doubled at each scrape
/// that finds it running that many with none waiting, until it queues.
const FIRST_BOUND: u64 = 4;
/// Scrapes in a row that must find an endpoint running its whole bound with none waiting before
/// the bound grows by one.
const CALM_SCRAPES: u32 = 3;

/// What an endpoint is learned to take.
#[derive(Debug, Clone, Copy)]
struct Learned {
    /// The running requests of its last three scrapes that found it queueing (0: none): the
    /// bound is their largest, so a scrape taken as a step retires a request does not lower it.
    queued: [u64; 3],
    /// The bound learned from them (then grown while it keeps up).
    batch: Option<u64>,
    /// Before it ever queued: the slow-start bound.
    start: u64,
    /// Scrapes in a row that found it running its bound with none waiting.
    calm: u32,
    /// Its KV cache in tokens (`vllm:cache_config_info`).
    kv_tokens: Option<u64>,
}

impl Default for Learned {
    fn default() -> Self {
        Self { queued: [0; 3], batch: None, start: FIRST_BOUND, calm: 0, kv_tokens: None }
    }
}

impl Learned {
    /// The request bound: learned, else the slow-start one.
    fn bound(&self) -> u64 {
        self.batch.unwrap_or(self.start)
    }
}

/// An endpoint across snapshots.
type Key = (SocketAddr, Option<u32>);

fn key(e: &Endpoint) -> Key {
    (e.address, e.rank)
}

/// `bound` less `percent` of it (rounded up), at least 1: what a lower band holds while a higher
/// one is busy.
fn less_headroom(bound: u64, percent: u64) -> u64 {
    bound.saturating_sub(bound.saturating_mul(percent).div_ceil(100)).max(1)
}

/// Which endpoints a request could go to.
#[derive(Debug)]
pub struct Probe {
    /// Its model or adapter.
    pub model: String,
    /// The subset it may go to.
    pub subset: Option<Subset>,
}

/// One waiting request.
#[derive(Debug)]
struct Waiting {
    seq: u64,
    deadline: Instant,
    bytes: u64,
    probe: Arc<Probe>,
    wake: oneshot::Sender<Turn>,
}

#[derive(Debug)]
struct Flow {
    id: Arc<str>,
    label: Arc<str>,
    line: VecDeque<Waiting>,
}

#[derive(Debug, Default)]
struct Band {
    /// Round-robin order: the front flow is served next.
    flows: VecDeque<Flow>,
    requests: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
struct Queue {
    bands: BTreeMap<Reverse<i64>, Band>,
    requests: u64,
    bytes: u64,
    next_seq: u64,
    /// A waiter has been let go and has not planned yet.
    dispatching: bool,
    /// Flow labels handed out.
    labels: Vec<Arc<str>>,
}

/// A pool's flow control.
#[derive(Debug)]
pub struct FlowControl {
    pool: String,
    models: Vec<String>,
    stale_ms: u64,
    enabled: AtomicBool,
    settings: RwLock<Arc<FlowSettings>>,
    objectives: Objectives,
    learned: Mutex<HashMap<Key, Learned>>,
    queue: Mutex<Queue>,
    /// Requests waiting (read without the lock at every capacity event).
    waiting: AtomicUsize,
    /// When each priority last had a request.
    seen: Mutex<BTreeMap<i64, Instant>>,
    /// The pool's endpoints as last published.
    snapshot: RwLock<Arc<Snapshot>>,
    telemetry: Arc<Telemetry>,
}

/// The right to plan, given to one waiter at a time; the request plans and is counted in
/// flight while it holds it, and dropping it lets the next waiter be looked at.
#[derive(Debug)]
pub struct Turn {
    flow: Option<Arc<FlowControl>>,
}

impl Turn {
    /// Forgets the turn without releasing it (its giver takes it back).
    fn defuse(mut self) {
        self.flow = None;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(f) = self.flow.take() {
            f.queue.lock().dispatching = false;
            f.pump();
        }
    }
}

/// Held by a routed request: dropped after its in-flight counts, it lets the pool's waiters be
/// looked at ([`Room::pump`] does so at its first byte too).
#[derive(Debug)]
pub struct Room(Arc<FlowControl>);

impl Room {
    /// Room for `flow`'s waiters.
    pub fn new(flow: &Arc<FlowControl>) -> Self {
        Self(flow.clone())
    }

    /// Lets the next waiter go, if room opened.
    pub fn pump(&self) {
        self.0.pump();
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.0.pump();
    }
}

/// A request let through: its turn (if it waited for one) and the endpoints open to it.
#[derive(Debug)]
pub struct Admitted {
    /// Held while the request plans.
    pub turn: Option<Turn>,
    /// The snapshot its gate looked at (the mask is by its indices).
    pub snapshot: Arc<Snapshot>,
    /// By index of `snapshot`: the endpoints open to it.
    pub open: Vec<bool>,
}

/// A queued request's place; leaving (a client gone, a TTL passed) takes it out.
struct Place<'f> {
    flow: &'f Arc<FlowControl>,
    priority: i64,
    id: Arc<str>,
    seq: Option<u64>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if let Some(seq) = self.seq.take() {
            self.flow.remove(self.priority, &self.id, seq);
        }
    }
}

impl FlowControl {
    /// Flow control for pool `pool` serving `models`, off until [`FlowControl::configure`];
    /// scraped load counts while younger than `stale_ms`.
    pub fn new(pool: &str, models: &[String], stale_ms: u64, telemetry: Arc<Telemetry>) -> Self {
        Self {
            pool: pool.to_owned(),
            models: models.to_vec(),
            stale_ms,
            enabled: AtomicBool::new(false),
            settings: RwLock::new(Arc::new(FlowSettings::default())),
            objectives: Objectives::default(),
            learned: Mutex::new(HashMap::new()),
            queue: Mutex::new(Queue::default()),
            waiting: AtomicUsize::new(0),
            seen: Mutex::new(BTreeMap::new()),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            telemetry,
        }
    }

    /// Sets the pool's flow control and its configured objectives.
    pub fn configure(&self, settings: FlowSettings, objectives: impl IntoIterator<Item = (String, i64)>) {
        self.enabled.store(settings.enabled, AtomicOrdering::Relaxed);
        *self.settings.write() = Arc::new(settings);
        self.objectives.set_configured(objectives);
    }

    /// Whether requests may wait here.
    pub fn enabled(&self) -> bool {
        self.enabled.load(AtomicOrdering::Relaxed)
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<FlowSettings> {
        self.settings.read().clone()
    }

    /// The pool's objectives.
    pub fn objectives(&self) -> &Objectives {
        &self.objectives
    }

    /// Requests waiting.
    fn waiting(&self) -> usize {
        self.waiting.load(AtomicOrdering::SeqCst)
    }

    /// Takes a newly published snapshot and lets waiters go if it opened room.
    pub(super) fn published(self: &Arc<Self>, snapshot: Arc<Snapshot>) {
        *self.snapshot.write() = snapshot;
        self.pump();
    }

    /// The pool's endpoints as last published.
    fn current(&self) -> Arc<Snapshot> {
        self.snapshot.read().clone()
    }

    /// Learns from a scrape of an endpoint that held `ours` of kvgate's requests. One that
    /// queues runs as many requests as it can: the bound is the most it ran in its last three
    /// queueing scrapes (one scrape at most halves it). One that holds all kvgate let through —
    /// its bound less the headroom a lower band leaves — with none waiting may take one more
    /// after three such scrapes in a row while only one band is busy. Before it ever queued, one
    /// that runs its whole bound with none waiting may take twice as many (slow start).
    pub(super) fn observe(&self, key: Key, m: &Metrics, kv_tokens: Option<u64>, ours: u64) {
        if !self.enabled() {
            return;
        }
        // While bands of two priorities are busy, the lower holds the bound less its headroom.
        let at = Instant::now();
        let busy = self.seen.lock().values().filter(|t| at.duration_since(**t) < BUSY_BAND).count();
        let headroom = if busy > 1 { u64::from(self.settings().headroom_percent) } else { 0 };
        let mut learned = self.learned.lock();
        let l = learned.entry(key).or_default();
        if kv_tokens.is_some() {
            l.kv_tokens = kv_tokens;
        }
        let running = u64::from(m.running);
        let bound = l.bound();
        let held = less_headroom(bound, headroom);
        if m.waiting > 0 {
            let floor = l.batch.map_or(1, |b| b / 2).max(1);
            l.queued.rotate_right(1);
            l.queued[0] = running.max(floor);
            l.batch = l.queued.iter().max().copied();
            l.calm = 0;
        } else if l.batch.is_none() {
            // Slow start: doubled only once the engine itself runs the whole bound (not merely
            // kvgate's share of it under headroom), so a burst overshoots by one doubling at most.
            if running >= bound {
                l.start = l.start.saturating_mul(2);
            }
        } else if running.max(ours) < held {
            l.calm = 0;
        } else if headroom > 0 {
            // A probe for one more puts a request in the engine's queue, where a higher band's
            // next request would wait behind it: no probing while a higher band is busy.
            l.calm = 0;
        } else {
            l.calm += 1;
            if l.calm >= CALM_SCRAPES {
                l.batch = Some(bound + 1);
                l.calm = 0;
            }
        }
    }

    /// Whether bands above `priority` had requests lately (a lower band then leaves headroom),
    /// and whether bands below it did (it is then the band headroom is left for).
    fn bands_around(&self, priority: i64, now: Instant) -> (bool, bool) {
        let seen = self.seen.lock();
        let busy = |(_, at): (&i64, &Instant)| now.duration_since(*at) < BUSY_BAND;
        (seen.range(priority.saturating_add(1)..).any(busy), seen.range(..priority).any(busy))
    }

    /// Whether `e` is open (`headroom`: leaving room for a busy higher band) at monotonic `now_ms`.
    fn open(
        &self,
        s: &FlowSettings,
        learned: &HashMap<Key, Learned>,
        e: &Endpoint,
        headroom: bool,
        now_ms: u64,
    ) -> bool {
        let fresh = e.fresh_metrics(now_ms, self.stale_ms);
        let queues = |m: &Metrics| u64::from(m.waiting) >= s.max_waiting_per_endpoint;
        if s.gate == GateKind::Scrape {
            return fresh.is_some_and(|m| !queues(m) && m.kv_usage < s.max_kv_usage);
        }
        if fresh.is_some_and(queues) {
            return false;
        }
        let leave = |bound: u64| if headroom { less_headroom(bound, u64::from(s.headroom_percent)) } else { bound };
        let learned = learned.get(&key(e)).copied().unwrap_or_default();
        let f = &e.in_flight;
        if f.requests() >= leave(s.max_requests_per_endpoint.unwrap_or_else(|| learned.bound())) {
            return false;
        }
        let tokens = f.gated_tokens();
        if tokens == 0 {
            return true;
        }
        let bound = s.max_prefill_tokens_per_endpoint.unwrap_or_else(|| {
            let by_rate = (e.ttft.prefill_tokens_per_s() * s.prefill_window.as_secs_f64()).max(1.0) as u64;
            learned.kv_tokens.map_or(by_rate, |kv| by_rate.min(kv))
        });
        tokens < leave(bound)
    }

    /// The endpoints `probe` could go to, by index: serving its model within its subset, in
    /// rotation (else ejected but answering, else probing).
    fn candidates(&self, endpoints: &[Endpoint], probe: &Probe) -> Vec<usize> {
        let mut c: Vec<usize> = (0..endpoints.len())
            .filter(|&i| {
                let e = &endpoints[i];
                // Prefill-only endpoints take no request from the gateway (the decode side calls them).
                e.role.decodes()
                    && e.serves(&probe.model, &self.models)
                    && probe.subset.as_ref().is_none_or(|s| s.contains(e.address))
            })
            .collect();
        let healthy = |i: &usize| endpoints[*i].health == Health::Healthy;
        if c.iter().any(healthy) {
            c.retain(healthy);
        } else if c.iter().any(|&i| endpoints[i].ejected) {
            c.retain(|&i| endpoints[i].ejected);
        } else {
            c.retain(|&i| endpoints[i].health == Health::Probing);
        }
        c
    }

    /// The endpoints open to `probe` at `priority`, by index of `endpoints`; `None` when none is.
    ///
    /// While bands on both sides of `priority` are busy, prefill is shared out as well as the
    /// bounds. A lower band keeps `headroom_percent` of the candidates (at least one, never all)
    /// with nothing of kvgate's in prefill: it may start a prefill on an endpoint already
    /// prefilling, or on an idle one only while enough others stay idle. A band a lower one
    /// makes way for goes to an idle endpoint when one is open, where its prompt is computed in
    /// a step of its own rather than beside another's prefill.
    fn open_mask(&self, s: &FlowSettings, endpoints: &[Endpoint], probe: &Probe, priority: i64) -> Option<Vec<bool>> {
        let (headroom, favoured) = self.bands_around(priority, Instant::now());
        let now = now_ms();
        let candidates = self.candidates(endpoints, probe);
        let idle = |i: usize| endpoints[i].in_flight.gated_tokens() == 0;
        let percent = if s.gate == GateKind::Scrape { 0 } else { u64::from(s.headroom_percent) };
        let reserve = if headroom && percent > 0 && candidates.len() > 1 {
            let n = candidates.len() as u64;
            (n * percent).div_ceil(100).clamp(1, n - 1) as usize
        } else {
            0
        };
        let idle_now = candidates.iter().filter(|&&i| idle(i)).count();
        let mut mask = vec![false; endpoints.len()];
        let mut any = false;
        let learned = self.learned.lock();
        for &i in &candidates {
            let keeps_reserve = reserve == 0 || !idle(i) || idle_now > reserve;
            if keeps_reserve && self.open(s, &learned, &endpoints[i], headroom, now) {
                mask[i] = true;
                any = true;
            }
        }
        if favoured && percent > 0 && candidates.iter().any(|&i| mask[i] && idle(i)) {
            for &i in &candidates {
                mask[i] &= idle(i);
            }
        }
        any.then_some(mask)
    }

    /// The share of the pool's endpoints in rotation that are saturated for a request of
    /// priority 0 (`flow_control_pool_saturation`).
    pub fn saturation(&self) -> f64 {
        let s = self.settings();
        let snap = self.current();
        let now = now_ms();
        let up: Vec<&Endpoint> = snap.endpoints.iter().filter(|e| e.health == Health::Healthy).collect();
        if up.is_empty() {
            return 1.0;
        }
        let learned = self.learned.lock();
        let full = up.iter().filter(|e| !self.open(&s, &learned, e, false, now)).count();
        full as f64 / up.len() as f64
    }

    /// Waits, if it must, until a request of `class` and `priority` for `probe`, of `bytes`,
    /// may plan on the pool's endpoints as last published (the snapshot it is admitted with):
    /// at once when an endpoint is open to it and nobody of its priority or above waits, else in
    /// the queue. Dropping the future leaves the queue.
    pub async fn enter(
        self: &Arc<Self>,
        probe: Probe,
        priority: i64,
        class: Class<'_>,
        bytes: u64,
    ) -> Result<Admitted, Refusal> {
        let s = self.settings();
        let arrived = Instant::now();
        self.seen.lock().insert(priority, arrived);
        {
            let q = self.queue.lock();
            // A turn in progress makes newcomers queue behind it, but sheds nobody.
            let waiters = q.bands.range(..=Reverse(priority)).any(|(_, b)| b.requests > 0);
            let ahead = waiters || (q.dispatching && priority >= 0);
            let snapshot = self.current();
            if !ahead && let Some(open) = self.open_mask(&s, &snapshot.endpoints, &probe, priority) {
                self.observe_wait(priority, "dispatched", Duration::ZERO);
                return Ok(Admitted { turn: None, snapshot, open });
            }
        }
        if priority < 0 {
            self.observe_wait(priority, "shed", Duration::ZERO);
            return Err(Refusal::Shed);
        }
        let ttl = s.ttl;
        let deadline = arrived + class.slo_ttft_ms.map_or(ttl, Duration::from_millis).min(ttl);
        let expires = arrived + ttl;
        let id: Arc<str> = Arc::from(class.flow.filter(|f| !f.is_empty()).unwrap_or(DEFAULT_FLOW));
        let probe = Arc::new(probe);
        let mut place = Place { flow: self, priority, id: id.clone(), seq: None };
        // A turn taken back to the queue: released once its holder is in line again.
        let mut given_back: Option<Turn> = None;
        loop {
            let (tx, mut rx) = oneshot::channel();
            let w = Waiting { seq: place.seq.unwrap_or(0), deadline, bytes, probe: probe.clone(), wake: tx };
            let Ok(seq) = self.push(&s, priority, &id, w, given_back.is_some()) else {
                self.observe_wait(priority, "rejected", arrived.elapsed());
                return Err(Refusal::Full);
            };
            place.seq = Some(seq);
            match given_back.take() {
                Some(turn) => drop(turn),
                // Room may have opened since the look above, with no event left to tell.
                None => self.pump(),
            }
            let turn = tokio::select! {
                t = &mut rx => t.ok(),
                () = tokio::time::sleep_until(expires.into()) => rx.try_recv().ok(),
            };
            let Some(turn) = turn else {
                drop(place);
                let empty = self.candidates(&self.current().endpoints, &probe).is_empty();
                self.observe_wait(priority, "expired", arrived.elapsed());
                return Err(if empty { Refusal::ExpiredEmpty } else { Refusal::Expired });
            };
            // The pump took it out of the queue; its place (seq) is kept for a return.
            let seq = place.seq.take();
            let snapshot = self.current();
            if let Some(open) = self.open_mask(&s, &snapshot.endpoints, &probe, priority) {
                self.observe_wait(priority, "dispatched", arrived.elapsed());
                return Ok(Admitted { turn: Some(turn), snapshot, open });
            }
            // Someone took the room in between: back to the head of its line.
            place.seq = seq;
            given_back = Some(turn);
        }
    }
}
