//! What replicas share (the wire is `front::picker::cluster`): each decision's prompt blocks and
//! endpoint, and each replica's own requests in flight per endpoint.
//!
//! A decision is put in the [`Outbox`] under a short lock (never waiting on a peer); every
//! `sync_interval_ms` the outbox is taken as one [`Batch`] with the in-flight counts that changed
//! (all of them once a second, which renews the replica's lease with its followers). A follower
//! applies a peer's batch to its own state: placements are recorded in its prefix index as its
//! own decisions are; a peer's counts replace what that peer said before, and every endpoint's
//! [`InFlight`] reads its own counts plus the sum of its peers'. A peer not heard within
//! `lease_ms` is forgotten: its counts are taken away.
//!
//! [`InFlight`]: crate::routing::endpoint::InFlight

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{Pool, now_ms};
use crate::gateway::config::cluster::ClusterConfig;
use crate::gateway::telemetry::Telemetry;
use crate::routing::endpoint::{Endpoint, Load};
use crate::routing::prefix::BlockHash;
use crate::routing::ttft::TtftSample;

/// Placements (and lessons) held between batches at most; past it, new ones are dropped
/// (counted): a peer then misses some prefixes, which only costs hits.
const MAX_OUTBOX: usize = 65_536;
/// Blocks held between batches at most, over every placement (8 bytes each).
const MAX_OUTBOX_BLOCKS: usize = 1 << 22;
/// Blocks of one placement shared at most: the prompt's first ones (a prefix of a chain is a
/// chain).
pub const MAX_PLACEMENT_BLOCKS: usize = 1 << 16;
/// Blocks per endpoint a snapshot carries at most (the most recent).
pub const MAX_SNAPSHOT_BLOCKS: usize = 1 << 20;
/// The stretch a peer's rate of deltas is taken over.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How often every count is sent, changed or not (the lease's renewal).
const FULL_LOADS: Duration = Duration::from_secs(1);

/// An endpoint as peers name it: `ip:port`, `#rank` added for a data-parallel rank.
pub fn endpoint_key(e: &Endpoint) -> String {
    key_of(e.address, e.rank)
}

fn key_of(address: SocketAddr, rank: Option<u32>) -> String {
    match rank {
        Some(r) => format!("{address}#{r}"),
        None => address.to_string(),
    }
}

/// A snapshot's endpoints by key.
fn keyed(endpoints: &[Endpoint]) -> HashMap<String, &Endpoint> {
    endpoints.iter().map(|e| (endpoint_key(e), e)).collect()
}

/// Something a replica learned from a response, which its peers learn from too (each as if the
/// response had passed through it, so models are merged, not overwritten).
#[derive(Debug, Clone, PartialEq)]
pub enum Lesson {
    /// A prompt of `bytes` canonical bytes was `tokens` tokens (the pool's bytes per token).
    PromptSize {
        /// Canonical prompt bytes.
        bytes: u64,
        /// Prompt tokens the engine counted.
        tokens: u64,
    },
    /// A time to first token measured on an endpoint (its TTFT model).
    Ttft {
        /// The endpoint's key.
        endpoint: String,
        /// Prefill tokens ahead of the request and its own.
        work_tokens: u64,
        /// Requests in decode there when it was sent.
        decodes: u64,
        /// The time to first byte, ms.
        ttft_ms: f64,
    },
    /// Cache feedback: the endpoint held `less` fewer, or `more` more, blocks of a prompt than
    /// the index believed.
    Held {
        /// The endpoint's key.
        endpoint: String,
        /// Blocks held fewer than believed.
        less: u64,
        /// Blocks held more than believed.
        more: u64,
    },
}

/// Applies a peer's `lesson` to `pool` (endpoints by key).
fn learn(pool: &Pool, by_key: &HashMap<String, &Endpoint>, lesson: &Lesson) {
    match lesson {
        Lesson::PromptSize { bytes, tokens } => pool.planner().bytes_per_token().observe(*bytes as usize, *tokens),
        Lesson::Ttft { endpoint, work_tokens, decodes, ttft_ms } => {
            if let Some(e) = by_key.get(endpoint.as_str()) {
                let sample =
                    TtftSample { work_tokens: *work_tokens, decodes: *decodes, ttft_ms: *ttft_ms, at_ms: now_ms() };
                e.ttft.observe(sample);
            }
        }
        Lesson::Held { endpoint, less, more } => {
            if let Some(e) = by_key.get(endpoint.as_str()) {
                let index = pool.planner().index();
                if *less > 0 {
                    index.held_less(e.id, *less as usize);
                }
                if *more > 0 {
                    index.held_more(e.id, *more as usize);
                }
            }
        }
    }
}

