//! What identifies a model apart from its weights, and how it travels.
//!
//! Two processes can only exchange token ids and weights if they agree on the architecture
//! (the `config.json` hyper-parameters), the tokenizer and the chat template. The
//! [`ModelDescription`] holds exactly that, serialised canonically; its **fingerprint**
//! (`sha256:<hex>` of the canonical bytes) is computed by every process that loads or receives
//! a model and carried by leases, rollouts, learner registrations and weight manifests, so a
//! mismatch is refused by name instead of showing up as out-of-vocabulary ids or silent
//! mis-tokenisation. Weights are deliberately not part of it: they change every step.
//!
//! The learner sends its description to actors (`Weights.Model`), which is all an actor needs
//! besides the weights: [`ModelDescription::into_parts`] rebuilds the config and the chat
//! tokenizer from it, and the receiver recomputes the fingerprint from what it rebuilt.

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::config::ModelConfig;
use crate::template::SpecialTokens;
use crate::tokenizer::ChatTokenizer;

/// Version of the canonical serialisation (part of the hashed bytes).
const FORMAT: u32 = 1;

/// The special-token strings, in the canonical form.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Specials {
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    unk: Option<String>,
}

/// The fingerprinted part: architecture, tokenizer, template. Field order is the
/// serialisation order (serde derives it from the declaration), so the bytes are canonical.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Identity {
    format: u32,
    config: ModelConfig,
    /// The tokenizer as `tokenizers` serialises it (vocabulary, merges and added tokens in id
    /// order, so the same tokenizer always gives the same text).
    tokenizer: String,
    chat_template: Option<String>,
    special_tokens: Specials,
}

/// A model's architecture, tokenizer and chat template (no weights), plus the generation
/// settings that go with the tokenizer (stop tokens, `model_max_length`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelDescription {
    identity: Identity,
    /// Every id that ends a generation (not fingerprinted: a checkpoint may list more).
    stop_token_ids: Vec<u32>,
    model_max_length: Option<usize>,
}

/// Largest description accepted from the wire (SmolLM2's is about 3.5 MB).
pub const MAX_DESCRIPTION_BYTES: usize = 64 * 1024 * 1024;

impl ModelDescription {
    /// Describes a loaded model.
    pub fn new(config: &ModelConfig, tokenizer: &ChatTokenizer) -> anyhow::Result<Self> {
        let json = tokenizer
            .inner()
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
        let s = tokenizer.special_tokens();
        Ok(Self {
            identity: Identity {
                format: FORMAT,
                config: config.clone(),
                tokenizer: json,
                chat_template: tokenizer.chat_template().map(str::to_owned),
                special_tokens: Specials {
                    bos: s.bos.clone(),
                    eos: s.eos.clone(),
                    pad: s.pad.clone(),
                    unk: s.unk.clone(),
                },
            },
            stop_token_ids: tokenizer.stop_token_ids().to_vec(),
            model_max_length: tokenizer.model_max_length(),
        })
    }

    /// `sha256:<64 hex>` over the canonical bytes of architecture + tokenizer + template.
    pub fn fingerprint(&self) -> String {
        let bytes = serde_json::to_vec(&self.identity).expect("a description always serialises");
        format!("sha256:{}", hex_lower(&sha2::Sha256::digest(&bytes)))
    }

    /// The architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.identity.config
    }

    /// The wire form (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a description always serialises")
    }

    /// Parses the wire form, refusing oversized or malformed input and an invalid config.
    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            bytes.len() <= MAX_DESCRIPTION_BYTES,
            "model description of {} bytes is over the {MAX_DESCRIPTION_BYTES}-byte limit",
            bytes.len()
        );
        let d: Self = serde_json::from_slice(bytes).context("malformed model description")?;
        anyhow::ensure!(
            d.identity.format == FORMAT,
            "model description format {} (this build reads {FORMAT})",
            d.identity.format
        );
        d.identity.config.validate()?;
        Ok(d)
    }

    /// Rebuilds the config and the chat tokenizer.
    pub fn into_parts(self) -> anyhow::Result<(ModelConfig, ChatTokenizer)> {
        let tok: tokenizers::Tokenizer = self
            .identity
            .tokenizer
            .parse()
            .map_err(|e| anyhow::anyhow!("model description: bad tokenizer: {e}"))?;
        let s = self.identity.special_tokens;
        let special = SpecialTokens {
            bos: s.bos,
            eos: s.eos,
            pad: s.pad,
            unk: s.unk,
        };
        let tokenizer = ChatTokenizer::with_special_tokens(
            tok,
            self.identity.chat_template,
            special,
            &self.stop_token_ids,
            self.model_max_length,
        )?;
        anyhow::ensure!(
            tokenizer.vocab_size() <= self.identity.config.vocab_size,
            "model description: the tokenizer has {} tokens, the model's vocabulary {}",
            tokenizer.vocab_size(),
            self.identity.config.vocab_size
        );
        Ok((self.identity.config, tokenizer))
    }
}

