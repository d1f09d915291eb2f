//! One learner update on one training batch, in four parts with the collective between them:
//! [`Trainer::prepare`] (batch-global: advantages, reference log-probs, token counts), then
//! for each of the `--mini-batches` optimizer steps [`Trainer::compute_gradients`]
//! (forward/backward over this rank's shard of the mini-batch, micro-batch by micro-batch),
//! [`Trainer::reduce`] (sum gradients and statistics across ranks, global norm) and
//! [`Trainer::apply`] (clip, fused AdamW). One rank runs them with the no-op [`Single`]
//! collective. No I/O here: the service loop in `lib.rs` feeds batches and publishes.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use hindsight_collective::{Collective, Single};
use hindsight_policy::{LoadedModel, ModelConfig, Weights};
use hindsight_proto::v1::{Sample, TrainingBatch};
use hindsight_training::{AdamW, GradSums, HostGrads, TrainableModel};
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
    /// Optimizer steps per training batch (`--mini-batches`; the HiR reference takes 2).
    pub mini_batches: usize,
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
    /// The clip fraction over the tokens of originals only, and of replays only (a replay's
    /// ratio is taken against its source prompt's behaviour log-probs, so it clips
    /// differently); `None` when the batch has no token of that kind.
    pub clip_fraction_original: Option<f64>,
    pub clip_fraction_replay: Option<f64>,
    /// Optimizer steps taken on this batch (`--mini-batches`, at most one per sample).
    pub mini_batches: usize,
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
    /// Responses the actors generated for this batch (its originals: m per prompt with
    /// hindsight on, n with it off), and the run's total through this step: the x-axis that
    /// compares arms by sample efficiency (replays cost no generation).
    pub step_generated_responses: u64,
    pub generated_responses: u64,
}

/// The trainable policy, the frozen reference (optional) and the optimizer.
pub struct Trainer {
    pub model: TrainableModel,
    reference: Option<TrainableModel>,
    pub optimizer: AdamW,
    pub config: TrainConfig,
    device: Device,
}

