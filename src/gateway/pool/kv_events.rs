//! Following vLLM's KV-event publishers into a pool's precise prefix index.
//!
//! Two ways to meet them, as vLLM and llm-d do: with `kv_events.port`, one SUB subscription per
//! endpoint, connected to `tcp://<endpoint ip>:<port + rank>` (the engine binds); with
//! `kv_events.bind`, one SUB socket for the pool that the engines connect to, each batch
//! attributed to an endpoint by its topic `kv@<ip:port>@<model>` and its data-parallel rank.
//!
//! Every message is `[topic, seq (8 bytes big-endian), msgpack batch]`. Sequence numbers are
//! checked per publisher: the first one seen starts the stream (with a replay socket, what was
//! published before is asked for); a jump is a gap, repaired from the engine's replay socket
//! (`kv_events.replay_port`) when it has the batches, otherwise the endpoint's view is marked
//! rebuilding (the approximate index serves it meanwhile); a step back is a restarted engine,
//! whose cache starts empty. A message that does not decode counts as lost. Once a second each
//! feed checks its endpoints: an endpoint whose view is not precise (disconnected, rebuilding,
//! or answered requests waited too long for events) falls back with a logged warning and
//! `kvgate_kv_events_fallbacks_total`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use zeromq::{Socket, SocketEvent, SocketOptions, SocketRecv, SubSocket};

mod replay;

use super::{Inner, Member, now_ms};
use crate::gateway::config::KvEventsSpec;
use crate::routing::endpoint::EndpointId;
use crate::routing::kv_events::{EventBatch, KvEvent, decode_batch};
use crate::routing::prefix::precise::{Unknown, ViewStatus};
use replay::replay;

/// Bound on connecting a subscription or a replay request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often feeds check their endpoints' precision.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// One endpoint's feed state, for `/debug/endpoints`.
#[derive(Debug, Default)]
pub(crate) struct FeedStatus {
    connected: AtomicBool,
    /// Last sequence number applied, plus one (0: none yet).
    next_seq: AtomicU64,
    gaps: AtomicU64,
    replays: AtomicU64,
    /// The publisher's connection broke since the last message.
    broken: AtomicBool,
    /// A hash of the last applied batch's payload (to tell, after a reconnect, whether the
    /// engine's replay buffer is the same stream).
    last_payload: AtomicU64,
    /// Whether the last check found the view precise (for transition logs).
    precise: AtomicBool,
    checked: AtomicBool,
}

impl FeedStatus {
    /// Whether the subscription is in place.
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The last sequence number applied.
    pub(crate) fn last_seq(&self) -> Option<u64> {
        self.next_seq.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Gaps found.
    pub(crate) fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::Relaxed)
    }

    /// Successful replays.
    pub(crate) fn replays(&self) -> u64 {
        self.replays.load(Ordering::Relaxed)
    }
}

/// How a KV-event feed knows a member.
pub(super) fn feed_target(m: &Member) -> FeedTarget {
    let rank = m.entry.rank.unwrap_or(0);
    FeedTarget {
        id: m.id,
        label: if m.entry.rank_header { format!("{}#{rank}", m.addr) } else { m.addr.to_string() },
        addr: m.addr,
        rank,
        status: m.feed.clone(),
    }
}

impl Inner {
    /// The members, as KV-event feeds know them.
    pub(super) fn feed_targets(&self) -> Vec<FeedTarget> {
        self.state.lock().members.iter().map(feed_target).collect()
    }

    /// Warns once when an endpoint's events and its `cache_config_info` disagree on the block
    /// size (its blocks would then not be the ones kvgate matches).
    pub(super) fn check_block_size(&self, m: &mut Member) {
        let Some(p) = self.planner.precise() else { return };
        let events = p.index().status(m.id).and_then(|v| v.block_size);
        if let (Some(ev), Some(engine)) = (events, m.engine_block_size)
            && u64::from(ev) != engine
            && !m.block_size_warned
        {
            m.block_size_warned = true;
            tracing::warn!(pool = self.name.as_str(), endpoint = %m.addr, events = ev, cache_config_info = engine,
                "the endpoint's KV events and its vllm:cache_config_info disagree on the block size");
        }
    }
}

