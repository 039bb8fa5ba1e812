//! The precise prefix index: which blocks each endpoint really holds, as its KV events say.
//!
//! Two key spaces, as in llm-d's indexer. **Engine keys** are the hashes the engine publishes;
//! their algorithm (`--prefix-caching-hash-algo`) and seed (`PYTHONHASHSEED`) do not matter,
//! because kvgate never computes one. **Request keys** are kvgate's own chained hash of a
//! block's token ids and extra keys: `k_i = xxh3(tokens_i ‖ lora ‖ extra_i, seed = k_{i-1})`,
//! computed from a `BlockStored` event's `token_ids` (its parent's key found through the engine
//! key it names) and, identically, from a tokenized request. An engine key → request key map per
//! endpoint resolves `BlockRemoved`; a request key → holders map answers matches with one lookup
//! per block, whatever the number of endpoints.
//!
//! Extra keys follow vLLM's `extra_keys`: the LoRA adapter enters every block's key (by name;
//! an event's integer `lora_id` or name inside `extra_keys` is the same adapter, not counted
//! twice), a `cache_salt` the first block's, and anything else (multimodal hashes) the key of
//! its block, so such blocks match no text-only request.
//!
//! Each endpoint's view is *live* (it follows a complete stream) or *rebuilding* (a gap could
//! not be repaired, or the view outgrew the engine's capacity: its entries were dropped, and
//! what the engine held before is unknown). A rebuilding view becomes live again when the engine
//! clears its cache, or once it has stored as many blocks as it can hold (by then LRU has
//! replaced what it held before, hits aside). The caller decides what a non-precise endpoint is
//! matched with (the approximate index).
//!
//! Memory is bounded: a view holds at most its capacity (the engine's block count, plus slack
//! for a batch that stores before it evicts), about 48 bytes per (endpoint, block).
//!
//! Part of the decision core: no I/O, no clock (times are arguments).

mod keys;
mod pending;

use hashbrown::HashMap;
use parking_lot::RwLock;

pub(crate) use keys::BuildKeyHasher;
pub use keys::request_keys;
use keys::{KeyMap, SEED, block_key, is_lora};
use pending::Pending;

use crate::routing::endpoint::EndpointId;
use crate::routing::kv_events::{BlockStored, EventBatch, KvEvent, Medium};

/// A view's capacity, in blocks, until the engine reports its own (`vllm:cache_config_info`):
/// 4M tokens in blocks of 16.
pub const DEFAULT_CAPACITY: usize = 1 << 18;
/// vLLM's default block size on GPUs, used until an endpoint's events say otherwise.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;
/// Entries one endpoint may have for one request key.
const MAX_COPIES: usize = 4;

/// Endpoints holding one request key (an endpoint may appear twice: two tiers, or two engine
/// blocks of the same content).
#[derive(Debug, Clone)]
enum Holders {
    One(u32),
    Two(u32, u32),
    // Boxed to keep the common one- and two-holder entries at 16 bytes.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<u32>>),
}

impl Holders {
    fn add(&mut self, ep: u32) {
        // An endpoint holds a key under a few engine blocks at most (its GPU and offload
        // copies); a publisher that claims more gets no more entries, so lookups stay short
        // (its later removals may then drop the key early: an under-claim, never an over-claim).
        if let Self::Many(v) = self
            && v.iter().filter(|&&x| x == ep).count() >= MAX_COPIES
        {
            return;
        }
        *self = match std::mem::replace(self, Self::One(0)) {
            Self::One(a) => Self::Two(a, ep),
            Self::Two(a, b) => Self::Many(Box::new(vec![a, b, ep])),
            Self::Many(mut v) => {
                v.push(ep);
                Self::Many(v)
            }
        };
    }

    /// Removes one occurrence; `true` when none are left.
    fn remove(&mut self, ep: u32) -> bool {
        match self {
            Self::One(a) => *a == ep,
            Self::Two(a, b) => {
                if *a == ep {
                    *self = Self::One(*b);
                } else if *b == ep {
                    *self = Self::One(*a);
                }
                false
            }
            Self::Many(v) => {
                if let Some(p) = v.iter().position(|&x| x == ep) {
                    v.swap_remove(p);
                }
                if v.len() == 2 {
                    *self = Self::Two(v[0], v[1]);
                }
                false
            }
        }
    }

