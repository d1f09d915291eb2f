//! `hindsight bench weights`: how fast a new weight version reaches N actors.
//!
//! One process, real gRPC over loopback: the learner's `Weights` service (its `WeightStore`,
//! its server settings and security shell, insecure) on 127.0.0.1:0, and N actors, each with
//! its own channel, its own background [`Follower`] (long poll, chunked fetch with overlapped
//! checksums, engine built off the generation thread) and its own generation thread that
//! generates back to back and installs a prepared version between two batches, exactly as
//! `hindsight actor` does. For each published version it measures the time from the moment
//! the learner's publication is visible (its `publish` returned) to the moment the last of
//! the N actors holds the version and can generate with it, and the longest pause in an
//! actor's generation caused by a swap (the install between two batches).
//!
//! Each count of actors runs once per `--transport`: `grpc` (every actor fetches the chunks
//! and builds its engine from them) and `shared` (the learner also writes each version into
//! a shared directory and every actor maps that file, as co-located actors do with
//! `--shared-weights-dir`; the learner's publication then includes writing the file, shown
//! in the "learner publish" column).
//!
//! The first version of each run is a warm-up and not counted. `--idle` runs the actors
//! without generating, which separates the transfer itself from the competition for CPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hindsight_actor::weights::{FollowSpec, Follower};
use hindsight_learner::publish::WeightStore;
use hindsight_policy::{Device, Precision, Sampler, SamplingParams};
use hindsight_proto::v1::weights_client::WeightsClient;
use serde::Serialize;

/// The figure this benchmark is held to.
pub const GOAL: &str = "goal: < 1 s from publication to the last of 8 actors (SmolLM2)";

#[derive(clap::Args, Debug)]
pub struct BenchWeightsArgs {
    /// Numbers of actors, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub actors: Vec<usize>,
    /// Model: `tiny`, `smollm2` (fetched into the cache once) or any `--model` spec.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Versions published per run after the warm-up one.
    #[arg(long, default_value_t = 3)]
    pub versions: u64,
    /// Actors do not generate (measures the transfer alone).
    #[arg(long)]
    pub idle: bool,
    /// How versions reach the actors, one run each: `grpc`, `shared` (mapped from the
    /// learner's shared directory, see `--shared-dir`).
    #[arg(long, value_delimiter = ',', default_value = "grpc,shared")]
    pub transport: Vec<Transport>,
    /// The shared directory of `--transport shared` (created, and emptied of weight files;
    /// default: a new directory under the system's temporary directory, removed after).
    #[arg(long)]
    pub shared_dir: Option<std::path::PathBuf>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Model cache (default: $HINDSIGHT_CACHE or ~/.cache/hindsight).
    #[arg(long)]
    pub cache_dir: Option<std::path::PathBuf>,
}

/// How a version reaches the actors.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Chunks over gRPC, checksummed, each actor building its own engine.
    Grpc,
    /// A file in the learner's shared directory, mapped by every actor.
    Shared,
}

impl Transport {
    /// The name `--transport` takes.
    fn name(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Shared => "shared",
        }
    }
}

/// One run's figures (seconds unless named otherwise).
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub actors: usize,
    pub transport: Transport,
    pub generating: bool,
    pub payload_mb: f64,
    /// Learner side: checksumming and publishing one version (before it is visible).
    pub publish_secs: f64,
    /// Publication to the last actor ready, per counted version.
    pub last_ready_secs: Vec<f64>,
    pub median_last_ready_secs: f64,
    pub mean_ready_secs: f64,
    /// Aggregate payload delivered per second (N x payload / median last-ready time).
    pub aggregate_mb_per_s: f64,
    /// Longest install (generation pause) any actor saw, milliseconds.
    pub max_pause_ms: f64,
    /// Means over actors and versions of the follower's phases.
    pub mean_fetch_secs: f64,
    pub mean_prepare_secs: f64,
    pub load_average: String,
}

/// What one actor reports about one version.
#[derive(Clone, Copy)]
struct Ready {
    version: u64,
    at: Instant,
    install: Duration,
    fetch_secs: f64,
    prepare_secs: f64,
    shared: bool,
}

