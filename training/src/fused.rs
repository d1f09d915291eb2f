//! The CPU row kernels the whole-model training pass (`whole.rs`) is made of, each with its
//! backward: RMSNorm, half-rotation rope (which also moves `[B, T, H*hd]` projections to
//! the `[B, H, T, hd]` attention layout), causal GQA attention (flash-style: only q, k, v
//! and one log-sum-exp per query row are kept; probabilities are recomputed in the
//! backward), SwiGLU and the target-token log-prob of a vocabulary projection
//! (log-softmax + gather computed over vocabulary chunks, so `[rows, vocab]` logits or
//! probabilities are kept only up to a bound).
//!
//! candle's own fused kernels (`rope`, `softmax_last_dim`, `rms_norm`, `sdpa`) have no
//! backward; these do. They run on the CPU in f32 and f64 only ([`supported`]); on other
//! devices the trainable model uses the differentiable primitives of [`crate::primitives`].
//! (They used to be candle custom ops too, one per op; the whole-model pass replaced that
//! path and it was deleted.)
//!
//! Every kernel works on raw slices, parallel over rows with rayon and written to
//! auto-vectorise (multi-lane accumulators, a polynomial `exp` for f32), compiled for
//! AVX-512 and AVX2+FMA with run-time dispatch on x86_64 and a portable fallback elsewhere.

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, WithDType};
use rayon::prelude::*;

/// Whether the fused ops run on `device` with `dtype` (CPU, f32 or f64).
pub fn supported(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

// ---------------------------------------------------------------------------------------
// Element type and vector helpers.
// ---------------------------------------------------------------------------------------

/// f32 / f64 with the few functions the kernels need.
pub(crate) trait Real: WithDType + std::ops::Neg<Output = Self> {
    const ZERO: Self;
    const ONE: Self;
    fn exp_(self) -> Self;
    fn ln_(self) -> Self;
    fn sqrt_(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp_(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln_(self) -> Self {
        self.ln()
    }
    #[inline(always)]
    fn sqrt_(self) -> Self {
        self.sqrt()
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn ln_(self) -> Self {
        self.ln()
    }
    #[inline(always)]
    fn sqrt_(self) -> Self {
        self.sqrt()
    }
}

/// Branch-free `exp` for f32 (Cephes `expf`: range reduction by ln 2 and a degree-6
/// polynomial; relative error ~2 ulp) that the compiler vectorises. Inputs are clamped
/// to [-87, 88], so it never returns 0 or infinity; callers handle masked entries.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round x / ln 2 to the nearest integer with the 1.5 * 2^23 trick; the low mantissa
    // bits of `t` then hold that integer.
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let ni = t.to_bits().wrapping_sub(0x4B40_0000) as i32;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let r2 = r * r;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * r2
        + r
        + 1.0;
    p * f32::from_bits((ni.wrapping_add(127) << 23) as u32)
}

const LANES: usize = 16;

#[inline(always)]
fn lanes_sum<T: Real>(acc: [T; LANES]) -> T {
    let mut s = T::ZERO;
    for a in acc {
        s += a;
    }
    s
}

/// `sum_i a_i * b_i` with 16 independent accumulators (vectorises).
#[inline(always)]
fn vdot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = lanes_sum(acc);
    for (x, y) in ar.iter().zip(br) {
        s += *x * *y;
    }
    s
}

#[inline(always)]
fn vsum<T: Real>(a: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let c = a.chunks_exact(LANES);
    let r = c.remainder();
    for x in c {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    let mut s = lanes_sum(acc);
    for x in r {
        s += *x;
    }
    s
}

#[inline(always)]
fn vmax<T: Real>(a: &[T]) -> T {
    let first = a[0];
    let mut acc = [first; LANES];
    let c = a.chunks_exact(LANES);
    let r = c.remainder();
    for x in c {
        for l in 0..LANES {
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    let mut m = first;
    for v in acc.iter().chain(r) {
        if *v > m {
            m = *v;
        }
    }
    m
}

#[cfg(target_arch = "x86_64")]
fn cpu_tier() -> u8 {
    use std::sync::OnceLock;
    static TIER: OnceLock<u8> = OnceLock::new();
    *TIER.get_or_init(|| {
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
        {
            2
        } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            1
        } else {
            0
        }
    })
}

/// Defines a generic kernel compiled three times (AVX-512, AVX2+FMA, baseline) with the
/// best one chosen at run time. The body must only call `#[inline(always)]` helpers so
/// that everything is compiled with the caller's target features.
macro_rules! kernel {
    ($(#[$m:meta])* fn $name:ident<T>($($a:ident : $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name<T: Real>($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp<T: Real>($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4<T: Real>($($a: $t),*) {
                    imp::<T>($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3<T: Real>($($a: $t),*) {
                    imp::<T>($($a),*)
                }
                match cpu_tier() {
                    // SAFETY: the features were detected at run time.
                    2 => return unsafe { v4::<T>($($a),*) },
                    1 => return unsafe { v3::<T>($($a),*) },
                    _ => {}
                }
            }
            imp::<T>($($a),*)
        }
    };
}

/// Rows handed to one rayon task for rows of `row_len` elements (~16K elements a task).
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

fn cpu_slice<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("fused op: non-contiguous input"),
    }
}

// ---------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------

kernel! {
    fn rms_fwd_rows<T>(x: &[T], w: &[T], out: &mut [T], eps: f64) {
        let d = w.len();
        let inv_d = T::from_f64(1.0 / d as f64);
        let eps = T::from_f64(eps);
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let denom = (vdot(xr, xr) * inv_d + eps).sqrt_();
            for i in 0..d {
                or[i] = xr[i] / denom * w[i];
            }
        }
    }
}

kernel! {
    /// RMSNorm backward over rows, accumulating into `dx` (`dx += d rms(x) / dx . g`) and
    /// `dw` (a zeroed `dx` gets the plain gradient).
    fn rms_bwd_acc_rows<T>(x: &[T], w: &[T], g: &[T], dx: &mut [T], dw: &mut [T], eps: f64) {
        let d = w.len();
        let inv_d = T::from_f64(1.0 / d as f64);
        let eps = T::from_f64(eps);
        let mut gw = vec![T::ZERO; d];
        for ((xr, gr), dxr) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let r = T::ONE / (vdot(xr, xr) * inv_d + eps).sqrt_();
            for i in 0..d {
                gw[i] = gr[i] * w[i];
            }
            let c = vdot(&gw, xr) * r * r * r * inv_d;
            for i in 0..d {
                dxr[i] += gw[i] * r - xr[i] * c;
                dw[i] += gr[i] * xr[i] * r;
            }
        }
    }
}