/// One endpoint as a feed knows it.
#[derive(Debug, Clone)]
pub(super) struct FeedTarget {
    pub(super) id: EndpointId,
    /// Its metrics label.
    pub(super) label: String,
    pub(super) addr: SocketAddr,
    pub(super) rank: u32,
    pub(super) status: Arc<FeedStatus>,
}

/// What a sequence number says about the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seq {
    /// The first message of a subscription.
    First,
    /// The next one.
    Next,
    /// Batches `from..seq` are missing.
    Gap { from: u64 },
    /// Lower than before: the publisher started afresh.
    Restarted,
}

fn classify(next: Option<u64>, seq: u64) -> Seq {
    match next {
        None => Seq::First,
        Some(n) if seq == n => Seq::Next,
        Some(n) if seq > n => Seq::Gap { from: n },
        Some(_) => Seq::Restarted,
    }
}

/// The sequence number of a message's second frame (8 bytes; the snapshot extension's 24-byte
/// frame starts with it).
fn seq_of(frame: &[u8]) -> Option<u64> {
    frame.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes)
}

/// The precise index and metrics a feed writes to, while the pool lives.
struct Sink {
    pool: Arc<Inner>,
}

impl Sink {
    fn of(pool: &Weak<Inner>) -> Option<Self> {
        pool.upgrade().filter(|p| p.planner.precise().is_some()).map(|pool| Self { pool })
    }

    fn with_index<R>(&self, f: impl FnOnce(&crate::routing::prefix::precise::PreciseIndex) -> R) -> Option<R> {
        self.pool.planner.precise().map(|p| f(p.index()))
    }

    fn applied(&self, t: &FeedTarget, seq: u64, payload: &[u8], batch: &EventBatch) {
        let now = now_ms();
        let Some(applied) = self.with_index(|i| i.apply(t.id, batch, now)) else { return };
        t.status.next_seq.store(seq.saturating_add(1), Ordering::Relaxed);
        t.status.last_payload.store(xxhash_rust::xxh3::xxh3_64(payload), Ordering::Relaxed);
        let m = &self.pool.telemetry.kv_events;
        let labels = [self.pool.name.as_str(), t.label.as_str()];
        m.batches.with_label_values(&labels).inc();
        let count = |kind: &str, n: usize| {
            if n > 0 {
                m.events.with_label_values(&[labels[0], labels[1], kind]).inc_by(n as u64);
            }
        };
        let (mut stored, mut removed) = (0, 0);
        for e in &batch.events {
            match e {
                KvEvent::BlockStored(_) => stored += 1,
                KvEvent::BlockRemoved { .. } => removed += 1,
                KvEvent::AllBlocksCleared => {}
            }
        }
        count("BlockStored", stored);
        count("BlockRemoved", removed);
        count("AllBlocksCleared", applied.cleared);
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        if batch.ts > 0.0 {
            m.lag.with_label_values(&labels).set((wall - batch.ts).max(0.0));
        }
        if applied.overflowed {
            tracing::warn!(
                pool = self.pool.name.as_str(),
                endpoint = t.label.as_str(),
                "the precise index outgrew the endpoint's KV cache (removals were lost): its entries are dropped until it is rebuilt"
            );
        }
    }

    fn lost(&self, t: &FeedTarget, why: Unknown) {
        self.with_index(|i| i.invalidate(t.id, why));
    }

    fn gap(&self, t: &FeedTarget) {
        t.status.gaps.fetch_add(1, Ordering::Relaxed);
        self.pool.telemetry.kv_events.gaps.with_label_values(&[self.pool.name.as_str(), t.label.as_str()]).inc();
    }

    fn replayed(&self, t: &FeedTarget, ok: bool) {
        if ok {
            t.status.replays.fetch_add(1, Ordering::Relaxed);
        }
        let result = if ok { "ok" } else { "failed" };
        self.pool
            .telemetry
            .kv_events
            .replays
            .with_label_values(&[self.pool.name.as_str(), t.label.as_str(), result])
            .inc();
    }

    fn error(&self, t: &FeedTarget) {
        self.pool.telemetry.kv_events.errors.with_label_values(&[self.pool.name.as_str(), t.label.as_str()]).inc();
    }

    fn set_connected(&self, t: &FeedTarget, connected: bool) {
        t.status.connected.store(connected, Ordering::Relaxed);
        if !connected {
            t.status.broken.store(true, Ordering::Relaxed);
        }
        self.with_index(|i| i.set_connected(t.id, connected));
    }

