//! Fused CPU training ops with a backward, as candle custom ops: RMSNorm, half-rotation
//! rope (which also moves `[B, T, H*hd]` projections to the `[B, H, T, hd]` attention
//! layout), causal GQA attention (flash-style: only q, k, v and one log-sum-exp per
//! query row are kept; probabilities are recomputed in the backward), SwiGLU and the
//! target-token log-prob of a vocabulary projection (log-softmax + gather computed over
//! vocabulary chunks, so `[rows, vocab]` logits or probabilities are never kept).
//!
//! candle's own fused kernels (`rope`, `softmax_last_dim`, `rms_norm`, `sdpa`) have no
//! backward; these do. They run on the CPU in f32 and f64 only ([`supported`]); on other
//! devices the trainable model uses the differentiable primitives of [`crate::primitives`].
//!
//! Matrix products go through candle's `matmul` (the `gemm` crate) on detached tensors;
//! everything else is a row kernel over raw slices, parallel over rows with rayon and
//! written to auto-vectorise (multi-lane accumulators, a polynomial `exp` for f32),
//! compiled for AVX-512 and AVX2+FMA with run-time dispatch on x86_64 and a portable
//! fallback elsewhere.

use std::sync::Mutex;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, InplaceOp1, InplaceOp2,
    Layout, Result, Shape, Storage, Tensor, WithDType,
};
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
fn exp_f32(x: f32) -> f32 {
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

fn cpu_slice_mut<'a, T: Real>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [T]> {
    let (a, b) = match l.contiguous_offsets() {
        Some(x) => x,
        None => bail!("fused op: non-contiguous input"),
    };
    macro_rules! pick {
        ($($v:ident),*) => {
            match s {
                $(CpuStorage::$v(d) => {
                    let d: &mut dyn std::any::Any = d;
                    match d.downcast_mut::<Vec<T>>() {
                        Some(v) => Ok(&mut v[a..b]),
                        None => bail!("fused op: dtype mismatch"),
                    }
                })*
                _ => bail!("fused op: unsupported dtype"),
            }
        };
    }
    pick!(F32, F64)
}

/// Runs `f` on the contiguous CPU data of `t` (copied to a contiguous tensor first if needed).
fn with_slice<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => Ok(f(cpu_slice::<T>(s, l)?)),
        _ => bail!("fused op: CPU tensors only"),
    }
}

macro_rules! dispatch {
    ($dt:expr, $f:ident($($a:expr),*)) => {
        match $dt {
            DType::F32 => $f::<f32>($($a),*),
            DType::F64 => $f::<f64>($($a),*),
            d => bail!("fused op: unsupported dtype {d:?}"),
        }
    };
}

/// The dtype of a CPU storage (only f32/f64 matter here).
fn st_dtype(s: &CpuStorage) -> DType {
    match s {
        CpuStorage::F32(_) => DType::F32,
        CpuStorage::F64(_) => DType::F64,
        _ => DType::U8,
    }
}

fn tensor_from<T: Real>(v: Vec<T>, shape: impl Into<Shape>, dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(v, shape.into(), dev)
}

// ---------------------------------------------------------------------------------------
// Linear (x @ w^T)
// ---------------------------------------------------------------------------------------

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (&[n, k], &[out, k2]) = (l1.dims(), l2.dims()) else {
            bail!(
                "fused-linear: x {:?} and w {:?} must be 2-D",
                l1.dims(),
                l2.dims()
            )
        };
        if k != k2 {
            bail!("fused-linear: x {:?} vs w {:?}", l1.dims(), l2.dims())
        }
        let st = s1.matmul(s2, (1, n, out, k), l1, &l2.transpose(0, 1)?)?;
        Ok((st, Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.detach(), w.detach(), g.detach());
        // Both gradients come out contiguous in the operands' own layouts ([N, in] and
        // [out, in]), so no transposed copy is accumulated.
        Ok((Some(g.matmul(&w)?), Some(g.t()?.matmul(&x)?)))
    }
}

