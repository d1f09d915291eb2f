//! The replay server's domain errors. The state machine returns these; the one mapping to gRPC
//! status codes is `impl From<ReplayError> for tonic::Status` at the service edge.

/// Why a request was not carried out.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ReplayError {
    /// The request itself is wrong (shape, limits, unknown ids): nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// The request is well formed but does not fit the server's state (an old learner
    /// incarnation, a checkpoint the server cannot serve from): nothing changed.
    #[error("{0}")]
    Conflict(String),
    /// Back-pressure: enough work waits for the learner; try again after the delay.
    #[error("{reason}")]
    Full { reason: String, retry_after_ms: u64 },
    /// The server cannot do it now (shutting down, the log cannot be written).
    #[error("{0}")]
    Unavailable(String),
    /// The client's model (architecture, tokenizer, template) is not the server's: its
    /// token ids would mean something else here. Both fingerprints, the client's shortened.
    #[error(
        "model fingerprint mismatch: the caller runs {theirs}, this replay server {ours}; \
         start every process with the same model"
    )]
    ModelMismatch { ours: String, theirs: String },
}

/// Shortens a client-supplied string for an error message or a log line (never echo megabytes).
pub fn shown(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &s[..end], s.len())
}
