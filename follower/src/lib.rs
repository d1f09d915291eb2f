//! Following the learner's model and weight versions, as every process that generates with
//! the learner's weights does (the actor, the evaluator).
//!
//! - [`learner_model`]: the learner's model description (architecture, tokenizer, chat
//!   template) with its fingerprint recomputed and checked, so an actor needs no model files.
//! - [`newer_manifest`]: `Latest` as a long poll; the learner answers as soon as a newer
//!   version is published.
//! - [`fetch`]: streams the chunks of a version, kept as they arrived (no copy into one
//!   buffer), each chunk's SHA-256 checked on a blocking thread while the next chunk arrives.
//!   A transfer that breaks resumes from the first missing chunk.
//! - [`Follower`]: a background task doing all of the above and building the new weights
//!   ([`Sampler::prepare_safetensors_chunks`]) while the actor keeps generating with the old ones;
//!   the actor installs the newest prepared version between two generation batches.
//! - [`open_shared`]: on the learner's host, a version's file in the learner's shared
//!   directory, mapped instead of fetched ([`Sampler::prepare_safetensors_file`]); the follower
//!   falls back to [`fetch`] when the file is not there or not usable.
//!
//! - [`start_model`]: how such a role starts (connect, the learner's model or a local `--model`
//!   checked against it, the first weights, the follower), shared by the actor and the
//!   evaluator, from the flags both take ([`FollowerArgs`]).
//!
//! The roles record their own metrics about it through an [`Observer`] (the actor's
//! `hindsight_actor_*` series, the evaluator's `hindsight_evaluator_*` ones).

mod args;
mod start;

pub use args::FollowerArgs;
pub use start::{connect, learner_model_when_up, start_model, Generation, LocalModel, Started};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hindsight_policy::{ChatTokenizer, Device, ModelConfig, Precision, PreparedWeights, Sampler};
use hindsight_proto::bytes::Bytes;
use hindsight_proto::sha256_hex;
use hindsight_proto::v1::weights_client::WeightsClient;
use hindsight_proto::v1::{
    FetchWeightsRequest, LatestWeightsRequest, ModelRequest, WeightsManifest,
};
use tokio::sync::{watch, Notify};
use tokio_stream::StreamExt;
use tracing::{info, warn};

/// What a role records while following: plain function pointers, so that each role keeps
/// its metric names in its own `metrics.rs`.
#[derive(Clone, Copy)]
pub struct Observer {
    /// Called with (the version held, the newest the learner reported) at every answer.
    pub versions: fn(u64, u64),
    /// Called with the size of every chunk received.
    pub fetched_bytes: fn(u64),
}

impl Observer {
    /// Records nothing.
    pub const NONE: Observer = Observer {
        versions: |_, _| {},
        fetched_bytes: |_| {},
    };
}

/// The learner's `Weights` client, with this process's credentials.
pub type Client = WeightsClient<hindsight_service::AuthChannel>;

/// Longest single `Latest` long poll (the learner caps it at 60 s).
const LONG_POLL: Duration = Duration::from_secs(30);

/// A model received from the learner.
pub struct LearnerModel {
    pub config: ModelConfig,
    pub tokenizer: ChatTokenizer,
    pub fingerprint: String,
    pub name: String,
}

/// The learner's model; `None` when the learner does not describe it (an older learner).
/// The fingerprint is recomputed from the rebuilt tokenizer and config and must match.
pub async fn learner_model(client: &mut Client) -> Result<Option<LearnerModel>> {
    let reply = match client.model(ModelRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(e) if e.code() == tonic::Code::Unimplemented => return Ok(None),
        Err(e) => return Err(e).context("Weights.Model"),
    };
    let description = hindsight_policy::ModelDescription::from_bytes(&reply.description)
        .context("the learner's model description")?;
    let (config, tokenizer) = tokio::task::spawn_blocking(move || description.into_parts())
        .await
        .context("rebuilding the learner's model")??;
    let fingerprint = hindsight_policy::fingerprint(&config, &tokenizer)?;
    ensure!(
        fingerprint == reply.fingerprint,
        "the learner's model description has fingerprint {fingerprint}, the learner says {}",
        reply.fingerprint
    );
    Ok(Some(LearnerModel {
        config,
        tokenizer,
        fingerprint,
        name: reply.name,
    }))
}