    fn for_each(&self, mut f: impl FnMut(u32)) {
        match self {
            Self::One(a) => f(*a),
            Self::Two(a, b) => {
                f(*a);
                f(*b);
            }
            Self::Many(v) => v.iter().copied().for_each(f),
        }
    }
}

pub use crate::routing::endpoint::Unknown;

#[derive(Debug)]
struct View {
    /// Engine key → request key, per tier.
    gpu: KeyMap<u64>,
    other: KeyMap<u64>,
    block_size: Option<u32>,
    capacity: usize,
    /// Set while rebuilding, with the blocks stored since.
    unknown: Option<(Unknown, usize)>,
    /// The publisher's subscription is in place.
    connected: bool,
    last_event_ms: Option<u64>,
    /// The first request answered since the last event, when it should have stored blocks.
    unconfirmed_since_ms: Option<u64>,
    /// Stored blocks whose parent was unknown (dropped).
    orphans: u64,
}

impl View {
    fn new(capacity: usize) -> Self {
        Self {
            gpu: KeyMap::default(),
            other: KeyMap::default(),
            block_size: None,
            capacity: capacity.max(1),
            unknown: None,
            connected: false,
            last_event_ms: None,
            unconfirmed_since_ms: None,
            orphans: 0,
        }
    }

    fn status(&self) -> ViewStatus {
        ViewStatus {
            blocks: self.gpu.len() + self.other.len(),
            block_size: self.block_size,
            capacity: self.capacity,
            rebuilding: self.unknown.map(|(w, _)| w),
            connected: self.connected,
            last_event_ms: self.last_event_ms,
            unconfirmed_since_ms: self.unconfirmed_since_ms,
            orphans: self.orphans,
        }
    }

    fn tier(&mut self, medium: Medium) -> &mut KeyMap<u64> {
        match medium {
            Medium::Gpu => &mut self.gpu,
            Medium::Other => &mut self.other,
        }
    }

    /// Blocks a tier may hold before the view is known to be wrong.
    fn limit(&self, medium: Medium) -> usize {
        let gpu = self.capacity + self.capacity / 8 + 64;
        match medium {
            Medium::Gpu => gpu,
            Medium::Other => gpu.saturating_mul(4),
        }
    }
}

/// What applying a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Blocks stored.
    pub stored: usize,
    /// Blocks removed.
    pub removed: usize,
    /// `AllBlocksCleared` events.
    pub cleared: usize,
    /// Stored blocks dropped because their parent is unknown.
    pub orphans: usize,
    /// Events of other KV-cache groups (hybrid models), ignored.
    pub ignored: usize,
    /// The view overflowed and was dropped.
    pub overflowed: bool,
}

/// One endpoint's view, for `/debug/endpoints`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ViewStatus {
    /// Blocks held (all tiers).
    pub blocks: usize,
    /// Tokens per block, once an event said.
    pub block_size: Option<u32>,
    /// Capacity in blocks.
    pub capacity: usize,
    /// Why it is rebuilding, if it is.
    pub rebuilding: Option<Unknown>,
    /// Its subscription is in place.
    pub connected: bool,
    /// When its last event arrived (monotonic ms).
    pub last_event_ms: Option<u64>,
    /// Since when answered requests wait for events, if they do.
    pub unconfirmed_since_ms: Option<u64>,
    /// Stored blocks dropped for an unknown parent.
    pub orphans: u64,
}

impl ViewStatus {
    /// Whether matches on this endpoint are exact at `now_ms`: subscribed, not rebuilding, and
    /// no answered request has waited more than `stale_ms` for its events.
    pub fn precise(&self, now_ms: u64, stale_ms: u64) -> bool {
        self.connected
            && self.rebuilding.is_none()
            && self.unconfirmed_since_ms.is_none_or(|t| now_ms.saturating_sub(t) <= stale_ms)
    }
}

