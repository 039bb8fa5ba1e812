//! Request keys: kvgate's own chained hash of a block's token ids and extra keys, computed alike
//! from a `BlockStored` event and from a tokenized request, and the hasher of the tables keyed by
//! them (the keys are hashes already).

use std::hash::{BuildHasher, Hasher};

use hashbrown::HashMap;
use xxhash_rust::xxh3::Xxh3;

use crate::routing::kv_events::ExtraKey;

/// The chain seed of request keys.
pub(super) const SEED: u64 = 0x6b76_6761_7465_2d6b;

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

pub(super) type KeyMap<V> = HashMap<u64, V, BuildKeyHasher>;

/// The request key of one block.
pub(super) fn block_key(parent: u64, tokens: &[u32], lora: Option<&str>, extra: &[ExtraKey], buf: &mut Vec<u8>) -> u64 {
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

/// Whether an extra key is the block's LoRA adapter (already in the key by name).
pub(super) fn is_lora(k: &ExtraKey, name: Option<&str>, id: Option<i64>) -> bool {
    match k {
        ExtraKey::Str(s) => name == Some(s.as_str()),
        ExtraKey::Int(i) => id == Some(*i),
        ExtraKey::Other(_) => false,
    }
}
