//! `hindsight bench train`: learner step time and peak memory next to PyTorch +
//! transformers, in one command, on the same machine.
//!
//! For each batch shape `BxT` both sides take the same SmolLM2 checkpoint in f32 (ours
//! converted once to a Hugging Face directory with the `convert` code path, which both
//! sides then load), the same random token ids `[B, T+1]` and advantages `[B, T]` (fixed
//! seed), and time `--warmup` + `--steps` steps of: forward over `ids[:, :T]`, loss
//! `-(sum over all B*T positions of logp(target) * advantage) / (B*T)`, backward, AdamW
//! (lr 1e-6, weight decay 0.01 on >= 2-D parameters). Each side runs in its own process
//! (ours: this binary with the hidden `--worker` flag), so that the peak resident sets are
//! comparable: `ru_maxrss` of the whole process, and the peak after the model is loaded
//! (VmHWM after `/proc/self/clear_refs`). Medians are reported.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hindsight_policy::Tensor;
use hindsight_training::{AdamW, TrainableModel};
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct BenchTrainArgs {
    /// Device for both sides: `cpu`, or `cuda` / `cuda:N` (ours needs a `--features cuda`
    /// build; on CUDA ours uses candle's differentiable primitives, not the fused CPU ops).
    #[arg(long, env = "HINDSIGHT_BENCH_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Model: "smollm2", a .gguf file or a Hugging Face checkpoint directory.
    #[arg(long, env = "HINDSIGHT_BENCH_MODEL", default_value = "smollm2")]
    pub model: String,
    /// Batch shapes BxT (sequences x tokens), comma separated.
    #[arg(
        long,
        env = "HINDSIGHT_BENCH_SHAPES",
        value_delimiter = ',',
        default_value = "4x256,8x128"
    )]
    pub shapes: Vec<String>,
    /// Timed steps per shape (the median is reported).
    #[arg(long, env = "HINDSIGHT_BENCH_STEPS", default_value_t = 5)]
    pub steps: usize,
    /// Untimed warm-up steps per shape.
    #[arg(long, env = "HINDSIGHT_BENCH_WARMUP", default_value_t = 1)]
    pub warmup: usize,
    /// Compute threads of each side (RAYON_NUM_THREADS for ours, torch.set_num_threads).
    #[arg(long, env = "HINDSIGHT_BENCH_THREADS", default_value_t = 2)]
    pub threads: usize,
    /// AdamW learning rate.
    #[arg(long, env = "HINDSIGHT_BENCH_LR", default_value_t = 1e-6)]
    pub lr: f64,
    /// AdamW weight decay.
    #[arg(long, env = "HINDSIGHT_BENCH_WEIGHT_DECAY", default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Seed of the random token ids and advantages.
    #[arg(long, env = "HINDSIGHT_BENCH_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Python with torch + transformers for the peer.
    #[arg(
        long,
        env = "HINDSIGHT_BENCH_PYTHON",
        default_value = "bench/.venv/bin/python"
    )]
    pub python: PathBuf,
    /// The peer script.
    #[arg(
        long,
        env = "HINDSIGHT_BENCH_PEER_SCRIPT",
        default_value = "bench/peer_train.py"
    )]
    pub peer_script: PathBuf,
    /// transformers attention implementation of the peer: sdpa (its default) or eager.
    #[arg(long, env = "HINDSIGHT_BENCH_PEER_ATTN", default_value = "sdpa")]
    pub peer_attn: String,
    /// Skip the PyTorch side.
    #[arg(long, env = "HINDSIGHT_BENCH_NO_PEER")]
    pub no_peer: bool,
    /// Our training pass: "whole" (the hand-written whole-model pass, the learner's
    /// default on the CPU) or "primitive" (candle autograd over candle primitives only, what
    /// the learner runs off the CPU).
    #[arg(long, env = "HINDSIGHT_BENCH_OPS", default_value = "whole")]
    pub ops: String,
    /// Output directory: the converted checkpoint, the jobs and `train.json`.
    #[arg(long, env = "HINDSIGHT_BENCH_OUT", default_value = "bench/out/train")]
    pub out: PathBuf,
    /// Cache directory for "smollm2" (default: $HINDSIGHT_CACHE or ~/.cache/hindsight).
    #[arg(long, env = "HINDSIGHT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Internal: run our measured side on the job file given, print JSON and exit.
    #[arg(long, hide = true)]
    pub worker: Option<PathBuf>,
}

/// Parses "4x256" into (4, 256).
fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (b, t) = s
        .trim()
        .split_once(['x', 'X'])
        .with_context(|| format!("shape {s:?} is not BxT"))?;
    let (b, t): (usize, usize) = (b.parse()?, t.parse()?);
    anyhow::ensure!(b > 0 && t > 0, "shape {s:?} must be positive");
    Ok((b, t))
}

/// splitmix64: a fixed, portable stream for the shared inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

fn status_kb(field: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
}

