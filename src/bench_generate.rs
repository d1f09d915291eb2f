//! `hindsight bench generate`: aggregate generation throughput of our sampler next to
//! llama.cpp (llama-cpp-python on the same GGUF) and PyTorch + transformers `generate`
//! (the same model as an f32 Hugging Face checkpoint), in one run on one machine.
//!
//! Every side gets the same prompt token ids (chat-templated instructions), samples at
//! temperature 1 over the full vocabulary and makes exactly `--new-tokens` tokens per
//! sequence (stop tokens ignored), so the work is identical; the time covers prefill,
//! decode and sampling. Ours also computes each token's log-prob and entropy.

use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result};
use hindsight_policy::{Device, Precision, Sampler, SamplingParams};
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct BenchGenerateArgs {
    /// Model: `smollm2` (default; llama.cpp runs its GGUF, PyTorch an f32 HF conversion).
    #[arg(long, env = "HINDSIGHT_BENCH_MODEL", default_value = "smollm2")]
    pub model: String,
    /// Batch sizes (sequences generated together).
    #[arg(
        long,
        env = "HINDSIGHT_BENCH_BATCH_SIZES",
        value_delimiter = ',',
        default_value = "1,8,32"
    )]
    pub batch_sizes: Vec<usize>,
    /// New tokens per sequence.
    #[arg(long, env = "HINDSIGHT_BENCH_NEW_TOKENS", default_value_t = 128)]
    pub new_tokens: usize,
    /// Our weight precisions to measure (f32, bf16; default both on the CPU, f32 on a GPU,
    /// where generation runs in f32 only).
    #[arg(long, env = "HINDSIGHT_BENCH_PRECISIONS", value_delimiter = ',')]
    pub precisions: Vec<Precision>,
    /// Peers to run next to ours (llama.cpp, torch).
    #[arg(
        long,
        env = "HINDSIGHT_BENCH_PEERS",
        value_delimiter = ',',
        default_value = "llama.cpp,torch"
    )]
    pub peers: Vec<String>,
    /// Skip the peers.
    #[arg(long, env = "HINDSIGHT_BENCH_NO_PEER")]
    pub no_peer: bool,
    /// Python with llama-cpp-python, torch and transformers (see bench/README.md).
    #[arg(
        long,
        env = "HINDSIGHT_BENCH_PYTHON",
        default_value = "bench/.venv/bin/python"
    )]
    pub python: PathBuf,
    /// Timed runs per configuration after one warm-up run (the best is reported).
    #[arg(long, env = "HINDSIGHT_BENCH_REPEATS", default_value_t = 1)]
    pub repeats: usize,
    /// Write `generate.json` with every figure here.
    #[arg(long, env = "HINDSIGHT_BENCH_OUT")]
    pub out: Option<PathBuf>,
    /// Model cache directory.
    #[arg(long, env = "HINDSIGHT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Device for ours: `cpu` or `cuda` (needs a `--features cuda` build).
    #[arg(long, env = "HINDSIGHT_BENCH_DEVICE", default_value = "cpu")]
    pub device: String,
}

const PROMPTS: &[&str] = &[
    "Write a short story about a lighthouse keeper. Do not use any commas.",
    "Explain photosynthesis to a child in at least 100 words.",
    "List five tips for learning a new language, in markdown bullet points.",
    "Write a haiku about rain and then explain it in one paragraph.",
    "Describe your ideal weekend. Your answer must be in all lowercase letters.",
    "Give three reasons why the sky is blue. End your answer with 'Is there anything else?'",
    "Write a limerick about a cat who likes to code.",
    "Summarize the plot of a heist movie you invent, in exactly three sentences.",
];

