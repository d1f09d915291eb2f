//! The inference front end (`Sampler`): temperature / top-p sampling that reports
//! per-token log-probs and entropy, over one of two forwards:
//! - on CPU, the engine in [`crate::engine`]: continuous batching (finished sequences
//!   free their slot for the next prompt), a KV cache per sequence, f32 or bf16 weights;
//! - on other devices (CUDA), a Llama forward built on candle's fused inference kernels
//!   (rope, rms_norm, softmax), a pre-allocated KV cache and batched prefill of
//!   left-padded prompts; there the prompts are run `max_batch` at a time.
//!
//! Log-prob convention: `logprobs[t]` is `log p(token_t)` under
//! `softmax(logits / temperature)` — the distribution actually sampled from —
//! *before* top-p truncation (so it is a smooth function of the weights, and equals
//! what the trainer recomputes with the same temperature). `entropies[t]` is the
//! entropy of that same distribution. With `temperature == 0` (greedy) both refer
//! to the temperature-1 distribution.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::engine::{CpuEngine, Precision};
use crate::ops::{padded_causal_mask, rope_cos_sin_inv};
use crate::weights::Weights;
use hindsight_model::ModelConfig;

/// Sampling parameters. `temperature == 0` => greedy; `top_p >= 1` => no truncation.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 128,
            seed: 0,
        }
    }
}

/// One generated continuation. Stop tokens are included (with their log-prob).
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub entropies: Vec<f32>,
    /// True iff the sequence ended on a stop token (false: hit `max_new_tokens`).
    pub finished: bool,
}

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

/// Batched KV-cache inference engine.
pub struct Sampler {
    config: ModelConfig,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    stops: Vec<u32>,
    interleaved_rope: bool,
    /// Rotary inverse frequencies (with the config's scaling applied).
    inv_freqs: Vec<f32>,
    /// The CPU engine (CPU devices); the candle tensors above are then left empty.
    engine: Option<CpuEngine>,
    precision: Precision,
    /// Sequences in flight at once.
    max_batch: usize,
    /// Prompt tokens prefilled per engine step (at least one whole prompt).
    max_prefill_tokens: usize,
}

/// Weights ready to be installed in a [`Sampler`] ([`Sampler::prepare_safetensors`]).
pub struct PreparedWeights(Prepared);

enum Prepared {
    /// The CPU engine, built.
    Cpu(Box<CpuEngine>),
    /// f32 host tensors, copied to the device by [`Sampler::install`].
    Other(Weights),
}

const NO_WEIGHTS: &str = "the sampler holds no weights: the last weight swap failed part-way";

/// Default number of sequences generated at once.
pub const DEFAULT_MAX_BATCH: usize = 32;
/// Default prompt-token budget of one engine step.
pub const DEFAULT_MAX_PREFILL_TOKENS: usize = 2048;

impl Sampler {
    /// Builds the engine from HF-layout weights (half-rotation rope).
    pub fn new(
        config: &ModelConfig,
        weights: &Weights,
        tokenizer_stops: &[u32],
        device: &Device,
    ) -> anyhow::Result<Self> {
        Self::with_precision(config, weights, tokenizer_stops, device, Precision::F32)
    }

    /// A sampler with no weights yet (the constructors load or install them).
    fn empty(
        config: &ModelConfig,
        tokenizer_stops: &[u32],
        device: &Device,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        anyhow::ensure!(
            device.is_cpu() || precision == Precision::F32,
            "{precision} generation is implemented by the CPU engine only; use f32 on {device:?}"
        );
        Ok(Self {
            config: config.clone(),
            device: device.clone(),
            embed: Tensor::zeros(1, DType::F32, device)?,
            layers: Vec::new(),
            norm: Tensor::zeros(1, DType::F32, device)?,
            lm_head: Tensor::zeros(1, DType::F32, device)?,
            stops: tokenizer_stops.to_vec(),
            interleaved_rope: false,
            inv_freqs: config.rope_inv_freqs(),
            engine: None,
            precision,
            max_batch: DEFAULT_MAX_BATCH,
            max_prefill_tokens: DEFAULT_MAX_PREFILL_TOKENS,
        })
    }

