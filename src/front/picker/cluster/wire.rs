//! Batches to and from `kvgate.v1.ClusterUpdate`.

use crate::front::picker::pb::{self, ClusterUpdate, EndpointLoad, Placement, PoolShare, lesson::Kind};
use crate::gateway::pool::cluster::{Batch, Lesson, MAX_PLACEMENT_BLOCKS, PoolBatch};
use crate::routing::endpoint::Load;
use crate::routing::prefix::BlockHash;

use super::PART_BLOCKS;

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn placement((endpoint, blocks): (String, Vec<BlockHash>)) -> Placement {
    Placement { endpoint, blocks: blocks.into_iter().map(|b| b.0).collect(), capacity: 0 }
}

fn held((endpoint, blocks, capacity): (String, Vec<BlockHash>, usize)) -> Placement {
    Placement { endpoint, blocks: blocks.into_iter().map(|b| b.0).collect(), capacity: capacity as u64 }
}

fn load((endpoint, l): (String, Load)) -> EndpointLoad {
    EndpointLoad { endpoint, requests: l.requests, prefilling: l.prefilling, tokens: l.tokens, gated: l.gated }
}

fn lesson(l: Lesson) -> pb::Lesson {
    let kind = match l {
        Lesson::PromptSize { bytes, tokens } => Kind::PromptSize(pb::PromptSize { bytes, tokens }),
        Lesson::Ttft { endpoint, work_tokens, decodes, ttft_ms } => {
            Kind::Ttft(pb::TtftSample { endpoint, work_tokens, decodes, ttft_ms })
        }
        Lesson::Held { endpoint, less, more } => Kind::Held(pb::HeldCorrection { endpoint, less, more }),
    };
    pb::Lesson { kind: Some(kind) }
}

/// A lesson from the wire; `None` for a sample no model would take.
fn lesson_of(kind: Kind) -> Option<Lesson> {
    Some(match kind {
        Kind::PromptSize(p) => Lesson::PromptSize { bytes: p.bytes.min(MAX_TOKENS), tokens: p.tokens.min(MAX_TOKENS) },
        Kind::Ttft(t) if t.ttft_ms.is_finite() && t.ttft_ms >= 0.0 && t.work_tokens <= MAX_TOKENS / 1024 => {
            Lesson::Ttft {
                endpoint: t.endpoint,
                work_tokens: t.work_tokens,
                decodes: t.decodes.min(MAX_REQUESTS),
                ttft_ms: t.ttft_ms,
            }
        }
        Kind::Ttft(_) => return None,
        Kind::Held(h) => Lesson::Held {
            endpoint: h.endpoint,
            less: h.less.min(MAX_PLACEMENT_BLOCKS as u64),
            more: h.more.min(MAX_PLACEMENT_BLOCKS as u64),
        },
    })
}

/// One batch as one message (`done`: it ends a snapshot).
pub(super) fn update(replica: &str, batch: Batch, done: bool) -> ClusterUpdate {
    let pools = batch
        .pools
        .into_iter()
        .map(|p| PoolShare {
            pool: p.pool,
            placements: p.placements.into_iter().map(placement).collect(),
            loads: p.loads.into_iter().map(load).collect(),
            held: p.held.into_iter().map(held).collect(),
            lessons: p.lessons.into_iter().map(lesson).collect(),
            bytes_per_token: p.bytes_per_token.map_or(0.0, |b| b.0),
            bytes_per_token_samples: p.bytes_per_token.map_or(0, |b| b.1),
        })
        .collect();
    ClusterUpdate {
        replica: replica.to_owned(),
        pools,
        snapshot_done: done,
        sent_unix_ms: unix_ms(),
        full_loads: batch.full_loads,
    }
}

/// A block list packed into messages: a placement, or a part of an endpoint's held blocks
/// (with its capacity).
enum Item {
    Placement(String, Vec<BlockHash>),
    Held(String, Vec<BlockHash>, usize),
}

