//! The gRPC health service beside ext_proc: `""` and `liveness` are serving while the process
//! runs; `readiness` and the ext_proc service follow the gateway's readiness. The loop that
//! keeps them current is returned to the caller to own, and holds the gateway only weakly, so
//! it never keeps a stopped gateway alive.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::gateway::facade::Gateway;

/// The ext_proc service's name, as health checks ask for it.
const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

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
    let gateway: Weak<Gateway> = Arc::downgrade(gateway);
    let follow = async move {
        let mut last = None;
        loop {
            let Some(ready) = gateway.upgrade().map(|g| g.ready()) else { return };
            if last != Some(ready) {
                let s = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
                reporter.set_service_status("readiness", s).await;
                reporter.set_service_status(EXT_PROC_SERVICE, s).await;
                // The name the reference picker's Helm chart probes.
                reporter.set_service_status("inference-extension", s).await;
                last = Some(ready);
            }
            tokio::time::sleep(READINESS_POLL).await;
        }
    };
    (service, follow)
}
