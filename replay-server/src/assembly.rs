//! HiR batch assembly: one window of complete groups becomes one training batch.
//!
//! Originals are all responses of every group in the window (reward by `--reward`: 1 or 0
//! with `binary`, the fraction of constraints that hold with `cla`; behaviour log-probs from
//! the actor). With hindsight on, the responses with 0 < CLA < 1 are replay
//! candidates, scored `lambda_s * CLA + mean token entropy`; the top K (`hir::select`) are
//! replayed with an instruction rewritten to keep only the constraints they satisfied
//! (reward 1, prompt re-templated, response tokens and log-probs of the source). Fewer
//! candidates than K means every candidate is replayed and the rest is a shortfall.

use hindsight_constraints::hir;
use hindsight_proto::v1::{BatchStats, Provenance, Sample, TrainingBatch};

use crate::codec::PromptCodec;
use crate::config::Reward;
use crate::rollout::ScoredGroup;

/// What a window is assembled for.
#[derive(Debug, Clone, Copy)]
pub struct WindowParams {
    /// K: replays wanted (0 with hindsight off).
    pub replays: usize,
    /// The learner step s this batch is for (completed steps + 1).
    pub step: u64,
    /// lambda_s of the selection score.
    pub lambda: f64,
    /// The learner's current policy version (for the staleness statistic).
    pub learner_version: u64,
    /// What an original's reward is (a replay's is always 1).
    pub reward: Reward,
}

/// A batch (without its id) and how it went.
#[derive(Debug, Clone)]
pub struct Assembled {
    /// The batch; `batch_id` is left 0 for the caller to assign.
    pub batch: TrainingBatch,
    /// Eligible candidates whose rewrite failed (counted in the shortfall too).
    pub failed_rewrites: usize,
}

/// Index of one response in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseRef {
    /// Position of the group in the window.
    pub group: usize,
    /// Position of the response in its group.
    pub response: usize,
}

/// Replay candidates of a window: every response with 0 < CLA < 1, in window order.
pub fn candidates(window: &[ScoredGroup]) -> Vec<(ResponseRef, hir::Candidate)> {
    let mut out = Vec::new();
    for (g, group) in window.iter().enumerate() {
        for (r, score) in group.scores.iter().enumerate() {
            if score.cla > 0.0 && score.cla < 1.0 {
                out.push((
                    ResponseRef {
                        group: g,
                        response: r,
                    },
                    hir::Candidate {
                        cla: score.cla as _,
                        mean_entropy: score.mean_entropy as _,
                    },
                ));
            }
        }
    }
    out
}

/// The responses HiR replays: the top `k` candidates by score (all of them when fewer).
pub fn select_replays(window: &[ScoredGroup], k: usize, lambda: f64) -> Vec<ResponseRef> {
    if k == 0 {
        return Vec::new();
    }
    let cands = candidates(window);
    let pool: Vec<hir::Candidate> = cands.iter().map(|(_, c)| c.clone()).collect();
    hir::select(&pool, k, lambda)
        .into_iter()
        .filter_map(|i| cands.get(i).map(|(at, _)| *at))
        .collect()
}

fn provenance(group: &ScoredGroup, response: usize, kept: Vec<String>) -> Provenance {
    Provenance {
        prompt_id: group.entry.id.clone(),
        actor_id: group.group.actor_id.clone(),
        policy_version: group.group.policy_version,
        response_index: response as u32,
        kept_instruction_ids: kept,
        verdicts: group
            .scores
            .get(response)
            .map(|s| s.verdicts.clone())
            .unwrap_or_default(),
        instruction_ids: group.entry.instruction_ids.clone(),
        group_seq: group.seq,
        lease_id: group.group.lease_id.clone(),
    }
}

