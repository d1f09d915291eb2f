//! `hindsight-policy`: the one place that knows the model. Loading (GGUF →
//! f32 HF-layout weights, safetensors), the byte-level BPE tokenizer and ChatML
//! template, the batched KV-cache [`Sampler`] returning per-token log-probs and
//! entropies (decode projections use the small-batch CPU kernel in [`kernels`]),
//! the differentiable [`TrainableModel`] (every op has a backward), a
//! fused in-place [`AdamW`], and gradient-norm utilities.

pub mod adamw;
pub mod config;
pub mod kernels;
pub mod load;
pub mod ops;
pub mod sampler;
pub mod tokenizer;
pub mod trainable;
pub mod weights;

#[cfg(test)]
mod tests;

pub use adamw::{grad_norm, AdamW};
pub use candle_core::{DType, Device, Tensor, Var};
pub use config::ModelConfig;
pub use load::{
    config_from_gguf, default_cache_dir, fetch_smollm2, load, load_tokenizer, tiny, tiny_config,
    tokenizer_from_gguf, weights_from_gguf, LoadedModel,
};
pub use sampler::{Generation, Sampler, SamplingParams};
pub use tokenizer::ChatTokenizer;
pub use trainable::TrainableModel;
pub use weights::Weights;
