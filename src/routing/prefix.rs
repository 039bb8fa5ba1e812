//! Prompt → chained block hashes, the unit of prefix matching.
//!
//! A prompt's canonical byte stream (the request parser writes it; hashing reads only bytes) is
//! cut into fixed-size blocks and each block hashed together with the hash before it:
//! `h_i = xxh3(block_i, seed = h_{i-1})`, with `h_{-1}` derived from the model name and
//! `cache_salt`. So a block hash names the whole prefix that ends with it: equal prefixes give
//! equal hash prefixes, and two models (or two salts) never share a hash. Only full blocks are
//! hashed, as vLLM only caches full blocks; a prompt shorter than one block has no hashes.
//!
//! Blocks approximate vLLM's token blocks without a tokenizer. The default, 256 bytes, is about
//! 64 tokens at the ~4 bytes per token of English text and code: four vLLM blocks of 16 tokens,
//! and the same effective block the reference endpoint picker uses (64 pseudo-tokens of 4 bytes),
//! so capacity figures carry over. Finer blocks buy little routing precision (a miss of up to 255
//! bytes at the tail of a shared prefix) and cost index memory and match time.
//!
//! Part of the decision core: no I/O, no clock, no async.

pub mod index;
pub mod precise;

pub use index::{IndexStats, PrefixIndex};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Default block size in bytes of canonical prompt (about 64 tokens).
pub const DEFAULT_BLOCK_BYTES: usize = 256;
/// Default cap on hashed blocks per prompt: 2048 × 256 B = 512 KiB, about 128k tokens.
pub const DEFAULT_MAX_BLOCKS: usize = 2048;
/// Default prefix-index capacity per endpoint, in blocks: 8192 × 64 tokens ≈ 524k tokens, about
/// the KV cache of an 8B model on one 80 GB GPU. Sized from `vllm:cache_config_info` when scraped.
pub const DEFAULT_INDEX_CAPACITY: usize = 8192;
/// kvgate's tokenizer-free estimate of bytes of prompt per token, until responses' usage says
/// better ([`BytesPerToken`]).
pub const BYTES_PER_TOKEN: usize = 4;

/// The hash of one block, which also identifies every block before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// How prompts are cut into blocks and how much of them is hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixConfig {
    /// Bytes of canonical prompt per block.
    pub block_bytes: usize,
    /// Blocks hashed per prompt at most; the rest of a longer prompt is not matched.
    pub max_blocks: usize,
    /// Capacity of the prefix index per endpoint, in blocks.
    pub index_capacity: usize,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        Self {
            block_bytes: DEFAULT_BLOCK_BYTES,
            max_blocks: DEFAULT_MAX_BLOCKS,
            index_capacity: DEFAULT_INDEX_CAPACITY,
        }
    }
}

impl PrefixConfig {
    /// Estimated tokens per block.
    pub fn block_tokens(&self) -> usize {
        (self.block_bytes / BYTES_PER_TOKEN).max(1)
    }

    /// Estimated tokens per block at `bytes_per_token`.
    pub fn block_tokens_at(&self, bytes_per_token: f64) -> u64 {
        ((self.block_bytes as f64 / bytes_per_token.max(0.1)).round() as u64).max(1)
    }

    /// Index capacity in blocks for an endpoint whose KV cache holds `gpu_blocks` × `block_size`
    /// tokens (from `vllm:cache_config_info`), at `bytes_per_token`.
    pub fn capacity_for_kv(&self, gpu_blocks: u64, block_size_tokens: u64, bytes_per_token: f64) -> usize {
        let bytes = gpu_blocks.saturating_mul(block_size_tokens) as f64 * bytes_per_token;
        ((bytes / self.block_bytes.max(1) as f64) as usize).max(1)
    }
}

/// A pool's bytes of canonical prompt per token, learned from responses' `usage.prompt_tokens`
/// against the prompt bytes kvgate hashed: a decayed ratio of sums (each sample weighs at most
/// 8,192 tokens, so one huge prompt does not set it alone), starting at [`BYTES_PER_TOKEN`].
/// Reads are one atomic load.
#[derive(Debug)]
pub struct BytesPerToken {
    current: std::sync::atomic::AtomicU64,
    sums: parking_lot::Mutex<(f64, f64, u64)>,
}

impl Default for BytesPerToken {
    fn default() -> Self {
        Self {
            current: std::sync::atomic::AtomicU64::new((BYTES_PER_TOKEN as f64).to_bits()),
            // A prior worth 2,048 tokens at 4 bytes each.
            sums: parking_lot::Mutex::new((2048.0 * BYTES_PER_TOKEN as f64, 2048.0, 0)),
        }
    }
}

