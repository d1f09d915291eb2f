//! Loading a model with its weights: a [`ModelSource`] (see `hindsight_model`) read into
//! f32 HF-named [`Weights`]: GGUF tensors dequantised to f32 with the q/k projections
//! un-permuted to the HF layout, a Hugging Face checkpoint's safetensors (see [`crate::hf`]),
//! and the deterministic tiny random models used by tests (`tiny` Llama, `tiny-qwen2`,
//! `tiny-llama3`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use hindsight_model::{
    config_from_gguf, tiny_config_for, tiny_tokenizer, ChatTokenizer, GgufMetadata, ModelConfig,
    ModelSource, TinyKind,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::hf;
use crate::ops::unpermute_qk;
use crate::weights::Weights;

/// A model ready to use: config, f32 HF-named weights, tokenizer, display name.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: ChatTokenizer,
    pub name: String,
}

/// Loads GGUF weights dequantised to f32 with HF names. With `unpermute` the q/k
/// projections are converted from llama.cpp's interleaved-rope layout back to the
/// HF half-rotation layout (what every other part of this crate expects).
pub fn weights_from_gguf(
    path: &Path,
    device: &Device,
    unpermute: bool,
) -> anyhow::Result<(ModelConfig, Weights)> {
    let cfg = config_from_gguf(&GgufMetadata::read_file(path)?)?;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let c = gguf_file::Content::read(&mut f)
        .with_context(|| format!("reading GGUF {}", path.display()))?;
    let mut tensors = BTreeMap::new();
    let mut load = |gguf: &str| -> anyhow::Result<Tensor> {
        let q = c
            .tensor(&mut f, gguf, &Device::Cpu)
            .with_context(|| format!("GGUF tensor {gguf}"))?;
        Ok(q.dequantize(&Device::Cpu)?)
    };
    tensors.insert(
        "model.embed_tokens.weight".to_string(),
        load("token_embd.weight")?,
    );
    tensors.insert("model.norm.weight".to_string(), load("output_norm.weight")?);
    if !cfg.tie_word_embeddings {
        tensors.insert("lm_head.weight".to_string(), load("output.weight")?);
    }
    for l in 0..cfg.num_hidden_layers {
        let (g, p) = (format!("blk.{l}"), format!("model.layers.{l}"));
        let mut q = load(&format!("{g}.attn_q.weight"))?;
        let mut k = load(&format!("{g}.attn_k.weight"))?;
        if unpermute {
            q = unpermute_qk(&q, cfg.num_attention_heads)?;
            k = unpermute_qk(&k, cfg.num_key_value_heads)?;
        }
        tensors.insert(format!("{p}.self_attn.q_proj.weight"), q);
        tensors.insert(format!("{p}.self_attn.k_proj.weight"), k);
        for (gn, hn) in [
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ] {
            tensors.insert(
                format!("{p}.{hn}.weight"),
                load(&format!("{g}.{gn}.weight"))?,
            );
        }
    }
    let weights = Weights { tensors }.to_device(device)?;
    weights.validate(&cfg)?;
    Ok((cfg, weights))
}

/// Loads a model with its weights on `device`. `spec`: `"tiny"` (seed 0), `"tiny:SEED"`,
/// `"tiny-qwen2[:SEED]"`, `"tiny-llama3[:SEED]"` (see [`tiny_kind`]), `"smollm2"` (fetched
/// into `cache_dir`), a Hugging Face checkpoint directory (`config.json` + safetensors +
/// `tokenizer.json`, Llama or Qwen2) or a path to a llama `.gguf` file.
pub fn load(spec: &str, cache_dir: &Path, device: &Device) -> anyhow::Result<LoadedModel> {
    let source = ModelSource::resolve(spec, cache_dir)?;
    let (info, weights) = match &source {
        ModelSource::Tiny(kind, seed) => {
            let m = tiny_kind(*kind, *seed)?;
            return Ok(LoadedModel {
                weights: m.weights.to_device(device)?,
                ..m
            });
        }
        ModelSource::HfDir(dir) => {
            let info = source.info()?;
            let weights = hf::weights_from_hf_dir(dir, &info.config, device)?;
            (info, weights)
        }
        ModelSource::Gguf { path, .. } => {
            (source.info()?, weights_from_gguf(path, device, true)?.1)
        }
    };
    Ok(LoadedModel {
        config: info.config,
        weights,
        tokenizer: info.tokenizer,
        name: info.name,
    })
}

/// A tiny random model of the given flavour (see [`tiny`] for the distribution;
/// q/k/v biases are U(-0.5, 0.5)).
pub fn tiny_kind(kind: TinyKind, seed: u64) -> anyhow::Result<LoadedModel> {
    let config = tiny_config_for(kind);
    let weights = random_weights(&config, seed)?;
    let name = ModelSource::Tiny(kind, seed).name();
    Ok(LoadedModel {
        config,
        weights,
        tokenizer: tiny_tokenizer(kind)?,
        name,
    })
}

/// A deterministic small random Llama with the tiny byte-level tokenizer. Weights
/// are uniform draws from ChaCha8 (no transcendental functions), so the same seed
/// gives bit-identical weights on every platform. Matrices: U(-a, a) with
/// a = sqrt(3 / fan_in) (unit-variance activations); embeddings U(-0.5, 0.5);
/// norm weights 1 + U(-0.1, 0.1).
pub fn tiny(seed: u64) -> anyhow::Result<LoadedModel> {
    tiny_kind(TinyKind::Llama, seed)
}

/// Deterministic random weights for `config` (distribution documented at [`tiny`]).
pub fn random_weights(config: &ModelConfig, seed: u64) -> anyhow::Result<Weights> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    for (name, shape) in config.parameter_shapes() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with(".bias") {
            (0..n).map(|_| rng.random::<f32>() - 0.5).collect()
        } else if shape.len() == 1 {
            (0..n)
                .map(|_| 1.0 + (rng.random::<f32>() - 0.5) * 0.2)
                .collect()
        } else if name.contains("embed_tokens") || name.starts_with("lm_head") {
            (0..n).map(|_| rng.random::<f32>() - 0.5).collect()
        } else {
            let a = (3.0 / shape[1] as f32).sqrt();
            (0..n)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * a)
                .collect()
        };
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    let weights = Weights { tensors };
    weights.validate(config)?;
    Ok(weights)
}
