//! The policy-gradient loss: PPO clipped surrogate with dual clip, token mean.
//!
//! `ratio = exp(log pi_theta - log pi_behaviour)`; per token
//! `l1 = -A * ratio`, `l2 = -A * clip(ratio, 1 - eps, 1 + eps)`, `l = max(l1, l2)`, and for
//! negative advantages the dual clip caps it: `l = min(l, -A * c)`. The batch loss is the sum of
//! `l` over valid tokens divided by the number of valid tokens of the *whole* batch (so that
//! micro-batches add up to the same gradient as one big batch).

use candle_core::{Result, Tensor};

/// Clipping parameters (`--clip`, `--dual-clip`).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PpoConfig {
    pub clip: f64,
    pub dual_clip: f64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            clip: 0.2,
            dual_clip: 3.0,
        }
    }
}

/// Summaries of one micro-batch, summed over valid tokens (divide by the token count).
#[derive(Clone, Debug, Default)]
pub struct PpoSums {
    pub clipped_tokens: f64,
    /// Clipped tokens of each row (sample) of the micro-batch, so that the caller can split
    /// the clip fraction by kind (original, replay).
    pub clipped_per_row: Vec<f64>,
    pub ratio_sum: f64,
    /// Sum of `log pi_behaviour - log pi_theta` (the k1 estimate of KL(behaviour || theta)).
    pub kl_sum: f64,
}

/// The loss of one token, in f64: the reference the tensor version is tested against.
pub fn token_loss(logp: f64, logp_old: f64, adv: f64, cfg: PpoConfig) -> f64 {
    let ratio = (logp - logp_old).exp();
    let l1 = -adv * ratio;
    let l2 = -adv * ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip);
    let clipped = l1.max(l2);
    if adv < 0.0 {
        clipped.min(-adv * cfg.dual_clip)
    } else {
        clipped
    }
}