    /// Logs and counts a change of the endpoint's precision, and refreshes its gauges.
    fn check(&self, t: &FeedTarget) {
        let Some(p) = self.pool.planner.precise() else { return };
        let now = now_ms();
        let status = p.index().status(t.id);
        let precise = p.is_precise(status.as_ref(), now);
        let m = &self.pool.telemetry.kv_events;
        let labels = [self.pool.name.as_str(), t.label.as_str()];
        m.precise.with_label_values(&labels).set(i64::from(precise));
        m.blocks.with_label_values(&labels).set(status.map_or(0, |s| s.blocks) as i64);
        let was = t.status.precise.swap(precise, Ordering::Relaxed);
        let first = !t.status.checked.swap(true, Ordering::Relaxed);
        if precise == was && !first {
            return;
        }
        let name = self.pool.name.as_str();
        if precise {
            if !first {
                tracing::info!(
                    pool = name,
                    endpoint = t.label.as_str(),
                    "KV events flow again: prefix matches are exact"
                );
            }
        } else if !first || status.is_some_and(|s| s.connected) {
            let reason = fallback_reason(status.as_ref(), now, p.stale_after_ms());
            m.fallbacks.with_label_values(&[name, t.label.as_str(), reason]).inc();
            tracing::warn!(
                pool = name,
                endpoint = t.label.as_str(),
                reason,
                "prefix matches on this endpoint fall back to the approximate index"
            );
        }
    }
}

/// Why a view is not precise.
fn fallback_reason(status: Option<&ViewStatus>, now: u64, stale_ms: u64) -> &'static str {
    match status {
        None => "disconnected",
        Some(s) if !s.connected => "disconnected",
        Some(s) if s.rebuilding == Some(Unknown::Gap) => "gap",
        Some(s) if s.rebuilding == Some(Unknown::Overflow) => "overflow",
        Some(s) if s.unconfirmed_since_ms.is_some_and(|t| now.saturating_sub(t) > stale_ms) => "stale",
        Some(_) => "unknown",
    }
}

/// Handles one message of `t`'s publisher.
async fn handle(sink: &Sink, t: &FeedTarget, frames: &[Bytes], replay_at: Option<&str>) {
    let (Some(seq), Some(payload)) = (frames.get(1).and_then(|f| seq_of(f)), frames.get(2)) else {
        sink.error(t);
        return;
    };
    let next = Some(t.status.next_seq.load(Ordering::Relaxed)).filter(|&n| n > 0);
    let mut verdict = classify(next, seq);
    // After a broken connection (an engine restart takes its publisher with it), what came
    // while disconnected is unknown even when the numbers go on: the engine's replay buffer
    // tells whether this is the same stream (its batch `next - 1` is the one applied last); a
    // new engine's cache started empty. Without a replay socket the view is rebuilt.
    let mut verified = true;
    let broken = t.status.broken.swap(false, Ordering::Relaxed);
    // A gap is checked the same way: in bind mode there is no connection to see break, and a
    // restarted engine's numbers may already be past the old ones.
    let suspect = broken || (matches!(verdict, Seq::Gap { .. }) && replay_at.is_some());
    if suspect
        && let Some(n) = next
        && verdict != Seq::Restarted
    {
        match replay_at {
            Some(at) => {
                let last = t.status.last_payload.load(Ordering::Relaxed);
                let same = replay(at, n - 1, n)
                    .await
                    .is_some_and(|b| b.first().is_some_and(|(_, p)| xxhash_rust::xxh3::xxh3_64(p) == last));
                if !same {
                    verdict = Seq::Restarted;
                }
            }
            None => verified = false,
        }
    }
    if broken {
        // Verified (or known lost): the view may be used again.
        sink.set_connected(t, true);
    }
    let missing = match verdict {
        Seq::Next => None,
        // What was published before the subscription began is asked for when it can be.
        Seq::First => replay_at.filter(|_| seq > 0).map(|_| 0),
        Seq::Gap { from } => {
            sink.gap(t);
            Some(from)
        }
        Seq::Restarted => {
            tracing::info!(
                pool = sink.pool.name.as_str(),
                endpoint = t.label.as_str(),
                seq,
                "the KV-event publisher started afresh (an engine restart): its view starts empty"
            );
            sink.with_index(|i| i.restart(t.id));
            if seq > 0 {
                sink.gap(t);
                Some(0)
            } else {
                None
            }
        }
    };
    if !verified {
        tracing::warn!(
            pool = sink.pool.name.as_str(),
            endpoint = t.label.as_str(),
            "the KV-event publisher reconnected and there is no replay socket to tell what was missed: the endpoint is matched approximately until its view is rebuilt"
        );
        if missing.is_none() {
            sink.gap(t);
        }
        sink.lost(t, Unknown::Gap);
    } else if let Some(from) = missing {
        let got = match replay_at {
            Some(at) => replay(at, from, seq).await,
            None => None,
        };
        let decoded: Option<Vec<(u64, Bytes, EventBatch)>> = got
            .and_then(|batches| batches.into_iter().map(|(s, p)| decode_batch(&p).ok().map(|b| (s, p, b))).collect());
        match decoded {
            Some(batches) => {
                for (s, p, b) in &batches {
                    sink.applied(t, *s, p, b);
                }
                sink.replayed(t, true);
            }
            // Lost batches at the start of a subscription are what any subscriber misses.
            None if next.is_none() => {
                if replay_at.is_some() {
                    sink.replayed(t, false);
                }
            }
            None => {
                if replay_at.is_some() {
                    sink.replayed(t, false);
                }
                tracing::warn!(
                    pool = sink.pool.name.as_str(),
                    endpoint = t.label.as_str(),
                    from,
                    to = seq,
                    "KV-event batches were lost and could not be replayed: the endpoint is matched approximately until its view is rebuilt"
                );
                sink.lost(t, Unknown::Gap);
            }
        }
    }
    match decode_batch(payload) {
        Ok(batch) => sink.applied(t, seq, payload, &batch),
        Err(e) => {
            sink.error(t);
            tracing::warn!(pool = sink.pool.name.as_str(), endpoint = t.label.as_str(), seq, error = %e,
                "a KV-event batch did not decode: the endpoint's view is rebuilt");
            t.status.next_seq.store(seq.saturating_add(1), Ordering::Relaxed);
            sink.lost(t, Unknown::Gap);
        }
    }
}