/// One pool's part of a batch or a snapshot.
#[derive(Debug, Default, Clone)]
pub struct PoolBatch {
    /// The pool's name.
    pub pool: String,
    /// Prompts placed: endpoint key and block chain.
    pub placements: Vec<(String, Vec<BlockHash>)>,
    /// The sender's own counts per endpoint key.
    pub loads: Vec<(String, Load)>,
    /// In a snapshot: each endpoint's blocks, most recent first, and its capacity.
    pub held: Vec<(String, Vec<BlockHash>, usize)>,
    /// In a snapshot: the learned bytes per token and its samples.
    pub bytes_per_token: Option<(f64, u64)>,
    /// What the sender learned from responses since the last batch.
    pub lessons: Vec<Lesson>,
}

/// What a replica sends its followers at once.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Per pool.
    pub pools: Vec<PoolBatch>,
    /// Its loads are every count the sender has (a snapshot's, or a renewal's): a count not in
    /// it is zero.
    pub full_loads: bool,
}

impl PoolBatch {
    /// Whether it carries nothing.
    pub fn is_empty(&self) -> bool {
        self.placements.is_empty() && self.loads.is_empty() && self.held.is_empty() && self.lessons.is_empty()
    }
}

impl Batch {
    /// Whether it carries nothing.
    pub fn is_empty(&self) -> bool {
        self.pools.iter().all(PoolBatch::is_empty)
    }
}

/// Decisions and lessons not yet sent (taken under a short lock by every decision: endpoint
/// keys are formatted when the batch is made, not here).
#[derive(Debug, Default)]
struct Outbox {
    /// Pool index, endpoint (address and rank), blocks.
    placements: Vec<(usize, SocketAddr, Option<u32>, Vec<BlockHash>)>,
    /// Pool index and lesson.
    lessons: Vec<(usize, Lesson)>,
    /// Blocks over every placement held.
    blocks: usize,
}

/// The counts the batches said last (the syncer's alone).
#[derive(Debug, Default)]
struct Sent {
    /// By pool index and endpoint key.
    loads: HashMap<(usize, String), Load>,
    /// When every count was last sent.
    last_full: Option<Instant>,
}

/// One peer as its batches told.
#[derive(Debug)]
struct Peer {
    /// Where it was followed from.
    address: String,
    heard: Instant,
    /// Its counts by pool name and endpoint key.
    loads: HashMap<(String, String), Load>,
    /// When its snapshot was applied.
    joined: Option<Instant>,
    batches: u64,
    lag_ms: u64,
    /// Placements, counts and lessons applied so far, and the window the rate is taken over
    /// (its start and the total then).
    deltas: u64,
    window: (Instant, u64),
    /// The last full window's rate.
    per_s: f64,
}

/// A peer as `/debug/cluster` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    /// Its replica id.
    pub replica: String,
    /// The address it is followed at.
    pub address: String,
    /// Milliseconds since its last batch.
    pub last_heard_ms: u64,
    /// Milliseconds since its snapshot was applied (none yet: null).
    pub snapshot_age_ms: Option<u64>,
    /// Batches applied.
    pub batches: u64,
    /// The last batch's sync lag (its send time to its application, within clock skew), ms.
    pub lag_ms: u64,
    /// Placements, counts and lessons applied per second (over the last 10 s).
    pub deltas_per_s: f64,
    /// Requests it has in flight, over every endpoint.
    pub in_flight_requests: u64,
}

/// This replica's part in the cluster.
#[derive(Debug)]
pub struct Cluster {
    id: String,
    settings: ClusterConfig,
    pools: Vec<Pool>,
    outbox: Mutex<Outbox>,
    sent: Mutex<Sent>,
    peers: Mutex<HashMap<String, Peer>>,
    started: Instant,
    joined: AtomicBool,
    /// Every peer address has been tried once (found, unreachable, or this replica itself).
    tried_all: AtomicBool,
    /// It has been ready.
    ready: AtomicBool,
    telemetry: Arc<Telemetry>,
}

