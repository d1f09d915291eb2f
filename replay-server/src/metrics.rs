//! Metric names, histogram buckets and descriptions of the replay server, in one place.
//!
//! Naming: `hindsight_replay_<what>_<base unit>`, counters end in `_total`; time that adds up
//! (leases paused) is a histogram per episode whose `_sum` is the seconds counter. Every
//! histogram has explicit buckets ([`BUCKETS`]); the only per-actor label (`actor`) is capped
//! at 64 actors.
//!
//! The server only *records* through the [`metrics`] facade macros; the `hindsight` CLI
//! installs the Prometheus exporter. [`describe`] registers units and help texts and is
//! called once when the server starts (harmless when no recorder is installed).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Rollout groups received, by `result` (`accepted`, `invalid`, `expired`, `stale`, ...).
pub const ROLLOUT_GROUPS_TOTAL: &str = "hindsight_replay_groups_total";
/// Responses in accepted groups.
pub const RESPONSES_TOTAL: &str = "hindsight_replay_responses_total";
/// Per-constraint verdicts, by `instruction_id` and `result` (`pass` / `fail`).
pub const VERIFICATIONS_TOTAL: &str = "hindsight_replay_verifications_total";
/// Success rate (reward 1) of the original responses of the last batch.
pub const PASS_RATE: &str = "hindsight_replay_pass_rate";
/// Mean constraint-level accuracy of the original responses of the last batch.
pub const CONSTRAINT_ACCURACY: &str = "hindsight_replay_constraint_accuracy";
/// Hindsight replays put into batches.
pub const REPLAYS_EMITTED_TOTAL: &str = "hindsight_replay_replays_emitted_total";
/// Replays missing because fewer than K candidates had 0 < CLA < 1.
pub const REPLAY_SHORTFALL_TOTAL: &str = "hindsight_replay_shortfall_total";
/// Training batches assembled.
pub const BATCHES_TOTAL: &str = "hindsight_replay_batches_total";
/// Leases that expired (their prompt was re-queued).
pub const LEASES_EXPIRED_TOTAL: &str = "hindsight_replay_leases_expired_total";
/// Groups dropped for exceeding the staleness bound (their prompt was re-queued).
pub const GROUPS_STALE_TOTAL: &str = "hindsight_replay_groups_stale_total";
/// Prompts waiting in the queue of the current epoch.
pub const PROMPTS_QUEUED: &str = "hindsight_replay_prompts_queued";
/// Accepted groups not yet in a batch.
pub const GROUPS_WAITING: &str = "hindsight_replay_groups_waiting";
/// Active prompt leases.
pub const LEASES_ACTIVE: &str = "hindsight_replay_leases_active";
/// Batches built and not yet acknowledged by the learner.
pub const BATCHES_UNACKED: &str = "hindsight_replay_batches_unacked";
/// Learner steps completed (from AckBatch).
pub const LEARNER_STEP: &str = "hindsight_replay_learner_step";
/// Newest policy version published by the learner (from AckBatch).
pub const POLICY_VERSION: &str = "hindsight_replay_policy_version";
/// Policy version each actor last reported, by `actor`.
pub const ACTOR_POLICY_VERSION: &str = "hindsight_replay_actor_policy_version";
/// Actors seen within one lease timeout.
pub const ACTORS_ACTIVE: &str = "hindsight_replay_actors_active";
/// Time to verify one rollout group (all its responses).
pub const VERIFY_SECONDS: &str = "hindsight_replay_verify_seconds";
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
/// Each pause of leases by the limiter (`_sum`: seconds paused in all).
pub const LEASES_PAUSED_SECONDS: &str = "hindsight_replay_leases_paused_seconds";
/// Newest batch id covered by a learner checkpoint.
pub const COMMITTED_BATCH: &str = "hindsight_replay_committed_batch_id";
/// Time to read a batch's groups back from the log and assemble it.
pub const ASSEMBLE_SECONDS: &str = "hindsight_replay_batch_assembly_seconds";
/// Prompts leased again after they were put back (an expired or released lease, a stale or
/// orphaned group).
pub const PROMPTS_LEASED_AGAIN_TOTAL: &str = "hindsight_replay_prompts_leased_again_total";
/// Prompts put back in the queue, by `reason` (`expired`, `released`, `stale`, `orphaned`).
pub const PROMPTS_REQUEUED_TOTAL: &str = "hindsight_replay_prompts_requeued_total";
/// Time from a batch's composition to the learner's ack of it: the prefetch window's wait plus
/// the training step (batches composed before a restart are not timed).
pub const BATCH_WAIT_SECONDS: &str = "hindsight_replay_batch_wait_seconds";
/// The staleness bound in versions (`--max-staleness`), for alerts on lagging actors.
pub const MAX_STALENESS: &str = "hindsight_replay_max_staleness";
/// Requests refused by validation or the protocol, by `rpc`.
pub const REQUESTS_REFUSED_TOTAL: &str = "hindsight_replay_requests_refused_total";

