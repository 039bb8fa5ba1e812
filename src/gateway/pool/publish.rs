//! What the member list becomes: the publisher's rebuild of the snapshot, scrape results
//! folded into the members they describe (and the ranks behind the same port), and every
//! member's status for `/debug/endpoints` and metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::health::Ejected;
use super::scrape::{self, Served};
use super::scrape_parse::{Scrape, ScrapeError};
use super::{Inner, Member, Pool, Snapshot, now_ms};
use crate::routing::endpoint::{Endpoint, EndpointStatus, Health, KvEventsStatus, LoraState, Metrics, Role};
use crate::routing::schedule::PrefixSource;

impl Pool {
    /// Status of every endpoint, for `/debug/endpoints` and metrics.
    pub fn status(&self) -> Vec<EndpointStatus> {
        let inner = &self.inner;
        let now = now_ms();
        let stale_ms = inner.settings.stale_after.as_millis() as u64;
        let st = inner.state.lock();
        st.members
            .iter()
            .map(|m| {
                let fresh = m.metrics.as_ref().filter(|x| now.saturating_sub(x.scraped_at_ms) <= stale_ms);
                let health = m.health.state(now);
                EndpointStatus {
                    address: m.addr.to_string(),
                    name: m.entry.name.clone(),
                    role: Role::of_labels(&m.entry.labels),
                    rank: m.entry.rank,
                    labels: m.entry.labels.clone(),
                    healthy: health == Health::Healthy,
                    health,
                    stale: fresh.is_none(),
                    running: fresh.map(|x| x.running),
                    waiting: fresh.map(|x| x.waiting),
                    kv_cache_usage: fresh.map(|x| x.kv_usage),
                    in_flight_requests: m.in_flight.requests(),
                    in_flight_tokens: m.in_flight.tokens(),
                    in_prefill_requests: m.in_flight.prefilling(),
                    in_decode_requests: m.in_flight.decoding(),
                    ttft_model: m.ttft.params(),
                    prefix_blocks: inner.planner.index().endpoint_blocks(m.id),
                    prefix_capacity: inner
                        .planner
                        .index()
                        .capacity(m.id)
                        .map_or(m.kv_capacity.unwrap_or(inner.planner.prefix_config().index_capacity), |(cap, _)| cap),
                    adapters: m.adapters.clone(),
                    scrape_errors: m.scrape_errors,
                    last_error: m.last_error.clone(),
                    prefix_source: inner.planner.precise().map(|p| {
                        if p.is_precise(p.index().status(m.id).as_ref(), now) {
                            PrefixSource::Precise
                        } else {
                            PrefixSource::Approximate
                        }
                    }),
                    kv_events: inner.planner.precise().map(|p| {
                        let view = p.index().status(m.id);
                        KvEventsStatus {
                            connected: m.feed.connected(),
                            last_seq: m.feed.last_seq(),
                            last_event_age_ms: view.and_then(|v| v.last_event_ms).map(|t| now.saturating_sub(t)),
                            gaps: m.feed.gaps(),
                            replays: m.feed.replays(),
                            blocks: view.map_or(0, |v| v.blocks),
                            block_size: view.and_then(|v| v.block_size),
                            engine_block_size: m.engine_block_size,
                            rebuilding: view.and_then(|v| v.rebuilding),
                            orphans: view.map_or(0, |v| v.orphans),
                        }
                    }),
                }
            })
            .collect()
    }
}

impl Inner {
    /// Rebuilds and swaps the snapshot.
    pub(super) fn publish(&self) {
        let now = now_ms();
        let st = self.state.lock();
        let mut adapters: Vec<String> = Vec::new();
        let mut bases: Vec<String> = Vec::new();
        let mut max_model_len: BTreeMap<String, u64> = BTreeMap::new();
        let endpoints = st
            .members
            .iter()
            .map(|m| {
                let mut models = m.adapters.clone();
                if let Some(l) = m.metrics.as_ref().and_then(|x| x.lora.as_ref()) {
                    models.extend(l.running.iter().chain(&l.waiting).cloned());
                }
                adapters.extend(models.iter().cloned());
                bases.extend(m.bases.iter().cloned());
                for (model, len) in &m.max_model_len {
                    let least = max_model_len.entry(model.clone()).or_insert(*len);
                    *least = (*least).min(*len);
                }
                models.extend(m.bases.iter().cloned());
                models.sort_unstable();
                models.dedup();
                Endpoint {
                    id: m.id,
                    address: m.addr,
                    name: m.entry.name.clone(),
                    role: Role::of_labels(&m.entry.labels),
                    rank: m.entry.rank,
                    rank_header: m.entry.rank_header,
                    labels: m.entry.labels.clone(),
                    models,
                    metrics: m.metrics.clone(),
                    health: m.health.state(now),
                    ejected: m.health.reason == Some(Ejected::Outlier),
                    in_flight: m.in_flight.clone(),
                    ttft: m.ttft.clone(),
                }
            })
            .collect();
        adapters.sort_unstable();
        adapters.dedup();
        bases.sort_unstable();
        bases.dedup();
        drop(st);
        // Learned models outlive their endpoints: a pool that is empty for a while (a rollout,
        // a scale to zero) still owns its models, and their requests get a 503, not a 404.
        if bases.is_empty() {
            bases.clone_from(&self.snapshot.read().models);
        }
        let snap = Arc::new(Snapshot { endpoints, adapters, models: bases, max_model_len });
        *self.snapshot.write() = snap.clone();
        // A scrape, a health change or new endpoints may have opened room for waiters.
        self.flow.published(snap);
    }

