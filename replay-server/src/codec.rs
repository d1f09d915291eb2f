//! The prompt codec: how the server turns an instruction into chat-templated token ids.
//!
//! The server tokenizes every prompt it leases (and every rewritten HiR instruction) so
//! actors and learner see exactly the same prompt tokens. [`PromptCodec`] hides the real
//! tokenizer ([`hindsight_model::ChatTokenizer`]) so the batch logic can be unit-tested
//! with a trivial codec.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

/// Chat-templates and tokenizes user instructions; knows the vocabulary size.
pub trait PromptCodec: Send + Sync {
    /// Token ids of `instruction` as a single user turn with the chat template applied
    /// (ending with the assistant header, so generation can start right after).
    fn encode_chat(&self, instruction: &str) -> anyhow::Result<Vec<u32>>;
    /// Number of token ids; every response token must be below it.
    fn vocab_size(&self) -> usize;
    /// The text of a response's token ids, special tokens skipped (what the actor's user
    /// would read, and what the verifiers judge). Never fails: undecodable ids become U+FFFD.
    fn decode(&self, ids: &[u32]) -> String;
    /// The model fingerprint (`hindsight_model::fingerprint`) clients must match; empty
    /// for a codec that stands for no model (tests), which turns the check off.
    fn model_fingerprint(&self) -> &str {
        ""
    }
}

/// A real model's tokenizer with the model's fingerprint.
pub struct ModelCodec {
    tokenizer: hindsight_model::ChatTokenizer,
    fingerprint: String,
}

impl ModelCodec {
    /// The codec of a model whose config and tokenizer are given.
    pub fn new(
        config: &hindsight_model::ModelConfig,
        tokenizer: hindsight_model::ChatTokenizer,
    ) -> anyhow::Result<Self> {
        let fingerprint = hindsight_model::fingerprint(config, &tokenizer)?;
        Ok(Self {
            tokenizer,
            fingerprint,
        })
    }
}

impl PromptCodec for ModelCodec {
    fn encode_chat(&self, instruction: &str) -> anyhow::Result<Vec<u32>> {
        self.tokenizer.encode_chat(instruction)
    }

    fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    fn decode(&self, ids: &[u32]) -> String {
        PromptCodec::decode(&self.tokenizer, ids)
    }

    fn model_fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

impl PromptCodec for hindsight_model::ChatTokenizer {
    fn encode_chat(&self, instruction: &str) -> anyhow::Result<Vec<u32>> {
        hindsight_model::ChatTokenizer::encode_chat(self, instruction)
    }

    fn vocab_size(&self) -> usize {
        hindsight_model::ChatTokenizer::vocab_size(self)
    }

    fn decode(&self, ids: &[u32]) -> String {
        // Ids are checked against the vocabulary before this runs; an error here would be a
        // tokenizer bug, and an empty text fails every constraint (never a false reward).
        hindsight_model::ChatTokenizer::decode(self, ids, true).unwrap_or_default()
    }
}

/// Loads the tokenizer and config of `model` (`tiny`, `smollm2` or a `.gguf` path) as a
/// codec that knows the model's fingerprint.
/// Blocking (it may read or download files): call it from a blocking context.
pub fn load_codec(model: &str, cache_dir: Option<&Path>) -> anyhow::Result<Arc<dyn PromptCodec>> {
    let default_dir;
    let dir = match cache_dir {
        Some(dir) => dir,
        None => {
            default_dir = hindsight_model::default_cache_dir();
            default_dir.as_path()
        }
    };
    let info = hindsight_model::load_model_info(model, dir)
        .with_context(|| format!("loading the tokenizer of model {model:?}"))?;
    let codec = ModelCodec::new(&info.config, info.tokenizer)?;
    tracing::info!(model = %info.name, fingerprint = %codec.fingerprint, "model fingerprint");
    Ok(Arc::new(codec))
}

/// A codec for tests: one token per byte of a fixed `<user>...<assistant>` framing.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteCodec;

impl PromptCodec for ByteCodec {
    fn encode_chat(&self, instruction: &str) -> anyhow::Result<Vec<u32>> {
        Ok(format!("<user>{instruction}<assistant>")
            .bytes()
            .map(u32::from)
            .collect())
    }

    fn vocab_size(&self) -> usize {
        256
    }

    fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned()
    }
}
