//! Unit tests: the fused ops and the whole-model pass against candle's autograd, gradients
//! against finite differences, AdamW, and the trainable model against the sampler on tiny
//! models, Hugging Face checkpoints and the real SmolLM2 (loading, sampling and training
//! must agree on every model the project runs).

use candle_core::Tensor;

/// Largest absolute element-wise difference of two f32 tensors of the same shape.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

mod fused;
mod hf;
mod smollm2;
mod tiny;
