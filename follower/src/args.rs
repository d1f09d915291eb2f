//! The flags every role that follows the learner and generates takes (the actor, the
//! evaluator): an optional local model, how to generate, and where co-located weights are. One definition, so the two roles
//! document, default, validate and render them alike.

use std::path::PathBuf;

use hindsight_policy::Precision;
use hindsight_service::{ConfigError, ConfigResultExt as _, ToArgv};

use crate::{Generation, LocalModel};

/// `--model`, `--cache-dir`, `--precision`, `--device`, `--max-batch`, `--shared-weights-dir`.
#[derive(clap::Args, Clone, Debug)]
pub struct FollowerArgs {
    /// Model to generate with, for local runs: "tiny", "smollm2", a .gguf path or a
    /// checkpoint directory; its fingerprint must match the learner's. Without it the role
    /// takes the model (architecture, tokenizer, chat template, weights) from the learner.
    #[arg(long, env = "HINDSIGHT_MODEL")]
    pub model: Option<String>,
    /// Where downloaded models are cached (default: $HINDSIGHT_CACHE or ~/.cache/hindsight).
    #[arg(long, env = "HINDSIGHT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Precision of the generation weights: `f32` (log-probs match the learner's to ~1e-5)
    /// or `bf16` (bf16 weights and inputs, f32 sums: faster; CPU only; see README for the
    /// mismatch).
    #[arg(long, env = "HINDSIGHT_PRECISION", default_value = "f32")]
    pub precision: Precision,
    /// Device to generate on: `cpu` (the continuous-batching engine) or `cuda` / `cuda:N`
    /// (the tensor engine on candle's CUDA backend; needs a `--features cuda` build).
    #[arg(long, env = "HINDSIGHT_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Sequences generated at once; as one finishes, the next one takes its slot
    /// (continuous batching, CPU).
    #[arg(long, env = "HINDSIGHT_MAX_BATCH", default_value_t = hindsight_policy::sampler::DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// The learner's shared weights directory as mounted here (the learner's
    /// `--shared-weights-dir`, for processes on its host): versions are mapped from the file
    /// the learner writes there instead of fetched over gRPC, every process on the host
    /// sharing one copy. A version whose file is not there or unusable is fetched over gRPC.
    #[arg(long, env = "HINDSIGHT_SHARED_WEIGHTS_DIR")]
    pub shared_weights_dir: Option<PathBuf>,
}

impl Default for FollowerArgs {
    /// The same values as the command-line defaults (tested).
    fn default() -> Self {
        FollowerArgs {
            model: None,
            cache_dir: None,
            precision: Precision::F32,
            device: "cpu".into(),
            max_batch: hindsight_policy::sampler::DEFAULT_MAX_BATCH,
            shared_weights_dir: None,
        }
    }
}

impl FollowerArgs {
    /// How to generate, checked: a configuration error (exit code 2) for a batch of 0 or a
    /// device this build or machine does not have.
    pub fn generation(&self) -> anyhow::Result<Generation> {
        if self.max_batch == 0 {
            return Err(ConfigError::wrap(anyhow::anyhow!(
                "--max-batch must be at least 1"
            )));
        }
        let device = hindsight_policy::parse_device(&self.device).config_err()?;
        Ok(Generation {
            device,
            precision: self.precision,
            max_batch: self.max_batch,
            shared_weights_dir: self.shared_weights_dir.clone(),
        })
    }

    /// The local model, when `--model` names one.
    pub fn local_model(&self) -> Option<LocalModel> {
        self.model.as_ref().map(|spec| LocalModel {
            spec: spec.clone(),
            cache_dir: self
                .cache_dir
                .clone()
                .unwrap_or_else(hindsight_policy::default_cache_dir),
        })
    }
}

impl ToArgv for FollowerArgs {
    /// The flags that parse back to these settings (every one, defaults included).
    fn to_argv(&self) -> Vec<String> {
        let mut a = hindsight_service::Argv::new();
        a.opt_some("--model", &self.model)
            .path_some("--cache-dir", &self.cache_dir)
            .opt("--precision", self.precision)
            .opt("--device", &self.device)
            .opt("--max-batch", self.max_batch)
            .path_some("--shared-weights-dir", &self.shared_weights_dir);
        a.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FollowerArgs,
    }

    #[test]
    fn defaults_render_and_validate() {
        let parsed = Cli::try_parse_from(["x"]).unwrap().args;
        assert_eq!(
            format!("{parsed:?}"),
            format!("{:?}", FollowerArgs::default())
        );
        hindsight_service::assert_round_trip(&FollowerArgs {
            model: Some("tiny".into()),
            cache_dir: Some("/tmp/c".into()),
            precision: Precision::Bf16,
            device: "cpu".into(),
            max_batch: 3,
            shared_weights_dir: Some("/dev/shm/weights".into()),
        });
        let local = FollowerArgs {
            model: Some("smollm2".into()),
            cache_dir: Some("/tmp/c".into()),
            ..Default::default()
        }
        .local_model()
        .unwrap();
        assert_eq!(
            (local.spec.as_str(), local.cache_dir),
            ("smollm2", "/tmp/c".into())
        );
        assert!(FollowerArgs::default().local_model().is_none());
        for (args, says) in [
            (
                FollowerArgs {
                    max_batch: 0,
                    ..Default::default()
                },
                "--max-batch must be at least 1",
            ),
            (
                FollowerArgs {
                    device: "tpu".into(),
                    ..Default::default()
                },
                "unknown device",
            ),
        ] {
            let e = args.generation().unwrap_err();
            assert!(ConfigError::is_in(&e), "{e:#} is a configuration error");
            assert!(format!("{e:#}").contains(says), "{e:#}");
        }
        assert_eq!(FollowerArgs::default().generation().unwrap().max_batch, 32);
    }
}
