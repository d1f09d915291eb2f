//! The gRPC service `Replay` (leases, rollout ingest, exactly-once batch service) and the one
//! mapping of domain errors to gRPC status codes.
//!
//! Handlers take the state lock only for short synchronous sections. Verification runs on
//! the blocking pool, log writes go to the write-ahead log's writer thread (group commit), and
//! batch assembly (reading groups back from the log) runs in the batch stream's task: none of
//! it under the lock that acks need. Records whose order matters in the log are handed to the
//! writer while the lock is held; the wait for their fsync happens after it is released.
//! Streams watch the shutdown signal so graceful shutdown never waits on an idle client.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hindsight_proto::v1::replay_server::Replay;
use hindsight_proto::v1::{
    AckBatchRequest, AckBatchResponse, BatchStreamRequest, CommitBatchesRequest,
    CommitBatchesResponse, LeaseRequest, LeaseResponse, RegisterLearnerRequest,
    RegisterLearnerResponse, ReleaseLeasesRequest, ReleaseLeasesResponse, RenewLeasesRequest,
    RenewLeasesResponse, ReplayStatusRequest, ReplayStatusResponse, RolloutAck, RolloutGroup,
    TrainingBatch,
};
use metrics::{counter, histogram};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, error, info, warn, Instrument as _};

use crate::batch_log::{BatchLog, LoggedBatch};
use crate::batches::assemble_from_log;
use crate::codec::PromptCodec;
use crate::config::Reward;
use crate::error::{shown, ReplayError};
use crate::metrics as m;
use crate::rollout::score_group;
use crate::state::{Admission, NextBatch, State, WaitingGroup, MAX_ID_BYTES, MAX_PREFETCH};
use crate::wal::{BatchRecord, Entry, GroupRecord, Wal};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl From<ReplayError> for Status {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::Invalid(why) => Status::invalid_argument(why),
            ReplayError::Conflict(why) => Status::failed_precondition(why),
            ReplayError::Full {
                reason,
                retry_after_ms,
            } => {
                let mut status =
                    Status::resource_exhausted(format!("{reason}; retry in {retry_after_ms} ms"));
                if let Ok(v) = retry_after_ms.to_string().parse() {
                    status.metadata_mut().insert("retry-after-ms", v);
                }
                status
            }
            ReplayError::Unavailable(why) => Status::unavailable(why),
            e @ ReplayError::ModelMismatch { .. } => Status::failed_precondition(e.to_string()),
        }
    }
}

/// Counts a refused request by RPC and converts the error.
fn refused(rpc: &'static str, e: ReplayError) -> Status {
    counter!(m::REQUESTS_REFUSED_TOTAL, "rpc" => rpc).increment(1);
    Status::from(e)
}

