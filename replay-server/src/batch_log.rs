//! The batch log: one JSON line per training sample served (`--batch-log FILE.jsonl`).
//!
//! For humans and end-to-end tests: every sample of every batch built, with its provenance,
//! verdicts, the (possibly rewritten) instruction and the decoded source response, so a
//! reader can re-derive rewards and rewrites. A dedicated thread serializes and appends the
//! lines (flushing after each batch), so the state lock only pays for handing a batch over.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::Context as _;
use hindsight_proto::v1::TrainingBatch;
use serde_json::json;

/// A built batch and the texts of its window's responses (`texts[group][response]`).
#[derive(Debug)]
pub struct LoggedBatch {
    pub batch: TrainingBatch,
    pub texts: Vec<Vec<String>>,
}

/// Sends batches to the writer thread; dropping it (or [`BatchLog::close`]) ends the thread.
#[derive(Debug)]
pub struct BatchLog {
    tx: Option<mpsc::Sender<LoggedBatch>>,
    thread: Option<JoinHandle<()>>,
}

impl BatchLog {
    /// Opens `path` for appending (creating parent directories) and starts the writer.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the batch log {}", path.display()))?;
        let (tx, rx) = mpsc::channel::<LoggedBatch>();
        let shown = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("batch-log".into())
            .spawn(move || {
                let mut out = BufWriter::new(file);
                for logged in rx {
                    let res = write_batch(&mut out, &logged).and_then(|()| out.flush());
                    if let Err(e) = res {
                        tracing::error!(role = "replay-server", path = %shown, error = %e, "cannot write the batch log");
                    }
                }
            })
            .context("starting the batch log thread")?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues a batch for writing.
    pub fn send(&self, logged: LoggedBatch) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(logged);
        }
    }

    /// Writes what is queued and stops the thread (blocking).
    pub fn close(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for BatchLog {
    fn drop(&mut self) {
        self.close();
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
