//! Hugging Face checkpoints' tensors: loading `*.safetensors` (single file or sharded via
//! `model.safetensors.index.json`; f32/bf16/f16/f64, converted to f32), and writing a whole
//! checkpoint ([`save_hf_checkpoint`]) that transformers and other tools load as is. The
//! description files (config, tokenizer, template) are read by [`hindsight_model::hf`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};
use hindsight_model::hf::read_json_opt;
use hindsight_model::{ChatTokenizer, ModelConfig, SpecialTokenIds};
use serde_json::{json, Value};

use crate::weights::{safetensors_to_file, view_to_f32, SaveView, Weights};

/// Storage dtype of the written safetensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SaveDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Options of [`save_hf_checkpoint_with`].
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    pub dtype: SaveDtype,
    /// Number of safetensors shards (0 or 1 = a single `model.safetensors`).
    pub shards: usize,
}

/// The safetensors files of a checkpoint: the shards named by
/// `model.safetensors.index.json`, else `model.safetensors`, else every `*.safetensors`.
fn safetensors_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if let Some(idx) = read_json_opt(&dir.join("model.safetensors.index.json"))? {
        let map = idx
            .get("weight_map")
            .and_then(Value::as_object)
            .context("model.safetensors.index.json has no weight_map")?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        anyhow::ensure!(!files.is_empty(), "empty weight_map");
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no *.safetensors in {}", dir.display());
    Ok(files)
}

/// Loads the weights a `config` needs (f32, on `device`) from the checkpoint's
/// safetensors; extra tensors (e.g. a tied `lm_head.weight`) are ignored.
pub fn weights_from_hf_dir(
    dir: &Path,
    config: &ModelConfig,
    device: &Device,
) -> anyhow::Result<Weights> {
    let wanted: BTreeMap<String, Vec<usize>> = config.parameter_shapes().into_iter().collect();
    let mut tensors = BTreeMap::new();
    for file in safetensors_files(dir)? {
        let f =
            std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
        // SAFETY: the file is only read; a concurrent writer would be a user error.
        let mm = unsafe { memmap2::Mmap::map(&f) }
            .with_context(|| format!("mapping {}", file.display()))?;
        let st = safetensors::SafeTensors::deserialize(&mm)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        for (name, view) in st.tensors() {
            let Some(shape) = wanted.get(&name) else {
                continue;
            };
            anyhow::ensure!(
                view.shape() == shape.as_slice(),
                "tensor {name}: shape {:?}, expected {shape:?}",
                view.shape()
            );
            let data = view_to_f32(&name, &view)?;
            let t = Tensor::from_vec(data, view.shape(), device)?;
            tensors.insert(name, t);
        }
    }
    let weights = Weights { tensors };
    weights
        .validate(config)
        .with_context(|| format!("weights in {}", dir.display()))?;
    Ok(weights)
}

/// The temporary name `path` is written under before it is renamed into place.
fn tmp_path(path: &Path) -> std::path::PathBuf {
    path.with_extension(format!(
        "{}.tmp-{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ))
}

/// Writes `bytes` to `path` via a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Writes a Hugging Face checkpoint into `dir` (created if needed): f32
/// `model.safetensors` with HF names (q/k in HF layout), `config.json`,
/// `tokenizer.json`, `tokenizer_config.json` (chat template, special tokens,
/// `model_max_length`) and `generation_config.json`. transformers'
/// `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(dir)` load it, and so
/// does [`crate::load()`].
pub fn save_hf_checkpoint(
    dir: &Path,
    config: &ModelConfig,
    weights: &Weights,
    tokenizer: &ChatTokenizer,
) -> anyhow::Result<()> {
    save_hf_checkpoint_with(dir, config, weights, tokenizer, &SaveOptions::default())
}

/// [`save_hf_checkpoint`] with a storage dtype and optional sharding (with
/// `model.safetensors.index.json`).
pub fn save_hf_checkpoint_with(
    dir: &Path,
    config: &ModelConfig,
    weights: &Weights,
    tokenizer: &ChatTokenizer,
    opts: &SaveOptions,
) -> anyhow::Result<()> {
    config.validate()?;
    weights.validate(config)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let names: Vec<(String, Vec<usize>)> = config.parameter_shapes();
    let shards = opts.shards.max(1).min(names.len());
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    let per = names.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (si, chunk) in names.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, shards)
        };
        let stored = match opts.dtype {
            SaveDtype::F32 => safetensors::Dtype::F32,
            SaveDtype::Bf16 => safetensors::Dtype::BF16,
            SaveDtype::F16 => safetensors::Dtype::F16,
        };
        let mut views = Vec::with_capacity(chunk.len());
        for (n, shape) in chunk {
            let t = weights.get(n)?; // shapes checked by `validate` above
            total += shape.iter().product::<usize>() * stored.bitsize() / 8;
            weight_map.insert(n.clone(), json!(file));
            views.push((n.clone(), SaveView::Tensor(t.clone(), stored)));
        }
        // Streamed to a temporary file (one tensor in memory at a time), then renamed.
        let path = dir.join(&file);
        let tmp = tmp_path(&path);
        safetensors_to_file(views, Some(meta.clone()), &tmp)?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("renaming into {}", path.display()))?;
    }
    if shards > 1 {
        let idx = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(
            &dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&idx)?.as_bytes(),
        )?;
    } else {
        let _ = std::fs::remove_file(dir.join("model.safetensors.index.json"));
    }
    let sp = tokenizer.special_tokens();
    let mut eos: Vec<u32> = tokenizer
        .special_tokens()
        .eos
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
        .into_iter()
        .collect();
    for &s in tokenizer.stop_token_ids() {
        if !eos.contains(&s) {
            eos.push(s);
        }
    }
    let ids = SpecialTokenIds {
        bos: tokenizer.bos_token_id(),
        eos: eos.clone(),
        pad: tokenizer.pad_token_id(),
    };
    let mut cfg = config.to_hf_config(&ids);
    let torch_dtype = match opts.dtype {
        SaveDtype::F32 => "float32",
        SaveDtype::Bf16 => "bfloat16",
        SaveDtype::F16 => "float16",
    };
    cfg["torch_dtype"] = json!(torch_dtype);
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    let gen = json!({
        "bos_token_id": ids.bos,
        "eos_token_id": if eos.len() == 1 { json!(eos[0]) } else { json!(eos) },
        "pad_token_id": ids.pad,
    });
    write_atomic(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)?.as_bytes(),
    )?;
    let tj = tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serialising tokenizer: {e}"))?;
    write_atomic(&dir.join("tokenizer.json"), tj.as_bytes())?;
    let mut tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "model_max_length": tokenizer.model_max_length().unwrap_or(config.max_position_embeddings),
    });
    let o = tc.as_object_mut().expect("object");
    for (k, v) in [
        ("bos_token", &sp.bos),
        ("eos_token", &sp.eos),
        ("pad_token", &sp.pad),
        ("unk_token", &sp.unk),
    ] {
        o.insert(
            k.into(),
            v.as_ref().map(|s| json!(s)).unwrap_or(Value::Null),
        );
    }
    if let Some(t) = tokenizer.chat_template() {
        o.insert("chat_template".into(), json!(t));
    }
    write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?.as_bytes(),
    )?;
    Ok(())
}

/// Writes named tensors (any dtype candle supports) to a safetensors file.
pub fn save_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("writing {}", path.display()))
}
