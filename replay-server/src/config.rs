//! Command-line / environment configuration of the replay server ([`ReplayArgs`]).
//!
//! Every flag `--foo-bar` is also the environment variable `HINDSIGHT_FOO_BAR` (the same
//! name as in every other role), so a container can be configured without a command line. [`ReplayArgs::validate`] rejects inconsistent
//! settings before anything is bound.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::bail;

/// Whether failed responses are replayed with rewritten instructions (HiR).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Hindsight {
    /// Actors generate m responses per prompt; (n - m) per prompt are filled with replays.
    #[default]
    On,
    /// Actors generate n responses per prompt and nothing is replayed (plain GRPO).
    Off,
}

/// What a sample's reward is (`--reward`): the paper's binary reward, or the constraint-level
/// accuracy (CLA) baseline. Success (every constraint holds) is reported the same either way.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reward {
    /// 1 when every constraint holds, else 0 (HiR and the binary baseline).
    #[default]
    Binary,
    /// The fraction of the constraints that hold (the CLA baseline's dense reward).
    Cla,
}

impl Reward {
    /// The reward of a response with these verdicts (no constraint: 0 either way).
    pub fn of(self, verdicts: &[bool]) -> f32 {
        match self {
            Reward::Binary => hindsight_constraints::hir::reward(verdicts),
            Reward::Cla => hindsight_constraints::hir::constraint_accuracy(verdicts) as f32,
        }
    }
}

/// Settings of the replay server.
#[derive(clap::Args, Clone, Debug)]
pub struct ReplayArgs {
    /// Address the gRPC server listens on (all interfaces by default, for containers).
    #[arg(long, env = "HINDSIGHT_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], 50051)))]
    pub listen: SocketAddr,
    /// Model whose tokenizer templates the prompts: `tiny`, `smollm2` or a `.gguf` path.
    #[arg(long, env = "HINDSIGHT_MODEL", default_value = "tiny")]
    pub model: String,
    /// Where downloaded tokenizers / models are cached (default: the policy crate's).
    #[arg(long, env = "HINDSIGHT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Training prompts as JSONL records; without it a seeded set is generated.
    #[arg(long, env = "HINDSIGHT_PROMPTS")]
    pub prompts: Option<PathBuf>,
    /// Size of the generated prompt set (when --prompts is not given).
    #[arg(long, env = "HINDSIGHT_NUM_PROMPTS", default_value_t = 512)]
    pub num_prompts: usize,
    /// Seed of the prompt generator and of the per-epoch prompt shuffle.
    #[arg(long, env = "HINDSIGHT_SEED", default_value_t = 0)]
    pub seed: u64,
    /// n: samples per prompt in a training batch (originals + replays).
    #[arg(long, env = "HINDSIGHT_GROUP_SIZE", default_value_t = 8)]
    pub group_size: u32,
    /// m: responses the actors generate per prompt with hindsight on (m <= n).
    #[arg(long, env = "HINDSIGHT_RESPONSES_PER_PROMPT", default_value_t = 6)]
    pub responses_per_prompt: u32,
    /// Hindsight instruction replay on or off.
    #[arg(long, env = "HINDSIGHT_HINDSIGHT", value_enum, default_value_t = Hindsight::On)]
    pub hindsight: Hindsight,
    /// Reward of an original response: `binary` (every constraint holds) or `cla` (the
    /// fraction that hold). Replays always have reward 1 (every kept constraint holds).
    #[arg(long, env = "HINDSIGHT_REWARD", value_enum, default_value_t = Reward::Binary)]
    pub reward: Reward,
    /// Prompts (groups) per training batch.
    #[arg(long, env = "HINDSIGHT_PROMPTS_PER_BATCH", default_value_t = 4)]
    pub prompts_per_batch: u32,
    /// lambda_0 of the HiR selection schedule.
    #[arg(long, env = "HINDSIGHT_LAMBDA0", default_value_t = 2.0)]
    pub lambda0: f64,
    /// eta (decay) of the HiR selection schedule.
    #[arg(long, env = "HINDSIGHT_ETA", default_value_t = 0.05)]
    pub eta: f64,
    /// Groups generated more than this many policy versions ago are dropped.
    #[arg(long, env = "HINDSIGHT_MAX_STALENESS", default_value_t = 4)]
    pub max_staleness: u64,
    /// Back-pressure: batches' worth of groups waiting for the learner (leased, waiting for a
    /// batch, or in a batch not trained yet); at the bound leases are refused with
    /// RESOURCE_EXHAUSTED and a retry delay. Waiting groups live in the log, not in memory.
    #[arg(long, env = "HINDSIGHT_MAX_PENDING_BATCHES", default_value_t = 2)]
    pub max_pending_batches: u32,
    /// Back-pressure: log bytes of groups waiting for the learner.
    #[arg(
        long,
        env = "HINDSIGHT_MAX_PENDING_BYTES",
        default_value_t = 1 << 30
    )]
    pub max_pending_bytes: u64,
    /// Size after which the write-ahead log starts a new segment file.
    #[arg(
        long,
        env = "HINDSIGHT_SEGMENT_BYTES",
        default_value_t = crate::wal::DEFAULT_SEGMENT_BYTES
    )]
    pub segment_bytes: u64,
    /// A prompt lease not completed, renewed or released within this time is re-queued.
    #[arg(long, env = "HINDSIGHT_LEASE_TIMEOUT_MS", default_value_t = 120_000)]
    pub lease_timeout_ms: u64,
    /// Sampling temperature the actors use.
    #[arg(long, env = "HINDSIGHT_TEMPERATURE", default_value_t = 1.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold the actors use.
    #[arg(long, env = "HINDSIGHT_TOP_P", default_value_t = 1.0)]
    pub top_p: f32,
    /// Longest response the actors generate, in tokens.
    #[arg(long, env = "HINDSIGHT_MAX_NEW_TOKENS", default_value_t = 256)]
    pub max_new_tokens: u32,
    /// Directory of the write-ahead log. Without it the log lives in a temporary directory
    /// that is removed at exit (nothing survives a restart).
    #[arg(long, env = "HINDSIGHT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Append every sample of every batch built to this JSONL file (provenance, verdicts,
    /// instruction and response text).
    #[arg(long, env = "HINDSIGHT_BATCH_LOG")]
    pub batch_log: Option<PathBuf>,
    /// Largest gRPC message accepted or sent.
    #[arg(long, env = "HINDSIGHT_MAX_MESSAGE_BYTES", default_value_t = hindsight_proto::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// TLS and per-role credentials (`hindsight certs` makes them), or `--insecure`.
    #[command(flatten)]
    pub security: hindsight_service::ServerSecurityArgs,
    /// The drain bound after SIGTERM.
    #[command(flatten)]
    pub shutdown: hindsight_service::ShutdownArgs,
}

