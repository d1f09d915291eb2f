//! `hindsight-policy`: the one place that knows the model. Loading (GGUF →
//! f32 HF-layout weights; Hugging Face Llama/Qwen2 checkpoint directories) and
//! writing HF checkpoints ([`save_hf_checkpoint`]), the tokenizer and the model's
//! real Jinja chat template (minijinja), the [`Sampler`] returning per-token log-probs and
//! entropies (on CPU over the continuous-batching [`engine`] and its [`kernels`]), the
//! differentiable [`TrainableModel`] (every op has a backward; fused CPU ops and the
//! hand-written whole-model training pass in [`fused`]),
//! a fused in-place [`AdamW`], and gradient-norm utilities.

pub mod adamw;
pub mod config;
pub mod device;
pub mod engine;
pub mod fingerprint;
pub mod fused;
pub mod hf;
pub mod kernels;
pub mod load;
pub mod ops;
pub mod sampler;
pub mod template;
pub mod tokenizer;
pub mod trainable;
pub mod weights;

#[cfg(test)]
mod tests;

pub use adamw::{grad_norm, AdamW};
pub use candle_core::{DType, Device, Tensor, Var};
pub use config::{Architecture, ModelConfig, RopeScaling, SpecialTokenIds};
pub use device::parse_device;
pub use engine::Precision;
pub use fingerprint::{fingerprint, ModelDescription};
pub use hf::{
    config_from_hf_dir, is_hf_dir, save_hf_checkpoint, save_hf_checkpoint_with, save_tensors,
    tokenizer_from_hf_dir, weights_from_hf_dir, SaveDtype, SaveOptions,
};
pub use load::{
    config_from_gguf, default_cache_dir, fetch_smollm2, load, load_model_info, load_tokenizer,
    random_weights, tiny, tiny_config, tiny_config_for, tiny_kind, tiny_tokenizer,
    tokenizer_from_gguf, weights_from_gguf, LoadedModel, ModelInfo, TinyKind,
};
pub use sampler::{Generation, PreparedWeights, Sampler, SamplingParams};
pub use template::{ChatTemplate, SpecialTokens};
pub use tokenizer::ChatTokenizer;
pub use trainable::{GradSums, HostGrads, TrainForward, TrainableModel};
pub use weights::Weights;
