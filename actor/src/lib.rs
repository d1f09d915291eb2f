//! The Hindsight actor (rollout worker): leases prompts from the replay server, generates a
//! group of responses per prompt with the candle policy (keeping every token's sampled log-prob
//! and the entropy of its sampling distribution), streams the groups back over gRPC, and swaps
//! in newer weight versions from the learner between generation batches.
//!
//! Actors are stateless and elastic: start or kill any number at any time. A killed actor's
//! leases expire on the replay server and its prompts are handed to another actor; a stopped
//! one (SIGTERM) stops leasing, finishes and streams the generation in progress if it can
//! within `--shutdown-timeout-secs`, and gives back whatever it still holds
//! (`ReleaseLeases`), so nothing it held waits for lease expiry.
//!
//! An actor has no gRPC server: its health is the HTTP `/healthz` and `/readyz` of its
//! metrics port (ready once it has weights and its lease loop gets answers).

pub mod metrics;
pub mod weights;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hindsight_policy::{Sampler, SamplingParams};
use hindsight_proto::v1::replay_client::ReplayClient;
use hindsight_proto::v1::{
    LeaseRequest, ReleaseLeasesRequest, Response as RolloutResponse, RolloutAck, RolloutGroup,
};
use tokio::sync::{mpsc, watch};

use tracing::{info, warn};

/// Command-line / environment configuration of `hindsight actor`.
#[derive(clap::Args, Clone, Debug)]
pub struct ActorArgs {
    /// Replay server to lease prompts from and stream rollouts to.
    #[arg(
        long,
        env = "HINDSIGHT_REPLAY",
        default_value = "http://127.0.0.1:50051"
    )]
    pub replay: String,
    /// Learner whose Weights service publishes new versions.
    #[arg(
        long,
        env = "HINDSIGHT_LEARNER",
        default_value = "http://127.0.0.1:50052"
    )]
    pub learner: String,
    /// The model and how to generate (`--model`, `--cache-dir`, `--precision`, `--device`,
    /// `--max-batch`).
    #[command(flatten)]
    pub follow: hindsight_follower::FollowerArgs,
    /// This actor's id (default: actor-<hostname>-<pid>).
    #[arg(long, env = "HINDSIGHT_ACTOR_ID")]
    pub actor_id: Option<String>,
    /// Prompts leased (and generated together in one batch) at a time.
    #[arg(long, env = "HINDSIGHT_PROMPTS_PER_LEASE", default_value_t = 2)]
    pub prompts_per_lease: u32,
    /// Base seed of the sampler (mixed with the actor id and the batch number).
    #[arg(long, env = "HINDSIGHT_SEED", default_value_t = 0)]
    pub seed: u64,
    /// How this actor proves itself to the replay server and the learner (`--tls-ca`,
    /// `--token-file`; `hindsight certs` makes them).
    #[command(flatten)]
    pub security: hindsight_service::ClientSecurityArgs,
    /// Stop after this many accepted groups (0 = run until stopped).
    #[arg(long, env = "HINDSIGHT_MAX_GROUPS", default_value_t = 0)]
    pub max_groups: u64,
    /// The drain bound after SIGTERM.
    #[command(flatten)]
    pub shutdown: hindsight_service::ShutdownArgs,
}

impl Default for ActorArgs {
    /// The same values as the command-line defaults (tested).
    fn default() -> Self {
        ActorArgs {
            replay: "http://127.0.0.1:50051".into(),
            learner: "http://127.0.0.1:50052".into(),
            follow: Default::default(),
            actor_id: None,
            prompts_per_lease: 2,
            seed: 0,
            security: Default::default(),
            max_groups: 0,
            shutdown: Default::default(),
        }
    }
}