impl Default for ReplayArgs {
    /// The same values as the command-line defaults.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            model: "tiny".to_owned(),
            cache_dir: None,
            prompts: None,
            num_prompts: 512,
            seed: 0,
            group_size: 8,
            responses_per_prompt: 6,
            hindsight: Hindsight::On,
            reward: Reward::Binary,
            prompts_per_batch: 4,
            lambda0: 2.0,
            eta: 0.05,
            max_staleness: 4,
            max_pending_batches: 2,
            max_pending_bytes: 1 << 30,
            segment_bytes: crate::wal::DEFAULT_SEGMENT_BYTES,
            lease_timeout_ms: 120_000,
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 256,
            data_dir: None,
            batch_log: None,
            max_message_bytes: hindsight_proto::MAX_MESSAGE_BYTES,
            security: hindsight_service::ServerSecurityArgs::default(),
            shutdown: hindsight_service::ShutdownArgs::default(),
        }
    }
}

impl hindsight_service::ToArgv for ReplayArgs {
    /// The flags that parse back to these settings (every one, defaults included).
    fn to_argv(&self) -> Vec<String> {
        let mut a = hindsight_service::Argv::new();
        a.opt("--listen", self.listen)
            .opt("--model", &self.model)
            .path_some("--cache-dir", &self.cache_dir)
            .path_some("--prompts", &self.prompts)
            .opt("--num-prompts", self.num_prompts)
            .opt("--seed", self.seed)
            .opt("--group-size", self.group_size)
            .opt("--responses-per-prompt", self.responses_per_prompt)
            .value_enum("--hindsight", &self.hindsight)
            .value_enum("--reward", &self.reward)
            .opt("--prompts-per-batch", self.prompts_per_batch)
            .opt("--lambda0", self.lambda0)
            .opt("--eta", self.eta)
            .opt("--max-staleness", self.max_staleness)
            .opt("--max-pending-batches", self.max_pending_batches)
            .opt("--max-pending-bytes", self.max_pending_bytes)
            .opt("--segment-bytes", self.segment_bytes)
            .opt("--lease-timeout-ms", self.lease_timeout_ms)
            .opt("--temperature", self.temperature)
            .opt("--top-p", self.top_p)
            .opt("--max-new-tokens", self.max_new_tokens)
            .path_some("--data-dir", &self.data_dir)
            .path_some("--batch-log", &self.batch_log)
            .opt("--max-message-bytes", self.max_message_bytes)
            .extend(&self.security)
            .extend(&self.shutdown);
        a.into_vec()
    }
}