/// `x @ w^T` for `x` `[N, in]` and `w` `[out, in]` (a Hugging Face linear weight), with a
/// backward for both that produces each gradient directly in its operand's layout
/// (candle's `matmul(w.t())` accumulates the weight gradient twice, once transposed).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2(w, Linear)
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

struct RmsNorm {
    eps: f64,
}

fn rms_fwd<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::ZERO; x.len()];
    let rpt = rows_per_task(d) * d;
    out.par_chunks_mut(rpt)
        .zip(x.par_chunks(rpt))
        .for_each(|(o, x)| rms_fwd_rows(x, w, o, eps));
    out
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

fn rms_bwd<T: Real>(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (dx, dw) = with_slice::<T, _>(x, |xs| {
        with_slice::<T, _>(w, |ws| {
            with_slice::<T, _>(g, |gs| {
                let mut dx = vec![T::ZERO; xs.len()];
                let mut dw = vec![T::ZERO; ws.len()];
                rms_bwd_acc(xs, ws, gs, &mut dx, &mut dw, eps);
                (dx, dw)
            })
        })
    })???;
    Ok((
        tensor_from(dx, x.shape().clone(), x.device())?,
        tensor_from(dw, w.shape().clone(), w.device())?,
    ))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn go<T: Real>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            eps: f64,
        ) -> Result<(CpuStorage, Shape)> {
            let (x, w) = (cpu_slice::<T>(s1, l1)?, cpu_slice::<T>(s2, l2)?);
            if w.is_empty() || x.len() % w.len() != 0 || l1.dims().last() != Some(&w.len()) {
                bail!("fused-rms-norm: last dim of x must equal len(w)")
            }
            Ok((
                T::to_cpu_storage_owned(rms_fwd(x, w, eps)),
                l1.shape().clone(),
            ))
        }
        dispatch!(st_dtype(s1), go(s1, l1, s2, l2, self.eps))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = dispatch!(x.dtype(), rms_bwd(x, w, g, self.eps))?;
        Ok((Some(dx), Some(dw)))
    }
}

/// RMSNorm over the last dim, `x / sqrt(mean(x^2) + eps) * w`, with a backward for `x`
/// and `w`. CPU, f32/f64.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
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

struct Rope {
    b: usize,
    t: usize,
    h: usize,
    hd: usize,
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn fwd<T: Real>(&self, x: &[T]) -> Result<Vec<T>> {
        let (b, t, h, hd) = (self.b, self.t, self.h, self.hd);
        if x.len() != b * t * h * hd {
            bail!(
                "fused-rope: input has {} elements, want {}",
                x.len(),
                b * t * h * hd
            )
        }
        let mut out = vec![T::ZERO; x.len()];
        with_slice::<T, _>(&self.cos, |cos| {
            with_slice::<T, _>(&self.sin, |sin| {
                out.par_chunks_mut(t * hd).enumerate().for_each(|(blk, o)| {
                    rope_fwd_block_ld(x, o, cos, sin, blk / h, blk % h, t, h * hd, 0, hd)
                })
            })
        })??;
        Ok(out)
    }