impl hindsight_service::ToArgv for ActorArgs {
    /// The flags that parse back to these settings (every one, defaults included).
    fn to_argv(&self) -> Vec<String> {
        let mut a = hindsight_service::Argv::new();
        a.opt("--replay", &self.replay)
            .opt("--learner", &self.learner)
            .extend(&self.follow)
            .opt_some("--actor-id", &self.actor_id)
            .opt("--prompts-per-lease", self.prompts_per_lease)
            .opt("--seed", self.seed)
            .extend(&self.security)
            .opt("--max-groups", self.max_groups)
            .extend(&self.shutdown);
        a.into_vec()
    }
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

/// Installs a prepared version between two generation batches (O(1) on the CPU).
fn install(sampler: &mut Sampler, update: weights::Update, version: &AtomicU64) -> Result<()> {
    let from = version.load(Ordering::Relaxed);
    let started = Instant::now();
    sampler
        .install(update.weights)
        .with_context(|| format!("installing weights version {}", update.version))?;
    let pause = started.elapsed().as_secs_f64();
    version.store(update.version, Ordering::Relaxed);
    metrics::record_versions(update.version, update.version);
    let via = if update.shared { "shared" } else { "grpc" };
    ::metrics::counter!(metrics::WEIGHT_UPDATES, "via" => via).increment(1);
    ::metrics::histogram!(metrics::WEIGHT_FETCH_SECONDS)
        .record(update.seen.elapsed().as_secs_f64());
    info!(
        policy_version = update.version,
        from,
        fetch_secs = format!("{:.2}", update.fetch_secs),
        prepare_secs = format!("{:.2}", update.prepare_secs),
        install_ms = format!("{:.1}", pause * 1000.0),
        via,
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
    let generation = args.follow.generation()?;
    let security = hindsight_service::ClientSecurity::from_args(&args.security)?;
    let version = Arc::new(AtomicU64::new(0));
    metrics::init();
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let mut replay = ReplayClient::new(connect(&security, &args.replay).await?)
        .max_decoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES);
    let mut weights_client = weights::connect(&security, &args.learner).await?;
    // Leases this actor holds and has no ack for: given back when it stops.
    let held = Held::default();
    // Ends with this function, whichever way it returns.
    let _guard = AbortOnDrop(tokio::spawn(drain_guard(
        stop_rx.clone(),
        args.shutdown.drain_bound(),
        replay.clone(),
        actor_id.clone(),
        held.clone(),
    )));

    // The model: local files (`--model`) or the learner's description; either way its
    // fingerprint is checked against the learner's and stated with every lease and group.
    let local = args.follow.local_model();
    let started = weights::start_model(
        &mut weights_client,
        local.as_ref(),
        &generation,
        stop_rx.clone(),
        weights::OBSERVER,
    );
    let model = tokio::select! {
        m = started => m?,
        _ = stop_rx.wait_for(|s| *s) => return Ok(()),
    };
    let (fingerprint, mut sampler, follower) = (model.fingerprint, model.sampler, model.follower);
    if let Some(v) = model.version {
        version.store(v, Ordering::Relaxed);
        ::metrics::gauge!(metrics::POLICY_VERSION).set(v as f64);
        let via = if model.shared { "shared" } else { "grpc" };
        ::metrics::counter!(metrics::WEIGHT_UPDATES, "via" => via).increment(1);
    }
    info!(model = %model.name, fingerprint = %hindsight_policy::fingerprint::short(&fingerprint),
        policy_version = version.load(Ordering::Relaxed), precision = %args.follow.precision,
        max_batch = args.follow.max_batch, device = %args.follow.device, "actor ready");
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
                hindsight_service::set_ready();
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
                hindsight_service::set_ready();
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
                ::metrics::histogram!(metrics::LEASE_BACKOFF_SECONDS)
                    .record(wait_ms as f64 / 1000.0);
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
                hindsight_service::set_not_ready("the replay server does not answer LeasePrompts");
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
        held.set(lease.prompts.iter().map(|p| p.lease_id.clone()));
        ::metrics::counter!(metrics::PROMPTS_LEASED).increment(lease.prompts.len() as u64);
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
                release(&mut replay, &actor_id, held.take()).await;
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
                        held.remove(&ack.lease_id);
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
        // Groups without an ack (the stream broke): give their leases back now rather than
        // leave them to expire (releasing a lease whose group did land is a no-op).
        release(&mut replay, &actor_id, held.take()).await;
        if args.max_groups > 0 && accepted_groups >= args.max_groups {
            info!(accepted_groups, "reached --max-groups");
            break;
        }
    }
    hindsight_service::set_not_ready("stopping");
    release(&mut replay, &actor_id, held.take()).await;
    // End the rollout stream cleanly (the server then sees its end, not a reset).
    if let Some(RolloutStream { tx, mut acks }) = stream.take() {
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(Some(_)) = acks.message().await {}
        })
        .await;
    }
    info!(accepted_groups, "actor stopping");
    Ok(())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Lease ids this actor holds without an ack, shared with the drain guard.