impl Cluster {
    /// The cluster part of replica `id` (its decision ids' nonce) over `pools`.
    pub fn new(id: String, settings: ClusterConfig, pools: Vec<Pool>, telemetry: Arc<Telemetry>) -> Self {
        Self {
            id,
            settings,
            pools,
            outbox: Mutex::new(Outbox::default()),
            sent: Mutex::new(Sent::default()),
            peers: Mutex::new(HashMap::new()),
            started: Instant::now(),
            joined: AtomicBool::new(false),
            tried_all: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            telemetry,
        }
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The settings.
    pub fn settings(&self) -> &ClusterConfig {
        &self.settings
    }

    /// A decision of pool `pool` placed `blocks` on `e`: sent in the next batch.
    pub fn placed(&self, pool: &str, e: &Endpoint, blocks: &[BlockHash]) {
        let Some(i) = self.pools.iter().position(|p| p.name() == pool) else { return };
        if blocks.is_empty() {
            return;
        }
        let blocks = &blocks[..blocks.len().min(MAX_PLACEMENT_BLOCKS)];
        let mut out = self.outbox.lock();
        if out.placements.len() >= MAX_OUTBOX || out.blocks + blocks.len() > MAX_OUTBOX_BLOCKS {
            drop(out);
            self.telemetry.cluster_dropped.with_label_values(&["outbox_full"]).inc();
            return;
        }
        out.blocks += blocks.len();
        out.placements.push((i, e.address, e.rank, blocks.to_vec()));
    }

    /// Pool `pool` learned `lesson` from a response: sent in the next batch.
    pub fn learned(&self, pool: &str, lesson: Lesson) {
        let Some(i) = self.pools.iter().position(|p| p.name() == pool) else { return };
        let mut out = self.outbox.lock();
        if out.lessons.len() >= MAX_OUTBOX {
            drop(out);
            self.telemetry.cluster_dropped.with_label_values(&["outbox_full"]).inc();
            return;
        }
        out.lessons.push((i, lesson));
    }

    /// The next batch: the placements since the last one, and the counts that changed (every
    /// count once a second).
    pub fn take_batch(&self) -> Batch {
        let (placements, lessons) = {
            let mut out = self.outbox.lock();
            out.blocks = 0;
            (std::mem::take(&mut out.placements), std::mem::take(&mut out.lessons))
        };
        let mut pools: Vec<PoolBatch> =
            self.pools.iter().map(|p| PoolBatch { pool: p.name().to_owned(), ..PoolBatch::default() }).collect();
        for (i, address, rank, blocks) in placements {
            pools[i].placements.push((key_of(address, rank), blocks));
        }
        for (i, lesson) in lessons {
            pools[i].lessons.push(lesson);
        }
        let mut sent = self.sent.lock();
        let now = Instant::now();
        let full = sent.last_full.is_none_or(|t| now.duration_since(t) >= FULL_LOADS);
        if full {
            sent.last_full = Some(now);
        }
        let mut seen = HashSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            for e in &p.snapshot().endpoints {
                let key = endpoint_key(e);
                let now_load = e.in_flight.own();
                let entry = (i, key.clone());
                let before = sent.loads.get(&entry).copied().unwrap_or_default();
                if full || before != now_load {
                    pools[i].loads.push((key, now_load));
                }
                seen.insert(entry.clone());
                sent.loads.insert(entry, now_load);
            }
        }
        // An endpoint gone from the pool: its counts go to zero.
        let gone: Vec<(usize, String)> = sent.loads.keys().filter(|k| !seen.contains(*k)).cloned().collect();
        for k in gone {
            sent.loads.remove(&k);
            if !full {
                pools[k.0].loads.push((k.1, Load::default()));
            }
        }
        pools.retain(|p| !p.is_empty());
        Batch { pools, full_loads: full }
    }

