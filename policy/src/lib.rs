//! `hindsight-policy`: the policy as something to sample from. Loading a model with its
//! weights ([`load()`]: GGUF dequantised to f32 HF-layout weights, Hugging Face Llama/Qwen2
//! checkpoint directories, the tiny random models) and writing HF checkpoints
//! ([`save_hf_checkpoint`]), the f32 [`Weights`] and their safetensors wire form, and the
//! [`Sampler`] returning per-token log-probs and entropies over a [`Generator`]: on the CPU
//! the continuous-batching [`engine`] and its [`kernels`], elsewhere the candle
//! [`tensor_engine`] (chosen once per device). What a model
//! is without its tensors (config, tokenizer, template, fingerprint) is `hindsight-model`,
//! re-exported here; training it is `hindsight-training`.

pub mod device;
pub mod engine;
pub mod generator;
pub mod hf;
pub mod kernels;
pub mod load;
pub mod ops;
pub mod sampler;
pub mod sampling;
pub mod storage;
pub mod tensor_engine;
pub mod weights;

#[cfg(test)]
mod tests;

pub use candle_core::{DType, Device, Tensor, Var};
pub use device::parse_device;
pub use engine::{CpuEngine, Precision};
pub use generator::Generator;
pub use hf::{
    save_hf_checkpoint, save_hf_checkpoint_with, save_tensors, weights_from_hf_dir, SaveDtype,
    SaveOptions,
};
pub use hindsight_model::fingerprint;
pub use hindsight_model::{
    config_from_gguf, config_from_hf_dir, default_cache_dir, fetch_smollm2, is_hf_dir,
    load_model_info, load_tokenizer, tiny_config, tiny_config_for, tiny_tokenizer,
    tokenizer_from_gguf, tokenizer_from_hf_dir, Architecture, ChatTemplate, ChatTokenizer,
    ModelConfig, ModelDescription, ModelInfo, ModelSource, RopeScaling, SpecialTokenIds,
    SpecialTokens, TinyKind,
};
pub use load::{load, random_weights, tiny, tiny_kind, weights_from_gguf, LoadedModel};
pub use sampler::{PreparedWeights, Sampler};
pub use sampling::{Generation, SamplingParams};
pub use storage::{F32Buf, MappedSafetensors};
pub use tensor_engine::TensorEngine;
pub use weights::Weights;
