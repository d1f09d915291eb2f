//! Model hyper-parameters (`ModelConfig`), serialised with the field names of a
//! Hugging Face Llama `config.json`, plus helpers derived from them.

use serde::{Deserialize, Serialize};

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

    /// HF-style `config.json` (adds `architectures`/`model_type` so HF tools accept it).
    pub fn to_hf_json(&self) -> anyhow::Result<String> {
        let mut v = serde_json::to_value(self)?;
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "architectures".into(),
                serde_json::json!(["LlamaForCausalLM"]),
            );
            o.insert("model_type".into(), serde_json::json!("llama"));
            o.insert("hidden_act".into(), serde_json::json!("silu"));
            o.insert("torch_dtype".into(), serde_json::json!("float32"));
        }
        Ok(serde_json::to_string_pretty(&v)?)
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
