//! `kvgate.v1.Cluster` (`proto/kvgate/v1/cluster.proto`): replicas following each other over
//! their gRPC listeners. The state is the gateway's ([`Cluster`]); this is its wire.
//!
//! - The **service** answers `Follow` with this replica's snapshot (in parts of at most
//!   [`PART_BLOCKS`] blocks), then every batch, until the follower goes or falls more than
//!   [`BACKLOG`] batches behind (it is cut off and follows again, from a new snapshot). It is
//!   served before the replica is ready, so replicas started together take each other's.
//! - The **syncer** takes a batch every `sync_interval_ms` and hands it to every follower; once
//!   a second it forgets peers whose lease ran out.
//! - A **follower** per peer address (the static list, and what the DNS name resolves to)
//!   follows it, applying what comes, and reconnects with a growing pause when the stream
//!   ends. A peer that turns out to be this replica is left alone.
//!
//! Every call carries the cluster token; a slow or dead peer never blocks a decision (decisions
//! only put their placements in the outbox).
//!
//! [`Cluster`]: crate::gateway::pool::cluster::Cluster

mod follow;
mod forward;
mod wire;

pub(crate) use forward::Forwarder;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::{Access, TokenFile, apply_report};
use crate::front::picker::pb::cluster_server::{Cluster as ClusterRpc, ClusterServer};
use crate::front::picker::pb::{ClusterUpdate, FollowRequest, ReportRequest, ReportResponse};
use crate::gateway::facade::Gateway;
use crate::gateway::pool::cluster::Cluster;
use crate::gateway::tasks::{Task, Tasks};
use crate::gateway::telemetry::Telemetry;

/// Blocks in one snapshot message at most (8 bytes each).
const PART_BLOCKS: usize = 64 * 1024;
/// Batches a follower may fall behind before it is cut off.
const BACKLOG: usize = 256;
/// Follow calls served at once at most (twice the peers a static list may name: a peer that
/// reconnects may briefly hold two).
const MAX_FOLLOWERS: usize = 2 * crate::gateway::config::cluster::MAX_PEERS;
/// Bound on connecting to a peer.
const CONNECT: Duration = Duration::from_secs(2);
/// How often peers' leases are checked.
const SWEEP: Duration = Duration::from_secs(1);

/// A peer's gRPC address as a channel to it: a bounded connect, and keep-alives that find a
/// peer gone without a word within about 10 s. `None` for an address that is not one.
fn peer_endpoint(address: &str) -> Option<tonic::transport::Endpoint> {
    let endpoint = tonic::transport::Channel::from_shared(format!("http://{address}")).ok()?;
    Some(
        endpoint
            .connect_timeout(CONNECT)
            .tcp_keepalive(Some(Duration::from_secs(10)))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true),
    )
}

/// The service.
#[derive(Debug, Clone)]
pub(crate) struct ClusterApi {
    gateway: Arc<Gateway>,
    cluster: Arc<Cluster>,
    updates: broadcast::Sender<Arc<ClusterUpdate>>,
    tasks: Tasks,
    telemetry: Arc<Telemetry>,
    /// Places for followers.
    followers: Arc<tokio::sync::Semaphore>,
    /// Turns true when the server stops: follow streams end.
    stop: watch::Receiver<bool>,
}

/// The service as the gRPC listener serves it: behind the token check.
pub(crate) type Service = InterceptedService<ClusterServer<ClusterApi>, Access>;