/// `tcp://host:port` with `offset` added to the port.
fn offset_endpoint(ip: std::net::IpAddr, port: u16, offset: u32) -> Option<String> {
    let port = u16::try_from(u32::from(port) + offset).ok()?;
    Some(format!("tcp://{}", SocketAddr::new(ip, port)))
}

/// Follows one endpoint's publisher (kvgate connects), until the task is aborted or the pool
/// is gone.
pub(super) async fn follow(pool: Weak<Inner>, t: FeedTarget, spec: KvEventsSpec) {
    let Some(endpoint) = spec.port.and_then(|p| offset_endpoint(t.addr.ip(), p, t.rank)) else {
        tracing::error!(endpoint = t.label.as_str(), "kv_events.port + rank is not a port: no KV events");
        return;
    };
    let replay_at = spec.replay_port.and_then(|p| offset_endpoint(t.addr.ip(), p, t.rank));
    let mut backoff = Duration::from_millis(200);
    let mut failures = 0u32;
    loop {
        let mut opts = SocketOptions::default();
        opts.connect_timeout(CONNECT_TIMEOUT);
        let mut sub = SubSocket::with_options(opts);
        let mut monitor = sub.monitor();
        let connected = sub.connect(&endpoint).await.is_ok() && sub.subscribe(&spec.topic).await.is_ok();
        let Some(sink) = Sink::of(&pool) else { return };
        if !connected {
            failures += 1;
            if failures == 3 {
                tracing::warn!(
                    pool = sink.pool.name.as_str(),
                    endpoint = t.label.as_str(),
                    publisher = endpoint.as_str(),
                    "cannot subscribe to the endpoint's KV events; retrying (matches stay approximate)"
                );
            }
            sink.check(&t);
            drop(sink);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        failures = 0;
        backoff = Duration::from_millis(200);
        // The sequence carries over a reconnect: the view is used again once the first message
        // has shown what was missed while disconnected (a gap, a restart, nothing).
        if t.status.last_seq().is_none() {
            sink.set_connected(&t, true);
        }
        drop(sink);
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                m = sub.recv() => {
                    let Some(sink) = Sink::of(&pool) else { return };
                    match m {
                        Ok(m) => handle(&sink, &t, &m.into_vec(), replay_at.as_deref()).await,
                        Err(_) => {
                            sink.set_connected(&t, false);
                            break;
                        }
                    }
                }
                e = monitor.next() => {
                    let Some(sink) = Sink::of(&pool) else { return };
                    match e {
                        // The publisher went away (an engine restart, say): subscribe afresh,
                        // with kvgate's own backoff; the sequence carries over.
                        Some(SocketEvent::Disconnected(_)) => {
                            tracing::debug!(pool = sink.pool.name.as_str(), endpoint = t.label.as_str(), "KV-event publisher disconnected");
                            sink.set_connected(&t, false);
                            break;
                        }
                        Some(_) => {}
                        None => {
                            sink.set_connected(&t, false);
                            break;
                        }
                    }
                }
                _ = tick.tick() => {
                    let Some(sink) = Sink::of(&pool) else { return };
                    sink.check(&t);
                }
            }
        }
    }
}

