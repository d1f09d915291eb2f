//! Advantage estimators: REINFORCE++ (the HiR reference's default) and GRPO.
//!
//! Both work on ragged per-sample token sequences (`Vec<Vec<f32>>`, one inner vector per
//! response) so that they can be unit-tested against hand-computed values and are independent
//! of the tensor library. The trainer pads the result into tensors.

/// Which estimator the learner uses (`--advantage`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum AdvantageKind {
    /// REINFORCE++: token-level returns with a KL penalty, whitened over the whole batch.
    #[value(name = "reinforce++", alias = "reinforce-pp")]
    ReinforcePp,
    /// GRPO: the sample reward normalised within its group, broadcast to every token.
    Grpo,
}

/// Epsilon inside the square root of the REINFORCE++ whitening.
pub const WHITEN_EPS: f64 = 1e-8;
/// Epsilon added to the group standard deviation in GRPO.
pub const GRPO_EPS: f64 = 1e-6;

/// REINFORCE++ advantages, exactly as the reference (OpenRLHF-style) computes them:
///
/// * per-token reward `r_t = -beta * (logp_old_t - logp_ref_t)` at every response token, plus the
///   sample reward at the last token;
/// * return `G_t = sum_{t' >= t} r_t'` (gamma = 1);
/// * advantage = `(G - mean) / sqrt(var + 1e-8)` with mean and *unbiased* variance taken over all
///   response tokens of the batch.
///
/// `logp_ref` is `None` when no reference model is loaded (then the KL term is 0 whatever
/// `beta` is). Sequences may be empty; they get empty advantages. All arithmetic is f64.
pub fn reinforce_pp(
    rewards: &[f32],
    logp_old: &[Vec<f32>],
    logp_ref: Option<&[Vec<f32>]>,
    beta: f64,
) -> Vec<Vec<f32>> {
    let returns: Vec<Vec<f64>> = rewards
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let n = logp_old[i].len();
            let mut per_token = vec![0f64; n];
            if let Some(lref) = logp_ref {
                for t in 0..n {
                    let kl = logp_old[i][t] as f64 - lref[i][t] as f64;
                    per_token[t] = -beta * kl;
                }
            }
            if n > 0 {
                per_token[n - 1] += r as f64;
            }
            let mut acc = 0f64;
            let mut ret = vec![0f64; n];
            for t in (0..n).rev() {
                acc += per_token[t];
                ret[t] = acc;
            }
            ret
        })
        .collect();
    let count: usize = returns.iter().map(Vec::len).sum();
    if count == 0 {
        return returns.iter().map(|_| Vec::new()).collect();
    }
    let mean = returns.iter().flatten().sum::<f64>() / count as f64;
    let var = if count > 1 {
        returns
            .iter()
            .flatten()
            .map(|g| (g - mean) * (g - mean))
            .sum::<f64>()
            / (count - 1) as f64
    } else {
        0.0
    };
    let inv = 1.0 / (var + WHITEN_EPS).sqrt();
    returns
        .into_iter()
        .map(|seq| seq.into_iter().map(|g| ((g - mean) * inv) as f32).collect())
        .collect()
}