/// Explicit histogram buckets (seconds) of every replay-server histogram.
pub const BUCKETS: &[(&str, &[f64])] = &[
    (
        VERIFY_SECONDS,
        &[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ],
    ),
    (
        INGEST_SECONDS,
        &[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ],
    ),
    (
        ASSEMBLE_SECONDS,
        &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ],
    ),
    (
        BATCH_WAIT_SECONDS,
        &[
            0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0,
        ],
    ),
    (
        LEASES_PAUSED_SECONDS,
        &[
            0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
        ],
    ),
];

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
    describe_histogram!(
        LEASES_PAUSED_SECONDS,
        Unit::Seconds,
        "Each pause of leases by back-pressure (sum: seconds paused)"
    );
    describe_counter!(
        PROMPTS_LEASED_AGAIN_TOTAL,
        Unit::Count,
        "Prompts leased again after they were put back"
    );
    describe_counter!(
        PROMPTS_REQUEUED_TOTAL,
        Unit::Count,
        "Prompts put back in the queue, by reason (expired, released, stale, orphaned)"
    );
    describe_histogram!(
        BATCH_WAIT_SECONDS,
        Unit::Seconds,
        "Time from a batch's composition to the learner's ack of it"
    );
    describe_gauge!(
        MAX_STALENESS,
        Unit::Count,
        "The staleness bound (--max-staleness): groups further behind are dropped"
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

/// Creates the counters at zero and sets the configuration gauges, so that `rate()`, alerts
/// and dashboards see this process from its start (a counter that has never moved would
/// otherwise have no series at all).
pub fn init(max_staleness: u64) {
    use metrics::{counter, gauge};
    gauge!(MAX_STALENESS).set(max_staleness as f64);
    for name in [
        RESPONSES_TOTAL,
        REPLAYS_EMITTED_TOTAL,
        REPLAY_SHORTFALL_TOTAL,
        BATCHES_TOTAL,
        LEASES_EXPIRED_TOTAL,
        GROUPS_STALE_TOTAL,
        PROMPTS_LEASED_TOTAL,
        PROMPTS_LEASED_AGAIN_TOTAL,
    ] {
        counter!(name).absolute(0);
    }
    for reason in ["expired", "released", "stale", "orphaned"] {
        counter!(PROMPTS_REQUEUED_TOTAL, "reason" => reason).absolute(0);
    }
    for result in [
        "accepted",
        "invalid",
        "duplicate",
        "expired",
        "stale",
        "orphaned",
    ] {
        counter!(ROLLOUT_GROUPS_TOTAL, "result" => result).absolute(0);
    }
    gauge!(LEASES_PAUSED).set(0.0);
    // Histograms too: their buckets read zero until the first observation.
    for (name, _) in BUCKETS {
        let _ = ::metrics::histogram!(*name);
    }
}
