//! The CPU inference engine behind [`crate::Sampler`] on CPU devices: a Llama/Qwen2
//! forward over *rows* (one token of one sequence each) written against plain slices,
//! with a KV cache per sequence, so prefill and decode rows of any sequences at any
//! positions share one forward pass. That is what continuous batching needs: a finished
//! sequence frees its slot and the next prompt is prefilled in the same step in which
//! the others decode.
//!
//! Projections go through [`crate::kernels::matmul_t`] with weights kept in f32 or bf16
//! ([`Precision`]); with bf16 the KV cache is bf16 too. Activations, norms, rope,
//! attention arithmetic and the logits are f32 always. Every output element is computed the same way whichever rows share the
//! pass, so a sequence's tokens do not depend on what else is in the batch.

use std::collections::VecDeque;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::generator::Generator;
use crate::kernels::{matmul_t, Mat};
use crate::sampling::{sample_row, Generation, SamplingParams};
use crate::storage::F32Buf;
use crate::weights::Weights;
use anyhow::Context as _;
use hindsight_model::ModelConfig;

/// Storage precision of the projection weights used for generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 weights: log-probs agree with the learner's f32 forward to ~1e-5.
    #[default]
    F32,
    /// bf16 weights (f32 activations and accumulation): half the memory traffic.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => anyhow::bail!("unknown precision {other:?} (expected f32 or bf16)"),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

struct Linear {
    w: Mat,
    bias: Option<Vec<f32>>,
}

struct Layer {
    ln1: Vec<f32>,
    /// q, k, v rows concatenated: `[(H + 2 KV) hd, D]`.
    qkv: Linear,
    wo: Linear,
    ln2: Vec<f32>,
    /// gate and up rows concatenated: `[2 I, D]`.
    gu: Linear,
    down: Linear,
}

/// One sequence's KV cache: K transposed, `[layer][kv_head][head_dim][cap]` (so a query's
/// scores over all keys vectorise along the keys), V as `[layer][kv_head][cap][head_dim]`.
pub(crate) struct KvSlot {
    data: KvData,
    cap: usize,
}

/// KV cache storage: f32, or bf16 when the weights are bf16 (half the cache traffic).
enum KvData {
    F32 { k: Vec<f32>, v: Vec<f32> },
    Bf16 { k: Vec<u16>, v: Vec<u16> },
}

/// A KV-cache element type.
trait KvElem: Copy + Send + Sync {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElem for u16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        crate::kernels::f32_to_bf16(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

impl KvSlot {
    fn new(cfg: &ModelConfig, cap: usize, precision: Precision) -> Self {
        let n = cfg.num_hidden_layers * cfg.num_key_value_heads * cap * cfg.head_dim();
        let data = match precision {
            Precision::F32 => KvData::F32 {
                k: vec![0.0; n],
                v: vec![0.0; n],
            },
            Precision::Bf16 => KvData::Bf16 {
                k: vec![0; n],
                v: vec![0; n],
            },
        };
        Self { data, cap }
    }
}

/// Writes one row's K (transposed layout) and V for kv head `g` of layer `li`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn write_kv<T: KvElem>(
    k: &mut [T],
    v: &mut [T],
    cap: usize,
    hd: usize,
    base: usize,
    pos: usize,
    kr: &[f32],
    vr: &[f32],
) {
    for (d, &val) in kr.iter().enumerate() {
        k[base * cap + d * cap + pos] = T::from_f32(val);
    }
    let at = base * cap + pos * hd;
    for (o, &val) in v[at..at + hd].iter_mut().zip(vr) {
        *o = T::from_f32(val);
    }
}

/// One row of a forward pass: `token` of the sequence in `slot`, at `pos`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Row {
    pub slot: usize,
    pub pos: usize,
    pub token: u32,
    pub logits: bool,
}

/// The CPU engine: weights laid out for [`matmul_t`].
pub struct CpuEngine {
    cfg: ModelConfig,
    precision: Precision,
    /// `[vocab, D]` f32, for the embedding lookup (shared with `lm_head` when tied).
    embed: F32Buf,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    inv_freqs: Vec<f32>,
    /// GGUF-permuted q/k: rotate adjacent pairs (`rope_i`) instead of halves.
    interleaved: bool,
}

