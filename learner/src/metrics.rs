//! The learner's Prometheus series (recorded with the `metrics` facade; the CLI installs the
//! exporter that serves them on `/metrics`).

pub const STEP: &str = "hindsight_learner_step";
pub const LOSS: &str = "hindsight_loss";
pub const STEP_SECONDS: &str = "hindsight_step_seconds";
pub const GRAD_NORM: &str = "hindsight_grad_norm";
pub const WEIGHT_VERSION: &str = "hindsight_weight_version";
pub const WEIGHT_BYTES: &str = "hindsight_weight_bytes";
pub const TRAIN_TOKENS: &str = "hindsight_train_tokens_total";
pub const TRAIN_TOKENS_PER_SECOND: &str = "hindsight_train_tokens_per_second";
pub const BATCH_REWARD: &str = "hindsight_batch_reward_mean";
pub const CLIP_FRACTION: &str = "hindsight_clip_fraction";
pub const CHECKPOINTS: &str = "hindsight_checkpoints_total";

/// Registers help texts and units (call once at start-up).
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(STEP, "Optimizer steps completed by the learner");
    describe_gauge!(LOSS, "Policy-gradient loss of the last step");
    describe_histogram!(STEP_SECONDS, Unit::Seconds, "Wall time of one learner step");
    describe_gauge!(GRAD_NORM, "Global gradient L2 norm before clipping");
    describe_gauge!(WEIGHT_VERSION, "Newest published weight version");
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
        BATCH_REWARD,
        "Mean reward of the last batch (originals and replays)"
    );
    describe_gauge!(
        CLIP_FRACTION,
        "Fraction of tokens whose ratio was clipped in the last step"
    );
    describe_counter!(CHECKPOINTS, "Checkpoints written");
}
