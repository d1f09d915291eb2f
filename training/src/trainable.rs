//! The trainable model: every parameter is a candle `Var`. Training goes through
//! [`TrainableModel::forward_train`] and [`TrainForward::param_grads`] (or
//! [`TrainForward::accumulate`] into [`GradSums`] over micro-batches): on the CPU (f32/f64)
//! that is the hand-written whole-model pass (`fused/whole.rs`, no candle autograd for the
//! model); elsewhere (CUDA), or with [`TrainableModel::set_whole`] turned off, it is candle's
//! autograd over primitives that have a backward in candle 0.11 (matmul, broadcast
//! arithmetic, exp/log/sqrt, reductions, narrow/cat/reshape/transpose, index_select, silu),
//! with response log-probs computed chunk-wise over rows (512 at a time). The inference-side
//! helpers ([`TrainableModel::logits`], [`TrainableModel::response_logprobs_t`]) always take
//! the primitive path.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use hindsight_model::ModelConfig;
use hindsight_policy::ops::rope_cos_sin_inv;
use hindsight_policy::Weights;

use crate::fused;
use crate::primitives::{logsumexp_diff, rms_norm_diff, rope_half_diff, softmax_diff};

/// Rows of `[rows, vocab]` logits processed per chunk in `response_logprobs`.
const LOGPROB_CHUNK_ROWS: usize = 512;

/// Differentiable Llama whose parameters are `Var`s (HF names).
pub struct TrainableModel {
    config: ModelConfig,
    device: Device,
    dtype: DType,
    vars: Vec<(String, Var)>,
    /// Index into `vars` for each HF name used by the forward.
    idx: std::collections::HashMap<String, usize>,
    /// Train with the hand-written whole-model pass (default where it runs: CPU, f32/f64).
    whole: bool,
    /// Where each parameter of the whole-model pass sits in `vars`.
    pix: fused::whole::ParamIx,
}

impl TrainableModel {
    /// f32 trainable model.
    pub fn new(config: &ModelConfig, weights: &Weights, device: &Device) -> anyhow::Result<Self> {
        Self::new_with_dtype(config, weights, device, DType::F32)
    }

    /// Trainable model in `dtype` (F32 for training; F64 for gradient checks).
    pub fn new_with_dtype(
        config: &ModelConfig,
        weights: &Weights,
        device: &Device,
        dtype: DType,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        weights.validate(config)?;
        let mut vars = Vec::new();
        let mut idx = std::collections::HashMap::new();
        for (name, _) in config.parameter_shapes() {
            let t = weights.get(&name)?.to_dtype(dtype)?.to_device(device)?;
            idx.insert(name.clone(), vars.len());
            vars.push((name, Var::from_tensor(&t)?));
        }
        let whole = fused::supported(device, dtype);
        let pix = fused::whole::ParamIx::new(config, &idx, vars.len())?;
        Ok(Self {
            config: config.clone(),
            device: device.clone(),
            dtype,
            vars,
            idx,
            whole,
            pix,
        })
    }

    /// One entry per parameter tensor (tied embedding counted once), HF names.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Snapshot (copies) of the parameters as f32 HF-named weights.
    pub fn weights(&self) -> anyhow::Result<Weights> {
        let mut tensors = std::collections::BTreeMap::new();
        for (n, v) in &self.vars {
            tensors.insert(
                n.clone(),
                v.as_tensor().detach().to_dtype(DType::F32)?.copy()?,
            );
        }
        Ok(Weights { tensors })
    }

    /// The current parameters as f32 [`Weights`] that share the parameters' storage (no copy
    /// for f32 parameters). They change with the next optimizer step: serialise them before
    /// that. [`TrainableModel::weights`] makes a copy.
    pub fn weights_view(&self) -> anyhow::Result<Weights> {
        let mut tensors = std::collections::BTreeMap::new();
        for (n, v) in &self.vars {
            tensors.insert(n.clone(), v.as_tensor().detach().to_dtype(DType::F32)?);
        }
        Ok(Weights { tensors })
    }

    /// Overwrites the parameters in place from `weights` (e.g. to resume).
    pub fn set_weights(&self, weights: &Weights) -> anyhow::Result<()> {
        for (n, v) in &self.vars {
            v.set(
                &weights
                    .get(n)?
                    .to_dtype(self.dtype)?
                    .to_device(&self.device)?,
            )?;
        }
        Ok(())
    }