/// Checks that `have` (name, shape) holds every tensor `cfg` needs with its shape.
fn check_shapes<'a>(
    cfg: &ModelConfig,
    have: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> anyhow::Result<()> {
    let have: std::collections::BTreeMap<&str, &[usize]> = have.into_iter().collect();
    for (name, shape) in cfg.parameter_shapes() {
        let got = have
            .get(name.as_str())
            .with_context(|| format!("missing weight tensor {name}"))?;
        anyhow::ensure!(
            *got == shape.as_slice(),
            "tensor {name}: shape {got:?}, expected {shape:?}"
        );
    }
    Ok(())
}

fn to_vec(weights: &Weights, name: &str) -> anyhow::Result<Vec<f32>> {
    Ok(weights
        .get(name)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// A `[n, k]` matrix of the rows of `parts` in order: in f32 the parts are kept where they
/// are (no copy), in bf16 rounded into one buffer.
fn mat(parts: Vec<F32Buf>, n: usize, k: usize, p: Precision) -> Mat {
    match p {
        Precision::F32 => Mat::f32_parts(parts, n, k),
        Precision::Bf16 => {
            Mat::bf16_from_parts(&parts.iter().map(|b| &b[..]).collect::<Vec<_>>(), n, k)
        }
    }
}

impl CpuEngine {
    pub fn new(cfg: &ModelConfig, weights: &Weights, precision: Precision) -> anyhow::Result<Self> {
        weights.validate(cfg)?;
        Self::from_source(cfg, precision, |name| Ok(to_vec(weights, name)?.into()))
    }

    /// Builds the engine straight from a safetensors buffer (each tensor converted once into
    /// the engine's layout; no intermediate copy of the model). The buffer is validated
    /// first ([`Weights::validate_safetensors`]).
    pub fn from_safetensors(
        cfg: &ModelConfig,
        bytes: &[u8],
        precision: Precision,
    ) -> anyhow::Result<Self> {
        Weights::validate_safetensors(bytes, cfg)?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("safetensors: {e}"))?;
        Self::from_source(cfg, precision, |name| {
            let view = st
                .tensor(name)
                .map_err(|_| anyhow::anyhow!("missing weight tensor {name}"))?;
            Ok(crate::weights::view_to_f32(name, &view)?.into())
        })
    }

    /// Builds the engine from tensors already read as f32 (moved in, not copied, where the
    /// engine keeps a tensor as it is). Every tensor `cfg` needs must be there with its shape.
    pub fn from_f32_tensors(
        cfg: &ModelConfig,
        mut tensors: crate::weights::F32Tensors,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        check_shapes(
            cfg,
            tensors.iter().map(|(n, (s, _))| (n.as_str(), s.as_slice())),
        )?;
        Self::from_source(cfg, precision, |name| {
            tensors
                .remove(name)
                .map(|(_, v)| v.into())
                .with_context(|| format!("missing weight tensor {name}"))
        })
    }

    /// Builds the engine from a mapped safetensors file: in f32 the engine reads its
    /// matrices and the embedding where they lie in the mapping (no copy; the processes
    /// mapping the same file share one copy in the page cache); in bf16 they are rounded
    /// once. Every tensor `cfg` needs must be there with its shape.
    pub fn from_mapped(
        cfg: &ModelConfig,
        file: &crate::storage::MappedSafetensors,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        check_shapes(cfg, file.shapes())?;
        Self::from_source(cfg, precision, |name| file.f32(name))
    }

    /// Bytes of this engine's weight matrices and embedding that lie in a mapped file, and
    /// of all of them (a tied output projection shares the embedding's storage in f32).
    pub fn mapped_bytes(&self) -> (usize, usize) {
        let (mut mapped, mut total) = (0, 0);
        let mut add = |bytes: usize, is_mapped: bool| {
            total += bytes;
            if is_mapped {
                mapped += bytes;
            }
        };
        add(self.lm_head.w.bytes(), self.lm_head.w.is_mapped());
        for l in &self.layers {
            for m in [&l.qkv.w, &l.wo.w, &l.gu.w, &l.down.w] {
                add(m.bytes(), m.is_mapped());
            }
        }
        if !(self.cfg.tie_word_embeddings && self.precision == Precision::F32) {
            add(self.embed.len() * 4, self.embed.is_mapped());
        }
        (mapped, total)
    }

    /// Builds the engine from `get(name)`: every tensor `cfg` needs as flat f32 values.
    fn from_source(
        cfg: &ModelConfig,
        precision: Precision,
        mut get: impl FnMut(&str) -> anyhow::Result<F32Buf>,
    ) -> anyhow::Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (h, kv, i) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut g = |n: &str| get(&format!("{p}.{n}"));
            let qkv = vec![
                g("self_attn.q_proj.weight")?,
                g("self_attn.k_proj.weight")?,
                g("self_attn.v_proj.weight")?,
            ];
            let bias = if cfg.qkv_bias {
                let mut b = g("self_attn.q_proj.bias")?.to_vec();
                b.extend_from_slice(&g("self_attn.k_proj.bias")?);
                b.extend_from_slice(&g("self_attn.v_proj.bias")?);
                Some(b)
            } else {
                None
            };
            let gu = vec![g("mlp.gate_proj.weight")?, g("mlp.up_proj.weight")?];
            layers.push(Layer {
                ln1: g("input_layernorm.weight")?.to_vec(),
                qkv: Linear {
                    w: mat(qkv, (h + 2 * kv) * hd, d, precision),
                    bias,
                },
                wo: Linear {
                    w: mat(vec![g("self_attn.o_proj.weight")?], d, h * hd, precision),
                    bias: None,
                },
                ln2: g("post_attention_layernorm.weight")?.to_vec(),
                gu: Linear {
                    w: mat(gu, 2 * i, d, precision),
                    bias: None,
                },
                down: Linear {
                    w: mat(vec![g("mlp.down_proj.weight")?], d, i, precision),
                    bias: None,
                },
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")?
        };
        Ok(Self {
            cfg: cfg.clone(),
            precision,
            embed,
            layers,
            norm: get("model.norm.weight")?.to_vec(),
            lm_head: Linear {
                w: mat(vec![head], cfg.vocab_size, d, precision),
                bias: None,
            },
            inv_freqs: cfg.rope_inv_freqs(),
            interleaved: false,
        })
    }

    pub(crate) fn new_slot(&self, cap: usize) -> KvSlot {
        KvSlot::new(&self.cfg, cap, self.precision)
    }

    fn linear(&self, x: &[f32], m: usize, l: &Linear) -> Vec<f32> {
        let mut y = vec![0f32; m * l.w.rows()];
        matmul_t(x, m, &l.w, &mut y);
        if let Some(b) = &l.bias {
            for row in y.chunks_mut(b.len()) {
                for (o, bb) in row.iter_mut().zip(b) {
                    *o += bb;
                }
            }
        }
        y
    }

    fn rms_norm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let d = w.len();
        let eps = self.cfg.rms_norm_eps as f32;
        let mut out = vec![0f32; x.len()];
        for (xr, or) in x.chunks(d).zip(out.chunks_mut(d)) {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, v), ww) in or.iter_mut().zip(xr).zip(w) {
                *o = v * r * ww;
            }
        }
        out
    }

    /// Runs `rows` through the model, writing each row's K/V into its slot at its
    /// position (all rows' K/V are written before any attention, so prefill rows of one
    /// sequence attend to each other causally). Returns the logits `[n, vocab]` of the
    /// rows with `logits == true`, in row order.
    pub(crate) fn forward(
        &self,
        rows: &[Row],
        slots: &mut [&mut KvSlot],
    ) -> anyhow::Result<Vec<f32>> {
        let c = &self.cfg;
        let m = rows.len();
        let (d, hd) = (c.hidden_size, c.head_dim());
        let (h, kv, n_rep, inter) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.n_rep(),
            c.intermediate_size,
        );
        let half = hd / 2;
        for r in rows {
            anyhow::ensure!(r.slot < slots.len(), "row slot out of range");
            anyhow::ensure!(
                r.pos < slots[r.slot].cap,
                "position {} beyond the KV cache ({})",
                r.pos,
                slots[r.slot].cap
            );
            anyhow::ensure!(
                (r.token as usize) < c.vocab_size,
                "token id {} out of vocabulary",
                r.token
            );
        }
        // Rope tables per row (angles in f64, like ops::rope_cos_sin_inv).
        let mut cos = vec![0f32; m * half];
        let mut sin = vec![0f32; m * half];
        for (ri, r) in rows.iter().enumerate() {
            for (j, &inv) in self.inv_freqs.iter().enumerate() {
                let a = r.pos as f64 * inv as f64;
                cos[ri * half + j] = a.cos() as f32;
                sin[ri * half + j] = a.sin() as f32;
            }
        }
        let mut x = vec![0f32; m * d];
        for (ri, r) in rows.iter().enumerate() {
            let t = r.token as usize;
            x[ri * d..(ri + 1) * d].copy_from_slice(&self.embed[t * d..(t + 1) * d]);
        }
        let qkv_w = (h + 2 * kv) * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, l) in self.layers.iter().enumerate() {
            let xn = self.rms_norm(&x, &l.ln1);
            let mut qkv = self.linear(&xn, m, &l.qkv);
            // Rope (half rotation) on the q and k heads of every row.
            for (ri, row) in qkv.chunks_mut(qkv_w).enumerate() {
                let (cr, sr) = (
                    &cos[ri * half..(ri + 1) * half],
                    &sin[ri * half..(ri + 1) * half],
                );
                for head in row[..(h + kv) * hd].chunks_mut(hd) {
                    if self.interleaved {
                        for j in 0..half {
                            let (x1, x2) = (head[2 * j], head[2 * j + 1]);
                            head[2 * j] = x1 * cr[j] - x2 * sr[j];
                            head[2 * j + 1] = x1 * sr[j] + x2 * cr[j];
                        }
                        continue;
                    }
                    let (a, b) = head.split_at_mut(half);
                    for j in 0..half {
                        let (x1, x2) = (a[j], b[j]);
                        a[j] = x1 * cr[j] - x2 * sr[j];
                        b[j] = x1 * sr[j] + x2 * cr[j];
                    }
                }
            }
            // K/V into the caches.
            for (ri, r) in rows.iter().enumerate() {
                let s = &mut *slots[r.slot];
                let row = &qkv[ri * qkv_w..(ri + 1) * qkv_w];
                for g in 0..kv {
                    let base = (li * kv + g) * hd;
                    let kr = &row[(h + g) * hd..(h + g + 1) * hd];
                    let vr = &row[(h + kv + g) * hd..(h + kv + g + 1) * hd];
                    let cap = s.cap;
                    match &mut s.data {
                        KvData::F32 { k, v } => write_kv(k, v, cap, hd, base, r.pos, kr, vr),
                        KvData::Bf16 { k, v } => write_kv(k, v, cap, hd, base, r.pos, kr, vr),
                    }
                }
            }
            // Attention: one task per (row, query head).
            let mut att = vec![0f32; m * h * hd];
            let slots_ro: Vec<&KvSlot> = slots.iter().map(|s| &**s).collect();
            att.par_chunks_mut(hd).enumerate().for_each_init(
                Vec::new,
                |scores: &mut Vec<f32>, (idx, out)| {
                    let (ri, qh) = (idx / h, idx % h);
                    let r = &rows[ri];
                    let s = slots_ro[r.slot];
                    let g = qh / n_rep;
                    let q = &qkv[ri * qkv_w + qh * hd..ri * qkv_w + (qh + 1) * hd];
                    let base = (li * kv + g) * s.cap * hd;
                    let n = r.pos + 1;
                    match &s.data {
                        KvData::F32 { k, v } => attend(
                            q,
                            &k[base..base + hd * s.cap],
                            s.cap,
                            &v[base..base + n * hd],
                            scale,
                            scores,
                            out,
                        ),
                        KvData::Bf16 { k, v } => attend(
                            q,
                            &k[base..base + hd * s.cap],
                            s.cap,
                            &v[base..base + n * hd],
                            scale,
                            scores,
                            out,
                        ),
                    }
                },
            );
            let o = self.linear(&att, m, &l.wo);
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
            let xn = self.rms_norm(&x, &l.ln2);
            let gu = self.linear(&xn, m, &l.gu);
            let mut act = vec![0f32; m * inter];
            for (ri, a) in act.chunks_mut(inter).enumerate() {
                let row = &gu[ri * 2 * inter..(ri + 1) * 2 * inter];
                let (g, u) = row.split_at(inter);
                for ((o, gg), uu) in a.iter_mut().zip(g).zip(u) {
                    *o = gg / (1.0 + (-gg).exp()) * uu;
                }
            }
            let dn = self.linear(&act, m, &l.down);
            for (a, b) in x.iter_mut().zip(&dn) {
                *a += b;
            }
        }
        let want: Vec<usize> = (0..m).filter(|&i| rows[i].logits).collect();
        let mut xs = Vec::with_capacity(want.len() * d);
        for &i in &want {
            xs.extend_from_slice(&x[i * d..(i + 1) * d]);
        }
        let xs = self.rms_norm(&xs, &self.norm);
        Ok(self.linear(&xs, want.len(), &self.lm_head))
    }
}

