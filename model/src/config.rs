//! Model hyper-parameters (`ModelConfig`), serialised with the field names of a
//! Hugging Face Llama `config.json`, plus helpers derived from them: the rotary
//! inverse frequencies (default, `linear` and Llama-3 `llama3` scaling), parsing a
//! Hugging Face `config.json` (Llama and Qwen2) and writing one back.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Decoder architecture. Qwen2 is Llama plus biases on the q/k/v projections.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    #[default]
    Llama,
    Qwen2,
}

impl Architecture {
    /// HF `model_type`.
    pub fn model_type(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// HF `architectures[0]`.
    pub fn hf_class(&self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// HF `rope_scaling` (`rope_type` "linear" or "llama3"; "default" = none).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

fn one() -> f64 {
    1.0
}

/// Token ids written into `config.json` / `generation_config.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecialTokenIds {
    pub bos: Option<u32>,
    /// The first is the primary eos; more (e.g. `<|endoftext|>`) go to `generation_config.json`.
    pub eos: Vec<u32>,
    pub pad: Option<u32>,
}

/// Llama-architecture hyper-parameters. Serde names follow HF `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Llama or Qwen2 (serialised as HF `model_type`; absent = llama).
    #[serde(default, rename = "model_type")]
    pub architecture: Architecture,
    /// Biases on the q/k/v projections (`...q_proj.bias`); true for Qwen2.
    #[serde(default)]
    pub qkv_bias: bool,
    /// Rotary scaling (Llama 3.x: `llama3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

/// `d` divides `n` (written without `%` so it stays MSRV-1.85 clippy-clean).
fn divides(d: usize, n: usize) -> bool {
    n / d * d == n
}

impl ModelConfig {
    /// Per-head dimension (`hidden_size / num_attention_heads`).
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Number of query heads sharing one key/value head (GQA group size).
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Checks internal consistency (divisibility of heads, even head dim).
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.num_attention_heads > 0 && self.num_key_value_heads > 0,
            "zero heads"
        );
        anyhow::ensure!(
            divides(self.num_attention_heads, self.hidden_size),
            "hidden_size {} not divisible by num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        anyhow::ensure!(
            divides(self.num_key_value_heads, self.num_attention_heads),
            "num_attention_heads {} not divisible by num_key_value_heads {}",
            self.num_attention_heads,
            self.num_key_value_heads
        );
        anyhow::ensure!(
            divides(2, self.head_dim()),
            "head_dim must be even for rope"
        );
        Ok(())
    }