/// The cluster's service for the gRPC listener, and its syncer and followers started on
/// `tasks` (stopped when `stop` turns true or the tasks are).
pub(crate) fn start(
    gateway: Arc<Gateway>,
    cluster: Arc<Cluster>,
    telemetry: Arc<Telemetry>,
    tasks: &Tasks,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(Service, Vec<Task>, Arc<Forwarder>)> {
    let s = cluster.settings();
    let token = TokenFile::configured(s.token.as_ref(), s.token_file.as_deref(), tasks, "cluster")?
        .ok_or_else(|| anyhow::anyhow!("cluster: no token"))?;
    let (updates, _) = broadcast::channel(BACKLOG);
    let forward = Arc::new(Forwarder::new(cluster.clone(), token.clone(), telemetry.clone()));
    let api = ClusterApi {
        gateway,
        cluster: cluster.clone(),
        updates: updates.clone(),
        tasks: tasks.clone(),
        telemetry: telemetry.clone(),
        followers: Arc::new(tokio::sync::Semaphore::new(MAX_FOLLOWERS)),
        stop: stop.clone(),
    };
    let background = vec![
        tasks.spawn("cluster sync", sync(cluster.clone(), updates, telemetry.clone(), stop.clone())),
        tasks.spawn("cluster peers", follow::peers(cluster, token.clone(), telemetry, tasks.clone(), stop)),
    ];
    let server = ClusterServer::new(api).max_encoding_message_size(64 << 20).max_decoding_message_size(1 << 20);
    Ok((InterceptedService::new(server, Access::with_token(&token, "the cluster API")), background, forward))
}

/// Every `sync_interval_ms`, the outbox as one batch to every follower; every second, expired
/// leases.
async fn sync(
    cluster: Arc<Cluster>,
    updates: broadcast::Sender<Arc<ClusterUpdate>>,
    telemetry: Arc<Telemetry>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(cluster.settings().sync_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let batch = cluster.take_batch();
        // A batch of every count goes out even when empty: it renews this replica's lease.
        if updates.receiver_count() > 0 && (!batch.is_empty() || batch.full_loads) {
            let (placements, loads) =
                batch.pools.iter().fold((0, 0), |(p, l), b| (p + b.placements.len(), l + b.loads.len()));
            telemetry.cluster_sent.with_label_values(&["placements"]).inc_by(placements as u64);
            telemetry.cluster_sent.with_label_values(&["loads"]).inc_by(loads as u64);
            for part in wire::batch_parts(cluster.id(), batch) {
                let _ = updates.send(Arc::new(part));
            }
        }
        if last_sweep.elapsed() >= SWEEP {
            last_sweep = tokio::time::Instant::now();
            cluster.expire();
            telemetry.cluster_peers.set(cluster.live_peers() as i64);
        }
    }
}

type FollowStream = Pin<Box<dyn Stream<Item = Result<ClusterUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl ClusterRpc for ClusterApi {
    type FollowStream = FollowStream;

    async fn report(&self, req: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        let answer = apply_report(&self.gateway, &req.into_inner());
        self.telemetry.cluster_applied.with_label_values(&["reports"]).inc();
        answer.map(Response::new)
    }

    async fn follow(&self, req: Request<FollowRequest>) -> Result<Response<FollowStream>, Status> {
        let follower = req.into_inner().replica;
        if follower == self.cluster.id() {
            return Err(Status::failed_precondition("this is the caller's own replica"));
        }
        if !self.cluster.pools_ready() {
            return Err(Status::unavailable("this replica is still discovering its endpoints"));
        }
        // Each follower costs a snapshot and a task: a bounded number at once.
        let Ok(permit) = self.followers.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!("{MAX_FOLLOWERS} followers already follow this replica")));
        };
        // Subscribed before the snapshot is taken: nothing decided meanwhile is missed.
        let mut rx = self.updates.subscribe();
        let cluster = self.cluster.clone();
        let (tx, out) = mpsc::channel(4);
        let telemetry = self.telemetry.clone();
        let tasks = self.tasks.clone();
        let mut stop = self.stop.clone();
        self.tasks
            .spawn("cluster follower", async move {
                let _permit = permit;
                // Copying every index is long work: off the runtime's threads.
                let id = cluster.id().to_owned();
                let parts =
                    tasks.spawn_blocking("cluster snapshot", move || wire::snapshot_parts(&id, cluster.snapshot()));
                let Some(parts) = parts.await else { return };
                for part in parts {
                    telemetry.cluster_bytes.inc_by(prost::Message::encoded_len(&part) as u64);
                    if tx.send(Ok(part)).await.is_err() {
                        return;
                    }
                }
                loop {
                    let next = tokio::select! {
                        u = rx.recv() => u,
                        () = tx.closed() => return,
                        _ = stop.changed() => {
                            let _ = tx.send(Err(Status::unavailable("the replica is shutting down"))).await;
                            return;
                        }
                    };
                    match next {
                        Ok(u) => {
                            telemetry.cluster_bytes.inc_by(prost::Message::encoded_len(&*u) as u64);
                            if tx.send(Ok((*u).clone())).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            telemetry.cluster_dropped.with_label_values(&["follower_behind"]).inc();
                            let why = format!("the follower fell {n} batches behind; follow again for a new snapshot");
                            let _ = tx.send(Err(Status::resource_exhausted(why))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            })
            .detach();
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}
