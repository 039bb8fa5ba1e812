//! The ext_proc stream handling run on untrusted message sequences, over a gateway without
//! endpoints (the fuzz target's entry point, and the unit tests' gateway).

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;

use super::StreamState;
use crate::gateway::config::ExtProcConfig;
use crate::gateway::facade::Gateway;

/// A gateway with one pool of no endpoints: enough for the stream handling to run every path
/// (refusals included) on untrusted messages.
pub(super) fn endpointless_gateway() -> Arc<Gateway> {
    use crate::gateway::config::Admission;
    use crate::gateway::pool::{Pool, PoolSettings};
    use crate::gateway::telemetry::Telemetry;
    use crate::routing::plan::Planner;
    use crate::routing::schedule::Scheduler;
    let telemetry = Arc::new(Telemetry::new());
    let planner = Planner::new(vec!["m".into()], Scheduler::default_config(), 2000);
    // The pool's publisher ends with the pool; nothing here shuts its owner down.
    let owner = crate::gateway::tasks::Tasks::new();
    let pool = Pool::new("p".into(), planner, Admission::default(), PoolSettings::default(), telemetry.clone(), &owner);
    Arc::new(Gateway::new(vec![pool], 1 << 16, 1 << 20, telemetry))
}

/// Handles `msgs` on one stream, over an endpoint-less gateway (one per thread, made once: each
/// stream is new, as each request's is).
pub(crate) fn fuzz(msgs: Vec<ProcessingRequest>) {
    thread_local! {
        static RT: tokio::runtime::Runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        static GATEWAY: std::cell::OnceCell<Arc<Gateway>> = const { std::cell::OnceCell::new() };
    }
    RT.with(|rt| {
        rt.block_on(async {
            let gateway = GATEWAY.with(|g| g.get_or_init(endpointless_gateway).clone());
            let (tx, _rx) = tokio::sync::mpsc::channel(64);
            let mut stream = StreamState::new(gateway, Arc::new(ExtProcConfig::default()));
            for m in msgs {
                let _ = stream.handle_and_route(m, &tx).await;
                if stream.done {
                    break;
                }
            }
        });
    });
}