/// The newest manifest if it is newer than `have` (any published version when `have` is
/// `None`), waiting up to `wait` for one to be published; `None` when none came.
pub async fn newer_manifest(
    client: &mut Client,
    have: Option<u64>,
    wait: Duration,
    observer: &Observer,
) -> Result<Option<WeightsManifest>> {
    let m = client
        .latest(LatestWeightsRequest {
            newer_than: have.unwrap_or(0),
            wait_ms: wait.as_millis() as u64,
            any_version: have.is_none(),
        })
        .await
        .context("Weights.Latest")?
        .into_inner();
    if let Some(h) = have {
        (observer.versions)(h, m.version.max(h));
    }
    let published = m.total_bytes > 0 && !m.chunk_sha256.is_empty();
    Ok((published && have.is_none_or(|h| m.version > h)).then_some(m))
}

/// Downloads and verifies the payload described by `manifest`, as its chunks: every chunk's
/// SHA-256 is checked (on a blocking thread, overlapped with receiving the next chunk)
/// against the manifest's list; the chunks cover the payload, so that checks all of it once.
pub async fn fetch(
    client: &mut Client,
    manifest: &WeightsManifest,
    observer: &Observer,
) -> Result<Vec<Bytes>> {
    let total = usize::try_from(manifest.total_bytes).context("weights too large")?;
    let chunks = manifest.chunk_sha256.len();
    let chunk_bytes = manifest.chunk_bytes as usize;
    ensure!(
        chunk_bytes > 0 && total.div_ceil(chunk_bytes) == chunks,
        "weights version {}: {chunks} chunks of {chunk_bytes} bytes cannot make {total} bytes",
        manifest.version
    );
    let mut payload: Vec<Bytes> = Vec::with_capacity(chunks);
    let mut checks = Vec::with_capacity(chunks);
    let mut next = 0usize;
    let mut attempts = 0;
    while next < chunks {
        attempts += 1;
        if attempts > 5 {
            bail!(
                "weights version {}: giving up after {attempts} broken transfers",
                manifest.version
            );
        }
        let mut stream = client
            .fetch(FetchWeightsRequest {
                version: manifest.version,
                first_chunk: next as u32,
            })
            .await
            .with_context(|| format!("fetching weights version {}", manifest.version))?
            .into_inner();
        while let Some(item) = stream.next().await {
            let chunk = match item {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, chunk = next, "weight transfer broke; resuming");
                    break;
                }
            };
            ensure!(
                chunk.version == manifest.version && chunk.index as usize == next,
                "unexpected chunk {} of version {} (wanted {} of {})",
                chunk.index,
                chunk.version,
                next,
                manifest.version
            );
            let want = (total - next * chunk_bytes).min(chunk_bytes);
            ensure!(
                chunk.data.len() == want,
                "chunk {next} of weights version {} has {} bytes, expected {want}",
                manifest.version,
                chunk.data.len()
            );
            (observer.fetched_bytes)(chunk.data.len() as u64);
            let (expected, data) = (manifest.chunk_sha256[next].clone(), chunk.data.clone());
            payload.push(chunk.data);
            checks.push(tokio::task::spawn_blocking(move || {
                sha256_hex(&data) == expected
            }));
            next += 1;
        }
    }
    for (i, check) in checks.into_iter().enumerate() {
        ensure!(
            check.await.context("checksum task")?,
            "chunk {i} of weights version {} fails its checksum",
            manifest.version
        );
    }
    let got: usize = payload.iter().map(Bytes::len).sum();
    ensure!(
        got == total,
        "weights version {}: got {got} bytes, manifest says {total}",
        manifest.version
    );
    Ok(payload)
}

