//! `hindsight bench ...`: every speed claim of the project as one command that measures ours
//! and a named peer in the same run, on the same machine, and prints both and the ratio.
//! `verify` lives in `verify.rs`, `generate` in `bench_generate.rs`, `train` in `bench_train.rs`.
//! `replay` (`bench_replay.rs`) has no peer: it loads our replay server with its own client
//! and holds it to a stated goal. `weights` (`bench_weights.rs`) has no peer either: it
//! measures how fast a published weight version reaches N actors. `ranks` (`bench_ranks.rs`)
//! compares learner-rank configurations with each other.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::{bench_generate, bench_ranks, bench_replay, bench_train, bench_weights, verify};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchWhat {
    /// Verification throughput (records/s) on the IFEval GPT-4 set and the IFBench sample
    /// set, ours on 1 and 2 threads (the records split between the threads; scaling vs 1
    /// thread reported; best of three windows) next to the reference oracle run in the
    /// same command.
    Verify(verify::BenchVerifyArgs),
    /// Generation throughput (aggregate generated tokens/s at several batch sizes) next to
    /// llama.cpp (llama-cpp-python) and PyTorch + transformers `generate` on the same model.
    Generate(bench_generate::BenchGenerateArgs),
    /// Learner step time and peak memory (forward + loss + backward + AdamW) next to
    /// PyTorch + transformers with the same model, batch shape and dtype.
    Train(bench_train::BenchTrainArgs),
    /// Replay server load: groups/s acknowledged, ack latency p50/p99, batches/s to a
    /// simulated learner and the server's memory, at 1 to 128 concurrent rollout streams,
    /// with the server as a separate process and its write-ahead log on.
    Replay(bench_replay::BenchReplayArgs),
    /// Weight distribution: time from the learner's publication of a version to the last of
    /// N actors generating with it (real gRPC on loopback), and the longest generation
    /// pause a swap causes.
    Weights(bench_weights::BenchWeightsArgs),
    /// Learner ranks: step time of R ranks x T threads (separate processes, TCP collective)
    /// against one rank with all the threads, and the collective's seconds and bytes per step.
    Ranks(bench_ranks::BenchRanksArgs),
}

/// Runs the chosen benchmark.
pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchWhat::Verify(a) => verify::bench(a),
        BenchWhat::Generate(a) => bench_generate::run(a),
        BenchWhat::Train(a) => bench_train::run(a),
        BenchWhat::Replay(a) => bench_replay::run(a),
        BenchWhat::Weights(a) => bench_weights::run(a),
        BenchWhat::Ranks(a) => bench_ranks::run(a),
    }
}

/// The 1-minute load average (`/proc/loadavg`), printed with every figure so that a
/// reader can tell a quiet machine from a busy one.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// A Hugging Face checkpoint directory of `model` for the PyTorch peers: the directory
/// itself when `model` is one, else an f32 conversion cached under
/// `<cache>/bench/<name>-hf` (written once).
pub fn hf_dir_for(model: &str, cache: &Path) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() && hindsight_policy::is_hf_dir(p) {
        return Ok(p.to_path_buf());
    }
    let name = p
        .file_stem()
        .map_or_else(|| model.to_string(), |s| s.to_string_lossy().into_owned())
        .replace(':', "-");
    let dir = cache.join("bench").join(format!("{name}-hf"));
    if !dir.join("config.json").is_file() {
        let m = hindsight_policy::load(model, cache, &hindsight_policy::Device::Cpu)
            .with_context(|| format!("loading {model}"))?;
        hindsight_policy::save_hf_checkpoint(&dir, &m.config, &m.weights, &m.tokenizer)
            .with_context(|| format!("writing {}", dir.display()))?;
    }
    Ok(dir)
}

/// Path of a peer script under `bench/`: `$HINDSIGHT_BENCH_DIR`, then `./bench`, then the
/// `bench/` of the checkout the binary was built in (`target/<profile>/hindsight`).
pub fn script_path(name: &str) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("HINDSIGHT_BENCH_DIR") {
        candidates.push(PathBuf::from(d).join(name));
    }
    candidates.push(PathBuf::from("bench").join(name));
    if let Ok(exe) = std::env::current_exe() {
        if let Some(root) = exe.ancestors().nth(3) {
            candidates.push(root.join("bench").join(name));
        }
    }
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "bench/{name} not found (run from the repository root or set HINDSIGHT_BENCH_DIR)"
            )
        })
}
