//! Unit tests: tiny-model gradients/consistency, sampling, serialisation,
//! AdamW, Hugging Face checkpoints and chat templates, and the real SmolLM2 checks.

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

mod engine;
mod fused;
mod hf;
mod smollm2;
mod tiny;