    fn p(&self, name: &str) -> anyhow::Result<&Tensor> {
        let i = *self
            .idx
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("no parameter {name}"))?;
        Ok(self.vars[i].1.as_tensor())
    }

    fn lm_head(&self) -> anyhow::Result<&Tensor> {
        if self.config.tie_word_embeddings {
            self.p("model.embed_tokens.weight")
        } else {
            self.p("lm_head.weight")
        }
    }

    /// Final-normed hidden states `[B, T, D]` for right-padded `ids` `[B, T]`
    /// (positions 0..T; a causal mask suffices since padding only follows real tokens).
    fn hidden(&self, ids: &Tensor) -> anyhow::Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let d = c.hidden_size;
        let (h, kv, hd, n_rep) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim(),
            c.n_rep(),
        );
        let eps = c.rms_norm_eps;
        let scale = 1.0 / (hd as f64).sqrt();
        let positions: Vec<usize> = (0..t).collect();
        let (cos, sin) =
            rope_cos_sin_inv(&positions, &c.rope_inv_freqs(), self.dtype, &self.device)?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &self.device)?.to_dtype(self.dtype)?;
        let mut x = self
            .p("model.embed_tokens.weight")?
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        for l in 0..c.num_hidden_layers {
            let pf = format!("model.layers.{l}");
            let w = |n: &str| self.p(&format!("{pf}.{n}"));
            let xn = rms_norm_diff(&x, w("input_layernorm.weight")?, eps)?.reshape((b * t, d))?;
            let mut q = xn.matmul(&w("self_attn.q_proj.weight")?.t()?)?;
            let mut k = xn.matmul(&w("self_attn.k_proj.weight")?.t()?)?;
            let mut v = xn.matmul(&w("self_attn.v_proj.weight")?.t()?)?;
            if c.qkv_bias {
                q = q.broadcast_add(w("self_attn.q_proj.bias")?)?;
                k = k.broadcast_add(w("self_attn.k_proj.bias")?)?;
                v = v.broadcast_add(w("self_attn.v_proj.bias")?)?;
            }
            let q = q.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((b, t, kv, hd))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((b, t, kv, hd))?.transpose(1, 2)?.contiguous()?;
            let q = rope_half_diff(&q, &cos, &sin)?.contiguous()?;
            let k = rope_half_diff(&k, &cos, &sin)?.contiguous()?;
            // GQA without repeating K/V: group the n_rep query heads of each kv head.
            let q = q.reshape((b, kv, n_rep * t, hd))?;
            let att = (q.matmul(&k.t()?)? * scale)?;
            let att = att.reshape((b, kv, n_rep, t, t))?.broadcast_add(&mask)?;
            let att = softmax_diff(&att)?.reshape((b, kv, n_rep * t, t))?;
            let y = att
                .matmul(&v)?
                .reshape((b, h, t, hd))?
                .transpose(1, 2)?
                .reshape((b * t, h * hd))?;
            let y = y
                .matmul(&w("self_attn.o_proj.weight")?.t()?)?
                .reshape((b, t, d))?;
            x = (x + y)?;
            let xn = rms_norm_diff(&x, w("post_attention_layernorm.weight")?, eps)?
                .reshape((b * t, d))?;
            let g = xn.matmul(&w("mlp.gate_proj.weight")?.t()?)?.silu()?;
            let u = xn.matmul(&w("mlp.up_proj.weight")?.t()?)?;
            let m = (g * u)?
                .matmul(&w("mlp.down_proj.weight")?.t()?)?
                .reshape((b, t, d))?;
            x = (x + m)?;
        }
        Ok(rms_norm_diff(&x, self.p("model.norm.weight")?, eps)?)
    }

    /// Full-sequence logits `[T, vocab]` (model dtype), same math as `response_logprobs`.
    pub fn logits(&self, tokens: &[u32]) -> anyhow::Result<Tensor> {
        anyhow::ensure!(!tokens.is_empty(), "logits: empty token sequence");
        let t = tokens.len();
        let ids = Tensor::from_vec(tokens.to_vec(), (1, t), &self.device)?;
        let h = self.hidden(&ids)?.reshape((t, self.config.hidden_size))?;
        Ok(h.matmul(&self.lm_head()?.t()?)?)
    }

    /// `log pi(response_t | prompt, response_<t)` for every response token of each
    /// `(prompt, response)` pair. Returns `(logprobs [B, Tmax], mask [B, Tmax])`,
    /// Tmax = longest response, padding entries 0 in both (mask is 1/0 in model dtype).
    /// Differentiable w.r.t. `vars()`. Prompts must be non-empty.
    pub fn response_logprobs(
        &self,
        pairs: &[(Vec<u32>, Vec<u32>)],
    ) -> anyhow::Result<(Tensor, Tensor)> {
        self.response_logprobs_t(pairs, 1.0)
    }

    /// As [`TrainableModel::response_logprobs`] but under `softmax(logits / temperature)`
    /// (matches the sampler's log-probs when generation used that temperature).
    pub fn response_logprobs_t(
        &self,
        pairs: &[(Vec<u32>, Vec<u32>)],
        temperature: f64,
    ) -> anyhow::Result<(Tensor, Tensor)> {
        let Prepared {
            b,
            t,
            tmax,
            ids,
            rows,
            targets,
            mask,
        } = match self.prepare(pairs)? {
            Some(p) => p,
            None => {
                let z = Tensor::zeros((pairs.len(), 0), self.dtype, &self.device)?;
                return Ok((z.clone(), z));
            }
        };
        let ids = Tensor::from_vec(ids, (b, t), &self.device)?;
        let d = self.config.hidden_size;
        let h = self.hidden(&ids)?.reshape((b * t, d))?;
        let n = b * tmax;
        let rows = Tensor::from_vec(rows, n, &self.device)?;
        let targets = Tensor::from_vec(targets, n, &self.device)?;
        let hs = h.index_select(&rows, 0)?; // [N, D]
        let w = self.lm_head()?;
        let inv_t = 1.0 / temperature;
        let mask = Tensor::from_vec(mask, (b, tmax), &self.device)?.to_dtype(self.dtype)?;
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < n {
            let len = LOGPROB_CHUNK_ROWS.min(n - start);
            let hc = hs.narrow(0, start, len)?;
            let tc = targets.narrow(0, start, len)?;
            let mut logits = hc.matmul(&w.t()?)?;
            if temperature != 1.0 {
                logits = (logits * inv_t)?;
            }
            // gather's backward scatters into a [rows, vocab] buffer, far smaller than
            // the [vocab, hidden] one an embedding-row index_select would need.
            let tgt = logits.gather(&tc.unsqueeze(1)?, 1)?;
            chunks.push((tgt - logsumexp_diff(&logits)?)?);
            start += len;
        }
        let lp = Tensor::cat(&chunks, 0)?.reshape((b, tmax))?;
        let lp = (lp * &mask)?;
        Ok((lp, mask))
    }

    /// Checks `pairs` and lays them out: input ids `[B, T]` (prompt + response[..R-1],
    /// right-padded with 0) and, for each of the `B * Tmax` response slots, the input row
    /// whose next token it is, the target and 1/0 for real/padding. `None` when no pair
    /// has a response token.
    fn prepare(&self, pairs: &[(Vec<u32>, Vec<u32>)]) -> anyhow::Result<Option<Prepared>> {
        let b = pairs.len();
        anyhow::ensure!(b > 0, "response_logprobs: empty batch");
        anyhow::ensure!(
            pairs.iter().all(|(p, _)| !p.is_empty()),
            "response_logprobs: empty prompt"
        );
        let vocab = self.config.vocab_size as u32;
        anyhow::ensure!(
            pairs
                .iter()
                .flat_map(|(p, r)| p.iter().chain(r))
                .all(|&t| t < vocab),
            "response_logprobs: token id out of vocabulary"
        );
        let tmax = pairs.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
        if tmax == 0 {
            return Ok(None);
        }
        let lens: Vec<usize> = pairs
            .iter()
            .map(|(p, r)| p.len() + r.len().saturating_sub(1))
            .collect();
        let t = *lens.iter().max().unwrap();
        let mut ids = Vec::with_capacity(b * t);
        let mut rows = Vec::with_capacity(b * tmax);
        let mut targets = Vec::with_capacity(b * tmax);
        let mut mask = Vec::with_capacity(b * tmax);
        for (bi, (p, r)) in pairs.iter().enumerate() {
            let seq: Vec<u32> = p.iter().chain(r.iter()).copied().take(lens[bi]).collect();
            ids.extend_from_slice(&seq);
            ids.extend(std::iter::repeat_n(0u32, t - seq.len()));
            for j in 0..tmax {
                if j < r.len() {
                    rows.push((bi * t + p.len() - 1 + j) as u32);
                    targets.push(r[j]);
                    mask.push(1f32);
                } else {
                    rows.push(0);
                    targets.push(0);
                    mask.push(0f32);
                }
            }
        }
        Ok(Some(Prepared {
            b,
            t,
            tmax,
            ids,
            rows,
            targets,
            mask,
        }))
    }

    /// The training forward of one micro-batch: response log-probs `[B, Tmax]` (as
    /// [`TrainableModel::response_logprobs_t`]) to build a loss from, and what
    /// [`TrainForward::param_grads`] needs to turn that loss's backward into the
    /// parameters' gradients. On the CPU (f32/f64, unless [`TrainableModel::set_whole`]
    /// turned it off) this is the hand-written
    /// whole-model pass of [`crate::fused`]; `logp` is then a leaf and the model's
    /// backward runs inside `param_grads`. Elsewhere `logp` carries candle's graph.
    pub fn forward_train(
        &self,
        pairs: &[(Vec<u32>, Vec<u32>)],
        temperature: f64,
    ) -> anyhow::Result<TrainForward> {
        if !self.whole {
            let (logp, mask) = self.response_logprobs_t(pairs, temperature)?;
            return Ok(TrainForward {
                logp,
                mask,
                kind: TrainKind::Graph,
            });
        }
        let Some(p) = self.prepare(pairs)? else {
            let z = Tensor::zeros((pairs.len(), 0), self.dtype, &self.device)?;
            return Ok(TrainForward {
                logp: z.clone(),
                mask: z,
                kind: TrainKind::Graph,
            });
        };
        let slots: Vec<usize> = (0..p.mask.len()).filter(|&i| p.mask[i] > 0.0).collect();
        let rows: Vec<u32> = slots.iter().map(|&i| p.rows[i]).collect();
        let targets: Vec<u32> = slots.iter().map(|&i| p.targets[i]).collect();
        let inv_t = 1.0 / temperature;
        let (b, t, tmax) = (p.b, p.t, p.tmax);
        let mask = Tensor::from_vec(p.mask, (b, tmax), &self.device)?.to_dtype(self.dtype)?;
        macro_rules! run {
            ($ty:ty, $variant:ident) => {{
                let (lp, tape) = fused::whole::forward::<$ty>(
                    &self.config,
                    &self.vars,
                    &self.pix,
                    p.ids,
                    b,
                    t,
                    rows,
                    targets,
                    inv_t,
                )?;
                let mut full = vec![0 as $ty; b * tmax];
                for (&i, &v) in slots.iter().zip(&lp) {
                    full[i] = v;
                }
                (
                    full_var(full, b, tmax, &self.device)?,
                    WholeTape::$variant(tape),
                )
            }};
        }
        let (leaf, tape) = match self.dtype {
            DType::F32 => run!(f32, F32),
            DType::F64 => run!(f64, F64),
            d => anyhow::bail!("whole-model pass: unsupported dtype {d:?}"),
        };
        Ok(TrainForward {
            logp: leaf.as_tensor().clone(),
            mask,
            kind: TrainKind::Whole {
                leaf,
                tape: Box::new(tape),
                slots,
            },
        })
    }

    /// Chooses the hand-written whole-model training pass (`true`, the default where it
    /// runs: CPU, f32/f64; ignored elsewhere) or candle's autograd over the primitives
    /// (`false`) in [`TrainableModel::forward_train`].
    pub fn set_whole(&mut self, on: bool) {
        self.whole = on && fused::supported(&self.device, self.dtype);
    }

    /// Whether [`TrainableModel::forward_train`] uses the whole-model pass.
    pub fn is_whole(&self) -> bool {
        self.whole
    }
}