/// The fingerprint of a loaded model (see [`ModelDescription::fingerprint`]).
pub fn fingerprint(config: &ModelConfig, tokenizer: &ChatTokenizer) -> anyhow::Result<String> {
    Ok(ModelDescription::new(config, tokenizer)?.fingerprint())
}

/// A fingerprint shortened for log lines and error messages (`sha256:0123abcd4567`).
pub fn short(fingerprint: &str) -> &str {
    let end = fingerprint
        .char_indices()
        .nth(19)
        .map(|(i, _)| i)
        .unwrap_or(fingerprint.len());
    &fingerprint[..end]
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{tiny_config_for, tiny_tokenizer, TinyKind};

    fn describe(kind: TinyKind) -> ModelDescription {
        ModelDescription::new(&tiny_config_for(kind), &tiny_tokenizer(kind).unwrap()).unwrap()
    }

    #[test]
    fn same_model_same_fingerprint_and_kinds_differ() {
        let a = describe(TinyKind::Llama).fingerprint();
        assert_eq!(a, describe(TinyKind::Llama).fingerprint());
        assert!(a.starts_with("sha256:") && a.len() == 7 + 64, "{a}");
        let q = describe(TinyKind::Qwen2).fingerprint();
        let l3 = describe(TinyKind::Llama3).fingerprint();
        assert_ne!(a, q);
        assert_ne!(a, l3);
        assert_ne!(q, l3);
    }

    #[test]
    fn architecture_and_template_are_fingerprinted() {
        let tok = tiny_tokenizer(TinyKind::Llama).unwrap();
        let mut cfg = tiny_config_for(TinyKind::Llama);
        let base = fingerprint(&cfg, &tok).unwrap();
        cfg.rope_theta = 20000.0;
        assert_ne!(base, fingerprint(&cfg, &tok).unwrap(), "config change");
        let other = ChatTokenizer::tiny_with_template(
            "{{ messages[0]['content'] }}",
            tok.special_tokens().clone(),
        )
        .unwrap();
        assert_ne!(
            base,
            fingerprint(&tiny_config_for(TinyKind::Llama), &other).unwrap(),
            "template change"
        );
    }

    #[test]
    fn wire_round_trip_keeps_the_fingerprint_and_the_tokenizer() {
        for kind in [TinyKind::Llama, TinyKind::Qwen2, TinyKind::Llama3] {
            let d = describe(kind);
            let fp = d.fingerprint();
            let back = ModelDescription::from_bytes(&d.to_bytes()).unwrap();
            assert_eq!(back.fingerprint(), fp);
            let (cfg, tok) = back.into_parts().unwrap();
            assert_eq!(
                fingerprint(&cfg, &tok).unwrap(),
                fp,
                "rebuilt model, {kind:?}"
            );
            let orig = tiny_tokenizer(kind).unwrap();
            assert_eq!(tok.stop_token_ids(), orig.stop_token_ids());
            assert_eq!(
                tok.encode_chat("hi").unwrap(),
                orig.encode_chat("hi").unwrap()
            );
        }
    }

    #[test]
    fn bad_wire_input_is_an_error() {
        assert!(ModelDescription::from_bytes(b"{").is_err());
        assert!(ModelDescription::from_bytes(b"[]").is_err());
        let mut v: serde_json::Value =
            serde_json::from_slice(&describe(TinyKind::Llama).to_bytes()).unwrap();
        v["identity"]["config"]["num_attention_heads"] = 3.into();
        let e = ModelDescription::from_bytes(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("divisible"), "{e:#}");
        v["identity"]["config"]["num_attention_heads"] = 4.into();
        v["identity"]["tokenizer"] = "not a tokenizer".into();
        let d = ModelDescription::from_bytes(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(d.into_parts().is_err());
    }

    #[test]
    fn short_form() {
        assert_eq!(short("sha256:0123456789abcdef0123"), "sha256:0123456789ab");
        assert_eq!(short("x"), "x");
    }
}