/// A version fetched and prepared, waiting to be installed.
pub struct Update {
    pub version: u64,
    /// The learner step that produced it (0 for the base model).
    pub learner_step: u64,
    pub weights: PreparedWeights,
    /// When the learner published it (its clock, ms since the epoch).
    pub published_unix_ms: u64,
    /// When this actor saw its manifest, and how long fetching and preparing took.
    pub seen: Instant,
    pub fetch_secs: f64,
    pub prepare_secs: f64,
    pub bytes: u64,
    /// Mapped from the learner's shared directory (not fetched over gRPC).
    pub shared: bool,
}

/// What the follower can tell the actor.
enum Slot {
    Empty,
    Ready(Box<Update>),
    /// The learner's model is not ours (or another unrecoverable problem).
    Failed(String),
}

/// What the follower needs to know about the actor's model.
#[derive(Clone)]
pub struct FollowSpec {
    pub fingerprint: String,
    pub config: ModelConfig,
    pub device: Device,
    pub precision: Precision,
    /// Where the learner's shared weight files are mounted, if they are.
    pub shared_dir: Option<std::path::PathBuf>,
}

/// Prepares `manifest`'s version from its file in the learner's shared directory `dir` as
/// mounted here: the name must be a bare file name and the file exactly the manifest's size
/// (the learner writes it whole, then renames it into place). Its content is not hashed: the
/// directory is trusted like a local model directory (whoever can write it chooses the
/// weights), which is what makes taking a version nearly free.
pub fn open_shared(
    dir: &std::path::Path,
    manifest: &WeightsManifest,
    spec: &FollowSpec,
) -> Result<PreparedWeights> {
    let name = manifest.shared_file.as_str();
    ensure!(
        !name.is_empty()
            && !name.starts_with('.')
            && std::path::Path::new(name).file_name() == Some(std::ffi::OsStr::new(name)),
        "the learner names shared weights file {name:?}, not a bare file name"
    );
    Sampler::prepare_safetensors_file(
        &spec.config,
        &spec.device,
        spec.precision,
        &dir.join(name),
        Some(manifest.total_bytes),
    )
}

