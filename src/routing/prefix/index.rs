//! The prefix index: for each endpoint, a bounded LRU set of the block hashes it likely holds.
//!
//! Each endpoint has its own [`BlockLru`]: a slab of 16-byte nodes threaded on a recency list,
//! and a `hashbrown` table of 4-byte slot numbers keyed by the block hash itself (block hashes
//! are already uniform, so they need no rehashing). That is about 16 + 5/load bytes per resident
//! (endpoint, block), well under 64.
//!
//! **Invariant: each endpoint's set is prefix-closed.** [`PrefixIndex::record`] touches a
//! prompt's blocks from last to first, so a block is always more recent than every block after
//! it in the same chain, and LRU eviction removes a chain from its tail. Because a block hash
//! names its whole prefix, holding `h_i` then implies holding `h_0..h_i`, and the longest held
//! prefix can be found by binary search: a match costs O(log n) lookups per endpoint that holds
//! the first block, and one lookup for every other endpoint.
//!
//! Part of the decision core: no I/O, no clock, no async.

use hashbrown::HashTable;
use parking_lot::RwLock;

use super::BlockHash;
use crate::routing::endpoint::EndpointId;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    hash: u64,
    /// Towards the most recent end.
    prev: u32,
    /// Towards the least recent end.
    next: u32,
}

/// One endpoint's bounded LRU set of block hashes.
#[derive(Debug)]
struct BlockLru {
    table: HashTable<u32>,
    nodes: Vec<Node>,
    /// Most recently touched.
    head: u32,
    /// Least recently touched: evicted first.
    tail: u32,
    capacity: usize,
    /// The capacity set from outside (`vllm:cache_config_info` or the default); cache feedback
    /// moves `capacity` below it, never above.
    ceiling: usize,
}

impl BlockLru {
    fn new(capacity: usize) -> Self {
        Self {
            table: HashTable::new(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity: capacity.clamp(1, NIL as usize - 1),
            ceiling: capacity.clamp(1, NIL as usize - 1),
        }
    }

    /// Takes the least recent entry off the list and out of the table; returns its slot.
    fn unlink_tail(&mut self) -> u32 {
        let victim = self.tail;
        self.unlink(victim);
        let old = self.nodes[victim as usize].hash;
        let nodes = &self.nodes;
        if let Ok(entry) = self.table.find_entry(old, |&i| nodes[i as usize].hash == old) {
            entry.remove();
        }
        victim
    }

    /// Evicts the least recent entries until at most `keep` remain (their slots are reused by
    /// later touches; the allocation is kept).
    fn evict_to(&mut self, keep: usize) {
        while self.len() > keep && self.tail != NIL {
            let victim = self.unlink_tail();
            // Move the last node into the victim's slot so the slab stays dense.
            let last = (self.nodes.len() - 1) as u32;
            if victim != last {
                let moved = self.nodes[last as usize];
                self.nodes[victim as usize] = moved;
                match moved.prev {
                    NIL => self.head = victim,
                    p => self.nodes[p as usize].next = victim,
                }
                match moved.next {
                    NIL => self.tail = victim,
                    n => self.nodes[n as usize].prev = victim,
                }
                let nodes = &self.nodes;
                if let Some(slot) = self.table.find_mut(moved.hash, |&i| nodes[i as usize].hash == moved.hash) {
                    *slot = victim;
                }
            }
            self.nodes.pop();
        }
    }

    fn len(&self) -> usize {
        self.nodes.len()
    }

    fn find(&self, hash: u64) -> Option<u32> {
        let nodes = &self.nodes;
        self.table.find(hash, |&i| nodes[i as usize].hash == hash).copied()
    }

    fn contains(&self, hash: u64) -> bool {
        self.find(hash).is_some()
    }

    /// Length of the longest prefix of `hashes` held (relies on prefix-closure).
    fn longest_prefix(&self, hashes: &[BlockHash]) -> usize {
        match hashes.first() {
            Some(h) if self.contains(h.0) => {}
            _ => return 0,
        }
        let (mut lo, mut hi) = (1, hashes.len());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.contains(hashes[mid - 1].0) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        self.nodes[i as usize].prev = NIL;
        self.nodes[i as usize].next = old;
        match old {
            NIL => self.tail = i,
            o => self.nodes[o as usize].prev = i,
        }
        self.head = i;
    }

    /// Makes `hash` the most recent entry, inserting it (and evicting the LRU one) if new.
    fn touch(&mut self, hash: u64) {
        if let Some(i) = self.find(hash) {
            if self.head != i {
                self.unlink(i);
                self.push_front(i);
            }
            return;
        }
        let slot = if self.len() < self.capacity {
            if self.nodes.len() == self.nodes.capacity() {
                // Grow by doubling, but never past the capacity.
                let extra = self.nodes.len().max(64).min(self.capacity - self.nodes.len());
                self.nodes.reserve_exact(extra);
            }
            self.nodes.push(Node { hash, prev: NIL, next: NIL });
            (self.nodes.len() - 1) as u32
        } else {
            let victim = self.unlink_tail();
            self.nodes[victim as usize].hash = hash;
            victim
        };
        let nodes = &self.nodes;
        self.table.insert_unique(hash, slot, |&i| nodes[i as usize].hash);
        self.push_front(slot);
    }

    /// Adds `hash`, if absent and there is room, as the least recent entry.
    fn push_tail(&mut self, hash: u64) {
        if self.len() >= self.capacity || self.contains(hash) {
            return;
        }
        if self.nodes.len() == self.nodes.capacity() {
            let extra = self.nodes.len().max(64).min(self.capacity - self.nodes.len());
            self.nodes.reserve_exact(extra);
        }
        let slot = self.nodes.len() as u32;
        self.nodes.push(Node { hash, prev: self.tail, next: NIL });
        match self.tail {
            NIL => self.head = slot,
            t => self.nodes[t as usize].next = slot,
        }
        self.tail = slot;
        let nodes = &self.nodes;
        self.table.insert_unique(hash, slot, |&i| nodes[i as usize].hash);
    }

    /// Rebuilds with a new capacity, keeping the most recent entries.
    fn resize(&mut self, capacity: usize) {
        let mut order = Vec::with_capacity(self.len());
        let mut i = self.head;
        while i != NIL {
            order.push(self.nodes[i as usize].hash);
            i = self.nodes[i as usize].next;
        }
        *self = Self::new(capacity);
        let keep = order.len().min(self.capacity);
        for &h in order[..keep].iter().rev() {
            self.touch(h);
        }
    }

    fn heap_bytes(&self) -> usize {
        self.table.allocation_size() + self.nodes.capacity() * std::mem::size_of::<Node>()
    }
}

/// Size and memory of the index.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct IndexStats {
    /// Endpoints with an entry set.
    pub endpoints: usize,
    /// Resident (endpoint, block) entries.
    pub resident_blocks: usize,
    /// Heap bytes held by the entries.
    pub heap_bytes: usize,
}