/// `dx += rms'(x)^T g`, `dw += ...` (row-parallel, per-task partial `dw` summed).
fn rms_bwd_acc<T: Real>(x: &[T], w: &[T], g: &[T], dx: &mut [T], dw: &mut [T], eps: f64) {
    let d = w.len();
    let c = rows_per_task(d) * d;
    let part = dx
        .par_chunks_mut(c)
        .zip(x.par_chunks(c).zip(g.par_chunks(c)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![T::ZERO; d];
            rms_bwd_acc_rows(x, w, g, dx, &mut dw, eps);
            dw
        })
        .reduce(
            || vec![T::ZERO; d],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(&b) {
                    *a += *b;
                }
                a
            },
        );
    for (a, b) in dw.iter_mut().zip(&part) {
        *a += *b;
    }
}

// ---------------------------------------------------------------------------------------
// Rope (half rotation, Hugging Face layout) + [B, T, H*hd] -> [B, H, T, hd]
// ---------------------------------------------------------------------------------------

kernel! {
    /// One (sequence, head) block `[T, hd]` of the roped heads, read from token rows of
    /// stride `ld` whose heads start at column `off`.
    fn rope_fwd_block_ld<T>(x: &[T], out: &mut [T], cos: &[T], sin: &[T], bi: usize, hh: usize, t: usize, ld: usize, off: usize, hd: usize) {
        let half = hd / 2;
        for i in 0..t {
            let src = &x[(bi * t + i) * ld + off + hh * hd..][..hd];
            let dst = &mut out[i * hd..(i + 1) * hd];
            let (c, s) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
            let (x1, x2) = src.split_at(half);
            let (d1, d2) = dst.split_at_mut(half);
            for j in 0..half {
                d1[j] = x1[j] * c[j] - x2[j] * s[j];
                d2[j] = x2[j] * c[j] + x1[j] * s[j];
            }
        }
    }
}