/// Size and memory of a precise index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PreciseStats {
    /// Endpoints with a view.
    pub endpoints: usize,
    /// (endpoint, block) entries.
    pub blocks: usize,
    /// Distinct request keys.
    pub keys: usize,
    /// Heap bytes of the tables (capacity, not just entries).
    pub heap_bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    holders: KeyMap<Holders>,
    views: HashMap<u32, View, BuildKeyHasher>,
    pending: Pending,
}

impl Inner {
    fn view(&mut self, ep: u32, capacity: usize) -> &mut View {
        self.views.entry(ep).or_insert_with(|| View::new(capacity))
    }

    /// Drops every entry of `ep`'s view (keeping the view).
    fn drop_entries(&mut self, ep: u32) {
        self.drop_tier(ep, Medium::Gpu);
        self.drop_tier(ep, Medium::Other);
    }

    /// Drops one tier of `ep`'s view.
    fn drop_tier(&mut self, ep: u32, medium: Medium) {
        let Some(v) = self.views.get_mut(&ep) else { return };
        let tier = std::mem::take(v.tier(medium));
        for key in tier.values() {
            unhold(&mut self.holders, *key, ep);
        }
    }
}

fn unhold(holders: &mut KeyMap<Holders>, key: u64, ep: u32) {
    if let hashbrown::hash_map::Entry::Occupied(mut e) = holders.entry(key)
        && e.get_mut().remove(ep)
    {
        e.remove();
    }
}

/// The precise index of one pool. Safe to share: matches take a read lock, a batch a write lock.
#[derive(Debug)]
pub struct PreciseIndex {
    default_capacity: usize,
    inner: RwLock<Inner>,
}

impl Default for PreciseIndex {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl PreciseIndex {
    /// An empty index whose views hold up to `default_capacity` blocks until told otherwise.
    pub fn new(default_capacity: usize) -> Self {
        Self { default_capacity: default_capacity.max(1), inner: RwLock::new(Inner::default()) }
    }

    /// Applies one batch of `ep`'s events, received at `now_ms`.
    pub fn apply(&self, ep: EndpointId, batch: &EventBatch, now_ms: u64) -> Applied {
        let id = ep.index() as u32;
        let mut inner = self.inner.write();
        let inner = &mut *inner;
        let mut out = Applied::default();
        let view = inner.view(id, self.default_capacity);
        view.last_event_ms = Some(now_ms);
        view.unconfirmed_since_ms = None;
        let mut buf = Vec::new();
        for e in &batch.events {
            match e {
                KvEvent::BlockStored(s) if s.group_idx != 0 => out.ignored += s.block_hashes.len(),
                KvEvent::BlockRemoved { group_idx, block_hashes, .. } if *group_idx != 0 => {
                    out.ignored += block_hashes.len();
                }
                KvEvent::BlockStored(s) => {
                    let Some(view) = inner.views.get_mut(&id) else { continue };
                    let before = (out.stored, out.orphans);
                    store(view, &mut inner.holders, id, s, &mut buf, &mut out);
                    let limit = view.limit(s.medium);
                    if view.tier(s.medium).len() > limit {
                        // Removals were lost for this tier. A GPU view is then unknown; an
                        // offload tier is only dropped (its blocks are matched again once stored).
                        inner.drop_tier(id, s.medium);
                        if s.medium == Medium::Gpu
                            && let Some(v) = inner.views.get_mut(&id)
                        {
                            v.unknown = Some((Unknown::Overflow, 0));
                        }
                        out.overflowed = true;
                    } else if let Some((_, since)) = &mut view.unknown {
                        // A rebuilding view is whole again once the engine has stored as many
                        // blocks as it holds.
                        if out.orphans == before.1 {
                            *since += out.stored - before.0;
                        }
                        if *since >= view.capacity {
                            view.unknown = None;
                        }
                    }
                }
                KvEvent::BlockRemoved { block_hashes, medium, .. } => {
                    let Some(view) = inner.views.get_mut(&id) else { continue };
                    for h in block_hashes {
                        if let Some(key) = view.tier(*medium).remove(h) {
                            unhold(&mut inner.holders, key, id);
                            out.removed += 1;
                        }
                    }
                }
                // The GPU block pool is cleared; offloaded copies stay where they are.
                KvEvent::AllBlocksCleared => {
                    inner.drop_tier(id, Medium::Gpu);
                    if let Some(v) = inner.views.get_mut(&id) {
                        v.unknown = None;
                    }
                    out.cleared += 1;
                }
            }
        }
        out
    }