impl Generator for CpuEngine {
    fn set_interleaved_rope(&mut self, interleaved: bool) {
        self.interleaved = interleaved;
    }

    fn logits(&self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        let mut slot = self.new_slot(tokens.len());
        let rows: Vec<Row> = tokens
            .iter()
            .enumerate()
            .map(|(pos, &token)| Row {
                slot: 0,
                pos,
                token,
                logits: true,
            })
            .collect();
        self.forward(&rows, &mut [&mut slot])
    }

    /// Continuous batching: keeps up to `max_batch` sequences in flight, pulling prompts
    /// as slots free up. A step's forward holds the decode rows of the running sequences
    /// and the prompt rows of newly admitted ones (at most `max_prefill_tokens` prompt
    /// tokens per step, at least one prompt).
    fn generate_stream(
        &self,
        params: &SamplingParams,
        stops: &[u32],
        max_batch: usize,
        max_prefill_tokens: usize,
        next: &mut dyn FnMut() -> Option<(usize, Vec<u32>)>,
        done: &mut dyn FnMut(usize, Generation) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        struct Seq {
            key: usize,
            slot: KvSlot,
            len: usize,
            /// Token to feed at position `len` (None while the prompt is pending).
            pending: Option<u32>,
            prompt: Option<Vec<u32>>,
            rng: ChaCha8Rng,
            gen: Generation,
        }
        let max_batch = max_batch.max(1);
        let vocab = self.cfg.vocab_size as u32;
        let mut running: Vec<Seq> = Vec::new();
        let mut queue_done = false;
        let mut waiting: VecDeque<(usize, Vec<u32>)> = VecDeque::new();
        loop {
            // Admit new sequences.
            while running.len() < max_batch {
                if waiting.is_empty() && !queue_done {
                    match next() {
                        Some(p) => waiting.push_back(p),
                        None => queue_done = true,
                    }
                }
                let Some((key, prompt)) = waiting.pop_front() else {
                    break;
                };
                anyhow::ensure!(!prompt.is_empty(), "generate: empty prompt");
                anyhow::ensure!(
                    prompt.iter().all(|&t| t < vocab),
                    "generate: token id out of vocabulary"
                );
                let gen = Generation {
                    token_ids: vec![],
                    logprobs: vec![],
                    entropies: vec![],
                    finished: false,
                };
                if params.max_new_tokens == 0 {
                    done(key, gen)?;
                    continue;
                }
                let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
                rng.set_stream(key as u64);
                running.push(Seq {
                    key,
                    slot: self.new_slot(prompt.len() + params.max_new_tokens),
                    len: 0,
                    pending: None,
                    prompt: Some(prompt),
                    rng,
                    gen,
                });
            }
            if running.is_empty() {
                return Ok(());
            }
            // Build the step's rows: decode rows first, then prompts within the budget.
            let mut rows = Vec::new();
            let mut stepping = Vec::new(); // indices into `running` that get logits
            let mut budget = max_prefill_tokens.max(1);
            let mut prefilled_any = false;
            for (si, s) in running.iter().enumerate() {
                if let Some(t) = s.pending {
                    rows.push(Row {
                        slot: si,
                        pos: s.len,
                        token: t,
                        logits: true,
                    });
                    stepping.push(si);
                }
            }
            for (si, s) in running.iter().enumerate() {
                if let Some(p) = &s.prompt {
                    if prefilled_any && p.len() > budget {
                        continue;
                    }
                    budget = budget.saturating_sub(p.len());
                    prefilled_any = true;
                    let n = p.len();
                    for (pos, &token) in p.iter().enumerate() {
                        rows.push(Row {
                            slot: si,
                            pos,
                            token,
                            logits: pos + 1 == n,
                        });
                    }
                    stepping.push(si);
                }
            }
            let logits = {
                let mut slot_refs: Vec<&mut KvSlot> =
                    running.iter_mut().map(|s| &mut s.slot).collect();
                self.forward(&rows, &mut slot_refs)?
            };
            // `stepping` is in the same order as the logit rows.
            let v = self.cfg.vocab_size;
            let mut rngs: Vec<ChaCha8Rng> = stepping
                .iter()
                .map(|&si| std::mem::replace(&mut running[si].rng, ChaCha8Rng::seed_from_u64(0)))
                .collect();
            let picks: Vec<(u32, f32, f32)> = rngs
                .par_iter_mut()
                .zip(logits.par_chunks(v))
                .map(|(rng, row)| sample_row(row, params, rng))
                .collect();
            let mut finished = Vec::new();
            for ((&si, rng), (tok, lp, ent)) in stepping.iter().zip(rngs).zip(picks) {
                let s = &mut running[si];
                s.rng = rng;
                if let Some(p) = s.prompt.take() {
                    s.len = p.len();
                } else {
                    s.len += 1;
                }
                s.gen.token_ids.push(tok);
                s.gen.logprobs.push(lp);
                s.gen.entropies.push(ent);
                if stops.contains(&tok) {
                    s.gen.finished = true;
                    finished.push(si);
                } else if s.gen.token_ids.len() >= params.max_new_tokens {
                    finished.push(si);
                } else {
                    s.pending = Some(tok);
                }
            }
            finished.sort_unstable();
            for si in finished.into_iter().rev() {
                let s = running.remove(si);
                done(s.key, s.gen)?;
            }
        }
    }
}

