//! What generates: the [`Generator`] trait and its two implementations, chosen once per
//! device by [`crate::Sampler`]:
//! - [`crate::engine::CpuEngine`] on the CPU: rows of any sequences at any positions in one
//!   forward, so continuous batching refills a finished sequence's slot at once; f32 or
//!   bf16 weights;
//! - [`crate::tensor_engine::TensorEngine`] elsewhere (CUDA): candle tensors and kernels,
//!   left-padded batches of `max_batch` prompts, f32.
//!
//! Both draw tokens with [`crate::sampling::sample_row`] from one ChaCha8 stream per sequence
//! (seed, stream = key), so a sequence's tokens depend on its key and the weights, not on
//! which other sequences share its batch.

use crate::sampling::{Generation, SamplingParams};

/// A model with its weights, ready to generate.
pub trait Generator: Send + Sync {
    /// Test hook: q/k weights in the GGUF (interleaved) layout.
    fn set_interleaved_rope(&mut self, interleaved: bool);

    /// Logits of a whole sequence (no sampling): `T * vocab` values, row-major `[T, vocab]`.
    fn logits(&self, tokens: &[u32]) -> anyhow::Result<Vec<f32>>;

    /// Pulls `(key, prompt)` pairs from `next` while fewer than `max_batch` sequences are in
    /// flight and hands every finished sequence to `done`; `key` picks the sequence's random
    /// stream. A sequence ends on one of `stops` (included in its tokens) or after
    /// `params.max_new_tokens`. `max_prefill_tokens` bounds the prompt tokens of one forward
    /// where the implementation prefills incrementally.
    fn generate_stream(
        &self,
        params: &SamplingParams,
        stops: &[u32],
        max_batch: usize,
        max_prefill_tokens: usize,
        next: &mut dyn FnMut() -> Option<(usize, Vec<u32>)>,
        done: &mut dyn FnMut(usize, Generation) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;
}