    /// Drops `ep`'s entries and marks its view rebuilding (`why`).
    pub fn invalidate(&self, ep: EndpointId, why: Unknown) {
        self.reset(ep, Some((why, 0)));
    }

    /// Drops `ep`'s entries for a publisher that started afresh (an engine restart: its cache
    /// is empty, so the view stays exact).
    pub fn restart(&self, ep: EndpointId) {
        self.reset(ep, None);
    }

    fn reset(&self, ep: EndpointId, unknown: Option<(Unknown, usize)>) {
        let id = ep.index() as u32;
        let mut inner = self.inner.write();
        inner.pending.forget(id);
        inner.view(id, self.default_capacity);
        inner.drop_entries(id);
        if let Some(v) = inner.views.get_mut(&id) {
            v.unknown = unknown;
        }
    }

    /// Records whether `ep`'s subscription is in place.
    pub fn set_connected(&self, ep: EndpointId, connected: bool) {
        let mut inner = self.inner.write();
        let v = inner.view(ep.index() as u32, self.default_capacity);
        v.connected = connected;
        if !connected {
            v.unconfirmed_since_ms = None;
        }
    }

    /// Sets `ep`'s capacity in blocks (the engine's `num_gpu_blocks`).
    pub fn set_capacity(&self, ep: EndpointId, blocks: usize) {
        let mut inner = self.inner.write();
        inner.view(ep.index() as u32, self.default_capacity).capacity = blocks.max(1);
    }

    /// A request that should have stored blocks on `ep` was answered at `now_ms`: unless an
    /// event follows, the view is stale once the stale time has passed.
    pub fn answered(&self, ep: EndpointId, now_ms: u64) {
        let mut inner = self.inner.write();
        if let Some(v) = inner.views.get_mut(&(ep.index() as u32))
            && v.connected
        {
            v.unconfirmed_since_ms.get_or_insert(now_ms);
        }
    }

    /// Forgets an endpoint.
    pub fn remove(&self, ep: EndpointId) {
        let id = ep.index() as u32;
        let mut inner = self.inner.write();
        inner.drop_entries(id);
        inner.views.remove(&id);
        inner.pending.forget(id);
    }

    /// kvgate sent a prompt with these keys to `ep` at `now_ms`: they match as held there for
    /// `ttl_ms`, until its events can have said so.
    pub fn record_pending(&self, ep: EndpointId, keys: &[u64], now_ms: u64, ttl_ms: u64) {
        let id = ep.index() as u32;
        let mut inner = self.inner.write();
        let p = &mut inner.pending;
        p.expire(now_ms.saturating_sub(ttl_ms));
        for &k in keys {
            p.record(id, k, now_ms, ttl_ms);
        }
        p.expire(now_ms.saturating_sub(ttl_ms));
    }

    /// One endpoint's view, if it has one.
    pub fn status(&self, ep: EndpointId) -> Option<ViewStatus> {
        self.inner.read().views.get(&(ep.index() as u32)).map(View::status)
    }

    /// For each of `endpoints`, its view's status (`None`: no view yet), under one lock.
    pub fn statuses(&self, endpoints: &[EndpointId]) -> Vec<Option<ViewStatus>> {
        let inner = self.inner.read();
        endpoints.iter().map(|e| inner.views.get(&(e.index() as u32)).map(View::status)).collect()
    }

