//! The Hindsight actor (rollout worker): leases prompts from the replay server, generates a
//! group of responses per prompt with the candle policy (keeping every token's sampled log-prob
//! and the entropy of its sampling distribution), streams the groups back over gRPC, and swaps
//! in newer weight versions from the learner between generation batches.
//!
//! Actors are stateless and elastic: start or kill any number at any time. A killed actor's
//! leases expire on the replay server and its prompts are handed to another actor.

pub mod metrics;
pub mod weights;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hindsight_policy::{Device, Sampler, SamplingParams};
use hindsight_proto::v1::health_server::{Health, HealthServer};
use hindsight_proto::v1::replay_client::ReplayClient;
use hindsight_proto::v1::weights_client::WeightsClient;
use hindsight_proto::v1::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse, LeaseRequest,
    ReleaseLeasesRequest, Response as RolloutResponse, RolloutAck, RolloutGroup,
};
use tokio::sync::{mpsc, watch};

use tracing::{info, warn};

/// Command-line / environment configuration of `hindsight actor`.
#[derive(clap::Args, Clone, Debug)]
pub struct ActorArgs {
    /// Replay server to lease prompts from and stream rollouts to.
    #[arg(
        long,
        env = "HINDSIGHT_REPLAY_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub replay: String,
    /// Learner whose Weights service publishes new versions.
    #[arg(
        long,
        env = "HINDSIGHT_LEARNER_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub learner: String,
    /// Model to generate with, for local runs: "tiny", "smollm2", a .gguf path or a
    /// checkpoint directory; its fingerprint must match the learner's. Without it the actor
    /// takes the model (architecture, tokenizer, chat template, weights) from the learner.
    #[arg(long, env = "HINDSIGHT_MODEL")]
    pub model: Option<String>,
    /// Where downloaded models are cached (default: $HINDSIGHT_CACHE or ~/.cache/hindsight).
    #[arg(long, env = "HINDSIGHT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// This actor's id (default: actor-<hostname>-<pid>).
    #[arg(long, env = "HINDSIGHT_ACTOR_ID")]
    pub actor_id: Option<String>,
    /// Prompts leased (and generated together in one batch) at a time.
    #[arg(long, env = "HINDSIGHT_PROMPTS_PER_LEASE", default_value_t = 2)]
    pub prompts_per_lease: u32,
    /// Base seed of the sampler (mixed with the actor id and the batch number).
    #[arg(long, env = "HINDSIGHT_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Optional gRPC Health endpoint of this actor.
    #[arg(long, env = "HINDSIGHT_ACTOR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Precision of the generation weights: `f32` (log-probs match the learner's to ~1e-5)
    /// or `bf16` (bf16 weights and inputs, f32 sums: faster, see README for the mismatch).
    #[arg(long, env = "HINDSIGHT_ACTOR_PRECISION", default_value = "f32")]
    pub precision: hindsight_policy::Precision,
    /// Device to generate on: `cpu` (the continuous-batching engine) or `cuda` / `cuda:N`
    /// (candle's CUDA forward; needs a `--features cuda` build).
    #[arg(long, env = "HINDSIGHT_ACTOR_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Sequences generated at once; as one finishes, the next response of the lease takes
    /// its slot (continuous batching).
    #[arg(long, env = "HINDSIGHT_ACTOR_MAX_BATCH", default_value_t = hindsight_policy::sampler::DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// How this actor proves itself to the replay server and the learner (`--tls-ca`,
    /// `--token-file`; `hindsight certs` makes them).
    #[command(flatten)]
    pub security: hindsight_service::ClientSecurityArgs,
    /// Stop after this many accepted groups (0 = run until stopped).
    #[arg(long, env = "HINDSIGHT_MAX_GROUPS", default_value_t = 0)]
    pub max_groups: u64,
}

