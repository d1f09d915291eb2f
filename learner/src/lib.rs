//! The Hindsight learner: pulls training batches from the replay server, takes one
//! policy-gradient step per batch, publishes every new weight version to the actors and
//! checkpoints periodically.
//!
//! Modules: [`advantage`] (REINFORCE++ / GRPO), [`loss`] (PPO dual clip), [`trainer`] (one
//! step), [`publish`] (the `Weights` gRPC service), [`checkpoint`] (save / resume) and
//! [`metrics`]. [`run`] wires them into the service loop.
//!
//! Ranks: `--world-size N` runs N learner processes as one data-parallel learner ([`ranks`]):
//! rank 0 is the only replay-server client, publisher and checkpoint writer; the others train
//! on rank 0's command and serve health and metrics only. CPU ranks talk over TCP
//! (`hindsight-collective`).

pub mod advantage;
pub mod checkpoint;
pub mod loss;
pub mod metrics;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod publish;
pub mod ranks;
pub mod trainer;

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hindsight_proto::v1::replay_client::ReplayClient;
use hindsight_proto::v1::{
    AckBatchRequest, BatchStreamRequest, CommitBatchesRequest, RegisterLearnerRequest,
};
use hindsight_service::ConfigResultExt as _;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tracing::{info, warn};

pub use advantage::AdvantageKind;
use checkpoint::TrainerState;
use loss::PpoConfig;
use publish::WeightStore;
use trainer::{StepStats, TrainConfig, Trainer};