    fn bwd_t<T: Real>(&self, g: &Tensor) -> Result<Tensor> {
        let (b, t, h, hd) = (self.b, self.t, self.h, self.hd);
        let dx = with_slice::<T, _>(g, |g| {
            with_slice::<T, _>(&self.cos, |cos| {
                with_slice::<T, _>(&self.sin, |sin| {
                    let mut dx = vec![T::ZERO; b * t * h * hd];
                    dx.par_chunks_mut(h * hd).enumerate().for_each(|(row, d)| {
                        rope_bwd_row(g, d, cos, sin, row / t, row % t, t, h, hd)
                    });
                    dx
                })
            })
        })???;
        tensor_from(dx, (b, t, h * hd), g.device())
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn go<T: Real>(op: &Rope, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(op.fwd(cpu_slice::<T>(s, l)?)?))
        }
        let st = dispatch!(st_dtype(s), go(self, s, l))?;
        Ok((st, Shape::from((self.b, self.h, self.t, self.hd))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = dispatch!(g.dtype(), bwd_rope(self, g))?;
        Ok(Some(dx.reshape(x.shape())?))
    }
}

fn bwd_rope<T: Real>(op: &Rope, g: &Tensor) -> Result<Tensor> {
    op.bwd_t::<T>(g)
}

/// Half-rotation rope (Hugging Face layout) of `x` `[B, T, H*hd]` (or `[B*T, H*hd]` with
/// `b` given) for positions `0..T`, returned in the attention layout `[B, H, T, hd]`.
/// `cos`/`sin`: `[T, hd/2]` (see [`hindsight_policy::ops::rope_cos_sin_inv`]). Backward for `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, b: usize, n_heads: usize) -> Result<Tensor> {
    let (t, half) = cos.dims2()?;
    let hd = 2 * half;
    if x.elem_count() != b * t * n_heads * hd {
        bail!(
            "fused rope: x {:?} is not [{b}, {t}, {n_heads} * {hd}]",
            x.dims()
        )
    }
    let op = Rope {
        b,
        t,
        h: n_heads,
        hd,
        cos: cos.to_dtype(x.dtype())?.contiguous()?,
        sin: sin.to_dtype(x.dtype())?.contiguous()?,
    };
    x.contiguous()?.apply_op1(op)
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

kernel! {
    /// Per token row `[H*hd]` of `dy` and `y`: the H per-head dot products.
    fn head_dots_row<T>(dy: &[T], y: &[T], out: &mut [T], hd: usize) {
        for (hh, o) in out.iter_mut().enumerate() {
            *o = vdot(&dy[hh * hd..(hh + 1) * hd], &y[hh * hd..(hh + 1) * hd]);
        }
    }
}

/// In-place causal softmax of scores (scaled), writing each row's log-sum-exp.
struct CausalSoftmax {
    t: usize,
    scale: f64,
    lse: Mutex<Option<Tensor>>,
}

impl InplaceOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        fn go<T: Real>(op: &CausalSoftmax, s: &mut CpuStorage, l: &Layout) -> Result<Tensor> {
            let t = op.t;
            let s = cpu_slice_mut::<T>(s, l)?;
            let rows = s.len() / t;
            let mut lse = vec![T::ZERO; rows];
            let rpt = rows_per_task(t);
            s.par_chunks_mut(rpt * t)
                .zip(lse.par_chunks_mut(rpt))
                .enumerate()
                .for_each(|(c, (s, l))| causal_softmax_rows(s, l, c * rpt, t, op.scale));
            tensor_from(lse, rows, &Device::Cpu)
        }
        let lse = dispatch!(st_dtype(s), go(self, s, l))?;
        *self.lse.lock().unwrap() = Some(lse);
        Ok(())
    }
}

/// In-place `exp(scale * s - lse)` on causal rows (the probabilities, recomputed).
struct CausalProbs<'a> {
    t: usize,
    scale: f64,
    lse: &'a Tensor,
}

impl InplaceOp1 for CausalProbs<'_> {
    fn name(&self) -> &'static str {
        "fused-causal-probs"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        fn go<T: Real>(op: &CausalProbs, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let t = op.t;
            let s = cpu_slice_mut::<T>(s, l)?;
            with_slice::<T, _>(op.lse, |lse| {
                let rpt = rows_per_task(t);
                s.par_chunks_mut(rpt * t)
                    .zip(lse.par_chunks(rpt))
                    .enumerate()
                    .for_each(|(c, (s, l))| causal_probs_rows(s, l, c * rpt, t, op.scale));
            })
        }
        dispatch!(st_dtype(s), go(self, s, l))
    }
}

/// In-place softmax backward on `dp` given the probabilities `p` (second operand).
struct CausalSoftmaxBwd<'a> {
    t: usize,
    h: usize,
    scale: f64,
    /// Row dots `sum(dy * y)` in `[B, T, H]` order.
    dsum: &'a Tensor,
}

