//! The whole model's training pass on the CPU, written by hand: one forward that keeps
//! exactly the activations its backward needs, and one backward that writes every
//! parameter's gradient straight into its own buffer.
//!
//! candle's autograd (which the per-op custom ops this pass replaced went through) adds a
//! zero-filled gradient and an add for every node, a zeroed output for every matmul and a
//! copy for every layout change. Here the row kernels of the parent module and the `gemm`
//! products run on plain buffers instead:
//!
//! - every product is one `gemm` call whose strides absorb the transposes, and the
//!   residual adds and the k/v gradients of a query-head group are the `gemm`'s own
//!   accumulation;
//! - q, k and v are one product with the three weights stacked (and so are their weight
//!   and input gradients), gate and up likewise;
//! - attention is blocked by 64 query rows and only multiplies the causal part of each
//!   score block (about 5/8 of the full products at T = 256), one (sequence, head) per
//!   task; probabilities are recomputed in the backward from one log-sum-exp per row;
//! - the vocabulary projection is computed over vocabulary chunks, only for the scored
//!   rows, with the logits kept for the backward when they are small enough (as
//!   [`super::target_logprobs`]); its weight gradient is written chunk by chunk into the
//!   (tied) embedding gradient;
//! - backward scratch buffers are allocated once and reused by every layer, and each
//!   layer's saved activations are freed as soon as its backward is done.
//!
//! On SmolLM2-135M at 4 x 256 tokens this leaves the step bound by the `gemm` kernel
//! itself (about 87% of the time in its microkernel on a 2-core AVX2 EPYC).
//!
//! Same maths as the op-by-op path (tests compare the two, and both with finite
//! differences). f32 and f64.

use candle_core::{bail, Result, Storage, Var};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{
    attn_ds_rows, causal_probs_rows, causal_softmax_rows, cpu_slice, lp_bwd_rows, lp_fwd_rows,
    rms_bwd_acc, rms_bwd_acc_rows, rms_fwd_rows, rope_bwd_row, rope_fwd_block_ld, rows_per_task,
    swiglu_bwd_chunk, swiglu_fwd_chunk, vdot, vocab_chunk, Real, KEEP_LOGITS_MAX_ELEMS,
};
use hindsight_model::ModelConfig;

/// Query rows per attention block.
const BQ: usize = 64;

/// A raw pointer handed to rayon tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: every use writes regions no other task touches (documented at each use).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// A matrix operand: base pointer, row stride and column stride (in elements).
#[derive(Clone, Copy)]
struct View<T> {
    p: *const T,
    rs: isize,
    cs: isize,
}

/// Row-major matrix at `p` with row stride `ld`.
fn rm<T>(p: *const T, ld: usize) -> View<T> {
    View {
        p,
        rs: ld as isize,
        cs: 1,
    }
}

/// The transpose of the row-major matrix at `p` with row stride `ld`.
fn tr<T>(p: *const T, ld: usize) -> View<T> {
    View {
        p,
        rs: 1,
        cs: ld as isize,
    }
}