/// The background task that follows the learner's versions (see the module docs).
pub struct Follower {
    slot: Arc<Mutex<Slot>>,
    ready: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Follower {
    /// Starts following from `have` (`None`: the actor holds no weights yet), recording
    /// nothing.
    pub fn start(
        client: Client,
        spec: FollowSpec,
        have: Option<u64>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self::start_observed(client, spec, have, stop, Observer::NONE)
    }

    /// As [`Follower::start`], telling `observer` about versions and bytes.
    pub fn start_observed(
        client: Client,
        spec: FollowSpec,
        have: Option<u64>,
        stop: watch::Receiver<bool>,
        observer: Observer,
    ) -> Self {
        let slot = Arc::new(Mutex::new(Slot::Empty));
        let ready = Arc::new(Notify::new());
        let task = tokio::spawn(follow(
            client,
            spec,
            have,
            slot.clone(),
            ready.clone(),
            stop,
            observer,
        ));
        Self { slot, ready, task }
    }

    /// The newest prepared version, if one is waiting (never blocks).
    pub fn take(&self) -> Result<Option<Update>> {
        let mut slot = self.slot.lock().expect("follower slot");
        match std::mem::replace(&mut *slot, Slot::Empty) {
            Slot::Empty => Ok(None),
            Slot::Ready(u) => Ok(Some(*u)),
            Slot::Failed(why) => {
                *slot = Slot::Failed(why.clone());
                bail!("{why}")
            }
        }
    }

    /// Waits for the next prepared version.
    pub async fn next(&self) -> Result<Update> {
        loop {
            let notified = self.ready.notified();
            if let Some(u) = self.take()? {
                return Ok(u);
            }
            notified.await;
        }
    }
}

async fn follow(
    mut client: Client,
    spec: FollowSpec,
    mut have: Option<u64>,
    slot: Arc<Mutex<Slot>>,
    ready: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    observer: Observer,
) {
    let fail = |why: String| {
        *slot.lock().expect("follower slot") = Slot::Failed(why);
        ready.notify_waiters();
    };
    // Hands a prepared version to the actor (replacing one not yet installed).
    let offer = |manifest: &WeightsManifest,
                 weights: PreparedWeights,
                 seen: Instant,
                 fetch_secs: f64,
                 prepare_secs: f64,
                 shared: bool| {
        info!(
            policy_version = manifest.version,
            fetch_secs = format!("{fetch_secs:.3}"),
            prepare_secs = format!("{prepare_secs:.3}"),
            via = if shared { "shared" } else { "grpc" },
            "new weights ready"
        );
        *slot.lock().expect("follower slot") = Slot::Ready(Box::new(Update {
            version: manifest.version,
            learner_step: manifest.learner_step,
            weights,
            published_unix_ms: manifest.published_unix_ms,
            seen,
            fetch_secs,
            prepare_secs,
            bytes: manifest.total_bytes,
            shared,
        }));
        ready.notify_waiters();
    };
    let mut failures = 0u32;
    while !*stop.borrow() {
        let polled = tokio::select! {
            m = newer_manifest(&mut client, have, LONG_POLL, &observer) => m,
            _ = stop.wait_for(|s| *s) => return,
        };
        let manifest = match polled {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis(200 * (1u64 << failures.min(5)));
                warn!(
                    error = format!("{e:#}"),
                    retry_in_ms = wait.as_millis() as u64,
                    "learner not answering Latest"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {},
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
        };
        if !manifest.model_fingerprint.is_empty() && manifest.model_fingerprint != spec.fingerprint
        {
            fail(format!(
                "the learner publishes weights for model {}, this process runs model {}: start \
                 it without --model (it then takes the learner's) or with the learner's model",
                manifest.model_fingerprint, spec.fingerprint
            ));
            return;
        }
        let seen = Instant::now();
        if let Some(dir) = spec
            .shared_dir
            .clone()
            .filter(|_| !manifest.shared_file.is_empty())
        {
            let (m, s) = (manifest.clone(), spec.clone());
            match tokio::task::spawn_blocking(move || open_shared(&dir, &m, &s)).await {
                Ok(Ok(weights)) => {
                    failures = 0;
                    have = Some(manifest.version);
                    let prepare_secs = seen.elapsed().as_secs_f64();
                    offer(&manifest, weights, seen, 0.0, prepare_secs, true);
                    continue;
                }
                Ok(Err(e)) => warn!(
                    error = format!("{e:#}"),
                    version = manifest.version,
                    "shared weights file not usable; fetching over gRPC"
                ),
                Err(e) => {
                    fail(format!("preparing weights failed: {e}"));
                    return;
                }
            }
        }
        let fetched = tokio::select! {
            f = fetch(&mut client, &manifest, &observer) => f,
            _ = stop.wait_for(|s| *s) => return,
        };
        let payload = match fetched {
            Ok(p) => p,
            Err(e) => {
                failures += 1;
                warn!(
                    error = format!("{e:#}"),
                    version = manifest.version,
                    "weight fetch failed; asking again"
                );
                continue;
            }
        };
        let fetch_secs = seen.elapsed().as_secs_f64();
        let started = Instant::now();
        let s = spec.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            Sampler::prepare_safetensors_chunks(&s.config, &s.device, s.precision, payload)
        })
        .await;
        let weights = match prepared {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                warn!(
                    error = format!("{e:#}"),
                    version = manifest.version,
                    "weights unusable; keeping the current version"
                );
                have = Some(manifest.version.max(have.unwrap_or(0)));
                continue;
            }
            Err(e) => {
                fail(format!("preparing weights failed: {e}"));
                return;
            }
        };
        failures = 0;
        have = Some(manifest.version);
        let prepare_secs = started.elapsed().as_secs_f64();
        offer(&manifest, weights, seen, fetch_secs, prepare_secs, false);
    }
}
