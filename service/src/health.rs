//! Health of a process, one answer for every probe.
//!
//! - [`GrpcHealth`]: the standard gRPC health service (`grpc.health.v1.Health`, served by
//!   `tonic-health`) of one gRPC server, with an entry per service name plus the `""` entry
//!   for the whole server. Every entry starts `NOT_SERVING`; a role calls
//!   [`GrpcHealth::serving`] once it is really ready and [`GrpcHealth::draining`] when it
//!   starts shutting down.
//! - The process readiness ([`set_ready`], [`set_not_ready`], [`readiness`]): what the HTTP
//!   `/readyz` of the metrics port answers. [`GrpcHealth`] keeps it in step with its gRPC
//!   entries; a role without a gRPC server (the actor) sets it itself.
//!
//! Health is open to every caller (probes carry no token; see [`crate::default_policy`]) but,
//! like every method, travels over TLS when the server has TLS on.

use std::borrow::Cow;
use std::sync::Mutex;

use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// Why the process is not ready, or `None` when it is. A process starts not ready.
static NOT_READY: Mutex<Option<Cow<'static, str>>> = Mutex::new(Some(Cow::Borrowed("starting")));

fn not_ready() -> std::sync::MutexGuard<'static, Option<Cow<'static, str>>> {
    NOT_READY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks the whole process ready (`/readyz` answers 200).
pub fn set_ready() {
    *not_ready() = None;
}

/// Marks the process not ready, saying why (`/readyz` answers 503 with `reason`).
pub fn set_not_ready(reason: &str) {
    *not_ready() = Some(Cow::Owned(reason.to_owned()));
}

/// `Ok(())` when the process is ready, else why not ("starting" until a role says otherwise).
pub fn readiness() -> Result<(), String> {
    match &*not_ready() {
        None => Ok(()),
        Some(why) => Err(why.to_string()),
    }
}

/// The `grpc.health.v1.Health` service of one gRPC server and the handle that moves its
/// entries between `NOT_SERVING` and `SERVING`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct GrpcHealth {
    reporter: HealthReporter,
    services: Vec<&'static str>,
}

impl GrpcHealth {
    /// A health service with an entry for each of `services` (fully qualified gRPC service
    /// names, e.g. `hindsight.v1.Replay`) and the overall `""` entry, all `NOT_SERVING`.
    /// Add the returned server to the tonic server next to the services it reports on.
    pub async fn new(services: &[&'static str]) -> (Self, HealthServer<HealthService>) {
        let reporter = HealthReporter::new();
        let health = GrpcHealth {
            reporter: reporter.clone(),
            services: services.to_vec(),
        };
        health.set(ServingStatus::NotServing).await;
        let server = HealthServer::new(HealthService::from_health_reporter(reporter));
        (health, server)
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for s in &self.services {
            self.reporter.set_service_status(s, status).await;
        }
    }

    /// Every entry `SERVING`; the process is ready.
    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
        set_ready();
    }

    /// Every entry `NOT_SERVING` again (shutting down); the process is not ready.
    pub async fn draining(&self) {
        self.set(ServingStatus::NotServing).await;
        set_not_ready("draining");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::health_server::Health;
    use tonic_health::pb::HealthCheckRequest;

    async fn check(server: &HealthService, service: &str) -> Result<i32, tonic::Code> {
        server
            .check(tonic::Request::new(HealthCheckRequest {
                service: service.into(),
            }))
            .await
            .map(|r| r.into_inner().status)
            .map_err(|s| s.code())
    }

    #[tokio::test]
    async fn entries_start_not_serving_and_follow_the_handle() {
        let reporter = {
            let (health, _server) = GrpcHealth::new(&["a.B"]).await;
            health
        };
        let service = HealthService::from_health_reporter(reporter.reporter.clone());
        let not = ServingStatus::NotServing as i32;
        let yes = ServingStatus::Serving as i32;
        assert_eq!(check(&service, "").await, Ok(not));
        assert_eq!(check(&service, "a.B").await, Ok(not));
        assert_eq!(
            check(&service, "other.Service").await,
            Err(tonic::Code::NotFound)
        );
        reporter.serving().await;
        assert_eq!(check(&service, "").await, Ok(yes));
        assert_eq!(check(&service, "a.B").await, Ok(yes));
        assert_eq!(readiness(), Ok(()));
        reporter.draining().await;
        assert_eq!(check(&service, "").await, Ok(not));
        assert_eq!(check(&service, "a.B").await, Ok(not));
        assert_eq!(readiness(), Err("draining".into()));
    }
}