impl InplaceOp2 for CausalSoftmaxBwd<'_> {
    fn name(&self) -> &'static str {
        "fused-causal-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        fn go<T: Real>(
            op: &CausalSoftmaxBwd,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<()> {
            let (t, h) = (op.t, op.h);
            let dp = cpu_slice_mut::<T>(s1, l1)?;
            let p = cpu_slice::<T>(s2, l2)?;
            let rows = dp.len() / t;
            with_slice::<T, _>(op.dsum, |dsum_bth| {
                // Reorder D to the score rows' [B, H, T] order.
                let mut dsum = vec![T::ZERO; rows];
                let b = rows / (h * t);
                for bi in 0..b {
                    for hh in 0..h {
                        for i in 0..t {
                            dsum[(bi * h + hh) * t + i] = dsum_bth[(bi * t + i) * h + hh];
                        }
                    }
                }
                let rpt = rows_per_task(t);
                dp.par_chunks_mut(rpt * t)
                    .zip(p.par_chunks(rpt * t))
                    .zip(dsum.par_chunks(rpt))
                    .enumerate()
                    .for_each(|(c, ((dp, p), d))| attn_ds_rows(dp, p, d, c * rpt, t, op.scale));
            })
        }
        dispatch!(st_dtype(s1), go(self, s1, l1, s2, l2))
    }
}

struct Attention {
    b: usize,
    t: usize,
    h: usize,
    kv: usize,
    hd: usize,
    scale: f64,
    /// The forward output `[B, H, T, hd]`, computed before the op is applied.
    out: Mutex<Option<Tensor>>,
    /// Log-sum-exp of each score row, `[B * H * T]`.
    lse: Tensor,
}