fn full_var<T: candle_core::WithDType>(
    v: Vec<T>,
    b: usize,
    tmax: usize,
    device: &Device,
) -> candle_core::Result<Var> {
    Var::from_tensor(&Tensor::from_vec(v, (b, tmax), device)?)
}

/// Inputs laid out for a forward (see `TrainableModel::prepare`).
struct Prepared {
    b: usize,
    t: usize,
    tmax: usize,
    ids: Vec<u32>,
    rows: Vec<u32>,
    targets: Vec<u32>,
    mask: Vec<f32>,
}

enum WholeTape {
    F32(fused::whole::Tape<f32>),
    F64(fused::whole::Tape<f64>),
}

enum TrainKind {
    /// `logp` carries candle's graph back to the parameters.
    Graph,
    /// `logp` is the leaf `leaf`; the model's backward runs from the tape.
    Whole {
        leaf: Var,
        tape: Box<WholeTape>,
        /// Flat `[B * Tmax]` slot of each scored row.
        slots: Vec<usize>,
    },
}

/// One micro-batch's training forward (see [`TrainableModel::forward_train`]).
pub struct TrainForward {
    /// Response log-probs `[B, Tmax]`, 0 at padding.
    pub logp: Tensor,
    /// `[B, Tmax]`, 1 for a response token and 0 for padding (model dtype).
    pub mask: Tensor,
    kind: TrainKind,
}

