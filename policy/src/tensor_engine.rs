//! The tensor engine: a Llama/Qwen2 forward over candle tensors, for devices other than the CPU
//! (CUDA): candle's fused inference kernels (rope, rms_norm, softmax), a pre-allocated KV cache
//! per batch, and batched prefill of left-padded prompts, `max_batch` prompts at a time
//! (finished sequences are dropped from the batch and the cache compacted). It runs on any
//! candle device, the CPU included, which is how the tests hold it to the CPU engine's
//! results without a GPU.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::generator::Generator;
use crate::ops::{padded_causal_mask, rope_cos_sin_inv};
use crate::sampling::{sample_row, Generation, SamplingParams};
use crate::weights::Weights;
use hindsight_model::ModelConfig;

struct Layer {
    ln1: Tensor,
    /// q, k, v projections concatenated: `[(H + 2*KV) * hd, D]`.
    wqkv: Tensor,
    /// q, k, v biases concatenated `[(H + 2*KV) * hd]` (Qwen2).
    bqkv: Option<Tensor>,
    wo: Tensor,
    ln2: Tensor,
    /// gate and up projections concatenated: `[2 * I, D]`.
    wgu: Tensor,
    wdown: Tensor,
}

struct KvBuf {
    k: Tensor,
    v: Tensor,
}
/// The weights on the device, in the layout the forward reads (q/k/v and gate/up fused).
pub struct TensorEngine {
    config: ModelConfig,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    interleaved_rope: bool,
    /// Rotary inverse frequencies (with the config's scaling applied).
    inv_freqs: Vec<f32>,
}