/// Command-line / environment configuration of `hindsight learner`.
#[derive(clap::Args, Clone, Debug)]
pub struct LearnerArgs {
    /// Replay server to pull batches from.
    #[arg(
        long,
        env = "HINDSIGHT_REPLAY",
        default_value = "http://127.0.0.1:50051"
    )]
    pub replay: String,
    /// Address of the learner's gRPC server (Weights + health; all interfaces by default,
    /// for containers).
    #[arg(long, env = "HINDSIGHT_LISTEN", default_value = "0.0.0.0:50052")]
    pub listen: SocketAddr,
    /// Model to train: "tiny", "smollm2" or a path to a .gguf file.
    #[arg(long, env = "HINDSIGHT_MODEL", default_value = "tiny")]
    pub model: String,
    /// Where downloaded models are cached (default: $HINDSIGHT_CACHE or ~/.cache/hindsight).
    #[arg(long, env = "HINDSIGHT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// AdamW learning rate.
    #[arg(long, env = "HINDSIGHT_LR", default_value_t = 1e-6)]
    pub lr: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, env = "HINDSIGHT_WEIGHT_DECAY", default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    #[arg(long, env = "HINDSIGHT_MAX_GRAD_NORM", default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Advantage estimator.
    #[arg(
        long,
        env = "HINDSIGHT_ADVANTAGE",
        value_enum,
        default_value = "reinforce++"
    )]
    pub advantage: AdvantageKind,
    /// Load a frozen reference model (the starting weights) for the REINFORCE++ KL term.
    #[arg(long, env = "HINDSIGHT_REFERENCE_MODEL", default_value_t = false)]
    pub reference_model: bool,
    /// KL coefficient used when a reference model is loaded.
    #[arg(long, env = "HINDSIGHT_KL_BETA", default_value_t = 0.001)]
    pub kl_beta: f64,
    /// PPO clip range.
    #[arg(long, env = "HINDSIGHT_CLIP", default_value_t = 0.2)]
    pub clip: f64,
    /// PPO dual clip (caps the loss of negative-advantage tokens).
    #[arg(long, env = "HINDSIGHT_DUAL_CLIP", default_value_t = 3.0)]
    pub dual_clip: f64,
    /// Sequences per forward/backward pass; gradients are accumulated over the batch.
    #[arg(long, env = "HINDSIGHT_MICRO_BATCH", default_value_t = 4)]
    pub micro_batch: usize,
    /// Optimizer steps per training batch: the batch is split into this many mini-batches
    /// (sample i into mini-batch i mod K) after the advantages are computed over all of it.
    /// The HiR reference takes 2; 1 (one step per batch) is the default.
    #[arg(long, env = "HINDSIGHT_MINI_BATCHES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub mini_batches: u32,
    /// Device to train on: `cpu` (the hand-written whole-model pass) or `cuda` / `cuda:N`
    /// (candle's CUDA backend with differentiable primitives; needs a `--features cuda`
    /// build). `cuda` without an index is the GPU of this rank's `LOCAL_RANK` (one rank per
    /// GPU), `cuda:0` for a single rank.
    #[arg(long, env = "HINDSIGHT_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Stop after this many optimizer steps in total (0 = run until stopped).
    #[arg(long, env = "HINDSIGHT_MAX_STEPS", default_value_t = 0)]
    pub max_steps: u64,
    /// Directory for checkpoints (none = no checkpoints).
    #[arg(long, env = "HINDSIGHT_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every this many steps (and after the last step).
    #[arg(long, env = "HINDSIGHT_CHECKPOINT_EVERY", default_value_t = 50)]
    pub checkpoint_every: u64,
    /// Resume from the latest checkpoint in --checkpoint-dir if there is one.
    #[arg(long, env = "HINDSIGHT_RESUME", default_value_t = false)]
    pub resume: bool,
    /// Append one JSON line of figures per step to this file.
    #[arg(long, env = "HINDSIGHT_STEP_LOG")]
    pub step_log: Option<PathBuf>,
    /// Weight versions kept fetchable (one fewer while a step trains and the next version is
    /// written, so that peak never meets this many payloads).
    #[arg(long, env = "HINDSIGHT_KEEP_VERSIONS", default_value_t = 2)]
    pub keep_versions: usize,
    /// Also write every weight version into this directory, for actors on this host that
    /// mount it (their `--shared-weights-dir`): they map the file instead of fetching it
    /// over gRPC, and share one copy in the page cache. Weight files an earlier learner left
    /// there are removed at start: one learner per directory.
    #[arg(long, env = "HINDSIGHT_SHARED_WEIGHTS_DIR")]
    pub shared_weights_dir: Option<PathBuf>,
    /// This learner's id (logs, replay bookkeeping).
    #[arg(long, env = "HINDSIGHT_LEARNER_ID", default_value = "learner-0")]
    pub learner_id: String,
    /// Rank of this learner process (else `RANK`, else 0).
    #[arg(long, env = "HINDSIGHT_RANK")]
    pub rank: Option<u32>,
    /// After --max-steps, keep serving weights and health until stopped (used by `hindsight up`).
    #[arg(long, env = "HINDSIGHT_LINGER", default_value_t = false)]
    pub linger: bool,
    /// Batches the replay server sends ahead of this learner's acks.
    #[arg(long, env = "HINDSIGHT_PREFETCH", default_value_t = 2)]
    pub prefetch: u32,
    /// TLS and per-role credentials of the Weights server (`hindsight certs`), or `--insecure`.
    #[command(flatten)]
    pub server_security: hindsight_service::ServerSecurityArgs,
    /// How this learner proves itself to the replay server (`--tls-ca`, `--token-file`).
    #[command(flatten)]
    pub client_security: hindsight_service::ClientSecurityArgs,
    /// Number of learner ranks (else `WORLD_SIZE`, else 1).
    #[arg(long, env = "HINDSIGHT_WORLD_SIZE")]
    pub world_size: Option<u32>,
    /// Rank 0's rendezvous address HOST:PORT (else `MASTER_ADDR`:`MASTER_PORT`); rank 0
    /// listens on its port on every interface. Needed when the world size is above 1.
    #[arg(long, env = "HINDSIGHT_RENDEZVOUS")]
    pub rendezvous: Option<String>,
    /// Bound on waiting for another rank in a collective operation (and for rank 0's next
    /// command or heartbeat): a stalled or dead rank fails the group after this long.
    #[arg(long, env = "HINDSIGHT_COLLECTIVE_TIMEOUT_SECS", default_value_t = 120)]
    pub collective_timeout_secs: u64,
    /// Bound on the rendezvous (every rank joined and checked).
    #[arg(long, env = "HINDSIGHT_RENDEZVOUS_TIMEOUT_SECS", default_value_t = 300)]
    pub rendezvous_timeout_secs: u64,
    /// Ranks compare weight digests every this many steps (and at start; 0 = only at start).
    #[arg(long, env = "HINDSIGHT_DIGEST_EVERY", default_value_t = 50)]
    pub digest_every: u64,
    /// How the ranks sum gradients: `nccl` (GPU ranks, a `--features cuda,nccl` build),
    /// `tcp` (any device) or `auto` (NCCL where it can run, else TCP).
    #[arg(long, env = "HINDSIGHT_COLLECTIVE", value_enum, default_value = "auto")]
    pub collective: ranks::Backend,
    /// Learner ranks this process starts as child processes, one per GPU (torchrun's
    /// `--nproc-per-node`): local rank i is rank `node-rank x local-ranks + i`, takes
    /// `cuda:i` with `--device cuda`, and listens and serves metrics on the base ports + i.
    #[arg(long, env = "HINDSIGHT_LOCAL_RANKS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub local_ranks: u32,
    /// This node's index among the learner nodes (else `NODE_RANK`, else `GROUP_RANK`);
    /// with it, ranks are numbered from `node-rank x local-ranks`. A Kubernetes StatefulSet
    /// passes its pod index.
    #[arg(long, env = "HINDSIGHT_NODE_RANK")]
    pub node_rank: Option<u32>,
    /// The drain bound after SIGTERM.
    #[command(flatten)]
    pub shutdown: hindsight_service::ShutdownArgs,
}

