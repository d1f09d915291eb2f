//! One learner step on one training batch, in four parts with the collective between them:
//! [`Trainer::prepare`] (batch-global: advantages, reference log-probs, token count),
//! [`Trainer::compute_gradients`] (forward/backward over this rank's shard, micro-batch by
//! micro-batch), [`Trainer::reduce`] (sum gradients and statistics across ranks, global
//! norm) and [`Trainer::apply`] (clip, fused AdamW). One rank runs them with the no-op
//! [`Single`] collective. No I/O here: the service loop in `lib.rs` feeds batches and
//! publishes.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use hindsight_collective::{Collective, Single};
use hindsight_policy::{
    AdamW, GradSums, HostGrads, LoadedModel, ModelConfig, TrainableModel, Weights,
};
use hindsight_proto::v1::TrainingBatch;
use serde::Serialize;

use crate::advantage::{self, AdvantageKind};
use crate::loss::{ppo_loss, PpoConfig};

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

    /// One optimizer step on `batch` as the only rank. `step` is the step number this update
    /// completes; `current_version` is the weight version before the step (for the mismatch
    /// figure).
    pub fn train_step(
        &mut self,
        batch: &TrainingBatch,
        step: u64,
        current_version: u64,
    ) -> Result<StepStats> {
        self.train_step_with(&mut Single, batch, step, current_version)
    }

    /// One optimizer step on `batch` as one of `collective.world_size()` ranks, every rank
    /// calling it with the same batch: batch-global quantities over the whole batch
    /// ([`Trainer::prepare`]), gradients over this rank's shard ([`Trainer::compute_gradients`]),
    /// reduced across ranks ([`Trainer::reduce`]) and applied ([`Trainer::apply`]). The
    /// result equals one rank's step on the whole batch within rounding, and is bit-identical
    /// on every rank.
    pub fn train_step_with(
        &mut self,
        collective: &mut dyn Collective,
        batch: &TrainingBatch,
        step: u64,
        current_version: u64,
    ) -> Result<StepStats> {
        let started = Instant::now();
        let prepared = self.prepare(batch, current_version)?;
        let shard = shard_indices(
            &prepared.costs,
            collective.rank() as usize,
            collective.world_size() as usize,
        );
        let local = self.compute_gradients(&prepared, &shard, step)?;
        let reduced = self.reduce(collective, local, step)?;
        let norm = reduced.norm;
        let sums = reduced.sums;
        self.apply(reduced)?;
        Ok(prepared.stats(batch, step, norm, &sums, started.elapsed().as_secs_f64()))
    }

    /// The batch-level quantities every rank computes over the **whole** batch: the samples
    /// with a response, advantages (REINFORCE++ whitening and GRPO groups are batch-global),
    /// reference log-probs, which samples count for the mismatch figure, and the global
    /// response-token count the loss is normalised by.
    pub fn prepare(&self, batch: &TrainingBatch, current_version: u64) -> Result<Prepared> {
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
        let total_tokens: usize = lengths.iter().sum();
        let prompt_tokens: usize = samples.iter().map(|s| s.prompt_token_ids.len()).sum();
        let costs = pairs.iter().map(|(p, r)| p.len() + r.len()).collect();
        Ok(Prepared {
            pairs,
            rewards,
            old,
            advantages,
            on_policy,
            total_tokens,
            prompt_tokens,
            costs,
            temperature,
        })
    }

    /// Forward and backward over the samples `shard` (indices into the prepared batch) in
    /// micro-batches, into gradient sums; the loss of every micro-batch is normalised by the
    /// batch's global token count, so the ranks' gradients are terms of one sum.
    pub fn compute_gradients(
        &self,
        prepared: &Prepared,
        shard: &[usize],
        step: u64,
    ) -> Result<LocalGradients> {
        let micro = self.config.micro_batch.max(1);
        // Running sums of the parameters' gradients: the whole-model pass adds each
        // micro-batch's gradients straight into them, and the candle-graph paths keep detached
        // sums, so no micro-batch's graph outlives its backward.
        let mut acc = GradSums::new(&self.model);
        let mut sums = StepSums::default();
        for chunk_ix in shard.chunks(micro) {
            let chunk: Vec<(Vec<u32>, Vec<u32>)> = chunk_ix
                .iter()
                .map(|&i| prepared.pairs[i].clone())
                .collect();
            let fw = self
                .model
                .forward_train(&chunk, prepared.temperature)
                .context("trainable forward")?;
            let (logp, mask) = (fw.logp.clone(), fw.mask.clone());
            let width = logp.dim(1)?;
            if chunk_ix.iter().any(|&i| prepared.on_policy[i]) {
                let rows = logp.detach().to_vec2::<f32>()?;
                for (row, &i) in rows.iter().zip(chunk_ix) {
                    if prepared.on_policy[i] {
                        for (a, b) in row.iter().zip(&prepared.old[i]) {
                            let d = (*a as f64 - *b as f64).abs();
                            sums.mismatch_sum += d;
                            sums.mismatch_max = sums.mismatch_max.max(d);
                            sums.mismatch_n += 1.0;
                        }
                    }
                }
            }
            let old_rows: Vec<&[f32]> = chunk_ix
                .iter()
                .map(|&i| prepared.old[i].as_slice())
                .collect();
            let adv_rows: Vec<&[f32]> = chunk_ix
                .iter()
                .map(|&i| prepared.advantages[i].as_slice())
                .collect();
            let old_t = pad(&old_rows, width, &self.device)?;
            let adv_t = pad(&adv_rows, width, &self.device)?;
            let (loss, s) = ppo_loss(
                &logp,
                &old_t,
                &adv_t,
                &mask,
                self.config.ppo,
                prepared.total_tokens as f64,
            )?;
            let value = loss.to_scalar::<f32>()? as f64;
            ensure!(
                value.is_finite(),
                "loss is not finite ({value}) at step {step}"
            );
            sums.loss += value;
            sums.clipped_tokens += s.clipped_tokens;
            sums.ratio_sum += s.ratio_sum;
            sums.kl_sum += s.kl_sum;
            let g = loss.backward()?;
            drop((loss, logp, mask));
            fw.accumulate(&self.model, &g, &mut acc)
                .context("trainable backward")?;
            drop(g);
        }
        Ok(LocalGradients { grads: acc, sums })
    }

    /// Sums the ranks' gradients and statistics (in rank order: bit-identical on every rank)
    /// and takes the global gradient norm of the sum. One rank: no copy, today's path.
    pub fn reduce(
        &self,
        collective: &mut dyn Collective,
        local: LocalGradients,
        step: u64,
    ) -> Result<Reduced> {
        let LocalGradients { grads, mut sums } = local;
        let (grads, norm) = if collective.world_size() == 1 {
            let grads = grads.into_grad_store(&self.model)?;
            let norm = hindsight_policy::grad_norm(&grads, self.model.vars())?;
            (grads, norm)
        } else {
            let mut host = grads.into_host(&self.model)?;
            // Which parameters got a gradient anywhere (a rank with an empty shard has none).
            let mut present: Vec<f64> = host
                .grads
                .iter()
                .map(|g| if g.is_some() { 1.0 } else { 0.0 })
                .collect();
            collective
                .all_reduce_f64(&mut present)
                .context("all-reducing which parameters have gradients")?;
            for ((g, p), (name, v)) in host.grads.iter_mut().zip(&present).zip(self.model.vars()) {
                if *p > 0.0 {
                    let buf = g.get_or_insert_with(|| vec![0f32; v.elem_count()]);
                    collective
                        .all_reduce_f32(buf)
                        .with_context(|| format!("all-reducing the gradient of {name}"))?;
                }
            }
            let norm = host_norm(&host);
            (host.into_grad_store(&self.model)?, norm)
        };
        let mut s = [
            sums.loss,
            sums.clipped_tokens,
            sums.ratio_sum,
            sums.kl_sum,
            sums.mismatch_sum,
            sums.mismatch_n,
        ];
        collective
            .all_reduce_f64(&mut s)
            .context("all-reducing step statistics")?;
        let mut max = [sums.mismatch_max];
        hindsight_collective::all_max_f64(collective, &mut max)
            .context("reducing the log-prob mismatch maximum")?;
        sums = StepSums {
            loss: s[0],
            clipped_tokens: s[1],
            ratio_sum: s[2],
            kl_sum: s[3],
            mismatch_sum: s[4],
            mismatch_n: s[5],
            mismatch_max: max[0],
        };
        ensure!(
            norm.is_finite(),
            "gradient norm is not finite at step {step}"
        );
        Ok(Reduced { grads, norm, sums })
    }

    /// Clips on the reduced norm and takes the AdamW step (identical on every rank).
    pub fn apply(&mut self, reduced: Reduced) -> Result<()> {
        let norm = reduced.norm;
        let scale = if norm > self.config.max_grad_norm {
            (self.config.max_grad_norm / (norm + 1e-6)) as f32
        } else {
            1.0
        };
        self.optimizer
            .step(&reduced.grads, self.model.vars(), scale)?;
        Ok(())
    }

    /// SHA-256 of the parameters (f32 little-endian, in parameter order, names included):
    /// ranks compare it to prove they hold the same weights.
    pub fn weight_digest(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (name, v) in self.model.vars() {
            h.update(name.as_bytes());
            let data = v
                .as_tensor()
                .detach()
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for chunk in data.chunks(1 << 16) {
                let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
                h.update(&bytes);
            }
        }
        Ok(format!("sha256:{}", hex::encode(h.finalize())))
    }
}

