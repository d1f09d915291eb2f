//! `hindsight bench ranks`: what data parallelism costs and buys on this machine. For each
//! configuration `RxT` (R learner ranks of T compute threads each, as separate processes
//! meeting over the TCP collective on loopback), the same seeded batch is trained for
//! `--warmup` + `--steps` learner steps (`Trainer::train_step_with`'s parts: prepare, this
//! rank's gradients, the all-reduce, AdamW); rank 0 reports the median step time, the
//! median time in the reduction (collective plus host copies) and the bytes it sent and
//! received per step. Compare `2x1` (two ranks, one thread each) with `1x2` (one rank, two
//! threads): same cores, different parallelism. No peer: the comparison is between our own
//! configurations.
//!
//! `--device cuda --collective nccl|tcp` runs the ranks on the GPU (every rank on `cuda:0`
//! unless `--device cuda` is given without an index and the machine has a GPU per rank):
//! `scripts/gpu-ranks.sh` runs the NCCL path with one rank, the TCP backend with two, and two
//! NCCL ranks sharing the one GPU. Every configuration ends with the ranks' weight-digest
//! check, so ranks that disagree fail the run.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hindsight_learner::loss::PpoConfig;
use hindsight_learner::trainer::{shard_indices, TrainConfig, Trainer};
use hindsight_learner::AdvantageKind;
use hindsight_proto::v1::{BatchStats, Provenance, Sample, TrainingBatch};
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct BenchRanksArgs {
    /// Model: "tiny", "smollm2" or a .gguf file.
    #[arg(long, env = "HINDSIGHT_BENCH_MODEL", default_value = "tiny")]
    pub model: String,
    /// Configurations RxT (ranks x threads per rank), comma separated.
    #[arg(
        long,
        env = "HINDSIGHT_BENCH_CONFIGS",
        value_delimiter = ',',
        default_value = "1x1,1x2,2x1"
    )]
    pub configs: Vec<String>,
    /// Sequences in the batch.
    #[arg(long, env = "HINDSIGHT_BENCH_SEQUENCES", default_value_t = 16)]
    pub sequences: usize,
    /// Prompt tokens per sequence (responses are 1/2 to 1x this long).
    #[arg(long, env = "HINDSIGHT_BENCH_TOKENS", default_value_t = 64)]
    pub tokens: usize,
    /// Sequences per forward/backward pass.
    #[arg(long, env = "HINDSIGHT_BENCH_MICRO_BATCH", default_value_t = 4)]
    pub micro_batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, env = "HINDSIGHT_BENCH_STEPS", default_value_t = 5)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, env = "HINDSIGHT_BENCH_WARMUP", default_value_t = 1)]
    pub warmup: usize,
    /// Output directory (`ranks.json`).
    #[arg(long, env = "HINDSIGHT_BENCH_OUT", default_value = "bench/out/ranks")]
    pub out: PathBuf,
    /// Cache directory for "smollm2" (default: $HINDSIGHT_CACHE or ~/.cache/hindsight).
    #[arg(long, env = "HINDSIGHT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Device of every rank: `cpu`, `cuda:N` (all ranks on that GPU) or `cuda` (rank r on
    /// `cuda:r`).
    #[arg(long, env = "HINDSIGHT_BENCH_DEVICE", default_value = "cpu")]
    pub device: String,
    /// The ranks' collective: `tcp`, `nccl` (a `--features cuda,nccl` build; with one rank it
    /// still runs the NCCL path) or `auto`.
    #[arg(
        long,
        env = "HINDSIGHT_BENCH_COLLECTIVE",
        value_enum,
        default_value = "tcp"
    )]
    pub collective: hindsight_learner::ranks::Backend,
    /// Internal: run one rank (`RANK,WORLD,ADDR`), print JSON and exit.
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

fn parse_config(s: &str) -> Result<(u32, usize)> {
    let (r, t) = s
        .trim()
        .split_once(['x', 'X'])
        .with_context(|| format!("configuration {s:?} is not RxT"))?;
    let (r, t): (u32, usize) = (r.parse()?, t.parse()?);
    anyhow::ensure!(r > 0 && t > 0, "configuration {s:?} must be positive");
    Ok((r, t))
}

