//! The simulated KV cache: a fixed pool of blocks with vLLM's prefix caching.
//!
//! A block holds `block_size` tokens. Once full, it is named by a chained hash of its tokens
//! (`h = xxh3(parent ‖ tokens ‖ extra keys)`, the extra keys being the LoRA adapter and, on the
//! first block, the `cache_salt`), registered in a hash → block map, and so becomes hittable at
//! once, even while its request is still running. Blocks whose reference count drops to zero go
//! on a free queue in LRU order — a request's blocks are released last-first, so the tail of a
//! prompt is evicted before its head, as in vLLM — and keep their hash until the block is
//! reused. Allocating a block takes the least recently freed one, evicting its hash.
//!
//! Every change a KV-event subscriber cares about is queued as a [`KvEvent`].

use std::collections::HashMap;

use xxhash_rust::xxh3::Xxh3;

const NIL: u32 = u32::MAX;

/// A cache event, in vLLM's terms.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum KvEvent {
    /// Full blocks became cached.
    BlockStored {
        /// Hashes of the stored blocks, in chain order.
        block_hashes: Vec<u64>,
        /// Hash of the block before the first one, if any.
        parent_block_hash: Option<u64>,
        /// The blocks' tokens, concatenated.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: usize,
        /// The LoRA adapter the blocks belong to.
        lora_name: Option<String>,
        /// Per block, its extra hash keys as vLLM lists them: the adapter, then (first block
        /// of a sequence) the `cache_salt`.
        extra_keys: Vec<Vec<String>>,
    },
    /// Cached blocks were evicted.
    BlockRemoved {
        /// Their hashes.
        block_hashes: Vec<u64>,
    },
    /// The whole cache was cleared.
    AllBlocksCleared,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    hash: Option<u64>,
    refs: u32,
    /// Free-queue links (towards least / most recently freed).
    prev: u32,
    next: u32,
    free: bool,
}

