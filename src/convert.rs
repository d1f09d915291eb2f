//! `hindsight convert`: writes a model we can load (a GGUF file, `smollm2`, a tiny
//! test model, or a checkpoint directory) as a Hugging Face checkpoint directory
//! (`model.safetensors`, `config.json`, tokenizer files, `generation_config.json`)
//! that transformers and other tools load. The hidden `--dump-logits FILE` mode
//! writes the model's logits for chat prompts instead (`bench/compare_logits.py`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use hindsight_policy::{Device, Sampler, SaveDtype, SaveOptions, Tensor};
use hindsight_training::TrainableModel;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Model to convert: a .gguf path, "smollm2", "tiny[-qwen2|-llama3][:SEED]" or a
    /// Hugging Face checkpoint directory.
    #[arg(long)]
    pub input: String,
    /// Output checkpoint directory (created if needed).
    #[arg(long, required_unless_present = "dump_logits")]
    pub output: Option<PathBuf>,
    /// Storage dtype of the written safetensors: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Number of safetensors shards (more than 1 adds model.safetensors.index.json).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Cache directory for "smollm2" (default: $HINDSIGHT_CACHE or ~/.cache/hindsight).
    #[arg(long, env = "HINDSIGHT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Instead of converting: write the logits of each --prompt (rendered with the
    /// chat template) to this safetensors file (`logits.I`, `train_logits.I`, `ids.I`)
    /// and print the rendered prompts and token ids as JSON.
    #[arg(long, hide = true)]
    pub dump_logits: Option<PathBuf>,
    /// A user message for --dump-logits (repeatable).
    #[arg(long, hide = true)]
    pub prompt: Vec<String>,
    /// With --dump-logits: use the text as is instead of rendering the chat template.
    #[arg(long, hide = true)]
    pub raw: bool,
}

/// Runs the subcommand (blocking).
pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(hindsight_policy::default_cache_dir);
    let dev = Device::Cpu;
    let m = hindsight_policy::load(&args.input, &cache, &dev)
        .with_context(|| format!("loading {}", args.input))?;
    if let Some(path) = &args.dump_logits {
        anyhow::ensure!(
            !args.prompt.is_empty(),
            "--dump-logits needs at least one --prompt"
        );
        let sampler = Sampler::new(&m.config, &m.weights, &[], &dev)?;
        let trainer = TrainableModel::new(&m.config, &m.weights, &dev)?;
        let mut tensors = BTreeMap::new();
        let mut report = Vec::new();
        for (i, p) in args.prompt.iter().enumerate() {
            let text = if args.raw {
                p.clone()
            } else {
                m.tokenizer.chat_prompt(p)
            };
            let ids = m.tokenizer.encode(&text)?;
            tensors.insert(format!("logits.{i}"), sampler.logits(&ids)?);
            tensors.insert(format!("train_logits.{i}"), trainer.logits(&ids)?);
            let ids64: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
            tensors.insert(format!("ids.{i}"), Tensor::new(ids64, &dev)?);
            report.push(serde_json::json!({"prompt": p, "text": text, "ids": ids}));
        }
        hindsight_policy::save_tensors(path, &tensors)?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let out = args.output.context("--output is required")?;
    let dtype = match args.dtype.as_str() {
        "f32" | "float32" => SaveDtype::F32,
        "bf16" | "bfloat16" => SaveDtype::Bf16,
        "f16" | "float16" => SaveDtype::F16,
        other => anyhow::bail!("unknown --dtype {other:?} (f32, bf16, f16)"),
    };
    let opts = SaveOptions {
        dtype,
        shards: args.shards,
    };
    hindsight_policy::save_hf_checkpoint_with(&out, &m.config, &m.weights, &m.tokenizer, &opts)?;
    tracing::info!(
        model = %m.name,
        params = m.weights.num_parameters(),
        "wrote Hugging Face checkpoint to {}",
        out.display()
    );
    println!("{}", out.display());
    Ok(())
}