fn par() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `c[m, n]` (row stride `ldc`) `= a[m, k] b[k, n]`, or `+=` when `acc`.
///
/// # Safety
/// The views must cover `m x k` and `k x n` readable elements and `c` `m x n` writable
/// ones not aliased by `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<T: Real + 'static>(
    m: usize,
    n: usize,
    k: usize,
    c: *mut T,
    ldc: usize,
    acc: bool,
    a: View<T>,
    b: View<T>,
    par: Parallelism,
) {
    if m == 0 || n == 0 || k == 0 {
        if !acc && k == 0 {
            for i in 0..m {
                for j in 0..n {
                    *c.add(i * ldc + j) = T::ZERO;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        acc,
        a.p,
        a.cs,
        a.rs,
        b.p,
        b.cs,
        b.rs,
        T::ONE,
        T::ONE,
        false,
        false,
        false,
        par,
    );
}

/// `out[n, w.rows]` (`+=` when `acc`) `= x[n, w.cols] w^T` for a row-major weight.
fn linear<T: Real + 'static>(x: &[T], w: &[T], out: &mut [T], n: usize, k: usize, acc: bool) {
    let o = w.len() / k;
    debug_assert!(x.len() >= n * k && out.len() >= n * o);
    // SAFETY: sizes checked above; `out` is a distinct &mut.
    unsafe {
        mm(
            n,
            o,
            k,
            out.as_mut_ptr(),
            o,
            acc,
            rm(x.as_ptr(), k),
            tr(w.as_ptr(), k),
            par(),
        )
    }
}

/// `dx[n, k]` (`+=` when `acc`) `= dy[n, o] w[o, k]`.
fn linear_dx<T: Real + 'static>(dy: &[T], w: &[T], dx: &mut [T], n: usize, k: usize, acc: bool) {
    let o = w.len() / k;
    debug_assert!(dy.len() >= n * o && dx.len() >= n * k);
    // SAFETY: as in `linear`.
    unsafe {
        mm(
            n,
            k,
            o,
            dx.as_mut_ptr(),
            k,
            acc,
            rm(dy.as_ptr(), o),
            rm(w.as_ptr(), k),
            par(),
        )
    }
}

/// `dw[o, k] = dy[n, o]^T x[n, k]`.
/// `dw[o, k] += dy[n, o]^T x[n, k]`, `dy` with row stride `ldy` (so `dy` may be a block of
/// columns of a wider matrix).
#[allow(clippy::too_many_arguments)]
fn linear_dw<T: Real + 'static>(
    dy: &[T],
    ldy: usize,
    x: &[T],
    dw: &mut [T],
    n: usize,
    o: usize,
    k: usize,
) {
    assert!(
        ldy >= o
            && (n == 0 || dy.len() >= (n - 1) * ldy + o)
            && x.len() >= n * k
            && dw.len() >= o * k
    );
    // SAFETY: as in `linear`; the assertion bounds every element read and written.
    unsafe {
        mm(
            o,
            k,
            n,
            dw.as_mut_ptr(),
            k,
            true,
            tr(dy.as_ptr(), ldy),
            rm(x.as_ptr(), k),
            par(),
        )
    }
}

fn rms<T: Real>(x: &[T], w: &[T], eps: f64, out: &mut [T]) {
    let d = w.len();
    let c = rows_per_task(d) * d;
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(o, x)| rms_fwd_rows(x, w, o, eps));
}

/// Indices into the model's parameter list of the tensors one layer uses.
#[derive(Clone, Copy)]
struct LayerIx {
    in_norm: usize,
    q: usize,
    k: usize,
    v: usize,
    bias: Option<[usize; 3]>,
    o: usize,
    post_norm: usize,
    gate: usize,
    up: usize,
    down: usize,
}

/// Where each parameter sits in [`crate::TrainableModel::vars`].
#[derive(Clone)]
pub(crate) struct ParamIx {
    embed: usize,
    lm_head: usize,
    norm: usize,
    layers: Vec<LayerIx>,
    count: usize,
}

