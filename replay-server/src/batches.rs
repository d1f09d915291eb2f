//! Serving a decided batch: its groups are read back from the write-ahead log (memory holds
//! only their index) and assembled into a `TrainingBatch` by [`crate::assembly`]. The same
//! composition always gives the same batch, so a batch re-served after a restart is the batch
//! the learner may already have trained.

use std::path::Path;
use std::sync::Arc;

use hindsight_proto::v1::TrainingBatch;

use crate::assembly::{assemble, WindowParams};
use crate::codec::PromptCodec;
use crate::config::Reward;
use crate::rollout::ScoredGroup;
use crate::state::WaitingGroup;
use crate::wal::{read_group, BatchRecord};

/// A batch and the decoded texts of its window's responses (`texts[group][response]`, for
/// the batch log).
pub struct Served {
    pub batch: TrainingBatch,
    pub texts: Vec<Vec<String>>,
}

/// Reads `groups` back from the log in `dir` and assembles the batch `record` describes.
pub fn assemble_from_log(
    dir: &Path,
    codec: &Arc<dyn PromptCodec>,
    record: &BatchRecord,
    groups: &[WaitingGroup],
    temperature: f32,
    reward: Reward,
) -> std::io::Result<Served> {
    let mut window = Vec::with_capacity(groups.len());
    for g in groups {
        let logged = read_group(dir, g.location)?;
        let group = logged.group.ok_or_else(|| {
            std::io::Error::other(format!("log record of group {} has no group", g.seq))
        })?;
        window.push(ScoredGroup {
            seq: g.seq,
            entry: g.entry.clone(),
            group,
            scores: g.scores.clone(),
        });
    }
    let params = WindowParams {
        replays: record.replays as usize,
        step: record.step,
        lambda: record.lambda,
        learner_version: record.learner_version,
        reward,
    };
    let mut batch = assemble(&window, &params, codec.as_ref()).batch;
    batch.batch_id = record.batch_id;
    batch.temperature = temperature;
    let texts = window
        .iter()
        .map(|g| {
            g.group
                .responses
                .iter()
                .map(|r| codec.decode(&r.token_ids))
                .collect()
        })
        .collect();
    Ok(Served { batch, texts })
}