impl TrainForward {
    /// The parameters' gradients (in [`TrainableModel::vars`] order, detached) of the loss
    /// whose backward is `grads`; `None` for a parameter the loss does not depend on.
    pub fn param_grads(
        self,
        model: &TrainableModel,
        grads: &GradStore,
    ) -> anyhow::Result<Vec<Option<Tensor>>> {
        let mut sums = GradSums::new(model);
        self.accumulate(model, grads, &mut sums)?;
        sums.into_tensors(model)
    }

    /// Adds the parameters' gradients of the loss whose backward is `grads` to `sums`
    /// (gradient accumulation over micro-batches). The whole-model pass writes straight
    /// into the running sums, so accumulating costs no second set of gradients.
    pub fn accumulate(
        self,
        model: &TrainableModel,
        grads: &GradStore,
        sums: &mut GradSums,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            sums.tensors.len() == model.vars.len(),
            "gradient sums for {} parameters, the model has {}",
            sums.tensors.len(),
            model.vars.len()
        );
        match self.kind {
            TrainKind::Graph => {
                for (slot, (_, v)) in sums.tensors.iter_mut().zip(&model.vars) {
                    if let Some(g) = grads.get(v.as_tensor()) {
                        *slot = Some(match slot.take() {
                            Some(sum) => (sum + g)?.detach(),
                            None => g.detach(),
                        });
                    }
                }
            }
            TrainKind::Whole { leaf, tape, slots } => {
                let Some(dl) = grads.get(leaf.as_tensor()) else {
                    return Ok(());
                };
                match *tape {
                    WholeTape::F32(tape) => whole_backward(model, tape, dl, &slots, &mut sums.f32)?,
                    WholeTape::F64(tape) => whole_backward(model, tape, dl, &slots, &mut sums.f64)?,
                }
            }
        }
        Ok(())
    }
}