impl Default for LearnerArgs {
    /// The same values as the command-line defaults (tested).
    fn default() -> Self {
        LearnerArgs {
            replay: "http://127.0.0.1:50051".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 50052)),
            model: "tiny".into(),
            cache_dir: None,
            lr: 1e-6,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            advantage: AdvantageKind::ReinforcePp,
            reference_model: false,
            kl_beta: 0.001,
            clip: 0.2,
            dual_clip: 3.0,
            micro_batch: 4,
            mini_batches: 1,
            device: "cpu".into(),
            max_steps: 0,
            checkpoint_dir: None,
            checkpoint_every: 50,
            resume: false,
            step_log: None,
            keep_versions: 2,
            shared_weights_dir: None,
            learner_id: "learner-0".into(),
            rank: None,
            linger: false,
            prefetch: 2,
            server_security: Default::default(),
            client_security: Default::default(),
            world_size: None,
            rendezvous: None,
            collective_timeout_secs: 120,
            rendezvous_timeout_secs: 300,
            digest_every: 50,
            collective: ranks::Backend::Auto,
            local_ranks: 1,
            node_rank: None,
            shutdown: Default::default(),
        }
    }
}

impl hindsight_service::ToArgv for LearnerArgs {
    /// The flags that parse back to these settings (every one, defaults included).
    fn to_argv(&self) -> Vec<String> {
        let mut a = hindsight_service::Argv::new();
        a.opt("--replay", &self.replay)
            .opt("--listen", self.listen)
            .opt("--model", &self.model)
            .path_some("--cache-dir", &self.cache_dir)
            .opt("--lr", self.lr)
            .opt("--weight-decay", self.weight_decay)
            .opt("--max-grad-norm", self.max_grad_norm)
            .value_enum("--advantage", &self.advantage)
            .switch("--reference-model", self.reference_model)
            .opt("--kl-beta", self.kl_beta)
            .opt("--clip", self.clip)
            .opt("--dual-clip", self.dual_clip)
            .opt("--micro-batch", self.micro_batch)
            .opt("--mini-batches", self.mini_batches)
            .opt("--device", &self.device)
            .opt("--max-steps", self.max_steps)
            .path_some("--checkpoint-dir", &self.checkpoint_dir)
            .opt("--checkpoint-every", self.checkpoint_every)
            .switch("--resume", self.resume)
            .path_some("--step-log", &self.step_log)
            .opt("--keep-versions", self.keep_versions)
            .path_some("--shared-weights-dir", &self.shared_weights_dir)
            .opt("--learner-id", &self.learner_id)
            .opt_some("--rank", &self.rank)
            .switch("--linger", self.linger)
            .opt("--prefetch", self.prefetch)
            .extend(&self.server_security)
            .extend(&self.client_security)
            .opt_some("--world-size", &self.world_size)
            .opt_some("--rendezvous", &self.rendezvous)
            .opt("--collective-timeout-secs", self.collective_timeout_secs)
            .opt("--rendezvous-timeout-secs", self.rendezvous_timeout_secs)
            .opt("--digest-every", self.digest_every)
            .value_enum("--collective", &self.collective)
            .opt("--local-ranks", self.local_ranks)
            .opt_some("--node-rank", &self.node_rank)
            .extend(&self.shutdown);
        a.into_vec()
    }
}

/// The replay server's client, authenticated as a learner.
type Replay = ReplayClient<hindsight_service::AuthChannel>;

async fn connect_replay(url: &str, security: &hindsight_service::ClientSecurity) -> Result<Replay> {
    let channel = security
        .connect_authed(url, 100)
        .await
        .context("connecting to the replay server")?;
    Ok(ReplayClient::new(channel)
        .max_decoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES))
}

/// The device a rank trains on: `cuda` without an index is the rank's local GPU.
pub fn rank_device(device: &str, rendezvous: &hindsight_collective::Rendezvous) -> String {
    match device.trim() {
        "cuda" => format!("cuda:{}", rendezvous.local_rank),
        other => other.to_string(),
    }
}