fn permute_bhtd_to_bthd<T: Real>(y: &[T], h: usize, t: usize, hd: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; y.len()];
    out.par_chunks_mut(h * hd).enumerate().for_each(|(row, o)| {
        let (bi, i) = (row / t, row % t);
        for hh in 0..h {
            o[hh * hd..(hh + 1) * hd].copy_from_slice(&y[((bi * h + hh) * t + i) * hd..][..hd]);
        }
    });
    out
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(y) = self.out.lock().unwrap().take() else {
            bail!("fused-causal-attention: forward applied twice")
        };
        fn go<T: Real>(op: &Attention, y: &Tensor) -> Result<CpuStorage> {
            let v = with_slice::<T, _>(y, |y| permute_bhtd_to_bthd(y, op.h, op.t, op.hd))?;
            Ok(T::to_cpu_storage_owned(v))
        }
        let st = dispatch!(y.dtype(), go(self, &y))?;
        Ok((st, Shape::from((self.b * self.t, self.h * self.hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, h, kv, hd) = (self.b, self.t, self.h, self.kv, self.hd);
        let n_rep = h / kv;
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let dy = dy.detach().contiguous()?;
        let qg = q.reshape((b, kv, n_rep * t, hd))?;
        // Probabilities recomputed from the scores and the saved log-sum-exp.
        let p = qg.matmul(&k.t()?)?;
        p.inplace_op1(&CausalProbs {
            t,
            scale: self.scale,
            lse: &self.lse,
        })?;
        let dyg = dy
            .reshape((b, t, h, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, kv, n_rep * t, hd))?;
        let dv = p.t()?.matmul(&dyg)?; // [B, KV, T, hd]
        let dp = dyg.matmul(&v.t()?)?; // [B, KV, n_rep*T, T]
        let dsum = {
            fn go<T: Real>(dy: &Tensor, y: &Tensor, h: usize, hd: usize) -> Result<Tensor> {
                let rows = dy.elem_count() / (h * hd);
                let d = with_slice::<T, _>(dy, |dy| {
                    with_slice::<T, _>(y, |y| {
                        let mut out = vec![T::ZERO; rows * h];
                        out.par_chunks_mut(h)
                            .zip(dy.par_chunks(h * hd).zip(y.par_chunks(h * hd)))
                            .for_each(|(o, (dy, y))| head_dots_row(dy, y, o, hd));
                        out
                    })
                })??;
                tensor_from(d, rows * h, dy.device())
            }
            dispatch!(dy.dtype(), go(&dy, &res.detach(), h, hd))?
        };
        dp.inplace_op2(
            &p,
            &CausalSoftmaxBwd {
                t,
                h,
                scale: self.scale,
                dsum: &dsum,
            },
        )?;
        drop(p);
        let ds = dp;
        let dq = ds.matmul(&k)?.reshape((b, h, t, hd))?; // [B, H, T, hd]
        let dk = ds.t()?.matmul(&qg)?; // [B, KV, T, hd]
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Causal self-attention with grouped-query heads: `q` `[B, H, T, hd]`, `k`/`v`
/// `[B, KV, T, hd]` (H a multiple of KV; query head `h` uses kv head `h / (H/KV)`),
/// positions 0..T, scores scaled by `scale`. Returns `[B*T, H*hd]` (token-major, ready
/// for the output projection). Only q, k, v and one log-sum-exp per query row are kept
/// for the backward, which recomputes the probabilities. CPU, f32/f64.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (_, kv, _, _) = k.dims4()?;
    if kv == 0 || h % kv != 0 || k.dims() != v.dims() || k.dims() != [b, kv, t, hd] {
        bail!(
            "fused attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let n_rep = h / kv;
    let qg = q.detach().reshape((b, kv, n_rep * t, hd))?;
    let p = qg.matmul(&k.detach().t()?)?;
    let sm = CausalSoftmax {
        t,
        scale,
        lse: Mutex::new(None),
    };
    p.inplace_op1(&sm)?;
    let lse = sm
        .lse
        .lock()
        .unwrap()
        .take()
        .expect("causal softmax writes the log-sum-exp");
    let y = p.matmul(&v.detach())?; // [B, KV, n_rep*T, hd] = [B, H, T, hd]
    drop(p);
    let op = Attention {
        b,
        t,
        h,
        kv,
        hd,
        scale,
        out: Mutex::new(Some(y)),
        lse,
    };
    q.apply_op3(&k, &v, op)
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

const ELEM_CHUNK: usize = 16_384;

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn go<T: Real>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let (g, u) = (cpu_slice::<T>(s1, l1)?, cpu_slice::<T>(s2, l2)?);
            if g.len() != u.len() {
                bail!("fused-swiglu: shape mismatch")
            }
            let mut out = vec![T::ZERO; g.len()];
            out.par_chunks_mut(ELEM_CHUNK)
                .zip(g.par_chunks(ELEM_CHUNK).zip(u.par_chunks(ELEM_CHUNK)))
                .for_each(|(o, (g, u))| swiglu_fwd_chunk(g, u, o));
            Ok(T::to_cpu_storage_owned(out))
        }
        if l1.shape() != l2.shape() {
            bail!("fused-swiglu: shape mismatch")
        }
        let st = dispatch!(st_dtype(s1), go(s1, l1, s2, l2))?;
        Ok((st, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn go<T: Real>(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
            let (dg, du) = with_slice::<T, _>(g, |gs| {
                with_slice::<T, _>(u, |us| {
                    with_slice::<T, _>(dy, |ds| {
                        let mut dg = vec![T::ZERO; gs.len()];
                        let mut du = vec![T::ZERO; gs.len()];
                        dg.par_chunks_mut(ELEM_CHUNK)
                            .zip(du.par_chunks_mut(ELEM_CHUNK))
                            .zip(gs.par_chunks(ELEM_CHUNK))
                            .zip(us.par_chunks(ELEM_CHUNK).zip(ds.par_chunks(ELEM_CHUNK)))
                            .for_each(|(((dg, du), g), (u, d))| swiglu_bwd_chunk(g, u, d, dg, du));
                        (dg, du)
                    })
                })
            })???;
            Ok((
                tensor_from(dg, g.shape().clone(), g.device())?,
                tensor_from(du, u.shape().clone(), u.device())?,
            ))
        }
        let (dg, du) = dispatch!(g.dtype(), go(g, u, dy))?;
        Ok((Some(dg), Some(du)))
    }
}

/// `silu(g) * u` with a backward for both (nothing but `g` and `u` is kept). CPU, f32/f64.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
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

struct TargetLogprob {
    targets: Vec<u32>,
    inv_t: f64,
    /// Vocabulary chunk.
    vc: usize,
    /// Forward output `[N]`, computed before the op is applied.
    out: Mutex<Option<Tensor>>,
    /// Per-row log-sum-exp of `logits * inv_t`, `[N]`.
    lse: Tensor,
    /// The forward's logits chunks, when small enough to keep (saves recomputing them).
    kept: Mutex<Vec<Tensor>>,
}

/// In-place gradient of the chunk logits.
struct LogitGrad<'a> {
    op: &'a TargetLogprob,
    coef: &'a Tensor,
    v0: usize,
    vc: usize,
}

impl InplaceOp1 for LogitGrad<'_> {
    fn name(&self) -> &'static str {
        "fused-logit-grad"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        fn go<T: Real>(k: &LogitGrad, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let z = cpu_slice_mut::<T>(s, l)?;
            let vc = k.vc;
            with_slice::<T, _>(&k.op.lse, |lse| {
                with_slice::<T, _>(k.coef, |coef| {
                    let rpt = rows_per_task(vc);
                    z.par_chunks_mut(rpt * vc)
                        .zip(lse.par_chunks(rpt))
                        .zip(coef.par_chunks(rpt).zip(k.op.targets.par_chunks(rpt)))
                        .for_each(|((z, lse), (coef, tg))| {
                            lp_bwd_rows(z, lse, coef, tg, k.v0, vc, k.op.inv_t)
                        });
                })
            })?
        }
        dispatch!(st_dtype(s), go(self, s, l))
    }
}

impl CustomOp2 for TargetLogprob {
    fn name(&self) -> &'static str {
        "fused-target-logprob"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(out) = self.out.lock().unwrap().take() else {
            bail!("fused-target-logprob: forward applied twice")
        };
        fn go<T: Real>(out: &Tensor) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(with_slice::<T, _>(out, |s| {
                s.to_vec()
            })?))
        }
        let st = dispatch!(out.dtype(), go(&out))?;
        Ok((st, Shape::from(self.targets.len())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (h, w) = (h.detach(), w.detach());
        let (vocab, _) = w.dims2()?;
        let coef = (g.detach() * self.inv_t)?.contiguous()?;
        let vc = self.vc;
        let mut dh: Option<Tensor> = None;
        let mut dw = Vec::with_capacity(vocab.div_ceil(vc));
        let mut kept = std::mem::take(&mut *self.kept.lock().unwrap()).into_iter();
        let mut v0 = 0;
        while v0 < vocab {
            let len = vc.min(vocab - v0);
            let wc = w.narrow(0, v0, len)?;
            let z = match kept.next() {
                Some(z) => z,
                None => h.matmul(&wc.t()?)?, // [N, len]
            };
            z.inplace_op1(&LogitGrad {
                op: self,
                coef: &coef,
                v0,
                vc: len,
            })?;
            let part = z.matmul(&wc)?; // [N, D]
            dh = Some(match dh {
                Some(acc) => (acc + part)?,
                None => part,
            });
            dw.push(z.t()?.matmul(&h)?); // [len, D]
            v0 += len;
        }
        let dw = if dw.len() == 1 {
            dw.pop().expect("one chunk")
        } else {
            Tensor::cat(&dw, 0)?
        };
        Ok((dh, Some(dw)))
    }
}