    /// As [`Sampler::new`], with the generation weights stored in `precision`
    /// (bf16 is implemented by the CPU engine; other devices refuse it).
    pub fn with_precision(
        config: &ModelConfig,
        weights: &Weights,
        tokenizer_stops: &[u32],
        device: &Device,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        let mut s = Self::empty(config, tokenizer_stops, device, precision)?;
        s.load_weights(weights)?;
        Ok(s)
    }

    /// Test hook: treat q/k weights as GGUF-permuted and use interleaved rope (`rope_i`).
    pub fn set_interleaved_rope(&mut self, interleaved: bool) {
        self.interleaved_rope = interleaved;
        if let Some(e) = &mut self.engine {
            e.set_interleaved_rope(interleaved);
        }
    }

    /// Precision of the generation weights.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sequences generated at once (continuous batching refills finished slots).
    pub fn set_max_batch(&mut self, n: usize) {
        self.max_batch = n.max(1);
    }

    /// Sequences generated at once.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Prompt tokens prefilled per engine step (CPU engine; at least one prompt a step).
    pub fn set_max_prefill_tokens(&mut self, n: usize) {
        self.max_prefill_tokens = n.max(1);
    }

    /// The stop token ids generation ends on.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stops
    }

    /// Replaces the stop tokens.
    pub fn set_stop_token_ids(&mut self, stops: &[u32]) {
        self.stops = stops.to_vec();
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Swaps in a weight version sent as safetensors bytes (same config), never holding
    /// two full weight sets: the buffer is checked first (an error then leaves the current
    /// weights in place), and on the CPU the current engine is freed before the buffer is
    /// parsed and the buffer before the new engine is built. Peak: buffer + parsed weights,
    /// or parsed weights + engine. Should building fail after that (out of memory), the
    /// sampler has no weights ([`Sampler::has_weights`]) and refuses to generate.
    pub fn load_safetensors(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        Weights::validate_safetensors(&bytes, &self.config)?;
        if self.device.is_cpu() {
            self.engine = None;
        }
        let weights = Weights::from_safetensors_bytes(&bytes, &self.device)?;
        drop(bytes);
        self.load_weights(&weights)
    }

    /// Turns a weight version sent as safetensors bytes into what a sampler of this
    /// `config`, `device` and `precision` generates with, without touching any sampler: on
    /// the CPU the whole engine is built here, so an actor can do it while it generates with
    /// the current version and then [`Sampler::install`] it between two batches in O(1).
    /// The buffer is validated first.
    pub fn prepare_safetensors(
        config: &ModelConfig,
        device: &Device,
        precision: Precision,
        bytes: &[u8],
    ) -> anyhow::Result<PreparedWeights> {
        if device.is_cpu() {
            let engine = CpuEngine::from_safetensors(config, bytes, precision)?;
            return Ok(PreparedWeights(Prepared::Cpu(Box::new(engine))));
        }
        Weights::validate_safetensors(bytes, config)?;
        let weights = Weights::from_safetensors_bytes(bytes, &Device::Cpu)?;
        Ok(PreparedWeights(Prepared::Other(weights)))
    }

    /// As [`Sampler::prepare_safetensors`], for a payload held as the chunks it arrived in
    /// (never assembled): each chunk is freed once read, so the peak is about one copy of the
    /// weights beside the sampler's current ones.
    pub fn prepare_safetensors_chunks<B: AsRef<[u8]>>(
        config: &ModelConfig,
        device: &Device,
        precision: Precision,
        chunks: impl IntoIterator<Item = B>,
    ) -> anyhow::Result<PreparedWeights> {
        let tensors = crate::weights::f32_tensors_from_chunks(chunks)?;
        if device.is_cpu() {
            let engine = CpuEngine::from_f32_tensors(config, tensors, precision)?;
            return Ok(PreparedWeights(Prepared::Cpu(Box::new(engine))));
        }
        let mut map = std::collections::BTreeMap::new();
        for (name, (shape, data)) in tensors {
            map.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        let weights = Weights { tensors: map };
        weights.validate(config)?;
        Ok(PreparedWeights(Prepared::Other(weights)))
    }

    /// A sampler generating with prepared weights (see [`Sampler::prepare_safetensors`]).
    pub fn from_prepared(
        config: &ModelConfig,
        tokenizer_stops: &[u32],
        device: &Device,
        precision: Precision,
        prepared: PreparedWeights,
    ) -> anyhow::Result<Self> {
        let mut s = Self::empty(config, tokenizer_stops, device, precision)?;
        s.install(prepared)?;
        Ok(s)
    }

    /// Swaps in prepared weights. On the CPU this only replaces the engine (the old one is
    /// freed); elsewhere the weights are copied to the device here.
    pub fn install(&mut self, prepared: PreparedWeights) -> anyhow::Result<()> {
        match prepared.0 {
            Prepared::Cpu(mut engine) if self.device.is_cpu() => {
                engine.set_interleaved_rope(self.interleaved_rope);
                self.engine = Some(*engine);
                Ok(())
            }
            Prepared::Other(weights) if !self.device.is_cpu() => self.load_weights(&weights),
            _ => anyhow::bail!("weights prepared for another device"),
        }
    }

    /// Whether the sampler holds weights (false only after a failed
    /// [`Sampler::load_safetensors`]).
    pub fn has_weights(&self) -> bool {
        !self.device.is_cpu() || self.engine.is_some()
    }

    /// Swaps in a new weight version (same config).
    pub fn load_weights(&mut self, weights: &Weights) -> anyhow::Result<()> {
        weights.validate(&self.config)?;
        if self.device.is_cpu() {
            // Drop the old copy first so two full weight sets never coexist.
            self.engine = None;
            let mut e = CpuEngine::new(&self.config, weights, self.precision)?;
            e.set_interleaved_rope(self.interleaved_rope);
            self.engine = Some(e);
            return Ok(());
        }
        let dev = &self.device;
        let get = |n: &str| -> anyhow::Result<Tensor> {
            Ok(weights.get(n)?.to_dtype(DType::F32)?.to_device(dev)?)
        };
        let mut layers = Vec::with_capacity(self.config.num_hidden_layers);
        for l in 0..self.config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let q = get(&format!("{p}.self_attn.q_proj.weight"))?;
            let k = get(&format!("{p}.self_attn.k_proj.weight"))?;
            let v = get(&format!("{p}.self_attn.v_proj.weight"))?;
            let gate = get(&format!("{p}.mlp.gate_proj.weight"))?;
            let up = get(&format!("{p}.mlp.up_proj.weight"))?;
            layers.push(Layer {
                ln1: get(&format!("{p}.input_layernorm.weight"))?,
                wqkv: Tensor::cat(&[&q, &k, &v], 0)?,
                bqkv: if self.config.qkv_bias {
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
        self.embed = get("model.embed_tokens.weight")?;
        self.lm_head = if self.config.tie_word_embeddings {
            self.embed.clone()
        } else {
            get("lm_head.weight")?
        };
        self.norm = get("model.norm.weight")?;
        self.layers = layers;
        Ok(())
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

    /// Full-sequence forward without cache: logits `[T, vocab]` (f32).
    pub fn logits(&self, tokens: &[u32]) -> anyhow::Result<Tensor> {
        anyhow::ensure!(!tokens.is_empty(), "logits: empty token sequence");
        anyhow::ensure!(self.has_weights(), "{NO_WEIGHTS}");
        let t = tokens.len();
        if let Some(e) = &self.engine {
            let v = e.logits(tokens)?;
            return Ok(Tensor::from_vec(
                v,
                (t, self.config.vocab_size),
                &self.device,
            )?);
        }
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

    /// Generates continuations for prompts (token ids, any lengths >= 1), at most
    /// [`Sampler::max_batch`] in flight. Each sequence draws from its own ChaCha8 stream
    /// (seed, stream = index in `prompts`), so results are seed-deterministic; on CPU they
    /// also do not depend on the batch size.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
    ) -> anyhow::Result<Vec<Generation>> {
        let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
        let mut it = prompts.iter().cloned().enumerate();
        self.generate_stream(params, &mut || it.next(), &mut |i, g| {
            out[i] = Some(g);
            Ok(())
        })?;
        Ok(out
            .into_iter()
            .map(|g| g.expect("every prompt generated"))
            .collect())
    }

    /// Continuous batching: pulls `(key, prompt)` pairs from `next` whenever a slot is free
    /// (at most [`Sampler::max_batch`] sequences in flight) and hands every finished
    /// sequence to `done` as soon as it ends. `key` picks the sequence's random stream
    /// (`seed`, stream = key), so a sequence's tokens do not depend on when it was
    /// admitted. On non-CPU devices, prompts are pulled and run `max_batch` at a time.
    pub fn generate_stream(
        &mut self,
        params: &SamplingParams,
        next: &mut dyn FnMut() -> Option<(usize, Vec<u32>)>,
        done: &mut dyn FnMut(usize, Generation) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(self.has_weights(), "{NO_WEIGHTS}");
        if let Some(e) = &self.engine {
            return e.generate_stream(
                params,
                &self.stops,
                self.max_batch,
                self.max_prefill_tokens,
                next,
                done,
            );
        }
        loop {
            let mut keys = Vec::new();
            let mut prompts = Vec::new();
            while keys.len() < self.max_batch {
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
            let gens = self.generate_padded(&prompts, &keys, params)?;
            for (k, g) in keys.into_iter().zip(gens) {
                done(k, g)?;
            }
        }
    }

    /// The candle path: one left-padded batch; finished sequences are dropped from the
    /// batch (KV cache compacted); row `i` draws from stream `keys[i]`.
    fn generate_padded(
        &mut self,
        prompts: &[Vec<u32>],
        keys: &[usize],
        params: &SamplingParams,
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
        let mut logits = linear(&h.narrow(1, lmax - 1, 1)?.squeeze(1)?, &self.lm_head)?;

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
                if self.stops.contains(&tok) {
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

/// `x [m, k] @ w [n, k]^T` (the candle path; the CPU engine has its own kernel).
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)
}

/// One pass over `logits * inv_t` shifted by its max: returns `(max, inv_t, ln Σe^z, entropy)`
/// with f64 accumulation and no allocation (`H = lse - Σ p z`).
fn softmax_stats(logits: &[f32], inv_t: f64) -> (f64, f64, f64) {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let (mut s0, mut s1) = (0f64, 0f64);
    for &l in logits {
        let z = (l as f64 - m) * inv_t;
        let e = z.exp();
        s0 += e;
        s1 += e * z;
    }
    let lse = s0.ln();
    (m, lse, (lse - s1 / s0).max(0.0))
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Samples one token: returns (token, log-prob before top-p truncation, entropy).
pub(crate) fn sample_row(
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
) -> (u32, f32, f32) {
    let greedy = params.temperature <= 0.0;
    let inv_t = if greedy {
        1.0
    } else {
        1.0 / params.temperature as f64
    };
    let (m, lse, ent) = softmax_stats(logits, inv_t);
    let logp = |i: usize| (logits[i] as f64 - m) * inv_t - lse;
    let tok = if greedy {
        argmax(logits)
    } else if params.top_p >= 1.0 {
        let u: f64 = rng.random::<f64>();
        let mut acc = 0.0;
        let mut tok = argmax(logits);
        for i in 0..logits.len() {
            acc += logp(i).exp();
            if u < acc {
                tok = i;
                break;
            }
        }
        tok
    } else {
        let u: f64 = rng.random::<f64>();
        // Nucleus: find the smallest top-k (k grown geometrically) whose mass reaches
        // top_p, using selection instead of a full sort.
        let v = logits.len();
        let mut idx: Vec<u32> = (0..v as u32).collect();
        let desc = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut k = 64.min(v);
        let kept = loop {
            if k < v {
                idx.select_nth_unstable_by(k - 1, desc);
            }
            idx[..k].sort_unstable_by(desc);
            let mut mass = 0.0;
            let mut kept = None;
            for (n, &i) in idx[..k].iter().enumerate() {
                mass += logp(i as usize).exp();
                if mass >= params.top_p as f64 {
                    kept = Some((n + 1, mass));
                    break;
                }
            }
            match kept {
                Some(x) => break x,
                None if k == v => break (v, mass),
                None => k = if k < 1024 { 1024.min(v) } else { v },
            }
        };
        let (kept, mass) = kept;
        let target = u * mass;
        let mut acc = 0.0;
        let mut tok = idx[kept - 1] as usize;
        for &i in &idx[..kept] {
            acc += logp(i as usize).exp();
            if target < acc {
                tok = i as usize;
                break;
            }
        }
        tok
    };
    (tok as u32, logp(tok) as f32, ent as f32)
}