impl TensorEngine {
    /// Copies HF-layout `weights` (validated against `config`) to `device`.
    pub fn new(config: &ModelConfig, weights: &Weights, device: &Device) -> anyhow::Result<Self> {
        config.validate()?;
        weights.validate(config)?;
        let dev = device;
        let get = |n: &str| -> anyhow::Result<Tensor> {
            Ok(weights.get(n)?.to_dtype(DType::F32)?.to_device(dev)?)
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let q = get(&format!("{p}.self_attn.q_proj.weight"))?;
            let k = get(&format!("{p}.self_attn.k_proj.weight"))?;
            let v = get(&format!("{p}.self_attn.v_proj.weight"))?;
            let gate = get(&format!("{p}.mlp.gate_proj.weight"))?;
            let up = get(&format!("{p}.mlp.up_proj.weight"))?;
            layers.push(Layer {
                ln1: get(&format!("{p}.input_layernorm.weight"))?,
                wqkv: Tensor::cat(&[&q, &k, &v], 0)?,
                bqkv: if config.qkv_bias {
                    let b = |n: &str| get(&format!("{p}.self_attn.{n}_proj.bias"));
                    Some(Tensor::cat(&[&b("q")?, &b("k")?, &b("v")?], 0)?)
                } else {
                    None
                },
                wo: get(&format!("{p}.self_attn.o_proj.weight"))?,
                ln2: get(&format!("{p}.post_attention_layernorm.weight"))?,
                wgu: Tensor::cat(&[&gate, &up], 0)?,
                wdown: get(&format!("{p}.mlp.down_proj.weight"))?,
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let lm_head = if config.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")?
        };
        Ok(Self {
            config: config.clone(),
            device: device.clone(),
            embed,
            layers,
            norm: get("model.norm.weight")?,
            lm_head,
            interleaved_rope: false,
            inv_freqs: config.rope_inv_freqs(),
        })
    }

    /// Runs the transformer over `ids` `[B, T]`, writing K/V into `caches` at slot
    /// `offset` (or attending only within the chunk when `caches` is None).
    /// `cos`/`sin`: `[B, T, hd/2]`; `mask`: `[B, 1, 1, T, Tk]` additive. Returns the
    /// final-normed hidden states `[B, T, D]`.
    fn forward(
        &self,
        ids: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        mut caches: Option<&mut [KvBuf]>,
        offset: usize,
    ) -> anyhow::Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let d = c.hidden_size;
        let (h, kv, hd, n_rep) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim(),
            c.n_rep(),
        );
        let eps = c.rms_norm_eps as f32;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        for (li, l) in self.layers.iter().enumerate() {
            let xn = candle_nn::ops::rms_norm(&x, &l.ln1, eps)?;
            let mut qkv = linear(&xn.reshape((b * t, d))?, &l.wqkv)?;
            if let Some(bias) = &l.bqkv {
                qkv = qkv.broadcast_add(bias)?;
            }
            let q = qkv
                .narrow(1, 0, h * hd)?
                .reshape((b, t, h, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = qkv
                .narrow(1, h * hd, kv * hd)?
                .reshape((b, t, kv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = qkv
                .narrow(1, (h + kv) * hd, kv * hd)?
                .reshape((b, t, kv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let (q, k) = if self.interleaved_rope {
                (
                    candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                    candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
                )
            } else {
                (
                    candle_nn::rotary_emb::rope(&q, cos, sin)?,
                    candle_nn::rotary_emb::rope(&k, cos, sin)?,
                )
            };
            let (k_all, v_all) = match caches.as_deref_mut() {
                Some(cs) => {
                    let cb = &mut cs[li];
                    cb.k.slice_set(&k, 2, offset)?;
                    cb.v.slice_set(&v, 2, offset)?;
                    let (mut ka, mut va) = (
                        cb.k.narrow(2, 0, offset + t)?,
                        cb.v.narrow(2, 0, offset + t)?,
                    );
                    if !self.device.is_cpu() {
                        ka = ka.contiguous()?;
                        va = va.contiguous()?;
                    }
                    (ka, va)
                }
                None => (k, v),
            };
            let tk = k_all.dim(2)?;
            let q = q.reshape((b, kv, n_rep * t, hd))?;
            let att = (q.matmul(&k_all.t()?)? * scale)?;
            let att = match mask {
                Some(m) => att
                    .reshape((b, kv, n_rep, t, tk))?
                    .broadcast_add(m)?
                    .reshape((b, kv, n_rep * t, tk))?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att
                .matmul(&v_all)?
                .reshape((b, h, t, hd))?
                .transpose(1, 2)?
                .reshape((b * t, h * hd))?;
            let y = linear(&y, &l.wo)?.reshape((b, t, d))?;
            x = (x + y)?;
            let xn = candle_nn::ops::rms_norm(&x, &l.ln2, eps)?.reshape((b * t, d))?;
            let gu = linear(&xn, &l.wgu)?;
            let i = c.intermediate_size;
            let g = gu.narrow(1, 0, i)?.silu()?;
            let u = gu.narrow(1, i, i)?;
            let m = linear(&(g * u)?, &l.wdown)?.reshape((b, t, d))?;
            x = (x + m)?;
        }
        Ok(candle_nn::ops::rms_norm(&x, &self.norm, eps)?)
    }

    fn cos_sin_batch(
        &self,
        positions: &[usize],
        b: usize,
        t: usize,
    ) -> anyhow::Result<(Tensor, Tensor)> {
        let (cos, sin) = rope_cos_sin_inv(positions, &self.inv_freqs, DType::F32, &self.device)?;
        let half = self.config.head_dim() / 2;
        Ok((cos.reshape((b, t, half))?, sin.reshape((b, t, half))?))
    }

    fn logits_tensor(&self, tokens: &[u32]) -> anyhow::Result<Tensor> {
        anyhow::ensure!(!tokens.is_empty(), "logits: empty token sequence");
        let t = tokens.len();
        let ids = Tensor::from_vec(tokens.to_vec(), (1, t), &self.device)?;
        let positions: Vec<usize> = (0..t).collect();
        let (cos, sin) = self.cos_sin_batch(&positions, 1, t)?;
        let mask = if t > 1 {
            Some(padded_causal_mask(&[0], t, 0, t, DType::F32, &self.device)?)
        } else {
            None
        };
        let h = self.forward(&ids, &cos, &sin, mask.as_ref(), None, 0)?;
        Ok(h.reshape((t, self.config.hidden_size))?
            .matmul(&self.lm_head.t()?)?)
    }

    /// The candle path: one left-padded batch; finished sequences are dropped from the
    /// batch (KV cache compacted); row `i` draws from stream `keys[i]`.
    fn generate_padded(
        &self,
        prompts: &[Vec<u32>],
        keys: &[usize],
        params: &SamplingParams,
        stops: &[u32],
    ) -> anyhow::Result<Vec<Generation>> {
        let n = prompts.len();
        let mut gens: Vec<Generation> = (0..n)
            .map(|_| Generation {
                token_ids: vec![],
                logprobs: vec![],
                entropies: vec![],
                finished: false,
            })
            .collect();
        if n == 0 || params.max_new_tokens == 0 {
            return Ok(gens);
        }
        anyhow::ensure!(
            prompts.iter().all(|p| !p.is_empty()),
            "generate: empty prompt"
        );
        let vocab = self.config.vocab_size as u32;
        anyhow::ensure!(
            prompts.iter().flatten().all(|&t| t < vocab),
            "generate: token id out of vocabulary"
        );
        let c = &self.config;
        let (kv, hd) = (c.num_key_value_heads, c.head_dim());
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let lmax = *lens.iter().max().unwrap();
        let cap = lmax + params.max_new_tokens;
        let mut rngs: Vec<ChaCha8Rng> = (0..n)
            .map(|i| {
                let mut r = ChaCha8Rng::seed_from_u64(params.seed);
                r.set_stream(keys[i] as u64);
                r
            })
            .collect();

        // Prefill.
        let mut pads: Vec<usize> = lens.iter().map(|l| lmax - l).collect();
        let mut ids = Vec::with_capacity(n * lmax);
        let mut positions = Vec::with_capacity(n * lmax);
        for (p, &pad) in prompts.iter().zip(&pads) {
            ids.extend(std::iter::repeat_n(0u32, pad));
            ids.extend_from_slice(p);
            positions.extend((0..lmax).map(|i| i.saturating_sub(pad)));
        }
        let ids = Tensor::from_vec(ids, (n, lmax), &self.device)?;
        let (cos, sin) = self.cos_sin_batch(&positions, n, lmax)?;
        let mask = if lmax > 1 || pads.iter().any(|&p| p > 0) {
            Some(padded_causal_mask(
                &pads,
                lmax,
                0,
                lmax,
                DType::F32,
                &self.device,
            )?)
        } else {
            None
        };
        let mut caches: Vec<KvBuf> = (0..c.num_hidden_layers)
            .map(|_| -> anyhow::Result<KvBuf> {
                Ok(KvBuf {
                    k: Tensor::zeros((n, kv, cap, hd), DType::F32, &self.device)?,
                    v: Tensor::zeros((n, kv, cap, hd), DType::F32, &self.device)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let h = self.forward(&ids, &cos, &sin, mask.as_ref(), Some(&mut caches), 0)?;
        // The last position of each row is a strided view; CUDA's matmul (cuBLAS) takes only
        // contiguous operands, the CPU's any layout.
        let last = h.narrow(1, lmax - 1, 1)?.squeeze(1)?.contiguous()?;
        let mut logits = linear(&last, &self.lm_head)?;

        // active[r] = original index of batch row r.
        let mut active: Vec<usize> = (0..n).collect();
        for step in 0..params.max_new_tokens {
            let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
            let mut next = Vec::with_capacity(active.len());
            let mut keep = Vec::with_capacity(active.len());
            // Rows are independent (own RNG stream), so sample them in parallel.
            let mut row_rngs: Vec<(usize, ChaCha8Rng)> = active
                .iter()
                .map(|&o| {
                    (
                        o,
                        std::mem::replace(&mut rngs[o], ChaCha8Rng::seed_from_u64(0)),
                    )
                })
                .collect();
            let picks: Vec<(u32, f32, f32)> = row_rngs
                .par_iter_mut()
                .zip(rows.par_iter())
                .map(|((_, rng), row)| sample_row(row, params, rng))
                .collect();
            for (o, rng) in row_rngs {
                rngs[o] = rng;
            }
            for (r, &orig) in active.iter().enumerate() {
                let (tok, lp, ent) = picks[r];
                let g = &mut gens[orig];
                g.token_ids.push(tok);
                g.logprobs.push(lp);
                g.entropies.push(ent);
                if stops.contains(&tok) {
                    g.finished = true;
                } else {
                    keep.push(r);
                    next.push(tok);
                }
            }
            if keep.is_empty() || step + 1 == params.max_new_tokens {
                break;
            }
            if keep.len() < active.len() {
                let idx = Tensor::from_vec(
                    keep.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                    keep.len(),
                    &self.device,
                )?;
                for cb in caches.iter_mut() {
                    cb.k = cb.k.index_select(&idx, 0)?.contiguous()?;
                    cb.v = cb.v.index_select(&idx, 0)?.contiguous()?;
                }
                active = keep.iter().map(|&r| active[r]).collect();
                pads = keep.iter().map(|&r| pads[r]).collect();
            }
            let b = active.len();
            let slot = lmax + step;
            let positions: Vec<usize> = pads.iter().map(|&p| slot - p).collect();
            let (cos, sin) = self.cos_sin_batch(&positions, b, 1)?;
            let mask = if pads.iter().any(|&p| p > 0) {
                Some(padded_causal_mask(
                    &pads,
                    1,
                    slot,
                    slot + 1,
                    DType::F32,
                    &self.device,
                )?)
            } else {
                None
            };
            let ids = Tensor::from_vec(next, (b, 1), &self.device)?;
            let h = self.forward(&ids, &cos, &sin, mask.as_ref(), Some(&mut caches), slot)?;
            logits = linear(&h.squeeze(1)?, &self.lm_head)?;
        }
        Ok(gens)
    }
}

impl Generator for TensorEngine {
    fn set_interleaved_rope(&mut self, interleaved: bool) {
        self.interleaved_rope = interleaved;
    }

    fn logits(&self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        Ok(self
            .logits_tensor(tokens)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1()?)
    }

    /// Prompts are pulled and run `max_batch` at a time (no refill while a batch runs);
    /// the prefill budget does not apply (a batch's prompts are prefilled together).
    fn generate_stream(
        &self,
        params: &SamplingParams,
        stops: &[u32],
        max_batch: usize,
        _max_prefill_tokens: usize,
        next: &mut dyn FnMut() -> Option<(usize, Vec<u32>)>,
        done: &mut dyn FnMut(usize, Generation) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let max_batch = max_batch.max(1);
        loop {
            let mut keys = Vec::new();
            let mut prompts = Vec::new();
            while keys.len() < max_batch {
                match next() {
                    Some((k, p)) => {
                        keys.push(k);
                        prompts.push(p);
                    }
                    None => break,
                }
            }
            if keys.is_empty() {
                return Ok(());
            }
            let gens = self.generate_padded(&prompts, &keys, params, stops)?;
            for (k, g) in keys.into_iter().zip(gens) {
                done(k, g)?;
            }
        }
    }
}

/// `x [m, k] @ w [n, k]^T` (the CPU engine has its own kernel).
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    // cuBLAS takes a contiguous input only, the CPU's matmul any layout: checked here so
    // that the CPU tests of this engine catch a strided input before a GPU does.
    debug_assert!(
        x.is_contiguous(),
        "linear: strided input {:?} (CUDA's matmul needs it contiguous)",
        x.layout()
    );
    x.matmul(&w.t()?)
}
