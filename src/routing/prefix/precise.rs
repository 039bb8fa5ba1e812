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

use std::hash::{BuildHasher, Hasher};

use hashbrown::HashMap;
use parking_lot::RwLock;
use xxhash_rust::xxh3::Xxh3;

use crate::routing::endpoint::EndpointId;
use crate::routing::kv_events::{BlockStored, EventBatch, ExtraKey, KvEvent, Medium};

/// A view's capacity, in blocks, until the engine reports its own (`vllm:cache_config_info`):
/// 4M tokens in blocks of 16.
pub const DEFAULT_CAPACITY: usize = 1 << 18;
/// vLLM's default block size on GPUs, used until an endpoint's events say otherwise.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;
/// The chain seed of request keys.
const SEED: u64 = 0x6b76_6761_7465_2d6b;

/// Hashes u64 keys that are already hashes, with one multiply to spread structured ones.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (x ^ (x >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(26);
    }
}

/// [`KeyHasher`]'s builder.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BuildKeyHasher;

impl BuildHasher for BuildKeyHasher {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

type KeyMap<V> = HashMap<u64, V, BuildKeyHasher>;

/// The request key of one block.
fn block_key(parent: u64, tokens: &[u32], lora: Option<&str>, extra: &[ExtraKey], buf: &mut Vec<u8>) -> u64 {
    buf.clear();
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    let mut h = Xxh3::with_seed(parent);
    h.update(buf);
    if let Some(l) = lora {
        h.update(b"\xffL");
        h.update(&(l.len() as u32).to_le_bytes());
        h.update(l.as_bytes());
    }
    for e in extra {
        match e {
            ExtraKey::Str(s) => {
                h.update(b"\xffS");
                h.update(&(s.len() as u32).to_le_bytes());
                h.update(s.as_bytes());
            }
            ExtraKey::Int(i) => {
                h.update(b"\xffI");
                h.update(&i.to_le_bytes());
            }
            ExtraKey::Other(x) => {
                h.update(b"\xffO");
                h.update(&x.to_le_bytes());
            }
        }
    }
    h.digest()
}

/// A prompt's request keys for blocks of `block_size` tokens: one per full block that vLLM
/// could serve from cache (it always computes the prompt's last token, so at most
/// `(len - 1) / block_size` blocks), at most `max_blocks`.
pub fn request_keys(
    tokens: &[u32],
    block_size: u32,
    lora: Option<&str>,
    cache_salt: Option<&str>,
    max_blocks: usize,
) -> Vec<u64> {
    let bs = block_size.max(1) as usize;
    let n = (tokens.len().saturating_sub(1) / bs).min(max_blocks);
    let salt: Vec<ExtraKey> = cache_salt.map(|s| ExtraKey::Str(s.to_owned())).into_iter().collect();
    let mut keys = Vec::with_capacity(n);
    let mut parent = SEED;
    let mut buf = Vec::with_capacity(bs * 4);
    for (i, block) in tokens.chunks_exact(bs).take(n).enumerate() {
        let extra: &[ExtraKey] = if i == 0 { &salt } else { &[] };
        parent = block_key(parent, block, lora, extra, &mut buf);
        keys.push(parent);
    }
    keys
}

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

/// Pending entries held at most (every endpoint together).
const MAX_PENDING: usize = 1 << 20;

/// Blocks kvgate has just sent to endpoints, before their events can have said so: a request
/// in flight (a burst of one prefix, say) is matched by the next ones. Each entry lives until
/// its time is up; the events then confirm it, or it is gone.
#[derive(Debug, Default)]
struct Pending {
    /// Key → (endpoint, when it was last recorded there): one entry per endpoint however often
    /// the key is sent (a hot prefix is sent many times a second).
    holders: KeyMap<Vec<(u32, u64)>>,
    /// (recorded at, endpoint, key), oldest first; an entry refreshed since is skipped.
    queue: std::collections::VecDeque<(u64, u32, u64)>,
}

impl Pending {
    fn pop(&mut self) {
        let Some((t, ep, key)) = self.queue.pop_front() else { return };
        if let Some(list) = self.holders.get_mut(&key)
            && let Some(pos) = list.iter().position(|&(e, at)| e == ep && at == t)
        {
            list.swap_remove(pos);
            if list.is_empty() {
                self.holders.remove(&key);
            }
        }
    }