impl ParamIx {
    pub(crate) fn new(
        cfg: &ModelConfig,
        idx: &std::collections::HashMap<String, usize>,
        count: usize,
    ) -> anyhow::Result<Self> {
        let get = |n: &str| {
            idx.get(n)
                .copied()
                .ok_or_else(|| anyhow::anyhow!("no parameter {n}"))
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = |n: &str| get(&format!("model.layers.{l}.{n}"));
            layers.push(LayerIx {
                in_norm: p("input_layernorm.weight")?,
                q: p("self_attn.q_proj.weight")?,
                k: p("self_attn.k_proj.weight")?,
                v: p("self_attn.v_proj.weight")?,
                bias: if cfg.qkv_bias {
                    Some([
                        p("self_attn.q_proj.bias")?,
                        p("self_attn.k_proj.bias")?,
                        p("self_attn.v_proj.bias")?,
                    ])
                } else {
                    None
                },
                o: p("self_attn.o_proj.weight")?,
                post_norm: p("post_attention_layernorm.weight")?,
                gate: p("mlp.gate_proj.weight")?,
                up: p("mlp.up_proj.weight")?,
                down: p("mlp.down_proj.weight")?,
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        Ok(Self {
            embed,
            lm_head: if cfg.tie_word_embeddings {
                embed
            } else {
                get("lm_head.weight")?
            },
            norm: get("model.norm.weight")?,
            layers,
            count,
        })
    }
}

/// One layer's saved activations (`N = B*T` token rows).
struct Saved<T> {
    /// Layer input `[N, D]`.
    x: Vec<T>,
    xn1: Vec<T>,
    /// Roped queries `[B, H, T, hd]` and keys `[B, KV, T, hd]`.
    q: Vec<T>,
    k: Vec<T>,
    /// Values `[N, KV*hd]` (token-major, read with strides).
    v: Vec<T>,
    /// Attention output `[N, H*hd]`.
    y: Vec<T>,
    /// Log-sum-exp per score row `[B, H, T]`.
    lse: Vec<T>,
    /// Residual after attention `[N, D]` and its norm.
    x2: Vec<T>,
    xn2: Vec<T>,
    /// Gate and up projections side by side `[N, 2I]` (one product with the stacked
    /// weights), and `silu(g) * u` `[N, I]`.
    gu: Vec<T>,
    a: Vec<T>,
}

/// What the backward needs from one forward.
pub(crate) struct Tape<T> {
    b: usize,
    t: usize,
    ids: Vec<u32>,
    /// Scored token rows (into `N`) and their targets.
    rows: Vec<u32>,
    targets: Vec<u32>,
    inv_t: f64,
    cos: Vec<T>,
    sin: Vec<T>,
    layers: Vec<Saved<T>>,
    /// Input of the final norm `[N, D]`.
    x_last: Vec<T>,
    /// Final-normed scored rows `[n, D]`.
    hs: Vec<T>,
    /// Log-sum-exp of each scored row's (tempered) logits.
    lse: Vec<T>,
    vc: usize,
    /// The logits chunks, when kept.
    logits: Vec<Vec<T>>,
}

/// Read access to the parameters as slices while the guards live.
struct Guards<'a> {
    g: Vec<(candle_core::StorageRef<'a>, &'a candle_core::Layout)>,
}

impl<'a> Guards<'a> {
    fn new(vars: &'a [(String, Var)]) -> Self {
        Self {
            g: vars
                .iter()
                .map(|(_, v)| v.as_tensor().storage_and_layout())
                .collect(),
        }
    }

    fn slices<T: Real>(&self) -> Result<Vec<&[T]>> {
        self.g
            .iter()
            .map(|(s, l)| match &**s {
                Storage::Cpu(s) => cpu_slice::<T>(s, l),
                _ => bail!("whole-model pass: CPU parameters only"),
            })
            .collect()
    }
}

/// Per-(sequence, head) causal attention forward: `q`, `k` `[T, hd]`; `v` rows of stride
/// `ldv`; writes `y` rows of stride `ldy` and one log-sum-exp per query row.
///
/// # Safety
/// `v` must cover `T` rows, `y` `T` rows of `hd` writable elements owned by the caller.
#[allow(clippy::too_many_arguments)]
unsafe fn attn_fwd_head<T: Real + 'static>(
    q: &[T],
    k: &[T],
    v: *const T,
    ldv: usize,
    y: *mut T,
    ldy: usize,
    lse: &mut [T],
    t: usize,
    hd: usize,
    scale: f64,
    s: &mut [T],
) {
    let mut qb = 0;
    while qb < t {
        let rows = BQ.min(t - qb);
        let kl = qb + rows;
        let s = &mut s[..rows * kl];
        mm(
            rows,
            kl,
            hd,
            s.as_mut_ptr(),
            kl,
            false,
            rm(q[qb * hd..].as_ptr(), hd),
            tr(k.as_ptr(), hd),
            Parallelism::None,
        );
        causal_softmax_rows(s, &mut lse[qb..qb + rows], qb, kl, scale);
        mm(
            rows,
            hd,
            kl,
            y.add(qb * ldy),
            ldy,
            false,
            rm(s.as_ptr(), kl),
            rm(v, ldv),
            Parallelism::None,
        );
        qb += rows;
    }
}

/// Dimensions used throughout one pass.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    n: usize,
    d: usize,
    h: usize,
    kv: usize,
    hd: usize,
    inter: usize,
    vocab: usize,
    eps: f64,
    scale: f64,
}

impl Dims {
    fn new(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        let hd = cfg.head_dim();
        Self {
            b,
            t,
            n: b * t,
            d: cfg.hidden_size,
            h: cfg.num_attention_heads,
            kv: cfg.num_key_value_heads,
            hd,
            inter: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            eps: cfg.rms_norm_eps,
            scale: 1.0 / (hd as f64).sqrt(),
        }
    }
}

