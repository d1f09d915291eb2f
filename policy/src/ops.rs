//! Tensor helpers shared by the sampler and the trainer: rotary tables, the padded causal
//! mask, and GGUF q/k (un)permutation.

use candle_core::{DType, Device, Tensor};

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