/// For each sample, the index of the sample whose reference log-probs it takes: itself for
/// an original, for a replay the original it was made from (same `group_index`, same
/// `provenance.response_index`: the assembly always puts a replay's source original in the
/// same batch). A replay without one is an error, not a silent KL under the wrong prompt.
pub fn reference_sources(samples: &[&Sample]) -> Result<Vec<usize>> {
    use std::collections::HashMap;
    let key = |s: &Sample| {
        s.provenance
            .as_ref()
            .map(|p| (s.group_index, p.response_index))
    };
    let originals: HashMap<(u32, u32), usize> = samples
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_replay)
        .filter_map(|(i, s)| key(s).map(|k| (k, i)))
        .collect();
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if !s.is_replay {
                return Ok(i);
            }
            let k = key(s).context("a replay sample has no provenance")?;
            let src = *originals.get(&k).with_context(|| {
                format!(
                    "replay of group {} response {} has no source original in the batch",
                    k.0, k.1
                )
            })?;
            ensure!(
                samples[src].response_token_ids == s.response_token_ids,
                "replay of group {} response {}: its source original has other response tokens",
                k.0,
                k.1
            );
            Ok(src)
        })
        .collect()
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

    /// The device the model trains on.
    pub fn device(&self) -> &Device {
        &self.device
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

    /// Reference log-probs (no gradient) of `samples`, one row per sample over its response
    /// tokens, or `None` without a reference model. A replay's row is its *source*
    /// original's (the same response under the prompt it was generated for, as the HiR
    /// reference copies it), not the response under the rewritten prompt: the KL term
    /// measures how far the policy moved on what it actually generated. Only originals are
    /// run through the reference model.
    pub fn reference_logprobs(
        &self,
        samples: &[&Sample],
        temperature: f64,
    ) -> Result<Option<Vec<Vec<f32>>>> {
        let Some(reference) = &self.reference else {
            return Ok(None);
        };
        let sources = reference_sources(samples)?;
        let own: Vec<usize> = (0..samples.len()).filter(|&i| sources[i] == i).collect();
        let mut rows: Vec<Option<Vec<f32>>> = vec![None; samples.len()];
        for chunk in own.chunks(self.config.micro_batch.max(1)) {
            let pairs: Vec<(Vec<u32>, Vec<u32>)> = chunk
                .iter()
                .map(|&i| {
                    (
                        samples[i].prompt_token_ids.clone(),
                        samples[i].response_token_ids.clone(),
                    )
                })
                .collect();
            let lp = reference.forward_train(&pairs, temperature)?.logp;
            for (row, &i) in lp.detach().to_vec2::<f32>()?.into_iter().zip(chunk) {
                rows[i] = Some(row[..samples[i].response_token_ids.len()].to_vec());
            }
        }
        sources
            .iter()
            .map(|&src| {
                rows[src]
                    .clone()
                    .context("reference log-probs of a source sample")
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// One policy-gradient update on `batch` as the only rank. `step` is the step number this
    /// update completes; `current_version` is the weight version before it (for the mismatch
    /// figure).
    pub fn train_step(
        &mut self,
        batch: &TrainingBatch,
        step: u64,
        current_version: u64,
    ) -> Result<StepStats> {
        self.train_step_with(&mut Single, batch, step, current_version)
    }

    /// One policy-gradient update on `batch` as one of `collective.world_size()` ranks, every
    /// rank calling it with the same batch: batch-global quantities over the whole batch
    /// ([`Trainer::prepare`]), then `--mini-batches` optimizer steps, each on every K-th
    /// sample (sample i in mini-batch i mod K, so that originals and replays mix): gradients
    /// over this rank's shard of the mini-batch ([`Trainer::compute_gradients`]), reduced
    /// across ranks ([`Trainer::reduce`]) and applied ([`Trainer::apply`]). The result equals
    /// one rank's update on the whole batch within rounding, and is bit-identical on every
    /// rank. The mismatch figure is measured on the first mini-batch, whose weights are
    /// exactly `current_version`.
    pub fn train_step_with(
        &mut self,
        collective: &mut dyn Collective,
        batch: &TrainingBatch,
        step: u64,
        current_version: u64,
    ) -> Result<StepStats> {
        let started = Instant::now();
        let prepared = self.prepare(batch, current_version)?;
        let (rank, world) = (collective.rank() as usize, collective.world_size() as usize);
        let minis = prepared.mini_batches(self.config.mini_batches);
        let mut total = StepSums::default();
        let mut norm_sum = 0f64;
        for mini in &minis {
            let shard = mini.shard(&prepared, rank, world);
            let local = self.compute_gradients(&prepared, mini, &shard, step)?;
            let reduced = self.reduce(collective, local, step)?;
            norm_sum += reduced.norm;
            total.add(&reduced.sums);
            self.apply(reduced)?;
        }
        let k = minis.len();
        Ok(prepared.stats(
            batch,
            step,
            k,
            norm_sum / k as f64,
            &total,
            started.elapsed().as_secs_f64(),
        ))
    }

    /// The batch-level quantities every rank computes over the **whole** batch: the samples
    /// with a response, advantages (REINFORCE++ whitening and GRPO groups are batch-global),
    /// reference log-probs, which samples count for the mismatch figure, and the global
    /// response-token count the loss is normalised by.
    pub fn prepare(&self, batch: &TrainingBatch, current_version: u64) -> Result<Prepared> {
        // Samples with an empty response have no token to learn from.
        let samples: Vec<&Sample> = batch
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
        // Score responses at the temperature they were sampled at (greedy = temperature 1).
        let temperature = if batch.temperature > 0.0 {
            batch.temperature as f64
        } else {
            1.0
        };

        // Reference log-probs (no gradient), only for the REINFORCE++ KL term.
        let reference = if self.config.advantage == AdvantageKind::ReinforcePp {
            self.reference_logprobs(&samples, temperature)?
        } else {
            None
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
        let replay = samples.iter().map(|s| s.is_replay).collect();
        Ok(Prepared {
            pairs,
            rewards,
            old,
            advantages,
            on_policy,
            replay,
            lengths,
            total_tokens,
            prompt_tokens,
            costs,
            temperature,
        })
    }

    /// Forward and backward over the samples `shard` (this rank's indices into the prepared
    /// batch, all members of `mini`) in micro-batches, into gradient sums; the loss of every
    /// micro-batch is normalised by the mini-batch's global token count, so the ranks'
    /// gradients are terms of one sum.
    pub fn compute_gradients(
        &self,
        prepared: &Prepared,
        mini: &MiniBatch,
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
            if mini.first && chunk_ix.iter().any(|&i| prepared.on_policy[i]) {
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
                mini.tokens as f64,
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
            for (&i, c) in chunk_ix.iter().zip(&s.clipped_per_row) {
                if prepared.replay[i] {
                    sums.clipped_replay += c;
                } else {
                    sums.clipped_original += c;
                }
            }
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
        #[cfg(feature = "nccl")]
        // NCCL on a CUDA model: on the device, even with one rank (`--collective nccl`
        // then runs the whole path, which is how one GPU checks it).
        let on_gpu = self.device.is_cuda() && collective.nccl().is_some();
        #[cfg(not(feature = "nccl"))]
        let on_gpu = false;
        let (grads, norm) = if on_gpu {
            #[cfg(feature = "nccl")]
            {
                let nccl = collective.nccl().expect("checked above");
                crate::nccl::reduce_gradients(nccl, &self.model, grads.into_tensors(&self.model)?)?
            }
            #[cfg(not(feature = "nccl"))]
            unreachable!("no NCCL in this build")
        } else if collective.world_size() == 1 {
            let grads = grads.into_grad_store(&self.model)?;
            let norm = hindsight_training::grad_norm(&grads, self.model.vars())?;
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
            sums.clipped_original,
            sums.clipped_replay,
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
            clipped_original: s[2],
            clipped_replay: s[3],
            ratio_sum: s[4],
            kl_sum: s[5],
            mismatch_sum: s[6],
            mismatch_n: s[7],
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
    replay: Vec<bool>,
    /// Response tokens of each sample (what the loss is normalised by).
    lengths: Vec<usize>,
    total_tokens: usize,
    prompt_tokens: usize,
    /// Tokens each sample costs to train (prompt + response): what shards balance.
    pub costs: Vec<usize>,
    temperature: f64,
}

/// The samples of one optimizer step and their response-token count (the loss's divisor,
/// the same on every rank).
#[derive(Clone, Debug)]
pub struct MiniBatch {
    /// Indices into the prepared batch, ascending.
    pub members: Vec<usize>,
    pub tokens: usize,
    /// The first mini-batch of the update: the only one whose weights are exactly the
    /// version the actors generated with, so the mismatch figure is measured on it.
    pub first: bool,
}

impl MiniBatch {
    /// This rank's share of the mini-batch ([`shard_indices`] over the members' costs), as
    /// indices into the prepared batch.
    pub fn shard(&self, prepared: &Prepared, rank: usize, world_size: usize) -> Vec<usize> {
        let costs: Vec<usize> = self.members.iter().map(|&i| prepared.costs[i]).collect();
        shard_indices(&costs, rank, world_size)
            .into_iter()
            .map(|j| self.members[j])
            .collect()
    }
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

    /// The whole batch as one mini-batch.
    pub fn whole(&self) -> MiniBatch {
        self.mini_batches(1).remove(0)
    }

    /// `k` mini-batches (clamped to 1..=len): sample i goes to mini-batch i mod k.
    pub fn mini_batches(&self, k: usize) -> Vec<MiniBatch> {
        let k = k.clamp(1, self.len().max(1));
        (0..k)
            .map(|j| {
                let members: Vec<usize> = (j..self.len()).step_by(k).collect();
                let tokens = members.iter().map(|&i| self.lengths[i]).sum();
                MiniBatch {
                    members,
                    tokens,
                    first: j == 0,
                }
            })
            .collect()
    }

    /// The step's figures from the summed statistics of its `mini_batches` optimizer steps
    /// (loss and gradient norm: their mean over the mini-batches).
    fn stats(
        &self,
        batch: &TrainingBatch,
        step: u64,
        mini_batches: usize,
        norm: f64,
        sums: &StepSums,
        secs: f64,
    ) -> StepStats {
        let st = batch.stats.unwrap_or_default();
        let n = self.total_tokens.max(1) as f64;
        let total = self.total_tokens;
        let kind_fraction = |replay: bool, clipped: f64| {
            let tokens: usize = (0..self.len())
                .filter(|&i| self.replay[i] == replay)
                .map(|i| self.lengths[i])
                .sum();
            (tokens > 0).then(|| clipped / tokens as f64)
        };
        StepStats {
            step,
            policy_version: 0,
            batch_id: batch.batch_id,
            loss: sums.loss / mini_batches as f64,
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
            clip_fraction_original: kind_fraction(false, sums.clipped_original),
            clip_fraction_replay: kind_fraction(true, sums.clipped_replay),
            mini_batches,
            approx_kl: sums.kl_sum / n,
            ratio_mean: sums.ratio_sum / n,
            step_seconds: secs,
            train_tokens_per_second: (total + self.prompt_tokens) as f64 / secs.max(1e-9),
            logprob_mismatch_mean: (sums.mismatch_n > 0.0)
                .then(|| sums.mismatch_sum / sums.mismatch_n),
            logprob_mismatch_max: (sums.mismatch_n > 0.0).then_some(sums.mismatch_max),
            group_seqs: Vec::new(),
            step_generated_responses: st.original_samples as u64,
            generated_responses: 0,
        }
    }
}

/// Sums behind a step's statistics (reduced across ranks by addition; the max by maximum).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepSums {
    pub loss: f64,
    pub clipped_tokens: f64,
    /// Clipped tokens of originals and of replays (they add up to `clipped_tokens`).
    pub clipped_original: f64,
    pub clipped_replay: f64,
    pub ratio_sum: f64,
    pub kl_sum: f64,
    pub mismatch_sum: f64,
    pub mismatch_n: f64,
    pub mismatch_max: f64,
}

impl StepSums {
    /// Adds another optimizer step's reduced sums (the max by maximum).
    fn add(&mut self, o: &StepSums) {
        self.loss += o.loss;
        self.clipped_tokens += o.clipped_tokens;
        self.clipped_original += o.clipped_original;
        self.clipped_replay += o.clipped_replay;
        self.ratio_sum += o.ratio_sum;
        self.kl_sum += o.kl_sum;
        self.mismatch_sum += o.mismatch_sum;
        self.mismatch_n += o.mismatch_n;
        self.mismatch_max = self.mismatch_max.max(o.mismatch_max);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_proto::v1::{BatchStats, Provenance};

    fn sample(prompt: &[u32], response: &[u32], replay: bool, group: u32, index: u32) -> Sample {
        Sample {
            prompt_token_ids: prompt.to_vec(),
            response_token_ids: response.to_vec(),
            loss_mask: vec![1; response.len()],
            behaviour_logprobs: vec![-1.0; response.len()],
            reward: if replay { 1.0 } else { 0.0 },
            is_replay: replay,
            group_index: group,
            provenance: Some(Provenance {
                response_index: index,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn tiny_trainer(with_reference: bool, lr: f64, mini_batches: usize) -> Trainer {
        let model = hindsight_policy::load(
            "tiny",
            std::path::Path::new("/nonexistent-cache"),
            &Device::Cpu,
        )
        .unwrap();
        let config = TrainConfig {
            lr,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            advantage: AdvantageKind::ReinforcePp,
            kl_beta: 0.01,
            ppo: PpoConfig::default(),
            micro_batch: 2,
            mini_batches,
        };
        Trainer::new(&model, with_reference, config, &Device::Cpu).unwrap()
    }

    const SOURCE: &[u32] = &[1, 40, 41, 42, 43, 44];
    const REWRITTEN: &[u32] = &[1, 40, 90, 91];
    const RESPONSE: &[u32] = &[50, 51, 52, 53, 54];

    #[test]
    fn a_replay_takes_its_source_originals_reference() {
        let a = sample(&[1, 2, 3], &[7, 8], false, 0, 0);
        let b = sample(SOURCE, RESPONSE, false, 1, 2);
        let c = sample(&[1, 2, 3], &[9], false, 1, 0);
        let r = sample(REWRITTEN, RESPONSE, true, 1, 2);
        assert_eq!(
            reference_sources(&[&a, &b, &c, &r]).unwrap(),
            vec![0, 1, 2, 1]
        );
        // No source in the batch, or a source with other tokens: refused by name.
        let e = reference_sources(&[&a, &r]).unwrap_err().to_string();
        assert!(e.contains("no source original"), "{e}");
        let other = sample(SOURCE, &[50, 51], false, 1, 2);
        let e = reference_sources(&[&other, &r]).unwrap_err().to_string();
        assert!(e.contains("other response tokens"), "{e}");
    }

    /// The replay KL fix: a replay's reference log-probs are its response's log-probs under
    /// the *source* prompt (copied from the source original), not under the rewritten one.
    #[test]
    fn replay_reference_logprobs_are_those_of_the_source_prompt() {
        let t = tiny_trainer(true, 1e-6, 1);
        let other = sample(&[1, 2, 3], &[7, 8], false, 0, 0);
        let original = sample(SOURCE, RESPONSE, false, 1, 2);
        let replay = sample(REWRITTEN, RESPONSE, true, 1, 2);
        let rows = t
            .reference_logprobs(&[&other, &original, &replay], 1.0)
            .unwrap()
            .unwrap();
        assert_eq!(rows[2].len(), RESPONSE.len());
        assert_eq!(rows[2], rows[1], "replay row must be the source's");
        // What the old code computed: the same response under the rewritten prompt.
        let as_original = sample(REWRITTEN, RESPONSE, false, 5, 0);
        let under_rewritten = t
            .reference_logprobs(&[&as_original], 1.0)
            .unwrap()
            .unwrap()
            .remove(0);
        let diff = rows[2]
            .iter()
            .zip(&under_rewritten)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff > 1e-4,
            "the prompts should change the log-probs (max diff {diff})"
        );
        // Without a reference model there is nothing to compute.
        let plain = tiny_trainer(false, 1e-6, 1);
        assert!(plain.reference_logprobs(&[&other], 1.0).unwrap().is_none());
    }

    /// Clip fractions by kind: originals whose behaviour log-probs are far below the
    /// policy's are all clipped, replays whose behaviour log-probs are the policy's own are
    /// not; both with one and with two mini-batches.
    #[test]
    fn clip_fraction_is_reported_per_kind() {
        for mini_batches in [1, 2] {
            let mut t = tiny_trainer(false, 1e-9, mini_batches);
            let mut replay = sample(REWRITTEN, RESPONSE, true, 1, 2);
            let own = t
                .model
                .forward_train(&[(REWRITTEN.to_vec(), RESPONSE.to_vec())], 1.0)
                .unwrap()
                .logp
                .to_vec2::<f32>()
                .unwrap();
            replay.behaviour_logprobs = own[0][..RESPONSE.len()].to_vec();
            let mut original = sample(SOURCE, RESPONSE, false, 1, 2);
            original.behaviour_logprobs = vec![-30.0; RESPONSE.len()];
            let mut second = sample(&[1, 2, 3], &[7, 8, 9], false, 0, 0);
            second.behaviour_logprobs = vec![-30.0; 3];
            let batch = TrainingBatch {
                batch_id: 1,
                step: 1,
                samples: vec![original, second, replay],
                stats: Some(BatchStats {
                    original_samples: 2,
                    replay_samples: 1,
                    ..Default::default()
                }),
                temperature: 1.0,
            };
            let st = t.train_step(&batch, 1, 0).unwrap();
            assert_eq!(st.mini_batches, mini_batches);
            assert_eq!(st.clip_fraction_original, Some(1.0), "{st:?}");
            assert_eq!(st.clip_fraction_replay, Some(0.0), "{st:?}");
            assert!((st.clip_fraction - 8.0 / 13.0).abs() < 1e-9, "{st:?}");
            assert_eq!(st.step_generated_responses, 2);
            assert!(st.loss.is_finite() && st.grad_norm.is_finite());
        }
        // A batch of originals only: no replay fraction.
        let mut t = tiny_trainer(false, 1e-9, 1);
        let batch = TrainingBatch {
            batch_id: 1,
            step: 1,
            samples: vec![sample(SOURCE, RESPONSE, false, 0, 0)],
            stats: None,
            temperature: 1.0,
        };
        let st = t.train_step(&batch, 1, 0).unwrap();
        assert_eq!(st.clip_fraction_replay, None);
        assert!(st.clip_fraction_original.is_some());
    }
}