/// Chained block hash over token ids with vLLM's extra keys.
pub(crate) fn block_hash(parent: Option<u64>, tokens: &[u32], lora: Option<&str>, salt: Option<&str>) -> u64 {
    let mut h = Xxh3::new();
    h.update(&parent.unwrap_or(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    if let Some(l) = lora {
        h.update(b"\x00lora\x00");
        h.update(l.as_bytes());
    }
    if let Some(s) = salt {
        h.update(b"\x00salt\x00");
        h.update(s.as_bytes());
    }
    h.digest()
}

/// The block pool.
#[derive(Debug)]
pub(crate) struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    cached: HashMap<u64, u32>,
    /// Least recently freed end: evicted first.
    free_head: u32,
    free_tail: u32,
    free_len: usize,
    events: Vec<KvEvent>,
    record_events: bool,
}

impl BlockPool {
    /// A pool of `num_blocks` empty blocks of `block_size` tokens.
    pub(crate) fn new(num_blocks: usize, block_size: usize, record_events: bool) -> Self {
        let n = num_blocks.min(NIL as usize - 1);
        let mut pool = Self {
            block_size: block_size.max(1),
            blocks: vec![Block { hash: None, refs: 0, prev: NIL, next: NIL, free: false }; n],
            cached: HashMap::new(),
            free_head: NIL,
            free_tail: NIL,
            free_len: 0,
            events: Vec::new(),
            record_events,
        };
        for i in 0..n as u32 {
            pool.push_free(i);
        }
        pool
    }

    /// Blocks that can be allocated (free, cached or not).
    pub(crate) fn num_free(&self) -> usize {
        self.free_len
    }

    /// Fraction of blocks referenced by requests.
    pub(crate) fn usage(&self) -> f64 {
        if self.blocks.is_empty() { 0.0 } else { (self.blocks.len() - self.free_len) as f64 / self.blocks.len() as f64 }
    }

    /// Takes the queued events.
    pub(crate) fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    fn push_free(&mut self, i: u32) {
        let tail = self.free_tail;
        let b = &mut self.blocks[i as usize];
        b.prev = tail;
        b.next = NIL;
        b.free = true;
        match tail {
            NIL => self.free_head = i,
            t => self.blocks[t as usize].next = i,
        }
        self.free_tail = i;
        self.free_len += 1;
    }

    fn unlink_free(&mut self, i: u32) {
        let Block { prev, next, .. } = self.blocks[i as usize];
        match prev {
            NIL => self.free_head = next,
            p => self.blocks[p as usize].next = next,
        }
        match next {
            NIL => self.free_tail = prev,
            n => self.blocks[n as usize].prev = prev,
        }
        let b = &mut self.blocks[i as usize];
        b.free = false;
        b.prev = NIL;
        b.next = NIL;
        self.free_len -= 1;
    }

    /// The cached blocks holding the leading `hashes`, in order (stops at the first miss).
    pub(crate) fn lookup(&self, hashes: &[u64]) -> Vec<u32> {
        hashes.iter().map_while(|h| self.cached.get(h).copied()).collect()
    }

    /// Takes a reference on a cached block found by [`BlockPool::lookup`].
    pub(crate) fn acquire(&mut self, block: u32) {
        if self.blocks[block as usize].free {
            self.unlink_free(block);
        }
        self.blocks[block as usize].refs += 1;
    }

    /// Allocates a fresh block (evicting the least recently freed cached one), or `None` when
    /// every block is referenced.
    pub(crate) fn allocate(&mut self) -> Option<u32> {
        let i = self.free_head;
        if i == NIL {
            return None;
        }
        self.unlink_free(i);
        if let Some(h) = self.blocks[i as usize].hash.take()
            && self.cached.get(&h) == Some(&i)
        {
            self.cached.remove(&h);
            if self.record_events {
                self.events.push(KvEvent::BlockRemoved { block_hashes: vec![h] });
            }
        }
        self.blocks[i as usize].refs = 1;
        Some(i)
    }

    /// Releases a request's blocks, last block first (so its tail is evicted first).
    pub(crate) fn release(&mut self, blocks: &[u32]) {
        for &i in blocks.iter().rev() {
            let b = &mut self.blocks[i as usize];
            debug_assert!(b.refs > 0, "released a block with no references");
            b.refs = b.refs.saturating_sub(1);
            if b.refs == 0 && !b.free {
                self.push_free(i);
            }
        }
    }

    /// Names a just-filled block by its hash, making it hittable. If another block already
    /// holds that content, this one stays anonymous (and is reused first when freed). `salt` is
    /// the `cache_salt` of a sequence's first block.
    pub(crate) fn commit(
        &mut self,
        block: u32,
        hash: u64,
        parent: Option<u64>,
        tokens: &[u32],
        lora: Option<&str>,
        salt: Option<&str>,
    ) {
        if self.cached.contains_key(&hash) || self.blocks[block as usize].hash.is_some() {
            return;
        }
        self.blocks[block as usize].hash = Some(hash);
        self.cached.insert(hash, block);
        if self.record_events {
            let extra: Vec<String> = lora.into_iter().chain(salt).map(str::to_owned).collect();
            // Merge with the previous event when it ends with this block's parent.
            if let Some(KvEvent::BlockStored { block_hashes, token_ids, lora_name, extra_keys, .. }) =
                self.events.last_mut()
                && block_hashes.last().copied() == parent
                && lora_name.as_deref() == lora
            {
                block_hashes.push(hash);
                token_ids.extend_from_slice(tokens);
                extra_keys.push(extra);
                return;
            }
            self.events.push(KvEvent::BlockStored {
                block_hashes: vec![hash],
                parent_block_hash: parent,
                token_ids: tokens.to_vec(),
                block_size: self.block_size,
                lora_name: lora.map(str::to_owned),
                extra_keys: vec![extra],
            });
        }
    }

    /// Forgets every cached hash (`/reset_prefix_cache`).
    pub(crate) fn clear(&mut self) {
        for b in &mut self.blocks {
            b.hash = None;
        }
        self.cached.clear();
        if self.record_events {
            self.events.push(KvEvent::AllBlocksCleared);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize, seed: u32) -> (Vec<u64>, Vec<Vec<u32>>) {
        let mut parent = None;
        let mut hashes = Vec::new();
        let mut toks = Vec::new();
        for i in 0..n as u32 {
            let t: Vec<u32> = (0..4).map(|k| seed * 1000 + i * 4 + k).collect();
            let h = block_hash(parent, &t, None, None);
            hashes.push(h);
            toks.push(t);
            parent = Some(h);
        }
        (hashes, toks)
    }

    /// Allocates and commits a request's chain; returns its blocks.
    fn fill(pool: &mut BlockPool, hashes: &[u64], toks: &[Vec<u32>]) -> Vec<u32> {
        let mut blocks = Vec::new();
        for (i, h) in hashes.iter().enumerate() {
            let b = pool.allocate().expect("a free block");
            pool.commit(b, *h, i.checked_sub(1).map(|p| hashes[p]), &toks[i], None, None);
            blocks.push(b);
        }
        blocks
    }

    #[test]
    fn hits_after_release_and_eviction_in_lru_order() {
        let mut pool = BlockPool::new(6, 4, true);
        let (a, ta) = chain(3, 1);
        let blocks = fill(&mut pool, &a, &ta);
        assert_eq!(pool.lookup(&a).len(), 3, "hittable while in use");
        assert!((pool.usage() - 0.5).abs() < 1e-9);
        pool.release(&blocks);
        assert_eq!(pool.usage(), 0.0);
        assert_eq!(pool.lookup(&a), blocks, "still cached after release");
        // Six fresh blocks: three never-used ones go first, then a's tail before its head.
        let (b, tb) = chain(4, 2);
        let held = fill(&mut pool, &b, &tb);
        assert_eq!(pool.lookup(&a).len(), 2, "a lost its last block first");
        pool.allocate().expect("one more");
        assert_eq!(pool.lookup(&a).len(), 1);
        let events = pool.take_events();
        let removed: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                KvEvent::BlockRemoved { block_hashes } => Some(block_hashes[0]),
                _ => None,
            })
            .collect();
        assert_eq!(removed, [a[2], a[1]]);
        assert!(
            matches!(&events[0], KvEvent::BlockStored { block_hashes, token_ids, .. } if block_hashes.len() == 3 && token_ids.len() == 12)
        );
        pool.release(&held);
    }

    #[test]
    fn acquire_pins_cached_blocks() {
        let mut pool = BlockPool::new(3, 4, false);
        let (a, ta) = chain(2, 1);
        let blocks = fill(&mut pool, &a, &ta);
        pool.release(&blocks);
        for &b in &pool.lookup(&a) {
            pool.acquire(b);
        }
        assert_eq!(pool.num_free(), 1);
        pool.allocate().expect("the never-used block");
        assert_eq!(pool.allocate(), None, "pinned blocks are not evicted");
        pool.clear();
        assert!(pool.lookup(&a).is_empty());
    }

    #[test]
    fn salt_and_lora_change_hashes() {
        let t = [1, 2, 3, 4];
        let plain = block_hash(None, &t, None, None);
        assert_ne!(plain, block_hash(None, &t, Some("sql"), None));
        assert_ne!(plain, block_hash(None, &t, None, Some("s")));
        assert_ne!(plain, block_hash(Some(plain), &t, None, None));
    }
}