impl BytesPerToken {
    /// Bytes per token now.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.current.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Samples learned from.
    pub fn samples(&self) -> u64 {
        self.sums.lock().2
    }

    /// Takes another replica's figure, learned from `samples` responses, when this one learned
    /// from fewer: it weighs as a full window of tokens. Whether it was taken.
    pub fn adopt(&self, bytes_per_token: f64, samples: u64) -> bool {
        if !(0.5..=32.0).contains(&bytes_per_token) {
            return false;
        }
        let mut s = self.sums.lock();
        if s.2 >= samples {
            return false;
        }
        *s = (100_000.0 * bytes_per_token, 100_000.0, samples);
        self.current.store(bytes_per_token.to_bits(), std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Learns that a prompt of `bytes` canonical bytes was `tokens` tokens. Prompts under 16
    /// tokens, and ratios outside 0.5–32 bytes per token (a response about another prompt), are
    /// ignored.
    pub fn observe(&self, bytes: usize, tokens: u64) {
        if tokens < 16 {
            return;
        }
        let ratio = bytes as f64 / tokens as f64;
        if !(0.5..=32.0).contains(&ratio) {
            return;
        }
        let w = tokens.min(8192) as f64;
        let mut s = self.sums.lock();
        // Decay: about the last 100k tokens' worth count.
        let keep = (1.0 - w / 100_000.0).max(0.5);
        s.0 = s.0 * keep + w * ratio;
        s.1 = s.1 * keep + w;
        s.2 = s.2.saturating_add(1);
        self.current.store((s.0 / s.1).to_bits(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// The chain seed for a model and optional `cache_salt`.
pub fn seed(model: &str, cache_salt: Option<&str>) -> u64 {
    let base = xxh3_64(model.as_bytes());
    match cache_salt {
        Some(salt) => xxh3_64_with_seed(salt.as_bytes(), base ^ 0x5a17_5a17_5a17_5a17),
        None => base,
    }
}

/// Incremental block hasher: feed it the prompt in any number of chunks.
#[derive(Debug)]
pub struct BlockHasher {
    block_bytes: usize,
    max_blocks: usize,
    prev: u64,
    buf: Vec<u8>,
    hashes: Vec<BlockHash>,
    total_bytes: usize,
}

impl BlockHasher {
    /// A hasher for one prompt of `model` (with its `cache_salt`, if any).
    pub fn new(cfg: &PrefixConfig, model: &str, cache_salt: Option<&str>) -> Self {
        let block_bytes = cfg.block_bytes.max(1);
        Self {
            block_bytes,
            max_blocks: cfg.max_blocks,
            prev: seed(model, cache_salt),
            buf: Vec::new(),
            hashes: Vec::new(),
            total_bytes: 0,
        }
    }

    /// Feeds the next bytes of the prompt.
    pub fn update(&mut self, mut data: &[u8]) {
        self.total_bytes += data.len();
        if self.hashes.len() >= self.max_blocks {
            return;
        }
        if !self.buf.is_empty() {
            let take = (self.block_bytes - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() < self.block_bytes {
                return;
            }
            let block = std::mem::take(&mut self.buf);
            self.push(&block);
            self.buf = block;
            self.buf.clear();
        }
        // Whole blocks straight from the input, without copying.
        let mut blocks = data.chunks_exact(self.block_bytes);
        for block in blocks.by_ref() {
            if self.hashes.len() >= self.max_blocks {
                return;
            }
            self.push(block);
        }
        let rest = blocks.remainder();
        if !rest.is_empty() && self.hashes.len() < self.max_blocks {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(self.block_bytes);
            }
            self.buf.extend_from_slice(rest);
        }
    }

    fn push(&mut self, block: &[u8]) {
        self.prev = xxh3_64_with_seed(block, self.prev);
        self.hashes.push(BlockHash(self.prev));
    }

    /// The hashes of the full blocks fed so far, and the prompt's total length.
    pub fn finish(self) -> PromptHashes {
        PromptHashes { hashes: self.hashes, prompt_bytes: self.total_bytes }
    }
}

/// A prompt's block hashes and its length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptHashes {
    /// Chained hashes of the prompt's full blocks, at most `max_blocks` of them.
    pub hashes: Vec<BlockHash>,
    /// Length of the whole canonical prompt in bytes (hashed or not).
    pub prompt_bytes: usize,
}

impl PromptHashes {
    /// Estimated prompt length in tokens at `bytes_per_token`.
    pub fn prompt_tokens_at(&self, bytes_per_token: f64) -> u64 {
        (self.prompt_bytes as f64 / bytes_per_token.max(0.1)).ceil() as u64
    }
}

/// Hashes a whole prompt held in one slice.
pub fn hash_prompt(cfg: &PrefixConfig, model: &str, cache_salt: Option<&str>, prompt: &[u8]) -> PromptHashes {
    let mut h = BlockHasher::new(cfg, model, cache_salt);
    h.update(prompt);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(block_bytes: usize, max_blocks: usize) -> PrefixConfig {
        PrefixConfig { block_bytes, max_blocks, index_capacity: 16 }
    }

    fn check(block: usize, max: usize, prompt: &[u8], want_blocks: usize) {
        let h = hash_prompt(&cfg(block, max), "m", None, prompt);
        assert_eq!(h.hashes.len(), want_blocks, "blocks of a {}-byte prompt", prompt.len());
        assert_eq!(h.prompt_bytes, prompt.len());
    }

    #[test]
    fn full_blocks_only_and_capped() {
        check(4, 100, b"", 0);
        check(4, 100, b"abc", 0);
        check(4, 100, b"abcd", 1);
        check(4, 100, b"abcdefghi", 2);
        check(4, 2, b"abcdefghijklmnop", 2);
        check(4, 0, b"abcdefghijklmnop", 0);
    }

    #[test]
    fn models_and_salts_separate_chains() {
        let c = cfg(4, 100);
        let p = b"abcdefgh";
        let a = hash_prompt(&c, "a", None, p).hashes;
        let b = hash_prompt(&c, "b", None, p).hashes;
        let salted = hash_prompt(&c, "a", Some("s"), p).hashes;
        assert_ne!(a[0], b[0]);
        assert_ne!(a[0], salted[0]);
        assert_eq!(a, hash_prompt(&c, "a", None, p).hashes);
    }

    #[test]
    fn block_hash_depends_on_history() {
        // The same second block after different first blocks hashes differently.
        let c = cfg(4, 100);
        let x = hash_prompt(&c, "m", None, b"aaaazzzz").hashes;
        let y = hash_prompt(&c, "m", None, b"bbbbzzzz").hashes;
        assert_ne!(x[1], y[1]);
    }

    #[test]
    fn capacity_from_kv_cache() {
        let c = PrefixConfig::default();
        // 32768 vLLM blocks of 16 tokens = 524288 tokens = 8192 blocks of 64 tokens.
        assert_eq!(c.capacity_for_kv(32768, 16, 4.0), 8192);
        assert_eq!(c.capacity_for_kv(0, 16, 4.0), 1);
        // At 5.5 bytes per token the same cache holds 37.5% more prompt bytes.
        assert_eq!(c.capacity_for_kv(32768, 16, 5.5), 11264);
        assert_eq!(c.block_tokens_at(5.5), 47);
    }

    #[test]
    fn bytes_per_token_is_learned() {
        let b = BytesPerToken::default();
        assert_eq!(b.get(), 4.0);
        for _ in 0..200 {
            b.observe(5490, 1000);
        }
        assert!((b.get() - 5.49).abs() < 0.02, "{}", b.get());
        // Tiny prompts and absurd ratios change nothing.
        b.observe(10_000, 10);
        b.observe(100_000, 1000);
        b.observe(10, 1000);
        assert!((b.get() - 5.49).abs() < 0.02, "{}", b.get());
        assert_eq!(b.samples(), 200);
    }

    proptest! {
        /// The hashes of a prefix are a prefix of the hashes.
        #[test]
        fn prefix_hashes_are_a_prefix(
            prompt in proptest::collection::vec(any::<u8>(), 0..600),
            cut in 0usize..600,
            block in 1usize..40,
        ) {
            let c = cfg(block, 1000);
            let cut = cut.min(prompt.len());
            let whole = hash_prompt(&c, "m", None, &prompt).hashes;
            let part = hash_prompt(&c, "m", None, &prompt[..cut]).hashes;
            prop_assert_eq!(part.len(), cut / block);
            prop_assert_eq!(&whole[..part.len()], &part[..]);
        }

        /// Feeding in chunks gives the same hashes as feeding at once.
        #[test]
        fn chunked_feeding_is_equivalent(
            prompt in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(0usize..600, 0..8),
            block in 1usize..40,
            max in 0usize..30,
        ) {
            let c = cfg(block, max);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|x| x.min(prompt.len())).collect();
            cuts.sort_unstable();
            let mut h = BlockHasher::new(&c, "m", Some("salt"));
            let mut at = 0;
            for cut in cuts.into_iter().chain([prompt.len()]) {
                h.update(&prompt[at..cut]);
                at = cut;
            }
            prop_assert_eq!(h.finish(), hash_prompt(&c, "m", Some("salt"), &prompt));
        }
    }
}