kernel! {
    /// One token row `(bi, i)` of the input gradient `[H*hd]` from `g` `[B, H, T, hd]`.
    fn rope_bwd_row<T>(g: &[T], dx: &mut [T], cos: &[T], sin: &[T], bi: usize, i: usize, t: usize, h: usize, hd: usize) {
        let half = hd / 2;
        let (c, s) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
        for hh in 0..h {
            let src = &g[((bi * h + hh) * t + i) * hd..][..hd];
            let dst = &mut dx[hh * hd..(hh + 1) * hd];
            let (g1, g2) = src.split_at(half);
            let (d1, d2) = dst.split_at_mut(half);
            for j in 0..half {
                d1[j] = g1[j] * c[j] + g2[j] * s[j];
                d2[j] = g2[j] * c[j] - g1[j] * s[j];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Causal attention (GQA)
// ---------------------------------------------------------------------------------------

kernel! {
    /// Score rows `[.., t]` of `[B, KV, n_rep*T, T]`: row `r` is query position `r % t`.
    fn causal_softmax_rows<T>(s: &mut [T], lse: &mut [T], row0: usize, t: usize, scale: f64) {
        let scale = T::from_f64(scale);
        for (k, (row, l)) in s.chunks_exact_mut(t).zip(lse.iter_mut()).enumerate() {
            let n = (row0 + k) % t + 1;
            let (live, dead) = row.split_at_mut(n);
            for v in live.iter_mut() {
                *v *= scale;
            }
            let m = vmax(live);
            for v in live.iter_mut() {
                *v = (*v - m).exp_();
            }
            let sum = vsum(live);
            let inv = T::ONE / sum;
            for v in live.iter_mut() {
                *v *= inv;
            }
            for v in dead.iter_mut() {
                *v = T::ZERO;
            }
            *l = m + sum.ln_();
        }
    }
}

kernel! {
    fn causal_probs_rows<T>(s: &mut [T], lse: &[T], row0: usize, t: usize, scale: f64) {
        let scale = T::from_f64(scale);
        for (k, (row, &l)) in s.chunks_exact_mut(t).zip(lse.iter()).enumerate() {
            let n = (row0 + k) % t + 1;
            let (live, dead) = row.split_at_mut(n);
            for v in live.iter_mut() {
                *v = (*v * scale - l).exp_();
            }
            for v in dead.iter_mut() {
                *v = T::ZERO;
            }
        }
    }
}

kernel! {
    /// `dp <- p * (dp - D_row) * scale` (the softmax backward), causal rows.
    fn attn_ds_rows<T>(dp: &mut [T], p: &[T], dsum: &[T], row0: usize, t: usize, scale: f64) {
        let scale = T::from_f64(scale);
        for (k, ((row, pr), &d)) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)).zip(dsum.iter()).enumerate() {
            let n = (row0 + k) % t + 1;
            let (live, dead) = row.split_at_mut(n);
            for (v, &pv) in live.iter_mut().zip(&pr[..n]) {
                *v = pv * (*v - d) * scale;
            }
            for v in dead.iter_mut() {
                *v = T::ZERO;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------

kernel! {
    fn swiglu_fwd_chunk<T>(g: &[T], u: &[T], out: &mut [T]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            let sig = T::ONE / (T::ONE + (-g).exp_());
            *o = g * sig * u;
        }
    }
}

kernel! {
    fn swiglu_bwd_chunk<T>(g: &[T], u: &[T], dy: &[T], dg: &mut [T], du: &mut [T]) {
        for i in 0..dg.len() {
            let (gv, uv, d) = (g[i], u[i], dy[i]);
            let sig = T::ONE / (T::ONE + (-gv).exp_());
            let silu = gv * sig;
            du[i] = d * silu;
            dg[i] = d * uv * sig * (T::ONE + gv * (T::ONE - sig));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Target-token log-probs of a vocabulary projection
// ---------------------------------------------------------------------------------------

/// Elements of one `[rows, vocab chunk]` logits block (32 MB in f32).
const LOGIT_CHUNK_ELEMS: usize = 8 << 20;

/// Up to this many `[rows, vocab]` logits (256 MB in f32) the forward keeps its logits
/// chunks for the backward instead of recomputing them (one vocabulary projection less).
const KEEP_LOGITS_MAX_ELEMS: usize = 64 << 20;

fn vocab_chunk(rows: usize, vocab: usize) -> usize {
    (LOGIT_CHUNK_ELEMS / rows.max(1)).clamp(256, vocab.max(1))
}

kernel! {
    /// Online log-sum-exp over one vocabulary chunk `[v0, v0 + vc)` of each row.
    fn lp_fwd_rows<T>(z: &[T], m: &mut [T], s: &mut [T], tgt: &mut [T], targets: &[u32], v0: usize, vc: usize, inv_t: f64) {
        let inv_t = T::from_f64(inv_t);
        let mut buf = vec![T::ZERO; vc];
        for (r, row) in z.chunks_exact(vc).enumerate() {
            for (b, &x) in buf.iter_mut().zip(row) {
                *b = x * inv_t;
            }
            let mc = vmax(&buf);
            for b in buf.iter_mut() {
                *b = (*b - mc).exp_();
            }
            let sc = vsum(&buf);
            if s[r] == T::ZERO {
                m[r] = mc;
                s[r] = sc;
            } else if mc > m[r] {
                s[r] = s[r] * (m[r] - mc).exp_() + sc;
                m[r] = mc;
            } else {
                s[r] += sc * (mc - m[r]).exp_();
            }
            let tg = targets[r] as usize;
            if tg >= v0 && tg < v0 + vc {
                tgt[r] = row[tg - v0] * inv_t;
            }
        }
    }
}

kernel! {
    /// `z <- coef * (onehot(target) - exp(z * inv_t - lse))` on one vocabulary chunk.
    fn lp_bwd_rows<T>(z: &mut [T], lse: &[T], coef: &[T], targets: &[u32], v0: usize, vc: usize, inv_t: f64) {
        let inv_t = T::from_f64(inv_t);
        for (r, row) in z.chunks_exact_mut(vc).enumerate() {
            let (l, c) = (lse[r], coef[r]);
            let nc = -c;
            for v in row.iter_mut() {
                *v = nc * (*v * inv_t - l).exp_();
            }
            let tg = targets[r] as usize;
            if tg >= v0 && tg < v0 + vc {
                row[tg - v0] += c;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The whole model's pass by hand (same kernels, no autograd)
// ---------------------------------------------------------------------------------------

pub(crate) mod whole;