#[derive(Clone, Default)]
struct Held(Arc<Mutex<Vec<String>>>);

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn set(&self, ids: impl IntoIterator<Item = String>) {
        *self.lock() = ids.into_iter().collect();
    }
    fn remove(&self, id: &str) {
        self.lock().retain(|h| h != id);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.lock())
    }
}

/// Gives `lease_ids` back to the replay server (their prompts are re-queued at once).
/// Best effort, bounded: a lease that cannot be given back still expires on the server.
async fn release(replay: &mut ReplayClient<Authed>, actor_id: &str, lease_ids: Vec<String>) {
    if lease_ids.is_empty() {
        return;
    }
    let n = lease_ids.len();
    let call = replay.release_leases(ReleaseLeasesRequest {
        actor_id: actor_id.to_owned(),
        lease_ids,
    });
    match tokio::time::timeout(Duration::from_secs(1), call).await {
        Ok(Ok(r)) => info!(
            leases = n,
            released = r.into_inner().released,
            "gave leases back"
        ),
        Ok(Err(e)) => {
            warn!(code = ?e.code(), error = e.message(), leases = n, "ReleaseLeases failed; they expire on the server")
        }
        Err(_) => warn!(
            leases = n,
            "ReleaseLeases timed out; they expire on the server"
        ),
    }
}

/// After a stop request the main loop has `bound` to finish the generation in progress and
/// stream it; past that, this gives back every lease still held and ends the process (exit
/// code 0: nothing it held is lost, its prompts are re-queued at once).
async fn drain_guard(
    mut stop: watch::Receiver<bool>,
    bound: Duration,
    mut replay: ReplayClient<Authed>,
    actor_id: String,
    held: Held,
) {
    if stop.wait_for(|s| *s).await.is_err() {
        return;
    }
    hindsight_service::set_not_ready("draining");
    info!(
        bound_secs = bound.as_secs_f64(),
        "stopping: no new leases; finishing the generation in progress"
    );
    tokio::time::sleep(bound).await;
    let ids = held.take();
    warn!(
        leases = ids.len(),
        "the generation in progress did not finish within the drain bound; giving its leases back"
    );
    release(&mut replay, &actor_id, ids).await;
    std::process::exit(0);
}

#[cfg(test)]
mod args_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ActorArgs,
    }

    #[test]
    fn clap_defaults_match_default_impl() {
        let parsed = Cli::parse_from(["actor"]).args;
        assert_eq!(format!("{parsed:?}"), format!("{:?}", ActorArgs::default()));
    }

    #[test]
    fn renders_to_flags_that_parse_back() {
        hindsight_service::assert_round_trip(&ActorArgs {
            replay: "https://replay:50051".into(),
            learner: "https://learner:50052".into(),
            follow: hindsight_follower::FollowerArgs {
                model: Some("smollm2".into()),
                cache_dir: Some("/c".into()),
                precision: hindsight_policy::Precision::Bf16,
                device: "cuda:0".into(),
                max_batch: 5,
                shared_weights_dir: Some("/w".into()),
            },
            actor_id: Some("actor-7".into()),
            prompts_per_lease: 3,
            seed: 42,
            security: hindsight_service::ClientSecurityArgs {
                tls_ca: Some("/s/ca.pem".into()),
                token_file: Some("/s/actor.token".into()),
                token: Some("t".into()),
                tls_domain: Some("replay".into()),
            },
            max_groups: 6,
            shutdown: hindsight_service::ShutdownArgs {
                shutdown_timeout_secs: 4,
            },
        });
    }
}
