//! The replay server's state machine: prompt leases, accepted groups, built batches.
//!
//! Everything here is synchronous and lives behind one `std::sync::Mutex` in the service;
//! each method is one short critical section and never blocks on I/O (verification and
//! the write-ahead log run outside the lock, between [`State::admit`] and
//! [`State::commit`]). Batches are built eagerly, at most `max_buffered_batches` ahead of
//! the learner's acknowledgements, in FIFO order of the accepted groups.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use hindsight_constraints::hir;
use hindsight_proto::v1::{
    AckBatchRequest, ActorInfo, LeaseRequest, LeaseResponse, Prompt, ReleaseLeasesRequest,
    ReleaseLeasesResponse, RenewLeasesRequest, RenewLeasesResponse, ReplayStatusResponse,
    RolloutAck, RolloutGroup, SamplingConfig, TrainingBatch,
};
use metrics::{counter, gauge};
use tonic::Status;

use crate::assembly::{assemble, WindowParams};
use crate::batch_log::{BatchLog, LoggedBatch};
use crate::codec::PromptCodec;
use crate::config::{Hindsight, ReplayArgs};
use crate::metrics as m;
use crate::prompts::{PromptEntry, PromptQueue, PromptSet};
use crate::rollout::{score_group, validate_group, Limits, ScoredGroup};
use crate::wal::Progress;

/// How long an actor told to back off should wait.
pub const RETRY_AFTER_MS: u64 = 500;
/// Most prompts handed out by one LeasePrompts call.
pub const MAX_PROMPTS_PER_LEASE: usize = 1024;
/// Retired lease ids remembered (to answer late groups politely).
const RETIRED_LEASES_KEPT: usize = 65_536;
/// Acknowledged batch ids remembered (a repeated AckBatch is not an error).
const ACKED_BATCHES_KEPT: usize = 1024;

/// Settings the state machine needs, derived once from [`ReplayArgs`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub hindsight: Hindsight,
    /// Responses an actor generates per prompt (m, or n with hindsight off).
    pub responses: usize,
    /// K replays per batch.
    pub replays: usize,
    pub prompts_per_batch: usize,
    pub max_buffered_batches: usize,
    pub lease_timeout_ms: u64,
    pub max_staleness: u64,
    pub lambda0: f64,
    pub eta: f64,
    pub seed: u64,
    pub sampling: SamplingConfig,
}

impl Settings {
    /// The settings of `args`.
    pub fn from_args(args: &ReplayArgs) -> Self {
        Self {
            hindsight: args.hindsight,
            responses: args.actor_responses() as usize,
            replays: args.replays_per_batch(),
            prompts_per_batch: args.prompts_per_batch as usize,
            max_buffered_batches: args.max_buffered_batches as usize,
            lease_timeout_ms: args.lease_timeout_ms,
            max_staleness: args.max_staleness,
            lambda0: args.lambda0,
            eta: args.eta,
            seed: args.seed,
            sampling: SamplingConfig {
                temperature: args.temperature,
                top_p: args.top_p,
                max_new_tokens: args.max_new_tokens,
                responses_per_prompt: args.actor_responses(),
            },
        }
    }
}

/// A prompt handed to an actor.
#[derive(Debug, Clone)]
pub struct Lease {
    pub prompt: usize,
    pub actor_id: String,
    pub deadline_ms: u64,
}

/// What became of a lease that is no longer active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retired {
    Expired,
    Released,
    Committing,
    Completed,
    Stale,
}

/// Bounded memory of retired lease ids.
#[derive(Debug, Default)]
struct RetiredLeases {
    map: HashMap<String, (usize, Retired)>,
    order: VecDeque<String>,
}

