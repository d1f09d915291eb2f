//! Following the learner's weight versions: ask `Latest`, stream the chunks of a newer version,
//! verify every chunk's SHA-256 and the whole payload's, and hand back the decoded weights.
//! A transfer that breaks resumes from the first missing chunk.

use anyhow::{bail, ensure, Context, Result};
use hindsight_proto::sha256_hex;
use hindsight_proto::v1::weights_client::WeightsClient;
use hindsight_proto::v1::{FetchWeightsRequest, LatestWeightsRequest, WeightsManifest};
use tokio_stream::StreamExt;

/// The newest manifest if it is newer than `current` (no waiting), else `None`.
pub async fn newer_manifest(
    client: &mut WeightsClient<hindsight_service::AuthChannel>,
    current: u64,
) -> Result<Option<WeightsManifest>> {
    let m = client
        .latest(LatestWeightsRequest {
            newer_than: current,
            wait_ms: 0,
        })
        .await
        .context("Weights.Latest")?
        .into_inner();
    crate::metrics::record_versions(current, m.version);
    Ok((m.version > current).then_some(m))
}

/// Downloads and verifies the payload described by `manifest`.
pub async fn fetch(
    client: &mut WeightsClient<hindsight_service::AuthChannel>,
    manifest: &WeightsManifest,
) -> Result<Vec<u8>> {
    let total = usize::try_from(manifest.total_bytes).context("weights too large")?;
    let chunks = manifest.chunk_sha256.len();
    let mut payload = Vec::with_capacity(total);
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
                    tracing::warn!(error = %e, chunk = next, "weight transfer broke; resuming");
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
            let digest = sha256_hex(&chunk.data);
            ensure!(
                digest == manifest.chunk_sha256[next] && digest == chunk.sha256,
                "chunk {next} of weights version {} fails its checksum",
                manifest.version
            );
            ::metrics::counter!(crate::metrics::WEIGHT_FETCH_BYTES)
                .increment(chunk.data.len() as u64);
            payload.extend_from_slice(&chunk.data);
            next += 1;
        }
    }
    ensure!(
        payload.len() == total,
        "weights version {}: got {} bytes, manifest says {total}",
        manifest.version,
        payload.len()
    );
    ensure!(
        sha256_hex(&payload) == manifest.sha256,
        "weights version {} fails its checksum",
        manifest.version
    );
    Ok(payload)
}
