//! The evaluator's Prometheus series, in one place (recorded with the `metrics` facade; the
//! CLI installs the exporter). Naming as everywhere: `hindsight_evaluator_<what>_<unit>`,
//! counters end in `_total`, histograms have explicit buckets ([`BUCKETS`]).

use hindsight_constraints::score::Scores;

/// The last evaluation's accuracy, labelled `bench`, `level` (`prompt`, `instruction`) and
/// `mode` (`strict`, `loose`).
pub const SCORE: &str = "hindsight_evaluator_score_ratio";
/// The weight version the scores in [`SCORE`] belong to.
pub const EVALUATED_VERSION: &str = "hindsight_evaluator_evaluated_version";
/// The learner step that produced that version.
pub const EVALUATED_STEP: &str = "hindsight_evaluator_evaluated_step";
/// Evaluations finished.
pub const EVALUATIONS: &str = "hindsight_evaluator_evaluations_total";
/// Wall time of one evaluation (generation and scoring).
pub const EVALUATION_SECONDS: &str = "hindsight_evaluator_evaluation_seconds";
/// Prompts answered.
pub const RESPONSES: &str = "hindsight_evaluator_responses_total";
/// Tokens generated.
pub const GENERATED_TOKENS: &str = "hindsight_evaluator_generated_tokens_total";
/// Generation throughput of the last evaluation (tokens per second).
pub const TOKENS_PER_SECOND: &str = "hindsight_evaluator_tokens_per_second";
/// Newest weight version the learner's manifest reported.
pub const LEARNER_POLICY_VERSION: &str = "hindsight_evaluator_learner_policy_version";
/// Weight bytes received from the learner.
pub const WEIGHT_FETCH_BYTES: &str = "hindsight_evaluator_weight_fetch_bytes_total";

/// Explicit histogram buckets (seconds).
pub const BUCKETS: &[(&str, &[f64])] = &[(
    EVALUATION_SECONDS,
    &[
        0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0, 5120.0,
    ],
)];

/// The (level, mode) label pairs of [`SCORE`].
pub const SCORE_LABELS: [(&str, &str); 4] = [
    ("prompt", "strict"),
    ("prompt", "loose"),
    ("instruction", "strict"),
    ("instruction", "loose"),
];

/// Registers help texts and units (call once at start-up).
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        SCORE,
        "Accuracy of the last evaluation (bench, level prompt|instruction, mode strict|loose)"
    );
    describe_gauge!(EVALUATED_VERSION, "Weight version of the last evaluation");
    describe_gauge!(
        EVALUATED_STEP,
        "Learner step that produced the last evaluated version"
    );
    describe_counter!(EVALUATIONS, "Evaluations finished");
    describe_histogram!(
        EVALUATION_SECONDS,
        Unit::Seconds,
        "Wall time of one evaluation (generation and scoring)"
    );
    describe_counter!(RESPONSES, "Prompts answered");
    describe_counter!(GENERATED_TOKENS, "Tokens generated");
    describe_gauge!(
        TOKENS_PER_SECOND,
        "Generation throughput of the last evaluation"
    );
    describe_gauge!(
        LEARNER_POLICY_VERSION,
        "Newest weight version the learner reported"
    );
    describe_counter!(
        WEIGHT_FETCH_BYTES,
        Unit::Bytes,
        "Weight bytes received from the learner"
    );
}

/// Creates every series at start-up (counters at zero, scores absent until the first
/// evaluation: a score of 0 would be a claim).
pub fn init() {
    for name in [EVALUATIONS, RESPONSES, GENERATED_TOKENS, WEIGHT_FETCH_BYTES] {
        ::metrics::counter!(name).absolute(0);
    }
    ::metrics::gauge!(LEARNER_POLICY_VERSION).set(0.0);
    for (name, _) in BUCKETS {
        let _ = ::metrics::histogram!(*name);
    }
}

/// Records one evaluation's scores.
pub fn record_scores(bench: &str, s: &Scores, version: u64, step: u64) {
    let values = [
        s.prompt_strict,
        s.prompt_loose,
        s.instruction_strict,
        s.instruction_loose,
    ];
    for ((level, mode), v) in SCORE_LABELS.iter().zip(values) {
        ::metrics::gauge!(SCORE, "bench" => bench.to_string(), "level" => *level, "mode" => *mode)
            .set(v.unwrap_or(0.0));
    }
    ::metrics::gauge!(EVALUATED_VERSION).set(version as f64);
    ::metrics::gauge!(EVALUATED_STEP).set(step as f64);
    ::metrics::counter!(EVALUATIONS).increment(1);
}

/// What the weight follower records.
pub const OBSERVER: hindsight_follower::Observer = hindsight_follower::Observer {
    versions: |_, newest| ::metrics::gauge!(LEARNER_POLICY_VERSION).set(newest as f64),
    fetched_bytes: |n| ::metrics::counter!(WEIGHT_FETCH_BYTES).increment(n),
};