/// Runs the benchmark and prints the table (or JSON).
pub fn run(args: BenchWeightsArgs) -> Result<()> {
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(hindsight_policy::default_cache_dir);
    let model = hindsight_policy::load(&args.model, &cache, &Device::Cpu)
        .with_context(|| format!("loading {}", args.model))?;
    let payload = model.weights.to_safetensors_bytes()?;
    // Called from the binary's runtime (2 workers): run on it.
    let rt = tokio::runtime::Handle::current();
    anyhow::ensure!(
        args.actors.iter().all(|&n| n > 0),
        "--actors: every count must be at least 1"
    );
    anyhow::ensure!(!args.transport.is_empty(), "--transport: name at least one");
    let temp_dir =
        std::env::temp_dir().join(format!("hindsight-bench-weights-{}", std::process::id()));
    let shared_dir = args.shared_dir.clone().unwrap_or_else(|| temp_dir.clone());
    let mut outcomes = Vec::new();
    for &n in &args.actors {
        for &transport in &args.transport {
            let dir = (transport == Transport::Shared).then_some(shared_dir.as_path());
            let o = tokio::task::block_in_place(|| {
                rt.block_on(run_one(&model, &payload, n, dir, &args))
            });
            if args.shared_dir.is_none() {
                let _ = std::fs::remove_dir_all(&temp_dir);
            }
            let o = o?;
            if !args.json {
                eprintln!(
                    "{} actor(s), {}: last ready {:.3} s (median), pause {:.1} ms",
                    n,
                    transport.name(),
                    o.median_last_ready_secs,
                    o.max_pause_ms
                );
            }
            outcomes.push(o);
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": model.name,
                "goal": GOAL,
                "runs": outcomes,
            }))?
        );
        return Ok(());
    }
    println!(
        "hindsight bench weights: {} ({:.0} MB f32 safetensors), {} version(s) per run, actors {}",
        model.name,
        payload.len() as f64 / 1e6,
        args.versions,
        if args.idle { "idle" } else { "generating" }
    );
    println!("{GOAL}");
    println!(
        "| actors | transport | publication -> last actor ready (median) | mean per actor | aggregate MB/s | longest generation pause | fetch (mean) | prepare (mean) | learner publish | load avg |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in &outcomes {
        println!(
            "| {} | {} | {:.3} s | {:.3} s | {:.0} | {:.1} ms | {:.3} s | {:.3} s | {:.3} s | {} |",
            o.actors,
            o.transport.name(),
            o.median_last_ready_secs,
            o.mean_ready_secs,
            o.aggregate_mb_per_s,
            o.max_pause_ms,
            o.mean_fetch_secs,
            o.mean_prepare_secs,
            o.publish_secs,
            o.load_average
        );
    }
    Ok(())
}