/// Rope of the `nh` heads at column `off` of `x`'s token rows (stride `ld`) into
/// `[B, nh, T, hd]`.
#[allow(clippy::too_many_arguments)]
fn rope_to_heads<T: Real>(
    x: &[T],
    ld: usize,
    off: usize,
    cos: &[T],
    sin: &[T],
    dm: Dims,
    nh: usize,
) -> Vec<T> {
    let (t, hd) = (dm.t, dm.hd);
    let mut out = vec![T::ZERO; dm.n * nh * hd];
    out.par_chunks_mut(t * hd)
        .enumerate()
        .for_each(|(blk, o)| rope_fwd_block_ld(x, o, cos, sin, blk / nh, blk % nh, t, ld, off, hd));
    out
}

/// `out` = `a`, `b` and `c` stacked row-wise (weights stacked for one product).
fn stack3<T: Real>(out: &mut [T], a: &[T], b: &[T], c: &[T]) {
    let (oa, rest) = out.split_at_mut(a.len());
    let (ob, oc) = rest.split_at_mut(b.len());
    oa.copy_from_slice(a);
    ob.copy_from_slice(b);
    oc.copy_from_slice(c);
}

/// `out` = the rows of `a` then the rows of `b` (two weights stacked for one product).
fn stack<T: Real>(out: &mut [T], a: &[T], b: &[T]) {
    let (oa, ob) = out.split_at_mut(a.len());
    oa.copy_from_slice(a);
    ob.copy_from_slice(b);
}

fn fill_rows<T: Real>(out: &mut [T], row: &[T]) {
    for o in out.chunks_exact_mut(row.len()) {
        o.copy_from_slice(row);
    }
}

