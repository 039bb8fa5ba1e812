//! The gRPC health service beside ext_proc: `""` and `liveness` are serving while the process
//! runs; `readiness` and the services of the gRPC listener (ext_proc and `kvgate.v1.Picker`)
//! follow the gateway's readiness, set before the listener answers its first check. The loop
//! that keeps them current is returned to the caller to own, and holds the gateway only weakly,
//! so it never keeps a stopped gateway alive.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::SERVICE_NAME as EXT_PROC_SERVICE;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

use crate::front::picker::pb::picker_server::SERVICE_NAME as PICKER_SERVICE;
use crate::gateway::facade::Gateway;

/// The names whose status is the gateway's readiness: the listener's services as health checks
/// ask for them, and the name the reference picker's Helm chart probes.
const FOLLOW_READINESS: [&str; 4] = ["readiness", EXT_PROC_SERVICE, PICKER_SERVICE, "inference-extension"];

/// How often readiness is looked at.
const READINESS_POLL: Duration = Duration::from_millis(200);

/// The health service, and the loop (to spawn and own) that keeps its readiness current; the
/// loop ends when the gateway is dropped.
pub(crate) async fn health_service(
    gateway: &Arc<Gateway>,
) -> (HealthServer<impl Health>, impl Future<Output = ()> + Send + 'static) {
    let (reporter, service) = tonic_health::server::health_reporter();
    for name in ["", "liveness"] {
        reporter.set_service_status(name, ServingStatus::Serving).await;
    }
    let mut last = gateway.ready();
    set_readiness(&reporter, last).await;
    let gateway: Weak<Gateway> = Arc::downgrade(gateway);
    let follow = async move {
        loop {
            tokio::time::sleep(READINESS_POLL).await;
            let Some(ready) = gateway.upgrade().map(|g| g.ready()) else { return };
            if ready != last {
                set_readiness(&reporter, ready).await;
                last = ready;
            }
        }
    };
    (service, follow)
}

async fn set_readiness(reporter: &HealthReporter, ready: bool) {
    let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
    for name in FOLLOW_READINESS {
        reporter.set_service_status(name, status).await;
    }
}