/// Differentiable loss over a padded micro-batch: `logp` (from the trainable model, [B, T]),
/// `logp_old`, `adv` and `mask` (all [B, T], no gradient). Returns the loss divided by
/// `total_tokens` (valid tokens of the whole batch) and the micro-batch's summaries.
pub fn ppo_loss(
    logp: &Tensor,
    logp_old: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    cfg: PpoConfig,
    total_tokens: f64,
) -> Result<(Tensor, PpoSums)> {
    let log_ratio = (logp - logp_old)?;
    let ratio = log_ratio.exp()?;
    let neg_adv = adv.neg()?;
    let l1 = (&neg_adv * &ratio)?;
    let l2 = (&neg_adv * ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip)?)?;
    let clipped = l1.maximum(&l2)?;
    let l3 = neg_adv.affine(cfg.dual_clip, 0.0)?;
    let dual = clipped.minimum(&l3)?;
    let negative = adv.lt(0.0)?;
    let per_token = negative.where_cond(&dual, &clipped)?;
    let loss = ((per_token * mask)?.sum_all()? / total_tokens.max(1.0))?;

    // Summaries, computed without gradient.
    let ratio_d = ratio.detach();
    let outside = ratio_d
        .lt(1.0 - cfg.clip)?
        .maximum(&ratio_d.gt(1.0 + cfg.clip)?)?
        .to_dtype(mask.dtype())?;
    let clipped = (outside * mask)?;
    let clipped_per_row: Vec<f64> = clipped
        .sum(1)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let sums = PpoSums {
        clipped_tokens: clipped_per_row.iter().sum(),
        clipped_per_row,
        ratio_sum: (&ratio_d * mask)?.sum_all()?.to_scalar::<f32>()? as f64,
        kl_sum: (log_ratio.detach().neg()? * mask)?
            .sum_all()?
            .to_scalar::<f32>()? as f64,
    };
    Ok((loss, sums))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn token_loss_matches_hand_values() {
        let cfg = PpoConfig::default();
        // ratio 1: plain -A.
        assert!((token_loss(-1.0, -1.0, 2.0, cfg) - -2.0).abs() < 1e-12);
        // ratio e^0.5 = 1.6487 > 1.2 with A > 0: clipped to -A * 1.2.
        assert!((token_loss(-0.5, -1.0, 1.0, cfg) - -1.2).abs() < 1e-12);
        // ratio e^-0.5 = 0.6065 < 0.8 with A > 0: max(-0.6065, -0.8) = -0.6065 (unclipped).
        assert!((token_loss(-1.5, -1.0, 1.0, cfg) - -(-0.5f64).exp()).abs() < 1e-12);
        // A < 0, ratio e^2 = 7.389: l1 = 7.389, capped by dual clip at 3.0.
        assert!((token_loss(1.0, -1.0, -1.0, cfg) - 3.0).abs() < 1e-12);
        // A < 0, ratio e^0.1 = 1.105: l1 = 1.105, l2 = 1.105 -> 1.105 (< 3).
        assert!((token_loss(-0.9, -1.0, -1.0, cfg) - 0.1f64.exp()).abs() < 1e-12);
        // A < 0, ratio 0.5: l1 = 0.5, l2 = 0.8 -> 0.8.
        assert!((token_loss(0.5f64.ln(), 0.0, -1.0, cfg) - 0.8).abs() < 1e-12);
    }

    #[test]
    fn tensor_loss_matches_scalar_reference_and_masks() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = PpoConfig::default();
        let logp = [-1.0f32, -0.5, -1.5, 1.0, -0.9, -2.0];
        let old = [-1.0f32, -1.0, -1.0, -1.0, -1.0, -1.0];
        let adv = [2.0f32, 1.0, 1.0, -1.0, -1.0, 5.0];
        let mask = [1.0f32, 1.0, 1.0, 1.0, 1.0, 0.0];
        let t = |v: &[f32]| Tensor::from_slice(v, (2, 3), &dev);
        let (loss, sums) = ppo_loss(&t(&logp)?, &t(&old)?, &t(&adv)?, &t(&mask)?, cfg, 5.0)?;
        let expected: f64 = (0..5)
            .map(|i| token_loss(logp[i] as f64, old[i] as f64, adv[i] as f64, cfg))
            .sum::<f64>()
            / 5.0;
        let got = loss.to_scalar::<f32>()? as f64;
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        // Tokens 1 (ratio 1.65), 2 (0.61) and 3 (7.39) are outside [0.8, 1.2]; token 5 is masked.
        assert_eq!(sums.clipped_tokens, 3.0);
        // Row 0 holds tokens 0-2 (two clipped), row 1 tokens 3-5 (one, the masked one not).
        assert_eq!(sums.clipped_per_row, vec![2.0, 1.0]);
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = PpoConfig::default();
        let logp0 = [-1.0f32, -0.95, -1.1, -0.7, -0.6, -1.3];
        let old = [-1.0f32; 6];
        let adv = [2.0f32, 1.0, -1.0, -1.0, 0.5, -0.3];
        let mask = [1.0f32; 6];
        let var = Var::from_slice(&logp0, (1, 6), &dev)?;
        let t = |v: &[f32]| Tensor::from_slice(v, (1, 6), &dev);
        let (loss, _) = ppo_loss(var.as_tensor(), &t(&old)?, &t(&adv)?, &t(&mask)?, cfg, 6.0)?;
        let grads = loss.backward()?;
        let g = grads
            .get(var.as_tensor())
            .expect("gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        for i in 0..6 {
            let h = 1e-4;
            let f = |x: f64| token_loss(x, old[i] as f64, adv[i] as f64, cfg) / 6.0;
            let fd = (f(logp0[i] as f64 + h) - f(logp0[i] as f64 - h)) / (2.0 * h);
            assert!(
                (g[i] as f64 - fd).abs() < 1e-3,
                "token {i}: {} vs {fd}",
                g[i]
            );
        }
        // Token 4 is clipped (ratio e^0.4 > 1.2 with A > 0): no gradient; unclipped ones have one.
        assert_eq!(g[4], 0.0);
        assert!(g[0].abs() > 0.1);
        Ok(())
    }
}