impl RetiredLeases {
    fn insert(&mut self, lease_id: String, prompt: usize, how: Retired) {
        if self.map.insert(lease_id.clone(), (prompt, how)).is_none() {
            self.order.push_back(lease_id);
            while self.order.len() > RETIRED_LEASES_KEPT {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn get(&self, lease_id: &str) -> Option<(usize, Retired)> {
        self.map.get(lease_id).copied()
    }
}

/// A batch built and not yet acknowledged.
#[derive(Debug, Clone)]
pub struct BuiltBatch {
    pub batch: TrainingBatch,
    /// Sequence numbers of the groups in it.
    pub group_seqs: Vec<u64>,
}

#[derive(Debug, Clone, Default)]
struct ActorRecord {
    policy_version: u64,
    last_seen_ms: u64,
    groups_accepted: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    leases_expired: u64,
    groups_accepted: u64,
    groups_rejected: u64,
    batches_built: u64,
    batches_acked: u64,
    replays_emitted: u64,
}

/// Permission to commit a valid group: its lease is reserved and a sequence number given.
#[derive(Debug)]
pub struct Ticket {
    pub seq: u64,
    pub entry: Arc<PromptEntry>,
    lease_id: String,
    lease: Lease,
}

/// The verdict of [`State::admit`] on a valid group.
#[derive(Debug)]
pub enum Admission {
    /// Verify it, log it, then [`State::commit`] (or [`State::abort`]).
    Accept(Ticket),
    /// Valid but not taken (expired lease, stale, duplicate): ack and move on.
    Decline(RolloutAck),
}

/// Result of an AckBatch.
#[derive(Debug, Clone)]
pub struct AckOutcome {
    /// Groups trained on, plus groups dropped as stale while building the next batches.
    pub consumed: Vec<u64>,
    pub progress: Progress,
}

/// The whole mutable state of the replay server.
pub struct State {
    settings: Settings,
    prompts: Arc<PromptSet>,
    codec: Arc<dyn PromptCodec>,
    queue: PromptQueue,
    instance: String,
    lease_counter: u64,
    leases: HashMap<String, Lease>,
    retired: RetiredLeases,
    committing: usize,
    next_seq: u64,
    waiting: VecDeque<ScoredGroup>,
    unacked: VecDeque<BuiltBatch>,
    acked_recent: VecDeque<u64>,
    next_batch_id: u64,
    learner_step: u64,
    policy_version: u64,
    newest_version: u64,
    actors: BTreeMap<String, ActorRecord>,
    counters: Counters,
    batch_log: Option<BatchLog>,
}

/// Longest actor id a request may carry.
pub const MAX_ACTOR_ID_BYTES: usize = 256;

fn actor_label(actor_id: &str) -> &str {
    if actor_id.is_empty() {
        "anonymous"
    } else {
        actor_id
    }
}

impl State {
    /// A fresh state. `instance` prefixes lease ids (unique per server incarnation);
    /// `progress` / `next_seq` come from the write-ahead log when there is one.
    pub fn new(
        settings: Settings,
        prompts: Arc<PromptSet>,
        codec: Arc<dyn PromptCodec>,
        instance: String,
        progress: Progress,
        next_seq: u64,
    ) -> Self {
        let queue = PromptQueue::new(prompts.len(), settings.seed);
        Self {
            settings,
            prompts,
            codec,
            queue,
            instance,
            lease_counter: 0,
            leases: HashMap::new(),
            retired: RetiredLeases::default(),
            committing: 0,
            next_seq,
            waiting: VecDeque::new(),
            unacked: VecDeque::new(),
            acked_recent: VecDeque::new(),
            next_batch_id: progress.next_batch_id.max(1),
            learner_step: progress.learner_step,
            policy_version: progress.policy_version,
            newest_version: progress.policy_version,
            actors: BTreeMap::new(),
            counters: Counters::default(),
            batch_log: None,
        }
    }

    /// Logs every batch built from now on to `log`.
    pub fn set_batch_log(&mut self, log: BatchLog) {
        self.batch_log = Some(log);
    }

    /// Detaches the batch log (the caller closes it outside the lock).
    pub fn take_batch_log(&mut self) -> Option<BatchLog> {
        self.batch_log.take()
    }

    /// The learner progress to persist.
    pub fn progress(&self) -> Progress {
        Progress {
            learner_step: self.learner_step,
            policy_version: self.policy_version,
            next_batch_id: self.next_batch_id,
        }
    }

    /// Newest policy version known (learner acks and actor reports).
    pub fn newest_version(&self) -> u64 {
        self.newest_version
    }

    /// Puts a group recovered from the write-ahead log back into the waiting queue.
    /// Errors (record gone, wrong size) mean the group is dropped; the caller marks it
    /// consumed.
    pub fn restore_group(&mut self, seq: u64, group: RolloutGroup) -> Result<(), String> {
        let Some(entry) = self.prompts.by_id(&group.prompt_id).cloned() else {
            return Err(format!(
                "prompt {:?} is not in the prompt set any more",
                group.prompt_id
            ));
        };
        if group.responses.len() != self.settings.responses {
            return Err(format!(
                "group has {} responses, the server now expects {}",
                group.responses.len(),
                self.settings.responses
            ));
        }
        self.next_seq = self.next_seq.max(seq + 1);
        self.newest_version = self.newest_version.max(group.policy_version);
        let scored = score_group(seq, entry, group);
        let at = self.waiting.partition_point(|g| g.seq < seq);
        self.waiting.insert(at, scored);
        self.counters.groups_accepted += 1;
        Ok(())
    }

    fn touch_actor(&mut self, actor_id: &str, version: u64, now_ms: u64) {
        let label = actor_label(actor_id);
        let rec = self.actors.entry(label.to_owned()).or_default();
        rec.policy_version = rec.policy_version.max(version);
        rec.last_seen_ms = now_ms;
        gauge!(m::ACTOR_POLICY_VERSION, "actor" => label.to_owned()).set(rec.policy_version as f64);
    }

    /// Work buffered between actors and learner, in prompts.
    fn buffered(&self) -> usize {
        self.waiting.len()
            + self.committing
            + self.leases.len()
            + self.unacked.len() * self.settings.prompts_per_batch
    }

    fn capacity(&self) -> usize {
        self.settings.max_buffered_batches * self.settings.prompts_per_batch
    }

    /// LeasePrompts: up to `max_prompts` prompts, or none (back-pressure).
    pub fn lease(&mut self, req: &LeaseRequest, now_ms: u64) -> Result<LeaseResponse, Status> {
        // Validate before touching anything: a bad request changes nothing.
        if req.actor_id.len() > MAX_ACTOR_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "actor_id is {} bytes long; at most {MAX_ACTOR_ID_BYTES} are allowed",
                req.actor_id.len()
            )));
        }
        // The version an actor reports is trusted: after a restart without a data directory the
        // server learns the current version from its actors before the learner's next ack.
        self.reap(now_ms);
        let actor = actor_label(&req.actor_id).to_owned();
        self.touch_actor(&actor, req.policy_version, now_ms);
        self.newest_version = self.newest_version.max(req.policy_version);
        let room = self.capacity().saturating_sub(self.buffered());
        let count = (req.max_prompts as usize)
            .min(room)
            .min(MAX_PROMPTS_PER_LEASE);
        let deadline_ms = now_ms.saturating_add(self.settings.lease_timeout_ms);
        let mut prompts = Vec::with_capacity(count);
        for _ in 0..count {
            let Some(index) = self.queue.pop() else { break };
            let Some(entry) = self.prompts.get(index) else {
                break;
            };
            self.lease_counter += 1;
            let lease_id = format!("{}-{}", self.instance, self.lease_counter);
            self.leases.insert(
                lease_id.clone(),
                Lease {
                    prompt: index,
                    actor_id: actor.clone(),
                    deadline_ms,
                },
            );
            prompts.push(Prompt {
                prompt_id: entry.id.clone(),
                lease_id,
                instruction: entry.instruction.clone(),
                prompt_token_ids: entry.prompt_token_ids.clone(),
            });
        }
        let retry_after_ms = if prompts.is_empty() {
            RETRY_AFTER_MS
        } else {
            0
        };
        self.publish_gauges();
        Ok(LeaseResponse {
            prompts,
            lease_deadline_unix_ms: deadline_ms,
            sampling: Some(self.settings.sampling),
            retry_after_ms,
            latest_policy_version: self.newest_version,
        })
    }

    /// RenewLeases: pushes the deadline of the named active leases.
    pub fn renew(&mut self, req: &RenewLeasesRequest, now_ms: u64) -> RenewLeasesResponse {
        self.reap(now_ms);
        let actor = req.actor_id.clone();
        self.touch_actor(&actor, 0, now_ms);
        let deadline_ms = now_ms.saturating_add(self.settings.lease_timeout_ms);
        let mut unknown_lease_ids = Vec::new();
        for id in &req.lease_ids {
            match self.leases.get_mut(id) {
                Some(lease) => lease.deadline_ms = deadline_ms,
                None => unknown_lease_ids.push(id.clone()),
            }
        }
        RenewLeasesResponse {
            lease_deadline_unix_ms: deadline_ms,
            unknown_lease_ids,
        }
    }

    /// ReleaseLeases: gives the named leases back; their prompts are re-queued first.
    pub fn release(&mut self, req: &ReleaseLeasesRequest) -> ReleaseLeasesResponse {
        let mut released = 0;
        for id in &req.lease_ids {
            if let Some(lease) = self.leases.remove(id) {
                self.queue.requeue(lease.prompt);
                self.retired
                    .insert(id.clone(), lease.prompt, Retired::Released);
                released += 1;
            }
        }
        self.publish_gauges();
        ReleaseLeasesResponse { released }
    }

    /// Re-queues the prompts of leases past their deadline. Returns how many expired.
    pub fn reap(&mut self, now_ms: u64) -> usize {
        let expired: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline_ms <= now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if let Some(lease) = self.leases.remove(id) {
                tracing::info!(role = "replay-server", lease_id = %id, actor_id = %lease.actor_id, "lease expired; prompt re-queued");
                self.queue.requeue(lease.prompt);
                self.retired
                    .insert(id.clone(), lease.prompt, Retired::Expired);
            }
        }
        if !expired.is_empty() {
            self.counters.leases_expired += expired.len() as u64;
            counter!(m::LEASES_EXPIRED_TOTAL).increment(expired.len() as u64);
            self.publish_gauges();
        }
        expired.len()
    }

    fn decline(&mut self, group: &RolloutGroup, result: &'static str, reason: String) -> Admission {
        self.counters.groups_rejected += 1;
        counter!(m::ROLLOUT_GROUPS_TOTAL, "result" => result).increment(1);
        tracing::info!(role = "replay-server", actor_id = %group.actor_id, policy_version = group.policy_version,
            lease_id = %group.lease_id, %reason, "rollout group not accepted");
        Admission::Decline(RolloutAck {
            lease_id: group.lease_id.clone(),
            accepted: false,
            reason,
        })
    }

    fn invalid(&mut self, group: &RolloutGroup, reason: String) -> Status {
        self.counters.groups_rejected += 1;
        counter!(m::ROLLOUT_GROUPS_TOTAL, "result" => "invalid").increment(1);
        tracing::warn!(role = "replay-server", actor_id = %group.actor_id, policy_version = group.policy_version,
            lease_id = %group.lease_id, %reason, "invalid rollout group");
        Status::invalid_argument(reason)
    }

    fn is_foreign_lease(&self, lease_id: &str) -> bool {
        match lease_id.split_once('-') {
            Some((inst, n)) => {
                inst != self.instance
                    && inst.len() == self.instance.len()
                    && inst.bytes().all(|b| b.is_ascii_hexdigit())
                    && !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_digit())
            }
            None => false,
        }
    }

    /// Validates a group completely, then decides: accept (the lease is reserved), decline
    /// (valid but late / stale / duplicate) or reject (`INVALID_ARGUMENT`, nothing changed
    /// but the rejection counter).
    pub fn admit(&mut self, group: &RolloutGroup, now_ms: u64) -> Result<Admission, Status> {
        let limits = Limits {
            responses: self.settings.responses,
            vocab_size: self.codec.vocab_size(),
            max_tokens: self.settings.sampling.max_new_tokens as usize + 1,
            newest_version: self.newest_version,
        };
        if let Err(reason) = validate_group(group, &limits) {
            return Err(self.invalid(group, reason));
        }
        let Some(entry) = self.prompts.by_id(&group.prompt_id).cloned() else {
            return Err(self.invalid(group, format!("unknown prompt_id {:?}", group.prompt_id)));
        };
        self.reap(now_ms);
        let lease_id = group.lease_id.as_str();
        let lease = if let Some(lease) = self.leases.get(lease_id) {
            if lease.prompt != entry.index {
                let leased = self
                    .prompts
                    .get(lease.prompt)
                    .map(|e| e.id.clone())
                    .unwrap_or_default();
                return Err(self.invalid(
                    group,
                    format!(
                        "lease {lease_id:?} was issued for prompt {leased:?}, not {:?}",
                        group.prompt_id
                    ),
                ));
            }
            lease.clone()
        } else if let Some((prompt, how)) = self.retired.get(lease_id) {
            if prompt != entry.index {
                let leased = self
                    .prompts
                    .get(prompt)
                    .map(|e| e.id.clone())
                    .unwrap_or_default();
                return Err(self.invalid(
                    group,
                    format!(
                        "lease {lease_id:?} was issued for prompt {leased:?}, not {:?}",
                        group.prompt_id
                    ),
                ));
            }
            match how {
                // Late, but nobody took the prompt since: rescue the work.
                Retired::Expired | Retired::Released if self.queue.take(prompt) => Lease {
                    prompt,
                    actor_id: actor_label(&group.actor_id).to_owned(),
                    deadline_ms: now_ms,
                },
                Retired::Expired => {
                    return Ok(self.decline(group, "expired", "lease expired".into()))
                }
                Retired::Released => {
                    return Ok(self.decline(group, "expired", "lease released".into()))
                }
                Retired::Stale => {
                    return Ok(self.decline(group, "stale", "group too stale".into()))
                }
                Retired::Committing => {
                    return Ok(self.decline(
                        group,
                        "duplicate",
                        "duplicate: group is being committed".into(),
                    ))
                }
                Retired::Completed => {
                    counter!(m::ROLLOUT_GROUPS_TOTAL, "result" => "duplicate").increment(1);
                    return Ok(Admission::Decline(RolloutAck {
                        lease_id: group.lease_id.clone(),
                        accepted: true,
                        reason: "duplicate: group already accepted".into(),
                    }));
                }
            }
        } else if self.is_foreign_lease(lease_id) {
            return Ok(self.decline(
                group,
                "expired",
                "lease unknown to this server instance (restarted)".into(),
            ));
        } else {
            return Err(self.invalid(group, format!("unknown lease_id {lease_id:?}")));
        };

        // Valid and ours. Too stale to ever be trained on?
        self.leases.remove(lease_id);
        self.touch_actor(&group.actor_id, group.policy_version, now_ms);
        if group
            .policy_version
            .saturating_add(self.settings.max_staleness)
            < self.policy_version
        {
            self.queue.requeue(entry.index);
            self.retired
                .insert(lease_id.to_owned(), entry.index, Retired::Stale);
            counter!(m::GROUPS_STALE_TOTAL).increment(1);
            self.publish_gauges();
            let reason = format!(
                "stale: generated by policy version {}, learner is at {} (max staleness {})",
                group.policy_version, self.policy_version, self.settings.max_staleness
            );
            return Ok(self.decline(group, "stale", reason));
        }
        self.retired
            .insert(lease_id.to_owned(), entry.index, Retired::Committing);
        self.committing += 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(Admission::Accept(Ticket {
            seq,
            entry,
            lease_id: lease_id.to_owned(),
            lease,
        }))
    }

    /// Stores a verified (and logged) group and builds whatever batches are now complete.
    /// Returns groups dropped as stale while building (to mark consumed in the log).
    pub fn commit(&mut self, ticket: Ticket, scored: ScoredGroup, now_ms: u64) -> Vec<u64> {
        self.committing = self.committing.saturating_sub(1);
        self.retired
            .insert(ticket.lease_id, ticket.lease.prompt, Retired::Completed);
        let actor = actor_label(&scored.group.actor_id).to_owned();
        let rec = self.actors.entry(actor.clone()).or_default();
        rec.groups_accepted += 1;
        rec.last_seen_ms = now_ms;
        self.counters.groups_accepted += 1;
        counter!(m::ROLLOUT_GROUPS_TOTAL, "result" => "accepted").increment(1);
        counter!(m::RESPONSES_TOTAL).increment(scored.scores.len() as u64);
        for score in &scored.scores {
            for (id, ok) in scored.entry.instruction_ids.iter().zip(&score.verdicts) {
                let result = if *ok { "pass" } else { "fail" };
                counter!(m::VERIFICATIONS_TOTAL, "instruction_id" => id.clone(), "result" => result).increment(1);
            }
        }
        tracing::debug!(role = "replay-server", actor_id = %actor, policy_version = scored.group.policy_version,
            prompt_id = %scored.entry.id, seq = scored.seq, "rollout group accepted");
        let at = self.waiting.partition_point(|g| g.seq < scored.seq);
        self.waiting.insert(at, scored);
        let dropped = self.build_batches();
        self.publish_gauges();
        dropped
    }

    /// Gives the lease back after a failed commit (the log could not be written).
    pub fn abort(&mut self, ticket: Ticket) {
        self.committing = self.committing.saturating_sub(1);
        self.retired.map.remove(&ticket.lease_id);
        self.leases.insert(ticket.lease_id, ticket.lease);
    }

    /// Builds batches from complete windows while fewer than `max_buffered_batches` are
    /// unacknowledged. Groups past the staleness bound are dropped first (their prompts
    /// re-queued); their sequence numbers are returned.
    pub fn build_batches(&mut self) -> Vec<u64> {
        let mut dropped = Vec::new();
        while self.unacked.len() < self.settings.max_buffered_batches {
            let learner_version = self.policy_version;
            let max_staleness = self.settings.max_staleness;
            let mut kept = VecDeque::with_capacity(self.waiting.len());
            for g in self.waiting.drain(..) {
                if g.group.policy_version.saturating_add(max_staleness) < learner_version {
                    tracing::info!(role = "replay-server", actor_id = %g.group.actor_id, policy_version = g.group.policy_version,
                        learner_version, prompt_id = %g.entry.id, "dropping a stale group; prompt re-queued");
                    counter!(m::GROUPS_STALE_TOTAL).increment(1);
                    self.queue.requeue(g.entry.index);
                    dropped.push(g.seq);
                } else {
                    kept.push_back(g);
                }
            }
            self.waiting = kept;
            let p = self.settings.prompts_per_batch;
            if self.waiting.len() < p {
                break;
            }
            let window: Vec<ScoredGroup> = self.waiting.drain(..p).collect();
            let step = self.learner_step + 1 + self.unacked.len() as u64;
            let lambda = hir::lambda(step, self.settings.lambda0, self.settings.eta);
            let params = WindowParams {
                replays: self.settings.replays,
                step,
                lambda,
                learner_version,
            };
            let assembled = assemble(&window, &params, self.codec.as_ref());
            let mut batch = assembled.batch;
            batch.batch_id = self.next_batch_id;
            batch.temperature = self.settings.sampling.temperature;
            self.next_batch_id += 1;
            let stats = batch.stats.unwrap_or_default();
            self.counters.batches_built += 1;
            self.counters.replays_emitted += u64::from(stats.replay_samples);
            counter!(m::BATCHES_TOTAL).increment(1);
            counter!(m::REPLAYS_EMITTED_TOTAL).increment(u64::from(stats.replay_samples));
            counter!(m::REPLAY_SHORTFALL_TOTAL).increment(u64::from(stats.replay_shortfall));
            gauge!(m::PASS_RATE).set(f64::from(stats.success_rate));
            gauge!(m::CONSTRAINT_ACCURACY).set(f64::from(stats.mean_constraint_accuracy));
            tracing::info!(
                role = "replay-server",
                batch_id = batch.batch_id,
                step,
                lambda,
                originals = stats.original_samples,
                replays = stats.replay_samples,
                shortfall = stats.replay_shortfall,
                success_rate = stats.success_rate,
                mean_cla = stats.mean_constraint_accuracy,
                "batch built"
            );
            if let Some(log) = &self.batch_log {
                let texts = window
                    .iter()
                    .map(|g| g.group.responses.iter().map(|r| r.text.clone()).collect())
                    .collect();
                log.send(LoggedBatch {
                    batch: batch.clone(),
                    texts,
                });
            }
            self.unacked.push_back(BuiltBatch {
                batch,
                group_seqs: window.iter().map(|g| g.seq).collect(),
            });
        }
        self.publish_gauges();
        dropped
    }

    /// The batch a learner stream should send next: the oldest unacknowledged one, unless
    /// it is the one this stream already sent (`last_sent`) and is waiting for its ack.
    pub fn next_batch(&self, last_sent: Option<u64>) -> Option<TrainingBatch> {
        let oldest = self.unacked.front()?;
        (Some(oldest.batch.batch_id) != last_sent).then(|| oldest.batch.clone())
    }

    /// AckBatch: retires the batch, records learner progress, builds further batches.
    pub fn ack_batch(&mut self, req: &AckBatchRequest) -> Result<AckOutcome, Status> {
        let Some(pos) = self
            .unacked
            .iter()
            .position(|b| b.batch.batch_id == req.batch_id)
        else {
            if self.acked_recent.contains(&req.batch_id) {
                return Ok(AckOutcome {
                    consumed: Vec::new(),
                    progress: self.progress(),
                });
            }
            return Err(Status::invalid_argument(format!(
                "unknown batch_id {}",
                req.batch_id
            )));
        };
        let Some(done) = self.unacked.remove(pos) else {
            return Err(Status::internal("batch vanished"));
        };
        self.acked_recent.push_back(req.batch_id);
        if self.acked_recent.len() > ACKED_BATCHES_KEPT {
            self.acked_recent.pop_front();
        }
        self.counters.batches_acked += 1;
        self.learner_step = self.learner_step.max(req.learner_step);
        self.policy_version = self.policy_version.max(req.policy_version);
        self.newest_version = self.newest_version.max(self.policy_version);
        gauge!(m::LEARNER_STEP).set(self.learner_step as f64);
        gauge!(m::POLICY_VERSION).set(self.policy_version as f64);
        tracing::info!(role = "replay-server", learner_id = %req.learner_id, batch_id = req.batch_id,
            learner_step = self.learner_step, policy_version = self.policy_version, "batch acknowledged");
        let mut consumed = done.group_seqs;
        consumed.extend(self.build_batches());
        Ok(AckOutcome {
            consumed,
            progress: self.progress(),
        })
    }

    /// The Status RPC.
    pub fn status(&mut self, now_ms: u64) -> ReplayStatusResponse {
        self.reap(now_ms);
        ReplayStatusResponse {
            prompts_total: self.prompts.len() as u64,
            prompts_queued: self.queue.len() as u64,
            leases_active: self.leases.len() as u64,
            leases_expired: self.counters.leases_expired,
            groups_accepted: self.counters.groups_accepted,
            groups_rejected: self.counters.groups_rejected,
            groups_waiting: (self.waiting.len() + self.committing) as u64,
            batches_built: self.counters.batches_built,
            batches_acked: self.counters.batches_acked,
            replays_emitted: self.counters.replays_emitted,
            learner_step: self.learner_step,
            policy_version: self.policy_version,
            actors: self
                .actors
                .iter()
                .map(|(id, a)| ActorInfo {
                    actor_id: id.clone(),
                    policy_version: a.policy_version,
                    last_seen_unix_ms: a.last_seen_ms,
                    groups_accepted: a.groups_accepted,
                })
                .collect(),
        }
    }

    /// Human-readable figures for the health check.
    pub fn details(&self) -> HashMap<String, String> {
        HashMap::from([
            ("prompts_queued".to_owned(), self.queue.len().to_string()),
            ("leases_active".to_owned(), self.leases.len().to_string()),
            ("groups_waiting".to_owned(), self.waiting.len().to_string()),
            ("batches_unacked".to_owned(), self.unacked.len().to_string()),
            ("learner_step".to_owned(), self.learner_step.to_string()),
            ("epoch".to_owned(), self.queue.epoch().to_string()),
        ])
    }

    /// Updates the queue-depth gauges.
    pub fn publish_gauges(&self) {
        gauge!(m::PROMPTS_QUEUED).set(self.queue.len() as f64);
        gauge!(m::GROUPS_WAITING).set((self.waiting.len() + self.committing) as f64);
        gauge!(m::LEASES_ACTIVE).set(self.leases.len() as f64);
        gauge!(m::BATCHES_UNACKED).set(self.unacked.len() as f64);
    }

    /// Updates the active-actor gauge (actors seen within one lease timeout).
    pub fn publish_actor_gauge(&self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.settings.lease_timeout_ms);
        let active = self
            .actors
            .values()
            .filter(|a| a.last_seen_ms >= horizon)
            .count();
        gauge!(m::ACTORS_ACTIVE).set(active as f64);
    }
}