/// State shared by every handler and background task.
pub struct Shared {
    state: Mutex<State>,
    wal: Wal,
    codec: Arc<dyn PromptCodec>,
    temperature: f32,
    /// What an original sample's reward is (`--reward`).
    reward: Reward,
    batch_log: Option<BatchLog>,
    /// Batches up to this id are in the batch log already (re-served ones are not logged twice).
    batch_logged_through: AtomicU64,
    /// Bumped whenever batches may be sendable (wakes learner streams).
    changes: watch::Sender<u64>,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// Wraps the state; `shutdown` turns true when the server starts draining.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: State,
        wal: Wal,
        codec: Arc<dyn PromptCodec>,
        temperature: f32,
        reward: Reward,
        batch_log: Option<(BatchLog, u64)>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let (batch_log, logged) = match batch_log {
            Some((log, through)) => (Some(log), through),
            None => (None, 0),
        };
        Arc::new(Self {
            state: Mutex::new(state),
            wal,
            codec,
            temperature,
            reward,
            batch_log,
            batch_logged_through: AtomicU64::new(logged),
            changes: watch::channel(0).0,
            shutdown,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn draining(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Refuses a caller whose model fingerprint differs from ours. An empty one (a client
    /// that states none, e.g. an older peer or a status tool) is not checked, and neither is
    /// anything when the codec has no fingerprint (test codecs).
    fn check_model(&self, rpc: &'static str, theirs: &str) -> Result<(), Status> {
        let ours = self.codec.model_fingerprint();
        if theirs.is_empty() || ours.is_empty() || theirs == ours {
            return Ok(());
        }
        warn!(rpc, ours, theirs = %shown(theirs), "refused: model fingerprint mismatch");
        Err(refused(
            rpc,
            ReplayError::ModelMismatch {
                ours: ours.to_owned(),
                theirs: if theirs.len() <= 80 {
                    theirs.to_owned()
                } else {
                    shown(theirs)
                },
            },
        ))
    }

    /// Admits, verifies, persists and indexes one group; the ack or the rejection.
    async fn ingest(&self, group: RolloutGroup) -> Result<RolloutAck, Status> {
        let started = Instant::now();
        self.check_model("StreamRollouts", &group.model_fingerprint)?;
        let admission = self
            .state()
            .admit(&group, now_ms())
            .map_err(|e| refused("StreamRollouts", e))?;
        let ticket = match admission {
            Admission::Decline(ack) => return Ok(ack),
            Admission::Accept(ticket) => ticket,
        };
        let (seq, entry) = (ticket.seq, ticket.entry.clone());
        let codec = self.codec.clone();
        let verified = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let scores = score_group(&entry, &group, codec.as_ref());
            histogram!(m::VERIFY_SECONDS).record(started.elapsed().as_secs_f64());
            (scores, group)
        })
        .await;
        let (scores, group) = match verified {
            Ok(v) => v,
            Err(e) => {
                self.state().abort(ticket);
                error!(error = %e, "verification task failed");
                return Err(Status::internal("verification failed"));
            }
        };
        let (lease_id, actor_id, policy_version) = (
            group.lease_id.clone(),
            group.actor_id.clone(),
            group.policy_version,
        );
        let record = Entry::Group(GroupRecord {
            seq,
            prompt_index: ticket.entry.index as u32,
            group: Some(group),
        });
        let location = match self.wal.write(vec![record]).await {
            Ok(locations) if locations.len() == 1 => locations[0],
            Ok(_) => {
                self.state().abort(ticket);
                return Err(Status::internal("the write-ahead log answered oddly"));
            }
            Err(e) => {
                self.state().abort(ticket);
                error!(error = %e, "cannot append to the write-ahead log");
                return Err(Status::unavailable(format!(
                    "cannot persist the group: {e}"
                )));
            }
        };
        let waiting = WaitingGroup {
            seq,
            entry: ticket.entry.clone(),
            location,
            policy_version,
            scores,
        };
        self.state().commit(ticket, waiting, &actor_id, now_ms());
        self.notify();
        histogram!(m::INGEST_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(RolloutAck {
            lease_id,
            accepted: true,
            reason: String::new(),
            group_seq: seq,
        })
    }

    /// Writes a newly served batch to the batch log (once per batch id).
    fn log_batch(&self, batch: TrainingBatch, texts: Vec<Vec<String>>) -> TrainingBatch {
        let id = batch.batch_id;
        if self.batch_logged_through.fetch_max(id, Ordering::SeqCst) >= id {
            return batch;
        }
        if let Some(stats) = &batch.stats {
            self.state().record_assembled(stats);
            info!(
                batch_id = id,
                step = batch.step,
                lambda = stats.lambda,
                originals = stats.original_samples,
                replays = stats.replay_samples,
                shortfall = stats.replay_shortfall,
                success_rate = stats.success_rate,
                mean_cla = stats.mean_constraint_accuracy,
                "batch built"
            );
        }
        match &self.batch_log {
            Some(log) => {
                let logged = LoggedBatch { batch, texts };
                log.write(&logged);
                logged.batch
            }
            None => batch,
        }
    }

    /// Serves batches after `trained_through` to a learner stream until it breaks.
    async fn serve_batches(
        self: Arc<Self>,
        incarnation: String,
        trained_through: u64,
        prefetch: u32,
        tx: mpsc::Sender<Result<TrainingBatch, Status>>,
    ) {
        let mut changes = self.changes.subscribe();
        let mut shutdown = self.shutdown.clone();
        let mut sent_through = trained_through;
        loop {
            changes.borrow_and_update();
            // Every batch the prefetch window allows now: their compositions share one fsync.
            let (ready, failure) = {
                let mut state = self.state();
                let mut log_now = Vec::new();
                let mut ready = Vec::new();
                let mut cursor = sent_through;
                let failure = loop {
                    match state.next_batch(&incarnation, cursor, prefetch, &mut log_now) {
                        Ok(NextBatch::Send {
                            record,
                            groups,
                            durable,
                        }) => {
                            cursor = record.batch_id;
                            ready.push((record, groups, durable));
                        }
                        Ok(NextBatch::Wait) => break None,
                        Err(e) => break Some(e),
                    }
                };
                if !log_now.is_empty() {
                    // Stale drops: ordered with the state change, durable with the next fsync.
                    drop(self.wal.submit(log_now));
                }
                (ready, failure)
            };
            if ready.is_empty() {
                if let Some(e) = failure {
                    let _ = tx.send(Err(Status::from(e))).await;
                    break;
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                    _ = shutting_down(&mut shutdown) => {
                        let _ = tx.send(Err(Status::unavailable("replay server is shutting down"))).await;
                        break;
                    }
                }
                continue;
            }
            // The compositions are durable before the batches leave: a restart serves the
            // same batches under the same ids.
            let compositions: Vec<Entry> = ready
                .iter()
                .filter(|(_, _, durable)| !durable)
                .map(|(record, _, _)| Entry::Batch(record.clone()))
                .collect();
            if !compositions.is_empty() {
                if let Err(e) = self.wal.write(compositions).await {
                    error!(error = %e, "cannot log batch compositions");
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "cannot persist batch compositions: {e}"
                        ))))
                        .await;
                    break;
                }
                let mut state = self.state();
                for (record, _, _) in &ready {
                    state.batch_durable(record.batch_id);
                }
            }
            let mut broken = false;
            for (record, groups, _) in ready {
                match self.send_batch(&incarnation, record, groups, &tx).await {
                    Some(id) => sent_through = id,
                    None => {
                        broken = true;
                        break;
                    }
                }
            }
            if broken {
                break;
            }
        }
    }

    /// Reads one decided batch back, logs it, sends it. `None` when the stream is over.
    async fn send_batch(
        self: &Arc<Self>,
        incarnation: &str,
        record: BatchRecord,
        groups: Vec<WaitingGroup>,
        tx: &mpsc::Sender<Result<TrainingBatch, Status>>,
    ) -> Option<u64> {
        let id = record.batch_id;
        {
            let shared = self.clone();
            let assembled = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let served = assemble_from_log(
                    shared.wal.dir(),
                    &shared.codec,
                    &record,
                    &groups,
                    shared.temperature,
                    shared.reward,
                );
                histogram!(m::ASSEMBLE_SECONDS).record(started.elapsed().as_secs_f64());
                // Logged before it is sent, so the record survives a crash right after.
                served.map(|s| shared.log_batch(s.batch, s.texts))
            })
            .await;
            let batch = match assembled {
                Ok(Ok(batch)) => batch,
                Ok(Err(e)) => {
                    error!(error = %e, batch_id = id, "cannot read a batch back from the log");
                    let _ = tx
                        .send(Err(Status::internal(format!(
                            "cannot read batch {id}: {e}"
                        ))))
                        .await;
                    return None;
                }
                Err(e) => {
                    error!(error = %e, "batch assembly task failed");
                    let _ = tx
                        .send(Err(Status::internal("batch assembly failed")))
                        .await;
                    return None;
                }
            };
            self.state().sent(incarnation, id);
            if tx.send(Ok(batch)).await.is_err() {
                return None;
            }
            debug!(batch_id = id, "batch sent");
            Some(id)
        }
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
        self.shared
            .check_model("LeasePrompts", &req.model_fingerprint)?;
        let mut resp = {
            let mut state = self.shared.state();
            let resp = state
                .lease(&req, now_ms())
                .map_err(|e| refused("LeasePrompts", e))?;
            // The queue's position, durable with the next fsync (a lost one only means a
            // prompt generated twice after a crash, never a group lost or trained twice).
            drop(self.shared.wal.submit(vec![state.queue_record()]));
            resp
        };
        resp.model_fingerprint = self.shared.codec.model_fingerprint().to_owned();
        debug!(actor_id = %shown(&req.actor_id), policy_version = req.policy_version,
            leased = resp.prompts.len(), "lease");
        Ok(Response::new(resp))
    }

    async fn renew_leases(
        &self,
        request: Request<RenewLeasesRequest>,
    ) -> Result<Response<RenewLeasesResponse>, Status> {
        let req = request.into_inner();
        let resp = self
            .shared
            .state()
            .renew(&req, now_ms())
            .map_err(|e| refused("RenewLeases", e))?;
        Ok(Response::new(resp))
    }

    async fn release_leases(
        &self,
        request: Request<ReleaseLeasesRequest>,
    ) -> Result<Response<ReleaseLeasesResponse>, Status> {
        let req = request.into_inner();
        let resp = self
            .shared
            .state()
            .release(&req)
            .map_err(|e| refused("ReleaseLeases", e))?;
        info!(actor_id = %shown(&req.actor_id), released = resp.released, "leases released");
        self.shared.notify();
        Ok(Response::new(resp))
    }

    type StreamRolloutsStream = ReceiverStream<Result<RolloutAck, Status>>;

    async fn stream_rollouts(
        &self,
        request: Request<Streaming<RolloutGroup>>,
    ) -> Result<Response<Self::StreamRolloutsStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
        tokio::spawn(
            async move {
                let mut shutdown = shared.shutdown.clone();
                // Groups of one stream are verified concurrently but acked in order.
                let mut pending = std::collections::VecDeque::new();
                loop {
                    let next = tokio::select! {
                        biased;
                        done = async { pending.front_mut().expect("pending").await }, if !pending.is_empty() => {
                            pending.pop_front();
                            match done {
                                Ok(Ok(ack)) => {
                                    if tx.send(Ok(ack)).await.is_err() {
                                        break;
                                    }
                                }
                                Ok(Err(status)) => {
                                    let _ = tx.send(Err(status)).await;
                                    break;
                                }
                                Err(e) => {
                                    error!(error = %e, "ingest task failed");
                                    let _ = tx.send(Err(Status::internal("ingest failed"))).await;
                                    break;
                                }
                            }
                            continue;
                        }
                        next = inbound.message(), if pending.len() < 32 => next,
                        _ = shutting_down(&mut shutdown) => {
                            let _ = tx.send(Err(Status::unavailable("replay server is shutting down"))).await;
                            break;
                        }
                    };
                    match next {
                        Ok(Some(group)) => {
                            let shared = shared.clone();
                            let task: tokio::task::JoinHandle<Result<RolloutAck, Status>> =
                                tokio::spawn(async move { shared.ingest(group).await });
                            pending.push_back(task);
                        }
                        Ok(None) => {
                            // Answer what is in flight, then end the stream.
                            while let Some(task) = pending.pop_front() {
                                let answer = match task.await {
                                    Ok(a) => a,
                                    Err(_) => Err(Status::internal("ingest failed")),
                                };
                                let failed = answer.is_err();
                                if tx.send(answer).await.is_err() || failed {
                                    break;
                                }
                            }
                            break;
                        }
                        Err(status) => {
                            // Undecodable or over-limit frames: say so, do not end with OK.
                            warn!(code = ?status.code(), message = %status.message(), "rollout stream refused a message");
                            counter!(m::REQUESTS_REFUSED_TOTAL, "rpc" => "StreamRollouts").increment(1);
                            let code = match status.code() {
                                tonic::Code::Internal | tonic::Code::Unknown => tonic::Code::InvalidArgument,
                                other => other,
                            };
                            let _ = tx
                                .send(Err(Status::new(code, format!("bad rollout stream message: {}", status.message()))))
                                .await;
                            break;
                        }
                    }
                }
            }
            .in_current_span(),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type StreamBatchesStream = BoxStream<TrainingBatch>;

    async fn stream_batches(
        &self,
        request: Request<BatchStreamRequest>,
    ) -> Result<Response<Self::StreamBatchesStream>, Status> {
        let req = request.into_inner();
        if req.learner_id.len() > MAX_ID_BYTES || req.incarnation.len() > MAX_ID_BYTES {
            return Err(refused(
                "StreamBatches",
                ReplayError::Invalid("learner_id or incarnation is too long".into()),
            ));
        }
        if self.shared.draining() {
            return Err(Status::unavailable("replay server is shutting down"));
        }
        let prefetch = match req.prefetch {
            0 => 2,
            p => p.min(MAX_PREFETCH),
        };
        self.shared
            .state()
            .open_stream(&req.incarnation, req.trained_through_batch_id)
            .map_err(|e| refused("StreamBatches", e))?;
        info!(learner_id = %shown(&req.learner_id), rank = req.rank, trained_through = req.trained_through_batch_id,
            prefetch, "learner stream opened");
        let (tx, rx) = mpsc::channel::<Result<TrainingBatch, Status>>(prefetch as usize);
        let shared = self.shared.clone();
        let learner_id = shown(&req.learner_id);
        tokio::spawn(
            async move {
                shared
                    .serve_batches(req.incarnation, req.trained_through_batch_id, prefetch, tx)
                    .await;
                info!(learner_id = %learner_id, "learner stream ended");
            }
            .in_current_span(),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack_batch(
        &self,
        request: Request<AckBatchRequest>,
    ) -> Result<Response<AckBatchResponse>, Status> {
        let req = request.into_inner();
        {
            let mut state = self.shared.state();
            state.ack_batch(&req).map_err(|e| refused("AckBatch", e))?;
            drop(self.shared.wal.submit(vec![state.counters_record()]));
        }
        self.shared.notify();
        Ok(Response::new(AckBatchResponse {}))
    }

    async fn register_learner(
        &self,
        request: Request<RegisterLearnerRequest>,
    ) -> Result<Response<RegisterLearnerResponse>, Status> {
        let req = request.into_inner();
        self.shared
            .check_model("RegisterLearner", &req.model_fingerprint)?;
        let incarnation = format!("{:016x}", rand::random::<u64>());
        let (resp, log) = self
            .shared
            .state()
            .register_learner(&req, incarnation)
            .map_err(|e| refused("RegisterLearner", e))?;
        // The version counter and the orphans are durable before the learner publishes.
        self.shared.wal.write(log).await.map_err(|e| {
            error!(error = %e, "cannot log a learner registration");
            Status::unavailable(format!("cannot persist the registration: {e}"))
        })?;
        self.shared.notify();
        Ok(Response::new(resp))
    }

    async fn commit_batches(
        &self,
        request: Request<CommitBatchesRequest>,
    ) -> Result<Response<CommitBatchesResponse>, Status> {
        let req = request.into_inner();
        let record = self
            .shared
            .state()
            .commit_batches(&req)
            .map_err(|e| refused("CommitBatches", e))?;
        if let Some(record) = record {
            self.shared.wal.write(vec![record]).await.map_err(|e| {
                error!(error = %e, "cannot log a commit");
                Status::unavailable(format!("cannot persist the commit: {e}"))
            })?;
            self.shared.state().apply_commit(req.through_batch_id);
            info!(
                through = req.through_batch_id,
                "batches committed by a learner checkpoint"
            );
            self.shared.notify();
        }
        let committed = self
            .shared
            .state()
            .status(now_ms())
            .committed_through_batch_id;
        Ok(Response::new(CommitBatchesResponse {
            committed_through_batch_id: committed,
        }))
    }

    async fn status(
        &self,
        _request: Request<ReplayStatusRequest>,
    ) -> Result<Response<ReplayStatusResponse>, Status> {
        Ok(Response::new(self.shared.state().status(now_ms())))
    }
}

/// Resolves once the server starts draining (the watch guard never lives across an await).
async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&down| down).await;
}

/// Re-queues expired leases and refreshes the gauges until shutdown.
pub async fn reaper(shared: Arc<Shared>) {
    let lease_timeout_ms = shared.state().lease_timeout_ms();
    let period = Duration::from_millis((lease_timeout_ms / 4).clamp(10, 1000));
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutting_down(&mut shutdown) => break,
        }
        let now = now_ms();
        let expired = {
            let mut state = shared.state();
            let expired = state.reap(now);
            state.publish_actor_gauge(now);
            expired
        };
        if expired > 0 {
            debug!(expired, "reaper re-queued expired leases");
            shared.notify();
        }
    }
}
