//! The prefix index's unit tests: matches, capacity and feedback, merges, and prefix-closure
//! against a linear scan.

use super::*;
use proptest::prelude::*;

fn chain(tag: u64, n: usize) -> Vec<BlockHash> {
    // Distinct chains: (tag, position) → hash; shared tags share prefixes.
    (0..n as u64).map(|i| BlockHash(xxhash_rust::xxh3::xxh3_64_with_seed(&i.to_le_bytes(), tag))).collect()
}

fn ep(i: u32) -> EndpointId {
    EndpointId::new(i)
}

fn check(index: &PrefixIndex, endpoint: u32, hashes: &[BlockHash], want: usize) {
    assert_eq!(index.matched(ep(endpoint), hashes), want, "match on endpoint {endpoint}");
}

#[test]
fn per_endpoint_strict_prefix() {
    let index = PrefixIndex::new(100);
    let a = chain(1, 10);
    index.record(ep(0), &a[..6]);
    index.record(ep(1), &a[..3]);
    check(&index, 0, &a, 6);
    check(&index, 1, &a, 3);
    check(&index, 2, &a, 0);
    check(&index, 0, &chain(2, 10), 0);
    check(&index, 0, &[], 0);
    let mut out = Vec::new();
    index.match_into(&[ep(1), ep(7), ep(0)], &a, &mut out);
    assert_eq!(out, [3, 0, 6]);
}

#[test]
fn held_blocks_merged_elsewhere_match_the_same_and_evict_nothing() {
    let (from, to) = (PrefixIndex::new(100), PrefixIndex::new(100));
    let (a, b, c) = (chain(1, 30), chain(2, 30), chain(3, 30));
    for x in [&a, &b] {
        from.record(ep(0), x);
    }
    to.record(ep(0), &c);
    to.merge(ep(0), &from.held(ep(0), usize::MAX));
    check(&to, 0, &a, 30);
    check(&to, 0, &b, 30);
    check(&to, 0, &c, 30);
    // Full: what it held stays, the rest of the other's is left out.
    let d = chain(4, 30);
    from.record(ep(0), &d);
    to.merge(ep(0), &from.held(ep(0), usize::MAX));
    check(&to, 0, &c, 30);
    assert_eq!(to.endpoint_blocks(ep(0)), 100);
    check(&to, 0, &d, 10);
    // A leading part of the list alone keeps the set prefix-closed: every chain it holds
    // part of, it holds from the start.
    let part = PrefixIndex::new(100);
    part.merge(ep(1), &from.held(ep(0), 45));
    for x in [&a, &b, &d] {
        let n = part.matched(ep(1), x);
        for (i, h) in x.iter().enumerate() {
            assert_eq!(part.matched(ep(1), std::slice::from_ref(h)) == 1, i < n, "block {i} of a chain held to {n}");
        }
    }
    check(&part, 1, &d, 30);
    check(&part, 1, &b, 15);
    assert!(from.held(ep(5), 10).is_empty());
}

#[test]
fn feedback_moves_capacity_within_its_ceiling() {
    let index = PrefixIndex::new(100);
    let (a, b, c) = (chain(1, 30), chain(2, 30), chain(3, 30));
    for x in [&a, &b, &c] {
        index.record(ep(0), x);
    }
    // The endpoint held 10 blocks less than believed: the oldest ten go (a's tail).
    assert_eq!(index.held_less(ep(0), 10), 80);
    assert_eq!(index.endpoint_blocks(ep(0)), 80);
    check(&index, 0, &a, 20);
    check(&index, 0, &c, 30);
    // The set stays bounded at its new capacity, evicting tails first.
    index.record(ep(0), &chain(4, 20));
    assert_eq!(index.endpoint_blocks(ep(0)), 80);
    check(&index, 0, &a, 0);
    check(&index, 0, &b, 30);
    // Never below 1/16 of the ceiling, never above it.
    assert_eq!(index.held_less(ep(0), 1000), 6);
    assert_eq!(index.held_more(ep(0), 50), 56);
    assert_eq!(index.held_more(ep(0), 500), 100);
    // A ceiling set from outside keeps a lowered capacity as low.
    index.held_less(ep(0), 1000);
    index.set_capacity(ep(0), 200);
    assert_eq!(index.capacity(ep(0)), Some((6, 200)));
    assert_eq!(index.held_less(ep(9), 1), 0, "unknown endpoints are left alone");
}

