//! The actor's Prometheus series (recorded with the `metrics` facade; the CLI installs the
//! exporter that serves them on `/metrics`).

pub const ROLLOUT_GROUPS: &str = "hindsight_actor_groups_total";
pub const RESPONSES: &str = "hindsight_actor_responses_total";
pub const GENERATED_TOKENS: &str = "hindsight_actor_generated_tokens_total";
pub const GENERATION_SECONDS: &str = "hindsight_actor_generation_seconds";
pub const TOKENS_PER_SECOND: &str = "hindsight_actor_tokens_per_second";
pub const POLICY_VERSION: &str = "hindsight_actor_policy_version";
pub const WEIGHT_UPDATES: &str = "hindsight_actor_weight_updates_total";
pub const WEIGHT_FETCH_SECONDS: &str = "hindsight_actor_weight_fetch_seconds";
pub const REJECTED_GROUPS: &str = "hindsight_actor_groups_rejected_total";
/// 1 while the replay server refuses leases (back-pressure) and this actor waits, else 0.
pub const LEASE_BACKOFF: &str = "hindsight_actor_lease_backoff";
/// Time spent waiting because the replay server was full, in milliseconds.
pub const LEASE_BACKOFF_SECONDS: &str = "hindsight_actor_lease_backoff_milliseconds_total";

pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        ROLLOUT_GROUPS,
        "Rollout groups acknowledged by the replay server"
    );
    describe_counter!(RESPONSES, "Responses generated");
    describe_counter!(GENERATED_TOKENS, "Tokens generated");
    describe_histogram!(
        GENERATION_SECONDS,
        Unit::Seconds,
        "Wall time of one generation batch"
    );
    describe_gauge!(TOKENS_PER_SECOND, "Generation throughput of the last batch");
    describe_gauge!(POLICY_VERSION, "Weight version this actor generates with");
    describe_counter!(WEIGHT_UPDATES, "Weight versions swapped in");
    describe_gauge!(
        LEASE_BACKOFF,
        "1 while the replay server refuses leases and this actor waits"
    );
    describe_counter!(
        LEASE_BACKOFF_SECONDS,
        Unit::Milliseconds,
        "Time spent waiting because the replay server was full"
    );
    describe_histogram!(
        WEIGHT_FETCH_SECONDS,
        Unit::Seconds,
        "Time to fetch, verify and load a weight version"
    );
    describe_counter!(
        REJECTED_GROUPS,
        "Groups the replay server did not accept (expired lease, stale)"
    );
}
