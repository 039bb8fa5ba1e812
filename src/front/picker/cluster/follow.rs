//! Following peers: one task per peer address, from the static list and the DNS name.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::wire;
use crate::front::picker::TokenFile;
use crate::front::picker::pb::FollowRequest;
use crate::front::picker::pb::cluster_client::ClusterClient;
use crate::gateway::pool::cluster::Cluster;
use crate::gateway::tasks::{Task, Tasks};
use crate::gateway::telemetry::Telemetry;

/// The first pause before following a peer again; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(2);
/// Bound on one lookup of the peers' DNS name.
const LOOKUP: Duration = Duration::from_secs(5);
/// The largest message a peer may send (a snapshot part is about 0.5 MiB).
const MAX_MESSAGE: usize = 16 << 20;

/// How one attempt to follow a peer ended.
enum Ended {
    /// The peer is this replica.
    Itself,
    /// Unreachable, refused, or its stream ended; whether a snapshot had come.
    Lost { joined: bool },
}

/// Follows every peer the settings name (looking the DNS name up again as it says) until `stop`.
pub(super) async fn peers(
    cluster: Arc<Cluster>,
    token: TokenFile,
    telemetry: Arc<Telemetry>,
    tasks: Tasks,
    mut stop: watch::Receiver<bool>,
) {
    let s = cluster.settings().clone();
    let mut following: HashMap<String, Task> = HashMap::new();
    let (tried_tx, mut tried_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut first_round: Option<BTreeSet<String>> = None;
    // What the DNS name last resolved to: a failed lookup keeps it.
    let mut resolved: Option<BTreeSet<String>> = None;
    // Until this replica knows its own endpoints, nothing a peer says could be matched to them.
    while !cluster.pools_ready() {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stop.changed() => return,
        }
    }
    loop {
        let mut addresses: BTreeSet<String> = s.peers.iter().cloned().collect();
        if let Some(name) = &s.dns {
            let lookup = tokio::time::timeout(LOOKUP, tokio::net::lookup_host(name.as_str()));
            let found = tokio::select! {
                r = lookup => r,
                _ = stop.changed() => return,
            };
            match found {
                Ok(Ok(found)) => resolved = Some(found.map(|a| a.to_string()).collect()),
                Ok(Err(e)) => {
                    tracing::warn!(name = %name, error = %e, "cluster: looking up the peers' DNS name failed")
                }
                Err(_) => tracing::warn!(name = %name, "cluster: looking up the peers' DNS name timed out"),
            }
            match &resolved {
                Some(r) => addresses.extend(r.iter().cloned()),
                // No answer yet: the first round waits for one.
                None if s.peers.is_empty() => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(s.dns_interval_ms.min(1000))) => continue,
                        _ = stop.changed() => return,
                    }
                }
                None => {}
            }
        }
        following.retain(|a, _| addresses.contains(a));
        for a in &addresses {
            if !following.contains_key(a) {
                let run = one(cluster.clone(), a.clone(), token.clone(), telemetry.clone(), tried_tx.clone());
                following.insert(a.clone(), tasks.spawn("cluster peer", run));
            }
        }
        let round = first_round.get_or_insert_with(|| addresses.clone());
        if round.is_empty() {
            cluster.tried_all();
        }
        // A static list does not change: only a DNS name is looked up again.
        let wait =
            if s.dns.is_some() { Duration::from_millis(s.dns_interval_ms) } else { Duration::from_secs(1 << 30) };
        let next = tokio::time::sleep(wait);
        tokio::pin!(next);
        loop {
            tokio::select! {
                () = &mut next => break,
                Some(a) = tried_rx.recv() => {
                    if let Some(r) = first_round.as_mut() {
                        r.remove(&a);
                        if r.is_empty() {
                            cluster.tried_all();
                        }
                    }
                }
                _ = stop.changed() => return,
            }
        }
    }
}

/// Follows the peer at `address` for as long as it is not this replica, reconnecting with a
/// growing pause; says on `tried` when the first attempt ended or brought a snapshot.
async fn one(
    cluster: Arc<Cluster>,
    address: String,
    token: TokenFile,
    telemetry: Arc<Telemetry>,
    tried: tokio::sync::mpsc::UnboundedSender<String>,
) {
    let mut pause = FIRST_PAUSE;
    loop {
        let started = Instant::now();
        let ended = attempt(&cluster, &address, &token, &telemetry, &tried).await;
        let _ = tried.send(address.clone());
        match ended {
            Ended::Itself => return,
            Ended::Lost { joined } => {
                if joined || started.elapsed() > MAX_PAUSE * 5 {
                    pause = FIRST_PAUSE;
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// One `Follow` call to `address`, applied until it ends.
async fn attempt(
    cluster: &Cluster,
    address: &str,
    token: &TokenFile,
    telemetry: &Telemetry,
    tried: &tokio::sync::mpsc::UnboundedSender<String>,
) -> Ended {
    let lost = |joined| Ended::Lost { joined };
    let Some(endpoint) = super::peer_endpoint(address) else {
        tracing::warn!(peer = %address, "cluster: not a usable peer address");
        return Ended::Itself;
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(peer = %address, error = %e, "cluster: peer unreachable");
            return lost(false);
        }
    };
    let mut client = ClusterClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let mut req = tonic::Request::new(FollowRequest { replica: cluster.id().to_owned() });
    if let Some(v) = token.bearer() {
        req.metadata_mut().insert("authorization", v);
    }
    let started = Instant::now();
    let mut stream = match client.follow(req).await {
        Ok(s) => s.into_inner(),
        Err(s) if s.code() == tonic::Code::FailedPrecondition => return Ended::Itself,
        Err(s) => {
            tracing::warn!(peer = %address, code = ?s.code(), message = s.message(), "cluster: the peer refused to be followed");
            return lost(false);
        }
    };
    let mut joined = false;
    // The peer's id, as its first message says: a stream is one replica's.
    let mut peer: Option<String> = None;
    loop {
        match stream.message().await {
            Ok(Some(u)) => {
                let replica = peer.get_or_insert_with(|| u.replica.clone()).clone();
                if u.replica != replica || replica == cluster.id() {
                    tracing::warn!(peer = %address, "cluster: a peer's stream changed replica id; following it again");
                    return lost(joined);
                }
                let done = u.snapshot_done;
                let (batch, lag) = wire::batch(u);
                let (placed, counted) = cluster.apply(&replica, address, &batch, lag);
                telemetry.cluster_applied.with_label_values(&["placements"]).inc_by(placed);
                telemetry.cluster_applied.with_label_values(&["loads"]).inc_by(counted);
                if joined {
                    telemetry.cluster_lag.observe(lag as f64 / 1000.0);
                }
                if done && !joined {
                    joined = true;
                    cluster.joined_from(&replica);
                    telemetry.cluster_snapshot.observe(started.elapsed().as_secs_f64());
                    let _ = tried.send(address.to_owned());
                    tracing::info!(peer = %address, replica = %replica, took_ms = started.elapsed().as_millis() as u64, "cluster: took a peer's snapshot");
                }
            }
            Ok(None) => return lost(joined),
            Err(s) => {
                tracing::debug!(peer = %address, code = ?s.code(), message = s.message(), "cluster: a peer's stream ended");
                return lost(joined);
            }
        }
    }
}
