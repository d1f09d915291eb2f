//! The learner's Prometheus series, in one place (recorded with the `metrics` facade; the CLI
//! installs the exporter that serves them on `/metrics`).
//!
//! Naming: `hindsight_learner_<what>_<base unit>`, counters end in `_total`. Time that adds up
//! (idle waiting for batches, busy training) is a histogram per batch: its `_sum` is the seconds
//! counter (the facade's counters are integers) and `_count` the batches. Every histogram has
//! explicit buckets ([`BUCKETS`]).

/// Optimizer steps completed (the step number; survives restarts through checkpoints).
pub const STEP: &str = "hindsight_learner_step";
/// Optimizer steps taken by this process (a counter: `rate()` is the step rate).
pub const STEPS: &str = "hindsight_learner_steps_total";
/// Policy-gradient loss of the last step.
pub const LOSS: &str = "hindsight_learner_loss";
/// Wall time of one training step (forward, backward, optimizer).
pub const STEP_SECONDS: &str = "hindsight_learner_step_seconds";
/// Time spent waiting for each batch (`_sum`: idle seconds).
pub const IDLE_SECONDS: &str = "hindsight_learner_idle_seconds";
/// Time from a batch's arrival to asking for the next: train, publish, ack, checkpoint
/// (`_sum`: busy seconds).
pub const BUSY_SECONDS: &str = "hindsight_learner_busy_seconds";
/// Global gradient L2 norm before clipping.
pub const GRAD_NORM: &str = "hindsight_learner_grad_norm";
/// Newest published weight version.
pub const POLICY_VERSION: &str = "hindsight_learner_policy_version";
/// Size of one published weight version.
pub const WEIGHT_BYTES: &str = "hindsight_learner_weight_bytes";
/// Response tokens trained on.
pub const TRAIN_TOKENS: &str = "hindsight_learner_train_tokens_total";
/// Training throughput of the last step (all tokens per second).
pub const TRAIN_TOKENS_PER_SECOND: &str = "hindsight_learner_train_tokens_per_second";
/// Mean reward of the last batch (originals and replays).
pub const REWARD_MEAN: &str = "hindsight_learner_reward_mean";
/// Success rate (reward 1) of the original responses of the last batch.
pub const SUCCESS_RATE: &str = "hindsight_learner_success_rate";
/// Samples trained on, by `kind` (`original`, `replay`).
pub const SAMPLES: &str = "hindsight_learner_samples_total";
/// Fraction of tokens whose ratio was clipped in the last step.
pub const CLIP_FRACTION: &str = "hindsight_learner_clip_fraction";
/// Clip fraction of the last step over the tokens of one `kind` of sample (`original`,
/// `replay`; set only when the batch had tokens of that kind).
pub const CLIP_FRACTION_BY_KIND: &str = "hindsight_learner_kind_clip_fraction";
/// Responses the actors generated for the batches trained (originals; the sample-efficiency
/// budget that compares HiR with the baselines).
pub const GENERATED_RESPONSES: &str = "hindsight_learner_generated_responses_total";
/// Checkpoints written.
pub const CHECKPOINTS: &str = "hindsight_learner_checkpoints_total";

const STEP_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
];

/// Explicit histogram buckets (seconds) of every learner histogram.
pub const BUCKETS: &[(&str, &[f64])] = &[
    (STEP_SECONDS, STEP_BUCKETS),
    (BUSY_SECONDS, STEP_BUCKETS),
    (
        IDLE_SECONDS,
        &[
            0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
            640.0,
        ],
    ),
];

/// Registers help texts and units (call once at start-up).
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(STEP, "Optimizer steps completed by the learner");
    describe_counter!(STEPS, "Optimizer steps taken by this process");
    describe_gauge!(LOSS, "Policy-gradient loss of the last step");
    describe_histogram!(
        STEP_SECONDS,
        Unit::Seconds,
        "Wall time of one training step"
    );
    describe_histogram!(
        IDLE_SECONDS,
        Unit::Seconds,
        "Time spent waiting for each batch (sum: idle seconds)"
    );
    describe_histogram!(
        BUSY_SECONDS,
        Unit::Seconds,
        "Time from a batch's arrival to asking for the next (sum: busy seconds)"
    );
    describe_gauge!(GRAD_NORM, "Global gradient L2 norm before clipping");
    describe_gauge!(POLICY_VERSION, "Newest published weight version");
    describe_gauge!(
        WEIGHT_BYTES,
        Unit::Bytes,
        "Size of one published weight version"
    );
    describe_counter!(TRAIN_TOKENS, "Response tokens trained on");
    describe_gauge!(
        TRAIN_TOKENS_PER_SECOND,
        "Training throughput of the last step (all tokens)"
    );
    describe_gauge!(
        REWARD_MEAN,
        "Mean reward of the last batch (originals and replays)"
    );
    describe_gauge!(
        SUCCESS_RATE,
        "Success rate of the original responses of the last batch"
    );
    describe_counter!(SAMPLES, "Samples trained on, by kind (original, replay)");
    describe_gauge!(
        CLIP_FRACTION,
        "Fraction of tokens whose ratio was clipped in the last step"
    );
    describe_gauge!(
        CLIP_FRACTION_BY_KIND,
        "Clip fraction of the last step over one kind of sample (original, replay)"
    );
    describe_counter!(
        GENERATED_RESPONSES,
        "Responses the actors generated for the batches trained (originals, not replays)"
    );
    describe_counter!(CHECKPOINTS, "Checkpoints written");
}

/// Sets the step gauge and creates the counters at zero, so that `rate()` and the dashboards
/// see this process from its start, before the first step.
pub fn init(step: u64) {
    use ::metrics::{counter, gauge};
    gauge!(STEP).set(step as f64);
    counter!(STEPS).absolute(0);
    counter!(CHECKPOINTS).absolute(0);
    counter!(TRAIN_TOKENS).absolute(0);
    counter!(GENERATED_RESPONSES).absolute(0);
    for kind in ["original", "replay"] {
        counter!(SAMPLES, "kind" => kind).absolute(0);
    }
    // Histograms too: their buckets read zero until the first observation.
    for (name, _) in BUCKETS {
        let _ = ::metrics::histogram!(*name);
    }
}