/// The seeded batch every rank builds identically.
fn batch(args: &BenchRanksArgs, vocab: usize) -> TrainingBatch {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let samples = (0..args.sequences)
        .map(|i| {
            let rlen = args.tokens / 2 + (next() as usize % (args.tokens / 2 + 1)).max(1);
            let tok = |v: u64| (v % (vocab as u64 - 3) + 3) as u32;
            Sample {
                prompt_token_ids: (0..args.tokens).map(|_| tok(next())).collect(),
                response_token_ids: (0..rlen).map(|_| tok(next())).collect(),
                loss_mask: vec![1; rlen],
                behaviour_logprobs: (0..rlen)
                    .map(|_| -((next() % 1000) as f32) / 200.0 - 0.01)
                    .collect(),
                reward: (i % 3 == 0) as u32 as f32,
                group_index: (i / 4) as u32,
                provenance: Some(Provenance::default()),
                ..Default::default()
            }
        })
        .collect();
    TrainingBatch {
        batch_id: 1,
        step: 1,
        samples,
        stats: Some(BatchStats::default()),
        temperature: 1.0,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One rank's measured run.
fn worker(args: &BenchRanksArgs, spec: &str) -> Result<()> {
    let parts: Vec<&str> = spec.splitn(3, ',').collect();
    let [rank, world, addr] = parts[..] else {
        bail!("--worker RANK,WORLD,ADDR")
    };
    let (rank, world): (u32, u32) = (rank.parse()?, world.parse()?);
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(hindsight_policy::default_cache_dir);
    let model = hindsight_policy::load(&args.model, &cache, &hindsight_policy::Device::Cpu)?;
    let config = TrainConfig {
        lr: 1e-6,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        advantage: AdvantageKind::ReinforcePp,
        kl_beta: 0.0,
        ppo: PpoConfig {
            clip: 0.2,
            dual_clip: 3.0,
        },
        micro_batch: args.micro_batch,
        mini_batches: 1,
    };
    let device_name = match args.device.trim() {
        "cuda" => format!("cuda:{rank}"),
        d => d.to_string(),
    };
    let device = hindsight_policy::parse_device(&device_name)?;
    let mut t = Trainer::new(&model, false, config, &device)?;
    let b = batch(args, model.config.vocab_size);
    drop(model);
    let backend = args.collective.resolve(&device, world)?;
    let settings = hindsight_learner::ranks::RankSettings {
        rendezvous: hindsight_collective::Rendezvous {
            rank,
            world_size: world,
            addr: Some(addr.to_string()),
            local_rank: rank,
        },
        op_timeout: std::time::Duration::from_secs(120),
        rendezvous_timeout: std::time::Duration::from_secs(300),
        digest_every: 0,
        backend,
    };
    let mut c = hindsight_learner::ranks::connect(&settings, &t, "bench")?;
    let (mut step_s, mut reduce_s, mut compute_s) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0u64;
    for i in 0..args.warmup + args.steps {
        let step = i as u64 + 1;
        let before = c.traffic();
        let t0 = Instant::now();
        let prepared = t.prepare(&b, 0)?;
        let shard = shard_indices(&prepared.costs, rank as usize, world as usize);
        let local = t.compute_gradients(&prepared, &prepared.whole(), &shard, step)?;
        let t1 = Instant::now();
        let reduced = t.reduce(&mut *c, local, step)?;
        let t2 = Instant::now();
        t.apply(reduced)?;
        let t3 = Instant::now();
        if i >= args.warmup {
            step_s.push((t3 - t0).as_secs_f64());
            compute_s.push((t1 - t0).as_secs_f64());
            reduce_s.push((t2 - t1).as_secs_f64());
            let after = c.traffic();
            bytes = (after.sent - before.sent) + (after.received - before.received);
        }
    }
    // Every rank must hold the same weights after the same steps.
    hindsight_learner::ranks::check_digest(&mut *c, &t, (args.warmup + args.steps) as u64)?;
    let digest = t.weight_digest()?;
    c.barrier()?;
    println!(
        "{REPORT_PREFIX}{}",
        json!({
            "rank": rank,
            "step_seconds": median(&mut step_s),
            "compute_seconds": median(&mut compute_s),
            "reduce_seconds": median(&mut reduce_s),
            "collective_bytes_per_step": bytes,
            "parameters": t.model.vars().iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
            "device": device_name,
            "collective": backend.map_or("none", |b| b.name()),
            "weights_sha256": digest,
        })
    );
    Ok(())
}

/// Runs every configuration and prints the table.
pub fn run(args: BenchRanksArgs) -> Result<()> {
    if let Some(spec) = &args.worker {
        return worker(&args, spec);
    }
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    anyhow::ensure!(args.tokens >= 2, "--tokens must be at least 2");
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    for cfg in &args.configs {
        let (ranks, threads) = parse_config(cfg)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let spawned: Vec<_> = (0..ranks)
            .map(|r| {
                let mut cmd = Command::new(&exe);
                cmd.arg("--threads")
                    .arg(threads.to_string())
                    .args(["bench", "ranks", "--model", &args.model])
                    .arg("--sequences")
                    .arg(args.sequences.to_string())
                    .arg("--tokens")
                    .arg(args.tokens.to_string())
                    .arg("--micro-batch")
                    .arg(args.micro_batch.to_string())
                    .arg("--steps")
                    .arg(args.steps.to_string())
                    .arg("--warmup")
                    .arg(args.warmup.to_string())
                    .arg("--device")
                    .arg(&args.device)
                    .arg("--collective")
                    .arg(args.collective.name())
                    .arg("--worker")
                    .arg(format!("{r},{ranks},127.0.0.1:{port}"))
                    .stdout(std::process::Stdio::piped());
                if let Some(d) = &args.cache_dir {
                    cmd.arg("--cache-dir").arg(d);
                }
                cmd.spawn()
            })
            .collect::<std::io::Result<_>>()?;
        let mut rank0: Option<Value> = None;
        for (r, child) in spawned.into_iter().enumerate() {
            let out = child.wait_with_output()?;
            // Every rank's log (NCCL's, say) reaches stderr, a failed rank's too.
            let report = rank_report(&out.stdout);
            if !out.status.success() {
                bail!("{cfg}: rank {r} failed ({})", out.status);
            }
            if r == 0 {
                rank0 = Some(report.context("rank 0's report")?);
            }
        }
        let mut v = rank0.context("no rank 0")?;
        v["config"] = json!(cfg);
        v["ranks"] = json!(ranks);
        v["threads_per_rank"] = json!(threads);
        eprintln!(
            "{cfg:>5}: step {:.3} s (compute {:.3} s, reduce {:.4} s), collective {:.1} MB/step at rank 0, weights {}",
            v["step_seconds"].as_f64().unwrap_or(0.0),
            v["compute_seconds"].as_f64().unwrap_or(0.0),
            v["reduce_seconds"].as_f64().unwrap_or(0.0),
            v["collective_bytes_per_step"].as_f64().unwrap_or(0.0) / 1e6,
            v["weights_sha256"]
                .as_str()
                .map(|d| d.trim_start_matches("sha256:"))
                .map_or("?", |d| &d[..12.min(d.len())])
        );
        results.push(v);
    }
    let report = json!({
        "model": args.model,
        "sequences": args.sequences,
        "prompt_tokens": args.tokens,
        "micro_batch": args.micro_batch,
        "device": args.device,
        "collective": args.collective.name(),
        "load_average": crate::bench::load_average(),
        "results": results,
    });
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("ranks.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("written to {}", path.display());
    Ok(())
}

/// Marks a worker's report line: NCCL writes its own log (`NCCL_DEBUG`) to the same stdout.
const REPORT_PREFIX: &str = "hindsight-rank-report: ";

/// A worker's report: its one line that starts with [`REPORT_PREFIX`]. Every other line of
/// its stdout (NCCL's log, say) goes on to our stderr, so that nothing it said is lost.
fn rank_report(stdout: &[u8]) -> Result<Value> {
    let text = String::from_utf8_lossy(stdout);
    let mut report = None;
    for line in text.lines() {
        match line.strip_prefix(REPORT_PREFIX) {
            Some(json) => report = Some(serde_json::from_str(json)),
            None => eprintln!("{line}"),
        }
    }
    report
        .transpose()?
        .with_context(|| format!("no line starting with {REPORT_PREFIX:?} in its output"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_is_found_among_nccl_log_lines() {
        let out = format!(
            "host:1:1 [0] NCCL INFO Bootstrap: Using eth0\n{REPORT_PREFIX}{{\"rank\":0,\"step_seconds\":0.5}}\nhost:1:1 [0] NCCL WARN late line\n"
        );
        let v = rank_report(out.as_bytes()).unwrap();
        assert_eq!(v["step_seconds"], 0.5);
        let err = rank_report(b"NCCL INFO only a log\n").unwrap_err();
        assert!(err.to_string().contains("no line starting with"), "{err}");
    }
}
