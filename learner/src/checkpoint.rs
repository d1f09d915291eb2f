//! Checkpoints: weights, optimizer state, step counters and the data cursor, written
//! atomically to `DIR/step-NNNNNNNN/` with `DIR/latest` naming the newest complete one.
//!
//! Layout of one checkpoint: an ordinary Hugging Face checkpoint directory that any tool loads
//! (`model.safetensors`, `config.json`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`, written by `hindsight_policy::save_hf_checkpoint`) plus the
//! training state: `optimizer.safetensors` (AdamW moments) and `trainer_state.json`
//! ([`TrainerState`]).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Counters that must survive a restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Newest published weight version.
    pub policy_version: u64,
    /// Data cursor: every training batch up to this id is in these weights (and none after).
    pub last_batch_id: u64,
    /// Response tokens trained on so far.
    pub tokens_trained: u64,
    /// Responses the actors generated for the batches trained so far (originals; replays
    /// are not generated): the sample-efficiency x-axis of `steps.jsonl`.
    #[serde(default)]
    pub generated_responses: u64,
    /// Model spec the run started from ("tiny", "smollm2", a path).
    pub base_model: String,
}

/// What a checkpoint holds, as read back by [`load_latest`].
pub struct Checkpoint {
    pub state: TrainerState,
    pub model_safetensors: Vec<u8>,
    pub optimizer_safetensors: Vec<u8>,
    pub config_json: String,
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Name of the optimizer state's file in a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Writes a checkpoint under `dir` and points `dir/latest` at it; returns the checkpoint
/// directory. `write_files` writes the model files (an HF checkpoint) and [`OPTIMIZER_FILE`]
/// into the directory it is given. A crash at any point leaves the previous `latest` intact.
pub fn save(
    dir: &Path,
    state: &TrainerState,
    write_files: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    fs::create_dir_all(dir)
        .with_context(|| format!("creating checkpoint dir {}", dir.display()))?;
    let name = format!("step-{:08}", state.step);
    let tmp = dir.join(format!(".tmp-{name}"));
    let dest = dir.join(&name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    write_files(&tmp).context("writing the model and optimizer files of the checkpoint")?;
    for f in ["model.safetensors", OPTIMIZER_FILE] {
        let written = tmp.join(f);
        if !written.exists() {
            bail!("the checkpoint writer wrote no {f}");
        }
        fs::File::open(&written)?.sync_all()?;
    }
    write_file(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    if dest.exists() {
        fs::remove_dir_all(&dest)?;
    }
    fs::rename(&tmp, &dest)?;
    let latest_tmp = dir.join(".latest.tmp");
    write_file(&latest_tmp, name.as_bytes())?;
    fs::rename(&latest_tmp, dir.join("latest"))?;
    ::metrics::counter!(crate::metrics::CHECKPOINTS).increment(1);
    Ok(dest)
}

/// Loads the checkpoint `dir/latest` points at; `Ok(None)` when there is none yet.
pub fn load_latest(dir: &Path) -> Result<Option<Checkpoint>> {
    let latest = dir.join("latest");
    if !latest.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&latest)?.trim().to_string();
    if name.is_empty() || name.contains('/') || name.contains("..") {
        bail!("{} names no checkpoint ({name:?})", latest.display());
    }
    let path = dir.join(&name);
    let read =
        |f: &str| fs::read(path.join(f)).with_context(|| format!("reading {}/{f}", path.display()));
    let state: TrainerState = serde_json::from_slice(&read("trainer_state.json")?)
        .with_context(|| format!("parsing {}/trainer_state.json", path.display()))?;
    Ok(Some(Checkpoint {
        state,
        model_safetensors: read("model.safetensors")?,
        optimizer_safetensors: read(OPTIMIZER_FILE)?,
        config_json: String::from_utf8(read("config.json")?)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips_and_moves_latest() -> Result<()> {
        let dir = tempfile::tempdir()?;
        assert!(load_latest(dir.path())?.is_none());
        let model = |bytes: Vec<u8>| {
            move |d: &Path| -> Result<()> {
                fs::write(d.join("model.safetensors"), bytes)?;
                fs::write(d.join("config.json"), "{}")?;
                fs::write(d.join(OPTIMIZER_FILE), [4, 5])?;
                Ok(())
            }
        };
        let mut state = TrainerState {
            step: 3,
            policy_version: 3,
            last_batch_id: 7,
            tokens_trained: 99,
            generated_responses: 24,
            base_model: "tiny".into(),
        };
        save(dir.path(), &state, model(vec![1, 2, 3]))?;
        state.step = 6;
        let path = save(dir.path(), &state, model(vec![9]))?;
        assert!(path.ends_with("step-00000006"));
        let back = load_latest(dir.path())?.expect("a checkpoint");
        assert_eq!(back.state, state);
        assert_eq!(back.model_safetensors, vec![9]);
        assert_eq!(back.optimizer_safetensors, vec![4, 5]);
        assert_eq!(back.config_json, "{}");
        assert!(dir.path().join("step-00000003/model.safetensors").exists());
        Ok(())
    }

    #[test]
    fn a_checkpoint_without_optimizer_state_is_refused_and_latest_kept() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let state = TrainerState {
            step: 1,
            ..Default::default()
        };
        save(dir.path(), &state, |d| {
            fs::write(d.join("model.safetensors"), [1])?;
            fs::write(d.join("config.json"), "{}")?;
            fs::write(d.join(OPTIMIZER_FILE), [2])?;
            Ok(())
        })?;
        let later = TrainerState {
            step: 2,
            ..Default::default()
        };
        let err = save(dir.path(), &later, |d| {
            fs::write(d.join("model.safetensors"), [3])?;
            Ok(())
        })
        .expect_err("refused");
        assert!(err.to_string().contains("optimizer.safetensors"), "{err:#}");
        let back = load_latest(dir.path())?.expect("the first checkpoint");
        assert_eq!(back.state.step, 1);
        assert_eq!(back.optimizer_safetensors, vec![2]);
        Ok(())
    }

    #[test]
    fn corrupt_latest_is_a_clear_error() -> Result<()> {
        let dir = tempfile::tempdir()?;
        fs::write(dir.path().join("latest"), "../etc")?;
        let err = load_latest(dir.path()).err().expect("error");
        assert!(err.to_string().contains("names no checkpoint"));
        Ok(())
    }
}
