//! The replay server's state machine: prompt leases, the index of accepted groups, batch
//! compositions, the learner session (exactly-once serving) and the back-pressure limiter.
//!
//! Everything here is synchronous and lives behind one `std::sync::Mutex` in the service; each
//! method is one short critical section and never blocks on I/O. Verification, the
//! write-ahead log's fsyncs and batch assembly (reading groups back from the log) happen
//! outside the lock, between the calls that reserve work ([`State::admit`],
//! [`State::next_batch`]) and the ones that record it ([`State::commit`]). Records that the log
//! must see in order are handed to the log writer *under* the lock (see `service.rs`).
//!
//! Memory holds an index only: a waiting group is its sequence number, prompt, verdicts and
//! the location of its frame in the log; a batch is its composition. See ARCHITECTURE.md,
//! "Exactly-once training" and "Back-pressure", for the protocol these methods implement.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use hindsight_constraints::hir;
use hindsight_proto::v1::{
    AckBatchRequest, ActorInfo, CommitBatchesRequest, LeaseRequest, LeaseResponse, Prompt,
    RegisterLearnerRequest, RegisterLearnerResponse, ReleaseLeasesRequest, ReleaseLeasesResponse,
    RenewLeasesRequest, RenewLeasesResponse, ReplayStatusResponse, RolloutAck, RolloutGroup,
    SamplingConfig,
};
use metrics::{counter, gauge, histogram};

use crate::codec::PromptCodec;
use crate::config::{Hindsight, ReplayArgs};
use crate::error::{shown, ReplayError};
use crate::metrics as m;
use crate::prompts::{PromptEntry, PromptQueue, PromptSet};
use crate::rollout::{validate_group, Limits, ResponseScore};
use crate::wal::{BatchRecord, Entry, LearnerRecord, Location, LogState, QueueRecord, SeqList};

/// How long an actor told to back off should wait.
pub const RETRY_AFTER_MS: u64 = 200;
/// Most prompts handed out by one LeasePrompts call.
pub const MAX_PROMPTS_PER_LEASE: usize = 1024;
/// Most lease ids in one RenewLeases / ReleaseLeases call.
pub const MAX_LEASE_IDS: usize = 1024;
/// Longest lease id accepted.
pub const MAX_LEASE_ID_BYTES: usize = 64;
/// Longest actor or learner id a request may carry.
pub const MAX_ID_BYTES: usize = 256;
/// Retired lease ids remembered (to answer late groups politely).
const RETIRED_LEASES_KEPT: usize = 65_536;
/// Actors remembered for `Status` (the least recently seen are forgotten first).
const ACTORS_KEPT: usize = 4096;
/// Actors that get a per-actor metric label (bounded cardinality); later ones are counted
/// in the aggregate series only.
const ACTOR_LABELS: usize = 64;
/// Largest prefetch window a learner may ask for.
pub const MAX_PREFETCH: u32 = 16;

type Result<T> = std::result::Result<T, ReplayError>;

/// Settings the state machine needs, derived once from [`ReplayArgs`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub hindsight: Hindsight,
    /// Responses an actor generates per prompt (m, or n with hindsight off).
    pub responses: usize,
    /// K replays per batch.
    pub replays: usize,
    pub prompts_per_batch: usize,
    pub max_pending_batches: usize,
    pub max_pending_bytes: u64,
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
            max_pending_batches: args.max_pending_batches as usize,
            max_pending_bytes: args.max_pending_bytes,
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
    Completed(u64),
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

/// An accepted group waiting for a batch: an index entry; the payload stays in the log.
#[derive(Debug, Clone)]
pub struct WaitingGroup {
    pub seq: u64,
    pub entry: Arc<PromptEntry>,
    pub location: Location,
    pub policy_version: u64,
    pub scores: Vec<ResponseScore>,
}

/// A batch whose composition is decided and not yet committed by a learner checkpoint.
#[derive(Debug, Clone)]
struct BatchEntry {
    record: BatchRecord,
    groups: Vec<WaitingGroup>,
    bytes: u64,
    /// The composition record is fsynced (a batch is never sent before).
    durable: bool,
    /// When it was composed (for the batch wait histogram; unknown after a restart).
    composed: Option<std::time::Instant>,
}

/// What a learner stream should do next.
#[derive(Debug)]
pub enum NextBatch {
    /// Send this batch (its composition; the caller reads the groups back and assembles it).
    /// Unless `durable`, its composition must be written (and fsynced) before sending.
    Send {
        record: BatchRecord,
        groups: Vec<WaitingGroup>,
        durable: bool,
    },
    /// Nothing to send until something changes.
    Wait,
}

/// The current learner's session.
#[derive(Debug, Clone, Default)]
struct LearnerSession {
    incarnation: String,
    learner_id: String,
    step: u64,
    version: u64,
    /// Every batch up to this id is trained into the learner's weights.
    acked_through: u64,
    /// Sent on a stream of this incarnation and not acked yet.
    served: BTreeSet<u64>,
}

