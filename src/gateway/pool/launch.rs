//! Pools from a resolved config: each pool's planner (with the precise index when it follows
//! KV events) and its discovery task (static, file, DNS, or an InferencePool through one API
//! client shared by every such pool). Their tasks are spawned through the caller's owner; the
//! caller also holds the discovery tasks' handles, and dropping them stops discovery.

use std::path::Path;
use std::sync::Arc;

use super::{Pool, PoolSettings, discovery, kubernetes};
use crate::gateway::config::ResolvedPool;
use crate::gateway::tasks::{Task, Tasks};
use crate::gateway::telemetry::Telemetry;
use crate::routing::plan::{Planner, PrecisePrefix};
use crate::routing::prefix::precise::PreciseIndex;

/// The pools of a config, started.
#[derive(Debug)]
pub struct Launched {
    /// In config order.
    pub pools: Vec<Pool>,
    /// Their discovery tasks.
    pub tasks: Vec<Task>,
}

/// Builds and starts every pool of `resolved`; `kubeconfig` is read only when a pool follows an
/// InferencePool (see [`kubernetes::client`] for the default). Each pool's config warnings are
/// logged here. Every task of the pools is spawned through `owner`.
pub async fn launch(
    resolved: Vec<ResolvedPool>,
    settings: &PoolSettings,
    telemetry: &Arc<Telemetry>,
    kubeconfig: Option<&Path>,
    owner: &Tasks,
) -> anyhow::Result<Launched> {
    let kube = if resolved.iter().any(|p| p.inference_pool.is_some()) {
        Some(kubernetes::client(kubeconfig).await?)
    } else {
        None
    };
    let stale_ms = settings.stale_after.as_millis() as u64;
    let mut out = Launched { pools: Vec::new(), tasks: Vec::new() };
    for rp in resolved {
        let kind = rp.source_kind();
        for w in &rp.warnings {
            tracing::warn!(pool = rp.name.as_str(), "config warning: {w}");
        }
        let mut planner = Planner::new(rp.models, rp.scheduler, stale_ms);
        let kv_events = rp.precise.as_ref().map(|p| p.kv_events.clone());
        if let Some(p) = rp.precise {
            tracing::info!(pool = rp.name.as_str(), tokenizer = %p.tokenizer_dir.display(), "prefix matches from KV events");
            let index = PreciseIndex::default();
            planner =
                planner.with_precise(PrecisePrefix::new(p.tokenizer, index, p.kv_events.stale_after_ms, p.block_size));
        }
        let pool = Pool::new(rp.name, planner, rp.admission, settings.clone(), telemetry.clone(), owner);
        if rp.flow.enabled {
            tracing::info!(
                pool = pool.name(),
                "flow control on: requests wait in kvgate while the endpoints are saturated"
            );
        }
        pool.flow().configure(rp.flow, rp.objectives);
        if let Some(spec) = kv_events {
            pool.follow_kv_events(spec);
        }
        let task = match (&rp.inference_pool, &kube) {
            (Some(r), Some((client, namespace))) => {
                let target = kubernetes::Target::new(r, namespace);
                tracing::info!(pool = pool.name(), inference_pool = %target.describe(), "endpoints from Kubernetes");
                owner.spawn("kubernetes discovery", kubernetes::run(pool.clone(), client.clone(), target))
            }
            _ => {
                let max_bytes = rp.endpoints_file_max_bytes;
                let file = rp.endpoints_file.map(|path| discovery::WatchedFile { path, max_bytes });
                owner.spawn("discovery", discovery::run(pool.clone(), kind, rp.endpoints, file, owner.clone()))
            }
        };
        out.tasks.push(task);
        out.pools.push(pool);
    }
    Ok(out)
}
