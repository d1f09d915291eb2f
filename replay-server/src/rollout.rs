//! Rollout groups: structural validation and verification (scoring).
//!
//! [`validate_group`] checks everything about a group that does not depend on leases,
//! without touching any state, so an invalid group changes nothing. [`score_group`] decodes
//! every response's token ids itself (the learner trains on the tokens, so the reward must
//! follow them: the text an actor may send is ignored), runs the constraint verifiers and
//! computes reward, constraint-level accuracy (CLA) and mean token entropy: the inputs of
//! batch assembly.

use std::sync::Arc;

use hindsight_constraints::hir;
use hindsight_proto::v1::RolloutGroup;

use crate::codec::PromptCodec;
use crate::prompts::PromptEntry;

/// Largest response text accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 256 * 1024;
/// Largest actor id accepted, in bytes.
pub const MAX_ACTOR_ID_BYTES: usize = 256;
/// Largest behaviour log-prob accepted (a log-prob is <= 0; this allows rounding).
pub const MAX_LOGPROB: f32 = 1e-3;
/// Smallest behaviour log-prob accepted: a token of probability e^-40 (4e-18) is never
/// sampled in practice, so a smaller value is a broken or hostile actor, and dividing by it
/// would blow up the learner's importance ratio.
pub const MIN_LOGPROB: f32 = -40.0;
/// How far ahead of the newest version the server knows a group's version may be
/// (the learner publishes weights before its AckBatch reaches the server).
pub const VERSION_LEAD: u64 = 2;

/// Limits a group is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Exact number of responses per group.
    pub responses: usize,
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Most tokens per response (max_new_tokens, plus one for a trailing EOS).
    pub max_tokens: usize,
    /// Newest policy version the server knows of.
    pub newest_version: u64,
}

/// Checks the shape and values of `group`; the error says what is wrong.
pub fn validate_group(group: &RolloutGroup, limits: &Limits) -> Result<(), String> {
    if group.prompt_id.is_empty() {
        return Err("prompt_id is empty".into());
    }
    if group.lease_id.is_empty() {
        return Err("lease_id is empty".into());
    }
    if group.actor_id.len() > MAX_ACTOR_ID_BYTES {
        return Err(format!(
            "actor_id is longer than {MAX_ACTOR_ID_BYTES} bytes"
        ));
    }
    if group.responses.len() != limits.responses {
        return Err(format!(
            "group for lease {} has {} responses, expected exactly {}",
            group.lease_id,
            group.responses.len(),
            limits.responses
        ));
    }
    let newest_allowed = limits.newest_version.saturating_add(VERSION_LEAD);
    if group.policy_version > newest_allowed {
        return Err(format!(
            "policy_version {} is ahead of the newest known version {}",
            group.policy_version, limits.newest_version
        ));
    }
    for (i, r) in group.responses.iter().enumerate() {
        let n = r.token_ids.len();
        if n > limits.max_tokens {
            return Err(format!(
                "response {i} has {n} tokens, more than {}",
                limits.max_tokens
            ));
        }
        if r.logprobs.len() != n {
            return Err(format!(
                "response {i} has {} logprobs for {n} token_ids",
                r.logprobs.len()
            ));
        }
        if r.entropies.len() != n {
            return Err(format!(
                "response {i} has {} entropies for {n} token_ids",
                r.entropies.len()
            ));
        }
        if r.text.len() > MAX_TEXT_BYTES {
            return Err(format!(
                "response {i} text is longer than {MAX_TEXT_BYTES} bytes (the server ignores it; \
                 leave it empty)"
            ));
        }
        if let Some((t, id)) = r
            .token_ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= limits.vocab_size)
        {
            return Err(format!(
                "response {i} token {t} has id {id}, not below the vocabulary size {}",
                limits.vocab_size
            ));
        }
        if let Some((t, lp)) = r
            .logprobs
            .iter()
            .enumerate()
            .find(|(_, lp)| !(lp.is_finite() && (MIN_LOGPROB..=MAX_LOGPROB).contains(*lp)))
        {
            return Err(format!(
                "response {i} token {t} has logprob {lp}: must be finite, <= 0 and >= {MIN_LOGPROB}"
            ));
        }
        // No distribution over the vocabulary has more entropy than the uniform one.
        let max_entropy = (limits.vocab_size.max(1) as f32).ln() + 1e-3;
        if let Some((t, h)) = r
            .entropies
            .iter()
            .enumerate()
            .find(|(_, h)| !(h.is_finite() && **h >= 0.0 && **h <= max_entropy))
        {
            return Err(format!(
                "response {i} token {t} has entropy {h}: must be finite, >= 0 and <= ln(vocabulary size) = {max_entropy:.3}"
            ));
        }
    }
    Ok(())
}

/// Verification results of one response.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseScore {
    /// Strict verdict per constraint, in the instruction's order.
    pub verdicts: Vec<bool>,
    /// 1 when every constraint holds, else 0: success, and the binary reward (a sample's
    /// reward is chosen at assembly by `--reward`, see [`crate::config::Reward`]).
    pub reward: f32,
    /// Constraint-level accuracy: fraction of constraints that hold.
    pub cla: f64,
    /// Mean of the per-token entropies (0 for an empty response).
    pub mean_entropy: f64,
}

/// A group read back from the log with its scores: the input of batch assembly.
#[derive(Debug, Clone)]
pub struct ScoredGroup {
    /// Acceptance sequence number (the write-ahead log key).
    pub seq: u64,
    /// The training record it answers.
    pub entry: Arc<PromptEntry>,
    /// The group as the actor sent it.
    pub group: RolloutGroup,
    /// One score per response, same order as `group.responses`.
    pub scores: Vec<ResponseScore>,
}

/// Decodes and verifies every response of `group` against `entry`'s constraints.
pub fn score_group(
    entry: &PromptEntry,
    group: &RolloutGroup,
    codec: &dyn PromptCodec,
) -> Vec<ResponseScore> {
    group
        .responses
        .iter()
        .map(|r| {
            let text = codec.decode(&r.token_ids);
            let verdicts = entry.compiled.verify(&text);
            let mean_entropy = if r.entropies.is_empty() {
                0.0
            } else {
                r.entropies.iter().map(|&h| f64::from(h)).sum::<f64>() / r.entropies.len() as f64
            };
            ResponseScore {
                reward: hir::reward(&verdicts),
                cla: hir::constraint_accuracy(&verdicts),
                mean_entropy,
                verdicts,
            }
        })
        .collect()
}