impl Item {
    fn blocks(&self) -> usize {
        match self {
            Self::Placement(_, b) | Self::Held(_, b, _) => b.len(),
        }
    }
}

/// `first`, then `items` (each with its pool's name) in messages of at most [`PART_BLOCKS`]
/// blocks each (one item larger than that alone in its message); the last says whether a
/// snapshot is `done`.
fn packed(replica: &str, first: Batch, items: Vec<(String, Item)>, done: bool) -> Vec<ClusterUpdate> {
    let mut parts = vec![update(replica, first, false)];
    let mut part = Batch::default();
    let mut size = 0;
    for (pool, item) in items {
        if size + item.blocks() > PART_BLOCKS && size > 0 {
            parts.push(update(replica, std::mem::take(&mut part), false));
            size = 0;
        }
        size += item.blocks();
        let share = match part.pools.iter().position(|b| b.pool == pool) {
            Some(i) => &mut part.pools[i],
            None => {
                part.pools.push(PoolBatch { pool, ..PoolBatch::default() });
                part.pools.last_mut().expect("just pushed")
            }
        };
        match item {
            Item::Placement(e, b) => share.placements.push((e, b)),
            Item::Held(e, b, capacity) => share.held.push((e, b, capacity)),
        }
    }
    if size > 0 || done {
        parts.push(update(replica, part, done));
    }
    parts
}

/// A snapshot as messages of at most [`PART_BLOCKS`] blocks each: the first carries every
/// count, the last says the snapshot is done.
pub(super) fn snapshot_parts(replica: &str, snapshot: Batch) -> Vec<ClusterUpdate> {
    let mut first = Batch { pools: Vec::new(), full_loads: true };
    let mut items = Vec::new();
    for p in snapshot.pools {
        for (endpoint, blocks, capacity) in p.held {
            let chunks = blocks
                .chunks(PART_BLOCKS)
                .map(|c| (p.pool.clone(), Item::Held(endpoint.clone(), c.to_vec(), capacity)));
            items.extend(chunks);
        }
        first.pools.push(PoolBatch {
            pool: p.pool,
            loads: p.loads,
            bytes_per_token: p.bytes_per_token,
            ..PoolBatch::default()
        });
    }
    packed(replica, first, items, true)
}

/// A batch as messages of at most [`PART_BLOCKS`] placed blocks each (a placement is never
/// split: the outbox caps each below that): the first carries the counts and lessons.
pub(super) fn batch_parts(replica: &str, mut batch: Batch) -> Vec<ClusterUpdate> {
    let total: usize = batch.pools.iter().flat_map(|p| &p.placements).map(|(_, b)| b.len()).sum();
    if total <= PART_BLOCKS {
        return vec![update(replica, batch, false)];
    }
    let mut items = Vec::new();
    for p in &mut batch.pools {
        items.extend(
            std::mem::take(&mut p.placements).into_iter().map(|(e, b)| (p.pool.clone(), Item::Placement(e, b))),
        );
    }
    packed(replica, batch, items, false)
}

/// Bounds on what a peer's message may say (larger figures are clamped: a peer is trusted to
/// be kvgate, not to be right).
const MAX_REQUESTS: u64 = 1 << 20;
const MAX_TOKENS: u64 = 1 << 40;
const MAX_SAMPLES: u64 = 1 << 40;

fn clamp_load(l: &EndpointLoad) -> Load {
    let requests = l.requests.min(MAX_REQUESTS);
    let tokens = l.tokens.min(MAX_TOKENS);
    Load { requests, prefilling: l.prefilling.min(requests), tokens, gated: l.gated.min(tokens) }
}

