//! The actor's Prometheus series, in one place (recorded with the `metrics` facade; the CLI
//! installs the exporter that serves them on `/metrics`).
//!
//! Naming: `hindsight_actor_<what>_<base unit>`, counters end in `_total`. Durations that add up
//! (time backed off) are histograms: their `_sum` is the seconds counter (the facade's counters
//! are integers). Every histogram has explicit buckets ([`BUCKETS`]) so that the series of many
//! actors can be summed.

/// Rollout groups the replay server acknowledged.
pub const ROLLOUT_GROUPS: &str = "hindsight_actor_groups_total";
/// Groups the replay server did not accept (expired lease, stale, declined).
pub const REJECTED_GROUPS: &str = "hindsight_actor_groups_rejected_total";
/// Prompts this actor received in leases.
pub const PROMPTS_LEASED: &str = "hindsight_actor_prompts_leased_total";
/// Responses generated.
pub const RESPONSES: &str = "hindsight_actor_responses_total";
/// Tokens generated.
pub const GENERATED_TOKENS: &str = "hindsight_actor_generated_tokens_total";
/// Wall time of one generation batch.
pub const GENERATION_SECONDS: &str = "hindsight_actor_generation_seconds";
/// Generation throughput of the last batch (tokens per second).
pub const TOKENS_PER_SECOND: &str = "hindsight_actor_tokens_per_second";
/// Weight version this actor generates with.
pub const POLICY_VERSION: &str = "hindsight_actor_policy_version";
/// Newest weight version the learner's manifest reported.
pub const LEARNER_POLICY_VERSION: &str = "hindsight_actor_learner_policy_version";
/// Versions this actor's weights are behind the newest the learner reported.
pub const POLICY_VERSION_LAG: &str = "hindsight_actor_policy_version_lag";
/// Weight versions swapped in.
pub const WEIGHT_UPDATES: &str = "hindsight_actor_weight_updates_total";
/// Time to fetch, verify and load one weight version.
pub const WEIGHT_FETCH_SECONDS: &str = "hindsight_actor_weight_fetch_seconds";
/// Weight bytes received from the learner (broken transfers included).
pub const WEIGHT_FETCH_BYTES: &str = "hindsight_actor_weight_fetch_bytes_total";
/// 1 while the replay server refuses leases (back-pressure) and this actor waits, else 0.
pub const LEASE_BACKOFF: &str = "hindsight_actor_lease_backoff";
/// Each wait because the replay server was full (`_sum`: seconds backed off in all).
pub const LEASE_BACKOFF_SECONDS: &str = "hindsight_actor_lease_backoff_seconds";

/// Explicit histogram buckets (seconds) of every actor histogram.
pub const BUCKETS: &[(&str, &[f64])] = &[
    (
        GENERATION_SECONDS,
        &[
            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
        ],
    ),
    (
        WEIGHT_FETCH_SECONDS,
        &[
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0,
        ],
    ),
    // The server's retry-after is clamped to 10 ms .. 10 s.
    (
        LEASE_BACKOFF_SECONDS,
        &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
    ),
];

/// Registers help texts and units (call once at start-up).
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        ROLLOUT_GROUPS,
        "Rollout groups acknowledged by the replay server"
    );
    describe_counter!(
        REJECTED_GROUPS,
        "Groups the replay server did not accept (expired lease, stale)"
    );
    describe_counter!(PROMPTS_LEASED, "Prompts received in leases");
    describe_counter!(RESPONSES, "Responses generated");
    describe_counter!(GENERATED_TOKENS, "Tokens generated");
    describe_histogram!(
        GENERATION_SECONDS,
        Unit::Seconds,
        "Wall time of one generation batch"
    );
    describe_gauge!(TOKENS_PER_SECOND, "Generation throughput of the last batch");
    describe_gauge!(POLICY_VERSION, "Weight version this actor generates with");
    describe_gauge!(
        LEARNER_POLICY_VERSION,
        "Newest weight version the learner reported"
    );
    describe_gauge!(
        POLICY_VERSION_LAG,
        "Weight versions this actor is behind the newest the learner reported"
    );
    describe_counter!(
        WEIGHT_UPDATES,
        "Weight versions swapped in, by how they came (via: grpc, or shared: mapped from the learner's shared directory)"
    );
    describe_histogram!(
        WEIGHT_FETCH_SECONDS,
        Unit::Seconds,
        "Time to fetch, verify and load a weight version"
    );
    describe_counter!(
        WEIGHT_FETCH_BYTES,
        Unit::Bytes,
        "Weight bytes received from the learner"
    );
    describe_gauge!(
        LEASE_BACKOFF,
        "1 while the replay server refuses leases and this actor waits"
    );
    describe_histogram!(
        LEASE_BACKOFF_SECONDS,
        Unit::Seconds,
        "Each wait because the replay server was full (sum: seconds backed off)"
    );
}

/// Records this actor's version and the newest the learner reported (the lag is their
/// difference; a learner that restarted below us reads as lag 0).
pub fn record_versions(own: u64, learner_newest: u64) {
    ::metrics::gauge!(POLICY_VERSION).set(own as f64);
    ::metrics::gauge!(LEARNER_POLICY_VERSION).set(learner_newest as f64);
    ::metrics::gauge!(POLICY_VERSION_LAG).set(learner_newest.saturating_sub(own) as f64);
}

/// Creates the counters at zero and the version gauges, so that `rate()` and the dashboards see
/// this actor from its start (a counter that has never moved would have no series at all).
pub fn init() {
    use ::metrics::{counter, gauge};
    record_versions(0, 0);
    for name in [
        ROLLOUT_GROUPS,
        REJECTED_GROUPS,
        PROMPTS_LEASED,
        RESPONSES,
        GENERATED_TOKENS,
        WEIGHT_FETCH_BYTES,
    ] {
        counter!(name).absolute(0);
    }
    for via in ["grpc", "shared"] {
        counter!(WEIGHT_UPDATES, "via" => via).absolute(0);
    }
    gauge!(LEASE_BACKOFF).set(0.0);
    // Histograms too: their buckets read zero until the first observation.
    for (name, _) in BUCKETS {
        let _ = ::metrics::histogram!(*name);
    }
}
