//! The Hindsight replay server: prompt leases, rollout verification, HiR replay selection
//! and rewriting, batch assembly with a staleness bound, and batch service to the learner.
//!
//! Data path: actors lease prompts ([`state::State::lease`]), stream back groups of
//! responses that are validated, verified constraint by constraint and (with a data
//! directory) written to a [`wal`] before they are acknowledged; complete windows of
//! `prompts_per_batch` groups become training batches ([`assembly`]) that the learner
//! streams and acknowledges. [`serve`] runs it all on a listener until the shutdown
//! future resolves, then drains gracefully.

pub mod assembly;
pub mod batch_log;
pub mod batches;
pub mod codec;
pub mod config;
pub mod error;
pub mod metrics;
pub mod prompts;
pub mod rollout;
pub mod service;
pub mod state;
pub mod wal;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use hindsight_proto::v1::replay_server::ReplayServer;
use hindsight_service::ConfigResultExt as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt as _;
use tonic::server::NamedService;
use tracing::{info, warn};

pub use codec::{ByteCodec, PromptCodec};
pub use config::{Hindsight, ReplayArgs, Reward};

use prompts::PromptSet;
use service::{ReplayService, Shared};
use state::{Settings, State, WaitingGroup};
use wal::{Entry, LogState, SeqList, Wal};

/// Binds `args.listen` and serves until `shutdown` resolves.
pub async fn run(
    args: ReplayArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.validate().config_err()?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the replay server to --listen {}", args.listen))
        .config_err()?;
    serve(args, listener, shutdown).await
}

/// Serves on `listener` (tests bind port 0) until `shutdown` resolves, with the tokenizer
/// of `args.model`.
pub async fn serve(
    args: ReplayArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.validate().config_err()?;
    let (model, cache_dir) = (args.model.clone(), args.cache_dir.clone());
    let codec =
        tokio::task::spawn_blocking(move || codec::load_codec(&model, cache_dir.as_deref()))
            .await
            .context("tokenizer loading task failed")?
            .with_context(|| format!("loading the tokenizer of --model {}", args.model))
            .config_err()?;
    serve_with_codec(args, codec, listener, shutdown).await
}

/// Rebuilds the state from the log's fold: waiting groups and batch compositions are read
/// back once to recompute their verdicts (memory keeps the index only). A waiting group
/// whose prompt left the prompt set is dropped (logged); a batch that cannot be rebuilt
/// exactly is a start-up error, since a learner may have trained it.
fn recover(
    state: &mut State,
    prompts: &PromptSet,
    log: &LogState,
    wal: &Wal,
    codec: &Arc<dyn PromptCodec>,
    responses: usize,
) -> anyhow::Result<Vec<u64>> {
    let index = |seq: u64, meta: wal::GroupMeta| -> Result<WaitingGroup, String> {
        let logged = wal::read_group(wal.dir(), meta.location)
            .map_err(|e| format!("cannot read group {seq} back: {e}"))?;
        let group = logged
            .group
            .ok_or_else(|| format!("group {seq} has no payload"))?;
        let entry = prompts.by_id(&group.prompt_id).cloned().ok_or_else(|| {
            format!(
                "prompt {:?} is not in the prompt set any more",
                group.prompt_id
            )
        })?;
        if group.responses.len() != responses {
            return Err(format!(
                "group {seq} has {} responses, the server now expects {responses}",
                group.responses.len()
            ));
        }
        let scores = rollout::score_group(&entry, &group, codec.as_ref());
        Ok(WaitingGroup {
            seq,
            entry,
            location: meta.location,
            policy_version: group.policy_version,
            scores,
        })
    };
    for record in log.batches.values() {
        let mut groups = Vec::with_capacity(record.seqs.len());
        for seq in &record.seqs {
            let Some(meta) = log.groups.get(seq) else {
                bail!(
                    "batch {} names group {seq}, which the log does not have",
                    record.batch_id
                );
            };
            groups.push(index(*seq, *meta).map_err(|why| {
                anyhow::anyhow!(
                    "batch {} cannot be rebuilt as it was served ({why}); restart with the \
                     settings and prompts it was built with",
                    record.batch_id
                )
            })?);
        }
        state.restore_batch(record.clone(), groups);
    }
    let mut dropped = Vec::new();
    for (seq, meta) in log.waiting() {
        match index(seq, meta) {
            Ok(group) => state.restore_waiting(group),
            Err(why) => {
                warn!(seq, %why, "dropping a logged group");
                dropped.push(seq);
            }
        }
    }
    Ok(dropped)
}

/// The highest batch id in an existing batch log (so re-served batches are not logged twice).
fn batch_log_high_water(path: &Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0;
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["batch_id"].as_u64())
        .max()
        .unwrap_or(0)
}