fn max_rss_mb() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) == 0 {
            ru.ru_maxrss as f64 / 1024.0
        } else {
            f64::NAN
        }
    }
}

/// Our measured side (in the worker process).
fn worker(job_path: &Path) -> Result<()> {
    let job: Value = serde_json::from_slice(&std::fs::read(job_path)?)?;
    let dev = hindsight_policy::parse_device(job["device"].as_str().unwrap_or("cpu"))?;
    let ckpt = job["checkpoint"].as_str().context("job: checkpoint")?;
    let m = hindsight_policy::load(ckpt, Path::new(ckpt), &dev)?;
    let mut model = TrainableModel::new(&m.config, &m.weights, &dev)?;
    drop(m);
    match job["ops"].as_str() {
        Some("primitive") => model.set_whole(false),
        Some("whole") | None => {}
        Some(o) => bail!("unknown ops {o:?} (whole, primitive)"),
    }
    let ids: Vec<Vec<u32>> = serde_json::from_value(job["ids"].clone())?;
    let adv: Vec<Vec<f32>> = serde_json::from_value(job["advantages"].clone())?;
    let (b, t) = (ids.len(), adv[0].len());
    // Prompt = the first token, response = the next T: the input is ids[:, :T] and every
    // one of the B*T positions is scored, as in the peer.
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = ids
        .iter()
        .map(|r| (r[..1].to_vec(), r[1..].to_vec()))
        .collect();
    let adv_t = Tensor::from_vec(adv.concat(), (b, t), &dev)?;
    let mut opt = AdamW::new(
        model.vars(),
        job["lr"].as_f64().unwrap_or(1e-6),
        job["weight_decay"].as_f64().unwrap_or(0.01),
    );
    let rss_loaded = status_kb("VmRSS").unwrap_or(0.0) / 1024.0;
    let reset_ok = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let warmup = job["warmup"].as_u64().unwrap_or(1) as usize;
    let steps = job["steps"].as_u64().unwrap_or(5) as usize;
    let (mut step_s, mut fwd_s, mut bwd_s, mut opt_s, mut losses) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let fw = model.forward_train(&pairs, 1.0)?;
        let loss = ((&fw.logp * &adv_t)?.sum_all()? * (-1.0 / (b * t) as f64))?;
        let loss_v = loss.to_scalar::<f32>()?;
        let t1 = t0.elapsed().as_secs_f64();
        let mut grads = loss.backward()?;
        drop(loss);
        let param_grads = fw.param_grads(&model, &grads)?;
        for (g, (_, v)) in param_grads.into_iter().zip(model.vars()) {
            if let Some(g) = g {
                grads.insert(v.as_tensor(), g);
            }
        }
        let t2 = t0.elapsed().as_secs_f64();
        opt.step(&grads, model.vars(), 1.0)?;
        drop(grads);
        let t3 = t0.elapsed().as_secs_f64();
        if i >= warmup {
            step_s.push(t3);
            fwd_s.push(t1);
            bwd_s.push(t2 - t1);
            opt_s.push(t3 - t2);
            losses.push(loss_v as f64);
        }
    }
    let out = json!({
        "side": "ours",
        "ops": if model.is_whole() { "whole" } else { "primitive" },
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
        "step_s": step_s,
        "fwd_s": fwd_s,
        "bwd_s": bwd_s,
        "opt_s": opt_s,
        "bwd_opt_s": bwd_s.iter().zip(&opt_s).map(|(a, b)| a + b).collect::<Vec<_>>(),
        "loss": losses,
        "peak_rss_mb": max_rss_mb(),
        "rss_after_load_mb": rss_loaded,
        "train_peak_rss_mb": if reset_ok { status_kb("VmHWM").map(|k| k / 1024.0) } else { None },
    });
    println!("{out}");
    Ok(())
}

/// Runs `cmd`, returning the last stdout line parsed as JSON.
fn run_json(mut cmd: Command, what: &str) -> Result<Value> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{what} printed no JSON: {stdout}"))?;
    Ok(serde_json::from_str(line)?)
}

fn med(v: &Value, key: &str) -> f64 {
    let xs: Vec<f64> = v[key]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    median(&xs)
}

