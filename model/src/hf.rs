//! The description files of a Hugging Face checkpoint directory: `config.json`,
//! `tokenizer.json`, `tokenizer_config.json` (chat template, special tokens),
//! `chat_template.jinja` / `chat_template.json` and `generation_config.json`, for the Llama
//! and Qwen2 architectures. The tensors (`*.safetensors`) are read by `hindsight-policy`.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::template::SpecialTokens;
use crate::tokenizer::ChatTokenizer;

/// True if `dir` looks like a Hugging Face checkpoint (has `config.json`).
pub fn is_hf_dir(dir: &Path) -> bool {
    dir.is_dir() && dir.join("config.json").is_file()
}

/// A JSON file, with its path in the error.
pub fn read_json(path: &Path) -> anyhow::Result<Value> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))
}

/// [`read_json`] of a file that may be absent.
pub fn read_json_opt(path: &Path) -> anyhow::Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// The model config of a checkpoint directory.
pub fn config_from_hf_dir(dir: &Path) -> anyhow::Result<ModelConfig> {
    let v = read_json(&dir.join("config.json"))?;
    ModelConfig::from_hf_config(&v).with_context(|| format!("{}/config.json", dir.display()))
}

/// A `tokenizer_config.json` special token: a string or `{"content": ...}`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// `eos_token_id` as a number or a list.
fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

/// The chat tokenizer of a checkpoint directory: `tokenizer.json`, the chat
/// template (`tokenizer_config.json`'s `chat_template`, else `chat_template.jinja`
/// / `chat_template.json`), special tokens, and stop ids (eos plus the eos ids of
/// `generation_config.json` and `config.json`).
pub fn tokenizer_from_hf_dir(dir: &Path) -> anyhow::Result<ChatTokenizer> {
    let tj = dir.join("tokenizer.json");
    let s = std::fs::read_to_string(&tj).with_context(|| format!("reading {}", tj.display()))?;
    let tok: Tokenizer = s
        .parse()
        .map_err(|e| anyhow::anyhow!("parsing {}: {e}", tj.display()))?;
    let tc = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(json!({}));
    let mut template = match tc.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => {
            let pick = list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first());
            pick.and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(String::from)
        }
        _ => None,
    };
    if template.is_none() {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            template = Some(std::fs::read_to_string(&jinja)?);
        } else if let Some(v) = read_json_opt(&dir.join("chat_template.json"))? {
            template = v
                .get("chat_template")
                .and_then(Value::as_str)
                .map(String::from);
        }
    }
    let special = SpecialTokens {
        bos: token_str(tc.get("bos_token")),
        eos: token_str(tc.get("eos_token")),
        pad: token_str(tc.get("pad_token")),
        unk: token_str(tc.get("unk_token")),
    };
    let model_max_length = tc
        .get("model_max_length")
        .and_then(Value::as_f64)
        .filter(|x| *x >= 1.0 && *x < 1e15)
        .map(|x| x as usize);
    let mut extra = vec![];
    if let Some(g) = read_json_opt(&dir.join("generation_config.json"))? {
        extra.extend(id_list(g.get("eos_token_id")));
    }
    if let Some(c) = read_json_opt(&dir.join("config.json"))? {
        extra.extend(id_list(c.get("eos_token_id")));
    }
    ChatTokenizer::with_special_tokens(tok, template, special, &extra, model_max_length)
}

/// Refuses a directory that is not a checkpoint (no `config.json` or `tokenizer.json`).
pub fn ensure_hf_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.join("config.json").is_file() {
        bail!("{} has no config.json", dir.display());
    }
    if !dir.join("tokenizer.json").is_file() {
        bail!("{} has no tokenizer.json", dir.display());
    }
    Ok(())
}