/// Global L2 norm of host gradients, summed in a fixed order (parameter by parameter,
/// element by element, in f64) so every rank gets the same bits.
fn host_norm(g: &HostGrads) -> f64 {
    g.grads
        .iter()
        .flatten()
        .map(|b| b.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// This rank's samples: indices into the prepared batch, balanced by `cost` (prompt +
/// response tokens). Deterministic: samples sorted by cost (largest first, then index), each
/// to the least-loaded rank (ties to the lower rank); each shard in index order. A rank may
/// get none (more ranks than samples).
pub fn shard_indices(costs: &[usize], rank: usize, world_size: usize) -> Vec<usize> {
    let world_size = world_size.max(1);
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].cmp(&costs[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; world_size];
    let mut mine = Vec::new();
    for i in order {
        let (r, _) = load
            .iter()
            .enumerate()
            .min_by_key(|&(r, l)| (*l, r))
            .expect("at least one rank");
        load[r] += costs[i];
        if r == rank {
            mine.push(i);
        }
    }
    mine.sort_unstable();
    mine
}

/// The batch-level quantities of a step ([`Trainer::prepare`]), indexed by sample (samples
/// with a response, in batch order).
pub struct Prepared {
    pairs: Vec<(Vec<u32>, Vec<u32>)>,
    rewards: Vec<f32>,
    old: Vec<Vec<f32>>,
    advantages: Vec<Vec<f32>>,
    on_policy: Vec<bool>,
    total_tokens: usize,
    prompt_tokens: usize,
    /// Tokens each sample costs to train (prompt + response): what shards balance.
    pub costs: Vec<usize>,
    temperature: f64,
}

impl Prepared {
    /// Number of samples trained on.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there is no sample (never: [`Trainer::prepare`] refuses such a batch).
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    fn stats(
        &self,
        batch: &TrainingBatch,
        step: u64,
        norm: f64,
        sums: &StepSums,
        secs: f64,
    ) -> StepStats {
        let st = batch.stats.unwrap_or_default();
        let n = self.total_tokens.max(1) as f64;
        let total = self.total_tokens;
        StepStats {
            step,
            policy_version: 0,
            batch_id: batch.batch_id,
            loss: sums.loss,
            grad_norm: norm,
            samples: self.pairs.len(),
            original_samples: st.original_samples,
            replay_samples: st.replay_samples,
            replay_shortfall: st.replay_shortfall,
            reward_mean: self.rewards.iter().map(|&r| r as f64).sum::<f64>()
                / self.rewards.len() as f64,
            success_rate: st.success_rate as f64,
            mean_constraint_accuracy: st.mean_constraint_accuracy as f64,
            mean_staleness: st.mean_staleness as f64,
            lambda: st.lambda,
            response_tokens: total,
            prompt_tokens: self.prompt_tokens,
            clip_fraction: sums.clipped_tokens / n,
            approx_kl: sums.kl_sum / n,
            ratio_mean: sums.ratio_sum / n,
            step_seconds: secs,
            train_tokens_per_second: (total + self.prompt_tokens) as f64 / secs.max(1e-9),
            logprob_mismatch_mean: (sums.mismatch_n > 0.0)
                .then(|| sums.mismatch_sum / sums.mismatch_n),
            logprob_mismatch_max: (sums.mismatch_n > 0.0).then_some(sums.mismatch_max),
            group_seqs: Vec::new(),
        }
    }
}

/// Sums behind a step's statistics (reduced across ranks by addition; the max by maximum).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepSums {
    pub loss: f64,
    pub clipped_tokens: f64,
    pub ratio_sum: f64,
    pub kl_sum: f64,
    pub mismatch_sum: f64,
    pub mismatch_n: f64,
    pub mismatch_max: f64,
}

/// One rank's gradients and statistics before the reduction.
pub struct LocalGradients {
    pub grads: GradSums,
    pub sums: StepSums,
}

/// Gradients and statistics summed over the ranks, with the global gradient norm.
pub struct Reduced {
    pub grads: candle_core::backprop::GradStore,
    pub norm: f64,
    pub sums: StepSums,
}