/// Softmax attention of one query over the first `n = vals.len() / hd` keys of
/// `keys_t` (`[hd, cap]`, transposed) and `vals` (`[n, hd]`) into `out`.
fn attend<T: KvElem>(
    q: &[f32],
    keys_t: &[T],
    cap: usize,
    vals: &[T],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::has_avx512() {
        // SAFETY: avx512f is present (runtime check).
        unsafe { attend_avx512(q, keys_t, cap, vals, scale, scores, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::has_avx2_fma() {
        // SAFETY: avx2 and fma are present (runtime check).
        unsafe { attend_avx2(q, keys_t, cap, vals, scale, scores, out) };
        return;
    }
    attend_body(q, keys_t, cap, vals, scale, scores, out)
}

/// The same body compiled with AVX2 enabled, so its loops vectorise 8 wide (Rust does
/// not contract `a * b + c` into an FMA, so results match the other builds bit for bit).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2<T: KvElem>(
    q: &[f32],
    keys_t: &[T],
    cap: usize,
    vals: &[T],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_body(q, keys_t, cap, vals, scale, scores, out)
}

/// The same body compiled with AVX-512 enabled, so its loops vectorise 16 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512<T: KvElem>(
    q: &[f32],
    keys_t: &[T],
    cap: usize,
    vals: &[T],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_body(q, keys_t, cap, vals, scale, scores, out)
}

#[inline(always)]
fn attend_body<T: KvElem>(
    q: &[f32],
    keys_t: &[T],
    cap: usize,
    vals: &[T],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    let n = vals.len() / hd;
    scores.clear();
    scores.resize(n, 0.0);
    for (d, &qd) in q.iter().enumerate() {
        let qd = qd * scale;
        for (sc, &k) in scores.iter_mut().zip(&keys_t[d * cap..d * cap + n]) {
            *sc += qd * k.to_f32();
        }
    }
    let mx = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - mx).exp();
        sum += *sc;
    }
    let inv = 1.0 / sum;
    out.fill(0.0);
    for (p, vr) in scores.iter().zip(vals.chunks_exact(hd)) {
        let p = p * inv;
        for (o, &v) in out.iter_mut().zip(vr) {
            *o += p * v.to_f32();
        }
    }
}
