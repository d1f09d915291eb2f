//! Unit tests of the sampler and the continuous-batching engine. The tests that check the
//! sampler against the trainable model (tiny models, SmolLM2, Hugging Face checkpoints) are
//! in `hindsight-training`.

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