/// Runs the whole-model backward of `tape` for the log-prob gradient `dl` (`[B, Tmax]`, of
/// which `slots` are the scored positions), adding into `sums`.
fn whole_backward<T: fused::Real + 'static>(
    model: &TrainableModel,
    tape: fused::whole::Tape<T>,
    dl: &Tensor,
    slots: &[usize],
    sums: &mut Vec<Vec<T>>,
) -> anyhow::Result<()> {
    let dl = dl.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()?;
    let dlp: Vec<T> = slots.iter().map(|&i| dl[i]).collect();
    sums.resize_with(model.vars.len(), Vec::new);
    fused::whole::backward(&model.config, &model.vars, &model.pix, tape, &dlp, sums)?;
    Ok(())
}

/// Parameter gradients summed over micro-batches ([`TrainForward::accumulate`]), in
/// [`TrainableModel::vars`] order.
pub struct GradSums {
    /// Sums kept as tensors (the candle-autograd paths).
    tensors: Vec<Option<Tensor>>,
    /// Sums the whole-model pass writes in place (empty = none yet), by parameter dtype.
    f32: Vec<Vec<f32>>,
    f64: Vec<Vec<f64>>,
}

impl GradSums {
    /// No gradient yet for any parameter of `model`.
    pub fn new(model: &TrainableModel) -> Self {
        Self {
            tensors: vec![None; model.vars.len()],
            f32: Vec::new(),
            f64: Vec::new(),
        }
    }