#[test]
fn lru_evicts_tails_first_and_stays_bounded() {
    let index = PrefixIndex::new(8);
    let a = chain(1, 6);
    let b = chain(2, 6);
    index.record(ep(0), &a);
    index.record(ep(0), &b); // 12 blocks into 8: a loses its last four blocks
    assert_eq!(index.endpoint_blocks(ep(0)), 8);
    check(&index, 0, &b, 6);
    check(&index, 0, &a, 2);
    // Touching a's head keeps it, but a[1] was last touched before all of b: it goes first.
    index.record(ep(0), &a[..1]);
    index.record(ep(0), &chain(3, 2));
    check(&index, 0, &a, 1);
    check(&index, 0, &b, 5);
}

#[test]
fn remove_and_resize() {
    let index = PrefixIndex::new(100);
    let a = chain(1, 50);
    index.record(ep(3), &a);
    assert_eq!(index.stats().resident_blocks, 50);
    index.set_capacity(ep(3), 20);
    check(&index, 3, &a, 20);
    index.remove(ep(3));
    check(&index, 3, &a, 0);
    assert_eq!(index.stats(), IndexStats::default());
}

#[test]
fn memory_per_entry_is_small() {
    let index = PrefixIndex::new(1 << 16);
    for tag in 0..64 {
        index.record(ep(0), &chain(tag, 1000));
    }
    let s = index.stats();
    assert_eq!(s.resident_blocks, 64_000);
    assert!(s.bytes_per_entry() < 64.0, "{} bytes per entry", s.bytes_per_entry());
}

#[test]
fn sequential_many_chains() {
    let index = PrefixIndex::new(500);
    for k in 0..400u64 {
        let c = chain(k % 17, 40);
        index.record(ep(0), &c);
        assert_eq!(index.matched(ep(0), &c), 40, "k={k}");
    }
}

#[test]
fn concurrent_readers_and_writers() {
    let index = std::sync::Arc::new(PrefixIndex::new(500));
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let index = index.clone();
            std::thread::spawn(move || {
                for k in 0..200u64 {
                    // Each thread owns one endpoint; all share endpoint 9 and read the others.
                    let c = chain(k % 17, 40);
                    index.record(ep(t), &c);
                    assert_eq!(index.matched(ep(t), &c), 40, "a chain just recorded is held whole");
                    index.record(ep(9), &chain(100 + k % 23, 40));
                    assert!(index.matched(ep((t + 1) % 4), &c) <= 40);
                    if k % 50 == 0 {
                        index.set_capacity(ep(10 + t), 10 + k as usize);
                        index.remove(ep(10 + t));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("no panics");
    }
    for e in [0, 1, 2, 3, 9] {
        assert!(index.endpoint_blocks(ep(e)) <= 500);
    }
    assert_eq!(index.stats().endpoints, 5);
}

proptest! {
    /// Binary search agrees with a linear scan, and no set exceeds its bound, under any
    /// sequence of records of overlapping chains.
    #[test]
    fn matches_equal_linear_scan(
        ops in proptest::collection::vec((0u32..3, 0u64..4, 0usize..12, 1usize..12), 1..60),
        capacity in 1usize..30,
    ) {
        let index = PrefixIndex::new(capacity);
        let mut trees: Vec<Vec<BlockHash>> = Vec::new();
        for (endpoint, tag, fork, len) in ops {
            // Chains that share `fork` blocks with chain `tag` and then diverge.
            let mut c = chain(tag, fork);
            c.extend(chain(tag * 100 + len as u64 + 7, len).into_iter().map(|h| BlockHash(h.0 ^ fork as u64)));
            index.record(ep(endpoint), &c);
            trees.push(c);
            prop_assert!(index.endpoint_blocks(ep(endpoint)) <= capacity);
        }
        let slots = index.endpoints.read();
        for lru in slots.iter().flatten() {
            let lru = lru.read();
            for c in &trees {
                let linear = c.iter().take_while(|h| lru.contains(h.0)).count();
                prop_assert_eq!(lru.longest_prefix(c), linear);
            }
        }
    }
}
