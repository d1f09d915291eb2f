//! How a role that generates with the learner's weights (the actor, the evaluator) starts:
//! connect to the learner's `Weights` service, take its model (or load a local `--model`
//! and check it against the learner's by fingerprint), build the sampler on the first
//! weights, and start the background [`Follower`] from there. One path, so that both roles
//! refuse the same mismatches with the same messages.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use hindsight_policy::{ChatTokenizer, Device, ModelConfig, Precision, Sampler};
use hindsight_proto::v1::weights_client::WeightsClient;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{learner_model, Client, FollowSpec, Follower, LearnerModel, Observer};

/// Connects to the learner at `url` with this process's credentials, retrying while it
/// starts; messages up to [`hindsight_proto::MAX_MESSAGE_BYTES`] (a weight chunk).
pub async fn connect(security: &hindsight_service::ClientSecurity, url: &str) -> Result<Client> {
    let channel = security
        .connect_authed(url, 100)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(WeightsClient::new(channel).max_decoding_message_size(hindsight_proto::MAX_MESSAGE_BYTES))
}

/// The learner's model, asking again (with back-off up to 5 s) while the learner cannot
/// answer yet; `None` when it does not describe its model (an older learner).
pub async fn learner_model_when_up(client: &mut Client) -> Result<Option<LearnerModel>> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match learner_model(client).await {
            Ok(m) => return Ok(m),
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot get the learner's model yet; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A model on local files (`--model`, `--cache-dir`), for local runs.
#[derive(Clone, Debug)]
pub struct LocalModel {
    /// `tiny`, `smollm2`, a .gguf path or a checkpoint directory.
    pub spec: String,
    pub cache_dir: PathBuf,
}

/// How a role generates: where, at what precision, how many sequences at once, and where
/// the learner's shared weight files are mounted (if they are).
#[derive(Clone, Debug)]
pub struct Generation {
    pub device: Device,
    pub precision: Precision,
    pub max_batch: usize,
    pub shared_weights_dir: Option<PathBuf>,
}

/// A role's model, started: the sampler holding its first weights and the follower that
/// prepares newer versions.
pub struct Started {
    pub name: String,
    pub fingerprint: String,
    pub config: ModelConfig,
    pub tokenizer: ChatTokenizer,
    pub sampler: Sampler,
    pub follower: Follower,
    /// The learner's version the sampler holds (`None`: local weights, standing for the
    /// base model's version 0).
    pub version: Option<u64>,
    /// The learner step that produced it (0 for local weights).
    pub learner_step: u64,
    /// Those weights were mapped from the learner's shared directory.
    pub shared: bool,
}

/// Loads `local` or receives the learner's model, builds the sampler and starts the
/// background follower. Without a local model it waits for the learner's model and its
/// first published version; with one it checks the fingerprint against the learner's (when
/// the learner describes its model) and starts at once on the local weights as version 0.
pub async fn start_model(
    client: &mut Client,
    local: Option<&LocalModel>,
    generation: &Generation,
    stop: watch::Receiver<bool>,
    observer: Observer,
) -> Result<Started> {
    let Generation {
        device,
        precision,
        max_batch,
        shared_weights_dir,
    } = generation;
    let Some(local) = local else {
        let m = learner_model_when_up(client).await?.context(
            "the learner does not describe its model (an older learner?): give this process \
             --model",
        )?;
        info!(model = %m.name, fingerprint = %hindsight_policy::fingerprint::short(&m.fingerprint), "using the learner's model; waiting for its weights");
        let spec = FollowSpec {
            fingerprint: m.fingerprint.clone(),
            config: m.config.clone(),
            device: device.clone(),
            precision: *precision,
            shared_dir: shared_weights_dir.clone(),
        };
        let follower = Follower::start_observed(client.clone(), spec, None, stop, observer);
        let first = follower.next().await?;
        let mut sampler = Sampler::from_prepared(
            &m.config,
            m.tokenizer.stop_token_ids(),
            device,
            *precision,
            first.weights,
        )?;
        sampler.set_max_batch(*max_batch);
        return Ok(Started {
            name: m.name,
            fingerprint: m.fingerprint,
            config: m.config,
            tokenizer: m.tokenizer,
            sampler,
            follower,
            version: Some(first.version),
            learner_step: first.learner_step,
            shared: first.shared,
        });
    };
    // A local model works without the learner's description.
    let learner = learner_model(client).await.unwrap_or_else(|e| {
        warn!(error = format!("{e:#}"), "the learner does not describe its model; using --model unchecked until its manifest names one");
        None
    });
    let (spec, cache) = (local.spec.clone(), local.cache_dir.clone());
    let loaded =
        tokio::task::spawn_blocking(move || hindsight_policy::load(&spec, &cache, &Device::Cpu))
            .await??;
    let fingerprint = hindsight_policy::fingerprint(&loaded.config, &loaded.tokenizer)?;
    if let Some(l) = &learner {
        anyhow::ensure!(
            l.fingerprint == fingerprint,
            "--model {} has fingerprint {fingerprint}, the learner's model ({}) has {}: drop \
             --model to use the learner's, or give the learner's model",
            local.spec,
            l.name,
            l.fingerprint
        );
    }
    let mut sampler = Sampler::with_precision(
        &loaded.config,
        &loaded.weights,
        loaded.tokenizer.stop_token_ids(),
        device,
        *precision,
    )?;
    sampler.set_max_batch(*max_batch);
    let spec = FollowSpec {
        fingerprint: fingerprint.clone(),
        config: loaded.config.clone(),
        device: device.clone(),
        precision: *precision,
        shared_dir: shared_weights_dir.clone(),
    };
    // Local weights stand for version 0 (the learner's base model).
    let follower = Follower::start_observed(client.clone(), spec, Some(0), stop, observer);
    Ok(Started {
        name: loaded.name,
        fingerprint,
        config: loaded.config,
        tokenizer: loaded.tokenizer,
        sampler,
        follower,
        version: None,
        learner_step: 0,
        shared: false,
    })
}
