//! Metric names and descriptions of the replay server, in one place.
//!
//! The server only *records* through the [`metrics`] facade macros; the `hindsight` CLI
//! installs the Prometheus exporter. [`describe`] registers units and help texts and is
//! called once when the server starts (harmless when no recorder is installed).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Rollout groups received, by `result` (`accepted`, `invalid`, `expired`, `stale`, ...).
pub const ROLLOUT_GROUPS_TOTAL: &str = "hindsight_rollout_groups_total";
/// Responses in accepted groups.
pub const RESPONSES_TOTAL: &str = "hindsight_responses_total";
/// Per-constraint verdicts, by `instruction_id` and `result` (`pass` / `fail`).
pub const VERIFICATIONS_TOTAL: &str = "hindsight_verifications_total";
/// Success rate (reward 1) of the original responses of the last batch.
pub const PASS_RATE: &str = "hindsight_pass_rate";
/// Mean constraint-level accuracy of the original responses of the last batch.
pub const CONSTRAINT_ACCURACY: &str = "hindsight_constraint_accuracy";
/// Hindsight replays put into batches.
pub const REPLAYS_EMITTED_TOTAL: &str = "hindsight_replays_emitted_total";
/// Replays missing because fewer than K candidates had 0 < CLA < 1.
pub const REPLAY_SHORTFALL_TOTAL: &str = "hindsight_replay_shortfall_total";
/// Training batches assembled.
pub const BATCHES_TOTAL: &str = "hindsight_batches_total";
/// Leases that expired (their prompt was re-queued).
pub const LEASES_EXPIRED_TOTAL: &str = "hindsight_leases_expired_total";
/// Groups dropped for exceeding the staleness bound (their prompt was re-queued).
pub const GROUPS_STALE_TOTAL: &str = "hindsight_groups_stale_total";
/// Prompts waiting in the queue of the current epoch.
pub const PROMPTS_QUEUED: &str = "hindsight_prompts_queued";
/// Accepted groups not yet in a batch.
pub const GROUPS_WAITING: &str = "hindsight_groups_waiting";
/// Active prompt leases.
pub const LEASES_ACTIVE: &str = "hindsight_leases_active";
/// Batches built and not yet acknowledged by the learner.
pub const BATCHES_UNACKED: &str = "hindsight_batches_unacked";
/// Learner steps completed (from AckBatch).
pub const LEARNER_STEP: &str = "hindsight_learner_step";
/// Newest policy version published by the learner (from AckBatch).
pub const POLICY_VERSION: &str = "hindsight_policy_version";
/// Policy version each actor last reported, by `actor`.
pub const ACTOR_POLICY_VERSION: &str = "hindsight_actor_policy_version";
/// Actors seen within one lease timeout.
pub const ACTORS_ACTIVE: &str = "hindsight_actors_active";
/// Time to verify one rollout group (all its responses).
pub const VERIFY_SECONDS: &str = "hindsight_verify_seconds";
/// Time from receiving a rollout group to acknowledging it (verification + log fsync).
pub const INGEST_SECONDS: &str = "hindsight_replay_ingest_seconds";
/// Prompts handed out in leases.
pub const PROMPTS_LEASED_TOTAL: &str = "hindsight_replay_prompts_leased_total";
/// Batches decided and not yet covered by a learner checkpoint (kept in the log).
pub const BATCHES_UNCOMMITTED: &str = "hindsight_replay_batches_uncommitted";
/// Groups waiting for the learner (leased, waiting for a batch, or in an untrained batch).
pub const PENDING_GROUPS: &str = "hindsight_replay_pending_groups";
/// Log bytes of the groups waiting for the learner.
pub const PENDING_BYTES: &str = "hindsight_replay_pending_bytes";
/// 1 while the limiter refuses leases (back-pressure), else 0.
pub const LEASES_PAUSED: &str = "hindsight_replay_leases_paused";
/// Time leases spent paused by the limiter, in milliseconds.
pub const LEASES_PAUSED_SECONDS_TOTAL: &str = "hindsight_replay_leases_paused_milliseconds_total";
/// Newest batch id covered by a learner checkpoint.
pub const COMMITTED_BATCH: &str = "hindsight_replay_committed_batch_id";
/// Time to read a batch's groups back from the log and assemble it.
pub const ASSEMBLE_SECONDS: &str = "hindsight_replay_batch_assembly_seconds";
/// Requests refused by validation or the protocol, by `rpc`.
pub const REQUESTS_REFUSED_TOTAL: &str = "hindsight_replay_requests_refused_total";

