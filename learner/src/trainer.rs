//! One learner step on one training batch: log-probs under the current policy, advantages,
//! the PPO dual-clip loss, gradient accumulation over micro-batches, norm clipping and a fused
//! AdamW update. No I/O here: the service loop in `lib.rs` feeds batches and publishes.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use hindsight_policy::{AdamW, GradSums, LoadedModel, ModelConfig, TrainableModel, Weights};
use hindsight_proto::v1::TrainingBatch;
use serde::Serialize;

use crate::advantage::{self, AdvantageKind};
use crate::loss::{ppo_loss, PpoConfig, PpoSums};

/// Hyper-parameters of the update.
#[derive(Clone, Debug, Serialize)]
pub struct TrainConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub advantage: AdvantageKind,
    /// KL coefficient of REINFORCE++ (only used with a reference model).
    pub kl_beta: f64,
    pub ppo: PpoConfig,
    /// Sequences per forward/backward pass (memory bound); gradients are accumulated.
    pub micro_batch: usize,
}

/// Figures of one step, written to the step log and shown by `hindsight up`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepStats {
    pub step: u64,
    pub policy_version: u64,
    pub batch_id: u64,
    pub loss: f64,
    pub grad_norm: f64,
    pub samples: usize,
    pub original_samples: u32,
    pub replay_samples: u32,
    pub replay_shortfall: u32,
    pub reward_mean: f64,
    pub success_rate: f64,
    pub mean_constraint_accuracy: f64,
    pub mean_staleness: f64,
    pub lambda: f64,
    pub response_tokens: usize,
    pub prompt_tokens: usize,
    pub clip_fraction: f64,
    pub approx_kl: f64,
    pub ratio_mean: f64,
    pub step_seconds: f64,
    pub train_tokens_per_second: f64,
    /// Actor-vs-learner log-prob mismatch: mean and max |log p_learner - log p_actor| over the
    /// tokens of original (not replayed) samples generated with exactly the weights being
    /// trained (same policy version). `None` when the batch has no such sample.
    pub logprob_mismatch_mean: Option<f64>,
    pub logprob_mismatch_max: Option<f64>,
    /// The replay server's sequence numbers of the groups trained on in this step.
    pub group_seqs: Vec<u64>,
}

/// The trainable policy, the frozen reference (optional) and the optimizer.
pub struct Trainer {
    pub model: TrainableModel,
    reference: Option<TrainableModel>,
    pub optimizer: AdamW,
    pub config: TrainConfig,
    device: Device,
}

/// Pads ragged rows into a `[rows, width]` f32 tensor.
fn pad(rows: &[&[f32]], width: usize, device: &Device) -> Result<Tensor> {
    let mut flat = vec![0f32; rows.len() * width];
    for (i, row) in rows.iter().enumerate() {
        flat[i * width..i * width + row.len()].copy_from_slice(row);
    }
    Ok(Tensor::from_vec(flat, (rows.len(), width), device)?)
}

impl Trainer {
    pub fn new(
        model: &LoadedModel,
        with_reference: bool,
        config: TrainConfig,
        device: &Device,
    ) -> Result<Self> {
        let trainable = TrainableModel::new(&model.config, &model.weights, device)?;
        let reference = if with_reference {
            Some(TrainableModel::new(&model.config, &model.weights, device)?)
        } else {
            None
        };
        let optimizer = AdamW::new(trainable.vars(), config.lr, config.weight_decay);
        Ok(Self {
            model: trainable,
            reference,
            optimizer,
            config,
            device: device.clone(),
        })
    }

    pub fn model_config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Safetensors bytes of the current weights (what is published): the one full-size
    /// allocation, written from the parameters' own storage.
    pub fn export_weights(&self) -> Result<Vec<u8>> {
        self.model.weights_view()?.to_safetensors_bytes()
    }