/// Runs the learner until `--max-steps` is reached or `shutdown` resolves.
pub async fn run(
    args: LearnerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if args.local_ranks > 1 {
        return Err(hindsight_service::ConfigError::wrap(anyhow::anyhow!(
            "--local-ranks {} is the `hindsight learner` launcher's: it starts the ranks as \
             child processes",
            args.local_ranks
        )));
    }
    // One rank per node (a StatefulSet pod): the node rank is the rank.
    let rank = args.rank.or(args.node_rank);
    let rendezvous = hindsight_collective::Rendezvous::resolve(
        rank,
        args.world_size,
        args.rendezvous.clone(),
        |k| std::env::var(k).ok(),
    )
    .map_err(hindsight_service::ConfigError::wrap)?;
    metrics::describe();
    let device_name = rank_device(&args.device, &rendezvous);
    let device = hindsight_policy::parse_device(&device_name).config_err()?;
    let backend = args
        .collective
        .resolve(&device, rendezvous.world_size)
        .config_err()?;
    if args.resume && args.checkpoint_dir.is_none() {
        return Err(hindsight_service::ConfigError::wrap(anyhow::anyhow!(
            "--resume needs --checkpoint-dir"
        )));
    }
    // Only rank 0 writes checkpoints; it checks their volume before anything slow happens.
    if let (Some(dir), 0) = (&args.checkpoint_dir, rendezvous.rank) {
        hindsight_service::check_writable_dir("--checkpoint-dir", dir)?;
    }
    let server_security = hindsight_service::ServerSecurity::from_args(&args.server_security)?;
    let client_security = hindsight_service::ClientSecurity::from_args(&args.client_security)?;
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(hindsight_policy::default_cache_dir);
    let spec = args.model.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        hindsight_policy::load(&spec, &cache, &hindsight_policy::Device::Cpu)
    })
    .await?
    .with_context(|| format!("loading --model {}", args.model))
    .config_err()?;
    info!(model = %loaded.name, params = loaded.weights.num_parameters(), device = %device_name, "model loaded");
    let config = TrainConfig {
        lr: args.lr,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        advantage: args.advantage,
        kl_beta: if args.reference_model {
            args.kl_beta
        } else {
            0.0
        },
        ppo: PpoConfig {
            clip: args.clip,
            dual_clip: args.dual_clip,
        },
        micro_batch: args.micro_batch,
        mini_batches: args.mini_batches as usize,
    };
    let mut trainer = Trainer::new(&loaded, args.reference_model, config, &device)?;
    let mut store = WeightStore::for_model(
        &loaded.name,
        &loaded.config,
        &loaded.tokenizer,
        args.keep_versions,
    )?;
    let fingerprint = store.model_fingerprint().to_string();
    info!(model = %loaded.name, fingerprint = %fingerprint, "model fingerprint");
    let settings = ranks::RankSettings {
        rendezvous,
        op_timeout: Duration::from_secs(args.collective_timeout_secs.max(1)),
        rendezvous_timeout: Duration::from_secs(args.rendezvous_timeout_secs.max(1)),
        digest_every: args.digest_every,
        backend,
    };
    let mut collective =
        tokio::task::block_in_place(|| ranks::connect(&settings, &trainer, &fingerprint)).map_err(
            |e| {
                use hindsight_collective::{CollectiveError, RendezvousError};
                match e.downcast_ref::<CollectiveError>() {
                    Some(CollectiveError::Rendezvous(RendezvousError::Refused { .. })) => {
                        hindsight_service::ConfigError::wrap(e)
                    }
                    _ => e,
                }
            },
        )?;
    if settings.rendezvous.rank != 0 {
        drop(loaded.weights);
        return run_follower(
            args,
            settings,
            trainer,
            collective,
            server_security,
            shutdown,
        )
        .await;
    }
    let tokenizer = loaded.tokenizer;
    drop(loaded.weights);
    // Rank 0 alone publishes, so it alone owns the shared directory.
    if let Some(dir) = &args.shared_weights_dir {
        store = store.with_shared_dir(dir).config_err()?;
    }

    let mut state = TrainerState {
        base_model: args.model.clone(),
        ..Default::default()
    };
    // Rank 0's resumed weights and optimizer state, for the other ranks.
    let mut resumed: Option<(Vec<u8>, Vec<u8>)> = None;
    if args.resume {
        let dir = args
            .checkpoint_dir
            .as_ref()
            .context("--resume needs --checkpoint-dir")?;
        if let Some(ckpt) = checkpoint::load_latest(dir)? {
            trainer.import_weights(&ckpt.model_safetensors)?;
            trainer.optimizer.load_state(&ckpt.optimizer_safetensors)?;
            state = ckpt.state;
            if collective.world_size() > 1 {
                resumed = Some((ckpt.model_safetensors, ckpt.optimizer_safetensors));
            }
            info!(
                step = state.step,
                policy_version = state.policy_version,
                trained_through_batch = state.last_batch_id,
                "resumed from checkpoint"
            );
        } else {
            info!(dir = %dir.display(), "no checkpoint to resume from; starting fresh");
        }
    }
    tokio::task::block_in_place(|| {
        ranks::synchronise(
            &mut *collective,
            &mut trainer,
            resumed
                .as_ref()
                .map(|(w, o)| (&state, w.as_slice(), o.as_slice())),
        )
    })?;
    drop(resumed);
    // Steps after the weights we start from were undone with the weights that took them (a
    // crash after the last checkpoint): the step log keeps the history of the weights that
    // exist, so no step number appears twice.
    if let Some(path) = &args.step_log {
        truncate_step_log(path, state.step)?;
    }
    metrics::init(state.step);

    // gRPC server: Weights + the standard health service, NOT_SERVING until the weights
    // it serves are in place (first registration), and again while draining.
    let (step_tx, _step_rx) = watch::channel(state.step);
    let (stop_tx, stop_rx) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the learner to --listen {}", args.listen))
        .config_err()?;
    info!(addr = %listener.local_addr()?, "learner serving Weights and Health");
    let (health, server) = publish::serve(
        &server_security,
        Some(store.clone()),
        listener,
        stop_rx.clone(),
    )
    .await?;
    let shutdown_task = {
        let stop_tx = stop_tx.clone();
        let health = health.clone();
        tokio::spawn(async move {
            shutdown.await;
            info!("shutting down: NOT_SERVING; finishing the step in progress, then a checkpoint");
            health.draining().await;
            let _ = stop_tx.send(true);
        })
    };

    let leader = {
        let stop_tx = stop_tx.clone();
        ranks::Leader::new(collective, settings.digest_every, move || {
            let _ = stop_tx.send(true);
        })
    };
    let mut step_log = match &args.step_log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening step log {}", p.display()))?,
        ),
        None => None,
    };

    let result = train_loop(
        &args,
        &leader,
        &mut trainer,
        &store,
        &mut state,
        &step_tx,
        &mut step_log,
        stop_rx.clone(),
        &tokenizer,
        &client_security,
        &health,
    )
    .await;
    // A rank that died between steps stopped the loop: that is this run's error.
    let result = result.and_then(|()| leader.check());
    tokio::task::block_in_place(|| leader.stop());
    if let Err(e) = &result {
        warn!(error = format!("{e:#}"), "learner loop ended with an error");
    } else if args.linger {
        info!("training done; still serving weights until stopped (--linger)");
        let mut stop = stop_rx.clone();
        let _ = stop.wait_for(|s| *s).await;
    }
    let _ = stop_tx.send(true);
    shutdown_task.abort();
    let _ = server.await;
    result
}