#[derive(Debug, Clone, Default)]
struct ActorRecord {
    policy_version: u64,
    last_seen_ms: u64,
    groups_accepted: u64,
    labelled: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    leases_expired: u64,
    groups_accepted: u64,
    groups_rejected: u64,
    groups_stale: u64,
    groups_orphaned: u64,
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
    /// Groups admitted and being verified / logged.
    committing: usize,
    next_seq: u64,
    waiting: VecDeque<WaitingGroup>,
    waiting_bytes: u64,
    batches: BTreeMap<u64, BatchEntry>,
    next_batch_id: u64,
    committed_through: u64,
    learner: LearnerSession,
    /// Newest version a learner was told to publish: the version counter.
    newest_version: u64,
    /// Versions no live weights descend from (inclusive ranges).
    orphans: Vec<(u64, u64)>,
    actors: BTreeMap<String, ActorRecord>,
    labelled_actors: usize,
    counters: Counters,
    paused_since_ms: Option<u64>,
}

fn actor_label(actor_id: &str) -> &str {
    if actor_id.is_empty() {
        "anonymous"
    } else {
        actor_id
    }
}

fn check_id(what: &str, id: &str, max: usize) -> Result<()> {
    if id.len() > max {
        return Err(ReplayError::Invalid(format!(
            "{what} is {} bytes long; at most {max} are allowed",
            id.len()
        )));
    }
    Ok(())
}

fn check_lease_ids(ids: &[String]) -> Result<()> {
    if ids.len() > MAX_LEASE_IDS {
        return Err(ReplayError::Invalid(format!(
            "{} lease ids in one call; at most {MAX_LEASE_IDS} are allowed",
            ids.len()
        )));
    }
    if let Some(id) = ids.iter().find(|id| id.len() > MAX_LEASE_ID_BYTES) {
        return Err(ReplayError::Invalid(format!(
            "lease id {} is longer than {MAX_LEASE_ID_BYTES} bytes",
            shown(id)
        )));
    }
    Ok(())
}