/// Registers units and help texts of every replay-server metric.
pub fn describe() {
    describe_counter!(
        ROLLOUT_GROUPS_TOTAL,
        Unit::Count,
        "Rollout groups received, by result"
    );
    describe_counter!(
        RESPONSES_TOTAL,
        Unit::Count,
        "Responses in accepted rollout groups"
    );
    describe_counter!(
        VERIFICATIONS_TOTAL,
        Unit::Count,
        "Constraint verdicts of accepted responses, by instruction_id and result"
    );
    describe_gauge!(
        PASS_RATE,
        "Success rate of the original responses of the last batch"
    );
    describe_gauge!(
        CONSTRAINT_ACCURACY,
        "Mean constraint-level accuracy of the original responses of the last batch"
    );
    describe_counter!(
        REPLAYS_EMITTED_TOTAL,
        Unit::Count,
        "Hindsight replays emitted in batches"
    );
    describe_counter!(
        REPLAY_SHORTFALL_TOTAL,
        Unit::Count,
        "Replays missing because fewer than K responses were eligible"
    );
    describe_counter!(BATCHES_TOTAL, Unit::Count, "Training batches assembled");
    describe_counter!(
        LEASES_EXPIRED_TOTAL,
        Unit::Count,
        "Prompt leases that expired"
    );
    describe_counter!(
        GROUPS_STALE_TOTAL,
        Unit::Count,
        "Groups dropped by the staleness bound"
    );
    describe_gauge!(
        PROMPTS_QUEUED,
        Unit::Count,
        "Prompts queued in the current epoch"
    );
    describe_gauge!(
        GROUPS_WAITING,
        Unit::Count,
        "Accepted groups not yet in a batch"
    );
    describe_gauge!(LEASES_ACTIVE, Unit::Count, "Active prompt leases");
    describe_gauge!(
        BATCHES_UNACKED,
        Unit::Count,
        "Batches built and not yet acknowledged"
    );
    describe_gauge!(LEARNER_STEP, Unit::Count, "Learner steps completed");
    describe_gauge!(
        POLICY_VERSION,
        Unit::Count,
        "Newest policy version of the learner"
    );
    describe_gauge!(
        ACTOR_POLICY_VERSION,
        Unit::Count,
        "Policy version each actor reported"
    );
    describe_gauge!(
        ACTORS_ACTIVE,
        Unit::Count,
        "Actors seen within one lease timeout"
    );
    describe_histogram!(
        VERIFY_SECONDS,
        Unit::Seconds,
        "Time to verify one rollout group"
    );
    describe_histogram!(
        INGEST_SECONDS,
        Unit::Seconds,
        "Time from receiving a rollout group to acknowledging it (verification and fsync)"
    );
    describe_counter!(
        PROMPTS_LEASED_TOTAL,
        Unit::Count,
        "Prompts handed out in leases"
    );
    describe_gauge!(
        BATCHES_UNCOMMITTED,
        Unit::Count,
        "Batches not yet covered by a learner checkpoint"
    );
    describe_gauge!(
        PENDING_GROUPS,
        Unit::Count,
        "Groups waiting for the learner (leased, waiting, or in an untrained batch)"
    );
    describe_gauge!(
        PENDING_BYTES,
        Unit::Bytes,
        "Log bytes of the groups waiting for the learner"
    );
    describe_gauge!(LEASES_PAUSED, "1 while back-pressure refuses leases");
    describe_counter!(
        LEASES_PAUSED_SECONDS_TOTAL,
        Unit::Milliseconds,
        "Time leases spent paused by back-pressure"
    );
    describe_gauge!(
        COMMITTED_BATCH,
        "Newest batch id covered by a learner checkpoint"
    );
    describe_histogram!(
        ASSEMBLE_SECONDS,
        Unit::Seconds,
        "Time to read a batch's groups back from the log and assemble it"
    );
    describe_counter!(
        REQUESTS_REFUSED_TOTAL,
        Unit::Count,
        "Requests refused by validation or the protocol, by rpc"
    );
}