    /// This replica's state for a joining peer: every pool's index and counts.
    pub fn snapshot(&self) -> Batch {
        let pools = self
            .pools
            .iter()
            .map(|p| {
                let bpt = p.planner().bytes_per_token();
                let mut b = PoolBatch {
                    pool: p.name().to_owned(),
                    bytes_per_token: Some((bpt.get(), bpt.samples())),
                    ..PoolBatch::default()
                };
                let index = p.planner().index();
                for e in &p.snapshot().endpoints {
                    let key = endpoint_key(e);
                    let held = index.held(e.id, MAX_SNAPSHOT_BLOCKS);
                    if !held.is_empty() {
                        let capacity = index.capacity(e.id).map_or(held.len(), |(c, _)| c);
                        b.held.push((key.clone(), held, capacity));
                    }
                    b.loads.push((key, e.in_flight.own()));
                }
                b
            })
            .collect();
        Batch { pools, full_loads: true }
    }

    /// Applies peer `replica`'s batch (followed at `address`); `lag_ms` since it was sent.
    /// Returns the placements and counts applied. The index and the learned models are worked
    /// on before the peers' lock is taken, which only covers the counts.
    pub fn apply(&self, replica: &str, address: &str, batch: &Batch, lag_ms: u64) -> (u64, u64) {
        let mut placed = 0;
        // The counts of endpoints this replica has, by (pool, key).
        let mut loads: Vec<((String, String), Load)> = Vec::new();
        for b in &batch.pools {
            let Some(pool) = self.pools.iter().find(|p| p.name() == b.pool) else { continue };
            let snap = pool.snapshot();
            let by_key = keyed(&snap.endpoints);
            let local = |key: &str| by_key.get(key).copied();
            let index = pool.planner().index();
            let adopted = b.bytes_per_token.is_some_and(|(bpt, n)| pool.planner().bytes_per_token().adopt(bpt, n));
            for (key, blocks, capacity) in &b.held {
                if let Some(e) = local(key) {
                    // The peer's capacity before the endpoint's own is known (no scrape yet), or
                    // when its own was figured with the bytes per token just replaced by the
                    // peer's (the next scrape figures it again, with the new figure).
                    let want = (*capacity).max(blocks.len()).min(MAX_SNAPSHOT_BLOCKS);
                    if index.capacity(e.id).is_none_or(|(c, _)| adopted && c < want) {
                        index.set_capacity(e.id, want);
                    }
                    index.merge(e.id, blocks);
                }
            }
            for (key, blocks) in &b.placements {
                if let Some(e) = local(key) {
                    index.record(e.id, blocks);
                    placed += 1;
                }
            }
            for lesson in &b.lessons {
                learn(pool, &by_key, lesson);
            }
            loads.extend(
                b.loads
                    .iter()
                    .filter(|(key, _)| by_key.contains_key(key.as_str()))
                    .map(|(key, l)| ((b.pool.clone(), key.clone()), *l)),
            );
        }
        let counted = loads.len() as u64;
        let now = Instant::now();
        let mut peers = self.peers.lock();
        let peer = peers.entry(replica.to_owned()).or_insert_with(|| Peer {
            address: address.to_owned(),
            heard: now,
            loads: HashMap::new(),
            joined: None,
            batches: 0,
            lag_ms: 0,
            deltas: 0,
            window: (now, 0),
            per_s: 0.0,
        });
        peer.heard = now;
        peer.address = address.to_owned();
        peer.batches += 1;
        peer.lag_ms = lag_ms;
        let mut touched: HashSet<(String, String)> = HashSet::new();
        if batch.full_loads {
            touched.extend(peer.loads.drain().map(|(k, _)| k));
        }
        for (k, load) in loads {
            if load == Load::default() {
                peer.loads.remove(&k);
            } else {
                peer.loads.insert(k.clone(), load);
            }
            touched.insert(k);
        }
        peer.deltas += placed + counted + batch.pools.iter().map(|b| b.lessons.len() as u64).sum::<u64>();
        let span = now.duration_since(peer.window.0);
        if span >= RATE_WINDOW {
            peer.per_s = (peer.deltas - peer.window.1) as f64 / span.as_secs_f64();
            peer.window = (now, peer.deltas);
        }
        self.sum_into_endpoints(&peers, &touched);
        drop(peers);
        self.room_may_have_opened(&touched);
        (placed, counted)
    }

