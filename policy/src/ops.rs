//! Shared tensor helpers: rotary tables, the differentiable primitives used by the
//! trainable forward (RMSNorm, softmax, half-rotation rope built only from ops
//! that have a backward in candle 0.11), and GGUF q/k (un)permutation.

use candle_core::{DType, Device, Tensor, D};

/// cos/sin tables for the given absolute positions: two tensors `[N, head_dim/2]`,
/// computed in f64 then cast to `dtype` (identical for sampler and trainer).
/// Unscaled rope; see [`rope_cos_sin_inv`] for arbitrary inverse frequencies.
pub fn rope_cos_sin(
    positions: &[usize],
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    // inv_freq computed in f32 like HF's `1 / base**(arange(0, dim, 2).float() / dim)`.
    let inv: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    rope_cos_sin_inv(positions, &inv, dtype, device)
}

/// cos/sin tables `[N, inv_freqs.len()]` for the given positions and inverse
/// frequencies (from [`crate::ModelConfig::rope_inv_freqs`]), angles in f64.
pub fn rope_cos_sin_inv(
    positions: &[usize],
    inv_freqs: &[f32],
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = inv_freqs.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &inv in inv_freqs {
            let a = p as f64 * inv as f64;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let n = positions.len();
    let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// RMSNorm from primitives: `x / sqrt(mean(x^2) + eps) * w` over the last dim.
pub fn rms_norm_diff(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let denom = (ms + eps)?.sqrt()?;
    x.broadcast_div(&denom)?.broadcast_mul(w)
}

/// Softmax over the last dim from primitives, with the row max detached (a
/// constant shift, so the gradient is exact).
pub fn softmax_diff(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Log-sum-exp over the last dim (keepdim), row max detached.
pub fn logsumexp_diff(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?;
    s.log()?.broadcast_add(&m)
}

/// Hugging Face half-rotation rope from primitives. `x`: `[B, H, T, hd]`;
/// `cos`/`sin`: `[T, hd/2]` (shared positions) or `[B, T, hd/2]`.
pub fn rope_half_diff(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let (cos, sin) = match cos.rank() {
        2 => (
            Tensor::cat(&[cos, cos], 1)?.unsqueeze(0)?.unsqueeze(0)?,
            Tensor::cat(&[sin, sin], 1)?.unsqueeze(0)?.unsqueeze(0)?,
        ),
        _ => (
            Tensor::cat(&[cos, cos], 2)?.unsqueeze(1)?,
            Tensor::cat(&[sin, sin], 2)?.unsqueeze(1)?,
        ),
    };
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
}

/// Additive attention mask `[B, 1, 1, T, Tk]` (0 = attend, -inf = masked) for
/// left-padded sequences: query `i` (cache slot `offset + i`) attends key `j` iff
/// `j <= offset + i` and `j >= pad[b]`; a padding query attends only itself so no
/// row is fully masked.
pub fn padded_causal_mask(
    pads: &[usize],
    t: usize,
    offset: usize,
    tk: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let b = pads.len();
    let mut m = vec![0f32; b * t * tk];
    for (bi, &pad) in pads.iter().enumerate() {
        for i in 0..t {
            let qi = offset + i;
            for j in 0..tk {
                let ok = (j <= qi && j >= pad) || (j == qi && qi < pad);
                if !ok {
                    m[(bi * t + i) * tk + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, 1, t, tk), device)?.to_dtype(dtype)
}

/// llama.cpp's q/k permutation (HF half-rotation layout -> GGUF interleaved layout).
pub fn permute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    w.reshape((n_head, 2, hd / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// Inverse of [`permute_qk`]: GGUF interleaved layout -> HF half-rotation layout.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    w.reshape((n_head, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}