/// A message as a batch; with the milliseconds since it was sent (0 if the clocks disagree).
pub(super) fn batch(u: ClusterUpdate) -> (Batch, u64) {
    let lag = unix_ms().saturating_sub(u.sent_unix_ms);
    let blocks = |b: Vec<u64>| b.into_iter().take(MAX_PLACEMENT_BLOCKS).map(BlockHash).collect::<Vec<_>>();
    let pools = u
        .pools
        .into_iter()
        .map(|p| PoolBatch {
            pool: p.pool,
            placements: p.placements.into_iter().map(|x| (x.endpoint, blocks(x.blocks))).collect(),
            loads: p
                .loads
                .into_iter()
                .map(|l| {
                    let load = clamp_load(&l);
                    (l.endpoint, load)
                })
                .collect(),
            held: p.held.into_iter().map(|x| (x.endpoint, blocks(x.blocks), x.capacity as usize)).collect(),
            lessons: p.lessons.into_iter().filter_map(|l| lesson_of(l.kind?)).collect(),
            bytes_per_token: (p.bytes_per_token_samples > 0)
                .then_some((p.bytes_per_token, p.bytes_per_token_samples.min(MAX_SAMPLES))),
        })
        .collect();
    (Batch { pools, full_loads: u.full_loads }, lag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_batch_is_split_by_blocks_with_its_counts_first() {
        let chain = |n: u64| (0..n).map(BlockHash).collect::<Vec<_>>();
        let load = Load { requests: 1, ..Load::default() };
        let batch = Batch {
            pools: vec![PoolBatch {
                pool: "p".into(),
                placements: (0..5).map(|i| (format!("10.0.0.{i}:8000"), chain(PART_BLOCKS as u64 / 2))).collect(),
                loads: vec![("10.0.0.1:8000".into(), load)],
                ..PoolBatch::default()
            }],
            full_loads: true,
        };
        let parts = batch_parts("r1", batch);
        assert_eq!(parts.len(), 4, "counts, then two placements a part");
        assert!(parts[0].full_loads && parts[1..].iter().all(|p| !p.full_loads && !p.snapshot_done));
        let placed: Vec<usize> = parts.iter().map(|p| p.pools.iter().map(|s| s.placements.len()).sum()).collect();
        assert_eq!(placed, vec![0, 2, 2, 1]);
        let small = Batch { pools: vec![PoolBatch { pool: "p".into(), ..PoolBatch::default() }], full_loads: false };
        assert_eq!(batch_parts("r1", small).len(), 1);
    }

    #[test]
    fn a_snapshot_is_split_by_blocks_and_read_back_whole() {
        let held: Vec<BlockHash> = (0..(PART_BLOCKS as u64 * 2 + 5)).map(BlockHash).collect();
        let load = Load { requests: 3, prefilling: 1, tokens: 40, gated: 40 };
        let snapshot = Batch {
            pools: vec![PoolBatch {
                pool: "p".into(),
                loads: vec![("10.0.0.1:8000".into(), load)],
                held: vec![
                    ("10.0.0.1:8000".into(), held.clone(), held.len()),
                    ("10.0.0.2:8000#1".into(), vec![BlockHash(7)], 10),
                ],
                ..PoolBatch::default()
            }],
            full_loads: true,
        };
        let parts = snapshot_parts("r1", snapshot);
        assert_eq!(parts.len(), 4, "loads, then three parts of the big chain (the last with the small one)");
        assert!(parts.last().is_some_and(|p| p.snapshot_done) && parts[..3].iter().all(|p| !p.snapshot_done));
        assert!(parts[0].full_loads && parts[1..].iter().all(|p| !p.full_loads));
        let mut got: Vec<BlockHash> = Vec::new();
        let mut loads = Vec::new();
        for p in parts {
            assert!(
                p.pools.iter().map(|s| s.held.iter().map(|h| h.blocks.len()).sum::<usize>()).sum::<usize>()
                    <= PART_BLOCKS
            );
            let (b, _) = batch(p);
            for pool in b.pools {
                loads.extend(pool.loads);
                got.extend(pool.held.into_iter().filter(|(e, ..)| e == "10.0.0.1:8000").flat_map(|(_, b, _)| b));
            }
        }
        assert_eq!(got, held, "in order, least recent first");
        assert_eq!(loads, vec![("10.0.0.1:8000".to_owned(), load)]);
    }
}