/// A rank other than 0: health (and the process's metrics) only, training on rank 0's
/// commands until it says stop, the group fails or `shutdown` resolves.
async fn run_follower(
    args: LearnerArgs,
    settings: ranks::RankSettings,
    mut trainer: Trainer,
    mut collective: Box<dyn hindsight_collective::Collective>,
    server_security: hindsight_service::ServerSecurity,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let rank = settings.rendezvous.rank;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding learner rank {rank} to --listen {}", args.listen))
        .config_err()?;
    info!(rank, addr = %listener.local_addr()?, "learner rank serving health");
    let (stop_tx, stop_rx) = watch::channel(false);
    let (health, server) =
        publish::serve(&server_security, None, listener, stop_rx.clone()).await?;
    tokio::task::block_in_place(|| ranks::synchronise(&mut *collective, &mut trainer, None))?;
    health.serving().await;
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown_task = {
        let (stopping, health, stop_tx) = (stopping.clone(), health.clone(), stop_tx.clone());
        tokio::spawn(async move {
            shutdown.await;
            info!(rank, "shutting down");
            stopping.store(true, std::sync::atomic::Ordering::Relaxed);
            health.draining().await;
            let _ = stop_tx.send(true);
        })
    };
    let (timeout, digest_every) = (settings.op_timeout, settings.digest_every);
    let result = tokio::task::spawn_blocking(move || {
        ranks::follow(
            &mut *collective,
            &mut trainer,
            timeout,
            digest_every,
            &stopping,
            |s| ::metrics::gauge!(metrics::STEP).set(s.step as f64),
        )
    })
    .await?;
    if let Err(e) = &result {
        warn!(
            rank,
            error = format!("{e:#}"),
            "learner rank stopped with an error"
        );
    } else if args.linger {
        let mut stop = stop_rx.clone();
        let _ = stop.wait_for(|s| *s).await;
    }
    let _ = stop_tx.send(true);
    shutdown_task.abort();
    let _ = server.await;
    result
}

/// Keeps the lines of the step log at `path` whose step is at most `step` (atomically).
fn truncate_step_log(path: &std::path::Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    let dropped = text.lines().count() - kept.len();
    if dropped == 0 {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    info!(path = %path.display(), dropped, "step log: dropped the steps after the checkpoint");
    Ok(())
}

/// Whether a failed call is worth retrying (the server restarting, the network) rather
/// than a refusal that retrying cannot fix.
fn transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
    )
}