/// `log softmax(h @ w^T * inv_temp)[i, targets[i]]` for each row `i` of `h` `[N, D]`
/// (`w` `[vocab, D]`), returned as `[N]`. Computed over vocabulary chunks with an online
/// log-sum-exp; the probabilities are never stored: the backward turns each chunk's
/// logits in place into the logit gradient `g * inv_temp * (onehot - softmax)`. The
/// logits chunks are kept from the forward when `N * vocab` is at most 64M elements and
/// recomputed otherwise, so memory stays bounded for any number of rows. Backward for `h` and `w`. CPU, f32/f64.
pub fn target_logprobs(h: &Tensor, w: &Tensor, targets: &[u32], inv_temp: f64) -> Result<Tensor> {
    let (n, vocab) = (h.dim(0)?, w.dim(0)?);
    let keep = n * vocab <= KEEP_LOGITS_MAX_ELEMS;
    target_logprobs_chunked(h, w, targets, inv_temp, vocab_chunk(n, vocab), keep)
}

/// [`target_logprobs`] with an explicit vocabulary chunk and choice of keeping the
/// logits for the backward or recomputing them (tests exercise both).
pub(crate) fn target_logprobs_chunked(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    inv_temp: f64,
    vc: usize,
    keep: bool,
) -> Result<Tensor> {
    let (n, d) = h.dims2()?;
    let (vocab, dw) = w.dims2()?;
    if d != dw || targets.len() != n {
        bail!(
            "fused target_logprobs: h {:?}, w {:?}, {} targets",
            h.dims(),
            w.dims(),
            targets.len()
        )
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("fused target_logprobs: target {bad} out of vocabulary ({vocab})")
    }
    let h = h.contiguous()?;
    let (hd, wd) = (h.detach(), w.detach());
    fn go<T: Real>(
        hd: &Tensor,
        wd: &Tensor,
        targets: &[u32],
        inv_t: f64,
        vc: usize,
        keep: bool,
    ) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
        let (n, _) = hd.dims2()?;
        let (vocab, _) = wd.dims2()?;
        let (mut m, mut s, mut tgt) = (vec![T::ZERO; n], vec![T::ZERO; n], vec![T::ZERO; n]);
        let mut kept = Vec::new();
        let mut v0 = 0;
        while v0 < vocab {
            let len = vc.min(vocab - v0);
            let z = hd.matmul(&wd.narrow(0, v0, len)?.t()?)?; // [N, len]
            with_slice::<T, _>(&z, |z| {
                let rpt = rows_per_task(len);
                z.par_chunks(rpt * len)
                    .zip(m.par_chunks_mut(rpt))
                    .zip(s.par_chunks_mut(rpt))
                    .zip(tgt.par_chunks_mut(rpt).zip(targets.par_chunks(rpt)))
                    .for_each(|(((z, m), s), (tgt, tg))| {
                        lp_fwd_rows(z, m, s, tgt, tg, v0, len, inv_t)
                    });
            })?;
            if keep {
                kept.push(z);
            }
            v0 += len;
        }
        let lse: Vec<T> = m.iter().zip(&s).map(|(&m, &s)| m + s.ln_()).collect();
        let lp: Vec<T> = tgt.iter().zip(&lse).map(|(&t, &l)| t - l).collect();
        Ok((
            tensor_from(lp, n, hd.device())?,
            tensor_from(lse, n, hd.device())?,
            kept,
        ))
    }
    let (out, lse, kept) = dispatch!(h.dtype(), go(&hd, &wd, targets, inv_temp, vc.max(1), keep))?;
    let op = TargetLogprob {
        targets: targets.to_vec(),
        inv_t: inv_temp,
        vc: vc.max(1),
        out: Mutex::new(Some(out)),
        lse,
        kept: Mutex::new(kept),
    };
    h.apply_op2(w, op)
}

// ---------------------------------------------------------------------------------------
// The whole model's pass by hand (same kernels, no autograd)
// ---------------------------------------------------------------------------------------

pub(crate) mod whole;