    fn record(&mut self, ep: u32, key: u64, now_ms: u64, ttl_ms: u64) {
        let list = self.holders.entry(key).or_default();
        match list.iter_mut().find(|(e, _)| *e == ep) {
            // Recorded a moment ago: it lives on (a refresh every quarter of its life).
            Some((_, at)) if now_ms.saturating_sub(*at) < ttl_ms / 4 => {}
            Some((_, at)) => {
                *at = now_ms;
                self.queue.push_back((now_ms, ep, key));
            }
            None => {
                list.push((ep, now_ms));
                self.queue.push_back((now_ms, ep, key));
            }
        }
    }

    fn expire(&mut self, before_ms: u64) {
        while self.queue.front().is_some_and(|(t, ..)| *t < before_ms) || self.queue.len() > MAX_PENDING {
            self.pop();
        }
    }

    fn forget(&mut self, ep: u32) {
        self.queue.retain(|&(_, e, _)| e != ep);
        self.holders.retain(|_, list| {
            list.retain(|&(e, _)| e != ep);
            !list.is_empty()
        });
    }
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
        let id = ep.index() as u32;
        let mut inner = self.inner.write();
        inner.pending.forget(id);
        inner.view(id, self.default_capacity);
        inner.drop_entries(id);
        if let Some(v) = inner.views.get_mut(&id) {
            v.unknown = Some((why, 0));
        }
    }