/// Exponential back-off between reconnection attempts (200 ms doubling to 5 s).
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(200))
    }

    fn reset(&mut self) {
        self.0 = Duration::from_millis(200);
    }

    /// Sleeps (or returns false at once when stopped).
    async fn wait(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stop.wait_for(|s| *s) => false,
        }
    }
}

/// What the training loop works with besides the trainer.
struct Loop<'a> {
    args: &'a LearnerArgs,
    step_tx: &'a watch::Sender<u64>,
    step_log: &'a mut Option<std::fs::File>,
    tokenizer: &'a hindsight_policy::ChatTokenizer,
    /// Every batch up to this id is covered by the newest durable checkpoint.
    committed: u64,
    /// The step of the newest checkpoint.
    checkpointed_step: u64,
}

impl Loop<'_> {
    fn checkpoint(&mut self, trainer: &mut Trainer, state: &TrainerState) -> Result<bool> {
        let Some(dir) = &self.args.checkpoint_dir else {
            return Ok(false);
        };
        let tokenizer = self.tokenizer;
        let path = tokio::task::block_in_place(|| -> Result<PathBuf> {
            // Streamed to disk tensor by tensor from the parameters' and the optimizer's own
            // storage: no copy of either in memory.
            let weights = trainer.model.weights_view()?;
            let config = trainer.model_config().clone();
            checkpoint::save(dir, state, |d| {
                hindsight_policy::save_hf_checkpoint(d, &config, &weights, tokenizer)?;
                trainer
                    .optimizer
                    .save_state(&d.join(checkpoint::OPTIMIZER_FILE))
            })
        })?;
        self.committed = state.last_batch_id;
        self.checkpointed_step = state.step;
        info!(path = %path.display(), step = state.step, through_batch = state.last_batch_id, "checkpoint written");
        Ok(true)
    }
}

/// Tells the replay server that the newest checkpoint covers every batch up to `through`
/// (best effort: a lost commit is repeated by the next RegisterLearner).
async fn commit(client: &mut Replay, args: &LearnerArgs, incarnation: &str, state: &TrainerState) {
    let req = CommitBatchesRequest {
        learner_id: args.learner_id.clone(),
        incarnation: incarnation.to_owned(),
        through_batch_id: state.last_batch_id,
        learner_step: state.step,
        policy_version: state.policy_version,
    };
    match tokio::time::timeout(Duration::from_secs(10), client.commit_batches(req)).await {
        Ok(Ok(_)) => info!(
            through_batch = state.last_batch_id,
            "checkpoint committed to the replay server"
        ),
        Ok(Err(e)) => warn!(error = %e, "CommitBatches failed; the next registration repeats it"),
        Err(_) => warn!("CommitBatches timed out; the next registration repeats it"),
    }
}

