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
pub mod codec;
pub mod config;
pub mod metrics;
pub mod prompts;
pub mod rollout;
pub mod service;
pub mod state;
pub mod wal;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hindsight_proto::v1::health_server::HealthServer;
use hindsight_proto::v1::replay_server::ReplayServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt as _;
use tracing::{info, warn};

pub use codec::{ByteCodec, PromptCodec};
pub use config::{Hindsight, ReplayArgs};

use prompts::PromptSet;
use service::{HealthService, ReplayService, Shared};
use state::{Settings, State};
use wal::{Recovered, Wal};

/// Binds `args.listen` and serves until `shutdown` resolves.
pub async fn run(
    args: ReplayArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.validate()?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the replay server to {}", args.listen))?;
    serve(args, listener, shutdown).await
}

/// Serves on `listener` (tests bind port 0) until `shutdown` resolves, with the tokenizer
/// of `args.model`.
pub async fn serve(
    args: ReplayArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.validate()?;
    let (model, cache_dir) = (args.model.clone(), args.cache_dir.clone());
    let codec =
        tokio::task::spawn_blocking(move || codec::load_codec(&model, cache_dir.as_deref()))
            .await
            .context("tokenizer loading task failed")??;
    serve_with_codec(args, codec, listener, shutdown).await
}

/// [`serve`] with a given prompt codec (tests may use a trivial one).
pub async fn serve_with_codec(
    args: ReplayArgs,
    codec: Arc<dyn PromptCodec>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.validate()?;
    metrics::describe();

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
    let prompts = Arc::new(load.await.context("prompt loading task failed")??);

    let (wal, recovered) = match args.data_dir.clone() {
        Some(dir) => {
            let (wal, recovered) = tokio::task::spawn_blocking(move || Wal::open(&dir))
                .await
                .context("write-ahead log task failed")?
                .context("opening the write-ahead log")?;
            (Some(wal), recovered)
        }
        None => (None, Recovered::default()),
    };

    let instance = format!("{:08x}", rand::random::<u32>());
    let mut state = State::new(
        Settings::from_args(&args),
        prompts.clone(),
        codec,
        instance.clone(),
        recovered.progress,
        recovered.next_seq,
    );
    if let Some(path) = args.batch_log.clone() {
        let log = tokio::task::spawn_blocking(move || batch_log::BatchLog::open(&path))
            .await
            .context("batch log task failed")??;
        state.set_batch_log(log);
    }
    let restored = recovered.groups.len();
    let mut dropped = Vec::new();
    for (seq, group) in recovered.groups {
        if let Err(why) = state.restore_group(seq, group) {
            warn!(role = "replay-server", seq, %why, "dropping a logged group");
            dropped.push(seq);
        }
    }
    dropped.extend(state.build_batches());
    let mut wal = wal;
    if let Some(w) = wal.as_mut() {
        if !dropped.is_empty() {
            w.append_consumed(&dropped, state.progress())
                .context("updating the write-ahead log")?;
        }
    }
    let lease_timeout_ms = args.lease_timeout_ms;
    info!(role = "replay-server", instance = %instance, prompts = prompts.len(), restored,
        learner_step = state.progress().learner_step, hindsight = ?args.hindsight,
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "replay server ready");

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_tx = Arc::new(shutdown_tx);
    let shared = Shared::new(state, wal, format!("replay-{instance}"), shutdown_rx);
    let reaper = tokio::spawn(service::reaper(shared.clone(), lease_timeout_ms));

    let signal = {
        let shutdown_tx = shutdown_tx.clone();
        async move {
            shutdown.await;
            info!(role = "replay-server", "shutting down");
            shutdown_tx.send_replace(true);
        }
    };
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            let _ = stream.set_nodelay(true);
        }
        conn
    });
    let max = args.max_message_bytes;
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(
            ReplayServer::new(ReplayService::new(shared.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(HealthServer::new(HealthService::new(shared.clone())))
        .serve_with_incoming_shutdown(incoming, signal)
        .await;
    shutdown_tx.send_replace(true);
    let _ = reaper.await;
    let log = shared.take_batch_log();
    if let Some(mut log) = log {
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
    }
    info!(role = "replay-server", "stopped");
    result.context("replay gRPC server failed")
}