    /// Marks peer `replica`'s snapshot as applied: this replica has joined.
    pub fn joined_from(&self, replica: &str) {
        if let Some(p) = self.peers.lock().get_mut(replica) {
            p.joined = Some(Instant::now());
        }
        self.joined.store(true, Ordering::Relaxed);
    }

    /// Every pool has discovered its endpoints: what peers say can be matched to them, and what
    /// this replica holds is worth a snapshot.
    pub fn pools_ready(&self) -> bool {
        self.pools.iter().all(Pool::ready)
    }

    /// Every peer address has been tried once.
    pub fn tried_all(&self) {
        self.tried_all.store(true, Ordering::Relaxed);
    }

    /// Ready to decide: a peer's snapshot is in, or no peer could give one (none answered, or
    /// the join timeout passed).
    pub fn ready(&self) -> bool {
        if self.ready.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.joined.load(Ordering::Relaxed)
            || self.tried_all.load(Ordering::Relaxed) && !self.any_peer_connected()
            || self.started.elapsed() >= Duration::from_millis(self.settings.join_timeout_ms);
        // Once ready, ready: a peer connecting later does not take it back.
        if now {
            self.ready.store(true, Ordering::Relaxed);
        }
        now
    }

    fn any_peer_connected(&self) -> bool {
        !self.peers.lock().is_empty()
    }

    /// Forgets peers not heard within the lease: their counts leave every endpoint.
    pub fn expire(&self) -> usize {
        let lease = Duration::from_millis(self.settings.lease_ms);
        let mut peers = self.peers.lock();
        let dead: Vec<String> =
            peers.iter().filter(|(_, p)| p.heard.elapsed() >= lease).map(|(k, _)| k.clone()).collect();
        let mut touched = HashSet::new();
        for id in &dead {
            if let Some(p) = peers.remove(id) {
                touched.extend(p.loads.into_keys());
            }
        }
        self.sum_into_endpoints(&peers, &touched);
        drop(peers);
        self.room_may_have_opened(&touched);
        dead.len()
    }

    /// Peers' counts changed on `touched` endpoints: their pools' queues look for room (a peer's
    /// request ending frees a place as this replica's own does).
    fn room_may_have_opened(&self, touched: &HashSet<(String, String)>) {
        for p in &self.pools {
            if p.flow().enabled() && touched.iter().any(|(pool, _)| pool == p.name()) {
                p.flow().pump();
            }
        }
    }

    /// Sets the peers' summed counts on each `touched` endpoint.
    fn sum_into_endpoints(&self, peers: &HashMap<String, Peer>, touched: &HashSet<(String, String)>) {
        for p in &self.pools {
            if !touched.iter().any(|(pool, _)| pool == p.name()) {
                continue;
            }
            let snap = p.snapshot();
            for e in &snap.endpoints {
                let k = (p.name().to_owned(), endpoint_key(e));
                if touched.contains(&k) {
                    let sum = peers.values().filter_map(|p| p.loads.get(&k)).fold(Load::default(), |a, l| a.plus(*l));
                    e.in_flight.set_peers(sum);
                }
            }
        }
    }

    /// The peers as `/debug/cluster` shows them.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let peers = self.peers.lock();
        let mut out: Vec<PeerStatus> = peers
            .iter()
            .map(|(id, p)| PeerStatus {
                replica: id.clone(),
                address: p.address.clone(),
                last_heard_ms: p.heard.elapsed().as_millis() as u64,
                snapshot_age_ms: p.joined.map(|t| t.elapsed().as_millis() as u64),
                batches: p.batches,
                lag_ms: p.lag_ms,
                deltas_per_s: (p.per_s * 10.0).round() / 10.0,
                in_flight_requests: p.loads.values().map(|l| l.requests).sum(),
            })
            .collect();
        out.sort_by(|a, b| a.address.cmp(&b.address));
        out
    }

    /// Where peer `replica` is followed, if it is a live peer.
    pub fn peer_address(&self, replica: &str) -> Option<String> {
        self.peers.lock().get(replica).map(|p| p.address.clone())
    }

    /// Peers heard within the lease.
    pub fn live_peers(&self) -> usize {
        self.peers.lock().len()
    }
}