    /// For each of `endpoints` (`None`: skipped, 0), how many leading `keys` it holds, into
    /// `out` (same order). One table lookup per block matched by anyone.
    pub fn match_into(&self, endpoints: &[Option<EndpointId>], keys: &[u64], out: &mut Vec<u32>) {
        out.clear();
        out.resize(endpoints.len(), 0);
        let Some(max) = endpoints.iter().flatten().map(|e| e.index()).max() else { return };
        let mut pos = vec![u32::MAX; max + 1];
        for (i, e) in endpoints.iter().enumerate() {
            if let Some(e) = e {
                pos[e.index()] = i as u32;
            }
        }
        let inner = self.inner.read();
        for (j, key) in keys.iter().enumerate() {
            let held = inner.holders.get(key);
            let pending = inner.pending.holders.get(key);
            if held.is_none() && pending.is_none() {
                break;
            }
            let mut advanced = false;
            let mut step = |ep: u32| {
                if let Some(&p) = pos.get(ep as usize)
                    && p != u32::MAX
                    && out[p as usize] == j as u32
                {
                    out[p as usize] += 1;
                    advanced = true;
                }
            };
            if let Some(h) = held {
                h.for_each(&mut step);
            }
            if let Some(list) = pending {
                list.iter().for_each(|&(e, _)| step(e));
            }
            if !advanced {
                break;
            }
        }
    }

    /// Size and memory.
    pub fn stats(&self) -> PreciseStats {
        let inner = self.inner.read();
        let entry = |n: usize, item: usize| n * (item + 1) + n.div_ceil(8);
        let mut s = PreciseStats {
            endpoints: inner.views.len(),
            keys: inner.holders.len(),
            heap_bytes: entry(inner.holders.capacity(), std::mem::size_of::<(u64, Holders)>()),
            blocks: 0,
        };
        for h in inner.holders.values() {
            if let Holders::Many(v) = h {
                s.heap_bytes += v.capacity() * 4;
            }
        }
        for v in inner.views.values() {
            s.blocks += v.gpu.len() + v.other.len();
            s.heap_bytes += entry(v.gpu.capacity() + v.other.capacity(), 16);
        }
        s
    }
}

/// Applies one `BlockStored` to a view.
fn store(
    view: &mut View,
    holders: &mut KeyMap<Holders>,
    id: u32,
    s: &BlockStored,
    buf: &mut Vec<u8>,
    out: &mut Applied,
) {
    let bs = s.block_size as usize;
    if s.medium == Medium::Gpu {
        view.block_size = Some(s.block_size);
    }
    let mut parent = match s.parent_block_hash {
        None => SEED,
        Some(p) => match view.gpu.get(&p).or_else(|| view.other.get(&p)) {
            Some(&k) => k,
            None => {
                // The chain's head was stored before this view began (or was lost): its keys
                // cannot be known.
                out.orphans += s.block_hashes.len();
                view.orphans += s.block_hashes.len() as u64;
                // A rebuilding view with orphans is still missing blocks the engine holds.
                if let Some((_, since)) = &mut view.unknown {
                    *since = 0;
                }
                return;
            }
        },
    };
    // An adapter known only by its integer id (older vLLM) gets a key no request computes:
    // its blocks match neither the base model nor a named adapter.
    let by_id = match (&s.lora_name, s.lora_id) {
        (None, Some(id)) => Some(format!("\u{0}lora-id-{id}")),
        _ => None,
    };
    let lora = s.lora_name.as_deref().or(by_id.as_deref());
    let mut extra = Vec::new();
    for (i, h) in s.block_hashes.iter().enumerate() {
        let tokens = &s.token_ids[i * bs..(i + 1) * bs];
        extra.clear();
        if let Some(per_block) = &s.extra_keys {
            extra.extend(per_block[i].iter().filter(|k| !is_lora(k, lora, s.lora_id)).cloned());
        }
        let key = block_key(parent, tokens, lora, &extra, buf);
        let tier = view.tier(s.medium);
        match tier.insert(*h, key) {
            Some(old) if old == key => {}
            Some(old) => {
                unhold(holders, old, id);
                holders.entry(key).and_modify(|x| x.add(id)).or_insert(Holders::One(id));
            }
            None => {
                holders.entry(key).and_modify(|x| x.add(id)).or_insert(Holders::One(id));
                out.stored += 1;
            }
        }
        parent = key;
    }
}

#[cfg(test)]
mod tests;