    /// Drops `ep`'s entries for a publisher that started afresh (an engine restart: its cache
    /// is empty, so the view stays exact).
    pub fn restart(&self, ep: EndpointId) {
        let id = ep.index() as u32;
        let mut inner = self.inner.write();
        inner.pending.forget(id);
        inner.view(id, self.default_capacity);
        inner.drop_entries(id);
        if let Some(v) = inner.views.get_mut(&id) {
            v.unknown = None;
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
        let inner = self.inner.read();
        inner.views.get(&(ep.index() as u32)).map(|v| ViewStatus {
            blocks: v.gpu.len() + v.other.len(),
            block_size: v.block_size,
            capacity: v.capacity,
            rebuilding: v.unknown.map(|(w, _)| w),
            connected: v.connected,
            last_event_ms: v.last_event_ms,
            unconfirmed_since_ms: v.unconfirmed_since_ms,
            orphans: v.orphans,
        })
    }

    /// For each of `endpoints`, its view's status (`None`: no view yet).
    pub fn statuses(&self, endpoints: &[EndpointId]) -> Vec<Option<ViewStatus>> {
        endpoints.iter().map(|&e| self.status(e)).collect()
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

/// Whether an extra key is the block's LoRA adapter (already in the key by name).
fn is_lora(k: &ExtraKey, name: Option<&str>, id: Option<i64>) -> bool {
    match k {
        ExtraKey::Str(s) => name == Some(s.as_str()),
        ExtraKey::Int(i) => id == Some(*i),
        ExtraKey::Other(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(i: u32) -> EndpointId {
        EndpointId::new(i)
    }

    /// A stored event for blocks of `bs` tokens, engine hashes `base + i`.
    fn stored(
        parent: Option<u64>,
        tokens: &[u32],
        bs: u32,
        base: u64,
        lora: Option<&str>,
        salt: Option<&str>,
    ) -> KvEvent {
        let n = tokens.len() / bs as usize;
        let extra = (0..n)
            .map(|i| {
                let mut e: Vec<ExtraKey> = lora.map(|l| ExtraKey::Str(l.into())).into_iter().collect();
                if i == 0 && parent.is_none() {
                    e.extend(salt.map(|s| ExtraKey::Str(s.into())));
                }
                e
            })
            .collect();
        KvEvent::BlockStored(BlockStored {
            block_hashes: (0..n as u64).map(|i| base + i).collect(),
            parent_block_hash: parent,
            token_ids: tokens.to_vec(),
            block_size: bs,
            lora_id: lora.map(|_| 1),
            medium: Medium::Gpu,
            lora_name: lora.map(str::to_owned),
            extra_keys: Some(extra),
            group_idx: 0,
        })
    }

    fn batch(events: Vec<KvEvent>) -> EventBatch {
        EventBatch { ts: 0.0, events, dp_rank: None, unknown: 0 }
    }

    fn matches(index: &PreciseIndex, eps: &[u32], keys: &[u64]) -> Vec<u32> {
        let ids: Vec<Option<EndpointId>> = eps.iter().map(|&e| Some(ep(e))).collect();
        let mut out = Vec::new();
        index.match_into(&ids, keys, &mut out);
        out
    }

    #[test]
    fn keys_from_events_equal_keys_from_requests() {
        let index = PreciseIndex::default();
        let prompt: Vec<u32> = (0..50).collect();
        // Endpoint 0 stores the first two blocks, then a third chained by parent.
        index.apply(ep(0), &batch(vec![stored(None, &prompt[..32], 16, 100, None, None)]), 1);
        index.apply(ep(0), &batch(vec![stored(Some(101), &prompt[32..48], 16, 102, None, None)]), 2);
        // Endpoint 1 holds only the first block.
        index.apply(ep(1), &batch(vec![stored(None, &prompt[..16], 16, 900, None, None)]), 3);
        let keys = request_keys(&prompt, 16, None, None, usize::MAX);
        assert_eq!(keys.len(), 3, "(50 - 1) / 16 full blocks can hit");
        assert_eq!(matches(&index, &[0, 1, 2], &keys), [3, 1, 0]);
        // Removing a middle block cuts the match there (vLLM's lookup stops at the first miss).
        index.apply(
            ep(0),
            &batch(vec![KvEvent::BlockRemoved { block_hashes: vec![101], medium: Medium::Gpu, group_idx: 0 }]),
            4,
        );
        assert_eq!(matches(&index, &[0, 1], &keys), [1, 1]);
        // Another block size gives other keys.
        assert_eq!(matches(&index, &[0], &request_keys(&prompt, 8, None, None, 99)), [0]);
        let s = index.stats();
        assert_eq!((s.endpoints, s.blocks, s.keys), (2, 3, 2), "k0 twice, k2 once");
    }

    #[test]
    fn lora_and_salt_separate_blocks() {
        let index = PreciseIndex::default();
        let prompt: Vec<u32> = (0..33).collect();
        index.apply(ep(0), &batch(vec![stored(None, &prompt[..32], 16, 1, Some("sql"), None)]), 1);
        index.apply(ep(1), &batch(vec![stored(None, &prompt[..32], 16, 1, None, Some("tenant-a"))]), 1);
        index.apply(ep(2), &batch(vec![stored(None, &prompt[..32], 16, 1, None, None)]), 1);
        let all = [0, 1, 2];
        assert_eq!(matches(&index, &all, &request_keys(&prompt, 16, Some("sql"), None, 9)), [2, 0, 0]);
        assert_eq!(matches(&index, &all, &request_keys(&prompt, 16, None, Some("tenant-a"), 9)), [0, 2, 0]);
        assert_eq!(matches(&index, &all, &request_keys(&prompt, 16, None, Some("tenant-b"), 9)), [0, 0, 0]);
        assert_eq!(matches(&index, &all, &request_keys(&prompt, 16, None, None, 9)), [0, 0, 2]);
    }

    #[test]
    fn orphans_clears_gaps_and_overflow() {
        let index = PreciseIndex::new(4);
        let prompt: Vec<u32> = (0..200).collect();
        let a = index.apply(ep(0), &batch(vec![stored(Some(77), &prompt[..16], 16, 1, None, None)]), 1);
        assert_eq!((a.stored, a.orphans), (0, 1), "an unknown parent's chain is dropped");
        index.set_connected(ep(0), true);
        index.apply(ep(0), &batch(vec![stored(None, &prompt[..32], 16, 1, None, None)]), 2);
        let keys = request_keys(&prompt, 16, None, None, 99);
        assert_eq!(matches(&index, &[0], &keys), [2]);
        assert!(index.status(ep(0)).expect("view").precise(2, 1000));
        // A gap: entries dropped, rebuilding until the engine has stored its capacity again.
        index.invalidate(ep(0), Unknown::Gap);
        assert_eq!(matches(&index, &[0], &keys), [0]);
        assert_eq!(index.status(ep(0)).expect("view").rebuilding, Some(Unknown::Gap));
        index.apply(ep(0), &batch(vec![stored(None, &prompt[..32], 16, 1, None, None)]), 3);
        assert!(!index.status(ep(0)).expect("view").precise(3, 1000));
        index.apply(ep(0), &batch(vec![stored(Some(2), &prompt[32..64], 16, 3, None, None)]), 4);
        assert!(index.status(ep(0)).expect("view").precise(4, 1000), "4 blocks stored: rebuilt");
        // Answered requests without events go stale.
        index.answered(ep(0), 10);
        assert!(index.status(ep(0)).expect("view").precise(500, 1000));
        assert!(!index.status(ep(0)).expect("view").precise(1011, 1000));
        index.apply(ep(0), &batch(vec![]), 1012);
        assert!(index.status(ep(0)).expect("view").precise(1013, 1000));
        // More blocks than the capacity allows (4 + 0 + 64 slack): the view cannot be right.
        let big: Vec<u32> = (0..16 * 70).collect();
        let a = index.apply(ep(0), &batch(vec![stored(Some(4), &big, 16, 1000, None, None)]), 5);
        assert!(a.overflowed);
        assert_eq!(index.status(ep(0)).expect("view").rebuilding, Some(Unknown::Overflow));
        assert_eq!(index.stats().keys, 0);
        // A clear is an exact state again.
        index.apply(ep(0), &batch(vec![KvEvent::AllBlocksCleared]), 6);
        assert!(index.status(ep(0)).expect("view").precise(6, 1000));
        index.remove(ep(0));
        assert_eq!(index.stats(), PreciseStats { heap_bytes: index.stats().heap_bytes, ..PreciseStats::default() });
    }

    #[test]
    fn pending_entries_match_until_their_time_is_up() {
        let index = PreciseIndex::default();
        let prompt: Vec<u32> = (0..65).collect();
        let keys = request_keys(&prompt, 16, None, None, 99);
        index.record_pending(ep(2), &keys, 1000, 500);
        assert_eq!(matches(&index, &[1, 2], &keys), [0, 4], "sent, not yet confirmed");
        // Confirmed by events for the first two blocks; the rest expire.
        index.apply(ep(2), &batch(vec![stored(None, &prompt[..32], 16, 1, None, None)]), 1100);
        index.record_pending(ep(1), &keys[..1], 1600, 500);
        assert_eq!(matches(&index, &[1, 2], &keys), [1, 2]);
        index.remove(ep(1));
        assert_eq!(matches(&index, &[1, 2], &keys), [0, 2]);
    }

    #[test]
    fn a_publisher_repeating_one_block_gets_few_entries() {
        let index = PreciseIndex::default();
        let prompt: Vec<u32> = (0..17).collect();
        let events = (0..1000).map(|k| stored(None, &prompt[..16], 16, 10 + k, None, None)).collect();
        index.apply(ep(1), &batch(events), 1);
        let keys = request_keys(&prompt, 16, None, None, 9);
        assert_eq!(matches(&index, &[1], &keys), [1]);
        let inner = index.inner.read();
        let Some(Holders::Many(v)) = inner.holders.get(&keys[0]) else { panic!("many copies") };
        assert_eq!(v.len(), MAX_COPIES);
    }

    #[test]
    fn holders_count_tiers_and_duplicates() {
        let index = PreciseIndex::default();
        let prompt: Vec<u32> = (0..17).collect();
        let mut cpu = stored(None, &prompt[..16], 16, 5, None, None);
        if let KvEvent::BlockStored(s) = &mut cpu {
            s.medium = Medium::Other;
        }
        index.apply(ep(3), &batch(vec![stored(None, &prompt[..16], 16, 5, None, None), cpu]), 1);
        let keys = request_keys(&prompt, 16, None, None, 9);
        assert_eq!(matches(&index, &[3], &keys), [1]);
        index.apply(ep(3), &batch(vec![KvEvent::AllBlocksCleared]), 2);
        assert_eq!(matches(&index, &[3], &keys), [1], "a GPU clear leaves the CPU tier");
        index.apply(
            ep(3),
            &batch(vec![KvEvent::BlockRemoved { block_hashes: vec![5], medium: Medium::Other, group_idx: 0 }]),
            3,
        );
        assert_eq!(matches(&index, &[3], &keys), [0]);
    }
}