/// [`serve`] with a given prompt codec (tests may use a trivial one).
pub async fn serve_with_codec(
    args: ReplayArgs,
    codec: Arc<dyn PromptCodec>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.validate().config_err()?;
    // Refuse a half-configured security set-up before anything is loaded.
    let security = hindsight_service::ServerSecurity::from_args(&args.security)?;
    if let Some(dir) = &args.data_dir {
        hindsight_service::check_writable_dir("--data-dir", dir)?;
    }
    metrics::describe();
    metrics::init(args.max_staleness);

    let load = {
        let (path, count, seed, codec) = (
            args.prompts.clone(),
            args.num_prompts,
            args.seed,
            codec.clone(),
        );
        tokio::task::spawn_blocking(move || {
            PromptSet::load(path.as_deref(), count, seed, codec.as_ref())
        })
    };
    let prompts = Arc::new(
        load.await
            .context("prompt loading task failed")?
            .context("loading the prompts")
            .config_err()?,
    );

    // Without --data-dir the log lives in a temporary directory removed at exit.
    let (dir, _temp) = match args.data_dir.clone() {
        Some(dir) => (dir, None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("hindsight-replay-")
                .tempdir()
                .context("creating a temporary write-ahead log directory")?;
            warn!(dir = %temp.path().display(), "no --data-dir: the write-ahead log is temporary; nothing survives a restart");
            (temp.path().to_owned(), Some(temp))
        }
    };
    let segment_bytes = args.segment_bytes;
    let started = std::time::Instant::now();
    let (wal, log) = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || Wal::start(&dir, segment_bytes))
            .await
            .context("write-ahead log task failed")?
            .context("opening the write-ahead log")?
    };

    let instance = format!("{:08x}", rand::random::<u32>());
    let settings = Settings::from_args(&args);
    let responses = settings.responses;
    let mut state = State::new(
        settings,
        prompts.clone(),
        codec.clone(),
        instance.clone(),
        &log,
    );
    let (state, dropped) = {
        let (wal, codec, prompts) = (wal.clone(), codec.clone(), prompts.clone());
        tokio::task::spawn_blocking(move || {
            recover(&mut state, &prompts, &log, &wal, &codec, responses).map(|d| (state, d))
        })
        .await
        .context("recovery task failed")??
    };
    if !dropped.is_empty() {
        wal.write(vec![Entry::Dropped(SeqList { seqs: dropped })])
            .await
            .context("updating the write-ahead log")?;
    }
    let batch_log = match args.batch_log.clone() {
        Some(path) => {
            let opened = tokio::task::spawn_blocking(move || {
                let high = batch_log_high_water(&path);
                batch_log::BatchLog::open(&path).map(|log| (log, high))
            })
            .await
            .context("batch log task failed")??;
            Some(opened)
        }
        None => None,
    };
    let status = {
        let mut state = state;
        let s = state.status(service::now_ms());
        (state, s)
    };
    let (state, summary) = status;
    info!(instance = %instance, prompts = prompts.len(), waiting = summary.groups_waiting,
        uncommitted_batches = summary.pending_batches, committed_through = summary.committed_through_batch_id,
        recovery_seconds = started.elapsed().as_secs_f64(), hindsight = ?args.hindsight, reward = ?args.reward,
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "replay server ready");

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_tx = Arc::new(shutdown_tx);
    let shared = Shared::new(
        state,
        wal.clone(),
        codec,
        args.temperature,
        args.reward,
        batch_log,
        shutdown_rx,
    );
    let reaper = tokio::spawn(service::reaper(shared.clone()));

    // Standard gRPC health: NOT_SERVING until here (the log is replayed and the state
    // rebuilt), SERVING while serving, NOT_SERVING again from the moment it drains.
    let (health, health_server) =
        hindsight_service::GrpcHealth::new(&[<ReplayServer<ReplayService> as NamedService>::NAME])
            .await;
    let drain_bound = args.shutdown.drain_bound();
    let (drain_started_tx, mut drain_started_rx) = watch::channel(false);
    let signal = {
        let shutdown_tx = shutdown_tx.clone();
        let health = health.clone();
        async move {
            shutdown.await;
            info!("shutting down: NOT_SERVING, no new connections, draining streams");
            health.draining().await;
            shutdown_tx.send_replace(true);
            drain_started_tx.send_replace(true);
        }
    };
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            let _ = stream.set_nodelay(true);
        }
        conn
    });
    let max = args.max_message_bytes;
    let server = security
        .server()?
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(
            ReplayServer::new(ReplayService::new(shared.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(health_server)
        .serve_with_incoming_shutdown(incoming, signal);
    health.serving().await;
    // A client that keeps a call open past the bound does not hold the exit: every
    // acknowledged group is already in the log, so the rest of the drain is cut short.
    let bounded = async {
        let _ = drain_started_rx.wait_for(|s| *s).await;
        tokio::time::sleep(drain_bound).await;
    };
    let mut cut_short = false;
    let result = tokio::select! {
        r = server => r,
        _ = bounded => {
            warn!(bound_secs = drain_bound.as_secs_f64(), "calls still open after the drain bound; leaving them");
            cut_short = true;
            Ok(())
        }
    };
    shutdown_tx.send_replace(true);
    let _ = reaper.await;
    drop(shared);
    // Everything queued is written and fsynced before the process exits. Calls left open at
    // the drain bound still hold the log: then it is not waited for (every acknowledged
    // group is already fsynced, and recovery drops a torn last record).
    if cut_short {
        drop(wal);
    } else {
        let closed = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::task::spawn_blocking(move || wal.close()),
        )
        .await;
        if closed.is_err() {
            warn!("the write-ahead log writer did not stop within 5 s; exiting without it");
        }
    }
    info!("stopped");
    result.context("replay gRPC server failed")
}