impl IndexStats {
    /// Heap bytes per resident (endpoint, block) entry.
    pub fn bytes_per_entry(&self) -> f64 {
        if self.resident_blocks == 0 { 0.0 } else { self.heap_bytes as f64 / self.resident_blocks as f64 }
    }
}

/// The per-endpoint prefix index. Safe to share: matches take read locks, a record takes one
/// endpoint's write lock, adding or removing an endpoint takes the outer write lock briefly.
#[derive(Debug)]
pub struct PrefixIndex {
    default_capacity: usize,
    endpoints: RwLock<Vec<Option<RwLock<BlockLru>>>>,
}

impl PrefixIndex {
    /// An empty index whose endpoints hold `default_capacity` blocks each unless set otherwise.
    pub fn new(default_capacity: usize) -> Self {
        Self { default_capacity, endpoints: RwLock::new(Vec::new()) }
    }

    /// For each of `endpoints`, the number of leading `hashes` it holds, written to `out`
    /// (cleared first; same order as `endpoints`).
    pub fn match_into(&self, endpoints: &[EndpointId], hashes: &[BlockHash], out: &mut Vec<u32>) {
        out.clear();
        let slots = self.endpoints.read();
        out.extend(endpoints.iter().map(|id| match slots.get(id.index()) {
            Some(Some(lru)) => lru.read().longest_prefix(hashes) as u32,
            _ => 0,
        }));
    }

    /// The number of leading `hashes` one endpoint holds.
    pub fn matched(&self, endpoint: EndpointId, hashes: &[BlockHash]) -> usize {
        let mut out = Vec::with_capacity(1);
        self.match_into(&[endpoint], hashes, &mut out);
        out[0] as usize
    }

    /// Records that `endpoint` now holds `hashes` (a prompt's chain, in order).
    pub fn record(&self, endpoint: EndpointId, hashes: &[BlockHash]) {
        if hashes.is_empty() {
            return;
        }
        self.with_set(endpoint, |lru| {
            for h in hashes.iter().rev() {
                lru.touch(h.0);
            }
        });
    }

    /// Runs `f` on one endpoint's set, made with the default capacity if it has none.
    fn with_set(&self, endpoint: EndpointId, f: impl FnOnce(&mut BlockLru)) {
        let slots = self.endpoints.read();
        if let Some(Some(lru)) = slots.get(endpoint.index()) {
            f(&mut lru.write());
            return;
        }
        drop(slots);
        self.set_capacity(endpoint, self.default_capacity);
        // Just made: present unless removed meanwhile (then there is nothing to add to).
        if let Some(Some(lru)) = self.endpoints.read().get(endpoint.index()) {
            f(&mut lru.write());
        }
    }