    /// Replaces the current weights (resume from a checkpoint).
    pub fn import_weights(&mut self, bytes: &[u8]) -> Result<()> {
        let weights = Weights::from_safetensors_bytes(bytes, &self.device)?;
        self.model = TrainableModel::new(&self.model.config().clone(), &weights, &self.device)?;
        let (lr, wd) = (self.config.lr, self.config.weight_decay);
        self.optimizer = AdamW::new(self.model.vars(), lr, wd);
        Ok(())
    }

    /// One optimizer step on `batch`. `step` is the step number this update completes.
    /// `current_version` is the weight version before the step (for the mismatch figure).
    pub fn train_step(
        &mut self,
        batch: &TrainingBatch,
        step: u64,
        current_version: u64,
    ) -> Result<StepStats> {
        let started = Instant::now();
        // Samples with an empty response have no token to learn from.
        let samples: Vec<_> = batch
            .samples
            .iter()
            .filter(|s| !s.response_token_ids.is_empty())
            .collect();
        ensure!(
            !samples.is_empty(),
            "batch {} has no sample with a response token",
            batch.batch_id
        );
        for s in &samples {
            ensure!(
                s.behaviour_logprobs.len() == s.response_token_ids.len(),
                "batch {}: behaviour log-probs ({}) and response tokens ({}) differ in length",
                batch.batch_id,
                s.behaviour_logprobs.len(),
                s.response_token_ids.len()
            );
        }
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = samples
            .iter()
            .map(|s| (s.prompt_token_ids.clone(), s.response_token_ids.clone()))
            .collect();
        let rewards: Vec<f32> = samples.iter().map(|s| s.reward).collect();
        let old: Vec<Vec<f32>> = samples
            .iter()
            .map(|s| s.behaviour_logprobs.clone())
            .collect();
        let lengths: Vec<usize> = old.iter().map(Vec::len).collect();
        let micro = self.config.micro_batch.max(1);
        // Score responses at the temperature they were sampled at (greedy = temperature 1).
        let temperature = if batch.temperature > 0.0 {
            batch.temperature as f64
        } else {
            1.0
        };

        // Reference log-probs (no gradient), only for the REINFORCE++ KL term.
        let reference: Option<Vec<Vec<f32>>> = match &self.reference {
            Some(reference) if self.config.advantage == AdvantageKind::ReinforcePp => {
                let mut out = Vec::with_capacity(pairs.len());
                for chunk in pairs.chunks(micro) {
                    let lp = reference.forward_train(chunk, temperature)?.logp;
                    let rows = lp.detach().to_vec2::<f32>()?;
                    for (row, (_, resp)) in rows.into_iter().zip(chunk) {
                        out.push(row[..resp.len()].to_vec());
                    }
                }
                Some(out)
            }
            _ => None,
        };
        let advantages = match self.config.advantage {
            AdvantageKind::ReinforcePp => {
                advantage::reinforce_pp(&rewards, &old, reference.as_deref(), self.config.kl_beta)
            }
            AdvantageKind::Grpo => {
                let groups: Vec<u32> = samples.iter().map(|s| s.group_index).collect();
                advantage::grpo(&rewards, &groups, &lengths)
            }
        };

        let on_policy: Vec<bool> = samples
            .iter()
            .map(|s| {
                !s.is_replay
                    && s.provenance
                        .as_ref()
                        .is_some_and(|p| p.policy_version == current_version)
            })
            .collect();
        let (mut mismatch_sum, mut mismatch_max, mut mismatch_n) = (0f64, 0f64, 0usize);
        let total_tokens: usize = lengths.iter().sum();
        // Running sums of the parameters' gradients: the whole-model pass adds each
        // micro-batch's gradients straight into them, and the candle-graph paths keep detached
        // sums, so no micro-batch's graph outlives its backward.
        let mut acc = GradSums::new(&self.model);
        let mut loss_sum = 0f64;
        let mut sums = PpoSums::default();
        for (c, chunk) in pairs.chunks(micro).enumerate() {
            let lo = c * micro;
            let hi = lo + chunk.len();
            let fw = self
                .model
                .forward_train(chunk, temperature)
                .context("trainable forward")?;
            let (logp, mask) = (fw.logp.clone(), fw.mask.clone());
            let width = logp.dim(1)?;
            if on_policy[lo..hi].iter().any(|b| *b) {
                let rows = logp.detach().to_vec2::<f32>()?;
                for (i, row) in rows.iter().enumerate() {
                    if on_policy[lo + i] {
                        for (a, b) in row.iter().zip(&old[lo + i]) {
                            let d = (*a as f64 - *b as f64).abs();
                            mismatch_sum += d;
                            mismatch_max = mismatch_max.max(d);
                            mismatch_n += 1;
                        }
                    }
                }
            }
            let old_rows: Vec<&[f32]> = old[lo..hi].iter().map(Vec::as_slice).collect();
            let adv_rows: Vec<&[f32]> = advantages[lo..hi].iter().map(Vec::as_slice).collect();
            let old_t = pad(&old_rows, width, &self.device)?;
            let adv_t = pad(&adv_rows, width, &self.device)?;
            let (loss, s) = ppo_loss(
                &logp,
                &old_t,
                &adv_t,
                &mask,
                self.config.ppo,
                total_tokens as f64,
            )?;
            let value = loss.to_scalar::<f32>()? as f64;
            ensure!(
                value.is_finite(),
                "loss is not finite ({value}) at step {step}"
            );
            loss_sum += value;
            sums.clipped_tokens += s.clipped_tokens;
            sums.ratio_sum += s.ratio_sum;
            sums.kl_sum += s.kl_sum;
            let g = loss.backward()?;
            drop((loss, logp, mask));
            fw.accumulate(&self.model, &g, &mut acc)
                .context("trainable backward")?;
            drop(g);
        }
        let grads = acc.into_grad_store(&self.model)?;
        let norm = hindsight_policy::grad_norm(&grads, self.model.vars())?;
        ensure!(
            norm.is_finite(),
            "gradient norm is not finite at step {step}"
        );
        let scale = if norm > self.config.max_grad_norm {
            (self.config.max_grad_norm / (norm + 1e-6)) as f32
        } else {
            1.0
        };
        self.optimizer.step(&grads, self.model.vars(), scale)?;

        let secs = started.elapsed().as_secs_f64();
        let prompt_tokens: usize = samples.iter().map(|s| s.prompt_token_ids.len()).sum();
        let st = batch.stats.unwrap_or_default();
        let n = total_tokens.max(1) as f64;
        Ok(StepStats {
            step,
            policy_version: 0,
            batch_id: batch.batch_id,
            loss: loss_sum,
            grad_norm: norm,
            samples: samples.len(),
            original_samples: st.original_samples,
            replay_samples: st.replay_samples,
            replay_shortfall: st.replay_shortfall,
            reward_mean: rewards.iter().map(|&r| r as f64).sum::<f64>() / rewards.len() as f64,
            success_rate: st.success_rate as f64,
            mean_constraint_accuracy: st.mean_constraint_accuracy as f64,
            mean_staleness: st.mean_staleness as f64,
            lambda: st.lambda,
            response_tokens: total_tokens,
            prompt_tokens,
            clip_fraction: sums.clipped_tokens / n,
            approx_kl: sums.kl_sum / n,
            ratio_mean: sums.ratio_sum / n,
            step_seconds: secs,
            train_tokens_per_second: (total_tokens + prompt_tokens) as f64 / secs.max(1e-9),
            logprob_mismatch_mean: (mismatch_n > 0).then(|| mismatch_sum / mismatch_n as f64),
            logprob_mismatch_max: (mismatch_n > 0).then_some(mismatch_max),
            group_seqs: Vec::new(),
        })
    }
}
