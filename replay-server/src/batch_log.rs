//! The batch log: one JSON line per training sample served (`--batch-log FILE.jsonl`).
//!
//! For humans and end-to-end tests: every sample of every batch served, with its provenance
//! (group sequence number, lease), verdicts, the (possibly rewritten) instruction and the
//! decoded source response, so a reader can re-derive rewards and rewrites and check that
//! every group was trained exactly once. A batch's lines are written (and flushed to the
//! kernel) before the batch is sent, so they survive a crash of the process that sent it.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context as _;
use hindsight_proto::v1::TrainingBatch;
use serde_json::json;

/// A built batch and the texts of its window's responses (`texts[group][response]`).
#[derive(Debug)]
pub struct LoggedBatch {
    pub batch: TrainingBatch,
    pub texts: Vec<Vec<String>>,
}

/// The open batch log.
#[derive(Debug)]
pub struct BatchLog {
    out: Mutex<BufWriter<File>>,
    shown: String,
}

impl BatchLog {
    /// Opens `path` for appending (creating parent directories).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the batch log {}", path.display()))?;
        Ok(Self {
            out: Mutex::new(BufWriter::new(file)),
            shown: path.display().to_string(),
        })
    }

    /// Writes a batch's lines and flushes them (blocking: call it off the async workers).
    /// A failure is logged, not returned: the batch log is a record, not the data path.
    pub fn write(&self, logged: &LoggedBatch) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let res = write_batch(&mut *out, logged).and_then(|()| out.flush());
        if let Err(e) = res {
            tracing::error!(path = %self.shown, error = %e, "cannot write the batch log");
        }
    }
}

fn write_batch(out: &mut impl std::io::Write, logged: &LoggedBatch) -> std::io::Result<()> {
    let b = &logged.batch;
    let stats = b.stats.unwrap_or_default();
    for (i, s) in b.samples.iter().enumerate() {
        let p = s.provenance.clone().unwrap_or_default();
        let response = logged
            .texts
            .get(s.group_index as usize)
            .and_then(|g| g.get(p.response_index as usize))
            .map(String::as_str)
            .unwrap_or_default();
        let line = json!({
            "batch_id": b.batch_id,
            "step": b.step,
            "lambda": stats.lambda,
            "sample_index": i,
            "group_index": s.group_index,
            "prompt_id": p.prompt_id,
            "group_seq": p.group_seq,
            "lease_id": p.lease_id,
            "actor_id": p.actor_id,
            "policy_version": p.policy_version,
            "response_index": p.response_index,
            "is_replay": s.is_replay,
            "reward": s.reward,
            "constraint_accuracy": s.constraint_accuracy,
            "mean_entropy": s.mean_entropy,
            "instruction": s.instruction,
            "response": response,
            "verdicts": p.verdicts,
            "instruction_ids": p.instruction_ids,
            "kept_instruction_ids": p.kept_instruction_ids,
            "prompt_tokens": s.prompt_token_ids.len(),
            "response_tokens": s.response_token_ids.len(),
        });
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}
