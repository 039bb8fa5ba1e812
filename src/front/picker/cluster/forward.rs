//! Reports for decisions a peer made, sent on to it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tonic::Status;
use tonic::transport::Channel;

use crate::front::picker::TokenFile;
use crate::front::picker::pb::cluster_client::ClusterClient;
use crate::front::picker::pb::{ReportRequest, ReportResponse};
use crate::gateway::decisions::Decisions;
use crate::gateway::pool::cluster::Cluster;
use crate::gateway::telemetry::Telemetry;

/// Bound on one forwarded report.
const WITHIN: Duration = Duration::from_secs(5);

/// Sends reports on to the replica whose decision they are about.
#[derive(Debug)]
pub(crate) struct Forwarder {
    cluster: Arc<Cluster>,
    token: TokenFile,
    telemetry: Arc<Telemetry>,
    /// A client per peer address (connected on first use, reconnecting by itself).
    clients: Mutex<HashMap<String, ClusterClient<Channel>>>,
}

impl Forwarder {
    pub(super) fn new(cluster: Arc<Cluster>, token: TokenFile, telemetry: Arc<Telemetry>) -> Self {
        Self { cluster, token, telemetry, clients: Mutex::new(HashMap::new()) }
    }

    /// The owner's answer to `req`, when the decision is a live peer's (its id's first part
    /// names the replica); `None` when it is this replica's or no peer's.
    pub(crate) async fn report(&self, req: &ReportRequest) -> Option<Result<ReportResponse, Status>> {
        let owner = Decisions::replica_of(&req.decision_id)?;
        if owner == self.cluster.id() {
            return None;
        }
        let address = self.cluster.peer_address(owner)?;
        let mut client = self.client(&address)?;
        let mut call = tonic::Request::new(req.clone());
        call.set_timeout(WITHIN);
        if let Some(v) = self.token.bearer() {
            call.metadata_mut().insert("authorization", v);
        }
        let answer = tokio::time::timeout(WITHIN, client.report(call)).await;
        let answered = match &answer {
            Ok(Ok(_)) => true,
            Ok(Err(s)) => !matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unauthenticated),
            Err(_) => false,
        };
        if answered {
            self.telemetry.cluster_sent.with_label_values(&["reports"]).inc();
        } else {
            self.telemetry.cluster_dropped.with_label_values(&["owner_unreachable"]).inc();
        }
        Some(match answer {
            Ok(Ok(r)) => Ok(r.into_inner()),
            // The owner's own verdict on the report (not found, already over, implausible).
            Ok(Err(s)) if s.code() != tonic::Code::Unavailable && s.code() != tonic::Code::Unauthenticated => Err(s),
            Ok(Err(s)) => Err(Status::unavailable(format!(
                "decision {} was made by replica {owner}, which could not take the report: {}",
                req.decision_id,
                s.message()
            ))),
            Err(_) => Err(Status::unavailable(format!(
                "decision {} was made by replica {owner}, which did not answer within {WITHIN:?}",
                req.decision_id
            ))),
        })
    }

    fn client(&self, address: &str) -> Option<ClusterClient<Channel>> {
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(address) {
            return Some(c.clone());
        }
        let c = ClusterClient::new(super::peer_endpoint(address)?.connect_lazy());
        clients.insert(address.to_owned(), c.clone());
        Some(c)
    }
}
