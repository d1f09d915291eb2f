//! The gRPC services: `Replay` (leases, rollout ingest, batches) and `Health`.
//!
//! Handlers take the state lock only for short synchronous sections; verification and the
//! write-ahead log run on the blocking pool between [`State::admit`] and
//! [`State::commit`]. Streams watch the shutdown signal so graceful shutdown never waits
//! on an idle learner or actor.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hindsight_proto::v1::health_check_response::ServingStatus;
use hindsight_proto::v1::health_server::Health;
use hindsight_proto::v1::replay_server::Replay;
use hindsight_proto::v1::{
    AckBatchRequest, AckBatchResponse, BatchStreamRequest, HealthCheckRequest, HealthCheckResponse,
    LeaseRequest, LeaseResponse, ReleaseLeasesRequest, ReleaseLeasesResponse, RenewLeasesRequest,
    RenewLeasesResponse, ReplayStatusRequest, ReplayStatusResponse, RolloutAck, RolloutGroup,
    TrainingBatch,
};
use metrics::histogram;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, error, info};

use crate::metrics as m;
use crate::rollout::{score_group, ScoredGroup};
use crate::state::{Admission, State};
use crate::wal::{Progress, Wal};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// State shared by every handler and background task.
pub struct Shared {
    state: Mutex<State>,
    wal: Option<Arc<Mutex<Wal>>>,
    /// Bumped whenever a batch is built or acknowledged (wakes learner streams).
    changes: watch::Sender<u64>,
    shutdown: watch::Receiver<bool>,
    instance_id: String,
    started: Instant,
}