/// The learner's side of the exactly-once protocol (ARCHITECTURE.md): register, stream the
/// batches after the ones in the weights, train, publish, ack, checkpoint and commit; on any
/// break, back off and register again from where the weights are.
#[allow(clippy::too_many_arguments)]
async fn train_loop(
    args: &LearnerArgs,
    leader: &ranks::Leader,
    trainer: &mut Trainer,
    store: &WeightStore,
    state: &mut TrainerState,
    step_tx: &watch::Sender<u64>,
    step_log: &mut Option<std::fs::File>,
    mut stop: watch::Receiver<bool>,
    tokenizer: &hindsight_policy::ChatTokenizer,
    security: &hindsight_service::ClientSecurity,
    health: &hindsight_service::GrpcHealth,
) -> Result<()> {
    let mut lp = Loop {
        args,
        step_tx,
        step_log,
        tokenizer,
        committed: state.last_batch_id,
        checkpointed_step: state.step,
    };
    let mut backoff = Backoff::new();
    let mut client = tokio::select! {
        c = connect_replay(&args.replay, security) => c?,
        _ = stop.wait_for(|s| *s) => return Ok(()),
    };
    let mut incarnation = String::new();
    let done = |state: &TrainerState| args.max_steps > 0 && state.step >= args.max_steps;
    'session: while !*stop.borrow() && !done(state) {
        let registered = client
            .register_learner(RegisterLearnerRequest {
                learner_id: args.learner_id.clone(),
                learner_step: state.step,
                policy_version: state.policy_version,
                committed_through_batch_id: lp.committed,
                trained_through_batch_id: state.last_batch_id,
                model_fingerprint: store.model_fingerprint().to_owned(),
            })
            .await;
        let reg = match registered {
            Ok(r) => r.into_inner(),
            Err(e) if transient(&e) => {
                warn!(code = ?e.code(), error = %e.message(), "replay server not answering RegisterLearner; retrying");
                if !backoff.wait(&mut stop).await {
                    break;
                }
                continue;
            }
            Err(e) => bail!("the replay server refused this learner: {}", e.message()),
        };
        incarnation = reg.incarnation;
        // The weights we hold are published at once (version 0 included): an actor without
        // a model of its own waits for them.
        if reg.policy_version != state.policy_version
            || store.latest_version() != reg.policy_version
            || !store.has_published()
        {
            if reg.policy_version != state.policy_version {
                info!(
                    from = state.policy_version,
                    to = reg.policy_version,
                    "resumed weights are published under a fresh version (versions are never reused)"
                );
            }
            state.policy_version = reg.policy_version;
            let payload = tokio::task::block_in_place(|| trainer.export_weights())?;
            store.publish(state.policy_version, state.step, payload);
        }
        info!(%incarnation, step = state.step, policy_version = state.policy_version,
            trained_through = state.last_batch_id, "registered with the replay server");
        // The weights actors should follow are published (version 0: the base model every
        // process loads itself): ready, unless already stopping.
        if !*stop.borrow() {
            health.serving().await;
        }
        let request = BatchStreamRequest {
            learner_id: args.learner_id.clone(),
            rank: 0,
            world_size: leader.world_size(),
            incarnation: incarnation.clone(),
            trained_through_batch_id: state.last_batch_id,
            prefetch: args.prefetch,
        };
        let opened = tokio::select! {
            r = client.stream_batches(request) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let mut stream = match opened {
            Ok(s) => s.into_inner(),
            Err(e) => {
                warn!(code = ?e.code(), error = %e.message(), "StreamBatches failed; registering again");
                if !backoff.wait(&mut stop).await {
                    break;
                }
                continue;
            }
        };
        // Idle: waiting for a batch to train; busy: from its arrival until the next wait.
        let mut waiting_since = Instant::now();
        loop {
            let next = tokio::select! {
                b = stream.next() => b,
                _ = stop.wait_for(|s| *s) => break 'session,
            };
            let batch = match next {
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    warn!(code = ?e.code(), error = %e.message(), "batch stream broke; registering again");
                    if !backoff.wait(&mut stop).await {
                        break 'session;
                    }
                    continue 'session;
                }
                None => {
                    warn!("batch stream ended; registering again");
                    if !backoff.wait(&mut stop).await {
                        break 'session;
                    }
                    continue 'session;
                }
            };
            backoff.reset();
            if batch.batch_id <= state.last_batch_id {
                warn!(
                    batch_id = batch.batch_id,
                    trained_through = state.last_batch_id,
                    "skipping a batch already in the weights"
                );
                continue;
            }
            let busy_since = Instant::now();
            ::metrics::histogram!(metrics::IDLE_SECONDS)
                .record((busy_since - waiting_since).as_secs_f64());
            let step = state.step + 1;
            // CPU-heavy: keep it off the async workers.
            let (stats, payload) =
                tokio::task::block_in_place(|| -> Result<(StepStats, Vec<u8>)> {
                    // Older versions go now, not after the step: a step's peak memory
                    // (gradients, activations) then never meets keep_versions payloads.
                    store.make_room();
                    let stats = leader.step(trainer, &batch, step, state.policy_version)?;
                    let payload = trainer.export_weights()?;
                    Ok((stats, payload))
                })?;
            state.step = step;
            state.policy_version += 1;
            state.last_batch_id = batch.batch_id;
            state.tokens_trained += stats.response_tokens as u64;
            state.generated_responses += stats.step_generated_responses;
            let mut stats = stats;
            stats.policy_version = state.policy_version;
            stats.generated_responses = state.generated_responses;
            let mut seqs: Vec<u64> = batch
                .samples
                .iter()
                .filter_map(|s| s.provenance.as_ref().map(|p| p.group_seq))
                .collect();
            seqs.sort_unstable();
            seqs.dedup();
            stats.group_seqs = seqs;
            store.publish(state.policy_version, state.step, payload);
            lp.step_tx.send_replace(state.step);
            record_metrics(&stats);
            info!(
                step = state.step,
                batch_id = batch.batch_id,
                loss = stats.loss,
                reward = stats.reward_mean,
                success = stats.success_rate,
                replays = stats.replay_samples,
                grad_norm = stats.grad_norm,
                secs = format!("{:.2}", stats.step_seconds),
                policy_version = state.policy_version,
                "step done"
            );
            if let Some(f) = lp.step_log.as_mut() {
                writeln!(f, "{}", serde_json::to_string(&stats)?)?;
                f.flush()?;
            }
            let acked = client
                .ack_batch(AckBatchRequest {
                    learner_id: args.learner_id.clone(),
                    batch_id: batch.batch_id,
                    learner_step: state.step,
                    policy_version: state.policy_version,
                    incarnation: incarnation.clone(),
                })
                .await;
            let last = done(state);
            let due = last
                || (args.checkpoint_every > 0 && state.step.is_multiple_of(args.checkpoint_every));
            if due && lp.checkpoint(trainer, state)? && acked.is_ok() {
                commit(&mut client, args, &incarnation, state).await;
            }
            waiting_since = Instant::now();
            ::metrics::histogram!(metrics::BUSY_SECONDS)
                .record((waiting_since - busy_since).as_secs_f64());
            if let Err(e) = acked {
                // The weights hold the step either way; registering again tells the server.
                warn!(code = ?e.code(), error = %e.message(), "AckBatch failed; registering again");
                if !backoff.wait(&mut stop).await {
                    break 'session;
                }
                continue 'session;
            }
            if last {
                info!(step = state.step, "reached --max-steps");
                break 'session;
            }
        }
    }
    // Stopping (SIGTERM) or done: the steps since the last checkpoint are not thrown away.
    if state.step > lp.checkpointed_step
        && lp.checkpoint(trainer, state)?
        && !incarnation.is_empty()
    {
        commit(&mut client, args, &incarnation, state).await;
    }
    Ok(())
}