    /// The sums as detached tensors shaped like the parameters; `None` where no micro-batch
    /// gave the parameter a gradient.
    pub fn into_tensors(self, model: &TrainableModel) -> anyhow::Result<Vec<Option<Tensor>>> {
        /// Adds the in-place buffers (empty = none) to the tensor sums.
        fn fold_in<T: candle_core::WithDType>(
            out: &mut [Option<Tensor>],
            bufs: Vec<Vec<T>>,
            model: &TrainableModel,
        ) -> anyhow::Result<()> {
            for ((slot, g), (_, v)) in out.iter_mut().zip(bufs).zip(&model.vars) {
                if !g.is_empty() {
                    let g = Tensor::from_vec(g, v.as_tensor().shape(), &Device::Cpu)?;
                    *slot = Some(match slot.take() {
                        Some(sum) => (sum + g)?.detach(),
                        None => g,
                    });
                }
            }
            Ok(())
        }
        let mut out = self.tensors;
        fold_in(&mut out, self.f32, model)?;
        fold_in(&mut out, self.f64, model)?;
        Ok(out)
    }

    /// The sums as a candle [`GradStore`] keyed by the parameters (what the optimizer and
    /// [`crate::grad_norm`] take).
    pub fn into_grad_store(self, model: &TrainableModel) -> anyhow::Result<GradStore> {
        let tensors = self.into_tensors(model)?;
        anyhow::ensure!(tensors.iter().any(Option::is_some), "no gradient computed");
        // The backward of a constant is the way to get an empty store.
        let mut store = Tensor::zeros((), DType::F32, &Device::Cpu)?.backward()?;
        for (g, (_, v)) in tensors.into_iter().zip(&model.vars) {
            if let Some(g) = g {
                store.insert(v.as_tensor(), g);
            }
        }
        Ok(store)
    }
}

/// Parameter gradients as f32 host buffers in [`TrainableModel::vars`] order (`None`: no
/// gradient): the form in which learner ranks all-reduce them.
pub struct HostGrads {
    pub grads: Vec<Option<Vec<f32>>>,
}

impl GradSums {
    /// The sums as f32 host buffers, moving the whole-model pass's f32 buffers without a copy
    /// (tensor sums are copied to the host; f64 sums are rounded to f32).
    pub fn into_host(self, model: &TrainableModel) -> anyhow::Result<HostGrads> {
        let mut out: Vec<Option<Vec<f32>>> = Vec::with_capacity(model.vars.len());
        for t in self.tensors {
            out.push(match t {
                Some(t) => Some(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => None,
            });
        }
        fn add(slot: &mut Option<Vec<f32>>, g: Vec<f32>) {
            match slot {
                Some(sum) => sum.iter_mut().zip(&g).for_each(|(s, x)| *s += x),
                None => *slot = Some(g),
            }
        }
        for (slot, g) in out.iter_mut().zip(self.f32) {
            if !g.is_empty() {
                add(slot, g);
            }
        }
        for (slot, g) in out.iter_mut().zip(self.f64) {
            if !g.is_empty() {
                add(slot, g.into_iter().map(|x| x as f32).collect());
            }
        }
        Ok(HostGrads { grads: out })
    }
}

impl HostGrads {
    /// The gradients as a candle [`GradStore`] on the model's device and dtype.
    pub fn into_grad_store(self, model: &TrainableModel) -> anyhow::Result<GradStore> {
        anyhow::ensure!(
            self.grads.len() == model.vars.len(),
            "gradients for {} parameters, the model has {}",
            self.grads.len(),
            model.vars.len()
        );
        anyhow::ensure!(
            self.grads.iter().any(Option::is_some),
            "no gradient computed"
        );
        let mut store = Tensor::zeros((), DType::F32, &Device::Cpu)?.backward()?;
        for (g, (_, v)) in self.grads.into_iter().zip(&model.vars) {
            if let Some(g) = g {
                let t = Tensor::from_vec(g, v.as_tensor().shape(), &Device::Cpu)?
                    .to_dtype(model.dtype)?
                    .to_device(&model.device)?;
                store.insert(v.as_tensor(), t);
            }
        }
        Ok(store)
    }
}
