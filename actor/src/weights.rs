//! The actor's side of following the learner: the shared follower
//! (`hindsight-follower`, also used by the evaluator) with the actor's metrics as its
//! [`Observer`].

pub use hindsight_follower::*;

/// Records the actor's version gauges and fetched bytes.
pub const OBSERVER: Observer = Observer {
    versions: crate::metrics::record_versions,
    fetched_bytes: |n| ::metrics::counter!(crate::metrics::WEIGHT_FETCH_BYTES).increment(n),
};