/// The endpoint a topic `kv@<ip:port>@<model>` (or `kv@<ip>@<model>`) names, among `targets`,
/// for a batch of data-parallel rank `rank`.
fn attribute<'a>(targets: &'a [FeedTarget], topic: &[u8], rank: Option<u32>) -> Option<&'a FeedTarget> {
    let topic = std::str::from_utf8(topic).ok()?;
    let who = topic.strip_prefix("kv@")?.split('@').next()?;
    let matches = |t: &&FeedTarget| match who.parse::<SocketAddr>() {
        Ok(a) => t.addr == a,
        Err(_) => who.parse::<std::net::IpAddr>().is_ok_and(|ip| t.addr.ip() == ip),
    };
    let candidates: Vec<&FeedTarget> = targets.iter().filter(matches).collect();
    match candidates.as_slice() {
        [one] => Some(*one),
        many => many.iter().find(|t| t.rank == rank.unwrap_or(0)).copied(),
    }
}

/// Listens on one bound SUB socket for the engines of a pool (they connect), until the task is
/// aborted or the pool is gone.
pub(super) async fn listen(pool: Weak<Inner>, spec: KvEventsSpec) {
    let Some(bind) = spec.bind.clone() else { return };
    let mut backoff = Duration::from_millis(500);
    let mut sub = loop {
        let mut sub = SubSocket::new();
        match sub.bind(&bind).await {
            Ok(_) => break sub,
            Err(e) => {
                let Some(inner) = pool.upgrade() else { return };
                tracing::error!(pool = inner.name.as_str(), bind = bind.as_str(), error = %e,
                    "cannot bind the KV-event socket; retrying (matches stay approximate)");
                drop(inner);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    };
    if sub.subscribe(&spec.topic).await.is_err() {
        return;
    }
    let mut tick = tokio::time::interval(CHECK_EVERY);
    let mut unattributed: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    let mut targets = Vec::new();
    loop {
        tokio::select! {
            m = sub.recv() => {
                let Ok(m) = m else { continue };
                let Some(sink) = Sink::of(&pool) else { return };
                let frames = m.into_vec();
                let rank = frames.get(2).and_then(|p| decode_batch(p).ok()).and_then(|b| b.dp_rank);
                let topic = frames.first().map(|t| t.to_vec()).unwrap_or_default();
                if targets.is_empty() {
                    targets = sink.pool.feed_targets();
                }
                let t = attribute(&targets, &topic, rank).cloned().or_else(|| {
                    // A member added since the last refresh.
                    targets = sink.pool.feed_targets();
                    attribute(&targets, &topic, rank).cloned()
                });
                match t {
                    Some(t) => {
                        // An engine counts as followed once its first batch has arrived.
                        if !t.status.connected() {
                            sink.set_connected(&t, true);
                        }
                        let replay_at = spec.replay_port.and_then(|p| offset_endpoint(t.addr.ip(), p, t.rank));
                        handle(&sink, &t, &frames, replay_at.as_deref()).await;
                    }
                    None if unattributed.len() < 1024 && unattributed.insert(topic.clone()) => {
                        tracing::warn!(pool = sink.pool.name.as_str(), topic = %String::from_utf8_lossy(&topic),
                            "KV events under a topic that names no endpoint of the pool (expected kv@<ip:port>@<model>): ignored");
                    }
                    None => {}
                }
            }
            _ = tick.tick() => {
                let Some(sink) = Sink::of(&pool) else { return };
                targets = sink.pool.feed_targets();
                for t in &targets {
                    sink.check(t);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