impl ReplayArgs {
    /// Rejects settings the server cannot run with.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.group_size == 0 {
            bail!("--group-size (n) must be at least 1");
        }
        if self.hindsight == Hindsight::On
            && (self.responses_per_prompt == 0 || self.responses_per_prompt > self.group_size)
        {
            bail!(
                "--responses-per-prompt (m = {}) must be between 1 and --group-size (n = {})",
                self.responses_per_prompt,
                self.group_size
            );
        }
        if self.prompts_per_batch == 0 {
            bail!("--prompts-per-batch must be at least 1");
        }
        if self.max_pending_batches == 0 {
            bail!("--max-pending-batches must be at least 1");
        }
        if self.max_pending_bytes == 0 {
            bail!("--max-pending-bytes must be at least 1");
        }
        if self.segment_bytes < 4096 {
            bail!("--segment-bytes must be at least 4096");
        }
        if self.lease_timeout_ms == 0 {
            bail!("--lease-timeout-ms must be at least 1");
        }
        if self.max_new_tokens == 0 {
            bail!("--max-new-tokens must be at least 1");
        }
        if self.prompts.is_none() && self.num_prompts == 0 {
            bail!("--num-prompts must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("--temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
        if !(self.lambda0.is_finite() && self.eta.is_finite()) {
            bail!("--lambda0 and --eta must be finite");
        }
        if self.max_message_bytes < 1024 {
            bail!("--max-message-bytes must be at least 1024");
        }
        Ok(())
    }

    /// Responses an actor generates per prompt: m with hindsight on, n with it off.
    pub fn actor_responses(&self) -> u32 {
        match self.hindsight {
            Hindsight::On => self.responses_per_prompt,
            Hindsight::Off => self.group_size,
        }
    }

    /// K = (n - m) * prompts_per_batch replays per batch (0 with hindsight off).
    pub fn replays_per_batch(&self) -> usize {
        match self.hindsight {
            Hindsight::On => {
                self.group_size.saturating_sub(self.responses_per_prompt) as usize
                    * self.prompts_per_batch as usize
            }
            Hindsight::Off => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReplayArgs,
    }

    #[test]
    fn clap_defaults_match_default_impl() {
        let parsed = Cli::parse_from(["replay"]).args;
        let default = ReplayArgs::default();
        assert_eq!(format!("{parsed:?}"), format!("{default:?}"));
        default.validate().unwrap();
        assert_eq!(default.actor_responses(), 6);
        assert_eq!(default.replays_per_batch(), 8);
    }

    #[test]
    fn renders_to_flags_that_parse_back() {
        hindsight_service::assert_round_trip(&ReplayArgs {
            listen: "10.1.2.3:7000".parse().unwrap(),
            model: "smollm2".into(),
            cache_dir: Some("/c".into()),
            prompts: Some("/p.jsonl".into()),
            num_prompts: 9,
            seed: 3,
            group_size: 5,
            responses_per_prompt: 2,
            hindsight: Hindsight::Off,
            reward: Reward::Cla,
            prompts_per_batch: 7,
            lambda0: 0.125,
            eta: 0.3,
            max_staleness: 11,
            max_pending_batches: 12,
            max_pending_bytes: 13,
            segment_bytes: 8192,
            lease_timeout_ms: 14,
            temperature: 0.7,
            top_p: 0.9,
            max_new_tokens: 15,
            data_dir: Some("/d".into()),
            batch_log: Some("/b.jsonl".into()),
            max_message_bytes: 4096,
            security: hindsight_service::ServerSecurityArgs {
                tls_cert: Some("/s/c.pem".into()),
                tls_key: Some("/s/k.pem".into()),
                auth_tokens: Some("/s/t.txt".into()),
                insecure: true,
            },
            shutdown: hindsight_service::ShutdownArgs {
                shutdown_timeout_secs: 3,
            },
        });
    }

    #[test]
    fn binary_and_cla_rewards() {
        let v = [true, false, true, true];
        assert_eq!(Reward::Binary.of(&v), 0.0);
        assert_eq!(Reward::Cla.of(&v), 0.75);
        assert_eq!(Reward::Binary.of(&[true, true]), 1.0);
        assert_eq!(Reward::Cla.of(&[true, true]), 1.0);
        assert_eq!(Reward::Cla.of(&[false, false]), 0.0);
        assert_eq!((Reward::Binary.of(&[]), Reward::Cla.of(&[])), (0.0, 0.0));
    }

    #[test]
    fn hindsight_flag_and_validation() {
        let args = Cli::parse_from(["replay", "--hindsight", "off", "--group-size", "5"]).args;
        assert_eq!(args.hindsight, Hindsight::Off);
        assert_eq!(args.actor_responses(), 5);
        assert_eq!(args.replays_per_batch(), 0);
        assert_eq!(args.reward, Reward::Binary);
        let args = Cli::parse_from(["replay", "--reward", "cla"]).args;
        assert_eq!(args.reward, Reward::Cla);
        assert!(Cli::try_parse_from(["replay", "--reward", "dense"]).is_err());
        let bad = ReplayArgs {
            responses_per_prompt: 9,
            ..ReplayArgs::default()
        };
        assert!(bad.validate().is_err());
        let bad = ReplayArgs {
            prompts_per_batch: 0,
            ..ReplayArgs::default()
        };
        assert!(bad.validate().is_err());
    }
}