/// The training forward: per-row target log-probs (for `rows` of the `[B, T]` input
/// `ids`, under `softmax(logits * inv_t)`) and the tape for [`backward`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Real + 'static>(
    cfg: &ModelConfig,
    vars: &[(String, Var)],
    ix: &ParamIx,
    ids: Vec<u32>,
    b: usize,
    t: usize,
    rows: Vec<u32>,
    targets: Vec<u32>,
    inv_t: f64,
) -> Result<(Vec<T>, Tape<T>)> {
    let dm = Dims::new(cfg, b, t);
    let Dims {
        n,
        d,
        h,
        kv,
        hd,
        inter,
        vocab,
        eps,
        scale,
        ..
    } = dm;
    if ids.len() != n || rows.len() != targets.len() {
        bail!("whole-model pass: {} ids for {b} x {t}", ids.len())
    }
    if let Some(&bad) = ids.iter().chain(&targets).find(|&&i| i as usize >= vocab) {
        bail!("whole-model pass: token {bad} out of vocabulary ({vocab})")
    }
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= n) {
        bail!("whole-model pass: row {bad} out of {n}")
    }
    let guards = Guards::new(vars);
    let w = guards.slices::<T>()?;
    let (cos, sin) = {
        let positions: Vec<usize> = (0..t).collect();
        let (c, s) = hindsight_policy::ops::rope_cos_sin_inv(
            &positions,
            &cfg.rope_inv_freqs(),
            T::DTYPE,
            &candle_core::Device::Cpu,
        )?;
        (
            c.flatten_all()?.to_vec1::<T>()?,
            s.flatten_all()?.to_vec1::<T>()?,
        )
    };
    let emb = w[ix.embed];
    let mut x = vec![T::ZERO; n * d];
    x.par_chunks_mut(d)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| row.copy_from_slice(&emb[id as usize * d..][..d]));
    let (qd, kvd) = (h * hd, kv * hd);
    let mut layers = Vec::with_capacity(ix.layers.len());
    let qkvd = qd + 2 * kvd;
    let mut wgu = vec![T::ZERO; 2 * inter * d];
    let mut wqkv = vec![T::ZERO; qkvd * d];
    for li in &ix.layers {
        let mut xn1 = vec![T::ZERO; n * d];
        rms(&x, w[li.in_norm], eps, &mut xn1);
        // q, k and v in one product: token rows [q | k | v] of width qkvd.
        stack3(&mut wqkv, w[li.q], w[li.k], w[li.v]);
        let mut qkv = vec![T::ZERO; n * qkvd];
        if let Some([bq, bk, bv]) = li.bias {
            let mut bias = vec![T::ZERO; qkvd];
            stack3(&mut bias, w[bq], w[bk], w[bv]);
            fill_rows(&mut qkv, &bias);
        }
        linear(&xn1, &wqkv, &mut qkv, n, d, li.bias.is_some());
        let q = rope_to_heads(&qkv, qkvd, 0, &cos, &sin, dm, h);
        let k = rope_to_heads(&qkv, qkvd, qd, &cos, &sin, dm, kv);
        let mut v = vec![T::ZERO; n * kvd];
        v.par_chunks_mut(kvd)
            .zip(qkv.par_chunks(qkvd))
            .for_each(|(v, r)| v.copy_from_slice(&r[qd + kvd..]));
        drop(qkv);
        let mut y = vec![T::ZERO; n * qd];
        let mut lse = vec![T::ZERO; n * h];
        {
            let (yp, lp) = (SendPtr(y.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
            let (q, k, v) = (&q, &k, &v);
            (0..b * h).into_par_iter().for_each_init(
                || vec![T::ZERO; BQ * t],
                |s, bh| {
                    let (bi, hh) = (bh / h, bh % h);
                    let kh = hh / (h / kv);
                    let qs = &q[bh * t * hd..][..t * hd];
                    let ks = &k[(bi * kv + kh) * t * hd..][..t * hd];
                    // SAFETY: task (bi, hh) alone writes head hh's columns of sequence
                    // bi's rows of y and its own T log-sum-exps.
                    unsafe {
                        let lse = std::slice::from_raw_parts_mut({ lp }.0.add(bh * t), t);
                        attn_fwd_head(
                            qs,
                            ks,
                            v.as_ptr().add(bi * t * kvd + kh * hd),
                            kvd,
                            { yp }.0.add(bi * t * qd + hh * hd),
                            qd,
                            lse,
                            t,
                            hd,
                            scale,
                            s,
                        );
                    }
                },
            );
        }
        let mut x2 = x.clone();
        linear(&y, w[li.o], &mut x2, n, qd, true);
        let mut xn2 = vec![T::ZERO; n * d];
        rms(&x2, w[li.post_norm], eps, &mut xn2);
        stack(&mut wgu, w[li.gate], w[li.up]);
        let mut gu = vec![T::ZERO; n * 2 * inter];
        linear(&xn2, &wgu, &mut gu, n, d, false);
        let mut a = vec![T::ZERO; n * inter];
        let rpt = rows_per_task(2 * inter);
        a.par_chunks_mut(rpt * inter)
            .zip(gu.par_chunks(rpt * 2 * inter))
            .for_each(|(a, gu)| {
                for (a, gu) in a.chunks_exact_mut(inter).zip(gu.chunks_exact(2 * inter)) {
                    let (g, u) = gu.split_at(inter);
                    swiglu_fwd_chunk(g, u, a);
                }
            });
        let mut xo = x2.clone();
        linear(&a, w[li.down], &mut xo, n, inter, true);
        layers.push(Saved {
            x: std::mem::replace(&mut x, xo),
            xn1,
            q,
            k,
            v,
            y,
            lse,
            x2,
            xn2,
            gu,
            a,
        });
    }
    // Final norm of the scored rows only.
    let m = rows.len();
    let wn = w[ix.norm];
    let mut hs = vec![T::ZERO; m * d];
    hs.par_chunks_mut(d)
        .zip(rows.par_iter())
        .for_each(|(o, &r)| {
            rms_fwd_rows(&x[r as usize * d..][..d], wn, o, eps);
        });
    let head = w[ix.lm_head];
    let vc = vocab_chunk(m, vocab);
    let keep = m * vocab <= KEEP_LOGITS_MAX_ELEMS;
    let (mut mx, mut sm, mut tg) = (vec![T::ZERO; m], vec![T::ZERO; m], vec![T::ZERO; m]);
    let mut kept = Vec::new();
    let mut v0 = 0;
    while v0 < vocab && m > 0 {
        let len = vc.min(vocab - v0);
        let mut z = vec![T::ZERO; m * len];
        linear(&hs, &head[v0 * d..(v0 + len) * d], &mut z, m, d, false);
        let rpt = rows_per_task(len);
        z.par_chunks(rpt * len)
            .zip(mx.par_chunks_mut(rpt))
            .zip(sm.par_chunks_mut(rpt))
            .zip(tg.par_chunks_mut(rpt).zip(targets.par_chunks(rpt)))
            .for_each(|(((z, m), s), (tgt, tt))| lp_fwd_rows(z, m, s, tgt, tt, v0, len, inv_t));
        if keep {
            kept.push(z);
        }
        v0 += len;
    }
    let lse: Vec<T> = mx.iter().zip(&sm).map(|(&m, &s)| m + s.ln_()).collect();
    let lp: Vec<T> = tg.iter().zip(&lse).map(|(&t, &l)| t - l).collect();
    drop(w);
    drop(guards);
    Ok((
        lp,
        Tape {
            b,
            t,
            ids,
            rows,
            targets,
            inv_t,
            cos,
            sin,
            layers,
            x_last: x,
            hs,
            lse,
            vc,
            logits: kept,
        },
    ))
}

/// The gradient buffers of one backward: allocated on first use.
struct GradBufs<'a, T> {
    bufs: &'a mut [Vec<T>],
    sizes: Vec<usize>,
}