/// Runs the benchmark.
pub fn run(args: BenchTrainArgs) -> Result<()> {
    if let Some(job) = &args.worker {
        return worker(job);
    }
    anyhow::ensure!(args.steps > 0, "--steps must be positive");
    anyhow::ensure!(args.threads > 0, "--threads must be positive");
    let shapes: Vec<(usize, usize)> = args
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let out_dir = args.out.canonicalize()?;

    // One f32 Hugging Face checkpoint that both sides load.
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(hindsight_policy::default_cache_dir);
    let ckpt = crate::bench::hf_dir_for(&args.model, &cache)?;
    let config = hindsight_policy::config_from_hf_dir(&ckpt)?;
    let exe = std::env::current_exe()?;
    let load = crate::bench::load_average();
    eprintln!(
        "bench train: {} ({} parameters tensors), f32, {} threads, {} warm-up + {} timed steps, load average {}",
        ckpt.display(),
        config.parameter_shapes().len(),
        args.threads,
        args.warmup,
        args.steps,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );

    let mut results = Vec::new();
    for &(b, t) in &shapes {
        let mut rng = Rng(args.seed ^ ((b as u64) << 32) ^ t as u64);
        let vocab = config.vocab_size as u64;
        let ids: Vec<Vec<u32>> = (0..b)
            .map(|_| (0..=t).map(|_| (rng.next() % vocab) as u32).collect())
            .collect();
        let adv: Vec<Vec<f32>> = (0..b)
            .map(|_| (0..t).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect())
            .collect();
        let job = json!({
            "checkpoint": ckpt,
            "threads": args.threads,
            "steps": args.steps,
            "warmup": args.warmup,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "attn": args.peer_attn,
            "ops": args.ops,
            "device": args.device,
            "ids": ids,
            "advantages": adv,
        });
        let job_path = out_dir.join(format!("job-{b}x{t}.json"));
        std::fs::write(&job_path, serde_json::to_vec(&job)?)?;

        let load_before = crate::bench::load_average();
        eprintln!("{b}x{t}: ours ...");
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "train", "--worker"])
            .arg(&job_path)
            .env("RAYON_NUM_THREADS", args.threads.to_string())
            .env("HINDSIGHT_THREADS", args.threads.to_string());
        let ours = run_json(cmd, "our worker")?;
        let peer = if args.no_peer {
            None
        } else {
            eprintln!("{b}x{t}: pytorch ...");
            let mut cmd = Command::new(&args.python);
            cmd.arg(&args.peer_script)
                .arg(&job_path)
                .env("OMP_NUM_THREADS", args.threads.to_string())
                .env("MKL_NUM_THREADS", args.threads.to_string());
            Some(run_json(cmd, "the PyTorch peer")?)
        };
        let load_after = crate::bench::load_average();
        results.push(json!({
            "batch": b,
            "seq": t,
            "tokens": b * t,
            "ours": ours,
            "peer": peer,
            "load_before": load_before.trim(),
            "load_after": load_after.trim(),
        }));
    }

    // The table.
    println!(
        "{:<7} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>10} {:>9} {:>9} {:>9}",
        "shape",
        "ours s",
        "fwd",
        "bwd+opt",
        "torch s",
        "fwd",
        "bwd+opt",
        "time x",
        "ours MB",
        "torch MB",
        "mem x",
        "load1"
    );
    let mut summary = Vec::new();
    for r in &results {
        let o = &r["ours"];
        let (os, of, ob) = (med(o, "step_s"), med(o, "fwd_s"), med(o, "bwd_opt_s"));
        let om = o["peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
        let (ps, pf, pb, pm) = match r["peer"].is_null() {
            true => (f64::NAN, f64::NAN, f64::NAN, f64::NAN),
            false => {
                let p = &r["peer"];
                (
                    med(p, "step_s"),
                    med(p, "fwd_s"),
                    med(p, "bwd_opt_s"),
                    p["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
                )
            }
        };
        let load1 = r["load_after"]
            .as_str()
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        println!(
            "{:<7} {:>9.3} {:>8.3} {:>8.3} {:>9.3} {:>9.3} {:>8.3} {:>8.2} {:>10.0} {:>9.0} {:>9.2} {:>9}",
            format!("{}x{}", r["batch"], r["seq"]),
            os,
            of,
            ob,
            ps,
            pf,
            pb,
            os / ps,
            om,
            pm,
            om / pm,
            load1
        );
        let train_peak = |v: &Value| v["train_peak_rss_mb"].as_f64();
        summary.push(json!({
            "shape": format!("{}x{}", r["batch"], r["seq"]),
            "ours_step_s": os, "ours_fwd_s": of, "ours_bwd_opt_s": ob,
            "ours_opt_s": med(o, "opt_s"),
            "ours_peak_rss_mb": om, "ours_train_peak_rss_mb": train_peak(o),
            "peer_step_s": ps, "peer_fwd_s": pf, "peer_bwd_opt_s": pb,
            "peer_peak_rss_mb": pm, "peer_train_peak_rss_mb": train_peak(&r["peer"]),
            "time_ratio": os / ps, "mem_ratio": om / pm,
        }));
    }
    for r in &results {
        if let Some(tp) = r["ours"]["train_peak_rss_mb"].as_f64() {
            let pp = r["peer"]["train_peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
            println!(
                "{}x{}: peak RSS after loading (VmHWM reset): ours {tp:.0} MB, torch {pp:.0} MB ({:.2}x)",
                r["batch"],
                r["seq"],
                tp / pp
            );
        }
    }
    let report = json!({
        "bench": "train",
        "model": args.model,
        "checkpoint": ckpt,
        "dtype": "f32",
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "peer_attn": args.peer_attn,
        "ops": args.ops,
        "summary": summary,
        "results": results,
    });
    let path = out_dir.join("train.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