/// Builds the batch of one window (see the module docs).
pub fn assemble(
    window: &[ScoredGroup],
    params: &WindowParams,
    codec: &dyn PromptCodec,
) -> Assembled {
    let mut samples = Vec::new();
    let mut cla_sum = 0.0f64;
    let mut success_sum = 0.0f64;
    let mut staleness_sum = 0.0f64;
    for (g, group) in window.iter().enumerate() {
        staleness_sum += params
            .learner_version
            .saturating_sub(group.group.policy_version) as f64;
        for (r, (resp, score)) in group.group.responses.iter().zip(&group.scores).enumerate() {
            cla_sum += score.cla;
            success_sum += f64::from(score.reward);
            samples.push(Sample {
                prompt_token_ids: group.entry.prompt_token_ids.clone(),
                response_token_ids: resp.token_ids.clone(),
                loss_mask: vec![1; resp.token_ids.len()],
                behaviour_logprobs: resp.logprobs.clone(),
                reward: params.reward.of(&score.verdicts),
                is_replay: false,
                group_index: g as u32,
                constraint_accuracy: score.cla as f32,
                instruction: group.entry.instruction.clone(),
                provenance: Some(provenance(group, r, Vec::new())),
                mean_entropy: score.mean_entropy as f32,
            });
        }
    }
    let originals = samples.len();

    let mut failed_rewrites = 0;
    let mut replays = 0usize;
    for at in select_replays(window, params.replays, params.lambda) {
        let Some(group) = window.get(at.group) else {
            continue;
        };
        let (Some(resp), Some(score)) = (
            group.group.responses.get(at.response),
            group.scores.get(at.response),
        ) else {
            continue;
        };
        let Some(rewrite) = group.entry.compiled.rewrite(&score.verdicts) else {
            failed_rewrites += 1;
            tracing::warn!(prompt_id = %group.entry.id, "no rewrite for a replay candidate");
            continue;
        };
        let prompt_token_ids = match codec.encode_chat(&rewrite.instruction) {
            Ok(ids) => ids,
            Err(e) => {
                failed_rewrites += 1;
                tracing::warn!(prompt_id = %group.entry.id, error = %e, "cannot tokenize a rewritten instruction");
                continue;
            }
        };
        replays += 1;
        samples.push(Sample {
            prompt_token_ids,
            response_token_ids: resp.token_ids.clone(),
            loss_mask: vec![1; resp.token_ids.len()],
            behaviour_logprobs: resp.logprobs.clone(),
            reward: 1.0,
            is_replay: true,
            group_index: at.group as u32,
            constraint_accuracy: score.cla as f32,
            instruction: rewrite.instruction,
            provenance: Some(provenance(group, at.response, rewrite.kept_ids)),
            mean_entropy: score.mean_entropy as f32,
        });
    }

    let div = |sum: f64, n: usize| if n == 0 { 0.0 } else { (sum / n as f64) as f32 };
    let stats = BatchStats {
        groups: window.len() as u32,
        original_samples: originals as u32,
        replay_samples: replays as u32,
        replay_shortfall: params.replays.saturating_sub(replays) as u32,
        success_rate: div(success_sum, originals),
        mean_constraint_accuracy: div(cla_sum, originals),
        mean_staleness: div(staleness_sum, window.len()),
        lambda: params.lambda,
    };
    Assembled {
        batch: TrainingBatch {
            batch_id: 0,
            step: params.step,
            samples,
            stats: Some(stats),
            temperature: 1.0,
        },
        failed_rewrites,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hindsight_constraints::PromptRecord;
    use hindsight_proto::v1::{Response, RolloutGroup};

    use super::*;
    use crate::codec::ByteCodec;
    use crate::prompts::PromptSet;
    use crate::rollout::score_group;

    /// no_comma, lowercase, ends with "any other questions?".
    pub(crate) fn record() -> PromptRecord {
        serde_json::from_value(serde_json::json!({
            "id": "sea",
            "question": "Describe the sea.",
            "constraints": [
                {"instruction_id": "punctuation:no_comma", "kwargs": {}},
                {"instruction_id": "change_case:english_lowercase", "kwargs": {}},
                {"instruction_id": "startend:end_checker", "kwargs": {"end_phrase": "Any other questions?"}}
            ]
        }))
        .unwrap()
    }

    fn response(text: &str, entropy: f32) -> Response {
        let n = text.len();
        Response {
            token_ids: text.bytes().map(u32::from).collect(),
            logprobs: (0..n).map(|i| -0.01 * i as f32).collect(),
            entropies: vec![entropy; n],
            finished: true,
            text: text.into(),
        }
    }

    fn window(texts: &[&str], groups: usize) -> Vec<ScoredGroup> {
        let set = PromptSet::from_records(vec![record()], &ByteCodec).unwrap();
        let entry = set.get(0).unwrap().clone();
        (0..groups)
            .map(|g| {
                let group = RolloutGroup {
                    actor_id: format!("actor-{g}"),
                    prompt_id: "sea".into(),
                    lease_id: format!("l{g}"),
                    policy_version: 1,
                    responses: texts
                        .iter()
                        .enumerate()
                        .map(|(r, t)| response(t, 0.1 * r as f32 + 0.01 * g as f32))
                        .collect(),
                    generation_ms: 0,
                    model_fingerprint: String::new(),
                };
                ScoredGroup {
                    seq: g as u64,
                    scores: score_group(&entry, &group, &ByteCodec),
                    entry: Arc::clone(&entry),
                    group,
                }
            })
            .collect()
    }

    const ALL3: &str = "the sea is calm and blue. any other questions?";
    const NO_COMMA_FAILS: &str = "the sea, calm and blue. any other questions?";
    const LOWER_FAILS: &str = "The sea is calm. any other questions?";
    const END_FAILS: &str = "the sea is calm and blue.";
    const ONE_OF_3: &str = "The sea, calm. Any other questions?";
    const NONE: &str = "The Sea, Calm.";

    #[test]
    fn verdicts_of_the_fixture_texts() {
        let w = window(
            &[ALL3, NO_COMMA_FAILS, LOWER_FAILS, END_FAILS, ONE_OF_3, NONE],
            1,
        );
        let v: Vec<Vec<bool>> = w[0].scores.iter().map(|s| s.verdicts.clone()).collect();
        assert_eq!(
            v,
            vec![
                vec![true, true, true],
                vec![false, true, true],
                vec![true, false, true],
                vec![true, true, false],
                vec![false, false, true],
                vec![false, false, false],
            ]
        );
        assert_eq!(w[0].scores[0].reward, 1.0);
        assert!((w[0].scores[1].cla - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn top_k_replays_with_rewritten_prompts() {
        let w = window(
            &[ALL3, NO_COMMA_FAILS, LOWER_FAILS, END_FAILS, ONE_OF_3, NONE],
            2,
        );
        let lambda = hir::lambda(1, 2.0, 0.05);
        let params = WindowParams {
            replays: 4,
            step: 1,
            lambda,
            learner_version: 3,
            reward: Reward::Binary,
        };
        let out = assemble(&w, &params, &ByteCodec);
        let b = &out.batch;
        assert_eq!(b.samples.len(), 12 + 4);
        let stats = b.stats.unwrap();
        assert_eq!(
            (
                stats.groups,
                stats.original_samples,
                stats.replay_samples,
                stats.replay_shortfall
            ),
            (2, 12, 4, 0)
        );
        assert!((stats.success_rate - 2.0 / 12.0).abs() < 1e-6);
        assert!((stats.mean_staleness - 2.0).abs() < 1e-6);
        assert_eq!(stats.lambda, lambda);
        // Highest entropy among the CLA = 2/3 candidates: response 3 then 2, group 1 first.
        let picked: Vec<(u32, u32)> = b.samples[12..]
            .iter()
            .map(|s| (s.group_index, s.provenance.as_ref().unwrap().response_index))
            .collect();
        assert_eq!(picked, vec![(1, 3), (0, 3), (1, 2), (0, 2)]);
        for s in &b.samples[12..] {
            let p = s.provenance.as_ref().unwrap();
            let src = &w[s.group_index as usize];
            let resp = &src.group.responses[p.response_index as usize];
            let rw = src.entry.compiled.rewrite(&p.verdicts).unwrap();
            assert!(s.is_replay);
            assert_eq!(s.reward, 1.0);
            assert_eq!(s.instruction, rw.instruction);
            assert_eq!(
                s.prompt_token_ids,
                ByteCodec.encode_chat(&rw.instruction).unwrap()
            );
            assert_eq!(s.response_token_ids, resp.token_ids);
            assert_eq!(s.behaviour_logprobs, resp.logprobs);
            assert_eq!(p.kept_instruction_ids, rw.kept_ids);
            assert_eq!(s.loss_mask, vec![1; resp.token_ids.len()]);
        }
        for (i, s) in b.samples[..12].iter().enumerate() {
            assert!(!s.is_replay);
            assert_eq!(s.group_index as usize, i / 6);
            assert_eq!(s.reward, if i % 6 == 0 { 1.0 } else { 0.0 });
            assert_eq!(s.prompt_token_ids, w[0].entry.prompt_token_ids);
        }
    }

    #[test]
    fn shortfall_when_too_few_candidates() {
        let w = window(&[ALL3, ALL3, NONE, "", ONE_OF_3, ALL3], 2);
        let params = WindowParams {
            replays: 4,
            step: 1,
            lambda: 2.1,
            learner_version: 1,
            reward: Reward::Binary,
        };
        let out = assemble(&w, &params, &ByteCodec);
        let stats = out.batch.stats.unwrap();
        assert_eq!((stats.replay_samples, stats.replay_shortfall), (2, 2));
        assert_eq!(out.batch.samples.len(), 14);
        assert!(select_replays(&w, 0, 2.1).is_empty());
    }

    #[test]
    fn cla_reward_is_the_fraction_of_constraints_that_hold() {
        let w = window(&[ALL3, NO_COMMA_FAILS, ONE_OF_3, NONE], 1);
        let params = |reward| WindowParams {
            replays: 0,
            step: 1,
            lambda: 2.0,
            learner_version: 1,
            reward,
        };
        let rewards = |reward| -> Vec<f32> {
            assemble(&w, &params(reward), &ByteCodec)
                .batch
                .samples
                .iter()
                .map(|s| s.reward)
                .collect()
        };
        assert_eq!(rewards(Reward::Binary), vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(rewards(Reward::Cla), vec![1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0]);
        // Success stays "every constraint holds", whatever the reward.
        let stats = assemble(&w, &params(Reward::Cla), &ByteCodec)
            .batch
            .stats
            .unwrap();
        assert_eq!(stats.success_rate, 0.25);
        assert!((stats.mean_constraint_accuracy - 0.5).abs() < 1e-6);
        // A replay's reward is 1 with either reward (every kept constraint holds).
        let mut p = params(Reward::Cla);
        p.replays = 2;
        let out = assemble(&w, &p, &ByteCodec).batch;
        let replays: Vec<f32> = out
            .samples
            .iter()
            .filter(|s| s.is_replay)
            .map(|s| s.reward)
            .collect();
        assert_eq!(replays, vec![1.0, 1.0]);
    }
}
