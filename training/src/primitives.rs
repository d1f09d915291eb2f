//! The differentiable primitives of the trainable forward off the CPU fast path: RMSNorm,
//! softmax, log-sum-exp and half-rotation rope built only from candle ops that have a
//! backward in candle 0.11 (candle's own fused kernels have none).

use candle_core::{Tensor, D};

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