fn default_actor_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host = if host.is_empty() {
        "local".to_string()
    } else {
        host
    };
    format!("actor-{host}-{}", std::process::id())
}

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 of the pair: decorrelates seeds of different actors and batches.
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct ActorHealth {
    started: Instant,
    id: String,
    version: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Health for ActorHealth {
    async fn check(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
            role: "actor".into(),
            instance_id: self.id.clone(),
            build_version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            policy_version: self.version.load(Ordering::Relaxed),
            details: Default::default(),
        }))
    }
}

/// A channel that carries this actor's credentials.
type Authed = hindsight_service::AuthChannel;

async fn connect(security: &hindsight_service::ClientSecurity, url: &str) -> Result<Authed> {
    security
        .connect_authed(url, 100)
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// An open rollout stream: groups go in through `tx`, acks come back in order.
struct RolloutStream {
    tx: mpsc::Sender<RolloutGroup>,
    acks: tonic::Streaming<RolloutAck>,
}

async fn open_stream(client: &mut ReplayClient<Authed>) -> Result<RolloutStream> {
    let (tx, rx) = mpsc::channel(64);
    let acks = client
        .stream_rollouts(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("opening StreamRollouts")?
        .into_inner();
    Ok(RolloutStream { tx, acks })
}

/// The model an actor generates with, once started.
struct StartedModel {
    name: String,
    fingerprint: String,
    /// The learner's version the sampler holds (`None`: local weights, version 0).
    version: Option<u64>,
}

/// Loads `--model` or receives the learner's model, builds the sampler, and starts the
/// background weight follower. An actor without `--model` waits for the learner's first
/// published version; with `--model` it generates with its local weights (version 0) at
/// once.
async fn start_model(
    args: &ActorArgs,
    device: &Device,
    client: &mut weights::Client,
    stop: watch::Receiver<bool>,
) -> Result<(StartedModel, Sampler, weights::Follower)> {
    let mut backoff = Duration::from_millis(200);
    let learner = loop {
        match weights::learner_model(client).await {
            Ok(m) => break m,
            Err(e) if args.model.is_none() => {
                warn!(
                    error = format!("{e:#}"),
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot get the learner's model yet; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            // A local model works without the learner's description.
            Err(e) => {
                warn!(error = format!("{e:#}"), "the learner does not describe its model; using --model unchecked until its manifest names one");
                break None;
            }
        }
    };
    match &args.model {
        Some(spec) => {
            let cache = args
                .cache_dir
                .clone()
                .unwrap_or_else(hindsight_policy::default_cache_dir);
            let spec = spec.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                hindsight_policy::load(&spec, &cache, &Device::Cpu)
            })
            .await??;
            let fingerprint = hindsight_policy::fingerprint(&loaded.config, &loaded.tokenizer)?;
            if let Some(l) = &learner {
                anyhow::ensure!(
                    l.fingerprint == fingerprint,
                    "--model {} has fingerprint {fingerprint}, the learner's model ({}) has {}: \
                     drop --model to use the learner's, or give the learner's model",
                    args.model.as_deref().unwrap_or_default(),
                    l.name,
                    l.fingerprint
                );
            }
            let mut sampler = Sampler::with_precision(
                &loaded.config,
                &loaded.weights,
                loaded.tokenizer.stop_token_ids(),
                device,
                args.precision,
            )?;
            sampler.set_max_batch(args.max_batch);
            let spec = weights::FollowSpec {
                fingerprint: fingerprint.clone(),
                config: loaded.config.clone(),
                device: device.clone(),
                precision: args.precision,
            };
            // Local weights stand for version 0 (the learner's base model).
            let follower = weights::Follower::start(client.clone(), spec, Some(0), stop);
            Ok((
                StartedModel {
                    name: loaded.name,
                    fingerprint,
                    version: None,
                },
                sampler,
                follower,
            ))
        }
        None => {
            let l = learner.context("the learner does not describe its model (an older learner?): give the actor --model")?;
            info!(model = %l.name, fingerprint = %hindsight_policy::fingerprint::short(&l.fingerprint), "using the learner's model; waiting for its weights");
            let spec = weights::FollowSpec {
                fingerprint: l.fingerprint.clone(),
                config: l.config.clone(),
                device: device.clone(),
                precision: args.precision,
            };
            let follower = weights::Follower::start(client.clone(), spec, None, stop);
            let first = follower.next().await?;
            let v = first.version;
            let mut sampler = Sampler::from_prepared(
                &l.config,
                l.tokenizer.stop_token_ids(),
                device,
                args.precision,
                first.weights,
            )?;
            sampler.set_max_batch(args.max_batch);
            ::metrics::counter!(metrics::WEIGHT_UPDATES).increment(1);
            Ok((
                StartedModel {
                    name: l.name,
                    fingerprint: l.fingerprint,
                    version: Some(v),
                },
                sampler,
                follower,
            ))
        }
    }
}

/// Installs a prepared version between two generation batches (O(1) on the CPU).
fn install(sampler: &mut Sampler, update: weights::Update, version: &AtomicU64) -> Result<()> {
    let from = version.load(Ordering::Relaxed);
    let started = Instant::now();
    sampler
        .install(update.weights)
        .with_context(|| format!("installing weights version {}", update.version))?;
    let pause = started.elapsed().as_secs_f64();
    version.store(update.version, Ordering::Relaxed);
    ::metrics::gauge!(metrics::POLICY_VERSION).set(update.version as f64);
    ::metrics::counter!(metrics::WEIGHT_UPDATES).increment(1);
    ::metrics::histogram!(metrics::WEIGHT_FETCH_SECONDS)
        .record(update.seen.elapsed().as_secs_f64());
    info!(
        policy_version = update.version,
        from,
        fetch_secs = format!("{:.2}", update.fetch_secs),
        prepare_secs = format!("{:.2}", update.prepare_secs),
        install_ms = format!("{:.1}", pause * 1000.0),
        "weights updated"
    );
    Ok(())
}

/// Runs the actor until `shutdown` resolves (or `--max-groups` is reached).
pub async fn run(
    args: ActorArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use tracing::Instrument;
    metrics::describe();
    let actor_id = args.actor_id.clone().unwrap_or_else(default_actor_id);
    let span = tracing::info_span!("actor", actor_id = %actor_id);
    run_actor(args, actor_id, shutdown).instrument(span).await
}

async fn run_actor(
    args: ActorArgs,
    actor_id: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let device = hindsight_policy::parse_device(&args.device)?;
    let security = hindsight_service::ClientSecurity::from_args(&args.security)?;
    anyhow::ensure!(args.max_batch > 0, "--max-batch must be at least 1");
    let version = Arc::new(AtomicU64::new(0));
    ::metrics::gauge!(metrics::POLICY_VERSION).set(0.0);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    if let Some(addr) = args.listen {
        let health = ActorHealth {
            started: Instant::now(),
            id: actor_id.clone(),
            version: version.clone(),
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let mut stop = stop_rx.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(HealthServer::new(health))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                ),
        );
    }

    let mut replay = ReplayClient::new(connect(&security, &args.replay).await?)
        .max_decoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES);
    let mut weights_client = WeightsClient::new(connect(&security, &args.learner).await?)
        .max_decoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES);

    // The model: local files (`--model`) or the learner's description; either way its
    // fingerprint is checked against the learner's and stated with every lease and group.
    let (model, mut sampler, follower) = tokio::select! {
        m = start_model(&args, &device, &mut weights_client, stop_rx.clone()) => m?,
        _ = stop_rx.wait_for(|s| *s) => return Ok(()),
    };
    let fingerprint = model.fingerprint;
    if let Some(v) = model.version {
        version.store(v, Ordering::Relaxed);
        ::metrics::gauge!(metrics::POLICY_VERSION).set(v as f64);
    }
    info!(model = %model.name, fingerprint = %hindsight_policy::fingerprint::short(&fingerprint),
        policy_version = version.load(Ordering::Relaxed), precision = %args.precision,
        max_batch = args.max_batch, device = %args.device, "actor ready");
    let mut stream: Option<RolloutStream> = None;
    let mut accepted_groups = 0u64;
    let mut batch_no = 0u64;
    let mut paused_since: Option<Instant> = None;
    let mut lease_failures = 0u32;

    while !*stop_rx.borrow() {
        // 1. A newer version prepared in the background? Swap it in between batches.
        match follower.take() {
            Ok(Some(update)) => install(&mut sampler, update, &version)?,
            Ok(None) => {}
            Err(e) => return Err(e.context("following the learner's weights")),
        }
        let policy_version = version.load(Ordering::Relaxed);

        // 2. Lease work.
        let lease = match replay
            .lease_prompts(LeaseRequest {
                actor_id: actor_id.clone(),
                max_prompts: args.prompts_per_lease,
                policy_version,
                model_fingerprint: fingerprint.clone(),
            })
            .await
        {
            Ok(r) => {
                if let Some(since) = paused_since.take() {
                    info!(
                        paused_secs = format!("{:.1}", since.elapsed().as_secs_f64()),
                        "replay server takes work again"
                    );
                    ::metrics::gauge!(metrics::LEASE_BACKOFF).set(0.0);
                }
                lease_failures = 0;
                r.into_inner()
            }
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                // Back-pressure: enough work waits for the learner. Wait as told.
                let wait_ms = e
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(500)
                    .clamp(10, 10_000);
                if paused_since.is_none() {
                    info!(
                        reason = e.message(),
                        "replay server is full; backing off until the learner catches up"
                    );
                    paused_since = Some(Instant::now());
                    ::metrics::gauge!(metrics::LEASE_BACKOFF).set(1.0);
                }
                ::metrics::counter!(metrics::LEASE_BACKOFF_SECONDS).increment(wait_ms);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {},
                    _ = stop_rx.wait_for(|s| *s) => {},
                }
                continue;
            }
            Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                // Not our model: retrying cannot help.
                return Err(anyhow::anyhow!(
                    "the replay server refused this actor: {}",
                    e.message()
                ));
            }
            Err(e) => {
                lease_failures += 1;
                let wait = Duration::from_millis(200 * (1u64 << lease_failures.min(5)));
                warn!(code = ?e.code(), error = e.message(), retry_in_ms = wait.as_millis() as u64, "LeasePrompts failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {},
                    _ = stop_rx.wait_for(|s| *s) => {},
                }
                continue;
            }
        };
        if lease.prompts.is_empty() {
            let wait = Duration::from_millis(lease.retry_after_ms.clamp(10, 2_000));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {},
                _ = stop_rx.wait_for(|s| *s) => {},
            }
            continue;
        }
        let sampling = lease.sampling.unwrap_or_default();
        let per_prompt = sampling.responses_per_prompt.max(1) as usize;
        let inputs: Vec<Vec<u32>> = lease
            .prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.prompt_token_ids.clone(), per_prompt))
            .collect();
        batch_no += 1;
        let params = SamplingParams {
            temperature: sampling.temperature,
            top_p: if sampling.top_p > 0.0 {
                sampling.top_p
            } else {
                1.0
            },
            max_new_tokens: sampling.max_new_tokens.max(1) as usize,
            seed: mix(
                mix(args.seed, batch_no),
                actor_id.bytes().fold(0u64, |h, b| mix(h, b as u64)),
            ),
        };

        // 3. Generate (CPU-heavy; off the async workers).
        let started = Instant::now();
        let generations = tokio::task::block_in_place(|| sampler.generate(&inputs, &params));
        let generations = match generations {
            Ok(g) => g,
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "generation failed; giving the leases back"
                );
                let ids = lease.prompts.iter().map(|p| p.lease_id.clone()).collect();
                let _ = replay
                    .release_leases(ReleaseLeasesRequest {
                        actor_id: actor_id.clone(),
                        lease_ids: ids,
                    })
                    .await;
                continue;
            }
        };
        let secs = started.elapsed().as_secs_f64();
        let tokens: usize = generations.iter().map(|g| g.token_ids.len()).sum();
        ::metrics::histogram!(metrics::GENERATION_SECONDS).record(secs);
        ::metrics::counter!(metrics::GENERATED_TOKENS).increment(tokens as u64);
        ::metrics::counter!(metrics::RESPONSES).increment(generations.len() as u64);
        ::metrics::gauge!(metrics::TOKENS_PER_SECOND).set(tokens as f64 / secs.max(1e-9));
        info!(
            policy_version,
            prompts = lease.prompts.len(),
            tokens,
            tok_per_s = format!("{:.1}", tokens as f64 / secs.max(1e-9)),
            "generated"
        );

        let mut groups = Vec::with_capacity(lease.prompts.len());
        for (p, gens) in lease.prompts.iter().zip(generations.chunks(per_prompt)) {
            let mut responses = Vec::with_capacity(per_prompt);
            for g in gens {
                // No text: the server decodes the tokens itself (the reward follows them).
                responses.push(RolloutResponse {
                    token_ids: g.token_ids.clone(),
                    logprobs: g.logprobs.clone(),
                    entropies: g.entropies.clone(),
                    finished: g.finished,
                    text: String::new(),
                });
            }
            groups.push(RolloutGroup {
                actor_id: actor_id.clone(),
                prompt_id: p.prompt_id.clone(),
                lease_id: p.lease_id.clone(),
                policy_version,
                responses,
                generation_ms: (secs * 1000.0) as u64,
                model_fingerprint: fingerprint.clone(),
            });
        }

        // 4. Stream the groups; wait for their acks.
        let n = groups.len();
        let mut acked = 0usize;
        for attempt in 0..2 {
            if stream.is_none() {
                match open_stream(&mut replay).await {
                    Ok(s) => stream = Some(s),
                    Err(e) => {
                        warn!(error = format!("{e:#}"), "cannot open the rollout stream");
                        break;
                    }
                }
            }
            let s = stream.as_mut().expect("stream is open");
            let mut failed = false;
            for g in groups.iter().skip(acked) {
                if s.tx.send(g.clone()).await.is_err() {
                    failed = true;
                    break;
                }
            }
            while !failed && acked < n {
                match s.acks.message().await {
                    Ok(Some(ack)) => {
                        acked += 1;
                        if ack.accepted {
                            accepted_groups += 1;
                            tracing::debug!(lease_id = %ack.lease_id, group_seq = ack.group_seq, "group accepted");
                            ::metrics::counter!(metrics::ROLLOUT_GROUPS).increment(1);
                        } else {
                            ::metrics::counter!(metrics::REJECTED_GROUPS).increment(1);
                            info!(lease_id = %ack.lease_id, reason = %ack.reason, "group not accepted");
                        }
                    }
                    Ok(None) => failed = true,
                    Err(status) => {
                        // INVALID_ARGUMENT ends the stream: that group is dropped (a bug on our
                        // side, logged loudly); its lease expires and the prompt is re-leased.
                        warn!(code = ?status.code(), message = status.message(), "rollout stream ended by the server");
                        if status.code() == tonic::Code::FailedPrecondition {
                            return Err(anyhow::anyhow!(
                                "the replay server refused this actor's rollouts: {}",
                                status.message()
                            ));
                        }
                        if status.code() == tonic::Code::InvalidArgument {
                            acked += 1;
                        }
                        failed = true;
                    }
                }
            }
            if failed {
                stream = None;
                if attempt == 0 && acked < n {
                    continue;
                }
            }
            break;
        }
        if args.max_groups > 0 && accepted_groups >= args.max_groups {
            info!(accepted_groups, "reached --max-groups");
            break;
        }
    }
    info!(accepted_groups, "actor stopping");
    Ok(())
}