/// GRPO advantages: `(r_i - mean_g) / (std_g + 1e-6)` within each group `g` (samples sharing a
/// `group_index`; a hindsight replay belongs to the group of its source response), with the
/// unbiased standard deviation (0 for a group of one), broadcast over the sample's tokens.
pub fn grpo(rewards: &[f32], group_index: &[u32], lengths: &[usize]) -> Vec<Vec<f32>> {
    use std::collections::BTreeMap;
    let mut groups: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for (&r, &g) in rewards.iter().zip(group_index) {
        groups.entry(g).or_default().push(r as f64);
    }
    let stats: BTreeMap<u32, (f64, f64)> = groups
        .into_iter()
        .map(|(g, rs)| {
            let n = rs.len() as f64;
            let mean = rs.iter().sum::<f64>() / n;
            let std = if rs.len() > 1 {
                (rs.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / (n - 1.0)).sqrt()
            } else {
                0.0
            };
            (g, (mean, std))
        })
        .collect();
    rewards
        .iter()
        .zip(group_index)
        .zip(lengths)
        .map(|((&r, g), &len)| {
            let (mean, std) = stats[g];
            let a = ((r as f64 - mean) / (std + GRPO_EPS)) as f32;
            vec![a; len]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f64) -> bool {
        (a as f64 - b).abs() < 1e-5
    }

    #[test]
    fn reinforce_pp_without_kl_matches_hand_computation() {
        // Two samples: reward 1 with 2 tokens, reward 0 with 1 token.
        // Returns: [1, 1] and [0]; mean 2/3; unbiased var = ((1/3)^2*2 + (2/3)^2)/2 = 1/3.
        let adv = reinforce_pp(&[1.0, 0.0], &[vec![-0.1, -0.2], vec![-0.3]], None, 0.001);
        let sd = (1.0f64 / 3.0 + 1e-8).sqrt();
        assert!(close(adv[0][0], (1.0 / 3.0) / sd));
        assert!(close(adv[0][1], (1.0 / 3.0) / sd));
        assert!(close(adv[1][0], (-2.0 / 3.0) / sd));
    }

    #[test]
    fn reinforce_pp_with_kl_uses_suffix_sums() {
        // One sample, reward 1, kl per token = old - ref = [0.5, -1.0], beta = 0.1.
        // per-token rewards: [-0.05, 0.1 + 1] ; returns: [1.05, 1.1]
        // mean 1.075, unbiased var = (0.025^2 * 2) / 1 = 0.00125.
        let old = vec![vec![-1.0f32, -2.0]];
        let reference = vec![vec![-1.5f32, -1.0]];
        let adv = reinforce_pp(&[1.0], &old, Some(&reference), 0.1);
        let sd = (0.00125f64 + 1e-8).sqrt();
        assert!(close(adv[0][0], -0.025 / sd), "{:?}", adv);
        assert!(close(adv[0][1], 0.025 / sd), "{:?}", adv);
    }

    #[test]
    fn reinforce_pp_whitening_is_zero_mean() {
        let adv = reinforce_pp(
            &[1.0, 0.0, 1.0],
            &[vec![-1.0; 3], vec![-1.0; 5], vec![-1.0; 2]],
            None,
            0.0,
        );
        let all: Vec<f64> = adv.iter().flatten().map(|&a| a as f64).collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let var = all.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (all.len() - 1) as f64;
        assert!(mean.abs() < 1e-6);
        assert!((var - 1.0).abs() < 1e-4);
    }

    #[test]
    fn reinforce_pp_handles_degenerate_batches() {
        // All rewards equal: every return equal, variance 0 -> advantages 0, finite.
        let adv = reinforce_pp(&[1.0, 1.0], &[vec![-1.0], vec![-1.0]], None, 0.0);
        assert!(adv.iter().flatten().all(|a| *a == 0.0));
        let adv = reinforce_pp(&[1.0, 0.0], &[vec![], vec![]], None, 0.0);
        assert!(adv.iter().all(Vec::is_empty));
    }

    #[test]
    fn grpo_normalises_within_groups() {
        // group 0: rewards [1, 0, 0] -> mean 1/3, std (unbiased) = sqrt(1/3)
        // group 1: single sample -> 0
        let adv = grpo(&[1.0, 0.0, 0.0, 1.0], &[0, 0, 0, 1], &[2, 1, 1, 3]);
        let sd = (1.0f64 / 3.0).sqrt() + 1e-6;
        assert_eq!(adv[0].len(), 2);
        assert!(close(adv[0][0], (2.0 / 3.0) / sd));
        assert!(close(adv[1][0], (-1.0 / 3.0) / sd));
        assert_eq!(adv[3], vec![0.0; 3]);
    }
}