impl Shared {
    /// Wraps the state; `shutdown` turns true when the server starts draining.
    pub fn new(
        state: State,
        wal: Option<Wal>,
        instance_id: String,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(state),
            wal: wal.map(|w| Arc::new(Mutex::new(w))),
            changes: watch::channel(0).0,
            shutdown,
            instance_id,
            started: Instant::now(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Detaches the batch log at shutdown.
    pub fn take_batch_log(&self) -> Option<crate::batch_log::BatchLog> {
        self.state().take_batch_log()
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn draining(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Marks `seqs` consumed in the write-ahead log (best effort: failing only means the
    /// groups could be trained on again after a restart).
    async fn log_consumed(&self, seqs: Vec<u64>, progress: Progress) {
        let Some(wal) = self.wal.clone() else { return };
        if seqs.is_empty() {
            return;
        }
        let res =
            tokio::task::spawn_blocking(move || lock(&wal).append_consumed(&seqs, progress)).await;
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(role = "replay-server", error = %e, "cannot log consumed groups"),
            Err(e) => error!(role = "replay-server", error = %e, "write-ahead log task failed"),
        }
    }

    /// Admits, verifies, persists and stores one group; the ack or the rejection.
    async fn ingest(&self, group: RolloutGroup) -> Result<RolloutAck, Status> {
        let admission = self.state().admit(&group, now_ms())?;
        let ticket = match admission {
            Admission::Decline(ack) => return Ok(ack),
            Admission::Accept(ticket) => ticket,
        };
        let (seq, entry) = (ticket.seq, ticket.entry.clone());
        let lease_id = group.lease_id.clone();
        let wal = self.wal.clone();
        let work = tokio::task::spawn_blocking(move || -> std::io::Result<ScoredGroup> {
            let started = Instant::now();
            let scored = score_group(seq, entry, group);
            histogram!(m::VERIFY_SECONDS).record(started.elapsed().as_secs_f64());
            if let Some(wal) = wal {
                lock(&wal).append_group(seq, &scored.group)?;
            }
            Ok(scored)
        })
        .await;
        let scored = match work {
            Ok(Ok(scored)) => scored,
            Ok(Err(e)) => {
                self.state().abort(ticket);
                error!(role = "replay-server", error = %e, "cannot append to the write-ahead log");
                return Err(Status::unavailable(format!(
                    "cannot persist the group: {e}"
                )));
            }
            Err(e) => {
                self.state().abort(ticket);
                error!(role = "replay-server", error = %e, "verification task failed");
                return Err(Status::internal("verification failed"));
            }
        };
        let (dropped, progress) = {
            let mut state = self.state();
            let dropped = state.commit(ticket, scored, now_ms());
            (dropped, state.progress())
        };
        self.notify();
        self.log_consumed(dropped, progress).await;
        Ok(RolloutAck {
            lease_id,
            accepted: true,
            reason: String::new(),
        })
    }
}

/// The `Replay` service.
#[derive(Clone)]
pub struct ReplayService {
    shared: Arc<Shared>,
}

impl ReplayService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Replay for ReplayService {
    async fn lease_prompts(
        &self,
        request: Request<LeaseRequest>,
    ) -> Result<Response<LeaseResponse>, Status> {
        let req = request.into_inner();
        if self.shared.draining() {
            return Err(Status::unavailable("replay server is shutting down"));
        }
        let resp = self.shared.state().lease(&req, now_ms())?;
        debug!(role = "replay-server", actor_id = %req.actor_id, policy_version = req.policy_version,
            leased = resp.prompts.len(), "lease");
        Ok(Response::new(resp))
    }

    async fn renew_leases(
        &self,
        request: Request<RenewLeasesRequest>,
    ) -> Result<Response<RenewLeasesResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.shared.state().renew(&req, now_ms())))
    }

    async fn release_leases(
        &self,
        request: Request<ReleaseLeasesRequest>,
    ) -> Result<Response<ReleaseLeasesResponse>, Status> {
        let req = request.into_inner();
        let resp = self.shared.state().release(&req);
        info!(role = "replay-server", actor_id = %req.actor_id, released = resp.released, "leases released");
        Ok(Response::new(resp))
    }

    type StreamRolloutsStream = ReceiverStream<Result<RolloutAck, Status>>;

    async fn stream_rollouts(
        &self,
        request: Request<Streaming<RolloutGroup>>,
    ) -> Result<Response<Self::StreamRolloutsStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut shutdown = shared.shutdown.clone();
            loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = shutting_down(&mut shutdown) => {
                        let _ = tx.send(Err(Status::unavailable("replay server is shutting down"))).await;
                        break;
                    }
                };
                match next {
                    Ok(Some(group)) => match shared.ingest(group).await {
                        Ok(ack) => {
                            if tx.send(Ok(ack)).await.is_err() {
                                break;
                            }
                        }
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(status) => {
                        debug!(role = "replay-server", %status, "rollout stream broke");
                        break;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type StreamBatchesStream = BoxStream<TrainingBatch>;

    async fn stream_batches(
        &self,
        request: Request<BatchStreamRequest>,
    ) -> Result<Response<Self::StreamBatchesStream>, Status> {
        let req = request.into_inner();
        info!(role = "replay-server", learner_id = %req.learner_id, rank = req.rank, "learner connected");
        let (tx, rx) = mpsc::channel::<Result<TrainingBatch, Status>>(1);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut changes = shared.changes.subscribe();
            let mut shutdown = shared.shutdown.clone();
            let mut last_sent: Option<u64> = None;
            loop {
                changes.borrow_and_update();
                let next = shared.state().next_batch(last_sent);
                if let Some(batch) = next {
                    let id = batch.batch_id;
                    if tx.send(Ok(batch)).await.is_err() {
                        break;
                    }
                    debug!(role = "replay-server", learner_id = %req.learner_id, batch_id = id, "batch sent");
                    last_sent = Some(id);
                    continue;
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                    _ = shutting_down(&mut shutdown) => {
                        let _ = tx.send(Err(Status::unavailable("replay server is shutting down"))).await;
                        break;
                    }
                }
            }
            info!(role = "replay-server", learner_id = %req.learner_id, "learner stream ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack_batch(
        &self,
        request: Request<AckBatchRequest>,
    ) -> Result<Response<AckBatchResponse>, Status> {
        let req = request.into_inner();
        let outcome = self.shared.state().ack_batch(&req)?;
        self.shared.notify();
        self.shared
            .log_consumed(outcome.consumed, outcome.progress)
            .await;
        Ok(Response::new(AckBatchResponse {}))
    }

    async fn status(
        &self,
        _request: Request<ReplayStatusRequest>,
    ) -> Result<Response<ReplayStatusResponse>, Status> {
        Ok(Response::new(self.shared.state().status(now_ms())))
    }
}

/// The `Health` service.
#[derive(Clone)]
pub struct HealthService {
    shared: Arc<Shared>,
}

impl HealthService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let (policy_version, details) = {
            let state = self.shared.state();
            (state.newest_version(), state.details())
        };
        let status = if self.shared.draining() {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
            role: "replay-server".into(),
            instance_id: self.shared.instance_id.clone(),
            build_version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.shared.started.elapsed().as_millis() as u64,
            policy_version,
            details,
        }))
    }
}

/// Resolves once the server starts draining (the watch guard never lives across an await).
async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&down| down).await;
}

/// Re-queues expired leases and refreshes the actor gauge until shutdown.
pub async fn reaper(shared: Arc<Shared>, lease_timeout_ms: u64) {
    let period = Duration::from_millis((lease_timeout_ms / 4).clamp(10, 1000));
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutting_down(&mut shutdown) => break,
        }
        let now = now_ms();
        let mut state = shared.state();
        let expired = state.reap(now);
        state.publish_actor_gauge(now);
        drop(state);
        if expired > 0 {
            debug!(
                role = "replay-server",
                expired, "reaper re-queued expired leases"
            );
        }
    }
}