impl<T: Real> GradBufs<'_, T> {
    fn get(&mut self, i: usize) -> &mut [T] {
        let g = &mut self.bufs[i];
        if g.is_empty() {
            *g = vec![T::ZERO; self.sizes[i]];
        }
        g
    }
}

/// The backward of [`forward`] for `dlp` (the loss gradient of each scored row's
/// log-prob): adds every parameter's gradient into `grads` (in `vars` order; an empty
/// buffer counts as zeros), so micro-batches accumulate without a second set of gradients.
pub(crate) fn backward<T: Real + 'static>(
    cfg: &ModelConfig,
    vars: &[(String, Var)],
    ix: &ParamIx,
    mut tape: Tape<T>,
    dlp: &[T],
    grads: &mut [Vec<T>],
) -> Result<()> {
    let dm = Dims::new(cfg, tape.b, tape.t);
    let Dims {
        b,
        t,
        n,
        d,
        h,
        kv,
        hd,
        inter,
        vocab,
        eps,
        scale,
    } = dm;
    let m = tape.rows.len();
    if dlp.len() != m {
        bail!("whole-model backward: {} gradients for {m} rows", dlp.len())
    }
    let guards = Guards::new(vars);
    let w = guards.slices::<T>()?;
    if grads.len() != ix.count {
        bail!(
            "whole-model backward: {} gradient buffers for {} parameters",
            grads.len(),
            ix.count
        )
    }
    // Every parameter's gradient buffer, summed into; an empty one is allocated (zeros) when
    // the backward reaches its parameter, as the activations before it are being freed.
    let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
    for ((g, &len), (name, _)) in grads.iter().zip(&sizes).zip(vars) {
        if !g.is_empty() && g.len() != len {
            bail!(
                "whole-model backward: gradient buffer of {} for {name} ({len} values)",
                g.len()
            )
        }
    }
    let mut grads = GradBufs { bufs: grads, sizes };
    let (qd, kvd) = (h * hd, kv * hd);

    // Vocabulary projection: dh [m, D], and the head's gradient chunk by chunk.
    let head = w[ix.lm_head];
    let mut dh = vec![T::ZERO; m * d];
    let inv_t = tape.inv_t;
    let coef: Vec<T> = dlp.iter().map(|&g| g * T::from_f64(inv_t)).collect();
    let mut kept = std::mem::take(&mut tape.logits).into_iter();
    let mut v0 = 0;
    while v0 < vocab && m > 0 {
        let len = tape.vc.min(vocab - v0);
        let hw = &head[v0 * d..(v0 + len) * d];
        let mut z = match kept.next() {
            Some(z) => z,
            None => {
                let mut z = vec![T::ZERO; m * len];
                linear(&tape.hs, hw, &mut z, m, d, false);
                z
            }
        };
        let rpt = rows_per_task(len);
        z.par_chunks_mut(rpt * len)
            .zip(tape.lse.par_chunks(rpt))
            .zip(coef.par_chunks(rpt).zip(tape.targets.par_chunks(rpt)))
            .for_each(|((z, lse), (c, tt))| lp_bwd_rows(z, lse, c, tt, v0, len, inv_t));
        linear_dx(&z, hw, &mut dh, m, d, v0 > 0);
        let dhead = &mut grads.get(ix.lm_head)[v0 * d..(v0 + len) * d];
        linear_dw(&z, len, &tape.hs, dhead, m, len, d);
        v0 += len;
    }
    drop(kept);
    // Final norm (scored rows only; the others get no gradient).
    let mut dx = vec![T::ZERO; n * d];
    {
        let dnorm = grads.get(ix.norm);
        let wn = w[ix.norm];
        let xl = &tape.x_last;
        for (k, &r) in tape.rows.iter().enumerate() {
            let r = r as usize;
            rms_bwd_acc_rows(
                &xl[r * d..][..d],
                wn,
                &dh[k * d..][..d],
                &mut dx[r * d..][..d],
                dnorm,
                eps,
            );
        }
    }
    drop(dh);
    // Scratch reused by every layer.
    let mut da = vec![T::ZERO; n * inter];
    let mut dgu = vec![T::ZERO; n * 2 * inter];
    let mut wgu = vec![T::ZERO; 2 * inter * d];
    let mut dxn = vec![T::ZERO; n * d];
    let mut dy = vec![T::ZERO; n * qd];
    let mut dq = vec![T::ZERO; n * qd];
    let mut dk = vec![T::ZERO; n * kvd];
    let qkvd = qd + 2 * kvd;
    // Token rows [dq | dk | dv] (pre-rope for q and k), for one product with the stacked
    // q/k/v weights.
    let mut dqkv = vec![T::ZERO; n * qkvd];
    let mut wqkv = vec![T::ZERO; qkvd * d];
    for (li, s) in ix.layers.iter().zip(std::mem::take(&mut tape.layers)).rev() {
        // MLP: x_out = x2 + down(silu(g) * u).
        linear_dw(&dx, d, &s.a, grads.get(li.down), n, d, inter);
        linear_dx(&dx, w[li.down], &mut da, n, inter, false);
        let rpt = rows_per_task(2 * inter);
        dgu.par_chunks_mut(rpt * 2 * inter)
            .zip(s.gu.par_chunks(rpt * 2 * inter))
            .zip(da.par_chunks(rpt * inter))
            .for_each(|((dgu, gu), da)| {
                for ((dgu, gu), da) in dgu
                    .chunks_exact_mut(2 * inter)
                    .zip(gu.chunks_exact(2 * inter))
                    .zip(da.chunks_exact(inter))
                {
                    let (g, u) = gu.split_at(inter);
                    let (dg, du) = dgu.split_at_mut(inter);
                    swiglu_bwd_chunk(g, u, da, dg, du);
                }
            });
        let gi = 2 * inter;
        linear_dw(&dgu, gi, &s.xn2, grads.get(li.gate), n, inter, d);
        linear_dw(&dgu[inter..], gi, &s.xn2, grads.get(li.up), n, inter, d);
        stack(&mut wgu, w[li.gate], w[li.up]);
        linear_dx(&dgu, &wgu, &mut dxn, n, d, false);
        let gpost = grads.get(li.post_norm);
        rms_bwd_acc(&s.x2, w[li.post_norm], &dxn, &mut dx, gpost, eps);
        drop((s.a, s.gu, s.xn2, s.x2));
        // Attention: x2 = x + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))).
        linear_dw(&dx, d, &s.y, grads.get(li.o), n, d, qd);
        linear_dx(&dx, w[li.o], &mut dy, n, qd, false);
        dqkv.par_chunks_mut(qkvd).for_each(|r| {
            for x in r[qd + kvd..].iter_mut() {
                *x = T::ZERO;
            }
        });
        {
            let (q, k, v, y, lse) = (&s.q, &s.k, &s.v, &s.y, &s.lse);
            let dy = &dy;
            let (dqp, dkp, dvp) = (
                SendPtr(dq.as_mut_ptr()),
                SendPtr(dk.as_mut_ptr()),
                SendPtr(dqkv.as_mut_ptr()),
            );
            let n_rep = h / kv;
            (0..b * kv).into_par_iter().for_each_init(
                || {
                    (
                        vec![T::ZERO; BQ * t],
                        vec![T::ZERO; BQ * t],
                        vec![T::ZERO; t],
                    )
                },
                |(sbuf, dpbuf, dsum), bk| {
                    let (bi, kh) = (bk / kv, bk % kv);
                    let ks = &k[bk * t * hd..][..t * hd];
                    let vp = v[bi * t * kvd + kh * hd..].as_ptr();
                    // SAFETY: task (bi, kh) alone writes kv head kh of sequence bi in dk
                    // and dv, and the query heads of that group in dq.
                    unsafe {
                        let dkh =
                            std::slice::from_raw_parts_mut({ dkp }.0.add(bk * t * hd), t * hd);
                        for x in dkh.iter_mut() {
                            *x = T::ZERO;
                        }
                        let dvh = { dvp }.0.add(bi * t * qkvd + qd + kvd + kh * hd);
                        for hh in kh * n_rep..(kh + 1) * n_rep {
                            let bh = bi * h + hh;
                            let qs = &q[bh * t * hd..][..t * hd];
                            let lse = &lse[bh * t..][..t];
                            let dqh = { dqp }.0.add(bh * t * hd);
                            let row = |i: usize| bi * t * qd + i * qd + hh * hd;
                            for (i, ds) in dsum.iter_mut().enumerate() {
                                *ds = vdot(&dy[row(i)..][..hd], &y[row(i)..][..hd]);
                            }
                            let mut qb = 0;
                            while qb < t {
                                let rows = BQ.min(t - qb);
                                let kl = qb + rows;
                                let p = &mut sbuf[..rows * kl];
                                let dp = &mut dpbuf[..rows * kl];
                                let qv = rm(qs[qb * hd..].as_ptr(), hd);
                                let dyv = rm(dy[row(qb)..].as_ptr(), qd);
                                mm(
                                    rows,
                                    kl,
                                    hd,
                                    p.as_mut_ptr(),
                                    kl,
                                    false,
                                    qv,
                                    tr(ks.as_ptr(), hd),
                                    Parallelism::None,
                                );
                                causal_probs_rows(p, &lse[qb..kl], qb, kl, scale);
                                // dV[0..kl] += P^T dY
                                mm(
                                    kl,
                                    hd,
                                    rows,
                                    dvh,
                                    qkvd,
                                    true,
                                    tr(p.as_ptr(), kl),
                                    dyv,
                                    Parallelism::None,
                                );
                                // dP = dY V^T
                                mm(
                                    rows,
                                    kl,
                                    hd,
                                    dp.as_mut_ptr(),
                                    kl,
                                    false,
                                    dyv,
                                    tr(vp, kvd),
                                    Parallelism::None,
                                );
                                attn_ds_rows(dp, p, &dsum[qb..kl], qb, kl, scale);
                                // dQ = dS K ; dK += dS^T Q
                                mm(
                                    rows,
                                    hd,
                                    kl,
                                    dqh.add(qb * hd),
                                    hd,
                                    false,
                                    rm(dp.as_ptr(), kl),
                                    rm(ks.as_ptr(), hd),
                                    Parallelism::None,
                                );
                                mm(
                                    kl,
                                    hd,
                                    rows,
                                    dkh.as_mut_ptr(),
                                    hd,
                                    true,
                                    tr(dp.as_ptr(), kl),
                                    qv,
                                    Parallelism::None,
                                );
                                qb += rows;
                            }
                        }
                    }
                },
            );
        }
        drop((s.q, s.k, s.lse, s.y));
        // Rope backward of dq and dk into their columns of dqkv (dv is already there).
        {
            let (dq, dk, cos, sin) = (&dq, &dk, &tape.cos, &tape.sin);
            dqkv.par_chunks_mut(qkvd).enumerate().for_each(|(row, r)| {
                let (rq, rest) = r.split_at_mut(qd);
                rope_bwd_row(dq, rq, cos, sin, row / t, row % t, t, h, hd);
                rope_bwd_row(dk, &mut rest[..kvd], cos, sin, row / t, row % t, t, kv, hd);
            });
        }
        // q, k and v: column blocks [0, qd), [qd, qd + kvd), [qd + kvd, qkvd) of dqkv.
        let blocks = [(li.q, 0, qd), (li.k, qd, kvd), (li.v, qd + kvd, kvd)];
        if let Some(bias) = li.bias {
            for ((_, c0, len), bi) in blocks.iter().zip(bias) {
                let gb = grads.get(bi);
                for r in dqkv.chunks_exact(qkvd) {
                    for (a, b) in gb.iter_mut().zip(&r[*c0..c0 + len]) {
                        *a += *b;
                    }
                }
            }
        }
        for (i, c0, len) in blocks {
            linear_dw(&dqkv[c0..], qkvd, &s.xn1, grads.get(i), n, len, d);
        }
        stack3(&mut wqkv, w[li.q], w[li.k], w[li.v]);
        linear_dx(&dqkv, &wqkv, &mut dxn, n, d, false);
        let gin = grads.get(li.in_norm);
        rms_bwd_acc(&s.x, w[li.in_norm], &dxn, &mut dx, gin, eps);
    }
    // Embedding rows (tied: on top of the head's gradient).
    let demb = grads.get(ix.embed);
    for (r, &id) in tape.ids.iter().enumerate() {
        let dst = &mut demb[id as usize * d..][..d];
        for (a, b) in dst.iter_mut().zip(&dx[r * d..][..d]) {
            *a += *b;
        }
    }
    drop(w);
    drop(guards);
    Ok(())
}