fn record_metrics(s: &StepStats) {
    use ::metrics::{counter, gauge, histogram};
    gauge!(metrics::STEP).set(s.step as f64);
    counter!(metrics::STEPS).increment(1);
    gauge!(metrics::LOSS).set(s.loss);
    histogram!(metrics::STEP_SECONDS).record(s.step_seconds);
    gauge!(metrics::GRAD_NORM).set(s.grad_norm);
    counter!(metrics::TRAIN_TOKENS).increment(s.response_tokens as u64);
    gauge!(metrics::TRAIN_TOKENS_PER_SECOND).set(s.train_tokens_per_second);
    gauge!(metrics::REWARD_MEAN).set(s.reward_mean);
    gauge!(metrics::SUCCESS_RATE).set(s.success_rate);
    counter!(metrics::SAMPLES, "kind" => "original").increment(u64::from(s.original_samples));
    counter!(metrics::SAMPLES, "kind" => "replay").increment(u64::from(s.replay_samples));
    gauge!(metrics::CLIP_FRACTION).set(s.clip_fraction);
    for (kind, fraction) in [
        ("original", s.clip_fraction_original),
        ("replay", s.clip_fraction_replay),
    ] {
        if let Some(f) = fraction {
            gauge!(metrics::CLIP_FRACTION_BY_KIND, "kind" => kind).set(f);
        }
    }
    counter!(metrics::GENERATED_RESPONSES).increment(s.step_generated_responses);
}

#[cfg(test)]
mod args_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LearnerArgs,
    }

    #[test]
    fn clap_defaults_match_default_impl() {
        let parsed = Cli::parse_from(["learner"]).args;
        assert_eq!(
            format!("{parsed:?}"),
            format!("{:?}", LearnerArgs::default())
        );
    }

    #[test]
    fn renders_to_flags_that_parse_back() {
        let p = |s: &str| Some(PathBuf::from(s));
        hindsight_service::assert_round_trip(&LearnerArgs {
            replay: "https://replay:50051".into(),
            listen: "10.0.0.2:6000".parse().unwrap(),
            model: "/m/model.gguf".into(),
            cache_dir: p("/c"),
            lr: 3e-5,
            weight_decay: 0.5,
            max_grad_norm: 2.5,
            advantage: AdvantageKind::Grpo,
            reference_model: true,
            kl_beta: 0.01,
            clip: 0.3,
            dual_clip: 4.0,
            micro_batch: 3,
            mini_batches: 2,
            device: "cuda:1".into(),
            max_steps: 10,
            checkpoint_dir: p("/ck"),
            checkpoint_every: 7,
            resume: true,
            step_log: p("/s.jsonl"),
            keep_versions: 4,
            shared_weights_dir: p("/dev/shm/weights"),
            learner_id: "learner-x".into(),
            rank: Some(1),
            linger: true,
            prefetch: 5,
            server_security: hindsight_service::ServerSecurityArgs {
                tls_cert: p("/s/c.pem"),
                tls_key: p("/s/k.pem"),
                auth_tokens: p("/s/t.txt"),
                insecure: true,
            },
            client_security: hindsight_service::ClientSecurityArgs {
                tls_ca: p("/s/ca.pem"),
                token_file: p("/s/learner.token"),
                token: Some("t".into()),
                tls_domain: Some("replay".into()),
            },
            world_size: Some(2),
            rendezvous: Some("learner-0.learner:29500".into()),
            collective_timeout_secs: 30,
            rendezvous_timeout_secs: 60,
            digest_every: 5,
            collective: ranks::Backend::Nccl,
            local_ranks: 8,
            node_rank: Some(1),
            shutdown: hindsight_service::ShutdownArgs {
                shutdown_timeout_secs: 9,
            },
        });
    }
}