impl State {
    /// A state rebuilt from the log's fold (`log`; empty for a new server). `instance`
    /// prefixes lease ids. Returns it and the waiting groups the caller must re-index (their
    /// verdicts are recomputed by reading them back: [`State::restore_waiting`]).
    pub fn new(
        settings: Settings,
        prompts: Arc<PromptSet>,
        codec: Arc<dyn PromptCodec>,
        instance: String,
        log: &LogState,
    ) -> Self {
        let queue = match &log.queue {
            Some(q) => {
                // Prompts leased before the restart and never answered go first.
                let mut requeued: Vec<usize> = q.outstanding.iter().map(|&i| i as usize).collect();
                requeued.extend(q.requeued.iter().map(|&i| i as usize));
                PromptQueue::restore(
                    prompts.len(),
                    settings.seed,
                    q.epoch,
                    q.position as usize,
                    requeued,
                )
            }
            None => PromptQueue::new(prompts.len(), settings.seed),
        };
        let orphans = log
            .learner
            .orphans
            .chunks_exact(2)
            .map(|c| (c[0], c[1]))
            .collect();
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
            next_seq: log.counters.next_seq,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            batches: BTreeMap::new(),
            next_batch_id: log.counters.next_batch_id.max(1),
            committed_through: log.counters.committed_through,
            learner: LearnerSession {
                step: log.counters.learner_step.max(log.learner.learner_step),
                version: log.counters.policy_version,
                acked_through: log.counters.committed_through,
                ..LearnerSession::default()
            },
            newest_version: log.learner.newest_version.max(log.counters.policy_version),
            orphans,
            actors: BTreeMap::new(),
            labelled_actors: 0,
            counters: Counters::default(),
            paused_since_ms: None,
        }
    }

    /// Puts a recovered waiting group back (in sequence order).
    pub fn restore_waiting(&mut self, group: WaitingGroup) {
        self.next_seq = self.next_seq.max(group.seq + 1);
        self.waiting_bytes += u64::from(group.location.len);
        let at = self.waiting.partition_point(|g| g.seq < group.seq);
        self.waiting.insert(at, group);
        self.counters.groups_accepted += 1;
    }

    /// Puts a recovered batch composition back (durable: it came from the log).
    pub fn restore_batch(&mut self, record: BatchRecord, groups: Vec<WaitingGroup>) {
        self.next_batch_id = self.next_batch_id.max(record.batch_id + 1);
        let bytes = groups.iter().map(|g| u64::from(g.location.len)).sum();
        self.counters.batches_built += 1;
        self.batches.insert(
            record.batch_id,
            BatchEntry {
                record,
                groups,
                bytes,
                durable: true,
                composed: None,
            },
        );
    }

    /// Newest policy version a learner published (or was told to).
    pub fn newest_version(&self) -> u64 {
        self.newest_version
    }

    /// The lease timeout.
    pub fn lease_timeout_ms(&self) -> u64 {
        self.settings.lease_timeout_ms
    }

    fn touch_actor(&mut self, actor_id: &str, version: Option<u64>, now_ms: u64) {
        let label = actor_label(actor_id);
        if !self.actors.contains_key(label) && self.actors.len() >= ACTORS_KEPT {
            if let Some(oldest) = self
                .actors
                .iter()
                .min_by_key(|(_, a)| a.last_seen_ms)
                .map(|(k, _)| k.clone())
            {
                self.actors.remove(&oldest);
            }
        }
        let labelled_actors = &mut self.labelled_actors;
        let rec = self.actors.entry(label.to_owned()).or_insert_with(|| {
            let labelled = *labelled_actors < ACTOR_LABELS;
            if labelled {
                *labelled_actors += 1;
            }
            ActorRecord {
                labelled,
                ..ActorRecord::default()
            }
        });
        if let Some(v) = version {
            rec.policy_version = rec.policy_version.max(v);
        }
        rec.last_seen_ms = now_ms;
        if rec.labelled {
            gauge!(m::ACTOR_POLICY_VERSION, "actor" => label.to_owned())
                .set(rec.policy_version as f64);
        }
    }

    /// Groups and bytes waiting for the learner: leased or being committed (counted as groups
    /// to come), waiting for a batch, or in a batch not yet trained.
    fn pending(&self) -> (usize, u64) {
        let unacked: Vec<&BatchEntry> = self
            .batches
            .range(self.learner.acked_through + 1..)
            .map(|(_, b)| b)
            .collect();
        let groups = self.leases.len()
            + self.committing
            + self.waiting.len()
            + unacked.iter().map(|b| b.groups.len()).sum::<usize>();
        let bytes = self.waiting_bytes + unacked.iter().map(|b| b.bytes).sum::<u64>();
        (groups, bytes)
    }

    /// Prompts that may still be leased, or why none may.
    fn room(&mut self, now_ms: u64) -> std::result::Result<usize, String> {
        let (groups, bytes) = self.pending();
        let cap = self.settings.max_pending_batches * self.settings.prompts_per_batch;
        let why = if groups >= cap {
            Some(format!(
                "{groups} groups wait for the learner (the bound is --max-pending-batches {} x \
                 {} prompts per batch)",
                self.settings.max_pending_batches, self.settings.prompts_per_batch
            ))
        } else if bytes >= self.settings.max_pending_bytes {
            Some(format!(
                "{bytes} bytes of groups wait for the learner (--max-pending-bytes {})",
                self.settings.max_pending_bytes
            ))
        } else {
            None
        };
        match why {
            Some(why) => {
                if self.paused_since_ms.is_none() {
                    self.paused_since_ms = Some(now_ms);
                    gauge!(m::LEASES_PAUSED).set(1.0);
                    tracing::info!(%why, "leases paused: enough work waits for the learner");
                }
                Err(why)
            }
            None => {
                self.resume_leases(now_ms);
                Ok(cap - groups)
            }
        }
    }

    fn resume_leases(&mut self, now_ms: u64) {
        if let Some(since) = self.paused_since_ms.take() {
            let secs = now_ms.saturating_sub(since) as f64 / 1000.0;
            histogram!(m::LEASES_PAUSED_SECONDS).record(secs);
            gauge!(m::LEASES_PAUSED).set(0.0);
            tracing::info!(paused_seconds = secs, "leases resumed");
        }
    }

    /// The queue record to log after a change of the queue or the outstanding leases.
    pub fn queue_record(&self) -> Entry {
        let (epoch, position, requeued) = self.queue.snapshot();
        Entry::Queue(QueueRecord {
            epoch,
            position: position as u64,
            requeued: requeued.into_iter().map(|i| i as u32).collect(),
            outstanding: self.leases.values().map(|l| l.prompt as u32).collect(),
        })
    }

    /// LeasePrompts: up to `max_prompts` prompts, or [`ReplayError::Full`] (back-pressure).
    /// On success the caller logs [`State::queue_record`] (under the same lock).
    pub fn lease(&mut self, req: &LeaseRequest, now_ms: u64) -> Result<LeaseResponse> {
        // Validate before touching anything: a bad request changes nothing.
        check_id("actor_id", &req.actor_id, MAX_ID_BYTES)?;
        self.reap(now_ms);
        let actor = actor_label(&req.actor_id).to_owned();
        let room = self.room(now_ms).map_err(|reason| ReplayError::Full {
            reason,
            retry_after_ms: RETRY_AFTER_MS,
        })?;
        // The version an actor reports is shown in Status only; it never moves the server's
        // version counter (only a learner does).
        self.touch_actor(
            &actor,
            Some(req.policy_version.min(self.newest_version)),
            now_ms,
        );
        let count = (req.max_prompts as usize)
            .min(room)
            .min(MAX_PROMPTS_PER_LEASE);
        let deadline_ms = now_ms.saturating_add(self.settings.lease_timeout_ms);
        let mut prompts = Vec::with_capacity(count);
        let mut again = 0u64;
        for _ in 0..count {
            again += u64::from(self.queue.put_back() > 0);
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
        counter!(m::PROMPTS_LEASED_TOTAL).increment(prompts.len() as u64);
        counter!(m::PROMPTS_LEASED_AGAIN_TOTAL).increment(again.min(prompts.len() as u64));
        self.publish_gauges();
        Ok(LeaseResponse {
            retry_after_ms: if prompts.is_empty() {
                RETRY_AFTER_MS
            } else {
                0
            },
            prompts,
            lease_deadline_unix_ms: deadline_ms,
            sampling: Some(self.settings.sampling),
            latest_policy_version: self.newest_version,
            model_fingerprint: String::new(),
        })
    }

    /// RenewLeases: pushes the deadline of the named active leases of this actor.
    pub fn renew(&mut self, req: &RenewLeasesRequest, now_ms: u64) -> Result<RenewLeasesResponse> {
        check_id("actor_id", &req.actor_id, MAX_ID_BYTES)?;
        check_lease_ids(&req.lease_ids)?;
        self.reap(now_ms);
        self.touch_actor(&req.actor_id, None, now_ms);
        let actor = actor_label(&req.actor_id);
        let deadline_ms = now_ms.saturating_add(self.settings.lease_timeout_ms);
        let mut unknown_lease_ids = Vec::new();
        for id in &req.lease_ids {
            match self.leases.get_mut(id) {
                Some(lease) if lease.actor_id == actor => lease.deadline_ms = deadline_ms,
                _ => unknown_lease_ids.push(id.clone()),
            }
        }
        Ok(RenewLeasesResponse {
            lease_deadline_unix_ms: deadline_ms,
            unknown_lease_ids,
        })
    }

    /// ReleaseLeases: gives the named leases of this actor back; their prompts are re-queued
    /// first. Another actor's lease is not released.
    pub fn release(&mut self, req: &ReleaseLeasesRequest) -> Result<ReleaseLeasesResponse> {
        check_id("actor_id", &req.actor_id, MAX_ID_BYTES)?;
        check_lease_ids(&req.lease_ids)?;
        let actor = actor_label(&req.actor_id);
        let mut released = 0;
        for id in &req.lease_ids {
            if self.leases.get(id).is_some_and(|l| l.actor_id == actor) {
                if let Some(lease) = self.leases.remove(id) {
                    self.requeue(lease.prompt, "released");
                    self.retired
                        .insert(id.clone(), lease.prompt, Retired::Released);
                    released += 1;
                }
            }
        }
        self.publish_gauges();
        Ok(ReleaseLeasesResponse { released })
    }

    /// Puts a prompt back at the front of the queue, counted by `reason`.
    fn requeue(&mut self, prompt: usize, reason: &'static str) {
        self.queue.requeue(prompt);
        counter!(m::PROMPTS_REQUEUED_TOTAL, "reason" => reason).increment(1);
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
                tracing::info!(lease_id = %id, actor_id = %lease.actor_id, "lease expired; prompt re-queued");
                self.requeue(lease.prompt, "expired");
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
        tracing::info!(actor_id = %shown(&group.actor_id), policy_version = group.policy_version,
            lease_id = %shown(&group.lease_id), %reason, "rollout group not accepted");
        Admission::Decline(RolloutAck {
            lease_id: group.lease_id.clone(),
            accepted: false,
            reason,
            group_seq: 0,
        })
    }

    fn invalid(&mut self, group: &RolloutGroup, reason: String) -> ReplayError {
        self.counters.groups_rejected += 1;
        counter!(m::ROLLOUT_GROUPS_TOTAL, "result" => "invalid").increment(1);
        tracing::warn!(actor_id = %shown(&group.actor_id), policy_version = group.policy_version,
            lease_id = %shown(&group.lease_id), %reason, "invalid rollout group");
        ReplayError::Invalid(reason)
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

    fn orphaned(&self, version: u64) -> bool {
        self.orphans
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&version))
    }

    fn too_stale(&self, version: u64) -> bool {
        version.saturating_add(self.settings.max_staleness) < self.learner.version
    }

    /// Validates a group completely, then decides: accept (the lease is reserved), decline
    /// (valid but late / stale / orphaned / duplicate) or reject ([`ReplayError::Invalid`],
    /// nothing changed but the rejection counter).
    pub fn admit(&mut self, group: &RolloutGroup, now_ms: u64) -> Result<Admission> {
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
            return Err(self.invalid(
                group,
                format!("unknown prompt_id {}", shown(&group.prompt_id)),
            ));
        };
        self.reap(now_ms);
        let lease_id = group.lease_id.as_str();
        let wrong_prompt = |this: &Self, leased: usize| {
            let leased = this
                .prompts
                .get(leased)
                .map(|e| e.id.clone())
                .unwrap_or_default();
            format!(
                "lease {} was issued for prompt {leased:?}, not {}",
                shown(lease_id),
                shown(&group.prompt_id)
            )
        };
        let lease = if let Some(lease) = self.leases.get(lease_id) {
            if lease.prompt != entry.index {
                let why = wrong_prompt(self, lease.prompt);
                return Err(self.invalid(group, why));
            }
            lease.clone()
        } else if let Some((prompt, how)) = self.retired.get(lease_id) {
            if prompt != entry.index {
                let why = wrong_prompt(self, prompt);
                return Err(self.invalid(group, why));
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
                Retired::Completed(seq) => {
                    counter!(m::ROLLOUT_GROUPS_TOTAL, "result" => "duplicate").increment(1);
                    return Ok(Admission::Decline(RolloutAck {
                        lease_id: group.lease_id.clone(),
                        accepted: true,
                        reason: "duplicate: group already accepted".into(),
                        group_seq: seq,
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
            return Err(self.invalid(group, format!("unknown lease_id {}", shown(lease_id))));
        };

        // Valid and ours. Made by weights that are gone, or too stale to ever be trained on?
        let version = group.policy_version;
        let refused = if self.orphaned(version) {
            self.counters.groups_orphaned += 1;
            Some((
                "orphaned",
                format!(
                    "generated by policy version {version}, published by a learner that crashed \
                     before checkpointing it; fetch the newest weights"
                ),
            ))
        } else if self.too_stale(version) {
            self.counters.groups_stale += 1;
            counter!(m::GROUPS_STALE_TOTAL).increment(1);
            Some((
                "stale",
                format!(
                    "stale: generated by policy version {version}, learner is at {} (max staleness {})",
                    self.learner.version, self.settings.max_staleness
                ),
            ))
        } else {
            None
        };
        self.leases.remove(lease_id);
        self.touch_actor(&group.actor_id, Some(version), now_ms);
        if let Some((result, reason)) = refused {
            self.requeue(entry.index, result);
            self.retired
                .insert(lease_id.to_owned(), entry.index, Retired::Stale);
            self.publish_gauges();
            return Ok(self.decline(group, result, reason));
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

    /// Indexes a verified and logged group: it waits for a batch.
    pub fn commit(&mut self, ticket: Ticket, group: WaitingGroup, actor_id: &str, now_ms: u64) {
        self.committing = self.committing.saturating_sub(1);
        self.retired.insert(
            ticket.lease_id,
            ticket.lease.prompt,
            Retired::Completed(group.seq),
        );
        let actor = actor_label(actor_id).to_owned();
        if let Some(rec) = self.actors.get_mut(&actor) {
            rec.groups_accepted += 1;
            rec.last_seen_ms = now_ms;
        }
        self.counters.groups_accepted += 1;
        counter!(m::ROLLOUT_GROUPS_TOTAL, "result" => "accepted").increment(1);
        counter!(m::RESPONSES_TOTAL).increment(group.scores.len() as u64);
        for score in &group.scores {
            for (id, ok) in group.entry.instruction_ids.iter().zip(&score.verdicts) {
                let result = if *ok { "pass" } else { "fail" };
                counter!(m::VERIFICATIONS_TOTAL, "instruction_id" => id.clone(), "result" => result).increment(1);
            }
        }
        tracing::debug!(actor_id = %actor, policy_version = group.policy_version,
            prompt_id = %group.entry.id, seq = group.seq, "rollout group accepted");
        self.waiting_bytes += u64::from(group.location.len);
        let at = self.waiting.partition_point(|g| g.seq < group.seq);
        self.waiting.insert(at, group);
        self.publish_gauges();
    }

    /// Gives the lease back after a failed commit (the log could not be written).
    pub fn abort(&mut self, ticket: Ticket) {
        self.committing = self.committing.saturating_sub(1);
        self.retired.map.remove(&ticket.lease_id);
        self.leases.insert(ticket.lease_id, ticket.lease);
    }

    /// Drops waiting groups past the staleness bound (their prompts re-queued). Groups of
    /// orphaned versions that were already acknowledged stay: their behaviour log-probs are
    /// those of the weights that made them, which is all the PPO ratio needs. Returns the
    /// records to log (nothing when nothing was dropped).
    fn drop_stale(&mut self) -> Vec<Entry> {
        let mut dropped = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for g in std::mem::take(&mut self.waiting) {
            if self.too_stale(g.policy_version) {
                tracing::info!(policy_version = g.policy_version, learner_version = self.learner.version,
                    prompt_id = %g.entry.id, seq = g.seq, "dropping a stale waiting group; prompt re-queued");
                self.counters.groups_stale += 1;
                counter!(m::GROUPS_STALE_TOTAL).increment(1);
                self.requeue(g.entry.index, "stale");
                self.waiting_bytes = self.waiting_bytes.saturating_sub(u64::from(g.location.len));
                dropped.push(g.seq);
            } else {
                kept.push_back(g);
            }
        }
        self.waiting = kept;
        if dropped.is_empty() {
            return Vec::new();
        }
        vec![
            Entry::Dropped(SeqList { seqs: dropped }),
            self.queue_record(),
        ]
    }

    /// Decided batches with `after < id <= through` (none when `through <= after`).
    fn batches_between(&self, after: u64, through: u64) -> usize {
        if through <= after {
            return 0;
        }
        self.batches.range(after + 1..=through).count()
    }

    /// The batch a learner stream of `incarnation` should send after `sent_through`, keeping
    /// at most `prefetch` sent and unacknowledged. Composes a new batch from the oldest
    /// complete window when no decided one is left. Records in `log_now` must be handed to
    /// the log writer under the same lock (drops, compositions).
    pub fn next_batch(
        &mut self,
        incarnation: &str,
        sent_through: u64,
        prefetch: u32,
        log_now: &mut Vec<Entry>,
    ) -> Result<NextBatch> {
        if incarnation != self.learner.incarnation {
            return Err(ReplayError::Conflict(
                "this learner incarnation was superseded by a newer RegisterLearner".into(),
            ));
        }
        let in_flight = self.batches_between(self.learner.acked_through, sent_through);
        if in_flight >= prefetch.max(1) as usize {
            return Ok(NextBatch::Wait);
        }
        if let Some((_, b)) = self.batches.range(sent_through + 1..).next() {
            return Ok(NextBatch::Send {
                record: b.record.clone(),
                groups: b.groups.clone(),
                durable: b.durable,
            });
        }
        log_now.extend(self.drop_stale());
        let p = self.settings.prompts_per_batch;
        if self.waiting.len() < p {
            return Ok(NextBatch::Wait);
        }
        let window: Vec<WaitingGroup> = self.waiting.drain(..p).collect();
        let bytes: u64 = window.iter().map(|g| u64::from(g.location.len)).sum();
        self.waiting_bytes = self.waiting_bytes.saturating_sub(bytes);
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        // The HiR schedule's s: the step this batch will be trained as.
        let step = self.learner.step
            + 1
            + self.batches_between(self.learner.acked_through, batch_id.saturating_sub(1)) as u64;
        let record = BatchRecord {
            batch_id,
            seqs: window.iter().map(|g| g.seq).collect(),
            step,
            lambda: hir::lambda(step, self.settings.lambda0, self.settings.eta),
            replays: self.settings.replays as u32,
            learner_version: self.learner.version,
        };
        self.counters.batches_built += 1;
        counter!(m::BATCHES_TOTAL).increment(1);
        self.batches.insert(
            batch_id,
            BatchEntry {
                record: record.clone(),
                groups: window.clone(),
                bytes,
                durable: false,
                composed: Some(std::time::Instant::now()),
            },
        );
        self.publish_gauges();
        Ok(NextBatch::Send {
            record,
            groups: window,
            durable: false,
        })
    }

    /// The composition of `batch_id` is fsynced: it may be sent.
    pub fn batch_durable(&mut self, batch_id: u64) {
        if let Some(b) = self.batches.get_mut(&batch_id) {
            b.durable = true;
        }
    }

    /// A stream of `incarnation` sent `batch_id` (the learner must ack it before others).
    pub fn sent(&mut self, incarnation: &str, batch_id: u64) {
        if incarnation == self.learner.incarnation {
            self.learner.served.insert(batch_id);
        }
    }

    /// Records the statistics of an assembled batch (first assembly only).
    pub fn record_assembled(&mut self, stats: &hindsight_proto::v1::BatchStats) {
        self.counters.replays_emitted += u64::from(stats.replay_samples);
        counter!(m::REPLAYS_EMITTED_TOTAL).increment(u64::from(stats.replay_samples));
        counter!(m::REPLAY_SHORTFALL_TOTAL).increment(u64::from(stats.replay_shortfall));
        gauge!(m::PASS_RATE).set(f64::from(stats.success_rate));
        gauge!(m::CONSTRAINT_ACCURACY).set(f64::from(stats.mean_constraint_accuracy));
    }

    /// RegisterLearner: validates where the learner stands against the log, decides the
    /// version it publishes its weights as, and starts a new session (older incarnations'
    /// streams and acks are refused from now on). Returns the answer and the records to log
    /// (durably) *before* answering.
    pub fn register_learner(
        &mut self,
        req: &RegisterLearnerRequest,
        incarnation: String,
    ) -> Result<(RegisterLearnerResponse, Vec<Entry>)> {
        check_id("learner_id", &req.learner_id, MAX_ID_BYTES)?;
        // Far beyond any real run, and leaves room for every `+ 1` that follows (found by
        // fuzzing: u64::MAX overflowed the version counter and the step arithmetic).
        const MAX_COUNTER: u64 = 1 << 62;
        if req.learner_step > MAX_COUNTER || req.policy_version > MAX_COUNTER {
            return Err(ReplayError::Invalid(format!(
                "learner_step {} / policy_version {} is beyond {MAX_COUNTER}",
                req.learner_step, req.policy_version
            )));
        }
        let (committed, trained) = (req.committed_through_batch_id, req.trained_through_batch_id);
        if trained < committed {
            return Err(ReplayError::Invalid(format!(
                "trained_through_batch_id {trained} is below committed_through_batch_id {committed}"
            )));
        }
        if committed < self.committed_through {
            return Err(ReplayError::Conflict(format!(
                "the learner's checkpoint covers batches through {committed}, but a newer \
                 checkpoint (through {}) was committed and the batches in between are gone: \
                 resume from the newest checkpoint, or start a new run with a new replay data \
                 directory",
                self.committed_through
            )));
        }
        if trained >= self.next_batch_id {
            return Err(ReplayError::Conflict(format!(
                "the learner has trained through batch {trained}, but this replay server never \
                 built a batch beyond {}: it is not the server (or the write-ahead log) this \
                 learner trained with",
                self.next_batch_id - 1
            )));
        }
        if let Some(missing) = (self.committed_through.max(committed) + 1..=trained)
            .find(|id| !self.batches.contains_key(id))
        {
            return Err(ReplayError::Conflict(format!(
                "the learner has trained batch {missing}, which this replay server does not \
                 have: its write-ahead log does not match the learner's checkpoint"
            )));
        }
        let mut log = Vec::new();
        if committed > self.committed_through {
            log.push(Entry::Commit(committed));
        }
        // A learner behind the newest version resumed from an older checkpoint: it publishes
        // under a fresh version, and the versions in between are orphaned.
        let version = if req.policy_version < self.newest_version {
            let orphan = (req.policy_version + 1, self.newest_version);
            self.orphans.push(orphan);
            tracing::warn!(learner_id = %shown(&req.learner_id), from = orphan.0, to = orphan.1,
                "a learner resumed from an older checkpoint: versions {}..={} are orphaned", orphan.0, orphan.1);
            self.newest_version + 1
        } else {
            req.policy_version
        };
        self.newest_version = version;
        log.push(Entry::Learner(LearnerRecord {
            newest_version: version,
            orphans: self.orphans.iter().flat_map(|&(a, b)| [a, b]).collect(),
            learner_step: req.learner_step,
        }));
        self.apply_commit(committed);
        self.learner = LearnerSession {
            incarnation: incarnation.clone(),
            learner_id: req.learner_id.clone(),
            step: req.learner_step,
            version,
            acked_through: trained,
            served: BTreeSet::new(),
        };
        gauge!(m::LEARNER_STEP).set(self.learner.step as f64);
        gauge!(m::POLICY_VERSION).set(version as f64);
        tracing::info!(learner_id = %shown(&req.learner_id), %incarnation, step = req.learner_step,
            policy_version = version, committed, trained, "learner registered");
        self.publish_gauges();
        Ok((
            RegisterLearnerResponse {
                incarnation,
                policy_version: version,
                committed_through_batch_id: self.committed_through,
            },
            log,
        ))
    }

    fn check_incarnation(&self, incarnation: &str) -> Result<()> {
        if self.learner.incarnation.is_empty() {
            return Err(ReplayError::Conflict(
                "no learner is registered: call RegisterLearner first".into(),
            ));
        }
        if incarnation != self.learner.incarnation {
            return Err(ReplayError::Conflict(format!(
                "learner incarnation {} was superseded by a newer RegisterLearner",
                shown(incarnation)
            )));
        }
        Ok(())
    }

    /// Starts a batch stream: everything after `trained_through` is (re)sent from now on.
    pub fn open_stream(&mut self, incarnation: &str, trained_through: u64) -> Result<()> {
        self.check_incarnation(incarnation)?;
        if trained_through != self.learner.acked_through {
            return Err(ReplayError::Conflict(format!(
                "the stream starts after batch {trained_through}, but this learner has acked \
                 through {}",
                self.learner.acked_through
            )));
        }
        self.learner.served.clear();
        Ok(())
    }

    /// AckBatch: the learner trained `batch_id` (in order, one step and one version further).
    /// A repeated ack is answered OK and changes nothing.
    pub fn ack_batch(&mut self, req: &AckBatchRequest) -> Result<()> {
        check_id("learner_id", &req.learner_id, MAX_ID_BYTES)?;
        self.check_incarnation(&req.incarnation)?;
        if req.batch_id <= self.learner.acked_through {
            return Ok(());
        }
        let expected = self.learner.served.first().copied();
        if expected != Some(req.batch_id) {
            return Err(ReplayError::Invalid(match expected {
                Some(e) => format!(
                    "batch {} acked out of order: the next batch to ack is {e}",
                    req.batch_id
                ),
                None => format!("batch {} was not sent to this learner", req.batch_id),
            }));
        }
        let (step, version) = (self.learner.step + 1, self.learner.version + 1);
        if req.learner_step != step || req.policy_version != version {
            return Err(ReplayError::Invalid(format!(
                "the ack of batch {} reports step {} and policy version {}, but the learner is \
                 at step {} and version {}: each ack advances both by exactly one",
                req.batch_id,
                req.learner_step,
                req.policy_version,
                step - 1,
                version - 1
            )));
        }
        self.learner.served.remove(&req.batch_id);
        if let Some(composed) = self.batches.get(&req.batch_id).and_then(|b| b.composed) {
            histogram!(m::BATCH_WAIT_SECONDS).record(composed.elapsed().as_secs_f64());
        }
        self.learner.acked_through = req.batch_id;
        self.learner.step = step;
        self.learner.version = version;
        self.newest_version = self.newest_version.max(version);
        self.counters.batches_acked += 1;
        gauge!(m::LEARNER_STEP).set(step as f64);
        gauge!(m::POLICY_VERSION).set(version as f64);
        tracing::info!(learner_id = %shown(&req.learner_id), batch_id = req.batch_id,
            learner_step = step, policy_version = version, "batch trained");
        self.publish_gauges();
        Ok(())
    }

    /// The counters record that goes with an ack (logged without waiting: the learner, not
    /// this record, is the truth about what it trained).
    pub fn counters_record(&self) -> Entry {
        Entry::Counters(crate::wal::Counters {
            next_seq: self.next_seq,
            next_batch_id: self.next_batch_id,
            committed_through: self.committed_through,
            learner_step: self.learner.step,
            policy_version: self.learner.version,
        })
    }

    /// CommitBatches, first half: validates; returns the record to log durably, if any.
    pub fn commit_batches(&mut self, req: &CommitBatchesRequest) -> Result<Option<Entry>> {
        check_id("learner_id", &req.learner_id, MAX_ID_BYTES)?;
        self.check_incarnation(&req.incarnation)?;
        if req.through_batch_id > self.learner.acked_through {
            return Err(ReplayError::Invalid(format!(
                "cannot commit through batch {}: the learner has acked only through {}",
                req.through_batch_id, self.learner.acked_through
            )));
        }
        Ok((req.through_batch_id > self.committed_through)
            .then_some(Entry::Commit(req.through_batch_id)))
    }

    /// CommitBatches, second half (after the fsync): forgets the committed batches.
    pub fn apply_commit(&mut self, through: u64) {
        if through <= self.committed_through {
            return;
        }
        self.committed_through = through;
        let done: Vec<u64> = self.batches.range(..=through).map(|(&id, _)| id).collect();
        for id in done {
            self.batches.remove(&id);
        }
        gauge!(m::COMMITTED_BATCH).set(through as f64);
        self.publish_gauges();
    }

    /// The Status RPC.
    pub fn status(&mut self, now_ms: u64) -> ReplayStatusResponse {
        self.reap(now_ms);
        let (pending_groups, pending_bytes) = self.pending();
        let pending_batches = self.batches.range(self.learner.acked_through + 1..).count() as u64
            + (self.waiting.len() / self.settings.prompts_per_batch.max(1)) as u64;
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
            learner_step: self.learner.step,
            policy_version: self.learner.version,
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
            pending_groups: pending_groups as u64,
            pending_batches,
            pending_bytes,
            leases_paused: self.paused_since_ms.is_some(),
            committed_through_batch_id: self.committed_through,
            groups_stale: self.counters.groups_stale,
            groups_orphaned: self.counters.groups_orphaned,
        }
    }

    /// Human-readable figures for the health check.
    pub fn details(&self) -> HashMap<String, String> {
        HashMap::from([
            ("prompts_queued".to_owned(), self.queue.len().to_string()),
            ("leases_active".to_owned(), self.leases.len().to_string()),
            ("groups_waiting".to_owned(), self.waiting.len().to_string()),
            (
                "batches_uncommitted".to_owned(),
                self.batches.len().to_string(),
            ),
            ("learner_step".to_owned(), self.learner.step.to_string()),
            ("learner_id".to_owned(), shown(&self.learner.learner_id)),
            ("epoch".to_owned(), self.queue.epoch().to_string()),
        ])
    }

    /// Updates the queue-depth gauges.
    pub fn publish_gauges(&self) {
        let (groups, bytes) = self.pending();
        gauge!(m::PROMPTS_QUEUED).set(self.queue.len() as f64);
        gauge!(m::GROUPS_WAITING).set((self.waiting.len() + self.committing) as f64);
        gauge!(m::LEASES_ACTIVE).set(self.leases.len() as f64);
        gauge!(m::BATCHES_UNACKED)
            .set(self.batches.range(self.learner.acked_through + 1..).count() as f64);
        gauge!(m::BATCHES_UNCOMMITTED).set(self.batches.len() as f64);
        gauge!(m::PENDING_GROUPS).set(groups as f64);
        gauge!(m::PENDING_BYTES).set(bytes as f64);
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