    /// The blocks one endpoint holds, most recent first: at most `limit`. Any leading part of
    /// the list is prefix-closed (a block's predecessors are more recent than it).
    pub fn held(&self, endpoint: EndpointId, limit: usize) -> Vec<BlockHash> {
        let slots = self.endpoints.read();
        let Some(Some(lru)) = slots.get(endpoint.index()) else { return Vec::new() };
        let lru = lru.read();
        let mut out = Vec::with_capacity(lru.len().min(limit));
        let mut i = lru.head;
        while i != NIL && out.len() < limit {
            out.push(BlockHash(lru.nodes[i as usize].hash));
            i = lru.nodes[i as usize].next;
        }
        out
    }

    /// Takes `blocks` as another index held them for `endpoint`, most recent first ([`held`]),
    /// into the room the endpoint's set has left: each block it lacks goes in as its least
    /// recent entry, so nothing it held is evicted, the other's order carries over, and the set
    /// stays prefix-closed even when only a leading part of the list arrives.
    ///
    /// [`held`]: PrefixIndex::held
    pub fn merge(&self, endpoint: EndpointId, blocks: &[BlockHash]) {
        if blocks.is_empty() {
            return;
        }
        self.with_set(endpoint, |lru| {
            for h in blocks {
                if lru.len() >= lru.capacity {
                    break;
                }
                lru.push_tail(h.0);
            }
        });
    }

    /// Sets one endpoint's capacity in blocks (creating its set if needed, evicting if smaller).
    /// A capacity lowered by cache feedback stays as low, within the new ceiling.
    pub fn set_capacity(&self, endpoint: EndpointId, capacity: usize) {
        let mut slots = self.endpoints.write();
        let i = endpoint.index();
        if slots.len() <= i {
            slots.resize_with(i + 1, || None);
        }
        match &mut slots[i] {
            Some(lru) => {
                let lru = lru.get_mut();
                let corrected = lru.capacity < lru.ceiling;
                let want = if corrected { lru.capacity.min(capacity.max(1)) } else { capacity.max(1) };
                if lru.capacity != want {
                    lru.resize(want);
                }
                lru.ceiling = capacity.clamp(1, NIL as usize - 1);
            }
            slot @ None => *slot = Some(RwLock::new(BlockLru::new(capacity))),
        }
    }

    /// Cache feedback: the endpoint held `missing` fewer blocks of a prompt than the index
    /// believed, so it keeps fewer than the index does. Its capacity drops to what it holds less
    /// `missing` (never below 1/16 of its ceiling) and the least recent entries go, as the
    /// endpoint's own LRU evicted them. Returns the new capacity.
    pub fn held_less(&self, endpoint: EndpointId, missing: usize) -> usize {
        let slots = self.endpoints.read();
        let Some(Some(lru)) = slots.get(endpoint.index()) else { return 0 };
        let mut lru = lru.write();
        let floor = (lru.ceiling / 16).max(1);
        lru.capacity = lru.capacity.min(lru.len()).saturating_sub(missing).max(floor);
        let cap = lru.capacity;
        lru.evict_to(cap);
        cap
    }

    /// Cache feedback: the endpoint held `extra` more blocks of a prompt than the index
    /// believed; its capacity grows by as much, up to its ceiling. Returns the new capacity.
    pub fn held_more(&self, endpoint: EndpointId, extra: usize) -> usize {
        let slots = self.endpoints.read();
        let Some(Some(lru)) = slots.get(endpoint.index()) else { return 0 };
        let mut lru = lru.write();
        lru.capacity = lru.capacity.saturating_add(extra).min(lru.ceiling);
        lru.capacity
    }

    /// One endpoint's capacity now and its ceiling, in blocks.
    pub fn capacity(&self, endpoint: EndpointId) -> Option<(usize, usize)> {
        match self.endpoints.read().get(endpoint.index()) {
            Some(Some(lru)) => {
                let lru = lru.read();
                Some((lru.capacity, lru.ceiling))
            }
            _ => None,
        }
    }

    /// Forgets an endpoint and frees its entries.
    pub fn remove(&self, endpoint: EndpointId) {
        let mut slots = self.endpoints.write();
        if let Some(slot) = slots.get_mut(endpoint.index()) {
            *slot = None;
        }
        while matches!(slots.last(), Some(None)) {
            slots.pop();
        }
    }

    /// Resident blocks of one endpoint.
    pub fn endpoint_blocks(&self, endpoint: EndpointId) -> usize {
        match self.endpoints.read().get(endpoint.index()) {
            Some(Some(lru)) => lru.read().len(),
            _ => 0,
        }
    }

    /// Size and memory of the whole index.
    pub fn stats(&self) -> IndexStats {
        let slots = self.endpoints.read();
        let mut s = IndexStats::default();
        for lru in slots.iter().flatten() {
            let lru = lru.read();
            s.endpoints += 1;
            s.resident_blocks += lru.len();
            s.heap_bytes += lru.heap_bytes();
        }
        s
    }
}

#[cfg(test)]
mod tests;