/// Runs the benchmark.
pub fn run(args: BenchGenerateArgs) -> Result<()> {
    anyhow::ensure!(
        !args.batch_sizes.is_empty() && args.batch_sizes.iter().all(|&b| b > 0),
        "--batch-sizes must be positive"
    );
    anyhow::ensure!(args.new_tokens > 0, "--new-tokens must be positive");
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(hindsight_policy::default_cache_dir);
    let device = hindsight_policy::parse_device(&args.device)?;
    let precisions = if !args.precisions.is_empty() {
        args.precisions.clone()
    } else if device.is_cpu() {
        vec![Precision::F32, Precision::Bf16]
    } else {
        vec![Precision::F32]
    };
    let threads = rayon::current_num_threads();
    let m = hindsight_policy::load(&args.model, &cache, &Device::Cpu)
        .with_context(|| format!("loading {}", args.model))?;
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| m.tokenizer.encode(&m.tokenizer.chat_prompt(p)))
        .collect::<Result<_>>()?;
    let plen: Vec<usize> = prompts.iter().map(Vec::len).collect();
    println!(
        "model {} ({} parameters), {} prompts of {}..{} tokens, {} new tokens each, {} threads, device {}",
        m.name,
        m.weights.num_parameters(),
        prompts.len(),
        plen.iter().min().unwrap(),
        plen.iter().max().unwrap(),
        args.new_tokens,
        threads,
        args.device
    );

    // Ours.
    let mut ours: Vec<Value> = Vec::new();
    for &prec in &precisions {
        let mut s = Sampler::with_precision(&m.config, &m.weights, &[], &device, prec)?;
        for &b in &args.batch_sizes {
            s.set_max_batch(b);
            let batch: Vec<Vec<u32>> = (0..b).map(|i| prompts[i % prompts.len()].clone()).collect();
            let params = SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                max_new_tokens: args.new_tokens,
                seed: 0,
            };
            let mut best = f64::INFINITY;
            let mut tokens = 0;
            for rep in 0..=args.repeats {
                let t0 = Instant::now();
                let gens = s.generate(&batch, &params)?;
                let dt = t0.elapsed().as_secs_f64();
                tokens = gens.iter().map(|g| g.token_ids.len()).sum::<usize>();
                if rep > 0 || args.repeats == 0 {
                    best = best.min(dt);
                }
            }
            let row = json!({"side": "hindsight", "weights": prec.to_string(), "batch": b,
                "seconds": best, "tokens": tokens, "tok_per_s": tokens as f64 / best});
            println!(
                "  hindsight {:<5} batch {:>3}: {:>8.1} tok/s ({} tokens in {:.2}s)",
                prec,
                b,
                tokens as f64 / best,
                tokens,
                best
            );
            ours.push(row);
        }
    }

    // Peers.
    let mut peers: Vec<Value> = Vec::new();
    let mut peer_list = args.peers.clone();
    if args.device != "cpu" && peer_list.iter().any(|p| p == "llama.cpp") {
        println!(
            "  (llama.cpp left out on {}: llama-cpp-python from PyPI is a CPU build)",
            args.device
        );
        peer_list.retain(|p| p != "llama.cpp");
    }
    if !args.no_peer && !peer_list.is_empty() {
        let gguf = if args.model == "smollm2" {
            Some(hindsight_policy::fetch_smollm2(&cache)?)
        } else if args.model.ends_with(".gguf") {
            Some(PathBuf::from(&args.model))
        } else {
            None
        };
        let hf_dir = crate::bench::hf_dir_for(&args.model, &cache)?;
        let job_path = std::env::temp_dir().join(format!(
            "hindsight-bench-generate-{}.json",
            std::process::id()
        ));
        let job = json!({
            "gguf": gguf.as_ref().map(|p| p.display().to_string()),
            "hf_dir": hf_dir.display().to_string(),
            "threads": threads,
            "new_tokens": args.new_tokens,
            "batch_sizes": args.batch_sizes,
            "prompts": prompts,
            "peers": peer_list,
            "device": args.device,
            "seed": 0,
            "repeats": args.repeats.max(1),
        });
        std::fs::write(&job_path, serde_json::to_vec(&job)?)?;
        let script = crate::bench::script_path("peer_generate.py")?;
        let mut child = Command::new(&args.python)
            .arg(&script)
            .arg(&job_path)
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("MKL_NUM_THREADS", threads.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (make the venv as in bench/README.md, or pass --python / --no-peer)",
                    args.python.display()
                )
            })?;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line?;
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(e) = v.get("error") {
                println!("  {:<15}: error: {}", v["peer"].as_str().unwrap_or("?"), e);
            } else {
                println!(
                    "  {:<15} batch {:>3}: {:>8.1} tok/s ({} tokens in {:.2}s)",
                    v["peer"].as_str().unwrap_or("?"),
                    v["batch"],
                    v["tok_per_s"].as_f64().unwrap_or(0.0),
                    v["tokens"],
                    v["seconds"].as_f64().unwrap_or(0.0)
                );
            }
            let _ = std::io::stdout().flush();
            peers.push(v);
        }
        let status = child.wait()?;
        let _ = std::fs::remove_file(&job_path);
        anyhow::ensure!(status.success(), "the peer script failed ({status})");
    }

    // Side by side.
    println!();
    let mut header = format!("{:<6}", "batch");
    for p in &precisions {
        header += &format!(" {:>14}", format!("ours {p}"));
    }
    let peer_names: Vec<&str> = if args.no_peer {
        vec![]
    } else {
        peer_list.iter().map(String::as_str).collect()
    };
    for p in &peer_names {
        header += &format!(" {:>12}", p);
    }
    for p in &peer_names {
        header += &format!(" {:>16}", format!("best ours / {p}"));
    }
    println!("{header}   (aggregate generated tokens/s)");
    let rate = |rows: &[Value], key: &str, val: &str, b: usize| -> Option<f64> {
        rows.iter()
            .find(|r| r[key].as_str() == Some(val) && r["batch"].as_u64() == Some(b as u64))
            .and_then(|r| r["tok_per_s"].as_f64())
    };
    let mut ratios = Vec::new();
    for &b in &args.batch_sizes {
        let mut line = format!("{b:<6}");
        let mut best_ours: f64 = 0.0;
        for p in &precisions {
            let r = rate(&ours, "weights", &p.to_string(), b);
            best_ours = best_ours.max(r.unwrap_or(0.0));
            line += &format!(" {:>14}", r.map_or("-".into(), |v| format!("{v:.1}")));
        }
        for p in &peer_names {
            let r = rate(&peers, "peer", p, b);
            line += &format!(" {:>12}", r.map_or("-".into(), |v| format!("{v:.1}")));
        }
        for p in &peer_names {
            let r = rate(&peers, "peer", p, b).map(|v| best_ours / v);
            if let Some(x) = r {
                ratios.push(json!({"batch": b, "peer": p, "ours_over_peer": x}));
            }
            line += &format!(" {:>16}", r.map_or("-".into(), |v| format!("{v:.2}x")));
        }
        println!("{line}");
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("generate.json");
        let doc = json!({
            "model": m.name, "threads": threads, "new_tokens": args.new_tokens,
            "prompt_tokens": plen, "device": args.device,
            "ours": ours, "peers": peers, "ratios": ratios,
            "load_average": crate::bench::load_average(),
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