async fn run_one(
    model: &hindsight_policy::LoadedModel,
    payload: &[u8],
    n: usize,
    shared_dir: Option<&std::path::Path>,
    args: &BenchWeightsArgs,
) -> Result<Outcome> {
    // The learner's store and server, built by the learner's own code (insecure here).
    let mut store = WeightStore::for_model(&model.name, &model.config, &model.tokenizer, 2)?;
    if let Some(dir) = shared_dir {
        store = store.with_shared_dir(dir)?;
    }
    let fingerprint = store.model_fingerprint().to_owned();
    store.publish(0, 0, payload.to_vec());
    let security = hindsight_service::ServerSecurity::insecure();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (_health, server) = hindsight_learner::publish::serve(
        &security,
        Some(store.clone()),
        listener,
        stop_rx.clone(),
    )
    .await?;

    // N actors: a follower each (on this runtime) and a generation thread each.
    let client_security = hindsight_service::ClientSecurity::from_args(
        &hindsight_service::ClientSecurityArgs::default(),
    )?;
    let reports: Arc<Mutex<Vec<Vec<Ready>>>> = Arc::new(Mutex::new(vec![Vec::new(); n]));
    let done = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let prompt = model
        .tokenizer
        .encode_chat("Write a short poem about the sea.")?;
    for i in 0..n {
        let channel = client_security.connect_authed(&url, 10).await?;
        let client = WeightsClient::new(channel)
            .max_decoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES);
        let follower = Follower::start(
            client,
            FollowSpec {
                fingerprint: fingerprint.clone(),
                config: model.config.clone(),
                device: Device::Cpu,
                precision: Precision::F32,
                shared_dir: shared_dir.map(|d| d.to_path_buf()),
            },
            Some(0),
            stop_rx.clone(),
        );
        let mut sampler = Sampler::new(
            &model.config,
            &model.weights,
            model.tokenizer.stop_token_ids(),
            &Device::Cpu,
        )?;
        let (reports, done, prompt) = (reports.clone(), done.clone(), prompt.clone());
        let generate = !args.idle;
        threads.push(std::thread::spawn(move || -> Result<()> {
            let params = SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                max_new_tokens: 4,
                seed: i as u64,
            };
            while !done.load(Ordering::Relaxed) {
                if let Some(u) = follower.take()? {
                    let started = Instant::now();
                    sampler.install(u.weights)?;
                    let install = started.elapsed();
                    reports.lock().expect("reports")[i].push(Ready {
                        version: u.version,
                        at: Instant::now(),
                        install,
                        fetch_secs: u.fetch_secs,
                        prepare_secs: u.prepare_secs,
                        shared: u.shared,
                    });
                }
                if generate {
                    sampler.generate(std::slice::from_ref(&prompt), &params)?;
                } else {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(())
        }));
    }

    let mut last_ready = Vec::new();
    let mut per_actor = Vec::new();
    let mut publish_secs = 0.0;
    let mut counted: Vec<Ready> = Vec::new();
    for v in 1..=args.versions + 1 {
        let bytes = payload.to_vec();
        let started = Instant::now();
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.publish(v, v, bytes)).await?;
        let published = Instant::now();
        let p = (published - started).as_secs_f64();
        let deadline = published + Duration::from_secs(600);
        let ready: Vec<Ready> = loop {
            let got: Vec<Option<Ready>> = reports
                .lock()
                .expect("reports")
                .iter()
                .map(|r| r.iter().find(|x| x.version == v).copied())
                .collect();
            if got.iter().all(Option::is_some) {
                break got.into_iter().flatten().collect();
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "version {v} did not reach every actor within 600 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        // A run of the shared transport that fell back to gRPC would measure the wrong thing.
        if let Some(r) = ready.iter().find(|r| r.shared != shared_dir.is_some()) {
            anyhow::bail!(
                "version {v} reached an actor {} (see its warning)",
                if r.shared {
                    "from the shared file in a gRPC run"
                } else {
                    "over gRPC, not from the shared file"
                }
            );
        }
        if v == 1 {
            continue; // warm-up
        }
        publish_secs += p / args.versions as f64;
        let times: Vec<f64> = ready
            .iter()
            .map(|r| r.at.saturating_duration_since(published).as_secs_f64())
            .collect();
        last_ready.push(times.iter().cloned().fold(0.0, f64::max));
        per_actor.extend(times);
        counted.extend(ready);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    done.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("an actor thread panicked"))??;
    }
    let _ = server.await;

    let mut sorted = last_ready.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let mean = |xs: &mut dyn Iterator<Item = f64>| {
        let (s, c) = xs.fold((0.0, 0usize), |(s, c), x| (s + x, c + 1));
        s / c.max(1) as f64
    };
    let payload_mb = payload.len() as f64 / 1e6;
    Ok(Outcome {
        actors: n,
        transport: if shared_dir.is_some() {
            Transport::Shared
        } else {
            Transport::Grpc
        },
        generating: !args.idle,
        payload_mb,
        publish_secs,
        median_last_ready_secs: median,
        mean_ready_secs: mean(&mut per_actor.iter().copied()),
        aggregate_mb_per_s: n as f64 * payload_mb / median.max(1e-9),
        max_pause_ms: counted
            .iter()
            .map(|r| r.install.as_secs_f64() * 1000.0)
            .fold(0.0, f64::max),
        mean_fetch_secs: mean(&mut counted.iter().map(|r| r.fetch_secs)),
        mean_prepare_secs: mean(&mut counted.iter().map(|r| r.prepare_secs)),
        last_ready_secs: last_ready,
        load_average: crate::bench::load_average(),
    })
}