    /// Applies a scrape result to the endpoint that scraped it and to the other ranks behind
    /// the same port; returns how long the scraper waits before the next one.
    pub(super) fn on_scrape(
        &self,
        serial: u64,
        result: Result<Scrape, ScrapeError>,
        served: Option<Served>,
    ) -> Duration {
        let now = now_ms();
        let s = &self.settings;
        let mut st = self.state.lock();
        let Some(scraper) = st.members.iter().find(|m| m.serial == serial) else { return s.scrape_interval };
        let (addr, shared) = (scraper.addr, scraper.entry.rank_header);
        let served_here = |m: &Member| m.serial == serial || (shared && m.entry.rank_header && m.addr == addr);
        // A silent scrape of a server that streamed a byte since (on any of its ranks) is not
        // silence: its event loop is alive, only its metrics are slow.
        let heard = st.members.iter().filter(|m| served_here(m)).map(|m| m.in_flight.heard_ms()).max().unwrap_or(0);
        let silent = match &result {
            Err(ScrapeError::Silent { asked_ms, .. }) => heard < *asked_ms,
            _ => false,
        };
        // The next scrape comes as soon as any endpoint it serves needs one.
        let mut wait: Option<Duration> = None;
        for m in st.members.iter_mut().filter(|m| served_here(m)) {
            let engine = match &result {
                Err(e) => Err(e.clone()),
                // A rank pinned by header must be reported by its own `engine` series.
                Ok(scrape) if m.entry.rank_header => {
                    let rank = m.entry.rank.unwrap_or(0).to_string();
                    scrape.engines.get(&rank).cloned().ok_or(ScrapeError::NoEngine(rank))
                }
                Ok(scrape) => Ok(scrape.engine(m.entry.rank).cloned().unwrap_or_default()),
            };
            let explained = engine.as_ref().is_ok_and(|e| scrape::explained(e, m.in_flight.requests()));
            let interval = if explained { s.scrape_interval } else { s.fast_scrape_interval };
            match engine {
                Ok(engine) => {
                    let lora = result.as_ref().ok().and_then(|x| x.lora.clone());
                    m.metrics = Some(Metrics {
                        running: engine.running.unwrap_or(0.0) as u32,
                        waiting: engine.waiting.unwrap_or(0.0) as u32,
                        kv_usage: engine.kv_usage.unwrap_or(0.0),
                        lora: lora.map(|l| LoraState {
                            running: l.running,
                            waiting: l.waiting,
                            max_loras: l.max_loras,
                        }),
                        scraped_at_ms: now,
                    });
                    let kv_tokens = engine.block_size.zip(engine.num_gpu_blocks).map(|(bs, n)| bs.saturating_mul(n));
                    if let Some(x) = &m.metrics {
                        self.flow.observe((m.addr, m.entry.rank), x, kv_tokens, m.in_flight.requests());
                    }
                    if let (Some(bs), Some(blocks)) = (engine.block_size, engine.num_gpu_blocks) {
                        let bpt = self.planner.bytes_per_token().get();
                        let cap = self.planner.prefix_config().capacity_for_kv(blocks, bs, bpt);
                        // Resizing rebuilds the endpoint's set: only for a change over 5% (the
                        // learned bytes per token moves the figure a little with every scrape).
                        if m.kv_capacity.is_none_or(|c| c.abs_diff(cap) * 20 > c) {
                            m.kv_capacity = Some(cap);
                            self.planner.index().set_capacity(m.id, cap);
                            if let Some(p) = self.planner.precise() {
                                p.index().set_capacity(m.id, usize::try_from(blocks).unwrap_or(usize::MAX));
                            }
                        }
                    }
                    m.engine_block_size = engine.block_size;
                    self.check_block_size(m);
                    if let Some(served) = &served {
                        m.adapters.clone_from(&served.adapters);
                        m.bases.clone_from(&served.bases);
                        m.max_model_len.clone_from(&served.max_model_len);
                    }
                    m.last_error = None;
                    m.health.answered(now);
                }
                Err(e) => {
                    m.scrape_errors += 1;
                    self.telemetry.scrape_errors.with_label_values(&[self.name.as_str(), &m.addr.to_string()]).inc();
                    m.last_error = Some(e.to_string());
                    let was_healthy = m.health.state(now) == Health::Healthy;
                    if !silent {
                        m.health.unreachable(now, s);
                    } else if m.health.unresponsive(now, s) {
                        // Whatever it was sent will not be answered: the requests waiting for
                        // its answer go elsewhere, its streams end.
                        std::mem::replace(&mut m.stopped, CancellationToken::new()).cancel();
                        if was_healthy {
                            tracing::warn!(pool = self.name.as_str(), endpoint = %m.addr, error = %e, "endpoint out of rotation: it answers nothing");
                        }
                    }
                }
            }
            let mine = match (m.health.state(now), m.health.down_until) {
                (Health::Unhealthy, Some(until)) => Duration::from_millis(until.saturating_sub(now)),
                _ => scrape::next_round(interval, now),
            };
            wait = Some(wait.map_or(mine, |w| w.min(mine)));
        }
        drop(st);
        self.dirty.notify_one();
        wait.unwrap_or(s.scrape_interval)
    }
}
