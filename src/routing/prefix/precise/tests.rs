//! The precise index's unit tests.
use super::*;
use crate::routing::kv_events::ExtraKey;

fn ep(i: u32) -> EndpointId {
    EndpointId::new(i)
}

/// A stored event for blocks of `bs` tokens, engine hashes `base + i`.
fn stored(parent: Option<u64>, tokens: &[u32], bs: u32, base: u64, lora: Option<&str>, salt: Option<&str>) -> KvEvent {
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