    /// HF-style `config.json` without token ids (see [`ModelConfig::to_hf_config`]).
    pub fn to_hf_json(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string_pretty(
            &self.to_hf_config(&SpecialTokenIds::default()),
        )?)
    }

    /// A complete Hugging Face `config.json` (`LlamaForCausalLM` or
    /// `Qwen2ForCausalLM`, f32) that transformers loads as is.
    pub fn to_hf_config(&self, ids: &SpecialTokenIds) -> Value {
        let mut v = json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": 0.02,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "attention_dropout": 0.0,
            "use_cache": true,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "bos_token_id": ids.bos,
            "eos_token_id": ids.eos.first(),
            "pad_token_id": ids.pad,
        });
        let o = v.as_object_mut().expect("object");
        match self.architecture {
            Architecture::Llama => {
                o.insert("attention_bias".into(), json!(false));
                o.insert("mlp_bias".into(), json!(false));
                o.insert("pretraining_tp".into(), json!(1));
            }
            Architecture::Qwen2 => {
                o.insert("use_sliding_window".into(), json!(false));
                o.insert("sliding_window".into(), Value::Null);
                o.insert("max_window_layers".into(), json!(self.num_hidden_layers));
            }
        }
        v
    }

    /// Parses a Hugging Face `config.json` of a Llama (`LlamaForCausalLM`) or Qwen2
    /// (`Qwen2ForCausalLM`) model, applying transformers' defaults for absent fields.
    pub fn from_hf_config(v: &Value) -> anyhow::Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .context("config.json has no model_type")?;
        let architecture = match model_type {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => bail!("unsupported model_type {other:?} (supported: llama, qwen2)"),
        };
        let u = |k: &str| -> anyhow::Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .with_context(|| format!("config.json: missing or bad {k}"))
        };
        let opt_u = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let opt_f = |k: &str| v.get(k).and_then(Value::as_f64);
        let opt_b = |k: &str| v.get(k).and_then(Value::as_bool);
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            anyhow::ensure!(act == "silu", "unsupported hidden_act {act:?} (only silu)");
        }
        let heads = u("num_attention_heads")?;
        let hidden = u("hidden_size")?;
        if let Some(hd) = opt_u("head_dim") {
            anyhow::ensure!(
                hd * heads == hidden,
                "head_dim {hd} != hidden_size / num_attention_heads is not supported"
            );
        }
        let qkv_bias = match architecture {
            Architecture::Qwen2 => true,
            Architecture::Llama => {
                anyhow::ensure!(
                    !opt_b("attention_bias").unwrap_or(false)
                        && !opt_b("mlp_bias").unwrap_or(false),
                    "Llama attention_bias / mlp_bias are not supported"
                );
                false
            }
        };
        if architecture == Architecture::Qwen2 && opt_b("use_sliding_window").unwrap_or(false) {
            bail!("Qwen2 use_sliding_window=true is not supported");
        }
        // transformers 5 moves rope_theta/rope_scaling into `rope_parameters`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = opt_f("rope_theta")
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
        let scaling_v = v
            .get("rope_scaling")
            .filter(|s| s.is_object())
            .or(rope_params);
        let rope_scaling = match scaling_v {
            None => None,
            Some(s) => {
                let r: RopeScaling = serde_json::from_value(s.clone())
                    .with_context(|| format!("config.json: bad rope scaling {s}"))?;
                match r.rope_type.as_str() {
                    "default" => None,
                    "linear" => Some(r),
                    "llama3" => {
                        anyhow::ensure!(
                            r.low_freq_factor.is_some()
                                && r.high_freq_factor.is_some()
                                && r.original_max_position_embeddings.is_some(),
                            "llama3 rope scaling needs low/high_freq_factor and original_max_position_embeddings"
                        );
                        Some(r)
                    }
                    other => {
                        bail!("unsupported rope scaling type {other:?} (default, linear, llama3)")
                    }
                }
            }
        };
        let cfg = ModelConfig {
            vocab_size: u("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: u("intermediate_size")?,
            num_hidden_layers: u("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: opt_u("num_key_value_heads").unwrap_or(heads),
            rms_norm_eps: opt_f("rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: opt_u("max_position_embeddings").unwrap_or(
                match architecture {
                    Architecture::Llama => 2048,
                    Architecture::Qwen2 => 32768,
                },
            ),
            tie_word_embeddings: opt_b("tie_word_embeddings").unwrap_or(false),
            architecture,
            qkv_bias,
            rope_scaling,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rotary inverse frequencies `[head_dim / 2]`, computed in f32 exactly like
    /// transformers (`1 / theta^(2i/d)`, then `linear` or `llama3` scaling).
    pub fn rope_inv_freqs(&self) -> Vec<f32> {
        let dim = self.head_dim();
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        let Some(r) = &self.rope_scaling else {
            return inv;
        };
        let factor = r.factor as f32;
        match r.rope_type.as_str() {
            "linear" => inv.iter().map(|x| x / factor).collect(),
            "llama3" => {
                let low = r.low_freq_factor.unwrap_or(1.0) as f32;
                let high = r.high_freq_factor.unwrap_or(4.0) as f32;
                let old = r.original_max_position_embeddings.unwrap_or(8192) as f32;
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                inv.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // wavelen is finite (inv > 0), so this is HF's `~(w < high) & ~(w > low)`.
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
            _ => inv,
        }
    }

    /// The expected parameter tensor names and shapes, HF naming, in a stable order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.hidden_size;
        let hd = self.head_dim();
        let kv = self.num_key_value_heads * hd;
        let i = self.intermediate_size;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, d],
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![d, d]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
            if self.qkv_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![d]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, d]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, d]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, d]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![d, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, d]));
        }
        out
    }
}
